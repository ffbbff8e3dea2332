"""GitHub in and out, for real: `loopwright serve` receives signed GitHub webhooks, runs start on the pull
request's head (fetched from a local bare repository standing in for GitHub's), and a run's end is
pushed there and sent to a local stand-in for GitHub's REST API. The token stays out of every sandbox,
trace and log."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import uuid
from pathlib import Path

import httpx2
import pytest

from conftest import FIX, loopwright, write_spec
from github_server import GitHubServer
from model_server import text, tool_use
from test_automations import finished, hook_url, runs_of, serve, until  # noqa: F401 (serve: a fixture)

SECRET = "the-webhook-secret"
TOKEN = "ghp_theloopstokenneverleaks0123456789"


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliver(url: str, event: str, payload: dict, delivery: str | None = None, secret: str = SECRET) -> httpx2.Response:
    body = json.dumps(payload).encode()
    return httpx2.post(url, content=body, headers={
        "X-GitHub-Event": event, "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": sign(body, secret), "Content-Type": "application/json"})


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def github(project, tmp_path, monkeypatch):
    """The project with a bare 'GitHub' remote holding main and pull request 7's head (a commit the project
    lacks), and the REST API stand-in; the daemon started after this inherits the token and the API's URL."""
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
    git(project, "remote", "add", "origin", str(remote))
    git(project, "push", "-q", "origin", "main")
    contributor = tmp_path / "contributor"
    subprocess.run(["git", "clone", "-q", str(remote), str(contributor)], check=True)
    (contributor / "contributed.txt").write_text("from the pull request\n")
    git(contributor, "add", "-A")
    git(contributor, "-c", "user.name=C", "-c", "user.email=c@example.invalid", "commit", "-qm", "a contribution")
    git(contributor, "push", "-q", "origin", "HEAD:refs/pull/7/head")
    server = GitHubServer(TOKEN)
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    monkeypatch.setenv("GITHUB_API_URL", server.url)
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    yield remote, git(contributor, "rev-parse", "HEAD"), server
    server.stop()


def add_loop(project: Path, name: str, goal: str, trigger: dict, **github) -> Path:
    loops = project.parent / "loops"
    loops.mkdir(exist_ok=True)
    spec = write_spec(project, name=name, goal=goal, stop={"max_iterations": 1},
                      trigger=[{"kind": "github", "secret_env": "HOOK_SECRET", **trigger}],
                      github={"repo": "acme/calc", **github})
    spec.write_text(spec.read_text().replace("[workspace]\n", '[workspace]\nauthor = "Calc Bot <calc-bot@example.invalid>"\n'))
    return spec.rename(loops / f"{name}.toml").parent


def looks_and_fixes(request: dict) -> dict:
    """The maker prints its environment (to show what a sandbox holds), fixes the bug, and says so."""
    answered = sum(1 for m in request["messages"] if m["role"] == "assistant")
    return [tool_use("run_command", {"command": "env; cat contributed.txt"}), FIX, text("Fixed.")][min(answered, 2)]


def pull_request(action: str, sha: str) -> dict:
    return {"action": action, "number": 7, "repository": {"full_name": "acme/calc"}, "sender": {"login": "ann"},
            "pull_request": {"number": 7, "title": "Average of a list", "body": "Please review.",
                             "html_url": "https://github.example/acme/calc/pull/7",
                             "head": {"ref": "average", "sha": sha}}}


def test_a_pull_request_event_runs_on_its_head_and_the_result_goes_back_to_github(
        home, project, model, serve, github):
    remote, head, server = github
    model(looks_and_fixes)
    daemon = serve(add_loop(project, "review", "Fix the failing test of pull request {{ event.number }}: {{ event.title }}",
                            {"events": ["pull_request.opened", "pull_request.synchronize"]}))
    url = hook_url(daemon, "review", "github")

    forged = deliver(url, "pull_request", pull_request("opened", head), secret="not-the-secret")
    assert forged.status_code == 401 and "X-Hub-Signature-256" in forged.json()["error"]
    closed = deliver(url, "pull_request", pull_request("closed", head))
    assert closed.status_code == 200 and "not among this trigger's events" in closed.json()["ignored"]
    accepted = deliver(url, "pull_request", pull_request("opened", head), delivery="delivery-1")
    assert accepted.status_code == 202, accepted.text
    again = deliver(url, "pull_request", pull_request("opened", head), delivery="delivery-1")
    assert again.status_code == 200 and "received before" in again.json()["duplicate"]

    first = finished(accepted.json()["run_id"])
    assert first.status == "succeeded", first.reason
    assert [r.id for r in runs_of("review")] == [first.id]  # the forged, unselected and repeated ones started nothing
    assert first.spec["goal"] == "Fix the failing test of pull request 7: Average of a list"
    assert git(project, "show", f"{first.branch}:contributed.txt") == "from the pull request"  # started on the head
    assert git(project, "log", "-1", "--format=%an <%ae>", first.branch) == "Calc Bot <calc-bot@example.invalid>"

    # Pushed, one pull request with the verdicts and the cost, a comment on pull request 7, a status on its head.
    until(lambda: server.statuses, what="the commit status")
    assert git(remote, "rev-parse", "refs/heads/loopwright/review/pr-7") == first.commit_sha
    [pull] = server.pulls
    assert pull["head"] == "loopwright/review/pr-7" and pull["base"] == "main"
    assert "| 1 | pass |" in pull["body"] and "Cost: $" in pull["body"] and first.id in pull["body"]
    assert [c["issue"] for c in server.comments] == [7] and "succeeded" in server.comments[0]["body"]
    assert server.statuses == [{"sha": head, "state": "success", "context": "loopwright/review",
                                "description": f"succeeded: {first.reason}"}]

    # A second run of the loop updates that pull request instead of opening another.
    second_id = deliver(url, "pull_request", pull_request("synchronize", head)).json()["run_id"]
    second = finished(second_id)
    until(lambda: len(server.statuses) == 2, what="the second run's status")
    assert len(server.pulls) == 1 and server.pulls[0]["body"].count(second.id) == 1
    assert any(r["method"] == "PATCH" for r in server.requests)
    assert git(remote, "rev-parse", "refs/heads/loopwright/review/pr-7") == second.commit_sha

    # The token reached GitHub's API and nothing else: no sandbox, trace or log holds it.
    assert {r["authorization"] for r in server.requests} == {f"Bearer {TOKEN}"}
    for run_id in (first.id, second.id):
        traced = loopwright("trace", run_id, "--json").stdout
        assert "HOSTNAME=" in traced and "from the pull request" in traced  # the sandbox's environment was printed
        assert TOKEN not in traced and "GITHUB_TOKEN" not in traced
    assert TOKEN not in daemon.output()


def test_an_issue_comment_with_the_command_starts_a_run_that_answers_on_the_issue(home, project, model, serve, github):
    _, _, server = github
    model(looks_and_fixes)
    daemon = serve(add_loop(project, "helper", "Do what the comment asks: {{ event.comment }}",
                            {"events": ["issue_comment.created"], "command": "/loopwright"}, comment_file="calc.py"))
    url = hook_url(daemon, "helper", "github")

    def comment(body: str) -> dict:
        return {"action": "created", "repository": {"full_name": "acme/calc"}, "sender": {"login": "bo"},
                "issue": {"number": 12, "title": "mean() is off", "body": "It divides by one too many."},
                "comment": {"body": body}}

    chatter = deliver(url, "issue_comment", comment("Thanks, looks good"))
    assert chatter.status_code == 200 and "/loopwright" in chatter.json()["ignored"]
    accepted = deliver(url, "issue_comment", comment("/loopwright fix the average"))
    assert accepted.status_code == 202, accepted.text
    run = finished(accepted.json()["run_id"])
    assert run.spec["goal"] == "Do what the comment asks: /loopwright fix the average"
    until(lambda: server.comments, what="the answer on the issue")
    [answer] = server.comments
    assert answer["issue"] == 12 and run.id in answer["body"] and run.status in answer["body"]
    assert answer["body"].startswith('"""A tiny module') and "sum(numbers) / len(numbers)" in answer["body"]  # comment_file leads
    assert [r.id for r in runs_of("helper")] == [run.id]
    assert TOKEN not in daemon.output()


def test_when_github_refuses_the_errors_are_logged_without_the_token(home, project, model, serve, github, monkeypatch):
    remote, head, server = github
    server.token = "a-token-github-would-accept"  # the loop's token is refused: 401 Bad credentials
    git(project, "fetch", "-q", str(remote), "refs/pull/7/head")  # the head is here: nothing to fetch
    git(project, "remote", "set-url", "origin", "https://127.0.0.1:9/acme/calc.git")  # an https remote nobody answers
    model(looks_and_fixes)
    daemon = serve(add_loop(project, "review", "Fix the failing test.", {"events": ["pull_request.opened"]}))
    accepted = deliver(hook_url(daemon, "review", "github"), "pull_request", pull_request("opened", head))
    assert accepted.status_code == 202, accepted.text
    run = finished(accepted.json()["run_id"])
    assert run.status == "succeeded", run.reason

    until(lambda: "Bad credentials" in daemon.output(), what="the refused comment to be logged")
    logged = daemon.output()
    assert "git push to origin failed" in logged and "answered 401" in logged and TOKEN not in logged
    assert TOKEN not in loopwright("trace", run.id, "--json").stdout
    assert not server.comments and not server.statuses


def test_a_failed_check_run_starts_a_run_on_its_commit_and_only_listed_labels_start_runs(
        home, project, model, serve, github):
    remote, head, server = github
    git(remote, "update-ref", "refs/heads/average", head)  # the pull request's branch, whose CI failed
    model(looks_and_fixes)
    daemon = serve(add_loop(project, "fix-ci", "CI failed on {{ event.head_ref }}: {{ event.title }}.",
                            {"events": ["check_run.completed", "issues.labeled"], "labels": ["loopwright"]},
                            base="{{ event.head_ref }}"))
    url = hook_url(daemon, "fix-ci", "github")

    def check_run(conclusion: str) -> dict:
        return {"action": "completed", "repository": {"full_name": "acme/calc"},
                "check_run": {"name": "tests", "conclusion": conclusion, "head_sha": head,
                              "check_suite": {"head_branch": "average"}, "pull_requests": [{"number": 7}]}}

    def labeled(label: str) -> dict:
        return {"action": "labeled", "repository": {"full_name": "acme/calc"}, "label": {"name": label},
                "issue": {"number": 12, "title": "mean() is off", "body": "Off by one."}}

    passed = deliver(url, "check_run", check_run("success"))
    assert passed.status_code == 200 and "did not fail" in passed.json()["ignored"]
    other = deliver(url, "issues", labeled("question"))
    assert other.status_code == 200 and "loopwright" in other.json()["ignored"]
    failed = deliver(url, "check_run", check_run("failure"))
    assert failed.status_code == 202, failed.text

    run = finished(failed.json()["run_id"])
    assert run.status == "succeeded", run.reason
    assert run.spec["goal"] == "CI failed on average: tests."
    assert git(project, "show", f"{run.branch}:contributed.txt") == "from the pull request"  # on the failed commit
    until(lambda: server.statuses, what="the status, the last thing sent")
    assert server.pulls[0]["base"] == "average" and server.pulls[0]["head"] == "loopwright/fix-ci/pr-7"
    assert server.statuses[0]["sha"] == head and server.statuses[0]["state"] == "success"
    assert [r.id for r in runs_of("fix-ci")] == [run.id]
