"""Second audit of the error paths (d0d1826, on top of 8a7e800 / 1238da5 / 5312aad): ``runner.shed`` and
``runner.boundary``, the ``CancelWatch`` of a sync call made from a coroutine, and ``BufferPool.drain`` at the
end of ``fetch.run_plan``.

Goes past test_error_paths_audit.py, test_failure_leaks_audit.py and test_session9_changes_audit.py:

- ``shed`` meeting what callers raise: an ``ExceptionGroup`` from ``progress`` caught with ``except*`` (with a
  member never raised, whose ``__traceback__`` is None), a caller's error class that has an ``exceptions``
  attribute of its own (a count, a list of messages), two failing ``aload`` calls in a ``TaskGroup`` whose group
  is kept;
- a kept error raised again later: same object, ``traceback.format_exception`` still names fastload's files and
  lines, ``sys.exc_info()`` right in the caller's ``except`` around it, and it still pickles;
- nested public calls: ``progress`` makes a load (and a ``plan``) that fails and is caught, then the outer load
  fails, while the caller handles an error of its own: that error's frames and the callback's keep their locals;
- ``from_pretrained`` failing in ``transformers`` after the weights streamed: the kept error keeps no tensors;
- ``CancelWatch``: other tasks do not run while a sync load blocks the loop; a stream iterator made in a
  coroutine and drained in a worker thread while the loop runs and cancels unrelated tasks; the cost of its
  snapshot per wait with thousands of idle tasks; Ctrl-C through ``loop.add_signal_handler`` (a subprocess);
- staging buffers (``dtype=`` stages every chunk on the CPU): none left alive after a successful load, a stream
  left early or a failed stream kept with its error, or a pull.

Real servers and files; nothing of fastload is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
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
from test_error_paths_audit import ONCE, CutLater, _frames, _stream, served  # noqa: F401 - served: a fixture
TESTS = Path(__file__).parent

#: ``except*`` is syntax of Python 3.11+: compiled at run time so that this file imports on 3.10 too.
_EXCEPT_STAR = """
def except_star(fn, first, second):
    got = ([], [])
    try:
        fn()
    except* first as group:
        got[0].append(group)
    except* second as group:
        got[1].append(group)
    return got
"""
_GROUPS: dict = {}
if sys.version_info >= (3, 11):
    exec(_EXCEPT_STAR, _GROUPS)  # noqa: S102 - a fixed snippet


def _format_error_file(directory: Path) -> Path:
    """A file whose header lacks what safetensors needs: a FormatError."""
    path = directory / "headerless.safetensors"
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]")
    return path


def _touching(path: Path):
    """A progress callback that changes the file's mtime once bytes landed: SourceChangedError mid-load."""
    def touch(done, total):
        if done:
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    return touch


CALLS = {
    "load": lambda src, dest, **kw: fastload.load(src, **kw),
    "aload": lambda src, dest, **kw: asyncio.run(fastload.aload(src, **kw)),
    "stream": lambda src, dest, **kw: _stream(src, **kw),
    "pull": lambda src, dest, **kw: fastload.pull(src, to=dest, **kw),
}


# -- shed and what callers raise --------------------------------------------------------------------------------


class Batch(Exception):
    """A caller's own error class that counts, or lists, what went wrong in an attribute named ``exceptions``
    (nothing to do with ExceptionGroup)."""

    def __init__(self, exceptions):
        super().__init__(f"{exceptions!r} failures")
        self.exceptions = exceptions


@pytest.mark.parametrize("how, value", [("load", 3), ("aload", ["w0 rejected", "w1 rejected"]),
                                        ("stream", {"w0": "nan"}), ("pull", [ValueError, KeyError])],
                         ids=["load-count", "aload-messages", "stream-dict", "pull-classes"])
def test_a_callers_error_with_an_exceptions_attribute_reaches_it_unchanged(how, value, served, tmp_path):
    """``progress`` raises the caller's ``Batch(exceptions=...)`` (a count, messages, a dict, exception
    classes): the call must end with that very error, not a TypeError / AttributeError from fastload's walk of
    the error (``shed`` treats any ``exceptions`` attribute as a group's members)."""
    url, _, tensors = served

    def progress(done, total):
        if done:
            raise Batch(value)

    with pytest.raises(BaseException) as caught:
        bounded(lambda: CALLS[how](url, tmp_path / "dest", config=QUICK, progress=progress), 10.0)
    assert type(caught.value) is Batch and caught.value.exceptions == value, \
        f"the caller's Batch error became {type(caught.value).__name__}: {caught.value}"
    assert_bit_exact(fastload.load(url, config=QUICK), tensors)


@pytest.mark.parametrize("how", ["load", "aload", "stream"])
def test_an_exception_group_from_progress_reaches_except_star_with_its_members_intact(how, served):
    """``progress`` raises an ``ExceptionGroup`` (its own checks, gathered) holding an error it raised and
    caught (its frames hold locals) and one never raised (``__traceback__`` None), with a cause never raised:
    the caller's ``except*`` clauses each get their part; the members' frames keep their locals; the next load
    works."""
    url, _, tensors = served

    def check_nan(done):
        where = f"at {done}"  # noqa: F841 - what a debugger would show
        raise ValueError("nan")

    def progress(done, total):
        if done:
            try:
                check_nan(done)
            except ValueError as exc:
                raised = exc
            never = KeyError("w3")
            never.__cause__ = LookupError("index")  # (never raised either)
            raise ExceptionGroup("checks failed", [raised, never])  # noqa: F821 - a builtin from 3.11

    assert sys.version_info >= (3, 11), "ExceptionGroup and except* need Python 3.11"
    value_groups, key_groups = _GROUPS["except_star"](
        lambda: bounded(lambda: CALLS[how](url, None, config=QUICK, progress=progress), 10.0), ValueError, KeyError)
    values = [e for g in value_groups for e in g.exceptions]
    keys = [e for g in key_groups for e in g.exceptions]
    assert [str(e) for e in values] == ["nan"] and [type(e) for e in keys] == [KeyError], (values, keys)
    helper = _frames(values[0])[-1]
    assert helper.f_code.co_name == "check_nan" and helper.f_locals.get("where", "").startswith("at "), \
        f"the member's frame lost its locals: {helper.f_locals}"
    assert keys[0].__traceback__ is None and isinstance(keys[0].__cause__, LookupError)
    assert_bit_exact(fastload.load(url, config=QUICK), tensors)


def test_two_failing_aloads_in_a_task_group_kept_as_a_group_keep_no_tensors(tmp_path):
    """A service loads two checkpoints at once in a ``TaskGroup``; both change under the load (and one is
    converted, so its chunks are staged). It keeps the ``ExceptionGroup`` it caught with ``except*``: no
    tensor of either load stays alive."""
    paths = [write_checkpoint(tmp_path / f"m{i}.safetensors", seed=i, count=8)[0] for i in range(2)]
    config = fastload.LoadConfig(chunk_bytes=256 * 1024, max_concurrency=2, host_buffer_bytes=1 << 20)

    async def both():
        async with asyncio.TaskGroup() as tg:
            for path, dtype in zip(paths, (None, torch.float16)):
                tg.create_task(fastload.aload(str(path), config=config, dtype=dtype, progress=_touching(path)))

    assert sys.version_info >= (3, 11), "asyncio.TaskGroup and except* need Python 3.11"
    before = live_tensor_bytes()
    kept, others = _GROUPS["except_star"](lambda: bounded(lambda: asyncio.run(both()), 10.0),
                                          fastload.SourceChangedError, asyncio.CancelledError)
    assert kept and not others, "the loads should have failed with SourceChangedError"
    grown = live_tensor_bytes() - before
    assert grown < 64 << 10, f"{grown} bytes of tensors alive while the group is kept"


# -- a kept error, raised again -----------------------------------------------------------------------------------


def test_a_kept_transfer_error_raised_again_later_still_formats_and_pickles(served, http_server):
    """A retry loop keeps a TransferError (its cause chain: the retry layer's, the socket's) and raises it
    again later (``raise last_error``) from its own code: the same object is caught, ``sys.exc_info()`` names
    it in the ``except``, ``traceback.format_exception`` works and still names fastload's files and line
    numbers (only their locals went), its message and attributes are intact and it pickles."""
    url, _, tensors = served
    path = "/" + url.split("/", 3)[3]
    http_server.faults._add(CutAfter(pattern=path))
    with pytest.raises(fastload.TransferError) as caught:
        fastload.load(url, config=ONCE.replace(http_engine="threads"))
    http_server.faults.clear()
    kept = caught.value
    first = "".join(traceback.format_exception(kept))
    ours = re.findall(r'File "[^"]*/fastload/([\w/]+\.py)", line (\d+)', first)
    assert ours, f"the formatted error names none of fastload's frames:\n{first}"

    def give_up():
        marker = "retry log"  # noqa: F841
        raise kept

    try:
        give_up()
    except fastload.TransferError as again:
        assert again is kept and sys.exc_info()[1] is kept
        text = "".join(traceback.format_exception(again))
        assert set(ours) <= set(re.findall(r'File "[^"]*/fastload/([\w/]+\.py)", line (\d+)', text)), text
        assert "give_up" in text and str(kept) in text
        assert _frames(again)[-len(_frames(again)) + 1].f_code.co_name == "give_up"
    clone = pickle.loads(pickle.dumps(kept))
    assert type(clone) is type(kept) and str(clone) == str(kept) and clone.url == kept.url
    assert clone.byte_range == kept.byte_range and clone.attempts == kept.attempts
    assert_bit_exact(fastload.load(url, config=QUICK), tensors)


# -- nested public calls -----------------------------------------------------------------------------------------


class Stop(Exception):
    pass


def _validate(state: dict) -> None:
    offending = sorted(state)  # noqa: F841 - what a debugger would show
    raise ValueError("checkpoint rejected")


async def _sync_load_in_coroutine(source, **kwargs):
    return fastload.load(source, **kwargs)


OUTER = {
    "load": lambda url, **kw: fastload.load(url, **kw),
    "load-in-coroutine": lambda url, **kw: asyncio.run(_sync_load_in_coroutine(url, **kw)),
    "aload": lambda url, **kw: asyncio.run(fastload.aload(url, **kw)),
}


@pytest.mark.parametrize("outer", sorted(OUTER))
def test_nested_failing_calls_leave_the_callers_handled_error_and_callback_intact(outer, served, http_server,
                                                                                 tmp_path):
    """While handling its own ValueError, the caller loads with a ``progress`` that, on its first call, tries a
    ``plan`` and a ``load`` of a broken file (both fail, both caught and kept), and later stops the load with
    its own error. Everything the caller owns keeps its locals: the handled error's frames, the callback's frame
    in the Stop; ``sys.exc_info()`` in the caller's ``except`` is still its ValueError; the inner errors are the
    right type and format; nothing is left running."""
    url, _, tensors = served
    broken = str(_format_error_file(tmp_path))
    inner: list[BaseException] = []

    def progress(done, total):
        if not done:
            return
        if not inner:
            for call in (fastload.plan, fastload.load):
                try:
                    call(broken, config=QUICK)
                except fastload.FormatError as exc:
                    inner.append(exc)
            return
        note = f"stopped at {done}"  # noqa: F841
        raise Stop("enough")

    with Leaks({http_server.port}) as leaks:
        try:
            _validate({"w0": 1, "w1": 2})
        except ValueError as handled:
            with pytest.raises(Stop) as caught:
                bounded(lambda: OUTER[outer](url, config=QUICK, progress=progress), 10.0)
            assert sys.exc_info()[1] is handled
            mine = handled
        leaks.check(grace_s=1.0)
    assert len(inner) == 2 and all(type(e) is fastload.FormatError for e in inner), inner
    for exc in inner:
        assert "headerless.safetensors" in "".join(traceback.format_exception(exc))
    helper = _frames(mine)[-1]
    assert helper.f_code.co_name == "_validate" and helper.f_locals.get("offending") == ["w0", "w1"], \
        f"the caller's own error lost its locals: {helper.f_locals}"
    last = _frames(caught.value)[-1]
    assert last.f_code.co_name == "progress" and "note" in last.f_locals, last.f_locals
    assert_bit_exact(fastload.load(url, config=QUICK), tensors)


# -- from_pretrained -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mismatched_llama(tmp_path_factory) -> Path:
    """A tiny Llama (~2.5 MB of float32 weights) whose checkpoint has one weight of the wrong shape: transformers
    refuses it after fastload streamed every weight."""
    from checkpoints import llama_config, llama_like_tensors, write_single

    directory = tmp_path_factory.mktemp("mismatched-llama")
    tensors = llama_like_tensors(hidden=128, intermediate=352, vocab=1024, dtype=torch.float32)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(352, 120)
    write_single(directory / "model.safetensors", tensors)
    config = {**llama_config(hidden=128, intermediate=352, vocab=1024), "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("kwargs", [{}, {"attn_implementation": "no-such-attention"}], ids=["shape", "kwarg"])
def test_from_pretrained_failing_in_transformers_keeps_no_tensors_in_the_kept_error(kwargs, mismatched_llama):
    """``from_pretrained`` whose weights streamed, then transformers refuses the model (a weight of the wrong
    shape, an unknown ``attn_implementation``): a service keeps the error. It may not keep the ~2.5 MB state
    dict (a real model's: gigabytes) that fastload built, through fastload's frame or the frames it called."""
    with contextlib.suppress(Exception):  # warm-up: transformers' imports and lazy caches
        fastload.from_pretrained(str(mismatched_llama), **kwargs)
    before = live_tensor_bytes()
    kept = []
    try:
        fastload.from_pretrained(str(mismatched_llama), **kwargs)
    except (RuntimeError, ValueError) as exc:
        kept.append(exc)
    assert kept, "transformers should have refused the model"
    grown = live_tensor_bytes() - before
    holders = [f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_code.co_name}" for f in _frames(kept[0])
               if any(isinstance(v, (dict, torch.nn.Module)) and v and "state_dict" in k
                      for k, v in f.f_locals.items())]
    assert grown < 64 << 10, f"{grown} bytes of tensors alive while the error is kept (held by {holders})"


# -- CancelWatch ---------------------------------------------------------------------------------------------------


def _slow(done: int, total: int) -> None:
    time.sleep(0.02)


def test_other_tasks_do_not_run_while_a_sync_load_blocks_the_loop(served):
    """The premise of the watch: a sync load called from a coroutine blocks its loop, so a busy task of the
    same loop makes no step until the load returns; it runs again right after, and the result is exact."""
    url, _, tensors = served
    ticks: list[float] = []

    async def ticker():
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0)

    async def main():
        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        start = len(ticks)
        began = time.monotonic()
        got = fastload.load(url, config=QUICK, progress=_slow)
        ended = time.monotonic()
        during = [t for t in ticks[start:] if began < t < ended]
        await asyncio.sleep(0.01)
        task.cancel()
        return got, during, len(ticks) - start

    got, during, after = bounded(lambda: asyncio.run(main()), 10.0)
    assert_bit_exact(got, tensors)
    assert during == [], f"{len(during)} steps of another task ran while the loop was blocked"
    assert after > 0


def test_a_stream_iterator_drained_in_a_worker_thread_ignores_unrelated_cancels(served):
    """An async service opens a stream in its coroutine, takes ``iter(s)`` there and drains it in a worker
    thread (``asyncio.to_thread``) so that its loop keeps serving; meanwhile its loop cancels idle tasks one
    by one (clients that went away). The loop is not blocked: those cancels are its ordinary business, not a
    Ctrl-C. The stream must hand out every tensor, not raise CancelledError into the worker."""
    url, _, tensors = served

    async def main():
        idle = [asyncio.create_task(asyncio.sleep(60)) for _ in range(200)]
        await asyncio.sleep(0)

        async def clients_leave():
            for task in idle:
                await asyncio.sleep(0.01)
                task.cancel()

        leaving = asyncio.create_task(clients_leave())
        try:
            with fastload.stream(url, config=QUICK, progress=_slow) as s:
                it = iter(s)
                return await asyncio.to_thread(lambda: dict(it))
        finally:
            leaving.cancel()
            for task in idle:
                task.cancel()

    try:
        got = bounded(lambda: asyncio.run(main()), 10.0)
    except asyncio.CancelledError:
        raise AssertionError("the stream drained in a worker thread was cancelled because an unrelated task "
                             "of the loop was") from None
    assert_bit_exact(got, tensors)


def test_a_stream_iterator_made_in_a_coroutine_works_after_its_loop_closed(served):
    """Setup code opens the stream and takes its iterator in a coroutine (``asyncio.run(open_weights())``),
    then the program drains it from plain sync code once that loop has ended and closed. No loop runs any
    more, so nothing can be cancelled: every tensor comes, not "Event loop is closed"."""
    url, _, tensors = served

    async def open_weights():
        s = fastload.stream(url, config=QUICK)
        s.__enter__()
        return s, iter(s)

    s, it = asyncio.run(open_weights())
    try:
        got = dict(it)  # (in this thread: the one the loop ran in)
    finally:
        s.close()
    assert_bit_exact(got, tensors)


def test_the_cancel_watch_costs_no_snapshot_of_every_task_per_tensor(tmp_path):
    """A coroutine iterates a sync stream of 1000 tiny tensors while its loop holds 5000 idle tasks (an async
    server's connections). Taking a snapshot of every task for each tensor makes the stream
    O(tensors x tasks): it must stay within a generous multiple of the same stream with no other task."""
    from checkpoints import write_single

    path = write_single(tmp_path / "tiny.safetensors", {f"t{i}": torch.full((4,), float(i)) for i in range(1000)})

    async def timed(idle_tasks: int) -> float:
        idle = [asyncio.create_task(asyncio.sleep(60)) for _ in range(idle_tasks)]
        await asyncio.sleep(0)
        began = time.perf_counter()
        with fastload.stream(str(path)) as s:
            count = sum(1 for _ in s)
        took = time.perf_counter() - began
        for task in idle:
            task.cancel()
        assert count == 1000
        return took

    asyncio.run(timed(0))  # warm-up
    alone = min(asyncio.run(timed(0)) for _ in range(2))
    crowded = asyncio.run(timed(5000))
    assert crowded < max(0.6, 8 * alone), \
        f"1000 tensors took {crowded:.2f} s beside 5000 idle tasks, {alone:.3f} s alone"


SIGNAL_HANDLER = r"""
import asyncio, json, os, signal, sys, threading, time
sys.path.insert(0, sys.argv[2])
from pathlib import Path
import fastload
from reliability_helpers import QUICK, write_checkpoint
path, tensors = write_checkpoint(Path(sys.argv[1]) / "m.safetensors", count=10)

def slow(done, total):
    time.sleep(0.03)

async def main(report):
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    loop.add_signal_handler(signal.SIGINT, lambda: (report.setdefault("handled", time.monotonic()), me.cancel()))
    got = []
    with fastload.stream(str(path), config=QUICK, progress=slow) as s:
        threading.Timer(0.3, lambda: (report.setdefault("sent", time.monotonic()),
                                      os.kill(os.getpid(), signal.SIGINT))).start()
        for name, tensor in s:
            got.append(name)
            await asyncio.sleep(0)
    report["all"] = len(got) == len(tensors)

report = {}
try:
    asyncio.run(main(report))
    report["outcome"] = "returned"
except asyncio.CancelledError:
    report["outcome"] = "cancelled"
report["stopped"] = time.monotonic()
report["threads"] = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
print(json.dumps(report))
"""


def test_ctrl_c_through_a_loop_signal_handler_stops_a_stream_whose_consumer_awaits(tmp_path):
    """An async app handles SIGINT itself (``loop.add_signal_handler``, as aiohttp's ``run_app`` does): its
    handler runs only when the loop runs, i.e. at the consumer's next ``await`` between tensors, and cancels
    the main task there. The stream stops promptly (within a tensor or two, not at its end), and no thread is
    left. In a subprocess: the signal is real."""
    out = subprocess.run([sys.executable, "-c", SIGNAL_HANDLER, str(tmp_path), str(TESTS)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["outcome"] == "cancelled" and "all" not in report, report
    assert report["stopped"] - report["sent"] < 1.5, f"stopped {report['stopped'] - report['sent']:.2f} s late"
    assert report["threads"] == [], report


# -- staging buffers ------------------------------------------------------------------------------------------------

STAGED = fastload.LoadConfig(chunk_bytes=64 * 1024, host_buffer_bytes=2 << 20, max_concurrency=4,
                             stall_timeout_s=2.0, retry=ONCE.retry)  # a pool of up to 32 buffers of 64 KiB


def _bytes_of(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("how", ["load", "stream-left-early", "stream-failed-kept", "pull", "pull-failed-kept"])
def test_staged_loads_leave_no_staging_buffer_alive(how, served, http_server, tmp_path):
    """``dtype=`` stages every float chunk in the pool on the CPU (as the CUDA sink does), and ``pull`` stages
    every chunk: once the call is over, what is alive is what the caller holds (its tensors, the stream object
    it kept, the error it kept), never a staging buffer (the pool here allows 2 MiB of them)."""
    url, file, _ = served
    path = "/" + url.split("/", 3)[3]
    before = live_tensor_bytes()
    held: list = []
    if how == "load":
        got = fastload.load(url, config=STAGED, dtype=torch.float16)
        held = list(got.values())
    elif how == "stream-left-early":
        with fastload.stream(url, config=STAGED, dtype=torch.float16) as s:
            for name, tensor in s:
                held = [tensor]
                break
        kept_stream = s  # a caller may keep it
    elif how == "stream-failed-kept":
        http_server.faults._add(CutLater(pattern=path, after=4))
        with pytest.raises(fastload.TransferError) as caught, \
                fastload.stream(url, config=STAGED, dtype=torch.float16) as s:
            for name, tensor in s:
                pass
        kept_stream, kept_error = s, caught.value  # noqa: F841
    else:
        if how == "pull-failed-kept":
            http_server.faults._add(CutLater(pattern=path, after=4))
        with contextlib.ExitStack() as stack:
            if how == "pull-failed-kept":
                caught = stack.enter_context(pytest.raises(fastload.TransferError))
            fastload.pull(url, to=tmp_path / "dest", config=STAGED)
        if how == "pull":
            assert (tmp_path / "dest" / "model.safetensors").read_bytes() == file.read_bytes()
        else:
            kept_error = caught.value  # noqa: F841
    grown = live_tensor_bytes() - before - _bytes_of(held)
    assert grown < 64 << 10, f"{grown} bytes of tensors alive beyond the {len(held)} the caller holds"
