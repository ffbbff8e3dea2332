"""OpenTelemetry export: a run's trace reaches an OTLP/HTTP collector as GenAI spans (plugins/otel.py)."""

from __future__ import annotations

import http.server
import threading

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from conftest import FIX, loopwright, run_id_of, write_spec
from model_server import text, tool_use

class Collector(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP receiver on loopback: each POST to /v1/traces decoded from its protobuf."""

    def __init__(self):
        self.requests: list[ExportTraceServiceRequest] = []
        self.paths: list[str] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.paths.append(self.path)
                collector.requests.append(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def spans(self) -> list:
        return [span for request in self.requests for resource in request.resource_spans
                for scope in resource.scope_spans for span in scope.spans]


def attributes(span) -> dict:
    found = {}
    for kv in span.attributes:
        value = kv.value
        kind = value.WhichOneof("value")
        found[kv.key] = list(v.string_value for v in value.array_value.values) if kind == "array_value" else getattr(value, kind)
    return found


def test_a_run_reaches_an_otlp_collector_as_genai_spans_without_secrets(home, project, model, monkeypatch):
    collector = Collector()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.server_address[1]}")
    server = model([tool_use("run_command", {"command": "python3 -m pytest -q -p no:cacheprovider"}), FIX,
                    text("Fixed the off-by-one in average().")])
    try:
        result = loopwright("run", str(write_spec(project, stop={"max_iterations": 2})))
    finally:
        collector.shutdown()
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = run_id_of(result)
    assert collector.paths and set(collector.paths) == {"/v1/traces"}

    spans = collector.spans()
    by_name = {}
    for span in spans:
        by_name.setdefault(span.name.split(" ")[0], []).append(span)
    (run,) = by_name["invoke_agent"]
    run_attributes = attributes(run)
    assert run_attributes["gen_ai.agent.id"] == run_id and run_attributes["loopwright.run.status"] == "succeeded"
    assert run.parent_span_id == b""

    chats, tools, checks = by_name["chat"], by_name["execute_tool"], by_name["verify"]
    assert len(chats) == len(server.requests) == 3
    assert [attributes(t)["gen_ai.tool.name"] for t in sorted(tools, key=lambda s: s.start_time_unix_nano)] == \
        ["run_command", "edit_file"]
    assert all(attributes(t)["gen_ai.tool.call.id"].startswith("toolu_") for t in tools)
    assert checks and all(s.trace_id == run.trace_id and s.parent_span_id == run.span_id for s in chats + tools + checks)
    for chat in chats:
        found = attributes(chat)
        assert found["gen_ai.operation.name"] == "chat" and found["gen_ai.provider.name"] == "anthropic"
        assert found["gen_ai.usage.input_tokens"] > 0 and found["gen_ai.usage.output_tokens"] > 0
        assert found["loopwright.cost_usd"] > 0
        assert chat.start_time_unix_nano <= chat.end_time_unix_nano
    assert sum(attributes(c)["gen_ai.usage.cache_read.input_tokens"] for c in chats) > 0
    assert abs(run_attributes["loopwright.cost_usd"] - sum(attributes(c)["loopwright.cost_usd"] for c in chats)) < 1e-6
    assert not any("gen_ai.output.messages" in attributes(c) for c in chats)  # no content unless opted in

    raw = b"".join(request.SerializeToString() for request in collector.requests)
    assert b"test-key" not in raw  # the API key the maker used (conftest's `model`)
