"""A small Hub-compatible HTTP server on 127.0.0.1 for tests: the subset ``huggingface_hub`` uses.

Usage::

    with LocalHub() as hub:                  # hub.endpoint == "http://127.0.0.1:PORT"
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": tmp}
        subprocess.run([sys.executable, "client.py"], env=env)   # clients read HF_ENDPOINT at import

Model and dataset repos live in memory as git-like commits (a full file map per commit). Routes: create repo,
create branch/tag, preupload (every file "regular", sent inline in the commit), NDJSON commit,
repo info by revision, tree listing, and ``resolve`` (HEAD and GET) with the ``X-Repo-Commit``/``ETag``
headers the client checks. Unknown routes answer 404 and are recorded in ``hub.unhandled``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Repo:
    private: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}

    def resolve(self, revision: str) -> str | None:
        revision = unquote(revision)
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class LocalHub:
    """Start with ``with LocalHub() as hub`` or ``hub.start()`` / ``hub.stop()``."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.unhandled: list[str] = []
        self.validated_cards: list[dict] = []  # front matter of every README.md uploaded
        self.commit_count = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> LocalHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- repository operations --------------------------------------------------------------------
    def create(self, repo_id: str, private: bool) -> bool:
        with self._lock:
            if repo_id in self.repos:
                return False
            repo = Repo(private=private)
            sha = _sha(f"init {repo_id}")
            repo.commits[sha] = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            repo.refs["main"] = sha
            self.repos[repo_id] = repo
            return True

    def commit(self, repo_id: str, branch: str, files: dict[str, bytes], deleted: list[str], message: str) -> str:
        with self._lock:
            repo = self.repos[repo_id]
            tree = dict(repo.commits[repo.refs[branch]])
            for path in deleted:
                for key in [k for k in tree if k == path or (path.endswith("/") and k.startswith(path))]:
                    del tree[key]
            tree.update(files)
            self.commit_count += 1
            sha = _sha(f"{repo_id}|{branch}|{message}|{self.commit_count}")
            repo.commits[sha] = tree
            repo.refs[branch] = sha
            return sha


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _handler_for(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        # -- plumbing -------------------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  head: bool = False) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, data, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str, message: str, head: bool = False, **extra: str) -> None:
            self._send(status, json.dumps({"error": message}).encode(),
                       {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json",
                        **extra}, head=head)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                return self.rfile.read(n)
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return b""

        def _route(self) -> tuple[list[str], dict[str, list[str]]]:
            """The path's parts; a dataset repo's routes as a model repo's whose owner is ``datasets~OWNER``."""
            url = urlsplit(self.path)
            parts = url.path.strip("/").split("/")
            if parts[:2] == ["api", "datasets"] and len(parts) >= 3:
                parts = ["api", "models", f"datasets~{parts[2]}", *parts[3:]]
            elif parts[0] == "datasets" and len(parts) >= 2:
                parts = [f"datasets~{parts[1]}", *parts[2:]]
            return parts, parse_qs(url.query)

        def _repo(self, parts: list[str]) -> tuple[str, Repo | None]:
            repo_id = f"{parts[0]}/{parts[1]}"
            return repo_id, hub.repos.get(repo_id)

        # -- verbs ----------------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self._get(head=True)

        def do_GET(self) -> None:
            self._get(head=False)

        def _get(self, head: bool) -> None:
            parts, query = self._route()
            if len(parts) >= 4 and parts[0] != "api" and parts[2] == "resolve":
                return self._resolve(parts, head)
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, repo = self._repo(parts[2:4])
                if repo is None:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
                rest = parts[4:]
                if not rest or rest[0] == "revision":
                    return self._info(repo_id, repo, unquote(rest[1]) if len(rest) > 1 else "main", head)
                if rest[0] == "tree":
                    return self._tree(repo_id, repo, rest[1], "/".join(rest[2:]), query, head)
            if parts != ["api", "agent-harnesses"]:  # the client asks once a day and tolerates a 404
                hub.unhandled.append(f"GET {self.path}")
            self._error(404, "NotFound", f"unhandled GET {self.path}", head)

        def do_POST(self) -> None:
            parts, _ = self._route()
            body = self._body()
            if parts == ["api", "repos", "create"]:
                data = json.loads(body or b"{}")
                repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                url = f"{hub.endpoint}/{repo_id}"
                if data.get("type") == "dataset":
                    repo_id, url = f"datasets~{repo_id}", f"{hub.endpoint}/datasets/{repo_id}"
                if hub.create(repo_id, bool(data.get("private")) or data.get("visibility") == "private"):
                    return self._json(200, {"url": url, "name": data["name"]})
                return self._json(409, {"error": "You already created this model repo", "url": url})
            if parts == ["api", "validate-yaml"]:
                return self._validate_yaml(json.loads(body)["content"])
            if parts[:2] == ["api", "models"] and len(parts) >= 6:
                repo_id, repo = self._repo(parts[2:4])
                if repo is None:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                action, rev = parts[4], unquote("/".join(parts[5:]))
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if action == "commit":
                    return self._commit(repo_id, repo, rev, body)
                if action in ("branch", "tag"):
                    return self._ref(repo, action, rev, json.loads(body or b"{}"))
            hub.unhandled.append(f"POST {self.path}")
            self._error(404, "NotFound", f"unhandled POST {self.path}")

        # -- handlers -------------------------------------------------------------------------
        def _info(self, repo_id: str, repo: Repo, revision: str, head: bool) -> None:
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            files = repo.commits[sha]
            self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                             "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                             "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z",
                             "siblings": [{"rfilename": p} for p in sorted(files)]})

        def _validate_yaml(self, content: str) -> None:
            """The card's front matter must be a YAML mapping (the Hub checks much more)."""
            import yaml

            if content.startswith("---"):
                try:
                    meta = yaml.safe_load(content.split("---")[1])
                except yaml.YAMLError as e:
                    return self._json(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
                if not isinstance(meta, dict):
                    return self._json(400, {"errors": [{"message": "metadata must be a mapping"}]})
                hub.validated_cards.append(meta)
            self._json(200, {"errors": [], "warnings": []})

        def _tree(self, repo_id: str, repo: Repo, revision: str, path: str, query, head: bool) -> None:
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            path = unquote(path).strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            prefix = f"{path}/" if path else ""
            entries, dirs = [], set()
            for p, content in sorted(repo.commits[sha].items()):
                if not p.startswith(prefix):
                    continue
                rest = p[len(prefix):]
                if "/" in rest and not recursive:
                    dirs.add(prefix + rest.split("/")[0])
                    continue
                if recursive:
                    segs = rest.split("/")[:-1]
                    dirs.update(prefix + "/".join(segs[:i + 1]) for i in range(len(segs)))
                entries.append({"type": "file", "path": p, "size": len(content), "oid": _git_oid(content)})
            if path and not entries and not dirs:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", head)
            entries += [{"type": "directory", "path": d, "oid": _sha(d), "size": 0} for d in sorted(dirs)]
            self._json(200, entries)

        def _resolve(self, parts: list[str], head: bool) -> None:
            repo_id, repo = self._repo(parts)
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
            revision, path = unquote(parts[3]), unquote("/".join(parts[4:]))
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            files = repo.commits[sha]
            if path not in files:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", head,
                                   **{"X-Repo-Commit": sha})
            content = files[path]
            etag = f'"{_git_oid(content)}"'
            self._send(200, content, {"X-Repo-Commit": sha, "ETag": etag, "Content-Type": "application/octet-stream",
                                      "Accept-Ranges": "bytes"}, head=head)

        def _commit(self, repo_id: str, repo: Repo, revision: str, body: bytes) -> None:
            if revision not in repo.refs or repo.resolve(revision) != repo.refs.get(revision):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            files, deleted, message = {}, [], ""
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "header":
                    message = value.get("summary", "")
                elif item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    deleted.append(value["path"] + ("/" if item["key"] == "deletedFolder" else ""))
                else:
                    return self._error(400, "BadRequest", f"this test server accepts inline files only: {item['key']}")
            sha = hub.commit(repo_id, revision, files, deleted, message)
            url = f"{hub.endpoint}/{repo_id.replace('datasets~', 'datasets/')}/commit/{sha}"
            self._json(200, {"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None})

        def _ref(self, repo: Repo, kind: str, name: str, data: dict) -> None:
            if kind == "branch":
                if name in repo.refs:
                    return self._json(409, {"error": f"Reference already exists: {name}"})
                start = repo.resolve(data.get("startingPoint") or "main")
                repo.refs[name] = start
                return self._json(200, {})
            tag = data["tag"]
            if tag in repo.refs:
                return self._json(409, {"error": f"Tag already exists: {tag}"})
            sha = repo.resolve(name)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {name}")
            repo.refs[tag] = sha
            self._json(200, {})

    return Handler


def _git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
