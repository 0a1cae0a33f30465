"""What a sink is: where filled chunks go.

The fetcher asks each chunk whether it can be read *directly* into its final
memory (``targets``) or must be *staged* in a pool buffer and then consumed
(``consume``: convert, copy to a device, ...). A sink reports which tensors a
chunk completed; the pipeline hands those out.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..plan import ChunkRead, LoadPlan, Piece
from ..sources import Segment


#: A strided piece whose rows start at most this far apart is read with the gaps between them, its whole span
#: in one read, and its rows picked out by one copy: a read (or a socket call) per row costs a few microseconds
#: of Python, more than copying 64 KiB. Wider rows are read one by one, straight into the output.
SPAN_STRIDE = 64 << 10


def spanned(chunk: ChunkRead) -> bool:
    """Whether the host sink stages ``chunk`` as its whole span (gaps included) rather than row by row."""
    return any(p.rows > 1 and p.stride <= SPAN_STRIDE for p in chunk.pieces)


def staged_segments(chunk: ChunkRead, buf: torch.Tensor, view: memoryview) -> list[Segment]:
    """Pack a chunk's pieces (each row of a strided one) back to back into a staging buffer's memory."""
    segments, offset = [], 0
    for piece in chunk.pieces:
        segments += row_segments(piece, view, offset)
        offset += piece.nbytes
    return segments


def row_segments(piece: Piece, view: memoryview, at: int) -> list[Segment]:
    """A segment for each row of ``piece``, the rows back to back in ``view`` from ``at``."""
    n = piece.length
    if piece.rows == 1:
        return [Segment(piece.src, view[at:at + n])]
    return [Segment(src, view[at + r * n:at + r * n + n]) for r, src in enumerate(piece.row_starts())]


class Completion:
    """Counts the bytes each tensor still needs; says which ones a chunk finished."""

    def __init__(self, plan: LoadPlan):
        self.remaining = [t.nbytes for t in plan.tensors]

    def initially_complete(self) -> list[int]:
        return [i for i, n in enumerate(self.remaining) if n == 0]

    def account(self, chunk: ChunkRead) -> list[int]:
        done = []
        for piece in chunk.pieces:
            self.remaining[piece.tensor] -= piece.nbytes
            if self.remaining[piece.tensor] == 0:
                done.append(piece.tensor)
        return done


class Sink(Protocol):
    def initially_complete(self) -> list[int]:
        """Tensors with nothing to read (zero elements): complete before any chunk."""
        ...

    def staged(self, chunk: ChunkRead) -> bool: ...

    def staging(self, chunk: ChunkRead, buf: torch.Tensor) -> list[Segment]:
        """Where a staged chunk's bytes go in ``buf`` (``staged_segments``: packed back to back)."""
        ...

    def targets(self, chunk: ChunkRead) -> list[Segment]: ...

    async def consume(self, chunk: ChunkRead, buf: torch.Tensor | None, release: Callable[[], None]) -> list[int]:
        """Take a filled chunk; call ``release`` once ``buf`` may be reused; return completed tensors."""
        ...

    def tensor(self, index: int) -> torch.Tensor:
        """The finished tensor, ready to hand to the user (synchronised for their stream)."""
        ...

    def close(self) -> None: ...
