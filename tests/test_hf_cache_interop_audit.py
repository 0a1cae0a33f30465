"""Audit: fastload and huggingface_hub sharing one Hugging Face cache.

``fastload pull hf://...`` writes the cache layout itself (``pull.HubLayout``) and ``hf://`` loads read a cached
snapshot (``hub_refs.cached_snapshot``); users run huggingface_hub (``snapshot_download``, ``hf_hub_download``,
``scan_cache_dir``, ``delete_revisions``) and transformers against the same folder, at the same time or one after
the other. Real components only: the stand-in Hub on loopback (``hub_server.HubServer``), huggingface_hub itself,
fastload pulls in threads and in killed subprocesses. Nothing inside fastload is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from checkpoints import llama_config, llama_like_tensors, write_sharded, write_single
from hub_server import HubServer, hub, hub_session, repo_name  # noqa: F401 -- fixtures
from safetensors.torch import load_file

import fastload
from fastload import LoadConfig

SMALL = LoadConfig(chunk_bytes=64 << 10, max_concurrency=2)
TESTS = Path(__file__).resolve().parent


def folder_of(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def model_repo(directory: Path, seed: int = 0, layers: int = 2, hidden: int = 128) -> Path:
    """A tiny Llama (two shards and an index, ~1.5 MiB), its config and a tokenizer-ish file."""
    write_sharded(directory, llama_like_tensors(layers=layers, hidden=hidden, intermediate=352, seed=seed), 2,
                  metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(llama_config(layers=layers, hidden=hidden, intermediate=352)))
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0", "seed": seed}))
    return directory


def reference(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def scan(cache: Path):
    from huggingface_hub import scan_cache_dir

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return scan_cache_dir(cache)


def assert_whole_cache(cache: Path, repo: str, commit: str, src: Path, refs: dict[str, str]) -> None:
    """The snapshot holds every file of ``src`` as a relative symlink into blobs/ with the source's bytes; no
    temporary or partial file anywhere in the repository folder; refs as given; huggingface_hub sees it whole."""
    folder = folder_of(cache, repo)
    snapshot = folder / "snapshots" / commit
    want = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    got = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if not p.is_dir()}
    assert got == set(want), sorted(got ^ set(want))
    for name, data in want.items():
        link = snapshot / name
        assert link.is_symlink(), name
        target = os.readlink(link)
        assert not os.path.isabs(target) and target.startswith("../") and "/blobs/" in target, (name, target)
        assert link.resolve().parent == (folder / "blobs").resolve(), name
        assert link.read_bytes() == data, name
    stray = [p.relative_to(folder).as_posix() for p in folder.rglob("*")
             if "incomplete" in p.name or p.name.endswith((".journal", ".tmp")) or p.name.startswith("tmp_")]
    assert stray == [], stray
    for ref, value in refs.items():
        assert (folder / "refs" / ref).read_text() == value, ref
    info = scan(cache)
    assert info.warnings == [], [str(w) for w in info.warnings]
    [cached] = [r for r in info.repos if r.repo_id == repo]
    revision = next(r for r in cached.revisions if r.commit_hash == commit)
    assert {f.file_path.relative_to(snapshot).as_posix() for f in revision.files} == set(want)


def hf_env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS"))}
    env.update(HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf-home"), **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS)])
    return env


def transformers_offline(cache: Path, repo: str, src: Path) -> None:
    """Plain transformers, from the cache only (local_files_only): the model it builds holds the source's
    exact weights."""
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(repo, cache_dir=cache, local_files_only=True)
    state = model.state_dict()
    want = reference(src)
    assert [n for n, t in want.items() if not torch.equal(state[n], t)] == []


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def lfs_bodies(hub: HubServer) -> list[str]:
    return [r.path for r in hub.log if r.method == "GET" and r.path.startswith("/lfs/")]


# -- both tools writing one repository at the same time -----------------------------------------------------


def test_snapshot_download_while_fastload_pulls_the_same_revision(hub: HubServer, tmp_path: Path) -> None:
    """snapshot_download runs while a fastload pull of the same commit is part-way through (its chunks held back
    by a slow CDN). Both finish with the same snapshot path; the cache is whole and correct; fastload offline
    and plain transformers offline read the source's exact weights."""
    from huggingface_hub import snapshot_download

    cache = tmp_path / "hf-cache"
    src = model_repo(tmp_path / "src")
    repo = repo_name("both")
    commit = hub.add_repo(repo, src)
    hub.faults.slow_first_byte(0.2, path="/lfs/*")
    started = threading.Event()
    outcome: dict[str, object] = {}

    def progress(done: int, total: int) -> None:
        if done > 0:
            started.set()

    def ours() -> None:
        try:
            outcome["fastload"] = fastload.pull(f"hf://{repo}", config=SMALL, progress=progress)
        except BaseException as exc:  # noqa: BLE001 -- reported below
            outcome["fastload"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=ours)
    thread.start()
    try:
        assert started.wait(10)
        theirs = snapshot_download(repo, cache_dir=cache, endpoint=hub.endpoint, max_workers=2)
    finally:
        thread.join(30)
    assert not thread.is_alive()
    assert not isinstance(outcome["fastload"], BaseException), outcome
    lfs = [r for r in hub.log if r.method == "GET" and r.path.startswith("/lfs/")]
    assert [r for r in lfs if r.range is None] and [r for r in lfs if r.range], "both tools fetched weights"
    snapshot = folder_of(cache, repo) / "snapshots" / commit
    assert Path(theirs) == snapshot and Path(outcome["fastload"]) == snapshot
    assert_whole_cache(cache, repo, commit, src, {"main": commit})
    hub.reset()
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        assert_same(fastload.load(f"hf://{repo}", config=SMALL), reference(src))
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    assert hub.log == []
    transformers_offline(cache, repo, src)


PULL_SCRIPT = """
import sys, fastload
fastload.pull(sys.argv[1], config=fastload.LoadConfig(chunk_bytes=64 << 10, max_concurrency=int(sys.argv[2])))
print("PULLED")
"""


def start_pull(cache: Path, url: str, endpoint: str, concurrency: int = 2) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PULL_SCRIPT, url, str(concurrency)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=hf_env(cache, HF_ENDPOINT=endpoint))


def test_hf_hub_download_in_threads_while_a_fastload_process_pulls(hub: HubServer, tmp_path: Path) -> None:
    """A fastload pull in another process and hf_hub_download of every file (one thread per file) in this one,
    the same commit at once: fastload ignores huggingface_hub's per-blob ``.locks`` and huggingface_hub ignores
    fastload's, so both may write a blob; each renames a whole file into place, so whichever lands last, every
    blob is whole, and both tools end with the same, complete snapshot."""
    from huggingface_hub import hf_hub_download

    cache = tmp_path / "hf-cache"
    src = model_repo(tmp_path / "src", seed=1)
    repo = repo_name("procs")
    commit = hub.add_repo(repo, src)
    hub.faults.slow_first_byte(0.03, path="/lfs/*")
    child = start_pull(cache, f"hf://{repo}", hub.endpoint)
    errors: list[BaseException] = []
    got: dict[str, str] = {}

    def one(name: str) -> None:
        try:
            got[name] = hf_hub_download(repo, name, cache_dir=cache, endpoint=hub.endpoint)
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    try:
        deadline = time.monotonic() + 10
        while not list((folder_of(cache, repo) / "blobs").glob("*fastload*")) and time.monotonic() < deadline:
            time.sleep(0.01)  # the child is writing its first blob
        threads = [threading.Thread(target=one, args=(p.name,)) for p in sorted(src.iterdir())]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert errors == [] and child.returncode == 0 and "PULLED" in out, (errors, err[-2000:])
    snapshot = folder_of(cache, repo) / "snapshots" / commit
    assert {Path(p) for p in got.values()} == {snapshot / p.name for p in src.iterdir()}
    assert_whole_cache(cache, repo, commit, src, {"main": commit})
    transformers_offline(cache, repo, src)


# -- one after the other -------------------------------------------------------------------------------------


def test_partial_hf_hub_download_then_fastload_pull_fetches_only_the_rest(hub: HubServer, tmp_path: Path) -> None:
    """huggingface_hub fetched config.json and the first shard (a user who looked at one shard): fastload pull
    fetches only the other files, and the result is the whole snapshot, offline for both tools."""
    from huggingface_hub import hf_hub_download, snapshot_download

    cache = tmp_path / "hf-cache"
    src = model_repo(tmp_path / "src", seed=2)
    repo = repo_name("partial")
    commit = hub.add_repo(repo, src)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    for name in ("config.json", shards[0]):
        hf_hub_download(repo, name, cache_dir=cache, endpoint=hub.endpoint)
    hub.reset()
    path = fastload.pull(f"hf://{repo}", config=SMALL)
    assert path == folder_of(cache, repo) / "snapshots" / commit
    assert all(shards[1] in p for p in lfs_bodies(hub)) and lfs_bodies(hub), lfs_bodies(hub)
    assert not [r for r in hub.log if r.method == "GET" and r.path.endswith("/config.json")]
    assert_whole_cache(cache, repo, commit, src, {"main": commit})
    assert Path(snapshot_download(repo, cache_dir=cache, local_files_only=True)) == path
    transformers_offline(cache, repo, src)


def test_fastload_pull_killed_then_snapshot_download_completes_it(hub: HubServer, tmp_path: Path) -> None:
    """A fastload pull process killed (SIGKILL) mid-blob, then snapshot_download: the cache is whole, loads
    offline are exact, and nothing the killed pull left behind is hidden from huggingface_hub's cache tools:
    every file under blobs/ is either a blob a snapshot uses or an incomplete download ``scan_cache_dir``
    reports (what ``hf cache scan`` shows and ``hf cache prune`` removes). A later fastload pull returns the
    same snapshot."""
    from huggingface_hub import snapshot_download

    cache = tmp_path / "hf-cache"
    src = model_repo(tmp_path / "src", seed=3)
    repo = repo_name("killed")
    commit = hub.add_repo(repo, src)
    hub.faults.slow_first_byte(0.1, path="/lfs/*")
    child = start_pull(cache, f"hf://{repo}", hub.endpoint, concurrency=1)
    blobs = folder_of(cache, repo) / "blobs"
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # two chunks journaled: a partial blob of some size on disk
            if any(len(lines(j)) >= 3 for j in (blobs.glob("*journal*") if blobs.is_dir() else ())):
                break
            time.sleep(0.01)
        else:
            pytest.fail("the pull never journaled a chunk")
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL
    hub.reset()
    snapshot = Path(snapshot_download(repo, cache_dir=cache, endpoint=hub.endpoint))
    assert snapshot == folder_of(cache, repo) / "snapshots" / commit
    for name, data in ((p.name, p.read_bytes()) for p in src.iterdir()):
        assert (snapshot / name).read_bytes() == data, name
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        assert_same(fastload.load(f"hf://{repo}", config=SMALL), reference(src))
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    info = scan(cache)
    assert info.warnings == []
    used = {f.blob_path for r in info.repos for rev in r.revisions for f in rev.files}
    reported = {f.file_path for f in info.incomplete_files}
    hidden = sorted(p.name for p in blobs.iterdir() if p not in used and p not in reported)
    assert hidden == [], f"left in blobs/, invisible to hf cache scan / prune: {hidden}"
    result = fastload.pull(f"hf://{repo}", config=SMALL)
    assert result == snapshot


class Stop(Exception):
    pass


def test_interrupted_pull_leaves_no_snapshot_huggingface_hub_takes_for_whole(hub: HubServer, tmp_path: Path) -> None:
    """A fastload pull interrupted after two chunks, nothing of the commit complete. Offline, huggingface_hub
    must not hand out that commit's snapshot folder as the downloaded repository (an empty folder vLLM or
    diffusers would then fail on with 'no config.json'): it raises LocalEntryNotFoundError, as it does after its
    own interrupted download (which leaves a tree listing, trees/<commit>.json, that shows what is missing)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = tmp_path / "hf-cache"
    src = model_repo(tmp_path / "src", seed=13)
    repo = repo_name("stopped")
    commit = hub.add_repo(repo, src)
    calls: list[int] = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) > 2:
            raise Stop

    with pytest.raises(Stop):
        fastload.pull(f"hf://{repo}", config=SMALL.replace(max_concurrency=1), progress=progress)
    snapshot = folder_of(cache, repo) / "snapshots" / commit
    assert not [p for p in snapshot.rglob("*") if p.is_file()] if snapshot.exists() else True
    try:
        got = snapshot_download(repo, revision=commit, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        got = None
    assert got is None, f"huggingface_hub took the interrupted pull's empty {got} for the downloaded commit"
    assert scan(cache).warnings == []


def test_interrupted_hf_download_then_fastload_pull(hub: HubServer, tmp_path: Path) -> None:
    """The other way round: huggingface_hub killed mid-download (its ``<blob>.<id>.incomplete`` left in blobs/),
    then fastload pull: the snapshot is whole and exact, fastload presents no partial file as a blob, and
    huggingface_hub's leftover stays reported as incomplete (for ``hf cache prune``), not as part of a
    revision."""
    cache = tmp_path / "hf-cache"
    src = model_repo(tmp_path / "src", seed=4)
    repo = repo_name("hfkilled")
    commit = hub.add_repo(repo, src)
    shard = sorted(p.name for p in src.glob("*.safetensors"))[0]
    hub.faults.stall_after(200 << 10, path="/lfs/*", times=1)  # part of the body, then nothing
    script = ("import sys; from huggingface_hub import hf_hub_download; "
              "hf_hub_download(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3], endpoint=sys.argv[4])")
    child = subprocess.Popen([sys.executable, "-c", script, repo, shard, str(cache), hub.endpoint],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=hf_env(cache))
    blobs = folder_of(cache, repo) / "blobs"
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if blobs.is_dir() and any(p.name.endswith(".incomplete") for p in blobs.iterdir()) and [
                    r for r in hub.log if r.path.startswith("/lfs/")]:
                time.sleep(0.3)
                break
            time.sleep(0.02)
    finally:
        child.kill()
        child.communicate(timeout=10)
    leftovers = [p for p in blobs.iterdir() if p.name.endswith(".incomplete")] if blobs.is_dir() else []
    hub.reset()
    path = fastload.pull(f"hf://{repo}", config=SMALL)
    assert path == folder_of(cache, repo) / "snapshots" / commit
    for p in src.iterdir():
        assert (path / p.name).read_bytes() == p.read_bytes(), p.name
    info = scan(cache)
    assert info.warnings == []
    [cached] = [r for r in info.repos if r.repo_id == repo]
    assert all(not f.blob_path.name.endswith("incomplete") for rev in cached.revisions for f in rev.files)
    assert {f.file_path for f in info.incomplete_files} >= set(leftovers)


# -- two revisions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["fastload", "huggingface_hub"])
def test_main_moves_between_the_two_tools(hub: HubServer, tmp_path: Path, first: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Commit A pulled by one tool, main moved to commit B, B pulled by the other: refs/main names B, A's
    snapshot stays whole, and offline both tools agree: main is B, A by its commit is A."""
    from huggingface_hub import snapshot_download

    cache = tmp_path / "hf-cache"
    old_src = model_repo(tmp_path / "old", seed=5)
    new_src = model_repo(tmp_path / "new", seed=6)
    repo = repo_name("moved")
    old = hub.add_repo(repo, old_src)

    def by(tool: str) -> Path:
        if tool == "fastload":
            return fastload.pull(f"hf://{repo}", config=SMALL)
        return Path(snapshot_download(repo, cache_dir=cache, endpoint=hub.endpoint))

    second = "huggingface_hub" if first == "fastload" else "fastload"
    assert by(first) == folder_of(cache, repo) / "snapshots" / old
    new = hub.add_repo(repo, new_src)
    assert new != old
    assert by(second) == folder_of(cache, repo) / "snapshots" / new
    assert_whole_cache(cache, repo, old, old_src, {})
    assert_whole_cache(cache, repo, new, new_src, {"main": new})
    hub.reset()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_same(fastload.load(f"hf://{repo}", config=SMALL), reference(new_src))
    assert_same(fastload.load(f"hf://{repo}@{old}", config=SMALL), reference(old_src))
    assert Path(snapshot_download(repo, cache_dir=cache, local_files_only=True)).name == new
    assert hub.log == []


# -- huggingface_hub's cache tools on a cache fastload wrote ---------------------------------------------------


def test_delete_revisions_on_a_pulled_cache_then_offline_loads(hub: HubServer, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Two commits pulled by fastload (main on the newer). delete_revisions(newer).execute(): offline,
    ``hf://repo`` is plainly not cached (SourceNotFoundError naming HF_HUB_OFFLINE, no stale read through
    fastload's own records), the older commit still loads by its hash; deleting that one too leaves nothing,
    and an offline pull says so."""
    cache = tmp_path / "hf-cache"
    old_src = model_repo(tmp_path / "old", seed=7)
    new_src = model_repo(tmp_path / "new", seed=8)
    repo = repo_name("deleted")
    old = hub.add_repo(repo, old_src)
    fastload.pull(f"hf://{repo}", config=SMALL)
    new = hub.add_repo(repo, new_src)
    fastload.pull(f"hf://{repo}", config=SMALL)
    info = scan(cache)
    assert info.warnings == []
    info.delete_revisions(new).execute()
    folder = folder_of(cache, repo)
    assert not (folder / "snapshots" / new).exists() and not (folder / "refs" / "main").exists()
    hub.reset()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for call in (lambda: fastload.load(f"hf://{repo}", config=SMALL), lambda: fastload.plan(f"hf://{repo}"),
                 lambda: fastload.load(f"hf://{repo}@{new}", config=SMALL),
                 lambda: fastload.pull(f"hf://{repo}", config=SMALL)):
        with pytest.raises(fastload.SourceNotFoundError, match="HF_HUB_OFFLINE"):
            call()
    assert_same(fastload.load(f"hf://{repo}@{old}", config=SMALL), reference(old_src))
    assert scan(cache).warnings == []
    scan(cache).delete_revisions(old).execute()
    assert not folder.exists() or not any((folder / "snapshots").iterdir())
    with pytest.raises(fastload.SourceNotFoundError, match="HF_HUB_OFFLINE"):
        fastload.load(f"hf://{repo}@{old}", config=SMALL)
    assert hub.log == []


def test_delete_files_of_a_pulled_snapshot_is_not_cached_any_more(hub: HubServer, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``delete_files`` (hf cache rm of one file) removes a shard from a fastload-pulled snapshot: fastload's
    own record of the finished pull must not make the snapshot count as whole; online the load streams the
    missing shard, offline it is not cached."""
    cache = tmp_path / "hf-cache"
    src = model_repo(tmp_path / "src", seed=9)
    repo = repo_name("rmfile")
    hub.add_repo(repo, src)
    fastload.pull(f"hf://{repo}", config=SMALL)
    info = scan(cache)
    [cached] = [r for r in info.repos if r.repo_id == repo]
    [revision] = cached.revisions
    shard = next(f for f in revision.files if f.file_name.endswith("00002-of-00002.safetensors"))
    info.delete_files(shard).execute()
    assert not shard.file_path.exists()
    hub.reset()
    assert_same(fastload.load(f"hf://{repo}", config=SMALL), reference(src))
    assert lfs_bodies(hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(fastload.SourceNotFoundError, match="HF_HUB_OFFLINE"):
        fastload.load(f"hf://{repo}", config=SMALL)


def test_no_exist_markers_do_not_confuse_from_pretrained_offline(hub: HubServer, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub records files a repository lacks (generation_config.json, here) as
    ``.no_exist/<commit>/<name>`` markers. After fastload pull and huggingface_hub's online probe for the
    missing file, fastload.from_pretrained offline builds the same model transformers builds offline."""
    transformers = pytest.importorskip("transformers")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    cache = tmp_path / "hf-cache"
    src = model_repo(tmp_path / "src", seed=10)
    repo = repo_name("noexist")
    commit = hub.add_repo(repo, src)
    fastload.pull(f"hf://{repo}", config=SMALL)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "generation_config.json", cache_dir=cache, endpoint=hub.endpoint)
    marker = folder_of(cache, repo) / ".no_exist" / commit / "generation_config.json"
    assert marker.is_file()
    assert try_to_load_from_cache(repo, "generation_config.json", cache_dir=cache) is not None  # "no such file"
    assert scan(cache).warnings == []
    hub.reset()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = fastload.from_pretrained(f"hf://{repo}", config=SMALL)
    theirs = transformers.LlamaForCausalLM.from_pretrained(src)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()
    assert hub.log == []


# -- a cache huggingface_hub alone filled ------------------------------------------------------------------


@pytest.mark.parametrize("offline", [True, False])
def test_cache_filled_by_snapshot_download_is_read_without_fetching_weights(hub: HubServer, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           offline: bool) -> None:
    """snapshot_download alone filled the cache: hf://repo loads, streams, plans and from_pretrained's from it,
    offline and online, and no weight byte is asked of the Hub or its CDN."""
    transformers = pytest.importorskip("transformers")
    from huggingface_hub import snapshot_download

    cache = tmp_path / "hf-cache"
    src = model_repo(tmp_path / "src", seed=11)
    repo = repo_name("theirs")
    hub.add_repo(repo, src)
    snapshot_download(repo, cache_dir=cache, endpoint=hub.endpoint)
    hub.reset()
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    want = reference(src)
    assert_same(fastload.load(f"hf://{repo}", config=SMALL), want)
    with fastload.stream(f"hf://{repo}", config=SMALL) as s:
        assert_same(dict(s), want)
    assert all(f.info.url.startswith(str(cache)) for f in fastload.plan(f"hf://{repo}").files)
    ours = fastload.from_pretrained(f"hf://{repo}", config=SMALL)
    theirs = transformers.LlamaForCausalLM.from_pretrained(src)
    assert all(torch.equal(ours.state_dict()[n], t) for n, t in theirs.state_dict().items())
    assert lfs_bodies(hub) == [] and [r.path for r in hub.log if "/resolve/" in r.path] == []
    if offline:
        assert hub.log == []


@pytest.mark.parametrize("offline", [True, False])
def test_diffusers_folder_filled_by_snapshot_download(hub: HubServer, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, offline: bool) -> None:
    """A diffusers-style repository (``unet/diffusion_pytorch_model.safetensors``: no index, no
    model.safetensors) fetched whole by snapshot_download. ``hf://repo/unet/`` must read the cached snapshot:
    offline (the README: a checkpoint the cache holds loads with no network; the same folder loads by path),
    and online without fetching the weights again (the listing names every file, and the cache has each)."""
    from huggingface_hub import snapshot_download

    cache = tmp_path / "hf-cache"
    src = tmp_path / "src"
    tensors = llama_like_tensors(seed=12)
    write_single(src / "unet" / "diffusion_pytorch_model.safetensors", tensors)
    (src / "unet" / "config.json").write_text("{}")
    (src / "model_index.json").write_text("{}")
    repo = repo_name("unet")
    hub.add_repo(repo, src)
    snapshot = Path(snapshot_download(repo, cache_dir=cache, endpoint=hub.endpoint))
    assert_same(fastload.load(snapshot / "unet"), tensors)
    hub.reset()
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_same(fastload.load(f"hf://{repo}/unet/", config=SMALL), tensors)
    assert lfs_bodies(hub) == [], lfs_bodies(hub)


def test_tree_listing_counts_only_when_every_listed_weights_file_is_there_at_its_size(
        hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub's ``trees/<commit>.json`` makes a folder with no index or model.safetensors whole only when
    each ``*.safetensors`` it lists directly in that folder is in the snapshot at its listed size: a partial
    download (one of two files, or one cut short) must not load as the model."""
    from huggingface_hub import hf_hub_download

    cache = tmp_path / "hf-cache"
    src = tmp_path / "src"
    a, b = llama_like_tensors(seed=21), {"extra.weight": torch.arange(100, dtype=torch.float32)}
    write_single(src / "unet" / "a.safetensors", a)
    write_single(src / "unet" / "b.safetensors", b)
    write_single(src / "unet" / "deeper" / "c.safetensors", {"c": torch.ones(3)})  # another folder's weights
    repo = repo_name("partial")
    commit = hub.add_repo(repo, src)
    hf_hub_download(repo, "unet/a.safetensors", cache_dir=cache, endpoint=hub.endpoint)
    snapshot = folder_of(cache, repo) / "snapshots" / commit
    files = {name: {"size": meta["size"], "blob_id": meta["blob"]} for name, meta in hub.files[commit].items()}
    trees = folder_of(cache, repo) / "trees"
    trees.mkdir(parents=True, exist_ok=True)
    (trees / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": files}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(fastload.SourceNotFoundError, match="not in the Hugging Face cache"):
        fastload.load(f"hf://{repo}/unet/", config=SMALL)  # b.safetensors is missing
    short = snapshot / "unet" / "b.safetensors"
    short.write_bytes((src / "unet" / "b.safetensors").read_bytes()[:-4])
    with pytest.raises(fastload.SourceNotFoundError, match="not in the Hugging Face cache"):
        fastload.load(f"hf://{repo}/unet/", config=SMALL)  # b.safetensors is cut short
    short.write_bytes((src / "unet" / "b.safetensors").read_bytes())
    assert_same(fastload.load(f"hf://{repo}/unet/", config=SMALL), {**a, **b})  # c is not this folder's
