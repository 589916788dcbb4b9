"""A fake Hugging Face Hub on 127.0.0.1 serving, in memory, the endpoints `datasets.push_to_hub` calls.

Implemented (dataset repos only, LFS basic transfer, no Xet: run clients with HF_HUB_DISABLE_XET=1):

    GET  /api/whoami-v2
    GET  /api/agent-harnesses                      (huggingface_hub's telemetry registry: empty)
    POST /api/repos/create
    GET  /api/datasets/{owner}/{name}[/revision/{rev}]
    POST /api/datasets/{owner}/{name}/branch/{branch}
    GET  /api/datasets/{owner}/{name}/refs
    POST /api/datasets/{owner}/{name}/preupload/{rev}
    POST /datasets/{owner}/{name}.git/info/lfs/objects/batch
    PUT  /lfs-upload/{sha256}                      (the upload href the batch answer points at)
    POST /api/validate-yaml
    POST /api/datasets/{owner}/{name}/commit/{rev}  (NDJSON: header, file, lfsFile, deletedFile, deletedFolder)
    GET  /api/datasets/{owner}/{name}/tree/{rev}[/{path}]
    POST /api/datasets/{owner}/{name}/paths-info/{rev}
    GET|HEAD /datasets/{owner}/{name}/resolve/{rev}/{path}

Tokens are never stored beyond the user table the test sets up, and request headers are not logged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".parquet", ".arrow", ".bin", ".safetensors")
GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.arrow filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class User:
    name: str
    role: str = "write"  # write, read or fineGrained
    orgs: dict[str, str] = field(default_factory=dict)  # org name -> roleInOrg
    scoped: list[dict] = field(default_factory=list)  # fine-grained scopes, as whoami-v2 reports them


@dataclass
class FileEntry:
    sha256: str
    size: int
    lfs: bool
    sha1: str = ""  # git blob id of a regular file's content

    def oid(self) -> str:
        """The git blob id the tree endpoint reports (of the pointer file, for LFS files)."""
        return git_blob_oid(lfs_pointer(self.sha256, self.size)) if self.lfs else self.sha1


@dataclass
class Repo:
    id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, FileEntry]] = field(default_factory=dict)
    messages: list[tuple[str, str]] = field(default_factory=list)  # (sha, summary), oldest first


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    status: int
    times: int
    headers: dict[str, str]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, dict(headers or {})


class FakeHub:
    """The in-memory Hub; use as a context manager, point HF_ENDPOINT at `.url`."""

    def __init__(self) -> None:
        self.users: dict[str, User] = {}
        self.repos: dict[str, Repo] = {}
        self.objects: dict[str, bytes] = {}  # sha256 -> content
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.RLock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- test API -----------------------------------------------------------------------

    def add_token(self, token: str, name: str, role: str = "write", orgs: dict[str, str] | None = None, scoped: list[dict] | None = None) -> None:
        self.users[token] = User(name, role, dict(orgs or {}), list(scoped or []))

    def fail(self, method: str, pattern: str, status: int, times: int = 1, headers: dict[str, str] | None = None) -> None:
        """Answer the next `times` matching requests with `status` (e.g. a 500 on the commit endpoint)."""
        self.faults.append(Fault(method.upper(), re.compile(pattern), status, times, dict(headers or {})))

    def create_repo(self, repo_id: str, private: bool = True, files: dict[str, bytes] | None = None) -> Repo:
        with self.lock:
            repo = Repo(repo_id, private)
            self.repos[repo_id] = repo
            self._commit(repo, "main", {".gitattributes": self._store(".gitattributes", GITATTRIBUTES)}, "initial commit")
            if files:
                head = dict(repo.commits[repo.branches["main"]])
                head.update({path: self._store(path, content) for path, content in files.items()})
                self._commit(repo, "main", head, "seed files")
            return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content of a repo at a branch or commit."""
        repo = self.repos[repo_id]
        sha = repo.branches.get(revision, revision)
        return {path: self.objects[e.sha256] for path, e in repo.commits[sha].items()}

    def count(self, method: str, pattern: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and re.search(pattern, p))

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ---- internals ----------------------------------------------------------------------

    def _store(self, path: str, content: bytes, lfs: bool | None = None) -> FileEntry:
        sha256 = hashlib.sha256(content).hexdigest()
        self.objects[sha256] = content
        if lfs is None:
            lfs = path.endswith(LFS_SUFFIXES)
        return FileEntry(sha256, len(content), lfs, git_blob_oid(content))

    def _commit(self, repo: Repo, branch: str, files: dict[str, FileEntry], summary: str) -> str:
        self._counter += 1
        parent = repo.branches.get(branch, "")
        sha = hashlib.sha1(f"{repo.id}:{parent}:{self._counter}:{summary}".encode()).hexdigest()
        repo.commits[sha] = files
        repo.branches[branch] = sha
        repo.messages.append((sha, summary))
        return sha

    def _namespaces(self, user: User) -> set[str]:
        return {user.name, *user.orgs}

    def _can_read(self, user: User | None, repo: Repo) -> bool:
        return not repo.private or (user is not None and repo.id.split("/")[0] in self._namespaces(user))

    def _check_write(self, user: User | None, repo_id: str) -> None:
        owner = repo_id.split("/")[0]
        if user is None:
            raise HubError(401, "You must be authenticated to write", None)
        if user.role == "read":
            raise HubError(403, "You have read access but not the required permissions for this operation")
        if owner not in self._namespaces(user) or user.orgs.get(owner) == "read":
            raise HubError(403, f"You don't have the rights to write to the namespace {owner}")
        if user.role == "fineGrained" and not any(
            "repo.write" in s.get("permissions", []) and s.get("entity", {}).get("name") in (owner, repo_id) for s in user.scoped
        ):
            raise HubError(403, "This fine-grained token has no write permission for this repo")

    def _repo(self, user: User | None, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or not self._can_read(user, repo):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, revision: str) -> tuple[str, dict[str, FileEntry]]:
        sha = repo.branches.get(revision, revision)
        if sha not in repo.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha, repo.commits[sha]

    def whoami(self, user: User) -> dict:
        access: dict[str, Any] = {"displayName": "test token", "role": user.role, "createdAt": "2025-01-01T00:00:00.000Z"}
        if user.role == "fineGrained":
            access["fineGrained"] = {"canReadGatedRepos": False, "global": [], "scoped": user.scoped}
        return {
            "type": "user", "id": hashlib.md5(user.name.encode()).hexdigest()[:24], "name": user.name, "fullname": user.name.title(),
            "orgs": [{"type": "org", "name": org, "roleInOrg": role} for org, role in user.orgs.items()],
            "auth": {"type": "access_token", "accessToken": access},
        }


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    # Headers and body leave in one send: split writes meet delayed ACKs and cost ~40 ms per request.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    # ---- plumbing -----------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._status = status

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _error(self, err: HubError) -> None:
        extra = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            extra["X-Error-Code"] = err.code
        self._json(err.status, {"error": err.message}, headers=extra)

    def _user(self) -> User | None:
        auth = self.headers.get("Authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        user = self.hub.users.get(auth[7:].strip())
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _handle(self, method: str) -> None:
        self._status = 0
        raw_path = urlsplit(self.path).path
        query = parse_qs(urlsplit(self.path).query)
        body = self._body() if method in ("POST", "PUT") else b""
        hub = self.hub
        try:
            with hub.lock:
                for fault in hub.faults:
                    if fault.times > 0 and fault.method in (method, "*") and fault.pattern.search(raw_path):
                        fault.times -= 1
                        raise HubError(fault.status, f"injected failure {fault.status}", headers=fault.headers) from None
            segments = [unquote(s) for s in raw_path.strip("/").split("/")]
            self._route(method, segments, query, body)
        except HubError as err:
            self._error(err)
        except Exception as exc:  # a bug in the fake: answer 599 so the test sees it, and remember it
            hub.unhandled.append((method, f"{raw_path}: {type(exc).__name__}: {exc}"))
            self._json(599, {"error": f"fake hub bug: {exc}"})
        finally:
            hub.requests.append((method, raw_path, self._status))

    def _route(self, method: str, s: list[str], query: dict, body: bytes) -> None:
        hub = self.hub
        if s[:2] == ["api", "whoami-v2"] and method == "GET":
            user = self._user()
            if user is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            return self._json(200, hub.whoami(user))
        if s[:2] == ["api", "agent-harnesses"] and method == "GET":  # huggingface_hub's best-effort agent telemetry
            return self._json(200, {"standardEnvVars": [], "harnesses": {}})
        if s[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._json(200, {"errors": [], "warnings": []})
        if s[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create(json.loads(body or b"{}"))
        if s[:2] == ["api", "datasets"] and len(s) >= 4:
            repo_id = f"{s[2]}/{s[3]}"
            rest = s[4:]
            user = self._user()
            if not rest or rest[0] == "revision":
                if method != "GET":
                    raise HubError(405, "method not allowed")
                return self._info(user, repo_id, rest[1] if len(rest) > 1 else "main")
            action = rest[0]
            if action == "branch" and method == "POST":
                return self._branch(user, repo_id, "/".join(rest[1:]), json.loads(body or b"{}"))
            if action == "refs" and method == "GET":
                repo = hub._repo(user, repo_id)
                return self._json(200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in repo.branches.items()],
                                        "converts": [], "tags": []})
            if action == "preupload" and method == "POST":
                return self._preupload(user, repo_id, rest[1], json.loads(body))
            if action == "commit" and method == "POST":
                return self._commit(user, repo_id, rest[1], body)
            if action == "tree" and method == "GET":
                return self._tree(user, repo_id, rest[1], "/".join(rest[2:]), query)
            if action == "paths-info" and method == "POST":
                form = parse_qs(body.decode())
                return self._paths_info(user, repo_id, rest[1], form.get("paths", []))
        if s[:1] == ["datasets"] and len(s) >= 4 and s[2].endswith(".git") and s[3:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(self._user(), f"{s[1]}/{s[2][:-4]}", json.loads(body))
        if s[:1] == ["lfs-upload"] and method == "PUT":
            return self._lfs_upload(s[1], body)
        if s[:1] == ["datasets"] and len(s) >= 6 and s[3] == "resolve" and method in ("GET", "HEAD"):
            return self._download(self._user(), f"{s[1]}/{s[2]}", s[4], "/".join(s[5:]))
        self.hub.unhandled.append((method, "/".join(s)))
        raise HubError(404, f"fake hub: no route for {method} /{'/'.join(s)}")

    # ---- endpoints ----------------------------------------------------------------------

    def _create(self, payload: dict) -> None:
        hub = self.hub
        user = self._user()
        if payload.get("type") != "dataset":
            raise HubError(400, "the fake hub only hosts datasets")
        owner = payload.get("organization") or (user.name if user else "")
        repo_id = f"{owner}/{payload['name']}"
        hub._check_write(user, repo_id)
        with hub.lock:
            if repo_id in hub.repos:
                raise HubError(409, "You already created this dataset repo")
            hub.create_repo(repo_id, private=payload.get("visibility", "public") == "private" or payload.get("private") is True)
        self._json(200, {"url": f"{hub.url}/datasets/{repo_id}", "name": repo_id, "id": repo_id})

    def _info(self, user: User | None, repo_id: str, revision: str) -> None:
        hub = self.hub
        with hub.lock:
            repo = hub._repo(user, repo_id)
            sha, files = hub._resolve(repo, revision)
            self._json(200, {
                "id": repo_id, "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "author": repo_id.split("/")[0], "sha": sha,
                "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                "lastModified": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                "createdAt": "2025-01-01T00:00:00.000Z",
                "siblings": [{"rfilename": path} for path in sorted(files)],
            })

    def _branch(self, user: User | None, repo_id: str, branch: str, payload: dict) -> None:
        hub = self.hub
        with hub.lock:
            repo = hub._repo(user, repo_id)
            hub._check_write(user, repo_id)
            if branch in repo.branches:
                raise HubError(409, "Reference already exists")
            start, files = hub._resolve(repo, payload.get("startingPoint") or "main")
            repo.branches[branch] = start
        self._json(200, {})

    def _preupload(self, user: User | None, repo_id: str, revision: str, payload: dict) -> None:
        hub = self.hub
        with hub.lock:
            repo = hub._repo(user, repo_id)
            hub._check_write(user, repo_id)
            _, files = hub._resolve(repo, revision)
            answer = []
            for f in payload.get("files", []):
                path = f["path"]
                lfs = path.endswith(LFS_SUFFIXES) or int(f.get("size", 0)) > 10_000_000
                existing = files.get(path)
                oid = None
                if existing is not None and existing.lfs == lfs:
                    oid = existing.sha256 if lfs else existing.sha1
                answer.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": answer, "commitOid": repo.branches.get(revision, revision)})

    def _lfs_batch(self, user: User | None, repo_id: str, payload: dict) -> None:
        hub = self.hub
        with hub.lock:
            hub._repo(user, repo_id)
            hub._check_write(user, repo_id)
            objects = []
            for obj in payload.get("objects", []):
                item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in hub.objects:  # already stored: no actions, the client skips the upload
                    item["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}", "header": {}, "expires_in": 3600}}
                objects.append(item)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its oid")
        with self.hub.lock:
            self.hub.objects[oid] = body
        self._send(200, b"")

    def _commit(self, user: User | None, repo_id: str, revision: str, body: bytes) -> None:
        hub = self.hub
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((item["value"] for item in lines if item["key"] == "header"), {})
        with hub.lock:
            repo = hub._repo(user, repo_id)
            hub._check_write(user, repo_id)
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            head = repo.branches[revision]
            if header.get("parentCommit") and header["parentCommit"] != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[head])
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "file":
                    files[value["path"]] = hub._store(value["path"], base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    if value["oid"] not in hub.objects:
                        raise HubError(422, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = FileEntry(value["oid"], len(hub.objects[value["oid"]]), True, "")
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for path in [p for p in files if p.startswith(prefix)]:
                        del files[path]
            sha = hub._commit(repo, revision, files, header.get("summary", ""))
        self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{hub.url}/datasets/{repo_id}/commit/{sha}", "pullRequestUrl": None})

    def _entry(self, path: str, e: FileEntry) -> dict:
        out: dict[str, Any] = {"type": "file", "oid": e.oid(), "size": e.size, "path": path}
        if e.lfs:
            out["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
        return out

    def _listing(self, files: dict[str, FileEntry], prefix: str, recursive: bool) -> list[dict]:
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        out: dict[str, dict] = {}
        for path, e in sorted(files.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base):].split("/")
            for depth in range(1, len(parts)):
                folder = base + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in out:
                    out[folder] = {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "path": folder}
            if recursive or len(parts) == 1:
                out[path] = self._entry(path, e)
        return list(out.values())

    def _tree(self, user: User | None, repo_id: str, revision: str, path: str, query: dict) -> None:
        hub = self.hub
        with hub.lock:
            repo = hub._repo(user, repo_id)
            _, files = hub._resolve(repo, revision)
            recursive = (query.get("recursive") or ["false"])[0].lower() in ("1", "true")
            if path and not any(p.startswith(path.strip("/") + "/") for p in files):
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
            self._json(200, self._listing(files, path, recursive))

    def _paths_info(self, user: User | None, repo_id: str, revision: str, paths: list[str]) -> None:
        hub = self.hub
        with hub.lock:
            repo = hub._repo(user, repo_id)
            _, files = hub._resolve(repo, revision)
            out = []
            for path in paths:
                path = path.strip("/")
                if path in files:
                    out.append(self._entry(path, files[path]))
                elif any(p.startswith(path + "/") for p in files):
                    out.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "path": path})
            self._json(200, out)

    def _download(self, user: User | None, repo_id: str, revision: str, path: str) -> None:
        hub = self.hub
        with hub.lock:
            repo = hub._repo(user, repo_id)
            sha, files = hub._resolve(repo, revision)
            entry = files.get(path)
            if entry is None:
                raise HubError(404, "Entry not found", "EntryNotFound")
            content = hub.objects[entry.sha256]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.sha256 if entry.lfs else entry.sha1}"', "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers |= {"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)}
        match = re.match(r"bytes=(\d*)-(\d*)$", self.headers.get("Range", "") or "")
        if match:
            start = int(match.group(1) or 0)
            end = min(int(match.group(2)) if match.group(2) else len(content) - 1, len(content) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            return self._send(206, content[start:end + 1], content_type="application/octet-stream", headers=headers)
        self._send(200, content, content_type="application/octet-stream", headers=headers)
