"""Loopwright installs as one import package, and its parts import only what the contract allows."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ["__init__.py", "cli.py", "runtime", "plugins", "sandbox", "mcp_server", "pyproject.toml"]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_a_wheel_installs_one_package_that_works_beside_folders_named_like_its_parts(tmp_path):
    source = tmp_path / "source"  # a clean copy: no egg-info or bytecode of the working tree
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "__pycache__", "build"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("loopwright-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    version = wheel.name.split("-")[1]
    assert tops == {"loopwright", f"loopwright-{version}.dist-info"}

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    project = tmp_path / "project"  # a user's project with folders of the same names as Loopwright's parts
    for name in ("runtime", "plugins", "sandbox", "mcp_server"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(f"raise ImportError('the project folder {name} was imported')\n")
    shutil.copytree(ROOT / "examples" / "fix-failing-test", project / "example")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "LOOPWRIGHT_HOME": str(tmp_path / "home")}
    shown = subprocess.run([sys.executable, "-m", "loopwright.cli", "plugins"], cwd=project, env=env,
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "docker_sandbox" in shown.stdout and "built-in" in shown.stdout
    checked = subprocess.run([sys.executable, "-m", "loopwright.cli", "validate", "example/loop.toml"], cwd=project,
                             env=env, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    where = subprocess.run([sys.executable, "-c", "import loopwright.runtime as r; print(r.__file__)"], cwd=project,
                           env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(target)), where


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "loopwright" / "pyproject.toml")],
                          cwd=root, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
                          capture_output=True, text=True)


def copy_of_the_package(tmp_path: Path) -> Path:
    package = tmp_path / "loopwright"
    package.mkdir()
    for name in PACKAGE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, package / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, package / name)
    return tmp_path


def test_the_import_contract_holds(tmp_path):
    result = lint_imports(copy_of_the_package(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_import_contract_fails_when_the_core_imports_the_sandbox(tmp_path):
    root = copy_of_the_package(tmp_path)
    engine = root / "loopwright" / "runtime" / "engine.py"
    engine.write_text(engine.read_text().replace("import anyio\n", "import anyio\n\nfrom loopwright.sandbox import docker\n", 1))
    result = lint_imports(root)
    assert result.returncode != 0
    assert "the core knows no transport, no sandbox and no concrete plugin BROKEN" in result.stdout
    assert "loopwright.runtime.engine -> loopwright.sandbox.docker" in result.stdout
