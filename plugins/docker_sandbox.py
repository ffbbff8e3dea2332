"""Built-in sandbox `docker`: one hardened container per run, the worktree mounted at /workspace.

Settings, in ``[plugins.docker_sandbox]`` of plugins.toml (the environment variable wins):

    pool_size = 1   # LOOPWRIGHT_SANDBOX_POOL_SIZE: idle sandboxes kept ready per sandbox configuration
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from runtime.config import ConfigError
from runtime.hookspecs import hookimpl
from runtime.plugins import plugin_settings
from runtime.spec import LoopSpec
from sandbox import DockerSandbox, PoolKey, SandboxPool, default_image, reap_orphans

DEFAULT_POOL_SIZE = 1
# A check's Python reads no user site and writes no bytecode that a later check could run.
CHECK_ENVIRONMENT = {"PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def pool_size() -> int:
    raw = os.environ.get("LOOPWRIGHT_SANDBOX_POOL_SIZE", plugin_settings("docker_sandbox").get("pool_size"))
    if raw is None:
        return DEFAULT_POOL_SIZE
    try:
        size = int(raw)
    except (TypeError, ValueError):
        size = -1
    if size < 0:
        raise ConfigError(f"sandbox pool_size {raw!r} must be a whole number, 0 or more "
                          "([plugins.docker_sandbox] pool_size in plugins.toml, or LOOPWRIGHT_SANDBOX_POOL_SIZE)")
    return size


class DockerSandboxes:
    def __init__(self):
        self._pool: SandboxPool | None = None
        self._lock = threading.Lock()

    def reserve(self, *, run_id: str, worktree: Path, spec: LoopSpec) -> None:
        """Before the run's worktree exists: put a warm sandbox's folder there, and keep the pool filled."""
        with self._lock:
            if self._pool is None:
                self._pool = SandboxPool(pool_size())
        self._pool.reserve(_pool_key(spec, Path(worktree).parent), run_id, worktree)

    def start(self, *, run_id: str, worktree: Path, spec: LoopSpec, verification: bool = False) -> DockerSandbox:
        if self._pool is not None and not verification:
            pooled = self._pool.claim(run_id, worktree)
            if pooled is not None:
                return pooled
        box = spec.sandbox
        return DockerSandbox.start(
            run_id=run_id, worktree=worktree, image=box.image or default_image(), network=box.network,
            memory=box.memory, pids_limit=box.pids_limit, cpus=box.cpus,
            environment=CHECK_ENVIRONMENT if verification else None,
        )

    def reap_orphans(self) -> list[str]:
        """Remove this Loopwright home's sandboxes whose owner process is gone (not other homes' on the engine)."""
        return reap_orphans()


def _pool_key(spec: LoopSpec, worktrees: Path) -> PoolKey:
    box = spec.sandbox
    return PoolKey(worktrees=Path(worktrees).resolve(), image=box.image or default_image(), network=box.network,
                   memory=box.memory, pids_limit=box.pids_limit, cpus=box.cpus)


@hookimpl(trylast=True)
def loopwright_register_sandboxes(register):
    register("docker", DockerSandboxes())
