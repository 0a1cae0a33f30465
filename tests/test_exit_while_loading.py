"""A process that exits while a load is still running, in a stream left open or in a daemon thread.

Python stops daemon threads where they next take the GIL; one stopped inside torch (a dtype conversion, an
allocation, a free) aborts the whole process with "terminate called without an active exception", status 134.
Before the fix, each of these scripts died that way on nearly every run (6 of 6 measured for both). Each runs
three times here: exit status 0, nothing on stderr, and quick."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest
import torch
from safetensors.torch import save_file

import fastload


@pytest.fixture(scope="module")
def converting(tmp_path_factory) -> str:
    """160 MB of float32: long enough a load that exit finds its conversions running."""
    path = tmp_path_factory.mktemp("exit") / "m.safetensors"
    save_file({f"t{i:02d}": torch.full((1_000_000,), float(i)) for i in range(40)}, str(path))
    return str(path)


def _exits_cleanly(code: str, runs: int = 3) -> None:
    for _ in range(runs):
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                             timeout=60)
        took = time.monotonic() - started
        assert (out.returncode, out.stdout, out.stderr) == (0, "leaving\n", ""), out.stderr[-2000:]
        assert took < 20, f"exit took {took:.1f} s"


def test_a_stream_left_open_while_converting_lets_the_process_exit(converting):
    _exits_cleanly(f"""
        import fastload, torch
        s = fastload.stream({converting!r}, dtype=torch.bfloat16).__enter__()
        next(iter(s))
        print("leaving", flush=True)
    """)


def test_a_stream_iterated_by_a_daemon_thread_at_exit_ends_silently(converting):
    """The daemon thread still iterating gets no cancellation to print: it stops with the interpreter."""
    _exits_cleanly(f"""
        import threading, fastload, torch
        s = fastload.stream({converting!r}, dtype=torch.float64).__enter__()
        first = threading.Event()
        def consume():
            for _ in s:
                first.set()
        threading.Thread(target=consume, daemon=True).start()
        first.wait(30)
        print("leaving", flush=True)
    """)


def test_a_daemon_thread_in_the_middle_of_a_load_lets_the_process_exit(converting):
    """A service preloading weights in a daemon thread is told to stop: the load is cancelled at exit, and the
    thread neither returns nor prints a cancellation (as any daemon thread at exit)."""
    _exits_cleanly(f"""
        import threading, time, fastload, torch
        started = threading.Event()
        def preload():
            out = fastload.load({converting!r}, dtype=torch.float64,
                                progress=lambda done, total: done and started.set())
            out.clear()
            print("the load returned", flush=True)
        threading.Thread(target=preload, daemon=True).start()
        started.wait(30)
        print("leaving", flush=True)
    """)


def test_exit_hooks_do_not_pile_up_over_many_loads_and_streams(tmp_path):
    """Each load made in a thread, and each stream, registers its exit hook only while it runs."""
    path = tmp_path / "s.safetensors"
    save_file({"a": torch.arange(10.0)}, str(path))
    before = len(weakref.finalize._registry)
    for _ in range(20):
        with fastload.stream(str(path)) as s:
            list(s)
        with fastload.stream(str(path)) as s:  # left early
            next(iter(s))
        thread = threading.Thread(target=fastload.load, args=(str(path),))
        thread.start()
        thread.join()
    assert len(weakref.finalize._registry) == before


def test_a_load_in_a_thread_that_fails_still_raises_its_error(tmp_path):
    """Not at exit, the thread's load behaves as before: its error comes out, typed."""
    got: list[BaseException] = []

    def body():
        try:
            fastload.load(str(tmp_path / "missing.safetensors"))
        except BaseException as exc:  # noqa: BLE001
            got.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(30)
    assert len(got) == 1 and isinstance(got[0], fastload.SourceNotFoundError), got


def test_a_shutdown_hook_joining_the_streams_consumer_thread_returns(converting):
    """A service's own atexit handler (registered before torch and fastload are imported, so it runs after
    fastload's exit hooks) joins the thread that iterates a stream: the thread has ended (SystemExit, quiet), and
    the join returns at once instead of hanging or timing out."""
    code = f"""
        import atexit, threading, time
        consumer = []

        def stop_service():
            began = time.monotonic()
            consumer[0].join(5)
            print("ended" if not consumer[0].is_alive() else "alive", round(time.monotonic() - began, 1))

        atexit.register(stop_service)
        import fastload, torch
        s = fastload.stream({converting!r}, dtype=torch.float64).__enter__()
        first = threading.Event()

        def consume():
            for _ in s:
                first.set()

        consumer.append(threading.Thread(target=consume, daemon=True))
        consumer[0].start()
        first.wait(30)
        print("leaving", flush=True)
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stderr) == (0, ""), out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "leaving" and lines[1].split()[0] == "ended", out.stdout
    assert float(lines[1].split()[1]) < 1.0, out.stdout
