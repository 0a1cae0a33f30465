"""Is the trace honest? Its numbers checked against what the sources really saw.

Byte totals are compared exactly with what was counted outside fastload: the HTTP test server's log, the
``s3_proxy`` FaultProxy in front of moto S3, and for local files the bytes the process read (``rchar`` of
``/proc/self/io``, which counts every byte passed to ``pread``/``preadv``). Per-chunk ``attempts`` are compared
with the requests the server logged for that chunk's byte range. Stage seconds must be >= 0, the attributed
parts must never add up to more than ``wall_s``, and ``wall_s`` must be close to the wall time measured around
the call. Also: a failed load's trace, a ``Trace`` reused for several loads, a stream left early, the trace of
``fastload.plan``, the summary's table vs ``to_dict`` vs the JSON file, percentiles recomputed from the chunk
records, and ``fastload load --trace --json`` against the Python API. Times are compared with generous bounds
only; counts and bytes exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import safetensors.torch
import torch
from checkpoints import chunky_tensors, write_sharded, write_single

import fastload
from fastload.cli import main
from fastload.trace import percentile

CHUNK = 64 * 1024
SMALL = fastload.LoadConfig(chunk_bytes=CHUNK, host_buffer_bytes=4 * CHUNK, max_concurrency=4)
FAST_RETRY = fastload.RetryConfig(backoff_base_s=0.001, backoff_max_s=0.002)
EPS = 1e-6
TIMES = ("queued", "taken", "requested", "started", "first_byte", "filled", "consumed")


# -- helpers ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """~0.8 MB: three 256x256 f32 tensors (several 64 KiB chunks each), a bf16 one and an int64 one."""
    return write_single(tmp_path_factory.mktemp("honesty") / "model.safetensors",
                        chunky_tensors(seed=13, layers=3, shape=(256, 256)))


def data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def ok_bytes(server, path: str | None = None) -> int:
    """Body bytes of the 2xx replies the server (or proxy) sent: tensor and header bytes, not error pages."""
    return sum(r.body_bytes for r in server.requests(path) if 200 <= r.status < 300)


def gets_by_range_end(server, path: str | None = None) -> Counter:
    """How many GETs asked for a range ending at each byte (a resumed retry asks for the rest of the same range,
    so every attempt of a chunk ``[start, end)`` ends at ``end - 1``)."""
    ends = Counter()
    for r in server.requests(path):
        if r.method == "GET" and r.range:
            m = re.fullmatch(r"bytes=(\d+)-(\d+)", r.range)
            assert m, r.range
            ends[int(m.group(2)) + 1] += 1
    return ends


def rchar() -> int:
    """Bytes this process has read through read(2)/pread(2)/preadv(2), all threads together."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def check_times(s: fastload.TraceSummary, outside: float | None = None) -> None:
    """Every stage >= 0; nothing attributed beyond its busy time or the wall; ``wall_s`` within the call."""
    assert s.wall_s >= 0
    for stage, busy in s.stages.items():
        assert 0 <= busy <= s.wall_s + EPS, (stage, busy, s.wall_s)
    for stage, seconds in s.exclusive.items():
        assert 0 <= seconds <= s.stages.get(stage, 0.0) + EPS, (stage, seconds)
    assert all(v >= 0 for v in s.breakdown.values()), s.breakdown
    assert sum(s.exclusive.values()) <= s.wall_s + EPS
    attributed = sum(s.breakdown[k] for k in ("io_wait", "copy", "convert", "overhead"))
    assert attributed <= s.wall_s + EPS, s.breakdown
    assert sum(s.breakdown.values()) == pytest.approx(s.wall_s, abs=1e-9)
    if outside is not None:  # the trace's clock runs inside the call: never longer, and not much shorter
        assert s.wall_s <= outside + 1e-3, (s.wall_s, outside)
        assert s.wall_s >= outside - 0.25, (s.wall_s, outside)


def check_records(trace: fastload.Trace) -> list[dict]:
    """The chunk records of a load that completed: every time present and in order."""
    chunks = trace.chunks
    for c in chunks:
        times = [c[k] for k in TIMES]
        assert all(t is not None for t in times), c
        assert times == sorted(times), c
        assert c["attempts"] >= 1 and c["nbytes"] == c["end"] - c["start"] > 0, c
    return chunks


def latency(chunks: list[dict], since: str = "requested", until: str = "filled") -> dict:
    values = [c[until] - c[since] for c in chunks if c.get("filled") is not None and c.get(until) is not None]
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values)}


def http_url(http_server, http_dir: Path, path: Path) -> str:
    shutil.copy(path, http_dir / path.name)
    return http_server.url_for(http_dir / path.name)


def s3_config(s3_proxy, base: fastload.LoadConfig = SMALL) -> fastload.LoadConfig:
    return base.replace(s3=fastload.S3Options(endpoint_url=s3_proxy.url))


# -- local: bytes_fetched is what the process read -------------------------------------------------------------


LOCAL_CASES = {
    "plain": {},
    "names": {"names": ["layer0.weight", "layer2.weight", "positions"]},
    "shard_dim0": {"shard": fastload.Shard(1, 3, {"layer": 0})},
    "shard_dim1": {"shard": fastload.Shard(2, 3, {"layer": 1, "norm": 0})},  # rows read with the gaps between
    "dtype": {"dtype": torch.float16},
}


@pytest.mark.parametrize("case", list(LOCAL_CASES))
def test_local_bytes_fetched_is_what_the_process_read(ckpt, case):
    kwargs = LOCAL_CASES[case]
    fastload.load(ckpt, config=SMALL, trace=fastload.Trace(otel=False), **kwargs)  # warm up lazy imports
    trace = fastload.Trace(otel=False)
    before = rchar()
    t0 = time.perf_counter()
    got = fastload.load(ckpt, config=SMALL, trace=trace, **kwargs)
    outside = time.perf_counter() - t0
    read = rchar() - before
    s = trace.summary()
    # the loop's self-pipe and the like read a few bytes too; nothing near a chunk
    assert s.bytes_fetched <= read <= s.bytes_fetched + 4096, (s.bytes_fetched, read)
    plan = fastload.plan(ckpt, config=SMALL, **{k: v for k, v in kwargs.items() if k != "dtype"})
    assert s.bytes_fetched == data_start(ckpt) + sum(c["nbytes"] for c in check_records(trace))
    assert s.bytes_fetched == data_start(ckpt) + plan.total_bytes
    assert s.bytes_by_file == {str(ckpt): s.bytes_fetched} and s.chunks == len(plan.chunks)
    assert s.counters.get("retries", 0) == 0 and all(c["attempts"] == 1 for c in trace.chunks)
    assert len(got) == len(plan.tensors)
    check_times(s, outside)


def test_local_index_checkpoint_bytes_fetched_is_what_the_process_read(tmp_path):
    """An index and three shards: the index, every shard's header and the tensor bytes, nothing else."""
    tensors = {f"w{i}": torch.randn(20_000 + 7 * i, generator=torch.Generator().manual_seed(i)) for i in range(6)}
    directory = write_sharded(tmp_path / "ckpt", tensors, 3)
    fastload.load(directory, config=SMALL, trace=fastload.Trace(otel=False))  # warm up
    trace = fastload.Trace(otel=False)
    before = rchar()
    got = fastload.load(directory, config=SMALL, trace=trace, names=["w0", "w3", "w5"])
    read = rchar() - before
    assert all(torch.equal(got[n], tensors[n]) for n in ("w0", "w3", "w5"))
    s = trace.summary()
    assert s.bytes_fetched <= read <= s.bytes_fetched + 4096, (s.bytes_fetched, read)
    index = directory / "model.safetensors.index.json"
    shards = sorted(directory.glob("*.safetensors"))
    assert s.bytes_by_file[str(index)] == index.stat().st_size
    for shard in shards:
        assert s.bytes_by_file[str(shard)] == data_start(shard) + sum(
            c["nbytes"] for c in trace.chunks if c["url"] == str(shard))
    assert sum(s.bytes_by_file.values()) == s.bytes_fetched
    check_times(s)


def test_local_failed_load_counts_the_bytes_it_read(tmp_path):
    """The file changes after the first chunk: the next read completes, then the check after it fails the load.
    Those bytes were read from the disk; the trace must still count them (as HTTP counts a failed attempt's)."""
    path = write_single(tmp_path / "m.safetensors", {f"t{i}": torch.full((40_000,), float(i)) for i in range(4)})
    config = fastload.LoadConfig(chunk_bytes=CHUNK, host_buffer_bytes=4 * CHUNK, max_concurrency=1)
    fastload.load(path, config=config, trace=fastload.Trace(otel=False))  # warm up lazy imports

    def touch(done: int, total: int) -> None:
        if done:  # after the first chunk: the file looks modified from now on
            st = path.stat()
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    trace = fastload.Trace(otel=False)
    before = rchar()
    with pytest.raises(fastload.SourceChangedError):
        fastload.load(path, config=config, trace=trace, progress=touch)
    read = rchar() - before
    s = trace.summary()
    assert s.errors and s.errors[0].startswith("SourceChangedError"), s.errors
    failed = [c for c in trace.chunks if c["failed"] is not None]
    assert len(failed) == 1 and failed[0]["error"] == "SourceChangedError" and failed[0]["attempts"] == 1
    filled = [c for c in trace.chunks if c["filled"] is not None]
    assert len(filled) == 1
    assert read >= data_start(path) + filled[0]["nbytes"] + failed[0]["nbytes"]  # the failed chunk was read
    assert s.bytes_fetched <= read <= s.bytes_fetched + 4096, (s.bytes_fetched, read)
    check_times(s)


# -- HTTP: attempts per chunk are the requests the server saw ---------------------------------------------------


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_http_attempts_per_chunk_are_the_servers_requests(ckpt, http_server, http_dir, engine):
    url = http_url(http_server, http_dir, ckpt)
    http_server.faults.random_errors(0.35, statuses=(503,), seed=4)
    trace = fastload.Trace(otel=False)
    config = SMALL.replace(retry=FAST_RETRY, http_engine=engine)
    t0 = time.perf_counter()
    got = fastload.load(url, config=config, trace=trace, dtype=torch.bfloat16)
    outside = time.perf_counter() - t0
    want = safetensors.torch.load_file(ckpt)
    assert all(bytes_equal(got[n], want[n].to(torch.bfloat16) if want[n].is_floating_point() else want[n])
               for n in want)
    s = trace.summary()
    chunks = check_records(trace)
    served = gets_by_range_end(http_server)
    assert {c["end"]: c["attempts"] for c in chunks} == {c["end"]: served[c["end"]] for c in chunks}
    failed = sum(1 for r in http_server.log if r.status == 503)
    assert failed > 3 and s.counters["retries"] == failed
    assert any(c["attempts"] > 1 for c in chunks)
    assert s.bytes_fetched == ok_bytes(http_server) == ckpt.stat().st_size
    assert s.chunk_latency == latency(chunks)  # the percentiles are those of the records
    assert s.first_byte_latency == latency(chunks, until="first_byte")
    check_times(s, outside)


def test_wall_time_is_the_calls_with_a_slow_server(ckpt, http_server, http_dir):
    """Every request waits 0.12 s for its first byte: the wall time, chunk latencies and I/O wait say so."""
    url = http_url(http_server, http_dir, ckpt)
    http_server.faults.slow_first_byte(0.12)
    trace = fastload.Trace(otel=False)
    t0 = time.perf_counter()
    fastload.load(url, config=SMALL, trace=trace)
    outside = time.perf_counter() - t0
    s = trace.summary()
    chunks = check_records(trace)
    rounds = -(-len(chunks) // SMALL.max_concurrency)  # reads in flight at once, at most max_concurrency
    assert outside >= 0.12 * (2 + rounds)  # probe, header, then the chunks in rounds
    check_times(s, outside)
    assert all(c["filled"] - c["requested"] >= 0.11 for c in chunks)
    assert s.chunk_latency["p50"] >= 0.11 and s.chunk_latency == latency(chunks)
    assert s.breakdown["io_wait"] >= 0.8 * s.wall_s, s.breakdown
    assert s.bytes_fetched == ok_bytes(http_server)


# -- S3 through a counting proxy --------------------------------------------------------------------------------


def test_s3_broken_bodies_bytes_and_attempts_match_the_proxy(ckpt, s3_server, s3_bucket, s3_proxy):
    s3_server.put(s3_bucket, "m.safetensors", ckpt.read_bytes())
    cut = 20 * 1024
    s3_proxy.faults.cut_after(cut)  # every GET body breaks off after 20 KiB; the transport resumes
    names = ["layer1.weight", "norm.weight", "positions"]
    trace = fastload.Trace(otel=False)
    got = fastload.load(f"s3://{s3_bucket}/m.safetensors", config=s3_config(s3_proxy, SMALL.replace(retry=FAST_RETRY)),
                        trace=trace, names=names, dtype=torch.float16)
    want = safetensors.torch.load_file(ckpt)
    assert all(bytes_equal(got[n], want[n].to(torch.float16) if want[n].is_floating_point() else want[n])
               for n in names)
    s = trace.summary()
    chunks = check_records(trace)
    served = gets_by_range_end(s3_proxy)
    assert {c["end"]: c["attempts"] for c in chunks} == {c["end"]: -(-c["nbytes"] // cut) for c in chunks}
    assert {c["end"]: c["attempts"] for c in chunks} == {c["end"]: served[c["end"]] for c in chunks}
    gets = sum(1 for r in s3_proxy.log if r.method == "GET")
    assert gets == 2 + sum(c["attempts"] for c in chunks)  # two header reads (length, JSON), small enough to fit
    assert s.counters["retries"] == sum(c["attempts"] - 1 for c in chunks)
    assert s.bytes_fetched == ok_bytes(s3_proxy)
    assert s.bytes_by_source == {"s3": s.bytes_fetched}
    check_times(s)


def test_s3_failed_load_trace_has_the_reads_the_attempts_and_the_error(ckpt, s3_server, s3_bucket, s3_proxy):
    """After the first chunk every GET is refused with 503: the failed chunk's record, the error's attempts and
    the proxy's log agree, and the bytes that came are counted."""
    s3_server.put(s3_bucket, "m.safetensors", ckpt.read_bytes())

    def refuse_from_now_on(done: int, total: int) -> None:
        if done and not s3_proxy.faults.rules:
            s3_proxy.faults.fail_first(1000, status=503)

    retry = fastload.RetryConfig(max_attempts=3, backoff_base_s=0.001, backoff_max_s=0.002)
    config = s3_config(s3_proxy, SMALL.replace(max_concurrency=1, retry=retry))
    trace = fastload.Trace(otel=False)
    with pytest.raises(fastload.TransferError) as info:
        fastload.load(f"s3://{s3_bucket}/m.safetensors", config=config, trace=trace, progress=refuse_from_now_on)
    s = trace.summary()
    assert len(s.errors) == 1 and s.errors[0].startswith("TransferError")
    filled = [c for c in trace.chunks if c["filled"] is not None]
    failed = [c for c in trace.chunks if c["failed"] is not None]
    assert len(filled) == 1 and len(failed) == 1, trace.chunks
    bad = failed[0]
    assert bad["error"] == "TransferError" and not bad["cancelled"]
    assert bad["attempts"] == info.value.attempts == 3
    assert gets_by_range_end(s3_proxy)[bad["end"]] == 3
    assert s.counters["retries"] == 2
    assert s.bytes_fetched == ok_bytes(s3_proxy) == data_start(ckpt) + filled[0]["nbytes"]
    assert s.chunks == 1 and "failed: TransferError" in s.table()
    check_times(s)


# -- plan: headers only ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["http", "s3"])
def test_plan_trace_is_the_header_bytes_the_server_sent(ckpt, transport, request):
    if transport == "http":
        server = request.getfixturevalue("http_server")
        url = http_url(server, request.getfixturevalue("http_dir"), ckpt)
        config = SMALL
    else:
        s3, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        server = request.getfixturevalue("s3_proxy")
        s3.put(bucket, "m.safetensors", ckpt.read_bytes())
        url, config = f"s3://{bucket}/m.safetensors", s3_config(server)
    for kwargs in ({}, {"names": ["positions"]}, {"shard": fastload.Shard(0, 2, {"layer": 1})}):
        server.reset()
        trace = fastload.Trace(otel=False)
        t0 = time.perf_counter()
        plan = fastload.plan(url, config=config, trace=trace, **kwargs)
        outside = time.perf_counter() - t0
        s = trace.summary()
        assert s.bytes_fetched == ok_bytes(server) == data_start(ckpt), kwargs
        assert plan.total_bytes > 0 and s.chunks == 0 and trace.chunks == []
        assert "fetch" not in s.stages and {"resolve", "header", "plan"} <= set(s.stages)
        check_times(s, outside)


# -- a stream left early ----------------------------------------------------------------------------------------


def test_stream_left_early_aborts_the_read_waiting_on_the_server(ckpt, http_server, http_dir):
    """One reader. Once the first chunk is in, the server waits 1 s before each reply: leaving the stream after
    the first tensor aborts the read that waits, which brought nothing and is not counted."""
    url = http_url(http_server, http_dir, ckpt)
    config = SMALL.replace(max_concurrency=1)
    plan = fastload.plan(url, config=config)

    def slow_from_now_on(done: int, total: int) -> None:
        if done and not http_server.faults.rules:
            http_server.faults.slow_first_byte(1.0)

    http_server.reset()
    trace = fastload.Trace(otel=False)
    with fastload.stream(url, config=config, trace=trace, progress=slow_from_now_on) as s:
        next(iter(s))
        t0 = time.perf_counter()
    left = time.perf_counter() - t0
    assert left < 0.9, f"leaving the stream waited {left:.2f} s for the server"
    s = trace.summary()
    filled = [c for c in trace.chunks if c["filled"] is not None]
    cancelled = [c for c in trace.chunks if c["failed"] is not None]
    assert len(filled) == 1 and len(cancelled) == 1 and len(plan.chunks) > 2, trace.chunks
    assert cancelled[0]["cancelled"] and cancelled[0]["error"] is None and cancelled[0]["first_byte"] is None
    assert s.counters.get("cancelled") == 1 and s.errors == () and s.chunks == 1
    assert s.bytes_fetched == data_start(ckpt) + filled[0]["nbytes"]
    assert s.bytes_by_file == {url: s.bytes_fetched}
    check_times(s)


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_stream_closed_mid_body_counts_the_partial_bytes(ckpt, http_server, http_dir, engine):
    """Every data reply sends 32 KiB at once and then stalls: closing the stream 0.5 s later, the two reads in
    flight brought exactly 32 KiB each, and their records say the first byte came at once (not at the close),
    before they were cancelled."""
    url = http_url(http_server, http_dir, ckpt)
    http_server.faults.stall_after(CHUNK // 2)  # the header reads are smaller and pass whole
    config = SMALL.replace(max_concurrency=2, stall_timeout_s=30.0, http_engine=engine)
    trace = fastload.Trace(otel=False)
    with fastload.stream(url, config=config, trace=trace) as s:
        timer = threading.Timer(0.5, s.close)
        timer.start()
        with pytest.raises(RuntimeError, match="cancelled"):
            list(s)
        timer.join()
    s = trace.summary()
    records = trace.chunks
    assert len(records) == 2 and all(c["cancelled"] and c["filled"] is None for c in records), records
    assert s.bytes_fetched == data_start(ckpt) + 2 * (CHUNK // 2) == ok_bytes(http_server)
    assert s.chunks == 0 and s.counters.get("cancelled") == 1 and s.errors == ()
    for c in records:
        assert c["first_byte"] is not None and c["first_byte"] - c["requested"] < 0.25, \
            f"first byte {c['first_byte'] - c['requested']:.3f} s after the request; it was sent at once"
        assert c["requested"] <= c["started"] <= c["first_byte"] <= c["failed"], c
    check_times(s)


# -- one Trace, several loads -----------------------------------------------------------------------------------


def test_reused_trace_adds_up_each_sources_bytes(ckpt, http_server, http_dir, s3_server, s3_bucket, s3_proxy):
    """README: a Trace records one or more loads; its wall clock runs from the first load's begin to the last
    one's end, and the pause between them is unattributed."""
    url = http_url(http_server, http_dir, ckpt)
    s3_server.put(s3_bucket, "m.safetensors", ckpt.read_bytes())
    s3_url = f"s3://{s3_bucket}/m.safetensors"
    trace = fastload.Trace(otel=False)
    t0 = time.perf_counter()
    fastload.load(ckpt, config=SMALL, trace=trace, names=["layer0.weight"])
    time.sleep(0.3)
    fastload.load(url, config=SMALL, trace=trace, shard=fastload.Shard(1, 2, {"layer": 0}))
    fastload.load(s3_url, config=s3_config(s3_proxy), trace=trace, dtype="float16")
    outside = time.perf_counter() - t0
    s = trace.summary()
    local_plan = fastload.plan(ckpt, config=SMALL, names=["layer0.weight"])
    assert s.bytes_by_source == {"local": data_start(ckpt) + local_plan.total_bytes,
                                 "http": ok_bytes(http_server), "s3": ok_bytes(s3_proxy)}
    assert s.bytes_by_file == {str(ckpt): s.bytes_by_source["local"], url: s.bytes_by_source["http"],
                               s3_url: s.bytes_by_source["s3"]}
    assert s.bytes_fetched == sum(s.bytes_by_source.values())
    assert s.chunks == len(check_records(trace))
    check_times(s, outside)
    assert s.wall_s >= 0.3 and s.breakdown["unattributed"] >= 0.25


# -- the summary's outputs agree ------------------------------------------------------------------------------


def parse_table(text: str) -> dict:
    lines = text.splitlines()
    head = re.fullmatch(r"wall ([\d.]+) s, fetched ([\d.]+) MB \(([\d.]+) GB/s\), (\d+) chunk\(s\)", lines[0])
    assert head, lines[0]
    out = {"wall": float(head[1]), "mb": float(head[2]), "gbps": float(head[3]), "chunks": int(head[4]),
           "rows": {}, "stages": {}, "latency": {}}
    for line in lines[2:]:
        if m := re.fullmatch(r"  (I/O wait|copy / deserialize|conversion|runtime overhead|unattributed)\s+"
                             r"([\d.]+)\s+([\d.]+)%", line):
            out["rows"][m[1]] = float(m[2])
        elif m := re.fullmatch(r"  (\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+|-)", line):
            out["stages"][m[1]] = (float(m[2]), float(m[3]), None if m[4] == "-" else float(m[4]))
        elif m := re.fullmatch(r"  (chunk latency|first byte): p50 ([\d.]+) ms, p99 ([\d.]+) ms, max ([\d.]+) ms",
                               line):
            out["latency"][m[1]] = tuple(float(x) for x in m.group(2, 3, 4))
        elif m := re.fullmatch(r"  bytes: fetched ([\d.]+) MB \((.*)\), copied ([\d.]+) MB, retries (\d+)", line):
            out["bytes"] = (float(m[1]), m[2], float(m[3]), int(m[4]))
        elif m := re.fullmatch(r"  bottleneck: (\S+) \(.*\)", line):
            out["bottleneck"] = m[1]
    return out


def test_table_to_dict_and_json_file_agree(ckpt, http_server, http_dir, tmp_path):
    url = http_url(http_server, http_dir, ckpt)
    http_server.faults.cut_after(40 * 1024, times=6)  # a few retries, so that the counter is not just 0
    out = tmp_path / "t.json"
    trace = fastload.Trace(out, otel=False)
    fastload.load(url, config=SMALL.replace(retry=FAST_RETRY), trace=trace, dtype="bfloat16")
    s = trace.summary()
    d = s.to_dict()
    assert str(s) == s.table()
    t = parse_table(s.table())
    assert t["wall"] == round(d["wall_s"], 3) and t["chunks"] == d["chunks"] == len(trace.chunks)
    assert t["mb"] == round(d["bytes_fetched"] / 1e6, 1) and t["gbps"] == round(d["throughput_gbps"], 2)
    assert d["throughput_gbps"] == pytest.approx(d["bytes_fetched"] / d["wall_s"] / 1e9)
    labels = {"io_wait": "I/O wait", "copy": "copy / deserialize", "convert": "conversion",
              "overhead": "runtime overhead", "unattributed": "unattributed"}
    assert t["rows"] == {labels[k]: round(v, 3) for k, v in d["breakdown"].items()}
    assert set(t["stages"]) == set(d["stages"])
    for stage, (busy, attributed, rate) in t["stages"].items():
        assert busy == round(d["stages"][stage], 3) and attributed == round(d["exclusive"].get(stage, 0.0), 3)
        want_rate = d["throughput"].get(stage)
        assert rate == (round(want_rate / 1e9, 2) if want_rate else None), stage
    for label, key in (("chunk latency", "chunk_latency"), ("first byte", "first_byte_latency")):
        assert t["latency"][label] == tuple(round(d[key][q] * 1e3, 1) for q in ("p50", "p99", "max"))
    fetched_mb, sources, copied_mb, retries = t["bytes"]
    assert retries == d["counters"]["retries"] > 0 and fetched_mb == t["mb"]
    assert sources == f"http {d['bytes_fetched'] / 1e6:.1f} MB"
    assert copied_mb == round(d["counters"]["bytes_copied"] / 1e6, 1)
    assert t["bottleneck"] == d["bottleneck"]
    assert d["bytes_fetched"] == ok_bytes(http_server)
    # the file written at the end of the load, to_dict() and a later save() carry the same summary
    written = json.loads(out.read_text())["fastload"]["summary"]
    assert written == json.loads(json.dumps(d))
    assert trace.to_dict()["summary"] == d
    trace.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["fastload"]["summary"] == written
    full = trace.to_dict()
    assert full["counters"] == d["counters"] and full["counters_by_key"]["bytes_fetched"] == d["bytes_by_file"]
    assert full["wall_s"] == d["wall_s"] and len(full["chunks"]) == len(trace.chunks)


# -- fastload load --trace --json ---------------------------------------------------------------------------------


def test_cli_load_json_is_the_trace_file_and_the_python_api(ckpt, http_server, http_dir, tmp_path, capsys):
    url = http_url(http_server, http_dir, ckpt)
    out = tmp_path / "cli.json"
    rc = main(["load", url, "--dtype", "float16", "--names", "layer0.weight", "positions", "--trace", str(out),
               "--json", "--chunk-size", "64KiB", "--concurrency", "4"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    cli = json.loads(printed.out)
    assert cli == json.loads(out.read_text())["fastload"]["summary"]
    assert cli["bytes_fetched"] == ok_bytes(http_server)
    check_times(fastload.TraceSummary(**{k: v for k, v in cli.items() if k != "throughput_gbps"}))

    http_server.reset()
    trace = fastload.Trace(otel=False)
    fastload.load(url, dtype="float16", names=["layer0.weight", "positions"], trace=trace,
                  config=fastload.LoadConfig(chunk_bytes=CHUNK, max_concurrency=4))
    api = trace.summary().to_dict()
    assert api["bytes_fetched"] == ok_bytes(http_server) == cli["bytes_fetched"]
    for key in ("chunks", "bytes_by_file", "bytes_by_source", "counters", "errors"):
        assert cli[key] == json.loads(json.dumps(api[key])), key
    assert set(cli["stages"]) == set(api["stages"])


# -- more sources of repeated requests ------------------------------------------------------------------------


def test_s3_refused_then_resigned_get_is_an_attempt_and_a_retry(ckpt, s3_server, s3_bucket, s3_proxy):
    """After the first chunk S3 refuses one GET with 403 (a presigned URL that expired): fastload signs again and
    repeats the request. The record's attempts are the GETs the proxy saw for that range, and the repeated
    request is in the ``retries`` counter like any other repeated request."""
    s3_server.put(s3_bucket, "m.safetensors", ckpt.read_bytes())

    def refuse_once(done: int, total: int) -> None:
        if done and not s3_proxy.faults.rules:
            s3_proxy.faults.fail_first(1, status=403)

    trace = fastload.Trace(otel=False)
    got = fastload.load(f"s3://{s3_bucket}/m.safetensors", config=s3_config(s3_proxy, SMALL.replace(max_concurrency=1)),
                        trace=trace, progress=refuse_once)
    want = safetensors.torch.load_file(ckpt)
    assert all(bytes_equal(got[n], want[n]) for n in want)
    chunks = check_records(trace)
    served = gets_by_range_end(s3_proxy)
    assert sum(1 for r in s3_proxy.log if r.status == 403) == 1
    assert {c["end"]: c["attempts"] for c in chunks} == {c["end"]: served[c["end"]] for c in chunks}
    assert sorted(c["attempts"] for c in chunks)[-2:] == [1, 2]
    s = trace.summary()
    assert s.counters.get("retries", 0) == sum(c["attempts"] - 1 for c in chunks) == 1
    assert s.bytes_fetched == ok_bytes(s3_proxy)


def test_pull_trace_counts_what_the_server_sent(ckpt, http_server, http_dir, tmp_path):
    url = http_url(http_server, http_dir, ckpt)
    http_server.faults.cut_after(40 * 1024, times=3)  # the 8-byte probe passes; two reads break off
    trace = fastload.Trace(otel=False)
    t0 = time.perf_counter()
    dest = fastload.pull(url, to=tmp_path / "dest", config=SMALL.replace(retry=FAST_RETRY), trace=trace)
    outside = time.perf_counter() - t0
    pulled = dest / ckpt.name if dest.is_dir() else dest
    assert pulled.read_bytes() == ckpt.read_bytes()
    s = trace.summary()
    assert s.bytes_fetched == ok_bytes(http_server), (s.bytes_fetched, ok_bytes(http_server), http_server.log)
    assert s.bytes_by_file == {url: s.bytes_fetched}
    assert sum(c["nbytes"] for c in trace.chunks) == ckpt.stat().st_size
    served = gets_by_range_end(http_server)
    assert all(c["attempts"] == served[c["end"]] for c in trace.chunks)
    assert s.counters["retries"] == sum(1 for r in http_server.log if r.body_bytes == 40 * 1024) == 2
    check_times(s, outside)
