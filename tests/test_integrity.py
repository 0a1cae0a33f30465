"""Published checksums: S3 ``ChecksumSHA256`` verified while the load streams; mismatches are IntegrityError."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random

import pytest
import torch

import fastload
from fastload.integrity import (StreamingVerifier, checksum_from_base64, checksum_from_repr_digest,
                                verify_file)
from fastload.sources.base import ObjectInfo, Segment
from fastload.trace import Trace
from reliability_helpers import QUICK, assert_bit_exact, private_tmp, write_checkpoint  # noqa: F401


def put_with_sha256(s3_server, bucket: str, key: str, data: bytes) -> None:
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256")


def corrupt_published_checksum(bucket: str, key: str) -> None:
    """Make the in-process moto server publish a wrong ChecksumSHA256 for the object (a lying store)."""
    from moto.s3.models import s3_backends

    wrong = base64.b64encode(hashlib.sha256(b"not these bytes").digest()).decode()
    for regions in s3_backends.values():
        for backend in regions.values():
            if bucket in backend.buckets:
                backend.buckets[bucket].keys[key].checksum_value = wrong
                return
    raise AssertionError("object not found in moto's backend")


@pytest.fixture
def s3_ckpt(s3_server, s3_bucket, tmp_path):
    file, tensors = write_checkpoint(tmp_path / "model.safetensors")
    put_with_sha256(s3_server, s3_bucket, "model.safetensors", file.read_bytes())
    return f"s3://{s3_bucket}/model.safetensors", tensors, s3_bucket


def test_s3_checksum_verified_while_streaming(s3_ckpt):
    url, tensors, _ = s3_ckpt
    trace = fastload.Trace()
    got = fastload.load(url, config=QUICK.replace(verify_checksums=True), trace=trace)
    assert_bit_exact(got, tensors)
    counters = trace.summary().counters
    assert counters.get("checksums_verified") == 1 and not counters.get("checksums_skipped")


def test_s3_checksum_verified_on_the_staged_convert_path(s3_ckpt):
    url, tensors, _ = s3_ckpt
    trace = fastload.Trace()
    got = fastload.load(url, dtype=torch.float16, config=QUICK.replace(verify_checksums=True), trace=trace)
    assert torch.equal(got["w0"], tensors["w0"].to(torch.float16))
    assert trace.summary().counters.get("checksums_verified") == 1


def test_s3_checksum_mismatch_is_integrity_error(s3_ckpt):
    url, _, bucket = s3_ckpt
    corrupt_published_checksum(bucket, "model.safetensors")
    with pytest.raises(fastload.IntegrityError, match="sha256 mismatch") as info:
        fastload.load(url, config=QUICK.replace(verify_checksums=True))
    assert info.value.url == url and info.value.byte_range[0] == 0
    assert isinstance(info.value, OSError)
    # Off by default: the same object loads (the bytes themselves are fine).
    fastload.load(url, config=QUICK)


def test_partial_load_cannot_verify_and_says_so(s3_ckpt):
    url, tensors, bucket = s3_ckpt
    corrupt_published_checksum(bucket, "model.safetensors")
    trace = fastload.Trace()
    got = fastload.load(url, names=["w2"], config=QUICK.replace(verify_checksums=True), trace=trace)
    assert torch.equal(got["w2"], tensors["w2"])
    counters = trace.summary().counters
    assert counters.get("checksums_skipped") == 1 and not counters.get("checksums_verified")


def test_multipart_composite_checksum_is_not_used(s3_server, s3_bucket, tmp_path):
    file, tensors = write_checkpoint(tmp_path / "model.safetensors")
    data = file.read_bytes()
    client = s3_server.client()
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key="mp.safetensors", ChecksumAlgorithm="SHA256")
    parts = []
    for number, chunk in enumerate((data[: 5 << 20], data[5 << 20:]) if len(data) > 5 << 20 else (data,), 1):
        part = client.upload_part(Bucket=s3_bucket, Key="mp.safetensors", UploadId=upload["UploadId"],
                                  PartNumber=number, Body=chunk, ChecksumAlgorithm="SHA256")
        parts.append({"PartNumber": number, "ETag": part["ETag"], "ChecksumSHA256": part["ChecksumSHA256"]})
    client.complete_multipart_upload(Bucket=s3_bucket, Key="mp.safetensors", UploadId=upload["UploadId"],
                                     MultipartUpload={"Parts": parts})
    trace = fastload.Trace()
    got = fastload.load(f"s3://{s3_bucket}/mp.safetensors", config=QUICK.replace(verify_checksums=True),
                        trace=trace)
    assert_bit_exact(got, tensors)
    assert not trace.summary().counters.get("checksums_verified")  # a checksum of part checksums: unusable


def test_s3_checksum_survives_faults(s3_server, s3_proxy, s3_bucket, tmp_path):
    """Resumed and retried reads still hash every byte exactly once, in order."""
    file, tensors = write_checkpoint(tmp_path / "model.safetensors")
    put_with_sha256(s3_server, s3_bucket, "m.safetensors", file.read_bytes())
    s3_proxy.faults.cut_after(3_000, times=5)
    s3_proxy.faults.slow_first_byte(0.1, times=3)
    trace = fastload.Trace()
    config = QUICK.replace(verify_checksums=True, s3=fastload.S3Options(endpoint_url=s3_proxy.url))
    got = fastload.load(f"s3://{s3_bucket}/m.safetensors", config=config, trace=trace)
    assert_bit_exact(got, tensors)
    assert trace.summary().counters.get("checksums_verified") == 1


# -- the verifier and the parsers ----------------------------------------------------------------

def test_streaming_verifier_accepts_any_completion_order():
    data = random.Random(0).randbytes(3 << 20)
    checksum = "sha256:" + hashlib.sha256(data).hexdigest()
    spans = [(i, min(i + 300_000, len(data))) for i in range(0, len(data), 300_000)]

    async def main(order):
        verifier = StreamingVerifier(ObjectInfo("mem://x", len(data)), checksum, Trace())
        verifier.wait = True

        async def read(start, end, delay):
            await asyncio.sleep(delay)
            await verifier.feed([Segment(start, memoryview(bytearray(data[start:end])))])

        await asyncio.gather(*(read(s, e, d) for (s, e), d in zip(spans, order)))
        return verifier.verified

    rng = random.Random(1)
    for _ in range(3):
        delays = [rng.random() * 0.02 for _ in spans]
        assert asyncio.run(main(delays))


def test_streaming_verifier_mismatch_and_abandon():
    data = bytes(range(256)) * 10

    async def main():
        wrong = StreamingVerifier(ObjectInfo("mem://x", len(data)), "sha256:" + "0" * 64, Trace())
        with pytest.raises(fastload.IntegrityError, match="mismatch"):
            await wrong.feed([Segment(0, memoryview(bytearray(data)))])
        partial = StreamingVerifier(ObjectInfo("mem://y", len(data)), "sha256:" + "0" * 64, Trace())
        await partial.feed([Segment(100, memoryview(bytearray(data[100:200])))])  # out of order, not waiting
        return partial.active, partial.why_not

    active, why = asyncio.run(main())
    assert not active and "out of order" in why


def test_verify_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100_000)
    verify_file(path, "sha256:" + hashlib.sha256(b"x" * 100_000).hexdigest())
    with pytest.raises(fastload.IntegrityError, match="mismatch"):
        verify_file(path, "sha256:" + hashlib.sha256(b"y").hexdigest())


def test_checksum_parsers():
    digest = hashlib.sha256(b"abc").digest()
    b64 = base64.b64encode(digest).decode()
    assert checksum_from_base64(b64) == "sha256:" + digest.hex()
    assert checksum_from_base64("not base64!") is None and checksum_from_base64(None) is None
    assert checksum_from_base64(base64.b64encode(b"short").decode()) is None
    assert checksum_from_repr_digest(f"sha-512=:AAAA:, sha-256=:{b64}:") == "sha256:" + digest.hex()
    assert checksum_from_repr_digest("md5=:AAAA:") is None
