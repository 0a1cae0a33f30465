"""Run a plan's chunk reads with bounded concurrency.

``max_concurrency`` workers take chunks in plan order. A direct chunk is read
straight into the sink's memory; a staged one first leases a pool buffer (the
wait for one is traced as ``wait``) and is handed to the sink, which releases
the buffer when it is done with it. Completed tensors are passed to ``emit`` as
they complete. The first error cancels every worker and propagates.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Iterator

from .buffers import BufferPool
from .plan import ChunkRead, LoadPlan
from .runner import gather
from .sinks import Sink
from .sources import Transports
from .trace import ReadRecord, Trace


async def run_plan(
    plan: LoadPlan,
    *,
    transports: Transports,
    sink: Sink,
    pool: BufferPool,
    trace: Trace,
    emit: Callable[[list[int]], None],
    progress: Callable[[int], None] | None = None,
    workers: int,
) -> None:
    chunks: Iterator[ChunkRead] = iter(plan.chunks)
    queued = trace.now()

    async def one(chunk: ChunkRead, worker: int) -> None:
        info = plan.files[chunk.file].info
        transport = transports.for_url(info.url)
        taken = trace.now()
        record = ReadRecord(chunk, info.url, worker, queued, taken) if trace.enabled else None
        buf = None
        if sink.staged(chunk):
            buf = await pool.acquire()
            trace.interval("wait", taken, trace.now())
            segments = sink.staging(chunk, buf)
        else:
            segments = sink.targets(chunk)
        requested = trace.now()
        try:  # with a record, the transport notes when it started, the first byte and its attempts
            await (transport.read(info, segments) if record is None
                   else transport.read(info, segments, record=record))
        except BaseException as exc:
            # Waiting on a read that failed or was cancelled (a stream left early) was still I/O wait.
            trace.interval("fetch", requested, trace.now())
            if buf is not None:
                pool.release(buf)
            if record is not None:
                record.requested, record.staged, record.failed = requested, buf is not None, trace.now()
                record.cancelled = isinstance(exc, asyncio.CancelledError)
                record.error = None if record.cancelled else type(exc).__name__
                trace.add_read(record)
            raise
        filled = trace.now()
        trace.interval("fetch", requested, filled)
        done = await sink.consume(chunk, buf, (lambda: pool.release(buf)) if buf is not None else (lambda: None))
        if record is not None:
            record.requested, record.filled, record.consumed = requested, filled, trace.now()
            record.staged = buf is not None
            trace.add_read(record)
        if progress is not None:
            progress(chunk.payload)  # bytes of the result, whatever the read spanned
        if done:
            emit(done)

    async def worker(index: int) -> None:
        for chunk in chunks:  # a shared iterator: each chunk goes to exactly one worker
            await one(chunk, index)

    try:
        await gather(worker(i) for i in range(max(1, min(workers, len(plan.chunks)))))
    finally:
        pool.drain()  # (every chunk's work is over: gather waits for all of them)
