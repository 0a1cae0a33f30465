"""fastload under the process models real services use: ``os.fork`` (gunicorn / celery preload), multiprocessing
with ``spawn`` and ``forkserver``, several processes loading (and pulling into one destination) at once.

Goes beyond test_concurrent_users_audit.py (fork after local/HTTP loads, fork/spawn pools of local and HTTP,
a pull lock copied into a forked child), test_process_robustness_audit.py (fork while other threads loop over
local/HTTP loads, a spawn child loading a pickled plan), test_api_concurrency_corners.py (fork with a stream open
in the forking thread) and test_process_lifecycle_audit.py (a forked child's ``sys.exit`` with a parent load in a
daemon thread):

- fork after S3 loads too (botocore, presigned GETs, a ``botocore`` session shared through ``S3Options``);
- fork while the parent's loads are paused mid-way in other threads (a consumer holding a stream, a progress
  callback holding a load's own loop), then the parent's loads finish, exact;
- ``spawn`` and ``forkserver`` pools of 3 loading local, HTTP and S3 (endpoint given in ``LoadConfig`` only), the
  state dicts sent back through the pool and through a ``multiprocessing.Queue``;
- 4 processes loading one cold local checkpoint at once, with ``direct_io`` and without;
- 3 processes pulling one HTTP file into one destination at once; a pull process killed with SIGKILL mid-way
  (several times), then a pull that completes it;
- a forked child exiting (``os._exit``, ``sys.exit``, falling off the end) while the parent's fastload objects
  (streams, an ``aload``'s pool, a load held in a daemon thread) exist, with loads of its own left open.

Every script runs in a subprocess with a hard timeout (``faulthandler`` dumps where it hung) and prints one JSON
verdict line; tensors are compared with ``safetensors.torch.load_file`` of the same bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_helpers import write_checkpoint
from safetensors.torch import load_file
from servers.faults import SlowFirstByte

import fastload

TESTS = Path(__file__).resolve().parent

PRELUDE = r'''
import faulthandler, hashlib, json, os, signal, sys, threading, time
# Where a hang is: run_script sends SIGUSR1 to the whole process group at its hard limit. (Not
# dump_traceback_later: its watchdog thread is not fork-safe, a forked child then hangs in its own exit.)
faulthandler.register(signal.SIGUSR1, all_threads=True)
import fastload


def digest(sd):
    """dtype, shape and sha256 of each tensor's bytes (numpy, no torch op: safe in a forked child)"""
    return {k: [str(v.dtype), list(v.shape), hashlib.sha256(v.numpy().tobytes()).hexdigest()]
            for k, v in sorted(sd.items())}


def verdict(obj):
    print("VERDICT " + json.dumps(obj), flush=True)


def others():
    return sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())


def forked(fn, limit, scratch):
    """fn() in a forked child, which has ``limit`` seconds (then it is killed): its result, exit and time."""
    out = os.path.join(scratch, f"forked-{time.monotonic_ns()}.json")
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            res = {"ok": fn()}
        except BaseException as exc:
            import traceback
            res = {"error": repr(exc), "tb": traceback.format_exc()[-3000:]}
            code = 3
        with open(out, "w") as f:
            json.dump(res, f)
        os._exit(code)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - t0 > limit:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"hung": True, "seconds": time.monotonic() - t0}
        time.sleep(0.01)
    res = json.load(open(out)) if os.path.exists(out) else {"error": "no result"}
    res.update(exit=os.waitstatus_to_exitcode(status), seconds=round(time.monotonic() - t0, 2))
    return res
'''


def digest(sd) -> dict:
    return {k: [str(v.dtype), list(v.shape), hashlib.sha256(v.numpy().tobytes()).hexdigest()]
            for k, v in sorted(sd.items())}


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]), "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def run_script(code: str, *args: str, tmp_path: Path, hard_s: float = 40.0, env: dict | None = None,
               name: str = "script.py") -> tuple[dict, str]:
    """Run PRELUDE + code as a file (spawn and forkserver need one); its VERDICT and stderr. Past ``hard_s`` every
    process of the script dumps its threads and is killed."""
    script = tmp_path / name
    script.write_text(PRELUDE + code)
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=str(tmp_path), env=env or child_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=hard_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGUSR1)  # every process of the script dumps its threads
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the script hung past its hard limit ({hard_s} s): {out[-1500:]}\n{err[-6000:]}")
    lines = [line for line in out.splitlines() if line.startswith("VERDICT ")]
    assert proc.returncode == 0 and lines, (
        f"exit {proc.returncode}: stdout {out[-1500:]!r}\nstderr {err[-4000:]}")
    return json.loads(lines[-1][len("VERDICT "):]), err


def fastload_noise(err: str) -> list[str]:
    marks = ("Traceback", "Exception ignored", "Task was destroyed", "Unclosed", "ResourceWarning", "Error",
             "terminate called", "Fatal Python error")
    return [line for line in err.splitlines() if any(m in line for m in marks)]


@pytest.fixture
def sources(http_server, http_dir, s3_server, s3_bucket):
    """One checkpoint, three ways: local path, HTTP URL, S3 URL (AWS env pointed at moto by the fixture)."""
    path, _ = write_checkpoint(http_dir / "pm.safetensors", seed=31, count=6)
    key = f"pm-{time.monotonic_ns()}/model.safetensors"
    s3_server.put(s3_bucket, key, path.read_bytes())
    return {"local": str(path), "http": http_server.url_for(path), "s3": f"s3://{s3_bucket}/{key}",
            "endpoint": s3_server.endpoint_url, "want": digest(load_file(str(path)))}


# -- fork after loads of every source -----------------------------------------------------------------------------


FORK_AFTER_LOADS = r'''
import botocore.session
local, url, s3 = sys.argv[1:4]
cfg = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=4, stall_timeout_s=5.0)
shared = cfg.replace(s3=fastload.S3Options(session=botocore.session.Session()))  # README: reuse one per process
kinds = {"local": (local, cfg), "http": (url, cfg), "aiohttp": (url, cfg.replace(http_engine="aiohttp")),
         "s3": (s3, cfg), "s3-shared-session": (s3, shared),
         "local-direct": (local, cfg.replace(direct_io=True))}


def every_way():
    got = {k: digest(fastload.load(src, config=c)) for k, (src, c) in kinds.items()}
    with fastload.stream(s3, config=cfg) as st:
        got["s3-stream"] = digest(dict(st))
    return got


before = every_way()
child = forked(lambda: {**every_way(), "threads": others()}, 20, os.getcwd())
after = every_way()
verdict({"before": before, "child": child, "after": after, "threads": others()})
'''


def test_fork_after_local_http_and_s3_loads_child_and_parent_load_again(sources, tmp_path):
    """A service preloads (local, both HTTP engines, S3 with a fresh and with a shared botocore session, a stream),
    then forks its workers. The child loads every way again, exact, without hanging on anything inherited; the
    parent still loads afterwards."""
    v, err = run_script(FORK_AFTER_LOADS, sources["local"], sources["http"], sources["s3"], tmp_path=tmp_path)
    want = sources["want"]
    child = v["child"]
    assert not child.get("hung"), f"the forked child hung ({child['seconds']:.1f} s)"
    assert "error" not in child, child
    assert child["exit"] == 0
    for phase in ("before", "after"):
        for kind, got in v[phase].items():
            assert got == want, f"{phase}: {kind}"
    for kind, got in child["ok"].items():
        if kind != "threads":
            assert got == want, f"forked child: {kind}"
    assert child["ok"]["threads"] == [], child["ok"]["threads"]
    assert v["threads"] == [], v["threads"]


# -- fork while loads are paused mid-way in other threads ----------------------------------------------------------


FORK_MID_FLIGHT = r'''
local, url, s3 = sys.argv[1:4]
cfg = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=2, stall_timeout_s=10.0)
resume = threading.Event()
paused = {}
results = {}


def holding_stream(key, src):  # a consumer that took one tensor and now waits (a slow model.copy_)
    try:
        with fastload.stream(src, config=cfg) as st:
            it = iter(st)
            got = dict([next(it)])
            paused[key].set()
            resume.wait(30)
            got.update(it)
        results[key] = digest(got)
    except BaseException as exc:
        results[key] = repr(exc)
        paused[key].set()


def holding_progress(key, src, config=cfg):  # the load's own loop held in its progress callback: reads in flight
    def progress(done, total):
        if done and not paused[key].is_set():
            paused[key].set()
            resume.wait(30)
    try:
        results[key] = digest(fastload.load(src, config=config, progress=progress))
    except BaseException as exc:
        results[key] = repr(exc)
        paused[key].set()


jobs = {"stream-local": (holding_stream, local), "stream-http": (holding_stream, url),
        "stream-s3": (holding_stream, s3), "progress-http": (holding_progress, url),
        "progress-s3": (holding_progress, s3),
        "progress-aiohttp": (holding_progress, url, cfg.replace(http_engine="aiohttp"))}
threads = []
for key, (fn, *args) in jobs.items():
    paused[key] = threading.Event()
    threads.append(threading.Thread(target=fn, args=(key, *args), name=key))
for t in threads:
    t.start()
for key, ev in paused.items():
    assert ev.wait(20), key
time.sleep(0.1)


def child():
    got = {"local": digest(fastload.load(local, config=cfg)), "http": digest(fastload.load(url, config=cfg)),
           "s3": digest(fastload.load(s3, config=cfg))}
    with fastload.stream(url, config=cfg) as st:
        got["http-stream"] = digest(dict(st))
    return got


kid = forked(child, 20, os.getcwd())
resume.set()
for t in threads:
    t.join(30)
verdict({"child": kid, "parent": results, "alive": [t.name for t in threads if t.is_alive()], "threads": others()})
'''


def test_fork_while_loads_are_paused_mid_way_in_other_threads(sources, tmp_path):
    """The parent forks while, in other threads, three streams (local, HTTP, S3) are held by their consumers after
    one tensor and three loads are held inside their progress callbacks (their loops stopped with reads in
    flight). The child loads local, HTTP, S3 and a stream, exact; then the parent's six loads finish, exact."""
    v, err = run_script(FORK_MID_FLIGHT, sources["local"], sources["http"], sources["s3"], tmp_path=tmp_path)
    want = sources["want"]
    kid = v["child"]
    assert not kid.get("hung"), f"the forked child hung ({kid['seconds']:.1f} s)"
    assert "error" not in kid and kid["exit"] == 0, kid
    for kind, got in kid["ok"].items():
        assert got == want, f"forked child: {kind}"
    assert v["alive"] == [], f"parent loads never finished after the fork: {v['alive']}"
    for kind, got in v["parent"].items():
        assert got == want, f"parent's {kind} after the fork: {got if isinstance(got, str) else 'differs'}"
    assert v["threads"] == [], v["threads"]


# -- multiprocessing spawn / forkserver ----------------------------------------------------------------------------


MP_POOL = r'''
import multiprocessing as mp

channel = {}


def keep(q, ack):
    channel.update(q=q, ack=ack)


def work(job):
    src, cfg = job
    return os.getpid(), fastload.load(src, config=cfg)  # the tensors themselves go back through the pool


def send(job):
    src, cfg = job
    channel["q"].put((src, fastload.load(src, config=cfg)))
    # (torch shares tensor memory by descriptor: the sender stays until the receiver has it; each of the three
    # jobs holds its worker here, so they run in three different workers)
    return channel["ack"].wait(30)


if __name__ == "__main__":
    method, local, url, s3, endpoint = sys.argv[1:6]
    assert "AWS_ENDPOINT_URL" not in os.environ
    cfg = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=4, stall_timeout_s=5.0,
                              s3=fastload.S3Options(endpoint_url=endpoint))
    ctx = mp.get_context(method)
    q, ack = ctx.Queue(), ctx.Event()
    jobs = [(src, cfg) for src in (local, url, s3)] * 3
    with ctx.Pool(3, initializer=keep, initargs=(q, ack)) as pool:
        res = pool.map_async(work, jobs, chunksize=1).get(timeout=40)
        pool_out = [[src, digest(sd)] for (src, _), (pid, sd) in zip(jobs, res)]
        pids = sorted({pid for pid, _ in res})
        sent = pool.map_async(send, jobs[:3], chunksize=1)
        queue_out = [[src, digest(sd)] for src, sd in (q.get(timeout=40) for _ in range(3))]
        ack.set()
        acked = sent.get(timeout=20)
    verdict({"pool": pool_out, "workers": len(pids), "queue": sorted(queue_out), "acked": acked,
             "threads": others()})
'''


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_multiprocessing_pool_and_queue_load_every_source(method, sources, tmp_path):
    """A Pool of 3 workers (``spawn`` / ``forkserver``) each loading local, HTTP and S3 (the endpoint only in the
    pickled ``LoadConfig``, not in the environment), the state dicts returned through the pool; and three processes
    putting their state dicts on a ``multiprocessing.Queue``. Every tensor arrives exact."""
    env = {k: v for k, v in child_env().items() if k not in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    v, err = run_script(MP_POOL, method, sources["local"], sources["http"], sources["s3"], sources["endpoint"],
                        tmp_path=tmp_path, hard_s=60, env=env)
    want = sources["want"]
    assert len(v["pool"]) == 9 and v["workers"] >= 2, v["workers"]
    for src, got in v["pool"]:
        assert got == want, f"pool ({method}): {src}"
    assert len(v["queue"]) == 3
    for src, got in v["queue"]:
        assert got == want, f"queue ({method}): {src}"
    assert v["acked"] == [True, True, True]
    assert not fastload_noise(err), err[-3000:]


# -- several processes loading one local checkpoint at once -----------------------------------------------------


CONCURRENT_LOCAL = r'''
import multiprocessing as mp

shared = {}


def keep(barrier):
    shared["barrier"] = barrier


def work(job):
    path, direct = job
    cfg = fastload.LoadConfig(chunk_bytes=2 << 20, host_buffer_bytes=64 << 20, local_threads=2, direct_io=direct)
    shared["barrier"].wait(30)  # the four loads start together (each job holds its worker: four workers)
    return direct, digest(fastload.load(path, config=cfg)), others()


def evict(path):  # cold: direct_io reads what is not in the page cache with O_DIRECT
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


if __name__ == "__main__":
    path = sys.argv[1]
    ctx = mp.get_context("spawn")
    rounds = {"direct": [True] * 4, "buffered": [False] * 4, "mixed": [True, False, True, False]}
    out = {}
    with ctx.Pool(4, initializer=keep, initargs=(ctx.Barrier(4),)) as pool:
        for name, flags in rounds.items():
            evict(path)
            out[name] = pool.map_async(work, [(path, d) for d in flags], chunksize=1).get(timeout=40)
    verdict(out)
'''


@pytest.fixture(scope="module")
def big_local(tmp_path_factory):
    """~24 MB, tensors of several MB: O_DIRECT ranges (>= 1 MiB) in every chunk."""
    import torch
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(5)
    tensors = {f"w{i}": torch.randn(1_000_000 + 4_099 * i, generator=g) for i in range(6)}
    tensors["ids"] = torch.arange(12_345, dtype=torch.int64)
    path = tmp_path_factory.mktemp("pm-big") / "model.safetensors"
    save_file(tensors, str(path))
    return path


def test_four_processes_load_one_cold_local_checkpoint_at_once(big_local, tmp_path):
    """Four processes (ranks on one machine) load one cold checkpoint at the same instant: all with ``direct_io``,
    all without, and two of each. Every load is exact, and leaves no thread behind."""
    v, err = run_script(CONCURRENT_LOCAL, str(big_local), tmp_path=tmp_path, hard_s=45)
    want = digest(load_file(str(big_local)))
    for mode, results in v.items():
        assert len(results) == 4, mode
        for direct, got, threads in results:
            assert got == want, f"{mode}: a load with direct_io={direct} differs"
            assert threads == [], threads
    assert not fastload_noise(err), err[-3000:]


# -- pulls into one destination from several processes ------------------------------------------------------------


PULL_RACE = r'''
import asyncio, multiprocessing as mp


def work(url, dest, barrier, out):
    cfg = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=2, stall_timeout_s=10.0)
    barrier.wait(30)
    t0 = time.monotonic()
    try:
        r = asyncio.run(fastload.apull(url, to=dest, config=cfg))
        res = {"fetched": list(r.fetched), "present": list(r.present), "bytes": r.bytes_fetched,
               "total": r.total_bytes, "path": str(r.path)}
    except BaseException as exc:
        res = {"error": type(exc).__name__, "typed": isinstance(exc, fastload.FastloadError), "msg": str(exc)}
    res["seconds"] = time.monotonic() - t0
    out.put(res)


if __name__ == "__main__":
    url, dest = sys.argv[1:3]
    ctx = mp.get_context("fork")  # a pre-forking server: fastload imported, nothing loaded before the fork
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=work, args=(url, dest, barrier, out)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [out.get(timeout=40) for _ in procs]
    for p in procs:
        p.join(20)
    verdict({"got": got, "exits": [p.exitcode for p in procs]})
'''


def _leftovers(dest: Path) -> list[str]:
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*")
                  if p.is_file() and ("incomplete" in p.name or p.name.endswith(".journal")
                                      or "incomplete" in p.parts))


def test_three_processes_pull_one_http_file_into_one_destination(http_server, http_dir, tmp_path):
    """README: two pulls into one destination (threads or processes) take turns, the second waits for the first,
    then finds its files complete. Three processes at once: each succeeds (or fails cleanly, typed); exactly one
    fetches the file, the others find it present; the destination ends whole and exact."""
    path, _ = write_checkpoint(http_dir / "race.safetensors", seed=32, count=8)
    http_server.faults._add(SlowFirstByte(pattern="*race.safetensors", seconds=0.02))
    dest = tmp_path / "dest"
    v, err = run_script(PULL_RACE, http_server.url_for(path), str(dest), tmp_path=tmp_path, hard_s=50)
    size = path.stat().st_size
    assert v["exits"] == [0, 0, 0]
    got = v["got"]
    errors = [g for g in got if "error" in g]
    assert all(g["typed"] for g in errors), errors
    assert not errors, f"README says concurrent pulls take turns; some failed: {errors}"
    fetched = [g for g in got if g["fetched"]]
    assert len(fetched) == 1 and fetched[0]["bytes"] == size, got
    for g in got:
        if not g["fetched"]:
            assert g["present"] == ["race.safetensors"] and g["bytes"] == 0, g
    assert (dest / "race.safetensors").read_bytes() == path.read_bytes()
    assert _leftovers(dest) == []


PULL_SLOWLY = r'''
url, dest = sys.argv[1:3]
cfg = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=2, stall_timeout_s=10.0)


def progress(done, total):
    if done:
        print("progress", done, total, flush=True)


fastload.pull(url, to=dest, config=cfg, progress=progress)
verdict({"done": True})
'''


def test_pull_processes_killed_with_sigkill_mid_way_then_a_pull_completes(http_server, http_dir, tmp_path):
    """A pull process SIGKILLed part-way (no cleanup, no exit hook: its lock goes with it, its journal and
    temporary file stay), three times at different points; then a pull completes the file exactly, without
    waiting for any lock, fetching no more than what the journal lacks, and leaves nothing behind."""
    path, _ = write_checkpoint(http_dir / "killed.safetensors", seed=33, count=10)
    size = path.stat().st_size
    http_server.faults._add(SlowFirstByte(pattern="*killed.safetensors", seconds=0.03))
    url = http_server.url_for(path)
    dest = tmp_path / "dest"
    script = tmp_path / "pull.py"
    script.write_text(PRELUDE + PULL_SLOWLY)
    seen = []
    for delay in (0.0, 0.07, 0.2):
        proc = subprocess.Popen([sys.executable, str(script), url, str(dest)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=child_env())
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            line = proc.stdout.readline() if ready else "(nothing in 30 s)"
            assert line.startswith("progress"), (line, proc.stderr.read()[-2000:] if proc.poll() is not None else "")
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL, "the pull finished before it was killed: the test proved nothing"
        seen.append(int(line.split()[1]))
    journals = list(dest.rglob("*.journal"))
    assert len(journals) == 1, sorted(str(p) for p in dest.rglob("*"))
    written = [tuple(map(int, ln.split())) for ln in journals[0].read_text().splitlines()[1:]]
    assert written, "no chunk journaled before the kills"
    journaled = sum(e - s for s, e in set(written))

    http_server.faults.clear()
    t0 = time.monotonic()
    result = asyncio.run(fastload.apull(url, to=dest, config=fastload.LoadConfig(chunk_bytes=64 * 1024)))
    took = time.monotonic() - t0
    assert took < 5.0, f"the pull after the kills took {took:.1f} s (waited for a lock?)"
    assert (dest / "killed.safetensors").read_bytes() == path.read_bytes()
    assert result.fetched == ("killed.safetensors",)
    assert result.bytes_fetched <= size - journaled, (result.bytes_fetched, size, journaled)
    assert _leftovers(dest) == []


# -- a forked child's exit while the parent's fastload objects exist ---------------------------------------------


FORK_EXIT = r'''
import asyncio
local, url, s3, how = sys.argv[1:5]
cfg = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=2, stall_timeout_s=10.0)
resume = threading.Event()
held = {k: threading.Event() for k in ("thread-load", "aload", "stream")}


def hold(key):
    def progress(done, total):
        if done and not held[key].is_set():
            held[key].set()
            resume.wait(30)
    return progress


# the parent: a load held in a daemon thread, an aload held in a loop of its own (its pool has an exit hook from the
# start), a stream left open mid-way in the main thread, and a finished stream not closed
loaders = [threading.Thread(target=fastload.load, args=(url,), kwargs=dict(config=cfg, progress=hold("thread-load")),
                            daemon=True),
           threading.Thread(target=lambda: asyncio.run(fastload.aload(s3, config=cfg, progress=hold("aload"))),
                            daemon=True)]
for t in loaders:
    t.start()
stream = fastload.stream(local, config=cfg).__enter__()
it = iter(stream)
next(it)  # and then the consumer holds it
held["stream"].set()
for key, ev in held.items():
    assert ev.wait(20), key
done_stream = fastload.stream(local, config=cfg).__enter__()
dict(done_stream)

r, w = os.pipe()
t0 = time.monotonic()
pid = os.fork()
if pid == 0:
    os.close(r)
    # the child's own work: a load, and a stream of its own left open at its exit
    sd = fastload.load(url, config=cfg)
    mine = fastload.stream(url, config=cfg).__enter__()
    next(iter(mine))
    os.write(w, json.dumps(digest(sd)).encode() + b"\n")
    os.close(w)
    if how == "os._exit":
        os._exit(0)
    if how == "sys.exit":
        sys.exit(0)
    # "end": falls off the end of the script below, as a forked worker's main does
else:
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    t0 = time.monotonic()  # the child has done its work (and closed the pipe): from here on it only exits
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - t0 > 15:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = None
            break
        time.sleep(0.01)
    took = time.monotonic() - t0
    resume.set()
    rest = dict(it)
    stream.__exit__(None, None, None)
    for t in loaders:  # (the parent's own exit is not this test's subject: see the test below)
        t.join(20)
    verdict({"child": json.loads(data) if data else None, "exit": None if status is None else
             os.waitstatus_to_exitcode(status), "seconds": took, "rest": len(rest)})
'''


@pytest.mark.parametrize("how", ["os._exit", "sys.exit", "end"])
def test_a_forked_child_exits_quickly_and_quietly_while_the_parent_holds_loads(how, sources, tmp_path):
    """gunicorn/celery-style: the parent holds a load in a daemon thread, an ``aload`` in its own loop and a stream
    mid-way (all paused in progress callbacks), and forks. The child loads, leaves a stream of its own open, and
    exits (``os._exit``, ``sys.exit``, or by the end of the script). It must not hang on the parent's exit hooks
    (their loads do not run in the child) and must print nothing from them; its own open stream is stopped at its
    exit as in any process."""
    v, err = run_script(FORK_EXIT, sources["local"], sources["http"], sources["s3"], how, tmp_path=tmp_path)
    assert v["child"] == sources["want"]
    assert v["exit"] == 0, f"the forked child ({how}) exited with {v['exit']} (None: hung, killed)"
    # (each of the parent's three held loads, waited for by its exit hook, would cost 2 s)
    assert v["seconds"] < 3.0, f"the forked child ({how}) took {v['seconds']:.1f} s to exit after its work"
    assert not fastload_noise(err), f"stderr of the parent and its forked child ({how}):\n{err[-3000:]}"


# -- what a forked child inherits: a stream mid-way, a pull's lock -------------------------------------------------


CHILD_ITERATES_INHERITED = r'''
local, url = sys.argv[1:3]
cfg = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=2, stall_timeout_s=10.0)
resume = threading.Event()
held = threading.Event()


def hold(done, total):  # past half-way, the parent's loader waits (a slow status endpoint): reads outstanding
    if done > total // 2 and not held.is_set():
        held.set()
        resume.wait(30)


out = {}
for kind, src in (("local", local), ("http", url)):
    held.clear()
    resume.clear()
    with fastload.stream(src, config=cfg, progress=hold) as s:
        it = iter(s)
        first = dict([next(it)])
        assert held.wait(20)

        def child():  # a worker forked inside the with block goes on with the loop it was in
            return digest({**first, **dict(it)})

        kid = forked(child, 4, os.getcwd())
        resume.set()
        rest = dict(it)
    out[kind] = {"child": kid, "parent": digest({**first, **rest})}
    if kid.get("hung"):
        break  # (one is enough: each costs the whole limit)
verdict(out)
'''


def test_a_forked_child_iterating_an_inherited_stream_does_not_hang(sources, tmp_path):
    """A process forks inside ``with fastload.stream(...)`` (a worker started from the loop that consumes it) and
    the child goes on iterating. The stream's loader thread does not exist in the child: what it had not yet handed
    over can never come. The child must get an error (or the whole, exact state dict), not wait for ever; the
    parent's stream finishes exact."""
    v, err = run_script(CHILD_ITERATES_INHERITED, sources["local"], sources["http"], tmp_path=tmp_path)
    for kind, res in v.items():
        assert res["parent"] == sources["want"], kind
        kid = res["child"]
        assert not kid.get("hung"), (
            f"{kind}: a forked child iterating the stream it inherited waited {kid['seconds']:.1f} s and was killed: "
            "nothing tells it that the stream's loader is in another process")
        assert "error" in kid or kid["ok"] == sources["want"], kid


PULL_HELD_THEN_FORK = r'''
url, dest = sys.argv[1:3]
cfg = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=2, stall_timeout_s=10.0)
started = threading.Event()


def hold(done, total):  # the pull is under way (its lock held) when the service forks a worker
    if done:
        started.set()
        time.sleep(60)


threading.Thread(target=fastload.pull, args=(url,), kwargs=dict(to=dest, config=cfg, progress=hold),
                 daemon=True).start()
assert started.wait(20)
pid = os.fork()
if pid == 0:  # a worker that has nothing to do with the pull, and lives on
    time.sleep(30)
    os._exit(0)
print("ready", pid, flush=True)
time.sleep(60)
'''


def test_a_pull_killed_while_a_forked_worker_lives_does_not_leave_its_lock_held(http_server, http_dir, tmp_path):
    """fastload/pull.py's ``_exclusive``: "flock goes with the process, so a killed pull never leaves it stuck". A
    service pulls in a background thread and forks a worker meanwhile (the worker inherits the lock's descriptor,
    and with it the flock); then the service is SIGKILLed (OOM killer, ``kill -9``) while the worker lives on.
    The next pull into that destination must not wait for that unrelated worker to exit."""
    path, _ = write_checkpoint(http_dir / "heldlock.safetensors", seed=34, count=8)
    url = http_server.url_for(path)
    dest = tmp_path / "dest"
    script = tmp_path / "held.py"
    script.write_text(PRELUDE + PULL_HELD_THEN_FORK)
    proc = subprocess.Popen([sys.executable, str(script), url, str(dest)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(), start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("ready"), (line, proc.poll())
        worker = int(line.split()[1])
        os.kill(proc.pid, signal.SIGKILL)  # the service dies; its forked worker does not
        proc.wait(10)

        async def next_pull():
            return await asyncio.wait_for(fastload.apull(url, to=dest), 4.0)

        t0 = time.monotonic()
        try:
            result = asyncio.run(next_pull())
        except asyncio.TimeoutError:
            alive = os.path.exists(f"/proc/{worker}")
            pytest.fail(f"the next pull waited {time.monotonic() - t0:.1f} s for the lock (the pulling process was "
                        f"killed; its forked worker, alive={alive}, still holds the flock it inherited)")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert result.fetched == ("heldlock.safetensors",)
    assert (dest / "heldlock.safetensors").read_bytes() == path.read_bytes()


SESSION_TO_POOL = r'''
import multiprocessing as mp
import botocore.session


def work(job):
    src, cfg = job
    return digest(fastload.load(src, config=cfg))


if __name__ == "__main__":
    s3, endpoint = sys.argv[1:3]
    cfg = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=4, stall_timeout_s=5.0,
                              s3=fastload.S3Options(endpoint_url=endpoint, session=botocore.session.Session()))
    fastload.load(s3, config=cfg)  # the parent's own loads reuse the session, as README advises
    try:
        with mp.get_context("forkserver").Pool(2) as pool:
            res = pool.map_async(work, [(s3, cfg)] * 2).get(timeout=40)
        verdict({"got": res})
    except Exception as exc:
        verdict({"error": f"{type(exc).__name__}: {exc}"})
'''


def test_a_config_holding_a_botocore_session_goes_to_a_worker_pool(sources, tmp_path):
    """README: ``S3Options(session=...)``, a botocore Session reused across loads in a process (client creation
    50-130 ms -> 3 ms). A service builds one ``LoadConfig`` so and hands it to its worker pool (spawn /
    forkserver pickle it). A session belongs to one process and is not part of the config's value
    (``compare=False``); the worker should make its own, not fail to receive the config."""
    v, err = run_script(SESSION_TO_POOL, sources["s3"], sources["endpoint"], tmp_path=tmp_path, hard_s=45)
    assert "error" not in v, f"a LoadConfig with S3Options(session=...) cannot be sent to a pool: {v['error']}"
    assert v["got"] == [sources["want"]] * 2


# -- a preforking service's own exit with two background loads -------------------------------------------------------


TWO_LOADS_AT_EXIT = r'''
url_a, url_b = sys.argv[1:3]
cfg = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=2, stall_timeout_s=10.0)
started = {k: threading.Event() for k in "ab"}


def report(key):
    def progress(done, total):
        if done and not started[key].is_set():
            started[key].set()
            if key == "b":
                time.sleep(60)  # b's hook posts to a status endpoint that stopped answering
    return progress


def preload(key, url):  # a service's background preloads, told to stop by the interpreter's exit
    fastload.load(url, config=cfg, progress=report(key))


for key, url in (("a", url_a), ("b", url_b)):
    threading.Thread(target=preload, args=(key, url), name=f"preload-{key}", daemon=True).start()
for ev in started.values():
    assert ev.wait(20)
print("leaving", time.monotonic(), flush=True)
'''


def test_exit_with_two_http_loads_in_daemon_threads_is_quiet(http_server, http_dir, tmp_path):
    """README: a load running in a daemon thread is cancelled when the interpreter exits, and "the thread that was
    loading ... gets SystemExit, which ends it quietly". Two preloads over HTTP (threaded engine) in daemon threads:
    ``a`` reading, ``b`` held in its progress callback. Exit hooks run newest first: ``a``'s body pool (made after
    ``b`` started) stops taking jobs at once, then ``b``'s hook waits its 2 s for ``b``; meanwhile ``a``'s next
    body read is refused (a cancelled future), ``CancelledError`` ends ``a``'s thread before ``a``'s own hook has
    said that the interpreter is exiting, and Python prints "Exception in thread preload-a ... CancelledError"."""
    urls = []
    for name in ("exit-a", "exit-b"):
        path, _ = write_checkpoint(http_dir / f"{name}.safetensors", seed=35, count=10)
        urls.append(http_server.url_for(path))
    http_server.faults._add(SlowFirstByte(pattern="*exit-a.safetensors", seconds=0.05))
    script = tmp_path / "two.py"
    script.write_text(PRELUDE + TWO_LOADS_AT_EXIT)
    bad = []
    for _ in range(1):  # (it fails every time; one run keeps the file quick)
        proc = subprocess.run([sys.executable, str(script), *urls], capture_output=True, text=True, timeout=40,
                              env=child_env())
        assert proc.stdout.startswith("leaving"), (proc.stdout, proc.stderr[-2000:])
        if proc.returncode != 0 or proc.stderr:
            bad.append((proc.returncode, proc.stderr[:400] + "\n...\n" + proc.stderr[-600:]))
    assert not bad, f"{len(bad)} exit(s) were not quiet; the first: status {bad[0][0]}\n{bad[0][1]}"
