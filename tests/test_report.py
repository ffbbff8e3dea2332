"""`loopwright report RUN`: one self-contained HTML page that opens offline and shows the run's chart."""

from __future__ import annotations

from conftest import FIX, loopwright, run_id_of, screenshot, write_spec
from model_server import text, tool_use


def test_the_report_opens_offline_and_shows_iterations_chart_and_calls(home, project, model, browser, tmp_path):
    model([tool_use("run_command", {"command": "python3 -m pytest -q -p no:cacheprovider"}), text("Looked at it."),
           FIX, text("Fixed the off-by-one in average().")])
    result = loopwright("run", str(write_spec(project, stop={"max_iterations": 3})))
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = run_id_of(result)
    path = tmp_path / "report.html"
    written = loopwright("report", run_id, "-o", str(path))
    assert written.returncode == 0, written.stderr
    assert written.stdout.strip() == f"wrote {path}"

    context = browser.new_context(offline=True, viewport={"width": 1100, "height": 900})
    asked = []
    context.on("request", lambda request: asked.append(request.url))
    page = context.new_page()
    page.goto(path.as_uri())
    assert asked == [path.as_uri()]  # nothing else fetched: no script, style or font from anywhere

    assert page.inner_text("#run-status") == "succeeded"
    assert page.locator("#cost-chart rect.bar").count() == 2  # one bar per iteration
    assert page.locator("#cost-chart polyline.spend").count() == 1
    assert page.locator("#cost-chart").bounding_box()["width"] > 300  # drawn, not just present
    headlines = page.locator(".iteration .verdict").all_inner_texts()
    assert headlines[0].startswith("FAIL ") and "(2 failed)" in headlines[0] and headlines[1] == "pass"

    first_tool = page.locator("details.tool-call").first
    assert "run_command" in first_tool.locator("summary").inner_text()
    first_tool.locator("summary").click()
    assert "exit code 1" in first_tool.locator("pre.output").inner_text()  # a tool call's output
    assert "sum(numbers) / len(numbers)" in page.inner_text("#diff")

    screenshot(page, "run-page.png", tmp_path, full_page=False)
    context.close()
