"""What the maker sees at the start of each iteration, in a cache-friendly order.

Stable prefix first (tools, system prompt, goal, constraints), marked for prompt caching, so
every model call of every iteration re-reads it from the cache; then the compact working memory
(one line per earlier iteration); then the latest verdict in full.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Sequence


if TYPE_CHECKING:
    from .progress import Progress
    from .spec import LoopSpec

CACHE = {"type": "ephemeral"}
KEEP_TOOL_RESULTS = 3  # the newest tool outputs stay whole within an iteration
ELIDE_BATCH = 3  # older ones are elided in batches, so the cached message prefix changes rarely
FEEDBACK_LIMIT = 6000

SYSTEM_PROMPT = """You are the maker in a Loopwright loop: an automated loop that gives you a goal, \
lets you work in a sandboxed copy of a git repository at /workspace, and then checks your work with \
verifiers you cannot see or influence. Your own claims of success count for nothing; only the \
verifiers decide. Work in small, checkable steps with the tools. Read before you edit. When you \
believe the goal is met, end your turn with a short summary; the verifiers then run. If they fail, \
you will get their output in the next iteration, in a fresh conversation with a working memory of \
what earlier iterations tried."""


def system_blocks(spec: LoopSpec, sections: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The stable prefix: identical for every call of a run, so it is written to the cache once."""
    text = SYSTEM_PROMPT
    if spec.agent.system:
        text += "\n\n" + spec.agent.system
    for section in sections:
        text += "\n\n" + section
    text += f"\n\n# Goal\n{spec.goal}"
    if spec.constraints:
        text += "\n\n# Constraints (always hold)\n" + "\n".join(f"- {c}" for c in spec.constraints)
    checks = "\n".join(f"- {check.label}" for check in spec.verify)
    text += f"\n\n# How your work is checked\n{checks}"
    return [{"type": "text", "text": text, "cache_control": CACHE}]


def tool_schemas(schemas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    schemas = copy.deepcopy(schemas)
    if schemas:
        schemas[-1]["cache_control"] = CACHE
    return schemas


def memory_line(iteration: int, tried: str, progress: Progress) -> str:
    """One line of the working memory: what the iteration tried, the checks' headlines, and what changed."""
    verdict = progress.verdicts[-1]
    failing = "; ".join(f"{c.name}: {c.headline or first_line(c.feedback)}" for c in verdict.failing) or "all passed"
    change = progress.summary()
    return f"iteration {iteration}: {tried} -> failed: {failing}" + (f" ({change})" if change else "")


def first_line(text: str, limit: int = 160) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:limit]
    return ""


def newest_within(title: str, lines: list[str], budget: int, older: int = 0) -> str | None:
    """The title and as many of the newest lines as fit in `budget` characters, after a marker that
    says how many older ones were dropped; never longer than `budget`, None when nothing fits."""
    def head(dropped: int) -> str:
        return title + (f"\n[{dropped} older notes dropped to keep within the memory budget]" if dropped else "")

    kept, size = 0, 0  # the newest `kept` lines, and their length with newlines
    for line in reversed(lines):
        if len(head(older + len(lines) - kept - 1)) + size + 1 + len(line) > budget:
            break
        kept += 1
        size += 1 + len(line)
    text = "\n".join([head(older + len(lines) - kept), *lines[len(lines) - kept:]])
    return text if len(text) <= budget else None


def candidate_note(k: int, n: int) -> str:
    """What a candidate maker (`[agent] candidates = n`) is told after the iteration's opening message."""
    return (f"\n\n(You are candidate {k} of {n}: {n} attempts at this iteration start from the same tree side by "
            "side, and the one the checks judge best is kept. Take your own best approach.)")


def opening_message(memory: list[str], progress: Progress, run_id: str, memory_budget: int = 4000, *,
                    stalled: str = "", note: str = "", restored: int | None = None) -> str:
    """The user message an iteration starts with: the working memory, a person's note, then the latest
    verdict check by check: what changed since the iteration before, then what still fails, in full."""
    if not progress.verdicts:
        return "Start working toward the goal. The repository is at /workspace."
    verdict = progress.verdicts[-1]
    title = "# Working memory (earlier iterations)"
    parts = [newest_within(title, [f"- {line}" for line in memory], memory_budget) or title, ""]
    if note:
        parts += ["# A person's note (read it first)", note, ""]
    parts.append(f"# Latest verdict (iteration {verdict.iteration}): FAILED")
    if stalled:
        parts.append(f"The loop has stalled ({stalled.removeprefix('stall_after: ')}). What you tried does not move "
                     "the checks: step back, re-read the failures and the code, and try a different approach.")
    elif progress.streak > 1:
        parts.append(f"No progress for {progress.streak} iterations in a row: try a different approach.")
    if restored is not None:
        parts.append(f"Iteration {verdict.iteration} did worse than iteration {restored}, so its changes were set aside "
                     f"(keep = \"best\"): the workspace holds iteration {restored}'s tree again.")
    for change in progress.changes():
        parts.append("")
        parts += progress.account(change, run_id)
        if not change.check.passed and change.check.feedback:
            parts.append(truncate(change.check.feedback, FEEDBACK_LIMIT))
    parts.append("\nThe workspace " + ("holds the best tree so far." if restored is not None else
                                       "still holds your earlier changes.") + " Fix what failed.")
    return "\n".join(parts)


def truncate(text: str, limit: int, note: str = "") -> str:
    """Head and tail with a marker in between, so both the start and the end of long output survive."""
    if len(text) <= limit:
        return text
    half = limit // 2
    marker = f"\n[... {len(text) - 2 * half} characters omitted{note} ...]\n"
    return text[:half] + marker + text[-half:]


def elide_old_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace older tool outputs with a stub so the prompt stays bounded within an iteration."""
    positions = [
        (i, j)
        for i, message in enumerate(messages)
        if message["role"] == "user" and isinstance(message["content"], list)
        for j, block in enumerate(message["content"])
        if block.get("type") == "tool_result"
    ]
    excess = len(positions) - KEEP_TOOL_RESULTS
    if excess < ELIDE_BATCH:
        return messages
    elide = positions[: excess - excess % ELIDE_BATCH]
    messages = copy.deepcopy(messages)
    for i, j in elide:
        block = messages[i]["content"][j]
        size = len(str(block.get("content", "")))
        block["content"] = f"[older tool output elided ({size} characters); run the tool again if you need it]"
    return messages


def mark_last_message_for_cache(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cache the conversation so far, so the next call of this iteration reads it back."""
    messages = copy.deepcopy(messages)
    last = messages[-1]
    if isinstance(last["content"], str):
        last["content"] = [{"type": "text", "text": last["content"]}]
    last["content"][-1]["cache_control"] = CACHE
    return messages
