"""Tracing: where every second of a load went.

A :class:`Trace` collects stage intervals (from the event loop and from worker
threads alike, on one monotonic clock), per-chunk events and counters. Stage
time in the summary is the *union* of that stage's intervals, so sixteen
overlapping fetches of one second each count as one second of fetch, not
sixteen. Tracing off means ``trace=None``: the pipeline then calls the no-op
:data:`NULL_TRACE`, which records nothing.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping

#: Stage names, in pipeline order.
STAGES = ("resolve", "header", "plan", "fetch", "wait", "copy", "convert", "assign")


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


@dataclass(frozen=True)
class TraceSummary:
    wall_s: float
    bytes_fetched: int
    stages: Mapping[str, float]  # stage -> seconds (union of its intervals)
    counters: Mapping[str, int] = field(default_factory=dict)

    @property
    def throughput_gbps(self) -> float:
        return self.bytes_fetched / self.wall_s / 1e9 if self.wall_s > 0 else 0.0

    def table(self) -> str:
        lines = [f"wall {self.wall_s:.3f} s, fetched {self.bytes_fetched / 1e6:.1f} MB "
                 f"({self.throughput_gbps:.2f} GB/s)"]
        for stage, seconds in self.stages.items():
            share = seconds / self.wall_s * 100 if self.wall_s > 0 else 0.0
            lines.append(f"  {stage:<8} {seconds:8.3f} s  {share:5.1f}% of wall")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class Trace:
    """Records one or more loads. Thread-safe; cheap enough to leave on."""

    enabled = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._intervals: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self._counters: dict[str, int] = defaultdict(int)
        self._chunks: list[dict] = []
        self._begin: float | None = None
        self._end: float | None = None

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def begin(self) -> None:
        with self._lock:
            if self._begin is None:
                self._begin = self.now()

    def end(self) -> None:
        with self._lock:
            self._end = self.now()

    def interval(self, stage: str, start: float, end: float) -> None:
        with self._lock:
            self._intervals[stage].append((start, end))

    @contextmanager
    def span(self, stage: str) -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.interval(stage, start, self.now())

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    def chunk(self, **event) -> None:
        """One chunk's life: ids, byte range and its timestamps (queued, requested, filled, consumed)."""
        with self._lock:
            self._chunks.append(event)

    @property
    def chunks(self) -> list[dict]:
        with self._lock:
            return list(self._chunks)

    def summary(self) -> TraceSummary:
        with self._lock:
            begin = self._begin if self._begin is not None else 0.0
            end = self._end if self._end is not None else self.now()
            stages = {s: union_seconds(self._intervals[s]) for s in STAGES if s in self._intervals}
            stages.update({s: union_seconds(v) for s, v in self._intervals.items() if s not in stages})
            counters = dict(self._counters)
        return TraceSummary(
            wall_s=max(end - begin, 0.0) if self._begin is not None else 0.0,
            bytes_fetched=counters.get("bytes_fetched", 0),
            stages=stages,
            counters=counters,
        )


class _NullTrace(Trace):
    """Records nothing: the pipeline's trace when the user passed none."""

    enabled = False

    def begin(self) -> None: ...
    def end(self) -> None: ...
    def interval(self, stage: str, start: float, end: float) -> None: ...
    def count(self, name: str, n: int = 1) -> None: ...
    def chunk(self, **event) -> None: ...

    @contextmanager
    def span(self, stage: str) -> Iterator[None]:
        yield


NULL_TRACE = _NullTrace()
