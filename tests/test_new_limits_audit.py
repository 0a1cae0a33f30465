"""Audit of three pieces changed together: bounded local shard descriptors (``LocalTransport`` ``max_open``,
LRU close and checked reopen), HTTP request slots (``HttpTransport._in_slot``: every attempt takes one of
``max_concurrency``) and lists of sources that mix checkpoint directories and index files (``Resolved.indexes``).

Real files, the real Range HTTP server, moto S3 and the loopback Hub; nothing of fastload is mocked.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastload
from checkpoints import evict, write_sharded
from hub_server import hub, hub_session, repo_name  # noqa: F401 -- fixtures
from reliability_helpers import QUICK, QUICK_RETRY, Leaks, assert_bit_exact, bounded, fds, private_tmp  # noqa: F401
from test_direct_io import direct_supported
from servers.faults import Rule

MiB = 1 << 20


# -- helpers ---------------------------------------------------------------------------------------------------


def pattern(i: int, size: int) -> bytes:
    """Bytes no other file of the test has at any offset (seeded by the file's number)."""
    return np.random.default_rng(1000 + i).integers(0, 256, size, dtype=np.uint8).tobytes()


def tensors_for(prefix: str, seed: int, count: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {f"{prefix}.w{i}": torch.randn(9_000 + 1_001 * i, generator=g) for i in range(count)}
    out[f"{prefix}.ids"] = torch.arange(300 + seed, dtype=torch.int64)
    return out


def fds_on(paths) -> list[str]:
    """This process's descriptors open on any of ``paths``."""
    wanted = {str(Path(p).resolve()) for p in paths}
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.removesuffix(" (deleted)") in wanted:
            out.append(f"{fd} -> {target}")
    return out


def seg(offset: int, n: int):
    from fastload.sources import Segment

    buf = bytearray(n)
    return buf, [Segment(offset, memoryview(buf))]


@dataclass(eq=False)
class Arrivals(Rule):
    """Notes when each matching request arrives and holds it ``seconds`` before it is answered (a slow server).
    With a fixed hold, requests in flight at once are those that arrive within ``seconds`` of each other."""

    seconds: float = 0.1
    times_seen: list = None  # type: ignore[assignment]

    def __post_init__(self):
        self.times_seen = []

    def wants_to_fire(self) -> bool:
        self.times_seen.append(time.monotonic())
        return True

    def apply(self, plan) -> None:
        plan.delay += self.seconds

    def most_at_once(self) -> int:
        ts = sorted(self.times_seen)
        best = 0
        for i, t in enumerate(ts):
            best = max(best, sum(1 for u in ts[i:] if u - t < self.seconds * 0.8))
        return best


# == 1. LocalTransport: bounded descriptors ======================================================================


def test_many_threads_many_files_two_descriptors_exact_bytes_and_no_leak(tmp_path):
    """24 files, room for 2 descriptors, 8 threads reading 300 random ranges at once: every byte from the right
    file (descriptor numbers are reused all the time), no EBADF, and nothing left open after aclose."""
    from fastload.sources.local import LocalTransport

    size = 48 * 1024
    paths = [tmp_path / f"f{i:02d}.bin" for i in range(24)]
    data = [pattern(i, size) for i in range(24)]
    for p, d in zip(paths, data):
        p.write_bytes(d)
    before = fds()
    rng = random.Random(7)

    async def main():
        transport = LocalTransport(8, fastload.Trace(), max_open=2)
        try:
            infos = await asyncio.gather(*(transport.stat(str(p)) for p in paths))
            jobs = []
            for _ in range(300):
                i = rng.randrange(24)
                off = rng.randrange(size - 1)
                n = rng.randint(1, min(6000, size - off))
                buf, segs = seg(off, n)
                jobs.append((i, off, n, buf, transport.read(infos[i], segs)))
            results = await asyncio.gather(*(j[4] for j in jobs), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not errors, errors[:3]
            for i, off, n, buf, _ in jobs:
                assert bytes(buf) == data[i][off:off + n], (i, off, n)
            assert len(transport._fds) <= 8  # threads may hold more than max_open at once, never many more
            assert len(fds_on(paths)) <= 8
        finally:
            await transport.aclose()

    asyncio.run(main())
    assert not fds_on(paths)
    assert fds() - before == set() or not [f for f in fds() - before if "f" in f and ".bin" in f]


def test_readers_racing_renames_over_evicted_files_never_see_new_bytes(tmp_path):
    """While 6 threads read 12 files through 2 descriptors, another thread renames new files over them: each
    read returns the pinned bytes or raises SourceChangedError naming that file; never the new bytes."""
    from fastload.sources.local import LocalTransport

    size = 32 * 1024
    paths = [tmp_path / f"r{i:02d}.bin" for i in range(12)]
    old = [pattern(i, size) for i in range(12)]
    for p, d in zip(paths, old):
        p.write_bytes(d)
    stop = threading.Event()

    def replacer():
        k = 0
        while not stop.is_set():
            i = k % 12
            tmp = tmp_path / f"new{i}.tmp"
            tmp.write_bytes(pattern(100 + i, size))
            os.replace(tmp, paths[i])
            k += 1
            time.sleep(0.001)

    async def main():
        transport = LocalTransport(6, fastload.Trace(), max_open=2)
        try:
            infos = await asyncio.gather(*(transport.stat(str(p)) for p in paths))
            t = threading.Thread(target=replacer, daemon=True)
            t.start()
            jobs = []
            rng = random.Random(3)
            for _ in range(240):
                i = rng.randrange(12)
                off = rng.randrange(size - 4096)
                buf, segs = seg(off, 4096)
                jobs.append((i, off, buf, transport.read(infos[i], segs)))
            results = await asyncio.gather(*(j[3] for j in jobs), return_exceptions=True)
            stop.set()
            t.join()
            for (i, off, buf, _), r in zip(jobs, results):
                if isinstance(r, BaseException):
                    assert isinstance(r, fastload.SourceChangedError), repr(r)
                    assert paths[i].name in str(r)
                else:
                    assert bytes(buf) == old[i][off:off + 4096], f"file {i} read bytes not pinned"
        finally:
            stop.set()
            await transport.aclose()

    asyncio.run(main())
    assert not fds_on(paths)


def test_file_rewritten_in_place_with_old_mtime_while_evicted_is_source_changed(tmp_path):
    """``cp -p``/``rsync --inplace -t``: same inode, size and mtime, new bytes, written while our descriptor was
    closed for other files. Reopening it must not read the new bytes."""
    from fastload.sources.local import LocalTransport

    paths = [tmp_path / f"w{i}.bin" for i in range(4)]
    for i, p in enumerate(paths):
        p.write_bytes(pattern(i, 8192))

    async def main():
        transport = LocalTransport(2, fastload.Trace(), max_open=2)
        try:
            infos = [await transport.stat(str(p)) for p in paths]  # w0 and w1 are closed by now
            st = os.stat(paths[0])
            with open(paths[0], "r+b") as f:
                f.write(pattern(50, 8192))
            os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns))
            buf, segs = seg(0, 8192)
            with pytest.raises(fastload.SourceChangedError, match="w0.bin"):
                await transport.read(infos[0], segs)
            buf, segs = seg(0, 8192)  # the others still read
            await transport.read(infos[1], segs)
            assert bytes(buf) == pattern(1, 8192)
        finally:
            await transport.aclose()

    asyncio.run(main())


def test_file_deleted_while_evicted_is_a_typed_error_naming_it(tmp_path):
    """A shard removed while its descriptor was closed cannot be reopened: a fastload error naming the file
    (SourceChangedError: it changed since the load pinned it), not a bare OSError."""
    from fastload.sources.local import LocalTransport

    paths = [tmp_path / f"d{i}.bin" for i in range(3)]
    for i, p in enumerate(paths):
        p.write_bytes(pattern(i, 4096))

    async def main():
        transport = LocalTransport(2, fastload.Trace(), max_open=2)
        try:
            infos = [await transport.stat(str(p)) for p in paths]
            paths[0].unlink()
            buf, segs = seg(0, 16)
            with pytest.raises(fastload.FastloadError, match="d0.bin") as err:
                await transport.read(infos[0], segs)
            assert isinstance(err.value, fastload.SourceChangedError), err.value  # it existed when pinned
        finally:
            await transport.aclose()

    asyncio.run(main())


def test_direct_io_with_eviction_exact_and_direct_descriptors_close_with_their_file(tmp_path):
    """O_DIRECT reads of cold files through 2 descriptors: bytes exact, reads went direct, and the O_DIRECT
    descriptor of a closed file is closed with it, and counts against max_open (2 descriptors in all)."""
    from fastload.sources.local import LocalTransport

    probe = tmp_path / "probe.bin"
    probe.write_bytes(b"x" * 8192)
    assert direct_supported(probe), "needs O_DIRECT and cachestat(2), as this project's machines have"
    size = 2 * MiB + 4096 + 123
    paths = [tmp_path / f"c{i}.bin" for i in range(6)]
    data = [pattern(i, size) for i in range(6)]
    for p, d in zip(paths, data):
        p.write_bytes(d)
        evict(p)
    trace = fastload.Trace()
    peak = []

    async def main():
        transport = LocalTransport(2, trace, direct_io=True, direct_budget=8 * MiB, max_open=2)
        try:
            infos = [await transport.stat(str(p)) for p in paths]
            for rnd in range(2):
                for i in range(6):
                    off = 4096 * 3 + 17 + rnd
                    n = MiB + 5000
                    buf, segs = seg(off, n)
                    await transport.read(infos[i], segs)
                    assert bytes(buf) == data[i][off:off + n], (rnd, i)
                    peak.append(len(fds_on(paths)))
                for p in paths:
                    evict(p)
            # and concurrently
            jobs = []
            for i in range(6):
                buf, segs = seg(8192 + 1, MiB + 777)
                jobs.append((i, buf, transport.read(infos[i], segs)))
            await asyncio.gather(*(j[2] for j in jobs))
            for i, buf, _ in jobs:
                assert bytes(buf) == data[i][8193:8193 + MiB + 777]
        finally:
            await transport.aclose()

    asyncio.run(main())
    assert trace.summary().counters.get("bytes_direct", 0) > 0
    assert max(peak) <= 2, peak
    assert not fds_on(paths)


def test_two_hundred_shards_under_rlimit_40_stream_dtype_direct_io(tmp_path):
    """A 200-shard checkpoint (cold) in a process allowed 40 open files: ``stream()`` with dtype conversion and
    ``direct_io`` gives every tensor once, exact against safetensors converted, and it read some bytes direct."""
    probe = tmp_path / "probe.bin"
    probe.write_bytes(b"x" * 8192)
    assert direct_supported(probe), "needs O_DIRECT and cachestat(2), as this project's machines have"
    g = torch.Generator().manual_seed(11)
    # ~1.1 MiB per shard, so each shard's read is large enough to go direct
    tensors = {f"t{i:03d}": torch.randn(280_000 + i, generator=g) for i in range(200)}
    ck = write_sharded(tmp_path / "ck", tensors, 200)
    for f in ck.glob("*.safetensors"):
        evict(f)
    code = textwrap.dedent(f"""
        import resource, sys, glob
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
        import torch, fastload
        from safetensors.torch import load_file
        trace = fastload.Trace()
        cfg = fastload.LoadConfig(direct_io=True)
        got = {{}}
        with fastload.stream({str(ck)!r}, dtype="bfloat16", config=cfg, trace=trace) as s:
            for name, t in s:
                assert name not in got, name
                got[name] = t
        want = {{}}
        for f in sorted(glob.glob({str(ck / "*.safetensors")!r})):
            want.update({{k: v.to(torch.bfloat16) for k, v in load_file(f).items()}})
        assert set(got) == set(want), (len(got), len(want))
        bad = [n for n in want if not torch.equal(got[n], want[n])]
        assert not bad, bad[:5]
        print("ok", trace.summary().counters.get("bytes_direct", 0))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout[-500:] + out.stderr[-3000:]
    assert int(out.stdout.split()[1]) > 0, "nothing was read with O_DIRECT"


# == 2. HTTP request slots ========================================================================================


@pytest.fixture
def http_sharded(http_server, http_dir):
    """An 8-shard checkpoint with its index, served over HTTP."""
    tensors = tensors_for("h", 1, count=7)
    write_sharded(http_dir / "ck", tensors, 8)
    return http_server.url_for(http_dir / "ck") + "/", tensors


def test_time_waiting_for_a_slot_does_not_count_against_the_retry_deadline(http_server, http_sharded):
    """``max_concurrency=1`` and a slow server (0.1 s a reply): the 8 shards' probes queue for the one slot for
    ~0.8 s. ``deadline_s`` bounds one chunk's attempts ("including the attempt in flight"), not the time spent
    waiting for its turn: a load with a 0.5 s deadline whose every attempt takes 0.1 s must succeed."""
    url, tensors = http_sharded
    rule = http_server.faults._add(Arrivals(pattern="*", seconds=0.1))
    cfg = QUICK.replace(max_concurrency=1, stall_timeout_s=2.0,
                        retry=QUICK_RETRY.__class__(max_attempts=4, backoff_base_s=0.01, backoff_max_s=0.05,
                                                    deadline_s=0.5))
    got = bounded(lambda: fastload.load(url, config=cfg), 20)
    assert_bit_exact(got, tensors)
    assert rule.most_at_once() == 1


def test_max_concurrency_bounds_every_request_of_a_sharded_http_load(http_server, http_sharded):
    """README: ``max_concurrency`` bounds HTTP(S) requests, size probes and header reads of every shard
    included. With 2, never 3 replies held by the server at once."""
    url, tensors = http_sharded
    rule = http_server.faults._add(Arrivals(pattern="*", seconds=0.08))
    got = bounded(lambda: fastload.load(url, config=QUICK.replace(max_concurrency=2, stall_timeout_s=2.0)), 20)
    assert_bit_exact(got, tensors)
    assert rule.most_at_once() <= 2, rule.most_at_once()


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_one_slot_with_verified_checksums_from_the_hub(hub, tmp_path, engine):
    """``max_concurrency=1`` + ``verify_checksums`` over an ``hf://`` sharded checkpoint (LFS sha256): in-order
    hashing must not wait on a read that waits for the slot. Loads, every shard verified."""
    tensors = tensors_for("hub", 2, count=5)
    write_sharded(tmp_path / "repo", tensors, 3)
    repo = repo_name("slots")
    hub.add_repo(repo, tmp_path / "repo")
    trace = fastload.Trace()
    cfg = QUICK.replace(max_concurrency=1, verify_checksums=True, stall_timeout_s=3.0, http_engine=engine)
    got = bounded(lambda: fastload.load(f"hf://{repo}", config=cfg, trace=trace), 20)
    assert_bit_exact(got, tensors)
    assert trace.summary().counters.get("checksums_verified") == 3, trace.summary().counters


def test_hub_redirect_lookups_are_bounded_by_max_concurrency(hub, tmp_path):
    """The Hub's HEAD per shard (where is this LFS file) is an HTTP request like any other: with
    ``max_concurrency=1`` the Hub must never be asked two things at once (GETs alone stay within it)."""
    tensors = tensors_for("hb", 3, count=5)
    write_sharded(tmp_path / "repo", tensors, 6)
    repo = repo_name("heads")
    hub.add_repo(repo, tmp_path / "repo")
    gets = hub.faults._add(Arrivals(pattern="*", methods=frozenset({"GET"}), seconds=0.05))
    heads = hub.faults._add(Arrivals(pattern="*", methods=frozenset({"HEAD"}), seconds=0.05))
    cfg = QUICK.replace(max_concurrency=1, stall_timeout_s=3.0)
    got = bounded(lambda: fastload.load(f"hf://{repo}", config=cfg), 20)
    assert_bit_exact(got, tensors)
    assert gets.most_at_once() == 1, gets.most_at_once()
    both = Arrivals(seconds=0.05)
    both.times_seen = gets.times_seen + heads.times_seen
    assert both.most_at_once() == 1, f"{heads.most_at_once()} HEADs at once, {both.most_at_once()} requests"


def test_one_slot_with_s3_presigned_gets_and_checksums(s3_server, s3_bucket, tmp_path):
    """``max_concurrency=1`` over an S3 prefix whose objects carry ChecksumSHA256: loads and verifies."""
    tensors = tensors_for("s3", 4, count=5)
    ck = write_sharded(tmp_path / "ck", tensors, 3)
    client = s3_server.client()
    for f in sorted(ck.iterdir()):
        client.put_object(Bucket=s3_bucket, Key=f"ck/{f.name}", Body=f.read_bytes(), ChecksumAlgorithm="SHA256")
    trace = fastload.Trace()
    cfg = QUICK.replace(max_concurrency=1, verify_checksums=True, stall_timeout_s=5.0)
    got = bounded(lambda: fastload.load(f"s3://{s3_bucket}/ck/", config=cfg, trace=trace), 25)
    assert_bit_exact(got, tensors)
    assert trace.summary().counters.get("checksums_verified") == 4, trace.summary().counters  # index + 3 shards


def test_one_slot_with_retries_and_backoff_while_others_wait(http_server, http_sharded):
    """Five 503s with Retry-After while every other request waits for the one slot: the load still finishes."""
    url, tensors = http_sharded
    http_server.faults.fail_first(5, 503, path="*.safetensors", retry_after=0)
    trace = fastload.Trace()
    got = bounded(lambda: fastload.load(url, config=QUICK.replace(max_concurrency=1, stall_timeout_s=2.0),
                                        trace=trace), 20)
    assert_bit_exact(got, tensors)
    assert trace.summary().counters.get("retries", 0) >= 5


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_stream_left_early_with_one_slot_and_a_hanging_reply(http_server, http_sharded, engine):
    """One slot, one shard's tensor bytes hang: leaving the stream after the first tensor returns at once and
    leaves no thread or socket."""
    url, tensors = http_sharded
    http_server.faults._add(Arrivals(pattern="*", seconds=0.02))
    cfg = QUICK.replace(max_concurrency=1, stall_timeout_s=5.0, http_engine=engine)
    with Leaks({http_server.port}) as leaks:
        def run():
            with fastload.stream(url, config=cfg) as s:
                for name, t in s:
                    http_server.faults.hang(path="*00005-of-00008.safetensors")
                    break
            return name
        t0 = time.monotonic()
        bounded(run, 10)
        assert time.monotonic() - t0 < 4
    leaks.check(grace_s=1.0)


def test_aload_cancelled_while_requests_wait_for_a_slot(http_server, http_sharded):
    """``aload`` with one slot and a slow server, cancelled while most requests wait for the slot: the cancel
    ends within a second, nothing is left behind, and the next load with the same settings works."""
    url, tensors = http_sharded
    http_server.faults._add(Arrivals(pattern="*", seconds=0.3))
    cfg = QUICK.replace(max_concurrency=1, stall_timeout_s=5.0)

    async def main():
        task = asyncio.ensure_future(fastload.aload(url, config=cfg))
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - t0

    with Leaks({http_server.port}) as leaks:
        took = bounded(lambda: asyncio.run(main()), 10)
    assert took < 1.5, took
    leaks.check(grace_s=1.0)
    http_server.faults.clear()
    assert_bit_exact(bounded(lambda: fastload.load(url, config=cfg), 15), tensors)


# == 3. Lists of directories and indexes ==========================================================================


def _two_dirs(tmp_path, n_a=2, n_b=3, same_names=True):
    """Two checkpoint directories with different tensors; with ``same_names`` both use the same shard file
    names (``model-00001-of-00002...``), so only their positions tell their shards apart."""
    ta, tb = tensors_for("a", 5), tensors_for("b", 6, count=5)
    a = write_sharded(tmp_path / "A", ta, n_a, metadata={"format": "pt"})
    b = write_sharded(tmp_path / "B", tb, n_b if not same_names else n_a, metadata={"format": "pt"})
    return a, b, ta, tb


def test_list_of_two_local_dirs_with_same_shard_file_names(tmp_path):
    a, b, ta, tb = _two_dirs(tmp_path)
    got = fastload.load([str(a), str(b)], config=QUICK)
    assert_bit_exact(got, {**ta, **tb})
    plan = fastload.plan([str(a), str(b)], config=QUICK)
    assert len(plan.files) == 4
    assert dict(plan.index_metadata) == {}  # two indexes: neither's metadata is the load's


def test_list_of_index_files_and_a_dir(tmp_path):
    a, b, ta, tb = _two_dirs(tmp_path)
    c = tmp_path / "C"
    tc = tensors_for("c", 9, count=2)
    c.mkdir()
    save_file(tc, str(c / "model.safetensors"))
    src = [str(a / "model.safetensors.index.json"), str(c), (b / "model.safetensors.index.json").as_uri()]
    got = fastload.load(src, config=QUICK)
    assert_bit_exact(got, {**ta, **tb, **tc})


def test_single_index_in_a_list_keeps_its_metadata(tmp_path):
    a, _, ta, _ = _two_dirs(tmp_path)
    plan = fastload.plan([str(a)], config=QUICK)
    assert plan.index_metadata.get("total_size") == sum(t.numel() * t.element_size() for t in ta.values())


def test_index_metadata_is_not_claimed_for_a_list_with_other_files(tmp_path):
    """One index plus another file: the index's ``total_size`` describes its own shards, not this load; the
    plan must not present it as the load's (as with two indexes)."""
    a, _, ta, _ = _two_dirs(tmp_path)
    c = tmp_path / "c.safetensors"
    save_file(tensors_for("c", 9, count=2), str(c))
    plan = fastload.plan([str(a), str(c)], config=QUICK)
    assert dict(plan.index_metadata).get("total_size") in (None, plan.output_bytes)


def test_same_shard_named_by_an_index_and_directly_is_a_format_error(tmp_path):
    a, _, ta, _ = _two_dirs(tmp_path)
    shard = sorted(a.glob("*.safetensors"))[0]
    with pytest.raises(fastload.FormatError) as err:
        fastload.load([str(a), str(shard)], config=QUICK)
    first = next(iter(load_file(str(shard))))
    assert first in str(err.value)


def test_same_dir_twice_and_two_indexes_sharing_a_shard(tmp_path):
    a, _, ta, _ = _two_dirs(tmp_path)
    with pytest.raises(fastload.FormatError):
        fastload.load([str(a), str(a / "model.safetensors.index.json")], config=QUICK)
    other = json.loads((a / "model.safetensors.index.json").read_text())
    (a / "other.index.json").write_text(json.dumps(other))
    with pytest.raises(fastload.FormatError):
        fastload.load([str(a / "model.safetensors.index.json"), str(a / "other.index.json")], config=QUICK)


def test_broken_second_index_error_names_its_own_checkpoint(tmp_path):
    """Index B names a tensor that lives in member A's shard, not B's: FormatError naming B's index (the file
    that is wrong) and where the tensor really is."""
    a, b, ta, tb = _two_dirs(tmp_path, same_names=False)
    doc = json.loads((b / "model.safetensors.index.json").read_text())
    doc["weight_map"]["a.w0"] = next(iter(doc["weight_map"].values()))
    (b / "model.safetensors.index.json").write_text(json.dumps(doc))
    with pytest.raises(fastload.FormatError) as err:
        fastload.load([str(a), str(b)], config=QUICK)
    msg = str(err.value)
    assert "a.w0" in msg and msg.startswith(str(b / "model.safetensors.index.json")), msg
    assert f"it is in {a}" in msg, msg


def test_missing_shard_of_second_index_names_that_shard(tmp_path):
    a, b, ta, tb = _two_dirs(tmp_path, same_names=False)
    victim = sorted(b.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(fastload.SourceNotFoundError) as err:
        fastload.load([str(a), str(b)], config=QUICK)
    assert str(victim) in str(err.value)


def test_names_shard_and_stream_over_a_list_of_dirs(tmp_path):
    a, b, ta, tb = _two_dirs(tmp_path)
    both = {**ta, **tb}
    names = ["b.w3", "a.ids", "a.w1"]
    got = fastload.load([str(a), str(b)], names=names, config=QUICK)
    assert_bit_exact(got, {n: both[n] for n in names})
    shard = fastload.Shard(1, 3, {r"\.w\d$": 0})
    got = fastload.load([str(a), str(b)], shard=shard, config=QUICK)
    want = {n: (t.tensor_split(3, 0)[1].contiguous() if n.split(".")[1].startswith("w") else t)
            for n, t in both.items()}
    assert_bit_exact(got, want)
    seen = {}
    with fastload.stream([str(a), str(b)], config=QUICK, dtype="float16") as s:
        for name, t in s:
            assert name not in seen
            seen[name] = t
    assert set(seen) == set(both)
    for n, t in both.items():
        assert torch.equal(seen[n], t.to(torch.float16) if t.is_floating_point() else t), n


def test_http_dir_with_index_s3_prefix_and_local_index_in_one_list(tmp_path, http_server, http_dir, s3_server,
                                                                    s3_bucket):
    ta, tb, tc = tensors_for("ha", 1), tensors_for("sb", 2, count=4), tensors_for("lc", 3)
    write_sharded(http_dir / "A", ta, 2)  # same shard file names in all three
    b = write_sharded(tmp_path / "B", tb, 2)
    s3_server.upload_dir(s3_bucket, "B", b)
    c = write_sharded(tmp_path / "C", tc, 2)
    src = [http_server.url_for(http_dir / "A") + "/", f"s3://{s3_bucket}/B", str(c / "model.safetensors.index.json")]
    cfg = QUICK.replace(stall_timeout_s=5.0)
    got = bounded(lambda: fastload.load(src, config=cfg), 25)
    assert_bit_exact(got, {**ta, **tb, **tc})
    plan = fastload.plan(src, config=cfg)
    assert len(plan.files) == 6 and dict(plan.index_metadata) == {}
    # an HTTP index URL (not its directory) in a list
    src2 = [http_server.url_for(http_dir / "A" / "model.safetensors.index.json"), str(c)]
    assert_bit_exact(bounded(lambda: fastload.load(src2, config=cfg), 15), {**ta, **tc})
