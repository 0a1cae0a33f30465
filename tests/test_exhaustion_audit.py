"""A service near its limits: fastload when memory or threads run out.

One child process (``_CHILD``) runs every scenario in turn and prints a JSON report line per scenario; the test
process only serves the checkpoint (HTTP, S3) and judges the reports. Memory runs out through ``RLIMIT_AS`` set a
few MiB above what the child uses at that moment; thread creation fails through ``threading.stack_size`` set far
beyond any address space (``Thread.start`` raises "can't start new thread"), flipped from the load's progress
callback so that it hits fastload's worker pools, its stream thread, its HTTP body threads or its detached calls
at the moment they start. After each scenario the limits are lifted and the child reports:

* how the call ended (result bit-exact against ``safetensors``, or the error's type and message), and how fast;
* fastload threads, file descriptors and sockets that the failed call left behind;
* whether a second, smaller load then works (the process is still usable).

``MALLOC_ARENA_MAX=1`` and ``OMP_NUM_THREADS=1`` keep glibc's per-thread arenas and torch's OpenMP team out of the
picture (see the report: under ``RLIMIT_AS`` libgomp kills the process when it cannot start its team). Every
scenario has an alarm, and the child a timeout: a hang fails its test instead of the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

_CHILD = textwrap.dedent(r'''
    import asyncio, json, os, resource, signal, sys, threading, time, traceback
    import torch, fastload
    import fastload.sources.http, fastload.sources.s3  # a service that loaded before has these imported
    # and botocore, which S3 loads import lazily: an import that runs out of memory half-way is CPython's
    # SystemError ("error return without exception set"), not fastload's to type; whether the first S3 load
    # imported it under the cap depended on a few MB of headroom
    import botocore.session
    from safetensors.torch import load_file

    HUGE = 1 << 45  # a thread stack no address space holds: Thread.start raises "can't start new thread"
    cfg = json.loads(sys.argv[1])

    def vm():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize"):
                return int(line.split()[1]) * 1024

    def ours():
        return {t.ident: t.name for t in threading.enumerate() if t.name.startswith("fastload")}

    def fds():
        out = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                out[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass
        return out

    def unlimit():
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        threading.stack_size(0)

    def memory(headroom_mib):
        threading.stack_size(256 << 10)  # threads cheap in address space: what fails is the load's memory
        resource.setrlimit(resource.RLIMIT_AS, (vm() + (headroom_mib << 20), resource.RLIM_INFINITY))

    def no_threads():
        threading.stack_size(HUGE)

    def flip_at(when):
        """A progress callback: thread creation fails from the call where ``when(done, total)``."""
        def progress(done, total):
            if when(done, total):
                no_threads()
        return progress

    START = flip_at(lambda d, t: d == 0)
    MID = flip_at(lambda d, t: 0 < d < t)

    def streamed(src, **kw):
        out = {}
        with fastload.stream(src, **kw) as s:
            for name, tensor in s:
                out[name] = tensor
        return out

    def same(got, want):
        return set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)

    def alarm(*_):
        raise TimeoutError("HUNG: the scenario did not end within its alarm")

    signal.signal(signal.SIGALRM, alarm)
    big, small = cfg["big"], cfg["small"]
    want = {"big": load_file(big), "small": load_file(small)}
    want["half"] = {k: v.to(torch.float16) for k, v in want["big"].items()}
    source = {"local": big, "http": cfg["http"], "s3": cfg["s3"]}

    def pulled(src, dest, progress=None):
        fastload.pull(src, to=dest, progress=progress)
        return {}

    def pull_state(dest, origin):
        """Files under their final names in ``dest``: whether each is whole (same bytes as its origin)."""
        out = {}
        for root, _, files in os.walk(dest):
            for f in files:
                rel = os.path.relpath(os.path.join(root, f), dest)
                if rel.split(os.sep)[0].startswith(".") or ".fastload" in rel:
                    continue  # temporaries and journals live under hidden names
                with open(os.path.join(root, f), "rb") as fh:
                    data = fh.read()
                with open(os.path.join(origin, os.path.basename(rel)), "rb") as fh:
                    out[rel] = data == fh.read()
        return out

    scenarios = {
        # -- memory: RLIMIT_AS a few MiB above the child's use ------------------------------------------------
        "mem_load_local": (lambda: (memory(4), fastload.load(source["local"]))[1], "big"),
        "mem_stream_http": (lambda: (memory(4), streamed(source["http"]))[1], "big"),
        "mem_aload_s3": (lambda: (memory(4), asyncio.run(fastload.aload(source["s3"])))[1], "big"),
        "mem_load_file_url": (lambda: (memory(4), fastload.load(Path_uri(big)))[1], "big"),
        # fits (float16 outputs: 8 MiB) but the conversion's staging buffers do not
        "mem_convert_local": (lambda: (memory(12), fastload.load(source["local"], dtype=torch.float16))[1], "half"),
        "mem_convert_stream_http": (lambda: (memory(12), streamed(source["http"], dtype=torch.float16))[1], "half"),
        # -- threads: Thread.start fails ----------------------------------------------------------------------
        "thr_load_local": (lambda: (no_threads(), fastload.load(small))[1], "small"),
        "thr_stream_enter": (lambda: (no_threads(), streamed(small))[1], "small"),
        "thr_local_mid": (lambda: fastload.load(big, progress=MID, config=fastload.LoadConfig(
            chunk_bytes=1 << 20, local_threads=4, max_concurrency=4)), "big"),
        "thr_convert_workers": (lambda: fastload.load(big, dtype=torch.float16, progress=START), "half"),
        "thr_http_bodies_start": (lambda: fastload.load(source["http"], progress=START), "big"),
        "thr_http_bodies_mid": (lambda: fastload.load(source["http"], progress=MID), "big"),
        "thr_aload_http_mid": (lambda: asyncio.run(fastload.aload(source["http"], progress=MID)), "big"),
        "thr_stream_http_mid": (lambda: streamed(source["http"], progress=MID), "big"),
        "thr_s3_detached": (lambda: (no_threads(), fastload.load(source["s3"]))[1], "big"),
        # -- pull: never a file under its final name that is not whole ---------------------------------------
        "pull_thr_local_mid": (lambda: pulled(cfg["pull_dir"], cfg["dest"] + "/a", MID), "pull"),
        "pull_thr_http_mid": (lambda: pulled(source["http"], cfg["dest"] + "/b", MID), "pull"),
        "pull_mem_local": (lambda: (memory(4), pulled(cfg["pull_dir"], cfg["dest"] + "/c"))[1], "pull"),
    }

    def Path_uri(p):
        import pathlib
        return pathlib.Path(p).as_uri()

    for label in cfg["only"] or scenarios:
        fn, expect = scenarios[label]
        threads_before, fds_before = ours(), fds()
        report = {}
        start = time.monotonic()
        signal.alarm(cfg["alarm_s"])
        try:
            got = fn()
            signal.alarm(0)
            report["ok"] = True
            report["exact"] = expect == "pull" or same(got, want[expect])
            report["n"] = len(got)
            del got
        except BaseException as exc:
            signal.alarm(0)
            report["ok"] = False
            report["type"] = type(exc).__name__
            report["mro"] = [c.__name__ for c in type(exc).__mro__]
            report["msg"] = str(exc)[:300]
            report["where"] = traceback.format_exception(exc)[-3:]
            del exc
        report["s"] = round(time.monotonic() - start, 2)
        unlimit()
        time.sleep(0.2)  # (threads that end by themselves have ended)
        report["threads_left"] = sorted(n for i, n in ours().items() if i not in threads_before)
        report["fds_left"] = sorted(v for k, v in fds().items() if k not in fds_before)
        if expect == "pull":
            dest = {"pull_thr_local_mid": "/a", "pull_thr_http_mid": "/b", "pull_mem_local": "/c"}[label]
            origin = cfg["pull_dir"] if label != "pull_thr_http_mid" else os.path.dirname(big)
            report["final_after_failure"] = pull_state(cfg["dest"] + dest, origin)
        try:  # the process is still usable: the same call again, unlimited, then a small load
            if expect == "pull":
                fn_src = cfg["pull_dir"] if label != "pull_thr_http_mid" else source["http"]
                fastload.pull(fn_src, to=cfg["dest"] + dest)
                report["final_after_retry"] = pull_state(cfg["dest"] + dest, origin)
                report["after_ok"] = True
            else:
                report["after_ok"] = same(fastload.load(small), want["small"])
        except BaseException as exc:
            report["after_ok"] = f"{type(exc).__name__}: {exc}"[:300]
        print(json.dumps({label: report}), flush=True)
''')

LABELS = ["mem_load_local", "mem_stream_http", "mem_aload_s3", "mem_load_file_url", "mem_convert_local",
          "mem_convert_stream_http", "thr_load_local", "thr_stream_enter", "thr_local_mid", "thr_convert_workers",
          "thr_http_bodies_start", "thr_http_bodies_mid", "thr_aload_http_mid", "thr_stream_http_mid",
          "thr_s3_detached", "pull_thr_local_mid", "pull_thr_http_mid", "pull_mem_local"]


@pytest.fixture(scope="module")
def reports(tmp_path_factory, http_server, http_root, s3_server):
    work = tmp_path_factory.mktemp("exhaustion")
    g = torch.Generator().manual_seed(7)
    big = {f"layer.{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(4)}  # 16 MiB of float32
    small = {f"s.{i}": torch.randn(32, 32, generator=g) for i in range(3)}
    served = http_root / f"exhaustion-{uuid.uuid4().hex[:8]}"
    served.mkdir()
    save_file(big, served / "model.safetensors")
    save_file(small, work / "small.safetensors")
    pull_dir = work / "repo"
    pull_dir.mkdir()
    shutil.copy(served / "model.safetensors", pull_dir / "model.safetensors")
    (pull_dir / "config.json").write_text(json.dumps({"hidden_size": 1024}))
    bucket = f"exhaustion-{uuid.uuid4().hex[:8]}"
    s3_server.put(bucket, "model.safetensors", (served / "model.safetensors").read_bytes())
    dest = work / "pulled"
    dest.mkdir()
    cfg = {"big": str(served / "model.safetensors"), "small": str(work / "small.safetensors"),
           "http": http_server.url_for(served / "model.safetensors"), "s3": f"s3://{bucket}/model.safetensors",
           "pull_dir": str(pull_dir), "dest": str(dest), "alarm_s": 6, "only": []}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MALLOC_ARENA_MAX": "1",
           "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], capture_output=True, text=True,
                              timeout=60, env=env)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:  # what it reported before it hung still counts
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        rc = "timeout"
    got = {}
    for line in out.splitlines():
        if line.startswith("{"):
            got.update(json.loads(line))
    got["_child"] = {"rc": rc, "stderr": err[-3000:], "s": round(time.monotonic() - started, 1)}
    return got


def _report(reports, label):
    assert label in reports, f"{label}: no report (the child hung or died before it): {reports['_child']}"
    return reports[label]


def _left_nothing(r):
    assert r["threads_left"] == [], f"fastload threads left running after the failed call: {r}"
    assert r["fds_left"] == [], f"descriptors (files, sockets) left open after the failed call: {r}"
    assert r["after_ok"] is True, f"the next load in the same process failed: {r}"


def _memory_error(r):
    """MemoryError, or a fastload error that says memory could not be allocated."""
    if r["ok"]:
        return False
    if "MemoryError" in r["mro"]:
        return True
    return "FastloadError" in r["mro"] and any(w in r["msg"].lower() for w in ("memory", "allocate"))


def _thread_error(r):
    """A clear error: it says that a thread could not be started (RuntimeError as CPython raises it, or typed)."""
    return not r["ok"] and "thread" in r["msg"].lower() and ("RuntimeError" in r["mro"] or "FastloadError" in r["mro"])


def test_child_ran_every_scenario(reports):
    child = reports["_child"]
    assert child["rc"] == 0, child
    assert set(LABELS) <= set(reports), (sorted(set(LABELS) - set(reports)), child)


# -- memory ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["mem_load_local", "mem_stream_http", "mem_aload_s3", "mem_load_file_url"])
def test_checkpoint_bigger_than_memory_left_fails_as_memory_error(reports, label):
    """16 MiB to load with 4 MiB of address space left: the outputs cannot be allocated. A user catches
    ``MemoryError`` (or a fastload error naming the allocation), quickly; not torch's ``RuntimeError`` from
    ``alloc_cpu.cpp`` (README: third-party exceptions never leak; a CUDA OOM becomes ``DeviceError``)."""
    r = _report(reports, label)
    assert not r["ok"], f"loaded 16 MiB in 4 MiB of headroom? {r}"
    assert _memory_error(r), f"not a MemoryError / typed fastload error: {r['type']}: {r['msg']} at {r['where']}"
    assert r["s"] < 3, r
    _left_nothing(r)


@pytest.mark.parametrize("label", ["mem_convert_local", "mem_convert_stream_http"])
def test_outputs_fit_but_staging_does_not(reports, label):
    """The float16 outputs fit, the conversion's staging buffers do not: either the load manages with the
    buffers it could get (bit-exact result) or it fails as a memory error; never a partial result, never an
    untyped torch error; and nothing is left behind."""
    r = _report(reports, label)
    if r["ok"]:
        assert r["exact"], f"a result that is not the checkpoint: {r}"
    else:
        assert _memory_error(r) or _thread_error(r), \
            f"not a MemoryError / typed fastload error: {r['type']}: {r['msg']} at {r['where']}"
    assert r["s"] < 3, r
    _left_nothing(r)


# -- threads -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["thr_load_local", "thr_local_mid", "thr_convert_workers", "thr_s3_detached",
                                   "thr_http_bodies_start", "thr_http_bodies_mid", "thr_aload_http_mid",
                                   "thr_stream_http_mid"])
def test_thread_creation_failure_is_clear_and_leaves_nothing(reports, label):
    """Thread creation fails when fastload starts its pread pool, conversion workers, detached S3 calls or HTTP
    body threads: the call fails (or completes bit-exactly) at once, with an error saying what failed, and the
    threads and sockets it did start are gone."""
    r = _report(reports, label)
    if r["ok"]:
        assert r["exact"], f"a result that is not the checkpoint: {r}"
    else:
        assert _thread_error(r), f"not a clear error: {r['type']}: {r['msg']} at {r['where']}"
    assert r["s"] < 3, r
    _left_nothing(r)


def test_stream_whose_thread_cannot_start_fails_at_once(reports):
    """``with fastload.stream(...)`` when its loader thread cannot start: the error comes at once. The close on
    the way out must not wait for the start of a thread that was never created."""
    r = _report(reports, "thr_stream_enter")
    assert _thread_error(r), r
    assert r["s"] < 1.0, f"entering the stream took {r['s']} s to report that its thread could not start"
    _left_nothing(r)


# -- pull ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["pull_thr_local_mid", "pull_thr_http_mid", "pull_mem_local"])
def test_pull_at_the_limits_never_publishes_a_partial_file(reports, label):
    """A pull that runs out of threads or memory half-way: no file under its final name that is not whole; the
    error is clear; the next pull, unlimited, completes every file; nothing is left running or open."""
    r = _report(reports, label)
    assert all(r["final_after_failure"].values()), f"a file under its final name is not whole: {r}"
    if r["ok"]:
        assert r["final_after_failure"], r
    else:
        assert _thread_error(r) or _memory_error(r), f"not a clear error: {r['type']}: {r['msg']} at {r['where']}"
    assert r["final_after_retry"] and all(r["final_after_retry"].values()), r
    _left_nothing(r)
