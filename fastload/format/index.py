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
    weight_map: Mapping[str, str]  # tensor name -> shard path relative to the index (``./`` parts dropped)
    metadata: Mapping[str, object]
    url: str = ""  # where the index was read (for messages)

    @property
    def files(self) -> tuple[str, ...]:
        """Shard files in first-seen order, each once."""
        return tuple(dict.fromkeys(self.weight_map.values()))


def _check_shard_name(name: object, url: str) -> str:
    """``name`` as a plain relative path, ``./`` parts dropped (transformers joins ``./x`` as ``x``, and so
    must we: else ``./x`` and ``x`` would be two files holding the same tensors)."""
    if not isinstance(name, str) or not name:
        raise FormatError(f"{url}: weight_map values must be non-empty file names, got {short(name)}")
    escapes = (
        "://" in name
        or name.startswith(("/", "\\"))
        or "\\" in name
        or (len(name) > 1 and name[1] == ":")
        or ".." in name.split("/")
    )
    if escapes:
        raise FormatError(f"{url}: weight_map entry {short(name)} escapes the checkpoint directory")
    if any(ord(c) < 0x20 or c == "\x7f" or c in "?#%" for c in name):
        # ('%': a percent-escape would decode to another name, even "../", on a server)
        raise FormatError(f"{url}: weight_map entry {short(name)} holds a control character or one of ? # %, "
                          "which shard file names may not")
    if name.endswith("/") or name.split("/")[-1] == ".":
        raise FormatError(f"{url}: weight_map entry {short(name)} names a directory, not a shard file")
    canonical = "/".join(part for part in name.split("/") if part not in ("", "."))
    if not canonical or posixpath.normpath(canonical) != canonical:
        raise FormatError(f"{url}: weight_map entry {short(name)} names no file inside the checkpoint directory")
    return canonical


def parse_index(raw: bytes, *, url: str) -> ShardIndex:
    doc = _load_json(raw, f"{url}: index")
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{url}: index must hold a non-empty 'weight_map' object")
    metadata = doc.get("metadata")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise FormatError(f"{url}: index 'metadata' must be an object")
    canonical: dict[str, str] = {}  # each distinct value is checked once; a map has 10^4 entries, 10^1 files
    for file in weight_map.values():
        if not (isinstance(file, str) and file in canonical):
            canonical[file] = _check_shard_name(file, url)
    shards = len(set(canonical.values()))
    if shards > MAX_SHARDS:
        raise FormatError(f"{url}: index names {shards} shard files, more than the {MAX_SHARDS} allowed")
    return ShardIndex({name: canonical[file] for name, file in weight_map.items()}, metadata, url)
