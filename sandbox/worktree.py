"""Host-side git for a run's own worktree.

Each run works on ``git worktree`` of the user's repository on its own branch, so the
user's checkout (dirty or not) is never touched and runs never collide. The sandbox writes
files as another uid, so every git call passes ``-c safe.directory=*``. Hooks are disabled
for our commits: a hook config in the worktree was written by the agent and must not run
on the host.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

AUTHOR_NAME = "Loopwright"
AUTHOR_EMAIL = "loopwright@localhost"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BASE_KEY = "loopwrightbase"  # branch.<branch>.loopwrightbase = base commit, for resumes
# Files that running code leaves behind (bytecode, test caches) are neither the maker's changes nor
# worth committing; they would also trip `protect` rules on test folders.
GENERATED = ["__pycache__/", "*.py[cod]", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", "node_modules/.cache/",
             ".loopwright/"]  # Loopwright's own files in the worktree, e.g. the command maker's prompt


class WorktreeError(RuntimeError):
    """A git operation on a run's worktree failed; the message says what to fix."""


@dataclass
class Worktree:
    repo: Path
    path: Path
    branch: str
    base_commit: str


def _git_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # Inherited GIT_DIR / GIT_INDEX_FILE etc. would redirect git to another repository.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({"LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0"})
    env.update(extra or {})
    return env


def _git(cwd: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["git", "-c", "safe.directory=*", "-c", "core.hooksPath=/dev/null", "-C", str(cwd), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_git_env(env))
    if check and proc.returncode != 0:
        raise WorktreeError(f"`git {' '.join(args)}` in {cwd} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def _registered_worktrees(repo: Path) -> dict[Path, str]:
    """Map worktree path -> branch ref for every worktree git knows of in ``repo``."""
    out = _git(repo, "worktree", "list", "--porcelain").stdout
    result: dict[Path, str] = {}
    current: Path | None = None
    for line in out.splitlines():
        if line.startswith("worktree "):
            current = Path(line[len("worktree "):]).resolve()
            result[current] = ""
        elif line.startswith("branch ") and current is not None:
            result[current] = line[len("branch "):]
    return result


def create_worktree(repo: Path, root: Path, loop: str, run_id: str) -> Worktree:
    """Create (or, for a resumed run, find) the run's worktree at ``root/run_id`` from HEAD.

    The folder may exist already if it is empty: a warm pool's sandbox mounts it before the run starts.
    """
    repo = Path(repo).resolve()
    if not _SAFE_ID.match(run_id):
        raise WorktreeError(f"run id {run_id!r} is not usable as a directory/branch name; use letters, digits, '.', '_', '-'")
    branch = f"loopwright/{loop}/{run_id}"
    if _git(repo, "check-ref-format", "--branch", branch, check=False).returncode != 0:
        raise WorktreeError(f"loop name {loop!r} makes an invalid git branch name {branch!r}; rename the loop")
    top = _git(repo, "rev-parse", "--show-toplevel", check=False)
    if top.returncode != 0:
        raise WorktreeError(f"{repo} is not a git repository; run `git init` there (and commit) or point the loop at a repo")
    repo = Path(top.stdout.strip()).resolve()
    head = _git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False)
    if head.returncode != 0:
        raise WorktreeError(f"{repo} has no commits yet; commit something first (the run's worktree starts from HEAD)")

    path = (Path(root) / run_id).resolve()
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):  # an empty folder: a pooled sandbox's
        ref = _registered_worktrees(repo).get(path)
        if ref != f"refs/heads/{branch}":
            raise WorktreeError(
                f"{path} already exists but is not the worktree of branch {branch} in {repo} "
                f"(found: {ref or 'not a worktree of this repo'}); remove it or use another run id"
            )
        base = _git(repo, "config", "--get", f"branch.{branch}.{_BASE_KEY}", check=False).stdout.strip()
        if not base:
            base = _git(repo, "merge-base", branch, "HEAD").stdout.strip()
        return Worktree(repo=repo, path=path, branch=branch, base_commit=base)

    base = head.stdout.strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    _git(repo, "worktree", "add", "--quiet", "-b", branch, str(path), base)
    _git(repo, "config", f"branch.{branch}.{_BASE_KEY}", base)
    return Worktree(repo=repo, path=path, branch=branch, base_commit=base)


def _excludes(wt: Worktree) -> tuple[str, ...]:
    """Git options that leave GENERATED files out; the list lives beside the worktrees."""
    path = wt.path.parent / ".loopwright-excludes"
    wanted = "\n".join(GENERATED) + "\n"
    if not path.exists() or path.read_text() != wanted:  # a list written by an older version is renewed
        path.write_text(wanted)
    return ("-c", f"core.excludesFile={path}")


def _with_temp_index(wt: Worktree, *args: str) -> str:
    """Run git with a throwaway index holding the whole worktree (untracked files included).

    The real index is copied first so git can reuse its stat cache, then left untouched.
    """
    real_index = Path(_git(wt.path, "rev-parse", "--path-format=absolute", "--git-path", "index").stdout.strip())
    with tempfile.TemporaryDirectory(prefix="loopwright-index-") as tmp:
        index = Path(tmp) / "index"
        if real_index.exists():
            shutil.copyfile(real_index, index)
        env = {"GIT_INDEX_FILE": str(index)}
        _git(wt.path, *_excludes(wt), "add", "-A", env=env)
        return _git(wt.path, *args, env=env).stdout


def changed_files(wt: Worktree) -> list[str]:
    """Paths (relative to the worktree) added, modified or deleted since ``base_commit``."""
    out = _with_temp_index(wt, "diff", "--cached", "--no-renames", "--name-only", "-z", wt.base_commit)
    return [p for p in out.split("\0") if p]


def diff(wt: Worktree) -> str:
    """Full diff since ``base_commit``, untracked files included, without touching the real index."""
    return _with_temp_index(wt, "diff", "--cached", "--binary", wt.base_commit)


def commit_all(wt: Worktree, message: str) -> str | None:
    """Commit everything in the worktree on the run's branch; None when there was nothing to commit."""
    _git(wt.path, *_excludes(wt), "add", "-A")
    if _git(wt.path, "diff", "--cached", "--quiet", check=False).returncode == 0:
        return None
    _git(
        wt.path,
        "-c", f"user.name={AUTHOR_NAME}", "-c", f"user.email={AUTHOR_EMAIL}", "-c", "commit.gpgsign=false",
        "commit", "--quiet", "--no-verify", "-m", message,
        env={
            "GIT_AUTHOR_NAME": AUTHOR_NAME, "GIT_AUTHOR_EMAIL": AUTHOR_EMAIL,
            "GIT_COMMITTER_NAME": AUTHOR_NAME, "GIT_COMMITTER_EMAIL": AUTHOR_EMAIL,
        },
    )
    return _git(wt.path, "rev-parse", "HEAD").stdout.strip()


def remove_worktree(repo: Path, path: Path) -> None:
    """Remove a run's worktree folder; its branch (and every commit on it) stays in ``repo``."""
    path = Path(path)
    if Path(repo).is_dir() and _git(Path(repo), "rev-parse", "--git-dir", check=False).returncode == 0:
        _git(Path(repo), "worktree", "remove", "--force", "--force", str(path), check=False)
        _git(Path(repo), "worktree", "prune")
    if path.exists():  # the repository is gone, or git did not know the folder: delete it ourselves
        shutil.rmtree(path)  # never follows symlinks


def prune_worktrees(root: Path, finished: Iterable[tuple[str | Path, str | Path, float]], *, keep_days: float = 7,
                    keep_last: int = 20, dry_run: bool = False, now: float | None = None) -> list[Path]:
    """Remove worktrees of finished runs, except the ``keep_last`` newest and those younger than ``keep_days``.

    ``finished`` holds ``(repo, worktree, finished_at)`` per finished run. Only folders inside
    ``root`` (LOOPWRIGHT_HOME/worktrees) are touched; branches stay. Returns what was (or, with
    ``dry_run``, would be) removed.
    """
    root = Path(root).resolve()
    cutoff = (time.time() if now is None else now) - keep_days * 86400
    newest_first = sorted(finished, key=lambda run: run[2], reverse=True)
    removed = []
    for repo, worktree, finished_at in newest_first[keep_last:]:
        path = Path(worktree).resolve()
        if finished_at >= cutoff or path.parent != root or not path.exists():
            continue
        if not dry_run:
            remove_worktree(Path(repo), path)
        removed.append(path)
    return removed
