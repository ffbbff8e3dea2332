"""A loop's `[[trigger]]` entries built into automations, with the kinds plugins contribute.

Light on purpose (no database): `loopwright validate` checks triggers with `trigger_problems`, and
runtime/automations.py runs what `build_automation` builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .plugin_host import PluginError

if TYPE_CHECKING:
    from .plugin_host import PluginHost
    from .spec import LoopSpec, TriggerSpec


class AutomationError(Exception):
    """A trigger that cannot work; the message says which setting and what was expected."""


@dataclass
class Automation:
    """One `[[trigger]]` of one loop, built by its kind's factory."""

    loop: str
    name: str
    kind: str
    file: Path
    spec: LoopSpec
    trigger_spec: TriggerSpec
    trigger: Any
    plugin: str

    @property
    def id(self) -> str:
        return f"{self.loop}/{self.name}"

    @property
    def settings(self) -> dict[str, Any]:
        return self.trigger_spec.model_dump(mode="json", exclude_none=True)


def build_automation(host: PluginHost, spec: LoopSpec, file: Path, index: int) -> Automation:
    trigger_spec = spec.trigger[index]
    name = spec.trigger_names()[index]
    try:
        factory = host.automation(trigger_spec.kind)
        plugin = host.registries["automations"][trigger_spec.kind].plugin
    except PluginError as error:
        raise AutomationError(str(error)) from None
    try:
        trigger = factory(trigger_spec)
    except (ValueError, TypeError, KeyError) as error:
        raise AutomationError(str(error).strip("'\"")) from None
    return Automation(spec.name, name, trigger_spec.kind, file, spec, trigger_spec, trigger, plugin)


def trigger_problems(host: PluginHost, spec: LoopSpec) -> list[str]:
    """One line per trigger whose kind is unknown or whose settings are wrong (for `loopwright validate`)."""
    problems = []
    for index, name in enumerate(spec.trigger_names()):
        try:
            build_automation(host, spec, Path(), index)
        except AutomationError as error:
            problems.append(f"trigger[{index}] ({name}): {error}")
    return problems
