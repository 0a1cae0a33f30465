"""A load plan as text for people (``fastload inspect``): files, tensors, bytes by dtype, largest tensors, metadata."""

from __future__ import annotations

from collections import defaultdict

from .plan import NAME_COLUMN, LoadPlan
from .redact import columns, pad, printable, redact_url


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def describe(plan: LoadPlan, *, top: int = 10, every_tensor: bool = False) -> str:
    """The plan's summary; ``every_tensor`` appends the full tensor table."""
    data = plan.output_bytes
    lines = [f"{len(plan.files)} file(s), {len(plan.tensors)} tensor(s), {human_bytes(data)} of tensor data "
             f"({data} bytes); {len(plan.chunks)} ranged read(s) of up to {human_bytes(plan.chunk_bytes)}"]

    counts = [0] * len(plan.files)
    for t in plan.tensors:
        counts[t.spec.file] += 1
    lines += ["", "files:"]
    for f, n in zip(plan.files, counts):
        lines.append(f"  {printable(redact_url(f.info.url))}  {human_bytes(f.info.size)}  {n} tensor(s)  "
                     f"header {f.data_start} bytes")

    by_dtype: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t in plan.tensors:
        by_dtype[t.spec.dtype.name][0] += 1
        by_dtype[t.spec.dtype.name][1] += t.nbytes
    lines += ["", "bytes by dtype:"]
    for name, (n, nbytes) in sorted(by_dtype.items(), key=lambda kv: -kv[1][1]):
        share = 100 * nbytes / data if data else 0.0
        lines.append(f"  {name:<12} {n:>7} tensor(s)  {human_bytes(nbytes):>10}  {share:5.1f}%")

    largest = sorted(plan.tensors, key=lambda t: (-t.nbytes, t.name))[:top]
    if largest:
        names = [printable(t.name) for t in largest]
        width = min(max(columns(n) for n in names), NAME_COLUMN)
        lines += ["", f"largest {len(largest)} tensor(s):"]
        for name, t in zip(names, largest):
            lines.append(f"  {pad(name, width)}  {t.spec.dtype.name:<8} {_shape(t.shape):<20} {human_bytes(t.nbytes)}")

    metadata = {}
    for f in plan.files:
        metadata.update(f.metadata or {})
    metadata.update({f"index.{k}": v for k, v in plan.index_metadata.items()})
    lines += ["", "metadata:" if metadata else "metadata: none"]
    for key, value in sorted(metadata.items()):
        text = printable(str(value))
        lines.append(f"  {printable(key)}: {text if len(text) <= 200 else text[:197] + '...'}")

    if every_tensor:
        lines += ["", "tensors:", str(plan)]
    return "\n".join(lines)
