"""Loopwright: a runtime for loop engineering.

The public API for plugin authors (docs/plugins.md): the hook marker, the types hooks receive and
return, and a plugin's own settings. Everything else (``loopwright.runtime``, ``loopwright.sandbox``,
``loopwright.plugins``, ``loopwright.mcp_server``) is Loopwright's own and may change.

Each name is imported when first used (PEP 562), so that ``loopwright --help`` need not import
pydantic or SQLAlchemy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ConfigError": "runtime.config",
    "hookimpl": "runtime.hookspecs",
    "plugin_settings": "runtime.plugin_host",
    "AgentSpec": "runtime.spec", "LoopSpec": "runtime.spec", "VerifySpec": "runtime.spec",
    **{name: "runtime.types" for name in (
        "BudgetSpent", "CheckResult", "Decision", "ExecResult", "Failure", "ModelError", "Outcome", "RunInfo", "Sandbox", "Tool", "ToolCall", "ToolContext",
        "ToolResult", "Verdict", "VerifyContext", "WebhookRequest", "WebhookResponse",
    )},
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and editors; at run time, __getattr__ below
    from .runtime.config import ConfigError
    from .runtime.hookspecs import hookimpl
    from .runtime.plugin_host import plugin_settings
    from .runtime.spec import AgentSpec, LoopSpec, VerifySpec
    from .runtime.types import (
        BudgetSpent, CheckResult, Decision, ExecResult, Failure, ModelError, Outcome, RunInfo, Sandbox, Tool, ToolCall, ToolContext, ToolResult,
        Verdict, VerifyContext, WebhookRequest, WebhookResponse,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loopwright' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
