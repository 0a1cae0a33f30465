"""``hf://`` references, the ``HF_*`` settings, the local hub cache and the Hub's listing format.

Pure values and file-system lookups, no network (and so no aiohttp import): ``pull``, ``from_pretrained``
and ``hub.py``'s transport share them. See ``hub.py`` for how ``hf://`` sources are read.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import quote, unquote, urlsplit


from ..errors import ConfigError, FormatError
from ..format import INDEX_NAME, SINGLE_NAME, parse_index
from ..safe_files import read_regular

DEFAULT_ENDPOINT = "https://huggingface.co"
COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TRUE = {"1", "on", "yes", "true"}
MAX_LISTING_BYTES = 64 << 20
MAX_REDIRECTS = 5


def _origin(url: str) -> tuple[str, str]:
    parsed = urlsplit(url)
    return parsed.scheme, parsed.netloc


def _saved_token(path: str) -> str:
    """The token ``hf auth login`` saved (huggingface_hub reads it when no variable gives one), or ""."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            return f.read(4096)
    except (OSError, UnicodeDecodeError):
        return ""


@dataclass(frozen=True)
class HubSettings:
    """Where the Hub is, who we are and where its cache lives (from the ``HF_*`` variables)."""

    cache_dir: Path
    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = None
    offline: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "HubSettings":
        env = os.environ if environ is None else environ
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
        offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").strip().lower() in _TRUE
        endpoint = (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"HF_ENDPOINT must be an http(s) URL, got {endpoint!r}")
        token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or ""
        if not token.strip() and (env.get("HF_HUB_DISABLE_IMPLICIT_TOKEN") or "").strip().lower() not in _TRUE:
            token = _saved_token(env.get("HF_TOKEN_PATH") or os.path.join(home, "token"))  # `hf auth login`'s
        token = token.replace("\r", "").replace("\n", "").strip() or None  # as huggingface_hub cleans it
        return cls(Path(os.path.expandvars(cache)).expanduser(), endpoint, token, offline)


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf://`` URL. ``path`` is inside the repo; "" or ending in "/" names a folder."""

    repo_id: str
    revision: str | None = None  # None: the default branch
    path: str = ""

    @property
    def rev(self) -> str:
        return self.revision or "main"

    @property
    def is_dir(self) -> bool:
        return not self.path or self.path.endswith("/")

    @property
    def pinned(self) -> bool:
        return self.revision is not None and COMMIT.fullmatch(self.revision) is not None

    def url(self, path: str | None = None, revision: str | None = None) -> str:
        rev = revision or self.revision
        at = f"@{quote(rev, safe='')}" if rev else ""
        return f"hf://{self.repo_id}{at}/{self.path if path is None else path}"


def parse_hub_url(url: str) -> HubRef:
    """``hf://org/name[@revision][/path]``; a revision holding ``/`` is percent-encoded (``refs%2Fpr%2F1``)."""
    if not url.startswith("hf://"):
        raise ConfigError(f"not an hf:// URL: {url!r}")
    parts = url[5:].split("/")
    if parts and parts[0] == "models":
        parts = parts[1:]
    if len(parts) < 2:
        raise ConfigError(f"hf:// URLs name a repository as hf://org/name[@revision], got {url!r}")
    org, name = parts[0], parts[1]
    name, _, revision = name.partition("@")
    if not (_REPO_PART.fullmatch(org) and _REPO_PART.fullmatch(name)) or ".." in org + name:
        raise ConfigError(f"not a Hub repository id: {org}/{name!r} in {url!r}")
    path = "/".join(parts[2:])
    if path and (posixpath.normpath(path.rstrip("/")) != path.rstrip("/") or path.startswith("/")
                 or any(p in ("..", ".") for p in path.split("/"))):
        raise ConfigError(f"path {path!r} in {url!r} is not a plain path inside the repository")
    revision = unquote(revision) or None
    if revision is not None:
        check_revision(revision, url)
    return HubRef(f"{org}/{name}", revision, path)


def check_revision(revision: str, where: str) -> str:
    """A branch, tag, ``refs/pr/N`` or commit: a name git could hold. Anything else (``..``, a leading
    ``/``, empty parts) is refused: the revision names a file under ``refs/`` in the cache."""
    parts = revision.split("/")
    if (not isinstance(revision, str) or not revision or ".." in revision or "\\" in revision
            or any(p in ("", ".") for p in parts) or revision.endswith(".lock")
            or any(ord(c) < 0x20 or c == "\x7f" for c in revision)):
        raise ConfigError(f"not a revision name: {revision!r} in {where!r}")
    return revision


def with_revision(url: str, revision: str | None) -> str:
    """``url`` at ``revision`` (a ConfigError if the URL already names another one)."""
    if revision is None:
        return url
    check_revision(revision, url)
    ref = parse_hub_url(url)
    if ref.revision is not None and ref.revision != revision:
        raise ConfigError(f"{url} names revision {ref.revision!r} but revision={revision!r} was given")
    return ref.url(revision=revision)


# -- the local cache (huggingface_hub's layout) -----------------------------------------------------


def repo_cache_dir(cache_dir: Path, repo_id: str) -> Path:
    return Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def cached_commit(cache_dir: Path, ref: HubRef) -> str | None:
    """The commit ``ref``'s revision points to in the cache (``refs/<revision>``), if known."""
    repo = repo_cache_dir(cache_dir, ref.repo_id)
    if ref.pinned:
        return ref.revision
    try:
        commit = read_regular(repo / "refs" / ref.rev, 4096).decode("utf-8").strip()
    except (OSError, ValueError):
        return None
    return commit if COMMIT.fullmatch(commit) else None


def pull_record(repo: Path, commit: str) -> Path:
    """Where ``fastload pull`` notes which folders of a commit it completed, and their files
    (``{"folder": ["file", ...]}``): a folder with no index or model.safetensors, such as a diffusers ``unet/``,
    is then known to be whole. (Beside ``refs`` and ``snapshots``, where huggingface_hub looks at nothing.)"""
    return repo / ".fastload" / "pulled" / f"{commit}.json"


def _pulled(repo: Path, commit: str, folder: str) -> bool:
    """Whether a finished pull of ``folder`` (or of one above it) left every one of its files in the snapshot."""
    try:
        folders = json.loads(read_regular(pull_record(repo, commit), 1 << 20))
    except (OSError, ValueError):
        return False
    want = folder.strip("/")
    snapshot = repo / "snapshots" / commit
    for pulled, files in (folders.items() if isinstance(folders, dict) else ()):
        if pulled and want != pulled and not want.startswith(pulled + "/"):
            continue
        below = [f"{pulled}/{f}".lstrip("/") for f in files if isinstance(f, str)] if isinstance(files, list) else []
        below = [f for f in below if not want or f.startswith(want + "/")]
        if below and all((snapshot / f).is_file() for f in below):
            return True
    return False


def _listed_whole(repo: Path, commit: str, folder: str) -> bool:
    """Whether the commit's listing that huggingface_hub (2.x) keeps in ``trees/<commit>.json`` names
    ``*.safetensors`` files directly in ``folder``, and the snapshot has each at its listed size: a folder with no
    index or model.safetensors (a diffusers ``unet/``) that huggingface_hub fetched whole."""
    try:
        doc = json.loads(read_regular(repo / "trees" / f"{commit}.json", 64 << 20))
    except (OSError, ValueError):
        return False
    files = doc.get("files") if isinstance(doc, dict) and doc.get("format_version") == 1 else None
    if not isinstance(files, dict):
        return False
    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    snapshot = repo / "snapshots" / commit
    weights = [(path, info) for path, info in files.items() if path.startswith(prefix)
               and "/" not in path[len(prefix):] and path.endswith(".safetensors")]
    for path, info in weights:
        size = info.get("lfs_size") or info.get("size") if isinstance(info, dict) else None
        try:
            if not isinstance(size, int) or (snapshot / path).stat().st_size != size:
                return False
        except (OSError, ValueError):
            return False
    return bool(weights)


def _complete_checkpoint(folder: Path, index_name: str | None = None) -> bool:
    """The folder's whole checkpoint is there: the index ``index_name`` (default: the standard one, else
    model.safetensors) and every shard it names."""
    index = folder / (index_name or INDEX_NAME)
    if index.is_file():
        try:
            names = parse_index(index.read_bytes(), url=str(index)).files
        except (OSError, FormatError):
            return False
        return all((folder / name).is_file() for name in names)
    return index_name is None and (folder / SINGLE_NAME).is_file()


def cached_snapshot(cache_dir: Path, ref: HubRef) -> Path | None:
    """The local path for ``ref`` when the cache holds its whole checkpoint (else None)."""
    commit = cached_commit(cache_dir, ref)
    if commit is None:
        return None
    repo = repo_cache_dir(cache_dir, ref.repo_id)
    snapshot = repo / "snapshots" / commit
    target = snapshot / ref.path if ref.path else snapshot
    if ref.is_dir:
        whole = _complete_checkpoint(target) or _pulled(repo, commit, ref.path) or _listed_whole(repo, commit, ref.path)
        return target if whole else None
    if target.name.endswith(".index.json"):  # an index named directly: its shards must be there too
        return target if _complete_checkpoint(target.parent, target.name) else None
    return target if target.is_file() else None


# -- the Hub's HTTP API -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoFile:
    path: str
    size: int | None
    blob: str | None  # what huggingface_hub names the cached blob: the LFS sha256, else the git blob id
    sha256: str | None


@dataclass(frozen=True)
class RepoInfo:
    repo_id: str
    commit: str
    files: tuple[RepoFile, ...]


def parse_repo_info(doc: object, repo_id: str, url: str) -> RepoInfo:
    if not isinstance(doc, dict) or not isinstance(doc.get("sha"), str) or not COMMIT.fullmatch(doc["sha"]):
        raise FormatError(f"{url}: the Hub's answer has no commit sha")
    files = []
    siblings = doc.get("siblings") or []
    if not isinstance(siblings, list):
        raise FormatError(f"{url}: the Hub's file list is not a list")
    for sibling in siblings:
        if not isinstance(sibling, dict) or not isinstance(sibling.get("rfilename"), str):
            raise FormatError(f"{url}: malformed file entry {sibling!r}")
        lfs = sibling.get("lfs") if isinstance(sibling.get("lfs"), dict) else None
        sha256 = lfs.get("sha256") if lfs else None
        size = lfs.get("size") if lfs else sibling.get("size")
        blob = sha256 or sibling.get("blobId")
        if (sha256 is not None and not _SHA256.fullmatch(str(sha256))) or not (
                blob is None or COMMIT.fullmatch(str(blob)) or _SHA256.fullmatch(str(blob))):
            raise FormatError(f"{url}: file entry {sibling['rfilename']!r} has a malformed blob id")
        files.append(RepoFile(sibling["rfilename"], size if isinstance(size, int) else None, blob, sha256))
    return RepoInfo(repo_id, doc["sha"], tuple(files))


