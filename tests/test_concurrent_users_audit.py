"""Concurrent use, the way a service uses fastload: many threads, several event loops, processes.

Covers: 8 threads sharing one LoadConfig on the same and on different checkpoints (local, HTTP, both
HTTP engines); one Trace shared by loads running at once (also with a path, and a path shared by many
loads); a stream consumed while another load runs in the same thread; ``aload`` from several loops in
several threads; sync ``load`` inside running loops while other threads load; two processes running
``fastload pull`` into one destination (plain and HF cache); a file atomically replaced mid-load (local and
HTTP); ``os.fork`` after loads and multiprocessing pools (fork and spawn). Leak checks after each.

Real servers from conftest / hub_server; nothing of fastload is mocked.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, hub, hub_session, repo_name  # noqa: F401 -- fixtures
from reliability_helpers import (QUICK, Leaks, assert_bit_exact, bounded, fds, private_tmp,  # noqa: F401
                                 wait_for_no_new_fds, write_checkpoint)

import fastload

TESTS = Path(__file__).resolve().parent


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    env.update(extra)
    return env


def run_threads(jobs, timeout: float = 20.0) -> dict:
    """Run each ``fn`` of ``jobs`` ({key: fn}) in its own thread, started together; {key: result or exception}."""
    barrier = threading.Barrier(len(jobs))
    results: dict = {}

    def body(key, fn):
        barrier.wait()
        try:
            results[key] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            results[key] = exc

    threads = [threading.Thread(target=body, args=(k, f), name=f"audit-{k}") for k, f in jobs.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a load hung"
    return results


def ok(results: dict) -> None:
    bad = {k: v for k, v in results.items() if isinstance(v, BaseException)}
    assert not bad, f"loads failed: {bad!r}"


@pytest.fixture
def four(http_server, http_dir, tmp_path):
    """Two local and two HTTP checkpoints: [(source, tensors, path)]."""
    out = []
    for i in range(4):
        remote = i >= 2
        path, tensors = write_checkpoint((http_dir if remote else tmp_path) / f"c{i}.safetensors", seed=10 + i,
                                         count=3 + i)
        out.append((http_server.url_for(path) if remote else str(path), tensors, path))
    return out


# -- many threads -------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_eight_threads_one_config_same_and_different_checkpoints(engine, four, http_server):
    """Eight threads, one shared LoadConfig: two threads on each of two local and two HTTP checkpoints (the same
    checkpoint twice, different ones side by side). Every result bit-exact; afterwards no thread, socket or
    file of the loads is left."""
    config = QUICK.replace(http_engine=engine)
    fastload.load(four[2][0], config=config)  # one-time imports and initialisation outside the leak count
    with Leaks({http_server.port}) as leaks:
        jobs = {(i, k): (lambda s=src: fastload.load(s, config=config))
                for i, (src, _, _) in enumerate(four) for k in range(2)}
        results = run_threads(jobs)
        ok(results)
        for (i, _), got in results.items():
            assert_bit_exact(got, four[i][1])
        leaks.check(grace_s=2.0)


def test_eight_threads_with_dtype_names_and_progress_share_nothing(four, http_server):
    """Threads sharing a config but each with its own names/dtype/progress: each progress callback sees only
    its own load (monotonic, ends at its own total), each result has only its own names."""
    config = QUICK
    seen: dict = {}

    def job(key, src, tensors):
        names = sorted(tensors)[: 1 + key % 3]
        calls = seen.setdefault(key, [])
        got = fastload.load(src, config=config, names=names, dtype="float64" if key % 2 else None,
                            progress=lambda d, t: calls.append((d, t)))
        return names, got

    jobs = {k: (lambda k=k: job(k, four[k % 4][0], four[k % 4][1])) for k in range(8)}
    results = run_threads(jobs)
    ok(results)
    for key, (names, got) in results.items():
        tensors = four[key % 4][1]
        assert list(got) == [n for n in tensors if n in names] or set(got) == set(names)
        for n in names:
            want = tensors[n].to(torch.float64) if key % 2 and tensors[n].is_floating_point() else tensors[n]
            assert torch.equal(got[n], want), (key, n)
        calls = seen[key]
        total = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
        assert calls, key
        assert all(t == total for _, t in calls), (key, calls[:3], total)
        assert [d for d, _ in calls] == sorted(d for d, _ in calls), key
        assert calls[-1][0] == total, (key, calls[-1], total)


# -- one Trace, several loads at once ------------------------------------------------------------------


def test_one_trace_two_concurrent_loads_local_and_http_reports_both(four):
    """README: a Trace "Records one or more loads. Thread-safe". Two loads at once into one Trace: both
    bit-exact, and the trace reports both of them, no more, no less (bytes, chunks, per file)."""
    (la, ta, pa), (ha, th, ph) = four[0], four[2]
    alone = {}
    for src in (la, ha):  # what each load records on its own
        t = fastload.Trace()
        fastload.load(src, config=QUICK, trace=t)
        alone[src] = t.summary()
    trace = fastload.Trace()
    results = run_threads({"a": lambda: fastload.load(la, config=QUICK, trace=trace),
                           "b": lambda: fastload.load(ha, config=QUICK, trace=trace)})
    ok(results)
    assert_bit_exact(results["a"], ta)
    assert_bit_exact(results["b"], th)
    s = trace.summary()
    assert s.bytes_fetched == alone[la].bytes_fetched + alone[ha].bytes_fetched == pa.stat().st_size + ph.stat().st_size
    assert s.chunks == alone[la].chunks + alone[ha].chunks
    assert s.bytes_by_file == {**alone[la].bytes_by_file, **alone[ha].bytes_by_file}
    assert not s.errors
    assert abs(sum(s.breakdown.values()) - s.wall_s) < 1e-6
    d = trace.to_dict()
    assert len(d["chunks"]) == s.chunks and json.dumps(d)
    assert json.dumps(trace.to_chrome())


def test_trace_read_while_loads_that_share_it_are_running(four):
    """A monitoring thread polls ``summary()``, ``to_dict()`` and ``to_chrome()`` of a Trace that four loads are
    writing into at that moment: never an exception, and every summary's breakdown adds up to its wall time."""
    trace = fastload.Trace()
    stop = threading.Event()
    polls, errors = [], []

    def poll():
        while not stop.is_set():
            try:
                s = trace.summary()
                assert abs(sum(s.breakdown.values()) - s.wall_s) < 1e-6, s.breakdown
                json.dumps(trace.to_dict())
                json.dumps(trace.to_chrome())
                polls.append(s.bytes_fetched)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        results = run_threads({i: (lambda s=src: [fastload.load(s, config=QUICK, trace=trace) for _ in range(3)])
                               for i, (src, _, _) in enumerate(four)})
    finally:
        stop.set()
        watcher.join(5)
    ok(results)
    assert not errors, errors[0]
    assert polls and polls == sorted(polls), "bytes_fetched went backwards between polls"
    assert trace.summary().bytes_fetched == 3 * sum(p.stat().st_size for _, _, p in four)


def test_one_trace_shared_by_a_failing_and_a_succeeding_load(four, http_server):
    """Two loads at once into one Trace, one of a missing URL: the good one returns its tensors, the bad one
    raises SourceNotFoundError, and the trace records exactly that one error."""
    trace = fastload.Trace()
    missing = http_server.url + "absent/model.safetensors"
    results = run_threads({"good": lambda: fastload.load(four[2][0], config=QUICK, trace=trace),
                           "bad": lambda: fastload.load(missing, config=QUICK, trace=trace)})
    assert isinstance(results["bad"], fastload.SourceNotFoundError), results["bad"]
    assert not isinstance(results["good"], BaseException), results["good"]
    assert_bit_exact(results["good"], four[2][1])
    s = trace.summary()
    assert len(s.errors) == 1 and "SourceNotFoundError" in s.errors[0], s.errors
    assert s.bytes_fetched >= four[2][2].stat().st_size


def test_one_trace_with_a_path_shared_by_concurrent_loads(four, tmp_path):
    """``Trace("out.json")`` passed to loads running at once (four threads, three loads each): the trace file is
    written when each load ends. No load may fail because of another's write, and the file left is a valid
    trace; no temporary file is left beside it."""
    out = tmp_path / "shared.json"
    trace = fastload.Trace(out)
    results = run_threads({i: (lambda s=four[i % 2][0]: [fastload.load(s, config=QUICK, trace=trace)
                                                        for _ in range(3)]) for i in range(4)})
    ok(results)
    doc = json.loads(out.read_text())
    assert doc["fastload"]["summary"]["bytes_fetched"] > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("shared")) == ["shared.json"]


def test_many_threads_writing_trace_to_the_same_path(four, tmp_path):
    """A service that passes ``trace="/var/log/load.json"`` on every request: eight threads loading at once
    with the same trace path. Every load must succeed (the trace write of one must not break another's) and
    the file must be a complete, parseable trace; no temporary file is left beside it."""
    out = tmp_path / "load.json"

    def many(src):
        for _ in range(5):
            fastload.load(src, config=QUICK, trace=str(out))
        return True

    results = run_threads({i: (lambda s=four[i % 2][0]: many(s)) for i in range(8)}, timeout=30)
    ok(results)
    json.loads(out.read_text())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("load.json")] == ["load.json"]


# -- a stream and another load in one thread -------------------------------------------------------------


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_stream_consumed_while_other_loads_run_in_the_same_thread(engine, four):
    """Between two items of an HTTP stream the same thread runs a whole local load, a plan and a nested
    stream of another HTTP checkpoint: everything is bit-exact and the outer stream still delivers all."""
    config = QUICK.replace(http_engine=engine)
    outer_src, outer_t, _ = four[2]
    got, inner = {}, []
    with fastload.stream(outer_src, config=config) as s:
        for i, (name, tensor) in enumerate(s):
            got[name] = tensor
            if i == 0:
                inner.append((fastload.load(four[0][0], config=config), four[0][1]))
                assert fastload.plan(four[3][0], config=config).tensors
                with fastload.stream(four[3][0], config=config) as s2:
                    inner.append((dict(s2), four[3][1]))
            if i == 1:
                inner.append((bounded(lambda: fastload.load(four[1][0], config=config), 10), four[1][1]))
    assert_bit_exact(got, outer_t)
    assert len(inner) == 3
    for result, want in inner:
        assert_bit_exact(result, want)


# -- event loops in several threads ------------------------------------------------------------------------


def test_aload_from_several_event_loops_in_several_threads(four, http_server):
    """Four threads, each with its own event loop, each gathering four ``aload``s (both HTTP engines) at once."""
    configs = [QUICK, QUICK.replace(http_engine="aiohttp")]

    def in_loop(k):
        async def main():
            return await asyncio.gather(*(fastload.aload(src, config=configs[(k + i) % 2])
                                          for i, (src, _, _) in enumerate(four)))
        return asyncio.run(main())

    in_loop(0)  # one-time imports outside the count
    before = fds()
    with Leaks({http_server.port}) as leaks:
        results = run_threads({k: (lambda k=k: in_loop(k)) for k in range(4)})
        ok(results)
        for got in results.values():
            for result, (_, want, _) in zip(got, four):
                assert_bit_exact(result, want)
        leaks.check(grace_s=2.0)
    assert not wait_for_no_new_fds(before, grace_s=2.0), "descriptors left open (event loops, pipes, files)"


def test_sync_load_inside_running_loops_while_other_threads_load(four, http_server):
    """The Jupyter case, several at once: two threads each run an event loop whose coroutine calls the sync
    ``fastload.load`` (it must run its own loop in a private thread), while two other threads call it plainly,
    and the loops keep ticking meanwhile (the sync call blocks only its caller, it must not deadlock)."""

    def jupyter(src):
        async def cell():
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.001)
                    ticks += 1

            task = asyncio.ensure_future(ticker())
            await asyncio.sleep(0)
            try:
                first = fastload.load(src, config=QUICK)
                second = fastload.load(src, config=QUICK.replace(http_engine="aiohttp"))
            finally:
                task.cancel()
            return first, second

        return asyncio.run(cell())

    before = fds()
    with Leaks({http_server.port}) as leaks:
        results = run_threads({
            "nb-http": lambda: jupyter(four[2][0]), "nb-local": lambda: jupyter(four[0][0]),
            "plain-http": lambda: fastload.load(four[3][0], config=QUICK),
            "plain-local": lambda: fastload.load(four[1][0], config=QUICK)})
        ok(results)
        for r in results["nb-http"]:
            assert_bit_exact(r, four[2][1])
        for r in results["nb-local"]:
            assert_bit_exact(r, four[0][1])
        assert_bit_exact(results["plain-http"], four[3][1])
        assert_bit_exact(results["plain-local"], four[1][1])
        leaks.check(grace_s=2.0)
    assert not wait_for_no_new_fds(before, grace_s=2.0), "descriptors left open (event loops, pipes, files)"


def test_sync_load_leaves_the_callers_current_event_loop_alone(four):
    """A thread (or the main thread) that set an event loop it has not started yet (``asyncio.set_event_loop``:
    the old ``get_event_loop()`` pattern of gRPC, Tornado, many services) calls the sync API. fastload runs its
    own loop; afterwards the caller's current loop must still be the caller's loop, not unset."""

    def body():
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            fastload.load(four[0][0], config=QUICK)
            fastload.plan(four[2][0], config=QUICK)
            try:
                current = asyncio.get_event_loop()
            except RuntimeError as exc:
                return f"current loop gone: {exc}"
            return current is loop
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    assert bounded(body, 15) is True


def test_sync_load_from_a_loop_callback_while_other_threads_load(four, http_server):
    """A sync load made from a plain callback of a running loop (``call_soon``: no task, as some kernels and
    GUI integrations call user code) while another thread loads the same checkpoint."""

    def from_callback():
        loop = asyncio.new_event_loop()
        box = {}

        def cb():
            try:
                box["v"] = fastload.load(four[2][0], config=QUICK)
            except BaseException as exc:  # noqa: BLE001
                box["v"] = exc
            loop.stop()

        loop.call_soon(cb)
        try:
            loop.run_forever()
        finally:
            loop.close()
        return box["v"]

    results = run_threads({"cb": from_callback, "plain": lambda: fastload.load(four[2][0], config=QUICK)})
    ok(results)
    assert_bit_exact(results["cb"], four[2][1])
    assert_bit_exact(results["plain"], four[2][1])


# -- a file replaced while it is read ----------------------------------------------------------------------


def _version_of(got: dict, versions: list[dict]) -> int | None:
    for i, want in enumerate(versions):
        if all(torch.equal(got[n].reshape(-1).view(torch.uint8), want[n].reshape(-1).view(torch.uint8))
               for n in want):
            return i
    return None


def test_local_file_atomically_replaced_while_loads_run(tmp_path):
    """A writer replaces the checkpoint by rename (same names, shapes and header, other values) over and over
    while four threads load it: every load gives one version whole, or SourceChangedError; never a mix."""
    path = tmp_path / "model.safetensors"
    versions = []
    for seed in (1, 2):
        p, t = write_checkpoint(tmp_path / f"v{seed}.safetensors", seed=seed, count=8)
        versions.append((p.read_bytes(), t))
    path.write_bytes(versions[0][0])
    stop = threading.Event()
    swaps = []

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            tmp = tmp_path / f".tmp-{i}"
            tmp.write_bytes(versions[i % 2][0])
            os.replace(tmp, path)
            swaps.append(i)
            time.sleep(0.0005)

    outcomes = []

    def loader():
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            try:
                got = fastload.load(str(path), config=QUICK.replace(max_concurrency=8))
            except fastload.SourceChangedError:
                outcomes.append("changed")
                continue
            v = _version_of(got, [t for _, t in versions])
            outcomes.append(v if v is not None else "MIXED")
        return True

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    try:
        results = run_threads({k: loader for k in range(4)})
    finally:
        stop.set()
        w.join(5)
    ok(results)
    assert len(swaps) > 10 and outcomes
    assert "MIXED" not in outcomes, f"{outcomes.count('MIXED')} of {len(outcomes)} loads mixed two versions"


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_http_file_atomically_replaced_mid_load(engine, http_server, http_dir, tmp_path):
    """The served file is renamed over after the first chunk landed (one reader, so no request straddles the
    swap): the load must end with SourceChangedError (or one whole version), never a tensor of each."""
    path = http_dir / "model.safetensors"
    p1, t1 = write_checkpoint(tmp_path / "v1.safetensors", seed=1, count=8)
    p2, t2 = write_checkpoint(tmp_path / "v2.safetensors", seed=2, count=8)
    path.write_bytes(p1.read_bytes())
    swapped = []

    def progress(done, total):
        if not swapped:
            tmp = http_dir / ".swap"
            tmp.write_bytes(p2.read_bytes())
            os.replace(tmp, path)
            swapped.append(done)

    config = QUICK.replace(http_engine=engine, max_concurrency=1)
    try:
        got = fastload.load(http_server.url_for(path), config=config, progress=progress)
    except fastload.SourceChangedError as exc:
        assert "model.safetensors" in str(exc)
        return
    assert swapped and swapped[0] < sum(t.numel() * t.element_size() for t in t1.values())
    assert _version_of(got, [t1, t2]) is not None, "bytes of two versions were mixed"


# -- two processes pulling into one destination ---------------------------------------------------------------


def _two_pulls(args: list[str], env: dict, timeout: float = 40.0) -> list[subprocess.CompletedProcess]:
    cmd = [sys.executable, "-m", "fastload", "pull", *args, "--quiet"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a pull hung")
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_two_processes_pull_same_http_file_into_one_destination(http_server, http_dir, tmp_path):
    """Two ``fastload pull URL --to DIR`` processes at once (each chunk slowed a little so they overlap): both
    succeed, the file is complete and right, and nothing half-written or temporary is left."""
    path, tensors = write_checkpoint(http_dir / "model.safetensors", seed=5, count=6)
    data = path.read_bytes()
    http_server.faults.slow_first_byte(0.05, path="*model.safetensors")
    dest = tmp_path / "dest"
    procs = _two_pulls([http_server.url_for(path), "--to", str(dest), "--chunk-size", "128KiB",
                        "--concurrency", "2"], child_env())
    for p in procs:
        assert p.returncode == 0, p.stderr[-2000:]
        assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert (dest / "model.safetensors").read_bytes() == data
    leftovers = [p for p in dest.rglob("*") if p.is_file() and ("incomplete" in str(p.relative_to(dest))
                                                                 or ".tmp" in p.name)]
    assert not leftovers, leftovers
    visible = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")
                     if p.is_file() and not p.relative_to(dest).as_posix().startswith(".fastload"))
    assert visible == ["model.safetensors"]
    # Each byte came over the wire once: the second pull waited and found the file complete.
    assert http_server.bytes_sent("*model.safetensors") <= len(data) + 64, http_server.bytes_sent("*model.safetensors")


def test_two_processes_pull_one_hub_repo_into_the_hf_cache(hub: HubServer, tmp_path):
    """Two ``fastload pull hf://org/name`` processes into one HF cache at once: both succeed, the snapshot
    holds every file right (symlinks into blobs), and no incomplete blob or link is left."""
    src = tmp_path / "src"
    src.mkdir()
    p, tensors = write_checkpoint(src / "model.safetensors", seed=3, count=6)
    (src / "config.json").write_text('{"model_type": "bert"}')
    repo = repo_name("twoproc")
    commit = hub.add_repo(repo, src)
    hub.faults.slow_first_byte(0.05, path="/lfs/*")
    cache = tmp_path / "hf-cache"
    procs = _two_pulls([f"hf://{repo}", "--cache-dir", str(cache), "--chunk-size", "128KiB", "--concurrency", "2"],
                       child_env())
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-2000:]
    folder = cache / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / commit
    assert (snap / "model.safetensors").read_bytes() == p.read_bytes()
    assert (snap / "config.json").read_text() == '{"model_type": "bert"}'
    assert (snap / "model.safetensors").is_symlink()
    assert (folder / "refs" / "main").read_text().strip() == commit
    assert not [x for x in folder.rglob("*") if "incomplete" in x.name]
    # and a load from the cache, offline, is exact
    from safetensors.torch import load_file
    assert_bit_exact(load_file(str(snap / "model.safetensors")), tensors)


# -- processes: fork, multiprocessing ------------------------------------------------------------------------

PROCS = r"""
import json, os, sys, threading, time, asyncio, multiprocessing as mp, zlib
import fastload

LOCAL, URL = sys.argv[1], sys.argv[2]
CFG = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=4, stall_timeout_s=2.0)

def digest(sd):
    return {k: zlib.crc32(v.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()) for k, v in sd.items()}

def work(args):
    src, engine = args
    return digest(fastload.load(src, config=CFG.replace(http_engine=engine)))

def fork_child_checks():
    out = {}
    out["local"] = digest(fastload.load(LOCAL, config=CFG))
    out["http"] = digest(fastload.load(URL, config=CFG))
    out["aiohttp"] = digest(fastload.load(URL, config=CFG.replace(http_engine="aiohttp")))
    out["aload"] = digest(asyncio.run(fastload.aload(URL, config=CFG)))
    with fastload.stream(LOCAL, config=CFG) as s:
        out["stream"] = digest(dict(s))
    return out

if __name__ == "__main__":
    report = {}
    want = digest(fastload.load(LOCAL, config=CFG))
    report["want"] = want
    # Loads of every kind before the fork, so every pool and loop fastload ever starts has existed once.
    fastload.load(URL, config=CFG)
    fastload.load(URL, config=CFG.replace(http_engine="aiohttp"))
    asyncio.run(fastload.aload(LOCAL, config=CFG))
    with fastload.stream(URL, config=CFG) as s:
        dict(s)
    # A load running in another thread while we fork.
    busy = threading.Thread(target=lambda: [fastload.load(URL, config=CFG) for _ in range(5)])
    busy.start()
    time.sleep(0.05)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            res = fork_child_checks()
            res["threads"] = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
            os.write(w, json.dumps(res).encode())
            code = 0
        except BaseException as exc:
            os.write(w, json.dumps({"error": repr(exc)}).encode())
            code = 1
        os.close(w)
        os._exit(code)
    os.close(w)
    deadline = time.monotonic() + 25
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            status = "hung"
            break
        time.sleep(0.02)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    report["os_fork"] = {"status": status, "result": json.loads(data) if data else None}
    busy.join()
    for method in ("fork", "spawn"):
        try:
            ctx = mp.get_context(method)
            with ctx.Pool(2 if method == "fork" else 1) as pool:
                res = pool.map_async(work, [(LOCAL, "threads"), (URL, "threads"), (URL, "aiohttp"),
                                            (LOCAL, "threads")], chunksize=1).get(timeout=40)
            report[method] = res
        except BaseException as exc:
            report[method] = {"error": repr(exc)}
    # A process forked while a pull holds its destination's lock (a multiprocessing worker started while a
    # pull runs in another thread): once that pull ends, the next pull into the destination must not wait for
    # the forked child, which never pulls anything.
    dest = os.path.join(os.getcwd(), "pulled")
    paused, resume = threading.Event(), threading.Event()

    def first_progress(done, total):
        if not paused.is_set():
            paused.set()
            resume.wait(10)

    first = threading.Thread(target=lambda: fastload.pull(LOCAL, to=dest, progress=first_progress))
    first.start()
    paused.wait(10)
    child = os.fork()
    if child == 0:
        time.sleep(20)
        os._exit(0)
    resume.set()
    first.join(10)
    t0 = time.monotonic()
    second = threading.Thread(target=lambda: fastload.pull(LOCAL, to=dest), daemon=True)
    second.start()
    second.join(2.5)
    report["pull_after_fork"] = {"hung": second.is_alive(), "seconds": time.monotonic() - t0}
    os.kill(child, 9)
    os.waitpid(child, 0)
    second.join(10)
    report["threads_after"] = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    print("REPORT " + json.dumps(report), flush=True)
"""


@pytest.fixture(scope="module")
def process_report(tmp_path_factory, http_server, http_root):
    """One child process runs every process check (imports cost seconds each time); its report, parsed."""
    work = tmp_path_factory.mktemp("procs")
    local, _ = write_checkpoint(work / "model.safetensors", seed=7, count=6)
    served = http_root / "procs-model.safetensors"
    served.write_bytes(local.read_bytes())
    script = work / "procs.py"
    script.write_text(PROCS)
    proc = subprocess.run([sys.executable, str(script), str(local), http_server.url_for(served)],
                          capture_output=True, text=True, timeout=110, env=child_env(), cwd=str(work))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    return json.loads(lines[-1][len("REPORT "):]), proc.stderr


def test_fork_after_loads_child_loads_every_way(process_report):
    """``os.fork()`` after loads of every kind (and while another thread is mid-load): the child loads again
    (local, both HTTP engines, aload, stream), bit-exact, and exits; no lock or thread hangs it."""
    report, _ = process_report
    fork = report["os_fork"]
    assert fork["status"] != "hung", "the forked child hung"
    assert fork["result"] is not None and "error" not in fork["result"], fork
    assert os.waitstatus_to_exitcode(fork["status"]) == 0, fork
    for key in ("local", "http", "aiohttp", "aload", "stream"):
        assert fork["result"][key] == report["want"], key
    assert fork["result"]["threads"] == [], f"threads left in the child: {fork['result']['threads']}"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_pool_workers_load(process_report, method):
    report, _ = process_report
    res = report[method]
    assert not (isinstance(res, dict) and "error" in res), res
    assert res == [report["want"]] * 4


def test_pull_lock_not_held_by_a_process_forked_during_a_pull(process_report):
    """A process forked while a pull held its destination's lock (``multiprocessing`` with fork, a worker
    started as a service boots) inherits the lock's descriptor. README: "Two pulls into one destination ...
    take turns: the second waits for the first": it must wait for the first pull only, not for that
    unrelated child to exit (it is released when the pull ends, not only when every copy is closed)."""
    report, _ = process_report
    assert not report["pull_after_fork"]["hung"], (
        f"a pull waited {report['pull_after_fork']['seconds']:.1f} s for a forked child holding the lock")


def test_processes_leave_no_threads_and_print_no_warnings(process_report):
    report, stderr = process_report
    assert report["threads_after"] == [], report["threads_after"]
    assert not any(w in stderr for w in ("Traceback", "Exception ignored", "Task was destroyed", "Unclosed",
                                         "leaked", "DeprecationWarning: This process")), stderr[-3000:]
