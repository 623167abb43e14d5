"""A small Hugging Face Hub on 127.0.0.1: the HTTP API huggingface_hub 2.4 uses to create a repo and commit.

Speaks, as huggingface_hub's ``hf_api.py``, ``_commit_api.py`` and ``lfs.py`` send them:
``POST /api/repos/create``, ``GET /api/models/{repo}[/revision/{rev}]``, ``POST /api/validate-yaml``,
``POST /api/models/{repo}/branch/{branch}``, ``POST /api/models/{repo}/preupload/{rev}``,
``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer), ``PUT /lfs-objects/{oid}`` (the "S3" upload,
no auth, like a presigned URL), ``POST /{repo}.git/info/lfs/objects/verify`` and the NDJSON
``POST /api/models/{repo}/commit/{rev}``; and for downloads, as ``file_download.py`` and
``snapshot_download`` (1.33 and 2.4) ask: ``GET /api/models/{repo}/tree/{rev}[/{path}]`` and
``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` at a branch or a
commit, with X-Repo-Commit, ETag, X-Linked-Etag/X-Linked-Size and single ``Range`` requests (206). Commits are atomic: a commit that does not complete changes
nothing. Xet is not spoken: clients must run with ``HF_HUB_DISABLE_XET=1`` (docs/hub.md).

Every request is recorded (with the file bytes it sent back); ``repos`` holds each repo's branches as
{path: bytes} and every commit's files. ``go_away_on`` makes the
server drop the connection of a matching request without answering and stop, like a host that dies.
The server stops itself after ``lifetime_s`` so a failing test cannot leave it running.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".zip", ".gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores big files in LFS whatever their name
BAD_TOKEN_MESSAGE = "Invalid credentials in Authorization header"  # the real Hub's X-Error-Message


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


@dataclass
class Seen:
    """One request as it arrived."""

    method: str
    path: str
    status: int
    body_size: int
    sent: int = 0  # file bytes sent back (resolve answers)


@dataclass
class Repo:
    """A model repo: branch -> files, branch -> head commit, and the commits made."""

    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    commits: list[dict[str, Any]] = field(default_factory=list)
    pull_requests: list[dict[str, bytes]] = field(default_factory=list)
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"0" * 40: {}})  # commit -> files


class _GoneAway(Exception):
    """Raised inside a handler to drop the connection without an answer."""


class HubServer:
    """A threaded Hub API server on 127.0.0.1 with a random port; use as a context manager."""

    def __init__(self, *, token: str = "hf_aockpt_test", lifetime_s: float = 60.0):
        self.token = token
        self.requests: list[Seen] = []
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self._go_away: tuple[str, re.Pattern[str]] | None = None
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = threading.Event()

    @property
    def endpoint(self) -> str:
        """Base URL to give HfApi(endpoint=...) or HF_ENDPOINT."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> "HubServer":
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call more than once, from any thread."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._timer.cancel()
        threading.Thread(target=self._httpd.shutdown, daemon=True).start()
        self._httpd.server_close()

    def go_away_on(self, method: str, path_regex: str) -> None:
        """On the next matching request: drop the connection unanswered and stop the server."""
        self._go_away = (method, re.compile(path_regex))

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        """The files at a branch head."""
        return dict(self.repos[repo_id].branches[branch])

    def paths(self, method: str | None = None) -> list[str]:
        """Paths of the recorded requests, optionally of one method."""
        return [r.path for r in self.requests if method is None or r.method == method]

    # --- routes -------------------------------------------------------------------------------------

    def route(self, method: str, path: str) -> tuple[Callable[..., tuple[int, Any, dict]], tuple[str, ...]]:
        """The handler and URL arguments for a request."""
        for route_method, pattern, handler in _ROUTES:
            match = pattern.fullmatch(path)
            if route_method == method and match:
                return getattr(self, handler), match.groups()
        return self._not_found, ()

    def _not_found(self, body: bytes) -> tuple[int, Any, dict]:
        return 404, {"error": "no such route"}, {}

    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise _HttpError(404, f"Repository {repo_id} not found", {"X-Error-Code": "RepoNotFound"})
        return repo

    def _branch(self, repo: Repo, revision: str) -> str:
        if revision not in repo.branches:
            raise _HttpError(404, f"Revision {revision} not found", {"X-Error-Code": "RevisionNotFound"})
        return revision

    def create_repo(self, body: bytes) -> tuple[int, Any, dict]:
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}, {}
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _tree(self, repo: Repo, revision: str) -> tuple[str, dict[str, bytes]]:
        """The commit and files a branch name or a commit id names."""
        if revision in repo.snapshots:
            return revision, repo.snapshots[revision]
        branch = self._branch(repo, revision)
        return repo.heads[branch], repo.branches[branch]

    def repo_info(self, body: bytes, repo_id: str, revision: str | None) -> tuple[int, Any, dict]:
        repo = self._repo(repo_id)
        commit, files = self._tree(repo, revision or "main")
        siblings = [{"rfilename": p, "size": len(b)} for p, b in sorted(files.items())]
        return 200, {"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.private,
                     "siblings": siblings, "tags": []}, {}

    def tree(self, body: bytes, repo_id: str, revision: str, folder: str | None) -> tuple[int, Any, dict]:
        """``GET /api/models/{repo}/tree/{rev}[/{path}]``: every file under a folder (recursive, one page)."""
        repo = self._repo(repo_id)
        _, files = self._tree(repo, revision)
        prefix = f"{folder.strip('/')}/" if folder else ""
        entries = [{"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data),
                    **({"lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}
                       if path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE else {})}
                   for path, data in sorted(files.items()) if path.startswith(prefix)]
        return 200, entries, {}

    def resolve(self, body: bytes, repo_id: str, revision: str, path: str, *, method: str,
                range_header: str | None) -> tuple[int, Any, dict]:
        """A file at a branch or commit, as ``/{repo}/resolve/{rev}/{path}`` serves it: X-Repo-Commit, ETag
        (sha256 for LFS files, with X-Linked-Etag/X-Linked-Size; the git blob id otherwise), and a Range
        of one ``bytes=a-b`` answered 206 with Content-Range."""
        repo = self._repo(repo_id)
        commit, files = self._tree(repo, revision)
        if path not in files:
            raise _HttpError(404, f"Entry {path} not found", {"X-Error-Code": "EntryNotFound"})
        data = files[path]
        lfs = path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE
        etag = f'"{hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)}"'
        headers = {"X-Repo-Commit": commit, "ETag": etag, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if lfs:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(len(data))})
        status, start, end = 200, 0, len(data)
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
        if match:
            start, end = int(match.group(1)), min(len(data), int(match.group(2) or len(data) - 1) + 1)
            if start >= len(data) and len(data):
                return 416, {"error": "range not satisfiable"}, {"Content-Range": f"bytes */{len(data)}"}
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        return status, RawBody(data[start:end], method == "HEAD"), headers

    def validate_yaml(self, body: bytes) -> tuple[int, Any, dict]:
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            data = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as e:
            return 400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []}, {}
        if data is not None and not isinstance(data, dict):
            return 400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def create_branch(self, body: bytes, repo_id: str, branch: str) -> tuple[int, Any, dict]:
        repo = self._repo(repo_id)
        if branch in repo.branches:
            return 409, {"error": "Reference already exists"}, {}
        repo.branches[branch] = dict(repo.branches["main"])
        repo.heads[branch] = repo.heads["main"]
        return 200, {}, {}

    def preupload(self, body: bytes, repo_id: str, revision: str) -> tuple[int, Any, dict]:
        repo = self._repo(repo_id)
        existing = repo.branches.get(revision, {})
        files = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
            old = existing.get(f["path"])
            oid = None if old is None else (hashlib.sha256(old).hexdigest() if lfs else git_blob_sha1(old))
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        return 200, {"files": files, "commitOid": repo.heads.get(revision)}, {}

    def lfs_batch(self, body: bytes, repo_id: str) -> tuple[int, Any, dict]:
        self._repo(repo_id)
        objects = []
        for obj in json.loads(body)["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.endpoint}/lfs-objects/{obj['oid']}"},
                    "verify": {"href": f"{self.endpoint}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def lfs_put(self, body: bytes, oid: str) -> tuple[int, Any, dict]:
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "sha256 of the body does not match the object id"}, {}
        self.lfs_objects[oid] = body
        return 200, {}, {}

    def lfs_verify(self, body: bytes, repo_id: str) -> tuple[int, Any, dict]:
        obj = json.loads(body)
        stored = self.lfs_objects.get(obj["oid"])
        if stored is None or len(stored) != obj["size"]:
            return 404, {"error": "object not uploaded"}, {}
        return 200, {}, {}

    def commit(self, body: bytes, repo_id: str, revision: str, query: dict[str, str]) -> tuple[int, Any, dict]:
        repo = self._repo(repo_id)
        branch = self._branch(repo, revision)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return 400, {"error": "the first NDJSON line must be the header"}, {}
        tree = dict(repo.branches[branch])
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                tree[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    return 422, {"error": f"LFS object {value['oid']} of {value['path']} was not uploaded"}, {}
                tree[value["path"]] = self.lfs_objects[value["oid"]]
            elif line["key"] == "deletedFile":
                tree.pop(value["path"], None)
            else:
                return 400, {"error": f"unknown operation {line['key']!r}"}, {}
        oid = hashlib.sha1(json.dumps([repo.heads[branch], lines], sort_keys=True).encode()).hexdigest()
        repo.commits.append({"oid": oid, "summary": lines[0]["value"]["summary"], "paths": sorted(tree)})
        url = f"{self.endpoint}/{repo_id}/commit/{oid}"
        if query.get("create_pr") == "1":
            repo.pull_requests.append(tree)
            number = len(repo.pull_requests)
            return 200, {"commitUrl": url, "commitOid": oid,
                         "pullRequestUrl": f"{self.endpoint}/{repo_id}/discussions/{number}"}, {}
        repo.branches[branch] = tree
        repo.heads[branch] = oid
        repo.snapshots[oid] = tree
        return 200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None}, {}


_REPO = r"([^/]+/[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern), handler) for method, pattern, handler in [
        ("POST", r"/api/repos/create", "create_repo"),
        ("GET", rf"/api/models/{_REPO}(?:/revision/([^/]+))?", "repo_info"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", rf"/api/models/{_REPO}/branch/([^/]+)", "create_branch"),
        ("POST", rf"/api/models/{_REPO}/preupload/([^/]+)", "preupload"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-objects/([0-9a-f]{64})", "lfs_put"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
        ("POST", rf"/api/models/{_REPO}/commit/([^/]+)", "commit"),
        ("GET", rf"/api/models/{_REPO}/tree/([^/]+)(?:/(.+))?", "tree"),
        ("GET", rf"/{_REPO}/resolve/([^/]+)/(.+)", "resolve"),
        ("HEAD", rf"/{_REPO}/resolve/([^/]+)/(.+)", "resolve"),
    ]
]
_NO_AUTH = {"lfs_put"}  # presigned storage URLs carry no token


@dataclass
class RawBody:
    """File bytes to send as they are (a HEAD answer sends only their length)."""
    data: bytes
    head_only: bool


class _HttpError(Exception):
    """An error answer: status, message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str]):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request body, sent with Content-Length or chunked."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                handler.rfile.readline()
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def _handler_for(server: HubServer) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to one HubServer."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: requests are recorded in server.requests instead."""

        def _serve(self) -> None:
            from urllib.parse import parse_qsl, unquote, urlsplit

            url = urlsplit(self.path)
            path, query = unquote(url.path), dict(parse_qsl(url.query))
            body = _read_body(self)
            handler, args = server.route(self.command, path)
            status, payload, headers = self._answer(handler, body, args, query)
            if status is None:
                return
            raw = isinstance(payload, RawBody)
            server.requests.append(Seen(self.command, path, status, len(body),
                                        len(payload.data) if raw and not payload.head_only else 0))
            data = payload.data if raw else json.dumps(payload).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            if not (raw and payload.head_only):
                self.wfile.write(data)

        def _answer(self, handler: Callable, body: bytes, args: tuple, query: dict) -> tuple[Any, Any, dict]:
            """Run the route with auth and fault injection; (None, ...) means the connection was dropped."""
            go_away = server._go_away
            if go_away and go_away[0] == self.command and go_away[1].search(self.path):
                server.requests.append(Seen(self.command, self.path, 0, len(body)))
                self.close_connection = True
                self.connection.shutdown(2)
                server.stop()
                return None, None, {}
            name = getattr(handler, "__name__", "")
            if name not in _NO_AUTH and self.headers.get("Authorization") != f"Bearer {server.token}":
                return 401, {"error": BAD_TOKEN_MESSAGE}, {"X-Error-Message": BAD_TOKEN_MESSAGE}
            kwargs: dict[str, Any] = {"query": query} if name == "commit" else {}
            if name == "resolve":
                kwargs = {"method": self.command, "range_header": self.headers.get("Range")}
            try:
                with server._lock:
                    return handler(body, *args, **kwargs)
            except _HttpError as e:
                return e.status, {"error": e.message}, {"X-Error-Message": e.message, **e.headers}

        do_GET = do_POST = do_PUT = do_HEAD = _serve

    return Handler

