"""Sandbox: a locked-down Docker container per run, working on the run's own git worktree."""

from .docker import DockerSandbox, ExecResult, SandboxError, close_all, list_sandboxes, reap_orphans
from .image import IMAGE_REPO, PACKAGES, ImageBuildError, build_image, default_image, image_exists
from .pool import PoolKey, SandboxPool
from .worktree import (
    Worktree,
    WorktreeError,
    changed_files,
    commit_all,
    create_worktree,
    diff,
    prune_worktrees,
    remove_worktree,
)

__all__ = [
    "DockerSandbox", "ExecResult", "SandboxError", "close_all", "list_sandboxes", "reap_orphans",
    "IMAGE_REPO", "PACKAGES", "ImageBuildError", "build_image", "default_image", "image_exists",
    "PoolKey", "SandboxPool",
    "Worktree", "WorktreeError", "changed_files", "commit_all", "create_worktree", "diff",
    "prune_worktrees", "remove_worktree",
]
