"""The plugin host: builds the plugin manager and is the only code that calls hooks."""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .config import Settings
from .types import Decision, Outcome, RunInfo, Tool, ToolCall, ToolResult, Verdict

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)

BUILTIN = "loopwright"  # the distribution whose entry points are the built-in plugins
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
    source: str  # "built-in", the distribution that installed it, or "in-process"
    version: str
    hooks: list[str]
    module: str = ""


_active_settings: Settings | None = None  # those of the plugin host built last in this process


def plugin_settings(name: str) -> dict[str, Any]:
    """A plugin's own settings: the ``[plugins.<name>]`` table of plugins.toml (empty if none).

    ``name`` is the plugin's name, its entry point's name in the ``loopwright`` group. Call it from a
    hook or a tool handler; the answer follows the plugins.toml the running process loaded.
    """
    if _active_settings is None:
        return {}
    return dict(_active_settings.plugin_settings.get(name, {}))


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
    sources: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # plugin -> (source, version, module)
    registries: dict[str, dict[str, Contribution]] = field(default_factory=dict)
    # (kind, name, losing plugin, winning plugin): a contribution that another plugin overrode
    shadowed: list[tuple[str, str, str, str]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # installed plugin not loaded -> why

    def collect(self) -> None:
        for hook_name, registry in REGISTRIES.items():
            found: dict[str, Contribution] = {}
            for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
                # get_hookimpls() is in reverse call order; walk it in call order so the first wins.
                register = self._register_fn(registry, found, impl.plugin_name)
                try:
                    impl.function(**({"register": register} if "register" in impl.argnames else {}))
                except Exception as error:
                    raise PluginError(
                        f'plugin "{impl.plugin_name}" failed in {hook_name}: {type(error).__name__}: {error}. '
                        + START_WITHOUT.format(name=impl.plugin_name)
                    ) from error
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
                self.shadowed.append((registry, name, plugin, found[name].plugin))
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

    def skill_sources(self) -> list[Contribution]:
        """Where skills are found, in the order they are searched (the first skill of a name wins)."""
        return list(self.registries["skill_sources"].values())

    @cached_property
    def store(self) -> Store:
        """The runs database, for plugins that keep state there (memory) or add to a run's trace."""
        from .store import Store

        return Store(self.settings.database_url)

    def agent(self, kind: str) -> Any:
        return self._get("agents", kind, "agent kind")

    def verifier(self, kind: str) -> Any:
        return self._get("verifiers", kind, "verifier kind")

    def sandbox(self, kind: str) -> Any:
        return self._get("sandboxes", kind, "sandbox kind")

    def automation(self, kind: str) -> Any:
        return self._get("automations", kind, "trigger kind")

    def plugin_settings(self, plugin: str) -> dict[str, Any]:
        return self.settings.plugin_settings.get(plugin, {})

    def plugins(self) -> list[PluginInfo]:
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            source, version, module = self.sources.get(name, ("in-process", "", getattr(plugin, "__name__", "")))
            hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
            infos.append(PluginInfo(name, source, version, hooks, module))
        return infos

    def describe(self) -> dict[str, Any]:
        """What `loopwright plugins` shows: each plugin, what it contributes and what was overridden."""
        plugins = []
        for info in self.plugins():
            contributes = {
                registry: [c.name for c in found.values() if c.plugin == info.name]
                for registry, found in self.registries.items()
            }
            plugins.append({
                **asdict(info),
                "settings": sorted(self.plugin_settings(info.name)),  # keys only: values may be secrets
                "contributes": {registry: names for registry, names in contributes.items() if names},
                "shadowed": [
                    {"kind": registry, "name": name, "by": winner}
                    for registry, name, loser, winner in self.shadowed if loser == info.name
                ],
            })
        return {
            "plugins": plugins,
            "not_loaded": [{"name": name, "reason": reason} for name, reason in sorted(self.skipped.items())],
        }

    # Lifecycle: the engine calls these, never pm.hook directly.

    async def run_started(self, run: RunInfo) -> None:
        for result in self.pm.hook.loopwright_run_started(run=run):
            await await_me_maybe(result)

    async def system_prompt(self, run: RunInfo) -> list[str]:
        sections = [await await_me_maybe(r) for r in self.pm.hook.loopwright_system_prompt(run=run, host=self)]
        return [s for s in sections if s]

    async def run_tools(self, run: RunInfo, sandbox: Any, stack: Any) -> list[Tool]:
        tools: list[Tool] = []
        for impl in reversed(self.pm.hook.loopwright_run_tools.get_hookimpls()):
            args = {"run": run, "sandbox": sandbox, "stack": stack, "host": self}
            for tool in await await_me_maybe(impl.function(**{k: args[k] for k in impl.argnames})) or []:
                tool.plugin = impl.plugin_name
                tools.append(tool)
        return tools

    async def _first_result(self, hook_name: str, **args: Any) -> Any:
        """A firstresult hook: each implementation in call order, awaited, until one answers.

        pluggy would stop at the first non-None return, and an async implementation that abstains
        returns a coroutine, not None; so the host awaits each answer itself. Wrappers are not called.
        """
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            if impl.hookwrapper or impl.wrapper:
                continue
            answer = await await_me_maybe(impl.function(**{k: args[k] for k in impl.argnames}))
            if answer is not None:
                return answer
        return None

    async def before_tool_call(self, run: RunInfo, call: ToolCall) -> Decision:
        return await self._first_result("loopwright_before_tool_call", run=run, call=call) or Decision.allow()

    async def after_tool_call(self, run: RunInfo, call: ToolCall, result: ToolResult) -> None:
        for value in self.pm.hook.loopwright_after_tool_call(run=run, call=call, result=result):
            await await_me_maybe(value)

    async def verdict(self, run: RunInfo, iteration: int, verdict: Verdict, summary: str) -> None:
        for value in self.pm.hook.loopwright_verdict(
            run=run, iteration=iteration, verdict=verdict, summary=summary, host=self
        ):
            await await_me_maybe(value)

    async def run_finished(self, run: RunInfo, outcome: Outcome) -> None:
        for value in self.pm.hook.loopwright_run_finished(run=run, outcome=outcome, host=self):
            await await_me_maybe(value)


START_WITHOUT = (
    "Fix or uninstall it, add \"{name}\" to [plugins] disabled in plugins.toml, "
    "or start with LOOPWRIGHT_LOAD_PLUGINS='' to load no installed plugins."
)


def _wanted_entry_points(host: PluginHost):
    """The built-in plugins first, in pyproject.toml's order, then the installed ones.
    LOOPWRIGHT_LOAD_PLUGINS selects among the installed: unset loads all; '' loads none; 'a,b' only those."""
    selected = os.environ.get("LOOPWRIGHT_LOAD_PLUGINS")
    names = None if selected is None else {n.strip() for n in selected.split(",") if n.strip()}
    found = entry_points(group=hookspecs.PROJECT)
    builtin = [ep for ep in found if _is_builtin(ep)]
    for ep in builtin + [ep for ep in found if not _is_builtin(ep)]:
        if names is not None and ep.name not in names and not _is_builtin(ep):
            host.skipped[ep.name] = "not named in LOOPWRIGHT_LOAD_PLUGINS"
        elif ep.name in host.settings.disabled_plugins:
            host.skipped[ep.name] = "disabled in plugins.toml"
        else:
            yield ep


def _is_builtin(ep) -> bool:
    return ep.dist is not None and ep.dist.name == BUILTIN


def _register(pm: pluggy.PluginManager, plugin: Any, name: str | None) -> None:
    try:
        pm.register(plugin, name)
    except (ValueError, pluggy.PluginValidationError) as error:  # a name taken twice, a hook it cannot take
        label = name or getattr(plugin, "__name__", repr(plugin))
        raise PluginError(f'plugin "{label}" cannot be registered: {error}. ' + START_WITHOUT.format(name=label)) from None


def make_plugin_host(settings: Settings, extra_plugins: tuple[Any, ...] = ()) -> PluginHost:
    """A fresh plugin manager with the built-ins, installed plugins and any `extra_plugins`."""
    global _active_settings
    _active_settings = settings  # before any plugin is imported: plugin_settings() works from then on
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    host = PluginHost(pm, settings)
    for ep in _wanted_entry_points(host):
        try:
            plugin = ep.load()
        except Exception as error:
            raise PluginError(
                f'Error importing plugin "{ep.name}" ({ep.value}): {type(error).__name__}: {error}. '
                + START_WITHOUT.format(name=ep.name)
            ) from error
        _register(pm, plugin, ep.name)
        dist = ep.dist
        source = "built-in" if _is_builtin(ep) else dist.name if dist else "package"
        host.sources[ep.name] = (source, dist.version if dist else "", ep.value)
    for plugin in extra_plugins:
        _register(pm, plugin, None)
    for name in settings.disabled_plugins:
        host.skipped.setdefault(name, "disabled in plugins.toml, but no plugin of this name is installed")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as error:  # a hook implementation no spec knows: a typo or an old plugin
        name = pm.get_name(error.plugin) or "it"
        raise PluginError(f'plugin "{name}": {error}. ' + START_WITHOUT.format(name=name)) from None
    host.collect()
    return host
