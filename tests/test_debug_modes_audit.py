"""fastload under Python's and asyncio's debug modes: ``python -X dev``, ``PYTHONASYNCIODEBUG=1``,
``asyncio.run(..., debug=True)``, ``loop.set_debug(True)``, ``-W error`` / ``PYTHONWARNINGS`` (ResourceWarning,
RuntimeWarning, fastload's own DeprecationWarnings, every warning) and ``-X warn_default_encoding``.

In those modes asyncio reports calls made from the wrong thread ("Non-thread-safe operation invoked on an event
loop other than the current one"), coroutines never awaited, tasks destroyed while pending, exceptions never
retrieved, callbacks that block the loop, and unclosed transports, sockets, files and event loops. Real loads run
in child processes (so the flags apply from the interpreter's start) against local files, an HTTP Range server and
moto S3, through ``load``, ``aload``, ``stream`` (read fully, left early, consumer raising, dropped unclosed),
``plan``, ``pull`` and the ``fastload`` CLI, and through loads that fail (missing file, 404, malformed header, a
server that never answers until the stall timeout, an S3 endpoint that never answers, a cancelled ``aload``) and
loads still running at interpreter exit. Each child prints a JSON report and a marker on stderr before each
scenario, so that what asyncio or the warnings machinery wrote is pinned on the scenario that caused it.

All the children start at once (module fixture) and each test waits for its own. Slow-callback reports under
``SLOW_S`` (3 s) are ignored: on two shared cores they measure the machine, and a sync call inside a coroutine
blocks its caller's loop by design (README); a longer one is a load stalling the loop.

Complements test_threads_and_loops_audit.py (an in-process debug event loop policy) and
test_interrupt_everywhere_audit.py (Ctrl-C under ``-X dev``). Nothing of fastload is mocked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from checkpoints import (
    all_dtypes_tensors,
    llama_like_tensors,
    write_sharded,
    write_single,
)
from reliability_helpers import write_checkpoint
from servers import RangeHTTPServer
from servers.faults import HangAfter

FASTLOAD = str(Path(sys.executable).with_name("fastload"))
MARK = "##scenario "

# -- the children ----------------------------------------------------------------------------------------------

COMMON = r'''
import asyncio, gc, json, sys, tempfile, threading, warnings
from pathlib import Path
warnings.filterwarnings("error", category=DeprecationWarning, module=r"fastload(\.|$)")
warnings.filterwarnings("error", category=PendingDeprecationWarning, module=r"fastload(\.|$)")
import torch
from safetensors.torch import load_file
import fastload
# The network transports' imports (aiohttp, botocore) happen on a load's first use of them, inside its event loop;
# done here, so that a slow-callback report below means a load's own work, not an import on a busy machine.
import fastload.sources.http, fastload.sources.http_threads, fastload.sources.s3  # noqa: E401,F401

spec = json.loads(sys.argv[1])
RETRY = fastload.RetryConfig(max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.02, deadline_s=5.0)
CFG = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=4, host_buffer_bytes=512 * 1024,
                          stall_timeout_s=0.3, connect_timeout_s=2.0, retry=RETRY)
report = {}


def marker(name):
    # One write (print writes its end of line apart, and another thread's log line could come in between),
    # on a line of its own.
    sys.stderr.write("\n''' + MARK + r'''" + name + "\n")
    sys.stderr.flush()


def scenario(name):
    def run(fn):
        marker(name)
        try:
            out = fn()
            report[name] = "ok" if out is None else out
        except BaseException as exc:  # noqa: BLE001 - reported
            report[name] = f"{type(exc).__name__}: {str(exc)[:160]}"
        return fn
    return run


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def finish():
    marker("<exit>")
    gc.collect()
    print(json.dumps(report), flush=True)
'''

GOOD = COMMON + r'''
want = load_file(spec["file"])


def exact(got, dtype=None):
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k, v in want.items():
        v = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        assert same(got[k], v), k


for kind, src in spec["sources"].items():
    @scenario(f"{kind}/load")
    def _():
        exact(fastload.load(src, config=CFG, dtype=torch.float64), torch.float64)

    @scenario(f"{kind}/aload")
    def _():
        exact(asyncio.run(fastload.aload(src, config=CFG.replace(http_engine="aiohttp")), debug=True))

    @scenario(f"{kind}/stream-full")
    def _():
        with fastload.stream(src, config=CFG) as s:
            exact(dict(s))

    @scenario(f"{kind}/stream-left-early")
    def _():
        with fastload.stream(src, config=CFG) as s:
            for _ in s:
                break

    @scenario(f"{kind}/stream-consumer-raises")
    def _():
        try:
            with fastload.stream(src, config=CFG) as s:
                for _ in s:
                    raise KeyError("consumer")
        except KeyError:
            return "raised"

    @scenario(f"{kind}/plan")
    def _():
        assert {t.name for t in fastload.plan(src, config=CFG).tensors} == set(want)

    @scenario(f"{kind}/pull")
    def _():
        with tempfile.TemporaryDirectory() as d:
            out = fastload.pull(src, to=Path(d) / "out", config=CFG)
            exact(load_file(out / "model.safetensors"))

http = spec["sources"]["http"]


@scenario("abandoned/sync-calls-inside-a-debug-loop")
def _():
    async def main():
        asyncio.get_running_loop().slow_callback_duration = 60  # (these block their caller's loop by design)
        exact(fastload.load(http, config=CFG))
        with fastload.stream(http, config=CFG) as s:
            exact(dict(s))
        with fastload.stream(http, config=CFG) as s:
            for _ in s:
                break
    asyncio.run(main(), debug=True)


@scenario("abandoned/sync-load-in-a-worker-thread")
def _():
    box = {}
    t = threading.Thread(target=lambda: box.update(v=fastload.load(http, config=CFG)))
    t.start()
    t.join(20)
    exact(box["v"])


@scenario("abandoned/aload-task-never-awaited")
def _():
    async def main():
        asyncio.get_running_loop().create_task(fastload.aload(http, config=CFG))
        await asyncio.sleep(0.02)
    asyncio.run(main(), debug=True)  # cancels the load's task as it ends


@scenario("abandoned/gather-one-fails")
def _():
    async def main():
        await asyncio.gather(fastload.aload(http, config=CFG), fastload.aload(spec["missing"], config=CFG))
    asyncio.run(main(), debug=True)


@scenario("abandoned/stream-dropped-unclosed")
def _():
    s = fastload.stream(http, config=CFG).__enter__()
    next(iter(s))
    del s
    gc.collect()
    # Its finalizer cancels the load without waiting: the load's thread ends by itself, soon.
    import time
    deadline = time.monotonic() + 5
    while any(t.name == "fastload-stream" for t in threading.enumerate()):
        if time.monotonic() > deadline:
            return "its thread still runs 5 s after the stream was dropped"
        time.sleep(0.01)


finish()
'''

FAILING = COMMON + r'''
bad = spec["bad"]


def entry_points(name, src, cfg=CFG, which=("load", "aload", "stream", "plan")):
    if "load" in which:
        scenario(f"{name}/load")(lambda: fastload.load(src, config=cfg))
    if "aload" in which:
        scenario(f"{name}/aload")(lambda: asyncio.run(fastload.aload(src, config=cfg.replace(http_engine="aiohttp")),
                                                      debug=True))
    if "stream" in which:
        def consume():
            with fastload.stream(src, config=cfg) as s:
                dict(s)
        scenario(f"{name}/stream")(consume)
    if "plan" in which:
        scenario(f"{name}/plan")(lambda: fastload.plan(src, config=cfg))


for name in ("missing", "404", "malformed", "malformed-http", "s3-missing"):
    entry_points(name, bad[name])
scenario("404/pull")(lambda: fastload.pull(bad["404-dir"], to=Path(tempfile.mkdtemp()) / "out", config=CFG))
entry_points("hang", bad["hang"], which=("load", "aload", "stream"))
blackhole = CFG.replace(s3=fastload.S3Options(endpoint_url=bad["blackhole"]))
entry_points("s3-blackhole", "s3://bucket/model.safetensors", blackhole, which=("load", "aload"))


async def cancelled(src, cfg, how):
    if how == "wait_for":
        try:
            await asyncio.wait_for(fastload.aload(src, config=cfg), 0.3)
        except TimeoutError:
            return "timeout"
    task = asyncio.get_running_loop().create_task(fastload.aload(src, config=cfg))
    await asyncio.sleep(0.3)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return "cancelled"


slow = CFG.replace(stall_timeout_s=10)
for engine in ("threads", "aiohttp"):
    for how in ("wait_for", "cancel"):
        scenario(f"cancelled/{engine}/{how}")(
            lambda: asyncio.run(cancelled(bad["hang-data"], slow.replace(http_engine=engine), how), debug=True))
scenario("cancelled/s3-blackhole")(
    lambda: asyncio.run(cancelled("s3://bucket/model.safetensors", blackhole.replace(stall_timeout_s=10), "cancel"),
                        debug=True))

finish()
'''

AT_EXIT = COMMON + r'''
slow = CFG.replace(stall_timeout_s=10)
# Left running when the script ends: a stream entered by hand and never closed (one against a server that hangs,
# one that handed out a tensor), a sync load in a daemon thread (hanging), and an aload in a daemon thread's loop.
hung = fastload.stream(spec["hang-data"], config=slow).__enter__()
half = fastload.stream(spec["good"], config=slow).__enter__()
next(iter(half))
threading.Thread(target=lambda: fastload.load(spec["hang-data"], config=slow), daemon=True).start()
loop = asyncio.new_event_loop()


def aload_in_the_threads_loop():
    try:
        loop.run_until_complete(fastload.aload(spec["hang-data"], config=slow))
    finally:  # (the loop is this code's to close: exit cancels the aload, and this thread then ends here)
        loop.close()


threading.Thread(target=aload_in_the_threads_loop, daemon=True).start()
import time
time.sleep(0.4)
finish()
'''

STRICT = COMMON + r'''
# Every warning is an error here (PYTHONWARNINGS=error), and the debug loops are the caller's own choice.
want_all = load_file(spec["all_local"])
want_llama = {}
for p in sorted(Path(spec["llama_local"]).glob("*.safetensors")):
    want_llama.update(load_file(p))
shard = fastload.Shard(1, 2, [("proj", 0), ("embed", 1)])
import botocore.session
# One botocore session for every S3 load, as a service keeps one (README): a new one each costs 50-130 ms here.
CFG = CFG.replace(s3=fastload.S3Options(session=botocore.session.Session()))


def check(got, want, dtype=None, sharded=False, names=None):
    names = names or list(want)
    assert set(got) == set(names), sorted(set(got) ^ set(names))
    for n in names:
        w = want[n]
        if sharded:
            for pat, dim in shard.rules:
                if pat in n:
                    w = w.tensor_split(shard.world_size, dim)[shard.rank]
                    break
        if dtype is not None and w.is_floating_point():
            w = w.to(dtype)
        assert same(got[n], w), n


def set_debug_loop(coro):
    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


for kind in ("local", "http", "s3"):
    for what, want in (("all-dtypes", want_all), ("llama-sharded", want_llama)):
        src = spec[f"{what.split('-')[0]}_{kind}"]
        names = sorted(want)[::3]
        cfg = CFG.replace(stall_timeout_s=5.0)
        scenario(f"{kind}/{what}/load-bf16")(
            lambda: check(fastload.load(src, config=cfg, dtype=torch.bfloat16), want, torch.bfloat16))
        scenario(f"{kind}/{what}/aload-names-set_debug")(
            lambda: check(set_debug_loop(fastload.aload(src, config=cfg, names=names)), want, names=names))

        def stream_shard():
            with fastload.stream(src, config=cfg, dtype=torch.float32, shard=shard) as s:
                check(dict(s), want, torch.float32, sharded=True)
        scenario(f"{kind}/{what}/stream-f32-shard")(stream_shard)
        scenario(f"{kind}/{what}/aload-verify-trace")(
            lambda: check(asyncio.run(fastload.aload(src, config=cfg.replace(verify_checksums=True),
                                                     trace=tempfile.mktemp(suffix=".json")), debug=True), want))

# -X warn_default_encoding too: a text file opened without an encoding warns (PEP 597), an error here.
want = load_file(spec["file"])
for kind, src in spec["pull"].items():
    def pull_twice():
        with tempfile.TemporaryDirectory() as d:
            for _ in range(2):  # the second pull reads what the first recorded
                out = fastload.pull(src, to=Path(d) / "out", config=CFG)
            check(load_file(out / "model.safetensors"), want)
    scenario(f"encoding/{kind}/pull")(pull_twice)
finish()
'''

DEV_FLAGS = ["-X", "dev", "-W", "error::ResourceWarning", "-W", "error::RuntimeWarning"]
#: Slow-callback reports shorter than this are ignored: the children share two cores with each other and with
#: whatever else runs, and a step descheduled that long (1.1 s seen) is the machine's, not fastload's.
SLOW_S = 3.0
#: The CLI's event loop is the whole process's, and its first step imports aiohttp or botocore: a slow callback
#: there blocks nothing else, so only an absurd one counts.
CLI_SLOW_S = 10.0
SLOW = re.compile(r"^Executing <.*> took (\d+\.\d+) seconds$")


def complaints(stderr: str, slow_s: float = SLOW_S) -> list[str]:
    """What a child wrote on stderr, less the slow-callback reports under ``slow_s`` (see the module docstring)."""
    out = []
    for line in stderr.splitlines():
        match = SLOW.match(line)
        if (match and float(match.group(1)) < slow_s) or not line.strip():
            continue
        out.append(line)
    return out


class Child:
    """A child process started now; ``result()`` waits for it (once) and gives its rc, report and stderr."""

    def __init__(self, argv: list[str], env: dict, timeout: float = 60.0):
        self.argv = argv
        self.timeout = timeout
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self._done = None

    def result(self):
        if self._done is None:
            try:
                out, err = self.proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, err = self.proc.communicate()
                raise AssertionError(f"{self.argv[-2:]} did not end in {self.timeout} s; stderr: {err[-3000:]}")
            report = None
            for line in out.splitlines():  # (a child's report is one line of JSON)
                try:
                    report = json.loads(line) if line.startswith("{") else report
                except ValueError:
                    pass
            self._done = (self.proc.returncode, report, out, err)
        return self._done

    def sections(self) -> dict[str, list[str]]:
        """stderr split at the scenario markers: what each scenario (and the exit, ``<exit>``) left there."""
        _, _, _, err = self.result()
        parts: dict[str, list[str]] = {"<start>": []}
        current = "<start>"
        for line in err.splitlines():
            if line.startswith(MARK):
                current = line[len(MARK):]
                parts[current] = []
            else:
                parts[current].append(line)
        return {name: complaints("\n".join(lines)) for name, lines in parts.items()}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


# -- the fixture: data, servers, and every child started at once -------------------------------------------------


@pytest.fixture(scope="module")
def children(tmp_path_factory, s3_server):
    root = tmp_path_factory.mktemp("debug-modes")
    ckpt = root / "ckpt"
    ckpt.mkdir()
    file, _ = write_checkpoint(ckpt / "model.safetensors", count=3)
    all_file = write_single(root / "all.safetensors", all_dtypes_tensors(seed=0))
    llama = write_sharded(root / "llama", llama_like_tensors(seed=0), 3)
    (root / "bad.safetensors").write_bytes((40).to_bytes(8, "little") + b"{not json" + b" " * 31)
    for name in ("hang", "hang-data", "hang-exit"):
        shutil.copy(file, root / f"{name}.safetensors")
    bucket = f"debug-{uuid.uuid4().hex[:10]}"
    s3_server.upload_dir(bucket, "ckpt", ckpt)
    s3_server.upload_dir(bucket, "llama", llama)
    s3_server.put(bucket, "all.safetensors", all_file.read_bytes())

    # An S3 endpoint that accepts connections (the kernel's backlog) and never answers.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(64)

    started: list[Child] = []
    with RangeHTTPServer(root) as http:  # our own server: the suite's is reset (its faults cleared) per test
        http.faults.hang(path="*/hang.safetensors")  # even the first byte of the header never comes
        for name in ("hang-data", "hang-exit"):  # (one per child: the rule counts requests)
            http.faults._add(HangAfter(pattern=f"*/{name}.safetensors", after=2))  # the header, then nothing
        url = http.url_for
        sources = {"local": str(ckpt), "http": url(ckpt) + "/", "s3": f"s3://{bucket}/ckpt/"}
        env = dict(os.environ, PYTHONASYNCIODEBUG="1")
        for name in ("PYTHONWARNINGS", "PYTHONDEVMODE"):
            env.pop(name, None)

        def child(name: str, code: str, spec: dict, flags=DEV_FLAGS, extra_env=None) -> Child:
            script = root / f"{name}.py"
            script.write_text(code)
            proc = Child([sys.executable, *flags, str(script), json.dumps(spec)], dict(env, **(extra_env or {})))
            started.append(proc)
            return proc

        def cli(*args: str) -> Child:
            cli_env = dict(env, PYTHONDEVMODE="1", PYTHONWARNINGS="error::ResourceWarning,error::RuntimeWarning",
                           FASTLOAD_CHUNK_BYTES="65536", FASTLOAD_STALL_TIMEOUT_S="2")
            proc = Child([FASTLOAD, *args], cli_env)
            started.append(proc)
            return proc

        try:
            procs = {
                "good": child("good", GOOD, {"file": str(file), "sources": sources, "missing": url(root / "nope/")}),
                "failing": child("failing", FAILING, {"bad": {
                    "missing": str(root / "nope.safetensors"), "404": url(root / "nope.safetensors"),
                    "404-dir": url(root / "nope") + "/", "malformed": str(root / "bad.safetensors"),
                    "malformed-http": url(root / "bad.safetensors"), "s3-missing": f"s3://{bucket}/nope.safetensors",
                    "hang": url(root / "hang.safetensors"), "hang-data": url(root / "hang-data.safetensors"),
                    "blackhole": f"http://127.0.0.1:{blackhole.getsockname()[1]}"}}),
                "at-exit": child("at_exit", AT_EXIT, {"good": sources["http"],
                                                      "hang-data": url(root / "hang-exit.safetensors")}),
                "strict": child("strict", STRICT, {
                    "all_local": str(all_file), "llama_local": str(llama), "all_http": url(all_file),
                    "llama_http": url(llama) + "/", "all_s3": f"s3://{bucket}/all.safetensors",
                    "llama_s3": f"s3://{bucket}/llama/", "file": str(file),
                    "pull": {"local": sources["local"], "s3": sources["s3"]}},
                    flags=["-X", "warn_default_encoding"], extra_env={"PYTHONWARNINGS": "error"}),
                "cli-load": cli("load", sources["s3"], "--json"),
                "cli-inspect-404": cli("inspect", url(root / "nope.safetensors")),
            }
            for proc in procs.values():
                proc.result()
            procs["ckpt_bytes"] = file.stat().st_size
            yield procs
        finally:
            for proc in started:
                proc.close()
            blackhole.close()


def _scenarios(report: dict, prefix: str) -> dict:
    return {name: outcome for name, outcome in report.items() if name.startswith(prefix)}


def _assert_clean(proc: Child, prefix: str, expected: dict[str, str] | None = None) -> None:
    """The scenarios named ``prefix...`` ended as ``expected`` (default: all "ok"; a value ending in ``:`` is the
    error type expected) and left nothing on stderr; the child itself ended with status 0."""
    rc, report, out, err = proc.result()
    assert rc == 0 and report is not None, (rc, out[-2000:], err[-4000:])
    mine = _scenarios(report, prefix)
    assert mine, f"no scenario {prefix!r} ran: {sorted(report)}"
    for name, outcome in mine.items():
        want = (expected or {}).get(name.removeprefix(prefix), "ok")
        if want.endswith(":"):
            assert isinstance(outcome, str) and outcome.startswith(want), (name, outcome)
        else:
            assert outcome == want, (name, outcome)
    sections = proc.sections()
    noisy = {name: lines for name, lines in sections.items() if name.startswith(prefix) and lines}
    assert not noisy, f"stderr under debug modes: {json.dumps(noisy, indent=1)[:6000]}"


# -- good loads -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "http", "s3"])
def test_every_entry_point_is_quiet_under_dev_mode(children, kind):
    """``-X dev`` + ``PYTHONASYNCIODEBUG=1`` + ``-W error::ResourceWarning -W error::RuntimeWarning`` (and
    fastload's own DeprecationWarnings as errors): load (float64), aload (aiohttp engine, ``asyncio.run(debug=
    True)``), stream read fully / left at its first tensor / its consumer raising, plan and pull of a checkpoint
    directory. Each exact against safetensors; asyncio and the warnings machinery say nothing."""
    _assert_clean(children["good"], f"{kind}/", {"stream-consumer-raises": "raised"})


def test_calls_from_coroutines_threads_and_abandoned_loads_are_quiet_under_dev_mode(children):
    """Sync load and streams inside a debug loop's coroutine (fastload's loop in a private thread), a sync load in
    a worker thread, an ``aload`` task never awaited (``asyncio.run`` cancels it as it ends), ``gather`` of a good
    and a failing ``aload`` (the good one cancelled), a stream entered and dropped half-read (its thread ends by
    itself within 5 s): no "Task was destroyed but it is pending", no "exception was never retrieved", no
    unclosed transport, no call from a wrong thread."""
    _assert_clean(children["good"], "abandoned/", {"gather-one-fails": "SourceNotFoundError:"})


def test_nothing_is_reported_as_the_process_collects_and_exits(children):
    """After every good scenario: a full collection and interpreter exit print nothing (no ResourceWarning for a
    socket, file or event loop a load left for the collector)."""
    rc, _, _, err = children["good"].result()
    assert rc == 0
    assert children["good"].sections()["<exit>"] == [], err[-4000:]
    assert children["good"].sections()["<start>"] == [], err[-4000:]


# -- failing loads --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, error", [
    ("missing", "SourceNotFoundError:"), ("404", "SourceNotFoundError:"), ("malformed", "FormatError:"),
    ("malformed-http", "FormatError:"), ("s3-missing", "SourceNotFoundError:"), ("hang", "TransferError:"),
    ("s3-blackhole", "TransferError:"),
])
def test_failing_loads_raise_their_typed_error_and_nothing_else_under_dev_mode(children, kind, error):
    """A missing file, an HTTP 404 (and a pull of a missing directory), a malformed header (local, HTTP), a missing
    S3 key, a server that never sends the header's first byte and an S3 endpoint that never answers (both until a
    0.3 s stall timeout, twice): every entry point raises the typed fastload error, and the failure's cleanup
    leaves asyncio nothing to report (no pending task destroyed, no exception never retrieved, no unclosed
    socket)."""
    proc = children["failing"]
    expected = {name.removeprefix(f"{kind}/"): error for name in _scenarios(proc.result()[1] or {}, f"{kind}/")}
    _assert_clean(proc, f"{kind}/", expected)


def test_cancelled_aloads_are_quiet_under_dev_mode(children):
    """``aload`` cancelled while its reads hang: by ``asyncio.wait_for`` and by ``task.cancel()``, with each HTTP
    engine, and one whose S3 request hangs (botocore in a detached thread): TimeoutError / CancelledError for the
    caller, and nothing on stderr (the detached thread finishing after its loop closed included)."""
    proc = children["failing"]
    expected = {name.removeprefix("cancelled/"): ("timeout" if name.endswith("wait_for") else "cancelled")
                for name in _scenarios(proc.result()[1] or {}, "cancelled/")}
    _assert_clean(proc, "cancelled/", expected)
    assert proc.sections()["<exit>"] == []


def test_loads_left_running_at_interpreter_exit_end_quietly_under_dev_mode(children):
    """A script ends with two streams entered and never closed (one hung, one half read), a sync load hung in a
    daemon thread and an ``aload`` hung in a daemon thread's loop: exit status 0, its last output printed, and
    nothing on stderr under ``-X dev`` (fastload's exit hooks cancel and wait for what runs torch)."""
    proc = children["at-exit"]
    rc, report, out, err = proc.result()
    assert (rc, report) == (0, {}), (rc, out[-2000:], err[-4000:])
    assert all(lines == [] for lines in proc.sections().values()), err[-4000:]


# -- every warning an error, the caller's own debug loops -------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "http", "s3"])
def test_conversions_shards_names_and_checksums_under_pythonwarnings_error(children, kind):
    """``PYTHONWARNINGS=error`` (every warning, torch's and the libraries' included, is an exception; EncodingWarning
    too, ``-X warn_default_encoding``), loops put in debug mode by the caller (``loop.set_debug(True)``,
    ``asyncio.run(debug=True)``): a checkpoint of every dtype and a sharded Llama-like one (index.json),
    converted to bfloat16, loaded by names, streamed as a tensor-parallel shard converted to float32, and with
    checksums verified and a trace file written. Exact against safetensors and torch; nothing on stderr."""
    _assert_clean(children["strict"], f"{kind}/")


def test_pull_under_warn_default_encoding(children):
    """``python -X warn_default_encoding`` with ``PYTHONWARNINGS=error`` (PEP 597: a text file opened without an
    encoding gets the locale's, which differs between machines): ``pull`` twice into the same directory, from
    local disk and S3. fastload writes and reads its own records (the pull's metadata, folder list, journal), so
    it must name their encoding; each pull completes and the weights are exact."""
    _assert_clean(children["strict"], "encoding/")


# -- the CLI ----------------------------------------------------------------------------------------------------


def test_cli_load_is_quiet_under_dev_mode(children):
    """``PYTHONDEVMODE=1 PYTHONASYNCIODEBUG=1 PYTHONWARNINGS=error::ResourceWarning,error::RuntimeWarning``:
    ``fastload load s3://.../ --json`` exits 0, prints its trace summary on stdout and nothing on stderr."""
    rc, _, out, err = children["cli-load"].result()
    assert rc == 0 and complaints(err, CLI_SLOW_S) == [], (rc, err[-4000:])
    summary = json.loads(out)
    assert summary["bytes_fetched"] == children["ckpt_bytes"] and summary["errors"] == [], out  # (headers too)


def test_a_failing_cli_command_is_one_line_under_dev_mode(children):
    """A failing CLI command under the same modes (``inspect`` of a URL that answers 404): exit status 1 and
    exactly one line on stderr, ``fastload: error: ...``; no asyncio report after it."""
    rc, _, out, err = children["cli-inspect-404"].result()
    lines = complaints(err, CLI_SLOW_S)
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("fastload: error: "), (rc, err[-4000:])
    assert out == ""
