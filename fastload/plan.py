"""The load plan: pure data, built from headers without I/O.

A plan lists the files, the tensors to produce (with their output shapes when
sharded) and the chunk reads that produce them. Each :class:`ChunkRead` is one
ranged read ``[start, end)`` of one file, carrying the :class:`Piece`s that map
its source bytes onto output-tensor bytes. Chunks are at most ``chunk_bytes``
long; neighbouring small tensors are coalesced into one chunk; bytes of tensors
that were not asked for are never inside a chunk.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

from .config import LoadConfig, is_int
from .errors import ConfigError, FormatError
from .format import FileHeader, ShardIndex, TensorSpec
from .redact import columns, pad, printable, redact_url
from .sources import ObjectInfo


NAME_COLUMN = 60  # the tensor tables' name column: longer names overflow their row, the others stay aligned
MIN_SPLIT = 1 << 20  # chunks are not cut finer than this to spread a small load over the readers


@dataclass(frozen=True)
class Shard:
    """Tensor-parallel slice: this rank gets ``full.tensor_split(world_size, dim)[rank]``.

    ``rules`` maps regular expressions (``re.search``, first match wins) to the
    split dimension; tensors matching no rule are loaded whole.
    """

    rank: int
    world_size: int
    rules: Sequence[tuple[str, int]] | Mapping[str, int] = ()

    def __post_init__(self) -> None:
        if not (is_int(self.world_size) and self.world_size >= 1):
            raise ConfigError(f"Shard.world_size must be an int >= 1, got {self.world_size!r}")
        if not (is_int(self.rank) and 0 <= self.rank < self.world_size):
            raise ConfigError(f"Shard.rank must be an int in [0, {self.world_size}), got {self.rank!r}")
        # numpy's or torch's ints (a rank read from an array) are taken as LoadConfig takes them, stored as int
        object.__setattr__(self, "world_size", int(self.world_size))
        object.__setattr__(self, "rank", int(self.rank))
        if isinstance(self.rules, (str, bytes)):
            raise ConfigError("Shard.rules must map patterns to dims, e.g. {r'q_proj': 0}, not a string")
        try:
            rules = tuple(self.rules.items()) if isinstance(self.rules, Mapping) else tuple(self.rules)
        except TypeError:
            raise ConfigError(f"Shard.rules must map patterns to dims, e.g. {{r'q_proj': 0}}, got {self.rules!r}") \
                from None
        for rule in rules:
            if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
                raise ConfigError(f"Shard rule {rule!r} is not a (pattern, dim) pair")
            pattern, dim = rule
            if not isinstance(pattern, str):
                raise ConfigError(f"Shard rule pattern must be a str, got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"Shard rule {pattern!r} is not a valid regular expression: {exc}") from None
            if not is_int(dim):
                raise ConfigError(f"Shard rule {pattern!r}: split dim must be an int, got {dim!r}")
        object.__setattr__(self, "rules", tuple((pattern, int(dim)) for pattern, dim in rules))

    def dim_for(self, name: str) -> int | None:
        for pattern, dim in self.rules:
            if re.search(pattern, name):
                return dim
        return None


def split_bounds(size: int, parts: int, index: int) -> tuple[int, int]:
    """Bounds of ``index``-th part as ``torch.tensor_split`` cuts ``size`` into ``parts``."""
    base, extra = divmod(size, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class Piece:
    """Bytes of one output tensor in one file: ``rows`` runs of ``length`` bytes, ``stride`` apart in the file
    from ``src`` and back to back in the output from ``dst``. A tensor split on a dimension other than its first
    is one strided piece (a row per index of the dimensions before it), not one piece per row."""

    tensor: int  # index into LoadPlan.tensors
    src: int  # absolute offset in the file
    length: int  # bytes of one row
    dst: int  # byte offset in the output tensor (stored dtype)
    rows: int = 1
    stride: int = 0  # file bytes from one row's start to the next (rows > 1 only)

    @property
    def nbytes(self) -> int:
        """Bytes this piece puts in its tensor."""
        return self.rows * self.length

    @property
    def end(self) -> int:
        """End of the file span the piece lies in (its last row's end)."""
        return self.src + (self.rows - 1) * self.stride + self.length

    def row_starts(self) -> range:
        """File offset of each row."""
        return range(self.src, self.src + self.rows * self.stride, self.stride) if self.rows > 1 \
            else range(self.src, self.src + 1)


@dataclass(frozen=True)
class ChunkRead:
    id: int
    file: int
    start: int
    end: int
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the file span the chunk reads (gaps between its pieces included)."""
        return self.end - self.start

    @property
    def payload(self) -> int:
        """Bytes the chunk puts in tensors (stored dtype)."""
        return sum(p.nbytes for p in self.pieces)


@dataclass(frozen=True)
class PlannedTensor:
    spec: TensorSpec
    shape: tuple[int, ...]  # output shape (the rank's slice when sharded)
    split_dim: int | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.spec.dtype.itemsize


@dataclass(frozen=True)
class PlannedFile:
    info: ObjectInfo
    data_start: int
    metadata: Mapping[str, str] | None


@dataclass(frozen=True)
class LoadPlan:
    files: tuple[PlannedFile, ...]
    tensors: tuple[PlannedTensor, ...]
    chunks: tuple[ChunkRead, ...]
    chunk_bytes: int
    index_metadata: Mapping[str, object] = field(default_factory=dict)

    @property
    def metadata(self) -> Mapping[str, str] | None:
        """The ``__metadata__`` of the first file (shards normally carry the same)."""
        return self.files[0].metadata if self.files else None

    @property
    def total_bytes(self) -> int:
        """Bytes the chunk reads span in the sources: gaps inside a sharded tensor's span included, which
        streams read across. A local file skips them where a tensor's rows lie more than 64 KiB apart
        (``sinks.base.SPAN_STRIDE``), and then reads less."""
        return sum(c.nbytes for c in self.chunks)

    @property
    def output_bytes(self) -> int:
        """Bytes of the loaded tensors as stored (what ``progress`` counts up to)."""
        return sum(t.nbytes for t in self.tensors)

    def to_dict(self) -> dict:
        return {
            "files": [{"url": f.info.url, "size": f.info.size, "etag": f.info.etag, "data_start": f.data_start,
                       "metadata": dict(f.metadata) if f.metadata else None} for f in self.files],
            "tensors": [{"name": t.name, "dtype": t.spec.dtype.name, "shape": list(t.shape),
                         "stored_shape": list(t.spec.shape), "split_dim": t.split_dim, "file": t.spec.file,
                         "start": t.spec.start, "end": t.spec.end} for t in self.tensors],
            "chunks": [{"id": c.id, "file": c.file, "start": c.start, "end": c.end,
                        "pieces": [[p.tensor, p.src, p.length, p.dst] + ([p.rows, p.stride] if p.rows > 1 else [])
                                   for p in c.pieces]} for c in self.chunks],
            "chunk_bytes": self.chunk_bytes,
            "total_bytes": self.total_bytes,
            "output_bytes": self.output_bytes,
            "index_metadata": dict(self.index_metadata),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **{"allow_nan": False, **kwargs})  # NaN/Infinity are not JSON

    def __str__(self) -> str:
        lines = [f"{len(self.files)} file(s), {len(self.tensors)} tensor(s), {len(self.chunks)} chunk(s), "
                 f"{self.total_bytes / 1e6:.1f} MB to fetch"]
        for f in self.files:
            lines.append(f"  file {printable(redact_url(f.info.url))}  {f.info.size} bytes")
        names = [printable(t.name) for t in self.tensors]
        width = min(max([len("name")] + [columns(n) for n in names]), NAME_COLUMN)  # longer names overflow their row
        lines.append(f"  {pad('name', width)}  {'dtype':<8} {'shape':<20} {'file':>4} {'bytes':>14}")
        for name, t in zip(names, self.tensors):
            shape = "x".join(map(str, t.shape)) or "scalar"
            lines.append(f"  {pad(name, width)}  {t.spec.dtype.name:<8} {shape:<20} {t.spec.file:>4} {t.nbytes:>14}")
        return "\n".join(lines)


def _runs(index: int, t: PlannedTensor, shard: Shard | None) -> list[Piece]:
    """Contiguous source runs of one tensor that make up its output, in source order."""
    spec = t.spec
    if t.nbytes == 0:
        return []
    if t.split_dim is None:
        return [Piece(index, spec.start, spec.nbytes, 0)]
    d = t.split_dim
    lo, hi = split_bounds(spec.shape[d], shard.world_size, shard.rank)
    inner = math.prod(spec.shape[d + 1:]) * spec.dtype.itemsize
    outer = math.prod(spec.shape[:d])
    width = (hi - lo) * inner
    if width == spec.shape[d] * inner:  # the whole dim: one run
        return [Piece(index, spec.start, spec.nbytes, 0)]
    if outer == 1:
        return [Piece(index, spec.start + lo * inner, width, 0)]
    return [Piece(index, spec.start + lo * inner, width, 0, rows=outer, stride=spec.shape[d] * inner)]


def _planned(spec: TensorSpec, shard: Shard | None) -> PlannedTensor:
    dim = shard.dim_for(spec.name) if shard else None
    if dim is None:
        return PlannedTensor(spec, spec.shape)
    ndim = len(spec.shape)
    if not -ndim <= dim < ndim:
        raise ConfigError(f"Shard rule for {spec.name!r}: dim {dim} out of range for shape {list(spec.shape)}")
    dim %= ndim
    lo, hi = split_bounds(spec.shape[dim], shard.world_size, shard.rank)
    return PlannedTensor(spec, spec.shape[:dim] + (hi - lo,) + spec.shape[dim + 1:], dim)


def _cut(run: Piece, chunk_bytes: int) -> Iterator[Piece]:
    """``run`` in pieces whose file span fits in a chunk: a long row in chunk-size parts, a strided run in groups
    of as many rows as fit."""
    if run.rows > 1 and run.stride + run.length <= chunk_bytes:  # two rows or more fit: groups of rows
        per = (chunk_bytes - run.length) // run.stride + 1
        for first in range(0, run.rows, per):
            rows = min(per, run.rows - first)
            yield Piece(run.tensor, run.src + first * run.stride, run.length, run.dst + first * run.length,
                        rows=rows, stride=run.stride if rows > 1 else 0)
        return
    for row, src in enumerate(run.row_starts()):  # each row alone, a long one in parts
        dst = run.dst + row * run.length
        for offset in range(0, run.length, chunk_bytes):
            yield Piece(run.tensor, src + offset, min(chunk_bytes, run.length - offset), dst + offset)


def _chunks(runs: list[Piece], file: int, chunk_bytes: int, first_id: int) -> list[ChunkRead]:
    chunks: list[ChunkRead] = []
    pieces: list[Piece] = []

    def close() -> None:
        if pieces:
            chunks.append(ChunkRead(first_id + len(chunks), file, pieces[0].src, pieces[-1].end, tuple(pieces)))
            pieces.clear()

    for run in runs:
        if pieces and run.rows == 1 and run.src == pieces[-1].end:
            # A contiguous run right after the open chunk first fills it (to a multiple of 8 bytes, whole
            # elements of any dtype), then goes on in chunk-size parts: 1.2 MB tensors at 1 MiB chunks take
            # ten reads, not a 1 MiB read and a tail read each.
            free = chunk_bytes - (pieces[-1].end - pieces[0].src)
            room = free // 8 * 8
            if run.length > free and room > 0:  # (a run that fits stays whole)
                pieces.append(Piece(run.tensor, run.src, room, run.dst))
                run = Piece(run.tensor, run.src + room, run.length - room, run.dst + room)
        for piece in _cut(run, chunk_bytes):
            if pieces:
                prev = pieces[-1]
                gap = piece.src - prev.end
                same_tensor_gap = gap == 0 or prev.tensor == piece.tensor  # gaps only inside one tensor's span
                if not same_tensor_gap or piece.end - pieces[0].src > chunk_bytes:
                    close()
            pieces.append(piece)
    close()
    return chunks


def build_plan(
    headers: Sequence[FileHeader],
    files: Sequence[ObjectInfo],
    *,
    config: LoadConfig,
    names: Sequence[str] | None = None,
    shard: Shard | None = None,
    indexes: Sequence[tuple[int, ShardIndex]] = (),
) -> LoadPlan:
    specs: dict[str, TensorSpec] = {}
    for header in headers:
        for spec in header.tensors:
            if spec.name in specs:
                raise FormatError(f"tensor {spec.name!r} appears in both {files[specs[spec.name].file].url} "
                                  f"and {header.url}")
            specs[spec.name] = spec
    for first, index in indexes:
        # The files were resolved from the index, in ``index.files`` order from ``first`` on: compare whole
        # relative paths, so that ``a/w.safetensors`` never stands in for ``b/w.safetensors``.
        file_of = {first + i: name for i, name in enumerate(index.files)}
        missing = [n for n, fname in index.weight_map.items()
                   if n not in specs or file_of.get(specs[n].file) != fname]
        if missing:
            where = [f"{n!r} in {index.weight_map[n]} but "
                     + (f"it is in {redact_url(files[specs[n].file].url)}" if n in specs else "no shard holds it")
                     for n in missing[:5]]
            raise FormatError(f"{redact_url(index.url) or 'index'}: weight_map puts {len(missing)} tensor(s) where "
                              f"they are not: {'; '.join(where)}" + (" ..." if len(missing) > 5 else ""))
    if names is not None:
        wanted = list(dict.fromkeys(names))
        unknown = [n for n in wanted if n not in specs]
        if unknown:
            raise ConfigError(f"{len(unknown)} unknown tensor name(s): {unknown[:20]} (checkpoint {_where(files)})")
        chosen = [specs[n] for n in wanted]
    else:
        chosen = list(specs.values())
    chosen.sort(key=lambda s: (s.file, s.start))
    tensors = tuple(_planned(s, shard) for s in chosen)
    runs_of: list[list[Piece]] = [[] for _ in files]  # one pass: a 1000-shard index must not cost files x tensors
    for i, t in enumerate(tensors):
        runs_of[t.spec.file] += _runs(i, t, shard)
    chunk_bytes = chunk_size(sum(r.end - r.src for runs in runs_of for r in runs), config)  # the spans read
    chunks: list[ChunkRead] = []
    for file, runs in enumerate(runs_of):
        chunks += _chunks(runs, file, chunk_bytes, len(chunks))
    planned_files = tuple(PlannedFile(f, h.data_start, h.metadata) for f, h in zip(files, headers))
    # An index's metadata (total_size, ...) describes the load only when that index named every file of it.
    whole = len(indexes) == 1 and indexes[0][0] == 0 and len(indexes[0][1].files) == len(files)
    metadata = dict(indexes[0][1].metadata) if whole else {}
    return LoadPlan(planned_files, tensors, tuple(chunks), chunk_bytes, metadata)


def _where(files: Sequence[ObjectInfo]) -> str:
    """The checkpoint a message is about: its file, or its first file and how many more."""
    if not files:
        return "with no files"
    first = redact_url(files[0].url)
    return first if len(files) == 1 else f"{first} and {len(files) - 1} more file(s)"


def chunk_size(total_bytes: int, config: LoadConfig) -> int:
    """``config.chunk_bytes``, or less when a load is too small to give each of ``max_concurrency``
    readers a chunk of that size (never below ``MIN_SPLIT``): a 90 MB model is still read in about 16 ranges.
    """
    if config.chunk_bytes <= MIN_SPLIT:
        return config.chunk_bytes
    share = -(-total_bytes // config.max_concurrency)
    return min(config.chunk_bytes, max(MIN_SPLIT, -(-share // MIN_SPLIT) * MIN_SPLIT))
