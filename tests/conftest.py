import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from model_server import ModelServer, tool_use


def pytest_xdist_auto_num_workers(config) -> int:
    """What `-n auto` (pyproject.toml) means: two workers a core, as most tests wait on containers and on
    loopwright processes; more only add contention for the cores (measured: 4 on 2 cores beat 6)."""
    return 2 * (os.cpu_count() or 1)


def pytest_configure(config):
    # tests/test_hooks_meta.py fails for a hook that no test marks as exercised.
    config.addinivalue_line("markers", "hook(*names): the test exercises these hooks of runtime/hookspecs.py")


@pytest.fixture(scope="session")
def sandbox_image() -> str:
    """The locally built sandbox image (about a minute the first time, then cached by tag)."""
    from loopwright.sandbox import build_image

    return build_image()


@pytest.fixture
def git_repo(tmp_path) -> Path:
    """A tiny git repository with one commit (README.md)."""
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    (repo / "README.md").write_text("hello\n")
    git("add", "README.md")
    git("-c", "user.name=Test", "-c", "user.email=test@example.invalid", "commit", "-q", "-m", "initial")
    return repo



# --- the store ---------------------------------------------------------------------------------
# A PostgreSQL server the tests may create databases on (.ci/setup starts one on 127.0.0.1).
POSTGRES = os.environ.get("LOOPWRIGHT_TEST_POSTGRES", "postgresql://loopwright:loopwright@127.0.0.1:5432/postgres")


@pytest.fixture(params=["sqlite", "postgres"])
def database(request, home, monkeypatch) -> str:
    """The store a durability test runs on, and its URL: the default SQLite file in LOOPWRIGHT_HOME, or
    a fresh PostgreSQL database (LOOPWRIGHT_DATABASE_URL, dropped after the test). Both run in CI."""
    if request.param == "sqlite":
        monkeypatch.delenv("LOOPWRIGHT_DATABASE_URL", raising=False)
        home.mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{home / 'loopwright.sqlite'}"
        return
    import psycopg

    name = f"loopwright_test_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(POSTGRES, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f"CREATE DATABASE {name}")
    except psycopg.OperationalError as error:
        if os.environ.get("CI"):
            raise AssertionError(f"no PostgreSQL server at {POSTGRES.split('@')[-1]} (.ci/setup starts one): {error}")
        pytest.skip(f"no PostgreSQL server at {POSTGRES.split('@')[-1]}; `bash .ci/setup` starts one")
    url = f"{POSTGRES.rsplit('/', 1)[0]}/{name}"
    monkeypatch.setenv("LOOPWRIGHT_DATABASE_URL", url)
    yield url
    end_worker(home)  # before its database goes: a worker that loses it retries for ever
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Playwright: Debian's `chromium` (.ci/setup installs it) or the one in
    LOOPWRIGHT_TEST_CHROMIUM; Playwright downloads no browser of its own. Per module: Playwright's sync API
    keeps an event loop running in this thread while it is open, which the async tests elsewhere need."""
    from playwright.sync_api import sync_playwright

    executable = os.environ.get("LOOPWRIGHT_TEST_CHROMIUM") or shutil.which("chromium")
    if executable is None:
        if os.environ.get("CI"):
            raise AssertionError("no chromium for the browser tests (.ci/setup installs Debian's)")
        pytest.skip("no chromium; `bash .ci/setup` installs Debian's")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True)
        yield chromium
        chromium.close()


def screenshot(page, name: str, tmp_path: Path, **options) -> Path:
    """Save a page's picture in the test's folder; with LOOPWRIGHT_SCREENSHOTS=docs/images, there instead
    (how docs/observability.md's pictures are refreshed): a test leaves the checkout as it found it."""
    folder = Path(os.environ.get("LOOPWRIGHT_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), **options)
    return folder / name


# --- running loops ---------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fix-failing-test"
LOOPWRIGHT = [sys.executable, "-m", "loopwright.cli"]
# The maker's edit that fixes the example's bug.
FIX = tool_use("edit_file", {"path": "calc.py", "old_text": "(len(numbers) + 1)", "new_text": "len(numbers)"})


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh LOOPWRIGHT_HOME, and no installed third-party plugins."""
    path = tmp_path / "home"
    monkeypatch.setenv("LOOPWRIGHT_HOME", str(path))
    monkeypatch.setenv("LOOPWRIGHT_LOAD_PLUGINS", "")
    yield path
    end_worker(path)


def end_worker(home: Path) -> None:
    """End the `loopwright worker` that a test's MCP server started in `home`, if it still runs (it would
    exit once idle): SIGTERM, which it answers by removing its sandboxes and exiting, then SIGKILL."""
    from loopwright.runtime.service import WORKER_FILE, owner_is_alive

    try:
        worker = json.loads((home / WORKER_FILE).read_text())
    except (OSError, ValueError):
        return
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if not owner_is_alive(worker["owner"]):  # by pid and start time: never another process
            return
        with contextlib.suppress(ProcessLookupError):  # it exited just now
            os.kill(worker["pid"], signum)
        deadline = time.monotonic() + 20
        while owner_is_alive(worker["owner"]) and time.monotonic() < deadline:
            time.sleep(0.1)


@pytest.fixture
def project(tmp_path, sandbox_image) -> Path:
    """The fix-failing-test example as a git repository of its own; its spec is loop.toml."""
    repo = tmp_path / "project"
    shutil.copytree(EXAMPLE, repo, ignore=shutil.ignore_patterns("run.sh", "__pycache__"))
    for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                 ["-c", "user.name=T", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "start"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
    return repo


@pytest.fixture
def agent_project(project, monkeypatch) -> Path:
    """The example project with the scripted CLI agent committed, and no model API key anywhere."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    shutil.copy(Path(__file__).parent / "fixtures" / "fake_agent.py", project / "fake_agent.py")
    for args in (["add", "-A"], ["-c", "user.name=T", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "agent"]):
        subprocess.run(["git", "-C", str(project), *args], check=True, capture_output=True)
    return project


def git_repository(path: Path, files: dict[str, str]) -> Path:
    """A new git repository at `path` holding `files` (name -> text) in one commit on main."""
    path.mkdir()
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(content)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                 ["-c", "user.name=T", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "start"]):
        subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True)
    return path


def write_spec(repo: Path, **sections) -> Path:
    """The example's spec with some sections overridden, e.g. stop={"max_iterations": 1}."""
    spec = tomllib.loads((repo / "loop.toml").read_text())
    for key, value in sections.items():
        if isinstance(value, dict):
            spec.setdefault(key, {}).update(value)
        else:
            spec[key] = value
    path = repo.parent / "spec.toml"
    spec["workspace"] = {"repo": str(repo)}
    path.write_text(_toml(spec))
    return path


def _toml(data: dict, prefix: str = "") -> str:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and not _is_table_list(v)}
    out = [f"{k} = {_value(v)}" for k, v in scalars.items()]
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += ["", f"[{name}]", _toml(value, f"{name}.")]
        elif _is_table_list(value):
            for item in value:
                out += ["", f"[[{name}]]", _toml(item, f"{name}.")]
    return "\n".join(out)


def _is_table_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


@pytest.fixture
def model(monkeypatch):
    """Start a scripted model server: `server = model([...replies])`; the SDK's env points at it."""
    servers = []

    def start(script, **options) -> ModelServer:
        server = ModelServer(script, **options).start()
        servers.append(server)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        return server

    yield start
    for server in servers:
        server.stop()


def loopwright(*args: str, timeout: float = 240, cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    """Run the real `loopwright` command in a new process."""
    return subprocess.run(
        [*LOOPWRIGHT, *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, **kwargs,
    )


def trace(run_id: str) -> list[dict]:
    result = loopwright("trace", run_id, "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def run_id_of(result: subprocess.CompletedProcess) -> str:
    """The id in `loopwright run`'s "run <id> of loop ..." line."""
    started = [line for line in result.stdout.splitlines() if line.startswith("run ")]
    assert started, result.stdout + result.stderr
    return started[0].split()[1]


def wait_for(condition, what: str = "the condition holds", timeout: float = 60, poll: float = 0.1):
    """Poll until `condition()` is truthy (and return it); the suite's one bounded wait, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(poll)
    return value
