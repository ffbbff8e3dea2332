"""Built-in connector `http_request`: HTTP from the host, only to the hosts a loop's spec allows.

The sandbox has no network, so this tool runs on the host; `http.allow_hosts` is its whole reach.
An entry is a host (any port) or host:port. Redirects are followed only while they stay on allowed
hosts, the model may not set the Host header, and the response body is capped. The tool exists
only for runs whose spec allows at least one host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from loopwright.runtime.hookspecs import hookimpl
from loopwright.runtime.types import RunInfo, Tool, ToolContext, ToolResult

if TYPE_CHECKING:
    import httpx2

BODY_LIMIT = 100_000  # bytes of a response body the maker sees
MAX_REDIRECTS = 5
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
DEFAULT_PORTS = {"http": 80, "https": 443}
SHOWN_HEADERS = ("content-type", "content-length", "location", "retry-after")
CREDENTIAL_HEADERS = ("authorization", "cookie", "proxy-authorization")


def _entry(entry: str) -> tuple[str, int | None]:
    """("host", port or None) from an allow_hosts entry such as "api.example.com" or "127.0.0.1:8080"."""
    parts = urlsplit("//" + entry.strip())
    try:
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return (parts.hostname or "").lower(), -1  # a malformed port allows nothing


def refusal(url: Any, allow_hosts: list[str]) -> str | None:
    """Why `url` may not be reached under `allow_hosts`, or None when it may."""
    if not isinstance(url, str) or not url.strip():
        return "'url' must be an absolute http:// or https:// URL"
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in DEFAULT_PORTS or not parts.hostname:
        return f"{url!r} is not an absolute http:// or https:// URL"
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme.lower()]
    except ValueError:
        return f"{url!r} has an invalid port"
    host = parts.hostname.lower()
    for allowed_host, allowed_port in map(_entry, allow_hosts):
        if host == allowed_host and allowed_port in (None, port):
            return None
    shown = f"[{host}]" if ":" in host else host
    allowed = ", ".join(allow_hosts) or "none"
    return (f"host {shown}:{port} is not in the loop's http.allow_hosts ({allowed}); "
            f"add {shown!r} or '{shown}:{port}' to [http] allow_hosts in the loop spec to allow it")


def _origin(url: httpx2.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


def _read_capped(response: httpx2.Response) -> tuple[bytes, bool]:
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > BODY_LIMIT:
            return bytes(body[:BODY_LIMIT]), True
    return bytes(body), False


def _describe(response: httpx2.Response, body: bytes, capped: bool) -> str:
    lines = [f"HTTP {response.status_code} {response.reason_phrase}".rstrip()]
    lines += [f"{name}: {response.headers[name]}" for name in SHOWN_HEADERS if name in response.headers]
    text = body.decode(response.encoding or "utf-8", errors="replace")
    if capped:
        text += f"\n[... body cut at {BODY_LIMIT} bytes ...]"
    return "\n".join(lines) + "\n\n" + text


def _arguments(args: dict[str, Any]) -> tuple[str, dict[str, str], bytes | None] | str:
    """(method, headers, body), or what is wrong with the model's input."""
    method = str(args.get("method") or "GET").upper()
    if method not in METHODS:
        return f"method {method!r} is not supported; use one of {', '.join(METHODS)}"
    headers = args.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        return "'headers' must be an object of header names to string values"
    if any(name.lower() == "host" for name in headers):
        return "the Host header is set from the URL; remove it from 'headers'"
    body = args.get("body")
    if body is not None and not isinstance(body, str):
        return "'body' must be a string (serialise JSON yourself and set a content-type header)"
    return method, dict(headers), body.encode() if body is not None else None


def http_request(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    allow_hosts = ctx.run.spec.http.allow_hosts
    parsed = _arguments(args)
    if isinstance(parsed, str):
        return ToolResult(parsed, is_error=True)
    method, headers, body = parsed
    url = args.get("url")
    if why := refusal(url, allow_hosts):
        return ToolResult(f"Not sent: {why}.", is_error=True)
    import httpx2  # here, not at start-up

    # trust_env=False: proxies, .netrc credentials and certificates of the host stay out of requests the model writes.
    with httpx2.Client(follow_redirects=False, trust_env=False, timeout=ctx.timeout) as client:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                with client.stream(method, url, headers=headers, content=body) as response:
                    if not response.has_redirect_location:
                        content, capped = _read_capped(response)
                        return ToolResult(_describe(response, content, capped), is_error=response.status_code >= 400,
                                          details={"status": response.status_code})
                    target = response.url.join(response.headers["location"])
            except httpx2.HTTPError as error:
                return ToolResult(f"The request to {url} failed: {type(error).__name__}: {error}", is_error=True)
            if why := refusal(str(target), allow_hosts):
                return ToolResult(
                    f"HTTP {response.status_code}: redirected to {target}, which was not followed: {why}.",
                    is_error=True, details={"status": response.status_code},
                )
            if _origin(target) != _origin(httpx2.URL(url)):
                headers = {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}
            if response.status_code == 303 or (response.status_code in (301, 302) and method == "POST"):
                method, body = "GET", None  # what browsers do
            url = str(target)
    return ToolResult(f"Not followed: more than {MAX_REDIRECTS} redirects, the last to {url}.", is_error=True)


def http_tool(allow_hosts: list[str]) -> Tool:
    return Tool(
        "http_request",
        "Send an HTTP request from outside the sandbox to one of these hosts only: "
        f"{', '.join(allow_hosts)}. Returns the status, a few headers and the body "
        f"(at most {BODY_LIMIT} bytes). Redirects are followed only to these hosts.",
        {
            "type": "object",
            "properties": {
                "method": {"type": "string", "enum": list(METHODS), "description": "default GET"},
                "url": {"type": "string", "description": "absolute http:// or https:// URL"},
                "body": {"type": "string", "description": "request body, e.g. JSON text"},
                "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "required": ["url"],
        },
        http_request,
    )


@hookimpl
def loopwright_run_tools(run: RunInfo) -> list[Tool] | None:
    allow_hosts = run.spec.http.allow_hosts
    return [http_tool(allow_hosts)] if allow_hosts else None
