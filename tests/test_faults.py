"""A model endpoint that misbehaves: refusals, overload, hangs, cut-off answers and malformed tool input.
Every run ends in time with a reason that names what went wrong, or succeeds despite it (the real CLI,
Docker sandboxes, the real SDK against the scripted model server)."""

import json
import os
import random
import shutil
import subprocess
import time

from conftest import FIX, LOOPWRIGHT, ROOT, write_spec
from model_server import ModelServer, error, hang, text, tool_use, truncated

FAULTS = {
    "429": error(429, "rate_limit_error", "Number of requests has exceeded your rate limit"),
    "500": error(500, "api_error", "Internal server error"),
    "529": error(529, "overloaded_error", "Overloaded"),
    "hang": hang(300),
    "truncated": truncated(text("This answer is cut off")),
    "malformed": tool_use("edit_file", "calc.py: replace the divisor"),  # tool input that is no JSON object
}
# What a run's reason says when the fault ended it.
NAMED = {"429": "answered 429", "500": "answered 500", "529": "answered 529",
         "hang": "did not answer within", "truncated": "connection to the model API"}


def faulty(fault: str, seed: int):
    """An honest maker (fix, then say so) behind an endpoint that answers `fault` instead on 20% of
    requests, and always on the second."""
    rng, count = random.Random(seed), iter(range(1, 1_000))

    def reply(request: dict) -> dict:
        if (n := next(count)) == 2 or (n > 2 and rng.random() < 0.2):
            return FAULTS[fault]
        tried = [b for m in request["messages"] if m["role"] == "assistant" for b in m["content"] if b["type"] == "tool_use"]
        results = [b for m in request["messages"] if m["role"] == "user" and isinstance(m["content"], list)
                   for b in m["content"] if b.get("type") == "tool_result"]
        if not tried or "malformed" in str(results[-1].get("content")):
            return FIX
        return text("Fixed the divisor in average().")

    return reply


def test_ten_runs_against_a_faulty_endpoint_all_end_in_time_and_name_the_fault(tmp_path, project):
    runs = []
    for k in range(10):
        fault = list(FAULTS)[k % len(FAULTS)]
        repo = tmp_path / f"project-{k}"
        shutil.copytree(project, repo)
        server = ModelServer(faulty(fault, seed=k)).start()
        env = {**os.environ, "LOOPWRIGHT_HOME": str(tmp_path / f"home-{k}"), "LOOPWRIGHT_LOAD_PLUGINS": "",
               "ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_API_KEY": "test-key"}
        spec = write_spec(repo, stop={"max_wall_time": "60s", "max_iterations": 3})
        spec = spec.rename(tmp_path / f"spec-{k}.toml")
        process = subprocess.Popen([*LOOPWRIGHT, "run", str(spec)], cwd=ROOT, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        runs.append((fault, server, env, process, time.monotonic()))
    try:
        for fault, server, env, process, started in runs:
            out, err = process.communicate(timeout=max(90 - (time.monotonic() - started), 1))
            assert "Traceback" not in err, err
            run_id = next(line.split()[1] for line in out.splitlines() if line.startswith("run "))
            status = json.loads(subprocess.run([*LOOPWRIGHT, "status", run_id, "--json"], cwd=ROOT, env=env,
                                               capture_output=True, text=True, check=True).stdout)
            outcome = (fault, status["status"], status["reason"])
            if fault == "hang":  # a hang is never retried away: it ends the run at its wall time
                assert status["status"] == "failed" and status["reason"].startswith("max_wall_time"), outcome
                assert "did not answer within" in status["reason"] and server.url in status["reason"], outcome
            elif fault == "malformed":  # reported to the maker, which calls the tool properly next
                assert status["status"] == "succeeded", outcome
                told = json.dumps(server.requests[2]["messages"][-1])
                assert "the input for 'edit_file' is malformed: expected a JSON object, got str" in told
            else:  # retried by the client; a run it ends says which fault it was
                assert status["status"] == "succeeded" or NAMED[fault] in status["reason"], outcome
    finally:
        for _, server, _, process, _ in runs:
            if process.poll() is None:
                process.kill()
            server.stop()
