"""Resources and recovery after failed loads: a service runs fastload for days and its loads fail.

Each kind of failure is repeated (~20 times) in one process and must leave nothing behind: no thread (by
``threading.enumerate`` and by ``/proc/self/task``), no open descriptor (``/proc/self/fd``, sockets included), no
event loop running or set as the thread's current one, no temporary file in the destination or temp dir, no
live tensor, no resident-memory growth beyond noise (medians, in a child process); the error is a typed fastload
error naming the URL (and the byte range where there is one), and the next load of the same source works.

Failure kinds: a missing source (local, HTTP 404, S3 NoSuchKey), a malformed or truncated file, a server that
drops the connection mid-body, one that stalls, one whose object is replaced mid-load, unknown ``names=``, an
invalid config, a consumer raising inside ``stream``, ``KeyboardInterrupt`` from the progress callback (load,
stream, a sync load inside a running loop, aload, pull), ``pull`` failures (a destination that cannot be written,
a source that vanishes mid-pull) and ``from_pretrained`` on a broken checkpoint.

Complements test_faults.py (one failure each, its leak check), test_cancel.py and
test_api_concurrency_corners.py (Ctrl-C as a signal), test_process_robustness_audit.py (fifty *successful*
loads' RSS). Real servers from conftest; nothing of fastload is mocked.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from reliability_helpers import (
    QUICK,
    assert_bit_exact,
    bounded,
    client_sockets,
    live_tensor_bytes,
    write_checkpoint,
)
from servers.faults import FailWith

import fastload

REPEAT = 20
#: Fail at once where a failure is retried: two attempts, no wait between them.
ONCE = QUICK.replace(retry=fastload.RetryConfig(max_attempts=2, backoff_base_s=0.001, backoff_max_s=0.002,
                                                deadline_s=10.0))


# -- what a failed load could leave behind -------------------------------------------------------------------


def _threads() -> list[str]:
    """Live threads, minus the in-process test servers' per-connection handlers (not the loader's)."""
    return sorted(t.name for t in threading.enumerate() if t.is_alive() and "process_request" not in t.name)


def _fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    return out


def _current_loop():
    """The main thread's current event loop as ``asyncio.set_event_loop`` set it (None when unset)."""
    return getattr(asyncio.get_event_loop_policy()._local, "_loop", None)


class Snapshot:
    def __init__(self, ports: set[int], watch: list[Path]):
        self.threads = _threads()
        self.tasks = len(os.listdir("/proc/self/task"))
        self.fds = _fds()
        self.sockets = len(client_sockets(ports))
        self.files = sorted(str(p) for d in watch if d.is_dir() for p in d.rglob("*"))

    def extra_over(self, base: Snapshot) -> dict:
        """What this snapshot holds beyond ``base`` (empty when nothing)."""
        out = {}
        if len(self.threads) > len(base.threads):
            out["threads"] = sorted((Counter(self.threads) - Counter(base.threads)).elements())
        if self.tasks > base.tasks:
            out["tasks (/proc/self/task)"] = self.tasks - base.tasks
        if len(self.fds) > len(base.fds):
            out["fds"] = sorted(set(self.fds.values()) - set(base.fds.values()))[:10] or len(self.fds) - len(base.fds)
        if self.sockets > base.sockets:
            out["client sockets"] = self.sockets - base.sockets
        if new := sorted(set(self.files) - set(base.files)):
            out["files"] = new[:10]
        return out


def _settled(ports: set[int], watch: list[Path], grace_s: float = 0.5) -> Snapshot:
    """A snapshot once thread and descriptor counts stop moving (the servers' handlers finishing a reply)."""
    deadline = time.monotonic() + grace_s
    snap = Snapshot(ports, watch)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        again = Snapshot(ports, watch)
        if (again.tasks, len(again.fds)) == (snap.tasks, len(snap.fds)):
            return again
        snap = again
    return snap


class Complaints(logging.Handler):
    """The first line of each warning or error logged, as text (no record, no traceback kept)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().splitlines()[0][:200])


def repeat_failing(fail, check, *, n: int = REPEAT, ports=(), watch=(), bound_s: float = 10.0,
                   recover=None, tensors: bool = False) -> list[SimpleNamespace]:
    """Call ``fail(i)`` ``n`` times (after two warm-up calls); each must raise, ``check(exc)`` judges the error.
    Afterwards nothing may be left over the baseline (``tensors``: no tensor alive either, for failures after the
    outputs were allocated); then ``recover()`` (a good load) must work."""
    ports, watch = set(ports), [Path(w) for w in watch] + [Path(tempfile.gettempdir())]
    sentinel = asyncio.new_event_loop()  # a service's own loop, set as current and not running
    asyncio.set_event_loop(sentinel)
    # asyncio's own complaints ("Task was destroyed but it is pending!", "exception was never retrieved"): kept
    # as text here, not passed on to pytest's log capture, whose records would keep their tracebacks' frames
    # (and the tensors these point at) alive.
    asyncio_log, complaints = logging.getLogger("asyncio"), Complaints()
    propagate, asyncio_log.propagate = asyncio_log.propagate, False
    asyncio_log.addHandler(complaints)
    try:
        for i in range(2):
            try:
                bounded(lambda i=i: fail(i), bound_s)
            except BaseException:  # noqa: BLE001, S110 - warm-up: imports, lazy caches
                pass
        tensor_bytes = live_tensor_bytes() if tensors else 0
        base = _settled(ports, watch, grace_s=1.0)
        complaints.messages.clear()
        errors = []
        for i in range(n):
            error = None
            try:
                bounded(lambda i=i: fail(i), bound_s)
            except AssertionError as exc:
                if "did not finish" in str(exc):
                    raise AssertionError(f"failure {i + 1} of {n} hung: {exc}") from None
                error = exc
            except BaseException as exc:  # noqa: BLE001 - judged by check
                error = exc
            if error is None:
                raise AssertionError(f"call {i + 1} of {n} did not fail")
            check(error)
            # Kept as a summary: an exception's traceback holds the frames it went through (what they pointed at
            # stays alive while the caller keeps the error), which is no leak of the load's.
            errors.append(SimpleNamespace(type=type(error), message=str(error),
                                          attempts=getattr(error, "attempts", None)))
            del error
            assert asyncio._get_running_loop() is None
            assert _current_loop() is sentinel, "a failed load changed the thread's current event loop"
        deadline = time.monotonic() + 3.0
        while (extra := Snapshot(ports, watch).extra_over(base)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not extra, f"after {n} failures, left over the baseline: {extra}"
        grown = live_tensor_bytes() - tensor_bytes if tensors else 0
        assert grown <= 0, f"{grown} bytes of tensors stayed alive after {n} failed loads"
        assert not complaints.messages, f"asyncio complained: {sorted(set(complaints.messages))[:5]}"
    finally:
        asyncio_log.removeHandler(complaints)
        asyncio_log.propagate = propagate
        asyncio.set_event_loop(None)
        sentinel.close()
    if recover is not None:
        recover()
    return errors


def typed(kind: type, *names: str, byte_range: bool = False):
    """A check: ``kind``, a fastload error, whose message names each of ``names`` (and a byte range)."""
    def check(exc: BaseException) -> None:
        assert isinstance(exc, kind) and isinstance(exc, fastload.FastloadError), f"{type(exc).__name__}: {exc}"
        for name in names:
            assert name in str(exc), f"{name!r} not in {exc}"
        if byte_range:
            assert re.search(r"bytes \[\d+, \d+\)", str(exc)), f"no byte range in: {exc}"
            assert exc.byte_range is not None and exc.url
    return check


# -- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture
def served(http_server, http_dir):
    """(url, file, tensors, path the faults match) of a ~1.2 MB checkpoint on the HTTP server."""
    file, tensors = write_checkpoint(http_dir / "model.safetensors")
    url = http_server.url_for(file)
    return url, file, tensors, "/" + url.split("/", 3)[3]


def _loads_again(source, tensors, config=QUICK):
    return lambda: assert_bit_exact(fastload.load(source, config=config), tensors)


# -- sources that are not there, not safetensors, or not whole ---------------------------------------------------


def test_missing_malformed_and_truncated_sources(http_server, served, serve, tmp_path):
    """Local and HTTP, in turn: a file that is not there (404), a header that is not JSON, data 1000 bytes
    shorter than the header says."""
    url, file, tensors, _ = served
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(b"{not json}").to_bytes(8, "little") + b"{not json}")
    short = tmp_path / "short.safetensors"
    short.write_bytes(file.read_bytes()[:-1000])
    missing = tmp_path / "gone" / "model.safetensors"
    cases = [(str(missing), fastload.SourceNotFoundError),
             (url.replace("model.", "absent."), fastload.SourceNotFoundError)]
    for path in (bad, short):
        cases += [(serve("local", path), fastload.FormatError), (serve("http", path), fastload.FormatError)]
    seen = []

    def check(exc):
        source, kind = cases[seen[-1] % len(cases)]
        typed(kind, source)(exc)

    def fail(i):
        seen.append(i)
        fastload.load(cases[i % len(cases)][0], config=QUICK)

    repeat_failing(fail, check, ports={http_server.port}, watch=[tmp_path], recover=_loads_again(url, tensors))


def test_s3_no_such_key(s3_server, s3_bucket, tmp_path):
    file, tensors = write_checkpoint(tmp_path / "model.safetensors", count=2)
    s3_server.put(s3_bucket, "ok/model.safetensors", file.read_bytes())
    url = f"s3://{s3_bucket}/missing/model.safetensors"
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1].strip("/"))
    repeat_failing(lambda i: fastload.load(url, config=QUICK), typed(fastload.SourceNotFoundError, url), n=6,
                   ports={port}, recover=_loads_again(f"s3://{s3_bucket}/ok/model.safetensors", tensors))


def test_unknown_names_and_invalid_arguments(http_server, served):
    url, _, tensors, _ = served
    calls = [lambda: fastload.load(url, names=["w0", "no.such.tensor"], config=QUICK),
             lambda: fastload.load(url, config=QUICK.replace(chunk_bytes=0)),
             lambda: fastload.load(url, device="tpu", config=QUICK)]
    seen = []

    def check(exc):
        typed(fastload.ConfigError, *[("no.such.tensor", url), (), ("tpu",)][seen[-1] % 3])(exc)

    def fail(i):
        seen.append(i)
        calls[i % 3]()

    repeat_failing(fail, check, ports={http_server.port}, recover=_loads_again(url, tensors))


# -- servers that misbehave mid-load ---------------------------------------------------------------------------
# Both HTTP engines in turn (LoadConfig.http_engine): "threads" on even calls, "aiohttp" on odd ones.

ENGINES = ("threads", "aiohttp")


def test_connection_dropped_mid_body(http_server, served):
    """Every GET is cut right after its headers: no byte ever comes, retries are exhausted."""
    url, _, tensors, path = served
    http_server.faults.cut_after(0, path=path)
    repeat_failing(lambda i: fastload.load(url, config=ONCE.replace(http_engine=ENGINES[i % 2])),
                   typed(fastload.FastloadError, url, byte_range=True), ports={http_server.port}, tensors=True)
    http_server.faults.clear()
    for engine in ENGINES:
        assert_bit_exact(fastload.load(url, config=QUICK.replace(http_engine=engine)), tensors)


def test_server_that_stalls_mid_body(http_server, served):
    """The server sends the headers and 2000 bytes of each read, then nothing (stall_timeout_s=0.05, one attempt)."""
    url, _, tensors, path = served
    config = QUICK.replace(stall_timeout_s=0.05, retry=fastload.RetryConfig(max_attempts=1, deadline_s=10.0))
    rule = http_server.faults.stall_after(2_000, path=path)
    errors = repeat_failing(lambda i: fastload.load(url, config=config.replace(http_engine=ENGINES[i % 2])),
                            typed(fastload.TransferError, url, byte_range=True), n=10, ports={http_server.port},
                            tensors=True)
    assert rule.fired >= 10 and all(e.attempts == 1 for e in errors)
    http_server.faults.clear()
    assert_bit_exact(fastload.load(url, config=config.replace(stall_timeout_s=2.0)), tensors)


def test_object_replaced_mid_load(http_server, http_dir, served):
    """After the size probe and the header, the object reports a new ETag (a stale If-Match gets 412). Each call
    reads its own copy: requests of the load before, still being answered, must not count on this one's rule."""
    url, file, tensors, _ = served
    copies = itertools.count()

    def fail(i):
        copy = http_dir / f"copy{next(copies)}.safetensors"
        copy.write_bytes(file.read_bytes())
        copy_url = http_server.url_for(copy)
        http_server.faults.change_etag_after(2, path="/" + copy_url.split("/", 3)[3])
        fastload.load(copy_url, config=QUICK.replace(http_engine=ENGINES[i % 2]))

    repeat_failing(fail, typed(fastload.SourceChangedError, "/copy", byte_range=True), ports={http_server.port},
                   tensors=True, recover=_loads_again(url, tensors))


# -- the caller's own failures -------------------------------------------------------------------------------


def test_consumer_exception_inside_stream(http_server, served, tmp_path):
    """The loop body raises after the first tensor (local and HTTP in turn): that very exception comes out, and
    the load stops."""
    url, file, tensors, _ = served

    class ModelRejected(Exception):
        pass

    def consume(i):
        with fastload.stream(url if i % 2 else str(file), config=QUICK.replace(max_concurrency=2)) as s:
            for name, tensor in s:
                raise ModelRejected(name)

    def check(exc):
        assert type(exc) is ModelRejected, f"{type(exc).__name__}: {exc}"

    repeat_failing(consume, check, ports={http_server.port}, watch=[tmp_path], tensors=True,
                   recover=_loads_again(url, tensors))


class Interrupt:
    """A progress callback that raises KeyboardInterrupt (a user's Ctrl-C handler, a service's stop) once bytes
    have landed."""

    def __call__(self, done: int, total: int) -> None:
        if done > 0:
            raise KeyboardInterrupt


def _stream_all(source, **kwargs):
    with fastload.stream(source, **kwargs) as s:
        return dict(s)


def _load_in_running_loop(source, **kwargs):
    async def main():
        return fastload.load(source, **kwargs)  # the sync API inside a running loop: a private thread
    return asyncio.run(main())


def _aload(source, **kwargs):
    return asyncio.run(fastload.aload(source, **kwargs))


INTERRUPTED = {
    "load-local": lambda url, file, **kw: fastload.load(str(file), **kw),
    "load-http-threads": lambda url, file, **kw: fastload.load(url, **kw),
    "load-http-aiohttp": lambda url, file, config, **kw: fastload.load(
        url, config=config.replace(http_engine="aiohttp"), **kw),
    "stream-http": lambda url, file, **kw: _stream_all(url, **kw),
    "load-http-inside-running-loop": lambda url, file, **kw: _load_in_running_loop(url, **kw),
    "aload-http": lambda url, file, **kw: _aload(url, **kw),
}


@pytest.mark.parametrize("mode", sorted(INTERRUPTED))
def test_keyboard_interrupt_from_progress_callback(mode, http_server, served):
    """KeyboardInterrupt raised by ``progress`` ends the call with KeyboardInterrupt, promptly, and the load's
    threads, sockets and event loop go with it, every time."""
    url, file, tensors, _ = served
    call = INTERRUPTED[mode]

    def check(exc):
        assert type(exc) is KeyboardInterrupt, f"{type(exc).__name__}: {exc}"

    repeat_failing(lambda i: call(url, file, config=QUICK, progress=Interrupt()), check, n=10,
                   ports={http_server.port}, bound_s=3.0, tensors=True,
                   recover=lambda: assert_bit_exact(call(url, file, config=QUICK), tensors))


# -- pull ------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class FailAfter(FailWith):
    """Answer the first ``after`` matching GETs, then fail every one with ``status``: the object vanished."""

    after: int = 1

    def wants_to_fire(self) -> bool:
        return self.seen > self.after


def test_pull_into_a_destination_that_cannot_be_written(served, http_server, tmp_path):
    url, _, _, _ = served
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file where the destination's parent should be")
    repeat_failing(lambda i: fastload.pull(url, to=blocker / "out", config=QUICK),
                   typed(fastload.FastloadError, "blocker"), ports={http_server.port}, watch=[tmp_path])


def test_pull_of_a_source_that_vanishes_mid_pull(served, http_server, tmp_path):
    """The size probe finds the file, then it is gone (404): a typed error naming it, no file under its final
    name, one unfinished temporary file at most (resumed, not one more per attempt); once the source is back the
    pull completes bit-exact and leaves no temporary file."""
    url, file, _, path = served
    dest = tmp_path / "dest"

    def fail(i):
        http_server.faults.clear()
        http_server.faults._add(FailAfter(pattern=path, status=404, after=1))
        fastload.pull(url, to=dest, config=QUICK)

    def check(exc):
        typed(fastload.SourceNotFoundError, "model.safetensors")(exc)
        assert not (dest / "model.safetensors").exists(), "a half-written file was presented as complete"

    # The first failure leaves the unfinished file and its journal (to resume): the warm-up makes them, and
    # the next failures must not add to them.
    repeat_failing(fail, check, ports={http_server.port}, watch=[dest])
    http_server.faults.clear()
    assert fastload.pull(url, to=dest, config=QUICK) == dest / "model.safetensors"
    assert (dest / "model.safetensors").read_bytes() == file.read_bytes()
    left = [p for p in (dest / ".fastload").rglob("*") if p.is_file() and p.name != "pull.lock"
            and "meta" not in p.parts]
    assert not left, f"temporary files left after the pull completed: {left}"


def test_pull_that_cannot_create_its_journal_closes_the_file_it_opened(served, http_server, tmp_path):
    """The unfinished file opens but its journal cannot be created (here: a directory holds its name): the pull
    fails with a typed error, and the descriptor of the unfinished file is closed, every time."""
    url, _, _, _ = served
    dest = tmp_path / "dest"
    (dest / ".fastload" / "incomplete" / "model.safetensors.journal").mkdir(parents=True)
    repeat_failing(lambda i: fastload.pull(url, to=dest, config=QUICK),
                   typed(fastload.FastloadError, "model.safetensors"), ports={http_server.port}, watch=[dest])


def test_pull_interrupted_from_progress_then_resumed(served, http_server, tmp_path):
    url, file, _, _ = served
    dest = tmp_path / "dest"

    def check(exc):
        assert type(exc) is KeyboardInterrupt, f"{type(exc).__name__}: {exc}"
        assert not (dest / "model.safetensors").exists()

    repeat_failing(lambda i: fastload.pull(url, to=dest, config=QUICK, progress=Interrupt()), check, n=6,
                   ports={http_server.port}, watch=[dest])
    fastload.pull(url, to=dest, config=QUICK)
    assert (dest / "model.safetensors").read_bytes() == file.read_bytes()


# -- from_pretrained -------------------------------------------------------------------------------------------

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 16,
              "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "max_position_embeddings": 32, "tie_word_embeddings": True, "dtype": "float32"}


def test_from_pretrained_on_a_broken_checkpoint(tmp_path, serve):
    """In turn: config.json that is not JSON (over HTTP); a directory without weights (local). Both fail before
    transformers is needed; the temporary model folder goes each time."""
    broken, empty = tmp_path / "broken", tmp_path / "empty"
    broken.mkdir()
    empty.mkdir()
    (broken / "config.json").write_text("{not json")
    (empty / "config.json").write_text(json.dumps(TINY_LLAMA))
    sources = [serve("http", broken, as_dir=True), str(empty)]

    def check(exc):
        assert isinstance(exc, (fastload.FormatError, fastload.SourceNotFoundError)), f"{type(exc).__name__}: {exc}"
        if isinstance(exc, fastload.FormatError):
            typed(fastload.FormatError, "config.json", sources[0].rstrip("/"))(exc)
        else:
            typed(fastload.SourceNotFoundError, "model.safetensors", str(empty))(exc)

    repeat_failing(lambda i: fastload.from_pretrained(sources[i % 2]), check, watch=[tmp_path])


FIRST_FROM_PRETRAINED = r"""
import json, sys, tempfile, threading, time
from pathlib import Path
import fastload
folder, good = Path(sys.argv[1]), Path(sys.argv[2])
tempfile.tempdir = sys.argv[3]
assert "transformers" not in sys.modules
late = []  # paths under the scratch temp dir that anything touched after the call raised

def watch(event, args):
    if event in ("open", "os.listdir", "os.scandir", "os.stat") and args and str(args[0]).startswith(sys.argv[3]):
        if done.is_set():
            late.append(str(args[0]))

done = threading.Event()
sys.addaudithook(watch)
try:
    fastload.from_pretrained(str(folder))
    outcome = "loaded"
except Exception as exc:
    outcome = f"{type(exc).__name__}: {exc}"
done.set()
raised = time.monotonic()
time.sleep(0.5)
left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
# An import cannot be stopped: the config thread may finish importing transformers, then must end without
# reading the folder the call removed (an error there would print "Exception in thread" on stderr).
while any(t is not threading.main_thread() for t in threading.enumerate()) and time.monotonic() - raised < 30:
    time.sleep(0.05)
ended = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
print(json.dumps({"outcome": outcome, "threads": left, "ended": ended, "late": late}), flush=True)
"""


def test_first_from_pretrained_failure_leaves_no_thread_importing_transformers(tmp_path):
    """A service's first ``from_pretrained`` (transformers not imported yet) on a checkpoint whose weights are
    truncated: the FormatError comes at once; the model-config thread it started may only finish importing
    transformers (an import cannot be stopped), then ends without reading the temp folder the call removed."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    file, _ = write_checkpoint(tmp_path / "w.safetensors")
    (model / "model.safetensors").write_bytes(file.read_bytes()[:-5000])
    scratch = tmp_path / "scratch-tmp"
    scratch.mkdir()
    out = subprocess.run([sys.executable, "-c", FIRST_FROM_PRETRAINED, str(model), str(file), str(scratch)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["outcome"].startswith("FormatError") and "model.safetensors" in report["outcome"], report
    assert set(report["threads"]) <= {"fastload-detached"}, f"threads running 0.5 s after the raise: {report}"
    assert report["ended"] == [], f"threads still running 30 s after from_pretrained raised: {report}"
    assert report["late"] == [], f"the removed temp folder was read after the call raised: {report}"
    assert "Exception in thread" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert list(scratch.iterdir()) == [], "temporary model folder left behind"


# -- memory over many failures ---------------------------------------------------------------------------------

MANY_FAILURES = r"""
import gc, os, statistics, sys, threading
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import psutil, torch
import fastload
from checkpoints import write_single
from servers import RangeHTTPServer

root = Path(sys.argv[1])
g = torch.Generator().manual_seed(0)
path = write_single(root / "m.safetensors", {f"w{i}": torch.randn(125_000 + 17 * i, generator=g) for i in range(8)})
config = fastload.LoadConfig(chunk_bytes=1 << 20, max_concurrency=4, host_buffer_bytes=4 << 20, stall_timeout_s=2,
                             retry=fastload.RetryConfig(max_attempts=2, backoff_base_s=0.001, backoff_max_s=0.002))
proc = psutil.Process()
with RangeHTTPServer(root) as server:
    url = server.url_for(path)

    def once(i):
        server.faults.clear()
        kind = i % 4
        try:
            if kind == 0:  # replaced mid-load, after some tensors landed
                server.faults.change_etag_after(5, path="/m.safetensors")
                fastload.load(url, config=config)
            elif kind == 1:  # converted (staged) and replaced mid-load
                server.faults.change_etag_after(5, path="/m.safetensors")
                fastload.load(url, config=config, dtype=torch.float16, trace=fastload.Trace())
            elif kind == 2:  # the consumer gives up after two tensors
                with fastload.stream(url, config=config) as s:
                    for j, _ in enumerate(s):
                        if j == 1:
                            raise LookupError("consumer")
            else:  # the connection drops on every read
                server.faults.cut_after(0, path="/m.safetensors")
                fastload.load(url, config=config.replace(http_engine="aiohttp"))
        except (fastload.FastloadError, LookupError):
            return
        raise SystemExit(f"failure {kind} did not fail")

    rss = []
    for i in range(36):
        once(i)
        gc.collect()
        rss.append(proc.memory_info().rss)
print(int(statistics.median(rss[-10:]) - statistics.median(rss[6:16])), len(os.listdir("/proc/self/fd")))
"""


def test_many_failed_loads_do_not_grow_rss(tmp_path):
    """36 failed loads of a 4 MB checkpoint (replaced mid-load, converted and replaced, consumer raising, cut
    connections): resident memory stays flat (medians of ten, early against late: a leak of the outputs would
    move the late one by ~80 MB). In a child process, with
    glibc's mmap threshold fixed, as test_process_robustness_audit's fifty good loads do."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", MANY_FAILURES, str(tmp_path), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=120, env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    grown = int(out.stdout.split()[-2])
    assert grown < 8 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 36 failed loads of a 4 MB checkpoint"


# -- a failed load's memory, while its error is kept -------------------------------------------------------------

@pytest.mark.parametrize("how", ["load", "stream", "aload"])
def test_a_kept_error_does_not_keep_the_failed_loads_tensors(tmp_path, how):
    """A service keeps the last error (``self.last_error = exc``). The error's traceback holds the frames of the
    failed load, and their locals held its output tensors (here ~1.2 MB; a real checkpoint's, gigabytes) for as
    long as the error lived. The file changes under the load after its first chunk: SourceChangedError."""
    path, _ = write_checkpoint(tmp_path / "m.safetensors", seed=3, count=8)
    config = fastload.LoadConfig(chunk_bytes=256 * 1024, max_concurrency=2, host_buffer_bytes=1 << 20)

    def touch(done, total):
        if done:
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))

    before = live_tensor_bytes()
    kept = []
    try:
        if how == "load":
            fastload.load(str(path), config=config, progress=touch)
        elif how == "aload":
            asyncio.run(fastload.aload(str(path), config=config, progress=touch))
        else:
            with fastload.stream(str(path), config=config, progress=touch) as s:
                for _ in s:
                    pass
    except fastload.SourceChangedError as exc:
        kept.append(exc)
    assert kept, "the load should have failed"
    grown = live_tensor_bytes() - before
    assert grown < 64 << 10, f"{grown} bytes of tensors alive while the error is kept"
