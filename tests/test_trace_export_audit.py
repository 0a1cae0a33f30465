"""Audit of the trace outputs: summary, ``to_dict`` (schema ``fastload.trace/1``), Chrome JSON and OpenTelemetry.

Every kind of load (local, HTTP with retries on both engines, S3, a stream left early, pull, from_pretrained)
must give a strict-JSON ``to_dict`` whose numbers agree with themselves, a Chrome trace that Perfetto's JSON
importer takes (required fields, durations >= 0, microseconds, slices on one track nested or disjoint), and
OpenTelemetry spans under one ``fastload.load`` span per load with valid attribute types. A ``Trace`` reused
for several loads (``Trace`` docstring: "Records one or more loads. Thread-safe") and one shared by two threads
must still give a truthful picture of each load.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import fastload
from checkpoints import chunky_tensors, llama_config, llama_like_tensors, write_sharded, write_single
from fastload.trace_export import SCHEMA

CHUNK = 64 * 1024
SMALL = fastload.LoadConfig(chunk_bytes=CHUNK, host_buffer_bytes=4 * CHUNK, max_concurrency=4)
FAST_RETRY = fastload.RetryConfig(backoff_base_s=0.001, backoff_max_s=0.002)
TIMES = ("queued", "taken", "requested", "started", "first_byte", "filled", "consumed")
EPS = 1e-6

TOKEN = "tok-SECRET-aa17"
PASSWORD = "pw-SECRET-bb28"
SIGNATURE = "sig-SECRET-cc39"


# -- helpers ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """~0.8 MB: f32 tensors over several 64 KiB chunks, a bf16 one and an int64 one."""
    return write_single(tmp_path_factory.mktemp("trace_audit") / "model.safetensors",
                        chunky_tensors(seed=11, layers=3, shape=(256, 256)))


def ok_bytes(server, suffix: str = "") -> int:
    return sum(r.body_bytes for r in server.log if 200 <= r.status < 300 and r.path.endswith(suffix))


def check_dict(trace: fastload.Trace) -> dict:
    """``to_dict`` is strict JSON, matches the documented schema, and its numbers agree with each other."""
    d = trace.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text) == d
    assert d["schema"] == SCHEMA == "fastload.trace/1"
    assert {"schema", "fastload_version", "started_at_unix", "wall_s", "summary", "spans", "chunks", "counters",
            "counters_by_key", "errors"} <= set(d)
    wall = d["wall_s"]
    s = d["summary"]
    assert s["wall_s"] == wall >= 0
    assert list(s["breakdown"]) == ["io_wait", "copy", "convert", "overhead", "unattributed"]
    assert all(v >= 0 for v in s["breakdown"].values())
    assert abs(sum(s["breakdown"].values()) - wall) < 1e-3  # the five rows add up to the wall time
    assert sum(s["exclusive"].values()) <= wall + EPS
    for stage, busy in s["stages"].items():
        assert 0 <= s["exclusive"].get(stage, 0.0) <= busy + EPS <= wall + 2 * EPS, stage
    for span in d["spans"]:
        assert -EPS <= span["start"] <= span["end"] <= wall + EPS, span
    for c in d["chunks"]:
        times = [c[k] for k in TIMES + ("failed",) if c.get(k) is not None]
        assert all(-EPS <= t <= wall + EPS for t in times), c
        present = [c[k] for k in TIMES if c.get(k) is not None]
        assert present == sorted(present), c  # queued <= taken <= requested <= started <= first_byte <= ...
        if c.get("failed") is not None:
            assert c["requested"] is not None and c["requested"] <= c["failed"], c
        else:
            assert all(c[k] is not None for k in TIMES), c
    assert d["counters"] == s["counters"]
    assert s["bytes_fetched"] == d["counters"].get("bytes_fetched", 0)
    assert sum(s["bytes_by_file"].values()) == s["bytes_fetched"]
    assert s["chunks"] == sum(1 for c in d["chunks"] if c.get("filled") is not None)
    assert d["errors"] == s["errors"]
    return d


def nested_or_disjoint(slices: list[tuple[float, float]]) -> bool:
    """Chrome/Perfetto: complete events on one thread must nest properly (or not overlap at all)."""
    stack: list[float] = []
    for start, end in sorted(slices, key=lambda x: (x[0], -x[1])):
        while stack and stack[-1] <= start + 1e-3:
            stack.pop()
        if stack and end > stack[-1] + 1e-3:
            return False
        stack.append(end)
    return True


def check_chrome(doc: dict, d: dict | None = None) -> list[dict]:
    """Trace Event Format as Perfetto's JSON importer reads it."""
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    events = doc["traceEvents"]
    assert isinstance(events, list) and events
    names = {}
    by_tid: dict[int, list[tuple[float, float]]] = defaultdict(list)
    counters: dict[str, list[float]] = defaultdict(list)
    for e in events:
        assert isinstance(e.get("ph"), str) and isinstance(e.get("pid"), int) and isinstance(e.get("name"), str), e
        if e["ph"] == "M":
            if e["name"] in ("thread_name", "thread_sort_index"):
                assert isinstance(e.get("tid"), int), e
            if e["name"] == "thread_name":
                names[e["tid"]] = e["args"]["name"]
        elif e["ph"] == "X":
            assert isinstance(e.get("tid"), int), e
            assert isinstance(e.get("ts"), (int, float)) and e["ts"] >= -1e-3, e
            assert isinstance(e.get("dur"), (int, float)) and e["dur"] >= 0, e
            by_tid[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
        elif e["ph"] == "C":
            assert isinstance(e.get("ts"), (int, float)) and e["ts"] >= -1e-3, e
            assert all(isinstance(v, (int, float)) for v in e["args"].values()), e
            counters[e["name"]].append(e["ts"])
        else:
            pytest.fail(f"unexpected phase {e}")
    for tid, slices in by_tid.items():
        assert tid in names, f"track {tid} has no thread_name metadata"
        assert nested_or_disjoint(slices), f"slices on track {names[tid]!r} overlap without nesting: {sorted(slices)}"
    for name, stamps in counters.items():
        assert stamps == sorted(stamps), name
    flight = [e["args"]["chunks"] for e in events if e["ph"] == "C" and e["name"] == "chunks in flight"]
    assert all(n >= 0 for n in flight) and (not flight or flight[-1] == 0), flight
    assert doc["fastload"]["schema"] == SCHEMA
    if d is not None:  # microseconds on the same clock as to_dict's seconds
        assert json.loads(json.dumps(d["summary"])) == doc["fastload"]["summary"]
        for c in d["chunks"]:
            done = c["filled"] if c.get("filled") is not None else c.get("failed")
            if c.get("requested") is None or done is None:
                continue
            fetch = [e for e in events if e["ph"] == "X" and e.get("cat") == "fetch" and e["args"].get("id") == c["id"]
                     and e["args"].get("url") == c["url"] and abs(e["ts"] - c["requested"] * 1e6) < 1]
            assert len(fetch) >= 1, c
            assert abs(fetch[0]["dur"] - (done - c["requested"]) * 1e6) < 1, (fetch[0], c)
        ends = [e["ts"] + e["dur"] for e in events if e["ph"] == "X"]
        assert not ends or max(ends) <= d["wall_s"] * 1e6 + 1
    return events


OTEL_TYPES = (str, bool, int, float)


def check_otel(spans, loads: int, failed: bool = False) -> list:
    """One ``fastload.load`` root per load, every other span its child, attribute values OTel allows."""
    roots = [s for s in spans if s.name == "fastload.load"]
    assert len(roots) == loads, [s.name for s in spans]
    ids = {r.context.span_id: r for r in roots}
    for s in spans:
        for key, value in (s.attributes or {}).items():
            ok = isinstance(value, OTEL_TYPES) or (isinstance(value, tuple) and all(
                isinstance(v, OTEL_TYPES) for v in value))
            assert ok, (s.name, key, value)
            assert not (isinstance(value, float) and not math.isfinite(value)), (s.name, key, value)
        if s.name == "fastload.load":
            assert s.parent is None
            continue
        assert s.parent is not None and s.parent.span_id in ids, s.name
        root = ids[s.parent.span_id]
        assert s.context.trace_id == root.context.trace_id
        assert root.start_time <= s.start_time <= s.end_time <= root.end_time, s.name
    from opentelemetry.trace import StatusCode

    if failed:
        assert roots[-1].status.status_code == StatusCode.ERROR
    else:
        assert all(r.status.status_code != StatusCode.ERROR for r in roots), [r.status for r in roots]
    return roots


def summary_rows(summary: fastload.TraceSummary) -> dict[str, float]:
    table = summary.table()
    rows = {}
    for label in ("I/O wait", "copy / deserialize", "conversion", "runtime overhead", "unattributed"):
        line = next(line for line in table.splitlines() if line.strip().startswith(label))
        rows[label] = float(line[len(label) + 2:].split()[0])
    return rows


# -- every kind of load ----------------------------------------------------------------------------------------


def _http(ckpt, http_server, http_dir, engine):
    shutil.copy(ckpt, http_dir / "m.safetensors")
    url = http_server.url_for(http_dir / "m.safetensors")
    http_server.faults.cut_after(40 * 1024)  # every reply breaks off: resumed, counted as retries
    trace = fastload.Trace()
    fastload.load(url, config=SMALL.replace(retry=FAST_RETRY, http_engine=engine), trace=trace)
    assert trace.summary().counters["retries"] > 0
    assert trace.summary().bytes_fetched == ok_bytes(http_server)
    return trace, 1


def _s3(ckpt, s3_server, s3_bucket):
    s3_server.put(s3_bucket, "m.safetensors", ckpt.read_bytes())
    trace = fastload.Trace()
    fastload.load(f"s3://{s3_bucket}/m.safetensors", config=SMALL, trace=trace, dtype=torch.float16)
    return trace, 1


def _stream_left_early(ckpt):
    trace = fastload.Trace()
    with fastload.stream(ckpt, config=SMALL.replace(max_concurrency=1), trace=trace) as s:
        next(iter(s))
    assert trace.summary().counters.get("cancelled") == 1
    return trace, 1


def _pull(ckpt, http_server, http_dir, tmp_path):
    directory = write_sharded(http_dir / "pulled", chunky_tensors(seed=12, layers=4, shape=(128, 256)), 2)
    trace = fastload.Trace()
    out = fastload.pull(http_server.url_for(directory) + "/", to=tmp_path / "dest", trace=trace,
                        config=SMALL)
    assert (out / "model.safetensors.index.json").exists()
    # bytes_fetched is what the server sent (tensors, index, probes): nothing more, nothing less
    assert trace.summary().bytes_fetched == ok_bytes(http_server)
    return trace, 1


def _from_pretrained(tmp_path):
    pytest.importorskip("transformers")
    directory = write_sharded(tmp_path / "llama", llama_like_tensors(seed=4), 2)
    (directory / "config.json").write_text(json.dumps(llama_config()))
    trace = fastload.Trace()
    model = fastload.from_pretrained(directory, trace=trace)
    assert type(model).__name__ == "LlamaForCausalLM"
    return trace, None


KINDS = ["local", "local_float16", "http_threads_retries", "http_aiohttp_retries", "s3", "stream_left_early",
         "pull_http", "from_pretrained_llama"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_load_exports_consistently(kind, ckpt, request, tmp_path, otel_spans):
    otel_spans.clear()
    if kind == "local":
        trace, loads = fastload.Trace(), 1
        fastload.load(ckpt, config=SMALL, trace=trace)
    elif kind == "local_float16":
        trace, loads = fastload.Trace(), 1
        fastload.load(ckpt, config=SMALL, trace=trace, dtype="float16")
    elif kind.startswith("http_"):
        trace, loads = _http(ckpt, request.getfixturevalue("http_server"), request.getfixturevalue("http_dir"),
                             kind.split("_")[1])
    elif kind == "s3":
        trace, loads = _s3(ckpt, request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket"))
    elif kind == "stream_left_early":
        trace, loads = _stream_left_early(ckpt)
    elif kind == "pull_http":
        trace, loads = _pull(ckpt, request.getfixturevalue("http_server"), request.getfixturevalue("http_dir"),
                             tmp_path)
    else:
        trace, loads = _from_pretrained(tmp_path)
    d = check_dict(trace)
    assert d["errors"] == []
    assert d["chunks"], "a load that read tensors records its chunks"
    chrome = trace.to_chrome()
    check_chrome(chrome, d)
    summary = trace.summary()
    rows = summary_rows(summary)
    assert abs(sum(rows.values()) - summary.wall_s) <= 5 * 0.0005 + 1e-9  # printed to the ms, each row rounded
    assert f"{summary.wall_s:.3f}" in str(summary)
    spans = otel_spans.get_finished_spans()
    roots = check_otel(spans, loads if loads is not None else len([s for s in spans if s.name == "fastload.load"]))
    assert roots
    if loads == 1:
        assert roots[0].attributes["fastload.bytes_fetched"] == summary.bytes_fetched
        assert roots[0].attributes["fastload.chunks"] == summary.chunks


def test_started_at_unix_is_when_the_load_began(ckpt):
    trace = fastload.Trace(otel=False)
    time.sleep(0.2)  # the Trace was made earlier than the load began
    before = time.time()
    fastload.load(ckpt, config=SMALL, trace=trace)
    after = time.time()
    d = check_dict(trace)
    assert before - 0.01 <= d["started_at_unix"] <= after
    assert d["started_at_unix"] + d["wall_s"] <= after + 0.01


def test_trace_path_is_the_same_as_save_and_to_chrome(ckpt, tmp_path):
    out = tmp_path / "load.json"
    trace = fastload.Trace(out, otel=False)
    fastload.load(ckpt, config=SMALL, trace=trace)
    written = json.loads(out.read_text())
    check_chrome(written, check_dict(trace))
    saved = tmp_path / "saved.json"
    trace.save(saved)
    assert json.loads(saved.read_text()) == json.loads(json.dumps(trace.to_chrome()))
    assert written["fastload"]["summary"] == json.loads(saved.read_text())["fastload"]["summary"]


# -- one Trace, several loads ----------------------------------------------------------------------------------


def test_reused_trace_accumulates_both_loads(ckpt, tmp_path):
    trace = fastload.Trace(otel=False)
    with pytest.raises(fastload.SourceNotFoundError):
        fastload.load(tmp_path / "absent.safetensors", trace=trace)
    fastload.load(ckpt, config=SMALL, trace=trace)
    fastload.load(ckpt, config=SMALL, trace=trace, names=["positions"])
    d = check_dict(trace)
    check_chrome(trace.to_chrome(), d)
    plan = fastload.plan(ckpt, config=SMALL)
    part = fastload.plan(ckpt, config=SMALL, names=["positions"])
    assert d["summary"]["chunks"] == len(plan.chunks) + len(part.chunks)
    assert len(d["errors"]) == 1 and d["errors"][0].startswith("SourceNotFoundError")


def test_reused_trace_second_load_span_is_not_marked_failed(ckpt, tmp_path, otel_spans):
    """A load that succeeds must not be reported to OpenTelemetry as failed because an earlier load on the same
    Trace failed."""
    from opentelemetry.trace import StatusCode

    trace = fastload.Trace()
    with pytest.raises(fastload.SourceNotFoundError):
        fastload.load(tmp_path / "absent.safetensors", trace=trace)
    otel_spans.clear()
    fastload.load(ckpt, config=SMALL, trace=trace)
    roots = [s for s in otel_spans.get_finished_spans() if s.name == "fastload.load"]
    assert len(roots) == 1
    assert roots[0].status.status_code != StatusCode.ERROR, roots[0].status.description


def test_reused_trace_otel_load_span_describes_its_own_load(ckpt, otel_spans):
    """One ``fastload.load`` span per load: its attributes are that load's, not the running total of the Trace."""
    trace = fastload.Trace()
    fastload.load(ckpt, config=SMALL, trace=trace)
    first = trace.summary()
    time.sleep(0.3)  # the caller does something else between the loads
    otel_spans.clear()
    fastload.load(ckpt, config=SMALL, trace=trace, names=["positions"])
    second = trace.summary()
    (root,) = [s for s in otel_spans.get_finished_spans() if s.name == "fastload.load"]
    duration = (root.end_time - root.start_time) / 1e9
    attrs = root.attributes
    assert attrs["fastload.bytes_fetched"] == second.bytes_fetched - first.bytes_fetched, dict(attrs)
    assert attrs["fastload.chunks"] == second.chunks - first.chunks, dict(attrs)
    assert attrs["fastload.wall_s"] <= duration + 1e-3, (dict(attrs), duration)


def test_one_trace_shared_by_two_threads(ckpt, http_server, http_dir):
    """Thread-safe: two concurrent loads on one Trace; counts add up and the Chrome trace stays well formed
    (each worker's slices nest or follow each other on its track)."""
    shutil.copy(ckpt, http_dir / "m.safetensors")
    url = http_server.url_for(http_dir / "m.safetensors")
    http_server.faults.slow_first_byte(0.05)  # every read takes a while: the two loads' reads overlap in time
    trace = fastload.Trace(otel=False)
    errors = []
    barrier = threading.Barrier(2)

    def work() -> None:
        try:
            barrier.wait(10)
            fastload.load(url, config=SMALL, trace=trace)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads) and not errors
    plan = fastload.plan(url, config=SMALL)
    d = check_dict(trace)
    assert d["summary"]["chunks"] == 2 * len(plan.chunks)
    assert d["summary"]["bytes_fetched"] == 2 * ckpt.stat().st_size
    check_chrome(trace.to_chrome(), d)


# -- big traces ------------------------------------------------------------------------------------------------


def test_ten_thousand_reads_export_fast_and_linear(tmp_path):
    """10k tensors, each read on its own (a dim-0 shard of 10k small vectors): exports stay linear and fast."""
    n = 10_000
    path = write_single(tmp_path / "many.safetensors", {f"t{i}": torch.full((64,), float(i)) for i in range(n)})
    trace = fastload.Trace(otel=False)
    got = fastload.load(path, config=SMALL, trace=trace, shard=fastload.Shard(0, 2, {"t": 0}))
    assert len(got) == n
    reads = len(trace.chunks)
    best = math.inf
    for _ in range(2):
        start = time.perf_counter()
        d = trace.to_dict()
        chrome = trace.to_chrome()
        text = json.dumps(chrome) + json.dumps(d)
        best = min(best, time.perf_counter() - start)
    # (a guard against quadratic work, not a benchmark: ~0.3 s alone, 1.5 s seen beside three test workers; a
    # quadratic export of 10k reads takes minutes)
    assert best < 6.0, f"exporting {reads} reads took {best:.2f} s"
    assert len(text) < 2000 * (reads + len(d["spans"])) + 100_000  # linear in what was recorded
    assert len(trace.summary().table().splitlines()) < 40  # the printed summary does not grow with the load


# -- failures, cancellation and secrets in OpenTelemetry --------------------------------------------------------


def test_failed_http_load_otel_error_status_and_no_secrets(ckpt, http_server, http_dir, otel_spans):
    shutil.copy(ckpt, http_dir / "m.safetensors")
    url = http_server.url_for(http_dir / "m.safetensors")
    host = url.split("//", 1)[1]
    sources = {
        "presigned": (f"{url}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={SIGNATURE}&X-Amz-Expires=60",
                      {"Authorization": f"Bearer {TOKEN}"}),
        "userinfo": (f"http://user:{PASSWORD}@{host}", {}),
    }
    for kind, (source, headers) in sources.items():
        # every reply breaks off midway (the header fits): resumed to success, or failed with one attempt
        for cut, attempts, fails in ((CHUNK // 2, 1, True), (40 * 1024, 8, False)):
            http_server.faults.clear()
            http_server.faults.cut_after(cut)
            otel_spans.clear()
            trace = fastload.Trace(otel=True)
            config = SMALL.replace(http_headers=headers, retry=fastload.RetryConfig(
                max_attempts=attempts, backoff_base_s=0.001, backoff_max_s=0.002))
            error = None
            try:
                fastload.load(source, config=config, trace=trace)
            except fastload.TransferError as exc:
                error = exc
            assert (error is not None) == fails, (kind, attempts, error)
            d = check_dict(trace)
            check_chrome(trace.to_chrome(), d)
            spans = otel_spans.get_finished_spans()
            check_otel(spans, 1, failed=fails)
            chunk_spans = [s for s in spans if s.name == "fastload.chunk"]
            assert chunk_spans, "retried or failed chunks get a span of their own"
            if fails:
                from opentelemetry.trace import StatusCode

                assert any(s.status.status_code == StatusCode.ERROR for s in chunk_spans)
            text = "\n".join(f"{s.name} {dict(s.attributes or {})} {s.status.description} {s.events} {s.resource}"
                             for s in spans)
            for secret in (TOKEN, PASSWORD, SIGNATURE, "SECRET"):
                assert secret not in text, (kind, secret, text[max(0, text.find(secret) - 300):][:600])


def test_stream_left_early_is_not_reported_as_failed_anywhere(http_server, http_dir, otel_spans):
    """Leaving a stream is a stop, not a failure (``Trace.finish``): no OTel span in ERROR, no '(failed)' slice."""
    from opentelemetry.trace import StatusCode

    path = write_single(http_dir / "stalled.safetensors", chunky_tensors(7, 4, (256, 256)))
    http_server.faults.stall_after(CHUNK // 2)  # reads are in flight (stalled) when the stream is left
    otel_spans.clear()
    trace = fastload.Trace()
    with fastload.stream(http_server.url_for(path), config=SMALL.replace(stall_timeout_s=30.0), trace=trace) as s:
        timer = threading.Timer(0.5, s.close)
        timer.start()
        with pytest.raises(RuntimeError, match="cancelled"):
            list(s)
        timer.join()
    summary = trace.summary()
    assert summary.counters.get("cancelled") == 1 and summary.errors == ()
    assert any(c.get("failed") is not None for c in trace.chunks), "reads were in flight when the stream was left"
    d = check_dict(trace)
    events = check_chrome(trace.to_chrome(), d)
    spans = otel_spans.get_finished_spans()
    check_otel(spans, 1)
    otel_errors = [(s.name, s.status.description) for s in spans if s.status.status_code == StatusCode.ERROR]
    chrome_failed = [e["name"] for e in events if e["ph"] == "X" and "failed" in e["name"]]
    assert (otel_errors, chrome_failed) == ([], []), "a stream left early shows as failed"


def test_from_pretrained_http_bytes_fetched_are_the_weights_sent(http_server, http_dir):
    """``trace=`` covers the weights: bytes_fetched is exactly what the server sent for the safetensors files."""
    pytest.importorskip("transformers")
    directory = write_single(http_dir / "llama" / "model.safetensors", llama_like_tensors(seed=5)).parent
    (directory / "config.json").write_text(json.dumps(llama_config()))
    trace = fastload.Trace(otel=False)
    fastload.from_pretrained(http_server.url_for(directory) + "/", trace=trace)
    s = trace.summary()
    assert s.bytes_fetched == ok_bytes(http_server, ".safetensors") > 0
    check_chrome(trace.to_chrome(), check_dict(trace))
