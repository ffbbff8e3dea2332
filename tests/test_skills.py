"""Skills: Agent Skills folders, listed in the prompt by name and description, loaded through tools."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import loopwright, run_id_of, trace, write_spec
from model_server import text, tool_use
from loopwright.plugins.skills import SkillError, parse_skill_md, read_inside

CORPUS = Path("/work/shared/skills-corpus")
BODY = "BODY-7f3a: run the suite with python3 -m pytest -q -p no:cacheprovider."
PYTHON_TESTING = f"""---
name: python-testing
description: How this project runs and fixes its tests. Use when a test fails.
---
# Python testing

{BODY}
Fixtures are described in reference/fixtures.md.
"""


def write_skill(folder: Path, skill_md: str, files: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "SKILL.md").write_text(skill_md)
    for name, content in (files or {}).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return folder


def system_text(request: dict) -> str:
    return "".join(block["text"] for block in request["system"])


def tool_result(request: dict) -> tuple[str, bool]:
    block = request["messages"][-1]["content"][0]
    return block["content"], block.get("is_error", False)


def commit(repo: Path) -> None:
    for args in (["add", "-A"], ["-c", "user.name=T", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "skills"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def run_once(project: Path, **sections) -> str:
    result = loopwright("run", str(write_spec(project, stop={"max_iterations": 1}, **sections)))
    assert result.returncode == 1, result.stdout + result.stderr  # one iteration, the example's test still fails
    return run_id_of(result)


@pytest.mark.hook("loopwright_register_skill_sources", "loopwright_system_prompt", "loopwright_run_tools")
def test_the_prompt_lists_a_skill_by_name_and_description_and_load_skill_returns_its_body(home, project, model):
    write_skill(project.parent / "skills" / "python-testing", PYTHON_TESTING, {"reference/fixtures.md": "FIXTURES"})
    server = model([tool_use("load_skill", {"name": "python-testing"}), text("done")])
    run_once(project, agent={"skills": ["skills"]})

    first = system_text(server.requests[0])
    assert "- python-testing: How this project runs and fixes its tests. Use when a test fails." in first
    assert BODY not in first
    assert {"load_skill", "read_skill_file"} <= {tool["name"] for tool in server.requests[0]["tools"]}
    body, is_error = tool_result(server.requests[1])
    assert not is_error
    assert BODY in body and "name: python-testing" not in body
    assert "- reference/fixtures.md" in body  # the bundled files are listed for read_skill_file


@pytest.mark.hook("loopwright_run_tools")
def test_read_skill_file_reads_a_bundled_file_and_refuses_paths_that_leave_the_skill(home, project, model, tmp_path):
    (tmp_path / "secret.txt").write_text("SECRET")
    folder = write_skill(tmp_path / "skills" / "python-testing", PYTHON_TESTING, {"reference/fixtures.md": "FIXTURES"})
    (folder / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (folder / "reference" / "outside").symlink_to(tmp_path)
    attempts = [("reference/fixtures.md"), ("../../secret.txt"), (str(tmp_path / "secret.txt")), ("leak.txt"),
                ("reference/outside/secret.txt")]
    server = model([*[tool_use("read_skill_file", {"name": "python-testing", "path": p}) for p in attempts],
                    text("done")])
    run_once(project, agent={"skills": ["skills"]})

    results = [tool_result(request) for request in server.requests[1:6]]
    assert results[0] == ("FIXTURES", False)
    for content, is_error in results[1:]:
        assert is_error and "SECRET" not in content
    assert "leaves the skill's folder" in results[1][0] and "leaves the skill's folder" in results[2][0]
    assert "symlink" in results[3][0] and "symlink" in results[4][0]


@pytest.mark.hook("loopwright_system_prompt")
def test_a_malformed_skill_is_reported_by_name_in_the_trace_and_the_run_goes_on(home, project, model, tmp_path):
    skills = tmp_path / "skills"
    write_skill(skills / "python-testing", PYTHON_TESTING)
    write_skill(skills / "broken", "---\nname: broken-skill\n---\nNo description.\n")
    write_skill(skills / "no-front-matter", "# Just markdown\n")
    server = model([text("done")])
    run_id = run_once(project, agent={"skills": ["skills"]})

    events = trace(run_id)
    skipped = {e["data"]["skill"]: e["data"] for e in events if e["kind"] == "skill_skipped"}
    assert set(skipped) == {"broken-skill", "no-front-matter"}
    assert "lacks 'description'" in skipped["broken-skill"]["problem"]
    assert "does not start with YAML front matter" in skipped["no-front-matter"]["problem"]
    assert "- python-testing:" in system_text(server.requests[0])
    assert [e["data"]["passed"] for e in events if e["kind"] == "verdict"] == [False]  # it ran and was checked


@pytest.mark.hook("loopwright_system_prompt", "loopwright_run_tools")
def test_public_skills_written_for_claude_code_load_unmodified(home, project, model, tmp_path):
    shutil.copytree(CORPUS, tmp_path / "skills", ignore=shutil.ignore_patterns("README.md"))
    reference = sorted(p.name for p in (CORPUS / "mcp-builder" / "reference").iterdir())[0]
    server = model([
        tool_use("load_skill", {"name": "mcp-builder"}),
        tool_use("read_skill_file", {"name": "mcp-builder", "path": f"reference/{reference}"}),
        text("done"),
    ])
    run_id = run_once(project, agent={"skills": ["skills"]})

    first = system_text(server.requests[0])
    for skill_md in sorted(CORPUS.glob("*/SKILL.md")):
        meta, body = parse_skill_md(skill_md.read_text())
        assert f"- {meta['name']}: {' '.join(meta['description'].split())}" in first
        assert body.strip()[:200] not in first
    assert not [e for e in trace(run_id) if e["kind"] == "skill_skipped"]
    body, _ = tool_result(server.requests[1])
    assert parse_skill_md((CORPUS / "mcp-builder" / "SKILL.md").read_text())[1].strip() in body
    assert tool_result(server.requests[2]) == ((CORPUS / "mcp-builder" / "reference" / reference).read_text(), False)


@pytest.mark.hook("loopwright_register_skill_sources", "loopwright_system_prompt")
def test_skills_in_the_repos_claude_folder_load_and_the_loops_skill_of_the_same_name_wins(home, project, model, tmp_path):
    write_skill(project / ".claude" / "skills" / "repo-conventions",
                "---\nname: repo-conventions\ndescription: Naming and layout rules of this repository.\n---\nUse snake_case.\n")
    write_skill(project / ".claude" / "skills" / "python-testing",
                "---\nname: python-testing\ndescription: The repository's own copy.\n---\nOld advice.\n")
    commit(project)
    write_skill(tmp_path / "skills" / "python-testing", PYTHON_TESTING)
    server = model([tool_use("load_skill", {"name": "repo-conventions"}), text("done")])
    run_id = run_once(project, agent={"skills": ["skills"]})

    first = system_text(server.requests[0])
    assert "- repo-conventions: Naming and layout rules of this repository." in first
    assert "- python-testing: How this project runs" in first and "The repository's own copy" not in first
    assert "Use snake_case." in tool_result(server.requests[1])[0]
    clash = [e["data"] for e in trace(run_id) if e["kind"] == "skill_skipped"]
    assert [(c["skill"], c["source"]) for c in clash] == [("python-testing", "repo")]
    assert "same name from loop" in clash[0]["problem"]


# --- SKILL.md and paths, without a run -------------------------------------------------------------


def test_front_matter_and_body_are_split_at_the_closing_dashes():
    meta, body = parse_skill_md("---\nname: x\ndescription: >\n  folded\n  text\n---\n\n# Title\nbody\n")
    assert meta == {"name": "x", "description": "folded text\n"}
    assert body == "# Title\nbody\n"


@pytest.mark.parametrize("skill_md, problem", [
    ("no front matter", "does not start with YAML front matter"),
    ("---\nname: x\n", "no closing '---'"),
    ("---\nname: [x\n---\n", "not valid YAML"),
    ("---\n- a list\n---\n", "not a mapping"),
    ("---\ndescription: d\n---\n", "lacks 'name'"),
    ("---\nname: x\ndescription: 3\n---\n", "lacks 'description'"),
    ("---\nname: a/b\ndescription: d\n---\n", "without '/'"),
])
def test_malformed_front_matter_is_refused_with_the_reason(skill_md, problem):
    with pytest.raises(SkillError, match=problem):
        parse_skill_md(skill_md)


def test_every_public_skill_parses_with_the_name_and_description_claude_code_reads():
    for skill_md in sorted(CORPUS.glob("*/SKILL.md")):
        meta, body = parse_skill_md(skill_md.read_text())
        expected = yaml.safe_load(skill_md.read_text().split("---")[1])
        assert (meta["name"], meta["description"]) == (expected["name"], expected["description"])
        assert meta["name"] == skill_md.parent.name and body.strip()


def test_a_symlink_swapped_to_lead_outside_is_refused(tmp_path):
    root = tmp_path / "skill"
    root.mkdir()
    (tmp_path / "outside").write_text("SECRET")
    (root / "notes.md").write_text("ok")
    assert read_inside(root.resolve(), "notes.md") == b"ok"
    (root / "notes.md").unlink()
    os.symlink(tmp_path / "outside", root / "notes.md")
    with pytest.raises(SkillError, match="symlink"):
        read_inside(root.resolve(), "notes.md")
