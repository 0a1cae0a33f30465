"""A bounded pool of host staging buffers: the pipeline's backpressure.

Buffers are allocated lazily (a load that never stages allocates none), are
pinned when CUDA is present, and are handed back only when whatever reads them
(a CPU convert, an asynchronous host-to-device copy) has finished with them.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Callable

import numpy as np
import torch

from .errors import DeviceError


def host_empty(shape, dtype: torch.dtype, what: Callable[[], str], *, pin: bool = False) -> torch.Tensor:
    """``torch.empty`` in host memory, a failure to get it a ``MemoryError`` that says what it was for
    (``what()``): torch raises a bare RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    try:
        return torch.empty(shape, dtype=dtype, pin_memory=pin)
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc) and "not enough memory" not in str(exc):
            raise
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        raise MemoryError(f"out of memory: cannot allocate {nbytes} bytes for {what()}") from exc


class _Memory:
    """A tensor's bytes as numpy's array interface sees them; the array made of it keeps this, and so the tensor."""

    __slots__ = ("__array_interface__", "tensor")

    def __init__(self, t: torch.Tensor, nbytes: int):
        self.tensor = t
        self.__array_interface__ = {"data": (t.data_ptr(), False), "shape": (nbytes,), "typestr": "|u1",
                                    "version": 3}


def as_bytes_view(t: torch.Tensor) -> memoryview:
    """A writable flat byte view of a contiguous tensor's memory (CPU only). Not through ``.numpy()``: that marks
    the tensor's storage as not resizable for good, and the outputs read straight into then refused ``resize_``
    (and any ``out=`` that grows them), where a tensor of ``torch.empty`` takes it. Nor a ctypes array: its type,
    one per size, is cached for the life of the process. The view keeps ``t`` alive."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("as_bytes_view needs a contiguous CPU tensor")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    return memoryview(np.asarray(_Memory(t, n))).cast("B")


class BufferPool:
    def __init__(self, buffer_bytes: int, count: int, *, pin: bool = False):
        if count < 1 or buffer_bytes < 1:
            raise ValueError("a buffer pool needs at least one non-empty buffer")
        self.buffer_bytes = buffer_bytes
        self.count = count
        self.pin = pin and torch.cuda.is_available()  # without CUDA: ordinary memory, same behaviour
        self._free: deque[torch.Tensor] = deque()
        self._waiting: deque[asyncio.Future] = deque()
        self._allocated = 0

    @property
    def allocated(self) -> int:
        return self._allocated

    async def acquire(self) -> torch.Tensor:
        """A buffer, first come first served: a released buffer goes to the longest waiter, never to a
        later caller that happens to run first. Checksum verification needs that order: a chunk holding a
        buffer may wait for the hash of earlier chunks, and those must not be the ones left without one."""
        if not self._waiting and self._free:
            return self._free.popleft()
        if not self._waiting and self._allocated < self.count:
            self._allocated += 1
            try:
                return host_empty((self.buffer_bytes,), torch.uint8, lambda: "a staging buffer", pin=self.pin)
            except (RuntimeError, MemoryError) as exc:
                self._allocated -= 1
                if self.pin:  # cudaHostAlloc failed: a device-side resource, reported like one
                    raise DeviceError(f"could not pin a {self.buffer_bytes}-byte staging buffer: {exc}") from exc
                raise
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a buffer as the cancel came: pass it on
                self.release(waiter.result())
            raise

    def release(self, buf: torch.Tensor) -> None:
        """Return a buffer; from the loop's thread only (sinks that finish elsewhere hop back first)."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():  # a cancelled waiter is done: skipped
                waiter.set_result(buf)
                return
        self._free.append(buf)

    def drain(self) -> None:
        """Let go of the free buffers (the load is over): whatever still reaches the pool, such as a kept error's
        frames through the fetch's closures, then holds no buffer memory."""
        self._free.clear()
