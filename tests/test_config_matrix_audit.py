"""A pairwise matrix of LoadConfig settings and load options that each work alone and must work together.

Source (local; local with ``direct_io`` on an evicted file; HTTP with threaded bodies; HTTP with aiohttp;
S3) x ``max_concurrency`` x ``host_buffer_bytes`` (exactly two chunks, or the default) x ``chunk_bytes`` x
``local_threads`` x ``local_cold_readers`` x ``verify_checksums`` x ``dtype`` x ``names`` x ``shard`` x API
(``load``, a ``stream`` consumed slowly, a ``stream`` left after one tensor).

Every combination must end within a bound, give safetensors' bytes (converted with ``.to(dtype)`` where
asked, floating-point tensors only), leave no thread, socket or open file behind, and fetch the same number
of bytes (``trace`` ``bytes_fetched``) as every other combination reading the same plan from the same kind of
source. The HTTP server here publishes ``Repr-Digest`` and the S3 objects carry ``ChecksumSHA256``, so
``verify_checksums=True`` really hashes (and makes reads wait their turn) on the network sources.

Combinations: a greedy all-pairs cover of the factors, topped up with a seeded sample to about 80, plus the
corners most likely to deadlock (one worker, two buffers and verification; a slow stream consumer with two
buffers; ``direct_io`` with a tiny budget and conversion; one cold reader with a shard).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch

import fastload
from checkpoints import evict, write_sharded
from reliability_helpers import QUICK_RETRY, Leaks, client_sockets, private_tmp, same_bytes  # noqa: F401 -- private_tmp: fixture
from servers.http_range import RangeHTTPServer, _FileHandler

KiB, MiB = 1 << 10, 1 << 20
BOUND_S = 8.0  # one combination, load to leak check; all of them take well under a second here
DEFAULT = fastload.LoadConfig()

# dim-1 splits (strided rows, narrow and wide), dim-0 splits (one contiguous run), a split of 3 elements in 3 and
# of 77 bools in 26/26/25 (tensor_split's sizes), an empty tensor split along its non-empty dim.
SHARD_RULES = {r"\.cols$": 1, r"\.rows$": 0, r"^(big|a|mask|ids)$": 0, r"^empty$": 1}
SHARD = fastload.Shard(1, 3, SHARD_RULES)
NAMES_SUBSET = ["a", "l0.cols", "half", "l1.rows", "scalar", "empty"]  # from both files, with gaps between
# Every tensor of the first file (write_sharded puts the first six there), in another order: that file is read
# whole (and verified), the second file not at all.
NAMES_FILE0 = ["l0.wide.cols", "half", "ids", "l0.cols", "big", "a"]
NAMES = {"all": None, "subset": NAMES_SUBSET, "file0": NAMES_FILE0}
NETWORK = ("http_threads", "http_aiohttp", "s3", "s3_aiohttp")


def make_tensors() -> dict[str, torch.Tensor]:
    """~6 MB: odd offsets (a 12-byte tensor first), tensors spanning several 64 KiB chunks, two whose reads
    reach 1 MiB also when sharded (so O_DIRECT and the cold-reader gate see them), a dim-1 split with narrow
    rows (read as spans),
    one with rows over 64 KiB apart (read row by row), a dim-0 split, and integer, bool, f16, f64, empty and
    scalar tensors (which dtype= must leave alone or convert)."""
    g = torch.Generator().manual_seed(11)
    return {
        "a": torch.randn(3, generator=g),
        "big": torch.randn(800_001, generator=g),
        "l0.cols": torch.randn(700, 501, generator=g),
        "ids": torch.randint(-2**40, 2**40, (1001,), generator=g, dtype=torch.int64),
        "half": torch.randn(5003, generator=g).to(torch.float16),
        "l0.wide.cols": torch.randn(6, 17_001, generator=g),
        "mask": torch.randint(0, 2, (77,), generator=g).bool(),
        "l1.rows": torch.randn(333, 301, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "l1.cols": torch.randn(97, 1001, generator=g),
        "tail": torch.randint(0, 255, (40_001,), generator=g, dtype=torch.uint8),
    }


# -- an HTTP Range server that publishes Repr-Digest ------------------------------------------------------------


class _DigestHandler(_FileHandler):
    def produce(self, path, headers, body):
        reply = super().produce(path, headers, body)
        if reply.status in (200, 206):
            digest = self.server.owner.digest_of(path)
            if digest is not None:
                reply.headers = list(reply.headers) + [("Repr-Digest", f"sha-256=:{digest}:")]
        return reply


class DigestRangeServer(RangeHTTPServer):
    """The tests' Range server, with ``Repr-Digest: sha-256=:<base64>:`` (RFC 9530) on every file reply."""

    handler_class = _DigestHandler

    def __init__(self, root: Path):
        super().__init__(root)
        self._digests: dict[str, str] = {}
        self._lock = threading.Lock()

    def digest_of(self, path: str) -> str | None:
        with self._lock:
            if path not in self._digests:
                file = self.root / path.lstrip("/")
                self._digests[path] = base64.b64encode(hashlib.sha256(file.read_bytes()).digest()).decode()
            return self._digests[path]


# -- the checkpoint over every source ----------------------------------------------------------------------------


@dataclass
class Served:
    directory: Path
    want: dict[str, torch.Tensor]
    http_url: str
    s3_url: str
    ports: set[int]


@pytest.fixture(scope="module")
def served(tmp_path_factory, s3_server):
    directory = write_sharded(tmp_path_factory.mktemp("matrix") / "ckpt", make_tensors(), 2)
    want: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        want |= {k: v.clone() for k, v in safetensors.torch.load_file(str(file)).items()}
    client = s3_server.client()
    bucket = "matrix-audit"
    s3_server.ensure_bucket(bucket, client)
    for file in sorted(directory.iterdir()):
        client.put_object(Bucket=bucket, Key=f"ckpt/{file.name}", Body=file.read_bytes(), ChecksumAlgorithm="SHA256")
    s3_port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    with DigestRangeServer(directory) as http:
        yield Served(directory, want, http.url, f"s3://{bucket}/ckpt/", {http.port, s3_port})


# -- combinations ------------------------------------------------------------------------------------------------

SOURCES = ("local", "local_direct", "http_threads", "http_aiohttp", "s3", "s3_aiohttp")
FACTORS = {
    "source": SOURCES,
    "mc": (1, 2, 16),
    "buffers": ("2chunks", "default"),
    "chunk": (64 * KiB, None),
    "threads": (1, 4),
    "cold": (None, 1),
    "verify": (False, True),
    "dtype": (None, torch.float16),
    "names": ("all", "subset", "file0"),
    "shard": (False, True),
    "api": ("load", "slow_stream", "early_stream"),
}


@dataclass(frozen=True)
class Combo:
    source: str
    mc: int
    buffers: str | int  # "2chunks", "default", or a number of bytes
    chunk: int | None  # None: the default chunk_bytes
    threads: int
    cold: int | None
    verify: bool
    dtype: torch.dtype | None
    names: str
    shard: bool
    api: str
    rank: int = 1  # of the Shard, when shard is set

    @property
    def sharding(self) -> fastload.Shard | None:
        return fastload.Shard(self.rank, SHARD.world_size, SHARD_RULES) if self.shard else None

    def __str__(self) -> str:
        chunk = "default" if self.chunk is None else f"{self.chunk // KiB}KiB"
        dtype = "-" if self.dtype is None else str(self.dtype).removeprefix("torch.")
        return (f"{self.source}|mc={self.mc}|buf={self.buffers}|chunk={chunk}|threads={self.threads}|"
                f"cold={self.cold}|verify={int(self.verify)}|dtype={dtype}|names={self.names}|"
                f"shard={f'{self.rank}/3' if self.shard else 0}|{self.api}")

    def config(self) -> fastload.LoadConfig:
        chunk = self.chunk or DEFAULT.chunk_bytes
        buffers = (2 * chunk if self.buffers == "2chunks" else DEFAULT.host_buffer_bytes
                   if self.buffers == "default" else self.buffers)
        return fastload.LoadConfig(
            chunk_bytes=chunk, host_buffer_bytes=buffers, max_concurrency=self.mc, local_threads=self.threads,
            local_cold_readers=self.cold, direct_io=self.source == "local_direct", verify_checksums=self.verify,
            http_engine="aiohttp" if self.source.endswith("_aiohttp") else "threads",
            stall_timeout_s=5.0, connect_timeout_s=2.0, retry=QUICK_RETRY)


def _pairs(values: tuple) -> set:
    return {((i, a), (j, b)) for (i, a), (j, b) in itertools.combinations(enumerate(values), 2)}


def pairwise(seed: int = 20240611, total: int = 40) -> list[Combo]:
    """A greedy all-pairs cover of ``FACTORS`` (every value of every factor meets every value of every other at
    least once), then a seeded sample of the rest up to ``total``."""
    rng = random.Random(seed)
    keys = list(FACTORS)
    everything = list(itertools.product(*(FACTORS[k] for k in keys)))
    uncovered = set().union(*(_pairs(v) for v in everything))
    chosen: list[tuple] = []
    while uncovered:
        best, gain = None, -1
        for candidate in rng.sample(everything, 300):
            g = len(_pairs(candidate) & uncovered)
            if g > gain:
                best, gain = candidate, g
        if gain == 0:  # the sample missed: take a combination that covers some pair still open
            (i, a), (j, b) = next(iter(uncovered))
            best = next(v for v in everything if v[i] == a and v[j] == b)
        chosen.append(best)
        uncovered -= _pairs(best)
    rest = [v for v in everything if v not in set(chosen)]
    chosen += rng.sample(rest, max(0, total - len(chosen)))
    return [Combo(**dict(zip(keys, v))) for v in chosen]


def C(source, *, mc=16, buffers="default", chunk=64 * KiB, threads=4, cold=None, verify=False, dtype=None,
      names="all", shard=False, api="load", rank=1) -> Combo:
    return Combo(source, mc, buffers, chunk, threads, cold, verify, dtype, names, shard, api, rank)


F16 = torch.float16
CORNERS = [
    # one worker, two buffers, verification (+ conversion): a chunk that holds a buffer waits for the hash
    *[C(s, mc=mc, buffers="2chunks", verify=True, dtype=F16, api=api)
      for s in NETWORK for mc in (1, 2, 16) for api in ("load", "slow_stream")],
    C("http_threads", mc=16, buffers="2chunks", verify=True, dtype=F16, api="early_stream"),
    C("s3", mc=16, buffers="2chunks", verify=True, dtype=F16, names="subset", shard=True, api="slow_stream"),
    C("http_aiohttp", mc=1, buffers="2chunks", verify=True, dtype=F16, names="file0", api="slow_stream"),
    C("s3_aiohttp", mc=16, buffers="2chunks", verify=True, dtype=F16, names="file0", api="load"),
    # other conversions: up (f16/bf16 -> f32, f64) as well as down, through the tight pool
    *[C(s, mc=2, buffers="2chunks", dtype=dt, shard=shard, verify=True)
      for s in ("local", "local_direct", "http_threads", "s3_aiohttp")
      for dt, shard in ((torch.float32, False), (torch.bfloat16, True), (torch.float64, False))],
    # the first and last ranks: their strided span borders the neighbouring tensor, read in the same chunk
    *[C(s, mc=mc, buffers="2chunks", chunk=chunk, dtype=dt, shard=True, rank=rank, cold=cold, api=api)
      for rank in (0, 2) for s, mc, chunk, dt, cold, api in (
          ("local", 1, 64 * KiB, F16, None, "load"), ("local", 16, None, torch.float32, 1, "slow_stream"),
          ("local_direct", 16, MiB, F16, 1, "load"), ("http_threads", 2, 64 * KiB, torch.bfloat16, None, "load"),
          ("s3_aiohttp", 16, None, F16, None, "slow_stream"))],
    # a slow stream consumer with two buffers
    *[C(s, mc=mc, buffers="2chunks", dtype=F16, shard=shard, api="slow_stream")
      for s in ("local", "local_direct") for mc in (1, 16) for shard in (False, True)],
    # direct_io with a tiny budget and conversion (the scratch gets what the staging pool leaves, or nothing)
    *[C("local_direct", mc=mc, buffers=buffers, chunk=MiB, threads=threads, dtype=F16, api=api)
      for mc in (1, 16) for buffers in (2 * MiB, 3 * MiB, 4 * MiB) for threads in (1, 4)
      for api in ("load", "slow_stream")],
    C("local_direct", mc=16, buffers=3 * MiB, chunk=MiB, dtype=F16, cold=1, shard=True),
    C("local_direct", mc=16, buffers="2chunks", chunk=None, dtype=F16, threads=1),
    C("local_direct", mc=16, buffers="default", chunk=None, dtype=F16, cold=1, threads=1),
    # one cold reader with a shard (rows read with gaps, a span at a time, through the ordered gate)
    *[C(s, mc=mc, chunk=chunk, threads=threads, cold=1, shard=True, dtype=dtype, api=api)
      for s in ("local", "local_direct") for mc in (1, 16) for chunk in (64 * KiB, None, MiB)
      for threads, dtype, api in ((1, None, "load"), (4, F16, "slow_stream"))],
]

COMBOS = list(dict.fromkeys(pairwise() + CORNERS))


class FreshLeaks(Leaks):
    """``Leaks`` that blames a test only for client sockets it opened: one left by an earlier test (see
    test_stream_left_as_its_load_ends_closes_everything) must not fail every test after it."""

    def __enter__(self) -> "FreshLeaks":
        super().__enter__()
        self.old_sockets = {c.laddr for c in client_sockets(self.ports)}
        return self

    def sockets(self) -> list:
        return [c for c in client_sockets(self.ports) if c.laddr not in self.old_sockets]


# -- running one ---------------------------------------------------------------------------------------------------


def expected(want: dict[str, torch.Tensor], combo: Combo) -> dict[str, torch.Tensor]:
    names = NAMES[combo.names] or list(want)
    out = {}
    for name in names:
        t = want[name]
        if combo.shard:
            dim = SHARD.dim_for(name)
            if dim is not None:
                t = t.tensor_split(SHARD.world_size, dim)[combo.rank].contiguous()
        if combo.dtype is not None and t.dtype.is_floating_point:
            t = t.to(combo.dtype)
        out[name] = t
    return out


def source_of(served: Served, combo: Combo) -> str:
    if combo.source.startswith("local"):
        return str(served.directory)
    return served.http_url if combo.source.startswith("http") else served.s3_url


def family(combo: Combo) -> str:
    """Sources that must count the same bytes for one plan. With verification on, a network file's first 8
    bytes are read again through the verifying transport (resolve.read_header: deliberate), so that splits."""
    kind = {"local_direct": "local", "http_aiohttp": "http", "http_threads": "http", "s3_aiohttp": "s3"}.get(
        combo.source, combo.source)
    return f"{kind}+verify" if combo.verify and kind != "local" else kind


def _run(combo: Combo, source: str, trace: fastload.Trace, progress) -> dict[str, torch.Tensor]:
    kwargs = dict(dtype=combo.dtype, names=NAMES[combo.names], shard=combo.sharding,
                  config=combo.config(), trace=trace, progress=progress)
    if combo.api == "load":
        return fastload.load(source, **kwargs)
    got = {}
    with fastload.stream(source, **kwargs) as s:
        for name, tensor in s:
            assert name not in got, f"{name} handed out twice"
            got[name] = tensor
            if combo.api == "early_stream":
                break
            time.sleep(0.01)  # a slow consumer: the loader runs ahead of it
    return got


def run_bounded(combo: Combo, source: str, trace: fastload.Trace, progress) -> dict[str, torch.Tensor]:
    box: dict = {}

    def body():
        try:
            box["value"] = _run(combo, source, trace, progress)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=body, name="matrix-combo", daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(BOUND_S)
    if thread.is_alive():
        pytest.fail(f"[{combo}] did not finish within {BOUND_S} s (deadlock or starvation?)")
    if "error" in box:
        raise AssertionError(f"[{combo}] failed after {time.monotonic() - start:.2f} s: "
                             f"{type(box['error']).__name__}: {box['error']}") from box["error"]
    return box["value"]


#: (family, the plan's chunks) -> (bytes_fetched, the first combination that read it): one plan, one count.
_FETCHED: dict[tuple[str, str], tuple[int, str]] = {}


def plan_key(served: Served, combo: Combo) -> str:
    plan = fastload.plan(str(served.directory), names=NAMES[combo.names], shard=combo.sharding,
                         config=combo.config())
    chunks = [{k: v for k, v in c.items() if k != "id"} for c in plan.to_dict()["chunks"]]
    return json.dumps([plan.chunk_bytes, chunks])


def test_matrix_is_pairwise_and_bounded():
    """The matrix itself: every pair of factor values is covered, and it stays small enough to run quickly."""
    keys = list(FACTORS)
    covered = set().union(*(_pairs(tuple(getattr(c, k) for k in keys)) for c in COMBOS))
    needed = set().union(*(_pairs(v) for v in itertools.product(*(FACTORS[k] for k in keys))))
    assert needed <= covered
    assert len(COMBOS) <= 200


@pytest.mark.parametrize("combo", COMBOS, ids=str)
def test_combination(served: Served, combo: Combo):
    source = source_of(served, combo)
    key = (family(combo), plan_key(served, combo))
    if combo.source == "local_direct" or (combo.source == "local" and combo.cold):
        for file in served.directory.glob("*.safetensors"):
            evict(file)  # cold: O_DIRECT and the cold-reader gate only take uncached ranges
    trace = fastload.Trace()
    calls: list[tuple[int, int]] = []
    with FreshLeaks(served.ports) as leaks:
        got = run_bounded(combo, source, trace, lambda done, total: calls.append((done, total)))
    try:
        leaks.check(grace_s=1.0)
    except AssertionError as exc:
        raise AssertionError(f"[{combo}] {exc}") from None
    want = expected(served.want, combo)

    if combo.api == "early_stream":
        assert len(got) == 1, f"[{combo}] {list(got)}"
    else:
        assert set(got) == set(want), f"[{combo}] names: got {sorted(got)}, want {sorted(want)}"
    for name, tensor in got.items():
        assert same_bytes(tensor, want[name]), \
            f"[{combo}] {name}: {tensor.dtype} {tuple(tensor.shape)} differs from safetensors' " \
            f"{want[name].dtype} {tuple(want[name].shape)}"
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), \
            f"[{combo}] {name} does not own its memory"
    if combo.api == "early_stream":
        return

    summary = trace.summary()
    counters = summary.counters
    assert not counters.get("checksum_mismatches"), f"[{combo}] {counters}"
    if combo.verify and combo.source in NETWORK:
        # the index (read whole) and each shard file the load reads whole are verified; the others skipped
        whole = 0 if combo.shard else {"all": 2, "subset": 0, "file0": 1}[combo.names]
        assert (counters.get("checksums_verified", 0), counters.get("checksums_skipped", 0)) == (1 + whole, 2 - whole), \
            f"[{combo}] expected {1 + whole} verified (index + files read whole), {2 - whole} skipped: {counters}"
    else:
        assert not counters.get("checksums_verified") and not counters.get("checksums_skipped"), f"[{combo}] {counters}"
    stored = sum(served.want[n].tensor_split(SHARD.world_size, SHARD.dim_for(n))[combo.rank].nbytes
                 if combo.shard and SHARD.dim_for(n) is not None else served.want[n].nbytes for n in want)
    assert calls and calls[-1] == (stored, stored), f"[{combo}] progress ended at {calls[-1:]}, want {stored}"
    assert all(a[0] < b[0] and a[1] == b[1] for a, b in zip(calls, calls[1:])), f"[{combo}] progress: {calls}"
    fetched = summary.bytes_fetched
    first = _FETCHED.setdefault(key, (fetched, str(combo)))
    assert fetched == first[0], \
        f"[{combo}] fetched {fetched} bytes; [{first[1]}] fetched {first[0]} for the same plan"


@pytest.mark.parametrize("source_kind", ["http_threads", "http_aiohttp", "s3", "s3_aiohttp", "local"])
def test_stream_left_as_its_load_ends_closes_everything(served: Served, source_kind: str, tmp_path):
    """A stream left right after its first tensor, where that tensor only arrives with the load's last byte (one
    worker, the whole first file in one chunk, only that file's tensors): the cancel then lands while the load is
    closing. It must still close every transport -- no socket, thread or aiohttp session left -- and still write
    its trace file ("written when the load ends, also if it fails"). Repeated, because where the cancel lands
    varies (about every other run lands in it here), so it is tried 20 times; each must be clean."""
    combo = C(source_kind, mc=1, chunk=None, names="file0", api="early_stream")
    source = source_of(served, combo)
    for attempt in range(20):
        path = tmp_path / f"trace-{attempt}.json"
        with FreshLeaks(served.ports) as leaks:
            def leave_early():
                with fastload.stream(source, names=NAMES_FILE0, config=combo.config(), trace=str(path)) as s:
                    for name, tensor in s:
                        assert same_bytes(tensor, served.want[name]), name
                        break
                return {}

            box = {}
            thread = threading.Thread(target=lambda: box.setdefault("v", leave_early()), daemon=True)
            thread.start()
            thread.join(BOUND_S)
            assert not thread.is_alive(), f"[{combo}] attempt {attempt}: not closed within {BOUND_S} s"
            assert "v" in box, f"[{combo}] attempt {attempt}: the stream raised"
        try:
            leaks.check(grace_s=1.0)
        except AssertionError as exc:
            raise AssertionError(f"[{combo}] attempt {attempt}: {exc}") from None
        assert path.exists(), f"[{combo}] attempt {attempt}: the trace file was not written"
