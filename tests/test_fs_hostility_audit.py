"""Audit: hostile or odd local file-system state around ``fastload pull``'s writes (and the loads that read them).

Hugging Face caches are often shared (a world-writable /data/hf-cache), and a plain destination may be one too:
another user can leave anything, beforehand, at any path a pull writes -- its temporary files and journals, its
records, its lock, a cache's refs and snapshot folders. A pull must never write outside its destination through
such a thing, never hang on it (a FIFO), and never present wrong bytes as a complete file.

Real components only: real pulls and loads from local folders, the Range HTTP server and the stand-in Hub
(tests/hub_server.py); nothing inside fastload is mocked. A pull that could hang is run in a thread, watched through
/proc (a thread of this process waiting in a FIFO's open or read), and unblocked by the test.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from checkpoints import write_single
from hub_server import HubServer, hub, hub_session, repo_name  # noqa: F401 -- fixtures

import fastload
from fastload import LoadConfig
from fastload.pull import apull
from fastload.runner import run

SMALL = LoadConfig(chunk_bytes=64 << 10, max_concurrency=2)
ONE = SMALL.replace(max_concurrency=1)
VICTIM = b"precious bytes of someone else\n"
#: Where a thread of this process waits when it opens a FIFO nobody opened the other end of, or reads one.
FIFO_WAITS = {"wait_for_partner", "fifo_open", "pipe_read", "pipe_write", "pipe_wait", "pipe_wait_readable",
              "pipe_wait_writable"}


class Interrupt(Exception):
    pass


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(300, 200, generator=g), "b": torch.arange(1000, dtype=torch.int64) + seed}


def _source(tmp_path: Path, name: str = "src", seed: int = 0) -> Path:
    """A model folder: a ~250 kB model.safetensors (several 64 kB chunks) and a config.json."""
    src = tmp_path / name
    write_single(src / "model.safetensors", _tensors(seed))
    (src / "config.json").write_text('{"model_type": "bert"}\n')
    return src


def _victim(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    victim = outside / "victim.txt"
    victim.write_bytes(VICTIM)
    return victim


def _same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def _outside_untouched(victim: Path) -> None:
    outside = victim.parent
    assert victim.read_bytes() == VICTIM, f"the pull wrote through a planted link into {victim}: " \
                                          f"{victim.read_bytes()[:60]!r}..."
    extra = sorted(p.name for p in outside.iterdir() if p != victim)
    assert not extra, f"the pull created {extra} in {outside}, outside its destination"


def _no_links_into(root: Path, outside: Path) -> None:
    """No file the pull left under ``root`` (besides the planted ones it may have left alone) resolves outside."""
    for path in root.rglob("*"):
        if path.is_symlink() and os.path.realpath(path).startswith(str(outside)):
            raise AssertionError(f"{path} now resolves to {os.path.realpath(path)}, outside the destination")


def _fifo_waiters() -> list[str]:
    out = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/wchan") as f:
                wchan = f.read().strip()
        except OSError:
            continue
        if wchan in FIFO_WAITS:
            out.append(f"{tid}:{wchan}")
    return out


def _unjam(fifo: Path) -> None:
    """Open the other end of ``fifo`` once each way, so that a thread blocked in its open or read goes on."""
    for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_NONBLOCK):
        try:
            fd = os.open(fifo, flags)
        except OSError:
            continue
        try:
            if not flags & os.O_WRONLY:
                try:
                    while os.read(fd, 1 << 16):
                        pass
                except BlockingIOError:
                    pass
        finally:
            os.close(fd)


def _watched(fn, fifos: list[Path], limit: float = 20.0):
    """Run ``fn`` in a thread; returns (result or exception, what it was seen blocked on). A thread of this
    process waiting on a FIFO is a hang: the test notes it and opens the FIFO's other end until ``fn`` returns."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 -- handed to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    blocked: list[str] = []
    deadline = time.monotonic() + limit
    while thread.is_alive():
        thread.join(0.05)
        waiting = _fifo_waiters() if thread.is_alive() else []
        if waiting or (thread.is_alive() and time.monotonic() > deadline):
            blocked.append(",".join(waiting) or "timeout")
            for fifo in fifos:
                _unjam(fifo)
        if time.monotonic() > deadline + 10:
            raise AssertionError(f"still blocked after {limit + 10} s: {blocked[-5:]}")
    return box.get("error", box.get("result")), blocked


def _show(outcome) -> str:
    if isinstance(outcome, BaseException):
        return f"{type(outcome).__name__}: {str(outcome)[:300]}"
    return "success" if not isinstance(outcome, dict) else f"success ({len(outcome)} tensors)"


def _typed_or_ok(outcome) -> None:
    """Either the call succeeded, or it failed with one of fastload's typed errors (never a raw OSError)."""
    if isinstance(outcome, BaseException):
        assert isinstance(outcome, fastload.FastloadError), f"{type(outcome).__name__}: {outcome}"


def _chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


# -- plain destinations: planted symbolic links ------------------------------------------------------------------

PLAIN_PLANTS = {
    "temp": ".fastload/incomplete/model.safetensors",
    "journal": ".fastload/incomplete/model.safetensors.journal",
    "record-temp": ".fastload/meta/model.safetensors.json.fastload.incomplete",
}


@pytest.mark.parametrize("transport", ["local", "http", "s3"])
@pytest.mark.parametrize("where", sorted(PLAIN_PLANTS))
def test_plain_pull_never_writes_through_a_planted_symlink(tmp_path, serve, transport, where):
    """A link left at a temporary file's, journal's or record's path, pointing at someone else's file: the pull
    must not open it and write (O_TRUNC, pwrite, write_text follow links), nor rename the link into place."""
    src, dest, victim = _source(tmp_path), tmp_path / "dest", _victim(tmp_path)
    url = serve(transport, src, as_dir=True)
    plant = dest / PLAIN_PLANTS[where]
    plant.parent.mkdir(parents=True)
    os.symlink(victim, plant)
    try:
        fastload.pull(url, to=dest, config=SMALL)
    except fastload.FastloadError:
        pass  # refusing is fine; writing outside is not
    _outside_untouched(victim)
    _no_links_into(dest, victim.parent)
    if (dest / "model.safetensors").exists():
        assert not (dest / "model.safetensors").is_symlink()
        assert (dest / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_plain_pull_lock_symlink_creates_nothing_outside(tmp_path):
    """``.fastload/pull.lock`` as a dangling link to a path outside: opening it with O_CREAT makes that file."""
    src, dest, victim = _source(tmp_path), tmp_path / "dest", _victim(tmp_path)
    (dest / ".fastload").mkdir(parents=True)
    os.symlink(victim.parent / "created-by-pull.lock", dest / ".fastload" / "pull.lock")
    try:
        fastload.pull(str(src), to=dest, config=SMALL)
    except fastload.FastloadError:
        pass
    _outside_untouched(victim)


def test_plain_pull_unfinished_folder_symlinked_outside(tmp_path):
    """``.fastload/incomplete`` planted as a link to a folder elsewhere: the temporaries and journals land there
    (and stay there when the pull is interrupted)."""
    src, dest, victim = _source(tmp_path), tmp_path / "dest", _victim(tmp_path)
    (dest / ".fastload").mkdir(parents=True)
    os.symlink(victim.parent, dest / ".fastload" / "incomplete", target_is_directory=True)
    calls = []

    def stop(done, total):
        calls.append(done)
        if len(calls) > 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        fastload.pull(str(src), to=dest, config=ONE, progress=stop)
    _outside_untouched(victim)


# -- plain destinations: FIFOs and folders at fastload's paths -------------------------------------------------

PLAIN_ODD = {
    "temp": ".fastload/incomplete/model.safetensors",
    "journal": ".fastload/incomplete/model.safetensors.journal",
    "record": ".fastload/meta/model.safetensors.json",
    "record-temp": ".fastload/meta/model.safetensors.json.fastload.incomplete",
    "lock": ".fastload/pull.lock",
    "final": "model.safetensors",
}


@pytest.mark.parametrize("transport", ["local", "s3"])
@pytest.mark.parametrize("where", sorted(PLAIN_ODD))
def test_plain_pull_with_a_fifo_at_its_paths_does_not_hang(tmp_path, serve, transport, where):
    src, dest = _source(tmp_path), tmp_path / "dest"
    url = serve(transport, src, as_dir=True)
    fifo = dest / PLAIN_ODD[where]
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    outcome, blocked = _watched(lambda: fastload.pull(url, to=dest, config=SMALL), [fifo])
    assert not blocked, f"the pull blocked on the FIFO at {PLAIN_ODD[where]} ({blocked[0]}); it ended with " \
                        f"{_show(outcome)}"
    _typed_or_ok(outcome)
    if not isinstance(outcome, BaseException):
        assert (dest / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


@pytest.mark.parametrize("where", sorted(PLAIN_ODD))
def test_plain_pull_with_a_folder_at_its_paths_fails_typed_then_recovers(tmp_path, where):
    """A folder where a file goes: a typed error naming a path (or a pull that works around it); once the folder
    is gone, the next pull gives the source's bytes."""
    src, dest = _source(tmp_path), tmp_path / "dest"
    folder = dest / PLAIN_ODD[where]
    folder.mkdir(parents=True)
    (folder / "keep").write_text("x")  # not empty: no rmdir makes it go away by accident
    outcome, blocked = _watched(lambda: fastload.pull(str(src), to=dest, config=SMALL), [])
    assert not blocked
    _typed_or_ok(outcome)
    if isinstance(outcome, BaseException):
        assert str(dest) in str(outcome)
    (folder / "keep").unlink()
    folder.rmdir()
    fastload.pull(str(src), to=dest, config=SMALL)
    assert (dest / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    _same_tensors(fastload.load(str(dest)), _tensors())


@pytest.mark.parametrize("kind", ["fifo", "folder", "link-to-fifo"])
def test_load_of_a_plain_destination_with_an_odd_lock_does_not_hang(tmp_path, kind):
    """A load takes a shared lock on ``.fastload/pull.lock`` of a pulled folder: a FIFO, a folder or a link to a
    FIFO there must neither block the load nor fail it."""
    src, dest = _source(tmp_path), tmp_path / "dest"
    fastload.pull(str(src), to=dest, config=SMALL)
    lock = dest / ".fastload" / "pull.lock"
    lock.unlink()
    fifo = tmp_path / "elsewhere.fifo"
    if kind == "fifo":
        os.mkfifo(lock)
    elif kind == "folder":
        lock.mkdir()
    else:
        os.mkfifo(fifo)
        os.symlink(fifo, lock)
    outcome, blocked = _watched(lambda: fastload.load(str(dest)), [lock, fifo])
    assert not blocked, blocked
    assert not isinstance(outcome, BaseException), _show(outcome)
    _same_tensors(outcome, _tensors())


# -- read-only (immutable: we run as root, whom modes do not stop) ------------------------------------------------

def test_plain_pull_into_read_only_places_fails_typed_and_leaves_no_partial_final(tmp_path):
    src, dest = _source(tmp_path), tmp_path / "dest"
    # 1. the destination folder itself cannot be written
    dest.mkdir()
    _chattr("+i", dest)
    try:
        with pytest.raises(fastload.FastloadError, match="dest"):
            fastload.pull(str(src), to=dest, config=SMALL)
    finally:
        _chattr("-i", dest)
    # 2. an interrupted pull's temporary file became read-only: the resume cannot write into it
    with pytest.raises(Interrupt):
        fastload.pull(str(src), to=dest, config=ONE, progress=_stop_after(2))
    temp = dest / ".fastload" / "incomplete" / "model.safetensors"
    assert temp.is_file()
    _chattr("+i", temp)
    try:
        outcome, blocked = _watched(lambda: fastload.pull(str(src), to=dest, config=ONE), [])
        assert not blocked
        _typed_or_ok(outcome)
        if isinstance(outcome, BaseException):
            assert not (dest / "model.safetensors").exists()
    finally:
        _chattr("-i", temp)
    fastload.pull(str(src), to=dest, config=SMALL)
    assert (dest / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    # 3. a pulled file made immutable, then the source changes: a typed error, the old file whole in place
    old = (dest / "model.safetensors").read_bytes()
    write_single(src / "model.safetensors", _tensors(seed=1))
    _chattr("+i", dest / "model.safetensors")
    try:
        with pytest.raises(fastload.FastloadError):
            fastload.pull(str(src), to=dest, config=SMALL)
        assert (dest / "model.safetensors").read_bytes() == old
    finally:
        _chattr("-i", dest / "model.safetensors")
    fastload.pull(str(src), to=dest, config=SMALL)
    _same_tensors(fastload.load(str(dest)), _tensors(seed=1))


def _stop_after(n: int):
    calls = []

    def progress(done, total):
        calls.append(done)
        if len(calls) > n:
            raise Interrupt

    return progress


# -- journals that lie --------------------------------------------------------------------------------------------

def test_resume_with_a_garbled_journal_gives_the_source_bytes(http_server, http_dir, tmp_path):
    """An interrupted pull's journal, then lines no pull writes: garbage, reversed, negative, non-ASCII digits,
    past the end, beyond 2**64, duplicates and overlaps of what really was written. The resumed file must be the
    source's bytes exactly."""
    path = http_dir / "model.safetensors"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    url, dest = http_server.url_for(path), tmp_path / "dest"
    with pytest.raises(Interrupt):
        run(lambda: apull(url, to=dest, config=ONE, progress=_stop_after(3)))
    journal = dest / ".fastload" / "incomplete" / "model.safetensors.journal"
    lines = journal.read_text().splitlines()
    done = [tuple(map(int, line.split())) for line in lines[1:]]
    assert done, lines
    a, b = done[0]
    lies = ["garbage", "1 2 3", f"{b} {a}", f"-1 {b}", f"{a} -5", "\u0661 \u0662", "0x0 0x10", f" {a}\t{b} ",
            f"{a} {len(data) + 1}", f"{len(data)} {len(data) + 10}", f"{2**64} {2**64 + 100}", f"{a} {2**64 + b}",
            f"{a} {b}", f"{a} {(a + b) // 2}", f"{(a + b) // 2} {b}", "", "\x00\x00", "1e3 2e3", "+0 +10"]
    with open(journal, "a", encoding="utf-8") as f:
        f.write("\n".join(lies) + "\n")
    run(lambda: apull(url, to=dest, config=SMALL))
    assert (dest / "model.safetensors").read_bytes() == data


def test_s3_resume_where_the_journal_names_a_range_twice_and_past_the_end(serve, tmp_path):
    """S3: an interrupted pull's journal with its first range repeated, split and overlapped, and ranges past the
    object: the resumed file is the object's bytes, and only what was missing is fetched."""
    src = tmp_path / "s3src"
    src.mkdir()
    data = os.urandom(700 << 10)
    (src / "model.safetensors").write_bytes(data)
    url, dest = serve("s3", src, as_dir=True), tmp_path / "dest"
    with pytest.raises(Interrupt):
        run(lambda: apull(url, to=dest, config=ONE, progress=_stop_after(2)))
    journal = dest / ".fastload" / "incomplete" / "model.safetensors.journal"
    lines = journal.read_text().splitlines()
    done = sorted({tuple(map(int, line.split())) for line in lines[1:]})
    assert done and all(x[1] <= y[0] for x, y in zip(done, done[1:])), lines  # what a pull writes: disjoint
    a, b = done[0]
    with open(journal, "a", encoding="utf-8") as f:
        f.write(f"{a} {b}\n{a + 1} {b - 1}\n{a} {(a + b) // 2}\n{len(data) - 1} {len(data) + 1}\n{b} {b}\n")
    result = run(lambda: apull(url, to=dest, config=SMALL))
    assert (dest / "model.safetensors").read_bytes() == data
    assert result.bytes_fetched == len(data) - sum(end - start for start, end in done)


def _hub_model(tmp_path: Path, hub: HubServer, seed: int = 0) -> tuple[str, str, Path, bytes]:
    """A repository of model.safetensors and config.json: its id, commit, cache folder and the weights' bytes."""
    src = _source(tmp_path, f"hubsrc{seed}", seed)
    repo = repo_name("fs")
    commit = hub.add_repo(repo, src)
    cache = tmp_path / "hf-cache" / ("models--" + repo.replace("/", "--"))
    return repo, commit, cache, (src / "model.safetensors").read_bytes()


def test_hub_resume_with_a_lying_journal_and_verify_never_keeps_wrong_bytes(hub, tmp_path):
    """A partial blob of zeros whose journal (right header) claims every byte: with verify the pull must not put
    it in place; it ends with the right blob, or an IntegrityError after which the next pull gives the right one."""
    repo, commit, cache, data = _hub_model(tmp_path, hub)
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(Interrupt):
        run(lambda: apull(f"hf://{repo}", config=ONE, progress=_stop_after(2)))
    temp = cache / "blobs" / f"{sha}.fastload.incomplete"
    journal = cache / "blobs" / f"{sha}.fastload.journal.incomplete"
    header = journal.read_text().splitlines()[0]
    temp.write_bytes(b"\0" * len(data))
    journal.write_text(f"{header}\n0 {len(data)}\n0 {len(data) // 2}\n")
    try:
        run(lambda: apull(f"hf://{repo}", config=SMALL, verify=True))
    except fastload.IntegrityError:
        assert not (cache / "blobs" / sha).exists()
        run(lambda: apull(f"hf://{repo}", config=SMALL, verify=True))
    assert (cache / "blobs" / sha).read_bytes() == data
    _same_tensors(fastload.load(f"hf://{repo}"), _tensors())


# -- hub caches: planted links ------------------------------------------------------------------------------------

def _hub_plants(cache: Path, commit: str, sha: str) -> dict[str, Path]:
    return {
        "blob-temp": cache / "blobs" / f"{sha}.fastload.incomplete",
        "blob-journal": cache / "blobs" / f"{sha}.fastload.journal.incomplete",
        "ref-temp": cache / "refs" / "main.fastload.incomplete",
        "record-temp": cache / ".fastload" / "pulled" / f"{commit}.json.fastload.incomplete",
        "lock": cache.parent / ".locks" / cache.name / "fastload-pull.lock",
    }


@pytest.mark.parametrize("where", ["blob-temp", "blob-journal", "ref-temp", "record-temp", "lock"])
def test_hub_pull_never_writes_through_a_planted_symlink(hub, tmp_path, where):
    repo, commit, cache, data = _hub_model(tmp_path, hub)
    victim = _victim(tmp_path)
    plant = _hub_plants(cache, commit, hashlib.sha256(data).hexdigest())[where]
    plant.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(victim if where != "lock" else victim.parent / "created-by-pull.lock", plant)
    try:
        run(lambda: apull(f"hf://{repo}", config=SMALL))
    except fastload.FastloadError:
        pass
    _outside_untouched(victim)
    _no_links_into(cache, victim.parent)


def test_hub_pull_into_a_snapshot_folder_linked_outside(hub, tmp_path):
    """``snapshots/<commit>`` planted as a link to a folder elsewhere: the pull's snapshot links land there."""
    repo, commit, cache, data = _hub_model(tmp_path, hub)
    victim = _victim(tmp_path)
    (cache / "snapshots").mkdir(parents=True)
    os.symlink(victim.parent, cache / "snapshots" / commit, target_is_directory=True)
    try:
        run(lambda: apull(f"hf://{repo}", config=SMALL))
    except fastload.FastloadError:
        pass
    _outside_untouched(victim)


# -- hub caches: FIFOs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["blob-temp", "blob-journal", "ref", "record", "record-temp"])
def test_hub_pull_with_a_fifo_at_its_paths_does_not_hang(hub, tmp_path, where):
    repo, commit, cache, data = _hub_model(tmp_path, hub)
    plants = _hub_plants(cache, commit, hashlib.sha256(data).hexdigest())
    plants["ref"] = cache / "refs" / "main"
    plants["record"] = cache / ".fastload" / "pulled" / f"{commit}.json"
    fifo = plants[where]
    fifo.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(fifo)
    outcome, blocked = _watched(lambda: run(lambda: apull(f"hf://{repo}", config=SMALL)), [fifo])
    assert not blocked, f"the pull blocked on the FIFO at {fifo.relative_to(cache)} ({blocked[0]}); it ended " \
                        f"with {_show(outcome)}"
    _typed_or_ok(outcome)


@pytest.mark.parametrize("offline", [False, True])
def test_hub_load_with_a_fifo_as_its_ref_does_not_hang(hub, tmp_path, monkeypatch, offline):
    """``refs/main`` of a cached repository is a FIFO: every ``load("hf://org/name")`` reads it first (online
    too: a cached snapshot is used when whole). No hang: offline, not found; online, read from the Hub."""
    repo, commit, cache, data = _hub_model(tmp_path, hub)
    run(lambda: apull(f"hf://{repo}", config=SMALL))
    (cache / "refs" / "main").unlink()
    os.mkfifo(cache / "refs" / "main")
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    outcome, blocked = _watched(lambda: fastload.load(f"hf://{repo}"), [cache / "refs" / "main"])
    assert not blocked, f"load blocked on refs/main ({blocked[0]}); it ended with {_show(outcome)}"
    if offline:
        assert isinstance(outcome, fastload.SourceNotFoundError), _show(outcome)
    else:
        _same_tensors(outcome, _tensors())


# -- hub caches: refs, snapshots and blobs holding something else --------------------------------------------------

@pytest.mark.parametrize("ref", ["garbage\n", "../../planted", "../../../outside/planted", "0" * 39, ""])
def test_hub_refs_holding_garbage_or_a_path(hub, tmp_path, monkeypatch, ref):
    """A ref holding garbage or a path: never followed (a planted 'snapshot' is never loaded); offline the repo is
    not found, online a pull puts the right commit back and a load gives the Hub's tensors."""
    repo, commit, cache, data = _hub_model(tmp_path, hub)
    run(lambda: apull(f"hf://{repo}", config=SMALL))
    (cache / "refs" / "main").write_text(ref)
    for planted in (cache / "planted", tmp_path / "outside" / "planted", cache / "snapshots" / ref.strip()):
        if ref.strip() and not planted.exists():
            write_single(planted / "model.safetensors", {"evil": torch.zeros(3)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(fastload.SourceNotFoundError):
        fastload.load(f"hf://{repo}")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    _same_tensors(fastload.load(f"hf://{repo}"), _tensors())
    run(lambda: apull(f"hf://{repo}", config=SMALL))
    assert (cache / "refs" / "main").read_text() == commit


@pytest.mark.parametrize("target", ["fifo", "folder", "dangling", "loop"])
def test_hub_offline_load_of_a_snapshot_link_to_something_odd(hub, tmp_path, monkeypatch, target):
    """A snapshot's model.safetensors replaced by a link outside the cache to a FIFO, a folder, nothing or a loop:
    an offline load must fail typed (not found), never hang."""
    repo, commit, cache, data = _hub_model(tmp_path, hub)
    run(lambda: apull(f"hf://{repo}", config=SMALL))
    link = cache / "snapshots" / commit / "model.safetensors"
    link.unlink()
    odd = tmp_path / "outside" / "odd"
    odd.parent.mkdir()
    if target == "fifo":
        os.mkfifo(odd)
    elif target == "folder":
        odd.mkdir()
    elif target == "loop":
        os.symlink(link, odd)
    os.symlink(odd, link)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    outcome, blocked = _watched(lambda: fastload.load(f"hf://{repo}"), [odd] if target == "fifo" else [])
    assert not blocked, blocked
    assert isinstance(outcome, fastload.FastloadError), _show(outcome)


def test_hub_offline_load_follows_a_snapshot_link_outside_the_cache(hub, tmp_path, monkeypatch):
    """What a snapshot link outside the cache does (as huggingface_hub, which also follows it): the file it points
    at is loaded. Recorded here so a change of policy is a conscious one."""
    repo, commit, cache, data = _hub_model(tmp_path, hub)
    run(lambda: apull(f"hf://{repo}", config=SMALL))
    other = write_single(tmp_path / "outside" / "other.safetensors", _tensors(seed=7))
    link = cache / "snapshots" / commit / "model.safetensors"
    link.unlink()
    os.symlink(other, link)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _same_tensors(fastload.load(f"hf://{repo}"), _tensors(seed=7))


def test_hub_blob_with_right_size_wrong_bytes(hub, tmp_path):
    """A blob already in the cache at the right size with other bytes: an unverified pull trusts the size (as
    documented); ``verify=True`` fetches it again, and a load then gives the Hub's tensors."""
    repo, commit, cache, data = _hub_model(tmp_path, hub)
    sha = hashlib.sha256(data).hexdigest()
    (cache / "blobs").mkdir(parents=True)
    (cache / "blobs" / sha).write_bytes(data[:-8] + b"\xff" * 8)  # header intact, a tensor's last bytes wrong
    plain = run(lambda: apull(f"hf://{repo}", config=SMALL))
    assert "model.safetensors" in plain.present
    again = run(lambda: apull(f"hf://{repo}", config=SMALL, verify=True))
    assert "model.safetensors" in again.fetched
    assert (cache / "blobs" / sha).read_bytes() == data
    _same_tensors(fastload.load(f"hf://{repo}"), _tensors())


def test_hub_load_with_verify_checksums_checks_a_cached_blob(hub, tmp_path):
    """``load("hf://...", config=LoadConfig(verify_checksums=True))`` promises the Hub's LFS sha256 is verified.
    When the cache already holds the snapshot the load reads the cached blob instead: a blob with the right size
    and other bytes must not come back as the model's tensors without an IntegrityError."""
    repo, commit, cache, data = _hub_model(tmp_path, hub)
    run(lambda: apull(f"hf://{repo}", config=SMALL))
    blob = cache / "blobs" / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data[:-8] + b"\xff" * 8)
    try:
        got = fastload.load(f"hf://{repo}", config=LoadConfig(verify_checksums=True))
    except fastload.IntegrityError:
        return
    _same_tensors(got, _tensors())


def test_hub_load_with_verify_checksums_checks_the_shards_of_a_cached_index(hub, llama_sharded_checkpoint,
                                                                          tmp_path, monkeypatch):
    """The same for a sharded checkpoint read through its index, named or as the folder: every shard's blob is
    checked against the sha256 that names it, offline too; without verify_checksums nothing is hashed."""
    repo = repo_name("vshards")
    hub.add_repo(repo, llama_sharded_checkpoint)
    path = run(lambda: apull(f"hf://{repo}", config=SMALL)).path
    shard = path / "model-00002-of-00003.safetensors"
    blob = Path(os.path.realpath(shard))
    data = blob.read_bytes()
    blob.write_bytes(data[:-8] + bytes(8))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    verify = LoadConfig(verify_checksums=True)
    for source in (f"hf://{repo}", f"hf://{repo}/model.safetensors.index.json"):
        with pytest.raises(fastload.IntegrityError, match="sha256 mismatch") as caught:
            fastload.load(source, config=verify)
        assert "model-00002-of-00003.safetensors" in str(caught.value), caught.value
    fastload.load(f"hf://{repo}")  # (not asked to verify: the cache is trusted, as documented)
    blob.write_bytes(data)
    assert fastload.load(f"hf://{repo}", config=verify).keys() == fastload.load(llama_sharded_checkpoint).keys()


# -- where the destination itself is odd ---------------------------------------------------------------------------

ODD_NAMES = ["sp ace", "hash#q?x", "pct%20%2F", "new\nline", "uni\u00e9\u6f22", "semi;$(x)`y`", "-dash", "tab\tx",
             "file:colon"]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_pull_and_load_with_odd_characters_in_the_destination(http_server, http_dir, tmp_path, name):
    src = _source(tmp_path)
    for f in ("model.safetensors", "config.json"):
        (http_dir / f).write_bytes((src / f).read_bytes())
    dest = tmp_path / name / name
    fastload.pull(http_server.url_for(http_dir) + "/", to=dest, config=SMALL)
    assert (dest / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    _same_tensors(fastload.load(str(dest)), _tensors())
    _same_tensors(fastload.load(dest), _tensors())
    again = run(lambda: apull(str(src), to=dest, config=SMALL))  # another source into the same folder
    assert set(again.present) | set(again.fetched) == {"model.safetensors", "config.json"}


def test_destination_that_is_a_symlink(tmp_path):
    """``to`` is a link to a folder: the files land in the folder, the link stays a link, a pull through either
    name finds the other's files complete, and a load through either waits on the same lock."""
    src = _source(tmp_path)
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    os.symlink(real, link, target_is_directory=True)
    first = run(lambda: apull(str(src), to=link, config=SMALL))
    assert link.is_symlink() and (real / "model.safetensors").is_file()
    assert sorted(first.fetched) == ["config.json", "model.safetensors"]
    second = run(lambda: apull(str(src), to=real, config=SMALL))
    assert second.fetched == () and sorted(second.present) == ["config.json", "model.safetensors"]
    _same_tensors(fastload.load(str(link)), _tensors())

    # a pull holding the lock (taken through the link) keeps a load through the real name waiting
    started, release = threading.Event(), threading.Event()

    def slow(done, total):
        started.set()
        release.wait(10)

    write_single(src / "model.safetensors", _tensors(seed=3))
    puller = threading.Thread(target=lambda: fastload.pull(str(src), to=link, config=ONE, progress=slow))
    puller.start()
    try:
        assert started.wait(10)
        box = {}
        loader = threading.Thread(target=lambda: box.setdefault("sd", fastload.load(str(real))))
        loader.start()
        loader.join(0.6)
        assert loader.is_alive(), "a load through the real name did not wait for the pull through the link"
    finally:
        release.set()
        puller.join(10)
    loader.join(10)
    _same_tensors(box["sd"], _tensors(seed=3))


@pytest.mark.parametrize("verify", [False, True])
def test_hub_pull_with_a_fifo_as_the_blob_of_an_empty_file(hub, tmp_path, verify):
    """An empty file in the repository (its blob: git's empty blob id) and a FIFO already at that blob's path in a
    shared cache. A FIFO's size is 0, the file's too: it must not count as the pulled file (a snapshot link to a
    FIFO hangs whoever reads it), and checking it (``verify``) must not hang."""
    src = _source(tmp_path, "hubsrc")
    (src / "added_tokens.json").write_bytes(b"")
    repo = repo_name("fsempty")
    commit = hub.add_repo(repo, src)
    cache = tmp_path / "hf-cache" / ("models--" + repo.replace("/", "--"))
    blob = cache / "blobs" / hashlib.sha1(b"blob 0\0").hexdigest()
    blob.parent.mkdir(parents=True)
    os.mkfifo(blob)
    outcome, blocked = _watched(lambda: run(lambda: apull(f"hf://{repo}", config=SMALL, verify=verify)), [blob])
    assert not blocked, f"the pull blocked on the FIFO at {blob.name} ({blocked[0]}); it ended with {_show(outcome)}"
    _typed_or_ok(outcome)
    link = cache / "snapshots" / commit / "added_tokens.json"
    if link.exists():
        assert Path(os.path.realpath(link)).is_file(), "the snapshot's added_tokens.json resolves to a FIFO"


def test_huge_sparse_journal_is_not_read_into_memory(tmp_path):
    """A journal planted as a 768 MiB sparse file (no disk space, no page of it written): a pull resuming beside it
    must not read it whole into memory (a 100 GiB one would take the process down). Run in a child process to
    measure its peak memory."""
    src, dest = _source(tmp_path), tmp_path / "dest"
    journal = dest / ".fastload" / "incomplete" / "model.safetensors.journal"
    journal.parent.mkdir(parents=True)
    with open(journal, "wb") as f:
        f.truncate(768 << 20)
    code = ("import resource, sys, fastload\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "fastload.pull(sys.argv[1], to=sys.argv[2])\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(src), str(dest)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    grown = int(out.stdout.split()[-1])
    assert (dest / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert grown < 256, f"the pull's peak memory grew by {grown} MiB reading a planted sparse journal"
