"""The scripted model for .ci/clients' "Claude Code starts a loop and exits" check.

Serves two callers on one URL (tests/model_server.py, so usage and caching are accounted as usual):
Claude Code, which fetches the start_loop tool with ToolSearch, calls it for the loop `fix`, then
says it started; and the loop's own maker (its requests offer `run_command`), which fixes the
example's bug and says so. Prints its URL as the first line of stdout and serves until killed.
"""

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from model_server import ModelServer, text, tool_use  # noqa: E402

FIX = tool_use("edit_file", {"path": "calc.py", "old_text": "(len(numbers) + 1)", "new_text": "len(numbers)"})


def reply(request: dict) -> dict:
    tools = {tool.get("name") for tool in request.get("tools", [])}
    answered = [block.get("content") for message in request["messages"] if isinstance(message["content"], list)
                for block in message["content"] if block.get("type") == "tool_result"]
    if "run_command" in tools:  # the loop's maker
        return FIX if not answered else text("Fixed the divisor in average().")
    if "ToolSearch" not in tools:  # a side request of Claude Code's (a title, a summary)
        return text("ok")
    if not answered:
        return tool_use("ToolSearch", {"query": "select:mcp__loopwright__start_loop", "max_results": 1})
    if len(answered) == 1:
        return tool_use("mcp__loopwright__start_loop", {"loop": "fix"})
    return text("Started the loop; it runs on without me.")


if __name__ == "__main__":
    server = ModelServer(reply).start()
    print(server.url, flush=True)
    threading.Event().wait()
