"""Sandbox: a locked-down Docker container per run, working on the run's own git worktree
(the worktree itself is the engine's: loopwright.runtime.worktree)."""

from .docker import DockerSandbox, ExecResult, SandboxError, close_all, list_sandboxes, loopwright_home, reap_orphans
from .image import IMAGE_REPO, PACKAGES, ImageBuildError, build_image, default_image, image_exists
from .pool import PoolKey, SandboxPool, remove_dead_slots

__all__ = [
    "DockerSandbox", "ExecResult", "SandboxError", "close_all", "list_sandboxes", "loopwright_home", "reap_orphans",
    "IMAGE_REPO", "PACKAGES", "ImageBuildError", "build_image", "default_image", "image_exists",
    "PoolKey", "SandboxPool", "remove_dead_slots",
]
