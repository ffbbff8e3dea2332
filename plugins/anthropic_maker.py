"""Built-in maker `anthropic`: the Messages API with tool use, one conversation per iteration."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import anyio

from loopwright.runtime.config import ConfigError
from loopwright.runtime.context import elide_old_tool_results, mark_last_message_for_cache
from loopwright.runtime.hookspecs import hookimpl
from loopwright.runtime.types import ModelError, ToolResult

if TYPE_CHECKING:
    from loopwright.runtime.config import Settings
    from loopwright.runtime.spec import AgentSpec

MAX_RETRIES = 4  # the SDK backs off exponentially on 429, 5xx and 529 (overloaded)


def _block(block: Any) -> dict[str, Any]:
    """The parts of a content block the API accepts back in the next request."""
    if block.type == "text":
        return {"type": "text", "text": block.text}
    if block.type == "tool_use":
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    return block.model_dump(exclude_none=True)


class AnthropicMaker:
    def __init__(self, agent: AgentSpec, settings: Settings):
        self.agent = agent
        self._client: Any = None

    def check(self) -> None:
        """Before a run starts (not for a replay, which calls no model): is there a key?"""
        if not (os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")):
            raise ConfigError(
                "the anthropic maker needs ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN) in the environment; "
                "set ANTHROPIC_BASE_URL too to use another Anthropic-compatible endpoint"
            )

    @property
    def client(self) -> Any:
        if self._client is None:
            self.check()
            import anthropic  # here, not at start-up: the SDK takes a while to import

            self._client = anthropic.AsyncAnthropic(max_retries=MAX_RETRIES)
        return self._client

    async def _send(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One model call, the SDK's retries included, within `timeout` seconds in all."""
        import anthropic

        endpoint = str(self.client.base_url)
        try:
            with anyio.fail_after(timeout):
                message = await self.client.messages.create(**request, timeout=timeout)
        except (TimeoutError, anthropic.APITimeoutError):
            raise ModelError(f"the model API at {endpoint} did not answer within {timeout:.0f}s "
                             "(the call's limit: the run's remaining wall time, at most 10 minutes)",
                             "timeout", endpoint) from None
        except anthropic.APIStatusError as error:
            retry_after = error.response.headers.get("retry-after")
            raise ModelError(
                f"the model API at {endpoint} answered {error.status_code} after {MAX_RETRIES} retries: {error.message}",
                ModelError.kind_of(error.status_code), endpoint, error.status_code,
                float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None,
            ) from None
        except anthropic.APIConnectionError as error:
            cause = f" ({type(error.__cause__).__name__}: {error.__cause__})" if error.__cause__ else ""
            raise ModelError(f"the connection to the model API at {endpoint} failed after {MAX_RETRIES} retries: "
                             f"{error}{cause}", "connection", endpoint) from None
        except anthropic.APIResponseValidationError as error:
            raise ModelError(f"the model API at {endpoint} sent an answer that could not be read: {error}",
                             "reply", endpoint) from None
        return {
            "content": [_block(b) for b in message.content],
            "stop_reason": message.stop_reason,
            "usage": message.usage.model_dump(exclude_none=True),
        }

    async def take_turn(self, turn) -> str:
        """Model calls and tool calls until the model ends its turn or the tool budget is spent."""
        messages: list[dict[str, Any]] = [{"role": "user", "content": turn.opening}]
        while True:
            request = {
                "model": self.agent.model,
                "max_tokens": self.agent.max_tokens,
                "system": turn.system,
                "tools": turn.tools,
                "messages": mark_last_message_for_cache(elide_old_tool_results(messages)),
            }
            reply = await turn.model(self.agent.model, request, lambda r: self._send(r, turn.call_timeout()))
            messages.append({"role": "assistant", "content": reply["content"]})
            calls = [block for block in reply["content"] if block["type"] == "tool_use"]
            if not calls:
                return "end_turn"
            results, spent = [], False
            for call in calls:
                if turn.tool_calls_left <= 0:
                    spent = True
                    result = ToolResult("Not run: this iteration's tool-call budget (max_tool_calls) is spent.", True)
                else:
                    result = await turn.tool(call["id"], call["name"], call["input"])
                results.append(
                    {"type": "tool_result", "tool_use_id": call["id"], "content": result.content, "is_error": result.is_error}
                )
            messages.append({"role": "user", "content": results})
            if spent:
                return "max_tool_calls"


@hookimpl(trylast=True)
def loopwright_register_agents(register):
    register("anthropic", AnthropicMaker)
