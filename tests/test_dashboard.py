"""The daemon's dashboard in a real browser (headless Chromium, Playwright): a person signs in with the
token, watches runs change without reloading, reads a run's page, approves a gated call and stops a run;
without the token nothing works, and a cross-site POST is refused (runtime/dashboard.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx2
import pytest

from conftest import FIX, LOOPWRIGHT, ROOT, screenshot, wait_for, write_spec
from daemon_process import DaemonProcess
from model_server import ModelServer, text, tool_use

from loopwright.runtime.store import Store

@pytest.fixture
def daemon(home, tmp_path):
    loops = tmp_path / "no-loops"
    loops.mkdir()
    served = DaemonProcess(home, loops)
    yield served
    assert served.stop() == 0, served.output()


@pytest.fixture
def start_run(home, tmp_path):
    """Start `loopwright run SPEC` in its own process against its own scripted model; returns the run id."""
    started = []

    def start(spec: Path, script: list) -> str:
        server = ModelServer(script).start()
        env = {**os.environ, "LOOPWRIGHT_HOME": str(home), "ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_API_KEY": "test-key"}
        process = subprocess.Popen([*LOOPWRIGHT, "run", str(spec)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        started.append((process, server))
        return process.stdout.readline().split()[1]

    yield start
    for process, server in started:
        process.wait(timeout=120)
        server.stop()


def spec_copy(project: Path, name: str, **sections) -> Path:
    spec = write_spec(project, **sections)
    return spec.rename(spec.with_name(f"{name}.toml"))


def sign_in(browser, daemon):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.goto(daemon.url.removesuffix("/mcp") + "/")
    assert page.url.endswith("/login")  # no session yet: the sign-in page
    page.fill("input[name=token]", daemon.token)
    page.click("button[type=submit]")
    page.wait_for_url(daemon.url.removesuffix("/mcp") + "/")
    return context, page


def test_the_runs_page_follows_a_run_live_and_its_page_shows_iterations_chart_and_output(
        daemon, project, browser, start_run, home, tmp_path):
    context, page = sign_in(browser, daemon)
    page.evaluate("window.notReloaded = true")
    run_id = start_run(spec_copy(project, "live", stop={"max_iterations": 2}),
                       [tool_use("run_command", {"command": "sleep 3 && python3 -m pytest -q -p no:cacheprovider"}),
                        FIX, text("Fixed the off-by-one.")])
    row = page.locator(f'tr[data-run="{run_id}"]')
    row.locator("td.status", has_text="running").wait_for(timeout=60_000)
    row.locator("td.status", has_text="succeeded").wait_for(timeout=120_000)
    assert page.evaluate("window.notReloaded") is True  # updated in place, no reload
    assert "by hand" in row.inner_text() and "of $1.00" in row.inner_text()
    screenshot(page, "runs-page.png", tmp_path)

    row.locator("a").click()
    page.wait_for_url(f"**/runs/{run_id}")
    assert page.inner_text("#run-status") == "succeeded"
    assert page.locator(".iteration").count() == 1 and page.locator("#cost-chart rect.bar").count() == 1
    tool = page.locator("details.tool-call").first
    tool.locator("summary").click()
    assert "exit code 1" in tool.locator("pre.output").inner_text()
    context.close()


def test_a_person_approves_a_gated_call_and_stops_another_run_and_nothing_works_without_the_token(
        daemon, project, browser, start_run, home):
    gated = start_run(spec_copy(project, "gated", approval=[{"tool": "run_command"}]),
                      [tool_use("run_command", {"command": "echo deploy now"}), FIX, text("fixed")])
    slow = start_run(spec_copy(project, "slow"), [tool_use("run_command", {"command": "sleep 60"}), text("done")])
    store = Store(f"sqlite:///{home / 'loopwright.sqlite'}")
    wait_for(lambda: store.list_approvals(gated), "the gated call waits")
    wait_for(lambda: store.event(slow, "1.tool.1") is not None, "the slow command runs")
    base = daemon.url.removesuffix("/mcp")

    # Without the token: the sign-in page, and no action works.
    stranger = browser.new_context()
    page = stranger.new_page()
    page.goto(f"{base}/runs/{slow}")
    assert page.url.endswith("/login")
    answer = httpx2.post(f"{base}/runs/{slow}/stop", data={"form_token": "x"})
    assert answer.status_code == 401 and not store.get_run(slow).stop_requested
    page.fill("input[name=token]", "not-the-token")
    page.click("button[type=submit]")
    assert "not the daemon's token" in page.inner_text("#problem")
    stranger.close()

    context, page = sign_in(browser, daemon)
    page.goto(f"{base}/runs/{gated}")
    page.fill("input[name=note]", "go ahead, carefully")
    page.click("button[value=allow]")
    page.locator("#run-status", has_text="succeeded").wait_for(timeout=120_000)
    [approval] = store.list_approvals(gated, pending_only=False)
    assert (approval["status"], approval["note"]) == ("allowed", "go ahead, carefully")

    # A cross-site POST is refused, even with the session cookie and the form token.
    page.goto(f"{base}/runs/{slow}")
    form_token = page.get_attribute("#controls input[name=form_token]", "value")
    cookie = {c["name"]: c["value"] for c in context.cookies()}["loopwright_session"]
    forged = httpx2.post(f"{base}/runs/{slow}/stop", data={"form_token": form_token},
                         headers={"Origin": "http://attacker.example", "Cookie": f"loopwright_session={cookie}"})
    assert forged.status_code == 403 and "cross-site" in forged.text
    assert not store.get_run(slow).stop_requested

    page.click("#controls button[value=stop]")
    page.locator("#run-status", has_text="stopped").wait_for(timeout=60_000)
    assert store.get_run(slow).reason == "stopped by a person"
    context.close()


def test_the_runs_page_lists_the_automations_with_their_next_firing(home, project, browser):
    loops = project.parent / "loops"
    loops.mkdir()
    write_spec(project, name="nightly", trigger=[{"kind": "cron", "schedule": "0 7 * * 1-5", "timezone": "Europe/Berlin"}]
               ).rename(loops / "nightly.toml")
    served = DaemonProcess(home, loops)
    try:
        context, page = sign_in(browser, served)
        page.reload()
        row = page.locator("#automations tr", has_text="nightly/cron")
        row.wait_for(timeout=30_000)
        cells = row.locator("td").all_inner_texts()
        assert cells[1] == "cron" and cells[3] == "0 runs, $0.0000"
        assert cells[2].endswith(("CET", "CEST")) and " 07:00 " in cells[2]  # the next weekday at 07:00 in Berlin
        context.close()
    finally:
        assert served.stop() == 0, served.output()
