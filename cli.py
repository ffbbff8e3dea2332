"""The `loopwright` command: the composition root that puts the runtime, the plugins, MCP and the daemon
together. Exit codes: 0 succeeded, 1 a run did not succeed, 2 bad input.

It starts at once: each command imports what it uses, and the plugins (whose commands, such as
`sandbox`, come through `loopwright_register_commands`) load only for a command that needs them.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from .runtime.plugin_host import PluginHost
    from .runtime.service import Runtime
    from .runtime.spec import LoopSpec

BAD_INPUT = 2


def fail(message: str, code: int = BAD_INPUT) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _is_bad_input(error: Exception) -> bool:
    """A malformed spec, bad settings, a broken plugin, a request the runtime refuses, an unknown run."""
    from .runtime.config import ConfigError
    from .runtime.plugin_host import PluginError
    from .runtime.service import RunError
    from .runtime.spec import SpecError
    from .runtime.records import UnknownRun

    return isinstance(error, (SpecError, ConfigError, PluginError, RunError, UnknownRun))


def _runtime(*, read_only: bool = False) -> Runtime:
    from .runtime.service import Runtime

    return Runtime(read_only=read_only)


class Group(click.Group):
    """Bad input becomes one line on stderr and exit code 2, not a traceback. Plugins' commands are
    added the first time a command is asked for that is not Loopwright's own (or all are listed)."""

    _plugins_loaded = False

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as error:
            if _is_bad_input(error):
                fail(str(error))
            raise

    def _load_plugin_commands(self) -> None:
        if Group._plugins_loaded:
            return
        Group._plugins_loaded = True
        from .runtime.config import load_settings
        from .runtime.plugin_host import make_plugin_host

        try:
            make_plugin_host(load_settings()).pm.hook.loopwright_register_commands(cli=self)
        except Exception as error:
            if not _is_bad_input(error):
                raise
            click.echo(f"warning: plugin commands are not available: {error}", err=True)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, name) or (self._load_plugin_commands() or super().get_command(ctx, name))

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)


@click.group(cls=Group)
@click.version_option(package_name="loopwright")
def main() -> None:
    """Loopwright: run coding agents in loops until an objective check passes."""


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def validate(files: tuple[Path, ...]) -> None:
    """Check loop specs (and eval sets, NAME.eval.toml) without running them; report every problem."""
    from .runtime.config import load_settings
    from .runtime.plugin_host import make_plugin_host
    from .runtime.spec import SpecError, load_spec

    host = make_plugin_host(load_settings())  # no store: validating reads no database
    bad = 0
    for file in files:
        try:
            if file.name.endswith(".eval.toml"):
                from .runtime.improve import load_eval_set

                evals = load_eval_set(file)
                click.echo(f"{file}: ok (eval set: {len(evals.learn)} learn, {len(evals.held_out)} held-out cases)")
                continue
            spec = load_spec(file)
            problems = _plugin_problems(host, spec)
            if problems:
                raise SpecError(str(file), problems)
        except SpecError as error:
            bad += 1
            click.echo(str(error), err=True)
        else:
            click.echo(f"{file}: ok ({spec.name})")
    sys.exit(BAD_INPUT if bad else 0)


def _plugin_problems(host: PluginHost, spec: LoopSpec) -> list[str]:
    from .runtime.config import ConfigError
    from .runtime.plugin_host import PluginError
    from .runtime.trigger_specs import trigger_problems

    problems = []
    lookups = [("agent.kind", host.agent, spec.agent.kind), ("sandbox.kind", host.sandbox, spec.sandbox.kind)]
    lookups += [(f"verify[{i}].kind", host.verifier, c.kind) for i, c in enumerate(spec.verify)]
    for field, lookup, kind in lookups:
        try:
            lookup(kind)
        except PluginError as error:
            problems.append(f"{field}: {error}")
    try:
        host.settings.price(spec.agent.model)
    except ConfigError as error:
        problems.append(f"agent.model: {error}")
    return problems + trigger_problems(host, spec)


@main.command()
@click.option("--name", help="the loop's name (default: <repository>-tests)")
@click.option("--test", "command", help="the command that runs the tests, when it cannot be found")
def init(name: str | None, command: str | None) -> None:
    """Write a first loop for the git repository here: loops/NAME.toml, its tests as the check."""
    from .runtime.scaffold import ScaffoldError, write_loop

    try:
        path, found = write_loop(Path.cwd(), name, command)
    except ScaffoldError as error:
        fail(str(error))
    shown = path.relative_to(Path.cwd().resolve())
    click.echo(f"wrote {shown}: the check is `{found.command}` (found from {found.found})")
    click.echo(f"next: `loopwright validate {shown}`, then `loopwright run {shown}` (with ANTHROPIC_API_KEY set)")


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--replay", "session", metavar="SESSION",
              help="answer from a recorded run (a run id, or a file from `trace RUN --session`) instead of the model")
def run(file: Path, session: str | None) -> None:
    """Run a loop in the foreground, one line per iteration. Ctrl-C stops it."""
    from .runtime.spec import SpecError, load_spec

    spec = load_spec(file)
    problems = _plugin_problems((runtime := _runtime()).host, spec)
    if problems:
        raise SpecError(str(file), problems)
    recorded = None
    if session:
        from .runtime.replay import load_session

        recorded = load_session(session, runtime.store)
        click.echo(f"replaying the model's answers of run {recorded.get('run', '?')} ({len(recorded['answers'])} "
                   "model calls) from a recorded session: no model is called, nothing is spent; "
                   "the sandbox, tools and checks are real")
    runtime.launch(take_work=False, one_run=True)
    try:
        started = runtime.start_run(spec, here=True, replay=recorded)
        click.echo(f"run {started.id} of loop {spec.name} on branch {started.branch} (stop it with: loopwright stop {started.id})")
        status = _follow(runtime, started.id)
        runtime.wait_executed(started.id)
    finally:
        runtime.shutdown()
    sys.exit(0 if status == "succeeded" else 1)


@main.command()
@click.argument("loop")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path),
              help="the eval set (default: the spec's file with .eval.toml, e.g. loops/NAME.eval.toml)")
@click.option("--ledger", "show_ledger", is_flag=True, help="print every candidate of LOOP's improvements instead")
@click.option("--json", "as_json", is_flag=True, help="with --ledger: as JSON")
def improve(loop: str, eval_file: Path | None, show_ledger: bool, as_json: bool) -> None:
    """Improve a loop's harness on its eval set (LOOP: its spec file); kept changes go to a branch to review.

    With --ledger, LOOP may also be a loop's name. docs/improve.md explains it."""
    from .runtime.improve import ledger, ledger_lines, start_improvement
    from .runtime.spec import load_spec

    if show_ledger:
        name = load_spec(loop).name if loop.endswith(".toml") else loop
        entries = ledger(_runtime().store, name)
        if as_json:
            click.echo(json.dumps(entries, indent=2))
        else:
            click.echo("\n".join(ledger_lines(entries)) or f"no improvement of loop {name} yet: "
                                                            f"start one with `loopwright improve loops/{name}.toml`")
        return
    runtime = _runtime()
    runtime.launch(take_work=False)
    try:
        started = start_improvement(runtime, Path(loop), eval_file)
        click.echo(f"improvement {started.id} of loop {started.spec['name'].removesuffix('.improve')} on branch "
                   f"{started.branch} (stop it with: loopwright stop {started.id})")
        status = _follow(runtime, started.id)
        runtime.wait_executed(started.id)
    finally:
        runtime.shutdown()
    sys.exit(0 if status == "succeeded" else 1)


@main.command()
@click.argument("run_id", required=False)
def recover(run_id: str | None) -> None:
    """Continue runs whose process died (from their last finished step) and follow them."""
    runtime = _runtime()
    runtime.launch()  # takes over every run whose owning process is gone
    try:
        ours = runtime.recovered
        if run_id and run_id not in ours:
            run = runtime.get_run(run_id)
            if run.finished:
                fail(f"run {run_id} already finished ({run.status}); nothing to recover", 1)
            if not run.owner:
                fail(f"run {run_id} is queued: the daemon executes it, or `loopwright worker` where none runs")
            fail(f"run {run_id} belongs to a live process ({run.owner}); it is still running there")
        ids = [run_id] if run_id else ours
        if not ids:
            click.echo("no orphaned runs to recover")
            return
        statuses = []
        for rid in ids:
            click.echo(f"recovering run {rid}")
            statuses.append(_follow(runtime, rid))
            runtime.wait_executed(rid)
    finally:
        runtime.shutdown()
    sys.exit(0 if all(s == "succeeded" for s in statuses) else 1)


def _follow(runtime: Runtime, run_id: str) -> str:
    """Print what the run does as it happens (`_Lines`) until it ends; the first Ctrl-C asks it to stop."""
    interrupted = False

    def on_signal(signum, _frame):
        nonlocal interrupted
        if interrupted:
            raise KeyboardInterrupt
        interrupted = True
        click.echo("stopping after the current step (Ctrl-C again to quit at once)", err=True)
        runtime.stop_run(run_id)

    previous = signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _print_lines(runtime, run_id, follow=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def _print_lines(runtime: Runtime, run_id: str, follow: bool) -> str:
    """Print a run's lines so far and, following, its new ones until it ends (then a last line). Its status."""
    lines = _Lines(runtime, run_id)
    while True:
        for line in lines.poll():
            click.echo(line)
        run = runtime.get_run(run_id)
        if run.finished and lines.caught_up():
            status = runtime.status(run_id)
            click.echo(f"{run.status}: {run.reason} · branch {run.branch}"
                       + (f" · commit {run.commit_sha[:10]}" if run.commit_sha else "")
                       + f" · spent ${status.spent_usd:.4f} of ${status.max_cost_usd:.2f}")
            return run.status
        if not follow:
            return run.status
        time.sleep(0.2)


class _Lines:
    """A run's trace as lines while it grows: each tool call as it starts and as it ends, each verdict with
    the iteration's cost and the spend against the budget, a wait for a person with the command that
    answers it, a stall."""

    def __init__(self, runtime: Runtime, run_id: str):
        self.runtime, self.run_id = runtime, run_id
        self.seen = 0  # the trace is read after this sequence number
        self.running: list[str] = []  # keys of tool calls begun and not yet ended (settled in place)

    def caught_up(self) -> bool:
        return not self.running and not self.runtime.store.events(self.run_id, after=self.seen, limit=1)

    def poll(self) -> list[str]:
        store, lines = self.runtime.store, []
        for key in list(self.running):
            event = store.event(self.run_id, key)
            if event is not None and "unfinished" not in event["data"]:
                lines.append(_tool_end_line(event))
                self.running.remove(key)
        for event in store.events(self.run_id, after=self.seen, limit=500):
            self.seen = event["seq"]
            kind, data = event["kind"], event["data"]
            if kind == "tool_call":
                lines.append(f"  → {data['tool']} {json.dumps(data['input'])[:100]}")
                if "unfinished" in data:
                    self.running.append(event["key"])
                else:
                    lines.append(_tool_end_line(event))
            elif kind == "verdict":
                lines.append(_iteration_line(self.runtime, self.run_id, event))
            elif kind == "approval_requested":
                lines.append(_waiting_line(data))
            elif kind == "approval_resolved":
                lines.append(f"  approval {data['approval']}: {data['status']}" + (f" ({data['note']})" if data["note"] else ""))
            elif kind == "stall":
                lines.append(f"stalled, {data['stage']}: {data['reason']}")
            elif kind in ("eval_case", "eval_baseline", "candidate"):
                from .runtime.improve import event_line

                lines.append(event_line(event))
        return lines


def _tool_end_line(event: dict[str, Any]) -> str:
    data = event["data"]
    state = "interrupted" if data.get("interrupted") else "error" if data.get("is_error") else "ok"
    output = next((line.strip() for line in str(data.get("output", "")).splitlines() if line.strip()), "")
    return f"    {state} · {event['duration_ms']:.0f} ms" + (f" · {output[:100]}" if output else "")


def _waiting_line(data: dict[str, Any]) -> str:
    """A run waits for a person: what for, and the command that answers."""
    from .runtime.types import STALL_TOOL

    what = "the loop stalled: " + data["input"]["reason"] if data["tool"] == STALL_TOOL else \
        f"{data['tool']} {json.dumps(data['input'])[:100]}"
    return (f"waiting for a person ({what}); answer with `loopwright approve {data['approval']}` "
            f"(--deny to refuse, --note TEXT for the maker)")


def _iteration_line(runtime: Runtime, run_id: str, event: dict[str, Any]) -> str:
    from .runtime.types import Verdict

    verdict = Verdict.from_dict(event["data"])
    # Read up to this iteration: the next one's calls may be in the trace already.
    before, through = runtime.store.totals(run_id, verdict.iteration - 1), runtime.store.totals(run_id, verdict.iteration)
    cap = runtime.get_run(run_id).spec["stop"]["max_cost_usd"]
    return (f"iteration {verdict.iteration}: {verdict.headline} · ${through.cost_usd - before.cost_usd:.4f} this iteration"
            f" ({through.model_calls - before.model_calls} model calls, {through.tool_calls - before.tool_calls} tool calls)"
            f" · spent ${through.cost_usd:.4f} of ${cap:.2f}")


@main.command()
@click.option("--loop", help="only runs of this loop")
@click.option("--status", help="only runs with this status")
@click.option("--json", "as_json", is_flag=True)
def runs(loop: str | None, status: str | None, as_json: bool) -> None:
    """List runs, newest first."""
    runtime = _runtime(read_only=True)
    found = runtime.list_runs(loop, status)
    if as_json:
        click.echo(json.dumps([runtime.status(r.id).to_dict() for r in found], indent=2))
        return
    for r in found:
        click.echo(f"{r.id}  {r.loop:<24} {r.status:<10} iteration {r.iteration:<3} {_time(r.created_at)}  {r.reason}")
    if not found:
        click.echo("no runs")


@main.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True)
def status(run_id: str, as_json: bool) -> None:
    """A run's status, spend, tokens and last verdict."""
    s = _runtime(read_only=True).status(run_id)
    if as_json:
        click.echo(json.dumps(s.to_dict(), indent=2))
        return
    click.echo(f"run {s.id} of loop {s.loop}: {s.status}" + (f" ({s.reason})" if s.reason else ""))
    click.echo(f"iteration {s.iteration} of {s.max_iterations} · spent ${s.spent_usd:.4f} of ${s.max_cost_usd:.2f}")
    for row in s.spend_by_role:
        click.echo(f"  {row['role']}: {row['model']}, {row['calls']} model calls, ${row['cost_usd']:.4f}")
    click.echo(f"tokens: {s.tokens['input']} in, {s.tokens['output']} out, "
               f"{s.tokens['cache_write']} cache write, {s.tokens['cache_read']} cache read")
    click.echo(f"{s.model_calls} model calls, {s.tool_calls} tool calls · network: {s.network}")
    click.echo(f"branch {s.branch}" + (f" · commit {s.commit}" if s.commit else "") + f" · worktree {s.worktree}")
    if s.last_verdict:
        for check in s.last_verdict["checks"]:
            click.echo(f"  {'pass' if check['passed'] else 'FAIL'}  {check['name']}")
    for approval in s.pending_approvals:
        click.echo(_waiting_line({"approval": approval["approval_id"], "tool": approval["tool"], "input": approval["input"]}))


@main.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per event")
@click.option("--session", "as_session", is_flag=True,
              help="the model's answers only, as a session file for `loopwright run --replay`")
def trace(run_id: str, as_json: bool, as_session: bool) -> None:
    """Every event of a run: model calls with tokens and cost, tool calls with durations, verdicts."""
    runtime = _runtime()
    if as_session:
        from .runtime.replay import session_of

        click.echo(json.dumps(session_of(runtime.store, run_id), indent=1))
        return
    seen = 0
    while batch := runtime.trace(run_id, after=seen, limit=500):
        for event in batch:
            seen = event["seq"]
            click.echo(json.dumps(event) if as_json else _event_line(event))


@main.command()
@click.argument("run_id")
@click.argument("iteration", type=int, required=False)
def diff(run_id: str, iteration: int | None) -> None:
    """What a run changed since its base commit, or with ITERATION, what that iteration changed."""
    from .runtime.worktree import diff_commits

    runtime = _runtime()
    run = runtime.get_run(run_id)
    if not run.base_commit:
        fail(f"run {run_id} has no worktree yet, so nothing to diff")
    if iteration is None:
        click.echo(diff_commits(Path(run.repo), run.base_commit, run.commit_sha or run.branch), nl=False)
        return
    event = runtime.store.event(run_id, f"{iteration}.commit")
    if event is None or not event["data"]["commit"]:
        fail(f"run {run_id} has no commit for iteration {iteration} (it ran {run.iteration} iteration(s))")
    commit = event["data"]["commit"]
    click.echo(diff_commits(Path(run.repo), f"{commit}^", commit), nl=False)


def _event_line(e: dict[str, Any]) -> str:
    head = f"{_time(e['at'])} #{e['iteration']:<2} {e['kind']:<12}"
    data = e["data"]
    if e["kind"] == "model_call":
        return (f"{head} {data.get('role', 'maker')} {data['model']} {data.get('stop_reason') or ''} · in {e['input_tokens']} out {e['output_tokens']}"
                f" cache w {e['cache_write_tokens']} r {e['cache_read_tokens']} · ${e['cost_usd']:.5f} · {e['duration_ms']:.0f} ms")
    if e["kind"] == "tool_call":
        args = json.dumps(data["input"])[:80]
        state = "unfinished" if data.get("unfinished") else "error" if data.get("is_error") else "ok"
        return f"{head} {data['tool']} {args} · {state} · {e['duration_ms']:.0f} ms"
    if e["kind"] in ("check", "verdict"):
        if e["kind"] == "check":
            return f"{head} {data['name']}: {'pass' if data['passed'] else 'FAIL'} · {e['duration_ms']:.0f} ms"
        return f"{head} {'PASS' if data['passed'] else 'FAIL'}"
    return f"{head} {json.dumps(data)[:160]}"


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S")


@main.command()
@click.argument("run_id", required=False)
@click.option("--follow", "-f", is_flag=True, help="go on printing as the run goes on, until it ends")
def logs(run_id: str | None, follow: bool) -> None:
    """What a run did: each tool call, verdict and wait for a person; with --follow, as it happens.
    Without RUN: every run that is going on now or starts later (what a daemon is doing), until Ctrl-C."""
    try:
        if run_id:
            _print_lines(_runtime(), run_id, follow)
        else:
            _print_all_lines(_runtime(), follow)
    except KeyboardInterrupt:
        sys.exit(130)


def _print_all_lines(runtime: Runtime, follow: bool) -> None:
    """The lines of every unfinished run, and of each run that starts while following, each line after its
    run's id; a run's last line when it ends."""
    following: dict[str, _Lines] = {}
    ended: set[str] = set()
    while True:
        for run in runtime.list_runs(limit=200):
            if run.id not in following and run.id not in ended and not run.finished:
                following[run.id] = _Lines(runtime, run.id)
                click.echo(f"{run.id} started: loop {run.loop} on branch {run.branch}")
        for rid, lines in list(following.items()):
            for line in lines.poll():
                click.echo(f"{rid} {line}")
            run = runtime.get_run(rid)
            if run.finished and lines.caught_up():
                click.echo(f"{rid} {run.status}: {run.reason} · spent ${run.spent_usd:.4f}")
                ended.add(rid)
                del following[rid]
        if not follow:
            return
        time.sleep(0.5)


@main.command()
@click.argument("run_id")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="the file to write (default: loopwright-RUN.html)")
def report(run_id: str, output: Path | None) -> None:
    """Write a run as one self-contained HTML page: iterations, cost chart, calls, diff."""
    from .runtime.report import run_page
    from .runtime.worktree import diff_commits

    runtime = _runtime()
    run = runtime.get_run(run_id)
    events = runtime.store.all_events(run_id)
    diff = diff_commits(Path(run.repo), run.base_commit, run.commit_sha or run.branch) if run.base_commit else ""
    path = output or Path(f"loopwright-{run_id}.html")
    path.write_text(run_page(runtime.status(run_id).to_dict(), events, diff), encoding="utf-8")
    click.echo(f"wrote {path}")


@main.command()
@click.argument("run_ids", nargs=-1)
@click.option("--loop", help="every finished run of this loop (with no RUN given)")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="the file to write (default: standard output)")
def export(run_ids: tuple[str, ...], loop: str | None, output: Path | None) -> None:
    """Runs as JSON lines for fine-tuning: per iteration, the prompt, what the maker said and did, the verdict as reward."""
    from .runtime.report import export_lines

    runtime = _runtime()
    if not run_ids and not loop:
        fail("name the runs to export, or --loop LOOP for every finished run of a loop")
    ids = list(run_ids) or [r.id for r in reversed(runtime.list_runs(loop, limit=10_000)) if r.finished]
    lines = []
    for run_id in ids:
        run = runtime.get_run(run_id)
        events = runtime.store.all_events(run_id)
        lines += [json.dumps(record) for record in export_lines({"id": run.id, "loop": run.loop, "spec": run.spec}, events)]
    text = "".join(line + "\n" for line in lines)
    if output:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {len(lines)} iterations of {len(ids)} runs to {output}")
    else:
        click.echo(text, nl=False)


@main.command()
@click.argument("run_id")
def stop(run_id: str) -> None:
    """Ask a run to stop; it stops before its next model or tool call."""
    run = _runtime().stop_run(run_id)
    click.echo(f"stop requested for run {run.id}")


@main.command()
@click.argument("run_id")
def pause(run_id: str) -> None:
    """Ask a run to pause before its next model or tool call; its wall clock stops while it waits."""
    run = _runtime().pause_run(run_id)
    click.echo(f"pause requested for run {run.id} (continue it with: loopwright resume {run.id})")


@main.command()
@click.argument("run_id")
def resume(run_id: str) -> None:
    """Let a paused run continue."""
    run = _runtime().resume_run(run_id)
    click.echo(f"resumed run {run.id}")


@main.command()
@click.option("--run", "run_id", help="only this run's")
@click.option("--all", "show_all", is_flag=True, help="also those already answered")
@click.option("--json", "as_json", is_flag=True)
def approvals(run_id: str | None, show_all: bool, as_json: bool) -> None:
    """Tool calls waiting at an approval gate (answer each with `loopwright approve ID`)."""
    found = _runtime().list_approvals(run_id, pending_only=not show_all)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for a in found:
        click.echo(f"{a['id']}  run {a['run_id']}  {a['status']:<8} {a['tool']} {json.dumps(a['input'])[:120]}")
    if not found:
        click.echo("no tool calls wait for approval" if not show_all else "no approvals")


@main.command()
@click.argument("approval_id")
@click.option("--deny", is_flag=True, help="refuse the call instead of allowing it")
@click.option("--note", default="", help="what the maker reads with the answer (why it was denied, what to do)")
def approve(approval_id: str, deny: bool, note: str) -> None:
    """Allow (or with --deny, refuse) a tool call waiting for approval."""
    decided = _runtime().decide_approval(approval_id, not deny, note)
    click.echo(f"{decided['id']}: {decided['status']}" + (f" ({decided['note']})" if decided["note"] else ""))


@main.command()
@click.option("--loops", "loops_dir", type=click.Path(path_type=Path), help="folder of loop specs (default: ./loops)")
def mcp(loops_dir: Path | None) -> None:
    """Serve the MCP tools over stdio (for `claude mcp add loopwright -- loopwright mcp`)."""
    import gc

    # A client waits for the tools while this process starts: importing the MCP SDK makes about a million
    # objects (its pydantic models) and frees almost none, so the cyclic collector only slows it down
    # (by a tenth). serve_stdio turns it back on once the server is built.
    gc.disable()
    from .mcp_server.server import serve_stdio

    serve_stdio(loops_dir.resolve() if loops_dir else None)


@main.command()
def worker() -> None:
    """Execute queued runs (and runs whose process died), then exit once none is left for a few seconds.
    `loopwright mcp` starts one when no daemon runs, so that runs outlive the MCP client."""
    runtime = _runtime()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # exit normally: this process's sandboxes go with it
    runtime.work_until_idle()


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=8765, show_default=True, type=int, help="port to listen on (0: any free port)")
@click.option("--loops", "loops_dir", type=click.Path(path_type=Path), help="folder of loop specs (default: ./loops)")
@click.option("--allow-remote", is_flag=True, help="allow a --host that is not loopback (the token is still required)")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="another Host header to accept, e.g. the name clients reach this machine by")
def serve(host: str, port: int, loops_dir: Path | None, allow_remote: bool, allowed_hosts: tuple[str, ...]) -> None:
    """The daemon: execute queued runs and serve MCP over HTTP at /mcp (bearer token required)."""
    from .mcp_server.http import serve_http

    from .runtime.daemon import DaemonError

    try:
        serve_http(host, port, loops_dir.resolve() if loops_dir else None, allow_remote, allowed_hosts)
    except DaemonError as error:
        fail(str(error))


@main.command()
def token() -> None:
    """Print the daemon's bearer token (made at first use, stored with mode 0600)."""
    from .runtime.config import load_settings
    from .runtime.daemon import DaemonError, load_or_create_token

    try:
        click.echo(load_or_create_token(load_settings().home))
    except DaemonError as error:
        fail(str(error))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def plugins(as_json: bool) -> None:
    """Every plugin with its source, version and hooks, and what it contributes."""
    report = _runtime().host.describe()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for plugin in report["plugins"]:
        version = f" {plugin['version']}" if plugin["version"] else ""
        click.echo(f"{plugin['name']}  {plugin['source']}{version}  ({plugin['module']})")
        click.echo(f"    hooks: {', '.join(plugin['hooks']) or 'none'}")
        lost = {(s["kind"], s["name"]): s["by"] for s in plugin["shadowed"]}
        for kind in sorted({*plugin["contributes"], *(k for k, _ in lost)}):
            names = plugin["contributes"].get(kind, []) + [
                f"{name} (shadowed by {by})" for (k, name), by in lost.items() if k == kind
            ]
            click.echo(f"    {kind}: {', '.join(names)}")
        if plugin["settings"]:
            click.echo(f"    settings: {', '.join(plugin['settings'])}")
    for skipped in report["not_loaded"]:
        click.echo(f"not loaded: {skipped['name']} ({skipped['reason']})")


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def automations(ctx: click.Context, as_json: bool) -> None:
    """Triggers that start runs (registered by `loopwright serve --loops DIR`): state, today's runs, last firing."""
    if ctx.invoked_subcommand:
        return
    from .runtime.automations import describe_automations

    found = describe_automations(_runtime().store)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for a in found:
        settings = " ".join(f"{k}={v}" for k, v in a["settings"].items())
        click.echo(f"{a['id']}  {a['kind']}  {'PAUSED' if a['paused'] else 'active'}  runs today {a['runs_today']}  {settings}")
        if a["paused"]:
            click.echo(f"    paused: {a['paused_reason']}")
        if a["last_firing"]:
            last = a["last_firing"]
            click.echo(f"    last firing {last['at']}: {last['status']} run {last['run_id']}"
                       + (f" ({last['reason']})" if last["reason"] else ""))
    if not found:
        click.echo("no automations: `loopwright serve --loops DIR` registers the [[trigger]]s of the loops in DIR")


@automations.command("pause")
@click.argument("automation_id")
@click.option("--reason", default="paused by hand", show_default=True)
def automations_pause(automation_id: str, reason: str) -> None:
    """Stop an automation (<loop>/<trigger name>) from starting runs until it is resumed."""
    from .runtime.automations import set_paused

    set_paused(_runtime().store, automation_id, True, reason)
    click.echo(f"paused {automation_id}")


@automations.command("resume")
@click.argument("automation_id")
def automations_resume(automation_id: str) -> None:
    """Let a paused automation (e.g. after a provider quota error) start runs again."""
    from .runtime.automations import set_paused

    set_paused(_runtime().store, automation_id, False)
    click.echo(f"resumed {automation_id}")


if __name__ == "__main__":
    main()
