"""Where sync meets async: the only module that starts event loops or threads for the API.

Each sync call runs its own event loop: in the calling thread when it has none
running, else (Jupyter, an async server) in a private thread. There is no
global loop thread. A stream runs its loop in a private thread and hands
tensors over a thread-safe queue; closing it cancels the load and joins the
thread, so nothing is left running.
"""

from __future__ import annotations

import asyncio
import atexit
import builtins
import functools
import os
import queue
import signal
import sys
import threading
import time
import traceback
import weakref
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

_DONE = object()
_EXITING = object()  # the stream was stopped by interpreter exit (see ThreadedStream._stop_at_exit)
_NOTHING = object()  # a poll of a stream's queue that found nothing
_CANCELLED = object()  # the load was cancelled (closed from another thread, or its caller's task cancelled)
_POLL_S = 0.05  # how often a sync call made from a coroutine checks whether its task was asked to cancel
_EXIT_WAIT_S = 2.0  # at interpreter exit, how long a load still running (stream, thread) is waited for


def _patient(wait: Callable[[float], Any], done: Callable[[Any], bool]) -> Any:
    """``wait(None)``, except on the main thread: there in turns of ``_POLL_S``. CPython runs a Ctrl-C's
    handler when the main thread's wait is interrupted, and a signal landing just before the thread went to
    sleep in an untimed wait interrupts nothing: the KeyboardInterrupt came when the wait ended (a stream's
    next tensor, seconds later; 8 s, a stall timeout, in the test that found it)."""
    if threading.current_thread() is not threading.main_thread():
        return wait(None)
    while not done(got := wait(_POLL_S)):
        pass
    return got


def _join(thread: threading.Thread) -> None:
    _patient(thread.join, lambda _: not thread.is_alive())


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


class UserInterrupt(Exception):
    """A KeyboardInterrupt or SystemExit raised by a caller's callback (``progress``), carried through the load's
    loop as an ordinary error: asyncio re-raises those two straight out of the loop, past every task's cleanup
    (threads, sockets and a stream's end were left behind, and a stream's reader waited forever). Raised again
    as itself where the call returns (:func:`boundary`)."""

    def __init__(self, exc: BaseException):
        super().__init__(f"{type(exc).__name__} in a callback")
        self.exc = exc


def guarded(fn: Callable[..., T] | None) -> Callable[..., T] | None:
    """``fn``, a caller's callback, with its KeyboardInterrupt / SystemExit turned into :class:`UserInterrupt`."""
    if fn is None:
        return None

    def call(*args: Any) -> T:
        try:
            return fn(*args)
        except (KeyboardInterrupt, SystemExit) as exc:
            raise UserInterrupt(exc) from None
    return call


@contextmanager
def boundary() -> Iterator[None]:
    """Where a public call returns. A :class:`UserInterrupt` leaves as the KeyboardInterrupt / SystemExit it
    carries; and an error lets go of the locals of fastload's finished frames: its traceback holds them, and with
    them the output tensors, buffers and sockets of the failed load, for as long as a caller keeps the error
    (``self.last_error = exc``, a retry loop's log)."""
    handled = sys.exc_info()[1]  # the caller's own error, if it calls us while handling one: never touched
    try:
        yield
    except UserInterrupt as carried:
        shed(carried.exc, handled)
        raise carried.exc from None
    except BaseException as exc:
        shed(exc, handled)
        raise


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def shed(exc: BaseException | None, stop: BaseException | None = None) -> None:
    """Clear the locals of fastload's own frames in the tracebacks of ``exc``, its causes and contexts (up to
    ``stop``). Only ours: a caller's frames (its callback's, a generator it still iterates, which clearing would
    close) keep theirs; and frames still running refuse to be cleared."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or e is stop or id(e) in seen:
            continue
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.startswith(_PACKAGE):
                try:
                    tb.tb_frame.clear()
                except RuntimeError:  # still running (the caller's call into us, a live generator)
                    pass
            tb = tb.tb_next
        todo += [e.__cause__, e.__context__]
        if isinstance(e, getattr(builtins, "BaseExceptionGroup", ())):  # (3.11 on; not any "exceptions" attribute)
            todo += list(e.exceptions)


def shed_callees(exc: BaseException) -> None:
    """In the ``except`` that caught ``exc``: clear the locals of the frames below the catching one (finished
    calls it made, a library's included; the weights they held go with them)."""
    tb = exc.__traceback__
    traceback.clear_frames(tb.tb_next if tb is not None else None)


def run(factory: Callable[[], Awaitable[T]]) -> T:
    """Run the coroutine made by ``factory`` to completion, from sync code."""
    with boundary():
        return _run(factory)


def _run(factory: Callable[[], Awaitable[T]]) -> T:
    box: dict[str, Any] = {}

    async def main() -> None:
        # The result stays out of the task: asyncio.run would otherwise format it (e.g. a dict of
        # tensors) when it finishes, which measurably costs milliseconds per load.
        box["value"] = await factory()

    try:
        asyncio.get_running_loop()
        running = True
    except RuntimeError:
        running = False
    if not running:  # (outside the except block: the load's errors must not carry "no running event loop")
        if threading.current_thread() is threading.main_thread():
            run_loop(_in_our_loop(main()))
        else:
            _run_stopped_at_exit(main)
        return box.pop("value")

    # Inside a running loop (Jupyter, an async server): the load gets its own loop in a private
    # thread. Ctrl-C or any other exception while waiting cancels it and joins the thread; so does a
    # request to cancel the coroutine that called us (asyncio.run's Ctrl-C handler makes one).
    async def produce_one(put: Callable[[Any], None]) -> None:
        await main()
        put(None)

    stream = ThreadedStream(produce_one, stop=cancel_requested()).start()
    try:
        for _ in stream:
            return box.pop("value")
        raise RuntimeError("the load ended without a result")  # pragma: no cover - producer always puts
    finally:
        stream.close()


@functools.cache
def _forked_children_close() -> set[int]:
    """The descriptors :func:`private_to_process` holds; the fork hook is installed with the first."""
    held: set[int] = set()

    def in_child() -> None:
        for fd in list(held):
            try:
                os.close(fd)
            except OSError:
                pass
        held.clear()

    os.register_at_fork(after_in_child=in_child)
    return held


@functools.cache
def exit_began() -> threading.Event:
    """Set when the interpreter's exit hooks start: ``atexit`` runs them after the non-daemon threads have
    ended, newest first, and this one is registered after ``weakref.finalize``'s (which runs fastload's exit
    hooks). Not the main thread's state: threading's shutdown marks it stopped *before* it waits for the
    non-daemon threads, whose loads then still run, and fail, as loads."""
    began = threading.Event()
    atexit.register(began.set)
    return began


@contextmanager
def private_to_process(fd: int) -> Iterator[int]:
    """``fd``, a lock's descriptor, closed in every child forked while this is held. ``flock`` belongs to the
    open file, which a fork shares (``O_CLOEXEC`` acts at exec only): a worker forked during a pull kept its
    lock after the pull's process was killed, and the next pull, and every load of the destination, waited for
    as long as that worker lived. Closing the child's copy leaves the parent's lock as it is. Leave this before
    closing ``fd``: a child forked after the close must not close another file given the same number."""
    held = _forked_children_close()
    held.add(fd)
    try:
        yield fd
    finally:
        held.discard(fd)


class AtExit:
    """``fn`` is called at interpreter exit (before daemon threads are stopped) unless :meth:`cancel` came first.
    ``weakref.finalize`` keeps the process's list of them, with one ``atexit`` function for all: a cancelled one
    leaves nothing behind, where each ``atexit.register`` leaves a slot that ``unregister`` never frees (a
    service making loads all day would grow that list, and scan it at every unregister). Collected before then,
    the object calls ``fn`` too: ``fn`` must be a no-op for a load that is gone. A forked child inherits the
    list; there ``fn`` does nothing (the load runs in the parent, and waiting for it would hold the child's exit).
    """

    def __init__(self, fn: Callable[[], None]):
        pid = os.getpid()

        def in_this_process() -> None:
            if os.getpid() == pid:
                fn()

        self._finalizer = weakref.finalize(self, in_this_process)
        exit_began()  # (after the first finalize: atexit runs newest first, so it is set before any hook runs)

    def cancel(self) -> None:
        self._finalizer.detach()


def _run_stopped_at_exit(main: Callable[[], Awaitable[None]]) -> None:
    """``run_loop(main())`` in a thread other than the main one, which interpreter exit may find still loading
    (a daemon thread preloading weights while the service stops). Exit stops daemon threads where they next
    take the GIL, and one stopped inside torch aborts the process (see ``ThreadedStream._stop_at_exit``); so
    at exit the load is cancelled and waited for, briefly, until no thread of it runs torch any more. The call
    then raises SystemExit, which ends the calling thread quietly (an atexit handler of the caller's that joins
    it returns), and exit waits for that thread too, so that what it unwinds (frees) is not cut in the middle."""
    task: list[tuple[asyncio.AbstractEventLoop, asyncio.Task]] = []
    ended, exiting = threading.Event(), threading.Event()
    handled = sys.exc_info()[1]
    caller = threading.current_thread()

    async def watched() -> None:
        task.append((asyncio.get_running_loop(), asyncio.current_task()))
        await main()

    def at_exit() -> None:
        if task:
            loop, running = task[0]
            exiting.set()
            deadline = time.monotonic() + _EXIT_WAIT_S
            try:
                loop.call_soon_threadsafe(running.cancel)
            except RuntimeError:  # the loop has closed: the load is over
                return
            if ended.wait(_EXIT_WAIT_S):
                caller.join(max(0.0, deadline - time.monotonic()))

    hook = AtExit(at_exit)
    try:
        run_loop(_in_our_loop(watched()))
    except BaseException as exc:
        shed(exc, handled)  # the tensors the cancelled load's frames held are freed here, while exit waits
        # The interpreter is exiting: this load's hook has run, or another's ran first (hooks run newest first,
        # and one load's worker pool, made after another load's hook, refuses its jobs from then on: the load
        # failed with CancelledError, printed as the thread's error, while an older hook still waited).
        if exiting.is_set() or exit_began().is_set():
            del exc
            ended.set()
            raise SystemExit from None  # the interpreter is exiting: not an error of the load's
        raise
    finally:
        ended.set()
        hook.cancel()


def run_loop(coro: Awaitable[T]) -> T:
    """``asyncio.run(coro)``, leaving the thread's current event loop as the caller set it: ``asyncio.run`` sets
    its own as current and then None, which breaks a caller that set a loop to run later (code that calls
    ``asyncio.get_event_loop()``). Python 3.10 has no ``Runner``: there it is ``asyncio.run``."""
    if sys.version_info < (3, 11):  # pragma: no cover
        return asyncio.run(coro)
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        return _run_interruptible(coro)
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(coro)


def _run_interruptible(coro: Awaitable[T]) -> T:
    """``asyncio.run(coro)`` with Ctrl-C handled as ``asyncio.Runner`` does (the first press cancels the load,
    which then ends in KeyboardInterrupt), except for a second press: Runner raises KeyboardInterrupt from
    wherever the main thread is at that instant, and a quick double press landed inside the first one's
    cleanup (closing the transports, joining the readers), which then left threads and a socket running for
    ever. Here a second press cancels again; a third raises at once (a way out of a cleanup that hangs).
    The handler stays through the runner's own close (ending async generators, joining the executor): a
    press there, raised at once, broke that close half-way; it is raised once the close is over."""
    if sys.version_info < (3, 11):  # pragma: no cover - (run_loop's version_info guard, for 3.10's checks)
        return asyncio.run(coro)
    presses = 0
    task: list[asyncio.Task] = []
    loops: list[asyncio.AbstractEventLoop] = []

    async def main() -> T:
        task.append(asyncio.current_task())
        return await coro

    def on_sigint(signum, frame) -> None:
        nonlocal presses
        presses += 1
        if presses >= 3 or not task:
            raise KeyboardInterrupt
        if task[0].done():  # the runner is closing: raised when it is done
            return
        task[0].cancel()
        loops[0].call_soon_threadsafe(lambda: None)  # (wake the loop if it sleeps in its selector)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
            loops.append(runner.get_loop())
            result = runner.run(main())
    except asyncio.CancelledError:
        if presses:
            raise KeyboardInterrupt from None
        raise
    except BaseException as exc:
        if presses and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise KeyboardInterrupt from exc
        raise
    finally:
        if signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, previous)
    if presses:
        raise KeyboardInterrupt
    return result


async def _in_our_loop(aw: Awaitable[T]) -> T:
    """``aw`` in a loop fastload started, whose ``to_thread`` / ``run_in_executor(None)`` work runs on daemon
    threads: ``concurrent.futures``' pools refuse work once the interpreter is exiting, so a load made from an
    ``atexit`` handler (a service saving or loading as it stops) would fail with a bare RuntimeError."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(DaemonThreadPool(min(32, (os.cpu_count() or 1) + 4), "fastload-worker"))
    _OUR_LOOP.set(True)
    return await aw


class CancelWatch:
    """For a sync call made from a coroutine: whether a task of its loop was asked to cancel while the loop could
    not run. ``asyncio.run`` answers Ctrl-C by cancelling its main task, which a task blocked in a sync call never
    sees; and the call's own task may not be that one (``asyncio.wait_for`` runs its coroutine in a task of its
    own on 3.11, so the cancel stops at wait_for's waiter). While the caller's thread waits in our call, no task
    runs, so a count that rises then was raised by a signal handler or another thread: a Ctrl-C (or a SIGTERM
    handler's cancel, a shutdown too). Between a stream's items the caller's own code runs, and may cancel a task
    of its own (a heartbeat): a rise seen at the first poll after an item counts only for the caller's task and
    for the task asyncio's Ctrl-C handler cancels; others join the baseline. The whole baseline is taken again
    only after the loop has run (the caller awaited between items): tasks cancelled then are the loop's
    business. Only in the loop's own thread: a stream iterated elsewhere leaves the loop running, and this watch
    then says no."""

    def __init__(self, loop: asyncio.AbstractEventLoop, own: asyncio.Task):
        self._loop = loop
        self._thread = threading.get_ident()
        self._own = own
        handler = signal.getsignal(signal.SIGINT)  # asyncio.Runner's: partial(_on_sigint, main_task=...), 3.11-3.13
        self._main = handler.keywords.get("main_task") if isinstance(handler, functools.partial) else None
        self._before: dict[asyncio.Task, int] | None = None
        self._loop_ran = False
        self._caller_ran = False  # the caller's code ran since the last poll (it took an item)

    def arm(self) -> None:
        """At each wait's start: O(1), unless the loop has run (a stream of many tensors beside an async
        server's thousands of idle tasks must not cost a snapshot of every task per tensor)."""
        if self._off():
            return
        if self._before is None or self._loop_ran:
            self._before = {t: t.cancelling() for t in asyncio.all_tasks(self._loop) if not t.done()}
            self._loop_ran = False
            self._caller_ran = False
            self._loop.call_soon(self._ran)  # runs only once the loop has control again
        else:
            self._caller_ran = True

    def _ran(self) -> None:
        self._loop_ran = True

    def _off(self) -> bool:
        """Not in the loop's thread, or the loop is over (an iterator made in ``asyncio.run``, drained after it)."""
        return threading.get_ident() != self._thread or self._loop.is_closed()

    def __call__(self) -> bool:
        """At each poll that found nothing (every 50 ms at most)."""
        if self._off() or self._before is None:
            return False
        caller_ran, self._caller_ran = self._caller_ran, False
        for task, count in self._before.items():
            now = task.cancelling()
            if now > count:
                if not caller_ran or task is self._own or task is self._main:
                    return True
                self._before[task] = now  # maybe the caller's own doing, between items
        return False


def cancel_requested() -> CancelWatch | None:
    """A :class:`CancelWatch` for a sync call made from a coroutine; None outside one (or on Python 3.10, whose
    tasks cannot tell)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop in this thread
        return None
    if task is None or not hasattr(task, "cancelling"):
        return None
    return CancelWatch(asyncio.get_running_loop(), task)


class _Workers:
    """A call's daemon pool and how many calls in its loop use it: the last to leave shuts it down."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        # In the caller's own loop (aload, apull), nothing else of fastload's stops the load at interpreter
        # exit: the pool does, by cancelling the call's task (see DaemonThreadPool).
        owner = None if _OUR_LOOP.get() else (self.loop, asyncio.current_task())
        self.pool = DaemonThreadPool(min(32, (os.cpu_count() or 1) + 4), "fastload-worker", owner=owner)
        self.users = 0


#: Whether the running task is in a loop fastload started (a sync call's, a stream's): see _in_our_loop.
_OUR_LOOP: ContextVar[bool] = ContextVar("fastload_our_loop", default=False)


#: The daemon pool a load's CPU work (conversion, hashing, file writes) runs on: set by :func:`own_workers`
#: for the duration of one call, inherited by the tasks it starts. A context variable, not shared state: two
#: loads in one loop each see their own.
_WORKERS: ContextVar[_Workers | None] = ContextVar("fastload_workers", default=None)


@asynccontextmanager
async def own_workers() -> AsyncIterator[None]:
    """Within: :func:`in_worker` jobs run on a daemon pool of this call's own, never on the caller's default
    executor (an ``aload`` in a loop whose one executor thread waits for the weights would deadlock, and
    ``concurrent.futures`` pools refuse work in ``atexit`` handlers). Nested calls share the outer pool, and
    it lasts as long as any of them: a task that a load's progress callback starts (a prefetch of the next
    checkpoint) inherits the load's context and may run on after the load. One inherited from a call that has
    ended, or from another loop (``asyncio.to_thread(fastload.load)`` copies the context), is not shared."""
    workers = _WORKERS.get()
    token = None
    if workers is None or workers.users == 0 or workers.loop is not asyncio.get_running_loop():
        workers = _Workers()
        token = _WORKERS.set(workers)
    workers.users += 1
    try:
        yield
    except BaseException:
        if token is not None and workers.pool.exiting:  # the interpreter is exiting, not the load failing:
            raise SystemExit from None  # the caller's thread ends quietly (a thread's SystemExit is not printed)
        raise
    finally:
        if token is not None:
            _WORKERS.reset(token)
        workers.users -= 1
        if workers.users == 0:
            workers.pool.shutdown(wait=True)  # quick: in_worker saw every job to its end, so the threads are idle


async def in_worker(fn: Callable[..., T], /, *args: Any) -> T:
    """``fn(*args)`` on the call's worker pool (see :func:`own_workers`), awaited to its end even when the
    caller is cancelled: the job writes into memory and files the caller is about to release, so a cancel
    waits for it (a conversion or a chunk's write: milliseconds) and is then raised."""
    workers = _WORKERS.get()
    return await to_the_end(asyncio.get_running_loop().run_in_executor(workers and workers.pool, fn, *args))


async def closing(fn: Callable[[], None]) -> None:
    """``fn()``, a load's cleanup (closing its transports), on the call's worker pool; where the pool refuses it,
    here in the loop's thread. An exiting interpreter's pool starts no new job, and a process out of threads
    starts none: the cleanup of a load cancelled at exit was skipped, and its keep-alive sockets were left
    open (ResourceWarning: unclosed socket)."""
    ran = False

    def job() -> None:
        nonlocal ran
        ran = True
        fn()

    try:
        await in_worker(job)
    except asyncio.CancelledError:  # the task's cancel, or the job's (refused by an exiting pool)
        if not ran:
            fn()
        raise
    except RuntimeError:  # "can't start new thread", or the pool is shut
        if ran:
            raise
        fn()


async def to_the_end(future: asyncio.Future, on_cancel: Callable[[], None] | None = None) -> Any:
    """Await a thread's job; cancelled, call ``on_cancel`` (to hurry it: abort its socket), wait for the job to
    end all the same (it writes where it was told to), then raise the cancellation."""
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        while not future.done():
            try:
                await asyncio.wait({future})
            except asyncio.CancelledError:
                pass
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is the outcome
        raise


async def detached(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` awaited from a daemon thread of its own, for a blocking call that cannot be
    interrupted but ends by its own timeout (botocore's HEAD and LIST, bounded by ``stall_timeout_s``).

    Cancelling returns at once: the thread finishes the call by itself and its result is dropped.
    ``asyncio.to_thread`` would instead hold the loop's shutdown, and with it Ctrl-C, until the call
    returned (30 s against a server that never answers).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            (future.set_result if ok else future.set_exception)(value)

    def body() -> None:
        try:
            ok, value = True, fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            ok, value = False, exc
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the loop is closed: nobody waits for it any more
            pass

    threading.Thread(target=body, name="fastload-detached", daemon=True).start()
    return await future


class DaemonThreadPool(ThreadPoolExecutor):
    """``ThreadPoolExecutor``'s behaviour with daemon threads, which the interpreter does not wait for at exit.

    ``ThreadPoolExecutor`` joins its threads when the interpreter exits: a load abandoned without being closed
    (a stream dropped half-read) whose threads sit in a blocking ``recv`` held up exit until its stall timeout.
    And it refuses work once the interpreter is exiting (a load from an ``atexit`` handler). ``shutdown`` joins
    the threads as usual. It subclasses ``ThreadPoolExecutor`` only to be accepted as a loop's default executor
    (``loop.set_default_executor`` requires one); ``submit`` and ``shutdown`` are its own, and none of the base
    class's state is used.

    A worker is free again before its job's result is out, so that the job submitted the moment the result
    arrives runs on it rather than on a new thread: a done-callback (run inside ``set_result``, in the worker) may
    submit jobs but must not wait for one; fastload's are asyncio's, which only schedule.

    At interpreter exit, a pool still open starts no more jobs: a worker stopped by the interpreter inside torch
    would abort the process. Serving a call in the caller's own loop (``aload``), it also cancels that call and
    waits for the running jobs and the call's end; in fastload's own loops, the stream's or thread's exit hook
    does that.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str,
                 owner: tuple[asyncio.AbstractEventLoop, asyncio.Task | None] | None = None):
        self._max_workers = max_workers
        self._owner = owner  # the loop and task of the call it serves, to cancel at exit; None: another hook does
        self._prefix = thread_name_prefix
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._closed = False
        self._exiting = False
        self._running = 0  # jobs under way
        self._quiet = threading.Condition(self._lock)  # notified when a job ends
        # Serving a call in the caller's loop, the hook that cancels it at exit is there from the start: made with
        # the first thread, a call that never needed one (an aload with nothing to convert) was not stopped.
        self._at_exit: AtExit | None = AtExit(_quiet_at_exit(weakref.ref(self))) if owner is not None else None

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: Future = Future()
            if self._exiting:  # (see the class docstring)
                future.cancel()
                return future
            self._work.put((future, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max_workers:
                if self._at_exit is None:
                    self._at_exit = AtExit(_quiet_at_exit(weakref.ref(self)))
                thread = threading.Thread(target=self._worker, name=f"{self._prefix}_{len(self._threads)}",
                                          daemon=True)
                # Known before it starts: a KeyboardInterrupt inside start() (its wait for the thread) would
                # leave a worker that shutdown() neither stops nor counts, and that takes another's stop.
                self._threads.append(thread)
                try:
                    thread.start()
                except RuntimeError:  # "can't start new thread": the caller is told, so no worker may run it later
                    self._threads.remove(thread)
                    future.cancel()
                    raise
            return future

    def _worker(self) -> None:
        while (item := self._work.get()) is not None:
            with self._lock:
                exiting = self._exiting
                self._running += not exiting
            if exiting:  # the interpreter is exiting: no new job (see the class docstring); the thread stays
                item[0].cancel()  # free to take shutdown()'s stop, so that the pool's shutdown can join it
                del item
                self._idle.release()
                continue
            future, fn, args, kwargs = item
            del item
            idle = False
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        outcome, settle = fn(*args, **kwargs), future.set_result
                    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                        outcome, settle = exc, future.set_exception
                    # Free before the outcome is out: the caller's next job, submitted the moment it has this
                    # one's result, is this thread's, where it started a thread of its own (and an HTTP load
                    # a new connection, with its handshakes, between a file's probe and its header).
                    self._idle.release()
                    idle = True
                    settle(outcome)
                    del outcome, settle
            finally:
                with self._lock:
                    self._running -= 1
                    self._quiet.notify_all()
            del future, fn, args, kwargs  # nothing of the job outlives it in this frame
            if not idle:
                self._idle.release()

    def _stop_at_exit(self) -> None:
        """Start no more jobs (those waiting are cancelled: whoever awaits them goes on). Serving a call in the
        caller's own loop, also cancel that call and wait for its running jobs and its end."""
        with self._lock:
            self._exiting = True
            for _ in range(self._cancel_queued()):
                self._work.put(None)  # (a shutdown's stops for its workers: put back)
            if self._owner is None:
                # A load in fastload's own loop: its own exit hook cancels it and waits for its loop thread, which
                # waits for the running jobs. Waiting here too would wait on jobs that only that cancel ends (a
                # read from a server that hangs), before the hook that cancels has run.
                return
            loop, task = self._owner
        if task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # that loop is closed
                pass
        with self._lock:
            # The running jobs end, the cancelled call unwinds to its own_workers (SystemExit for its caller),
            # which shuts this pool down: what it frees on the way is not cut by the interpreter.
            self._quiet.wait_for(lambda: self._running == 0 and self._closed, _EXIT_WAIT_S)

    def _cancel_queued(self) -> int:
        """Cancel the jobs not started yet; how many workers' stops (None) were among them."""
        stops = 0
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                return stops
            if item is None:
                stops += 1
            else:
                item[0].cancel()

    @property
    def exiting(self) -> bool:
        """Stopped by interpreter exit (see the class docstring)."""
        return self._exiting

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            self._quiet.notify_all()
            if self._at_exit is not None:
                self._at_exit.cancel()
            if cancel_futures:
                self._cancel_queued()
            for _ in self._threads:
                self._work.put(None)
            threads = list(self._threads)
        if wait:
            for thread in threads:
                try:
                    _join(thread)  # (on the main thread in turns, as every wait there: see _patient)
                except RuntimeError:  # never started (start() failed): nothing to wait for
                    pass


def _quiet_at_exit(ref: "weakref.ref[DaemonThreadPool]") -> Callable[[], None]:
    """The exit hook of one pool; it holds the pool weakly."""
    def hook() -> None:
        pool = ref()
        if pool is not None:
            pool._stop_at_exit()
    return hook


def _stop_at_exit(ref: "weakref.ref[ThreadedStream]") -> Callable[[], None]:
    """The exit hook of one stream; it holds the stream weakly (a stream dropped by its caller is collected, and
    stopped, as if there were none)."""
    def hook() -> None:
        stream = ref()
        if stream is not None:
            stream._stop_at_exit()
    return hook


class ThreadedStream:
    """Runs ``producer(put)`` in a private loop thread; iterate to receive what it puts."""

    def __init__(self, producer: Callable[[Callable[[Any], None]], Awaitable[None]],
                 stop: CancelWatch | None = None):
        self._producer = producer
        self._stop = stop
        # queue.Queue, not SimpleQueue: before Python 3.13, SimpleQueue.get(timeout=) waits for ever once a
        # signal handler has run past its deadline (the time left comes out negative, and a negative wait is
        # unbounded), so a Ctrl-C landing late in one 50 ms poll of _get was never seen.
        self._queue: queue.Queue = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="fastload-stream", daemon=True)
        self._complete = False  # the producer ran to its end (an error included), not cancelled
        self._error_tb = None  # the producer's error's own traceback, raised again by every later iteration
        self._exiting = False  # stopped by interpreter exit: no end is handed out (see _stop_at_exit)
        # close() dropped items nobody was handed: a thread iterating at that moment must not take the end the
        # producer put after them for the stream's end (it would end its loop normally, tensors missing)
        self._dropped_any = False
        self._drop_lock = threading.Lock()
        self._waiting: set[threading.Thread] = set()  # threads waiting for an item (see _stop_at_exit)
        self._at_exit: AtExit | None = None
        self._starting = False  # start() was called (the thread may not say so yet: see close)
        self._cancelled = False  # cancel() was called: a producer that had no task yet cancels itself at once
        self._pid = os.getpid()  # a forked child has the queue's copy and no producer: nothing more will come

    @property
    def finished(self) -> bool:
        """Everything the producer put was handed out, up to its end or its error."""
        return self._complete

    def start(self) -> "ThreadedStream":
        self._at_exit = AtExit(_stop_at_exit(weakref.ref(self)))  # before the thread starts: its end cancels it
        self._starting = True
        try:
            self._thread.start()
        except RuntimeError:  # "can't start new thread": nothing runs, nothing to wait for at close or exit
            self._starting = False
            self._at_exit.cancel()
            raise
        _patient(self._ready.wait, bool)
        return self

    def _stop_at_exit(self) -> None:
        """At interpreter exit, with the stream still running (entered and never closed): cancel it and wait
        (briefly) for its thread. Python stops daemon threads where they next take the GIL, and one stopped
        inside torch (a conversion, an allocation) aborts the whole process: "terminate called without an
        active exception", status 134, on every exit of a script that left a stream converting. A thread
        still iterating then gets SystemExit, which ends it quietly (an atexit handler of the caller's that
        joins it returns), and exit waits for it too, so that what it frees on the way is not cut."""
        deadline = time.monotonic() + _EXIT_WAIT_S
        self._exiting = True
        self.cancel()
        self._thread.join(_EXIT_WAIT_S)
        if self._thread.is_alive():
            return
        self._queue.put((_DONE, _EXITING))
        for thread in self._waiting.copy():  # (a copy: made at once, while other threads change the set)
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _main(self) -> None:
        def end(outcome: Any) -> None:
            if not self._exiting:
                self._queue.put((_DONE, outcome))

        async def body() -> None:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
            if self._cancelled:  # cancelled before there was a task to cancel (a Ctrl-C in start's wait)
                self._task.cancel()
            self._ready.set()
            try:
                await _in_our_loop(self._producer(self._queue.put))
            except asyncio.CancelledError:
                end(_CANCELLED)  # not an end: a thread still iterating must not think so
                return
            except BaseException as exc:
                end(exc)
                return
            end(None)

        try:
            run_loop(body())
        except BaseException as exc:  # noqa: BLE001 - out of the loop past body(): a reader must still see an end
            end(exc)
        finally:
            self._ready.set()
            self._at_exit.cancel()

    def _get(self, stop: CancelWatch | None) -> Any:
        if os.getpid() != self._pid and self._queue.empty():  # (what the fork copied is still handed out)
            raise RuntimeError("this stream's load runs in the process that forked this one: open a new "
                               "fastload.stream here (iterating the inherited one would wait for ever)")
        if stop is None:
            return _patient(self._next, lambda item: item is not _NOTHING)
        stop.arm()
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if stop():
                    self.close()
                    raise asyncio.CancelledError from None

    def _next(self, timeout: float | None) -> Any:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return _NOTHING

    def __iter__(self) -> Iterator[Any]:
        return self.iterate(self._stop)

    def iterate(self, stop: CancelWatch | None = None) -> Iterator[Any]:
        """What the producer put, then its end. Several threads may iterate one stream: each item goes to one
        of them, and the end marker stays in the queue, so every one of them sees the end (or the error, or
        that the stream was closed before everything was handed out). ``stop``: polled while waiting; when it
        says so, the stream is closed and CancelledError raised (see ``cancel_requested``)."""
        while True:
            me = threading.current_thread()
            self._waiting.add(me)  # (for _stop_at_exit; a thread waits in one _get at a time)
            try:
                item = self._get(stop)
            finally:
                self._waiting.discard(me)
            if isinstance(item, tuple) and len(item) == 2 and item[0] is _DONE:
                self._queue.put(item)  # the end, for every other thread iterating, and for a later iteration
                if item[1] is _EXITING:
                    raise SystemExit
                _join(self._thread)
                outcome = item[1]
                with self._drop_lock:  # (after close() has said whether it dropped what came before this end)
                    if outcome is None and self._dropped_any:
                        outcome = _CANCELLED
                if outcome is _CANCELLED:
                    raise RuntimeError("the load was cancelled (closed) before it finished")
                self._complete = True
                if outcome is not None:
                    error = outcome.exc if isinstance(outcome, UserInterrupt) else outcome
                    if self._error_tb is None:
                        shed(error)  # (see boundary)
                        self._error_tb = error.__traceback__ or False
                    raise error.with_traceback(self._error_tb or None)  # not a traceback grown by each raise
                return
            box = [item]  # handed over without a reference left in this frame while it waits
            del item
            yield box.pop()

    def cancel(self) -> None:
        """Ask the producer to stop, without waiting for it (a finalizer's part: it may run on any thread,
        the loop's own included)."""
        self._cancelled = True  # (before looking for the task: the producer looks at this after setting it)
        if self._thread.is_alive() and self._loop is not None and self._task is not None:
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:  # loop already closed
                pass

    def close(self) -> None:
        """Cancel whatever is still running and wait for the loop thread to end. What was produced and never
        handed out goes with the stream (on a GPU: device memory), and a thread still iterating then learns
        that the stream was closed before its end, not that it ended."""
        self.cancel()
        if self._starting and self._thread.ident is None:  # a Ctrl-C cut start() before the thread said it runs
            self._ready.wait(_EXIT_WAIT_S)  # (set as soon as it runs; never, if it was never made)
        if self._thread.ident is not None:
            _join(self._thread)
        end = None
        while True:
            with self._drop_lock:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, tuple) and len(item) == 2 and item[0] is _DONE:
                    end = item
                else:
                    self._dropped_any = True
        if end is None and self._thread.ident is not None:
            return  # a thread took the end marker this instant: it puts it back, and sees what was dropped
        if end is None or (self._dropped_any and end[1] is None):
            end = (_DONE, _CANCELLED)
        self._queue.put(end)
