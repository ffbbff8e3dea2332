"""A local stand-in for the Anthropic Messages API, for tests.

Tests point the real `anthropic` SDK (or Claude Code's CLI) at it through
ANTHROPIC_BASE_URL, so the whole client stack -- HTTP, auth, retries, SSE
parsing -- runs for real while the model's replies come from a script. Token
usage and prompt caching are computed from each request the way the real API
does, so budget and cache accounting can be tested honestly.

Tests in another process can run it standalone:

    python tests/model_server.py --script replies.json [--port N]

which prints its URL as the first line of stdout and serves until killed.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import urlsplit

# The real API checks this many block boundaries before each breakpoint for an earlier cache entry.
CACHE_LOOKBACK_BLOCKS = 20
# Streamed text arrives in small pieces, so clients must really accumulate deltas.
TEXT_DELTA_CHARS = 16

Reply = dict[str, Any]


# --- reply builders ---------------------------------------------------------------------------
# Tool-use blocks get their "id" when answered, so a reply dict can be reused and ids stay unique.


def text(message: str) -> Reply:
    """An assistant turn that just says `message`."""
    return {"content": [{"type": "text", "text": message}], "stop_reason": "end_turn"}


def tool_use(name: str, input: dict, *, text: str | None = None) -> Reply:
    """An assistant turn calling one tool, optionally saying `text` first."""
    lead = [] if text is None else [{"type": "text", "text": text}]
    return {"content": lead + [{"type": "tool_use", "name": name, "input": input}], "stop_reason": "tool_use"}


def tool_uses(*calls: tuple[str, dict]) -> Reply:
    """An assistant turn calling several tools at once (parallel tool use)."""
    blocks = [{"type": "tool_use", "name": name, "input": input} for name, input in calls]
    return {"content": blocks, "stop_reason": "tool_use"}


def error(status: int, type: str = "api_error", message: str = "scripted error") -> Reply:
    """An HTTP error instead of a message, e.g. error(529, "overloaded_error")."""
    return {"status": status, "error": {"type": type, "message": message}}


def hang(seconds: float) -> Reply:
    """No answer for `seconds` (or until the server stops), then a 500: a connection that hangs."""
    return {"hang": seconds}


def truncated(reply: Reply) -> Reply:
    """`reply`, cut off halfway through its body: the connection closes early."""
    return {**reply, "truncate": True}


# --- token accounting -------------------------------------------------------------------------


def _tokens(chars: str) -> int:
    return math.ceil(len(chars) / 4)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _block_text(block: dict) -> str:
    """The text a block puts in front of the model, which is what its tokens are counted from."""
    kind = block.get("type")
    if kind == "text":
        return block["text"]
    if kind == "thinking":
        return block.get("thinking", "")
    if kind == "tool_use":
        return _canonical(block.get("input", {}))
    if kind == "tool_result":
        content = block.get("content", "")
        return content if isinstance(content, str) else "".join(map(_block_text, content))
    # Tool definitions, images, documents: their JSON (a marker does not change the prompt).
    return _canonical({k: v for k, v in block.items() if k != "cache_control"})


def _as_blocks(content: str | list) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return content


def _prompt(body: dict) -> list[tuple[int, str, bool]]:
    """The prompt as the cache sees it: per block, in order tools -> system -> messages,
    (tokens, digest of the prefix ending at this block, whether it carries cache_control).
    Digests start from the model's name: like the real cache, each model has its own."""
    tagged = [("tools", b) for b in body.get("tools", [])]
    tagged += [("system", b) for b in _as_blocks(body.get("system", []))]
    for i, message in enumerate(body["messages"]):
        tagged += [(f"messages[{i}].{message['role']}", b) for b in _as_blocks(message["content"])]
    digest, prompt = body["model"], []
    for tag, block in tagged:
        unmarked = {k: v for k, v in block.items() if k != "cache_control"}
        digest = hashlib.sha256((digest + _canonical([tag, unmarked])).encode()).hexdigest()
        prompt.append((_tokens(_block_text(block)), digest, "cache_control" in block))
    if body.get("cache_control") and prompt:  # top-level marker: cache up to the last block
        prompt[-1] = (*prompt[-1][:2], True)
    return prompt


# --- the server -------------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _json(status: int, value: Any, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    return status, {"content-type": "application/json", **(headers or {})}, json.dumps(value).encode()


def _error(status: int, type: str, message: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    return _json(status, {"type": "error", "error": {"type": type, "message": message}}, headers)


def _sse(message: dict) -> tuple[int, dict, bytes]:
    """The event sequence the real API streams for `message`."""
    events = [("message_start", {"message": {**message, "content": [], "stop_reason": None,
                                             "usage": {**message["usage"], "output_tokens": 1}}}),
              ("ping", {})]
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            start = {**block, "text": ""}
            pieces = range(0, len(block["text"]), TEXT_DELTA_CHARS)
            deltas = [{"type": "text_delta", "text": block["text"][i:i + TEXT_DELTA_CHARS]} for i in pieces]
        elif block["type"] == "tool_use":
            start = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": json.dumps(block["input"])}]
        else:  # anything else arrives whole
            start, deltas = block, []
        events.append(("content_block_start", {"index": index, "content_block": start}))
        events += [("content_block_delta", {"index": index, "delta": delta}) for delta in deltas]
        events.append(("content_block_stop", {"index": index}))
    events.append(("message_delta", {"delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                                     "usage": {"output_tokens": message["usage"]["output_tokens"]}}))
    events.append(("message_stop", {}))
    stream = "".join(f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n" for name, data in events)
    return 200, {"content-type": "text/event-stream", "cache-control": "no-cache"}, stream.encode()


class ModelServer:
    """Answers POST /v1/messages from `script`, recording every request and response.

    `script` is a list of replies, one used per request in order, or a callable
    `f(request_body) -> reply`. `requests` holds the bodies of authenticated
    /v1/messages requests (error replies included); `responses` the messages answered.
    """

    def __init__(self, script: list[Reply] | Callable[[dict], Reply], *, api_key: str = "test-key",
                 min_cacheable_tokens: int = 0, port: int = 0, record_to: str | None = None):
        self.api_key = api_key
        self.min_cacheable_tokens = min_cacheable_tokens
        self.requests: list[dict] = []
        self.responses: list[dict] = []
        self.url = ""
        self._script = script if callable(script) else list(script)
        self._port = port
        self._record_to = record_to  # a file each request body is appended to, one JSON line each
        self._lock = threading.Lock()
        self._cached: set[str] = set()  # digests of cached prefixes
        self._stopping = threading.Event()  # ends the hangs

    def start(self) -> ModelServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self._port), _Handler)
        self._httpd.model_server = self
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"
        # A short poll interval, because stop() waits up to one interval and tests stop servers often.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="model-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _handle(self, path: str, headers, raw: bytes) -> tuple[int, dict, bytes]:
        """Route one POST; returns (status, headers, body)."""
        if path not in ("/v1/messages", "/v1/messages/count_tokens"):
            return _error(404, "not_found_error", f"Not Found: {path}")
        if headers.get("x-api-key") != self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "authentication_error", "invalid x-api-key")
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "invalid_request_error", "request body is not valid JSON")
        required = ("model", "messages") if path.endswith("count_tokens") else ("model", "max_tokens", "messages")
        if missing := [field for field in required if field not in body]:
            return _error(400, "invalid_request_error", f"{missing[0]}: Field required")
        try:
            prompt = _prompt(body)
        except (AttributeError, KeyError, TypeError) as exc:
            return _error(400, "invalid_request_error", f"malformed request: {exc!r}")
        if path.endswith("count_tokens"):
            return _json(200, {"input_tokens": sum(tokens for tokens, _, _ in prompt)})
        return self._messages(body, prompt)

    def _messages(self, body: dict, prompt: list) -> tuple[int, dict, bytes]:
        # A script failure is the test's bug, not an outage: tell clients not to retry it.
        no_retry = {"x-should-retry": "false"}
        with self._lock:
            self.requests.append(body)
            count = len(self.requests)
            if self._record_to:
                with open(self._record_to, "a", encoding="utf-8") as file:
                    file.write(json.dumps(body) + "\n")
            scripted = self._script.pop(0) if isinstance(self._script, list) and self._script else None
        if scripted is None and not callable(self._script):
            return _error(500, "api_error", f"model server script ran out: request {count} "
                          f"arrived after all {count - 1} scripted replies were used", no_retry)
        try:
            reply = scripted if scripted is not None else self._script(body)
            if "hang" in reply:
                self._stopping.wait(reply["hang"])
                return _error(500, "api_error", f"the scripted hang of request {count} ended", no_retry)
            if "error" in reply:
                return _error(reply["status"], reply["error"]["type"], reply["error"]["message"])
            message = self._message(body, prompt, reply)
        except Exception as exc:
            return _error(500, "api_error", f"model server could not build reply {count}: {exc!r}", no_retry)
        with self._lock:
            self.responses.append(message)
        status, headers, payload = _sse(message) if body.get("stream") else _json(200, message)
        if reply.get("truncate"):  # the length of the whole body is announced, half of it is sent
            headers = {**headers, "content-length": str(len(payload))}
            payload = payload[: len(payload) // 2]
        return status, headers, payload

    def _message(self, body: dict, prompt: list, reply: Reply) -> dict:
        content = [{"id": _new_id("toolu_"), **block} if block["type"] == "tool_use" else {**block}
                   for block in reply["content"]]
        is_tool_use = any(block["type"] == "tool_use" for block in content)
        output_tokens = max(1, sum(_tokens(_block_text(block)) for block in content))
        return {
            "id": _new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": reply.get("stop_reason", "tool_use" if is_tool_use else "end_turn"),
            "stop_sequence": None,
            "usage": {**self._input_usage(prompt), "output_tokens": output_tokens},
        }

    def _input_usage(self, prompt: list[tuple[int, str, bool]]) -> dict[str, int]:
        """Split the prompt's tokens into uncached, cache-written and cache-read, like the real API:
        read the longest cached prefix found near a breakpoint, write the rest up to the last one."""
        upto = list(itertools.accumulate(tokens for tokens, _, _ in prompt))
        breakpoints = [i for i, (_, _, marked) in enumerate(prompt) if marked and upto[i] >= self.min_cacheable_tokens]
        read = written = 0
        if breakpoints:
            near = {j for b in breakpoints for j in range(max(0, b - CACHE_LOOKBACK_BLOCKS), b + 1)}
            with self._lock:
                hits = [j for j in near if prompt[j][1] in self._cached]
                self._cached.update(prompt[b][1] for b in breakpoints)
            read = upto[max(hits)] if hits else 0
            written = upto[breakpoints[-1]] - read
        total = upto[-1] if upto else 0
        return {"input_tokens": total - read - written, "cache_creation_input_tokens": written,
                "cache_read_input_tokens": read}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        self._send(*self.server.model_server._handle(urlsplit(self.path).path, self.headers, raw))

    def do_GET(self) -> None:
        self._send(*_error(404, "not_found_error", f"Not Found: {urlsplit(self.path).path}"))

    def _send(self, status: int, headers: dict, body: bytes) -> None:
        self.send_response(status)
        # One request per connection, so stop() leaves no keep-alive connection still being served.
        for name, value in {"content-length": str(len(body)), **headers, "request-id": _new_id("req_"),
                            "connection": "close"}.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the client gave up (a timeout): nothing left to tell it
            pass

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test output should show the test, not an access log."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve scripted Anthropic Messages API replies.")
    parser.add_argument("--script", required=True, help="JSON file holding a list of replies")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default: any free one)")
    parser.add_argument("--api-key", default="test-key")
    parser.add_argument("--min-cacheable-tokens", type=int, default=0)
    parser.add_argument("--requests", help="append each request's body to this file, one JSON line each")
    args = parser.parse_args(argv)
    with open(args.script) as f:
        script = json.load(f)
    server = ModelServer(script, api_key=args.api_key, min_cacheable_tokens=args.min_cacheable_tokens,
                         port=args.port, record_to=args.requests).start()
    print(server.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
