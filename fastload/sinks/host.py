"""CPU sink: chunks land straight in the final tensors' memory.

Without dtype conversion every chunk is read directly into the output tensors
(no bounce buffer, no extra copy). A chunk that touches a tensor being
converted is staged in a pool buffer and converted piecewise into its output.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..buffers import as_bytes_view, host_empty
from ..format import torch_dtype
from ..plan import ChunkRead, LoadPlan
from ..redact import printable
from ..sources import Segment
from ..trace import Trace
from ..runner import in_worker
from .base import Completion, row_segments, spanned, staged_segments


def output_dtype(stored: torch.dtype, is_float: bool, wanted: torch.dtype | None) -> torch.dtype:
    """Floating-point tensors take ``wanted``; integer and bool tensors stay as stored."""
    return wanted if (wanted is not None and is_float and wanted.is_floating_point) else stored


#: Bytes copied at a time to an aligned place when a piece to convert is not aligned for its dtype.
UNALIGNED_BLOCK = 1 << 20


def _convert_unaligned(dst: torch.Tensor, src: torch.Tensor, stored: torch.dtype, size: int) -> None:
    """``dst`` (rows x elements, the output dtype) from ``src`` (rows x bytes, uint8, not aligned for ``stored``),
    through aligned copies of at most ``UNALIGNED_BLOCK`` bytes: memory beyond the buffer budget stays one
    block per worker, not a chunk."""
    rows, length = src.shape
    if length <= UNALIGNED_BLOCK:
        step = max(1, UNALIGNED_BLOCK // max(1, length))
        for r in range(0, rows, step):
            dst[r:r + step].copy_(src[r:r + step].clone().view(stored))
        return
    per = UNALIGNED_BLOCK // size * size
    for r in range(rows):
        for c in range(0, length, per):
            dst[r, c // size:(c + per) // size].copy_(src[r, c:c + per].clone().view(stored))


class HostSink:
    def __init__(self, plan: LoadPlan, *, dtype: torch.dtype | None, trace: Trace):
        self.plan = plan
        self.trace = trace
        self.completion = Completion(plan)
        self.stored = [torch_dtype(t.spec.dtype) for t in plan.tensors]
        self.outputs = []
        for t, stored in zip(plan.tensors, self.stored):
            out = output_dtype(stored, t.spec.dtype.is_float, dtype)
            self.outputs.append(host_empty(t.shape, out, lambda t=t, o=out: f"tensor {printable(t.name)!r} "
                                                                            f"{list(t.shape)} {o}"))
        self.converts = [o.dtype != s for o, s in zip(self.outputs, self.stored)]
        self._views: dict[int, memoryview] = {}

    def _view(self, index: int) -> memoryview:
        view = self._views.get(index)
        if view is None:
            view = self._views[index] = as_bytes_view(self.outputs[index])
        return view

    def initially_complete(self) -> list[int]:
        return self.completion.initially_complete()

    def staged(self, chunk: ChunkRead) -> bool:
        return spanned(chunk) or any(self.converts[p.tensor] for p in chunk.pieces)

    def staging(self, chunk: ChunkRead, buf: torch.Tensor) -> list[Segment]:
        view = as_bytes_view(buf)
        return [Segment(chunk.start, view[:chunk.nbytes])] if spanned(chunk) else staged_segments(chunk, buf, view)

    def targets(self, chunk: ChunkRead) -> list[Segment]:
        return [seg for p in chunk.pieces for seg in row_segments(p, self._view(p.tensor), p.dst)]

    def _convert(self, chunk: ChunkRead, buf: torch.Tensor) -> None:
        span = spanned(chunk)
        offset = copied = converted = 0
        for p in chunk.pieces:  # a strided piece's rows are back to back in the output (and packed, in the buffer)
            n = p.nbytes
            if span:  # the rows picked out of the chunk's whole span: one strided copy per piece
                at = p.src - chunk.start
                src = buf[at:at + p.end - p.src].as_strided((p.rows, p.length), (p.stride or p.length, 1))
            else:
                src = buf[offset:offset + n].view(p.rows, p.length)
                offset += n
            out = self.outputs[p.tensor].view(-1)
            if self.converts[p.tensor]:
                size = self.plan.tensors[p.tensor].spec.dtype.itemsize
                dst = out[p.dst // size:(p.dst + n) // size].view(p.rows, p.length // size)
                if src.storage_offset() % size:  # safetensors does not align offsets: torch views need it
                    _convert_unaligned(dst, src, self.stored[p.tensor], size)
                else:
                    dst.copy_(src.view(self.stored[p.tensor]))
                converted += n
            else:
                out.view(torch.uint8)[p.dst:p.dst + n].view(p.rows, p.length).copy_(src)
            copied += n
        self.trace.count("bytes_copied", copied)  # staging -> output, converted or not
        self.trace.count("bytes_converted", converted)

    async def consume(self, chunk: ChunkRead, buf: torch.Tensor | None, release: Callable[[], None]) -> list[int]:
        if buf is not None:
            start = self.trace.now()
            try:
                await in_worker(self._convert, chunk, buf)
            finally:
                release()
            # Conversion if any piece converts; else rows picked out of a span (a shard); else a plain copy.
            stage = ("convert" if any(self.converts[p.tensor] for p in chunk.pieces)
                     else "shard" if spanned(chunk) else "copy")
            self.trace.interval(stage, start, self.trace.now())
        return self.completion.account(chunk)

    def tensor(self, index: int) -> torch.Tensor:
        """Hand tensor ``index`` over, once: the sink keeps no reference, so a stream's consumer that drops
        a tensor frees it."""
        self._views.pop(index, None)
        out, self.outputs[index] = self.outputs[index], None
        return out

    def close(self) -> None:
        self._views.clear()
        self.outputs = []
