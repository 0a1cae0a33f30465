"""CUDA sink: staged chunks -> one device allocation per tensor, over k CUDA streams.

Every chunk is staged in a (pinned) pool buffer. ``consume`` issues the chunk's
host-to-device copies on the next of ``lanes`` CUDA streams (round-robin),
records an event after them and polls it without blocking the event loop.
Only once the event has completed is the buffer released to the pool (so a
buffer is never refilled while a copy still reads it) and the chunk counted
towards its tensors. Bytes cross PCIe in the stored dtype; a tensor that must
change dtype is converted on the device once all its bytes are there.

A tensor is handed out after the caller's current stream waits on the events
of every chunk that wrote it (``wait_event``, never a device-wide synchronize).
Its copies have also completed on the host's clock by then, so reading it on
another stream is safe too.

Device memory is allocated on the loader thread's current stream and written
only by work that has completed before the memory can be freed, so the caching
allocator never hands out a block with a copy still pending. On a failure
``close`` waits for the copies still in flight (those events only) before the
allocations are dropped.

Everything that touches CUDA lives in :class:`CudaOps`; the ordering logic
above runs unchanged against a fake device (see ``tests/test_cuda_sink.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Protocol, Sequence

import torch

from ..buffers import as_bytes_view
from ..errors import DeviceError
from ..format import torch_dtype
from ..plan import ChunkRead, LoadPlan
from ..sources import Segment
from ..trace import Trace
from .base import Completion, staged_segments
from .host import output_dtype

#: CUDA streams the copies are spread over.
COPY_STREAMS = 4
#: Longest pause between two polls of a pending copy (epoll rounds shorter sleeps up to 1 ms anyway).
MAX_POLL_S = 0.001

Copy = tuple[torch.Tensor, torch.Tensor]  # (dst, src): dst.copy_(src)


class DeviceOps(Protocol):
    """The sink's whole view of a device: allocate, copy asynchronously, test and wait on events."""

    lanes: int

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor: ...

    def copy_async(self, copies: list[Copy], lane: int) -> Any:
        """Issue ``dst.copy_(src)`` for each pair on stream ``lane``; return an event recorded after them."""
        ...

    def done(self, event: Any) -> bool: ...

    def wait(self, event: Any) -> None:
        """Make the caller's current stream wait for ``event`` (no host block)."""
        ...

    def sync(self, event: Any) -> None:
        """Block the host until ``event`` has completed (error path only)."""
        ...


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous tensor's memory (any device)."""
    return t.reshape(-1).view(torch.uint8)


def device_error(exc: BaseException, what: str, device: Any) -> DeviceError:
    if isinstance(exc, getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError):  # torch < 2.5
        return DeviceError(f"CUDA out of memory on {device} while {what}: {str(exc).splitlines()[0]}")
    return DeviceError(f"CUDA failure on {device} while {what}: {exc}")


class CudaOps:
    """:class:`DeviceOps` for one CUDA device, with ``lanes`` streams of its own."""

    def __init__(self, device: torch.device, lanes: int = COPY_STREAMS):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device} requested but CUDA is not available "
                              f"(torch {torch.__version__}, cuda {torch.version.cuda})")
        index = device.index if device.index is not None else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise DeviceError(f"device {device} does not exist: {count} CUDA device(s) visible")
        self.device = torch.device("cuda", index)
        self.lanes = lanes
        try:
            self.streams = [torch.cuda.Stream(self.device) for _ in range(lanes)]
        except RuntimeError as exc:
            raise device_error(exc, "creating copy streams", self.device) from exc

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        try:
            return torch.empty(tuple(shape), dtype=dtype, device=self.device)
        except RuntimeError as exc:
            raise device_error(exc, f"allocating {dtype} {list(shape)}", self.device) from exc

    def copy_async(self, copies: list[Copy], lane: int) -> torch.cuda.Event:
        stream = self.streams[lane]
        try:
            # The destinations were allocated on the caller's stream: the caching allocator may have handed
            # out a block that kernels still queued there use. Copy only after them.
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for dst, src in copies:
                    dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
        except RuntimeError as exc:
            raise device_error(exc, "copying to the device", self.device) from exc
        return event

    def done(self, event: torch.cuda.Event) -> bool:
        try:
            return event.query()
        except RuntimeError as exc:
            raise device_error(exc, "waiting for a copy", self.device) from exc

    def wait(self, event: torch.cuda.Event) -> None:
        try:
            torch.cuda.current_stream(self.device).wait_event(event)
        except RuntimeError as exc:
            raise device_error(exc, "ordering the caller's stream after a copy", self.device) from exc

    def sync(self, event: torch.cuda.Event) -> None:
        try:
            event.synchronize()
        except RuntimeError as exc:
            raise device_error(exc, "waiting for a copy", self.device) from exc


class CudaSink:
    def __init__(self, plan: LoadPlan, *, device: torch.device, dtype: torch.dtype | None, trace: Trace,
                 ops: DeviceOps | None = None):
        self.plan = plan
        self.trace = trace
        self.ops = ops if ops is not None else CudaOps(torch.device(device))
        self.completion = Completion(plan)
        self.stored = [torch_dtype(t.spec.dtype) for t in plan.tensors]
        self.wanted = [output_dtype(s, t.spec.dtype.is_float, dtype) for t, s in zip(plan.tensors, self.stored)]
        self.outputs: list[torch.Tensor | None] = [None] * len(plan.tensors)  # device tensors (stored dtype)
        self.events: list[list[Any]] = [[] for _ in plan.tensors]  # events of the chunks that wrote each one
        self._flat: dict[int, torch.Tensor] = {}  # tensor -> flat byte view, while it is being filled
        self._pending: dict[Any, list[Copy]] = {}  # issued, not yet seen complete -> what they touch
        self._lane = 0

    # -- the Sink protocol ---------------------------------------------------------------------------------

    def initially_complete(self) -> list[int]:
        return self.completion.initially_complete()

    def staging(self, chunk: ChunkRead, buf: torch.Tensor) -> list[Segment]:
        return staged_segments(chunk, buf, as_bytes_view(buf))

    def staged(self, chunk: ChunkRead) -> bool:
        return True  # device memory is not a preadv target: every chunk goes through a pinned buffer

    def targets(self, chunk: ChunkRead) -> list[Segment]:
        raise NotImplementedError("the CUDA sink stages every chunk")

    async def consume(self, chunk: ChunkRead, buf: torch.Tensor | None, release: Callable[[], None]) -> list[int]:
        assert buf is not None, "the CUDA sink stages every chunk"
        try:
            copies = self._copies(chunk, buf)
        except BaseException:
            release()  # nothing was issued that reads the buffer
            raise
        lane = self._next_lane()
        start = self.trace.now()
        # From here on a failure keeps the buffer out of the pool: a copy from it may have been issued.
        event = self.ops.copy_async(copies, lane)
        self._pending[event] = copies  # keeps source and destination alive until the copy is seen complete
        # Cancelled while waiting: the buffer is not released and close() waits for the copy.
        await self._until_done(event)
        release()
        self.trace.interval("copy", start, self.trace.now())
        self.trace.count("h2d_copies", len(copies))
        self.trace.count("h2d_bytes", chunk.payload)
        for piece in chunk.pieces:
            if not self.events[piece.tensor] or self.events[piece.tensor][-1] is not event:
                self.events[piece.tensor].append(event)
        done = self.completion.account(chunk)
        for index in done:
            self._flat.pop(index, None)
            if self.wanted[index] != self.stored[index]:
                await self._convert(index, lane)
        return done

    def tensor(self, index: int) -> torch.Tensor:
        out = self.outputs[index]
        if out is None:  # nothing to read (zero elements)
            out = self.ops.empty(self.plan.tensors[index].shape, self.wanted[index])
        for event in self.events[index]:
            self.ops.wait(event)
        self.outputs[index] = None
        self.events[index] = []
        return out

    def close(self) -> None:
        for event in list(self._pending):  # only after a failure: copies that may still write or read
            try:
                self.ops.sync(event)
            except Exception:  # noqa: BLE001 - a broken device must not mask the load's own error
                pass
        self._pending.clear()
        self._flat.clear()
        self.outputs = [None] * len(self.outputs)
        self.events = [[] for _ in self.events]

    # -- internals -----------------------------------------------------------------------------------------

    def _next_lane(self) -> int:
        lane = self._lane
        self._lane = (lane + 1) % self.ops.lanes
        return lane

    def _storage(self, index: int) -> torch.Tensor:
        out = self.outputs[index]
        if out is None:
            out = self.outputs[index] = self.ops.empty(self.plan.tensors[index].shape, self.stored[index])
        return out

    def _bytes(self, index: int) -> torch.Tensor:
        """The flat byte view of a tensor's device memory (cached: a big tensor takes many chunks)."""
        view = self._flat.get(index)
        if view is None:
            view = self._flat[index] = flat_bytes(self._storage(index))
        return view

    def _copies(self, chunk: ChunkRead, buf: torch.Tensor) -> list[Copy]:
        """One copy per run of pieces that are adjacent in the buffer and in the same output tensor."""
        runs: list[list[int]] = []  # [tensor, dst, length, buffer offset]
        offset = 0
        for p in chunk.pieces:  # a strided piece's rows are back to back in the buffer and in the output
            last = runs[-1] if runs else None
            if last is not None and last[0] == p.tensor and last[1] + last[2] == p.dst:
                last[2] += p.nbytes
            else:
                runs.append([p.tensor, p.dst, p.nbytes, offset])
            offset += p.nbytes
        return [(self._bytes(t)[dst:dst + n], buf[at:at + n]) for t, dst, n, at in runs]

    async def _until_done(self, event: Any) -> None:
        delay = 0.0
        while not self.ops.done(event):
            await asyncio.sleep(delay)
            delay = min(MAX_POLL_S, delay * 2 or 1e-4)
        self._pending.pop(event, None)

    async def _convert(self, index: int, lane: int) -> None:
        start = self.trace.now()
        stored = self._storage(index)
        out = self.ops.empty(stored.shape, self.wanted[index])
        copies = [(out, stored)]
        event = self.ops.copy_async(copies, lane)
        self._pending[event] = copies
        await self._until_done(event)
        self.outputs[index] = out  # the stored-dtype tensor is freed here, its last reader complete
        self.events[index].append(event)
        self.trace.interval("convert", start, self.trace.now())
        self.trace.count("bytes_converted", stored.numel() * stored.element_size())
