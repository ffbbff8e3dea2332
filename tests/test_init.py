"""`loopwright init`: a first loop for the repository at hand, that validates and runs."""

import json
import subprocess

import pytest

from conftest import EXAMPLE, FIX, git_repository, loopwright, run_id_of
from model_server import text, tool_use


def the_example_without_its_loop(tmp_path):
    """The example's code and tests as a fresh pytest repository, with no loop spec yet."""
    files = {str(p.relative_to(EXAMPLE)): p.read_text() for p in [EXAMPLE / "calc.py", *(EXAMPLE / "tests").glob("*.py")]}
    return git_repository(tmp_path / "calc", files)


def test_init_in_a_fresh_pytest_repository_writes_a_loop_that_validates_and_runs(home, tmp_path, model, sandbox_image):
    repo = the_example_without_its_loop(tmp_path)

    made = loopwright("init", cwd=repo)
    assert made.returncode == 0, made.stderr
    assert "wrote loops/calc-tests.toml: the check is `python3 -m pytest -q -p no:cacheprovider`" in made.stdout
    assert "loopwright run loops/calc-tests.toml" in made.stdout
    assert loopwright("validate", "loops/calc-tests.toml", cwd=repo).returncode == 0

    model([FIX, text("Fixed.")])
    ran = loopwright("run", "loops/calc-tests.toml", cwd=repo)  # no repo = "..": loops/ is inside the repository
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "succeeded: all checks passed in iteration 1" in ran.stdout
    branch = f"loopwright/calc-tests/{run_id_of(ran)}"
    fixed = subprocess.run(["git", "-C", str(repo), "show", f"{branch}:calc.py"], capture_output=True, text=True)
    assert "len(numbers)" in fixed.stdout and "+ 1" not in fixed.stdout


def test_the_loop_init_writes_protects_the_tests(home, tmp_path, model, sandbox_image):
    repo = the_example_without_its_loop(tmp_path)
    loopwright("init", "--name", "guarded", cwd=repo)
    model([tool_use("write_file", {"path": "tests/test_calc.py", "content": "def test_nothing():\n    pass\n"}),
           text("Done.")])
    spec = (repo / "loops" / "guarded.toml").read_text().replace("max_iterations = 8", "max_iterations = 1")
    (repo / "loops" / "guarded.toml").write_text(spec)
    ran = loopwright("run", "loops/guarded.toml", cwd=repo)
    assert ran.returncode == 1
    assert "FAIL protected files" in ran.stdout


@pytest.mark.parametrize("files, command", [
    ({"package.json": json.dumps({"scripts": {"test": "node --test"}}), "index.js": ""}, "npm test"),
    ({"Cargo.toml": "[package]\nname = 'x'\n", "src/lib.rs": ""}, "cargo test"),
    ({"go.mod": "module x\n", "x_test.go": "package x\n"}, "go test ./..."),
    ({"calc.py": "", "tests/test_calc.py": "import unittest\n"}, "python3 -m unittest discover -q"),
    ({"calc.py": "", "test_calc.py": "import pytest\n"}, "python3 -m pytest -q -p no:cacheprovider"),
], ids=["npm", "cargo", "go", "unittest", "pytest"])
def test_init_finds_the_test_command(home, tmp_path, files, command):
    repo = git_repository(tmp_path / "repo", files)
    made = loopwright("init", cwd=repo)
    assert made.returncode == 0, made.stderr
    assert f'run = "{command}"' in (repo / "loops" / "repo-tests.toml").read_text()
    assert loopwright("validate", "loops/repo-tests.toml", cwd=repo).returncode == 0


def test_init_says_what_to_do_when_it_finds_no_tests_or_the_loop_exists(home, tmp_path):
    repo = git_repository(tmp_path / "repo", {"README.md": "hello\n"})
    none = loopwright("init", cwd=repo)
    assert none.returncode == 2 and "loopwright init --test 'COMMAND'" in none.stderr
    assert loopwright("init", "--test", "make check", cwd=repo).returncode == 0
    again = loopwright("init", "--test", "make check", cwd=repo)
    assert again.returncode == 2 and "exists already; choose another name with --name" in again.stderr
    outside = loopwright("init", cwd=tmp_path)
    assert outside.returncode == 2 and "is not a git repository" in outside.stderr
