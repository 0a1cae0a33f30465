"""What a process leaves open when the interpreter exits while a load is still running.

test_exit_while_loading.py, test_process_lifecycle_audit.py, test_session9_changes_audit.py and
test_debug_modes_audit.py check that such an exit is quick, quiet and has status 0. This file checks what the
cancelled load closes on its way out: its sockets. Each child process loads a two-shard checkpoint whose
second shard's tensor bytes the server holds (its size probe and header are answered), so that at exit the load
is still running with one request in flight and the keep-alive connections of the chunks it already received
idle. The child then exits (a stream left open, a stream dropped unclosed, ``load`` in a daemon thread, ``aload``
in a daemon thread's own loop; both HTTP body engines; S3). An ``atexit`` handler registered before fastload is
imported runs after fastload's exit hooks; it counts the descriptors still connected to the server (from
/proc), then runs a collection: under ``-X dev -W error::ResourceWarning`` an unclosed socket found then is
reported on stderr. Expected (README: a cancel "leaves no thread or socket behind"; exit waits up to 2 s per
load): no descriptor left, no daemon thread of a load still running, nothing on stderr, status 0, and
fastload's exit hooks done within about 2 s. Each case runs with and/or without a dtype conversion: a conversion
runs on the load's worker pool, whose exit hook exists only once it has started a thread.

All children start at once (module fixture); each test checks one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from checkpoints import shard_name
from safetensors.torch import save_file
from servers import FaultProxy, Faults, RangeHTTPServer
from servers.faults import HangAfter

TESTS = Path(__file__).resolve().parent
DEV = ["-X", "dev", "-W", "error::ResourceWarning"]

PRELUDE = r'''
import atexit, gc, json, os, sys, threading, time
spec = json.loads(sys.argv[1])
PORT = spec["port"]


def peers():
    """Descriptors of this process connected to the server's port (any TCP state)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if int(cols[2].rsplit(":", 1)[1], 16) == PORT and cols[9] in inodes:
                    found += 1
    return found


def last():  # registered before fastload is imported: runs after every exit hook of fastload's
    alive = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
    print("after-hooks", peers(), time.monotonic(), ",".join(alive) or "-", flush=True)
    gc.collect()  # an unclosed socket collected here warns (an error under -W error: reported on stderr)


atexit.register(last)
import torch, fastload  # noqa: E401
import fastload.sources.http, fastload.sources.http_threads, fastload.sources.s3  # noqa: E401,F401
opts = dict(chunk_bytes=64 * 1024, max_concurrency=4, stall_timeout_s=30, connect_timeout_s=5,
            http_engine=spec["engine"])
DTYPE = getattr(torch, spec["dtype"]) if spec["dtype"] else None
if spec.get("endpoint"):
    opts["s3"] = fastload.S3Options(endpoint_url=spec["endpoint"])
cfg = fastload.LoadConfig(**opts)
FIRST = spec["first"]  # how many tensors the first shard holds: all of them arrive; the second's never do


def leave():
    time.sleep(0.3)  # (the held request reaches the server; the first shard's connections go idle)
    print("before", peers(), flush=True)
    print("leaving", time.monotonic(), flush=True)
'''

SCENARIOS = {
    # a stream entered by hand and never closed, its first shard read
    "stream-open": r'''
s = fastload.stream(spec["url"], config=cfg, dtype=DTYPE).__enter__()
it = iter(s)
for _ in range(FIRST):
    next(it)
leave()
''',
    # a stream dropped unclosed (its finalizer cancels the load) while a progress hook holds the load's loop
    # (a UI update, a status post), and the process ends at once: the load unwinds during the exit
    "stream-dropped": r'''
got = threading.Event()
def report(done, total):
    if done >= spec["first_bytes"] and not got.is_set():
        got.set()
        time.sleep(0.5)
s = fastload.stream(spec["url"], config=cfg, dtype=DTYPE, progress=report).__enter__()
assert got.wait(30)
print("before", peers(), flush=True)
del s
gc.collect()
print("leaving", time.monotonic(), flush=True)
''',
    # a stream dropped unclosed, and the process ends after the dropped load had time to stop
    "stream-dropped-settled": r'''
s = fastload.stream(spec["url"], config=cfg, dtype=DTYPE).__enter__()
it = iter(s)
for _ in range(FIRST):
    next(it)
time.sleep(0.3)
print("before", peers(), flush=True)
del s, it
gc.collect()
time.sleep(1.0)
print("leaving", time.monotonic(), flush=True)
''',
    # a service preloading in a daemon thread with the sync API
    "load-daemon": r'''
got = threading.Event()
def preload():
    fastload.load(spec["url"], config=cfg, dtype=DTYPE,
                  progress=lambda done, total: done >= spec["first_bytes"] and got.set())
threading.Thread(target=preload, name="held", daemon=True).start()
assert got.wait(30)
leave()
''',
    # aload in an event loop of a daemon thread's own
    "aload-daemon-loop": r'''
import asyncio
got = threading.Event()
async def preload():
    await fastload.aload(spec["url"], config=cfg, dtype=DTYPE,
                         progress=lambda done, total: done >= spec["first_bytes"] and got.set())
threading.Thread(target=asyncio.run, args=(preload(),), name="held", daemon=True).start()
assert got.wait(30)
leave()
''',
}

#: (child name, scenario, engine, transport, dtype). A dtype conversion runs on the load's worker pool: the pool
#: has then started a thread, and with it registered its exit hook.
CHILDREN = [
    ("stream-open-threads", "stream-open", "threads", "http", None),
    ("stream-open-threads-converting", "stream-open", "threads", "http", "float64"),
    ("stream-open-aiohttp-converting", "stream-open", "aiohttp", "http", "float64"),
    ("stream-dropped-threads-converting", "stream-dropped", "threads", "http", "float64"),
    ("stream-dropped-settled-threads", "stream-dropped-settled", "threads", "http", None),
    ("load-daemon-threads", "load-daemon", "threads", "http", None),
    ("load-daemon-threads-converting", "load-daemon", "threads", "http", "float64"),
    ("aload-daemon-loop-threads", "aload-daemon-loop", "threads", "http", None),
    ("stream-open-s3-converting", "stream-open", "threads", "s3", "float64"),
]


def checkpoint(directory: Path) -> tuple[str, int, int]:
    """Two shards and their index: the first of 6 tensors of 96 KiB (several chunks: served), the second of one
    small tensor (one chunk: held). Returns the second's file name, and how many tensors and bytes the first
    holds."""
    g = torch.Generator().manual_seed(7)
    first = {f"a{i}": torch.randn(24 * 1024, generator=g) for i in range(6)}
    names = [shard_name(1, 2), shard_name(2, 2)]
    directory.mkdir(parents=True)
    save_file(first, str(directory / names[0]))
    save_file({"z": torch.randn(1024, generator=g)}, str(directory / names[1]))
    index = {"metadata": {}, "weight_map": {n: names[0] for n in first} | {"z": names[1]}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return names[1], len(first), sum(t.numel() * t.element_size() for t in first.values())


class Child:
    def __init__(self, name: str, code: str, spec: dict):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, *DEV, "-c", code, json.dumps(spec)], cwd=TESTS,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(TESTS), "PYTHONUNBUFFERED": "1"})
        self._done: tuple | None = None
        self.ended: float | None = None

    def result(self) -> tuple[int, str, str, float]:
        if self._done is None:
            try:
                out, err = self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, err = self.proc.communicate()
                raise AssertionError(f"{self.name} did not end in 30 s: {out[-1000:]!r} {err[-2000:]!r}")
            self._done = (self.proc.returncode, out, err, self.ended or time.monotonic())
        return self._done

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture(scope="module")
def children(tmp_path_factory, s3_server):
    root = tmp_path_factory.mktemp("exit-hygiene")
    bucket = f"exit-{uuid.uuid4().hex[:10]}"
    s3_server.ensure_bucket(bucket)
    started: dict[str, Child] = {}
    rules: dict[str, object] = {}
    with RangeHTTPServer(root) as http, FaultProxy(s3_server.endpoint_url, Faults()) as proxy:
        try:
            for name, scenario, engine, transport, dtype in CHILDREN:
                directory = root / name
                held, first, first_bytes = checkpoint(directory)
                if transport == "s3":
                    s3_server.upload_dir(bucket, name, directory)
                    # the header's two ranged GETs (its length, its JSON; the HEAD is not counted), then nothing
                    rule = proxy.faults._add(HangAfter(pattern=f"*/{name}/{held}", after=2))
                    spec = {"url": f"s3://{bucket}/{name}/", "port": proxy.port, "endpoint": proxy.url}
                else:
                    # the size probe and the header are answered, the tensor bytes never come
                    rule = http.faults._add(HangAfter(pattern=f"*/{name}/{held}", after=2))
                    spec = {"url": http.url_for(directory) + "/", "port": http.port}
                spec |= {"engine": engine, "dtype": dtype, "first": first, "first_bytes": first_bytes}
                rules[name] = rule
                started[name] = Child(name, textwrap.dedent(PRELUDE) + SCENARIOS[scenario], spec)
            deadline = time.monotonic() + 30
            while any(c.proc.poll() is None for c in started.values()) and time.monotonic() < deadline:
                for child in started.values():
                    if child.ended is None and child.proc.poll() is not None:
                        child.ended = time.monotonic()  # (its end, not when it was asked about)
                time.sleep(0.01)
            for child in started.values():
                child.result()
            yield {name: (child.result(), rules[name]) for name, child in started.items()}
        finally:
            for child in started.values():
                child.close()


#: ``-X dev`` turns on asyncio's debug mode, which reports every loop step over 0.1 s: on two shared cores (and with
#: the child's own ``gc.collect()`` holding the GIL) that measures the machine; test_debug_modes_audit.py covers it.
SLOW_STEP = re.compile(r"^Executing <.*> took \d+\.\d+ seconds$")


def complaints(err: str) -> str:
    return "\n".join(line for line in err.splitlines() if line.strip() and not SLOW_STEP.match(line))


def _value(out: str, key: str) -> list[str]:
    for line in out.splitlines():
        if line.startswith(key + " "):
            return line.split()[1:]
    raise AssertionError(f"no {key!r} line in the child's output: {out!r}")


@pytest.mark.parametrize("name", [c[0] for c in CHILDREN])
def test_exit_mid_load_leaves_no_socket_open_and_no_resource_warning(children, name):
    (status, out, err, ended), rule = children[name]
    assert rule.fired >= 1, f"the server never held a request: the load was not running at exit ({out!r})"
    before = int(_value(out, "before")[0])
    assert before >= 1, "no connection to the server was open before exit: the test proved nothing"
    left = int(_value(out, "after-hooks")[0])
    alive = _value(out, "after-hooks")[2].split(",")
    problems = []
    if "held" in alive:  # the thread that ran load / aload: fastload's exit hook cancels its load, and it ends
        problems.append("the load in the daemon thread was not cancelled at exit (its thread still ran after "
                        "fastload's exit hooks)")
    if left:
        problems.append(f"{left} descriptor(s) still connected to the server after fastload's exit hooks "
                        f"({before} before exit)")
    if complaints(err):
        problems.append(f"stderr: {complaints(err)[-1500:]}")
    if status != 0:
        problems.append(f"exit status {status}")
    left_at = float(_value(out, "leaving")[0])
    hooks = float(_value(out, "after-hooks")[1]) - left_at
    if hooks > 2.0 + 0.5:  # one load: the README's 2 s
        problems.append(f"fastload's exit hooks took {hooks:.1f} s")
    if ended - left_at > 10:  # (the rest is torch's teardown, seconds when every child exits at once)
        problems.append(f"the exit took {ended - left_at:.1f} s")
    assert not problems, "; ".join(problems)
