"""A warm pool: sandboxes started before their run exists, so a run's first tool call need not wait.

A container's mounts are fixed when it starts, and a run's sandbox must mount the run's worktree.
So a pool slot is a sandbox started on an empty folder ``<worktrees>/.pool/<slot>``. When a run
begins, before its worktree exists, ``reserve`` renames a slot's folder to where the worktree
goes (``<worktrees>/<run id>``): a rename keeps the folder itself, which the container mounts.
``git worktree add`` then fills that folder (it accepts an empty one) and ``claim`` hands the
running sandbox over, the worktree already visible at /workspace.

Slots are kept per configuration (image, limits, network, environment, folder), ``size`` idle ones
each, refilled in the background whenever a run of that configuration begins. Slots are ordinary
sandboxes: labelled, reaped when their owner dies, and removed at exit with their empty folders.
"""

from __future__ import annotations

import atexit
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .docker import START_TIMEOUT_S, DockerSandbox, SandboxError, give_worktree_to_sandbox_user, owner_gone, owner_tag

POOL_FOLDER = ".pool"
UNCLAIMED_AFTER_S = 600.0  # a reserved slot not claimed by then belongs to a run that failed before its start


@dataclass(frozen=True)
class PoolKey:
    """What must match for a slot to serve a run."""

    worktrees: Path
    image: str
    network: str = "none"
    memory: str = "1g"
    pids_limit: int = 256
    cpus: float = 1.0
    environment: tuple[tuple[str, str], ...] = ()  # variables added to the container's own (a check's)


@dataclass
class _Slot:
    key: PoolKey
    name: str
    folder: Path
    inode: tuple[int, int]  # the folder the container mounts, wherever it is renamed to
    ready: threading.Event = field(default_factory=threading.Event)
    sandbox: DockerSandbox | None = None
    reserved_at: float = 0.0


class SandboxPool:
    def __init__(self, size: int):
        if size < 0:
            raise SandboxError(f"sandbox pool size {size!r} must be 0 or more")
        self.size = size
        self._lock = threading.Lock()
        self._idle: dict[PoolKey, list[_Slot]] = {}
        self._reserved: dict[str, _Slot] = {}
        self._closed = False
        atexit.register(self.close)

    def reserve(self, key: PoolKey, run_id: str, worktree: Path) -> bool:
        """Put a started idle slot's folder at ``worktree`` (not there yet) for ``run_id``; False if none.

        Either way, tops the configuration's idle slots up to ``size`` in the background.
        """
        worktree = Path(worktree).resolve()
        with self._lock:
            if self._closed:
                return False
            self._drop_abandoned()
            idle = self._idle.setdefault(key, [])
            for failed in [s for s in idle if s.ready.is_set() and (s.sandbox is None or s.sandbox.retired)]:
                idle.remove(failed)  # it did not start, or its agent retired after an idle hour
                self._discard(failed)
            # Only a started slot will do: until its container exists, its folder must stay where it is.
            ready = [s for s in idle if s.ready.is_set()]
            slot = None
            if ready and not os.path.lexists(worktree) and worktree.parent == key.worktrees:
                slot = ready[0]
                idle.remove(slot)
                os.rename(slot.folder, worktree)
                slot.folder, slot.reserved_at = worktree, time.monotonic()
                self._reserved[run_id] = slot
            while len(idle) < self.size:
                idle.append(self._start_slot(key))
        return slot is not None

    def _drop_abandoned(self) -> None:
        """Remove slots reserved long ago and never claimed: their runs failed before starting a sandbox."""
        now = time.monotonic()
        for run_id in [r for r, s in self._reserved.items() if now - s.reserved_at > UNCLAIMED_AFTER_S]:
            self._discard(self._reserved.pop(run_id))

    @staticmethod
    def _remove(slot: _Slot) -> None:
        """Remove a slot's container, and its folder while still empty."""
        if slot.sandbox is not None:
            slot.sandbox.close()
        try:
            slot.folder.rmdir()
        except OSError:
            pass  # a run's worktree was made in it after all

    def _discard(self, slot: _Slot) -> None:
        threading.Thread(target=self._remove, args=(slot,), daemon=True).start()  # removing takes a while

    def claim(self, run_id: str, worktree: Path) -> DockerSandbox | None:
        """The running sandbox reserved for ``run_id`` on ``worktree``, renamed for the run; None if there is none."""
        with self._lock:
            slot = self._reserved.pop(run_id, None)
        if slot is None:
            return None
        stat = Path(worktree).resolve().stat()
        if (stat.st_dev, stat.st_ino) != slot.inode:
            slot.sandbox.close()  # it mounts another folder: of no use to this run
            return None
        give_worktree_to_sandbox_user(slot.folder)
        slot.sandbox.hand_over(run_id, slot.folder)
        return slot.sandbox

    def ready(self, key: PoolKey) -> int:
        """How many started slots wait for a run of this configuration."""
        with self._lock:
            return sum(1 for s in self._idle.get(key, []) if s.ready.is_set() and s.sandbox is not None)

    def close(self) -> None:
        """Remove every slot not handed to a run, and its folder while still empty."""
        with self._lock:
            self._closed = True
            slots = [s for idle in self._idle.values() for s in idle] + list(self._reserved.values())
            self._idle.clear()
            self._reserved.clear()
        for slot in slots:
            slot.ready.wait(START_TIMEOUT_S * 2)
            self._remove(slot)

    def _start_slot(self, key: PoolKey) -> _Slot:
        name = f"pool-{owner_tag()}-{secrets.token_hex(4)}"
        folder = key.worktrees / POOL_FOLDER / name
        folder.mkdir(parents=True)
        stat = folder.stat()
        slot = _Slot(key, name, folder, (stat.st_dev, stat.st_ino))
        # Not a daemon thread: an exiting interpreter waits for it, then close() removes the container.
        threading.Thread(target=self._fill, args=(slot,), name=f"loopwright-{name}").start()
        return slot

    def _fill(self, slot: _Slot) -> None:
        key = slot.key
        try:
            slot.sandbox = DockerSandbox.start(
                run_id=slot.name, worktree=slot.folder, image=key.image, network=key.network,
                memory=key.memory, pids_limit=key.pids_limit, cpus=key.cpus, pooled=True,
                environment=dict(key.environment),
            )
            slot.sandbox.run("true", timeout=START_TIMEOUT_S)  # a first call warms the agent's supervisor up
        except Exception:
            pass  # reserve() drops the slot; runs start their own sandboxes, which report the error
        finally:
            slot.ready.set()


def remove_dead_slots(folders: Path) -> None:
    """Remove the empty slot folders that processes which have ended left in `folders`' pool (a process killed
    with idle slots; their containers are reaped apart)."""
    for folder in (folders / POOL_FOLDER).glob("pool-*"):
        if owner_gone(folder.name.removeprefix("pool-").rpartition("-")[0]):
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty: a run's worktree was made in it
