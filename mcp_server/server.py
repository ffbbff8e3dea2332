"""Loop control as MCP tools. Each tool maps onto the runtime's public API and nothing more."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from loopwright.runtime.config import ConfigError
from loopwright.runtime.plugin_host import PluginError
from loopwright.runtime.service import RunError, Runtime
from loopwright.runtime.spec import Float, Int, SpecError, load_spec, loop_files, parse_spec, parse_spec_text
from loopwright.runtime.records import UnknownRun
from loopwright.runtime.types import STALL_TOOL

from .resources import RunResources

INSTRUCTIONS = """Loopwright runs coding agents in loops until an objective check passes. Start a run \
with start_loop (a loop name from list_loops, or an inline TOML spec); it returns a run id at once. \
Then poll get_run or block with wait_for_run; read what happened with get_run_trace; stop_run stops it. \
Each run is also a resource, loopwright://runs/{run_id} and loopwright://runs/{run_id}/trace, that you can \
subscribe to."""

EXPECTED = (SpecError, ConfigError, PluginError, RunError, UnknownRun)


@contextlib.contextmanager
def _as_tool_errors() -> Iterator[None]:
    """Bad input reaches the calling model as an isError result that says what to do."""
    try:
        yield
    except EXPECTED as error:
        raise ToolError(str(error)) from error


def _run_summary(runtime: Runtime, run_id: str) -> dict[str, Any]:
    return runtime.status(run_id).to_dict()


def _progress_message(runtime: Runtime, run_id: str, summary: dict[str, Any]) -> str:
    message = f"iteration {summary['iteration']}: {summary['status']}"
    if summary["status"] == "waiting_approval":
        for approval in runtime.list_approvals(run_id):
            what = ("the loop stalled: " + approval["input"]["reason"] if approval["tool"] == STALL_TOOL
                    else f"tool call {approval['tool']}")
            message += f"; waiting for a person ({what}): answer approval {approval['id']} with decide_approval"
    return message


class _Server(MCPServer):
    """The SDK's server, but an argument a tool does not take is an error that names it (ignored, a misspelt
    `max_cost_usd` would start a run with the default budget), and so is a string that is no valid text."""

    _takes: dict[str, set[str]] | None = None

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        if self._takes is None:
            self._takes = {tool.name: set(tool.input_schema.get("properties", {})) for tool in await self.list_tools()}
        unknown = sorted(set(arguments) - self._takes.get(name, set(arguments)))
        if unknown:
            takes = ", ".join(sorted(self._takes[name])) or "no arguments"
            raise ToolError(f"{name} takes no argument {', '.join(repr(u[:50]) for u in unknown)}; it takes: {takes}")
        for key, value in arguments.items():
            if isinstance(value, str) and not _is_text(value):
                raise ToolError(f"{key}: not valid text (it holds a lone surrogate, which no UTF-8 text can)")
        return await super().call_tool(name, arguments, context)


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def build_server(runtime: Runtime, loops_dir: Path) -> MCPServer:
    """Every tool and resource, for any transport."""
    resources = RunResources(runtime)
    mcp = _Server("loopwright", instructions=INSTRUCTIONS, version="0.1.0", log_level="WARNING",
                    subscriptions=resources.bus, lifespan=resources.lifespan)
    resources.install(mcp)

    def loop_file(name: str) -> Path:
        if not name or name.startswith(".") or Path(name).name != name or "\x00" in name or name.endswith(".eval"):
            raise ToolError(f"{name[:100]!r} is not a loop name: give the name of a loop from list_loops "
                            "(a file name in the loops folder, without .toml)")
        path = loops_dir / f"{name}.toml"
        if not path.is_file():
            known = ", ".join(p.stem for p in loop_files(loops_dir)) or "none"
            raise ToolError(f"no loop named {name!r} in {loops_dir}; defined loops: {known}. Or pass an inline spec.")
        return path

    @mcp.tool()
    async def list_loops() -> dict[str, Any]:
        """The loops defined in the project's loops folder, with their goals and triggers."""
        loops = []
        for path in loop_files(loops_dir):
            try:
                spec = load_spec(path)
            except SpecError as error:
                loops.append({"name": path.stem, "file": str(path), "error": str(error)})
                continue
            loops.append({"name": spec.name, "file": str(path), "goal": spec.goal,
                          "triggers": [t.kind for t in spec.trigger]})
        return {"loops_dir": str(loops_dir), "loops": loops}

    @mcp.tool()
    async def start_loop(loop: str | None = None, spec: str | None = None, max_iterations: Int | None = None,
                         max_cost_usd: Float | None = None, max_wall_time: str | None = None) -> dict[str, Any]:
        """Start a run of a loop and return its run id at once.

        Give `loop`, the name of a loop from list_loops, or `spec`, a whole loop spec as TOML text
        (its workspace.repo must be an absolute path). `max_iterations`, `max_cost_usd` (dollars) and
        `max_wall_time` (e.g. "20m") override the spec's budgets for this run only.
        `executed_by` says which process runs it (the daemon, or a worker process that outlives this
        session and exits when no run is left). Follow the run with get_run or wait_for_run.
        """
        if (loop is None) == (spec is None):
            raise ToolError("give exactly one of `loop` (a name from list_loops) or `spec` (TOML text)")
        budgets = {"max_iterations": max_iterations, "max_cost_usd": max_cost_usd, "max_wall_time": max_wall_time}
        with _as_tool_errors():
            parsed = load_spec(loop_file(loop)) if loop is not None else parse_spec_text(spec or "", "inline spec")
            if spec and not Path(parsed.workspace.repo).is_absolute():
                raise ToolError("an inline spec needs an absolute workspace.repo: the path of the git repository to work on")
            if any(value is not None for value in budgets.values()):
                data = parsed.model_dump(mode="json")
                data["stop"].update({k: v for k, v in budgets.items() if v is not None})
                parsed = parse_spec(data, f"{loop or 'inline spec'} with the budgets given to start_loop")
            run = await anyio.to_thread.run_sync(runtime.start_run, parsed)
            executed_by = await anyio.to_thread.run_sync(runtime.ensure_executor)
            return {"run_id": run.id, "loop": run.loop, "branch": run.branch, "status": run.status,
                    "executed_by": executed_by}

    @mcp.tool()
    async def get_run(run_id: str) -> dict[str, Any]:
        """A run's status, iteration, last verdict with failing checks, spend and tokens, and stop reason."""
        with _as_tool_errors():
            return _run_summary(runtime, run_id)

    @mcp.tool()
    async def list_runs(loop: str | None = None, status: str | None = None, limit: int = 20) -> dict[str, Any]:
        """Runs, newest first, optionally only of one loop or with one status
        (queued, running, succeeded, failed, stalled, stopped, error)."""
        runs = runtime.list_runs(loop, status, max(1, min(limit, 200)))
        return {"runs": [
            {"run_id": r.id, "loop": r.loop, "status": r.status, "iteration": r.iteration, "reason": r.reason}
            for r in runs
        ]}

    @mcp.tool()
    async def wait_for_run(run_id: str, timeout_s: float = 60, ctx: Context | None = None) -> dict[str, Any]:
        """Block until the run finishes or `timeout_s` passes (at most 600), reporting progress at each
        iteration and when the run starts waiting for a person (the approval to answer with
        decide_approval); then return what get_run returns. Call again if it is still running."""
        with _as_tool_errors():
            deadline = anyio.current_time() + max(0.0, min(timeout_s, 600.0))
            reported: tuple[int, str] | None = None
            done = -1.0  # progress must grow: a wait for a person is halfway to the next iteration
            while True:
                summary = _run_summary(runtime, run_id)
                state = (summary["iteration"], summary["status"])
                if ctx is not None and state != reported and (state[0] > done or state[1] == "waiting_approval"):
                    reported = state
                    done = float(state[0]) if state[0] > done else done + (state[0] + 1 - done) / 2
                    await ctx.report_progress(done, summary["max_iterations"], _progress_message(runtime, run_id, summary))
                if summary["finished_at"] is not None or anyio.current_time() >= deadline:
                    return summary
                await anyio.sleep(0.25)

    @mcp.tool()
    async def get_run_trace(run_id: str, after: int = 0, limit: int = 50, newest: bool = False) -> dict[str, Any]:
        """A page of a run's trace (model calls with tokens and cost, tool calls, verdicts), oldest first.
        Pass `after` = the previous page's `next_cursor` to continue, or `newest=true` for the latest events."""
        with _as_tool_errors():
            events = runtime.trace(run_id, after=after, limit=max(1, min(limit, 500)), newest=newest)
            return {"events": events, "next_cursor": events[-1]["seq"] if events else after}

    @mcp.tool()
    async def stop_run(run_id: str) -> dict[str, Any]:
        """Ask a running run to stop; it stops before its next model or tool call, with outcome `stopped`."""
        with _as_tool_errors():
            run = await anyio.to_thread.run_sync(runtime.stop_run, run_id)
            return {"run_id": run.id, "status": run.status, "stop_requested": True}

    @mcp.tool()
    async def pause_run(run_id: str) -> dict[str, Any]:
        """Pause a run before its next model or tool call (status `paused`); resume_run continues it.
        Paused time does not count against the run's wall-time limit."""
        with _as_tool_errors():
            run = await anyio.to_thread.run_sync(runtime.pause_run, run_id)
            return {"run_id": run.id, "status": run.status, "pause_requested": True}

    @mcp.tool()
    async def resume_run(run_id: str) -> dict[str, Any]:
        """Continue a paused run."""
        with _as_tool_errors():
            run = await anyio.to_thread.run_sync(runtime.resume_run, run_id)
            return {"run_id": run.id, "status": run.status, "pause_requested": False}

    @mcp.tool()
    async def list_approvals(run_id: str | None = None) -> dict[str, Any]:
        """Tool calls waiting for a person's decision (all runs, or one), with the rule that gated them,
        and stalled loops asking whether to go on (tool "(stall)", the reason in `input`).
        Answer each with decide_approval."""
        with _as_tool_errors():
            return {"approvals": [
                {"approval_id": a["id"], "run_id": a["run_id"], "tool": a["tool"], "input": a["input"],
                 "rule": a["rule"], "expires_at": a["expires_at"]}
                for a in runtime.list_approvals(run_id)
            ]}

    @mcp.tool()
    async def decide_approval(approval_id: str, allow: bool, note: str = "") -> dict[str, Any]:
        """Allow or deny a tool call waiting for approval. The maker reads `note` (e.g. why it was denied,
        or what to do instead); a denied call is not run and the loop goes on. For a stalled loop that
        asks (tool "(stall)"): allow lets it go on, the maker reading `note` first; deny stops the run."""
        with _as_tool_errors():
            decided = await anyio.to_thread.run_sync(runtime.decide_approval, approval_id, allow, note)
            return {"approval_id": decided["id"], "status": decided["status"], "note": decided["note"]}

    @mcp.tool()
    async def improve_loop(loop: str) -> dict[str, Any]:
        """Start an improvement of a loop from list_loops (docs/improve.md): an improver changes its harness one
        proposal at a time, each measured on the loop's eval set (loops/<loop>.eval.toml) and kept only when the
        loop does better and the held-out cases agree; kept changes are commits on the returned branch, for a
        person to review. Returns its run id at once; follow it with get_run, read the ledger with get_ledger."""
        from loopwright.runtime.improve import start_improvement

        with _as_tool_errors():
            run = await anyio.to_thread.run_sync(lambda: start_improvement(runtime, loop_file(loop), here=False))
            executed_by = await anyio.to_thread.run_sync(runtime.ensure_executor)
            return {"run_id": run.id, "loop": loop, "branch": run.branch, "status": run.status,
                    "executed_by": executed_by}

    @mcp.tool()
    async def get_ledger(loop: str) -> dict[str, Any]:
        """Every improvement of a loop, newest first: its branch, spend, baseline, and each candidate change with
        its learn and held-out scores, cost, and whether it was kept and why."""
        from loopwright.runtime.improve import ledger

        return {"loop": loop, "improvements": await anyio.to_thread.run_sync(ledger, runtime.store, loop)}

    return mcp


def serve_stdio(loops_dir: Path | None = None) -> None:
    """`loopwright mcp`. It executes no run itself: a daemon does, or else a detached worker it starts
    (`loopwright worker`), so runs outlive this session and its client."""
    runtime = Runtime()
    # The durable executor starts beside the server, not before it: a client lists the tools at once
    # (Claude Code in -p mode sends its first request without waiting long). A run started meanwhile
    # is queued, and taken when the executor is up.
    loops = loops_dir or Path(os.environ.get("LOOPWRIGHT_LOOPS", "loops")).resolve()
    server = build_server(runtime, loops)
    if runtime.running_daemon() is None:  # a daemon executes the runs, or a worker this process starts
        runtime.launch_in_background(take_work=False)
        threading.Thread(target=runtime.hand_over_orphans, name="loopwright-hand-over", daemon=True).start()
    # A client ends the server with SIGTERM: exit normally so this process's sandboxes are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    gc.freeze()  # what start-up made lives as long as this process: collections need not look at it again
    gc.enable()  # off while starting, if `loopwright mcp` turned it off (cli.py)
    code = 0
    try:
        server.run("stdio")
    except SystemExit as exiting:  # SIGTERM
        code = exiting.code or 0
    finally:
        runtime.shutdown()
    # The SDK reads stdin in a worker thread that only a line or the end of input wakes, and Python waits
    # for that thread before it exits: a client that ends this server with SIGTERM but keeps stdin open
    # would wait for ever. So finish as Python would (its exit handlers: logging, exporters, sandboxes),
    # then leave without waiting for that thread.
    atexit._run_exitfuncs()
    sys.stderr.flush()
    os._exit(code)

