"""OpenTelemetry export of every run's trace (docs/observability.md), on when the standard
`OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set.

When a run ends, its trace becomes spans that follow the GenAI semantic conventions: one
`invoke_agent <loop>` span for the run, and under it a `chat <model>` span per model call (maker and
reviewer), an `execute_tool <name>` span per tool call and a `verify <check>` span per check, with
their `gen_ai.*` attributes (provider, models, tokens, cache reads and writes, tool name and call id)
and the cost as `loopwright.cost_usd` (the conventions have none). They are sent over OTLP/HTTP with
the OpenTelemetry SDK's exporter, which reads the other `OTEL_EXPORTER_OTLP_*` variables (headers,
timeout, compression). Ids derive from the run id and the event keys, so a hook that fires again
after a crash sends the same spans, not new ones. Prompts, replies, tool input and output are sent
only when `OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`; the trace holds no secret.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import TYPE_CHECKING, Any

from loopwright.runtime.hookspecs import hookimpl
from loopwright.runtime.types import Outcome, RunInfo

if TYPE_CHECKING:
    from loopwright.runtime.plugin_host import PluginHost

log = logging.getLogger(__name__)
ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
CAPTURE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
CONTENT_CHARS = 4000  # of one attribute's text, when content is captured


@hookimpl
def loopwright_run_finished(run: RunInfo, outcome: Outcome, host: PluginHost) -> None:
    if not any(os.environ.get(name) for name in ENDPOINTS):
        return
    try:
        export(spans_of(run, outcome, host))
    except Exception as error:  # an unreachable collector costs the export, never the run
        log.warning("OpenTelemetry export of run %s failed: %s", run.id, error)


def export(spans: list[Any]) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    exporter = OTLPSpanExporter()  # endpoint, headers, timeout: the OTEL_EXPORTER_OTLP_* variables
    try:
        if exporter.export(spans) is not SpanExportResult.SUCCESS:
            raise RuntimeError(f"the collector did not accept {len(spans)} spans")
    finally:
        exporter.shutdown()


def spans_of(run: RunInfo, outcome: Outcome, host: PluginHost) -> list[Any]:
    """The run's trace as finished spans: the run's span, then one per model call, tool call and check."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    row = host.store.get_run(run.id)
    trace_id = int(_digest(run.id)[:32], 16)
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "loopwright")})
    scope = InstrumentationScope("loopwright")
    capture = os.environ.get(CAPTURE, "").lower() == "true"

    def context(key: str) -> SpanContext:
        return SpanContext(trace_id, int(_digest(f"{run.id}/{key}")[:16], 16), False, TraceFlags(TraceFlags.SAMPLED))

    root = context("run")
    provider = "anthropic" if run.spec.agent.kind == "anthropic" else run.spec.agent.kind
    started = _ns(row.started_at or row.created_at)
    spans = []
    total = 0.0
    for event in _events(host, run.id):
        made = _span_of(event, provider, capture)
        if made is None:
            continue
        name, kind, attributes, failed = made
        total += event["cost_usd"]
        start, end = _times(event)
        spans.append(ReadableSpan(
            name, context(event["key"]), parent=root, resource=resource, attributes=attributes,
            kind=SpanKind.CLIENT if kind == "client" else SpanKind.INTERNAL, start_time=start, end_time=end,
            status=Status(StatusCode.ERROR if failed else StatusCode.OK), instrumentation_scope=scope,
        ))
    attributes = {
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": run.loop, "gen_ai.agent.id": run.id,
        "gen_ai.provider.name": provider, "gen_ai.request.model": run.spec.agent.model,
        "loopwright.run.id": run.id, "loopwright.run.status": outcome.status, "loopwright.run.reason": outcome.reason[:500],
        "loopwright.run.iterations": outcome.iterations, "loopwright.cost_usd": round(total, 6),
    }
    run_span = ReadableSpan(
        f"invoke_agent {run.loop}", root, parent=None, resource=resource, attributes=attributes,
        kind=SpanKind.INTERNAL, start_time=started, end_time=max(_ns(row.finished_at) if row.finished_at else 0,
                                                                   max((s.end_time for s in spans), default=started)),
        status=Status(StatusCode.OK if outcome.status == "succeeded" else StatusCode.ERROR, outcome.reason[:200]),
        instrumentation_scope=scope,
    )
    return [run_span, *spans]


def _span_of(event: dict[str, Any], provider: str, capture: bool) -> tuple[str, str, dict[str, Any], bool] | None:
    """A span's name, kind, attributes and whether it failed, for an event that is a call or a check."""
    data = event["data"]
    common = {"loopwright.iteration": event["iteration"], "loopwright.event.key": event["key"]}
    if event["kind"] == "model_call":
        model = data.get("model", "")
        attributes = {
            **common, "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider,
            "gen_ai.request.model": model, "gen_ai.response.model": model,
            # all of the input, the cached part included (the conventions' reading); the cached parts also apart
            "gen_ai.usage.input_tokens": event["input_tokens"] + event["cache_read_tokens"] + event["cache_write_tokens"],
            "gen_ai.usage.output_tokens": event["output_tokens"],
            "gen_ai.usage.cache_read.input_tokens": event["cache_read_tokens"],
            "gen_ai.usage.cache_creation.input_tokens": event["cache_write_tokens"],
            "loopwright.cost_usd": event["cost_usd"], "loopwright.role": data.get("role", "maker"),
        }
        if data.get("stop_reason"):
            attributes["gen_ai.response.finish_reasons"] = [data["stop_reason"]]
        if capture and "content" in data:
            attributes["gen_ai.output.messages"] = _text(data["content"])
        return f"chat {model}", "client", attributes, bool(data.get("error") or data.get("unfinished"))
    if event["kind"] == "tool_call":
        attributes = {**common, "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": data.get("tool", ""),
                      "gen_ai.tool.call.id": data.get("call_id", event["key"])}
        if capture:
            attributes["gen_ai.tool.call.arguments"] = _text(data.get("input"))
            attributes["gen_ai.tool.call.result"] = _text(data.get("output", ""))
        return f"execute_tool {data.get('tool', '')}", "internal", attributes, bool(data.get("is_error"))
    if event["kind"] == "check":
        attributes = {**common, "loopwright.check.name": data.get("name", ""),
                      "loopwright.check.passed": bool(data.get("passed"))}
        return f"verify {data.get('name', '')}", "internal", attributes, not data.get("passed")
    return None


def _events(host: PluginHost, run_id: str):
    seen = 0
    while batch := host.store.events(run_id, after=seen, limit=500):
        yield from batch
        seen = batch[-1]["seq"]


def _times(event: dict[str, Any]) -> tuple[int, int]:
    """A call is traced when it begins (its `at` is its start); a check when it ends."""
    at, length = _ns(event["at"]), int(event["duration_ms"] * 1_000_000)
    return (at, at + length) if event["kind"] in ("model_call", "tool_call") else (at - length, at)


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:CONTENT_CHARS]


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
