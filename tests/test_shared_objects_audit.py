"""Audit: objects shared between threads and loads.

One object handed to many loads at once, as a service does: one ``fastload.Trace`` given to sync loads in
several threads and to ``aload`` s gathered in one loop (local, HTTP and S3 at once), with its exports taken by
another thread while the loads run, and beside a ``Trace.one_load`` block (what ``from_pretrained`` wraps its
parts in); one ``progress`` callback shared by concurrent loads (called from several threads, slow, raising for
one load only, itself running a load); one ``fastload.stream`` object entered from two threads at once and
closed while several threads iterate it; one ``LoadConfig`` (with its ``RetryConfig``, ``S3Options`` and
headers) used by every entry point at once; one destination directory for ``fastload.pull`` s from several
threads at once. Every wait is bounded: a hang fails the test instead of the suite.

Real servers from conftest (HTTP Range server, moto S3); nothing of fastload is mocked. Results are checked
bit for bit against ``safetensors.torch.load_file``.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import inspect
import json
import sys
import threading
import time
from pathlib import Path

import botocore.session
import pytest
import torch
from checkpoints import write_single
from reliability_helpers import QUICK, assert_bit_exact, bounded, write_checkpoint
from safetensors.torch import load_file

import fastload
from fastload.api import LoadStream

# -- helpers ---------------------------------------------------------------------------------------------


def run_threads(jobs: dict, timeout: float = 20.0) -> dict:
    """Each ``fn`` of ``jobs`` ({key: fn}) in its own thread, started together: {key: result or exception}."""
    barrier = threading.Barrier(len(jobs))
    results: dict = {}

    def body(key, fn):
        barrier.wait(timeout)
        try:
            results[key] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            results[key] = exc

    threads = [threading.Thread(target=body, args=item, daemon=True) for item in jobs.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"a job did not end within {timeout} s (hang)"
    return results


def no_errors(results: dict) -> None:
    bad = {k: v for k, v in results.items() if isinstance(v, BaseException)}
    assert not bad, f"jobs failed: {bad!r}"


def exact(got: dict, path: Path) -> None:
    assert_bit_exact(got, load_file(str(path)))


def nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def consistent(s: fastload.TraceSummary) -> None:
    """What any summary must satisfy: the breakdown adds up to the wall time, and no stage was busy (nor given
    attributed time) longer than the wall clock ran."""
    assert abs(sum(s.breakdown.values()) - s.wall_s) < 1e-6, (s.breakdown, s.wall_s)
    for stage, busy in s.stages.items():
        assert busy <= s.wall_s + 1e-6, f"stage {stage} busy {busy:.3f} s of a {s.wall_s:.3f} s wall"
    assert sum(s.exclusive.values()) <= s.wall_s + 1e-6


@pytest.fixture
def trio(http_server, http_dir, s3_server, s3_bucket, tmp_path):
    """Three checkpoints of different sizes, one per source kind: {kind: (source, path, tensors)}."""
    out = {}
    for i, kind in enumerate(("local", "http", "s3")):
        folder = http_dir if kind == "http" else tmp_path
        path, tensors = write_checkpoint(folder / f"{kind}.safetensors", seed=40 + i, count=2 + i)
        if kind == "local":
            source = str(path)
        elif kind == "http":
            source = http_server.url_for(path)
        else:
            s3_server.put(s3_bucket, path.name, path.read_bytes())
            source = f"s3://{s3_bucket}/{path.name}"
        out[kind] = (source, path, tensors)
    return out


# -- one Trace, many loads -------------------------------------------------------------------------------


def test_one_trace_for_threads_and_for_aloads_gathered_in_one_loop(trio):
    """One Trace given to three sync loads (local, HTTP, S3) in three threads and, at the same time, to the same
    three as ``aload`` s gathered in one loop of a fourth thread. Every result is exact, and the trace holds
    exactly the two rounds: per file, twice what one load of it alone records; bytes and chunks add up; the
    summary is consistent and its export agrees with it."""
    alone, chunks_alone = {}, 0
    for source, _, _ in trio.values():
        t = fastload.Trace()
        fastload.load(source, config=QUICK, trace=t)
        alone.update(t.summary().bytes_by_file)
        chunks_alone += t.summary().chunks
    shared = fastload.Trace()

    async def gathered():
        return await asyncio.gather(*(fastload.aload(src, config=QUICK, trace=shared) for src, _, _ in trio.values()))

    jobs = {kind: (lambda s=source: fastload.load(s, config=QUICK, trace=shared))
            for kind, (source, _, _) in trio.items()}
    jobs["aloads"] = lambda: asyncio.run(gathered())
    results = run_threads(jobs)
    no_errors(results)
    for (kind, (_, path, _)), got in zip(trio.items(), results["aloads"]):
        exact(results[kind], path)
        exact(got, path)
    s = shared.summary()
    assert s.bytes_by_file == {url: 2 * n for url, n in alone.items()}
    assert s.bytes_fetched == 2 * sum(alone.values())
    assert set(s.bytes_by_source) == {"local", "http", "s3"}
    assert s.chunks == 2 * chunks_alone
    assert not s.errors and not s.counters.get("cancelled"), (s.errors, s.counters)
    consistent(s)
    d = shared.to_dict()
    assert d["summary"]["counters"] == d["counters"] == dict(s.counters)
    assert len(d["chunks"]) == s.chunks


def _torn(doc: dict, export: str) -> tuple | None:
    """(own rows, embedded summary) where an export disagrees with itself, else None."""
    if export == "to_dict":
        summary = doc["summary"]
        filled = sum(1 for c in doc["chunks"] if c["filled"] is not None)
        mine, theirs = (doc["counters"], filled, doc["wall_s"]), (summary["counters"], summary["chunks"],
                                                                   summary["wall_s"])
    else:
        mine = sum(1 for e in doc["traceEvents"] if e.get("cat") == "fetch" and "(" not in e["name"])
        theirs = doc["fastload"]["summary"]["chunks"]
    return None if mine == theirs else (mine, theirs)


@pytest.mark.parametrize("export", ["to_dict", "to_chrome"])
def test_an_export_taken_while_a_load_runs_is_one_snapshot(export, tmp_path):
    """A monitoring thread exports a Trace while another load records into it. The document must describe one
    moment: the summary it embeds must agree with its own counters, wall time and chunk rows (``to_dict``) or
    with its own fetch events (``to_chrome``). Both exporters take ``trace.snapshot()`` for the rows and then
    call ``trace.summary()``, which takes a second, later snapshot: what a load recorded in between is in one
    half of the document and not in the other. (Four threads loading while a fifth exports gave 2-8 torn
    documents in ~2000 here; a trace hook on the exporting thread holds it at that call while one more load
    runs, so that the test does not depend on luck.)"""
    path, _ = write_checkpoint(tmp_path / "m.safetensors", seed=50, count=3)
    trace = fastload.Trace()
    fastload.load(str(path), config=QUICK, trace=trace)
    summary_code = fastload.Trace.summary.__code__
    held, go = threading.Event(), threading.Event()

    def hook(frame, event, arg):
        if event == "call" and frame.f_code is summary_code and not held.is_set():
            held.set()
            go.wait(10)

    def export_with_hook():
        sys.settrace(hook)
        try:
            return getattr(trace, export)()
        finally:
            sys.settrace(None)
            held.set()

    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("doc", export_with_hook()), daemon=True)
    t.start()
    try:
        assert held.wait(10)
        exact(bounded(lambda: fastload.load(str(path), config=QUICK, trace=trace), 10), path)
    finally:
        go.set()
        t.join(10)
    assert not t.is_alive()
    doc = box["doc"]
    json.dumps(doc)
    torn = _torn(doc, export)
    assert torn is None, f"{export}() is torn: its own rows say {torn[0]}, its embedded summary {torn[1]}"
    assert _torn(getattr(trace, export)(), export) is None  # (at rest it agrees with itself)


def test_wall_time_runs_on_while_a_load_sharing_the_trace_is_in_flight(http_server, http_dir, tmp_path):
    """Load B (HTTP, slow first bytes) is in flight when load A of the same Trace starts and ends. A summary
    taken after A ended, while B still runs, must still be consistent: no stage busy longer than the wall.
    ``Trace.end`` stopped the trace's clock at A's end, so the wall time stood still while B went on
    recording stages, bytes and chunks (a throughput computed over a wall that no longer moves)."""
    local, _ = write_checkpoint(tmp_path / "a.safetensors", seed=61, count=2)
    remote, _ = write_checkpoint(http_dir / "slowb.safetensors", seed=62, count=3)
    fastload.load(str(local), config=QUICK)  # warm: A must be quick
    http_server.faults.slow_first_byte(0.4, times=1, path="*slowb*")
    trace = fastload.Trace()
    out: dict = {}
    b = threading.Thread(target=lambda: out.setdefault("b", fastload.load(http_server.url_for(remote), config=QUICK,
                                                                            trace=trace)), daemon=True)
    b.start()
    time.sleep(0.05)  # B has begun and waits for its first byte (0.4 s)
    deadline = time.monotonic() + 5
    exact(fastload.load(str(local), config=QUICK, trace=trace), local)
    assert b.is_alive(), "load B ended before load A: nothing to observe"
    docs = []
    while b.is_alive() and time.monotonic() < deadline:
        docs.append(trace.to_dict())
        time.sleep(0.01)
    b.join(5)
    assert not b.is_alive()
    exact(out["b"], remote)
    assert docs
    for doc in docs:  # every span recorded lies within the wall time; no stage busy longer than it
        late = max(span["end"] for span in doc["spans"])
        assert late <= doc["summary"]["wall_s"] + 1e-6, f"a span ends {late:.3f} s in, the wall is " \
                                                         f"{doc['summary']['wall_s']:.3f} s"
        assert max(doc["summary"]["stages"].values()) <= doc["summary"]["wall_s"] + 1e-6, doc["summary"]["stages"]
    consistent(trace.summary())


def test_a_load_beside_a_one_load_block_keeps_its_error(tmp_path):
    """``from_pretrained`` wraps the loads of its parts in ``trace.one_load()``: their ends are not published,
    the block's end is. A plain load that shares the Trace and fails while such a block runs in another thread
    must still be recorded as failed (its error in the summary and in the trace file). ``Trace.finish`` skips
    everything while the Trace-wide ``_parts`` count is above zero, whichever load is finishing: the plain load's
    error is dropped for good."""
    path, _ = write_checkpoint(tmp_path / "part.safetensors", seed=63, count=2)
    out = tmp_path / "shared.json"
    trace = fastload.Trace(out)
    inside, resume = threading.Event(), threading.Event()

    def whole():
        with trace.one_load():
            fastload.load(str(path), config=QUICK, trace=trace)
            inside.set()
            resume.wait(10)
            return fastload.load(str(path), config=QUICK, trace=trace)

    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("v", whole()), daemon=True)
    t.start()
    try:
        assert inside.wait(10)
        with pytest.raises(fastload.SourceNotFoundError):
            bounded(lambda: fastload.load(str(tmp_path / "absent.safetensors"), config=QUICK, trace=trace), 10)
    finally:
        resume.set()
        t.join(10)
    assert not t.is_alive()
    exact(box["v"], path)
    errors = trace.summary().errors
    assert any("SourceNotFoundError" in e for e in errors), f"the failed load is not in the trace: {errors}"
    written = json.loads(out.read_text())["fastload"]["summary"]["errors"]
    assert any("SourceNotFoundError" in e for e in written), written


# -- one progress callback, many loads --------------------------------------------------------------------


def test_one_progress_callback_shared_by_loads_in_threads_and_in_one_loop(http_server, http_dir, s3_server, s3_bucket,
                                                                          tmp_path):
    """One callback for six loads at once: sync loads in three threads and three ``aload`` s gathered in a
    fourth (local, HTTP, S3 each way, every checkpoint of its own size). Told apart by their totals, each load's
    calls start at (0, total), never go down and end at (total, total) exactly once; no call is lost."""
    sources = []
    for i in range(6):
        kind = ("local", "http", "s3")[i % 3]
        folder = http_dir if kind == "http" else tmp_path
        path, tensors = write_checkpoint(folder / f"p{i}.safetensors", seed=70 + i, count=1 + i)
        if kind == "http":
            source = http_server.url_for(path)
        elif kind == "s3":
            s3_server.put(s3_bucket, path.name, path.read_bytes())
            source = f"s3://{s3_bucket}/{path.name}"
        else:
            source = str(path)
        sources.append((source, path, nbytes(tensors)))
    assert len({n for _, _, n in sources}) == 6
    calls: list = []
    lock = threading.Lock()

    def progress(done, total):
        with lock:
            calls.append((done, total, threading.get_ident()))

    async def gathered():
        return await asyncio.gather(*(fastload.aload(src, config=QUICK, progress=progress)
                                      for src, _, _ in sources[3:]))

    jobs = {i: (lambda s=src: fastload.load(s, config=QUICK, progress=progress))
            for i, (src, _, _) in enumerate(sources[:3])}
    jobs["aloads"] = lambda: asyncio.run(gathered())
    results = run_threads(jobs)
    no_errors(results)
    for i in range(3):
        exact(results[i], sources[i][1])
        exact(results["aloads"][i], sources[3 + i][1])
    assert len({tid for _, _, tid in calls}) >= 2, "the callback was not shared across threads at all"
    for _, _, total in sources:
        mine = [d for d, t, _ in calls if t == total]
        assert mine and mine[0] == 0, (total, mine[:3])
        assert mine == sorted(mine), f"progress of the {total}-byte load went backwards"
        assert mine[-1] == total and mine.count(total) == 1, (total, mine[-3:])
    assert {t for _, t, _ in calls} == {n for _, _, n in sources}


class Refused(Exception):
    pass


def test_shared_progress_that_raises_for_one_load_fails_that_load_only(trio):
    """The shared callback raises for one load's total only (a per-request quota). That load raises the
    callback's own exception; the loads beside it, sharing the callback and the Trace, finish exact; the trace
    records exactly the one failure."""
    totals = {kind: nbytes(tensors) for kind, (_, _, tensors) in trio.items()}
    bad = totals["http"]
    trace = fastload.Trace()

    def progress(done, total):
        if total == bad and done > 0:
            raise Refused(f"quota at {done}")

    results = run_threads({kind: (lambda s=source: fastload.load(s, config=QUICK, trace=trace, progress=progress))
                           for kind, (source, _, _) in trio.items()})
    assert type(results["http"]) is Refused, results["http"]
    exact(results["local"], trio["local"][1])
    exact(results["s3"], trio["s3"][1])
    errors = trace.summary().errors
    assert len(errors) == 1 and errors[0].startswith("Refused"), errors


def test_slow_shared_progress_is_not_taken_for_a_stalled_server(http_server, http_dir):
    """The shared callback blocks longer than ``stall_timeout_s`` (0.5 s) on each load's first chunk (a slow
    UI, a lock held elsewhere). It runs on the load's own loop, yet a server that sent every byte in time must
    not be counted as stalled: no retry, no error, the server asked for each range once."""
    paths = [write_checkpoint(http_dir / f"s{i}.safetensors", seed=80 + i, count=2 + i)[0] for i in range(2)]
    blocked: set = set()
    lock = threading.Lock()

    def progress(done, total):
        with lock:
            first = done > 0 and total not in blocked
            blocked.add(total)
        if first:
            time.sleep(0.7)

    trace = fastload.Trace()
    jobs = {engine: (lambda p=p, e=engine: fastload.load(http_server.url_for(p), trace=trace, progress=progress,
                                                           config=QUICK.replace(http_engine=e)))
            for p, engine in zip(paths, ("threads", "aiohttp"))}
    results = run_threads(jobs)
    no_errors(results)
    for p, engine in zip(paths, ("threads", "aiohttp")):
        exact(results[engine], p)
    s = trace.summary()
    assert not s.counters.get("retries") and not s.errors, (s.counters, s.errors)
    assert s.bytes_fetched == sum(p.stat().st_size for p in paths)
    ranges = [(r.path, r.range) for r in http_server.log]
    assert len(ranges) == len(set(ranges)), "a range was requested twice"


@pytest.mark.parametrize("outer", ["load", "stream"])
def test_progress_callback_that_runs_a_sync_load_itself(outer, trio):
    """A callback that, at the first progress of a load, runs a whole other load synchronously (HTTP, then S3)
    from inside the first one's loop, sharing its Trace. All three results exact; the trace holds them all."""
    trace = fastload.Trace()
    inner: dict = {}

    def progress(done, total):
        if done > 0 and not inner:
            inner["http"] = fastload.load(trio["http"][0], config=QUICK, trace=trace)
            inner["s3"] = fastload.load(trio["s3"][0], config=QUICK, trace=trace)

    def run():
        if outer == "load":
            return fastload.load(trio["local"][0], config=QUICK, trace=trace, progress=progress)
        with fastload.stream(trio["local"][0], config=QUICK, trace=trace, progress=progress) as s:
            return dict(s)

    exact(bounded(run, 20), trio["local"][1])
    exact(inner["http"], trio["http"][1])
    exact(inner["s3"], trio["s3"][1])
    s = trace.summary()
    assert set(s.bytes_by_source) == {"local", "http", "s3"} and not s.errors
    consistent(s)


# -- one stream object, several threads -------------------------------------------------------------------


def test_stream_entered_from_two_threads_at_once(tmp_path):
    """Two threads enter one stream at the same moment (a ``with`` in a worker and in a watchdog). One of them
    must own it and the other be told that a stream runs once; the stream then delivers every tensor.

    ``LoadStream.__enter__`` checks ``_state`` and sets it in two steps: a thread switched out between them (a
    Python-level tracer, a debugger or coverage's, or a free-threaded build make that happen; here a trace
    function holds the first thread there) lets both through. The second ``ThreadedStream.start`` replaces the
    first one's ``AtExit`` hook; the dropped hook fires at once and stops the running stream as if the
    interpreter were exiting, so the winner's iteration raised SystemExit, and the loser got a bare "threads
    can only be started once"."""
    path, _ = write_checkpoint(tmp_path / "twice.safetensors", seed=90, count=4)
    s = fastload.stream(str(path), config=QUICK)
    code = LoadStream.__enter__
    lines, first = inspect.getsourcelines(code)
    marks = [first + i for i, line in enumerate(lines) if '_state = "open"' in line]
    held, second_done = threading.Event(), threading.Event()

    def tracer(frame, event, arg):
        if frame.f_code is not code.__code__:
            return None

        def local(frame, event, arg):
            if event == "line" and frame.f_lineno in marks and not held.is_set():
                held.set()
                second_done.wait(0.5)  # (a fixed __enter__ may make the second thread wait for this one)
            return local
        return local

    outcome: dict = {}

    def first_thread():
        sys.settrace(tracer)
        try:
            outcome["first"] = s.__enter__()
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["first"] = exc
        finally:
            sys.settrace(None)
            held.set()

    def second_thread():
        held.wait(5)
        try:
            outcome["second"] = s.__enter__()
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["second"] = exc
        finally:
            second_done.set()

    threads = [threading.Thread(target=first_thread, daemon=True), threading.Thread(target=second_thread, daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "entering the stream hung"
    try:
        entered = [k for k, v in outcome.items() if v is s]
        refused = [v for v in outcome.values() if v is not s]

        def drain():
            try:
                got = dict(s)
            except BaseException as exc:  # noqa: BLE001 - SystemExit included: it would end this thread quietly
                return f"iteration raised {type(exc).__name__}: {exc}"
            return got

        drained = bounded(drain, 10)
        assert len(entered) == 1 and len(refused) == 1 and isinstance(refused[0], RuntimeError) \
            and "runs once" in str(refused[0]) and isinstance(drained, dict), \
            f"entered by {entered}, refused with {refused!r}, then {drained if isinstance(drained, str) else 'ok'}"
        exact(drained, path)
    finally:
        s.close()


def test_several_threads_iterating_while_another_closes(http_server, http_dir):
    """Three threads iterate one stream of a slow HTTP load; a fourth closes it after the first tensors. Every
    iterating thread ends promptly, and none of them ends as if the load had finished: each is told the stream
    was closed. No tensor is handed out twice, each one handed out is exact, and a later iteration is refused."""
    g = torch.Generator().manual_seed(91)
    tensors = {f"t{i}": torch.randn(20_000, generator=g) for i in range(24)}
    path = write_single(http_dir / "closing.safetensors", tensors)
    http_server.faults.slow_first_byte(0.05, path="*closing*")
    s = fastload.stream(http_server.url_for(path), config=QUICK.replace(max_concurrency=2))
    s.__enter__()
    items: list = []
    ends: dict = {}
    first = threading.Event()
    lock = threading.Lock()

    def consume(k):
        try:
            for item in s:
                with lock:
                    items.append(item)
                first.set()
                time.sleep(0.01)
            ends[k] = "normal"
        except BaseException as exc:  # noqa: BLE001 - reported below
            ends[k] = exc

    threads = [threading.Thread(target=consume, args=(k,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    try:
        assert first.wait(10)
        bounded(s.close, 10)
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads), "a thread iterating the stream hung after close()"
    finally:
        s.close()
    names = [n for n, _ in items]
    assert len(names) == len(set(names)), "a tensor was handed out twice"
    for name, tensor in items:
        assert torch.equal(tensor, tensors[name]), name
    assert len(items) < len(tensors), "the load finished before close(): nothing was tested"
    assert all(isinstance(e, RuntimeError) and "closed" in str(e) for e in ends.values()), ends
    with pytest.raises(RuntimeError):
        list(s)


# -- one LoadConfig everywhere ----------------------------------------------------------------------------


def _state(config: fastload.LoadConfig) -> tuple:
    """Everything a config holds, its nested configs and headers included, as plain values."""
    plain = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    plain["retry"] = dataclasses.asdict(config.retry)
    plain["s3"] = {f.name: getattr(config.s3, f.name) for f in dataclasses.fields(config.s3)}
    plain["http_headers"] = dict(config.http_headers)
    return repr(sorted((k, repr(v)) for k, v in plain.items())), id(config.retry), id(config.s3), \
        id(config.http_headers), hash(config), vars(config).keys()


def test_one_config_used_by_every_entry_point_at_once_is_never_changed(trio, tmp_path):
    """One LoadConfig (its RetryConfig, S3Options with a shared botocore session, and headers) given to load,
    aload, stream, plan and pull over local, HTTP and S3 at once, with dtype and names. Nothing of it changes:
    same values, same nested objects, same hash, no attribute added (no per-load state parked on it), and it
    still equals a copy taken before."""
    config = QUICK.replace(http_headers={"X-Audit": "shared"}, verify_checksums=False,
                           s3=fastload.S3Options(session=botocore.session.get_session()))
    before, twin = _state(config), copy.copy(config)
    name = min(trio["s3"][2])

    async def aloads():
        return await asyncio.gather(*(fastload.aload(src, config=config, dtype="float64") for src, _, _ in
                                      trio.values()))

    def streamed(src):
        with fastload.stream(src, config=config, names=[name] if src.startswith("s3") else None) as st:
            return dict(st)

    jobs = {f"load-{k}": (lambda s=src: fastload.load(s, config=config)) for k, (src, _, _) in trio.items()}
    jobs.update({f"stream-{k}": (lambda s=src: streamed(s)) for k, (src, _, _) in trio.items()})
    jobs.update({f"plan-{k}": (lambda s=src: fastload.plan(s, config=config)) for k, (src, _, _) in trio.items()})
    jobs.update({f"pull-{k}": (lambda s=src, k=k: fastload.pull(s, to=tmp_path / f"out-{k}", config=config))
                 for k, (src, _, _) in trio.items()})
    jobs["aloads"] = lambda: asyncio.run(aloads())
    results = run_threads(jobs, timeout=30)
    no_errors(results)
    for kind, (_, path, _) in trio.items():
        exact(results[f"load-{kind}"], path)
        assert (Path(results[f"pull-{kind}"]) / path.name if Path(results[f"pull-{kind}"]).is_dir()
                else Path(results[f"pull-{kind}"])).read_bytes() == path.read_bytes()
    assert _state(config) == before
    assert config == twin and config.retry == QUICK.retry


# -- one pull destination, several threads ----------------------------------------------------------------


def _model_dir(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    write_checkpoint(folder / "model.safetensors", seed=seed, count=5)
    (folder / "config.json").write_text(json.dumps({"seed": seed}))
    return folder


def _leftovers(dest: Path) -> list[str]:
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*")
                  if p.is_file() and ("incomplete" in p.name or "incomplete" in p.parent.name))


def test_pulls_of_one_model_from_every_source_into_one_destination_at_once(http_server, http_dir, s3_server,
                                                                           s3_bucket, tmp_path):
    """The same model pulled into one directory by four threads at once (two from HTTP, one from S3, one from
    a local copy). Every pull returns the destination, every file there is whole, and nothing unfinished is left
    behind."""
    src = _model_dir(http_dir / "model", seed=92)
    local = _model_dir(tmp_path / "local-model", seed=92)
    s3_server.upload_dir(s3_bucket, "model", src)
    dest = tmp_path / "dest"
    url = http_server.url_for(src) + "/"
    sources = [url, url, f"s3://{s3_bucket}/model/", str(local)]
    results = run_threads({i: (lambda s=s: fastload.pull(s, to=dest, config=QUICK)) for i, s in enumerate(sources)},
                          timeout=30)
    no_errors(results)
    assert all(Path(r) == dest for r in results.values()), results
    for f in src.iterdir():
        assert (dest / f.name).read_bytes() == f.read_bytes(), f.name
    assert not _leftovers(dest), _leftovers(dest)


def test_pulls_of_two_different_models_into_one_destination_at_once(http_server, http_dir, tmp_path):
    """Two different models with the same file names pulled into one directory by two threads at once, twice
    over. Each pull succeeds; afterwards every file is wholly one model's (never a mix of the two inside one
    file, never a truncated one), and a pull of model A alone then leaves exactly model A."""
    a = _model_dir(http_dir / "a", seed=93)
    b = _model_dir(http_dir / "b", seed=94)
    dest = tmp_path / "dest"
    urls = {"a": http_server.url_for(a) + "/", "b": http_server.url_for(b) + "/"}
    for _ in range(2):
        results = run_threads({k: (lambda u=u: fastload.pull(u, to=dest, config=QUICK)) for k, u in urls.items()},
                              timeout=30)
        no_errors(results)
        for name in ("model.safetensors", "config.json"):
            data = (dest / name).read_bytes()
            assert data in ((a / name).read_bytes(), (b / name).read_bytes()), f"{name} is neither model's"
    assert bounded(lambda: fastload.pull(urls["a"], to=dest, config=QUICK), 20) == dest
    for f in a.iterdir():
        assert (dest / f.name).read_bytes() == f.read_bytes(), f.name
    assert not _leftovers(dest)
