"""Audit of the S3 source: keys, prefixes, listing, error mapping and the AWS chain.

Real moto S3 only (``s3_server``/``s3_bucket``), sometimes behind a small recording/rewriting front
(``_Front``, a ``FaultProxy``) that answers as real S3 does where moto does not.
"""

from __future__ import annotations

import json
import re
import threading
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import torch
from reliability_helpers import QUICK, assert_bit_exact, load_checked, write_checkpoint
from safetensors.torch import load_file, save_file
from servers import FaultProxy, Faults
from servers.http_range import Reply
from servers.proxy import _ProxyHandler

import fastload

FAIL_FAST = QUICK.replace(stall_timeout_s=0.5, retry=fastload.RetryConfig(
    max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.02, deadline_s=5.0))


# -- helpers ------------------------------------------------------------------------------------------

def small_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"a{seed}": torch.randn(257, generator=g), f"b{seed}": torch.arange(11, dtype=torch.int32) + seed,
            f"c{seed}": torch.randn(3, 5, generator=g).to(torch.bfloat16)}


def small_file(tmp_path, seed: int = 0, name: str | None = None):
    tensors = small_tensors(seed)
    path = tmp_path / (name or f"s{seed}-{uuid.uuid4().hex[:6]}.safetensors")
    save_file(tensors, str(path))
    return path, load_file(str(path))


class _FrontHandler(_ProxyHandler):
    def handle_with_faults(self) -> None:
        front: _Front = self.server.owner  # type: ignore[assignment]
        with front.lock:
            front.seen.append((self.command, self.path))
            front.headers.append({k.lower(): v for k, v in self.headers.items()})
        super().handle_with_faults()

    def produce(self, path, headers, body):
        front: _Front = self.server.owner  # type: ignore[assignment]
        if front.hook is not None:
            reply = front.hook(self.command, self.path, {k.lower(): v for k, v in headers})
            if reply is not None:
                return reply
        reply = super().produce(path, headers, body)
        if front.after is not None:
            reply = front.after(self.command, self.path, reply) or reply
        return reply


class _Front(FaultProxy):
    """A proxy in front of moto that records request lines and can answer or rewrite replies."""

    handler_class = _FrontHandler

    def __init__(self, upstream: str):
        super().__init__(upstream, Faults())
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str]] = []
        self.headers: list[dict[str, str]] = []
        self.hook = None  # (method, target, headers) -> Reply | None
        self.after = None  # (method, target, reply) -> Reply | None

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/")

    def credentials(self) -> set[tuple[str, str]]:
        """``(key id, region)`` of every signed request seen (header or presigned query)."""
        out = set()
        with self.lock:
            seen = list(zip(self.seen, self.headers))
        for (_, target), headers in seen:
            query = parse_qs(urlsplit(target).query)
            if "X-Amz-Credential" in query:
                parts = unquote(query["X-Amz-Credential"][0]).split("/")
            else:
                match = re.search(r"Credential=([^,]+)", headers.get("authorization", ""))
                parts = match.group(1).split("/") if match else []
            if parts:
                out.add((parts[0], parts[2]))
        return out


@pytest.fixture
def front(s3_server):
    with _Front(s3_server.endpoint_url) as proxy:
        yield proxy


def s3_error(status: int, code: str, head: bool = False) -> Reply:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>m</Message>'
            "<RequestId>4442587FB7D0A2F9</RequestId><HostId>h</HostId></Error>").encode()
    headers = [("Content-Type", "application/xml"), ("Content-Length", str(0 if head else len(body))),
               ("x-amz-request-id", "4442587FB7D0A2F9")]
    return Reply(status, headers, [] if head else [body])


def load(url, config=QUICK, **kw):
    return fastload.load(url, config=config, **kw)


# == keys that need care in a URL ======================================================================

ODD_KEYS = [
    "dir with space/m.safetensors",
    "plus+sign/a+b.safetensors",
    "pct%20lit/m%2Fx.safetensors",
    "ünïcödé/模型.safetensors",
    "k=v/x=1.safetensors",
    "double//slash/m.safetensors",
    "tilde~/semi;colon,comma&amp/m.safetensors",
]


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
@pytest.mark.parametrize("key", ODD_KEYS)
def test_odd_keys_load_bit_exact(s3_server, s3_bucket, tmp_path, key, engine):
    path, want = small_file(tmp_path)
    s3_server.put(s3_bucket, key, path.read_bytes())
    got = load(f"s3://{s3_bucket}/{key}", config=FAIL_FAST.replace(http_engine=engine))
    assert_bit_exact(got, want)


@pytest.mark.parametrize("key", ["hash#tag/m.safetensors", "what?/m.safetensors", "q/x?y=1.safetensors"])
def test_keys_with_url_delimiters_load(s3_server, s3_bucket, tmp_path, key):
    """S3 keys may hold '#' and '?'; ``s3://bucket/key`` is not an HTTP URL (aws s3 cp takes these keys
    verbatim). They must load, or at least not load another object."""
    path, want = small_file(tmp_path)
    s3_server.put(s3_bucket, key, path.read_bytes())
    got = load(f"s3://{s3_bucket}/{key}", config=FAIL_FAST)
    assert_bit_exact(got, want)


def test_key_with_fragment_never_loads_another_object(s3_server, s3_bucket, tmp_path):
    """``m.safetensors#v2`` and ``m.safetensors`` are two objects: naming the first must never give the
    second's tensors (wrong bytes, silently)."""
    path, want = small_file(tmp_path, seed=1)
    decoy, _ = small_file(tmp_path, seed=2)
    s3_server.put(s3_bucket, "ck/m.safetensors#v2", path.read_bytes())
    s3_server.put(s3_bucket, "ck/m.safetensors", decoy.read_bytes())
    try:
        got = load(f"s3://{s3_bucket}/ck/m.safetensors#v2", config=FAIL_FAST)
    except fastload.FastloadError:
        return  # refusing the key is acceptable; loading the other object is not
    assert_bit_exact(got, want)


def test_key_with_leading_slash(s3_server, s3_bucket, tmp_path):
    """``s3://bucket//lead/m.safetensors`` names key ``/lead/m.safetensors`` (as aws s3 cp reads it); the load
    must not silently read ``lead/m.safetensors``, a different object."""
    path, want = small_file(tmp_path, seed=1)
    other, _ = small_file(tmp_path, seed=2)
    s3_server.put(s3_bucket, "/lead/m.safetensors", path.read_bytes())
    s3_server.put(s3_bucket, "lead/m.safetensors", other.read_bytes())
    got = load(f"s3://{s3_bucket}//lead/m.safetensors", config=FAIL_FAST)
    assert_bit_exact(got, want)


@pytest.mark.parametrize("prefix", ["dir with space", "ünï+cödé", "a=b%c"])
def test_odd_prefix_is_listed_and_loaded(s3_server, s3_bucket, tmp_path, prefix):
    p1, w1 = small_file(tmp_path, seed=1)
    p2, w2 = small_file(tmp_path, seed=2)
    s3_server.put(s3_bucket, f"{prefix}/part one.safetensors", p1.read_bytes())
    s3_server.put(s3_bucket, f"{prefix}/part+two.safetensors", p2.read_bytes())
    got = load(f"s3://{s3_bucket}/{prefix}/", config=FAIL_FAST)
    assert_bit_exact(got, {**w1, **w2})


def test_dotted_bucket_name(s3_server, tmp_path):
    bucket = f"audit.dotted.{uuid.uuid4().hex[:8]}"
    path, want = small_file(tmp_path)
    s3_server.put(bucket, "m.safetensors", path.read_bytes())
    assert_bit_exact(load(f"s3://{bucket}/m.safetensors", config=FAIL_FAST), want)
    s3_server.put(bucket, "d/model.safetensors", path.read_bytes())
    assert_bit_exact(load(f"s3://{bucket}/d/", config=FAIL_FAST), want)


# == prefixes and listing ===============================================================================

@pytest.mark.parametrize("suffix", ["", "/"])
def test_bucket_root_is_a_checkpoint_directory(s3_server, s3_bucket, tmp_path, suffix):
    path, want = small_file(tmp_path)
    s3_server.put(s3_bucket, "model.safetensors", path.read_bytes())
    assert_bit_exact(load(f"s3://{s3_bucket}{suffix}", config=FAIL_FAST), want)


def test_bucket_root_listing(s3_server, s3_bucket, tmp_path):
    p1, w1 = small_file(tmp_path, seed=1)
    p2, _ = small_file(tmp_path, seed=2)
    s3_server.put(s3_bucket, "one.safetensors", p1.read_bytes())
    s3_server.put(s3_bucket, "sub/two.safetensors", p2.read_bytes())  # not in the root "directory"
    got = load(f"s3://{s3_bucket}", config=FAIL_FAST)
    assert_bit_exact(got, w1)


def test_listing_does_not_descend_into_sub_prefixes(s3_server, s3_bucket, tmp_path):
    p1, w1 = small_file(tmp_path, seed=1)
    p2, _ = small_file(tmp_path, seed=2)
    s3_server.put(s3_bucket, "ck/a.safetensors", p1.read_bytes())
    s3_server.put(s3_bucket, "ck/sub/b.safetensors", p2.read_bytes())
    s3_server.put(s3_bucket, "ck/sub/model.safetensors", p2.read_bytes())
    s3_server.put(s3_bucket, "ck-other/c.safetensors", p2.read_bytes())  # a sibling prefix sharing the stem
    s3_server.put(s3_bucket, "ck/sub/", b"")  # a directory marker
    s3_server.put(s3_bucket, "ck/", b"")
    for url in (f"s3://{s3_bucket}/ck/", f"s3://{s3_bucket}/ck"):
        assert_bit_exact(load(url, config=FAIL_FAST), w1)


def _bulk_put(s3_server, bucket: str, keys: list[str], data: bytes = b"x") -> None:
    def put(batch):
        client = s3_server.client()
        for key in batch:
            client.put_object(Bucket=bucket, Key=key, Body=data)

    batches = [keys[i::4] for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(put, batches))


@pytest.fixture(scope="module")
def big_prefix(s3_server, tmp_path_factory):
    """A bucket whose prefix ``big/`` holds 1100 small non-weight objects sorting before two real
    safetensors files (which therefore only appear on the second page of a listing)."""
    bucket = f"big-{uuid.uuid4().hex[:10]}"
    s3_server.ensure_bucket(bucket)
    tmp = tmp_path_factory.mktemp("big")
    p1, w1 = small_file(tmp, seed=1)
    p2, w2 = small_file(tmp, seed=2)
    keys = [f"big/aaa-{i:05d}.txt" for i in range(1100)]
    _bulk_put(s3_server, bucket, keys)
    s3_server.put(bucket, "big/zz-1.safetensors", p1.read_bytes())
    s3_server.put(bucket, "big/zz-2.safetensors", p2.read_bytes())
    return bucket, {**w1, **w2}


def test_listing_follows_pagination(big_prefix):
    bucket, want = big_prefix
    got = load(f"s3://{bucket}/big/", config=FAIL_FAST)
    assert_bit_exact(got, want)


def test_index_naming_shards_in_sub_prefixes(s3_server, s3_bucket, tmp_path):
    p1, w1 = small_file(tmp_path, seed=1)
    p2, w2 = small_file(tmp_path, seed=2)
    s3_server.put(s3_bucket, "ck/shards/one.safetensors", p1.read_bytes())
    s3_server.put(s3_bucket, "ck/shards/deeper/two two.safetensors", p2.read_bytes())
    weight_map = {**{n: "shards/one.safetensors" for n in w1},
                  **{n: "shards/deeper/two two.safetensors" for n in w2}}
    index = {"metadata": {}, "weight_map": weight_map}
    s3_server.put(s3_bucket, "ck/model.safetensors.index.json", json.dumps(index).encode())
    got = load(f"s3://{s3_bucket}/ck/", config=FAIL_FAST)
    assert set(got) == set(weight_map)
    assert_bit_exact(got, {**w1, **w2})
    got = load(f"s3://{s3_bucket}/ck/model.safetensors.index.json", config=FAIL_FAST)
    assert set(got) == set(weight_map)


# == tiny, empty and marker objects ======================================================================

@pytest.mark.parametrize("data", [b"", b"\x01\x02\x03", b"\x00" * 7, b"\x00" * 8, b"\x02\x00\x00\x00\x00\x00\x00\x00{}"])
def test_tiny_objects_are_format_errors_naming_the_url(s3_server, s3_bucket, data):
    s3_server.put(s3_bucket, "tiny.safetensors", data)
    url = f"s3://{s3_bucket}/tiny.safetensors"
    err, _ = load_checked(url, set(), FAIL_FAST)
    if data == b"\x02\x00\x00\x00\x00\x00\x00\x00{}":  # a valid, empty checkpoint
        assert err == {}, err
        return
    assert isinstance(err, fastload.FormatError), f"{type(err).__name__}: {err}"
    assert url in str(err)


def test_zero_byte_index_is_a_format_error(s3_server, s3_bucket):
    s3_server.put(s3_bucket, "ck/model.safetensors.index.json", b"")
    err, _ = load_checked(f"s3://{s3_bucket}/ck/", set(), FAIL_FAST)
    assert isinstance(err, fastload.FormatError), f"{type(err).__name__}: {err}"
    assert f"s3://{s3_bucket}/ck/model.safetensors.index.json" in str(err)


def test_empty_prefix_with_only_a_marker_is_not_found(s3_server, s3_bucket):
    s3_server.put(s3_bucket, "empty/", b"")
    for url in (f"s3://{s3_bucket}/empty/", f"s3://{s3_bucket}/empty"):
        err, _ = load_checked(url, set(), FAIL_FAST)
        assert isinstance(err, fastload.SourceNotFoundError), f"{type(err).__name__}: {err}"
        assert f"s3://{s3_bucket}/empty" in str(err)


def test_plan_and_stream_of_odd_key(s3_server, s3_bucket, tmp_path):
    path, want = small_file(tmp_path)
    key = "sp ace/ü+=.safetensors"
    s3_server.put(s3_bucket, key, path.read_bytes())
    url = f"s3://{s3_bucket}/{key}"
    plan = fastload.plan(url, config=FAIL_FAST)
    assert [f.info.url for f in plan.files] == [url]
    assert {t.name for t in plan.tensors} == set(want)
    with fastload.stream(url, config=FAIL_FAST) as s:
        got = dict(s)
    assert_bit_exact(got, want)


# == error mapping ======================================================================================

def _no_env_credentials(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


@pytest.mark.parametrize("source", ["m.safetensors", "ck/", "ck"])
def test_anonymous_against_a_private_object_is_a_permission_error(s3_server, s3_bucket, front, tmp_path,
                                                                   monkeypatch, source):
    """moto keeps ACLs: a private object read anonymously is refused. The error is typed and names the URL."""
    path, _ = small_file(tmp_path)
    s3_server.put(s3_bucket, "m.safetensors", path.read_bytes())
    s3_server.put(s3_bucket, "ck/model.safetensors", path.read_bytes())
    _no_env_credentials(monkeypatch, tmp_path)

    def refuse_unsigned(method, target, headers):  # real S3 refuses anonymous reads of private objects
        if "authorization" not in headers and "X-Amz-Signature" not in target:
            return s3_error(403, "AccessDenied", head=method == "HEAD")
        return None

    front.hook = refuse_unsigned
    config = FAIL_FAST.replace(s3=fastload.S3Options(endpoint_url=front.endpoint, anonymous=True))
    url = f"s3://{s3_bucket}/{source}"
    err, _ = load_checked(url, {front.port}, config)
    assert isinstance(err, fastload.SourcePermissionError), f"{type(err).__name__}: {err}"
    assert url.rstrip("/") in str(err)


def test_anonymous_public_read_object_in_a_listing(s3_server, s3_bucket, front, tmp_path, monkeypatch):
    p1, w1 = small_file(tmp_path, seed=1)
    p2, w2 = small_file(tmp_path, seed=2)
    client = s3_server.client()
    client.put_bucket_acl(Bucket=s3_bucket, ACL="public-read")
    for key, p in (("pub/x-1.safetensors", p1), ("pub/x-2.safetensors", p2)):
        client.put_object(Bucket=s3_bucket, Key=key, Body=p.read_bytes(), ACL="public-read")
    _no_env_credentials(monkeypatch, tmp_path)
    config = FAIL_FAST.replace(s3=fastload.S3Options(endpoint_url=front.endpoint, anonymous=True))
    got, _ = load_checked(f"s3://{s3_bucket}/pub/", {front.port}, config)
    assert not isinstance(got, Exception), f"{type(got).__name__}: {got}"
    assert_bit_exact(got, {**w1, **w2})
    assert not any("X-Amz-Credential" in t for _, t in front.seen)


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_presigned_get_403_is_a_permission_error_naming_the_object(s3_server, s3_bucket, front, tmp_path, engine):
    path, _ = small_file(tmp_path)
    s3_server.put(s3_bucket, "m.safetensors", path.read_bytes())
    front.hook = lambda m, t, h: s3_error(403, "AccessDenied") if m == "GET" and "X-Amz-Signature" in t else None
    url = f"s3://{s3_bucket}/m.safetensors"
    config = FAIL_FAST.replace(http_engine=engine, s3=fastload.S3Options(endpoint_url=front.endpoint))
    err, _ = load_checked(url, {front.port}, config)
    assert isinstance(err, fastload.SourcePermissionError), f"{type(err).__name__}: {err}"
    assert url in str(err) and "X-Amz" not in str(err) and "testing" not in str(err)


def test_missing_index_answered_403_without_listbucket_falls_back(s3_server, s3_bucket, front, tmp_path):
    """Real S3 answers HEAD of a missing key with 403 (not 404) when the caller lacks s3:ListBucket: the common
    GetObject-only policy. ``s3://bucket/ck/`` with a model.safetensors and no index must still load
    (resolve already treats a 403 on the object itself as "maybe a prefix" for this very reason)."""
    path, want = small_file(tmp_path)
    s3_server.put(s3_bucket, "ck/model.safetensors", path.read_bytes())

    def missing_is_403(method, target, reply):
        if method == "HEAD" and reply.status == 404:
            return s3_error(403, "Forbidden", head=True)
        if method == "GET" and "X-Amz-Signature" in target and reply.status == 404:  # a GET's too
            return s3_error(403, "AccessDenied")
        if method == "GET" and "list-type" in target:  # and no ListBucket
            return s3_error(403, "AccessDenied")
        return None

    front.after = missing_is_403
    config = FAIL_FAST.replace(s3=fastload.S3Options(endpoint_url=front.endpoint))
    got, _ = load_checked(f"s3://{s3_bucket}/ck/", {front.port}, config)
    assert not isinstance(got, Exception), f"{type(got).__name__}: {got}"
    assert_bit_exact(got, want)


def test_denied_key_without_extension_is_named_in_the_error(s3_server, s3_bucket, front, tmp_path):
    """A key with no extension may be an object or a prefix. When the object is refused and nothing is under
    it as a prefix either, the error names the key given, not a probe of ``<key>/model.safetensors.index.json``."""
    path, _ = small_file(tmp_path)
    s3_server.put(s3_bucket, "ck/weights", path.read_bytes())
    front.hook = lambda m, t, h: (s3_error(403, "Forbidden", head=m == "HEAD")  # its HEAD and its GETs alike
                                  if m == "HEAD" or "X-Amz-Signature" in t else None)
    config = FAIL_FAST.replace(s3=fastload.S3Options(endpoint_url=front.endpoint))
    err, _ = load_checked(f"s3://{s3_bucket}/ck/weights", {front.port}, config)
    assert isinstance(err, fastload.SourcePermissionError), f"{type(err).__name__}: {err}"
    assert err.url == f"s3://{s3_bucket}/ck/weights", err.url


def test_list_denied_is_a_permission_error_naming_the_prefix(s3_server, s3_bucket, front, tmp_path):
    path, _ = small_file(tmp_path)
    s3_server.put(s3_bucket, "ck/a.safetensors", path.read_bytes())
    front.hook = lambda m, t, h: s3_error(403, "AccessDenied") if m == "GET" and "list-type" in t else None
    config = FAIL_FAST.replace(s3=fastload.S3Options(endpoint_url=front.endpoint))
    err, _ = load_checked(f"s3://{s3_bucket}/ck/", {front.port}, config)
    assert isinstance(err, fastload.SourcePermissionError), f"{type(err).__name__}: {err}"
    assert f"s3://{s3_bucket}/ck" in str(err)


@pytest.mark.parametrize("suffix", ["", "/", "/m.safetensors", "/ck"])
def test_no_such_bucket_any_shape(s3_server, suffix):
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}{suffix}"
    err, _ = load_checked(url, set(), FAIL_FAST)
    assert isinstance(err, fastload.SourceNotFoundError), f"{type(err).__name__}: {err}"
    assert url.split("/")[2] in str(err)


@pytest.mark.parametrize("bucket", ["bad_bucket!", "UPPER.case$"])
def test_invalid_bucket_name_is_a_clear_error(s3_server, bucket):
    err, _ = load_checked(f"s3://{bucket}/m.safetensors", set(), FAIL_FAST)
    assert isinstance(err, (fastload.ConfigError, fastload.SourceNotFoundError)), f"{type(err).__name__}: {err}"
    assert bucket in str(err)


# == objects that change =================================================================================

@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
@pytest.mark.parametrize("change", ["bigger", "deleted"])
def test_object_replaced_or_deleted_mid_load_in_a_versioned_bucket(s3_server, s3_bucket, tmp_path, engine, change):
    client = s3_server.client()
    client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    file, tensors = write_checkpoint(tmp_path / "model.safetensors", count=3)
    bigger, _ = write_checkpoint(tmp_path / "bigger.safetensors", seed=1, count=5)
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())
    done = []

    def act(done_bytes, total):
        if not done:
            done.append(done_bytes)
            if change == "bigger":
                s3_server.put(s3_bucket, "m.safetensors", bigger.read_bytes())
            else:
                client.delete_object(Bucket=s3_bucket, Key="m.safetensors")

    seen = {}
    config = FAIL_FAST.replace(max_concurrency=1, http_engine=engine)
    with pytest.raises((fastload.SourceChangedError, fastload.SourceNotFoundError)) as info:
        with fastload.stream(f"s3://{s3_bucket}/m.safetensors", config=config, progress=act) as s:
            for name, tensor in s:
                seen[name] = tensor
    assert done and f"s3://{s3_bucket}/m.safetensors" in str(info.value)
    for name, tensor in seen.items():
        assert torch.equal(tensor, tensors[name]), name


def test_index_changes_shard_list_is_stat_consistent(s3_server, s3_bucket, tmp_path):
    """A shard named by the index that does not exist: SourceNotFoundError naming the shard's URL."""
    index = {"metadata": {}, "weight_map": {"a": "gone.safetensors"}}
    s3_server.put(s3_bucket, "ck/model.safetensors.index.json", json.dumps(index).encode())
    err, _ = load_checked(f"s3://{s3_bucket}/ck/", set(), FAIL_FAST)
    assert isinstance(err, fastload.SourceNotFoundError), f"{type(err).__name__}: {err}"
    assert f"s3://{s3_bucket}/ck/gone.safetensors" in str(err)


# == the AWS chain, and S3Options over it ================================================================

def test_profile_from_home_dot_aws(s3_server, s3_bucket, front, tmp_path, monkeypatch):
    """No AWS_CONFIG_FILE: ~/.aws/config and ~/.aws/credentials under $HOME, profile from AWS_PROFILE."""
    path, want = small_file(tmp_path)
    s3_server.put(s3_bucket, "m.safetensors", path.read_bytes())
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "config").write_text(f"[profile audit]\nregion = eu-north-1\nendpoint_url = {front.endpoint}\n")
    (home / ".aws" / "credentials").write_text("[audit]\naws_access_key_id = AKIAHOMEPROFILE00001\n"
                                               "aws_secret_access_key = homesecret\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_PROFILE", "audit")
    got, _ = load_checked(f"s3://{s3_bucket}/m.safetensors", {front.port}, FAIL_FAST)
    assert not isinstance(got, Exception), f"{type(got).__name__}: {got}"
    assert_bit_exact(got, want)
    assert front.credentials() == {("AKIAHOMEPROFILE00001", "eu-north-1")}


def test_aws_default_region_beats_the_profile_region(s3_server, s3_bucket, front, tmp_path, monkeypatch):
    path, want = small_file(tmp_path)
    s3_server.put(s3_bucket, "m.safetensors", path.read_bytes())
    config_file = tmp_path / "cfg"
    config_file.write_text(f"[profile audit]\nregion = eu-north-1\nendpoint_url = {front.endpoint}\n"
                           "aws_access_key_id = AKIAPROFILE000000002\naws_secret_access_key = s\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ca-central-1")
    got = load(f"s3://{s3_bucket}/m.safetensors", config=FAIL_FAST.replace(s3=fastload.S3Options(profile="audit")))
    assert_bit_exact(got, want)
    assert front.credentials() == {("AKIAPROFILE000000002", "ca-central-1")}


def test_s3options_session_region_beats_aws_region_env(s3_server, s3_bucket, front, tmp_path, monkeypatch):
    """A botocore Session passed in S3Options is the caller's explicit configuration: a region set on it
    (``set_config_variable``, which botocore ranks above the environment) must not be overridden by
    AWS_REGION from the environment (LoadConfig S3 options override the chain)."""
    import botocore.session

    path, want = small_file(tmp_path)
    s3_server.put(s3_bucket, "m.safetensors", path.read_bytes())
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    session = botocore.session.Session()
    session.set_config_variable("region", "eu-west-3")
    config = FAIL_FAST.replace(s3=fastload.S3Options(endpoint_url=front.endpoint, session=session))
    assert_bit_exact(load(f"s3://{s3_bucket}/m.safetensors", config=config), want)
    assert {region for _, region in front.credentials()} == {"eu-west-3"}


def test_endpoint_in_s3options_beats_profile_endpoint(s3_server, s3_bucket, front, tmp_path, monkeypatch):
    path, want = small_file(tmp_path)
    s3_server.put(s3_bucket, "m.safetensors", path.read_bytes())
    config_file = tmp_path / "cfg"
    config_file.write_text("[default]\nendpoint_url = http://127.0.0.1:9\n"
                           "[services s3only]\ns3 =\n  endpoint_url = http://127.0.0.1:9\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    config = FAIL_FAST.replace(s3=fastload.S3Options(endpoint_url=front.endpoint))
    assert_bit_exact(load(f"s3://{s3_bucket}/m.safetensors", config=config), want)
    assert front.seen


def test_credentials_never_in_failures(s3_server, s3_bucket, front, tmp_path, monkeypatch):
    secret, key_id = "audit-SECRET-9f8e7d6c5b", "AKIAAUDITSECRETID777"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    path, _ = small_file(tmp_path)
    s3_server.put(s3_bucket, "m.safetensors", path.read_bytes())
    config = FAIL_FAST.replace(s3=fastload.S3Options(endpoint_url=front.endpoint))
    scenarios = [
        (lambda m, t, h: s3_error(403, "SignatureDoesNotMatch") if m == "GET" else None, "m.safetensors"),
        (lambda m, t, h: s3_error(400, "InvalidRequest", head=m == "HEAD"), "m.safetensors"),
        (lambda m, t, h: s3_error(403, "InvalidAccessKeyId") if "list-type" in t else None, "ck/"),
        (None, "nope!bucket/x.safetensors"),
    ]
    for hook, source in scenarios:
        front.hook = hook
        url = f"s3://{source}" if "!" in source else f"s3://{s3_bucket}/{source}"
        err, _ = load_checked(url, {front.port}, config)
        assert isinstance(err, fastload.FastloadError), err
        text = "".join(traceback.format_exception(err))
        seen, hops = err, 0
        while seen is not None and hops < 20:
            text += repr(seen) + repr(getattr(seen, "__dict__", ""))
            seen, hops = seen.__cause__ or seen.__context__, hops + 1
        assert secret not in text and key_id not in text and "X-Amz-Signature" not in text, text[-2000:]


# == pull from a prefix with odd keys ====================================================================

def test_pull_prefix_with_odd_keys_and_markers(s3_server, s3_bucket, tmp_path):
    p1, _ = small_file(tmp_path, seed=1)
    p2, _ = small_file(tmp_path, seed=2)
    s3_server.put(s3_bucket, "ck ü/model-00001 of+2.safetensors", p1.read_bytes())
    s3_server.put(s3_bucket, "ck ü/sub=dir/model-00002.safetensors", p2.read_bytes())
    s3_server.put(s3_bucket, "ck ü/sub=dir/", b"")  # a directory marker is not a file
    s3_server.put(s3_bucket, "ck ü/config.json", b"{}")
    s3_server.put(s3_bucket, "ck ü/empty.txt", b"")  # a real zero-byte file is
    dest = tmp_path / "out"
    fastload.pull(f"s3://{s3_bucket}/ck ü", to=dest, config=FAIL_FAST)
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")
                   if p.is_file() and not p.relative_to(dest).as_posix().startswith("."))
    assert files == ["config.json", "empty.txt", "model-00001 of+2.safetensors", "sub=dir/model-00002.safetensors"]
    assert (dest / "model-00001 of+2.safetensors").read_bytes() == p1.read_bytes()
    assert (dest / "sub=dir" / "model-00002.safetensors").read_bytes() == p2.read_bytes()
    assert (dest / "empty.txt").read_bytes() == b""
