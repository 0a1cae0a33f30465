"""Trace exporters: a versioned dict, Chrome trace event JSON, OpenTelemetry spans.

``to_dict(trace)`` -- schema ``fastload.trace/1``. Times are seconds relative to
the trace's begin (``null`` when an event did not happen); sizes are bytes::

    schema            "fastload.trace/1"
    fastload_version  the library version that wrote it
    started_at_unix   wall-clock time of the begin, seconds since the epoch
    wall_s            begin to end
    summary           TraceSummary.to_dict(): wall_s, bytes_fetched, stages
                      {stage: busy s}, breakdown {io_wait, copy, convert,
                      overhead, unattributed: s; sums to wall_s}, exclusive
                      {stage: attributed s}, throughput {stage: bytes/s busy},
                      chunks, chunk_latency / first_byte_latency {p50, p99,
                      max: s}, bytes_by_source, bytes_by_file, counters,
                      bottleneck, errors, throughput_gbps
    spans             [{stage, start, end}] every stage interval recorded
    chunks            [{id, file, url, start, end, nbytes, worker, staged,
                      attempts, queued, taken, requested, started, first_byte,
                      filled, consumed, failed, error, cancelled}] one per chunk
                      read (cancelled: stopped with its load, e.g. a stream left
                      early; then error is null)
    counters          {name: total}   (bytes_fetched, bytes_copied,
                      bytes_converted, retries, ...)
    counters_by_key   {name: {key: n}} (bytes_fetched per file URL)
    errors            ["Type: message"] of loads that failed

A new field may be added within version 1; renaming or removing one bumps it.

``to_chrome(trace)`` -- the Trace Event Format (JSON object form) that Perfetto
and chrome://tracing open: one track per fetch worker (buffer wait, fetch,
consume of each chunk; a second track for a worker when loads sharing a Trace
overlap), tracks for the pipeline stages and for convert/copy,
counters for bytes fetched and chunks in flight; the summary is embedded under
the top-level key ``fastload`` (viewers ignore it).

``emit_otel(trace)`` -- one ``fastload.load`` span per finished load with the
summary as attributes, children for the stages (fetch and buffer wait folded
into one span each) and for chunks that failed or were retried, through the
global tracer provider when one is configured. ``opentelemetry-api`` is
imported lazily and never required.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict

from .errors import ConfigError
from .trace import Trace, check_path

SCHEMA = "fastload.trace/1"
TIME_KEYS = ("queued", "taken", "requested", "started", "first_byte", "filled", "consumed", "failed")
CHUNK_STAGES = ("fetch", "wait")  # drawn per chunk on the worker tracks
PIPELINE = ("resolve", "header", "plan", "alloc", "close", "build", "assign")


def _version() -> str:
    from . import __version__

    return __version__


def _rel(t: float | None, begin: float) -> float | None:
    return None if t is None else t - begin


def to_dict(trace: Trace) -> dict:
    snap = trace.snapshot()
    summary = trace.summary(snap)
    begin = snap["begin"] if snap["begin"] is not None else snap["end"]
    chunks = []
    for c in snap["chunks"]:
        row = {k: v for k, v in c.items() if k not in TIME_KEYS}
        row.update({k: _rel(c.get(k), begin) for k in TIME_KEYS})
        chunks.append(row)
    perf0, epoch0 = trace.anchor
    return {
        "schema": SCHEMA,
        "fastload_version": _version(),
        "started_at_unix": epoch0 / 1e9 + (begin - perf0),
        "wall_s": summary.wall_s,
        "summary": summary.to_dict(),
        "spans": [{"stage": n, "start": s - begin, "end": e - begin} for n, s, e in snap["spans"]],
        "chunks": chunks,
        "counters": snap["counters"],
        "counters_by_key": snap["keyed"],
        "errors": snap["errors"],
    }


def _lanes(items: list[tuple[float, float, object]]) -> list[tuple[int, float, float, object]]:
    """Greedy lane assignment so that intervals in one lane never overlap (Chrome needs nesting)."""
    ends: list[float] = []
    out = []
    for s, e, payload in sorted(items, key=lambda x: (x[0], x[1])):
        lane = next((i for i, end in enumerate(ends) if end <= s), None)
        if lane is None:
            lane = len(ends)
            ends.append(e)
        else:
            ends[lane] = e
        out.append((lane, s, e, payload))
    return out


def to_chrome(trace: Trace) -> dict:
    snap = trace.snapshot()
    begin = snap["begin"] if snap["begin"] is not None else snap["end"]
    us = lambda t: round((t - begin) * 1e6, 3)  # noqa: E731  (ns resolution; short numbers dump fast)
    events: list[dict] = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "fastload"}}]
    tids: dict[str, int] = {}

    def tid(name: str) -> int:
        if name not in tids:
            tids[name] = len(tids) + 1
            events.append({"ph": "M", "pid": 1, "tid": tids[name], "name": "thread_name", "args": {"name": name}})
            events.append({"ph": "M", "pid": 1, "tid": tids[name], "name": "thread_sort_index",
                           "args": {"sort_index": tids[name]}})
        return tids[name]

    def complete(track: str, name: str, start: float, end: float, cat: str, args: dict | None = None) -> None:
        ev = {"ph": "X", "pid": 1, "tid": tid(track), "name": name, "cat": cat, "ts": us(start),
              "dur": round(max(end - start, 0.0) * 1e6, 3)}
        if args:
            ev["args"] = args
        events.append(ev)

    chunks = snap["chunks"]
    groups: dict[str, list] = defaultdict(list)
    for name, s, e in snap["spans"]:
        if chunks and name in CHUNK_STAGES:
            continue
        groups["pipeline" if name in PIPELINE else name].append((s, e, name))
    for group in ["pipeline"] + sorted(g for g in groups if g != "pipeline"):
        for lane, s, e, name in _lanes(groups.get(group, [])):
            complete(group if lane == 0 else f"{group} #{lane + 1}", name, s, e, "stage")

    by_worker: dict[object, list] = defaultdict(list)
    for c in chunks:
        by_worker[c.get("worker")].append(c)
    for worker in sorted(by_worker, key=lambda w: (w is None, w if w is not None else 0)):
        name = f"worker {worker}" if worker is not None else "chunks"
        spans = []  # a chunk's life on its worker's track; two loads sharing a Trace each have a worker 0
        for c in by_worker[worker]:
            times = [c.get(k) for k in ("taken", "requested", "filled", "failed", "consumed") if c.get(k) is not None]
            if times:
                spans.append((min(times), max(times), c))
        for lane, _, _, c in _lanes(spans):
            track = name if lane == 0 else f"{name} #{lane + 1}"
            args = {k: c[k] for k in ("id", "url", "start", "end", "nbytes", "attempts", "staged", "error")
                    if c.get(k) is not None} | ({"cancelled": True} if c.get("cancelled") else {})
            if c.get("taken") is not None and c.get("requested") is not None and c["requested"] > c["taken"]:
                complete(track, "buffer wait", c["taken"], c["requested"], "wait")
            done = c.get("filled") if c.get("filled") is not None else c.get("failed")
            if c.get("requested") is not None and done is not None:
                if c.get("first_byte") is not None:
                    args["first_byte_ms"] = (c["first_byte"] - c["requested"]) * 1e3
                label = f"fetch {c.get('id')}" + ("" if c.get("filled") is not None
                                                   else " (cancelled)" if c.get("cancelled") else " (failed)")
                complete(track, label, c["requested"], done, "fetch", args)
            if c.get("filled") is not None and c.get("consumed") is not None:
                complete(track, "consume", c["filled"], c["consumed"], "consume")

    flight: list[tuple[float, int, int]] = []
    for c in chunks:
        if c.get("requested") is not None:
            done = c.get("filled") if c.get("filled") is not None else c.get("failed")
            flight.append((c["requested"], 1, 0))
            if done is not None:
                flight.append((done, -1, c.get("nbytes", 0) if c.get("filled") is not None else 0))
    in_flight, fetched = 0, 0
    for t, delta, nbytes in sorted(flight):
        in_flight += delta
        fetched += nbytes
        events.append({"ph": "C", "pid": 1, "name": "chunks in flight", "ts": us(t), "args": {"chunks": in_flight}})
        if nbytes:
            events.append({"ph": "C", "pid": 1, "name": "MB fetched", "ts": us(t), "args": {"MB": fetched / 1e6}})

    summary = trace.summary(snap)
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"producer": f"fastload {_version()}", "schema": SCHEMA},
        "fastload": {"schema": SCHEMA, "summary": summary.to_dict()},
    }


def write(trace: Trace, path: str) -> None:
    """Write the Chrome trace JSON to ``path`` (atomically: a partial file is never left behind)."""
    check_path(path)
    tmp = None
    try:  # a temporary name of this call's own: loads in several threads may write one path at once
        folder, name = os.path.split(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        with open(fd, "w", encoding="utf-8") as f:
            json.dump(to_chrome(trace), f, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise ConfigError(f"cannot write the trace to {path}: {exc.strerror or exc}") from exc


def emit_otel(trace: Trace, *, required: bool = False) -> bool:
    """Send what was recorded since the last call to OpenTelemetry; False if nothing could receive it.

    Spans go out only when a tracer provider is configured (the API alone has nobody to send to).
    One ``fastload.load`` span with the summary as attributes; a child per stage interval, except
    that the many fetch and buffer-wait intervals become one child each (with their count and busy
    time); a ``fastload.chunk`` child only for chunks that failed or needed more than one attempt.
    """
    try:
        from opentelemetry import trace as otel
    except ImportError as exc:
        if required:
            raise ConfigError("Trace(otel=True) needs the opentelemetry-api package") from exc
        return False
    snap = trace.unsent()  # a reused Trace: each load's span describes that load alone
    if isinstance(otel.get_tracer_provider(), (otel.ProxyTracerProvider, otel.NoOpTracerProvider)):
        return False  # no SDK configured: nobody to send to, and nothing saved up for later
    spans, chunks = snap["spans"], snap["chunks"]
    if not spans and not chunks:
        return True
    perf0, epoch0 = trace.anchor
    ns = lambda t: epoch0 + int((t - perf0) * 1e9)  # noqa: E731
    starts = [s for _, s, _ in spans] + [c["requested"] for c in chunks if c.get("requested") is not None]
    summary = trace.summary(snap)
    attrs = {"fastload.wall_s": summary.wall_s, "fastload.bytes_fetched": summary.bytes_fetched,
             "fastload.chunks": summary.chunks, "fastload.bottleneck": summary.bottleneck or "",
             "fastload.retries": summary.counters.get("retries", 0)}
    attrs.update({f"fastload.{k}_s": v for k, v in summary.breakdown.items()})
    tracer = otel.get_tracer("fastload", _version())
    root = tracer.start_span("fastload.load", start_time=ns(min(starts) if starts else snap["end"]), attributes=attrs)
    ctx = otel.set_span_in_context(root)
    grouped: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for name, s, e in spans:
        if name in CHUNK_STAGES:
            grouped[name].append((s, e))
        else:
            tracer.start_span(f"fastload.{name}", context=ctx, start_time=ns(s)).end(end_time=ns(e))
    for name, intervals in grouped.items():
        busy = sum(e - s for s, e in intervals)
        tracer.start_span(f"fastload.{name}", context=ctx, start_time=ns(min(s for s, _ in intervals)),
                          attributes={"fastload.intervals": len(intervals), "fastload.summed_s": busy}
                          ).end(end_time=ns(max(e for _, e in intervals)))
    for c in chunks:
        done = c.get("filled") if c.get("filled") is not None else c.get("failed")
        if c.get("requested") is None or done is None or (c.get("attempts", 1) <= 1 and not c.get("error")):
            continue
        span = tracer.start_span("fastload.chunk", context=ctx, start_time=ns(c["requested"]), attributes={
            f"fastload.{k}": c[k] for k in ("id", "url", "start", "end", "nbytes", "attempts") if c.get(k) is not None})
        if c.get("error"):
            span.set_status(otel.Status(otel.StatusCode.ERROR, c["error"]))
        span.end(end_time=ns(done))
    if snap["errors"]:
        root.set_status(otel.Status(otel.StatusCode.ERROR, snap["errors"][-1]))
    root.end(end_time=ns(snap["end"]))
    return True
