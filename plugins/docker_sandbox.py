"""Built-in sandbox `docker`: one hardened container per run, the worktree mounted at /workspace."""

from __future__ import annotations

from pathlib import Path

from runtime.hookspecs import hookimpl
from runtime.spec import LoopSpec
from sandbox import DockerSandbox, default_image, reap_orphans


class DockerSandboxes:
    def start(self, *, run_id: str, worktree: Path, spec: LoopSpec) -> DockerSandbox:
        box = spec.sandbox
        return DockerSandbox.start(
            run_id=run_id, worktree=worktree, image=box.image or default_image(), network=box.network,
            memory=box.memory, pids_limit=box.pids_limit, cpus=box.cpus,
        )

    def reap_orphans(self) -> list[str]:
        return reap_orphans()


@hookimpl(trylast=True)
def loopwright_register_sandboxes(register):
    register("docker", DockerSandboxes())
