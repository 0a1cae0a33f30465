"""Process lifecycle around fastload loads, in real subprocesses: what happens to loads that are still running
when the process exits, forks, or is told to stop.

Goes beyond test_exit_while_loading.py, test_process_robustness_audit.py, test_session9_changes_audit.py and
test_cancel.py (a stream left open / a sync ``load`` in a daemon thread at exit, SIGTERM mid-load/pull, Ctrl-C,
fork with loads running, a load in an atexit handler):

- ``aload`` in an event loop that runs in a daemon thread (a service's background loop) at interpreter exit;
- several loads stuck (in progress callbacks) at exit at once: exit is bounded, about 2 s per stuck load;
- a forked child that exits normally does not run (and wait for) its parent's exit hooks;
- an atexit handler that joins the thread whose load fastload cancelled at exit;
- ``pull`` in a daemon thread at exit: quick, quiet, nothing sent after the process is gone, no file under its
  final name, and the next pull fetches exactly what the journal lacks;
- a SIGTERM handler raising SystemExit while the main thread iterates a stream.

Each script runs with the repo's interpreter, cwd ``tests/`` and ``PYTHONPATH=tests``; exit status, stderr,
duration, files and the requests reaching the server are measured.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from reliability_helpers import assert_bit_exact, write_checkpoint
from safetensors.torch import load_file, save_file
from servers.faults import HangAfter

import fastload

TESTS = Path(__file__).resolve().parent


def start(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=TESTS,
                            env={**os.environ, "PYTHONPATH": str(TESTS), "PYTHONUNBUFFERED": "1"})


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str, float]:
    """Exit status, stdout, stderr, and the time of its end (``time.monotonic``, system-wide on Linux)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err, time.monotonic()


def left_at(out: str) -> float:
    """The child's ``leaving <monotonic>`` line: when its main thread ended."""
    lines = [line for line in out.splitlines() if line.startswith("leaving ")]
    assert lines, f"the script never got to its end: {out!r}"
    return float(lines[-1].split()[1])


@pytest.fixture(scope="module")
def converting(tmp_path_factory) -> str:
    """160 MB of float32, loaded as float64: exit finds fastload's workers converting."""
    path = tmp_path_factory.mktemp("lifecycle") / "big.safetensors"
    save_file({f"t{i:02d}": torch.full((1_000_000,), float(i)) for i in range(40)}, str(path))
    return str(path)


# -- aload in a daemon thread's event loop ------------------------------------------------------------------------


AIO_DAEMON = """
import asyncio, sys, threading, time, torch, fastload
started = threading.Event()

async def preload():  # a service's background event loop, in a daemon thread
    await fastload.aload(sys.argv[1], dtype=torch.float64, progress=lambda done, total: done and started.set())
    print("loaded", flush=True)

threading.Thread(target=asyncio.run, args=(preload(),), name="service-loop", daemon=True).start()
started.wait(30)
print("leaving", time.monotonic(), flush=True)
"""


def test_aload_in_a_daemon_threads_event_loop_lets_the_process_exit(converting):
    """The async twin of test_exit_while_loading's daemon-thread case: ``aload`` running in an event loop that a
    daemon thread runs when the main thread ends. fastload's own worker threads (conversions) are daemons that
    Python stops wherever they are; stopped inside torch they abort the process. Two runs at once: each must
    exit 0, quietly."""
    procs = [start(AIO_DAEMON, converting) for _ in range(2)]
    results = [finish(p) for p in procs]
    for status, out, err, ended in results:
        assert (status, err) == (0, ""), (
            f"exit status {status} with aload running in a daemon thread's loop at exit: {err[-600:]!r}")
        assert out.startswith("leaving") and ended - left_at(out) < 4.0


# -- several loads stuck at exit: bounded ----------------------------------------------------------------------------


STUCK_AT_EXIT = """
import sys, threading, time, fastload
src = sys.argv[1]
config = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=2)
stuck = threading.Semaphore(0)

def report(done, total):  # a progress hook posting to a status endpoint that stopped answering
    if done:
        stuck.release()
        time.sleep(60)

threading.Thread(target=fastload.load, args=(src,), kwargs=dict(config=config, progress=report), daemon=True).start()
stream = fastload.stream(src, config=config, progress=report).__enter__()
for _ in range(2):
    assert stuck.acquire(timeout=30)
print("leaving", time.monotonic(), flush=True)
"""


def test_exit_with_loads_stuck_in_progress_callbacks_is_bounded(tmp_path):
    """Two loads (one in a daemon thread, one stream left open) whose loops are held by a progress hook when the
    process ends. Each is cancelled and waited for up to 2 s (README), one after the other: the exit is quiet,
    status 0, and takes at most about 2 s per stuck load. (They are not waited for together: that would take a
    list of every live load in the process, which fastload does not keep; a load not stuck in the caller's own
    code stops in milliseconds.)"""
    path = tmp_path / "m.safetensors"
    save_file({f"t{i}": torch.full((65_536,), float(i)) for i in range(8)}, str(path))
    status, out, err, ended = finish(start(STUCK_AT_EXIT, str(path)))
    assert (status, err) == (0, ""), err[-2000:]
    took = ended - left_at(out)
    # (the hooks' 2 s each, and the interpreter's own teardown: seconds on a 2-core machine under the full suite;
    # the hooks unbounded would wait for the callbacks' 60 s)
    assert took < 2 * 2.0 + 4.0, f"exit took {took:.1f} s with two stuck loads"


# -- a forked child's exit ------------------------------------------------------------------------------------------


FORK_CHILD_EXIT = """
import os, sys, threading, time, fastload
url = sys.argv[1]
config = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=2, stall_timeout_s=30)
threading.Thread(target=fastload.load, args=(url,), kwargs=dict(config=config), daemon=True).start()  # held
stream = fastload.stream(url, config=config).__enter__()
time.sleep(0.5)
pid = os.fork()
if pid == 0:  # a worker process that ends normally (sys.exit: its atexit handlers run)
    sys.exit(0)
started = time.monotonic()
status = None
while time.monotonic() - started < 8:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.01)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    status = None
took = time.monotonic() - started
print("child", None if status is None else os.waitstatus_to_exitcode(status), round(took, 2), flush=True)
print("leaving", time.monotonic(), flush=True)
"""


def test_a_forked_child_exits_without_waiting_for_its_parents_loads(http_server, http_dir):
    """A process forks while a load of its own runs in a daemon thread (and a stream is open); the child does
    its work and exits normally. The parent's exit hooks are copied into the child, where the load's thread does
    not exist: they used to cancel nothing there and then wait their full 2 s for an end that never came (2 s
    more per such load). The child must exit at once."""
    path, _ = write_checkpoint(http_dir / "model.safetensors", seed=21, count=10)
    rule = http_server.faults._add(HangAfter(pattern="*", after=8))
    status, out, err, _ = finish(start(FORK_CHILD_EXIT, http_server.url_for(path)))
    assert rule.fired >= 1, "nothing was outstanding at the fork: the test proved nothing"
    assert (status, err) == (0, ""), err[-2000:]
    line = next(line for line in out.splitlines() if line.startswith("child "))
    code, took = line.split()[1], float(line.split()[2])
    assert code == "0", out
    # waiting for the two loads it does not have took 2 s each; a torch process's own exit takes up to about 2 s
    # on a 2-core machine under the full suite
    assert took < 3.5, f"the forked child took {took:.1f} s to exit: it waited for its parent's loads"


# -- an atexit handler that waits for the preloading thread --------------------------------------------------------


ATEXIT_JOIN = """
import atexit, sys, threading, time
worker = []

def stop_service():  # registered before fastload/torch are imported: runs after their exit hooks
    t0 = time.monotonic()
    worker[0].join(10)  # (ends within about 2 s; a loaded machine stretches the unwinding)
    print("joined", "alive" if worker[0].is_alive() else "ended", round(time.monotonic() - t0, 1), flush=True)

atexit.register(stop_service)
import torch, fastload

started = threading.Event()

def preload():
    fastload.load(sys.argv[1], dtype=torch.float64, progress=lambda done, total: done and started.set())

worker.append(threading.Thread(target=preload, name="preload", daemon=True))
worker[0].start()
started.wait(30)
print("leaving", time.monotonic(), flush=True)
"""


def test_an_atexit_handler_that_joins_the_preloading_thread_does_not_hang(converting):
    """A service's shutdown hook joins its background preload thread. fastload's exit hook cancels that load; it
    used to park the thread for ever (``threading.Event().wait()``), so a join without a timeout never returned:
    the process hung at exit. The thread must end (SystemExit, quiet), so that the join returns."""
    status, out, err, _ = finish(start(ATEXIT_JOIN, converting))
    assert status == 0 and err == "", err[-2000:]
    joined = next(line for line in out.splitlines() if line.startswith("joined"))
    assert joined.split()[1] == "ended", (
        f"{joined!r}: the preload thread was still alive 10 s into the shutdown hook's join (a join() without a "
        "timeout hangs the process for ever)")


# -- pull in a daemon thread at exit, then resumed ----------------------------------------------------------------


PULL_DAEMON = """
import sys, threading, time, fastload
url, dest = sys.argv[1:3]
config = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=2, stall_timeout_s=30)
started = threading.Event()

def prestage():
    fastload.pull(url, to=dest, config=config, progress=lambda done, total: done and started.set())
    print("pulled", flush=True)

threading.Thread(target=prestage, daemon=True).start()
assert started.wait(30)
time.sleep(0.3)
print("leaving", time.monotonic(), flush=True)
"""


def _ranges(records) -> list[tuple[int, int]]:
    out = []
    for r in records:
        first, last = r.range.removeprefix("bytes=").split("-")
        out.append((int(first), int(last) + 1))
    return out


def test_pull_in_a_daemon_thread_at_exit_then_the_next_pull_fetches_only_what_is_missing(http_server, http_dir,
                                                                                          tmp_path):
    path, tensors = write_checkpoint(http_dir / "model.safetensors", seed=22, count=10)
    url = http_server.url_for(path)
    rule = http_server.faults._add(HangAfter(pattern="*model.safetensors", after=8))
    dest = tmp_path / "staged"
    status, out, err, ended = finish(start(PULL_DAEMON, url, str(dest)))
    assert (status, err) == (0, ""), err[-2000:]
    assert "pulled" not in out and ended - left_at(out) < 3.0, out
    assert rule.fired >= 1
    seen = len(http_server.requests())
    time.sleep(0.3)
    assert len(http_server.requests()) == seen, "requests reached the server after the process was gone"
    assert not (dest / "model.safetensors").exists(), "a file under its final name after an unfinished pull"
    journals = list(dest.rglob("*.journal"))
    assert len(journals) == 1, sorted(dest.rglob("*"))
    written = [tuple(map(int, line.split())) for line in journals[0].read_text().splitlines()[1:]]
    assert written, "no chunk was journaled before exit: the test proved nothing"

    http_server.reset()
    fastload.pull(url, to=dest, config=fastload.LoadConfig(chunk_bytes=64 * 1024))
    assert_bit_exact(load_file(str(dest / "model.safetensors")), tensors)
    again = [(a, b) for a, b in _ranges(http_server.requests()) if b - a > 8]  # (the 8-byte first contact aside)
    overlap = [(a, b) for a, b in again for s, e in written if a < e and s < b]
    assert not overlap, f"the resumed pull fetched journaled bytes again: {overlap[:5]}"
    assert sum(b - a for a, b in again) == path.stat().st_size - sum(e - s for s, e in written)
    assert not list(dest.rglob("*.journal")) and not list(dest.rglob("*.incomplete"))


# -- SIGTERM -> SystemExit while the main thread iterates a stream --------------------------------------------------


SIGTERM_STREAM = """
import signal, sys, threading, time, fastload
signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # what k8s-aware services do
config = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=2, stall_timeout_s=30)
try:
    with fastload.stream(sys.argv[1], config=config) as s:
        for i, _ in enumerate(s):
            if i == 0:
                print("first", flush=True)
finally:
    print("threads", [t.name for t in threading.enumerate() if t is not threading.main_thread()], flush=True)
"""


def test_sigterm_handler_raising_systemexit_while_iterating_a_stream(http_server, http_dir):
    path, _ = write_checkpoint(http_dir / "model.safetensors", seed=23, count=10)
    rule = http_server.faults._add(HangAfter(pattern="*model.safetensors", after=8))
    proc = start(SIGTERM_STREAM, http_server.url_for(path))
    try:
        assert proc.stdout.readline() == "first\n"
        deadline = time.monotonic() + 20
        while rule.fired < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rule.fired >= 1, "the stream never reached the hanging server"
        time.sleep(0.2)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
    finally:
        status, out, err, ended = finish(proc, timeout=20)
    assert ended - sent < 3.0, f"{ended - sent:.1f} s from SIGTERM to the end of the process"
    assert status == 143 and "threads []" in out, (status, out, err[-2000:])
    assert err == "", err[-2000:]
    seen = len(http_server.requests())
    time.sleep(0.2)
    assert len(http_server.requests()) == seen
