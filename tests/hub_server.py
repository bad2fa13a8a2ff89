"""A stand-in for the Hugging Face Hub on 127.0.0.1, speaking the part of the Hub HTTP API that
huggingface_hub's `create_repo`, `create_branch`, `repo_info`, `create_commit` (preupload, LFS batch +
basic transfer + verify, ndjson commit) and `list_repo_files` use. It keeps repos in memory: branches
point at commits, each commit holds the full file table {path: entry}. It does not advertise Xet (clients
must run with `HF_HUB_DISABLE_XET`), so files go through plain LFS or inline in the commit.

Answers follow the real Hub where the client depends on them: the preupload endpoint returns each file's
upload mode and, for files already on the revision, their `oid` (sha256 for LFS files, git blob sha1 for
regular ones), which is what lets the client skip unchanged files; 404s carry `X-Error-Code`; a 409 on
repo creation carries the repo `url`. Every request is recorded (method, path, Authorization header).

Hostile modes, to test interrupted and lost pushes:
- `fail_lfs_upload(sha256, how)`: the PUT of one LFS object answers HTTP 500 or drops the connection.
- `fail_commit(how, apply=True)`: the commit endpoint applies the commit (or, with `apply=False`, does not)
  and then answers HTTP 500 (`"500"`), drops the connection without an answer (`"drop"`) or never answers
  (`"hang"`).
- `hang_requests(pattern=None)`: requests whose `"METHOD /path"` matches the regex (every request when
  `None`) are accepted and never answered: the handler waits, without reading the body, until the server
  stops. Each hung request is recorded in `state.hung` as (method, path, `time.monotonic()` of arrival).
The commit history of a branch is served as `list_repo_commits` reads it (`/api/models/R/commits/REV`,
newest first, with each commit's title and full message), in one page.

Downloads (`snapshot_download`, `hf_hub_download`): `repo_info`, the recursive tree listing and
`HEAD`/`GET /R/resolve/REV/PATH` at a branch or a full commit sha, with the headers the client reads
(`X-Repo-Commit`, `ETag`, and for LFS files `X-Linked-Etag`/`X-Linked-Size`).
"""

import base64
import contextlib
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "navil-tester"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".gguf", ".msgpack", ".h5", ".zip", ".tar.gz")
LFS_MIN_SIZE = 10 * 1024 * 1024  # larger files go to LFS whatever their name (as the Hub's rules do)
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_blob_oid(content):
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def is_lfs(path, size):
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE


@dataclass
class Entry:
    size: int
    sha256: str
    blob_oid: str  # git oid: of the content (regular) or of the LFS pointer file
    lfs: bool
    content: bytes = b""  # regular files only; LFS content lives in the server's LFS store


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str  # the summary (first line)
    files: dict  # path -> Entry (the whole tree at this commit)
    added: list = field(default_factory=list)  # paths sent in the commit payload
    deleted: list = field(default_factory=list)
    description: str = ""


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict = field(default_factory=dict)  # name -> commit oid
    commits: dict = field(default_factory=dict)  # oid -> Commit

    def head(self, revision):
        return self.commits[self.branches[revision]]

    def history(self, revision="main"):
        """Commits of a branch, newest first."""
        commit, out = self.head(revision), []
        while commit is not None:
            out.append(commit)
            commit = self.commits.get(commit.parent)
        return out


def lfs_entry(sha256, size):
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    return Entry(size=size, sha256=sha256, blob_oid=git_blob_oid(pointer), lfs=True)


def regular_entry(content):
    return Entry(
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        blob_oid=git_blob_oid(content),
        lfs=False,
        content=content,
    )


class HubState:
    def __init__(self, token):
        self.token = token
        self.lock = threading.Lock()
        self.repos = {}
        self.lfs_store = {}  # sha256 -> bytes
        self.requests = []  # (method, path, authorization header or None)
        self.create_payloads = []
        self.fail_lfs = {}  # sha256 -> "500" | "drop"
        self.lfs_put_attempts = {}  # sha256 -> count
        self.commit_failure = None  # (how: "500" | "drop" | "hang", apply: bool) or None
        self.hang = None  # compiled regex on "METHOD /path" of requests never to answer, or None
        self.hung = []  # (method, path, time.monotonic()) of each request left unanswered
        self.released = threading.Event()  # set when the server stops: hung handlers return
        self.base_url = None

    def new_commit(self, repo, parent, message, files, added=(), deleted=(), description=""):
        digest = hashlib.sha1()
        digest.update(f"{parent}\n{message}\n".encode())
        for path in sorted(files):
            digest.update(f"{path} {files[path].blob_oid}\n".encode())
        digest.update(str(len(repo.commits)).encode())
        commit = Commit(digest.hexdigest(), parent, message, files, sorted(added), sorted(deleted), description)
        repo.commits[commit.oid] = commit
        return commit


class HubError(Exception):
    def __init__(self, status, message, code=None, extra=None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class NoAnswer(Exception):
    """Raised by a handler that has dealt with the connection itself (dropped it, or left it unanswered)."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState = None  # set per server

    def log_message(self, format, *args):  # quiet
        pass

    # -------------------------------------------------------------------------------- plumbing

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send_bytes(self, status, body, headers, head=False):
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send(self, status, payload=None, headers=None):
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _handle(self, method):
        state = self.state
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        with state.lock:
            state.requests.append((method, path, self.headers.get("Authorization")))
        if state.hang is not None and state.hang.fullmatch(f"{method} {path}"):
            return self._no_answer("hang", method, path)  # accepted, body left unread, never answered
        body = self._body()
        try:
            if path.startswith("/__lfs/"):
                return self._lfs_storage(method, path, body)
            self._authenticate()
            resolve = re.fullmatch(rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", path)
            if resolve and method in ("GET", "HEAD"):
                return self.resolve(head=method == "HEAD", **resolve.groupdict())
            for pattern, handler in ROUTES:
                match = re.fullmatch(pattern[1], path)
                if match and pattern[0] == method:
                    status, payload = handler(self, body=body, query=query, **match.groupdict())
                    return self._send(status, payload)
            raise HubError(404, f"no route for {method} {path}")
        except NoAnswer:
            return
        except HubError as e:
            headers = {"X-Error-Code": e.code} if e.code else {}
            headers["X-Error-Message"] = e.message
            self._send(e.status, {"error": e.message, **e.extra}, headers)

    def _no_answer(self, how, method=None, path=None):
        """Drop the connection at once (`"drop"`) or after the server stops (`"hang"`), with no answer."""
        self.close_connection = True
        if how == "hang":
            with self.state.lock:
                self.state.hung.append((method or self.command, path or urlsplit(self.path).path, time.monotonic()))
            self.state.released.wait()
        try:
            self.connection.shutdown(2)
        except OSError:
            pass

    def _fail_commit(self, how):
        if how == "500":
            raise HubError(500, "Internal Error (injected)")
        self._no_answer(how)
        raise NoAnswer

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_HEAD(self):
        self._handle("HEAD")

    def _authenticate(self):
        expected = f"Bearer {self.state.token}"
        if self.headers.get("Authorization") != expected:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id):
        repo = self.state.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _branch(self, repo, revision):
        revision = unquote(revision)
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return revision

    def _at(self, repo, revision):
        """The commit a branch name or a full commit sha names."""
        revision = unquote(revision)
        if revision in repo.commits:
            return repo.commits[revision]
        return repo.head(self._branch(repo, revision))

    # -------------------------------------------------------------------------------- API

    def create_repo(self, body, **_):
        payload = json.loads(body)
        self.state.create_payloads.append(payload)
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.state.base_url}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                raise HubError(409, "You already created this model repo", extra={"url": url})
            repo = Repo(repo_id, private=payload.get("visibility") == "private")
            first = self.state.new_commit(
                repo, None, "initial commit", {".gitattributes": regular_entry(GITATTRIBUTES)}
            )
            repo.branches["main"] = first.oid
            self.state.repos[repo_id] = repo
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def create_branch(self, repo, revision, body, **_):
        repo = self._repo(repo)
        branch = unquote(revision)
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        with self.state.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = repo.branches[self._branch(repo, start)]
        return 200, {}

    def repo_info(self, repo, revision="main", **_):
        repo = self._repo(repo)
        commit = repo.head(self._branch(repo, revision))
        return 200, {
            "id": repo.repo_id,
            "sha": commit.oid,
            "private": repo.private,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        }

    def commits(self, repo, revision, **_):
        repo = self._repo(repo)
        return 200, [
            {
                "id": c.oid,
                "title": c.message,
                "message": c.message + (f"\n\n{c.description}" if c.description else ""),
                "authors": [{"user": USER}],
                "date": "2025-01-01T00:00:00.000Z",
            }
            for c in repo.history(self._branch(repo, revision))
        ]

    def tree(self, repo, revision, **_):
        repo = self._repo(repo)
        commit = self._at(repo, revision)
        entries = []
        for path, entry in sorted(commit.files.items()):
            item = {"type": "file", "path": path, "size": entry.size, "oid": entry.blob_oid}
            if entry.lfs:
                item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
            entries.append(item)
        return 200, entries

    def resolve(self, repo, revision, path, head):
        repo = self._repo(repo)
        commit = self._at(repo, revision)
        entry = commit.files.get(unquote(path))
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.blob_oid}"'}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        body = self.state.lfs_store[entry.sha256] if entry.lfs else entry.content
        self._send_bytes(200, body, headers, head=head)

    def validate_yaml(self, **_):
        return 200, {"errors": [], "warnings": []}

    def preupload(self, repo, revision, body, **_):
        repo = self._repo(repo)
        files = repo.head(self._branch(repo, revision)).files
        answer = []
        for item in json.loads(body)["files"]:
            mode = "lfs" if is_lfs(item["path"], item["size"]) else "regular"
            existing = files.get(item["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.blob_oid
            answer.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return 200, {"files": answer, "commitOid": repo.branches[unquote(revision)]}

    def lfs_batch(self, repo, body, **_):
        self._repo(repo)
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            raise HubError(400, "only uploads are supported here")
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs_store:
                entry["actions"] = {
                    "upload": {"href": f"{self.state.base_url}/__lfs/upload/{obj['oid']}"},
                    "verify": {"href": f"{self.state.base_url}/__lfs/verify"},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}

    def _lfs_storage(self, method, path, body):
        state = self.state
        if method == "PUT" and path.startswith("/__lfs/upload/"):  # a presigned URL: no Authorization needed
            oid = path.rsplit("/", 1)[1]
            with state.lock:
                state.lfs_put_attempts[oid] = state.lfs_put_attempts.get(oid, 0) + 1
            failure = state.fail_lfs.get(oid)
            if failure == "drop":
                self.close_connection = True
                self.connection.shutdown(2)  # no response at all
                return
            if failure == "500":
                return self._send(500, {"error": "Internal Error (injected)"})
            if hashlib.sha256(body).hexdigest() != oid:
                return self._send(400, {"error": "content does not match the oid"})
            with state.lock:
                state.lfs_store[oid] = body
            return self._send(200)
        if method == "POST" and path == "/__lfs/verify":
            self._authenticate()
            obj = json.loads(body)
            if obj["oid"] not in state.lfs_store:
                return self._send(404, {"error": "object not uploaded"})
            return self._send(200, {})
        return self._send(404, {"error": "unknown LFS path"})

    def commit(self, repo, revision, body, query, **_):
        if query.get("create_pr"):
            raise HubError(400, "pull requests are not supported here")
        repo = self._repo(repo)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]
        if header.get("key") != "header":
            raise HubError(400, "the first ndjson line must be the header")
        how, apply = self.state.commit_failure or (None, True)
        if how is not None and not apply:
            self._fail_commit(how)
        with self.state.lock:
            branch = self._branch(repo, revision)
            head = repo.head(branch)
            parent = header["value"].get("parentCommit")
            if parent is not None and not head.oid.startswith(parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files, added, deleted = dict(head.files), [], []
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = regular_entry(base64.b64decode(value["content"]))
                    added.append(value["path"])
                elif key == "lfsFile":
                    if value["oid"] not in self.state.lfs_store:
                        raise HubError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    files[value["path"]] = lfs_entry(value["oid"], len(self.state.lfs_store[value["oid"]]))
                    added.append(value["path"])
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    deleted.append(value["path"])
                else:
                    raise HubError(400, f"unsupported commit operation {key}")
            summary, description = header["value"]["summary"], header["value"].get("description") or ""
            commit = self.state.new_commit(repo, head.oid, summary, files, added, deleted, description)
            repo.branches[branch] = commit.oid
        if how is not None:
            self._fail_commit(how)  # applied, and then the answer is an error or none
        url = f"{self.state.base_url}/{repo.repo_id}/commit/{commit.oid}"
        return 200, {"success": True, "commitOid": commit.oid, "commitUrl": url}


ROUTES = [
    (("POST", r"/api/repos/create"), Handler.create_repo),
    (("POST", rf"/api/models/{REPO}/branch/(?P<revision>[^/]+)"), Handler.create_branch),
    (("GET", rf"/api/models/{REPO}"), Handler.repo_info),
    (("GET", rf"/api/models/{REPO}/revision/(?P<revision>[^/]+)"), Handler.repo_info),
    (("GET", rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)"), Handler.tree),
    (("GET", rf"/api/models/{REPO}/commits/(?P<revision>[^/]+)"), Handler.commits),
    (("POST", r"/api/validate-yaml"), Handler.validate_yaml),
    (("POST", rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)"), Handler.preupload),
    (("POST", rf"/{REPO}\.git/info/lfs/objects/batch"), Handler.lfs_batch),
    (("POST", rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)"), Handler.commit),
]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # dropped connections are part of the tests
        pass


class HubServer:
    """`with HubServer(token) as hub:` -- serves on an ephemeral port of 127.0.0.1; `hub.url`, `hub.state`."""

    def __init__(self, token):
        self.state = HubState(token)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = _QuietServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.state.base_url = self.url
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.state.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def requests(self):
        return list(self.state.requests)

    def repo(self, repo_id):
        return self.state.repos[repo_id]

    def fail_lfs_upload(self, sha256, how="500"):
        self.state.fail_lfs[sha256] = how

    def fail_commit(self, how="500", apply=True):
        """Every commit request is applied (or not) and then answered badly: `how` is "500", "drop" or "hang"."""
        assert how in ("500", "drop", "hang"), how
        self.state.commit_failure = (how, apply)

    def hang_requests(self, pattern=None):
        """Leave requests matching `pattern` ("METHOD /path" regex; all when None) unanswered."""
        self.state.hang = re.compile(pattern or ".*")


@contextlib.contextmanager
def pointed_hub(token, monkeypatch, home):
    """A `HubServer` with huggingface_hub pointed at it for the test (`monkeypatch`): the environment and,
    since huggingface_hub reads them at import, its constants; Xet and telemetry off, `HF_TOKEN` set, no
    saved login, its token files and download cache under `home`."""
    from huggingface_hub import constants

    with HubServer(token) as server:
        env = {"HF_ENDPOINT": server.url, "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        patches = {
            "ENDPOINT": server.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_OFFLINE": False,
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
            "AGENT_HARNESSES_PATH": str(home / "agent_harnesses.json"),
            "HF_HUB_CACHE": str(home / "hub"),
        }
        for name, value in patches.items():
            monkeypatch.setattr(constants, name, value)
        yield server
