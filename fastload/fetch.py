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

from .buffers import BufferPool, as_bytes_view
from .plan import ChunkRead, LoadPlan
from .sinks import Sink, staged_segments
from .sources import Transports
from .trace import Trace


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

    async def one(chunk: ChunkRead) -> None:
        info = plan.files[chunk.file].info
        transport = transports.for_url(info.url)
        buf = None
        if sink.staged(chunk):
            t0 = trace.now()
            buf = await pool.acquire()
            trace.interval("wait", t0, trace.now())
            segments = staged_segments(chunk, buf, as_bytes_view(buf))
        else:
            segments = sink.targets(chunk)
        requested = trace.now()
        try:
            await transport.read(info, segments)
        except BaseException:
            if buf is not None:
                pool.release(buf)
            raise
        filled = trace.now()
        trace.interval("fetch", requested, filled)
        done = await sink.consume(chunk, buf, (lambda: pool.release(buf)) if buf is not None else (lambda: None))
        consumed = trace.now()
        trace.chunk(id=chunk.id, file=chunk.file, start=chunk.start, end=chunk.end, queued=queued,
                    requested=requested, filled=filled, consumed=consumed, staged=buf is not None)
        if progress is not None:
            progress(chunk.nbytes)
        if done:
            emit(done)

    async def worker() -> None:
        for chunk in chunks:  # a shared iterator: each chunk goes to exactly one worker
            await one(chunk)

    tasks = [asyncio.ensure_future(worker()) for _ in range(max(1, min(workers, len(plan.chunks))))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
