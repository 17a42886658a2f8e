"""A local stand-in for the Hugging Face Hub's HTTP API, for the publishing tests.

It serves what ``huggingface_hub`` (2.x) calls to publish and to download a model repository:

* ``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{branch}``, ``GET /api/models/{repo}[/revision/{rev}]``
* ``POST /api/validate-yaml``, ``POST /api/models/{repo}/preupload/{rev}`` (``*.safetensors`` → LFS, the rest regular)
* the LFS path: ``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer), ``PUT`` of the object, verify
* ``POST /api/models/{repo}/commit/{rev}`` (ndjson: base64 ``file`` and ``lfsFile`` lines)
* ``GET /api/models/{repo}/tree/{rev}`` and ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` (``ETag``,
  ``X-Repo-Commit``, ``Content-Length``) for ``snapshot_download``.

Xet uploads are not served: clients must run with ``HF_HUB_DISABLE_XET=1`` so that LFS files go
through the LFS batch API. Writes (and reads of private repositories) need ``Authorization: Bearer
<token>``. Every request is recorded in :attr:`HubServer.requests` (method, path, whether it carried
the token); nothing else about the request is kept.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "tester"  # the namespace a bare repository name is created in
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]  # path → content
    lfs: set[str]  # paths stored through LFS


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch → commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        oid = self.branches.get(rev, rev)
        return self.commits.get(oid)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    authorized: bool  # carried "Authorization: Bearer <the server's token>"


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class HubServer:
    """Start with ``with HubServer(token) as hub:``; ``hub.url`` is the endpoint."""

    def __init__(self, token: str):
        self.token = token
        self.requests: list[Request] = []
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 → content
        self.created: list[dict] = []  # bodies of create-repo calls
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # ---------------------------------------------------------------- state changes

    def _commit(self, repo: Repo, branch: str, message: str, files: dict[str, bytes], lfs: set[str]) -> Commit:
        parent = repo.resolve(branch)
        merged = dict(parent.files) if parent else {}
        merged.update(files)
        lfs_paths = (set(parent.lfs) if parent else set()) | lfs
        digest = hashlib.sha1(json.dumps([parent.oid if parent else None, message,
                                          sorted((p, git_blob_sha(d)) for p, d in merged.items())]).encode())
        commit = Commit(oid=digest.hexdigest(), message=message, files=merged, lfs=lfs_paths)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    # ---------------------------------------------------------------- routes

    def handle(self, method: str, path: str, query: dict, headers, body: bytes) -> tuple[int, dict, bytes]:
        authorized = headers.get("Authorization") == f"Bearer {self.token}"
        with self._lock:
            self.requests.append(Request(method, path, authorized))
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", lambda **_: _json({"errors": [], "warnings": []})),
            ("GET", rf"/api/models/{REPO}(/revision/(?P<rev>[^/]+))?", self._repo_info),
            ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", self._create_branch),
            ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/_lfs/upload/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("POST", r"/_lfs/verify/(?P<oid>[0-9a-f]{64})", self._lfs_verify),
            ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", self._create_commit),
            ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)", self._tree),
            ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
        ]
        try:
            for verb, pattern, fn in routes:
                m = re.fullmatch(pattern, path)
                if m and verb == method:
                    args = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                    with self._lock:
                        return fn(authorized=authorized, body=body, query=query, method=method, **args)
            raise HubError(404, f"no route for {method} {path}")
        except HubError as e:
            head = {"X-Error-Message": str(e)}
            if e.code:
                head["X-Error-Code"] = e.code
            status, h, data = _json({"error": str(e)}, e.status)
            return status, {**h, **head}, data

    def _repo(self, repo: str, authorized: bool, write: bool = False) -> Repo:
        r = self.repos.get(repo)
        if r is None or (r.private and not authorized):
            raise HubError(404, f"Repository {repo} not found", "RepoNotFound")
        if write and not authorized:
            raise HubError(401, "Invalid credentials in Authorization header")
        return r

    def _create_repo(self, authorized: bool, body: bytes, **_):
        if not authorized:
            raise HubError(401, "Invalid credentials in Authorization header")
        req = json.loads(body)
        self.created.append(req)
        repo_id = f"{req.get('organization') or USER}/{req['name']}"
        if repo_id in self.repos:  # the Hub names the existing repository in its 409 answer
            status, head, data = _json({"error": "You already created this model repo",
                                        "url": f"{self.url}/{repo_id}"}, 409)
            return status, {**head, "X-Error-Message": "You already created this model repo"}, data
        repo = self.repos[repo_id] = Repo(private=req.get("visibility") == "private")
        self._commit(repo, "main", "initial commit", {".gitattributes": GITATTRIBUTES}, set())
        return _json({"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _repo_info(self, repo: str, authorized: bool, rev: str = "main", **_):
        r = self._repo(repo, authorized)
        commit = r.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return _json({"id": repo, "sha": commit.oid, "private": r.private, "tags": [], "downloads": 0, "likes": 0,
                      "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

    def _create_branch(self, repo: str, authorized: bool, branch: str, body: bytes, **_):
        r = self._repo(repo, authorized, write=True)
        if branch in r.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        commit = r.resolve(start)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {start}", "RevisionNotFound")
        r.branches[branch] = commit.oid
        return _json({})

    def _preupload(self, repo: str, authorized: bool, rev: str, body: bytes, **_):
        r = self._repo(repo, authorized, write=True)
        if r.resolve(rev) is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        files = json.loads(body)["files"]
        return _json({"files": [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors")
                                 else "regular", "shouldIgnore": False, "oid": None} for f in files]})

    def _lfs_batch(self, repo: str, authorized: bool, body: bytes, **_):
        self._repo(repo, authorized, write=True)
        req = json.loads(body)
        objects = []
        for obj in req["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.url}/_lfs/upload/{obj['oid']}"},
                                    "verify": {"href": f"{self.url}/_lfs/verify/{obj['oid']}"}}
            objects.append(entry)
        return _json({"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str, body: bytes, **_):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its sha256")
        self.lfs_objects[oid] = body
        return _json({})

    def _lfs_verify(self, oid: str, authorized: bool, body: bytes, **_):
        if not authorized:
            raise HubError(401, "Invalid credentials in Authorization header")
        if oid not in self.lfs_objects or json.loads(body).get("size") != len(self.lfs_objects[oid]):
            raise HubError(404, f"LFS object {oid} was not uploaded")
        return _json({})

    def _create_commit(self, repo: str, authorized: bool, rev: str, body: bytes, query: dict, **_):
        r = self._repo(repo, authorized, write=True)
        if r.resolve(rev) is None or rev not in r.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        files: dict[str, bytes] = {}
        lfs: set[str] = set()
        for item in lines:
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(400, f"LFS object for {value['path']} was never uploaded")
                files[value["path"]] = self.lfs_objects[value["oid"]]
                lfs.add(value["path"])
            elif item["key"] != "header":
                raise HubError(400, f"unsupported commit operation {item['key']}")
        commit = self._commit(r, rev, header["summary"], files, lfs)
        return _json({"success": True, "commitOid": commit.oid, "commitUrl": f"{self.url}/{repo}/commit/{commit.oid}",
                      "pullRequestUrl": None})

    def _tree(self, repo: str, authorized: bool, rev: str, **_):
        commit = self._repo(repo, authorized).resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        entries = []
        for p, data in sorted(commit.files.items()):
            entry = {"type": "file", "path": p, "size": len(data), "oid": git_blob_sha(data)}
            if p in commit.lfs:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return _json(entries)

    def _resolve(self, repo: str, authorized: bool, rev: str, file: str, method: str, **_):
        commit = self._repo(repo, authorized).resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        if file not in commit.files:
            raise HubError(404, f"Entry not found: {file}", "EntryNotFound")
        data = commit.files[file]
        etag = hashlib.sha256(data).hexdigest() if file in commit.lfs else git_blob_sha(data)
        head = {"ETag": f'"{etag}"', "X-Repo-Commit": commit.oid, "Content-Type": "application/octet-stream"}
        return 200, head, data


def _json(obj, status: int = 200) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()


def _make_handler(server: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            body = self._body() if self.command in ("POST", "PUT") else b""
            status, headers, data = server.handle(self.command, parts.path, parse_qs(parts.query), self.headers, body)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_HEAD = _serve

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

    return Handler
