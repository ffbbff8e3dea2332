"""The plugin host: builds the plugin manager and is the only code that calls hooks."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .config import Settings
from .types import Decision, Outcome, RunInfo, Tool, ToolCall, ToolResult, Verdict

log = logging.getLogger(__name__)

BUILTIN_PLUGINS = (
    "plugins.sandbox_tools",
    "plugins.anthropic_maker",
    "plugins.command_verifier",
    "plugins.docker_sandbox",
)
REGISTRIES = {
    "loopwright_register_automations": "automations",
    "loopwright_register_skill_sources": "skill_sources",
    "loopwright_register_tools": "tools",
    "loopwright_register_agents": "agents",
    "loopwright_register_memory": "memory",
    "loopwright_register_verifiers": "verifiers",
    "loopwright_register_sandboxes": "sandboxes",
}


class PluginError(Exception):
    pass


@dataclass
class Contribution:
    name: str
    value: Any
    plugin: str


@dataclass
class PluginInfo:
    name: str
    source: str  # "built-in" or the distribution that installed it
    version: str
    hooks: list[str]


async def await_me_maybe(value: Any) -> Any:
    """Hooks may return a value, a callable or an awaitable (pluggy itself never awaits)."""
    if callable(value):
        value = value()
    if inspect.isawaitable(value):
        value = await value
    return value


@dataclass
class PluginHost:
    """Typed facade over the plugin manager: registries of contributions, and lifecycle calls."""

    pm: pluggy.PluginManager
    settings: Settings
    sources: dict[str, tuple[str, str]] = field(default_factory=dict)  # plugin -> (source, version)
    registries: dict[str, dict[str, Contribution]] = field(default_factory=dict)
    shadowed: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, name, losing plugin)

    def collect(self) -> None:
        for hook_name, registry in REGISTRIES.items():
            found: dict[str, Contribution] = {}
            for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
                # get_hookimpls() is in reverse call order; walk it in call order so the first wins.
                register = self._register_fn(registry, found, impl.plugin_name)
                impl.function(**({"register": register} if "register" in impl.argnames else {}))
            self.registries[registry] = found

    def _register_fn(self, registry: str, found: dict[str, Contribution], plugin: str):
        def register(name_or_tool: Any, value: Any = None) -> None:
            if isinstance(name_or_tool, Tool):
                tool = name_or_tool
                tool.plugin = plugin
                name, value = tool.name, tool
            else:
                name = name_or_tool
            if name in found:
                self.shadowed.append((registry, name, plugin))
                log.info("%s %r from plugin %s is overridden by plugin %s", registry, name, plugin, found[name].plugin)
                return
            found[name] = Contribution(name, value, plugin)

        return register

    def _get(self, registry: str, name: str, what: str) -> Any:
        try:
            return self.registries[registry][name].value
        except KeyError:
            known = ", ".join(sorted(self.registries.get(registry, {}))) or "none"
            raise PluginError(f"unknown {what} {name!r}: installed kinds are {known}") from None

    def tools(self) -> list[Tool]:
        return [c.value for c in self.registries["tools"].values()]

    def agent(self, kind: str) -> Any:
        return self._get("agents", kind, "agent kind")

    def verifier(self, kind: str) -> Any:
        return self._get("verifiers", kind, "verifier kind")

    def sandbox(self, kind: str) -> Any:
        return self._get("sandboxes", kind, "sandbox kind")

    def plugin_settings(self, plugin: str) -> dict[str, Any]:
        return self.settings.plugin_settings.get(plugin, {})

    def plugins(self) -> list[PluginInfo]:
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            source, version = self.sources.get(name, ("built-in", ""))
            hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
            infos.append(PluginInfo(name, source, version, hooks))
        return infos

    # Lifecycle: the engine calls these, never pm.hook directly.

    async def run_started(self, run: RunInfo) -> None:
        for result in self.pm.hook.loopwright_run_started(run=run):
            await await_me_maybe(result)

    async def system_prompt(self, run: RunInfo) -> list[str]:
        sections = [await await_me_maybe(r) for r in self.pm.hook.loopwright_system_prompt(run=run)]
        return [s for s in sections if s]

    async def run_tools(self, run: RunInfo, sandbox: Any, stack: Any) -> list[Tool]:
        tools: list[Tool] = []
        for impl in reversed(self.pm.hook.loopwright_run_tools.get_hookimpls()):
            args = {"run": run, "sandbox": sandbox, "stack": stack}
            for tool in await await_me_maybe(impl.function(**{k: args[k] for k in impl.argnames})) or []:
                tool.plugin = impl.plugin_name
                tools.append(tool)
        return tools

    async def before_tool_call(self, run: RunInfo, call: ToolCall) -> Decision:
        answer = await await_me_maybe(self.pm.hook.loopwright_before_tool_call(run=run, call=call))
        return answer or Decision.allow()

    async def after_tool_call(self, run: RunInfo, call: ToolCall, result: ToolResult) -> None:
        for value in self.pm.hook.loopwright_after_tool_call(run=run, call=call, result=result):
            await await_me_maybe(value)

    async def verdict(self, run: RunInfo, iteration: int, verdict: Verdict, summary: str) -> None:
        for value in self.pm.hook.loopwright_verdict(run=run, iteration=iteration, verdict=verdict, summary=summary):
            await await_me_maybe(value)

    async def run_finished(self, run: RunInfo, outcome: Outcome) -> None:
        for value in self.pm.hook.loopwright_run_finished(run=run, outcome=outcome):
            await await_me_maybe(value)


def _wanted_entry_points(settings: Settings):
    """LOOPWRIGHT_LOAD_PLUGINS: unset loads every installed plugin; '' loads none; 'a,b' only those."""
    selected = os.environ.get("LOOPWRIGHT_LOAD_PLUGINS")
    names = None if selected is None else {n.strip() for n in selected.split(",") if n.strip()}
    for ep in entry_points(group=hookspecs.PROJECT):
        if names is not None and ep.name not in names:
            continue
        if ep.name in settings.disabled_plugins:
            continue
        yield ep


def make_plugin_host(settings: Settings, extra_plugins: tuple[Any, ...] = ()) -> PluginHost:
    """A fresh plugin manager with the built-ins, installed plugins and any `extra_plugins`."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    host = PluginHost(pm, settings)
    for module_name in BUILTIN_PLUGINS:
        name = module_name.rsplit(".", 1)[1]
        if name not in settings.disabled_plugins:
            pm.register(importlib.import_module(module_name), name)
    for ep in _wanted_entry_points(settings):
        try:
            plugin = ep.load()
        except Exception as error:
            raise PluginError(
                f'Error importing plugin "{ep.name}" ({ep.value}): {error}. '
                "Uninstall or fix it, or start with LOOPWRIGHT_LOAD_PLUGINS='' to load no installed plugins."
            ) from error
        pm.register(plugin, ep.name)
        dist = ep.dist
        host.sources[ep.name] = (dist.name if dist else "package", dist.version if dist else "")
    for plugin in extra_plugins:
        pm.register(plugin)
    pm.check_pending()
    host.collect()
    return host
