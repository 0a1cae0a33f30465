"""Audit: S3 objects and buckets as real deployments have them.

Versioned buckets (an object overwritten with other bytes of the same size mid-load, delete markers), multipart
uploads (ETag ``...-N``) with and without additional checksums, server-side encryption (SSE-S3, SSE-KMS, and SSE-C,
whose key the GET must carry), keys and prefixes real tools write (``//``, a trailing ``.``, spaces, ``+``, ``%``,
unicode), dotted bucket names under each addressing style, directory-marker objects and prefixes of more than 1000
keys. Real moto S3 (``s3_server``), sometimes behind a small front that answers as real S3 does where moto does
not (moto ignores SSE-C on reads).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from checkpoints import files_under, same_size_other_bytes, seeded_file
from reliability_helpers import QUICK, assert_bit_exact, write_checkpoint
from safetensors.torch import load_file, save_file
from servers import FaultProxy, Faults
from servers.http_range import Reply
from servers.proxy import _ProxyHandler

import fastload

FAIL_FAST = QUICK.replace(stall_timeout_s=1.0, retry=fastload.RetryConfig(
    max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.02, deadline_s=5.0))


# -- a front that answers as real S3 does for SSE-C objects ----------------------------------------------------

class _FrontHandler(_ProxyHandler):
    def produce(self, path, headers, body):
        front: _Front = self.server.owner  # type: ignore[assignment]
        with front.lock:
            front.seen.append((self.command, self.path))
        if front.hook is not None:
            reply = front.hook(self.command, self.path, {k.lower(): v for k, v in headers})
            if reply is not None:
                return reply
        return super().produce(path, headers, body)


class _Front(FaultProxy):
    handler_class = _FrontHandler

    def __init__(self, upstream: str):
        super().__init__(upstream, Faults())
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str]] = []
        self.hook = None


@pytest.fixture
def front(s3_server):
    with _Front(s3_server.endpoint_url) as proxy:
        yield proxy


def _sse_c_refusal(method: str) -> Reply:
    """What S3 answers to a HEAD/GET of an SSE-C object that does not carry the customer key."""
    body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidRequest</Code><Message>The object was '
            b'stored using a form of Server Side Encryption. The correct parameters must be provided to retrieve '
            b'the object.</Message><RequestId>R</RequestId><HostId>H</HostId></Error>')
    if method == "HEAD":  # a HEAD's 400 has no body: the status is all a client gets
        return Reply(400, [("Content-Type", "application/xml"), ("Content-Length", "0"),
                           ("x-amz-request-id", "R")], [])
    return Reply(400, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))], [body])


# == a versioned bucket whose object is overwritten mid-load ==================================================

def _run(api: str, url: str, config, progress, out):
    if api == "load":
        return fastload.load(url, config=config, progress=progress)
    if api == "stream":
        got = {}
        with fastload.stream(url, config=config, progress=progress) as s:
            for name, tensor in s:
                got[name] = tensor.clone()
        return got
    if api == "pull":
        fastload.pull(url, to=out, config=config, progress=progress)
        return load_file(str(out / "m.safetensors"))
    raise AssertionError(api)


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
@pytest.mark.parametrize("api", ["load", "stream", "pull"])
def test_same_size_overwrite_mid_load_is_changed_or_old_whole(s3_server, s3_bucket, tmp_path, api, engine):
    client = s3_server.client()
    client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    file, old = write_checkpoint(tmp_path / "m.safetensors", count=6)
    data = file.read_bytes()
    new_data = same_size_other_bytes(data)
    assert len(new_data) == len(data) and new_data != data
    s3_server.put(s3_bucket, "m.safetensors", data)
    fired = []

    def overwrite(done, total):
        if not fired and 0 < done < total:
            fired.append(done)
            s3_server.put(s3_bucket, "m.safetensors", new_data)

    url = f"s3://{s3_bucket}/m.safetensors"
    config = FAIL_FAST.replace(max_concurrency=1, http_engine=engine)
    out = tmp_path / "out"
    try:
        got = _run(api, url, config, overwrite, out)
    except fastload.SourceChangedError as exc:
        assert url in str(exc)
    else:
        assert_bit_exact(got, old)  # the old version whole, never a mix
    assert fired, "the overwrite never happened mid-load"
    if api == "pull":  # a pull run again fetches the new version whole (no old piece kept from the journal)
        fastload.pull(url, to=out, config=config)
        assert (out / "m.safetensors").read_bytes() == new_data


def test_pull_resumed_after_a_same_size_overwrite_is_the_new_version_whole(s3_server, s3_bucket, tmp_path):
    """A pull interrupted (Ctrl-C stand-in: an exception from its progress callback) half-way leaves a journal;
    the object is then overwritten with other bytes of the same size; the next pull must not keep the old half."""
    client = s3_server.client()
    client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    file, _ = write_checkpoint(tmp_path / "m.safetensors", count=6)
    data = file.read_bytes()
    new_data = same_size_other_bytes(data)
    s3_server.put(s3_bucket, "m.safetensors", data)
    url = f"s3://{s3_bucket}/m.safetensors"
    out = tmp_path / "out"

    class Stop(Exception):
        pass

    def stop_half_way(done, total):
        if done > total // 2:
            raise Stop

    config = FAIL_FAST.replace(max_concurrency=1)
    with pytest.raises(Stop):
        fastload.pull(url, to=out, config=config, progress=stop_half_way)
    assert not (out / "m.safetensors").exists()
    s3_server.put(s3_bucket, "m.safetensors", new_data)
    fastload.pull(url, to=out, config=config)
    assert (out / "m.safetensors").read_bytes() == new_data


# == multipart uploads ==========================================================================================

def _multipart(client, bucket: str, key: str, data: bytes, checksum: bool) -> None:
    extra = {"ChecksumAlgorithm": "SHA256"} if checksum else {}
    upload = client.create_multipart_upload(Bucket=bucket, Key=key, **extra)
    parts = []
    pieces = [data[i:i + (5 << 20)] for i in range(0, len(data), 5 << 20)]
    for number, piece in enumerate(pieces, 1):
        part = client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number,
                                  Body=piece, **extra)
        parts.append({"PartNumber": number, "ETag": part["ETag"],
                      **({"ChecksumSHA256": part["ChecksumSHA256"]} if checksum else {})})
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                     MultipartUpload={"Parts": parts})


@pytest.mark.parametrize("checksum", [False, True])
def test_multipart_objects_load_stream_plan_and_pull_with_verify(s3_server, s3_bucket, tmp_path, checksum):
    tensors = {"big": torch.arange((6 << 20) // 4, dtype=torch.float32), "small": torch.ones(7)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    data = path.read_bytes()
    client = s3_server.client()
    _multipart(client, s3_bucket, "ck/model.safetensors", data, checksum)
    head = client.head_object(Bucket=s3_bucket, Key="ck/model.safetensors")
    assert head["ETag"].strip('"').endswith("-2"), head["ETag"]
    config = QUICK.replace(verify_checksums=True, chunk_bytes=1 << 20, host_buffer_bytes=8 << 20)
    for url in (f"s3://{s3_bucket}/ck/", f"s3://{s3_bucket}/ck/model.safetensors", f"s3://{s3_bucket}/ck"):
        trace = fastload.Trace()
        assert_bit_exact(fastload.load(url, config=config, trace=trace), tensors)
        assert not trace.summary().counters.get("checksums_verified")  # nothing comparable is published
        with fastload.stream(url, config=config) as s:
            assert_bit_exact({n: t.clone() for n, t in s}, tensors)
        assert fastload.plan(url, config=config).total_bytes >= len(data) - 200
    out = tmp_path / "out"
    fastload.pull(f"s3://{s3_bucket}/ck/", to=out, config=config, verify=True)
    assert (out / "model.safetensors").read_bytes() == data


# == server-side encryption ==================================================================================

BOTH = ("HEAD", "GET")


@pytest.mark.parametrize("api, named, refused", [("load", "object", BOTH), ("plan", "prefix", BOTH),
                                                 ("pull", "prefix", BOTH), ("load", "object", ("GET",))])
def test_sse_c_object_is_a_prompt_typed_error_saying_why(s3_server, s3_bucket, front, tmp_path, api, named,
                                                         refused):
    """SSE-C: S3 refuses a HEAD (400, no body) and a GET (400 InvalidRequest) without the customer key, which
    fastload cannot know. A prompt error of fastload's that names the object and says it is encrypted with a
    customer key, not a bare "S3 error 400" nor a retry loop. (Refused GETs only: a store whose HEAD answers.)"""
    data, _ = seeded_file(tmp_path, 1)
    s3_server.put(s3_bucket, "enc/model.safetensors", data)

    def hook(method, target, headers):
        if target.split("?")[0].endswith("/enc/model.safetensors") and method in refused \
                and "x-amz-server-side-encryption-customer-key" not in headers:
            return _sse_c_refusal(method)
        return None

    front.hook = hook
    config = FAIL_FAST.replace(s3=fastload.S3Options(endpoint_url=front.url.rstrip("/"), addressing_style="path"))
    url = f"s3://{s3_bucket}/enc/model.safetensors" if named == "object" else f"s3://{s3_bucket}/enc/"
    start = time.monotonic()
    with pytest.raises(fastload.FastloadError) as info:
        if api == "load":
            fastload.load(url, config=config)
        elif api == "plan":
            fastload.plan(url, config=config)
        else:
            fastload.pull(url, to=tmp_path / "out", config=config)
    took = time.monotonic() - start
    message = str(info.value)
    hits = [m for m, t in front.seen if t.split("?")[0].endswith("/enc/model.safetensors")]
    # The probe GET and the HEAD it falls back to, then the HEAD botocore sends again after a 400 (to look for a
    # region) or, where the HEAD answers, the header's GET and that GET signed again (documented)
    assert took < 3.0 and len(hits) <= (4 if refused == ("GET",) else 3), (took, hits)
    assert f"s3://{s3_bucket}/enc/model.safetensors" in message, message
    assert any(w in message.lower() for w in ("encrypt", "sse-c", "customer")), \
        f"{type(info.value).__name__}: {message}"


@pytest.mark.parametrize("sse", [{"ServerSideEncryption": "AES256"},
                                 {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/aws/s3"}])
def test_sse_s3_and_sse_kms_objects_load_and_verify(s3_server, s3_bucket, tmp_path, sse):
    data, want = seeded_file(tmp_path, 2)
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="e/model.safetensors", Body=data, ChecksumAlgorithm="SHA256", **sse)
    trace = fastload.Trace()
    got = fastload.load(f"s3://{s3_bucket}/e/", config=FAIL_FAST.replace(verify_checksums=True), trace=trace)
    assert_bit_exact(got, want)
    assert trace.summary().counters.get("checksums_verified") == 1
    fastload.pull(f"s3://{s3_bucket}/e", to=tmp_path / "out", config=FAIL_FAST, verify=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == data


# == keys and prefixes real tools write ======================================================================

ODD_PREFIXES = ["llama-3.1.", "a//b", "sp ace+plus%25/ünï.", "./dot"]


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
@pytest.mark.parametrize("prefix", ODD_PREFIXES)
def test_odd_prefix_in_load_plan_stream_and_pull(s3_server, s3_bucket, tmp_path, prefix, engine):
    """Both HTTP engines send a presigned URL as signed: a dot segment ("./dot") is part of the key."""
    config = FAIL_FAST.replace(http_engine=engine)
    d1, w1 = seeded_file(tmp_path, 1)
    d2, w2 = seeded_file(tmp_path, 2)
    s3_server.put(s3_bucket, f"{prefix}/part one.safetensors", d1)
    s3_server.put(s3_bucket, f"{prefix}/p+2%.safetensors", d2)
    s3_server.put(s3_bucket, f"{prefix}/", b"")  # the directory marker the console makes
    want = {**w1, **w2}
    for url in (f"s3://{s3_bucket}/{prefix}/", f"s3://{s3_bucket}/{prefix}"):
        assert_bit_exact(fastload.load(url, config=config), want)
        assert {t.name for t in fastload.plan(url, config=config).tensors} == set(want)
        with fastload.stream(url, config=config) as s:
            assert_bit_exact({n: t.clone() for n, t in s}, want)
    out = tmp_path / "out"
    fastload.pull(f"s3://{s3_bucket}/{prefix}/", to=out, config=config)
    assert files_under(out) == {"part one.safetensors": d1, "p+2%.safetensors": d2}


def test_index_in_a_prefix_with_a_trailing_dot(s3_server, s3_bucket, tmp_path):
    d1, w1 = seeded_file(tmp_path, 1)
    d2, w2 = seeded_file(tmp_path, 2)
    prefix = "org/llama-3.1-8b."
    s3_server.put(s3_bucket, f"{prefix}/model-1 of 2.safetensors", d1)
    s3_server.put(s3_bucket, f"{prefix}/model-2+of+2.safetensors", d2)
    index = {"metadata": {}, "weight_map": {**{n: "model-1 of 2.safetensors" for n in w1},
                                            **{n: "model-2+of+2.safetensors" for n in w2}}}
    s3_server.put(s3_bucket, f"{prefix}/model.safetensors.index.json", json.dumps(index).encode())
    for url in (f"s3://{s3_bucket}/{prefix}", f"s3://{s3_bucket}/{prefix}/model.safetensors.index.json"):
        assert_bit_exact(fastload.load(url, config=FAIL_FAST), {**w1, **w2})


@pytest.mark.parametrize("style", ["auto", "path", "virtual"])
def test_dotted_bucket_under_each_addressing_style(s3_server, tmp_path, style):
    """A dotted bucket name cannot be a virtual host under TLS (nor, here, at an IP endpoint): "auto" and "path"
    load it; "virtual" either loads it or fails at once with a fastload error naming it, never hangs."""
    bucket = f"my.models.{uuid.uuid4().hex[:8]}"
    data, want = seeded_file(tmp_path, 3)
    s3_server.put(bucket, "ck./model.safetensors", data)
    config = FAIL_FAST.replace(s3=fastload.S3Options(addressing_style=style))
    start = time.monotonic()
    try:
        got = fastload.load(f"s3://{bucket}/ck./", config=config)
    except fastload.FastloadError as exc:
        assert style == "virtual", f"{type(exc).__name__}: {exc}"
        assert bucket in str(exc) and time.monotonic() - start < 5, str(exc)
        assert not isinstance(exc, fastload.SourceNotFoundError), str(exc)  # it exists: the host is the problem
    else:
        assert_bit_exact(got, want)


# == directory markers, and more than 1000 keys ====================================================================

def _bulk_put(s3_server, bucket: str, keys: list[str]) -> None:
    def put(batch):
        client = s3_server.client()
        for key in batch:
            client.put_object(Bucket=bucket, Key=key, Body=b"")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(put, [keys[i::4] for i in range(4)]))


@pytest.fixture(scope="module")
def crowded(s3_server, tmp_path_factory):
    """``ck v1.0/`` with a directory marker, 1000 other (empty) objects sorting among them (a sub-prefix of 500,
    500 non-weight files), and three ``*.safetensors`` spread over the pages of a listing; no index."""
    bucket = f"crowd-{uuid.uuid4().hex[:10]}"
    s3_server.ensure_bucket(bucket)
    tmp = tmp_path_factory.mktemp("crowd")
    files = {}
    for seed, name in ((4, "a-first.safetensors"), (5, "m-middle.safetensors"), (6, "z-last.safetensors")):
        files[name] = seeded_file(tmp, seed)
    _bulk_put(s3_server, bucket, [f"ck v1.0/b-{i:04d}.txt" for i in range(500)]
              + [f"ck v1.0/n sub/{i:04d}.safetensors" for i in range(500)])
    s3_server.put(bucket, "ck v1.0/", b"")
    for name, (data, _) in files.items():
        s3_server.put(bucket, f"ck v1.0/{name}", data)
    want = {}
    for _, tensors in files.values():
        want.update(tensors)
    return bucket, files, want


@pytest.mark.parametrize("suffix", ["/", ""])
def test_prefix_of_more_than_1000_keys_with_a_marker_loads_its_safetensors(crowded, suffix):
    bucket, _, want = crowded
    url = f"s3://{bucket}/ck v1.0{suffix}"
    assert_bit_exact(fastload.load(url, config=FAIL_FAST), want)
    assert {t.name for t in fastload.plan(url, config=FAIL_FAST).tensors} == set(want)
    with fastload.stream(url, config=FAIL_FAST) as s:
        assert_bit_exact({n: t.clone() for n, t in s}, want)


def test_pull_of_a_prefix_of_more_than_1000_keys(crowded, tmp_path):
    bucket, files, _ = crowded
    out = tmp_path / "out"
    fastload.pull(f"s3://{bucket}/ck v1.0/", to=out, config=FAIL_FAST.replace(max_concurrency=8))
    got = files_under(out)
    assert len(got) == 3 + 1000, len(got)
    for name, (data, _) in files.items():
        assert got[name] == data
    assert got["n sub/0499.safetensors"] == b""


def test_from_pretrained_of_a_dotted_prefix_with_a_marker(s3_server, s3_bucket, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    local = tmp_path / "m"
    model.save_pretrained(local, max_shard_size="20KB")
    assert (local / "model.safetensors.index.json").exists()
    prefix = "org/llama-3.1-tiny."
    s3_server.upload_dir(s3_bucket, prefix, local)
    s3_server.put(s3_bucket, f"{prefix}/", b"")
    got = fastload.from_pretrained(f"s3://{s3_bucket}/{prefix}/", config=FAIL_FAST, dtype=torch.float32)
    want = model.state_dict()
    for name, tensor in got.state_dict().items():
        assert torch.equal(tensor, want[name]), name


# == delete markers ==============================================================================================

def test_delete_marker_is_not_found_naming_the_object(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    data, _ = seeded_file(tmp_path, 1)
    s3_server.put(s3_bucket, "gone/model.safetensors", data)
    s3_server.put(s3_bucket, "gone.safetensors", data)
    client.delete_object(Bucket=s3_bucket, Key="gone/model.safetensors")
    client.delete_object(Bucket=s3_bucket, Key="gone.safetensors")
    versions = client.list_object_versions(Bucket=s3_bucket)
    assert len(versions.get("DeleteMarkers", [])) == 2 and len(versions.get("Versions", [])) == 2
    cases = [(f"s3://{s3_bucket}/gone.safetensors", f"s3://{s3_bucket}/gone.safetensors"),
             (f"s3://{s3_bucket}/gone/model.safetensors", f"s3://{s3_bucket}/gone/model.safetensors"),
             (f"s3://{s3_bucket}/gone/", f"s3://{s3_bucket}/gone"),
             (f"s3://{s3_bucket}/gone", f"s3://{s3_bucket}/gone")]
    for url, named in cases:
        for call in (lambda: fastload.load(url, config=FAIL_FAST), lambda: fastload.plan(url, config=FAIL_FAST),
                     lambda: fastload.pull(url, to=tmp_path / "out", config=FAIL_FAST)):
            start = time.monotonic()
            with pytest.raises(fastload.SourceNotFoundError) as info:
                call()
            assert named in str(info.value) and time.monotonic() - start < 3, str(info.value)
            assert "bucket" not in str(info.value).split(named)[0].lower(), str(info.value)  # not "no such bucket"


def test_index_naming_a_shard_behind_a_delete_marker(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    d1, w1 = seeded_file(tmp_path, 1)
    d2, _ = seeded_file(tmp_path, 2)
    s3_server.put(s3_bucket, "ck/one.safetensors", d1)
    s3_server.put(s3_bucket, "ck/two.safetensors", d2)
    index = {"metadata": {}, "weight_map": {**{n: "one.safetensors" for n in w1}, "a2": "two.safetensors"}}
    s3_server.put(s3_bucket, "ck/model.safetensors.index.json", json.dumps(index).encode())
    client.delete_object(Bucket=s3_bucket, Key="ck/two.safetensors")
    for call in (lambda: fastload.load(f"s3://{s3_bucket}/ck/", config=FAIL_FAST),
                 lambda: fastload.plan(f"s3://{s3_bucket}/ck/model.safetensors.index.json", config=FAIL_FAST)):
        with pytest.raises(fastload.SourceNotFoundError) as info:
            call()
        assert f"s3://{s3_bucket}/ck/two.safetensors" in str(info.value), str(info.value)
