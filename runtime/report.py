"""A run as one HTML page: its iterations with their verdict headlines, cost per iteration and the
cumulative spend as a chart, every model and tool call with its input and output, and the diff.

`loopwright report RUN` writes it as one self-contained file (inline style and SVG, no script, no
font, nothing fetched), to attach to a pull request or an issue; the daemon's dashboard serves the
same page. Everything shown comes from the run's trace, which holds no secret.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from typing import Any

from .types import Verdict

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5rem auto; max-width: 72rem; padding: 0 1rem; color: #1b1f24; }
h1 { font-size: 1.3rem; margin-bottom: .2rem; } h2 { font-size: 1.05rem; margin-top: 1.6rem; }
.muted { color: #57606a; } .pass { color: #1a7f37; font-weight: 600; } .fail { color: #cf222e; font-weight: 600; }
table { border-collapse: collapse; width: 100%; } td, th { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #d0d7de; }
details { margin: .15rem 0 .15rem 1rem; } summary { cursor: pointer; }
pre { background: #f6f8fa; padding: .5rem; overflow-x: auto; white-space: pre-wrap; max-height: 24rem; }
.iteration { border-left: 3px solid #d0d7de; padding-left: .8rem; margin: .8rem 0; }
.iteration.passed { border-color: #1a7f37; } .iteration.failed { border-color: #cf222e; }
svg text { font: 11px system-ui, sans-serif; fill: #57606a; }
"""


@dataclass
class Iteration:
    number: int
    cost_usd: float = 0.0
    spent_usd: float = 0.0  # the run's spend up to the end of this iteration
    headline: str = ""
    passed: bool | None = None  # None: no verdict (yet)
    calls: list[dict[str, Any]] = field(default_factory=list)  # model and tool calls, in order


def iterations(events: list[dict[str, Any]]) -> list[Iteration]:
    """The trace grouped by iteration: each one's calls, cost, cumulative spend and verdict."""
    found: dict[int, Iteration] = {}
    for event in events:
        number = event["iteration"]
        if number < 1 and event["kind"] not in ("model_call", "tool_call"):
            continue
        row = found.setdefault(number, Iteration(number))
        row.cost_usd += event["cost_usd"]
        if event["kind"] in ("model_call", "tool_call"):
            row.calls.append(event)
        elif event["kind"] == "verdict":
            verdict = Verdict.from_dict(event["data"])
            row.passed, row.headline = verdict.passed, verdict.headline
    spent = 0.0
    rows = [found[n] for n in sorted(found)]
    for row in rows:
        spent += row.cost_usd
        row.spent_usd = spent
    return rows


def cost_chart(rows: list[Iteration], budget: float) -> str:
    """Cost per iteration as bars and the cumulative spend as a line, against the budget: inline SVG."""
    width, height, left, bottom, top = 640, 220, 56, 28, 12
    plot_w, plot_h = width - left - 12, height - bottom - top
    spent = max([r.spent_usd for r in rows] + [1e-6])
    ceiling = budget if spent * 4 >= budget else spent * 1.25  # a budget far above the spend would flatten it
    step = plot_w / max(len(rows), 1)

    def y(value: float) -> float:
        return top + plot_h * (1 - min(value, ceiling) / ceiling)

    parts = [f'<svg id="cost-chart" role="img" aria-label="cost per iteration and cumulative spend" '
             f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 12}" y2="{top + plot_h}" stroke="#d0d7de"/>',
             (f'<line x1="{left}" y1="{y(budget):.1f}" x2="{width - 12}" y2="{y(budget):.1f}" stroke="#cf222e" '
              f'stroke-dasharray="4 3"/><text x="{left - 4}" y="{y(budget) + 4:.1f}" text-anchor="end">${budget:.2f}</text>'
              if ceiling == budget else
              f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">${ceiling:.4f}</text>'
              f'<text x="{width - 12}" y="{top + 4}" text-anchor="end">budget ${budget:.2f}, above the chart</text>'),
             f'<text x="{left - 4}" y="{top + plot_h + 4}" text-anchor="end">$0</text>']
    points = []
    for index, row in enumerate(rows):
        x = left + index * step
        bar_h = plot_h * row.cost_usd / ceiling
        parts.append(f'<rect class="bar" x="{x + step * .2:.1f}" y="{top + plot_h - bar_h:.1f}" width="{step * .6:.1f}" '
                     f'height="{bar_h:.1f}" fill="#8c959f"><title>iteration {row.number}: ${row.cost_usd:.4f}</title></rect>')
        parts.append(f'<text x="{x + step / 2:.1f}" y="{height - 10}" text-anchor="middle">{row.number}</text>')
        points.append(f"{x + step / 2:.1f},{y(row.spent_usd):.1f}")
    if points:
        parts.append(f'<polyline class="spend" points="{" ".join(points)}" fill="none" stroke="#0969da" stroke-width="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def run_page(status: dict[str, Any], events: list[dict[str, Any]], diff: str = "") -> str:
    """The whole page for a run (`status`: what `Runtime.status(...).to_dict()` gives)."""
    return page(f'{status["loop"]} · run {status["id"]}', run_body(status, events, diff))


def page(title: str, body: str, script: str = "") -> str:
    """An HTML page with the style inline; `script`, when given, inline too."""
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>{body}'
            + (f"<script>{script}</script>" if script else "") + "</body></html>")


def run_body(status: dict[str, Any], events: list[dict[str, Any]], diff: str = "", approvals: str = "") -> str:
    """A run's page without its frame; `approvals`: what to show for its pending approvals (the dashboard's
    forms), else a list of them."""
    rows = iterations(events)
    e = html.escape
    state = "pass" if status["status"] == "succeeded" else "fail" if status.get("finished_at") else "muted"
    head = (f'<h1>{e(status["loop"])} <span class="muted">run {e(status["id"])}</span></h1>'
            f'<p><span id="run-status" class="{state}">{e(status["status"])}</span>'
            + (f" · {e(status['reason'])}" if status["reason"] else "")
            + f'</p><p class="muted">iteration {status["iteration"]} of {status["max_iterations"]} · '
            f'<span id="run-spend">spent ${status["spent_usd"]:.4f} of ${status["max_cost_usd"]:.2f}</span> · '
            f'{status["model_calls"]} model calls, {status["tool_calls"]} tool calls · branch {e(status["branch"])}'
            + (f" · commit {e(status['commit'][:10])}" if status["commit"] else "") + "</p>")
    approvals = approvals or "".join(
        f'<li id="approval-{e(a["approval_id"])}">{e(a["tool"])} <code>{e(json.dumps(a["input"])[:300])}</code> '
        f'({e(a["rule"])})</li>' for a in status.get("pending_approvals", []))
    body = [head]
    if approvals:
        body.append(f'<h2>Waiting for a person</h2><ul id="approvals">{approvals}</ul>')
    body.append("<h2>Cost</h2>" + cost_chart(rows, status["max_cost_usd"])
                + '<p class="muted">bars: cost of each iteration · line: the run\'s spend so far · dashed: the budget</p>')
    body.append('<h2>Iterations</h2><div id="iterations">')
    for row in rows:
        kind = "" if row.passed is None else " passed" if row.passed else " failed"
        verdict = ("" if row.passed is None else
                   f'<span class="verdict {"pass" if row.passed else "fail"}">{e(row.headline)}</span> · ')
        body.append(f'<div class="iteration{kind}" data-iteration="{row.number}"><strong>iteration {row.number}</strong> '
                    f'{verdict}<span class="muted">${row.cost_usd:.4f} this iteration · ${row.spent_usd:.4f} so far</span>')
        body.extend(_call(event) for event in row.calls)
        body.append("</div>")
    body.append("</div>")
    if diff:
        body.append(f'<h2>Diff</h2><pre id="diff">{e(diff)}</pre>')
    body.append(f'<p class="muted">Loopwright · {time.strftime("%Y-%m-%d %H:%M:%S %Z")}</p>')
    return "".join(body)


def _call(event: dict[str, Any]) -> str:
    e, data = html.escape, event["data"]
    if event["kind"] == "tool_call":
        state = "interrupted" if data.get("interrupted") else "running" if data.get("unfinished") else \
            "error" if data.get("is_error") else "ok"
        return (f'<details class="tool-call" data-key="{e(event["key"])}"><summary>→ {e(data.get("tool", ""))} '
                f'<code>{e(json.dumps(data.get("input"))[:120])}</code> · {state} · {event["duration_ms"]:.0f} ms</summary>'
                f'<pre>{e(json.dumps(data.get("input"), indent=1))}</pre><pre class="output">{e(str(data.get("output", "")))}</pre>'
                "</details>")
    said = "\n\n".join(
        b.get("text", "") if b.get("type") == "text" else f"[{b.get('type')}: {b.get('name', '')} {json.dumps(b.get('input', ''))}]"
        for b in data.get("content", []) if isinstance(b, dict))
    tokens = (f"in {event['input_tokens']} · out {event['output_tokens']} · cache w {event['cache_write_tokens']} "
              f"r {event['cache_read_tokens']}")
    return (f'<details class="model-call"><summary>{e(data.get("role", "maker"))} · {e(data.get("model", ""))} · {tokens} · '
            f'${event["cost_usd"]:.4f} · {event["duration_ms"]:.0f} ms</summary><pre>{e(said or data.get("error", ""))}</pre>'
            "</details>")


def export_lines(run: dict[str, Any], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run as training data, one record per iteration (`loopwright export`): what the maker was told,
    what it said and did, and the verdict as the reward (1.0 when every check passed, else the share of
    checks that passed)."""
    records = []
    for row in iterations(events):
        said, actions, prompt, verdict = [], [], "", None
        for event in row.calls:
            data = event["data"]
            if event["kind"] == "tool_call":
                actions.append({"tool": data.get("tool"), "input": data.get("input"), "is_error": bool(data.get("is_error")),
                                "output": str(data.get("output", ""))[:4000]})
            elif data.get("role", "maker") == "maker":
                said += [b["text"] for b in data.get("content", []) if isinstance(b, dict) and b.get("type") == "text"]
        for event in events:
            if event["iteration"] == row.number and event["kind"] == "turn_end":
                prompt = event["data"].get("opening", "")
            if event["iteration"] == row.number and event["kind"] == "verdict":
                verdict = event["data"]
        checks = (verdict or {}).get("checks", [])
        records.append({
            "run": run["id"], "loop": run["loop"], "goal": run["spec"].get("goal", ""), "iteration": row.number,
            "model": run["spec"].get("agent", {}).get("model", ""), "prompt": prompt, "said": said, "actions": actions,
            "verdict": verdict, "reward": 1.0 if row.passed else (sum(c["passed"] for c in checks) / len(checks) if checks else 0.0),
            "cost_usd": round(row.cost_usd, 6),
        })
    return [r for r in records if r["verdict"] is not None or r["actions"] or r["said"]]
