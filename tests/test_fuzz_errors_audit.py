"""Seeded fuzzing of the error contract: bad input only ever ends in a bit-exact load or a FastloadError.

Three fronts, each a bounded, seeded loop (the same cases every run):

1. ``model.safetensors.index.json`` mutations (random JSON in weight_map/metadata, wrong types, huge
   numbers, deep nesting, non-UTF-8, duplicate keys, odd shard names, shards with broken headers, the same
   tensor in two shards, tensors missing from the index or from the shards), from a local directory and
   over HTTP.
2. Server reply mutations from a scripted HTTP server: random status codes, missing/garbled/duplicated
   Content-Range, Content-Length, ETag, Content-Encoding, Transfer-Encoding, bodies cut or extended,
   connection resets, for both ``http_engine`` values, with a small retry budget, a time bound and a leak
   check.
3. Random argument values to ``load``/``plan``/``stream``/``pull`` (sources, names, dtype, device, shard,
   config fields): a ConfigError (or another FastloadError) or success, never a bare builtin exception.

``tests/test_hostile.py`` and ``tests/test_format_properties.py`` already cover safetensors *header*
fuzzing; nothing here repeats it. Every failure lists each distinct bare exception with its case.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import time
from fractions import Fraction
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import Leaks, ScriptedHTTP, bounded, same_bytes
from safetensors.torch import load_file, save_file

import fastload

SEED = 20240611


# -- shared helpers ----------------------------------------------------------------------------------------

def _outcome(fn):
    """``("ok", value)``, ``("typed", FastloadError)`` or ``("bare", other exception)``."""
    try:
        return "ok", fn()
    except fastload.FastloadError as exc:
        return "typed", exc
    except Exception as exc:  # noqa: BLE001 - the point of the test
        return "bare", exc


def _where(exc: BaseException) -> str:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        if "/fastload/" in tb.tb_frame.f_code.co_filename:
            last = tb
        tb = tb.tb_next
    if last is None:
        return "?"
    code = last.tb_frame.f_code
    return f"{code.co_filename.split('/fastload/')[-1]}:{code.co_name}:{last.tb_lineno}"


class Bare:
    """Collects bare exceptions and wrong results, one line per distinct (type, place)."""

    def __init__(self) -> None:
        self.seen: dict[tuple, str] = {}

    def bare(self, case: str, exc: BaseException) -> None:
        key = (type(exc).__name__, _where(exc))
        self.seen.setdefault(key, f"{type(exc).__name__} at {key[1]}: {str(exc)[:160]!r}  <- {case[:300]}")

    def wrong(self, case: str, why: str, tag: str = "WRONG RESULT") -> None:
        self.seen.setdefault((tag, why[:40]), f"{tag}: {why[:200]}  <- {case[:300]}")

    def check(self) -> None:
        assert not self.seen, "bare exceptions / wrong results:\n" + "\n".join(self.seen.values())


# -- 1. index.json mutations ---------------------------------------------------------------------------------

S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
ODD = "odd name \u00fc+&;'=,@!$().safetensors"
SUB = "sub/inner.safetensors"
DUP = "dup.safetensors"  # holds another tensor named "a"
BROKEN = "broken.safetensors"  # a header that promises more data than the file has
EMPTY = "empty.safetensors"  # a valid file with no tensors
LONG = "L" * 300 + ".safetensors"  # a name longer than NAME_MAX: no such file can exist
EXISTING = [S1, S2, ODD, SUB, DUP, BROKEN, EMPTY]
ABSENT = ["absent.safetensors", "x y.safetensors", "\u4e2d\u6587.safetensors", "a/b/c/d.safetensors", LONG,
          "sub", "model.safetensors.index.json", "~x.safetensors", "a:b.safetensors", "a;b.safetensors",
          "-.safetensors", " .safetensors", "x.safetensors ", "a" * 250 + ".safetensors"]


def _index_tensors() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(SEED)
    return {
        S1: {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16)},
        S2: {"c": torch.arange(4, dtype=torch.int64), "d": torch.randn(2, 2, generator=g).half()},
        ODD: {"e": torch.randn(3, generator=g)},
        SUB: {"f": torch.arange(5, dtype=torch.uint8)},
        DUP: {"a": torch.randn(3, 5, generator=g)},
        EMPTY: {},
    }


def _write_index_dir(directory: Path) -> None:
    for name, tensors in _index_tensors().items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / name))
    header = json.dumps({"z": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}).encode()
    (directory / BROKEN).write_bytes(struct.pack("<Q", len(header)) + header + bytes(40))


JUNK = [None, True, False, 0, -1, 2**63, 2**64 + 1, 10**30, -10**30, 1.5, -0.0, 1e308, "", "x", "\u00fc",
        "\ud7ff", [], [1, 2], {}, {"k": "v"}, {"k": [1, {"x": None}]}, [[[[[]]]]], "a" * 5000]


def _junk(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth < 3 and roll < 0.15:
        return [_junk(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 3 and roll < 0.3:
        return {rng.choice(["k", "total_size", "weight_map", "", "\u00e9"]): _junk(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    return rng.choice(JUNK)


def _shard_choice(rng: random.Random):
    roll = rng.random()
    if roll < 0.55:
        return rng.choice(EXISTING)
    if roll < 0.85:
        return rng.choice(ABSENT)
    return _junk(rng)


def _mutate_doc(rng: random.Random, doc: dict, notes: list[str]) -> dict:
    wm = doc.get("weight_map")
    if not isinstance(wm, dict):
        return doc
    kind = rng.choice(["meta", "meta_key", "wm_value", "wm_shard", "ghost", "drop", "wm_junk", "top_key",
                       "rename", "odd_key", "no_meta", "dup_tensor", "all_to", "many"])
    notes.append(kind)
    if kind == "meta":
        doc["metadata"] = _junk(rng)
    elif kind == "meta_key":
        doc.setdefault("metadata", {})
        if isinstance(doc["metadata"], dict):
            doc["metadata"][rng.choice(["total_size", "format", "x", "__proto__"])] = _junk(rng)
    elif kind == "wm_value" and wm:
        wm[rng.choice(sorted(wm))] = _junk(rng)
    elif kind == "wm_shard" and wm:
        wm[rng.choice(sorted(wm))] = _shard_choice(rng)
    elif kind == "ghost":
        wm[rng.choice(["ghost", "", " ", "a.b", "\u00fc", "__metadata__", "x" * 1000])] = _shard_choice(rng)
    elif kind == "drop" and wm:
        del wm[rng.choice(sorted(wm))]
    elif kind == "wm_junk":
        doc["weight_map"] = _junk(rng)
    elif kind == "top_key":
        doc[rng.choice(["extra", "metadata", "weight_map_", ""])] = _junk(rng)
    elif kind == "rename" and wm:
        old = rng.choice(sorted(wm))
        wm[old + rng.choice(["_", ".weight", " ", "\u00fc"])] = wm.pop(old)
    elif kind == "odd_key":
        wm["e"] = ODD
        wm["f"] = SUB
    elif kind == "no_meta":
        doc.pop("metadata", None)
    elif kind == "dup_tensor":
        wm["a"] = rng.choice([S1, DUP])
        wm.setdefault("a", S1)
        if rng.random() < 0.5:
            wm["zz"] = DUP if wm["a"] == S1 else S1  # both files with "a" named by the index
    elif kind == "all_to" and wm:
        target = _shard_choice(rng)
        for k in wm:
            wm[k] = target
    elif kind == "many":
        for i in range(rng.choice([10, 300])):
            wm[f"t{i}"] = rng.choice([S1, f"s{i % 7}.safetensors"])
    return doc


def _raw_mutation(rng: random.Random, raw: bytes, notes: list[str]) -> bytes:
    kind = rng.choice(["nonutf8", "dupkey", "truncate", "bom", "trailing", "nest",
                       "bignum", "nan", "surrogate", "dupkey_wm", "array", "ws", "nul", "bigfloat"])
    notes.append("raw:" + kind)
    if kind == "nonutf8":
        at = rng.randrange(len(raw))
        return raw[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]) + raw[at:]
    if kind == "dupkey":
        return raw[:1] + b'"metadata": {}, ' + raw[1:]
    if kind == "dupkey_wm":
        return raw.replace(b'"weight_map": {', b'"weight_map": {"a": "' + S2.encode() + b'", ', 1)
    if kind == "truncate":
        return raw[:rng.randrange(len(raw))]
    if kind == "bom":
        return b"\xef\xbb\xbf" + raw
    if kind == "trailing":
        return raw + rng.choice([b" ", b"\n", b"x", b"{}", b"\x00", b"]"])
    if kind == "nest":
        depth = rng.choice([50, 5000, 200_000])
        return raw[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "bignum":
        return raw[:-1] + b', "n": 1' + b"0" * rng.choice([20, 400, 5000]) + b"}"
    if kind == "bigfloat":
        return raw[:-1] + b', "f": ' + rng.choice([b"1e999", b"-1e400", b"1.0e-99999", b"1E+308"]) + b"}"
    if kind == "nan":
        return raw[:-1] + b', "x": ' + rng.choice([b"NaN", b"Infinity", b"-Infinity"]) + b"}"
    if kind == "surrogate":
        return raw[:-1] + b', "s": "\\ud800"}'
    if kind == "array":
        return b"[" + raw + b"]"
    if kind == "ws":
        return b" \t\r\n" + raw + b" \n"
    if kind == "nul":
        return raw.replace(b'"weight_map"', b'"weight\\u0000map"', 1)
    return raw


def _index_case(seed: int) -> tuple[bytes, str]:
    rng = random.Random(f"{SEED}-index-{seed}")
    doc = {"metadata": {"total_size": 1234}, "weight_map": {"a": S1, "b": S1, "c": S2, "d": S2}}
    notes: list[str] = []
    for _ in range(rng.randint(1, 3)):
        doc = _mutate_doc(rng, doc, notes)
    raw = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    if rng.random() < 0.35:
        raw = _raw_mutation(rng, raw, notes)
    return raw, f"seed={seed} {notes} index={raw[:200]!r}"


def _expected(raw: bytes, directory: Path) -> dict[str, torch.Tensor] | None:
    """What a successful load must return: every tensor of every shard the index names (None: not a plain
    index, success is not expected to be judgeable)."""
    try:
        doc = json.loads(raw.decode("utf-8"))
        files = list(dict.fromkeys(doc["weight_map"].values()))
    except Exception:  # noqa: BLE001
        return None
    out: dict[str, torch.Tensor] = {}
    for name in files:
        if not isinstance(name, str) or not os.path.isfile(directory / name):
            return None
        try:
            out.update(load_file(str(directory / name)))
        except Exception:  # noqa: BLE001 - the reference refuses that shard: so must a load
            return None
    return out


def _judge(bare: Bare, case: str, kind: str, value, expected) -> None:
    if kind == "bare":
        bare.bare(case, value)
    elif kind == "ok":
        if expected is None:
            bare.wrong(case, "loaded an index that is not valid JSON or names a missing shard")
            return
        if set(value) != set(expected):
            bare.wrong(case, f"names {sorted(value)} != {sorted(expected)}")
            return
        for name, tensor in expected.items():
            if not same_bytes(value[name], tensor):
                bare.wrong(case, f"tensor {name!r} has wrong bytes")
    else:
        assert isinstance(value, fastload.FastloadError)
        assert len(str(value)) < 2000, (case, len(str(value)))


N_INDEX = 120
QUICK_RETRY = fastload.RetryConfig(max_attempts=2, backoff_base_s=0.005, backoff_max_s=0.01, deadline_s=3.0)
QUICK = fastload.LoadConfig(chunk_bytes=64 * 1024, host_buffer_bytes=8 * 64 * 1024, max_concurrency=4,
                            stall_timeout_s=0.5, connect_timeout_s=2.0, retry=QUICK_RETRY)


def test_index_mutations_local(tmp_path):
    """Every mutated index, loaded from a local directory: a bit-exact load or a FastloadError."""
    _write_index_dir(tmp_path)
    bare = Bare()
    started = time.monotonic()
    for seed in range(N_INDEX):
        raw, case = _index_case(seed)
        (tmp_path / "model.safetensors.index.json").write_bytes(raw)
        kind, value = _outcome(lambda: bounded(lambda: fastload.load(str(tmp_path), config=QUICK), 10))
        _judge(bare, "local " + case, kind, value, _expected(raw, tmp_path))
    assert time.monotonic() - started < 60
    bare.check()


def test_index_mutations_http(http_server, http_dir):
    """The same mutated indexes, served over HTTP (directory URL ending in ``/``)."""
    _write_index_dir(http_dir)
    url = http_server.url_for(http_dir) + "/"
    bare = Bare()
    with Leaks({http_server.port}) as leaks:
        for seed in range(0, N_INDEX, 2):
            raw, case = _index_case(seed)
            (http_dir / "model.safetensors.index.json").write_bytes(raw)
            kind, value = _outcome(lambda: bounded(lambda: fastload.load(url, config=QUICK), 10))
            _judge(bare, "http " + case, kind, value, _expected(raw, http_dir))
        leaks.check(grace_s=1.0)
    bare.check()


def test_index_mutations_pull_http(http_server, http_dir, tmp_path):
    """``fastload.pull`` of an HTTP directory whose index is mutated: the files fetched are byte-identical to
    the server's, or a FastloadError."""
    _write_index_dir(http_dir)
    url = http_server.url_for(http_dir) + "/"
    bare = Bare()
    with Leaks({http_server.port}) as leaks:
        for seed in range(1, N_INDEX, 3):
            raw, case = _index_case(seed)
            (http_dir / "model.safetensors.index.json").write_bytes(raw)
            out = tmp_path / f"pull-{seed}"
            kind, value = _outcome(lambda: bounded(lambda: fastload.pull(url, to=out, config=QUICK), 10))
            if kind == "bare":
                bare.bare("pull " + case, value)
            elif kind == "ok":
                for f in out.rglob("*"):
                    if f.is_file() and ".fastload" not in f.parts:
                        rel = f.relative_to(out)
                        if not (http_dir / rel).is_file() or (http_dir / rel).read_bytes() != f.read_bytes():
                            bare.wrong("pull " + case, f"{rel} differs from the served file")
        leaks.check(grace_s=1.0)
    bare.check()


def test_index_long_shard_name_is_typed(tmp_path, http_server, http_dir):
    """Directed: an index naming a shard longer than NAME_MAX (no such file can exist) -> SourceNotFoundError
    or another FastloadError, never an OSError(ENAMETOOLONG)."""
    for directory, src in ((tmp_path, str(tmp_path)), (http_dir, http_server.url_for(http_dir) + "/")):
        _write_index_dir(directory)
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": LONG}}))
        with pytest.raises(fastload.FastloadError):
            bounded(lambda: fastload.load(src, config=QUICK), 10)


# -- 2. server reply mutations --------------------------------------------------------------------------------

def _served_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1)
    return {"w0": torch.randn(40_000, generator=g), "w1": torch.randn(25_000, generator=g).half(),
            "ids": torch.arange(3_001, dtype=torch.int64), "w2": torch.randn(11, 13, generator=g)}


STATUSES = [100, 101, 102, 103, 200, 201, 202, 203, 204, 205, 206, 207, 226, 299, 300, 301, 302, 303, 304, 305,
            307, 308, 399, 400, 401, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417,
            418, 421, 422, 425, 426, 428, 429, 431, 451, 499, 500, 501, 502, 503, 504, 505, 507, 508, 511, 520,
            599]
LOCATIONS = ["", "/", "/other.safetensors", "http://127.0.0.1:1/x", "ftp://127.0.0.1/x", "http://[::1/x",
             "http://127.0.0.1:99999/x", "//", "http://", "mailto:x@y", "http://user:pw@127.0.0.1:1/x",
             "\u00fc", "/%zz", "http://127.0.0.1:notaport/x", "https:///x"]
MUTATIONS = ["status", "status", "status", "no_cr", "bad_cr", "dup_cr", "cl", "dup_cl", "etag", "encoding",
             "te", "truncate", "extend", "reset", "interim", "lastmod", "stall"]


class FuzzServer(ScriptedHTTP):
    """Serves one file at ``/model.safetensors`` with single ranges, each reply mutated with probability ``p``
    by a RNG keyed on (case, range, how often that range was asked for): the same case mutates the same way."""

    def __init__(self, data: bytes, case: int, p: float):
        super().__init__("fuzz-server")
        self.data, self.case, self.p = data, case, p
        self.counts: dict[str, int] = {}
        self.mutations: list[str] = []

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        want = h.headers.get("Range", "")
        with self.lock:
            n = self.counts[want] = self.counts.get(want, 0) + 1
        rng = random.Random(f"{SEED}|{self.case}|{want}|{n}")
        size = len(self.data)
        try:
            first, last = (int(x) for x in want.split("=", 1)[1].split("-"))
        except Exception:  # noqa: BLE001
            first, last = 0, size - 1
        last = min(last, size - 1)
        body = self.data[first:last + 1]
        status, reason = 206, "Partial Content"
        headers = [("Content-Range", f"bytes {first}-{last}/{size}"), ("Content-Length", str(len(body))),
                   ("ETag", '"v1"'), ("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT"), ("Accept-Ranges", "bytes")]
        mode, cut, interim = "length", None, b""
        mutation = rng.choice(MUTATIONS) if rng.random() < self.p else None
        if mutation == "stall" and self.counts.get("__stalls", 0) >= 2:
            mutation = "truncate"
        with self.lock:
            self.mutations.append(f"{want}#{n}:{mutation}")
            if mutation == "stall":
                self.counts["__stalls"] = self.counts.get("__stalls", 0) + 1

        def drop(name):
            return [(k, v) for k, v in headers if k.lower() != name.lower()]

        if mutation == "status":
            status, reason = rng.choice(STATUSES), "Fuzzed"
            if 300 <= status < 400 and rng.random() < 0.8:
                headers.append(("Location", rng.choice(LOCATIONS)))
            if rng.random() < 0.5:
                body = rng.choice([b"", b"error page", self.data[:rng.randrange(1, size)]])
                headers = drop("Content-Length") + [("Content-Length", str(len(body)))]
        elif mutation == "no_cr":
            headers = drop("Content-Range")
        elif mutation == "bad_cr":
            headers = drop("Content-Range") + [("Content-Range", rng.choice([
                "", "bytes", f"bytes {first}-{last}/*", f"bytes */{size}", f"bytes {first + 1}-{last}/{size}",
                f"bytes {first}-{last + 1}/{size}", f"bytes {first}-{last}/{size + 1}", f"bytes {first}-{last}/0",
                f"bytes={first}-{last}/{size}", f"bytes {first}-{last}/{size}, bytes 0-0/{size}",
                f"bytes {first}-{last}/-1", "bytes 99999999999999999999999-0/1", f"items {first}-{last}/{size}",
                f"bytes {first}-{last}/{size}junk", f"bytes {last}-{first}/{size}",
                f" bytes  {first}-{last}/{size} ", f"bytes {first}-{last}/{10**40}"]))]
        elif mutation == "dup_cr":
            headers.append(("Content-Range", rng.choice([f"bytes {first}-{last}/{size}", f"bytes 0-0/{size}"])))
        elif mutation == "cl":
            choice = rng.choice(["missing", "garbage", "small", "large", "negative", "huge", "space"])
            headers = drop("Content-Length")
            if choice == "missing":
                mode = "close"
            else:
                value = {"garbage": "abc", "small": str(max(0, len(body) - 1)), "large": str(len(body) + 10),
                         "negative": "-1", "huge": str(2**70), "space": f" {len(body)} "}[choice]
                headers.append(("Content-Length", value))
                mode = "raw"
        elif mutation == "dup_cl":
            other = rng.choice([len(body), len(body) + 1, 0])
            headers.append(("Content-Length", str(other)))
            mode = "raw"
        elif mutation == "etag":
            headers = drop("ETag")
            choice = rng.choice(['"v2"', 'W/"v1"', "garbage", None, "dup"])
            if choice == "dup":
                headers += [("ETag", '"v1"'), ("ETag", '"v2"')]
            elif choice is not None:
                headers.append(("ETag", choice))
        elif mutation == "encoding":
            headers.append(("Content-Encoding", rng.choice(["gzip", "br", "deflate", "identity", "IDENTITY",
                                                             "identity, gzip", "", "x-unknown", "zstd"])))
        elif mutation == "te":
            choice = rng.choice(["chunked", "chunked_raw", "gzip, chunked", "identity", "chunked_cl", "junk"])
            if choice in ("chunked", "chunked_cl"):
                headers = (drop("Content-Length") if choice == "chunked" else headers)
                headers.append(("Transfer-Encoding", "chunked"))
                mode = "chunked"
            else:
                headers = drop("Content-Length") + [("Transfer-Encoding", {"chunked_raw": "chunked"}.get(choice, choice))]
                mode = "close"
        elif mutation == "truncate":
            cut = rng.randrange(0, max(1, len(body)))
        elif mutation == "extend":
            extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
            if rng.random() < 0.5:
                headers = drop("Content-Length") + [("Content-Length", str(len(body) + len(extra)))]
            body = body + extra
            mode = "raw"
        elif mutation == "reset":
            cut = rng.randrange(0, max(1, len(body)))
            mode = "reset"
        elif mutation == "interim":
            interim = rng.choice([b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n", b"HTTP/1.1 100 Continue\r\n\r\n",
                                  b"HTTP/1.1 102 Processing\r\n\r\n"])
        elif mutation == "lastmod":
            headers = drop("ETag") + [("Last-Modified", rng.choice(["Tue, 02 Jan 2024 00:00:00 GMT", "garbage"]))]
            headers = [(k, v) for k, v in headers if not (k == "Last-Modified" and v.startswith("Mon"))]
        elif mutation == "stall":
            if self.stopping.wait(0.8):
                h.close_connection = True
                return
        try:
            out = interim + f"HTTP/1.1 {status} {reason}\r\n".encode()
            for k, v in headers:
                out += f"{k}: {v}\r\n".encode("latin-1", "replace")
            if mode in ("close", "reset") or cut is not None:
                out += b"Connection: close\r\n"
                h.close_connection = True
            out += b"\r\n"
            if mode == "chunked":
                for i in range(0, len(body), 7000):
                    piece = body[i:i + 7000]
                    out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
                out += b"0\r\n\r\n"
            else:
                out += body if cut is None else body[:cut]
            h.wfile.write(out)
            h.wfile.flush()
            if mode == "reset":
                h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                h.close_connection = True
            elif mode == "raw" or 100 <= status < 200 or status in (204, 304):
                h.close_connection = True
        except OSError:
            h.close_connection = True


SERVER_RETRY = fastload.RetryConfig(max_attempts=3, backoff_base_s=0.005, backoff_max_s=0.02, deadline_s=2.0)
N_SERVER = 45


@pytest.fixture(scope="module")
def served_file(tmp_path_factory) -> tuple[bytes, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("fuzz") / "model.safetensors"
    save_file(_served_tensors(), str(path))
    return path.read_bytes(), load_file(str(path))


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_server_reply_mutations(served_file, engine):
    data, want = served_file
    config = QUICK.replace(http_engine=engine, retry=SERVER_RETRY)
    bare = Bare()
    started = time.monotonic()
    for case in range(N_SERVER):
        p = [0.05, 0.15, 0.3, 0.6, 1.0][case % 5]
        with FuzzServer(data, case, p) as server:
            url = f"http://127.0.0.1:{server.port}/model.safetensors"
            with Leaks({server.port}) as leaks:
                t0 = time.monotonic()
                kind, value = _outcome(lambda: bounded(lambda: fastload.load(url, config=config), 20))
                took = time.monotonic() - t0
                label = f"{engine} case={case} p={p} mutations={server.mutations[:12]}"
                if kind == "bare":
                    bare.bare(label, value)
                elif kind == "ok":
                    if set(value) != set(want) or not all(same_bytes(value[n], want[n]) for n in want):
                        bare.wrong(label, "loaded tensors differ from the file")
                else:
                    msg = str(value)
                    if isinstance(value, (fastload.TransferError, fastload.IntegrityError,
                                          fastload.SourceChangedError)):
                        assert "127.0.0.1" in msg, (label, msg)  # the URL is named
                if took > 12:
                    bare.wrong(label, f"took {took:.1f} s", tag="SLOW")
                try:
                    leaks.check(grace_s=1.0)
                except AssertionError as exc:
                    bare.wrong(label, str(exc), tag="LEAK")
    assert time.monotonic() - started < 90
    bare.check()


def test_redirect_to_unparsable_location_is_typed(served_file):
    """Directed: the probe succeeds, then a ranged read is redirected to a Location that is not a URL (bad port,
    broken IPv6 literal): a TransferError (or another FastloadError), for both engines."""
    data, _ = served_file

    class Redirecting(FuzzServer):
        def _handle(self, h):
            want = h.headers.get("Range", "")
            if want == "bytes=0-7" or h.path != "/model.safetensors":
                return super()._handle(h)
            body = b""
            h.wfile.write(f"HTTP/1.1 302 Found\r\nLocation: {self.location}\r\nContent-Length: 0\r\n\r\n".encode()
                          + body)
            h.wfile.flush()

    problems = []
    for engine in ("threads", "aiohttp"):
        for location in ("http://127.0.0.1:99999/x", "http://[::1/x", "http://127.0.0.1:notaport/x"):
            with Redirecting(data, 0, 0.0) as server:
                server.location = location
                url = f"http://127.0.0.1:{server.port}/model.safetensors"
                kind, value = _outcome(lambda: bounded(
                    lambda: fastload.load(url, config=QUICK.replace(http_engine=engine, retry=SERVER_RETRY)), 15))
                if kind != "typed":
                    problems.append(f"{engine} Location {location!r}: {kind} {type(value).__name__}: "
                                    f"{str(value)[:120]} at {_where(value) if kind == 'bare' else ''}")
    assert not problems, "\n".join(problems)


# -- 3. random argument values ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("args") / "model.safetensors"
    g = torch.Generator().manual_seed(SEED + 2)
    save_file({"a": torch.randn(6, 4, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
               "i": torch.arange(6, dtype=torch.int32)}, str(path))
    return path


FLOAT_DTYPES = [d for d in vars(torch).values() if isinstance(d, torch.dtype)]
DTYPE_VALUES = ([None, "float32", "torch.float16", "bfloat16", "float", "half", "double", "int8", "torch.bool",
                 "", "Float32", "torch.torch.float32", "__class__", "Tensor", "finfo", "float8_e4m3fn",
                 "float8_e8m0fnu", "complex64", "cfloat", 5, 1.5, b"float32", np.float32, np.dtype("float32"),
                 float, object(), ["float32"]] + FLOAT_DTYPES)
DEVICE_VALUES = ["cpu", "cpu:0", "CPU", " cpu", "cpu:-1", "cuda:-1", "meta", "mps", "xla", "", "cpu:0:0", "gpu",
                 torch.device("cpu"), torch.device("meta"), None, 0, -1, 1.0, b"cpu", ["cpu"], object(), "cuda:x",
                 "privateuseone", "ipu", "hpu"]
NAME_VALUES = [None, "a", ["a"], ("a", "b"), {"a"}, {"a": 1}, iter(["i"]), [], "", ["a", "a"], ["zz"], [1], 1,
               b"a", [b"a"], ["a", None], [["a"]], "a\x00", ["\ud800"], range(3), 3.5, object(), ["a"] * 1000,
               np.array(["a"]), [np.str_("a")], torch.tensor([1])]


def _shard_values(rng: random.Random):
    rank = rng.choice([0, 1, -1, 2, 3, True, 1.0, None, "0", np.int64(0), 2**70])
    world = rng.choice([1, 2, 3, 0, -2, True, 2.0, None, "2", np.int64(2), 2**70])
    rules = rng.choice([(), {}, {"a": 0}, {"a": 1}, {"a": -1}, {"a": 2}, {"a": -3}, {"^a$": 0, "b": 0},
                        {"[": 0}, {"a": "0"}, {"a": 1.0}, {"a": True}, {"a": None}, {"a": np.int64(0)},
                        {"a": 2**70}, {1: 0}, {b"a": 0}, [("a", 0)], [("a", 0, 1)], [["a", 1]], "a", b"a", 5,
                        [None], {"(?P<x": 0}, {"a" * 10000: 0}, {"i": 0}, {".*": 0}, {"(a|b|i)": 0}])
    return rank, world, rules


def _config_changes(rng: random.Random) -> dict:
    value = rng.choice
    fields = {
        "chunk_bytes": [1 << 16, 1 << 20, 0, -1, 1 << 31, 65 * 1024 + 1, 1.5e6, "1MiB", None, True, np.int64(1 << 16),
                        float("nan"), 2**100],
        "max_concurrency": [1, 4, 0, -1, 1025, 2.0, "4", None, True, np.int32(3), 10**20],
        "host_buffer_bytes": [1 << 20, 1 << 17, 0, -1, None, 1e9, "x", np.int64(1 << 21)],
        "local_threads": [1, 2, 0, 257, 1.0, None, False],
        "local_cold_readers": [None, 1, 0, 300, True, 2.0, "1"],
        "direct_io": [False, True, 0, 1, "yes", None],
        "http_engine": ["threads", "aiohttp", "THREADS", "", None, 1, ["threads"], "curl"],
        "connect_timeout_s": [1.0, 0, -1, float("inf"), float("nan"), 1e-9, 10**10, "1", None, True,
                              Fraction(1, 3), np.float64(2.0)],
        "stall_timeout_s": [1.0, 0, float("nan"), 1e-300, 1e300, "2", None, Fraction(7, 2)],
        "verify_checksums": [False, True, 1, None, "no"],
        "retry": [fastload.RetryConfig(), None, {}, "x", 3],
        "s3": [fastload.S3Options(), None, {}, "x"],
        "http_headers": [{}, {"X-A": "b"}, {"X A": "b"}, {"X": 1}, {1: "x"}, {"X": "a\r\nb"}, [], "x", None,
                         {"X": b"v"}, {"": "v"}, {"\u00fc": "v"}, {"X": "\u00fc"}, {"X": "\ud800"}],
    }
    name = value(sorted(fields))
    return {name: value(fields[name])}


def _retry_or_s3(rng: random.Random):
    if rng.random() < 0.5:
        field = rng.choice(["max_attempts", "backoff_base_s", "backoff_max_s", "deadline_s", "max_concurrent_retries"])
        return fastload.RetryConfig, {field: rng.choice([0, 1, -1, 0.5, None, float("nan"), float("inf"), "1",
                                                         True, 10**30, Fraction(1, 2), np.int64(2), 1e-300])}
    field = rng.choice(["endpoint_url", "region", "profile", "anonymous", "addressing_style", "presign_expiry_s"])
    return fastload.S3Options, {field: rng.choice([None, "", "x", "http://[::1", "http://127.0.0.1:99999",
                                                   "https://", 1, True, "path", 59, 3600, 10**9, b"x", ["x"]])}


def test_random_arguments_to_load_plan_stream(small_file):
    """Random values for every public argument: ConfigError (or another FastloadError) or a correct result."""
    ref = load_file(str(small_file))
    rng = random.Random(f"{SEED}-args")
    bare = Bare()
    for case in range(200):
        kwargs: dict = {}
        for arg in rng.sample(["dtype", "device", "names", "shard", "config"], rng.randint(1, 3)):
            if arg == "dtype":
                kwargs["dtype"] = rng.choice(DTYPE_VALUES)
            elif arg == "device":
                kwargs["device"] = rng.choice(DEVICE_VALUES)
            elif arg == "names":
                kwargs["names"] = rng.choice(NAME_VALUES)
            elif arg == "shard":
                kind, shard = _outcome(lambda: fastload.Shard(*_shard_values(rng)))
                if kind == "bare":
                    bare.bare(f"Shard{_shard_values(random.Random(case))}", shard)
                    continue
                kwargs["shard"] = shard if kind == "ok" else None
            elif arg == "config":
                changes = _config_changes(rng)
                kind, config = _outcome(lambda: QUICK.replace(**changes))
                if kind == "bare":
                    bare.bare(f"LoadConfig.replace({changes!r})", config)
                    continue
                kwargs["config"] = config if kind == "ok" else None
        entry = rng.choice(["load", "plan", "stream"])
        label = f"case={case} fastload.{entry}({str(small_file)!r}, **{kwargs!r})"

        def call():
            if entry == "load":
                return fastload.load(str(small_file), **kwargs)
            if entry == "plan":
                return fastload.plan(str(small_file), **{k: v for k, v in kwargs.items()
                                                          if k in ("names", "shard", "config")})
            with fastload.stream(str(small_file), **kwargs) as s:
                return dict(s)

        kind, value = _outcome(lambda: bounded(call, 10))
        if kind == "bare":
            bare.bare(label, value)
        elif kind == "ok" and entry != "plan":
            dtype = kwargs.get("dtype")
            shard = kwargs.get("shard")
            for name, tensor in value.items():
                want = ref[name]
                if shard is not None and (dim := shard.dim_for(name)) is not None:
                    want = want.tensor_split(shard.world_size, dim)[shard.rank].contiguous()
                if dtype is not None and want.is_floating_point():
                    target = dtype if isinstance(dtype, torch.dtype) else None
                    if target is None:
                        continue
                    want = want.to(target)
                if not same_bytes(tensor, want):
                    bare.wrong(label, f"{name}: got {tensor.dtype}{list(tensor.shape)}, "
                                      f"want {want.dtype}{list(want.shape)} (or other bytes)")
    for case in range(60):
        cls, changes = _retry_or_s3(rng)
        kind, value = _outcome(lambda: cls(**changes))
        if kind == "bare":
            bare.bare(f"{cls.__name__}(**{changes!r})", value)
    bare.check()


@pytest.mark.parametrize("dtype", [d for d in FLOAT_DTYPES if d.is_floating_point], ids=str)
def test_every_floating_dtype_converts_or_is_refused(small_file, dtype):
    """``dtype=`` takes any floating-point torch dtype: the tensors converted as ``Tensor.to`` does, or a
    ConfigError up front, never a bare torch error from the conversion kernel."""
    ref = load_file(str(small_file))
    kind, value = _outcome(lambda: bounded(lambda: fastload.load(str(small_file), dtype=dtype), 10))
    assert kind != "bare", f"{type(value).__name__} at {_where(value)}: {value}"
    if kind == "ok":
        for name, tensor in ref.items():
            want = tensor.to(dtype) if tensor.is_floating_point() else tensor
            assert same_bytes(value[name], want), name


BAD_SOURCES = ["/tmp/p\x00.safetensors", "file:///tmp/a%00b.safetensors", "/tmp/" + "x" * 300 + ".safetensors",
               "/tmp/" + "x" * 300 + "/", "/" + "d/" * 3000 + "m.safetensors", ["/tmp/a\x00"], "\x00",
               "file:///" + "y" * 300, "/proc/self/mem", "/dev/null", "/dev/zero",
               "http://127.0.0.1:1/x.safetensors", "http://\x00/x.safetensors", "http:///x.safetensors",
               "http://127.0.0.1:1/" + "z" * 70000, "s3:///key", "hf://a", "hf://a/b@", "unknown://x/y",
               "HTTP://127.0.0.1:1/x.safetensors", "http://127.0.0.1:0/x.safetensors", "http://[::1]:1/x.json"]


@pytest.mark.parametrize("entry", ["load", "plan", "pull"])
def test_odd_sources_are_typed(tmp_path, entry):
    """Sources that cannot name a checkpoint (NUL bytes, names over NAME_MAX/PATH_MAX, devices, odd URLs):
    a FastloadError (SourceNotFoundError, ConfigError...) naming the source, never a bare OSError/ValueError."""
    config = QUICK.replace(retry=fastload.RetryConfig(max_attempts=1, deadline_s=2.0), connect_timeout_s=0.5)
    problems = []
    for source in BAD_SOURCES:
        def call():
            if entry == "load":
                return fastload.load(source, config=config)
            if entry == "plan":
                return fastload.plan(source, config=config)
            return fastload.pull(source, to=tmp_path / "out", config=config)

        kind, value = _outcome(lambda: bounded(call, 10))
        if kind == "bare":
            problems.append(f"{entry}({source[:60]!r}): {type(value).__name__} at {_where(value)}: {str(value)[:100]}")
    assert not problems, "\n".join(problems)


def test_refused_range_leaves_no_socket_while_error_is_held(served_file):
    """Directed (from the reply fuzzing): the probe and the header succeed, then every tensor range gets a
    final ``406`` with ``Connection: close``. The load fails with a TransferError; while the caller still holds
    that error (logs it, re-raises it later), no client socket of the load may stay open. With
    ``http_engine="threads"`` the refused reply's ``HTTPResponse`` is never closed, so its socket file keeps
    the descriptor open (CLOSE_WAIT) for as long as the exception's traceback lives."""
    data, _ = served_file

    class Refusing(FuzzServer):
        def _handle(self, h):
            want = h.headers.get("Range", "")
            if want in ("bytes=0-7", f"bytes=8-{data_start - 1}"):
                return super()._handle(h)
            h.wfile.write(b"HTTP/1.1 406 Not Acceptable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            h.wfile.flush()
            h.close_connection = True

    data_start = 8 + struct.unpack("<Q", data[:8])[0]
    from reliability_helpers import client_sockets
    for engine in ("threads", "aiohttp"):
        with Refusing(data, 0, 0.0) as server:
            url = f"http://127.0.0.1:{server.port}/model.safetensors"
            kind, error = _outcome(lambda: bounded(
                lambda: fastload.load(url, config=QUICK.replace(http_engine=engine, retry=SERVER_RETRY)), 15))
            assert kind == "typed" and isinstance(error, fastload.TransferError), (engine, kind, error)
            deadline = time.monotonic() + 1.0
            while client_sockets({server.port}) and time.monotonic() < deadline:
                time.sleep(0.05)
            left = client_sockets({server.port})
            assert not left, f"{engine}: sockets still open while the error is held: {left}"
            del error
