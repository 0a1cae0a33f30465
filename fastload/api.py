"""Public entry points: glue only. Arguments are checked in ``pipeline.make_request``."""

from __future__ import annotations

import threading
import weakref
from typing import Iterator

import torch

from . import runner
from .pipeline import make_request, plan_only, produce
from .plan import LoadPlan
from .pull import PullResult, apull, pull  # noqa: F401 -- public, re-exported by the package


def load(source, *, device="cpu", dtype=None, names=None, shard=None, config=None, trace=None,
         progress=None) -> dict[str, torch.Tensor]:
    """Load a safetensors checkpoint (file, shard set or directory) into a ``{name: tensor}`` dict.

    The dict is in checkpoint order; every tensor owns its memory.
    """
    request = make_request(source, device=device, dtype=dtype, names=names, shard=shard, config=config,
                           trace=trace, progress=progress)
    return runner.run(lambda: _collect(request))


async def aload(source, *, device="cpu", dtype=None, names=None, shard=None, config=None, trace=None,
                progress=None) -> dict[str, torch.Tensor]:
    """``load`` for async code: runs in the caller's event loop."""
    request = make_request(source, device=device, dtype=dtype, names=names, shard=shard, config=config, trace=trace,
                           progress=progress)
    with runner.boundary():
        return await _collect(request)


async def _collect(request, on_plan=None) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    plans: list[LoadPlan] = []
    try:
        await produce(request, got.__setitem__, on_plan=plans.append)
    except BaseException:
        # The tensors done before the failure go now: the load's functions keep ``got.__setitem__`` in their
        # closures, and an error that a caller keeps holds those functions through its traceback's frames.
        got.clear()
        raise
    if on_plan is not None:
        on_plan(plans[0])
    return {t.name: got[t.name] for t in plans[0].tensors}


def plan(source, *, names=None, shard=None, config=None, trace=None) -> LoadPlan:
    """Read only the headers and return what a load would fetch (no tensor bytes)."""
    request = make_request(source, names=names, shard=shard, config=config, trace=trace)
    return runner.run(lambda: plan_only(request))


class LoadStream:
    """``with fastload.stream(src) as s: for name, tensor in s: ...`` -- tensors in completion order.

    Leaving the block early, an exception in the loop body or Ctrl-C cancels the
    outstanding reads and joins the loader's thread: no thread, socket or open
    file is left behind.
    """

    def __init__(self, request):
        self._request = request
        self._plans: list[LoadPlan] = []  # the producer fills it: it holds no reference to this object
        self._state = "new"  # -> "open" in the with block -> "closed"
        self._entering = threading.Lock()
        plans = self._plans
        self._stream = runner.ThreadedStream(
            lambda put: produce(request, lambda name, tensor: put((name, tensor)), on_plan=plans.append))
        # Dropped while open (entered by hand, never closed): the load stops instead of reading on for nobody.
        self._dropped = weakref.finalize(self, self._stream.cancel)
        self._dropped.atexit = False  # at exit the stream stops by a hook of its own (ThreadedStream._stop_at_exit)

    @property
    def plan(self) -> LoadPlan | None:
        """The plan, once headers have been read (None before)."""
        return self._plans[0] if self._plans else None

    def __enter__(self) -> "LoadStream":
        with self._entering:  # two threads entering one stream: one runs it, the other is told
            if self._state != "new":
                raise RuntimeError("a fastload stream runs once: call fastload.stream(...) again for another load")
            self._state = "open"
        try:
            self._stream.start()
        except BaseException:  # a Ctrl-C while the loader's thread starts: there is no with block to close it
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._state == "new":  # nothing would ever arrive: the load starts on entering the block
            raise RuntimeError("iterate a stream inside its with block: "
                               "with fastload.stream(src) as s: for name, tensor in s: ...")
        if self._state == "closed" and not self._stream.finished:
            raise RuntimeError("this stream was closed before its load finished; its other tensors were not read")
        # From a coroutine (a notebook cell, asyncio.run): Ctrl-C cancels that task, which a thread blocked here
        # would never see; the wait polls for it.
        return self._iterate(runner.cancel_requested())

    def _iterate(self, stop) -> Iterator[tuple[str, torch.Tensor]]:
        # (a generator of this object's: a thread iterating keeps the stream alive, and its load running, after
        # the opener let go of it)
        yield from self._stream.iterate(stop)

    def close(self) -> None:
        self._state = "closed"
        self._dropped.detach()
        self._stream.close()


def stream(source, *, device="cpu", dtype=None, names=None, shard=None, config=None, trace=None,
           progress=None) -> LoadStream:
    """Like :func:`load`, but hands out ``(name, tensor)`` pairs as each tensor completes."""
    return LoadStream(make_request(source, device=device, dtype=dtype, names=names, shard=shard, config=config,
                                   trace=trace, progress=progress))


def from_pretrained(source, *, model_class=None, device="cpu", dtype=None, config=None, trace=None, **hf_kwargs):
    """A ``transformers`` model whose weights fastload streamed; see :mod:`fastload.integrations.transformers`."""
    from .integrations.transformers import from_pretrained as build

    return build(source, model_class=model_class, device=device, dtype=dtype, config=config, trace=trace,
                 **hf_kwargs)
