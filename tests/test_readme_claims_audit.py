"""Are the README lines added in this session (``git diff 1495481..HEAD -- README.md``) true?

Each claim is checked against real behaviour, beyond what test_docs*.py and the other *_audit.py files check:

- open files: a real ``fastload.load`` under a low ``ulimit -n`` keeps at most a quarter of it in shard
  descriptors, ``direct_io``'s O_DIRECT descriptors counted (read from ``/proc/self/fd`` while it runs); a shard
  removed or replaced while its descriptor was closed is a ``SourceChangedError`` (a whole load, not the
  transport);
- ``weight_map`` entries holding ``?``, ``#`` or ``%`` are a ``FormatError`` even where such a file exists
  (local and HTTP), before any shard is read;
- ``dtype=``: every bit pattern of every 8- and 16-bit float source (exhaustive, not random) to every float target
  is torch's own conversion, bit for bit, except NaN sign/payload (a NaN stays a NaN);
- the sync API inside a running loop: a real SIGINT stops ``load`` inside ``asyncio.run`` under ``wait_for``;
  while it runs, the caller's loop runs nothing (no task, no ``wait_for`` timeout, no ``add_signal_handler``
  SIGINT handler: that Ctrl-C is held until the load returns).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import fastload
from checkpoints import write_sharded, write_single
from servers.faults import HangAfter, SlowFirstByte

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
INDEX = "model.safetensors.index.json"
KiB, MiB = 1 << 10, 1 << 20


def _child(code: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT / "tests"), env={**os.environ, **(env or {})})


# -- open files -------------------------------------------------------------------------------------------------

FD_CHILD = r"""
import json, os, resource, shutil, sys, threading, glob
LIMIT, DIRECT, SRC, WORK = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4]
resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
import torch, fastload
from safetensors.torch import load_file
from checkpoints import evict

want = {}
for s in sorted(glob.glob(os.path.join(SRC, "*.safetensors"))):
    want.update(load_file(s))

def run(mode):
    ckpt = os.path.join(WORK, mode)
    shutil.copytree(SRC, ckpt)
    shards = sorted(glob.glob(os.path.join(ckpt, "*.safetensors")))
    for s in shards:
        evict(s)  # cold: direct_io reads them with O_DIRECT (a second descriptor per file)
    peak, stop = [0], threading.Event()
    def open_shards():
        names = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(ckpt + "/"):
                names.append(target)
        return names
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], len(open_shards()))
    changed = []
    def progress(done, total):
        if done == 0 and mode != "plain":
            # Every header read, no tensor yet: of 40 shards at most 16 are open. Change one whose descriptor
            # was closed since (through a descriptor still open the load rightly reads the bytes it pinned): the
            # last such in file order, the one the load reopens latest.
            target = next(s for s in reversed(shards) if s not in open_shards())
            changed.append(os.path.basename(target))
            if mode == "remove":
                os.unlink(target)
            else:
                with open(target, "rb") as f:
                    data = bytearray(f.read())
                data[-4:] = b"\xff\xff\xff\xff"
                with open(target + ".new", "wb") as f:
                    f.write(data)
                os.replace(target + ".new", target)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        got = fastload.load(ckpt, config=fastload.LoadConfig(direct_io=DIRECT), progress=progress)
        result = "exact" if set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want) else "wrong"
    except BaseException as exc:
        result = f"{type(exc).__name__}: {exc}"
    stop.set()
    sampler.join()
    return {"result": result, "peak": peak[0], "changed": changed}

print(json.dumps({mode: run(mode) for mode in ("plain", "remove", "replace")}))
"""


@pytest.fixture(scope="module")
def forty_shards(tmp_path_factory):
    """40 shards of ~40-80 KB under /tmp's ext4 (O_DIRECT works there)."""
    d = tmp_path_factory.mktemp("fds") / "ck"
    tensors = {f"t{i:02d}": torch.arange(10_000 + 97 * i, dtype=torch.float32) * (i + 1) for i in range(40)}
    write_sharded(d, tensors, 40)
    return d


@pytest.fixture(scope="module", params=[False, True], ids=["page_cache", "direct_io"])
def fd_reports(request, forty_shards, tmp_path_factory) -> dict:
    """One child under ``ulimit -n 64`` per ``direct_io`` setting, three loads of a fresh copy each: plain, one
    with a shard removed, one with a shard replaced (at the first progress call: every header read, no tensor
    yet; a shard whose descriptor was closed since)."""
    work = tmp_path_factory.mktemp("fdwork")
    script = work / "fd_child.py"
    script.write_text(FD_CHILD)
    out = subprocess.run([sys.executable, str(script), "64", "1" if request.param else "0", str(forty_shards),
                          str(work)], capture_output=True, text=True, timeout=90, cwd=str(ROOT / "tests"),
                         env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_real_load_keeps_at_most_a_quarter_of_the_limit_in_shard_descriptors(fd_reports):
    """README: 'a local load keeps at most a quarter of the open-file limit (8 to 512) of shard descriptors open
    (direct_io's second descriptor of a file counted)'. 40 cold shards under ``ulimit -n 64``: loaded bit-exact,
    and at no moment (sampled from ``/proc/self/fd`` by a thread throughout) more than 16 descriptors of the
    checkpoint's files open, O_DIRECT ones included."""
    assert "direct_io`'s second descriptor of a file counted" in README
    report = fd_reports["plain"]
    assert report["result"] == "exact", report
    assert 1 <= report["peak"] <= 64 // 4, report


@pytest.mark.parametrize("mode", ["remove", "replace"])
def test_a_shard_removed_or_replaced_after_planning_fails_a_real_load_typed(fd_reports, mode):
    """README: each reopened descriptor is 'checked to be the file the load first pinned: one removed or replaced
    meanwhile is a SourceChangedError'. A whole load, not the transport: it fails with SourceChangedError naming
    the shard changed (one whose descriptor the load had closed), never returns the new bytes."""
    report = fd_reports[mode]
    assert report["result"].startswith("SourceChangedError"), report
    assert len(report["changed"]) == 1 and report["changed"][0] in report["result"], report


# -- weight_map entries holding ?, # or % -----------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["a?b.safetensors", "a#b.safetensors", "100%.safetensors", "a%2Fb.safetensors"])
@pytest.mark.parametrize("kind", ["local", "http"])
def test_weight_map_entries_with_query_fragment_or_percent_are_refused(tmp_path, request, entry, kind):
    """README: weight_map entries that 'hold ?, #, %' raise FormatError. The shard exists under that very name, so
    only the check can stop the load; the error names the entry, comes from plan and load alike, and over HTTP no
    shard is requested at all."""
    assert "(or hold `?`, `#`,\n  `%`)" in README
    d = tmp_path / "ck"
    write_single(d / entry, {"a": torch.ones(4)})
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {"a": entry}}))
    if kind == "local":
        source = str(d)
    else:
        server, root = request.getfixturevalue("http_server"), request.getfixturevalue("http_dir")
        import shutil

        shutil.copytree(d, root / "ck")
        source = server.url_for(root / "ck") + "/"
        rule = server.faults._add(SlowFirstByte(pattern="*.safetensors", seconds=0.0))
    for call in (fastload.load, fastload.plan):
        with pytest.raises(fastload.FormatError) as info:
            call(source)
        assert entry in str(info.value) and "?" in str(info.value), str(info.value)
    if kind == "http":
        assert rule.seen == 0, f"{rule.seen} request(s) for a shard the index was refused over"


# -- dtype=: every bit pattern ----------------------------------------------------------------------------------


def _floats() -> dict[str, torch.dtype]:
    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
             "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
             "F8_E8M0": "float8_e8m0fnu"}
    out = {}
    for st, attr in names.items():
        dtype = getattr(torch, attr, None)
        if dtype is None:
            continue
        try:
            safetensors.torch.save({"p": torch.zeros(1, dtype=dtype)})
            torch.zeros(1).to(dtype)
        except Exception:  # noqa: BLE001 - this torch or safetensors lacks it
            continue
        out[st] = dtype
    return out


FLOATS = _floats()


def test_this_torch_has_the_readme_float_dtypes():
    """The exhaustive test below is only as good as the dtypes it sees: at least the five common ones."""
    assert {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"} <= set(FLOATS), FLOATS


@pytest.fixture(scope="module")
def every_pattern(tmp_path_factory):
    """Each 8- and 16-bit float dtype with every bit pattern, in order, twice (once at an odd offset in the
    file), so chunks and torch's vector/tail split fall at different places."""
    tensors = {}
    for st, dtype in FLOATS.items():
        size = torch.empty(0, dtype=dtype).element_size()
        if size == 1:
            bits = torch.arange(256, dtype=torch.int16).to(torch.uint8)
        elif size == 2:
            bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
        else:
            continue
        tensors[f"{st}.all"] = bits.view(dtype).clone()
        tensors[f"{st}.odd"] = bits.view(dtype)[3:].clone()
    tensors["pad"] = torch.zeros(1, dtype=torch.uint8)
    path = tmp_path_factory.mktemp("bits") / "all.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("target", list(FLOATS.values()), ids=[str(d)[6:] for d in FLOATS.values()])
def test_every_bit_pattern_converts_as_torch_does_except_nan_bits(every_pattern, target):
    """README: 'each value is torch's own conversion of it, bit for bit, except the sign and payload inside a NaN
    (still a NaN)'. Every pattern of every 8/16-bit source, small chunks: non-NaN results bit-identical to
    ``.to(target)``, and where torch gives a NaN, fastload gives a NaN too (and nowhere else)."""
    ref = safetensors.torch.load_file(str(every_pattern))
    got = fastload.load(every_pattern, dtype=target,
                        config=fastload.LoadConfig(chunk_bytes=64 * KiB, host_buffer_bytes=256 * KiB))
    for name, r in ref.items():
        if not r.dtype.is_floating_point:
            continue
        want = r.to(target)
        g = got[name]
        assert g.dtype == target and g.shape == want.shape, name
        gnan, wnan = g.float().isnan(), want.float().isnan()
        assert torch.equal(gnan, wnan), f"{name}: NaN-ness differs at {(gnan != wnan).nonzero()[:5].tolist()}"
        size = want.element_size()
        gb = g.contiguous().view(torch.uint8).view(-1, size)[~wnan]
        wb = want.contiguous().view(torch.uint8).view(-1, size)[~wnan]
        bad = (gb != wb).any(dim=1).nonzero().flatten()
        assert bad.numel() == 0, f"{name}: {bad.numel()} non-NaN values differ from torch, first at {bad[:5]}"


# -- the sync API inside a running loop -------------------------------------------------------------------------

LOOP_CHILD = r"""
import asyncio, json, signal, sys, time
import fastload
MODE, URL = sys.argv[1], sys.argv[2]
cfg = fastload.LoadConfig(chunk_bytes=64 * 1024, max_concurrency=2, stall_timeout_s=20.0,
                          retry=fastload.RetryConfig(max_attempts=1))
events = []
print("ready", flush=True)

async def body():
    t0 = time.monotonic()
    try:
        got = fastload.load(URL, config=cfg)
        events.append(("load-returned", len(got)))
    finally:
        events.append(("load-seconds", round(time.monotonic() - t0, 2)))

async def ticker():
    while True:
        events.append(("tick", round(time.monotonic(), 3)))
        await asyncio.sleep(0.05)

async def main():
    if MODE == "run":
        await body()
    elif MODE == "wait_for":
        await asyncio.wait_for(body(), 60)
    elif MODE == "signal_handler":
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGINT, lambda: (events.append(("handler-ran", len(events))), stop.set()))
        await body()
        await asyncio.wait_for(stop.wait(), 10)
    elif MODE == "ticker_wait_for":  # a task ticking every 50 ms; the load under wait_for(0.1)
        t = asyncio.create_task(ticker())
        await asyncio.sleep(0.12)
        events.append(("load-start", round(time.monotonic(), 3)))
        try:
            await asyncio.wait_for(body(), 0.1)
            events.append(("wait_for", "returned"))
        except asyncio.TimeoutError:
            events.append(("wait_for", "TimeoutError"))
        events.append(("load-end", round(time.monotonic(), 3)))
        t.cancel()

t0 = time.monotonic()
try:
    asyncio.run(main())
    outcome = "finished"
except KeyboardInterrupt:
    outcome = "KeyboardInterrupt"
except BaseException as exc:
    outcome = f"{type(exc).__name__}: {exc}"
print(json.dumps({"outcome": outcome, "events": events, "seconds": round(time.monotonic() - t0, 2)}), flush=True)
"""


def _loop_child(tmp_path, mode: str, url: str, rule=None, sigint_after_fired: float = 0.3,
                timeout: float = 30) -> dict:
    script = tmp_path / "loop_child.py"
    script.write_text(LOOP_CHILD)
    proc = subprocess.Popen([sys.executable, str(script), mode, url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        if rule is not None:
            deadline = time.monotonic() + 20
            while rule.fired == 0:
                assert time.monotonic() < deadline and proc.poll() is None, "the child never reached the server"
                time.sleep(0.01)
            time.sleep(sigint_after_fired)
            sent = time.monotonic()
            os.kill(proc.pid, signal.SIGINT)  # a real Ctrl-C: the child's main thread runs the handler
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.strip(), err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    if rule is not None:
        report["after_sigint"] = time.monotonic() - sent
    return report


def _ckpt(http_dir: Path, name: str) -> Path:
    return write_single(http_dir / name, {f"t{i:02d}": torch.randn(20_000) for i in range(10)})


@pytest.mark.parametrize("mode", ["run", "wait_for"])
def test_ctrl_c_stops_a_sync_load_inside_asyncio_run(tmp_path, http_server, http_dir, mode):
    """README: the sync calls work inside a running loop '... and Ctrl-C still stops them'. A coroutine run by
    ``asyncio.run`` (directly, and under ``asyncio.wait_for``) calls ``fastload.load``; its reads hang; a real
    SIGINT to the process: KeyboardInterrupt within 2 s, not the 20 s stall timeout."""
    assert "Ctrl-C still stops them" in README
    path = _ckpt(http_dir, f"m-{mode}.safetensors")
    rule = http_server.faults._add(HangAfter(pattern=f"*/m-{mode}.safetensors", after=4))
    report = _loop_child(tmp_path, mode, http_server.url_for(path), rule)
    assert report["outcome"] == "KeyboardInterrupt", report
    assert report["after_sigint"] < 3.0, report


@pytest.fixture
def slow_url(http_server, http_dir):
    """An 800 KB file whose every request waits 0.1 s: a sync load of it takes over half a second."""
    path = _ckpt(http_dir, "slow.safetensors")
    rule = http_server.faults._add(SlowFirstByte(pattern="*/slow.safetensors", seconds=0.1))
    return http_server.url_for(path), rule


def test_a_loop_installed_sigint_handler_waits_until_the_sync_load_returns(tmp_path, slow_url):
    """README: a SIGINT handler the loop installed (``loop.add_signal_handler``) cannot run during a sync call.
    What happens (documented here): the Ctrl-C neither stops the load nor is lost: the load completes, then the
    loop runs the handler; no KeyboardInterrupt."""
    assert "loop.add_signal_handler" in README
    url, rule = slow_url
    report = _loop_child(tmp_path, "signal_handler", url, rule, sigint_after_fired=0.2)
    names = [e[0] for e in report["events"]]
    assert report["outcome"] == "finished", report
    assert names[:3] == ["load-returned", "load-seconds", "handler-ran"], report
    assert report["events"][0][1] == 10, report


def test_nothing_else_runs_in_the_callers_loop_during_a_sync_load(tmp_path, slow_url):
    """README: 'Such a call blocks its caller's loop until it returns, so nothing else there runs meanwhile: not
    timeouts such as asyncio.wait_for'. A task ticking every 50 ms does not tick between the load's start and end,
    and ``wait_for(..., 0.1)`` around the coroutine whose sync load takes well over that cannot cut it short: the
    load runs to its end (its whole result counted)."""
    url, _ = slow_url
    report = _loop_child(tmp_path, "ticker_wait_for", url)
    ev = report["events"]
    found = dict((e[0], e[1]) for e in ev if e[0] != "tick")
    start, end = found["load-start"], found["load-end"]
    assert found.get("load-returned") == 10 and found["load-seconds"] > 0.3, report  # slow enough to tick
    assert [e for e in ev if e[0] == "tick" and e[1] <= start], report
    assert not [e for e in ev if e[0] == "tick" and start < e[1] < end], report
    assert report["outcome"] == "finished", report
