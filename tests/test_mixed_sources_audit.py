"""Audit: a ``source`` that is a LIST mixing schemes (path, ``file://``, ``http://``, ``s3://``), with
``names=``, ``shard=``, ``dtype=``, ``progress=``, ``trace=``, ``stream()`` and ``verify_checksums`` on top."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from reliability_helpers import (  # noqa: F401
    QUICK,
    Leaks,
    ScriptedHTTP,
    assert_bit_exact,
    data_start,
    private_tmp,
)
from safetensors.torch import load_file, save_file
from servers.faults import SlowFirstByte

import fastload

CFG = QUICK.replace(stall_timeout_s=5.0)  # moto on a busy 2-core box is slow to answer; still bounded
VERIFY = CFG.replace(verify_checksums=True)


# -- helpers ---------------------------------------------------------------------------------------------------


def tensors_for(prefix: str, seed: int, count: int = 3) -> dict[str, torch.Tensor]:
    """Float tensors of odd sizes (several 64 KiB chunks each) plus an int one, all named ``<prefix>.*``."""
    g = torch.Generator().manual_seed(seed)
    out = {f"{prefix}.w{i}": torch.randn(20_000 + 3_001 * i, generator=g) for i in range(count)}
    out[f"{prefix}.ids"] = torch.arange(777 + seed, dtype=torch.int64)
    return out


def bounded(fn, seconds: float = 8.0):
    """``fn()`` in a thread; fails the test if it does not return within ``seconds`` (a deadlock)."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=target, name="bounded-load", daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not finish within {seconds} s (deadlock or hang)"
    if "error" in box:
        raise box["error"]
    return box["result"]


def owns_memory(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.storage_offset() == 0


class DataOnlySlow(SlowFirstByte):
    """Delays a file's GETs after its first ``skip`` (the size probe and the header reads)."""

    skip: int = 2

    def wants_to_fire(self) -> bool:
        return self.seen > self.skip


class Mixed:
    """Three checkpoints with distinct names: A local, B over HTTP, C on S3 (through a counting proxy)."""

    def __init__(self, tmp_path, http_server, http_dir, s3_server, s3_bucket, s3_proxy):
        self.a_t, self.b_t, self.c_t = tensors_for("a", 1), tensors_for("b", 2, 4), tensors_for("c", 3, 2)
        self.a_path = tmp_path / "a.safetensors"
        self.b_path = http_dir / "b.safetensors"
        self.c_path = tmp_path / "c.safetensors"
        save_file(self.a_t, str(self.a_path))
        save_file(self.b_t, str(self.b_path))
        save_file(self.c_t, str(self.c_path))
        s3_server.put(s3_bucket, "sub/c.safetensors", self.c_path.read_bytes())
        self.a = str(self.a_path)
        self.b = http_server.url_for(self.b_path)
        self.c = f"s3://{s3_bucket}/sub/c.safetensors"
        self.http, self.proxy, self.bucket = http_server, s3_proxy, s3_bucket
        self.config = CFG.replace(s3=fastload.S3Options(endpoint_url=s3_proxy.url))
        self.ports = {http_server.port, s3_proxy.port}

    @property
    def sources(self) -> list[str]:
        return [self.a, self.b, self.c]

    @property
    def want(self) -> dict[str, torch.Tensor]:
        return self.a_t | self.b_t | self.c_t

    def http_bytes(self) -> int:
        return self.http.bytes_sent("*/b.safetensors")

    def s3_get_bytes(self) -> int:
        return sum(r.body_bytes for r in self.proxy.log if r.method == "GET")

    def requests(self) -> int:
        return len(self.http.log) + len(self.proxy.log)


@pytest.fixture
def mixed(tmp_path, http_server, http_dir, s3_server, s3_bucket, s3_proxy) -> Mixed:
    return Mixed(tmp_path, http_server, http_dir, s3_server, s3_bucket, s3_proxy)


# -- the plain load --------------------------------------------------------------------------------------------


def test_mixed_list_loads_bit_exact_in_list_order_with_owned_memory(mixed, tmp_path):
    """[s3, Path, http, file://]: every tensor bit-identical to safetensors, the dict in list order then offset
    order, each tensor owning its memory."""
    extra_t = tensors_for("d", 4, 1)
    extra = tmp_path / "d.safetensors"
    save_file(extra_t, str(extra))
    sources = [mixed.c, Path(mixed.a), mixed.b, extra.as_uri()]
    with Leaks(mixed.ports) as leaks:
        got = bounded(lambda: fastload.load(sources, config=mixed.config))
        leaks.check(grace_s=0.5)
    want = {}
    for path in (mixed.c_path, mixed.a_path, mixed.b_path, extra):
        want |= load_file(str(path))
    assert list(got) == list(want), "load() must return the tensors in checkpoint (list, then file) order"
    assert_bit_exact(got, want)
    assert all(owns_memory(t) for t in got.values())
    assert len({t.untyped_storage().data_ptr() for t in got.values() if t.numel()}) == len(got)


def test_max_concurrency_one_over_mixed_list_with_conversion_and_one_buffer_pair(mixed):
    """One reader, the smallest staging pool, conversion on every float chunk: no deadlock, right bytes."""
    config = mixed.config.replace(max_concurrency=1, host_buffer_bytes=2 * QUICK.chunk_bytes)
    got = bounded(lambda: fastload.load(mixed.sources, dtype=torch.bfloat16, config=config))
    want = {n: (t.to(torch.bfloat16) if t.is_floating_point() else t) for n, t in mixed.want.items()}
    assert_bit_exact(got, want)


# -- names that clash, the same file twice, indexes in lists --------------------------------------------------


def test_same_tensor_name_in_http_and_s3_members_names_both(mixed, tmp_path, s3_server):
    clash = tmp_path / "clash.safetensors"
    save_file({"b.w0": torch.zeros(10)}, str(clash))
    s3_server.put(mixed.bucket, "clash.safetensors", clash.read_bytes())
    s3_url = f"s3://{mixed.bucket}/clash.safetensors"
    with Leaks(mixed.ports) as leaks:
        with pytest.raises(fastload.FormatError) as info:
            bounded(lambda: fastload.load([mixed.a, mixed.b, s3_url], config=mixed.config))
        leaks.check(grace_s=0.5)
    message = str(info.value)
    assert "b.w0" in message and mixed.b in message and s3_url in message, message
    assert "X-Amz-" not in message
    # Found from the headers: no tensor byte of either member was fetched.
    assert mixed.http_bytes() <= data_start(mixed.b_path.read_bytes())
    assert mixed.s3_get_bytes() <= data_start(clash.read_bytes())


def test_same_file_as_path_and_file_url_is_a_duplicate_name_error(mixed):
    """One file spelled twice (a path and its file:// URL) is two members with the same names: a FormatError
    naming the tensor, not a silently doubled (or half-loaded) result."""
    with pytest.raises(fastload.FormatError) as info:
        fastload.load([mixed.a, mixed.a_path.as_uri()], config=CFG)
    assert "a.w0" in str(info.value) or "a.ids" in str(info.value)
    assert "a.safetensors" in str(info.value)


def test_index_over_http_in_a_mixed_list_is_loaded_with_the_others(mixed, http_dir, http_server):
    """README: a source is a path or URL "or a list of these": an index among other members is a checkpoint
    of its own (its shards, checked against its weight_map), loaded with the rest."""
    idx_dir = http_dir / "sharded"
    idx_dir.mkdir()
    save_file({"x.w": torch.ones(4)}, str(idx_dir / "model-00001-of-00001.safetensors"))
    (idx_dir / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"x.w": "model-00001-of-00001.safetensors"}}')
    index_url = http_server.url_for(idx_dir / "model.safetensors.index.json")
    with Leaks(mixed.ports) as leaks:
        got = bounded(lambda: fastload.load([mixed.a, index_url, mixed.c], config=mixed.config))
        leaks.check(grace_s=0.5)
    assert_bit_exact(got, {**{n: t for n, t in mixed.want.items() if not n.startswith("b.")}, "x.w": torch.ones(4)})
    assert not any(r.path.endswith("b.safetensors") for r in http_server.log)
    got = bounded(lambda: fastload.load([index_url], config=mixed.config))
    assert_bit_exact(got, {"x.w": torch.ones(4)})


# -- one member fails -------------------------------------------------------------------------------------------


def test_missing_s3_member_fails_the_load_naming_it_and_leaves_nothing(mixed):
    missing = f"s3://{mixed.bucket}/sub/absent.safetensors"
    with Leaks(mixed.ports) as leaks:
        with pytest.raises(fastload.SourceNotFoundError) as info:
            bounded(lambda: fastload.load([mixed.a, mixed.b, missing], config=mixed.config))
        leaks.check(grace_s=0.5)
    assert missing in str(info.value)
    assert getattr(info.value, "url", missing) == missing


def test_s3_member_failing_mid_load_names_it_with_a_range_and_cancels_the_http_member(mixed):
    """Every tensor GET of the S3 member answers 500: TransferError naming s3://bucket/key (never the presigned
    URL) with its byte range; the slow HTTP member's reads stop with it; nothing is left behind."""
    ds_c = data_start(mixed.c_path.read_bytes())
    from servers.faults import FailWith

    class DataOnlyFail(FailWith):
        def wants_to_fire(self) -> bool:
            return self.seen > 2

    mixed.proxy.faults._add(DataOnlyFail(pattern="*/sub/c.safetensors", status=500))
    mixed.http.faults._add(DataOnlySlow(pattern="*/b.safetensors", seconds=0.3))
    with Leaks(mixed.ports) as leaks:
        start = time.monotonic()
        with pytest.raises(fastload.TransferError) as info:
            bounded(lambda: fastload.load(mixed.sources, config=mixed.config))
        took = time.monotonic() - start
        leaks.check(grace_s=1.0)
    exc = info.value
    assert exc.url == mixed.c, exc.url
    assert exc.byte_range is not None and exc.byte_range[0] >= ds_c
    assert "X-Amz-" not in str(exc) and "Signature" not in str(exc)
    assert took < 6.0
    time.sleep(0.5)  # the server logs a request when it answers: let a reply delayed 0.3 s before the end land
    settled = len(mixed.http.log)
    time.sleep(0.8)
    assert len(mixed.http.log) == settled, "HTTP reads went on after the load failed"


# -- names=, shard=, dtype=, progress=, trace= -------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_names_from_the_local_member_fetch_only_headers_of_the_network_members(mixed, engine):
    names = ["a.w1", "a.ids"]
    trace = fastload.Trace(otel=False)
    got = bounded(lambda: fastload.load(mixed.sources, names=names, trace=trace,
                                        config=mixed.config.replace(http_engine=engine)))
    assert set(got) == set(names)
    assert_bit_exact(got, {n: mixed.a_t[n] for n in names})
    assert mixed.http_bytes() <= data_start(mixed.b_path.read_bytes())
    assert mixed.s3_get_bytes() <= data_start(mixed.c_path.read_bytes())
    s = trace.summary()
    assert s.bytes_by_file.get(mixed.b, 0) <= data_start(mixed.b_path.read_bytes())
    assert s.bytes_by_file.get(mixed.c, 0) <= data_start(mixed.c_path.read_bytes())


def test_names_from_the_s3_member_read_no_tensor_byte_of_the_others(mixed):
    names = ["c.w1"]
    trace = fastload.Trace(otel=False)
    got = bounded(lambda: fastload.load(mixed.sources, names=names, trace=trace, config=mixed.config))
    assert_bit_exact(got, {"c.w1": mixed.c_t["c.w1"]})
    assert mixed.http_bytes() <= data_start(mixed.b_path.read_bytes())
    assert trace.summary().bytes_by_file.get(mixed.a, 0) <= data_start(mixed.a_path.read_bytes())
    c_start = data_start(mixed.c_path.read_bytes())
    spec = next(t for t in fastload.plan(mixed.c_path).tensors if t.name == "c.w1")
    assert mixed.s3_get_bytes() <= c_start + (spec.spec.end - spec.spec.start)


def test_unknown_names_over_a_mixed_list_are_listed_and_nothing_is_fetched(mixed):
    with pytest.raises(fastload.ConfigError) as info:
        bounded(lambda: fastload.load(mixed.sources, names=["a.w0", "nope.1", "b.w0", "nope.2"],
                                      config=mixed.config))
    assert "nope.1" in str(info.value) and "nope.2" in str(info.value)
    assert mixed.http_bytes() <= data_start(mixed.b_path.read_bytes())
    assert mixed.s3_get_bytes() <= data_start(mixed.c_path.read_bytes())


@pytest.mark.parametrize("world_size", [2, 3])
def test_shard_over_a_mixed_list_every_rank_concatenates_to_the_whole(tmp_path, http_server, http_dir, s3_server,
                                                                      s3_bucket, world_size):
    g = torch.Generator().manual_seed(11)
    parts = {
        "local": {"l.q_proj.weight": torch.randn(37, 53, generator=g), "l.norm": torch.randn(53, generator=g)},
        "http": {"h.o_proj.weight": torch.randn(29, 61, generator=g).to(torch.bfloat16),
                 "h.q_proj.weight": torch.randn(17, 8, generator=g)},
        "s3": {"s.o_proj.weight": torch.randn(13, 11, 7, generator=g), "s.q_proj.weight": torch.randn(41, 3, generator=g)},
    }
    a, b, c = tmp_path / "l.safetensors", http_dir / "h.safetensors", tmp_path / "s.safetensors"
    save_file(parts["local"], str(a)), save_file(parts["http"], str(b)), save_file(parts["s3"], str(c))
    s3_server.put(s3_bucket, "s.safetensors", c.read_bytes())
    sources = [str(a), http_server.url_for(b), f"s3://{s3_bucket}/s.safetensors"]
    rules = {r"q_proj\.weight$": 0, r"o_proj\.weight$": 1}
    want = parts["local"] | parts["http"] | parts["s3"]
    ranks = [bounded(lambda r=r: fastload.load(sources, shard=fastload.Shard(r, world_size, rules), dtype=torch.float64,
                                               config=CFG))
             for r in range(world_size)]
    for name, full in want.items():
        dim = 0 if name.endswith("q_proj.weight") else 1 if name.endswith("o_proj.weight") else None
        for r, got in enumerate(ranks):
            expect = full if dim is None else full.tensor_split(world_size, dim)[r]
            t = got[name]
            assert t.dtype == torch.float64 and t.is_contiguous(), name
            assert torch.equal(t, expect.to(torch.float64)), (name, r)


def test_progress_trace_and_dtype_across_local_http_s3(mixed):
    plan = fastload.plan(mixed.sources, config=mixed.config)
    mixed.http.reset(), mixed.proxy.log_store.clear()  # the plan's header reads are not the load's
    calls: list[tuple[int, int]] = []
    lock = threading.Lock()

    def progress(done, total):
        with lock:
            calls.append((done, total))

    trace = fastload.Trace(otel=False)
    got = bounded(lambda: fastload.load(mixed.sources, dtype=torch.float16, config=mixed.config, trace=trace,
                                        progress=progress))
    want = {n: (t.to(torch.float16) if t.is_floating_point() else t) for n, t in mixed.want.items()}
    assert_bit_exact(got, want)
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and dones[-1] == plan.output_bytes
    assert {t for _, t in calls} == {plan.output_bytes}
    s = trace.summary()
    assert set(s.bytes_by_source) == {"local", "http", "s3"}, s.bytes_by_source
    assert sum(s.bytes_by_source.values()) == s.bytes_fetched
    assert set(s.bytes_by_file) == {mixed.a, mixed.b, mixed.c}, list(s.bytes_by_file)
    assert sum(s.bytes_by_file.values()) == s.bytes_fetched
    for i, (url, path) in enumerate(((mixed.a, mixed.a_path), (mixed.b, mixed.b_path), (mixed.c, mixed.c_path))):
        span = sum(ch.nbytes for ch in plan.chunks if ch.file == i)
        assert s.bytes_by_file[url] == data_start(path.read_bytes()) + span, url
    assert s.bytes_by_source["s3"] == mixed.s3_get_bytes()


# -- stream() ----------------------------------------------------------------------------------------------------


def test_stream_mixed_list_each_tensor_once_and_a_slow_http_member_does_not_hold_up_the_others(mixed):
    """The HTTP member's tensor reads start late (0.8 s): with readers to spare (the default max_concurrency, more
    than the HTTP member's chunks), the local and S3 tensors come out before any of it."""
    mixed.http.faults._add(DataOnlySlow(pattern="*/b.safetensors", seconds=0.8))
    plan = fastload.plan([mixed.b, mixed.a, mixed.c], config=mixed.config)
    config = mixed.config.replace(max_concurrency=16)
    assert sum(1 for ch in plan.chunks if ch.file == 0) < 16
    seen: dict[str, torch.Tensor] = {}
    order = []

    def run():
        with fastload.stream([mixed.b, mixed.a, mixed.c], config=config) as s:
            for name, tensor in s:
                assert name not in seen, f"{name} handed out twice"
                seen[name] = tensor
                order.append(name)

    bounded(run)
    assert_bit_exact(seen, mixed.want)
    firsts = [n for n in order if not n.startswith("b.")]
    assert order[:len(firsts)] == firsts, f"a slow HTTP member held up the others: {order}"


def test_stream_early_exit_over_mixed_list_stops_http_and_s3_reads(mixed):
    plan = fastload.plan(mixed.sources, config=mixed.config)
    network_chunks = sum(1 for ch in plan.chunks if ch.file in (1, 2))
    mixed.http.reset(), mixed.proxy.log_store.clear()
    mixed.http.faults._add(DataOnlySlow(pattern="*/b.safetensors", seconds=0.25))
    mixed.proxy.faults._add(DataOnlySlow(pattern="*/sub/c.safetensors", seconds=0.25))
    config = mixed.config.replace(max_concurrency=2)
    with Leaks(mixed.ports) as leaks:
        start = time.monotonic()

        def run():
            with fastload.stream([mixed.a, mixed.b, mixed.c], config=config) as s:
                for name, _ in s:
                    return name

        first = bounded(run)
        took = time.monotonic() - start
        leaks.check(grace_s=1.0)
    assert first.startswith("a."), first
    assert took < 3.0
    # The servers log a request once its 0.25 s delay is over: one that arrived before the stream was left may
    # be logged just after. Let those land first, then nothing more may arrive.
    time.sleep(0.5)
    settled = mixed.requests()
    time.sleep(0.6)
    assert mixed.requests() == settled, "reads went on after leaving the stream"
    data_gets = len([r for r in mixed.http.log if r.method == "GET"]) - 2 + \
        len([r for r in mixed.proxy.log if r.method == "GET"]) - 2
    assert data_gets < network_chunks, "the stream read everything although it was left after one tensor"


def test_stream_with_names_shard_dtype_progress_trace_over_a_mixed_list(mixed):
    names = ["a.w0", "b.w2", "b.ids", "c.w1"]
    shard = fastload.Shard(1, 2, {r"\.w\d$": 0})
    plan = fastload.plan(mixed.sources, names=names, shard=shard, config=mixed.config)
    calls = []
    trace = fastload.Trace(otel=False)

    def run():
        out = {}
        with fastload.stream(mixed.sources, names=names, shard=shard, dtype=torch.bfloat16, config=mixed.config,
                             trace=trace, progress=lambda d, t: calls.append((d, t))) as s:
            for name, tensor in s:
                assert name not in out
                out[name] = tensor
        return out

    got = bounded(run)
    want = {}
    for n in names:
        t = mixed.want[n]
        if n.split(".")[-1].startswith("w"):
            t = t.tensor_split(2, 0)[1]
        want[n] = t.to(torch.bfloat16) if t.is_floating_point() else t
    assert_bit_exact(got, want)
    assert calls and calls[-1] == (plan.output_bytes, plan.output_bytes)
    s = trace.summary()
    assert sum(s.bytes_by_file.values()) == s.bytes_fetched
    assert set(s.bytes_by_source) == {"local", "http", "s3"}


# -- verify_checksums over a mixed list ---------------------------------------------------------------------------


def repr_digest(data: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"


class QueryFileServer(ScriptedHTTP):
    """Ranged GETs of in-memory files, chosen by path AND query string (``/dl?file=a``), each with the headers
    given (e.g. a Repr-Digest). Logs (path?query, start, end)."""

    def __init__(self):
        super().__init__("query-file-server")
        self.files: dict[str, tuple[bytes, list[tuple[str, str]]]] = {}
        self.log: list[tuple[str, int, int]] = []
        self.delay: dict[str, float] = {}  # target -> seconds before each reply

    def add(self, target: str, data: bytes, headers=None) -> str:
        self.files[target] = (data, [("Repr-Digest", repr_digest(data))] if headers is None else headers)
        return f"http://127.0.0.1:{self.port}{target}"

    def _handle(self, h) -> None:
        parts = urlsplit(h.path)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        if target not in self.files:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data, extra = self.files[target]
        spec = (h.headers.get("Range") or "").strip()
        start, end = 0, len(data) - 1
        if spec.startswith("bytes="):
            first, _, last = spec[6:].partition("-")
            start, end = int(first), min(int(last), len(data) - 1) if last else len(data) - 1
        with self.lock:
            self.log.append((target, start, end + 1))
        if self.delay.get(target):
            time.sleep(self.delay[target])
        etag = '"' + hashlib.md5(data).hexdigest() + '"'
        if_match = h.headers.get("If-Match")
        if if_match is not None and if_match != etag:
            h.send_response(412)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        body = data[start:end + 1]
        h.send_response(206)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", etag)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        for name, value in extra:
            h.send_header(name, value)
        h.end_headers()
        try:
            h.wfile.write(body)
        except OSError:
            h.close_connection = True


@pytest.fixture
def qserver():
    with QueryFileServer() as server:
        yield server


def test_verify_over_mixed_list_wrong_digest_names_only_that_member(mixed, qserver, s3_server):
    """local A, HTTP B (right Repr-Digest), S3 C (right ChecksumSHA256), HTTP D (wrong Repr-Digest): an
    IntegrityError naming D; with D's digest right, the load verifies B, C and D."""
    s3_server.client().put_object(Bucket=mixed.bucket, Key="sum/c.safetensors", Body=mixed.c_path.read_bytes(),
                                  ChecksumAlgorithm="SHA256")
    c = f"s3://{mixed.bucket}/sum/c.safetensors"
    b = qserver.add("/b.safetensors", mixed.b_path.read_bytes())
    d_t = tensors_for("d", 5, 2)
    d_raw = fastload_bytes(d_t)
    d_bad = qserver.add("/d-bad.safetensors", d_raw, [("Repr-Digest", repr_digest(b"other"))])
    d_good = qserver.add("/d.safetensors", d_raw)
    config = VERIFY.replace(s3=mixed.config.s3)
    with Leaks(mixed.ports | {qserver.port}) as leaks:
        with pytest.raises(fastload.IntegrityError) as info:
            bounded(lambda: fastload.load([mixed.a, b, c, d_bad], config=config))
        leaks.check(grace_s=0.5)
    assert info.value.url == d_bad, info.value.url
    for other in (mixed.a, b, c):
        assert other not in str(info.value)
    trace = fastload.Trace(otel=False)
    got = bounded(lambda: fastload.load([mixed.a, b, c, d_good], config=config, trace=trace))
    assert_bit_exact(got, mixed.a_t | mixed.b_t | mixed.c_t | d_t)
    assert trace.summary().counters.get("checksums_verified") == 3


def fastload_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify"])
def test_two_http_members_told_apart_only_by_their_query_string(mixed, qserver, verify):
    """A download endpoint that names the object in its query (``/dl?file=x.safetensors``): two such members in
    one list are two objects. fastload hides query values in what it shows (``?file=***``), but must not confuse
    the two objects with each other (pinning, checksums, counters) because their shown URLs are equal."""
    x_t, y_t = tensors_for("x", 6, 3), tensors_for("y", 7, 1)
    x = qserver.add("/dl?file=x.safetensors", fastload_bytes(x_t))
    y = qserver.add("/dl?file=y.safetensors", fastload_bytes(y_t))
    # Deterministic order: one reader, and y's replies a little late, so x is read (and hashed) before y.
    qserver.delay["/dl?file=y.safetensors"] = 0.15
    trace = fastload.Trace(otel=False)
    config = (VERIFY if verify else CFG).replace(max_concurrency=1)
    got = bounded(lambda: fastload.load([x, mixed.a, y], config=config, trace=trace))
    assert_bit_exact(got, x_t | mixed.a_t | y_t)
    s = trace.summary()
    if verify:
        assert s.counters.get("checksums_verified") == 2, s.counters
    # Two objects, two counters: one per member, and each member's own bytes.
    assert len(s.bytes_by_file) == 3, list(s.bytes_by_file)


def test_query_distinguished_member_with_a_wrong_digest_is_caught(mixed, qserver):
    """As above, the second object publishes a Repr-Digest its bytes do not match: verify_checksums=True must
    raise IntegrityError for it, not let it through because the first object (same shown URL) verified."""
    x_t, y_t = tensors_for("x", 6, 3), tensors_for("y", 7, 1)
    x = qserver.add("/dl?file=x.safetensors", fastload_bytes(x_t))
    y_raw = fastload_bytes(y_t)
    y = qserver.add("/dl?file=y.safetensors", y_raw, [("Repr-Digest", repr_digest(b"not y"))])
    qserver.delay["/dl?file=y.safetensors"] = 0.15  # x is read and hashed first: a deterministic order
    with pytest.raises(fastload.IntegrityError) as info:
        bounded(lambda: fastload.load([x, mixed.a, y], config=VERIFY.replace(max_concurrency=1)))
    assert info.value.byte_range == (0, len(y_raw)), f"the mismatch reported is not y's: {info.value}"


def test_missing_s3_member_ends_the_load_while_the_http_member_probe_hangs(mixed):
    """Resolving a list runs its members at once: the S3 404 ends the load promptly, cancelling the HTTP size
    probe still waiting on a server that never answers (no waiting out stall timeouts and retries)."""
    mixed.http.faults.hang(path="*/b.safetensors")
    missing = f"s3://{mixed.bucket}/sub/absent.safetensors"
    with Leaks(mixed.ports) as leaks:
        start = time.monotonic()
        with pytest.raises(fastload.SourceNotFoundError) as info:
            bounded(lambda: fastload.load([mixed.b, mixed.a, missing], config=mixed.config), seconds=12)
        took = time.monotonic() - start
        mixed.http.hang_up()
        leaks.check(grace_s=1.0)
    assert missing in str(info.value)
    assert took < 3.0, f"the failed member took {took:.1f} s to end the load"


@pytest.mark.parametrize("bad", [None, "", 42, b"/x.safetensors"], ids=["none", "empty", "int", "bytes"])
def test_a_member_that_is_not_a_source_is_a_config_error_and_fetches_nothing(mixed, bad):
    with pytest.raises(fastload.ConfigError):
        bounded(lambda: fastload.load([mixed.b, bad, mixed.c], config=mixed.config))
    assert mixed.http_bytes() <= data_start(mixed.b_path.read_bytes())
    assert mixed.s3_get_bytes() == 0 or mixed.s3_get_bytes() <= data_start(mixed.c_path.read_bytes())


def test_stream_over_mixed_list_surfaces_a_member_failure_after_the_good_tensors(mixed):
    """The HTTP member's tensor reads all fail (500): the stream hands out the other members' tensors, bit-exact,
    then raises TransferError naming the HTTP member; nothing is left behind."""
    from servers.faults import FailWith

    class DataOnlyFail(FailWith):
        def wants_to_fire(self) -> bool:
            return self.seen > 2

    mixed.http.faults._add(DataOnlyFail(pattern="*/b.safetensors", status=500))
    seen: dict[str, torch.Tensor] = {}

    def run():
        with fastload.stream(mixed.sources, config=mixed.config.replace(max_concurrency=16)) as s:
            for name, tensor in s:
                seen[name] = tensor

    with Leaks(mixed.ports) as leaks:
        with pytest.raises(fastload.TransferError) as info:
            bounded(run)
        leaks.check(grace_s=1.0)
    assert info.value.url == mixed.b
    assert not any(n.startswith("b.") for n in seen)
    assert_bit_exact(seen, {n: t for n, t in mixed.want.items() if n in seen})
