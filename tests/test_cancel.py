"""Cancellation: leaving ``stream()`` early, cancelling an ``aload`` task, and Ctrl-C stop all I/O promptly.

Ctrl-C is a real SIGINT delivered to a subprocess running ``load``, ``stream`` and
``pull`` against the in-process test server, each stuck waiting for bytes.
Afterwards nothing of the load is left: no thread, no socket, no file under a
final name that is not whole.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


import pytest

import fastload
from checkpoints import llama_like_tensors, write_sharded
from reliability_helpers import QUICK, Leaks, Timer, private_tmp, write_checkpoint  # noqa: F401
from servers.faults import HangAfter

TESTS = Path(__file__).resolve().parent


def test_leaving_stream_early_stops_io(http_server, http_dir):
    file, _ = write_checkpoint(http_dir / "model.safetensors")
    slow = http_server.faults.slow_first_byte(0.3, path="*")  # .seen counts requests as they arrive
    config = QUICK.replace(max_concurrency=2, stall_timeout_s=5.0)
    with Leaks({http_server.port}) as leaks:
        with fastload.stream(http_server.url_for(file), config=config) as s:
            for _name, _tensor in s:
                break
            with Timer() as closing:
                s.close()
        time.sleep(0.3)  # requests sent before close may reach a busy server's handler a little later
        requests = slow.seen
        time.sleep(0.6)  # a loader still running would send two more in this time
        assert slow.seen == requests, "requests went out after the stream was closed"
        assert closing.s < 1.0
        leaks.check(grace_s=0.5)
    assert requests < 20  # it stopped long before fetching the ~20 chunks


@pytest.mark.parametrize("transport", ["http", "s3"])
def test_cancelling_an_aload_task_stops_io(transport, request, tmp_path):
    if transport == "http":
        server = request.getfixturevalue("http_server")
        file, _ = write_checkpoint(request.getfixturevalue("http_dir") / "model.safetensors")
        source, config, faults, ports = server.url_for(file), QUICK, server.faults, {server.port}
    else:
        s3, proxy = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_proxy")
        bucket = request.getfixturevalue("s3_bucket")
        file, _ = write_checkpoint(tmp_path / "model.safetensors", count=2)
        s3.put(bucket, "m.safetensors", file.read_bytes())
        source, faults, ports = f"s3://{bucket}/m.safetensors", proxy.faults, {proxy.port}
        config = QUICK.replace(s3=fastload.S3Options(endpoint_url=proxy.url))
    hang = faults.hang()
    config = config.replace(stall_timeout_s=30.0)

    async def main() -> float:
        task = asyncio.ensure_future(fastload.aload(source, config=config))
        while hang.seen == 0:  # the load is waiting on the network
            await asyncio.sleep(0.01)
        start = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - start

    with Leaks(ports) as leaks:
        seconds = asyncio.run(main())
        leaks.check(grace_s=0.5)
    assert seconds < 1.0


# -- Ctrl-C: a real SIGINT to a process that is loading -------------------------------------------

CHILD = r"""
import json, sys, threading
sys.path.insert(0, sys.argv[1])
import psutil, fastload

config = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=4, stall_timeout_s=60.0)
for line in sys.stdin:
    mode, source, dest = line.split()
    print("go", mode, flush=True)
    try:
        if mode == "load":
            fastload.load(source, config=config)
        elif mode == "stream":
            with fastload.stream(source, config=config) as s:
                for _ in s:
                    pass
        else:
            fastload.pull(source, to=dest, config=config)
        result = "finished"
    except KeyboardInterrupt:
        result = "interrupted"
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    sockets = [str(c) for c in psutil.Process().net_connections("inet") if c.status != psutil.CONN_TIME_WAIT]
    print(json.dumps({"result": result, "threads": threads, "sockets": sockets}), flush=True)
"""


@pytest.fixture
def child(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(TESTS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    yield proc
    proc.kill()
    proc.wait()


def interrupt(proc, rule, mode: str, source: str, dest: str) -> tuple[dict, float]:
    """Ask the child to run ``mode``; once the server holds one of its reads, send SIGINT; return its report."""
    proc.stdin.write(f"{mode} {source} {dest}\n")
    proc.stdin.flush()
    assert proc.stdout.readline().split() == ["go", mode]
    deadline = time.monotonic() + 30
    while rule.fired == 0:
        assert time.monotonic() < deadline, "the child never reached the server"
        time.sleep(0.01)
    time.sleep(0.1)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    report = json.loads(proc.stdout.readline())
    return report, time.monotonic() - start


def test_ctrl_c_stops_load_stream_and_pull_promptly(child, http_server, http_dir, tmp_path):
    tensors = llama_like_tensors(layers=2, hidden=128, intermediate=384, vocab=512)
    ckpt = write_sharded(http_dir / "ckpt", tensors, 3)
    base = http_server.url_for(ckpt) + "/"
    dest = tmp_path / "pulled"
    for mode in ("pull", "load", "stream"):
        # Shards 1 and 2 arrive whole; every read of shard 3 after its size probe hangs: Ctrl-C comes mid-load.
        http_server.faults.clear()
        rule = http_server.faults._add(HangAfter(pattern="*00003-of-00003*", after=1))
        report, seconds = interrupt(child, rule, mode, base, str(dest))
        assert report["result"] == "interrupted", report
        assert seconds < 3.0, f"{mode}: took {seconds:.1f} s to stop"
        assert report["threads"] == [], f"{mode}: threads left: {report['threads']}"
        assert report["sockets"] == [], f"{mode}: sockets left: {report['sockets']}"
    # pull: nothing partial under a final name; what is there is whole and exact.
    final = [p for p in dest.rglob("*") if p.is_file() and ".fastload" not in p.name and ".fastload" not in p.parts]
    assert not any(p.name.startswith("model-00003") for p in final), "the hung shard is not under its final name"
    assert any(p.name.startswith("model-00001") for p in final), "the shards that arrived are there"
    for path in final:
        assert path.read_bytes() == (ckpt / path.relative_to(dest)).read_bytes(), path
    child.stdin.close()
    assert child.wait(timeout=10) == 0
