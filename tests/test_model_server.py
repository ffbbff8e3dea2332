"""The model server speaks the Messages API well enough for the real `anthropic` SDK."""

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import anthropic
import pytest
from anthropic.types import TextBlock, ToolUseBlock

from model_server import ModelServer, error, text, tool_use, tool_uses

MODEL = "claude-sonnet-4-6"
HELLO = [{"role": "user", "content": "say hello"}]  # 9 chars: 3 tokens
SYSTEM = "You are a careful assistant who answers briefly. " * 10  # 490 chars: 123 tokens


def client(server: ModelServer, **options) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="test-key", **options)


def ask(server: ModelServer, messages=HELLO, **params) -> anthropic.types.Message:
    return client(server).messages.create(model=MODEL, max_tokens=256, messages=messages, **params)


def test_text_reply_round_trips_with_counted_usage():
    with ModelServer([text("hello there")]) as server:
        message = ask(server)

    assert message.content == [TextBlock(type="text", text="hello there")]
    assert message.model == MODEL and message.stop_reason == "end_turn"
    assert message.id.startswith("msg_")
    assert message.usage.input_tokens == 3  # ceil(len("say hello") / 4)
    assert message.usage.output_tokens == 3  # ceil(len("hello there") / 4)
    assert message.usage.cache_creation_input_tokens == message.usage.cache_read_input_tokens == 0
    assert server.requests[0]["messages"] == HELLO
    assert server.responses == [message.to_dict()]


def test_stream_yields_the_scripted_text_and_tool_use():
    long_text = "streamed in several small pieces, like the real API"
    script = [text(long_text), tool_use("bash", {"cmd": "ls -la"}, text="Let me look.")]
    with ModelServer(script) as server:
        with client(server).messages.stream(model=MODEL, max_tokens=256, messages=HELLO) as stream:
            pieces = list(stream.text_stream)
            first = stream.get_final_message()
        with client(server).messages.stream(model=MODEL, max_tokens=256, messages=HELLO) as stream:
            second = stream.get_final_message()

    assert len(pieces) > 1 and "".join(pieces) == long_text
    assert first.content[0].text == long_text and first.stop_reason == "end_turn"
    assert first.usage == anthropic.types.Usage(**server.responses[0]["usage"])
    assert second.content[0].text == "Let me look."
    assert isinstance(second.content[1], ToolUseBlock)
    assert (second.content[1].name, second.content[1].input) == ("bash", {"cmd": "ls -la"})
    assert second.stop_reason == "tool_use"


def test_async_client_streams_a_tool_use():
    async def final_message(server):
        async with anthropic.AsyncAnthropic(base_url=server.url, api_key="test-key") as async_client:
            async with async_client.messages.stream(model=MODEL, max_tokens=256, messages=HELLO) as stream:
                return await stream.get_final_message()

    with ModelServer([tool_use("read_file", {"path": "a.txt"})]) as server:
        message = asyncio.run(final_message(server))

    assert (message.content[0].name, message.content[0].input) == ("read_file", {"path": "a.txt"})


def test_tool_use_reply_parses_into_a_tool_use_block():
    with ModelServer([tool_use("write_file", {"path": "x.py", "text": "print(1)"})]) as server:
        message = ask(server)

    block = message.content[0]
    assert isinstance(block, ToolUseBlock)
    assert (block.name, block.input) == ("write_file", {"path": "x.py", "text": "print(1)"})
    assert block.id.startswith("toolu_")
    assert message.stop_reason == "tool_use"


def test_tool_use_ids_are_unique_even_when_a_reply_is_reused():
    reply = tool_uses(("bash", {"cmd": "ls"}), ("bash", {"cmd": "pwd"}))
    with ModelServer([reply, reply]) as server:
        blocks = ask(server).content + ask(server).content

    assert [b.input["cmd"] for b in blocks] == ["ls", "pwd", "ls", "pwd"]
    assert len({b.id for b in blocks}) == 4


def test_bearer_token_and_api_key_are_both_accepted():
    with ModelServer([text("one"), text("two")], api_key="secret") as server:
        by_token = anthropic.Anthropic(base_url=server.url, auth_token="secret")
        by_key = anthropic.Anthropic(base_url=server.url, api_key="secret")
        answers = [c.messages.create(model=MODEL, max_tokens=9, messages=HELLO).content[0].text
                   for c in (by_token, by_key)]

    assert answers == ["one", "two"]


def test_x_api_key_header_is_accepted(monkeypatch):
    # This SDK sends even api_key= as "Authorization: Bearer"; Claude Code's CLI sends x-api-key.
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    with ModelServer([text("hi")], api_key="secret") as server:
        raw = anthropic.Anthropic(base_url=server.url, default_headers={"X-Api-Key": "secret"})
        message = raw.messages.create(model=MODEL, max_tokens=9, messages=HELLO)

    assert message.content[0].text == "hi"


def test_wrong_key_raises_authentication_error():
    with ModelServer([text("never sent")], api_key="secret") as server:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            ask(server)

    assert caught.value.body["error"]["type"] == "authentication_error"
    assert server.requests == []


def test_repeated_cached_system_prompt_is_written_then_read():
    system = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    with ModelServer([text("a"), text("b")], min_cacheable_tokens=100) as server:
        first, second = ask(server, system=system).usage, ask(server, system=system).usage

    assert (first.cache_creation_input_tokens, first.cache_read_input_tokens) == (math.ceil(len(SYSTEM) / 4), 0)
    assert (second.cache_creation_input_tokens, second.cache_read_input_tokens) == (0, 123)
    assert first.input_tokens == second.input_tokens == 3  # only the uncached user message


def test_prefix_below_min_cacheable_tokens_caches_nothing():
    system = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    with ModelServer([text("a"), text("b")], min_cacheable_tokens=1024) as server:
        usages = [ask(server, system=system).usage for _ in range(2)]

    assert [(u.cache_creation_input_tokens, u.cache_read_input_tokens) for u in usages] == [(0, 0), (0, 0)]
    assert [u.input_tokens for u in usages] == [126, 126]


def test_growing_conversation_reads_the_earlier_prefix_and_writes_the_rest():
    turn_one = [{"role": "user", "content": [{"type": "text", "text": SYSTEM}]}]
    turn_two = turn_one + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "x" * 40}]
    with ModelServer([text("ok"), text("done")], min_cacheable_tokens=100) as server:
        # The top-level marker caches up to the last block; the second turn's marker moved on.
        first = ask(server, messages=turn_one, cache_control={"type": "ephemeral"}).usage
        second = ask(server, messages=turn_two, cache_control={"type": "ephemeral"}).usage

    assert (first.cache_creation_input_tokens, first.cache_read_input_tokens) == (123, 0)
    assert (second.cache_read_input_tokens, second.cache_creation_input_tokens) == (123, 1 + 10)
    assert second.input_tokens == 0


def test_overloaded_error_is_retried_by_the_sdk():
    with ModelServer([error(529, "overloaded_error"), text("recovered")]) as server:
        message = client(server, max_retries=2).messages.create(model=MODEL, max_tokens=9, messages=HELLO)

    assert message.content[0].text == "recovered"
    assert len(server.requests) == 2


def test_overloaded_error_raises_without_retries():
    with ModelServer([error(529, "overloaded_error", "busy")]) as server:
        with pytest.raises(anthropic.InternalServerError) as caught:
            client(server, max_retries=0).messages.create(model=MODEL, max_tokens=9, messages=HELLO)

    assert caught.value.status_code == 529
    assert caught.value.body["error"] == {"type": "overloaded_error", "message": "busy"}


def test_callable_script_sees_the_request():
    with ModelServer(lambda body: text("echo: " + body["messages"][-1]["content"])) as server:
        message = ask(server, messages=[{"role": "user", "content": "ping"}])

    assert message.content[0].text == "echo: ping"


def test_running_out_of_script_is_a_clear_500_that_is_not_retried():
    with ModelServer([text("only reply")]) as server:
        ask(server)
        with pytest.raises(anthropic.InternalServerError) as caught:
            ask(server)  # default retries: the server says x-should-retry: false

    assert caught.value.status_code == 500
    assert "script ran out" in caught.value.message
    assert len(server.requests) == 2


def test_count_tokens_matches_the_input_tokens_of_a_message():
    system = "Answer in French."
    with ModelServer([text("bonjour")]) as server:
        counted = client(server).messages.count_tokens(model=MODEL, system=system, messages=HELLO)
        used = ask(server, system=system).usage

    assert counted.input_tokens == used.input_tokens == 5 + 3


def test_unknown_path_is_a_404_error():
    with ModelServer([]) as server:
        with pytest.raises(anthropic.NotFoundError):
            client(server).models.list()


def test_runs_as_a_separate_process(tmp_path: Path):
    script = tmp_path / "script.json"
    script.write_text(json.dumps([text("from another process")]))
    process = subprocess.Popen([sys.executable, Path(__file__).with_name("model_server.py"), "--script", script],
                               stdout=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().strip()
        message = anthropic.Anthropic(base_url=url, api_key="test-key").messages.create(
            model=MODEL, max_tokens=9, messages=HELLO)
    finally:
        process.terminate()
        process.wait(timeout=5)

    assert message.content[0].text == "from another process"
