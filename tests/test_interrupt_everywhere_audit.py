"""Audit: Ctrl-C (a real SIGINT to this process) reaching every public entry point at every stage.

What the rest of the suite does not already cover (test_cancel.py, test_stream_consumers_audit.py,
test_session9_changes_audit.py, test_readme_claims_audit.py, test_api_concurrency_corners.py, test_cli_corners.py,
test_cli_audit2.py, test_from_pretrained_remote_audit.py):

- Ctrl-C while the *header* read hangs (the size probe answered, the JSON header never comes), for ``load``,
  ``plan`` and a ``stream`` whose consumer waits for its first tensor;
- Ctrl-C pressed twice or more in quick succession (an impatient user) while a sync load, a plain ``for`` over a
  stream and a coroutine's ``for`` over a stream wait on hung reads: still a KeyboardInterrupt, and nothing left
  running or open once it is out;
- a sweep of Ctrl-Cs landing at every moment of a local load converting dtypes and of a local pull writing,
  fsyncing and renaming its files: the Ctrl-C is never lost and never turns into another error, nothing is left
  behind, and every file under its final name is whole (a second pull then completes the rest);
- Ctrl-C while a pull waits for another pull's lock on its destination;
- one Ctrl-C under an application's own raising SIGINT handler, at moments spread over a converting load;
- the CLI (``fastload inspect`` / ``load`` as a subprocess) interrupted while a header read hangs, with Ctrl-C
  pressed twice: exit status 130, the one line ``fastload: interrupted``, no traceback.

Each check: KeyboardInterrupt within about a second of the signal, no ``fastload`` thread, client socket or
open file left (``reliability_helpers.Leaks``).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from checkpoints import write_sharded, write_single
from reliability_helpers import Leaks, Timer, assert_bit_exact
from servers.faults import HangAfter

import fastload

KiB = 1024
CHUNK = 64 * KiB
CONFIG = fastload.LoadConfig(chunk_bytes=CHUNK, host_buffer_bytes=4 * CHUNK, max_concurrency=4,
                             stall_timeout_s=8.0, connect_timeout_s=2.0,
                             retry=fastload.RetryConfig(max_attempts=1, deadline_s=20.0))
FASTLOAD = str(Path(sys.executable).with_name("fastload"))


def _tensors(seed: int, count: int = 12, numel: int = 20_000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i:02d}": torch.randn(numel + 37 * i, generator=g) for i in range(count)}


def sigints_when(predicate, delays: tuple[float, ...], sent: list[float]) -> threading.Thread:
    """Once ``predicate()`` holds, send this process one SIGINT after each of ``delays`` (cumulative), as a user
    pressing Ctrl-C; each time goes to ``sent``."""
    def body():
        deadline = time.monotonic() + 15
        while not predicate():
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
        for delay in delays:
            time.sleep(delay)
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=body, name="test-sigint", daemon=True)
    thread.start()
    return thread


def interrupted(fn, sent: list[float], killer: threading.Thread) -> tuple[BaseException | str, float | None]:
    """Run ``fn`` (Ctrl-C is on its way); returns what ended it and the seconds from the first SIGINT to its end
    ("returned" when it returned). The presses that come after it ended are absorbed here."""
    outcome: BaseException | str
    try:
        fn()
        outcome = "returned"
    except BaseException as exc:  # noqa: BLE001 - which one is the point
        outcome = exc
    ended = time.monotonic()
    while True:
        try:
            killer.join(10)
            time.sleep(0.05)  # a SIGINT still pending lands here
            break
        except KeyboardInterrupt:
            pass
    return outcome, (ended - sent[0]) if sent else None


@pytest.fixture(autouse=True)
def _default_sigint():
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    yield
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "a handler was left installed"


# -- the header read hangs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["load", "plan", "stream"])
def test_ctrl_c_while_the_header_read_hangs(entry, http_server, http_dir):
    """The first request (the 8-byte size probe) is answered; the header's own GET never is. Ctrl-C: a
    KeyboardInterrupt at once from ``load``, ``plan`` and a stream waiting for its first tensor, not the
    ``TransferError`` of the stall timeout 8 s later; nothing left running."""
    path = write_single(http_dir / f"hdr-{entry}.safetensors", _tensors(1, count=3))
    url = http_server.url_for(path)
    rule = http_server.faults._add(HangAfter(pattern=f"*/hdr-{entry}.safetensors", after=1))

    def run():
        if entry == "load":
            fastload.load(url, config=CONFIG)
        elif entry == "plan":
            fastload.plan(url, config=CONFIG)
        else:
            with fastload.stream(url, config=CONFIG) as s:
                for _ in s:
                    pass

    sent: list[float] = []
    with Leaks({http_server.port}) as leaks:
        killer = sigints_when(lambda: rule.fired >= 1, (0.15,), sent)
        outcome, took = interrupted(run, sent, killer)
        leaks.check(grace_s=1.0)
    assert rule.fired == 1 and len(http_server.requests(f"*/hdr-{entry}.safetensors")) == 2
    assert isinstance(outcome, KeyboardInterrupt), f"{entry}: Ctrl-C ended in {outcome!r}"
    assert took is not None and took < 1.0, f"{entry}: took {took:.2f} s after Ctrl-C"


# -- Ctrl-C pressed more than once ---------------------------------------------------------------------------------

# A second press 0.5-4 ms after the first: while the first one's cancellation is still being handled (the hung
# reads aborted, the transports closing). Several spacings, as the moment the cleanup reaches each step varies.
SECOND_PRESS_GAPS = (0.001, 0.0005, 0.0015, 0.001, 0.002, 0.00075, 0.003, 0.001, 0.00125, 0.004)


def _press_twice(http_server, http_dir, name: str, run_for_url, gaps) -> list[str]:
    """For each gap: a load of a file of its own whose reads hang after the first four requests (probe, header,
    two chunks), Ctrl-C, and Ctrl-C again ``gap`` s later. What went wrong (the trials stop at the first)."""
    path = write_single(http_dir / f"{name}.safetensors", _tensors(2))
    problems = []
    for trial, gap in enumerate(gaps):
        http_server.reset()
        rule = http_server.faults._add(HangAfter(pattern=f"*/{name}.safetensors", after=4))
        url = http_server.url_for(path) + f"?trial={trial}"
        sent: list[float] = []
        with Leaks({http_server.port}) as leaks:
            killer = sigints_when(lambda rule=rule: rule.fired >= 1, (0.05, gap), sent)
            outcome, took = interrupted(lambda url=url: run_for_url(url), sent, killer)
            try:
                leaks.check(grace_s=0.5)
            except AssertionError as exc:
                problems.append(f"gap {gap * 1000:.2f} ms: {exc}")
        if not isinstance(outcome, KeyboardInterrupt):
            problems.append(f"gap {gap * 1000:.2f} ms: ended in {outcome!r}")
        elif took is None or took > 1.0:
            problems.append(f"gap {gap * 1000:.2f} ms: took {took} s after the first Ctrl-C")
        if problems:
            return [f"trial {trial + 1} of {len(gaps)}, " + p for p in problems]
    return problems


def test_a_second_ctrl_c_while_a_sync_load_handles_the_first_leaves_nothing_running(http_server, http_dir):
    """``fastload.load`` runs its loop in the caller's thread. ``asyncio.Runner``'s SIGINT handler cancels the
    load on the first Ctrl-C and raises KeyboardInterrupt wherever the main thread is on the second, which used
    to cut the first one's cleanup and leave threads and a socket running (fastload now handles Ctrl-C itself
    there: a second press cancels again). A user pressing Ctrl-C twice in quick succession: still a
    KeyboardInterrupt, and no thread (nor socket, nor open file) of the load left running for ever."""
    problems = _press_twice(http_server, http_dir, "twice-load",
                            lambda url: fastload.load(url, config=CONFIG), SECOND_PRESS_GAPS)
    assert not problems, "\n".join(problems)


PRESS_IN_CLOSE = """
import asyncio, os, signal
from fastload import runner

closed = []

async def generator():
    try:
        yield 1
    finally:  # run by the runner's close (its shutdown of async generators), after the call's task is done
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0.2)
        closed.append(True)

async def call():
    global left_open
    left_open = generator()
    return await left_open.__anext__()

try:
    runner.run_loop(call())
    print("returned", closed)
except KeyboardInterrupt:
    print("interrupted", closed)
"""


def test_a_ctrl_c_during_the_sync_runners_own_close_is_raised_once_the_close_is_over(tmp_path):
    """A press landing after the load's task is done, while its event loop closes (ending async generators,
    joining the executor): raised there at once, it broke that close half-way (in the full suite: asyncio's
    'coroutine ... shutdown_asyncgens was never awaited'); swallowed, the Ctrl-C was lost. It is raised once the
    close is over: a KeyboardInterrupt, the close whole, nothing on stderr."""
    script = tmp_path / "press_in_close.py"
    script.write_text(PRESS_IN_CLOSE)
    done = subprocess.run([sys.executable, "-X", "dev", str(script)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "interrupted [True]", ""), done


@pytest.mark.parametrize("how", ["for", "asyncio-run", "uvloop"])
def test_a_second_ctrl_c_while_a_stream_closes_leaves_nothing_running(how, http_server, http_dir):
    """The same double Ctrl-C against a stream, whose loop runs in a thread of its own: iterated in a plain
    ``for`` (the second press lands in ``close``'s join), from a coroutine under ``asyncio.run`` and under
    ``uvloop.run`` (the first press cancels the coroutine's task, which the stream's poll notices)."""
    import uvloop

    def run(url):
        async def consume():
            with fastload.stream(url, config=CONFIG) as s:
                for _ in s:
                    pass
        if how == "for":
            with fastload.stream(url, config=CONFIG) as s:
                for _ in s:
                    pass
        elif how == "asyncio-run":
            asyncio.run(consume())
        else:
            uvloop.run(consume())

    problems = _press_twice(http_server, http_dir, f"twice-stream-{how}", run, (0.001, 0.002))
    assert not problems, "\n".join(problems)


# -- a Ctrl-C at every moment of a local load / pull ---------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """~3 MB of float32 in 3 shards and an index (many 64 KiB chunks), and the reference tensors."""
    g = torch.Generator().manual_seed(11)
    tensors = {f"layer{i}.weight": torch.randn(60_000 + 1_001 * i, generator=g) for i in range(12)}
    directory = write_sharded(tmp_path_factory.mktemp("interrupt-local") / "ck", tensors, 3)
    ref = {}
    for shard in sorted(directory.glob("*.safetensors")):
        ref |= safetensors.torch.load_file(str(shard))
    return directory, ref


def _sweep(fn, seconds: float, trials: int) -> list[str]:
    """Ctrl-C ``fn()`` at ``trials`` moments spread over ``seconds`` (how long one uninterrupted call takes): from
    before the first read to its return. Each must end in a KeyboardInterrupt (one sent while the call ran must
    never be lost, nor become another error); ``fn`` checks what a call that returned gave. What went wrong."""
    problems = []
    for k in range(trials):
        delay = seconds * k / (trials - 1)
        started = threading.Event()
        sent: list[float] = []
        with Leaks() as leaks:
            def call(started=started):
                started.set()
                fn()
            killer = sigints_when(started.is_set, (delay,), sent)
            outcome, took = interrupted(call, sent, killer)
            try:
                leaks.check(grace_s=0.5)
            except AssertionError as exc:
                problems.append(f"Ctrl-C at {delay * 1000:.1f} ms: {exc}")
        if outcome == "returned" and took is not None and took > 0:
            problems.append(f"Ctrl-C at {delay * 1000:.1f} ms, {took * 1000:.1f} ms before the call returned: lost")
        elif outcome != "returned" and not isinstance(outcome, KeyboardInterrupt):
            problems.append(f"Ctrl-C at {delay * 1000:.1f} ms: ended in {outcome!r}")
        elif took is not None and took > 1.0:
            problems.append(f"Ctrl-C at {delay * 1000:.1f} ms: took {took:.2f} s")
    return problems


def test_a_ctrl_c_at_any_moment_of_a_converting_local_load_is_a_clean_keyboard_interrupt(local_ckpt):
    """A local sharded load converting float32 to bfloat16 (staged chunks converted on the worker pool), Ctrl-C
    at moments spread from resolve to return: resolve, headers, plan, allocation, reads, conversions, close."""
    directory, ref = local_ckpt
    want = {n: t.to(torch.bfloat16) for n, t in ref.items()}

    def load():
        got = fastload.load(directory, dtype=torch.bfloat16, config=CONFIG)
        assert_bit_exact(got, want)

    load()
    with Timer() as timer:  # (warm: the first call of a process pays for imports)
        load()
    problems = _sweep(load, timer.s * 1.2, 9)
    assert not problems, "\n".join(problems)


def test_a_ctrl_c_while_a_named_stream_starts_leaves_nothing_running(http_server, http_dir):
    """``s = fastload.stream(...)`` then ``with s:``: a Ctrl-C landing in ``__enter__`` (while it waits for the
    loader's thread to start) comes before the with block, so no ``__exit__`` closed the stream, and the name
    ``s`` kept it from being collected: its load went on for nobody (here: held by a server that never answers,
    until the stall timeout). Ctrl-Cs spread over the stream's first milliseconds, 25 trials: each a
    KeyboardInterrupt, with no thread, socket or file of the load left, the stream still held."""
    path = write_single(http_dir / "named-stream.safetensors", _tensors(3))
    http_server.faults._add(HangAfter(pattern="*/named-stream.safetensors", after=2))  # data never comes
    held, problems = [], []
    for trial in range(25):
        url = http_server.url_for(path) + f"?trial={trial}"
        entered = threading.Event()

        def consume(url=url, entered=entered):
            s = fastload.stream(url, config=CONFIG)
            held.append(s)
            entered.set()
            with s:
                for _ in s:
                    pass

        sent: list[float] = []
        with Leaks({http_server.port}) as leaks:
            killer = sigints_when(entered.is_set, (0.0002 * trial,), sent)
            outcome, took = interrupted(consume, sent, killer)
            try:
                leaks.check(grace_s=0.5)
            except AssertionError as exc:
                problems.append(f"trial {trial}: {exc}")
        if not isinstance(outcome, KeyboardInterrupt) or took is None or took > 1.0:
            problems.append(f"trial {trial}: ended in {outcome!r} after {took} s")
    assert not problems, "\n".join(problems)


def test_a_ctrl_c_at_any_moment_of_a_local_pull_leaves_only_whole_files(local_ckpt, tmp_path):
    """``fastload.pull`` of a local checkpoint directory into a fresh destination, Ctrl-C at moments spread over
    the pull (listing, lock, writes, fsync, rename, records): whatever is under a final name afterwards is the
    whole source file; a pull into each interrupted destination then completes it."""
    directory, _ = local_ckpt
    sources = {p.name: p.read_bytes() for p in directory.iterdir()}
    trials = 8

    def final_files(dest: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in dest.iterdir() if p.is_file()} if dest.is_dir() else {}

    fastload.pull(directory, to=tmp_path / "warm", config=CONFIG)
    with Timer() as timer:
        fastload.pull(directory, to=tmp_path / "timing", config=CONFIG)
    dests = iter(tmp_path / f"dest{k}" for k in range(trials))
    problems = _sweep(lambda: fastload.pull(directory, to=next(dests), config=CONFIG), timer.s * 1.2, trials)
    assert not problems, "\n".join(problems)
    for k in range(trials):
        dest = tmp_path / f"dest{k}"
        partial = [name for name, data in final_files(dest).items() if data != sources.get(name)]
        assert not partial, f"trial {k}: files under their final name that are not the source's: {partial}"
        assert fastload.pull(directory, to=dest, config=CONFIG) == dest
        assert final_files(dest) == sources, k


def test_ctrl_c_while_a_pull_waits_for_the_destination_lock(local_ckpt, tmp_path):
    """Another pull holds the destination's lock (here: this test, with ``flock`` on it); ours waits. Ctrl-C: a
    KeyboardInterrupt at once, the lock file closed, nothing fetched into the destination."""
    directory, _ = local_ckpt
    dest = tmp_path / "dest"
    lock = dest / ".fastload" / "pull.lock"
    lock.parent.mkdir(parents=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        sent: list[float] = []
        started = threading.Event()

        def pull():
            started.set()
            fastload.pull(directory, to=dest, config=CONFIG)

        with Leaks() as leaks:
            killer = sigints_when(started.is_set, (0.4,), sent)
            outcome, took = interrupted(pull, sent, killer)
            leaks.check(grace_s=1.0)
    finally:
        os.close(fd)
    assert isinstance(outcome, KeyboardInterrupt), f"Ctrl-C ended in {outcome!r}"
    assert took is not None and took < 1.0, f"took {took:.2f} s"
    assert [p.name for p in dest.iterdir()] == [".fastload"]


RAISING_HANDLER_CHILD = r"""
import json, os, signal, sys, threading, time
import psutil, torch, fastload

directory, trials = sys.argv[1], int(sys.argv[2])
config = fastload.LoadConfig(chunk_bytes=64 * 1024, host_buffer_bytes=4 * 64 * 1024, max_concurrency=4)


def load():
    fastload.load(directory, dtype=torch.bfloat16, config=config)


def handler(signum, frame):  # the application's own: log, then stop (here: just stop)
    raise KeyboardInterrupt


def ours():
    return {t for t in threading.enumerate() if t.name.startswith("fastload") and t.is_alive()}


def report(**what):
    print(json.dumps(what), flush=True)
    os._exit(0)


load()
began = time.monotonic()
load()
seconds = time.monotonic() - began
files = {f.path for f in psutil.Process().open_files()}
signal.signal(signal.SIGINT, handler)
for k in range(trials):
    delay = seconds * 0.4 * k / (trials - 1)
    started, ended = threading.Event(), threading.Event()

    def kill():
        started.wait()
        time.sleep(delay)
        os.kill(os.getpid(), signal.SIGINT)
        if not ended.wait(3.0):
            report(trial=k, delay=delay, problem="the load hung in its cleanup after one Ctrl-C (3 s)")

    before = ours()
    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    outcome = "returned"
    try:
        started.set()
        try:
            load()
        finally:
            ended.set()
    except KeyboardInterrupt:
        outcome = "KeyboardInterrupt"
    except BaseException as exc:
        report(trial=k, delay=delay, problem=f"ended in {exc!r}")
    while True:
        try:
            killer.join()
            time.sleep(0.02)
            break
        except KeyboardInterrupt:
            outcome = "KeyboardInterrupt"
    deadline = time.monotonic() + 0.5
    while (left := ours() - before) and time.monotonic() < deadline:
        time.sleep(0.02)
    opened = {f.path for f in psutil.Process().open_files()} - files
    if left or opened:
        report(trial=k, delay=delay, problem=f"left: threads {sorted(t.name for t in left)}, files {sorted(opened)}")
report(problem=None)
"""


def test_one_ctrl_c_under_an_applications_own_raising_handler_never_hangs_or_leaks(local_ckpt, tmp_path):
    """An application's own SIGINT handler that raises KeyboardInterrupt (a service logging the signal first, a
    framework's wrapper): ``asyncio.Runner`` then installs none, and one Ctrl-C raises wherever the main thread
    is inside the load's loop. Pressed once, at moments spread over the first part of a local converting load
    (when its pools start their threads): the cleanup never hangs, and no thread or open file is left (a worker
    started as the Ctrl-C landed used to be unknown to its pool, and its shutdown then hung). (In a
    child process: a KeyboardInterrupt raised at any bytecode can leave this interpreter unusable, e.g. a later
    ``compile`` failing with "SystemError: AST constructor recursion depth mismatch".)"""
    directory, _ = local_ckpt
    trials = 24
    child = subprocess.run([sys.executable, "-c", RAISING_HANDLER_CHILD, str(directory), str(trials)],
                           capture_output=True, text=True, timeout=60, check=False)
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    assert child.returncode == 0 and lines, (child.returncode, child.stdout[-2000:], child.stderr[-3000:])
    result = json.loads(lines[-1])
    assert result["problem"] is None, (
        f"Ctrl-C {result['delay'] * 1000:.1f} ms into trial {result['trial'] + 1} of {trials}: {result['problem']}")


# -- the CLI -----------------------------------------------------------------------------------------------------


def test_cli_inspect_interrupted_twice_while_the_header_read_hangs(http_server, http_dir):
    """``fastload inspect URL`` (headers only) whose header read hangs: Ctrl-C, and again a moment later as the
    first is handled. Exit status 130 at once, stderr the one line ``fastload: interrupted`` (no traceback, no
    "Task exception was never retrieved"), nothing on stdout."""
    path = write_single(http_dir / "cli-hdr.safetensors", _tensors(3, count=3))
    rule = http_server.faults._add(HangAfter(pattern="*/cli-hdr.safetensors", after=1))
    env = dict(os.environ, FASTLOAD_STALL_TIMEOUT_S="20")
    proc = subprocess.Popen([FASTLOAD, "inspect", http_server.url_for(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while rule.fired < 1 and proc.poll() is None:
            assert time.monotonic() < deadline, "the CLI never reached the header read"
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        time.sleep(0.001)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, err, out) == (130, "fastload: interrupted\n", ""), (proc.returncode, err[-3000:], out)
    assert took < 2.0, f"took {took:.2f} s"
