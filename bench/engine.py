"""Engine overhead per durable agent step, beside LangGraph's: an instant model and a no-op tool, so only
the engines are measured.

An *agent step* is one model call and the tool call it asks for. Loopwright runs the real runtime (DBOS,
the engine, the plugin host) in a child process per database, with a maker that makes N agent steps in
one turn; LangGraph runs the same loop as its usual two-node graph (an agent node, a ToolNode) with its
checkpointer, `durability="sync"`, in the same run. Both are durable after every step. Each is timed
inside the loop, at 20 steps and at 1,000 (is the cost per step flat as the trace grows?), on SQLite, and
on PostgreSQL when LOOPWRIGHT_BENCH_POSTGRES (or the tests' server) is reachable.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/engine.py            # writes bench/results/engine.json
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "engine.json"
POSTGRES = os.environ.get("LOOPWRIGHT_BENCH_POSTGRES", "postgresql://loopwright:loopwright@127.0.0.1:5432/postgres")
SHORT, LONG = 20, 1000  # agent steps per run
REPEATS = 5  # short runs per engine: the median is reported
GOAL_RATIO = 0.5  # Loopwright's agent step at most half of LangGraph's
MODEL = "claude-haiku-5-5"
REPLY = {"content": [{"type": "tool_use", "id": "t1", "name": "noop", "input": {}}],
         "stop_reason": "tool_use", "usage": {"input_tokens": 10, "output_tokens": 5}}


# --- Loopwright, in a child process per database ------------------------------------------------

def loopwright_child(database: str) -> dict:
    """Time agent steps inside a real run: ms per step at SHORT (median of REPEATS runs) and at LONG."""
    tmp = tempfile.TemporaryDirectory(prefix="loopwright-bench-")
    os.environ["LOOPWRIGHT_HOME"] = str(Path(tmp.name) / "home")  # before any runtime import
    os.environ["LOOPWRIGHT_LOAD_PLUGINS"] = ""
    if database == "sqlite":
        os.environ.pop("LOOPWRIGHT_DATABASE_URL", None)
    else:
        os.environ["LOOPWRIGHT_DATABASE_URL"] = database

    from loopwright import ExecResult, Tool, hookimpl
    from loopwright.runtime.config import load_settings
    from loopwright.runtime.plugin_host import make_plugin_host
    from loopwright.runtime.service import Runtime
    from loopwright.runtime.spec import parse_spec

    async def send(request):
        return REPLY

    class InstantMaker:
        steps = 0  # set before each run
        step_s: list[float] = []

        def __init__(self, agent_spec, settings):
            self.spec = agent_spec

        async def take_turn(self, turn):
            request = {"model": self.spec.model, "messages": [{"role": "user", "content": turn.opening}]}
            InstantMaker.step_s = []
            for _ in range(self.steps):
                started = time.perf_counter()
                reply = await turn.model(self.spec.model, request, send)
                block = reply["content"][0]
                await turn.tool(block["id"], block["name"], block["input"])
                InstantMaker.step_s.append(time.perf_counter() - started)
            return "end_turn"

    class NullSandbox:
        def run(self, command, *, timeout, stdin=None):
            return ExecResult(0, "", "", 0.0)

        def close(self):
            pass

    class NullSandboxes:
        def start(self, *, run_id, worktree, spec, verification=False):
            return NullSandbox()

        def reap_orphans(self):
            return []

    finished = threading.Event()

    class BenchPlugin:
        @hookimpl
        def loopwright_register_agents(register):
            register("instant", InstantMaker)

        @hookimpl
        def loopwright_register_sandboxes(register):
            register("none", NullSandboxes())

        @hookimpl
        def loopwright_register_tools(register):
            register(Tool("noop", "does nothing", {"type": "object", "properties": {}}, lambda ctx, arguments: "ok"))

        @hookimpl
        def loopwright_run_finished(run, outcome):
            finished.set()

    repo = Path(tmp.name) / "repo"
    repo.mkdir()
    for args in (["init", "-q", "-b", "main"], ["commit", "-q", "--allow-empty", "-m", "initial"]):
        subprocess.run(["git", "-c", "user.name=B", "-c", "user.email=b@example.invalid", "-C", str(repo), *args],
                       check=True, capture_output=True)
    spec = parse_spec({
        "name": "bench", "goal": "measure the engine", "workspace": {"repo": str(repo)},
        "agent": {"kind": "instant", "model": MODEL, "max_tool_calls": 10_000},
        "sandbox": {"kind": "none"}, "verify": [{"kind": "command", "run": "true"}], "stop": {"max_iterations": 1},
    })
    settings = load_settings(Path(tmp.name))
    runtime = Runtime(settings, make_plugin_host(settings, extra_plugins=(BenchPlugin,)))
    runtime.launch()

    def timed(steps: int) -> list[float]:
        InstantMaker.steps = steps
        finished.clear()
        run = runtime.start_run(spec)
        if not finished.wait(600):
            raise SystemExit(f"run {run.id} did not finish in 600 s")
        row = runtime.get_run(run.id)
        if row.status != "succeeded":
            raise SystemExit(f"run {run.id} ended {row.status}: {row.reason}")
        return [s * 1000 for s in InstantMaker.step_s]

    try:
        timed(5)  # warm-up: imports, connections, the first worktree
        short = [statistics.mean(timed(SHORT)) for _ in range(REPEATS)]
        long = timed(LONG)
    finally:
        runtime.shutdown()
    return summary(short, long)


def summary(short: list[float], long: list[float]) -> dict:
    """ms per agent step at SHORT (median over runs), at LONG (mean), and over LONG's first and last 100."""
    return {"ms_per_step_at_20": round(statistics.median(short), 3), "ms_per_step_at_1000": round(statistics.mean(long), 3),
            "first_100_ms": round(statistics.mean(long[:100]), 3), "last_100_ms": round(statistics.mean(long[-100:]), 3)}


# --- LangGraph, in this process ---------------------------------------------------------------------

def langgraph(saver_kind: str, pragma: str | None = None) -> dict:
    """The same agent steps as a LangGraph graph (agent node -> ToolNode -> agent ...), checkpointed after
    every super-step (durability="sync")."""
    from typing import Annotated, TypedDict

    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_core.tools import tool
    from langgraph.graph import END, START, StateGraph
    from langgraph.graph.message import add_messages
    from langgraph.prebuilt import ToolNode

    @tool
    def noop() -> str:
        """does nothing"""
        return "ok"

    State = TypedDict("State", {"messages": Annotated[list, add_messages], "steps": int})  # noqa: UP013 (evaluated here)

    stamps: list[float] = []

    def agent(state):
        stamps.append(time.perf_counter())
        done = sum(isinstance(m, AIMessage) for m in state["messages"])
        if done >= state["steps"]:
            return {"messages": [AIMessage(content="done")]}
        return {"messages": [AIMessage(content="", tool_calls=[{"name": "noop", "args": {}, "id": f"t{done}"}])]}

    graph = StateGraph(State)
    graph.add_node("agent", agent)
    graph.add_node("tools", ToolNode([noop]))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", lambda state: "tools" if state["messages"][-1].tool_calls else END)
    graph.add_edge("tools", "agent")

    def timed(app, steps: int, thread: str) -> list[float]:
        stamps.clear()
        app.invoke({"messages": [HumanMessage("go")], "steps": steps},
                   {"configurable": {"thread_id": thread}, "recursion_limit": 10 * steps + 10}, durability="sync")
        return [(b - a) * 1000 for a, b in zip(stamps, stamps[1:])]  # agent node to agent node: one agent step

    def measure(app) -> dict:
        timed(app, 5, "warm-up")
        short = [statistics.mean(timed(app, SHORT, f"short-{i}")) for i in range(REPEATS)]
        return summary(short, timed(app, LONG, "long"))

    if saver_kind == "sqlite":
        from langgraph.checkpoint.sqlite import SqliteSaver

        with tempfile.TemporaryDirectory(prefix="langgraph-bench-") as folder:
            connection = sqlite3.connect(f"{folder}/checkpoints.sqlite", check_same_thread=False)
            saver = SqliteSaver(connection)
            saver.setup()
            if pragma:
                connection.execute(f"PRAGMA {pragma}")
            found = measure(graph.compile(checkpointer=saver))
            found["sqlite_synchronous"] = {0: "OFF", 1: "NORMAL", 2: "FULL"}[connection.execute("PRAGMA synchronous").fetchone()[0]]
            return found
    from langgraph.checkpoint.postgres import PostgresSaver

    with PostgresSaver.from_conn_string(saver_kind) as saver:
        saver.setup()
        return measure(graph.compile(checkpointer=saver))


# --- the run -------------------------------------------------------------------------------------

def child(database: str) -> dict:
    process = subprocess.run([sys.executable, __file__, "--child", database], capture_output=True, text=True,
                             cwd=ROOT, timeout=1800)
    if process.returncode:
        raise SystemExit(f"the Loopwright child on {database.split('@')[-1]} failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def postgres_database() -> str | None:
    """A fresh database on the PostgreSQL server, or None when there is none."""
    try:
        import psycopg

        name = f"loopwright_bench_{os.getpid()}"
        with psycopg.connect(POSTGRES, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name}")
            admin.execute(f"CREATE DATABASE {name}")
        return f"{POSTGRES.rsplit('/', 1)[0]}/{name}"
    except Exception as error:  # noqa: BLE001 (reported: the PostgreSQL figures are left out)
        print(f"note: no PostgreSQL at {POSTGRES.split('@')[-1]} ({error}); PostgreSQL figures left out", file=sys.stderr)
        return None


def drop(database: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {database.rsplit('/', 1)[1]} WITH (FORCE)")


def main() -> None:
    figures = {"loopwright_sqlite": child("sqlite"),
               "langgraph_sqlite": langgraph("sqlite"),
               "langgraph_sqlite_synchronous_normal": langgraph("sqlite", "synchronous=NORMAL")}
    if database := postgres_database():
        try:
            figures["loopwright_postgres"] = child(database)
            figures["langgraph_postgres"] = langgraph(database)
        finally:
            drop(database)
    ratio = figures["loopwright_sqlite"]["ms_per_step_at_20"] / figures["langgraph_sqlite"]["ms_per_step_at_20"]
    loopwright = figures["loopwright_sqlite"]
    result = {
        "benchmark": "durable agent step (model call + tool call): Loopwright vs LangGraph, instant model, no-op tool",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "sqlite": sqlite3.sqlite_version},
        "note": ("Loopwright's SQLite runs WAL with synchronous=NORMAL (a commit survives its process dying; a power "
                 "cut may lose the last ones); LangGraph's SqliteSaver keeps SQLite's default, FULL. The row with "
                 "NORMAL for LangGraph compares like with like."),
        "goal": f"Loopwright's agent step at most {GOAL_RATIO} of LangGraph's with its SQLite checkpointer at {SHORT} "
                f"steps, and flat from {SHORT} to {LONG}",
        "ratio_at_20": round(ratio, 3),
        "ratio_at_20_same_synchronous": round(
            loopwright["ms_per_step_at_20"] / figures["langgraph_sqlite_synchronous_normal"]["ms_per_step_at_20"], 3),
        "growth_last_vs_first_100_of_1000": round(loopwright["last_100_ms"] / loopwright["first_100_ms"], 3),
        "goal_met": ratio <= GOAL_RATIO and loopwright["last_100_ms"] <= 1.25 * loopwright["first_100_ms"],
        **figures,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'engine':<38} {'ms/step at 20':>14} {'at 1000':>9} {'first 100':>10} {'last 100':>9}")
    for name, row in figures.items():
        print(f"{name:<38} {row['ms_per_step_at_20']:>14.2f} {row['ms_per_step_at_1000']:>9.2f} "
              f"{row['first_100_ms']:>10.2f} {row['last_100_ms']:>9.2f}")
    print(f"\nLoopwright / LangGraph at {SHORT} steps: {result['ratio_at_20']:.2f} (goal <= {GOAL_RATIO}); "
          f"with the same synchronous setting: {result['ratio_at_20_same_synchronous']:.2f}")
    print(f"Loopwright's last 100 of {LONG} steps / its first 100: {result['growth_last_vs_first_100_of_1000']:.2f}   "
          f"goal {'met' if result['goal_met'] else 'NOT met'}\nwritten to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(loopwright_child(sys.argv[2])))
    else:
        main()
