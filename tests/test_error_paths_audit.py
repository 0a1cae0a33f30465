"""Audit of the error-path changes (5312aad..1238da5): ``UserInterrupt``/``guarded``/``boundary``/``shed`` in
``runner``, ``cancel_requested`` watching every task of the loop, ``_collect`` dropping finished tensors, and
``FileSink`` closing what it opened and typing its write/fsync failures.

Covers what test_failure_leaks_audit.py (KeyboardInterrupt from progress; one kept local SourceChangedError)
and test_session9_changes_audit.py (Ctrl-C under uvloop / wait_for) do not:

- ``SystemExit(code)`` from ``progress`` in load / aload / stream / pull / apull, and in the sync calls made
  from a running loop (asyncio and uvloop): the exit code survives, nothing is left running;
- thirty failed loads whose errors a retry loop keeps (HTTP fault server, both engines; S3 through the
  ``s3_proxy``): live tensor bytes stay flat (the aiohttp engine's TransferError has a ``__context__`` that
  differs from its ``__cause__``);
- what ``shed`` must leave alone: the caller's own errors (raised in the loop body of a stream, from the
  caller's ``progress``, or being handled when the failing call was made), a generator the caller still
  iterates, a frame of another thread still running;
- ``cancel_requested``: an unrelated task cancelled by ``call_soon_threadsafe`` while a sync load blocks the
  loop, and an unrelated task cancelled while a coroutine iterates a sync stream (awaiting between tensors);
- ``fastload pull`` (the CLI) into a real, small tmpfs: ENOSPC mid-file and at the journal's creation: a typed
  one-line error naming the path, no file presented as complete, no descriptor left, then, once space is
  freed, a pull that resumes (fetches only what is missing) and produces the exact file.

Real servers from conftest; nothing of fastload is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import os
import queue
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import botocore.session
import pytest
import torch
import uvloop
from reliability_helpers import (  # noqa: F401 - private_tmp: autouse
    QUICK,
    Leaks,
    assert_bit_exact,
    bounded,
    live_tensor_bytes,
    private_tmp,
    write_checkpoint,
)
from servers.faults import CutAfter

import fastload
from fastload.cli import main as cli_main

ONCE = QUICK.replace(retry=fastload.RetryConfig(max_attempts=2, backoff_base_s=0.001, backoff_max_s=0.002,
                                                deadline_s=10.0))


@dataclass(eq=False)
class CutLater(CutAfter):
    """Answer the first ``after`` matching GETs, then cut every later one right after its headers."""

    after: int = 3

    def wants_to_fire(self) -> bool:
        return self.seen > self.after


@pytest.fixture
def served(http_server, http_dir):
    """(url, file, tensors) of a ~1.2 MB checkpoint on the HTTP server."""
    file, tensors = write_checkpoint(http_dir / "model.safetensors")
    return http_server.url_for(file), file, tensors


def _format_error_file(directory: Path) -> Path:
    """A file whose header lacks what safetensors needs: a FormatError raised without a ``__cause__``."""
    path = directory / "headerless.safetensors"
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]")
    return path


# -- SystemExit / KeyboardInterrupt from progress ----------------------------------------------------------------


class Exit:
    """A progress callback that ends the program (``sys.exit(code)``) once bytes have landed."""

    def __init__(self, code):
        self.code = code

    def __call__(self, done: int, total: int) -> None:
        if done > 0:
            raise SystemExit(self.code)


async def _sync_load_in_coroutine(source, **kwargs):
    return fastload.load(source, **kwargs)


async def _sync_stream_in_coroutine(source, **kwargs):
    with fastload.stream(source, **kwargs) as s:
        return dict(s)


def _stream(source, **kwargs):
    with fastload.stream(source, **kwargs) as s:
        return dict(s)


CALLS = {
    "load": lambda url, dest, **kw: fastload.load(url, **kw),
    "aload": lambda url, dest, **kw: asyncio.run(fastload.aload(url, **kw)),
    "stream": lambda url, dest, **kw: _stream(url, **kw),
    "pull": lambda url, dest, **kw: fastload.pull(url, to=dest, **kw),
    "apull": lambda url, dest, **kw: asyncio.run(fastload.apull(url, to=dest, **kw)),
    "load-in-running-loop": lambda url, dest, **kw: asyncio.run(_sync_load_in_coroutine(url, **kw)),
    "stream-in-running-loop": lambda url, dest, **kw: asyncio.run(_sync_stream_in_coroutine(url, **kw)),
    "uvloop-load-in-running-loop": lambda url, dest, **kw: uvloop.run(_sync_load_in_coroutine(url, **kw)),
    "uvloop-aload": lambda url, dest, **kw: uvloop.run(fastload.aload(url, **kw)),
    "uvloop-apull": lambda url, dest, **kw: uvloop.run(fastload.apull(url, to=dest, **kw)),
}


@pytest.mark.parametrize("how", sorted(CALLS))
@pytest.mark.parametrize("code", [3, "shutting down", None])
def test_system_exit_from_progress_keeps_its_code(how, code, served, http_server, tmp_path):
    """``sys.exit(code)`` in ``progress`` ends the call with that very SystemExit (its ``code`` kept: a process
    supervisor reads it), promptly, and the load's threads and sockets go with it."""
    url, _, _ = served
    with Leaks({http_server.port}, watch=[tmp_path]) as leaks:
        with pytest.raises(SystemExit) as caught:
            bounded(lambda: CALLS[how](url, tmp_path / "dest", config=QUICK, progress=Exit(code)), 5.0)
        assert type(caught.value) is SystemExit and caught.value.code == code, repr(caught.value)
        leaks.watch = []  # (a pull leaves its unfinished file to resume: by design)
        leaks.check(grace_s=1.0)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_keyboard_interrupt_from_progress_of_a_load_inside_a_running_loop(loop, served, http_server):
    """Jupyter-style: a sync load from a coroutine whose progress raises KeyboardInterrupt: KeyboardInterrupt
    (not UserInterrupt, not CancelledError) at once, the private loop thread gone, and the outer loop still
    usable afterwards."""
    url, _, tensors = served

    def ctrl_c(done, total):
        if done:
            raise KeyboardInterrupt

    async def main():
        try:
            fastload.load(url, config=QUICK, progress=ctrl_c)
        except KeyboardInterrupt as exc:
            caught = exc
        else:
            raise AssertionError("the load did not raise")
        await asyncio.sleep(0.01)  # the loop still runs
        return caught, fastload.load(url, config=QUICK)

    runner = asyncio.run if loop == "asyncio" else uvloop.run
    with Leaks({http_server.port}) as leaks:
        start = time.monotonic()
        caught, again = bounded(lambda: runner(main()), 10.0)
        assert type(caught) is KeyboardInterrupt
        assert time.monotonic() - start < 5.0
        leaks.check(grace_s=1.0)
    assert_bit_exact(again, tensors)


# -- kept errors must not keep the failed loads' memory -----------------------------------------------------------


def _keep_errors(fail, n: int = 30) -> tuple[list[BaseException], int]:
    """``fail()`` ``n`` times, each error kept (a retry loop's log); the live tensor bytes grown meanwhile."""
    with contextlib.suppress(fastload.FastloadError):  # warm-up: imports, lazy caches
        fail()
    before = live_tensor_bytes()
    kept = []
    for _ in range(n):
        try:
            fail()
        except fastload.FastloadError as exc:
            kept.append(exc)
    assert len(kept) == n, f"only {len(kept)} of {n} loads failed"
    return kept, live_tensor_bytes() - before


@pytest.mark.parametrize("how", ["load-threads", "load-aiohttp", "stream-aiohttp", "convert-threads", "pull-threads",
                                 "pull-aiohttp"])
def test_thirty_kept_http_errors_keep_no_tensors(how, served, http_server, tmp_path):
    """A service retries a load whose server cuts every GET after the first few, and keeps each error. The
    30 errors may not hold the failed loads' outputs or staging buffers (each load allocates ~1.2 MB; with
    ``dtype=`` and in a pull, chunks are staged in a pool of ``host_buffer_bytes``: 512 KiB here, 256 MiB by
    default, pinned with CUDA)."""
    url, _, tensors = served
    kind, engine = how.split("-")
    config = ONCE.replace(http_engine=engine, max_concurrency=2)
    attempt = itertools.count()

    def fail():
        http_server.faults.clear()
        http_server.faults._add(CutLater(pattern="/" + url.split("/", 3)[3], after=3))
        if kind == "load":
            fastload.load(url, config=config)
        elif kind == "convert":
            fastload.load(url, config=config, dtype=torch.float16)
        elif kind == "stream":
            _stream(url, config=config)
        else:
            fastload.pull(url, to=tmp_path / f"dest{next(attempt)}", config=config)  # (fresh: none resumes)

    kept, grown = _keep_errors(fail)
    assert all(isinstance(e, fastload.TransferError) for e in kept), {type(e).__name__ for e in kept}
    assert grown < 64 << 10, (f"{grown} bytes of tensors alive while 30 errors are kept "
                              f"({grown / 30 / 1024:.0f} KiB per error); e.g. {kept[0]!r:.200}")
    http_server.faults.clear()
    assert_bit_exact(fastload.load(url, config=config), tensors)


def test_thirty_kept_s3_errors_keep_no_tensors(s3_server, s3_bucket, s3_proxy, tmp_path):
    """The same against S3 (aiohttp engine; one botocore session, as a service keeps) through a proxy that cuts
    every GET after the first few."""
    file, tensors = write_checkpoint(tmp_path / "m.safetensors")
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())
    source = f"s3://{s3_bucket}/m.safetensors"
    s3 = fastload.S3Options(endpoint_url=s3_proxy.url, session=botocore.session.Session())
    config = ONCE.replace(http_engine="aiohttp", max_concurrency=2, s3=s3)

    def fail():
        s3_proxy.faults.clear()
        s3_proxy.faults._add(CutLater(after=3))
        fastload.load(source, config=config)

    kept, grown = _keep_errors(fail)
    assert grown < 64 << 10, (f"{grown} bytes of tensors alive while 30 errors are kept "
                              f"({grown / 30 / 1024:.0f} KiB per error); e.g. {kept[0]!r:.200}")
    s3_proxy.faults.clear()
    assert_bit_exact(fastload.load(source, config=config), tensors)


def test_an_error_whose_cause_and_context_form_a_cycle_ends_the_load(served):
    """``progress`` raises an error whose ``__cause__`` and ``__context__`` chain back to itself: the load ends
    with that error, promptly (no endless walk of the chain), and the next load works."""
    url, _, tensors = served

    class Looped(Exception):
        pass

    def progress(done, total):
        if done:
            a, b, c = Looped("a"), ValueError("b"), KeyError("c")
            a.__cause__, a.__context__ = b, c
            b.__context__, c.__cause__ = a, a
            raise a

    with pytest.raises(Looped, match="a"):
        bounded(lambda: fastload.load(url, config=QUICK, progress=progress), 5.0)
    assert_bit_exact(fastload.load(url, config=QUICK), tensors)


# -- what shed must leave alone ---------------------------------------------------------------------------------


class ModelRejected(Exception):
    pass


def _reject(name, tensor):
    why = f"{name} has {tensor.numel()} elements"  # noqa: F841 - a local a debugger shows
    raise ModelRejected(name)


def _frames(exc: BaseException) -> list:
    tb, out = exc.__traceback__, []
    while tb is not None:
        out.append(tb.tb_frame)
        tb = tb.tb_next
    return out


def test_an_error_raised_in_a_stream_loop_body_is_untouched(served):
    """The caller's own error from its loop body reaches it as raised: same object, its traceback's frames (the
    loop's and the helper's) with their locals, no context added."""
    url, _, _ = served
    marker = object()
    with pytest.raises(ModelRejected) as caught, fastload.stream(url, config=QUICK) as s:
        for name, tensor in s:
            keep_me = marker  # noqa: F841
            _reject(name, tensor)
    frames = _frames(caught.value)
    names = [f.f_code.co_name for f in frames]
    assert names[-1] == "_reject", names
    assert "why" in frames[-1].f_locals and "tensor" in frames[-1].f_locals, frames[-1].f_locals
    mine = [f for f in frames if f.f_code.co_name == "test_an_error_raised_in_a_stream_loop_body_is_untouched"]
    assert mine and mine[0].f_locals.get("keep_me") is marker
    assert caught.value.__context__ is None and caught.value.__cause__ is None


@pytest.mark.parametrize("how", ["load", "stream", "aload"])
def test_the_callers_own_error_from_progress_keeps_its_frames(how, served):
    """``progress`` raises the caller's own error (a bug in it, or a deliberate stop): it reaches the caller
    unchanged, and the callback's frame still has its locals (pdb post-mortem, pytest's --showlocals). Only
    the load's own frames are fastload's to clear."""
    url, _, _ = served

    class Stop(Exception):
        pass

    def progress(done, total):
        note = f"stopped at {done} of {total}"  # noqa: F841
        if done:
            raise Stop("enough")

    with pytest.raises(Stop) as caught:
        CALLS[how](url, None, config=QUICK, progress=progress)
    last = _frames(caught.value)[-1]
    assert last.f_code.co_name == "progress"
    assert {"done", "total", "note"} <= set(last.f_locals), f"the callback's locals were cleared: {last.f_locals}"


def _validate(state: dict) -> None:
    offending = sorted(state)  # noqa: F841 - what a debugger would show
    raise ValueError("checkpoint rejected")


def test_a_load_failing_while_the_caller_handles_its_own_error_leaves_that_error_intact(tmp_path):
    """Fallback code: the caller's validation fails, and in its ``except`` it loads another checkpoint, which
    fails too. The first error is the caller's, still being handled: its traceback's frames keep their locals."""
    broken = _format_error_file(tmp_path)
    with pytest.raises(ValueError) as caught:
        try:
            _validate({"w0": 1, "w1": 2})
        except ValueError:
            with pytest.raises(fastload.FormatError):
                fastload.load(str(broken), config=QUICK)
            raise
    helper = _frames(caught.value)[-1]
    assert helper.f_code.co_name == "_validate"
    assert helper.f_locals.get("offending") == ["w0", "w1"], \
        f"the caller's own error lost its locals to the failed load: {helper.f_locals}"


def test_a_failed_load_does_not_close_a_generator_the_caller_still_iterates(tmp_path):
    """A results-or-errors generator (``yield exc`` from inside its ``except``, as batch tools do) hands the
    caller an error that the caller raises to use its own ``except`` clauses; handling it, the caller tries a
    load that fails. The generator's frame is in that error's traceback, suspended: clearing it (Python 3.11:
    ``frame.clear()`` finalizes a suspended generator) would close the caller's generator behind its back."""
    broken = _format_error_file(tmp_path)

    def results(items):
        for item in items:
            try:
                yield int(item)
            except ValueError:
                pass
            try:
                int("not a number " + item)
            except ValueError as exc:
                yield exc

    seen = []
    it = results(["1", "2", "3"])
    for item in it:
        if isinstance(item, Exception):
            try:
                raise item
            except ValueError:
                with pytest.raises(fastload.FormatError):
                    fastload.load(str(broken), config=QUICK)
        else:
            seen.append(item)
    assert seen == [1, 2, 3], f"the caller's generator was closed after {seen}"


def test_frames_of_another_thread_still_running_are_left_alone(tmp_path):
    """A worker thread hands over the error it caught and keeps running in the frame that caught it; the
    caller raises that error and, handling it, makes a load that fails. The worker's frame (still running)
    keeps its locals, and the worker finishes normally."""
    broken = _format_error_file(tmp_path)
    handed, go_on, result = queue.Queue(), threading.Event(), {}

    def worker():
        progress = [1, 2, 3]
        try:
            raise LookupError("worker")
        except LookupError as exc:
            handed.put(exc)
        go_on.wait(5)
        result["progress"] = list(progress)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    error = handed.get(timeout=5)
    try:
        raise error
    except LookupError:
        with pytest.raises(fastload.FormatError):
            fastload.load(str(broken), config=QUICK)
    go_on.set()
    thread.join(5)
    assert result.get("progress") == [1, 2, 3], result


# -- cancel_requested: only the caller's own cancellation -------------------------------------------------------


def _slow(done: int, total: int) -> None:
    time.sleep(0.02)


def test_an_unrelated_task_cancelled_via_call_soon_threadsafe_does_not_cancel_a_sync_load(served):
    """While a sync load blocks the loop, another thread cancels an unrelated task the thread-safe way: the
    cancel only runs once the loop runs again, so the load completes; the unrelated task is then cancelled."""
    url, _, tensors = served

    async def main():
        loop = asyncio.get_running_loop()
        other = asyncio.create_task(asyncio.sleep(60))
        await asyncio.sleep(0)
        timer = threading.Timer(0.05, lambda: loop.call_soon_threadsafe(other.cancel))
        timer.start()
        got = fastload.load(url, config=QUICK, progress=_slow)
        timer.join()
        with contextlib.suppress(asyncio.CancelledError):
            await other
        return got, other.cancelled()

    got, cancelled = bounded(lambda: asyncio.run(main()), 10.0)
    assert_bit_exact(got, tensors)
    assert cancelled


@pytest.mark.parametrize("how", ["cancel", "wait_for-timeout"])
def test_a_coroutine_streaming_survives_an_unrelated_tasks_cancellation(how, served):
    """An async service iterates a sync stream from a coroutine and awaits between tensors (to keep its loop
    responsive); meanwhile another task of the loop is cancelled (a client went away) or its own
    ``asyncio.wait_for`` times out. That is not a Ctrl-C and not this coroutine's cancel: the stream must go
    on to its end."""
    url, _, tensors = served
    gate, held = threading.Event(), []

    def half_then_slower(done: int, total: int) -> None:
        # Half-way, the load waits until the other task's cancel has happened, then takes longer than the
        # stream's poll for cancellation to bring its next tensors (a big shard, a slow disk).
        if done >= total // 2 and not held:
            held.append(gate.wait(5))
            time.sleep(0.15)

    async def main():
        if how == "cancel":
            other = asyncio.create_task(asyncio.sleep(60))
        else:
            other = asyncio.create_task(asyncio.wait_for(asyncio.sleep(60), 0.02))
        await asyncio.sleep(0)
        got = {}
        with fastload.stream(url, config=QUICK, progress=half_then_slower) as s:
            for name, tensor in s:
                got[name] = tensor
                if len(got) == 1:
                    if how == "cancel":
                        other.cancel()
                    while not other.done():
                        await asyncio.sleep(0.005)
                    gate.set()
                await asyncio.sleep(0)
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await other
        return got

    try:
        got = bounded(lambda: asyncio.run(main()), 10.0)
    except asyncio.CancelledError:
        raise AssertionError("the stream was cancelled because another task of its loop was") from None
    assert_bit_exact(got, tensors)


# -- fastload pull into a full tmpfs (ENOSPC) ---------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 2 MiB tmpfs (we run as root), unmounted at the end."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], check=True,
                   capture_output=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True, capture_output=True)


def _fds_under(directory: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            out.append(target)
    return out


def _cli_pull(url: str, dest: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = cli_main(["pull", url, "--to", str(dest), "--chunk-size", "64KiB", "--concurrency", "2"])
    return status, err.getvalue()


@pytest.mark.parametrize("free_kib", [512, 0])
def test_cli_pull_into_a_full_tmpfs_then_resumes_exactly(free_kib, small_tmpfs, http_server, http_dir):
    """``fastload pull`` of a 1.8 MB file into a 2 MiB tmpfs already holding a filler file: with 512 KiB free the
    disk fills mid-file; with none left, at once (the journal's first line). Exit status 1 and one line naming
    the path and the disk's complaint, no file under its final name, no descriptor left open under the mount.
    Once the filler is removed, the next pull completes (fetching less than the whole file when some had been
    written) and the file is the source's, byte for byte."""
    file, _ = write_checkpoint(http_dir / "model.safetensors", count=8)
    url = http_server.url_for(file)
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * ((2048 - free_kib) * 1024 - (4096 if free_kib == 0 else 0)))
    if free_kib == 0:  # the last pages too
        with contextlib.suppress(OSError), open(small_tmpfs / "filler2", "wb") as f:
            f.write(b"\0" * 65536)
    dest = small_tmpfs / "dest"
    status, err = bounded(lambda: _cli_pull(url, dest), 10.0)
    assert status == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastload: error: "), err
    assert "No space left on device" in lines[0] and str(dest) in lines[0], lines[0]
    assert not (dest / "model.safetensors").exists(), "a half-written file was presented as complete"
    assert _fds_under(small_tmpfs) == [], "descriptors left open under the full disk"

    filler.unlink()
    (small_tmpfs / "filler2").unlink(missing_ok=True)
    before = len(http_server.log)
    status, err = bounded(lambda: _cli_pull(url, dest), 10.0)
    assert status == 0, err
    assert (dest / "model.safetensors").read_bytes() == file.read_bytes()
    fetched = sum(int(r.range.split("=")[1].split("-")[1]) - int(r.range.split("=")[1].split("-")[0]) + 1
                  for r in http_server.log[before:] if r.method == "GET" and r.range)
    size = file.stat().st_size
    if free_kib:
        assert fetched < size - 256 * 1024, f"the resumed pull fetched {fetched} of {size} bytes again"
    assert _fds_under(small_tmpfs) == []
    left = [p for p in (dest / ".fastload").rglob("*") if p.is_file() and p.name != "pull.lock"
            and "meta" not in p.parts]
    assert not left, f"temporary files left after the pull completed: {left}"
