"""Audit: S3's "first look" (a presigned ranged GET of an object's first bytes instead of a HEAD).

``S3Transport.stat`` presigns a GET and asks for the first 8 bytes (256 KiB for a ``.json`` key); the 206 gives
size, ETag, Last-Modified and the bytes (``ObjectInfo.prefix``); a 404 is "no such object"; anything else falls
back to the botocore HEAD. A pull of a prefix trusts the LIST and asks nothing per object before the bytes.

Real moto S3 (``s3_server``/``s3_bucket``), often behind the fault proxy (``s3_proxy``) whose request log shows
what went over the wire, and a small front that answers an empty object's range as many stores do.
"""

from __future__ import annotations

import traceback
import uuid

import pytest
import torch
from checkpoints import files_under, llama_like_tensors, same_size_other_bytes, seeded_file, write_sharded
from reliability_helpers import QUICK, Leaks, Timer, assert_bit_exact, write_checkpoint
from servers import FaultProxy
from servers.faults import FailWith, Hang
from servers.proxy import _ProxyHandler

import fastload

#: Loads that must succeed with an exact request log: no stall on a loaded 2-core machine may turn into a retry.
STEADY = QUICK.replace(stall_timeout_s=5.0, retry=fastload.RetryConfig(
    max_attempts=4, backoff_base_s=0.01, backoff_max_s=0.05, deadline_s=20.0))
#: Failures: a stall is given up quickly.
FAIL_FAST = QUICK.replace(stall_timeout_s=0.5, retry=fastload.RetryConfig(
    max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.02, deadline_s=5.0))
ENGINES = ["threads", "aiohttp"]
SECRET = "SeCrEtFoRfIrStLoOk/+0123456789abcdefXYZ"  # moto (auth off) takes any key: this one is easy to spot


def _via(proxy, engine: str, base=STEADY, **s3) -> fastload.LoadConfig:
    return base.replace(http_engine=engine, s3=fastload.S3Options(endpoint_url=proxy.url.rstrip("/"),
                                                                  addressing_style="path", **s3))


def _put_public(s3_server, bucket: str, key: str, data: bytes) -> None:
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=data, ACL="public-read")


def _moto_port(s3_server) -> int:
    return int(s3_server.endpoint_url.rsplit(":", 1)[1])


def _everything_said(exc: BaseException) -> str:
    """The error, its whole chain (causes and contexts) and its formatted traceback."""
    parts, seen, todo = [], set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        parts.append(f"{type(e).__name__}: {e} {e.args!r}")
        todo += [e.__cause__, e.__context__]
    parts.append("".join(traceback.format_exception(exc)))
    return "\n".join(parts)


# == anonymous (unsigned) GET URLs and dot segments =============================================================
#
# A presigned URL is sent "byte for byte" only when it carries X-Amz-Signature (http.py ``_SIGNED``). With
# S3Options(anonymous=True) botocore's URL has no query at all, so aiohttp's yarl normalises it: "d/./x" becomes
# "d/x" and "a/../b" becomes "b". The first look always goes through aiohttp, whatever ``http_engine`` says.

@pytest.mark.parametrize("engine", ENGINES)
def test_anonymous_key_with_a_dot_segment_is_that_object_not_its_normalised_twin(s3_server, s3_bucket, tmp_path,
                                                                                 engine):
    """Two public objects, ``d/./m.safetensors`` and ``d/m.safetensors`` (S3 keys are literal strings). An
    anonymous load of the first must give its tensors: never the twin's (aiohttp engine: yarl asks for the
    twin every time, silently), nor a SourceChangedError (threads: the probe pins the twin's ETag, the
    threaded body reader then asks for the right object with that If-Match)."""
    data, want = seeded_file(tmp_path, 1)
    twin, _ = seeded_file(tmp_path, 2)
    _put_public(s3_server, s3_bucket, "d/./m.safetensors", data)
    _put_public(s3_server, s3_bucket, "d/m.safetensors", twin)
    config = STEADY.replace(http_engine=engine, s3=fastload.S3Options(anonymous=True))
    got = fastload.load(f"s3://{s3_bucket}/d/./m.safetensors", config=config)
    assert set(got) == set(want), f"loaded the tensors of another object: {sorted(got)} for {sorted(want)}"
    assert_bit_exact(got, want)


@pytest.mark.parametrize("engine", ENGINES)
def test_anonymous_dot_segment_keys_in_load_plan_stream_and_pull(s3_server, s3_bucket, tmp_path, engine):
    """Public objects whose keys hold ``./`` or ``../`` (and nothing at their normalised names): signed, every
    API reads them (test_s3_realism_audit); anonymously they must read the same. Today the first look asks
    yarl's normalised URL, gets 404 and answers "no such object" without asking the HEAD (which finds it)."""
    config = STEADY.replace(http_engine=engine, s3=fastload.S3Options(anonymous=True))
    failures = []
    for i, key in enumerate(["d/./x.safetensors", "a/../b.safetensors"]):
        data, want = seeded_file(tmp_path, 10 + i)
        _put_public(s3_server, s3_bucket, key, data)
        url = f"s3://{s3_bucket}/{key}"
        out = tmp_path / f"out{i}"
        calls = {
            "load": lambda: assert_bit_exact(fastload.load(url, config=config), want),
            "plan": lambda: {t.name for t in fastload.plan(url, config=config).tensors} == set(want) or 1 / 0,
            "stream": lambda: assert_bit_exact(_streamed(url, config), want),
            "pull": lambda: fastload.pull(url, to=out, config=config).read_bytes() == data or 1 / 0,
        }
        for api, call in calls.items():
            try:
                call()
            except Exception as exc:  # noqa: BLE001 -- each failure is listed
                failures.append(f"{api} {key!r}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)


def _streamed(url, config):
    with fastload.stream(url, config=config) as s:
        return {name: t.clone() for name, t in s}


ODD_PUBLIC_KEYS = ["sp ace/m .safetensors", "p+lus/a+b.safetensors", "pct%25/m%2F.safetensors",
                   "ünï/模型.safetensors", "tr./dot.", "double//slash/m.safetensors", "q?x=1#f.safetensors",
                   "k=v/x.../y.safetensors"]


@pytest.mark.parametrize("engine", ENGINES)
def test_anonymous_odd_keys_without_dot_segments_load_and_pull_bit_exact(s3_server, s3_bucket, tmp_path, engine):
    """The rest of the odd keys (spaces, ``+``, ``%``, unicode, trailing dots, ``//``, ``?``/``#``), unsigned:
    load by key and pull of their prefix, bit for bit (a pull refuses to write ``//`` as a local path: not
    pulled here)."""
    config = STEADY.replace(http_engine=engine, s3=fastload.S3Options(anonymous=True))
    stored = {}
    for i, key in enumerate(ODD_PUBLIC_KEYS):
        data, want = seeded_file(tmp_path, 20 + i)
        folder = "odd2" if "//" in key else "odd"
        _put_public(s3_server, s3_bucket, f"{folder}/{key}", data)
        if folder == "odd":
            stored[key] = data
        assert_bit_exact(fastload.load(f"s3://{s3_bucket}/{folder}/{key}", config=config), want)
    out = tmp_path / "out"
    fastload.pull(f"s3://{s3_bucket}/odd/", to=out, config=config)
    assert files_under(out) == stored


# == a .json larger than the first look ===========================================================================

def _big_index_tensors(n: int = 2600) -> dict[str, torch.Tensor]:
    """Enough long names that the index passes 256 KiB (the first look of a .json key)."""
    return {f"model.layers.{i}.mlp.a_rather_long_module_name_{'x' * 48}.weight": torch.full((2,), float(i))
            for i in range(n)}


@pytest.mark.parametrize("engine", ENGINES)
def test_index_over_256_kib_is_read_in_two_parts_bit_exact_and_each_byte_once(s3_server, s3_bucket, s3_proxy,
                                                                              tmp_path, engine):
    tensors = _big_index_tensors()
    folder = write_sharded(tmp_path / "ck", tensors, 2)
    index = (folder / "model.safetensors.index.json").read_bytes()
    assert len(index) > 256 << 10
    s3_server.upload_dir(s3_bucket, "ck", folder)
    config = _via(s3_proxy, engine)
    total = sum(p.stat().st_size for p in folder.iterdir())

    trace = fastload.Trace()
    assert_bit_exact(fastload.load(f"s3://{s3_bucket}/ck/", config=config, trace=trace), tensors)
    index_gets = [r for r in s3_proxy.log if r.path.endswith(".index.json")]
    assert [(r.method, r.range, r.status) for r in index_gets] == [
        ("GET", "bytes=0-262143", 206), ("GET", f"bytes=262144-{len(index) - 1}", 206)]
    assert not [r for r in s3_proxy.log if r.method == "HEAD"]
    assert trace.summary().bytes_fetched == s3_proxy.bytes_sent() == total  # every byte once, counted once

    s3_proxy.log_store.clear()  # the index pulled by name: the first look's 256 KiB are written, not asked again
    pulled = fastload.pull(f"s3://{s3_bucket}/ck/model.safetensors.index.json", to=tmp_path / "out", config=config)
    assert pulled.read_bytes() == index
    assert s3_proxy.bytes_sent() == len(index)


@pytest.mark.parametrize("engine", ENGINES)
def test_index_replaced_between_its_two_parts_is_source_changed(s3_server, s3_bucket, s3_proxy, tmp_path, engine):
    """The second part of a >256 KiB index is asked with the first look's ETag: a replaced index is a
    SourceChangedError naming it (load and pull), never the halves of two versions, and the pull leaves nothing
    under the final name."""
    folder = write_sharded(tmp_path / "ck", _big_index_tensors(), 2)
    s3_server.upload_dir(s3_bucket, "ck", folder)
    url = f"s3://{s3_bucket}/ck/model.safetensors.index.json"
    config = _via(s3_proxy, engine)
    for api in ("load", "pull"):
        s3_proxy.faults.clear()
        s3_proxy.faults.change_etag_after(1, path="*.index.json")
        with pytest.raises(fastload.SourceChangedError) as info:
            if api == "load":
                fastload.load(f"s3://{s3_bucket}/ck/", config=config)
            else:
                fastload.pull(url, to=tmp_path / "out", config=config)
        assert url in str(info.value)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


# == the first look's bytes: used, fetched once, counted once ========================================================

@pytest.mark.parametrize("engine", ENGINES)
def test_first_look_bytes_are_used_fetched_once_and_counted_once(s3_server, s3_bucket, s3_proxy, tmp_path, engine):
    """A sharded checkpoint (index under 256 KiB: one GET) and a single file, by load, stream and ``names=``:
    no HEAD, the first look of each file is its only request for bytes [0, 8) (or the whole index), and what the
    trace counts is what the server sent."""
    tensors = llama_like_tensors()
    folder = write_sharded(tmp_path / "ck", tensors, 3)
    s3_server.upload_dir(s3_bucket, "ck", folder)
    file, single = write_checkpoint(tmp_path / "one.safetensors")
    s3_server.put(s3_bucket, "one.safetensors", file.read_bytes())
    config = _via(s3_proxy, engine)
    cases = [(f"s3://{s3_bucket}/ck/", tensors, sum(p.stat().st_size for p in folder.iterdir()), 4),
             (f"s3://{s3_bucket}/one.safetensors", single, file.stat().st_size, 1)]
    for url, want, size, files in cases:
        for api in ("load", "stream", "names"):
            s3_proxy.log_store.clear()
            trace = fastload.Trace()
            if api == "load":
                assert_bit_exact(fastload.load(url, config=config, trace=trace), want)
            elif api == "stream":
                with fastload.stream(url, config=config, trace=trace) as s:
                    assert_bit_exact({n: t.clone() for n, t in s}, want)
            else:
                name = sorted(want)[1]
                got = fastload.load(url, config=config, trace=trace, names=[name])
                assert torch.equal(got[name], want[name])
            log = s3_proxy.log
            assert not [r for r in log if r.method == "HEAD"], (url, api)
            first_looks = [r for r in log if r.range in ("bytes=0-7", "bytes=0-262143")]
            assert len(first_looks) == files and all(r.status == 206 for r in first_looks), (url, api)
            starting_at_0 = [r for r in log if r.range and r.range.startswith("bytes=0-")]
            assert starting_at_0 == first_looks, f"{url} {api}: bytes [0, 8) asked again"
            assert trace.summary().bytes_fetched == s3_proxy.bytes_sent(), (url, api)
            if api != "names":
                assert s3_proxy.bytes_sent() == size, (url, api)


# == pull of a prefix: the LIST's word, then the bytes ================================================================

@pytest.mark.parametrize("engine", ENGINES)
def test_pull_of_a_prefix_asks_nothing_per_object_and_a_replacement_after_the_list_is_never_mixed(
        s3_server, s3_bucket, s3_proxy, tmp_path, engine):
    """First pull: the LIST, then only data GETs (no HEAD, no first look). Then the weights change (so a second
    pull has work) and, after that pull's LIST (its progress callback runs before any byte is asked), both
    objects are overwritten again: SourceChangedError, the first pull's files left as they were, and a third
    pull gets the newest bytes whole."""
    file, _ = write_checkpoint(tmp_path / "m.safetensors")
    old, config_old = file.read_bytes(), b'{"hidden": 64}'
    new, config_new = same_size_other_bytes(old), b'{"hidden": 32}'
    s3_server.put(s3_bucket, "p/m.safetensors", old)
    s3_server.put(s3_bucket, "p/config.json", config_old)
    out, src, config = tmp_path / "out", f"s3://{s3_bucket}/p/", _via(s3_proxy, engine)

    fastload.pull(src, to=out, config=config)
    assert files_under(out) == {"m.safetensors": old, "config.json": config_old}
    asked = [(r.method, r.range) for r in s3_proxy.log]
    assert not [a for a in asked if a[0] == "HEAD" or a[1] in ("bytes=0-7", "bytes=0-262143")], asked

    s3_server.put(s3_bucket, "p/m.safetensors", old[:-1] + bytes([old[-1] ^ 1]))  # changed: the pull has work
    fired = []

    def overwrite(done, total):
        if not fired:
            fired.append(done)
            s3_server.put(s3_bucket, "p/m.safetensors", new)
            s3_server.put(s3_bucket, "p/config.json", config_new)

    with pytest.raises(fastload.SourceChangedError) as info:
        fastload.pull(src, to=out, config=config, progress=overwrite)
    assert fired and f"s3://{s3_bucket}/p/" in str(info.value)
    # never a mix under a final name: the first pull's files as they were
    assert files_under(out) == {"m.safetensors": old, "config.json": config_old}
    fastload.pull(src, to=out, config=config)
    assert files_under(out) == {"m.safetensors": new, "config.json": config_new}


# == empty and tiny objects =========================================================================================

class _EmptyRangeHandler(_ProxyHandler):
    def produce(self, path, headers, body):
        reply = super().produce(path, headers, body)
        if reply.status == 416:  # "bytes */0", as nginx, Apache and several S3-compatible stores say it
            reply.headers = [(n, v) for n, v in reply.headers if n.lower() != "content-range"]
            reply.headers.append(("Content-Range", "bytes */0"))
        return reply


class _EmptyRangeFront(FaultProxy):
    handler_class = _EmptyRangeHandler


@pytest.mark.parametrize(("engine", "front"), [("threads", "moto"), ("aiohttp", "content-range")])
def test_empty_and_tiny_objects_in_load_plan_and_pull(s3_server, s3_bucket, tmp_path, engine, front):
    """0-byte objects (a first look answered 416: moto's bare one, which falls back to the HEAD, or one with
    ``Content-Range: bytes */0``, taken as the answer) and objects shorter than the first look: typed errors
    naming the object for load and plan; pulled as they are, by name and in a prefix, and pulled again for free."""
    empties = ["p/config.json", "p/vocab.txt", "z/model.safetensors.index.json", "y/model.safetensors"]
    for key in empties:
        s3_server.put(s3_bucket, key, b"")
    s3_server.put(s3_bucket, "p/tiny.json", b"{}")
    s3_server.put(s3_bucket, "p/t.safetensors", b"\x01\x02\x03")
    file, _ = write_checkpoint(tmp_path / "m.safetensors")
    s3_server.put(s3_bucket, "p/model.safetensors", file.read_bytes())
    b = s3_bucket
    with (FaultProxy if front == "moto" else _EmptyRangeFront)(s3_server.endpoint_url) as proxy:
        config = _via(proxy, engine)
        for url in (f"s3://{b}/z/", f"s3://{b}/z/model.safetensors.index.json", f"s3://{b}/y/",
                    f"s3://{b}/y/model.safetensors", f"s3://{b}/p/t.safetensors", f"s3://{b}/p/tiny.json"):
            for call in (fastload.load, fastload.plan):
                with pytest.raises(fastload.FormatError) as info:
                    call(url, config=config)
                assert url.rstrip("/") in str(info.value), (url, call.__name__)
        heads = [r for r in proxy.log if r.method == "HEAD"]
        assert bool(heads) == (front == "moto")  # bytes */0 is an answer: no HEAD needed

        for key in ("p/config.json", "p/vocab.txt"):
            pulled = fastload.pull(f"s3://{b}/{key}", to=tmp_path / key.replace("/", "_"), config=config)
            assert pulled.read_bytes() == b""
        out = tmp_path / "out"
        fastload.pull(f"s3://{b}/p/", to=out, config=config)
        want = {"config.json": b"", "vocab.txt": b"", "tiny.json": b"{}", "t.safetensors": b"\x01\x02\x03",
                "model.safetensors": file.read_bytes()}
        assert files_under(out) == want
        proxy.log_store.clear()
        fastload.pull(f"s3://{b}/p/", to=out, config=config)
        assert proxy.bytes_sent(f"/{b}/p/*") == 0 and files_under(out) == want


# == failures of the first look: typed, named, secret-free, nothing left behind ========================================

FIRST_LOOK_FAULTS = {
    # the first look stalls, the HEAD too, every time: retries exhausted
    "everything_hangs": (lambda f: f._add(Hang(methods=frozenset({"GET", "HEAD"}))), fastload.TransferError),
    # the GET stalls, the HEAD is refused: the HEAD's answer decides
    "get_hangs_head_403": (lambda f: (f._add(Hang(methods=frozenset({"GET"}))),
                                      f._add(FailWith(methods=frozenset({"HEAD"}), status=403))),
                           fastload.SourcePermissionError),
    "get_503_head_403": (lambda f: (f._add(FailWith(methods=frozenset({"GET"}), status=503)),
                                    f._add(FailWith(methods=frozenset({"HEAD"}), status=403))),
                         fastload.SourcePermissionError),
    "missing_object": (None, fastload.SourceNotFoundError),
    "missing_bucket": (None, fastload.SourceNotFoundError),
}


@pytest.mark.parametrize("fault", sorted(FIRST_LOOK_FAULTS))
def test_first_look_failures_are_typed_named_secret_free_and_leave_nothing(s3_server, s3_bucket, s3_proxy, tmp_path,
                                                                           monkeypatch, fault):
    """(The first look and the HEAD do not depend on ``http_engine``: the default engine only.)"""
    engine = "threads"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    file, _ = write_checkpoint(tmp_path / "one.safetensors")
    s3_server.put(s3_bucket, "one.safetensors", file.read_bytes())
    rule, kind = FIRST_LOOK_FAULTS[fault]
    url = {"missing_object": f"s3://{s3_bucket}/nope.safetensors",
           "missing_bucket": f"s3://no-such-{uuid.uuid4().hex[:8]}/one.safetensors"}.get(
        fault, f"s3://{s3_bucket}/one.safetensors")
    if rule is not None:
        rule(s3_proxy.faults)
    config = _via(s3_proxy, engine, FAIL_FAST)
    calls = [fastload.load, fastload.plan, lambda u, config: fastload.pull(u, to=tmp_path / "o", config=config)]
    for call in calls[:1] if fault == "everything_hangs" else calls:  # (each call waits out the stalls)
        with Leaks({s3_proxy.port, _moto_port(s3_server)}) as leaks, Timer() as timer:
            with pytest.raises(kind) as info:
                call(url, config=config)
        assert timer.s < 8, f"took {timer.s:.1f} s"
        leaks.check(grace_s=1.0)
        said = _everything_said(info.value)
        assert url in str(info.value)
        for secret in (SECRET, "X-Amz-Signature", "X-Amz-Credential", "Signature="):
            assert secret not in said, f"{secret!r} in what the {fault} error says:\n{said}"
    assert not (tmp_path / "o" / "one.safetensors").exists()
