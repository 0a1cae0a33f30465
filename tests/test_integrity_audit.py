"""Audit: published-checksum verification (``verify_checksums=True``, ``pull(verify=True)``).

HTTP ``Repr-Digest`` (RFC 9530), S3 ``ChecksumSHA256``; the streaming verifier under retries, out-of-order
completion, staging-buffer pressure, failures; pulls that are corrupted in transit.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from safetensors.torch import load_file

import fastload
from checkpoints import write_sharded
from reliability_helpers import (CHUNK, QUICK, ScriptedHTTP, assert_bit_exact, data_start, load_checked,  # noqa: F401
                                 private_tmp, write_checkpoint)

VERIFY = QUICK.replace(verify_checksums=True)
ENGINES = ["threads", "aiohttp"]


def b64sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def repr_digest(data: bytes) -> str:
    return f"sha-256=:{b64sha256(data)}:"


class DigestServer(ScriptedHTTP):
    """A ranged file server whose replies carry chosen ``Repr-Digest`` (or other) header lines.

    ``fault(path, start, end, nth)`` (nth: the how-many-th GET of ``path``, from 1) may return a dict with
    ``delay`` (s before answering), ``status`` (an error reply), ``cut`` (send that many body bytes, then close)
    and ``corrupt`` (flip one byte of the body: corrupted in transit, same length)."""

    def __init__(self):
        super().__init__("digest-server")
        self.files: dict[str, tuple[bytes, list[tuple[str, str]]]] = {}
        self.fault = None
        self.counts: dict[str, int] = {}
        self.log: list[tuple[str, int, int]] = []

    def add(self, name: str, data: bytes, headers: list[tuple[str, str]] | None = None) -> str:
        if headers is None:
            headers = [("Repr-Digest", repr_digest(data))]
        self.files["/" + name] = (data, headers)
        return self.url(name)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def _handle(self, h) -> None:
        path = urlsplit(h.path).path
        if path not in self.files:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data, extra = self.files[path]
        size = len(data)
        spec = (h.headers.get("Range") or "").strip()
        start, end = 0, size - 1
        ranged = spec.startswith("bytes=")
        if ranged:
            first, _, last = spec[6:].partition("-")
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
        with self.lock:
            nth = self.counts[path] = self.counts.get(path, 0) + 1
            self.log.append((path, start, end + 1))
        action = (self.fault(path, start, end + 1, nth) if self.fault else None) or {}
        if action.get("delay"):
            time.sleep(action["delay"])
        if action.get("status"):
            h.send_response(action["status"])
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        body = bytearray(data[start:end + 1])
        if action.get("corrupt") and body:
            body[len(body) // 2] ^= 0x01
        h.send_response(206 if ranged else 200)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", '"v1"')
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(body)))
        if ranged:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        for name, value in extra:
            h.send_header(name, value)
        h.end_headers()
        try:
            if action.get("cut") is not None:
                h.wfile.write(bytes(body[:action["cut"]]))
                h.wfile.flush()
                h.close_connection = True
                return
            h.wfile.write(bytes(body))
        except OSError:
            h.close_connection = True


@pytest.fixture
def dserver():
    with DigestServer() as server:
        yield server


@pytest.fixture
def ckpt(tmp_path):
    file, tensors = write_checkpoint(tmp_path / "model.safetensors")
    return file, file.read_bytes(), tensors


def bounded(fn, seconds: float = 8.0):
    """Run ``fn`` in a thread; fail (never hang) if it has not ended within ``seconds``. Returns its result or
    the exception it raised."""
    box = {}

    def run():
        try:
            box["v"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["e"] = exc

    t = threading.Thread(target=run, daemon=True, name="audit-bounded")
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"hung: still running after {seconds} s"
    return box.get("e", box.get("v"))


def aload_within(url, seconds: float, **kwargs):
    """``fastload.aload`` cancelled after ``seconds`` (so a deadlock fails the test instead of hanging it)."""
    async def main():
        try:
            return await asyncio.wait_for(fastload.aload(url, **kwargs), seconds)
        except asyncio.TimeoutError:
            return "deadlock"
    return bounded(lambda: asyncio.run(main()), seconds + 5)


def counters(trace):
    return trace.summary().counters


# -- HTTP Repr-Digest: right and wrong -----------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_http_wrong_repr_digest_is_integrity_error_naming_the_url(dserver, ckpt, engine):
    _, raw, _ = ckpt
    url = dserver.add("model.safetensors", raw, [("Repr-Digest", repr_digest(b"other bytes"))])
    result, _ = load_checked(url, {dserver.port}, VERIFY.replace(http_engine=engine))
    assert isinstance(result, fastload.IntegrityError), result
    assert result.url == url and "sha256 mismatch" in str(result) and url in str(result)
    assert result.byte_range == (0, len(raw))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", ["default", "one_reader", "small_chunks_convert"])
def test_http_right_repr_digest_verified(dserver, ckpt, engine, shape):
    file, raw, tensors = ckpt
    url = dserver.add("model.safetensors", raw)
    config = VERIFY.replace(http_engine=engine)
    kwargs = {}
    if shape == "one_reader":
        config = config.replace(max_concurrency=1)
    elif shape == "small_chunks_convert":
        config = config.replace(max_concurrency=16, host_buffer_bytes=32 * CHUNK)
        kwargs["dtype"] = torch.float64
    trace = fastload.Trace()
    got = bounded(lambda: fastload.load(url, config=config, trace=trace, **kwargs))
    assert not isinstance(got, BaseException), got
    if "dtype" in kwargs:
        for name, t in tensors.items():
            assert torch.equal(got[name], t.to(torch.float64) if t.is_floating_point() else t), name
    else:
        assert_bit_exact(got, load_file(file))
    c = counters(trace)
    assert c.get("checksums_verified") == 1 and not c.get("checksums_skipped"), c
    # hashed from byte 0, the size probe's first 8 bytes included: they are not fetched a second time
    assert sum(1 for p, s, e in dserver.log if s == 0) == 1, dserver.log


@pytest.mark.parametrize("engine", ENGINES)
def test_http_verified_with_cuts_and_a_slow_first_chunk(dserver, ckpt, engine):
    """Chunks cut mid-body and resumed are hashed once, in order; a slow first data chunk makes the later ones
    complete first and wait their turn."""
    file, raw, _ = ckpt
    ds = data_start(raw)
    url = dserver.add("model.safetensors", raw)
    state = {"slow": False, "cuts": 0}

    def fault(path, start, end, nth):
        if start == ds and not state["slow"]:
            state["slow"] = True
            return {"delay": 0.4}
        if start > ds and end - start > 40_000 and state["cuts"] < 5:
            state["cuts"] += 1
            return {"cut": 20_000 + 4_000 * state["cuts"]}
        return None

    dserver.fault = fault
    trace = fastload.Trace()
    got = bounded(lambda: fastload.load(url, config=VERIFY.replace(http_engine=engine), trace=trace))
    assert not isinstance(got, BaseException), got
    assert_bit_exact(got, load_file(file))
    assert state["slow"] and state["cuts"] == 5
    assert counters(trace).get("checksums_verified") == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_http_corrupted_in_transit_is_caught(dserver, ckpt, engine):
    """The server publishes the right digest, but one ranged reply's body has a flipped bit: IntegrityError,
    never a tensor with wrong bytes."""
    _, raw, _ = ckpt
    ds = data_start(raw)
    url = dserver.add("model.safetensors", raw)
    dserver.fault = lambda path, start, end, nth: {"corrupt": True} if start > ds + 3 * CHUNK else None
    result, _ = load_checked(url, {dserver.port}, VERIFY.replace(http_engine=engine))
    assert isinstance(result, fastload.IntegrityError), result
    assert result.url == url


def test_stream_mismatch_raises_at_the_end(dserver, ckpt):
    """integrity.py: 'from a stream() at the end, after earlier tensors were handed out'."""
    _, raw, tensors = ckpt
    url = dserver.add("model.safetensors", raw, [("Repr-Digest", repr_digest(b"nope"))])
    seen = []

    def run():
        with fastload.stream(url, config=VERIFY) as s:
            for name, _ in s:
                seen.append(name)
        return "finished"

    result = bounded(run)
    assert isinstance(result, fastload.IntegrityError), result
    assert len(seen) < len(tensors)


def test_names_listing_every_tensor_reads_the_file_whole_and_verifies(dserver, ckpt):
    """A names= load that skips no byte of the file is a whole read: it is verified, and a wrong digest is
    caught (only loads that skip bytes go unverified)."""
    _, raw, tensors = ckpt
    url = dserver.add("model.safetensors", raw)
    trace = fastload.Trace()
    fastload.load(url, names=list(tensors), config=VERIFY, trace=trace)
    assert counters(trace).get("checksums_verified") == 1
    bad = dserver.add("bad.safetensors", raw, [("Repr-Digest", repr_digest(b"x"))])
    with pytest.raises(fastload.IntegrityError):
        fastload.load(bad, names=list(tensors), config=VERIFY)


# -- the verifier under pressure: never a deadlock --------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_verify_with_conversion_and_few_staging_buffers_does_not_deadlock(dserver, ckpt, engine):
    """dtype= stages every float chunk in the pool; with fewer buffers than readers a later chunk that took a
    buffer must not wait (holding it) for the hash of an earlier chunk that is still waiting for a buffer."""
    _, raw, tensors = ckpt
    url = dserver.add("model.safetensors", raw)
    config = VERIFY.replace(http_engine=engine, max_concurrency=8, host_buffer_bytes=2 * CHUNK)
    got = aload_within(url, 6.0, dtype=torch.float16, config=config)
    assert got != "deadlock", "load with verify_checksums=True and dtype= never finished (deadlock)"
    assert not isinstance(got, BaseException), got
    for name, t in tensors.items():
        assert torch.equal(got[name], t.to(torch.float16) if t.is_floating_point() else t), name


def test_same_load_without_verification_finishes(dserver, ckpt):
    """Control for the test above: the same pool pressure without verification completes."""
    _, raw, _ = ckpt
    url = dserver.add("model.safetensors", raw)
    config = QUICK.replace(max_concurrency=8, host_buffer_bytes=2 * CHUNK)
    got = aload_within(url, 6.0, dtype=torch.float16, config=config)
    assert isinstance(got, dict)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_chunk_that_fails_for_good_ends_the_load_while_later_ones_wait_for_its_hash(dserver, ckpt, engine):
    _, raw, _ = ckpt
    ds = data_start(raw)
    url = dserver.add("model.safetensors", raw)
    dserver.fault = lambda path, start, end, nth: {"delay": 0.1, "status": 500} if start == ds else None
    result, _ = load_checked(url, {dserver.port}, VERIFY.replace(http_engine=engine), bound_s=8.0)
    assert isinstance(result, fastload.TransferError), result
    assert result.url == url and result.byte_range[0] == ds


# -- Repr-Digest as RFC 9530 / RFC 8941 define it ------------------------------------------------------------


def test_repr_digest_on_two_field_lines_is_one_dictionary(dserver, ckpt):
    """RFC 9110 5.3: several lines of a field are one comma-joined list; RFC 9530's Repr-Digest is a Dictionary,
    so ``sha-512`` on one line and ``sha-256`` on the next publish a sha-256 that must be verified."""
    _, raw, _ = ckpt
    sha512 = base64.b64encode(hashlib.sha512(raw).digest()).decode()
    url = dserver.add("model.safetensors", raw, [("Repr-Digest", f"sha-512=:{sha512}:"),
                                                 ("Repr-Digest", repr_digest(raw))])
    trace = fastload.Trace()
    fastload.load(url, config=VERIFY, trace=trace)
    assert counters(trace).get("checksums_verified") == 1, counters(trace)


def test_repr_digest_duplicate_key_last_one_wins(dserver, ckpt):
    """RFC 8941 4.2.2 (Dictionary parsing): a repeated key overwrites the earlier value."""
    _, raw, tensors = ckpt
    url = dserver.add("model.safetensors", raw,
                      [("Repr-Digest", f"sha-256=:{b64sha256(b'stale')}:, {repr_digest(raw)}")])
    trace = fastload.Trace()
    got = bounded(lambda: fastload.load(url, config=VERIFY, trace=trace))
    assert not isinstance(got, BaseException), got
    assert counters(trace).get("checksums_verified") == 1


@pytest.mark.parametrize("value", [
    "sha-512=:{sha512}:",                     # another algorithm only
    "sha-256=:not*base64:",                   # malformed base64
    "sha-256=:{short}:",                      # a 20-byte value under sha-256
    "sha-256={b64}",                          # not a byte sequence (no colons)
    "sha-256=:{b64}:;foo=1",                  # parameters: not used (and not misread)
], ids=["sha512-only", "bad-base64", "wrong-length", "no-colons", "params"])
def test_unusable_repr_digest_is_ignored_not_an_error(dserver, ckpt, value):
    file, raw, _ = ckpt
    header = value.format(sha512=base64.b64encode(hashlib.sha512(raw).digest()).decode(),
                          short=base64.b64encode(hashlib.sha1(raw).digest()).decode(), b64=b64sha256(b"x"))
    url = dserver.add("model.safetensors", raw, [("Repr-Digest", header)])
    trace = fastload.Trace()
    got = fastload.load(url, config=VERIFY, trace=trace)
    assert_bit_exact(got, load_file(file))
    assert not counters(trace).get("checksums_verified") and not counters(trace).get("checksum_mismatches")


def test_content_digest_of_a_range_is_not_a_representation_digest(dserver, ckpt):
    """RFC 9530: Content-Digest covers the 206 reply's content, Repr-Digest the whole representation; only the
    latter can be compared with a hash of the whole file."""
    file, raw, _ = ckpt
    url = dserver.add("model.safetensors", raw, [("Content-Digest", repr_digest(raw[:8]))])
    got = fastload.load(url, config=VERIFY)
    assert_bit_exact(got, load_file(file))


# -- pull(verify=True) --------------------------------------------------------------------------------------


def test_pull_http_verify_right_digest(dserver, ckpt, tmp_path):
    _, raw, _ = ckpt
    url = dserver.add("model.safetensors", raw)
    trace = fastload.Trace()
    out = tmp_path / "out"
    bounded(lambda: fastload.pull(url, to=out, config=QUICK, verify=True, trace=trace))
    assert (out / "model.safetensors").read_bytes() == raw
    assert counters(trace).get("checksums_verified") == 1


def test_pull_http_verify_corrupted_in_transit_leaves_no_final_file(dserver, ckpt, tmp_path):
    _, raw, _ = ckpt
    url = dserver.add("model.safetensors", raw)
    dserver.fault = lambda path, start, end, nth: {"corrupt": True} if start > 4 * CHUNK else None
    out = tmp_path / "out"
    result = bounded(lambda: fastload.pull(url, to=out, config=QUICK, verify=True))
    assert isinstance(result, fastload.IntegrityError), result
    assert result.url == url
    assert not (out / "model.safetensors").exists()


def test_pull_http_verify_index_corrupted_in_transit_is_never_written(dserver, tmp_path):
    """The index is fetched once (its probe brings it whole), listed from and written from those bytes: corrupted
    in transit, the verified pull refuses them (as bad JSON, or as a digest mismatch) and writes nothing. (It
    used to be fetched twice, and the copy written was not the one listed.)"""
    src = write_sharded(tmp_path / "src", {f"t{i}": torch.randn(20_000, generator=torch.Generator().manual_seed(i))
                                           for i in range(4)}, 2)
    for f in sorted(Path(src).iterdir()):
        dserver.add("m/" + f.name, f.read_bytes())
    index = "/m/model.safetensors.index.json"
    dserver.fault = lambda path, start, end, nth: {"corrupt": True} if path == index else None
    out = tmp_path / "out"
    result = bounded(lambda: fastload.pull(dserver.url("m/"), to=out, config=QUICK, verify=True))
    written = (out / "model.safetensors.index.json")
    assert isinstance(result, (fastload.IntegrityError, fastload.FormatError)), result
    assert not written.exists()
    assert dserver.counts.get(index) == 1


def test_pull_verify_with_few_staging_buffers_does_not_deadlock(dserver, ckpt, tmp_path):
    """pull stages every chunk; with verification and fewer buffers than readers it must still finish."""
    _, raw, _ = ckpt
    url = dserver.add("model.safetensors", raw)
    config = QUICK.replace(max_concurrency=8, host_buffer_bytes=2 * CHUNK)
    out = tmp_path / "out"

    async def main():
        try:
            return await asyncio.wait_for(fastload.apull(url, to=out, config=config, verify=True), 6.0)
        except asyncio.TimeoutError:
            return "deadlock"

    result = bounded(lambda: asyncio.run(main()), 11.0)
    assert result != "deadlock", "pull(verify=True) never finished (deadlock)"
    assert not isinstance(result, BaseException), result
    assert (out / "model.safetensors").read_bytes() == raw


# -- S3 ChecksumSHA256 in pull -------------------------------------------------------------------------------


def _corrupt_moto_checksum(bucket: str, key: str) -> None:
    from moto.s3.models import s3_backends

    wrong = base64.b64encode(hashlib.sha256(b"not these bytes").digest()).decode()
    for regions in s3_backends.values():
        for backend in regions.values():
            if bucket in backend.buckets:
                backend.buckets[bucket].keys[key].checksum_value = wrong
                return
    raise AssertionError("object not found in moto's backend")


def test_pull_s3_verify(s3_server, s3_bucket, ckpt, tmp_path):
    _, raw, _ = ckpt
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="ok/model.safetensors", Body=raw, ChecksumAlgorithm="SHA256")
    client.put_object(Bucket=s3_bucket, Key="bad/model.safetensors", Body=raw, ChecksumAlgorithm="SHA256")
    _corrupt_moto_checksum(s3_bucket, "bad/model.safetensors")
    trace = fastload.Trace()
    good = tmp_path / "good"
    bounded(lambda: fastload.pull(f"s3://{s3_bucket}/ok/model.safetensors", to=good, config=QUICK, verify=True,
                                  trace=trace))
    assert (good / "model.safetensors").read_bytes() == raw
    assert counters(trace).get("checksums_verified") == 1
    bad = tmp_path / "bad"
    result = bounded(lambda: fastload.pull(f"s3://{s3_bucket}/bad/model.safetensors", to=bad, config=QUICK,
                                           verify=True))
    assert isinstance(result, fastload.IntegrityError), result
    assert result.url == f"s3://{s3_bucket}/bad/model.safetensors"
    assert not (bad / "model.safetensors").exists()
