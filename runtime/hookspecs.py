"""The plugin contract: every hook Loopwright calls, when it fires, and what its answer means.

Plugins implement these with ``@hookimpl`` (``from loopwright.runtime.hookspecs import hookimpl``) and may accept
any subset of a hook's arguments. Registration hooks receive a ``register`` callback; the host
records which plugin contributed what and resolves name clashes (the first registration in
pluggy's call order wins, and built-ins register ``trylast`` so a third party can override them).
Lifecycle hooks may return a value, a callable or an awaitable; the host awaits it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from contextlib import AsyncExitStack

    from .plugin_host import PluginHost
    from .types import Decision, Outcome, RunInfo, Sandbox, Tool, ToolCall, ToolResult, Verdict

PROJECT = "loopwright"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# --- start-up: registration -----------------------------------------------------------------


@hookspec
def loopwright_register_automations(register: Callable[[str, Any], None]) -> None:
    """Contribute trigger kinds (``cron``, ``webhook``, ``watch``, ``after``).

    Fires once when the plugin host is built.

    :param register: ``register(kind, factory)``; ``factory(trigger_spec)`` returns the trigger.
    """


@hookspec
def loopwright_register_skill_sources(register: Callable[[str, Any], None]) -> None:
    """Contribute places where Agent Skills folders are found.

    Fires once when the plugin host is built. Sources are searched in registration order and the
    first skill of a name wins (the built-in sources, the loop's ``agent.skills`` then the repo's
    ``.claude/skills/``, come last).

    :param register: ``register(name, source)``; ``source(spec, worktree)`` returns folders, each one
        skill (it holds a ``SKILL.md``) or a folder of skill folders. ``worktree`` is the run's checkout.
    """


@hookspec
def loopwright_register_tools(register: Callable[[Any], None]) -> None:
    """Contribute tools the maker may call (connectors).

    Fires once when the plugin host is built.

    :param register: ``register(tool)`` with a :class:`runtime.types.Tool`; its handler receives a
        :class:`runtime.types.ToolContext` and the model's input, and returns a ``ToolResult`` or a string.
    """


@hookspec
def loopwright_register_agents(register: Callable[[str, Any], None]) -> None:
    """Contribute maker and checker kinds (``anthropic``, ``command``, ``rubric``).

    Fires once when the plugin host is built.

    :param register: ``register(kind, factory)``; ``factory(agent_spec, settings)`` returns an object
        with ``async take_turn(turn)`` that drives one iteration of the maker, and optionally
        ``check()``, called before a live run starts (not for a replay) to refuse one that cannot work.
    """


@hookspec
def loopwright_register_memory(register: Callable[[str, Any], None]) -> None:
    """Contribute memory kinds (``notes``, ``kv``): state that outlives a context window or a run.

    Fires once when the plugin host is built. A kind works through the lifecycle hooks of the plugin
    that registers it (``loopwright_system_prompt``, ``loopwright_run_tools``, ``loopwright_verdict``);
    a built-in kind steps aside when a third party registers the same kind.

    :param register: ``register(kind, memory)``; ``memory`` is an object describing the kind (the host
        records which plugin gave it, and ``loopwright plugins`` lists it).
    """


@hookspec
def loopwright_register_verifiers(register: Callable[[str, Any], None]) -> None:
    """Contribute verifier kinds (``command``, ``rubric``), named by ``[[verify]] kind``.

    Fires once when the plugin host is built.

    :param register: ``register(kind, factory)``; ``factory(verify_spec)`` returns an object with
        ``verify(ctx) -> CheckResult``, run after every iteration, apart from the maker.
    """


@hookspec
def loopwright_register_sandboxes(register: Callable[[str, Any], None]) -> None:
    """Contribute sandbox kinds (``docker``), named by ``[sandbox] kind``.

    Fires once when the plugin host is built.

    :param register: ``register(kind, provider)``; the provider has ``start(run_id=, worktree=, spec=,
        verification=False)`` returning a sandbox (with ``verification``, a fresh one for a check on a
        clean copy of the maker's tree, sharing nothing with the maker's), and ``reap_orphans()`` removing sandboxes whose owner process is gone. It may
        also have ``reserve(run_id=, worktree=, spec=, verification=False)``, called before the run's
        worktree (or a check's clean copy) exists: a warm pool puts its ready sandbox's empty folder
        there, and the worktree or copy is then made in it.
    """


# --- lifecycle ------------------------------------------------------------------------------


@hookspec
def loopwright_run_started(run: RunInfo) -> None:
    """A run begins executing (also when a run resumes in a new process).

    :param run: the run's id, loop name, spec, branch and worktree.
    :return: ignored.
    """


@hookspec
def loopwright_system_prompt(run: RunInfo, host: PluginHost) -> str | None:
    """Add a section to the run's system prompt, the stable prefix read from the prompt cache
    (e.g. the index of available skills, or notes from earlier runs of the loop).

    Called once per run, before its first model call; the answer is recorded, so a resumed run
    sends the same prompt.

    :param run: the run.
    :param host: the plugin host: settings, registries (e.g. ``host.skill_sources()``) and ``host.store``.
    :return: markdown text, or None to add nothing.
    """


@hookspec
def loopwright_run_tools(
    run: RunInfo, sandbox: Sandbox, stack: AsyncExitStack, host: PluginHost
) -> list[Tool] | None:
    """Tools that exist for one run only, such as those of MCP servers its spec declares.

    Called when the run's sandbox is ready (again in a process that resumes the run). Enter
    anything that must be closed when the run ends into ``stack`` (``await stack.enter_async_context(...)``).

    :param run: the run.
    :param sandbox: the run's sandbox, for tools that start processes inside it.
    :param stack: closed when the run ends, in the same task.
    :param host: the plugin host: settings, registries and ``host.store``.
    :return: the tools (names must be unique; a name already taken is ignored), or None.
    """


@hookspec(firstresult=True)
def loopwright_before_tool_call(run: RunInfo, call: ToolCall) -> Decision | None:
    """Before each tool call of the maker; may allow or deny it.

    Stops at the first non-None result: the host awaits each implementation in order (an async
    implementation that returns None abstains, like a sync one).

    :param run: the run.
    :param call: the tool's name, the model's input and the iteration.
    :return: ``Decision.deny(reason)`` to refuse the call (the maker reads the reason),
        ``Decision.allow()`` to allow it without asking other plugins, or None to abstain.
    """


@hookspec
def loopwright_after_tool_call(run: RunInfo, call: ToolCall, result: ToolResult) -> None:
    """After each tool call that ran (not after a denied one).

    :param run: the run.
    :param call: the call as the model made it.
    :param result: what the maker will see.
    :return: ignored.
    """


@hookspec
def loopwright_verdict(run: RunInfo, iteration: int, verdict: Verdict, summary: str, host: PluginHost) -> None:
    """After each verification; fires once per verdict, also across a crash and resume.

    :param run: the run.
    :param iteration: the iteration just verified, from 1.
    :param verdict: every check's result; ``verdict.passed`` is True when all passed.
    :param summary: one line on what the maker did in the iteration (tools used, its last words).
    :param host: the plugin host: settings, registries and ``host.store``.
    :return: ignored.
    """


@hookspec
def loopwright_run_finished(run: RunInfo, outcome: Outcome, host: PluginHost) -> None:
    """A run ends, whatever its outcome; fires once per run. Chaining and notifications live here.

    Fires in the process that executed the run (a daemon, ``loopwright run``, an MCP server), inside
    a durable step: after a crash it may fire again, so make its effects idempotent (key them by
    ``run.id``).

    :param run: the run.
    :param outcome: ``succeeded``, ``failed``, ``stalled``, ``stopped`` or ``error``, with the reason.
    :param host: the plugin host: settings, registries and ``host.store``.
    :return: ignored.
    """


# --- the command line -----------------------------------------------------------------------


@hookspec
def loopwright_register_commands(cli: Any) -> None:
    """Add commands to the ``loopwright`` command line, the way llm's plugins do (``sandbox`` comes
    from the docker plugin this way).

    Fires once per process, the first time a command is asked for that is not Loopwright's own,
    or when every command is listed (``loopwright --help``).

    :param cli: the ``loopwright`` click group: ``@cli.command()`` or ``cli.add_command(group)``.
    :return: ignored.
    """
