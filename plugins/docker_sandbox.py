"""Built-in sandbox `docker`: one hardened container per run, the worktree mounted at /workspace.

Settings, in ``[plugins.docker_sandbox]`` of plugins.toml (the environment variable wins):

    pool_size = 1   # LOOPWRIGHT_SANDBOX_POOL_SIZE: idle sandboxes kept ready per sandbox configuration
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

from loopwright.runtime.config import ConfigError
from loopwright.runtime.hookspecs import hookimpl
from loopwright.runtime.plugin_host import plugin_settings
from loopwright.sandbox import (
    DockerSandbox, PoolKey, SandboxPool, default_image, loopwright_home, reap_orphans, remove_dead_slots,
)

if TYPE_CHECKING:
    from loopwright.runtime.spec import LoopSpec

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
        """Remove this Loopwright home's sandboxes whose owner process is gone (not other homes' on the engine),
        and the empty warm-pool folders such a process left (beside its runs' worktrees and checks' copies)."""
        removed = reap_orphans()
        for folders in Path(loopwright_home()).iterdir():
            remove_dead_slots(folders)
        return removed


def _pool_key(spec: LoopSpec, folders: Path, verification: bool = False) -> PoolKey:
    box = spec.sandbox
    return PoolKey(worktrees=Path(folders).resolve(), image=box.image or default_image(), network=box.network,
                   memory=box.memory, pids_limit=box.pids_limit, cpus=box.cpus,
                   environment=tuple(sorted(CHECK_ENVIRONMENT.items())) if verification else ())


@hookimpl(trylast=True)
def loopwright_register_sandboxes(register):
    register("docker", DockerSandboxes())


@hookimpl
def loopwright_register_commands(cli):
    cli.add_command(sandbox)


# --- `loopwright sandbox ...` -------------------------------------------------------------------


@click.group()
def sandbox() -> None:
    """The sandbox image and leftover containers."""


@sandbox.command("build")
@click.option("--force", is_flag=True, help="rebuild even if the image exists")
def sandbox_build(force: bool) -> None:
    """Build the default sandbox image locally (no registry needed)."""
    from loopwright.sandbox import build_image

    click.echo(build_image(force=force, log=lambda m: click.echo(m, err=True)))


@sandbox.command("gc")
def sandbox_gc() -> None:
    """Show sandboxes and remove this Loopwright home's whose owning process is gone.

    Sandboxes of other homes on the same Docker engine are shown, and left alone."""
    from loopwright.sandbox import list_sandboxes, reap_orphans
    from loopwright.sandbox.docker import loopwright_home

    home = loopwright_home()
    for box in list_sandboxes():
        if box["home"] is None:
            whose = "home unknown (not labelled): left alone"
        elif box["home"] != home:
            whose = f"home {box['home']} (another home): left alone"
        else:
            whose = f"home {box['home']}"
        click.echo(f"{box['name']}  run {box['run_id']}  owner pid {box['owner_pid']}  alive {box['alive']}  {whose}")
    removed = reap_orphans(home)
    click.echo(f"removed {len(removed)} leftover sandbox(es)" + (": " + ", ".join(removed) if removed else ""))


@sandbox.command("prune")
@click.option("--keep-days", default=7.0, show_default=True, help="keep worktrees of runs finished this recently")
@click.option("--keep-last", default=20, show_default=True, help="keep worktrees of this many newest finished runs")
@click.option("--dry-run", is_flag=True, help="only show what would be removed")
def sandbox_prune(keep_days: float, keep_last: int, dry_run: bool) -> None:
    """Remove worktrees of finished runs; their branches (and commits) stay."""
    from loopwright.runtime.service import Runtime
    from loopwright.runtime.worktree import prune_worktrees

    runtime = Runtime()
    finished = [(r.repo, r.worktree, r.finished_at) for r in runtime.list_runs(limit=1_000_000)
                if r.finished and r.worktree]
    removed = prune_worktrees(runtime.settings.worktrees, finished, keep_days=keep_days, keep_last=keep_last,
                              dry_run=dry_run)
    for path in removed:
        click.echo(f"{'would remove' if dry_run else 'removed'} {path}")
    click.echo(f"{len(removed)} worktree(s) {'to remove' if dry_run else 'removed'}; branches stay")
