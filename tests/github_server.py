"""A local stand-in for the parts of GitHub's REST API that Loopwright uses: pull requests (list, open,
update), issue comments, commit statuses and a repository's default branch. It records every request
with its Authorization header, and refuses requests without the expected token as GitHub would."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class GitHubServer:
    def __init__(self, token: str):
        self.token = token
        self.requests: list[dict] = []  # {method, path, query, body, authorization}
        self.pulls: list[dict] = []
        self.comments: list[dict] = []
        self.statuses: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self) -> None:
                parts = urlsplit(self.path)
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                status, value = server.handle(self.command, parts.path, parse_qs(parts.query),
                                              json.loads(raw) if raw else None, self.headers.get("authorization", ""))
                payload = json.dumps(value).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = _answer

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def handle(self, method: str, path: str, query: dict, body: dict | None, authorization: str) -> tuple[int, object]:
        with self._lock:
            self.requests.append({"method": method, "path": path, "query": query, "body": body,
                                  "authorization": authorization})
            if authorization != f"Bearer {self.token}":
                return 401, {"message": "Bad credentials"}
            if re.fullmatch(r"/repos/[^/]+/[^/]+", path) and method == "GET":
                return 200, {"default_branch": "main", "full_name": path.removeprefix("/repos/")}
            if (match := re.fullmatch(r"/repos/([^/]+)/([^/]+)/pulls", path)) and method == "GET":
                head = query.get("head", [""])[0]
                return 200, [p for p in self.pulls if f"{match.group(1)}:{p['head']}" == head and p["state"] == "open"]
            if re.fullmatch(r"/repos/[^/]+/[^/]+/pulls", path) and method == "POST":
                if any(p["head"] == body["head"] and p["state"] == "open" for p in self.pulls):
                    return 422, {"message": f"A pull request already exists for {body['head']}."}
                pull = {"number": 100 + len(self.pulls), "state": "open", "html_url": "", **body}
                self.pulls.append(pull)
                return 201, pull
            if (match := re.fullmatch(r"/repos/[^/]+/[^/]+/pulls/(\d+)", path)) and method == "PATCH":
                pull = next(p for p in self.pulls if p["number"] == int(match.group(1)))
                pull.update(body)
                return 200, pull
            if (match := re.fullmatch(r"/repos/[^/]+/[^/]+/issues/(\d+)/comments", path)) and method == "POST":
                self.comments.append({"issue": int(match.group(1)), "id": len(self.comments) + 1, **body})
                return 201, self.comments[-1]
            if (match := re.fullmatch(r"/repos/[^/]+/[^/]+/statuses/([0-9a-f]{40})", path)) and method == "POST":
                self.statuses.append({"sha": match.group(1), **body})
                return 201, self.statuses[-1]
            return 404, {"message": "Not Found"}
