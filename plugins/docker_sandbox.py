"""Built-in sandbox `docker`: one hardened container per run, the worktree mounted at /workspace.

Settings, in ``[plugins.docker_sandbox]`` of plugins.toml (the environment variable wins):

    pool_size = 1   # LOOPWRIGHT_SANDBOX_POOL_SIZE: idle sandboxes kept ready per sandbox configuration
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from loopwright.runtime.config import ConfigError
from loopwright.runtime.hookspecs import hookimpl
from loopwright.runtime.plugins import plugin_settings
from loopwright.runtime.spec import LoopSpec
from loopwright.sandbox import DockerSandbox, PoolKey, SandboxPool, default_image, reap_orphans

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

    def reserve(self, *, run_id: str, worktree: Path, spec: LoopSpec, verification: bool = False) -> None:
        """Before the folder exists (a run's worktree, or a check's clean copy): put a warm sandbox's
        empty folder there, and keep the pool filled. A check's slot has never run anything but `true`."""
        with self._lock:
            if self._pool is None:
                self._pool = SandboxPool(pool_size())
        self._pool.reserve(_pool_key(spec, Path(worktree).parent, verification), run_id, worktree)

    def start(self, *, run_id: str, worktree: Path, spec: LoopSpec, verification: bool = False) -> DockerSandbox:
        environment = CHECK_ENVIRONMENT if verification else {}
        if self._pool is not None:
            pooled = self._pool.claim(run_id, worktree)
            if pooled is not None and pooled.environment == environment:
                return pooled
            if pooled is not None:  # reserved for the other use: a check gets only a check's slot
                pooled.close()
        box = spec.sandbox
        return DockerSandbox.start(
            run_id=run_id, worktree=worktree, image=box.image or default_image(), network=box.network,
            memory=box.memory, pids_limit=box.pids_limit, cpus=box.cpus, environment=environment,
        )

    def reap_orphans(self) -> list[str]:
        """Remove this Loopwright home's sandboxes whose owner process is gone (not other homes' on the engine)."""
        return reap_orphans()


def _pool_key(spec: LoopSpec, folders: Path, verification: bool = False) -> PoolKey:
    box = spec.sandbox
    return PoolKey(worktrees=Path(folders).resolve(), image=box.image or default_image(), network=box.network,
                   memory=box.memory, pids_limit=box.pids_limit, cpus=box.cpus,
                   environment=tuple(sorted(CHECK_ENVIRONMENT.items())) if verification else ())


@hookimpl(trylast=True)
def loopwright_register_sandboxes(register):
    register("docker", DockerSandboxes())
