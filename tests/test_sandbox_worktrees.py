"""Worktrees: one per run under LOOPWRIGHT_HOME/worktrees, the user's checkout untouched, pruned by policy."""

import subprocess
import time

import pytest

from loopwright.runtime.verification import changed, scan
from loopwright.runtime.worktree import WorktreeError, create_worktree, prune_worktrees, tree_of
from sandbox_fixtures import git


def changed_files(wt):
    return changed(scan(wt.path), tree_of(wt, wt.base_commit))


def test_worktree_leaves_dirty_checkout_untouched_and_runs_do_not_collide(git_repo, tmp_path):
    (git_repo / "README.md").write_text("user edit, not committed\n")
    (git_repo / "notes.txt").write_text("untracked\n")
    status_before = git(git_repo, "status", "--porcelain")

    root = tmp_path / "worktrees"
    a = create_worktree(git_repo, root, "demo", "a")
    b = create_worktree(git_repo, root, "demo", "b")
    assert a.path != b.path and a.branch != b.branch
    assert a.base_commit == b.base_commit == git(git_repo, "rev-parse", "HEAD").strip()
    assert (a.path / "README.md").read_text() == "hello\n"  # from HEAD, not the dirty file
    assert not (a.path / "notes.txt").exists()

    (a.path / "only-in-a.txt").write_text("a\n")
    assert not (b.path / "only-in-a.txt").exists()
    assert changed_files(a) == ["only-in-a.txt"] and changed_files(b) == []

    assert create_worktree(git_repo, root, "demo", "a") == a  # resumed run gets the same worktree
    assert git(git_repo, "status", "--porcelain") == status_before
    assert (git_repo / "README.md").read_text() == "user edit, not committed\n"


def test_worktree_errors_name_the_problem(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(Exception, match="not a git repository"):
        create_worktree(plain, tmp_path / "wts", "demo", "r")
    subprocess.run(["git", "init", "-q", str(plain)], check=True)
    with pytest.raises(Exception, match="no commits"):
        create_worktree(plain, tmp_path / "wts", "demo", "r")


def test_a_worktree_can_be_made_in_an_empty_folder_but_not_over_other_files(git_repo, tmp_path):
    root = tmp_path / "worktrees"
    (root / "pooled").mkdir(parents=True)  # what a warm sandbox mounts before its run starts
    assert (create_worktree(git_repo, root, "demo", "pooled").path / "README.md").read_text() == "hello\n"
    (root / "occupied").mkdir()
    (root / "occupied" / "mine.txt").write_text("someone's\n")
    with pytest.raises(WorktreeError, match="already exists but is not the worktree"):
        create_worktree(git_repo, root, "demo", "occupied")
    assert (root / "occupied" / "mine.txt").read_text() == "someone's\n"


def finished_runs(git_repo, root, ages_in_days: dict[str, float]) -> list[tuple]:
    """Worktrees for runs that finished that many days ago, each with a commit on its branch."""
    now = time.time()
    runs = []
    for run_id, age in ages_in_days.items():
        wt = create_worktree(git_repo, root, "demo", run_id)
        (wt.path / f"{run_id}.txt").write_text(run_id)
        git(wt.path, "add", "-A")
        git(wt.path, "-c", "user.name=T", "-c", "user.email=t@example.invalid", "commit", "-qm", run_id)
        runs.append((git_repo, wt.path, now - age * 86400))
    return runs


def test_prune_removes_worktrees_of_old_finished_runs_and_keeps_their_branches(git_repo, tmp_path):
    root = tmp_path / "worktrees"
    runs = finished_runs(git_repo, root, {"old": 30, "recent": 1})
    removed = prune_worktrees(root, runs, keep_days=7, keep_last=0)
    assert removed == [(root / "old").resolve()]
    assert not (root / "old").exists() and (root / "recent").exists()
    assert git(git_repo, "show", "loopwright/demo/old:old.txt") == "old"  # the branch and its commit stay
    assert "old" not in git(git_repo, "worktree", "list")


def test_prune_keeps_the_newest_finished_runs_whatever_their_age(git_repo, tmp_path):
    root = tmp_path / "worktrees"
    runs = finished_runs(git_repo, root, {"a": 40, "b": 30, "c": 20})
    assert prune_worktrees(root, runs, keep_days=7, keep_last=2) == [(root / "a").resolve()]


def test_prune_dry_run_removes_nothing(git_repo, tmp_path):
    root = tmp_path / "worktrees"
    runs = finished_runs(git_repo, root, {"old": 30})
    assert prune_worktrees(root, runs, keep_days=7, keep_last=0, dry_run=True) == [(root / "old").resolve()]
    assert (root / "old" / "old.txt").exists()


def test_prune_never_touches_a_folder_outside_the_worktrees_folder(git_repo, tmp_path):
    elsewhere = finished_runs(git_repo, tmp_path / "elsewhere", {"old": 30})
    assert prune_worktrees(tmp_path / "worktrees", elsewhere, keep_days=0, keep_last=0) == []
    assert (tmp_path / "elsewhere" / "old" / "old.txt").exists()
