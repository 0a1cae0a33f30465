"""What a sink is: where filled chunks go.

The fetcher asks each chunk whether it can be read *directly* into its final
memory (``targets``) or must be *staged* in a pool buffer and then consumed
(``consume``: convert, copy to a device, ...). A sink reports which tensors a
chunk completed; the pipeline hands those out.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..plan import ChunkRead, LoadPlan
from ..sources import Segment


def staged_segments(chunk: ChunkRead, buf: torch.Tensor, view: memoryview) -> list[Segment]:
    """Pack a chunk's pieces back to back into a staging buffer's memory."""
    segments, offset = [], 0
    for piece in chunk.pieces:
        segments.append(Segment(piece.src, view[offset:offset + piece.length]))
        offset += piece.length
    return segments


class Completion:
    """Counts the bytes each tensor still needs; says which ones a chunk finished."""

    def __init__(self, plan: LoadPlan):
        self.remaining = [t.nbytes for t in plan.tensors]

    def initially_complete(self) -> list[int]:
        return [i for i, n in enumerate(self.remaining) if n == 0]

    def account(self, chunk: ChunkRead) -> list[int]:
        done = []
        for piece in chunk.pieces:
            self.remaining[piece.tensor] -= piece.length
            if self.remaining[piece.tensor] == 0:
                done.append(piece.tensor)
        return done


class Sink(Protocol):
    def initially_complete(self) -> list[int]:
        """Tensors with nothing to read (zero elements): complete before any chunk."""
        ...

    def staged(self, chunk: ChunkRead) -> bool: ...

    def targets(self, chunk: ChunkRead) -> list[Segment]: ...

    async def consume(self, chunk: ChunkRead, buf: torch.Tensor | None, release: Callable[[], None]) -> list[int]:
        """Take a filled chunk; call ``release`` once ``buf`` may be reused; return completed tensors."""
        ...

    def tensor(self, index: int) -> torch.Tensor:
        """The finished tensor, ready to hand to the user (synchronised for their stream)."""
        ...

    def close(self) -> None: ...
