"""Host-side git for a run's own worktree, which the maker can write but never steer.

Each run works on ``git worktree`` of the user's repository on its own branch, so the user's
checkout (dirty or not) is never touched and runs never collide. Everything inside the worktree
is the maker's, including its ``.git`` pointer: host git never discovers a repository through
it. Every call names the git dir (found from the repository's own administrative files) and the
work tree explicitly, with fsmonitor, hooks and the untracked cache off; commits are built from
blobs hashed without filters, so no attribute the maker writes selects a command to run here.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

from .verification import materialize

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
    identity: tuple[str, str] | None = None  # (name, email) its commits carry; default Loopwright's

    @property
    def git_dir(self) -> Path:
        """The worktree's administrative folder in the repository, found without reading the worktree."""
        return admin_dir(self.repo, self.path)

    @property
    def pointer(self) -> str:
        """What the worktree's ``.git`` file must hold."""
        return f"gitdir: {self.git_dir}\n"


# Host git: no fsmonitor or hooks, nothing that runs a configured command on the maker's files.
_HARDENED = ("-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null", "-c", "core.untrackedCache=false",
             "-c", "diff.external=", "-c", "submodule.recurse=false")


def _git_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # Inherited GIT_DIR / GIT_INDEX_FILE etc. would redirect git to another repository.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({"LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0"})
    env.update(extra or {})
    return env


def _git(cwd: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Git on the user's repository itself (never on a run's worktree: see ``_git_wt``)."""
    cmd = ["git", *_HARDENED, "-C", str(cwd), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_git_env(env))
    if check and proc.returncode != 0:
        raise WorktreeError(f"`git {' '.join(args)}` in {cwd} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def _git_wt(wt: Worktree, *args: str, env: dict[str, str] | None = None, input: bytes | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Git on a run's worktree with the git dir and work tree given, so the worktree's ``.git`` is never read."""
    cmd = ["git", *_HARDENED, f"--git-dir={wt.git_dir}", f"--work-tree={wt.path}", *args]
    proc = subprocess.run(cmd, capture_output=True, input=input, cwd=wt.repo, env=_git_env(env))
    if check and proc.returncode != 0:
        raise WorktreeError(f"`git {' '.join(args)}` on {wt.path} failed (exit {proc.returncode}): "
                            f"{proc.stderr.decode(errors='replace').strip()}")
    return proc


@functools.lru_cache(maxsize=64)
def _common_dir(repo: Path) -> Path:
    """The repository's own git folder, which its worktrees share: asked of git once per repository, not
    before every git command on a run's worktree."""
    return Path(_git(repo, "rev-parse", "--path-format=absolute", "--git-common-dir").stdout.strip())


def admin_dir(repo: Path, path: Path) -> Path:
    """The ``.git/worktrees/<id>`` folder whose ``gitdir`` file names ``path``: the repository's files, not the worktree's."""
    common = _common_dir(Path(repo))
    want = Path(path).resolve() / ".git"
    for gitdir in sorted((common / "worktrees").glob("*/gitdir")):
        if Path(gitdir.read_text().strip()) == want:
            return gitdir.parent
    raise WorktreeError(f"{path} is not a worktree of {repo}; its run cannot be verified or committed")


def pointer_tampered(wt: Worktree) -> bool:
    """True when the worktree's ``.git`` is no longer the file git wrote; the pointer is put back either way."""
    dot_git = wt.path / ".git"
    try:
        intact = dot_git.is_file() and not dot_git.is_symlink() and dot_git.read_text() == wt.pointer
    except (OSError, UnicodeDecodeError):
        intact = False
    if not intact:
        if dot_git.is_dir() and not dot_git.is_symlink():
            shutil.rmtree(dot_git)
        elif dot_git.exists() or dot_git.is_symlink():
            dot_git.unlink()
        dot_git.write_text(wt.pointer)
    return not intact


def tree_of(wt: Worktree, commit: str) -> dict[str, tuple[str, str]]:
    """``path -> (mode, blob sha)`` of every file in ``commit`` (submodules left out)."""
    out = _git_wt(wt, "ls-tree", "-r", "-z", "--full-tree", commit).stdout.decode(errors="surrogateescape")
    tree = {}
    for entry in filter(None, out.split("\0")):
        meta, path = entry.split("\t", 1)
        mode, kind, sha = meta.split()
        if kind == "blob":
            tree[path] = (mode, sha)
    return tree


def read_blobs(wt: Worktree, shas: Iterable[str]) -> dict[str, bytes]:
    """The contents of blobs, by sha, in one ``git cat-file --batch``."""
    wanted = list(dict.fromkeys(shas))
    if not wanted:
        return {}
    out = _git_wt(wt, "cat-file", "--batch", input="".join(f"{sha}\n" for sha in wanted).encode()).stdout
    blobs, at = {}, 0
    for sha in wanted:
        header_end = out.index(b"\n", at)
        size = int(out[at:header_end].split()[2])
        blobs[sha] = out[header_end + 1:header_end + 1 + size]
        at = header_end + 1 + size + 1
    return blobs


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


def create_worktree(repo: Path, root: Path, loop: str, run_id: str, start: str | None = None) -> Worktree:
    """Create (or, for a resumed run, find) the run's worktree at ``root/run_id`` from HEAD (or ``start``).

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

    base = start or head.stdout.strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _one_writer(repo):
        _git(repo, "worktree", "add", "--quiet", "-b", branch, str(path), base)
        _git(repo, "config", f"branch.{branch}.{_BASE_KEY}", base)
    return Worktree(repo=repo, path=path, branch=branch, base_commit=base)


@contextmanager
def _one_writer(repo: Path) -> Iterator[None]:
    """Git refuses a second writer of a repository's config at the same moment (".git/config: File
    exists"): runs that start together, in one process or in several daemons, take turns here."""
    common = Path(_git(repo, "rev-parse", "--git-common-dir").stdout.strip())
    with open((repo / common) / "loopwright.lock", "a") as lock:  # an absolute `common` stays as it is
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _excludes(wt: Worktree) -> tuple[str, ...]:
    """Git options that leave GENERATED files out; the list lives beside the worktrees."""
    path = wt.path.parent / ".loopwright-excludes"
    wanted = "\n".join(GENERATED) + "\n"
    if not path.exists() or path.read_text() != wanted:  # a list written by an older version is renewed
        path.write_text(wanted)
    return ("-c", f"core.excludesFile={path}")


def commit_all(wt: Worktree, message: str, allow_empty: bool = False) -> str | None:
    """Commit everything in the worktree on the run's branch; None when there was nothing to commit
    (unless ``allow_empty``). A branch whose last commit has this very message and tree is left as it is,
    so a step that commits and is run again after a crash commits once.

    The files are those ``git add -A`` would take, but hashed with ``--no-filters`` and written to the
    tree directly: no clean filter, no hook and no fsmonitor runs, whatever the worktree says.
    """
    pointer_tampered(wt)
    listed = _git_wt(wt, *_excludes(wt), "ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout
    entries = []
    for path in sorted(set(filter(None, listed.decode(errors="surrogateescape").split("\0")))):
        full = wt.path / path
        if path.endswith("/") or not (full.is_file() or full.is_symlink()):
            continue  # deleted, a nested repository, or not a file
        if full.is_symlink():
            mode, data = "120000", os.fsencode(os.readlink(full))
        else:
            mode, data = ("100755" if os.access(full, os.X_OK) else "100644"), full.read_bytes()
        sha = _git_wt(wt, "hash-object", "-w", "--no-filters", "--stdin", input=data).stdout.decode().strip()
        entries.append(f"{mode} {sha}\t{path}\0")
    with tempfile.TemporaryDirectory(prefix="loopwright-index-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        _git_wt(wt, "update-index", "-z", "--add", "--index-info", env=env, input="".join(entries).encode())
        tree = _git_wt(wt, "write-tree", env=env).stdout.decode().strip()
    head = _git_wt(wt, "rev-parse", f"refs/heads/{wt.branch}").stdout.decode().strip()
    if _git_wt(wt, "rev-parse", f"{head}^{{tree}}").stdout.decode().strip() == tree:
        if not allow_empty:
            return None
        if _git_wt(wt, "log", "-1", "--format=%B", head).stdout.decode().strip() == message.strip():
            return head
    name, email = wt.identity or (AUTHOR_NAME, AUTHOR_EMAIL)
    identity = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}
    sha = _git_wt(wt, "commit-tree", tree, "-p", head, "-m", message, env=identity).stdout.decode().strip()
    _git_wt(wt, "update-ref", f"refs/heads/{wt.branch}", sha, head)
    _git_wt(wt, "read-tree", sha)  # the worktree's index follows, so `git status` there shows a clean tree
    return sha


def restore_tree(wt: Worktree, commit: str) -> None:
    """Make the worktree's files those of ``commit``, from the branch's last commit (which the worktree
    holds): changed files are written from blobs (no checkout, filter or hook runs), files the commit
    lacks are removed; what is written gets the worktree folder's owner, so the sandbox user can edit it."""
    head = _git_wt(wt, "rev-parse", f"refs/heads/{wt.branch}").stdout.decode().strip()
    now, wanted = tree_of(wt, head), tree_of(wt, commit)
    for path in sorted(set(now) - set(wanted)):
        target = wt.path / path
        if target.is_symlink() or target.is_file():
            target.unlink()
        for parent in target.parents:  # folders left empty go too
            if parent == wt.path or any(parent.iterdir()):
                break
            parent.rmdir()
    changed = {path: entry for path, entry in wanted.items() if now.get(path) != entry}
    materialize(wt.path, changed, read_blobs(wt, (sha for _, sha in changed.values())))
    owner = wt.path.stat()
    if os.getuid() == 0 and owner.st_uid != 0:
        for path in changed:
            relative = PurePosixPath(path)
            for part in [relative, *relative.parents][:-1]:  # the file and its folders, not the worktree
                os.lchown(wt.path / part, owner.st_uid, owner.st_gid)


def resolve_ref(repo: Path, ref: str, remote: str | None = None, fetch: str | None = None) -> str:
    """The commit ``ref`` names in ``repo``; when the repository lacks it, fetched from ``remote`` first
    (``fetch``: what to fetch there, e.g. a pull request's ``refs/pull/7/head``; default ``ref`` itself)."""
    def commit_of(name: str) -> str:
        return _git(repo, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}", check=False).stdout.strip()

    found = commit_of(ref)
    if not found and remote:
        _git(repo, "fetch", "-q", "--no-tags", remote, fetch or ref)
        found = commit_of(ref) or commit_of("FETCH_HEAD")
    if not found:
        raise WorktreeError(f"workspace.ref {ref!r} is no commit of {repo}" + ("" if remote else
                            "; give workspace.remote to fetch it from"))
    return found


def has_file_at_head(repo: Path, path: str) -> bool:
    """Whether ``path`` is committed in ``repo``'s HEAD."""
    return _git(Path(repo), "cat-file", "-e", f"HEAD:{path}", check=False).returncode == 0


def snapshot(source: Path, dest: Path, ref: str | None = None) -> None:
    """Make ``dest`` a repository of its own whose HEAD is ``source`` as it stands: a clone of a repository
    at ``ref`` (default its HEAD), detached, or a folder committed as it is."""
    if (source / ".git").exists():
        commit = resolve_ref(source, ref or "HEAD")
        _git(dest.parent, "clone", "-q", "--no-checkout", str(source), dest.name)
        _git(dest, "checkout", "-q", "--detach", commit)
        return
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    _git(dest, "init", "-q")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "--allow-empty", "-m", f"{source.name}, as it was",
         env={"GIT_AUTHOR_NAME": AUTHOR_NAME, "GIT_AUTHOR_EMAIL": AUTHOR_EMAIL,
              "GIT_COMMITTER_NAME": AUTHOR_NAME, "GIT_COMMITTER_EMAIL": AUTHOR_EMAIL})


def move_branch(wt: Worktree, commit: str) -> None:
    """Point the worktree's branch at ``commit``, its files left as they are: what came after is set aside."""
    _git_wt(wt, "update-ref", f"refs/heads/{wt.branch}", commit)
    _git_wt(wt, "read-tree", commit)


def diff_commits(repo: Path, old: str, new: str) -> str:
    """``git diff`` between two commits of ``repo`` (no external diff or text conversion runs)."""
    return _git(Path(repo), "diff", "--no-ext-diff", "--no-textconv", old, new).stdout


def head(wt: Worktree) -> str:
    """The last commit of the worktree's branch."""
    return _git_wt(wt, "rev-parse", f"refs/heads/{wt.branch}").stdout.decode().strip()


def remove_worktree(repo: Path, path: Path, branch: str | None = None) -> None:
    """Remove a run's worktree folder; its branch (and every commit on it) stays in ``repo`` unless named
    as ``branch`` (a candidate's, whose tree the run took over or set aside)."""
    path = Path(path)
    if Path(repo).is_dir() and _git(Path(repo), "rev-parse", "--git-dir", check=False).returncode == 0:
        with _one_writer(Path(repo)):
            _git(Path(repo), "worktree", "remove", "--force", "--force", str(path), check=False)
            _git(Path(repo), "worktree", "prune")
            if branch:
                _git(Path(repo), "branch", "-D", "--quiet", branch, check=False)
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
