"""The budget: what the next model call will cost, estimated before it is made.

`max_cost_usd` is a cap, not a target: before each model call (a maker's, a reviewer's, a CLI agent's
run) the engine adds the call's estimated cost to what the run has spent and does not start a call
that would cross the cap. The estimate leans high and learns from the run's own calls:

- tokens: the prompt's characters times the tokens per character the API counted for the run's
  previous call of the same model (about 3 characters a token before the first answer);
- caching: the part of the prompt the previous call of the same model sent too, within the cache's
  lifetime and no more than the cache then held (its read and written tokens), is priced as a cache
  read; everything else as a cache write, the dearer of the two input prices;
- output: as many tokens as the largest answer of that model in this run so far, or
  FIRST_OUTPUT_TOKENS before its first answer.

A command maker's CLI agent is estimated at the largest cost an earlier run of it reported.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 3.0  # before the API has counted a call of the model: fewer than its tokenizers give, so high
CACHE_LIFETIME_S = 300  # the Messages API's default (5 minutes)
FIRST_OUTPUT_TOKENS = 1000


def prompt_blocks(request: dict[str, Any]) -> list[str]:
    """A Messages API request's content in the order its prompt cache keys it: tools, system, each
    message's blocks; each as the text that identifies it (the cache markers left out)."""
    def content(value: Any) -> list[Any]:
        if isinstance(value, str):
            return [{"type": "text", "text": value}] if value else []
        return list(value or [])

    blocks: list[Any] = [*request.get("tools", []), *content(request.get("system"))]
    for message in request.get("messages", []):
        blocks += [[message.get("role"), block] for block in content(message.get("content"))]
    return [json.dumps(_unmarked(block), sort_keys=True, ensure_ascii=False) for block in blocks]


def _unmarked(block: Any) -> Any:
    if isinstance(block, list):
        return [_unmarked(item) for item in block]
    if isinstance(block, dict):
        return {k: v for k, v in block.items() if k != "cache_control"}
    return block


@dataclass
class _Sent:
    blocks: list[str]
    tokens_per_char: float
    cached_tokens: int  # of this prompt's prefix, what the cache held after the call (read + written)
    at: float


def prompt_tokens(usage: dict[str, Any]) -> int:
    return (usage.get("input_tokens", 0) + (usage.get("cache_creation_input_tokens") or 0)
            + (usage.get("cache_read_input_tokens") or 0))


class Budget:
    """What the run's earlier calls say about the next one's cost (kept in memory; a resumed run
    learns it again from the replayed calls)."""

    def __init__(self) -> None:
        self._last: dict[str, _Sent] = {}  # model -> its latest call
        self._output: dict[str, int] = {}  # model -> the largest answer so far, in tokens
        self._agent_cost = 0.0  # the largest cost a CLI agent's run reported

    def estimate(self, price: dict[str, float], model: str, request: dict[str, Any], now: float | None = None) -> float:
        """The cost of sending `request` to `model`, in dollars, leaning high."""
        blocks = prompt_blocks(request)
        last = self._last.get(model)
        rate = last.tokens_per_char if last else 1 / CHARS_PER_TOKEN
        tokens = sum(map(len, blocks)) * rate
        cached = 0.0
        if last and (now or time.time()) - last.at < CACHE_LIFETIME_S:
            shared = 0
            for mine, theirs in zip(blocks, last.blocks):
                if mine != theirs:
                    break
                shared += len(mine)
            cached = min(shared * rate, last.cached_tokens)
        output = min(self._output.get(model, FIRST_OUTPUT_TOKENS), request.get("max_tokens") or FIRST_OUTPUT_TOKENS)
        fresh_price = max(price["input"], price["cache_write"])
        return (cached * price["cache_read"] + (tokens - cached) * fresh_price + output * price["output"]) / 1_000_000

    def sent(self, model: str, request: dict[str, Any], usage: dict[str, Any], now: float | None = None) -> None:
        """Learn from a call's usage: the tokenizer's rate, what the cache holds, how long answers run."""
        blocks = prompt_blocks(request)
        chars = sum(map(len, blocks))
        tokens = prompt_tokens(usage)
        cached = (usage.get("cache_creation_input_tokens") or 0) + (usage.get("cache_read_input_tokens") or 0)
        rate = tokens / chars if chars and tokens else 1 / CHARS_PER_TOKEN
        self._last[model] = _Sent(blocks, rate, cached, now or time.time())
        self._output[model] = max(self._output.get(model, 0), usage.get("output_tokens", 0))

    def agent_estimate(self) -> float:
        return self._agent_cost

    def agent_ran(self, cost: float) -> None:
        self._agent_cost = max(self._agent_cost, cost)
