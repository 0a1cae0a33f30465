"""Tracing: attribution, per-chunk events from every transport, exports, OpenTelemetry, ``fastload load``."""

from __future__ import annotations

import json
import math
import shutil
import sys
import threading
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import fastload
from checkpoints import chunky_tensors, write_single
from fastload.cli import main
from fastload.trace import CATEGORIES, NULL_TRACE, PRIORITY, STAGES, Trace, attribute, percentile, union_seconds
from fastload.trace_export import SCHEMA, emit_otel

CHUNK = 64 * 1024
SMALL = fastload.LoadConfig(chunk_bytes=CHUNK, host_buffer_bytes=4 * CHUNK, max_concurrency=4)
TIMES = ("queued", "taken", "requested", "started", "first_byte", "filled", "consumed")


class ClockTrace(Trace):
    """A Trace whose clock the test sets: summaries of hand-made timelines."""

    def __init__(self) -> None:
        super().__init__(otel=False)
        self.t = 0.0

    def now(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """~1.3 MB: f32 tensors spanning several 64 KiB chunks, a bf16 one and an int one."""
    return write_single(tmp_path_factory.mktemp("trace") / "model.safetensors",
                        chunky_tensors(seed=1, layers=4, shape=(256, 256)))


def file_layout(path: Path) -> tuple[int, dict[str, tuple[str, int]]]:
    """(data_start, {name: (dtype, nbytes)}) read with the reference library."""
    raw = path.read_bytes()
    data_start = 8 + int.from_bytes(raw[:8], "little")
    with safe_open(str(path), "pt") as f:
        sizes = {n: (str(f.get_tensor(n).dtype), f.get_tensor(n).nbytes) for n in f.keys()}
    return data_start, sizes


# -- the summary's arithmetic ---------------------------------------------------------------------


def test_union_seconds():
    assert union_seconds([]) == 0
    assert union_seconds([(0, 1), (0.5, 2), (3, 4), (3.2, 3.5)]) == pytest.approx(3.0)


def test_percentile_interpolates():
    assert percentile([5.0], 99) == 5.0
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile(list(range(101)), 99) == pytest.approx(99)


def test_sweep_gives_every_instant_to_one_stage():
    trace = ClockTrace()
    trace.begin()
    for stage, s, e in [("resolve", 0, 1), ("header", 1, 1.5), ("plan", 1.5, 1.6), ("fetch", 2, 6), ("fetch", 3, 8),
                        ("convert", 4, 5), ("convert", 7, 9), ("wait", 8.5, 9.5), ("fetch", 11, 12)]:
        trace.interval(stage, s, e)
    trace.t = 10.0  # the fetch at 11..12 is after the end and is clipped away
    trace.end()
    s = trace.summary()
    assert s.wall_s == 10
    assert s.exclusive == pytest.approx({"resolve": 1, "header": 0.5, "plan": 0.1, "fetch": 4, "convert": 3,
                                         "wait": 0.5})
    assert s.breakdown == pytest.approx({"io_wait": 5.5, "copy": 0, "convert": 3, "overhead": 0.6,
                                         "unattributed": 0.9})
    assert list(s.breakdown) == list(CATEGORIES)
    assert s.stages["fetch"] == pytest.approx(7)  # busy: union of [2,8] and [11,12]
    assert s.bottleneck == "fetch"
    assert "I/O wait" in s.table() and "bottleneck: fetch" in s.table()


def test_unknown_stage_is_overhead_ranked_above_io():
    trace = ClockTrace()
    trace.begin()
    trace.interval("fetch", 0, 4)
    trace.interval("tokenizer", 1, 2)
    trace.t = 4
    trace.end()
    s = trace.summary()
    assert s.exclusive == pytest.approx({"fetch": 3, "tokenizer": 1})
    assert s.breakdown["overhead"] == pytest.approx(1)


def test_unattributed_is_named_bottleneck_when_it_dominates():
    trace = ClockTrace()
    trace.begin()
    trace.interval("fetch", 0, 1)
    trace.t = 5
    trace.end()
    assert trace.summary().bottleneck == "unattributed"


span_lists = st.lists(st.tuples(st.sampled_from(STAGES + ("other",)), st.floats(0, 10), st.floats(0, 10)),
                      max_size=30)


@settings(max_examples=200, deadline=None)
@given(span_lists, st.floats(0.1, 12))
def test_breakdown_always_adds_up_to_wall(raw, end):
    spans = [(n, min(a, b), max(a, b)) for n, a, b in raw]
    exclusive = attribute(spans, 0.0, end)
    covered = union_seconds([(min(s, end), min(e, end)) for _, s, e in spans])
    assert sum(exclusive.values()) == pytest.approx(covered, abs=1e-9)
    for name, seconds in exclusive.items():
        busy = union_seconds([(min(s, end), min(e, end)) for n, s, e in spans if n == name])
        assert -1e-9 <= seconds <= busy + 1e-9
    if spans:  # the highest-priority stage present loses no time to any other
        present = {n for n, _, _ in spans}
        top = next(s for s in (p if p is not None else "other" for p in PRIORITY) if s in present)
        busy = union_seconds([(min(s, end), min(e, end)) for n, s, e in spans if n == top])
        assert exclusive.get(top, 0.0) == pytest.approx(busy, abs=1e-9)


def test_chunk_latency_percentiles_from_chunk_events():
    trace = ClockTrace()
    trace.begin()
    for i in range(100):
        trace.chunk(id=i, requested=0.0, first_byte=0.001 * (i + 1) / 2, filled=0.001 * (i + 1))
    trace.t = 1
    trace.end()
    s = trace.summary()
    assert s.chunks == 100
    assert s.chunk_latency["p50"] == pytest.approx(0.0505)
    assert s.chunk_latency["p99"] == pytest.approx(0.09901)
    assert s.chunk_latency["max"] == pytest.approx(0.1)
    assert s.first_byte_latency["max"] == pytest.approx(0.05)


def test_counters_are_thread_safe():
    trace = Trace(otel=False)

    def work() -> None:
        for _ in range(5000):
            trace.count("bytes_fetched", 3, key="s3://b/k")
            trace.interval("fetch", 0.0, 1.0)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = trace.snapshot()
    assert snap["counters"]["bytes_fetched"] == 8 * 5000 * 3
    assert snap["keyed"]["bytes_fetched"] == {"s3://b/k": 8 * 5000 * 3}
    assert len(snap["spans"]) == 8 * 5000


# -- real loads -------------------------------------------------------------------------------------


def check_chunks(trace: Trace, plan: fastload.LoadPlan, attempts=lambda c: 1) -> list[dict]:
    chunks = trace.chunks
    assert sorted(c["id"] for c in chunks) == [c.id for c in plan.chunks]
    by_id = {c.id: c for c in plan.chunks}
    for c in chunks:
        times = [c[k] for k in TIMES]
        assert all(t is not None for t in times), c
        assert times == sorted(times), c  # queued <= taken <= requested <= started <= first byte <= filled <= consumed
        assert (c["start"], c["end"], c["nbytes"]) == (by_id[c["id"]].start, by_id[c["id"]].end,
                                                       by_id[c["id"]].nbytes)
        assert c["attempts"] == attempts(c), c
        assert 0 <= c["worker"] < SMALL.max_concurrency
    return chunks


def test_local_load_counts_every_byte_and_chunk(ckpt):
    trace = Trace(otel=False)
    out = fastload.load(ckpt, config=SMALL, trace=trace)
    plan = fastload.plan(ckpt, config=SMALL)
    assert len(out) == 6
    check_chunks(trace, plan)
    data_start, _ = file_layout(ckpt)
    s = trace.summary()
    assert s.bytes_fetched == data_start + plan.total_bytes  # header reads + every chunk, nothing twice
    assert s.bytes_by_file == {str(ckpt): s.bytes_fetched}
    assert s.bytes_by_source == {"local": s.bytes_fetched}
    assert s.chunks == len(plan.chunks) > 10
    assert {"resolve", "header", "plan", "alloc", "fetch", "close"} <= set(s.stages)
    assert sum(s.breakdown.values()) == pytest.approx(s.wall_s, abs=1e-9)
    assert s.bottleneck in s.exclusive or s.bottleneck == "unattributed"
    assert s.throughput["fetch"] > 0 and s.counters.get("retries", 0) == 0


def test_conversion_is_traced_and_counted(ckpt):
    trace = Trace(otel=False)
    fastload.load(ckpt, config=SMALL, dtype=torch.float16, trace=trace)
    _, sizes = file_layout(ckpt)
    s = trace.summary()
    converted = sum(n for dtype, n in sizes.values() if dtype in ("torch.float32", "torch.bfloat16"))
    assert s.counters["bytes_converted"] == converted
    assert converted <= s.counters["bytes_copied"] <= s.bytes_fetched
    assert s.stages["convert"] > 0 and s.exclusive["convert"] > 0 and s.throughput["convert"] > 0
    assert sum(s.breakdown.values()) == pytest.approx(s.wall_s, abs=1e-9)
    assert any(c["staged"] for c in trace.chunks)


def test_http_attempts_and_retries_are_counted_per_chunk(ckpt, http_server, http_dir):
    shutil.copy(ckpt, http_dir / "m.safetensors")
    url = http_server.url_for(http_dir / "m.safetensors")
    cut = 24 * 1024  # every reply breaks off after 24 KiB; the transport resumes where it stopped
    http_server.faults.cut_after(cut)
    config = fastload.LoadConfig(chunk_bytes=CHUNK, host_buffer_bytes=4 * CHUNK, max_concurrency=4,
                                 retry=fastload.RetryConfig(backoff_base_s=0.001, backoff_max_s=0.002))
    trace = Trace(otel=False)
    fastload.load(url, config=config, trace=trace)
    chunks = check_chunks(trace, fastload.plan(url, config=config), attempts=lambda c: math.ceil(c["nbytes"] / cut))
    s = trace.summary()
    header_retries = s.counters["retries"] - sum(c["attempts"] - 1 for c in chunks)
    assert header_retries == math.ceil((file_layout(ckpt)[0] - 8) / cut) - 1  # the JSON header read is cut too
    assert s.bytes_by_source == {"http": s.bytes_fetched} and s.bytes_by_file == {url: s.bytes_fetched}


def test_http_first_byte_is_the_servers_delay(ckpt, http_server, http_dir):
    shutil.copy(ckpt, http_dir / "m.safetensors")
    url = http_server.url_for(http_dir / "m.safetensors")
    http_server.faults.slow_first_byte(0.15)
    trace = Trace(otel=False)
    fastload.load(url, config=fastload.LoadConfig(chunk_bytes=256 * 1024, max_concurrency=8), trace=trace)
    s = trace.summary()
    assert s.chunks >= 4
    for c in trace.chunks:
        assert c["first_byte"] - c["started"] >= 0.14
        assert c["filled"] - c["first_byte"] < c["first_byte"] - c["started"]
    assert s.first_byte_latency["p50"] >= 0.14
    # round trips before any chunk (stat, header) are as exposed as the chunks' own first bytes
    assert s.exclusive["resolve"] + s.exclusive["header"] >= 0.14 and s.exclusive["fetch"] >= 0.14
    assert s.breakdown["io_wait"] > 0.9 * s.wall_s and s.bottleneck in ("resolve", "header", "fetch")


def test_s3_bytes_are_filed_under_s3(ckpt, s3_server, s3_bucket):
    s3_server.put(s3_bucket, "m.safetensors", ckpt.read_bytes())
    url = f"s3://{s3_bucket}/m.safetensors"
    trace = Trace(otel=False)
    fastload.load(url, config=SMALL, trace=trace)
    s = trace.summary()
    assert s.bytes_by_source == {"s3": s.bytes_fetched} and s.bytes_by_file == {url: s.bytes_fetched}
    check_chunks(trace, fastload.plan(url, config=SMALL))


def test_tracing_off_records_nothing(ckpt):
    fastload.load(ckpt, config=SMALL)
    snap = NULL_TRACE.snapshot()
    assert snap["spans"] == [] and snap["chunks"] == [] and snap["counters"] == {}


# -- exports ----------------------------------------------------------------------------------------


def check_chrome(doc: dict) -> list[dict]:
    """Valid Trace Event Format: complete events never overlap on one track."""
    events = doc["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    by_tid = defaultdict(list)
    for e in events:
        assert e["ph"] in ("M", "X", "C"), e
        if e["ph"] == "X":
            assert e["ts"] >= -1 and e["dur"] >= 0 and e["tid"] in names and e["pid"] == 1, e
            by_tid[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
    for spans in by_tid.values():
        spans.sort()
        assert all(a[1] <= b[0] + 1e-6 for a, b in zip(spans, spans[1:]))
    assert doc["fastload"]["schema"] == SCHEMA
    return events


def test_trace_path_writes_chrome_json_with_summary(ckpt, tmp_path):
    out = tmp_path / "load.json"
    fastload.load(ckpt, config=SMALL, dtype="float16", trace=str(out))
    doc = json.loads(out.read_text())
    events = check_chrome(doc)
    tracks = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"pipeline", "worker 0", "convert"} <= tracks
    plan = fastload.plan(ckpt, config=SMALL)
    fetches = [e for e in events if e["ph"] == "X" and e["cat"] == "fetch"]
    assert len(fetches) == len(plan.chunks)
    assert any(e["ph"] == "C" and e["name"] == "MB fetched" for e in events)
    summary = doc["fastload"]["summary"]
    assert summary["chunks"] == len(plan.chunks) and summary["wall_s"] > 0
    assert sum(summary["breakdown"].values()) == pytest.approx(summary["wall_s"])
    assert not list(tmp_path.glob("*.tmp-*"))


def test_to_dict_schema(ckpt):
    trace = Trace(otel=False)
    fastload.load(ckpt, config=SMALL, trace=trace)
    d = json.loads(json.dumps(trace.to_dict()))
    assert d["schema"] == "fastload.trace/1" and d["fastload_version"] == fastload.__version__
    assert set(d) == {"schema", "fastload_version", "started_at_unix", "wall_s", "summary", "spans", "chunks",
                      "counters", "counters_by_key", "errors"}
    assert {"wall_s", "bytes_fetched", "stages", "breakdown", "exclusive", "throughput", "chunk_latency",
            "first_byte_latency", "bytes_by_source", "bytes_by_file", "bottleneck", "counters"} <= set(d["summary"])
    assert all(0 <= s["start"] <= s["end"] <= d["wall_s"] + 1e-6 for s in d["spans"])
    assert all(0 <= c["requested"] <= c["filled"] <= d["wall_s"] for c in d["chunks"])
    assert d["counters_by_key"]["bytes_fetched"] == {str(ckpt): d["summary"]["bytes_fetched"]}


def test_failed_load_still_writes_its_trace(ckpt, http_server, http_dir, tmp_path):
    shutil.copy(ckpt, http_dir / "m.safetensors")
    url = http_server.url_for(http_dir / "m.safetensors")
    http_server.faults.cut_after(CHUNK // 2)  # header reads fit; every chunk breaks off
    config = fastload.LoadConfig(chunk_bytes=CHUNK, max_concurrency=1, retry=fastload.RetryConfig(max_attempts=1))
    out = tmp_path / "failed.json"
    with pytest.raises(fastload.TransferError):
        fastload.load(url, config=config, trace=out)
    doc = json.loads(out.read_text())
    check_chrome(doc)
    assert doc["fastload"]["summary"]["errors"][0].startswith("TransferError")
    failed = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["name"].endswith("(failed)")]
    assert len(failed) == 1 and failed[0]["args"]["attempts"] == 1


def test_stream_writes_its_trace_when_closed_early(ckpt, tmp_path):
    out = tmp_path / "stream.json"
    with fastload.stream(ckpt, config=SMALL, trace=out) as s:
        next(iter(s))
    check_chrome(json.loads(out.read_text()))
    full = tmp_path / "full.json"
    with fastload.stream(ckpt, config=SMALL, trace=full) as s:
        assert len(list(s)) == 6
    summary = json.loads(full.read_text())["fastload"]["summary"]
    assert summary["errors"] == [] and summary["chunks"] == len(fastload.plan(ckpt, config=SMALL).chunks)


def test_reads_in_flight_when_a_stream_is_left_count_as_io_wait(http_server, http_dir):
    """Leaving a stream while its reads wait on a stalled server: that time was I/O wait, not unattributed."""
    path = write_single(http_dir / "stalled.safetensors", chunky_tensors(3, 4, (256, 256)))
    http_server.faults.stall_after(CHUNK // 2)  # headers are smaller; every 64 KiB data reply stalls midway
    trace = Trace(otel=False)
    config = SMALL.replace(stall_timeout_s=30.0)
    with fastload.stream(http_server.url_for(path), config=config, trace=trace) as s:
        timer = threading.Timer(0.6, s.close)
        timer.start()
        with pytest.raises(RuntimeError, match="cancelled"):  # closed from another thread
            list(s)
        timer.join()
    summary = trace.summary()
    assert summary.counters.get("cancelled") == 1
    assert summary.breakdown["io_wait"] > 0.5 and summary.breakdown["unattributed"] < 0.1, summary.breakdown


@pytest.mark.parametrize("bad", ["trace.txt", "no/such/dir/t.json", 42])
def test_bad_trace_argument_fails_before_any_io(tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(fastload.ConfigError):
        fastload.load(tmp_path / "absent.safetensors", trace=bad)


# -- OpenTelemetry ----------------------------------------------------------------------------------


def test_opentelemetry_without_a_provider_sends_nothing(ckpt):
    """In a fresh process (other tests here install a provider): no provider, no spans, nothing saved up."""
    import subprocess
    import textwrap

    script = textwrap.dedent(f"""
        import fastload
        from fastload.trace_export import emit_otel
        trace = fastload.Trace()
        fastload.load({str(ckpt)!r}, config=fastload.LoadConfig(chunk_bytes={CHUNK}, host_buffer_bytes={4 * CHUNK}),
                      trace=trace)
        sent = emit_otel(trace)
        rest = trace.unsent()  # everything was marked sent: nothing saved up for a later provider
        pending = not rest["spans"] and not rest["chunks"]
        print("RESULT", sent, pending)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "RESULT False True" in out.stdout, out.stdout + out.stderr


def test_opentelemetry_spans_per_load(ckpt, otel_spans, http_server, http_dir):
    otel_spans.clear()
    trace = Trace()
    fastload.load(ckpt, config=SMALL, trace=trace)
    spans = otel_spans.get_finished_spans()
    roots = [s for s in spans if s.name == "fastload.load"]
    assert len(roots) == 1 and roots[0].parent is None
    root = roots[0]
    children = [s for s in spans if s is not root]
    assert all(s.parent.span_id == root.context.span_id for s in children)
    names = [s.name for s in children]
    assert {"fastload.resolve", "fastload.header", "fastload.plan", "fastload.alloc", "fastload.close"} <= set(names)
    assert names.count("fastload.fetch") == 1 and "fastload.chunk" not in names  # clean chunks fold into one span
    fetch = next(s for s in children if s.name == "fastload.fetch")
    assert fetch.attributes["fastload.intervals"] == len(trace.chunks)
    assert root.attributes["fastload.bytes_fetched"] == trace.summary().bytes_fetched
    assert root.start_time <= min(s.start_time for s in children) and root.end_time >= max(s.end_time for s in children)

    otel_spans.clear()  # a second load on the same trace sends only its own spans; retried chunks get their own
    shutil.copy(ckpt, http_dir / "m.safetensors")
    http_server.faults.cut_after(48 * 1024)
    config = fastload.LoadConfig(chunk_bytes=CHUNK, max_concurrency=4,
                                 retry=fastload.RetryConfig(backoff_base_s=0.001, backoff_max_s=0.002))
    fastload.load(http_server.url_for(http_dir / "m.safetensors"), config=config, trace=trace)
    spans = otel_spans.get_finished_spans()
    retried = [c for c in trace.chunks if c["attempts"] > 1]
    assert retried and [s.name for s in spans].count("fastload.load") == 1
    chunk_spans = [s for s in spans if s.name == "fastload.chunk"]
    assert sorted(s.attributes["fastload.id"] for s in chunk_spans) == sorted(c["id"] for c in retried)
    assert all(s.attributes["fastload.attempts"] == 2 for s in chunk_spans)


def test_opentelemetry_is_optional(ckpt, monkeypatch):
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import now fails, as when not installed
    trace = Trace()
    fastload.load(ckpt, config=SMALL, trace=trace)
    assert trace.summary().chunks > 0
    assert emit_otel(trace) is False
    with pytest.raises(fastload.ConfigError, match="opentelemetry-api"):
        Trace(otel=True)


# -- fastload load ----------------------------------------------------------------------------------


def test_cli_load_prints_summary_and_writes_trace(ckpt, tmp_path, capsys):
    out = tmp_path / "cli.json"
    rc = main(["load", str(ckpt), "--dtype", "float16", "--trace", str(out), "--names", "layer0.weight",
               "positions", "--chunk-size", "64KiB"])
    printed = capsys.readouterr()
    assert rc == 0
    assert "loaded 2 tensor(s)" in printed.out and "1 float16" in printed.out and "1 int64" in printed.out
    for label in ("I/O wait", "copy / deserialize", "conversion", "runtime overhead", "unattributed", "bottleneck"):
        assert label in printed.out
    assert str(out) in printed.err
    check_chrome(json.loads(out.read_text()))


def test_cli_load_json_and_errors(ckpt, tmp_path, capsys):
    assert main(["load", str(ckpt), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sum(summary["breakdown"].values()) == pytest.approx(summary["wall_s"])
    assert main(["load", str(ckpt), "--trace", str(tmp_path / "t.txt")]) == 1
    assert "must end in .json" in capsys.readouterr().err
    assert main(["load", str(tmp_path / "missing.safetensors")]) == 1


def test_a_failed_load_whose_error_cannot_be_put_in_words_is_recorded_by_its_type(tmp_path):
    """The error a load ends with may be anyone's (a progress callback's): one whose ``__str__`` fails still
    ends the load with itself, and the trace records it by its type instead of failing in turn."""
    class Unspeakable(Exception):
        def __str__(self):
            raise RuntimeError("no words")

    path = write_single(tmp_path / "m.safetensors", {"w": torch.ones(4)})
    trace = fastload.Trace()

    def progress(done, total):
        raise Unspeakable()

    with pytest.raises(Unspeakable):
        fastload.load(path, trace=trace, progress=progress)
    assert trace.summary().errors == ("Unspeakable",)
