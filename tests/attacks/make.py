"""Write a corpus of hostile safetensors files and shard indexes, in the spirit of safetensors' ``attacks/``.

Nothing binary is committed: ``write_corpus(directory)`` generates every case in
a few hundred milliseconds. Each :class:`Case` names what it attacks, the path
to hand to ``fastload.load`` and the words the ``FormatError`` must contain.

    python tests/attacks/make.py /tmp/corpus    # write it, print the cases
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

SHARD = "model-00001-of-00001.safetensors"


@dataclass(frozen=True)
class Case:
    name: str
    path: Path  # a .safetensors file, an index file, or a checkpoint directory
    match: str  # regular expression the FormatError message must match
    kind: str  # "file" or "index"


def st_bytes(header, data: bytes = b"", *, length: int | None = None) -> bytes:
    """``u64 N`` + header + data; ``header`` is an object (JSON-encoded) or raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def f32(shape, begin, end) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def _files() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, regex the error must match)."""
    d16 = bytes(range(16))
    ok = {"a": f32([2, 2], 0, 16)}
    many = b"{" + b",".join(b'"t%d":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}' % (i, i, i + 1)
                            for i in range(20_000)) + b',"bad":{"dtype":"F128","shape":[],"data_offsets":[0,0]}}'
    return {
        "empty_file": (b"", "too small"),
        "seven_bytes": (b"\x01" * 7, "too small"),
        "header_len_u64_max": (struct.pack("<Q", 2**64 - 1) + b"{}", "exceeds"),
        "header_len_over_cap": (struct.pack("<Q", 100_000_001) + b"{}", "exceeds"),
        "header_len_past_eof": (st_bytes(b"{}", length=1_000), "past the end"),
        "header_len_zero": (st_bytes(b""), "invalid JSON"),
        "header_not_utf8": (st_bytes(b'{"a\xff\xfe": 1}'), "UTF-8"),
        "header_utf8_bom": (st_bytes(b"\xef\xbb\xbf{}"), "JSON"),
        "header_not_json": (st_bytes(b"{not json"), "invalid JSON"),
        "header_is_array": (st_bytes(b"[]"), "expected a JSON object"),
        "header_is_string": (st_bytes(b'"x"'), "expected a JSON object"),
        "deeply_nested_list": (st_bytes(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nested too deeply"),
        "deeply_nested_object": (st_bytes(b'{"__metadata__":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001),
                                 "nested too deeply"),
        "huge_metadata_value": (st_bytes(b'{"__metadata__":{"x":["' + b"a" * (30 << 20) + b'"]}}'),
                                "__metadata__"),
        "many_tensors_bad_last": (st_bytes(many, bytes(20_000)), "unknown dtype"),
        "duplicate_tensor_name": (st_bytes(b'{"a":' + json.dumps(f32([2, 2], 0, 16)).encode() + b',"a":'
                                           + json.dumps(f32([2, 2], 0, 16)).encode() + b"}", d16), "duplicate"),
        "duplicate_field": (st_bytes(b'{"a":{"dtype":"F32","dtype":"F16","shape":[2,2],"data_offsets":[0,16]}}',
                                     d16), "duplicate"),
        "duplicate_metadata": (st_bytes(b'{"__metadata__":{},"__metadata__":{}}'), "duplicate"),
        "overlapping_offsets": (st_bytes({"a": f32([2, 2], 0, 16), "b": f32([2, 2], 8, 24)}, bytes(24)),
                                "overlaps|leaves a hole"),
        "hole_between": (st_bytes({"a": f32([2], 0, 8), "b": f32([2], 12, 20)}, bytes(20)), "hole"),
        "offsets_past_end": (st_bytes({"a": f32([250], 0, 1000)}, d16), "outside"),
        "begin_after_end": (st_bytes({"a": f32([4], 16, 0)}, d16), "outside"),
        "negative_offset": (st_bytes({"a": f32([4], -16, 0)}, d16), "outside"),
        "float_offsets": (st_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}}, d16),
                          "two integers"),
        "bool_offsets": (st_bytes({"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, b"x"),
                         "two integers"),
        "three_offsets": (st_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8, 16]}}, d16),
                          "two integers"),
        "offset_5000_digits": (st_bytes(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,1' + b"0" * 5000
                                        + b"]}}", d16), "invalid JSON|outside"),
        "nan_offset": (st_bytes(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,NaN]}}', d16), "NaN is not JSON"),
        "shape_product_overflow": (st_bytes({"a": f32([2**62, 2**62], 0, 16)}, d16), "more bytes"),
        "shape_overflow_behind_zero": (st_bytes({"a": f32([0, 2**62, 2**62], 0, 0)}), "overflows"),
        "shape_dim_over_u64": (st_bytes({"a": f32([0, 2**70], 0, 0)}), "overflows"),
        "negative_dim": (st_bytes({"a": f32([-4], 0, 16)}, d16), "non-negative"),
        "float_dim": (st_bytes({"a": f32([4.0], 0, 16)}, d16), "non-negative"),
        "bool_dim": (st_bytes({"a": f32([True, 4], 0, 16)}, d16), "non-negative"),
        "nested_dim": (st_bytes({"a": f32([[4]], 0, 16)}, d16), "non-negative"),
        "shape_not_list": (st_bytes({"a": f32("4", 0, 16)}, d16), "shape must be"),
        "length_mismatch": (st_bytes({"a": f32([2, 2], 0, 12)}, bytes(16)), "needs 16 bytes"),
        "unknown_dtype": (st_bytes({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, d16),
                          "unknown dtype"),
        "dtype_not_string": (st_bytes({"a": {"dtype": 4, "shape": [1], "data_offsets": [0, 4]}}, d16[:4]),
                             "unknown dtype"),
        "missing_dtype": (st_bytes({"a": {"shape": [1], "data_offsets": [0, 4]}}, d16[:4]), "unknown dtype"),
        "extra_field": (st_bytes({"a": {**f32([4], 0, 16), "offset": 0}}, d16), "unknown fields"),
        "entry_not_object": (st_bytes({"a": 5}), "must be an object"),
        "metadata_not_object": (st_bytes({"__metadata__": ["x"]}), "__metadata__"),
        "metadata_value_not_string": (st_bytes({"__metadata__": {"k": 1}}), "__metadata__"),
        "trailing_bytes": (st_bytes(ok, d16 + b"extra"), "trailing"),
        "truncated_data": (st_bytes(ok, d16[:10]), "outside|shorter"),
    }


def _indexes() -> dict[str, tuple[object, str]]:
    """name -> (index document or raw bytes, regex the error must match)."""
    def wm(name) -> dict:
        return {"metadata": {}, "weight_map": {"a": SHARD, "b": name}}

    escape = "escapes|non-empty file names"
    odd = "one of \\? # %, which shard file names may not"
    return {
        "parent_dir": (wm("../secret.safetensors"), escape),
        "absolute_path": (wm("/etc/passwd"), escape),
        "dot_dot_inside": (wm("sub/../../x.safetensors"), escape),
        "dot_segment_then_parent": (wm("./../x.safetensors"), escape),
        "other_host_url": (wm("http://evil.example/x.safetensors"), escape),
        "scheme_relative_host": (wm("//evil.example/x.safetensors"), escape),
        "file_url": (wm("file:///etc/passwd"), escape),
        "windows_drive": (wm("C:\\x.safetensors"), escape),
        "backslash_escape": (wm("sub\\..\\..\\x.safetensors"), escape),
        "percent_encoded_dots": (wm("%2e%2e/x.safetensors"), odd),
        "query_string": (wm("x.safetensors?X-Amz-Signature=1"), odd),
        "fragment": (wm("x.safetensors#f"), odd),
        "nul_byte": (wm("x\x00.safetensors"), odd),
        "newline": (wm("x\n.safetensors"), odd),
        "empty_name": (wm(""), escape),
        "name_not_string": (wm(5), escape),
        "trailing_slash": (wm("sub/"), "names a directory"),
        "weight_map_missing": ({"metadata": {}}, "weight_map"),
        "weight_map_empty": ({"weight_map": {}}, "weight_map"),
        "weight_map_list": ({"weight_map": [SHARD]}, "weight_map"),
        "metadata_list": ({"metadata": [], "weight_map": {"a": SHARD}}, "metadata"),
        "index_not_json": (b"{", "invalid JSON"),
        "index_not_utf8": (b'{"weight_map": {"a": "\xff"}}', "UTF-8"),
        "index_deeply_nested": (b'{"metadata":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        "index_duplicate_key": (b'{"weight_map": {"a": "x.safetensors"}, "weight_map": {"a": "y.safetensors"}}',
                                "duplicate"),
        "too_many_shards": ({"weight_map": {f"t{i}": f"s{i}.safetensors" for i in range(10_001)}}, "shard files"),
        "tensor_not_in_its_shard": ({"weight_map": {"a": SHARD, "ghost": SHARD}}, "weight_map puts 1 tensor.* no shard holds it"),
    }


def case_names() -> list[str]:
    """The names ``write_corpus`` gives its cases, without writing anything."""
    return list(_files()) + [f"index_{name}" for name in _indexes()] + ["index_over_64MiB"]


def write_corpus(directory: Path) -> list[Case]:
    """Write every case under ``directory``; returns them in a stable order."""
    directory = Path(directory)
    cases = []
    files = directory / "files"
    files.mkdir(parents=True, exist_ok=True)
    for name, (data, match) in _files().items():
        path = files / f"{name}.safetensors"
        path.write_bytes(data)
        cases.append(Case(name, path, match, "file"))
    valid_shard = st_bytes({"a": f32([2, 2], 0, 16)}, bytes(range(16)))
    for name, (doc, match) in _indexes().items():
        ckpt = directory / "indexes" / name
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / SHARD).write_bytes(valid_shard)
        raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        (ckpt / "model.safetensors.index.json").write_bytes(raw)
        cases.append(Case(f"index_{name}", ckpt, match, "index"))
    oversized = directory / "indexes" / "index_over_64MiB"
    oversized.mkdir(parents=True, exist_ok=True)
    (oversized / SHARD).write_bytes(valid_shard)
    with open(oversized / "model.safetensors.index.json", "wb") as f:
        f.truncate((64 << 20) + 1)  # sparse: costs no disk
    cases.append(Case("index_over_64MiB", oversized, "larger than", "index"))
    return cases


if __name__ == "__main__":
    for case in write_corpus(Path(sys.argv[1] if len(sys.argv) > 1 else "attack-corpus")):
        print(f"{case.kind:5}  {case.name:32}  {case.path}")
