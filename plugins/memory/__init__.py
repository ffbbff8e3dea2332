"""Built-in memory: progress notes kept per loop, and a key-value memory the maker reads and writes.

Both live in the database beside the runs and are scoped to the loop's name, so a later run of
the loop (in another worktree, another process, or on another machine sharing a Postgres
database) reads what earlier runs left. Within a run the engine's working memory already carries
the earlier iterations; these notes carry them to the next run.

- ``notes``: after every verdict one line (what the maker tried, what the checks said) is added
  to the loop's notes; a run's system prompt carries the notes of earlier runs, newest kept,
  oldest dropped with a marker so the section never exceeds ``[memory] budget_chars``.
- ``kv``: tools ``memory_set``, ``memory_get``, ``memory_list``, ``memory_delete``; values and
  the number of keys are capped (``[plugins.memory] kv_max_value_chars``, ``kv_max_keys``).

``[memory] notes = false`` or ``kv = false`` in a loop's spec switches a kind off for that loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loopwright.runtime.context import first_line, newest_within
from loopwright.runtime.hookspecs import hookimpl
from loopwright.runtime.types import Tool, ToolContext, ToolResult, Verdict

NOTE_LIMIT = 400  # characters of one note line
KEEP_NOTES = 2000  # per loop: more than the largest budget can show
KV_MAX_KEYS = 100
KV_MAX_VALUE_CHARS = 4000
KV_MAX_KEY_CHARS = 200
NOTES_TITLE = """# Notes from earlier runs of this loop
What each iteration tried and what the checks said, oldest first. Do not repeat what failed."""
if TYPE_CHECKING:
    from .store import KvStore

KV_TITLE = "# Key-value memory of this loop\nKeys stored by earlier runs (read one with memory_get):"


@dataclass
class MemoryKind:
    description: str


NOTES = MemoryKind("markdown progress notes per loop, in the system prompt of the loop's next runs")
KV = MemoryKind("key-value memory per loop, stored in the database, read and written with memory_* tools")


def _active(host: Any, kind: str, memory: MemoryKind) -> bool:
    """True when this plugin's kind is the one in use: a third party registering the kind replaces it."""
    contribution = host.registries.get("memory", {}).get(kind)
    return contribution is not None and contribution.value is memory


# --- notes --------------------------------------------------------------------------------------


def note_line(iteration: int, summary: str, verdict: Verdict) -> str:
    if verdict.passed:
        result = "all checks passed"
    else:
        result = "failed: " + "; ".join(f"{c.name}: {c.headline or first_line(c.feedback, 160)}" for c in verdict.failing)
    line = " ".join(f"iteration {iteration}: {summary} -> {result}".split())
    return line if len(line) <= NOTE_LIMIT else line[: NOTE_LIMIT - 3] + "..."


def notes_section(store: Any, run: Any, budget: int) -> str | None:
    from .store import earlier_notes  # here: the database code imports SQLAlchemy, slow at start-up

    lines, older = earlier_notes(store, run.loop, run.id, most=budget // 20 + 1)
    if not lines:
        return None
    return newest_within(NOTES_TITLE, lines, budget, older)


# --- key-value memory ---------------------------------------------------------------------------


def _key(args: dict[str, Any]) -> str:
    key = args.get("key")
    if not isinstance(key, str) or not key.strip() or len(key) > KV_MAX_KEY_CHARS or "\n" in key:
        raise ValueError(f"'key' must be a non-empty string of one line, at most {KV_MAX_KEY_CHARS} characters")
    return key.strip()


def kv_index(kv: KvStore, budget: int) -> str | None:
    keys = kv.keys()
    if not keys:
        return None
    text = KV_TITLE + " " + ", ".join(key for key, _size, _run in keys)
    return text if len(text) <= budget else text[: budget - 4].rsplit(",", 1)[0] + ", ..."


def _kv_tools(kv: KvStore) -> list[Tool]:
    def tool(handler):
        def run(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
            try:
                return ToolResult(handler(args))
            except ValueError as error:
                return ToolResult(str(error), is_error=True)
        return run

    def memory_set(args: dict[str, Any]) -> str:
        key, value = _key(args), args.get("value")
        if not isinstance(value, str):
            raise ValueError("'value' must be a string (write structured data as JSON text)")
        return f"{kv.set(key, value)} {key!r} ({len(value)} characters) in this loop's memory"

    def memory_get(args: dict[str, Any]) -> str:
        key = _key(args)
        value = kv.get(key)
        if value is None:
            known = ", ".join(k for k, _size, _run in kv.keys()) or "none"
            raise ValueError(f"no key {key!r} in this loop's memory; the keys are: {known}")
        return value

    def memory_list(args: dict[str, Any]) -> str:
        keys = kv.keys()
        if not keys:
            return "this loop's memory is empty"
        lines = [f"{key} ({size} characters, written by run {run})" for key, size, run in keys]
        return f"{len(keys)} of at most {kv.max_keys} keys:\n" + "\n".join(lines)

    def memory_delete(args: dict[str, Any]) -> str:
        key = _key(args)
        if not kv.delete(key):
            raise ValueError(f"no key {key!r} in this loop's memory")
        return f"deleted {key!r}"

    key = {"type": "string", "description": "a short name, e.g. 'build-command'"}
    scope = "This memory belongs to the loop: later runs of the same loop read what you store."
    return [
        Tool("memory_set", f"Store a text value under a key, replacing any earlier value. {scope} "
             f"Values hold at most {kv.max_value_chars} characters; at most {kv.max_keys} keys.",
             {"type": "object", "properties": {"key": key, "value": {"type": "string"}}, "required": ["key", "value"]},
             tool(memory_set)),
        Tool("memory_get", f"Read the value stored under a key. {scope}",
             {"type": "object", "properties": {"key": key}, "required": ["key"]}, tool(memory_get)),
        Tool("memory_list", f"List the keys stored in this loop's memory, with their sizes. {scope}",
             {"type": "object", "properties": {}}, tool(memory_list)),
        Tool("memory_delete", f"Delete a key from this loop's memory. {scope}",
             {"type": "object", "properties": {"key": key}, "required": ["key"]}, tool(memory_delete)),
    ]


def _kv_for(run: Any, host: Any) -> KvStore:
    from .store import KvStore

    settings = host.plugin_settings("memory")
    return KvStore(host.store.engine, run.loop, run.id,
                   max_keys=int(settings.get("kv_max_keys", KV_MAX_KEYS)),
                   max_value_chars=int(settings.get("kv_max_value_chars", KV_MAX_VALUE_CHARS)))


# --- hooks --------------------------------------------------------------------------------------


@hookimpl(trylast=True)
def loopwright_register_memory(register):
    register("notes", NOTES)
    register("kv", KV)


@hookimpl(trylast=True)
def loopwright_system_prompt(run, host):
    """Notes of earlier runs, and the kv keys, within `[memory] budget_chars` together."""
    budget = run.spec.memory.budget_chars
    sections = []
    if run.spec.memory.kv and _active(host, "kv", KV):
        keys = kv_index(_kv_for(run, host), budget // 4)
        if keys:
            sections.append(keys)
            budget -= len(keys) + 2
    if run.spec.memory.notes and _active(host, "notes", NOTES):
        notes = notes_section(host.store, run, budget)
        if notes:
            sections.insert(0, notes)
    return "\n\n".join(sections) or None


@hookimpl
def loopwright_run_tools(run, host):
    if run.spec.memory.kv and _active(host, "kv", KV):
        return _kv_tools(_kv_for(run, host))
    return None


@hookimpl(trylast=True)
def loopwright_verdict(run, iteration, verdict, summary, host):
    if run.spec.memory.notes and _active(host, "notes", NOTES):
        from .store import add_note

        add_note(host.store.engine, run.loop, run.id, iteration, note_line(iteration, summary, verdict))
