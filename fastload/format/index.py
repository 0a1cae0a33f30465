"""``model.safetensors.index.json``: the map from tensor name to shard file."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Mapping

from ..errors import FormatError
from .safetensors import _load_json, short

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: More distinct shard files than any real checkpoint has (the largest have a few hundred):
#: an index naming more would make a load open that many files or requests.
MAX_SHARDS = 10_000


@dataclass(frozen=True)
class ShardIndex:
    weight_map: Mapping[str, str]  # tensor name -> shard path relative to the index
    metadata: Mapping[str, object]

    @property
    def files(self) -> tuple[str, ...]:
        """Shard files in first-seen order, each once."""
        return tuple(dict.fromkeys(self.weight_map.values()))


def _check_shard_name(name: object, url: str) -> str:
    if not isinstance(name, str) or not name:
        raise FormatError(f"{url}: weight_map values must be non-empty file names, got {short(name)}")
    bad = (
        "://" in name
        or name.startswith(("/", "\\"))
        or "\\" in name
        or (len(name) > 1 and name[1] == ":")
        or any(part in ("..", ".") for part in name.split("/"))
        or posixpath.normpath(name) != name
        or any(ord(c) < 0x20 or c == "\x7f" for c in name)  # NUL, newlines, escapes
        or "?" in name
        or "#" in name
        or "%" in name  # percent-escapes decode to "../" on the server
    )
    if bad:
        raise FormatError(f"{url}: weight_map entry {short(name)} escapes the checkpoint directory")
    return name


def parse_index(raw: bytes, *, url: str) -> ShardIndex:
    doc = _load_json(raw, f"{url}: index")
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{url}: index must hold a non-empty 'weight_map' object")
    metadata = doc.get("metadata")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise FormatError(f"{url}: index 'metadata' must be an object")
    shard_names: set[str] = set()  # each distinct file is checked once; a map has 10^4 entries, 10^1 files
    for file in weight_map.values():
        if not (isinstance(file, str) and file in shard_names):
            shard_names.add(_check_shard_name(file, url))
    shards = len(shard_names)
    if shards > MAX_SHARDS:
        raise FormatError(f"{url}: index names {shards} shard files, more than the {MAX_SHARDS} allowed")
    return ShardIndex(dict(weight_map), metadata)
