"""Replay: re-drive a loop with a recorded run's model answers (`loopwright run FILE --replay SESSION`).

A *session* is what a run's model said, call by call: each answer keyed as the engine keys model
calls (``<iteration>.model.<n>``), with its content blocks and stop reason. `session_of` reads one
from a run's trace (`loopwright trace RUN --session` writes it as JSON); `load_session` reads a run
id or a session file. A replayed run does everything else for real (its worktree, sandbox, tools,
verifiers and stop rules), so a changed verifier or stop rule can be tried on a past run for free:
no model is called and a replayed call costs nothing. When the loop asks for a call the recording
does not have (it went further than the recorded run), the run ends with an error that says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .spec import SpecError

if TYPE_CHECKING:
    from .store import Store

FORMAT = "loopwright-session/1"
NO_USAGE = {"input_tokens": 0, "output_tokens": 0}


class ReplayExhausted(RuntimeError):
    """The loop asked for a model call the recorded session has no answer for."""


def session_of(store: Store, run_id: str) -> dict[str, Any]:
    """The model's answers in a run's trace, as a session."""
    run = store.get_run(run_id)
    answers: dict[str, Any] = {}
    seen = 0
    while batch := store.events(run_id, after=seen, limit=500):
        for event in batch:
            seen = event["seq"]
            data = event["data"]
            if event["kind"] == "model_call" and ".model." in event["key"] and "content" in data:
                # A call retried after a crash (key#2, ...) answers for its call: the last answer wins.
                answers[event["key"].split("#")[0]] = {"stop_reason": data.get("stop_reason"), "content": data["content"]}
    return {"format": FORMAT, "loop": run.loop, "run": run_id, "status": run.status, "answers": answers}


def load_session(source: str, store: Store) -> dict[str, Any]:
    """A session from a file (JSON, as `loopwright trace RUN --session` writes) or from a run id."""
    path = Path(source)
    if path.is_file():
        try:
            session = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise SpecError(source, [f"--replay: cannot read a session from {source}: {error}"]) from None
        if not isinstance(session, dict) or session.get("format") != FORMAT or not isinstance(session.get("answers"), dict):
            raise SpecError(source, [f"--replay: {source} is not a recorded session (format {FORMAT!r}); "
                                     "write one with `loopwright trace RUN --session > FILE`"])
        return session
    return session_of(store, source)  # an unknown run id raises UnknownRun, which names it


def answer(session: dict[str, Any], key: str) -> dict[str, Any]:
    """The recorded reply to model call `key`, shaped as a maker's `send` returns one (no usage: it is free)."""
    recorded = session["answers"].get(key)
    if recorded is None:
        raise ReplayExhausted(
            f"the recorded session (run {session.get('run', '?')}) has no answer for model call {key}: this run "
            f"went further than the recorded one ({len(session['answers'])} model calls)"
        )
    content = []
    for index, block in enumerate(recorded["content"]):
        if block.get("type") == "tool_use":
            block = {"id": f"toolu_replay_{key.replace('.', '_')}_{index}", **block}
        content.append(block)
    return {"content": content, "stop_reason": recorded.get("stop_reason"), "usage": dict(NO_USAGE)}
