"""safetensors header parsing and validation.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of UTF-8 JSON +
the tensor bytes. The JSON maps tensor names to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets relative to the data section) plus an
optional ``"__metadata__"`` string map.

Validation is at least as strict as the reference implementation: the tensors
must tile the data section exactly (sorted, contiguous, no holes, no overlap,
nothing past the end), each tensor's byte length must match dtype x shape, and
any malformed value is a :class:`FormatError` raised in time and memory bounded
by the header cap.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
import struct
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import FormatError

#: Same cap as the reference implementation: a header over 100 MB is hostile.
MAX_HEADER_BYTES = 100_000_000
#: Largest byte extent a shape may span, zero dims counted as one (torch's strides are int64).
MAX_EXTENT = (1 << 63) - 1


@dataclass(frozen=True)
class DType:
    name: str  # safetensors name, e.g. "BF16"
    torch_name: str  # attribute of the torch module, e.g. "bfloat16"
    itemsize: int
    is_float: bool


def _dtypes() -> dict[str, DType]:
    table = [
        ("F64", "float64", 8, True),
        ("F32", "float32", 4, True),
        ("F16", "float16", 2, True),
        ("BF16", "bfloat16", 2, True),
        ("F8_E4M3", "float8_e4m3fn", 1, True),
        ("F8_E5M2", "float8_e5m2", 1, True),
        ("F8_E4M3FNUZ", "float8_e4m3fnuz", 1, True),
        ("F8_E5M2FNUZ", "float8_e5m2fnuz", 1, True),
        ("F8_E8M0", "float8_e8m0fnu", 1, True),
        ("C64", "complex64", 8, False),
        ("I64", "int64", 8, False),
        ("I32", "int32", 4, False),
        ("I16", "int16", 2, False),
        ("I8", "int8", 1, False),
        ("U64", "uint64", 8, False),
        ("U32", "uint32", 4, False),
        ("U16", "uint16", 2, False),
        ("U8", "uint8", 1, False),
        ("BOOL", "bool", 1, False),
    ]
    return {name: DType(name, torch_name, size, is_float) for name, torch_name, size, is_float in table}


DTYPES: Mapping[str, DType] = _dtypes()


def torch_dtype(dtype: DType):
    """The torch dtype for a safetensors dtype (FormatError if this torch lacks it)."""
    import torch

    value = getattr(torch, dtype.torch_name, None)
    if value is None:
        raise FormatError(f"dtype {dtype.name} is not supported by torch {torch.__version__}")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of one file. ``start``/``end`` are absolute file offsets, half-open."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    file: int  # index into the plan's files
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FileHeader:
    url: str
    size: int
    data_start: int  # 8 + N: where the data section begins
    metadata: Mapping[str, str] | None
    tensors: tuple[TensorSpec, ...]  # sorted by start


def header_length(prefix: bytes, *, url: str, file_size: int) -> int:
    """Read and check ``N`` from the first 8 bytes; returns ``8 + N``."""
    if file_size < 8 or len(prefix) < 8:
        raise FormatError(f"{url}: file of {file_size} bytes is too small to be safetensors")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{url}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap")
    if 8 + n > file_size:
        raise FormatError(f"{url}: header length {n} runs past the end of the {file_size}-byte file")
    return 8 + n


def short(value: Any) -> str:
    """A bounded repr of a hostile value for messages (a header may hold a 100 MB string)."""
    return reprlib.repr(value)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # built in C: a header may hold a million entries
    if len(out) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise FormatError(f"duplicate key {short(key)}")
    return out


# JSON that Python reads and the reference (serde_json) refuses, looked for only where the text may hold it:
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape: lone ones are not text
_NEGATIVE_ZERO = re.compile(r"[\[,:]\s*-0")  # -0 is a float to serde_json, never a size or an offset


def _no_constant(name: str) -> float:
    raise FormatError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: valid JSON, out of any float's range (serde_json refuses it too)
        raise FormatError(f"number {text[:40]} out of range")
    return value


def _no_negative_zero(digits: str) -> int:
    if digits == "-0":
        raise FormatError("-0 where an integer is expected")
    return int(digits)


def _load_json(raw: bytes, what: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        value = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_no_constant,
                           parse_float=_finite,
                           parse_int=_no_negative_zero if "-0" in text and _NEGATIVE_ZERO.search(text) else None)
        if "\\u" in text and _SURROGATE_ESCAPE.search(text):
            json.dumps(value, ensure_ascii=False).encode("utf-8")  # a lone surrogate does not encode
    except UnicodeEncodeError:
        raise FormatError(f"{what}: a \\u escape names a lone UTF-16 surrogate, not a character") from None
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from None
    except RecursionError:
        raise FormatError(f"{what}: JSON nested too deeply") from None
    except ValueError as exc:
        raise FormatError(f"{what}: invalid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise FormatError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _metadata(value: Any, url: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise FormatError(f"{url}: __metadata__ must map strings to strings")
    return dict(value)


def _tensor(name: str, entry: Any, *, url: str, file: int, data_start: int, data_len: int) -> TensorSpec:
    def bad(problem: str) -> FormatError:  # the message is built only on failure: headers have 10^4+ tensors
        return FormatError(f"{url}: tensor {short(name)}: {problem}")

    if not isinstance(entry, dict):
        raise bad("entry must be an object")
    unknown = set(entry) - {"dtype", "shape", "data_offsets"}
    if unknown:
        raise bad(f"unknown fields {sorted(unknown)}")
    dtype = DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    if dtype is None:
        raise bad(f"unknown dtype {short(entry.get('dtype'))}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {short(shape)}")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise bad(f"data_offsets must be two integers, got {short(offsets)}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise bad(f"data_offsets [{begin}, {end}) outside the {data_len}-byte data section")
    numel = 0 if 0 in shape else 1  # an empty tensor needs no bytes, whatever its other dims
    for dim in shape:  # stop as soon as the product is impossible: no overflow games
        numel *= dim
        if numel * dtype.itemsize > data_len:
            raise bad(f"shape {short(shape)} needs more bytes than the file holds")
    extent = dtype.itemsize
    for dim in shape:  # an empty tensor's other dims still make strides: they must fit in int64
        extent *= max(dim, 1)
        if extent > MAX_EXTENT:
            raise bad(f"shape {short(shape)} overflows 64-bit sizes")
    if numel * dtype.itemsize != end - begin:
        raise bad(f"{dtype.name}{short(shape)} needs {numel * dtype.itemsize} bytes, data_offsets span {end - begin}")
    return TensorSpec(name, dtype, tuple(shape), file, data_start + begin, data_start + end)


def parse_header(raw: bytes, *, url: str, file_size: int, file: int = 0) -> FileHeader:
    """Parse the JSON header ``raw`` (the N bytes after the length prefix)."""
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    doc = _load_json(raw, f"{url}: header")
    raw_metadata = doc.pop("__metadata__", None)  # null is "no metadata", as the reference reads it
    metadata = _metadata(raw_metadata, url) if raw_metadata is not None else None
    tensors = sorted(
        (_tensor(name, entry, url=url, file=file, data_start=data_start, data_len=data_len) for name, entry in doc.items()),
        key=lambda t: (t.start, t.end),
    )
    cursor = data_start
    for spec in tensors:
        if spec.start != cursor:
            problem = "overlaps the previous tensor" if spec.start < cursor else "leaves a hole before it"
            raise FormatError(f"{url}: tensor {short(spec.name)} at byte {spec.start} {problem} (expected {cursor})")
        cursor = spec.end
    if cursor != file_size:
        raise FormatError(
            f"{url}: tensors cover bytes up to {cursor} but the file has {file_size} "
            f"({'data shorter than the header promises' if cursor > file_size else 'trailing bytes'})"
        )
    return FileHeader(url, file_size, data_start, metadata, tuple(tensors))
