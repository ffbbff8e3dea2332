"""Settings: `plugins.toml` in the project, then in LOOPWRIGHT_HOME, then environment variables."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# $ per million tokens: input, output, 5-minute cache write, cache read.
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "claude-opus-5-5": {"input": 4.0, "output": 20.0, "cache_write": 5.0, "cache_read": 0.20},
    "claude-sonnet-5-5": {"input": 2.0, "output": 10.0, "cache_write": 2.50, "cache_read": 0.10},
    "claude-haiku-5-5": {"input": 0.10, "output": 0.50, "cache_write": 0.125, "cache_read": 0.01},
}

DEFAULT_OUTPUT_LIMIT = 30_000  # characters of one tool call's output shown to the model


class ConfigError(Exception):
    pass


@dataclass
class Settings:
    home: Path
    database_url: str
    prices: dict[str, dict[str, float]] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    disabled_plugins: list[str] = field(default_factory=list)
    plugin_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    output_limit: int = DEFAULT_OUTPUT_LIMIT
    max_parallel_runs: int = 4  # per process that executes runs

    @property
    def worktrees(self) -> Path:
        return self.home / "worktrees"

    @property
    def checks(self) -> Path:
        """Where each verification's clean copy is made, beside the check sandbox's warm pool."""
        return self.home / "checks"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    def price(self, model: str) -> dict[str, float]:
        try:
            return self.prices[model]
        except KeyError:
            raise ConfigError(
                f"no price known for model {model!r}: add [prices.{model!r}] with input, output, "
                "cache_write and cache_read ($ per million tokens) to plugins.toml"
            ) from None

    def cost(self, model: str, usage: dict[str, int]) -> float:
        price = self.price(model)
        return (
            usage.get("input_tokens", 0) * price["input"]
            + usage.get("output_tokens", 0) * price["output"]
            + (usage.get("cache_creation_input_tokens") or 0) * price["cache_write"]
            + (usage.get("cache_read_input_tokens") or 0) * price["cache_read"]
        ) / 1_000_000


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _plugins_table(plugins: Any) -> dict[str, Any]:
    """`[plugins] disabled = [names]`, and `[plugins.<name>]` tables of each plugin's settings."""
    if not isinstance(plugins, dict):
        raise ConfigError("plugins.toml: [plugins] must be a table")
    disabled = plugins.get("disabled", [])
    if not isinstance(disabled, list) or not all(isinstance(name, str) for name in disabled):
        raise ConfigError(f'plugins.toml: [plugins] disabled must be a list of plugin names, such as ["example"], '
                          f"not {disabled!r}")
    for name, value in plugins.items():
        if name != "disabled" and not isinstance(value, dict):
            raise ConfigError(f"plugins.toml: [plugins] {name} = {value!r} is not a plugin's settings; "
                              f"put them in a table: [plugins.{name}]")
    return plugins


def load_settings(project: Path | None = None) -> Settings:
    """Project settings win over LOOPWRIGHT_HOME's; environment variables win over both."""
    home = Path(os.environ.get("LOOPWRIGHT_HOME") or Path.home() / ".loopwright").expanduser().resolve()
    data = _read_toml(home / "plugins.toml")
    data = _merge(data, _read_toml((project or Path.cwd()) / "plugins.toml"))
    prices = dict(DEFAULT_PRICES)
    for model, price in data.get("prices", {}).items():
        missing = {"input", "output", "cache_write", "cache_read"} - set(price)
        if missing:
            raise ConfigError(f"plugins.toml: [prices.{model!r}] lacks {', '.join(sorted(missing))}")
        prices[model] = {k: float(price[k]) for k in ("input", "output", "cache_write", "cache_read")}
    plugins = _plugins_table(data.get("plugins", {}))
    home.mkdir(parents=True, exist_ok=True)
    return Settings(
        home=home,
        database_url=os.environ.get("LOOPWRIGHT_DATABASE_URL") or f"sqlite:///{home / 'loopwright.sqlite'}",
        prices=prices,
        disabled_plugins=list(plugins.get("disabled", [])),
        plugin_settings={k: v for k, v in plugins.items() if isinstance(v, dict)},
        output_limit=int(data.get("sandbox", {}).get("output_limit", DEFAULT_OUTPUT_LIMIT)),
        max_parallel_runs=int(data.get("runtime", {}).get("max_parallel_runs", 4)),
    )
