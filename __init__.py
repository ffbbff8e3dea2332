"""Loopwright: a runtime for loop engineering.

The public API for plugin authors (docs/plugins.md): the hook marker, the types hooks receive and
return, and a plugin's own settings. Everything else (``loopwright.runtime``, ``loopwright.sandbox``,
``loopwright.plugins``, ``loopwright.mcp_server``) is Loopwright's own and may change.
"""

from .runtime.config import ConfigError
from .runtime.hookspecs import hookimpl
from .runtime.plugins import plugin_settings
from .runtime.spec import AgentSpec, LoopSpec, VerifySpec
from .runtime.types import (
    CheckResult,
    Decision,
    ExecResult,
    Outcome,
    RunInfo,
    Sandbox,
    Tool,
    ToolCall,
    ToolContext,
    ToolResult,
    Verdict,
    VerifyContext,
)

__all__ = [
    "AgentSpec", "CheckResult", "ConfigError", "Decision", "ExecResult", "LoopSpec", "Outcome", "RunInfo",
    "Sandbox", "Tool", "ToolCall", "ToolContext", "ToolResult", "Verdict", "VerifyContext", "VerifySpec",
    "hookimpl", "plugin_settings",
]
