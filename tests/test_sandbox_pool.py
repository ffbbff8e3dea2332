"""The warm pool: sandboxes started before their run, handed over with the run's worktree in place."""

import os
import subprocess

import pytest

from conftest import wait_for
from loopwright.sandbox import PoolKey, SandboxPool, list_sandboxes
from loopwright.runtime.worktree import create_worktree


def pool_sandboxes() -> list[dict]:
    """This process's pooled sandboxes that no run has taken yet."""
    return [s for s in list_sandboxes() if s["owner_pid"] == os.getpid() and (s["run_id"] or "").startswith("pool-")]


@pytest.fixture
def pool():
    made = SandboxPool(size=1)
    yield made
    made.close()


@pytest.fixture
def key(sandbox_image, tmp_path) -> PoolKey:
    return PoolKey(worktrees=(tmp_path / "worktrees").resolve(), image=sandbox_image)


def filled(pool: SandboxPool, key: PoolKey) -> None:
    key.worktrees.mkdir(parents=True, exist_ok=True)
    assert not pool.reserve(key, "first", key.worktrees / "first")  # nothing ready yet: this starts one
    wait_for(lambda: pool.ready(key) == 1, "the pool has a sandbox ready")


def test_a_warm_sandbox_serves_the_run_whose_worktree_is_made_in_its_folder(pool, key, git_repo):
    filled(pool, key)
    assert pool.reserve(key, "warm", key.worktrees / "warm")
    wt = create_worktree(git_repo, key.worktrees, "demo", "warm")
    sb = pool.claim("warm", wt.path)
    try:
        assert sb.run("cat README.md; id -u", timeout=20).stdout == "hello\n1000\n"
        assert sb.run("echo new > made-inside.txt", timeout=20).exit_code == 0
        assert (wt.path / "made-inside.txt").read_text() == "new\n"
        wait_for(lambda: any(s["run_id"] == "warm" and s["id"] == sb.container_id for s in list_sandboxes()),
                   "the container is named after its run")
    finally:
        sb.close()


def test_the_pool_refills_after_a_run_takes_a_sandbox(pool, key):
    filled(pool, key)
    assert pool.reserve(key, "taken", key.worktrees / "taken")
    wait_for(lambda: pool.ready(key) == 1, "a new sandbox is ready")
    pool.claim("taken", key.worktrees / "taken").close()


def test_a_run_with_another_configuration_gets_no_warm_sandbox(pool, key):
    filled(pool, key)
    other = PoolKey(worktrees=key.worktrees, image=key.image, memory="2g")
    assert not pool.reserve(other, "bigger", key.worktrees / "bigger")
    assert not (key.worktrees / "bigger").exists()
    assert pool.claim("bigger", key.worktrees / "bigger") is None


def test_closing_the_pool_removes_its_idle_sandboxes_and_their_folders(key):
    pool = SandboxPool(size=2)
    key.worktrees.mkdir(parents=True)
    pool.reserve(key, "first", key.worktrees / "first")
    wait_for(lambda: pool.ready(key) == 2, "two sandboxes are ready")
    assert len(pool_sandboxes()) == 2
    pool.close()
    assert pool_sandboxes() == []
    assert list((key.worktrees / ".pool").iterdir()) == []


def test_a_warm_sandbox_whose_container_dies_serves_the_run_from_a_fresh_one(pool, key, git_repo):
    filled(pool, key)
    assert pool.reserve(key, "revived", key.worktrees / "revived")
    wt = create_worktree(git_repo, key.worktrees, "demo", "revived")
    sb = pool.claim("revived", wt.path)
    try:
        subprocess.run(["docker", "kill", sb.container_id], check=True, capture_output=True)
        wait_for(lambda: sb.retired, "the sandbox notices its agent is gone")
        assert sb.run("cat README.md", timeout=20).stdout == "hello\n"  # the run's worktree, in a new container
    finally:
        sb.close()



def check_spec(image: str):
    from loopwright.runtime.spec import parse_spec
    return parse_spec({"name": "demo", "goal": "g", "sandbox": {"image": image},
                       "verify": [{"kind": "command", "run": "true"}]})


def warm_slot(provider, spec, folders, verification: bool) -> None:
    """Fill the provider's pool for this kind of sandbox, then wait until a slot is ready."""
    from loopwright.plugins.docker_sandbox import _pool_key
    folders.mkdir(parents=True)
    provider.reserve(run_id="fill", worktree=folders / "fill", spec=spec, verification=verification)
    wait_for(lambda: provider._pool.ready(_pool_key(spec, folders, verification)) == 1, "a slot is ready")


def test_a_check_gets_a_warm_sandbox_of_its_own_kind_that_ran_nothing(sandbox_image, tmp_path, monkeypatch):
    from loopwright.plugins.docker_sandbox import DockerSandboxes
    monkeypatch.setenv("LOOPWRIGHT_SANDBOX_POOL_SIZE", "1")
    provider, spec = DockerSandboxes(), check_spec(sandbox_image)
    try:
        warm_slot(provider, spec, tmp_path / "checks", verification=True)
        folder = tmp_path / "checks" / "r-1"
        provider.reserve(run_id="r-check-1", worktree=folder, spec=spec, verification=True)
        assert folder.is_dir() and list(folder.iterdir()) == []  # the warm slot's folder, to be filled
        (folder / "copied.py").write_text("print('copied')\n")  # the clean copy, made by root after the start
        box = provider.start(run_id="r-check-1", worktree=folder, spec=spec, verification=True)
        try:
            seen = box.run("python3 copied.py; stat -c %u copied.py; ls -A /tmp; "
                           "echo $PYTHONNOUSERSITE$PYTHONDONTWRITEBYTECODE", timeout=20).stdout
            assert seen == "copied\n1000\n11\n"  # the copy, owned by the sandbox user, an empty /tmp, the check's Python
        finally:
            box.close()

        # a maker's warm sandbox never serves a check, even under the same run id
        warm_slot(provider, spec, tmp_path / "worktrees", verification=False)
        worktree = tmp_path / "worktrees" / "m"
        provider.reserve(run_id="m", worktree=worktree, spec=spec)
        assert worktree.is_dir()  # the maker's slot was reserved here
        box = provider.start(run_id="m", worktree=worktree, spec=spec, verification=True)
        try:
            assert box.environment == {"PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
            assert box.run("echo $PYTHONDONTWRITEBYTECODE", timeout=20).stdout == "1\n"
        finally:
            box.close()
    finally:
        provider._pool.close()
