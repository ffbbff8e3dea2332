"""Built-in connector: shell and file tools, all executed inside the run's sandbox.

File tools run a small Python program in the sandbox that resolves every path and refuses any that
leaves /workspace, symlinks included (list_files does not descend into linked folders at all). Inside
the container a link could only reach the container's own files anyway: the worktree is the only
host folder mounted. Files move through that mount, never through `docker cp` / put_archive.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from loopwright.runtime.hookspecs import hookimpl
from loopwright.runtime.types import Tool, ToolContext, ToolResult

FILE_PROGRAM = r"""
import json, os, sys
ROOT = "/workspace"
MAX_READ = 250_000
req = json.load(sys.stdin)

def fail(message):
    print(json.dumps({"error": message})); sys.exit(0)

def inside(path):
    return path == ROOT or path.startswith(ROOT + "/")

def resolve(rel, must_exist=True):
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        fail("path must be a non-empty string")
    path = os.path.normpath(os.path.join(ROOT, rel))
    if not inside(path):
        fail(f"path {rel!r} is outside /workspace")
    real = os.path.realpath(path)
    if not inside(real):
        fail(f"path {rel!r} leads outside /workspace through a symlink; refusing to follow it")
    if must_exist and not os.path.exists(real):
        fail(f"no such file: {rel!r}")
    return real

op = req["op"]
try:
    if op == "read":
        path = resolve(req["path"])
        if os.path.isdir(path):
            fail(f"{req['path']!r} is a directory; use list_files")
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(MAX_READ + 1)
        if len(text) > MAX_READ:  # the whole answer must fit the sandbox's output limit
            text = text[:MAX_READ] + f"\n[loopwright: the file is longer; only its first {MAX_READ} characters are shown]"
        print(json.dumps({"content": text}, ensure_ascii=False))
    elif op == "write":
        path = resolve(req["path"], must_exist=False)
        resolve(os.path.dirname(os.path.relpath(path, ROOT)) or ".", must_exist=False)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(req["content"])
        print(json.dumps({"content": f"wrote {len(req['content'])} characters to {req['path']}"}))
    elif op == "edit":
        path = resolve(req["path"])
        with open(path, encoding="utf-8") as f:
            text = f.read()
        count = text.count(req["old"])
        if count != 1:
            fail(f"old_text occurs {count} times in {req['path']!r}; it must occur exactly once (add surrounding lines)")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace(req["old"], req["new"], 1))
        print(json.dumps({"content": f"edited {req['path']}"}))
    elif op == "list":
        base = resolve(req.get("path") or ".")
        found = []
        for here, dirs, files in os.walk(base):
            dirs[:] = sorted(d for d in dirs if d != ".git")
            for name in sorted(files):
                found.append(os.path.relpath(os.path.join(here, name), ROOT))
            if len(found) > 2000:
                break
        print(json.dumps({"content": "\n".join(found[:2000]) or "(no files)"}))
except OSError as e:
    fail(f"{type(e).__name__}: {e.strerror or e}")
"""


def _file_op(ctx: ToolContext, request: dict[str, Any]) -> ToolResult:
    # -I: modules in /workspace (the cwd) cannot shadow the ones the program imports; -S: faster start.
    result = ctx.sandbox.run(
        "python3 -I -S -c " + shlex.quote(FILE_PROGRAM), timeout=ctx.timeout, stdin=json.dumps(request).encode()
    )
    if result.exit_code == 127:
        return ToolResult("the file tools need python3 in the sandbox image, which this image lacks; "
                          "use run_command (e.g. cat, sed) instead", is_error=True)
    if result.exit_code != 0:
        return ToolResult(f"file tool failed in the sandbox (exit {result.exit_code}): {result.stderr[-2000:]}", True)
    answer = json.loads(result.stdout)
    if "error" in answer:
        return ToolResult(answer["error"], is_error=True)
    return ToolResult(answer["content"])


def run_command(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    command = args.get("command")
    if not isinstance(command, str) or not command.strip():
        return ToolResult("run_command needs 'command', a non-empty shell command", is_error=True)
    result = ctx.sandbox.run(command, timeout=ctx.timeout)
    output = result.stdout + (f"\n[stderr]\n{result.stderr}" if result.stderr else "")
    header = f"exit code {result.exit_code}" + (f" (killed after the {ctx.timeout:g}s timeout)" if result.timed_out else "")
    return ToolResult(
        f"{header}\n{output}",
        is_error=result.exit_code != 0,
        details={"exit_code": result.exit_code, "timed_out": result.timed_out, "sandbox_ms": round(result.duration_ms, 2)},
    )


def read_file(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    return _file_op(ctx, {"op": "read", "path": args.get("path")})


def write_file(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    if not isinstance(args.get("content"), str):
        return ToolResult("write_file needs 'content', the whole new text of the file", is_error=True)
    return _file_op(ctx, {"op": "write", "path": args.get("path"), "content": args["content"]})


def edit_file(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    if not isinstance(args.get("old_text"), str) or not isinstance(args.get("new_text"), str) or not args["old_text"]:
        return ToolResult("edit_file needs 'old_text' (non-empty, exactly as in the file) and 'new_text'", is_error=True)
    return _file_op(ctx, {"op": "edit", "path": args.get("path"), "old": args["old_text"], "new": args["new_text"]})


def list_files(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
    return _file_op(ctx, {"op": "list", "path": args.get("path") or "."})


def _path_schema(description: str, **extra: Any) -> dict[str, Any]:
    properties = {"path": {"type": "string", "description": description}, **extra}
    return {"type": "object", "properties": properties, "required": ["path", *extra]}


TOOLS = [
    Tool(
        "run_command",
        "Run a shell command in /workspace inside the sandbox (no network). Returns the exit code, stdout and stderr.",
        {"type": "object", "properties": {"command": {"type": "string", "description": "e.g. 'pytest -q'"}},
         "required": ["command"]},
        run_command,
    ),
    Tool("read_file", "Read a text file of the workspace.", _path_schema("path relative to /workspace"), read_file),
    Tool(
        "write_file", "Create or overwrite a text file of the workspace with the given content.",
        _path_schema("path relative to /workspace", content={"type": "string"}), write_file,
    ),
    Tool(
        "edit_file", "Replace one exact occurrence of old_text with new_text in a file of the workspace.",
        _path_schema("path relative to /workspace", old_text={"type": "string"}, new_text={"type": "string"}),
        edit_file,
    ),
    Tool(
        "list_files", "List the files under a folder of the workspace (default: all), without .git.",
        {"type": "object", "properties": {"path": {"type": "string", "description": "folder relative to /workspace"}}},
        list_files,
    ),
]


@hookimpl(trylast=True)
def loopwright_register_tools(register):
    for tool in TOOLS:
        register(Tool(tool.name, tool.description, tool.input_schema, tool.handler))

