"""Fixtures shared by the sandbox tests: sandboxes on worktrees of a tiny repo, and an image without python3."""

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest

from loopwright.sandbox import DockerSandbox, list_sandboxes
from loopwright.runtime.worktree import create_worktree
from loopwright.sandbox.image import image_exists

SHELL_ONLY_TOOLS = ["sh", "sleep", "cat", "id", "ls", "echo"]


def container_ids() -> set[str]:
    return {s["id"] for s in list_sandboxes()}


def containers_of(run_id: str) -> list[str]:
    """Names of the sandbox containers of one run (other sessions may share this Docker engine)."""
    return [s["name"] for s in list_sandboxes() if s["run_id"] == run_id]


def git(repo, *args: str) -> str:
    return subprocess.run(["git", "-c", "safe.directory=*", "-C", str(repo), *args], check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture
def make_sandbox(sandbox_image, git_repo, tmp_path):
    """Start sandboxes on worktrees of git_repo; every one is removed at teardown."""
    started = []

    def make(run_id="run1", image=None, **options):
        wt = create_worktree(git_repo, tmp_path / "worktrees", "demo", run_id)
        sb = DockerSandbox.start(run_id=run_id, worktree=wt.path, image=image or sandbox_image, **options)
        started.append(sb)
        return sb, wt

    yield make
    for sb in started:
        sb.close()


@pytest.fixture(scope="session")
def shell_only_image() -> str:
    """An image with a POSIX shell and a few tools from this machine, and no python3 (made once, by content)."""
    files = {}
    for tool in SHELL_ONLY_TOOLS:
        path = shutil.which(tool)
        files[f"bin/{tool}"] = os.path.realpath(path)
        libraries = subprocess.run(["ldd", path], capture_output=True, text=True).stdout.split()
        files.update({lib.lstrip("/"): os.path.realpath(lib) for lib in libraries if lib.startswith("/")})
    digest = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:12]
    tag = f"loopwright-test-shell-only:{digest}"
    if image_exists(tag):
        return tag
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for folder in ("workspace", "tmp", "proc", "dev", "etc"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, source in sorted(files.items()):
            with open(source, "rb") as f:
                tar.addfile(tar.gettarinfo(source, arcname=name), f)
    subprocess.run(["docker", "import", "-c", "ENV PATH=/bin", "-", tag], input=archive.getvalue(), check=True,
                   capture_output=True)
    return tag


ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def owner_process(sandbox_image: str, worktree: Path, home: Path | None = None):
    """Another process (of Loopwright home ``home``, if given) that starts a sandbox, then waits; yields it,
    the container's name and id, and removes the container at the end."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from loopwright.sandbox import DockerSandbox
        sb = DockerSandbox.start(run_id="orphan", worktree={str(worktree)!r}, image={sandbox_image!r})
        print(sb.name, sb.container_id, flush=True)
        time.sleep(300)
    """)
    env = {**os.environ, "LOOPWRIGHT_HOME": str(home)} if home else None
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    container_id = None
    try:
        name, container_id = child.stdout.readline().split()
        yield child, name, container_id
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        if container_id:
            subprocess.run(["docker", "rm", "-f", container_id], capture_output=True)
