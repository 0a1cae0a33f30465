"""Tracing: where every second of a load went.

A :class:`Trace` collects stage intervals (from the event loop and from worker
threads alike, all on one monotonic clock, ``time.perf_counter``), one event
per chunk, and counters. Tracing off means ``trace=None``: the pipeline then
calls the no-op :data:`NULL_TRACE`, which records nothing and allocates nothing.

Stages, in pipeline order: ``resolve`` (find the files), ``header`` (read and
parse headers), ``plan``, ``alloc`` (output tensors), ``wait`` (a worker
waiting for a staging buffer: backpressure), ``fetch`` (a chunk's bytes in
flight, request to last byte), ``copy`` (staging -> output, host-to-device),
``convert`` (dtype conversion), ``shard``, ``build`` (model construction),
``assign`` (tensors into the model), ``close`` (teardown). Other names are
allowed and count as runtime overhead.

Busy time (``TraceSummary.stages``) is the *union* of a stage's intervals:
sixteen overlapping one-second fetches are one second of fetch.

Attribution ("where did the time go"). Stages overlap -- fetch runs while
earlier chunks are converted -- so busy times do not add up to the wall time.
The summary therefore sweeps the wall clock from the load's begin to its end
and gives every instant to exactly one stage: the highest-priority stage
active at that instant, in the order of :data:`PRIORITY`::

    convert > copy > shard > assign > build > alloc > plan > close > (other)
            > fetch > header > resolve > wait

CPU work comes first and I/O last, so **I/O wait** is what the word means for
an operating system: time during which the load was doing nothing but waiting
for bytes. I/O hidden behind a conversion is not counted as waiting; making
the source infinitely fast would save at most the I/O wait. An instant with
no stage active at all (event-loop scheduling, Python between stages, the
caller's own code) is **unattributed**, reported explicitly rather than spread
over the stages. Stages map onto the summary's categories by
:data:`CATEGORY`; the five categories add up to the wall time exactly.

The **bottleneck** is the stage with the most attributed time: the stage that
the wall clock spent the most time waiting on and nothing else; or
``"unattributed"`` when more of the wall clock had no stage active at all.

Local reads land in their destination by ``preadv``: for a checkpoint in the
page cache, ``fetch`` is the kernel's copy, not a device wait.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Mapping

from .errors import ConfigError

#: Stage names, in pipeline order.
STAGES = ("resolve", "header", "plan", "alloc", "wait", "fetch", "copy", "convert", "shard", "build", "assign",
          "close")

#: Sweep priority, highest first; a stage not listed ranks where ``None`` is.
PRIORITY = ("convert", "copy", "shard", "assign", "build", "alloc", "plan", "close", None,
            "fetch", "header", "resolve", "wait")

#: Summary categories, in display order; they add up to the wall time.
CATEGORIES = ("io_wait", "copy", "convert", "overhead", "unattributed")
CATEGORY_LABELS = {"io_wait": "I/O wait", "copy": "copy / deserialize", "convert": "conversion",
                   "overhead": "runtime overhead", "unattributed": "unattributed"}
CATEGORY = {"resolve": "io_wait", "header": "io_wait", "fetch": "io_wait", "copy": "copy", "shard": "copy",
            "assign": "copy", "convert": "convert", "plan": "overhead", "alloc": "overhead", "build": "overhead",
            "close": "overhead", "wait": "overhead", "lock": "io_wait"}  # lock: waiting for a pull's files

#: Which byte counters (first one present wins) give a stage's throughput.
STAGE_BYTES = {"fetch": ("bytes_fetched",), "copy": ("bytes_copied", "h2d_bytes"), "convert": ("bytes_converted",),
               "assign": ("bytes_assigned",)}


def _first(counters: Mapping[str, int], names: tuple[str, ...]) -> int:
    return next((counters[n] for n in names if counters.get(n)), 0)


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping ``(start, end)`` intervals."""
    total = 0.0
    cur_start = cur_end = None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        elif end > cur_end:
            cur_end = end
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def attribute(spans: list[tuple[str, float, float]], begin: float, end: float) -> dict[str, float]:
    """Give each instant of ``[begin, end)`` to the highest-priority active stage (see module doc)."""
    order = [s for s in PRIORITY if s is not None]
    extra = sorted({name for name, _, _ in spans} - set(order))
    cut = PRIORITY.index(None)
    order[cut:cut] = extra
    rank = {name: i for i, name in enumerate(order)}
    events = []
    for name, s, e in spans:
        s, e = max(s, begin), min(e, end)
        if e > s:
            events.append((s, 1, rank[name]))
            events.append((e, -1, rank[name]))
    events.sort()
    active = [0] * len(order)
    out = [0.0] * len(order)
    prev = begin
    for t, delta, r in events:
        if t > prev:
            top = next((i for i, n in enumerate(active) if n), None)
            if top is not None:
                out[top] += t - prev
            prev = t
        active[r] += delta
    return {order[i]: v for i, v in enumerate(out) if v > 0}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 100]) of a non-empty list."""
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def source_of(url: str) -> str:
    """``local``, ``http``, ``https``, ``s3``, ...: the scheme a byte counter is filed under."""
    return url.split("://", 1)[0] if "://" in url and not url.startswith("file://") else "local"


def _latency(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values)}


@dataclass(frozen=True)
class TraceSummary:
    """Where the time went. Seconds throughout; ``breakdown`` adds up to ``wall_s``."""

    wall_s: float
    bytes_fetched: int
    stages: Mapping[str, float]  # stage -> busy seconds (union of its intervals)
    counters: Mapping[str, int] = field(default_factory=dict)
    breakdown: Mapping[str, float] = field(default_factory=dict)  # category -> seconds
    exclusive: Mapping[str, float] = field(default_factory=dict)  # stage -> seconds attributed by the sweep
    throughput: Mapping[str, float] = field(default_factory=dict)  # stage -> bytes/s while busy
    chunks: int = 0
    chunk_latency: Mapping[str, float] = field(default_factory=dict)  # requested -> filled: p50, p99, max
    first_byte_latency: Mapping[str, float] = field(default_factory=dict)  # requested -> first byte
    bytes_by_source: Mapping[str, int] = field(default_factory=dict)
    bytes_by_file: Mapping[str, int] = field(default_factory=dict)
    bottleneck: str | None = None
    errors: tuple[str, ...] = ()

    @property
    def throughput_gbps(self) -> float:
        return self.bytes_fetched / self.wall_s / 1e9 if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["throughput_gbps"] = self.throughput_gbps
        d["errors"] = list(self.errors)
        return d

    def table(self) -> str:
        wall = self.wall_s
        pct = (lambda s: s / wall * 100) if wall > 0 else (lambda s: 0.0)
        lines = [f"wall {wall:.3f} s, fetched {self.bytes_fetched / 1e6:.1f} MB "
                 f"({self.throughput_gbps:.2f} GB/s), {self.chunks} chunk(s)",
                 f"  {'where the time went':<22} {'seconds':>9} {'share':>7}"]
        for cat in CATEGORIES:
            seconds = self.breakdown.get(cat, 0.0)
            lines.append(f"  {CATEGORY_LABELS[cat]:<22} {seconds:9.3f} {pct(seconds):6.1f}%")
        lines.append(f"  {'stage':<10} {'busy s':>9} {'attributed s':>13} {'GB/s busy':>10}")
        for stage, seconds in self.stages.items():
            rate = self.throughput.get(stage)
            lines.append(f"  {stage:<10} {seconds:9.3f} {self.exclusive.get(stage, 0.0):13.3f} "
                         f"{(f'{rate / 1e9:.2f}' if rate else '-'):>10}")
        for label, lat in (("chunk latency", self.chunk_latency), ("first byte", self.first_byte_latency)):
            if lat:
                lines.append(f"  {label}: p50 {lat['p50'] * 1e3:.1f} ms, p99 {lat['p99'] * 1e3:.1f} ms, "
                             f"max {lat['max'] * 1e3:.1f} ms")
        sources = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in self.bytes_by_source.items())
        lines.append(f"  bytes: fetched {self.bytes_fetched / 1e6:.1f} MB ({sources or 'none'}), copied "
                     f"{_first(self.counters, STAGE_BYTES['copy']) / 1e6:.1f} MB, retries {self.counters.get('retries', 0)}")
        if self.bottleneck:
            share = pct(self.exclusive.get(self.bottleneck, self.breakdown.get(self.bottleneck, 0.0)))
            kind = "unattributed" if self.bottleneck == "unattributed" else CATEGORY.get(self.bottleneck, "overhead")
            cat = CATEGORY_LABELS.get(kind, "")
            lines.append(f"  bottleneck: {self.bottleneck} ({cat}, {share:.1f}% of wall)")
        if self.counters.get("cancelled"):
            lines.append("  cancelled before the end (a stream left early, or interrupted)")
        for error in self.errors:
            lines.append(f"  failed: {error}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class ReadRecord:
    """One chunk read's life, filled in place by the fetcher and the transport (only when tracing is on).

    Transports set ``started`` (the thread picked it up / the first request went out), ``first_byte``
    and ``attempts``; the fetcher sets the rest and hands it to :meth:`Trace.add_read`.
    """

    __slots__ = ("id", "file", "url", "start", "end", "nbytes", "worker", "staged", "attempts", "queued", "taken",
                 "requested", "started", "first_byte", "filled", "consumed", "failed", "error", "cancelled")

    def __init__(self, chunk=None, url: str | None = None, worker: int | None = None, queued: float | None = None,
                 taken: float | None = None) -> None:
        self.id = self.file = self.start = self.end = self.nbytes = None
        if chunk is not None:  # a plan.ChunkRead
            self.id, self.file, self.start, self.end = chunk.id, chunk.file, chunk.start, chunk.end
            self.nbytes = chunk.end - chunk.start
        self.url, self.worker, self.queued, self.taken = url, worker, queued, taken
        self.staged = False
        self.attempts = 0
        self.requested = self.started = self.first_byte = self.filled = self.consumed = self.failed = None
        self.error: str | None = None
        self.cancelled = False  # stopped with the load (a stream left early): not a failure

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


class Trace:
    """Records one or more loads. Thread-safe; cheap enough to leave on.

    ``Trace("out.json")`` (or ``trace="out.json"`` on a load) writes a Chrome
    trace with the summary embedded when the load finishes. OpenTelemetry spans
    are emitted at the end of each load when ``opentelemetry-api`` is importable
    and a tracer provider is configured (``otel=False`` turns that off,
    ``otel=True`` requires the package).
    """

    enabled = True

    def __init__(self, path: str | os.PathLike | None = None, *, otel: bool | None = None) -> None:
        if path is not None:  # checked now: a path found unwritable when the load ends lost the load's tensors
            path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
            if not isinstance(path, str):
                raise ConfigError(f"Trace(path=...) must be a path ending in .json, got {path!r}")
            check_path(path)
        if otel is not None and not isinstance(otel, bool):  # Trace(otel=0) or "false" left the spans on
            raise ConfigError(f"Trace(otel=...) must be True, False or None, got {otel!r}")
        self.path = path
        self.otel = otel
        if otel is True:  # asked for explicitly: fail now, not after the load
            try:
                import opentelemetry.trace  # noqa: F401
            except ImportError as exc:
                raise ConfigError("Trace(otel=True) needs the opentelemetry-api package") from exc
        self._lock = threading.Lock()
        self._spans: list[tuple[str, float, float]] = []
        self._counters: dict[str, int] = defaultdict(int)
        self._keyed: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._chunks: list[dict | ReadRecord] = []
        self._errors: list[str] = []
        self._begin: float | None = None
        self._end: float | None = None
        self._emitted: dict = {}  # what was already sent to OpenTelemetry (see unsent)
        self._sent_lock = threading.Lock()
        self._parts = 0  # > 0 inside one_load(): the loads of its parts do not publish (see finish)
        self._active = 0  # loads begun and not finished: the clock runs while any does, or a one_load is open
        self.anchor = (time.perf_counter(), time.time_ns())  # maps the trace clock to the epoch

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def begin(self) -> None:
        """A load starts (each one that calls this calls :meth:`finish` when it ends)."""
        with self._lock:
            self._active += 1
            if self._begin is None:
                self._begin = self.now()

    def end(self) -> None:
        """A load ends: the clock stops once no other load of this trace runs (two loads sharing a trace, the
        first to end froze the wall time while the other went on: spans past the wall, stages longer than it)."""
        with self._lock:
            self._active = max(0, self._active - 1)
            self._end = self.now()

    def interval(self, stage: str, start: float, end: float) -> None:
        with self._lock:
            self._spans.append((stage, start, end))

    @contextmanager
    def span(self, stage: str) -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.interval(stage, start, self.now())

    def count(self, name: str, n: int = 1, key: str | None = None) -> None:
        """Add ``n`` to counter ``name`` (and to its per-``key`` split, e.g. per file URL)."""
        with self._lock:
            self._counters[name] += n
            if key is not None:
                self._keyed[name][key] += n

    def chunk(self, **event) -> None:
        """One chunk's life as keywords: the fields of :class:`ReadRecord`."""
        with self._lock:
            self._chunks.append(event)

    def add_read(self, record: ReadRecord) -> None:
        """One chunk's life (the fetcher's fast path: no dict is built until someone reads it)."""
        with self._lock:
            self._chunks.append(record)

    def finish(self, error: BaseException | None = None) -> None:
        """End of a load: stop the clock, write ``path`` if set, emit OpenTelemetry spans.

        Raises ``ConfigError`` if the trace file cannot be written.
        """
        self.end()
        self._note(error)
        with self._lock:
            part = self._parts > 0
        if not part:  # a part of one load (one_load): the whole is published once, when it ends
            self._publish(error)

    def _note(self, error: BaseException | None, since: tuple[int, int] | None = None) -> None:
        """Record how a load ended: cancelled (a stream left early, Ctrl-C: stopped, not failed) or its error.
        With ``since`` (errors and cancels counted when a one_load began), not again what a part noted."""
        text = None
        if error is not None and not isinstance(error, asyncio.CancelledError):
            try:  # (outside the lock: an exception's __str__ is anyone's code, and may fail)
                text = f"{type(error).__name__}: {error}".rstrip(": ")
            except Exception:  # noqa: BLE001
                text = type(error).__name__
        with self._lock:
            if isinstance(error, asyncio.CancelledError):
                if since is None or self._counters.get("cancelled", 0) == since[1]:
                    self._counters["cancelled"] += 1
            elif text is not None and (since is None or text not in self._errors[since[0]:]):
                self._errors.append(text)

    def _publish(self, error: BaseException | None) -> None:
        """Write the trace file (``path``) and emit OpenTelemetry spans."""
        from . import trace_export

        try:
            if self.otel is not False:
                trace_export.emit_otel(self, required=self.otel is True)
            if self.path is not None:
                trace_export.write(self, self.path)
        except ConfigError as exc:
            if error is None:
                raise
            if hasattr(error, "add_note"):  # the load's own error matters more; keep ours as a note
                error.add_note(f"fastload: trace not written: {exc}")

    @contextmanager
    def one_load(self) -> Iterator[None]:
        """The loads made inside are parts of one (``from_pretrained`` streams its weights in parts): one
        OpenTelemetry span and one trace file for them all, when the outermost ``one_load`` ends."""
        with self._lock:
            self._parts += 1
            since = (len(self._errors), self._counters.get("cancelled", 0))
        error = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            with self._lock:
                self._parts -= 1
                whole = self._parts == 0
                self._end = self.now()
            self._note(error, since)  # (an error of its own: a part's was noted when that part ended)
            if whole:
                self._publish(error)

    def unsent(self) -> dict:
        """A snapshot of what was recorded since the last call (for OpenTelemetry: one span per load of a
        reused Trace, describing that load alone); marks it all as sent."""
        with self._sent_lock:  # two loads of one Trace ending together: each part is sent once
            snap = self.snapshot()
            last, self._emitted = self._emitted, snap
        if not last:
            return snap
        counters = {k: v - last["counters"].get(k, 0) for k, v in snap["counters"].items()}
        keyed = {k: {u: n - last["keyed"].get(k, {}).get(u, 0) for u, n in v.items()} for k, v in snap["keyed"].items()}
        spans, chunks = snap["spans"][len(last["spans"]):], snap["chunks"][len(last["chunks"]):]
        starts = [s for _, s, _ in spans] + [c["queued"] for c in chunks if c.get("queued") is not None]
        return {**snap, "begin": min(starts) if starts else snap["end"], "spans": spans, "chunks": chunks,
                "counters": {k: v for k, v in counters.items() if v}, "errors": snap["errors"][len(last["errors"]):],
                "keyed": {k: {u: n for u, n in v.items() if n} for k, v in keyed.items()}}

    @property
    def chunks(self) -> list[dict]:
        with self._lock:
            chunks = list(self._chunks)
        return [c if isinstance(c, dict) else c.as_dict() for c in chunks]

    def snapshot(self) -> dict:
        """A consistent copy of everything recorded (for exporters)."""
        with self._lock:
            running = self._end is None or self._active > 0 or self._parts > 0
            snap = {"begin": self._begin, "end": self.now() if running else self._end,
                    "spans": list(self._spans), "chunks": list(self._chunks), "counters": dict(self._counters),
                    "keyed": {k: dict(v) for k, v in self._keyed.items()}, "errors": list(self._errors)}
        snap["chunks"] = [c if isinstance(c, dict) else c.as_dict() for c in snap["chunks"]]
        return snap

    def summary(self, snap: dict | None = None) -> TraceSummary:
        """The summary of everything recorded, or of ``snap`` (a :meth:`snapshot` or :meth:`unsent` part)."""
        snap = self.snapshot() if snap is None else snap
        begin = snap["begin"]
        spans, counters = snap["spans"], snap["counters"]
        by_stage: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for name, s, e in spans:
            by_stage[name].append((s, e))
        order = [s for s in STAGES if s in by_stage] + sorted(set(by_stage) - set(STAGES))
        stages = {s: union_seconds(by_stage[s]) for s in order}
        wall = max(snap["end"] - begin, 0.0) if begin is not None else 0.0
        exclusive = attribute(spans, begin, begin + wall) if begin is not None else {}
        breakdown = dict.fromkeys(CATEGORIES, 0.0)
        for stage, seconds in exclusive.items():
            breakdown[CATEGORY.get(stage, "overhead")] += seconds
        breakdown["unattributed"] = max(wall - sum(exclusive.values()), 0.0)
        throughput = {s: _first(counters, c) / stages[s] for s, c in STAGE_BYTES.items()
                      if stages.get(s) and _first(counters, c)}
        chunks = [c for c in snap["chunks"] if c.get("filled") is not None]
        latency = [c["filled"] - c["requested"] for c in chunks]
        first = [c["first_byte"] - c["requested"] for c in chunks if c.get("first_byte") is not None]
        by_file = snap["keyed"].get("bytes_fetched", {})
        by_source: dict[str, int] = defaultdict(int)
        for url, n in by_file.items():
            by_source[source_of(url)] += n
        bottleneck = max(exclusive, key=exclusive.get) if exclusive else None
        if bottleneck is not None and breakdown["unattributed"] > exclusive[bottleneck]:
            bottleneck = "unattributed"
        return TraceSummary(
            wall_s=wall, bytes_fetched=counters.get("bytes_fetched", 0), stages=stages, counters=counters,
            breakdown=breakdown, exclusive=exclusive, throughput=throughput, chunks=len(chunks),
            chunk_latency=_latency(latency), first_byte_latency=_latency(first), bytes_by_source=dict(by_source),
            bytes_by_file=dict(by_file), bottleneck=bottleneck, errors=tuple(snap["errors"]))

    def to_dict(self) -> dict:
        """The versioned, documented schema of ``fastload.trace_export`` (``schema: fastload.trace/1``)."""
        from .trace_export import to_dict

        return to_dict(self)

    def to_chrome(self) -> dict:
        """Chrome trace event format (Perfetto, chrome://tracing), summary embedded."""
        from .trace_export import to_chrome

        return to_chrome(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the Chrome trace JSON to ``path`` (must end in ``.json``)."""
        from .trace_export import write

        write(self, os.fspath(path))


def check_path(path: str) -> None:
    """A trace path must end in ``.json`` and name a file in an existing directory."""
    if not path.lower().endswith(".json"):
        raise ConfigError(f"a trace path must end in .json (Chrome trace format), got {path!r}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"cannot write the trace to {path}: directory {parent} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"cannot write the trace to {path}: it is a directory")


def as_trace(value) -> Trace:
    """The ``trace=`` argument: None (off), a :class:`Trace`, or a ``.json`` path to write when the load ends."""
    if value is None:
        return NULL_TRACE
    if isinstance(value, Trace):
        return value
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if isinstance(path, str):
            return Trace(path)
    raise ConfigError(f"trace must be a fastload.Trace or a path ending in .json, got {value!r}")


class _NullTrace(Trace):
    """Records nothing: the pipeline's trace when the user passed none."""

    enabled = False

    def begin(self) -> None: ...
    def end(self) -> None: ...
    def interval(self, stage: str, start: float, end: float) -> None: ...
    def count(self, name: str, n: int = 1, key: str | None = None) -> None: ...
    def chunk(self, **event) -> None: ...
    def add_read(self, record: ReadRecord) -> None: ...
    def finish(self, error: BaseException | None = None) -> None: ...

    @contextmanager
    def span(self, stage: str) -> Iterator[None]:
        yield

    @contextmanager
    def one_load(self) -> Iterator[None]:
        yield


NULL_TRACE = _NullTrace()
