"""Checkpoint formats: safetensors headers and shard indexes (bytes in, specs out)."""

from .index import INDEX_NAME, SINGLE_NAME, ShardIndex, parse_index
from .safetensors import (
    DTYPES,
    MAX_HEADER_BYTES,
    DType,
    FileHeader,
    TensorSpec,
    header_length,
    parse_header,
    torch_dtype,
)

__all__ = [
    "DTYPES", "MAX_HEADER_BYTES", "DType", "FileHeader", "TensorSpec",
    "header_length", "parse_header", "torch_dtype", "INDEX_NAME", "SINGLE_NAME", "ShardIndex", "parse_index",
]
