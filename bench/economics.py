"""Loop economics: what a 20-iteration task costs through Loopwright, against loops written by hand.

One scripted task, run on the same fake model (tests/model_server.py, which accounts prompt caching
the way the Messages API documents it) four ways in one run:

- naive: one growing conversation; each verdict is appended to it;
- ralph: a fresh conversation per iteration, carrying a progress file and the latest verdict;
- ralph, cached: the same with the stable prefix and the conversation marked for caching, and all
  but the newest tool output stubbed;
- Loopwright: the real engine, the built-in `anthropic` maker through the real SDK, the built-in
  tools, a verifier that fails with 1,500 characters of feedback until the last iteration.

Each iteration: three tool calls whose outputs are 2,000 characters, then a text turn; the loop's own
instructions are 6,000 characters. Then Loopwright again with `max_cost_usd` at 30% of its full
run's cost: the spend must stay under the cap.

    .venv/bin/python bench/economics.py      # about a minute; writes bench/results/economics.json
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

TMP = tempfile.TemporaryDirectory(prefix="loopwright-economics-")
os.environ["LOOPWRIGHT_HOME"] = str(Path(TMP.name) / "home")  # before any runtime import
os.environ["LOOPWRIGHT_LOAD_PLUGINS"] = ""
os.environ.pop("LOOPWRIGHT_DATABASE_URL", None)
os.environ["ANTHROPIC_API_KEY"] = API_KEY = "bench-key"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import anthropic  # noqa: E402
from model_server import ModelServer, _prompt  # noqa: E402

from loopwright.plugins import sandbox_tools  # noqa: E402
from loopwright.runtime import context  # noqa: E402
from loopwright.runtime.config import load_settings  # noqa: E402
from loopwright.runtime.hookspecs import hookimpl  # noqa: E402
from loopwright.runtime.plugin_host import make_plugin_host  # noqa: E402
from loopwright.runtime.service import Runtime  # noqa: E402
from loopwright.runtime.spec import parse_spec  # noqa: E402
from loopwright.runtime.types import CheckResult, ExecResult, Failure, ToolContext  # noqa: E402

MODEL = "claude-sonnet-5-5"
MIN_CACHEABLE_TOKENS = 1024  # the API's minimum for Sonnet: shorter prefixes are not cached
ITERATIONS = 20
CALLS = 3  # tool calls per iteration, then a text turn
OUTPUT_CHARS = 2000
INSTRUCTIONS_CHARS = 6000
FEEDBACK_CHARS = 1500
BUDGET_SHARE = 0.30
GOALS = {"cost_vs_naive": 0.05, "cost_vs_ralph": 0.35, "cache_read_share": 0.80, "input_growth": 1.2}
GOAL = "Make the failing tests of the billing module pass without changing what the tests expect."
WORDS = ("the invoice total rounding line item tax rate customer ledger balance account period discount "
         "currency amount refund payment schedule report export field value record module function test "
         "expected actual assert error trace call returned raised module handler parser config").split()


def prose(seed: str, chars: int) -> str:
    """Deterministic text of exactly `chars` characters that no other seed repeats."""
    rng = random.Random(hashlib.sha256(seed.encode()).digest())
    words = [seed]
    while sum(map(len, words)) + len(words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:chars]


INSTRUCTIONS = prose("instructions", INSTRUCTIONS_CHARS)


def feedback(iteration: int) -> str:
    return prose(f"check output of iteration {iteration}", FEEDBACK_CHARS)


# --- the scripted model: three tool calls, then a text turn ------------------------------------


def script() -> Callable[[dict], dict]:
    counter = iter(range(1, 1_000_000))

    def reply(body: dict) -> dict:
        messages = body["messages"]
        opened = max(i for i, m in enumerate(messages) if m["role"] == "user" and not _is_results(m))
        done = sum(1 for m in messages[opened:] if m["role"] == "assistant"
                   for b in m["content"] if b["type"] == "tool_use")
        n = next(counter)
        if done < CALLS:
            return {"content": [{"type": "tool_use", "name": "run_command",
                                 "input": {"command": f"python -m pytest -x tests/test_billing.py -k case{n}"}}]}
        return {"content": [{"type": "text", "text": f"Changed the rounding in billing.py (attempt {n}): the totals "
                                                      "now round half up per line before tax is applied."}]}

    return reply


def _is_results(message: dict) -> bool:
    content = message["content"]
    return isinstance(content, list) and bool(content) and all(b.get("type") == "tool_result" for b in content)


# --- the sandbox and the check Loopwright's run uses (the reference loops use the same output) ---


class BenchSandbox:
    worktree = Path("/workspace")

    def run(self, command, *, timeout, stdin=None):
        return ExecResult(0, prose(command, OUTPUT_CHARS), "", 1.0)

    def close(self):
        pass


class BenchSandboxes:
    def start(self, *, run_id, worktree, spec, verification=False):
        return BenchSandbox()

    def reap_orphans(self):
        return []


class FailingCheck:
    """Fails with 1,500 characters of feedback; one test fewer fails each iteration (progress, no stall)."""

    def __init__(self, check):
        self.check = check

    def verify(self, ctx):
        failing = max(ITERATIONS + 1 - ctx.iteration, 1)
        text = feedback(ctx.iteration)
        return CheckResult(self.check.label, False, text, hashlib.sha1(text.encode()).hexdigest()[:12],
                           headline=f"{failing} failed", score=float(failing),
                           failures=[Failure(f"tests/test_billing.py::test_case{k}", "AssertionError: totals differ")
                                     for k in range(failing)])


class BenchPlugin:
    finished = threading.Event()

    @hookimpl
    def loopwright_register_sandboxes(register):
        register("bench", BenchSandboxes())

    @hookimpl
    def loopwright_register_verifiers(register):
        register("bench", FailingCheck)

    @hookimpl
    def loopwright_run_finished(run, outcome):
        BenchPlugin.finished.set()


# --- the reference loops, written by hand on the SDK -------------------------------------------

TOOL_CONTEXT = ToolContext(None, BenchSandbox(), 120, 30_000)  # type: ignore[arg-type]
TOOLS = [{"name": t.name, "description": t.description, "input_schema": t.input_schema} for t in sandbox_tools.TOOLS]


def run_tool(block: Any) -> dict:
    result = sandbox_tools.run_command(TOOL_CONTEXT, block.input)
    return {"type": "tool_result", "tool_use_id": block.id, "content": result.content, "is_error": result.is_error}


def turn(client, system, messages: list, usages: list, iteration: int, prepare=lambda m: m, tools=TOOLS) -> str:
    """Model and tool calls until the model ends its turn; returns what it said last."""
    while True:
        reply = client.messages.create(model=MODEL, max_tokens=8192, system=system, tools=tools,
                                       messages=prepare(messages))
        usages.append((iteration, reply.usage.model_dump(exclude_none=True)))
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]})
        calls = [b for b in reply.content if b.type == "tool_use"]
        if not calls:
            return " ".join(b.text for b in reply.content if b.type == "text")
        messages.append({"role": "user", "content": [run_tool(b) for b in calls]})


SYSTEM = f"You are a coding agent working in a git repository at /workspace.\n\n{INSTRUCTIONS}\n\n# Goal\n{GOAL}"


def naive(client) -> list:
    usages: list = []
    messages = [{"role": "user", "content": "Start working toward the goal."}]
    for iteration in range(1, ITERATIONS + 1):
        turn(client, SYSTEM, messages, usages, iteration)
        messages.append({"role": "user", "content": f"The tests still fail:\n{feedback(iteration)}\nFix what failed."})
    return usages


def ralph(client, cached: bool = False) -> list:
    usages: list = []
    progress: list[str] = []  # the progress file the loop keeps between fresh conversations
    system: Any = [{"type": "text", "text": SYSTEM, **({"cache_control": {"type": "ephemeral"}} if cached else {})}]
    for iteration in range(1, ITERATIONS + 1):
        opening = "Start working toward the goal."
        if progress:
            opening = ("# progress.md\n" + "\n".join(progress) + f"\n\n# Latest test output\n{feedback(iteration - 1)}"
                       "\n\nFix what failed.")
        said = turn(client, system, [{"role": "user", "content": opening}], usages, iteration,
                    prepare=stub_and_mark if cached else (lambda m: m))
        progress.append(f"- iteration {iteration}: {said} Tests: {context.first_line(feedback(iteration), 80)}")
    return usages


def stub_and_mark(messages: list) -> list:
    """All but the newest tool output stubbed; the conversation so far marked for caching."""
    messages = json.loads(json.dumps(messages))
    results = [b for m in messages if _is_results(m) for b in m["content"]]
    for block in results[:-1]:
        block["content"] = "[output elided]"
    last = messages[-1]
    if isinstance(last["content"], str):
        last["content"] = [{"type": "text", "text": last["content"]}]
    last["content"][-1]["cache_control"] = {"type": "ephemeral"}
    return messages


# --- Loopwright ---------------------------------------------------------------------------------


def make_repo(path: Path) -> Path:
    import subprocess

    path.mkdir(parents=True)
    (path / "billing.py").write_text("def total(lines):\n    return sum(lines)\n")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "initial"]):
        subprocess.run(["git", "-c", "user.name=B", "-c", "user.email=b@example.invalid", "-C", str(path), *args],
                       check=True, capture_output=True)
    return path


def loopwright(runtime: Runtime, repo: Path, max_cost_usd: float) -> tuple[list, dict]:
    spec = parse_spec({
        "name": "economics", "goal": GOAL, "workspace": {"repo": str(repo)},
        "agent": {"model": MODEL, "system": INSTRUCTIONS},
        "sandbox": {"kind": "bench"},
        "verify": [{"kind": "bench", "name": "tests"}],
        "stop": {"max_iterations": ITERATIONS, "max_cost_usd": max_cost_usd, "stall_after": ITERATIONS},
    })
    BenchPlugin.finished.clear()
    run = runtime.start_run(spec)
    if not BenchPlugin.finished.wait(300):
        raise SystemExit(f"run {run.id} did not finish in 300 s")
    time.sleep(0.5)  # the run_finished step is recorded after the hook returns
    row = runtime.get_run(run.id)
    calls = [e for e in runtime.trace(run.id, limit=100_000) if e["kind"] == "model_call"]
    usages = [(e["iteration"], {"input_tokens": e["input_tokens"], "output_tokens": e["output_tokens"],
                                "cache_creation_input_tokens": e["cache_write_tokens"],
                                "cache_read_input_tokens": e["cache_read_tokens"]}) for e in calls]
    return usages, {"run": run.id, "status": row.status, "reason": row.reason, "iterations": row.iteration,
                    "spent_usd": row.spent_usd, "max_cost_usd": max_cost_usd}


# --- figures ------------------------------------------------------------------------------------


def ideal_cost(requests: list[dict], price: dict) -> float:
    """What the same requests would cost with perfect caching: each new block paid once at the input
    price, the longest prefix any earlier request sent read from the cache."""
    seen: set[str] = set()
    total = 0.0
    for body in requests:
        prompt = _prompt(body)
        known = max((i for i, (_, digest, _) in enumerate(prompt) if digest in seen), default=-1)
        read = sum(tokens for tokens, _, _ in prompt[:known + 1])
        fresh = sum(tokens for tokens, _, _ in prompt[known + 1:])
        seen.update(digest for _, digest, _ in prompt)
        total += read * price["cache_read"] + fresh * price["input"]
    return total / 1_000_000


def figures(usages: list, requests: list[dict], settings) -> dict:
    cost = sum(settings.cost(MODEL, u) for _, u in usages)

    def prompt(u):
        return u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"]

    per_call = {i: [prompt(u) for it, u in usages if it == i] for i in range(1, ITERATIONS + 1)}
    later = [u for it, u in usages if it >= 2]
    read = sum(u["cache_read_input_tokens"] for u in later) / max(sum(prompt(u) for u in later), 1)
    mean = {i: round(sum(v) / len(v)) for i, v in per_call.items() if v}
    return {
        "cost_usd": round(cost, 5),
        "model_calls": len(usages),
        "input_per_call_by_iteration": mean,
        "input_growth_2_to_last": round(mean[max(mean)] / mean[2], 3) if 2 in mean else None,
        "cache_read_share_from_iteration_2": round(read, 3),
        "cache_write_tokens": sum(u["cache_creation_input_tokens"] for _, u in usages),
        "uncached_input_tokens": sum(u["input_tokens"] for _, u in usages),
        "output_tokens": sum(u["output_tokens"] for _, u in usages),
        "ideal_caching_cost_usd": round(ideal_cost(requests, settings.price(MODEL)), 5),
    }


def measured(name: str, loop: Callable[[Any], list], settings) -> dict:
    started = time.monotonic()
    with ModelServer(script(), api_key=API_KEY, min_cacheable_tokens=MIN_CACHEABLE_TOKENS) as server:
        client = anthropic.Anthropic(base_url=server.url, api_key=API_KEY)
        usages = loop(client)
        result = figures(usages, server.requests, settings)
    result["seconds"] = round(time.monotonic() - started, 1)
    print(f"  {name}: ${result['cost_usd']:.4f} in {result['seconds']} s", flush=True)
    return result


def main() -> None:
    settings = load_settings(Path(TMP.name))
    settings.disabled_plugins.append("docker_sandbox")  # the bench's own sandbox runs nothing
    repo = make_repo(Path(TMP.name) / "repo")
    runtime = Runtime(settings, make_plugin_host(settings, extra_plugins=(BenchPlugin,)))
    runtime.launch()
    extra: dict[str, dict] = {}

    def through_loopwright(cap: float) -> Callable[[Any], list]:
        def loop(client) -> list:
            os.environ["ANTHROPIC_BASE_URL"] = str(client.base_url)
            usages, extra[str(cap)] = loopwright(runtime, repo, cap)
            return usages
        return loop

    try:
        print("running the loops:", flush=True)
        loops = {
            "naive": measured("naive", naive, settings),
            "ralph": measured("ralph", ralph, settings),
            "ralph_cached": measured("ralph_cached", lambda c: ralph(c, cached=True), settings),
            "loopwright": measured("loopwright", through_loopwright(1000.0), settings),
        }
        loops["loopwright"]["run"] = extra["1000.0"]
        cap = round(BUDGET_SHARE * loops["loopwright"]["cost_usd"], 6)
        capped = measured("loopwright, capped", through_loopwright(cap), settings)
        capped["run"] = extra[str(cap)]
    finally:
        runtime.shutdown()
    naive_cost, ralph_cost = loops["naive"]["cost_usd"], loops["ralph"]["cost_usd"]
    for figures_ in loops.values():
        figures_["cost_vs_naive"] = round(figures_["cost_usd"] / naive_cost, 4)
        figures_["cost_vs_ralph"] = round(figures_["cost_usd"] / ralph_cost, 4)
        figures_["ideal_vs_naive"] = round(figures_["ideal_caching_cost_usd"] / naive_cost, 4)
    lw = loops["loopwright"]
    budget = {"max_cost_usd": cap, "spent_usd": round(capped["run"]["spent_usd"], 6),
              "spent_by_model_server_usd": capped["cost_usd"], "status": capped["run"]["status"],
              "reason": capped["run"]["reason"], "iterations": capped["run"]["iterations"]}
    budget["never_above_cap"] = max(budget["spent_usd"], budget["spent_by_model_server_usd"]) <= cap
    result = {
        "benchmark": "loop economics: a scripted 20-iteration task on the fake model, four loops",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "task": {"iterations": ITERATIONS, "tool_calls_per_iteration": CALLS, "tool_output_chars": OUTPUT_CHARS,
                 "instructions_chars": INSTRUCTIONS_CHARS, "feedback_chars": FEEDBACK_CHARS, "model": MODEL,
                 "prices_per_million": settings.price(MODEL), "min_cacheable_tokens": MIN_CACHEABLE_TOKENS},
        "loops": loops,
        "budget": budget,
        "goals": GOALS,
        "goals_met": {
            "cost_vs_naive": lw["cost_vs_naive"] <= GOALS["cost_vs_naive"],
            "cost_vs_ralph": lw["cost_vs_ralph"] <= GOALS["cost_vs_ralph"],
            "cache_read_share": lw["cache_read_share_from_iteration_2"] >= GOALS["cache_read_share"],
            "input_growth": (lw["input_growth_2_to_last"] or 0) <= GOALS["input_growth"],
            "budget_never_above_cap": budget["never_above_cap"],
        },
    }
    out = ROOT / "bench" / "results" / "economics.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'loop':<14}{'cost $':>9}{'vs naive':>10}{'vs ralph':>10}{'in/call it2':>13}{'it20':>8}"
          f"{'cache read':>12}{'ideal/naive':>13}")
    for name, f in loops.items():
        per = f["input_per_call_by_iteration"]
        print(f"{name:<14}{f['cost_usd']:>9.4f}{f['cost_vs_naive']:>10.3f}{f['cost_vs_ralph']:>10.3f}"
              f"{per.get(2, 0):>13}{per.get(ITERATIONS, 0):>8}{f['cache_read_share_from_iteration_2']:>11.0%}"
              f"{f['ideal_vs_naive']:>13.3f}")
    print(f"\nbudget ${cap:.4f} (30% of the full run): spent ${budget['spent_usd']:.4f} "
          f"({budget['status']}: {budget['reason']})")
    print("goals met:", json.dumps(result["goals_met"]), f"\nwritten to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
