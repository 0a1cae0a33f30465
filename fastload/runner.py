"""Where sync meets async: the only module that starts event loops or threads for the API.

Each sync call runs its own event loop: in the calling thread when it has none
running, else (Jupyter, an async server) in a private thread. There is no
global loop thread. A stream runs its loop in a private thread and hands
tensors over a thread-safe queue; closing it cancels the load and joins the
thread, so nothing is left running. ``start`` runs one coroutine that way while
the caller goes on with other work, and collects its result later.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Awaitable, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


async def gather(aws: Iterable[Awaitable[T]]) -> list[T]:
    """``asyncio.gather``, all or nothing: when one fails (or the caller is cancelled), the others
    are cancelled and awaited before the error goes up. Plain ``gather`` leaves them running in the
    caller's loop, where they would go on reading after the load failed and its transports closed."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def run(factory: Callable[[], Awaitable[T]]) -> T:
    """Run the coroutine made by ``factory`` to completion, from sync code."""
    box: dict[str, Any] = {}

    async def main() -> None:
        # The result stays out of the task: asyncio.run would otherwise format it (e.g. a dict of
        # tensors) when it finishes, which measurably costs milliseconds per load.
        box["value"] = await factory()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(main())
        return box.pop("value")

    # Inside a running loop (Jupyter, an async server): the load gets its own loop in a private
    # thread. Ctrl-C or any other exception while waiting cancels it and joins the thread.
    return start(factory).result()


class Pending:
    """A coroutine already running in a private loop thread, for sync code that has other work to do
    meanwhile (``from_pretrained`` imports and builds the model while its weights stream in).

    ``result()`` waits for the value (or raises the coroutine's error); ``cancel()`` stops it and joins
    the thread. Either way nothing is left running: call ``cancel()`` in a ``finally``.
    """

    def __init__(self, factory: Callable[[], Awaitable[T]]):
        self._box: dict[str, Any] = {}

        async def produce_one(put: Callable[[Any], None]) -> None:
            self._box["value"] = await factory()  # kept out of the queue and the task (see run)
            put(None)

        self._stream = ThreadedStream(produce_one).start()

    def result(self) -> Any:
        try:
            for _ in self._stream:
                return self._box.pop("value")
            raise RuntimeError("the coroutine ended without a result")  # pragma: no cover - it always puts
        finally:
            self._stream.close()

    def cancel(self) -> None:
        self._stream.close()
        self._box.clear()


def start(factory: Callable[[], Awaitable[T]]) -> Pending:
    """Start the coroutine made by ``factory`` now, in a private loop thread; see :class:`Pending`."""
    return Pending(factory)


class ThreadedStream:
    """Runs ``producer(put)`` in a private loop thread; iterate to receive what it puts."""

    def __init__(self, producer: Callable[[Callable[[Any], None]], Awaitable[None]]):
        self._producer = producer
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="fastload-stream", daemon=True)
        self._finished = False
        self._complete = False  # the producer ran to its end (an error included), not cancelled

    @property
    def finished(self) -> bool:
        """Everything the producer put was handed out, up to its end or its error."""
        return self._complete

    def start(self) -> "ThreadedStream":
        self._thread.start()
        self._ready.wait()
        return self

    def _main(self) -> None:
        async def body() -> None:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
            self._ready.set()
            try:
                await self._producer(self._queue.put)
            except asyncio.CancelledError:
                pass
            except BaseException as exc:
                self._queue.put((_DONE, exc))
                return
            self._queue.put((_DONE, None))

        try:
            asyncio.run(body())
        finally:
            self._ready.set()

    def __iter__(self) -> Iterator[Any]:
        while not self._finished:
            item = self._queue.get()
            if isinstance(item, tuple) and len(item) == 2 and item[0] is _DONE:
                self._finished = self._complete = True
                self._thread.join()
                if item[1] is not None:
                    raise item[1]
                return
            box = [item]  # handed over without a reference left in this frame while it waits
            del item
            yield box.pop()

    def close(self) -> None:
        """Cancel whatever is still running and wait for the loop thread to end."""
        if self._thread.is_alive() and self._loop is not None and self._task is not None:
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:  # loop already closed
                pass
        if self._thread.ident is not None:
            self._thread.join()
        self._finished = True
