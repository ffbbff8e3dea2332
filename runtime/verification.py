"""The tree a verdict is given on: a clean copy of the maker's files with the oracle as it was.

The maker is an adversary. A check never runs where the maker worked: each verification gets a
fresh copy of every file in the worktree (whatever the ignore files say), without bytecode or
caches, in which every oracle file (the spec's ``protect`` patterns, and by default the test
runner's configuration and whatever changes how tests are found or imported) is restored from
the base commit. docs/verification.md is the threat model.
"""

from __future__ import annotations

import configparser
import difflib
import fnmatch
import hashlib
import os
import stat
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

# Left out of the copy: bytecode and caches run instead of the source or replay old results.
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"}
SKIPPED_SUFFIXES = (".pyc", ".pyo")
SKIPPED_TOP = {".git", ".loopwright"}  # git's pointer; Loopwright's own files (the command maker's prompt)

# Protected by default (`protect_runner = true`): how pytest and unittest are configured and imported.
RUNNER_FILES = {"conftest.py", "pytest.ini", "sitecustomize.py", "usercustomize.py"}
RUNNER_SECTIONS = {"pyproject.toml": ("tool", "pytest"), "setup.cfg": "tool:pytest", "tox.ini": "pytest"}
RUNNER_MODULES = (set(sys.stdlib_module_names) - {"test"}) | {"pytest", "_pytest", "pluggy", "py", "iniconfig"}

Tree = dict[str, tuple[str, str]]  # path -> (git mode, blob sha)


def blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _entry(path: Path) -> tuple[str, bytes] | None:
    """(git mode, content) of a file or symlink; None for what is neither (fifos, sockets)."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return "120000", os.fsencode(os.readlink(path))
    if stat.S_ISREG(info.st_mode):
        return ("100755" if info.st_mode & 0o111 else "100644"), path.read_bytes()
    return None


def _walk(root: Path, skipped: list[str] | None = None):
    """Relative posix paths of the files under ``root`` that a verdict is given on; never follows a link.
    Bytecode and cache files left out are added to ``skipped``."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        top = here == root
        kept = [d for d in dirnames if not (top and d in SKIPPED_TOP) and not (here / d).is_symlink()]
        dirnames[:] = [d for d in kept if d not in SKIPPED_DIRS]
        links = [d for d in os.listdir(here) if (here / d).is_symlink() and (here / d).is_dir()]
        if skipped is not None:
            skipped.extend((here / d).relative_to(root).as_posix() + "/" for d in kept if d in SKIPPED_DIRS)
        for name in [*filenames, *links]:
            if top and name in SKIPPED_TOP:
                continue
            if name.endswith(SKIPPED_SUFFIXES):
                if skipped is not None:
                    skipped.append((here / name).relative_to(root).as_posix())
                continue
            yield (here / name).relative_to(root).as_posix()


def _write(dest: Path, path: str, mode: str, data: bytes) -> None:
    target = dest / path
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    if mode == "120000":
        os.symlink(os.fsdecode(data), target)
    else:
        target.write_bytes(data)
        os.chmod(target, 0o755 if mode == "100755" else 0o644)


def copy_tree(src: Path, dest: Path, skipped: list[str] | None = None) -> Tree:
    """Copy the maker's files (links as links) into ``dest``; return what was copied."""
    tree: Tree = {}
    for path in _walk(src, skipped):
        entry = _entry(src / path)
        if entry is not None:
            _write(dest, path, *entry)
            tree[path] = (entry[0], blob_sha(entry[1]))
    return tree


def scan(root: Path, want: Callable[[str], bool] = lambda path: True) -> Tree:
    """What ``copy_tree`` would return for ``root``, hashing only the paths ``want`` accepts."""
    tree: Tree = {}
    for path in _walk(root):
        if want(path) and (entry := _entry(root / path)) is not None:
            tree[path] = (entry[0], blob_sha(entry[1]))
    return tree


def _runner_section(name: str, data: bytes):
    """The test runner's part of a shared configuration file; a file that does not parse is its own section."""
    try:
        if name == "pyproject.toml":
            value = tomllib.loads(data.decode())
            for key in RUNNER_SECTIONS[name]:
                value = value.get(key, {}) if isinstance(value, dict) else {}
            return value
        parser = configparser.RawConfigParser()
        parser.read_string(data.decode())
        section = RUNNER_SECTIONS[name]
        return dict(parser.items(section)) if parser.has_section(section) else {}
    except (ValueError, configparser.Error):
        return data


@dataclass
class Oracle:
    """Which files decide a verdict, and what they held at the base commit."""

    patterns: list[str]
    runner: bool  # protect the test runner's configuration and import path too
    base: Tree
    test_dirs: set[str] = field(default_factory=set)

    @classmethod
    def at_base(cls, patterns: list[str], runner: bool, base: Tree) -> Oracle:
        dirs = {str(PurePosixPath(p).parent) for p in base
                if fnmatch.fnmatch(PurePosixPath(p).name, "test_*.py") or fnmatch.fnmatch(PurePosixPath(p).name, "*_test.py")}
        return cls(patterns, runner, base, dirs | {"."})

    def covers(self, path: str) -> bool:
        """A whole-file oracle path: restored from the base whenever the maker's copy differs."""
        if any(fnmatch.fnmatch(path, pattern) for pattern in self.patterns):
            return True
        if not self.runner:
            return False
        pure = PurePosixPath(path)
        if pure.name in RUNNER_FILES or pure.suffix == ".pth":
            return True
        return self._shadows(pure)

    def _shadows(self, pure: PurePosixPath) -> bool:
        """A new module or package, where tests import from, named like the runner or the standard library."""
        parts = pure.parts
        for depth in range(len(parts)):
            folder = "/".join(parts[:depth]) or "."
            if folder not in self.test_dirs:
                continue
            module = parts[depth].split(".", 1)[0]
            if module in RUNNER_MODULES and (depth < len(parts) - 1 or parts[depth].endswith((".py", ".so"))):
                prefix = "/".join(parts[:depth + 1])
                if not any(p == prefix or p.startswith(prefix + "/") for p in self.base):
                    return True
        return False

    def pins(self) -> dict[str, str]:
        """The oracle's files at the base commit, ``path -> sha``, pinned when the run starts."""
        return {path: sha for path, (_, sha) in self.base.items()
                if self.covers(path) or PurePosixPath(path).name in RUNNER_SECTIONS}

    def tampered(self, tree: Tree, read: Callable[[str], bytes], read_base: Callable[[str], bytes]) -> list[str]:
        """Oracle paths whose content in ``tree`` differs from the base (added, changed or deleted)."""
        found = set()
        for path in set(tree) | set(self.base):
            if tree.get(path) == self.base.get(path):
                continue
            name = PurePosixPath(path).name
            if self.covers(path):
                found.add(path)
            elif self.runner and name in RUNNER_SECTIONS:
                before = _runner_section(name, read_base(path)) if path in self.base else {}
                after = _runner_section(name, read(path)) if path in tree else {}
                if before != after:
                    found.add(path)
        return sorted(found)

    def wants(self, path: str) -> bool:
        return self.covers(path) or (self.runner and PurePosixPath(path).name in RUNNER_SECTIONS)


def restore(dest: Path, paths: list[str], base: Tree, blobs: dict[str, bytes]) -> None:
    """Put the base commit's version of ``paths`` into ``dest`` (removing what the base did not have)."""
    for path in paths:
        if path in base:
            mode, sha = base[path]
            _write(dest, path, mode, blobs[sha])
        else:
            target = dest / path
            if target.is_symlink() or target.is_file():
                target.unlink()


def materialize(dest: Path, base: Tree, blobs: dict[str, bytes]) -> None:
    """Write a commit's files into ``dest``."""
    for path, (mode, sha) in base.items():
        _write(dest, path, mode, blobs[sha])


def changed(tree: Tree, base: Tree) -> list[str]:
    return sorted(path for path in set(tree) | set(base) if tree.get(path) != base.get(path))


def unified_diff(paths: list[str], base: Tree, blobs: dict[str, bytes], root: Path, limit: int = 400_000) -> str:
    """A git-style diff of ``paths`` between the base commit and the tree at ``root``."""
    out: list[str] = []
    size = 0
    for path in paths:
        old = blobs.get(base[path][1], b"") if path in base else None
        new_entry = _entry(root / path) if (root / path).is_symlink() or (root / path).exists() else None
        new = new_entry[1] if new_entry else None
        header = [f"diff --git a/{path} b/{path}\n"]
        try:
            a = old.decode().splitlines(keepends=True) if old is not None else []
            b = new.decode().splitlines(keepends=True) if new is not None else []
        except UnicodeDecodeError:
            chunk = header + [f"Binary files a/{path} and b/{path} differ\n"]
        else:
            chunk = header + list(difflib.unified_diff(
                a, b, "/dev/null" if old is None else f"a/{path}", "/dev/null" if new is None else f"b/{path}"))
        size += sum(map(len, chunk))
        if size > limit:
            out.append(f"... (diff cut at {limit} characters; {len(paths)} files changed in all)\n")
            break
        out.extend(chunk)
    return "".join(out)


def read(root: Path, path: str) -> bytes:
    """A file's content as git would store it (a link's target, never what it points to)."""
    entry = _entry(root / path)
    return entry[1] if entry else b""
