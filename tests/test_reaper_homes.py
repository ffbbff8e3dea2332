"""Two Loopwright homes on one Docker engine: each one's reaper removes only its own dead processes' sandboxes."""

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from conftest import loopwright, write_spec
from model_server import text
from loopwright.sandbox import list_sandboxes, reap_orphans
from sandbox_fixtures import owner_process


@contextlib.contextmanager
def orphan_of(home: Path, sandbox_image: str, worktree: Path):
    """A sandbox left by a crashed process of ``home`` (SIGKILLed: no atexit, no cleanup); yields its name."""
    worktree.mkdir(parents=True)
    with owner_process(sandbox_image, worktree, home) as (child, name, _):
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        yield name


def sandbox_named(name: str) -> dict | None:
    return next((box for box in list_sandboxes() if box["name"] == name), None)


def sandboxes_of(home: Path) -> list[dict]:
    return [box for box in list_sandboxes() if box["home"] == str(home.resolve())]


def test_each_homes_reaper_removes_only_its_own_homes_orphans(sandbox_image, tmp_path, monkeypatch):
    home_a, home_b = tmp_path / "home-a", tmp_path / "home-b"
    with orphan_of(home_a, sandbox_image, tmp_path / "wt-a") as orphan_a, \
            orphan_of(home_b, sandbox_image, tmp_path / "wt-b") as orphan_b:
        box = sandbox_named(orphan_b)
        assert box["home"] == str(home_b.resolve()) and box["alive"] is False

        monkeypatch.setenv("LOOPWRIGHT_HOME", str(home_a))
        removed = reap_orphans()
        assert orphan_a in removed and orphan_b not in removed
        assert sandbox_named(orphan_a) is None
        assert sandbox_named(orphan_b) is not None  # another home's: left alone

        monkeypatch.setenv("LOOPWRIGHT_HOME", str(home_b))
        assert reap_orphans() == [orphan_b]
        assert sandbox_named(orphan_b) is None


def test_loopwright_run_in_one_home_leaves_another_homes_orphan(sandbox_image, tmp_path, monkeypatch, project, model):
    """The reported bug: a run's start-up reaped the sandboxes of every home on the engine."""
    home_a, home_b = tmp_path / "home-a", tmp_path / "home-b"
    monkeypatch.setenv("LOOPWRIGHT_LOAD_PLUGINS", "")
    model([text("nothing to do")])
    with orphan_of(home_b, sandbox_image, tmp_path / "wt-b") as orphan_b:
        try:
            result = loopwright("run", str(write_spec(project, stop={"max_iterations": 1})),
                                env={**os.environ, "LOOPWRIGHT_HOME": str(home_a)})
            assert result.stdout.startswith("run "), result.stdout + result.stderr
            assert sandbox_named(orphan_b) is not None
            assert sandboxes_of(home_a) == []  # the run's own sandboxes went with it
        finally:
            for box in sandboxes_of(home_a):
                subprocess.run(["docker", "rm", "-f", box["id"]], capture_output=True)


def test_sandbox_gc_in_one_home_shows_but_leaves_another_homes_orphan(sandbox_image, tmp_path, monkeypatch):
    home_a, home_b = tmp_path / "home-a", tmp_path / "home-b"
    monkeypatch.setenv("LOOPWRIGHT_LOAD_PLUGINS", "")
    with orphan_of(home_b, sandbox_image, tmp_path / "wt-b") as orphan_b:
        monkeypatch.setenv("LOOPWRIGHT_HOME", str(home_a))
        result = loopwright("sandbox", "gc")
        assert result.returncode == 0, result.stderr
        line = next(line for line in result.stdout.splitlines() if line.startswith(orphan_b))
        assert line.endswith(f"alive False  home {home_b.resolve()} (another home): left alone")
        assert orphan_b not in result.stdout.splitlines()[-1]  # "removed N leftover sandbox(es): ..."
        assert sandbox_named(orphan_b) is not None

        monkeypatch.setenv("LOOPWRIGHT_HOME", str(home_b))
        result = loopwright("sandbox", "gc")
        assert result.returncode == 0, result.stderr
        line = next(line for line in result.stdout.splitlines() if line.startswith(orphan_b))
        assert line.endswith(f"alive False  home {home_b.resolve()}")  # its own home's
        assert result.stdout.splitlines()[-1] == f"removed 1 leftover sandbox(es): {orphan_b}"
        assert sandbox_named(orphan_b) is None
