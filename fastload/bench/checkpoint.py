"""Build (or reuse) a Llama-shaped bf16 safetensors checkpoint in two shards.

The shapes follow TinyLlama-1.1B (hidden 2048, MLP 5632, 32 heads, 4 KV heads,
vocab 32000); the layer count is chosen to hit the requested size. At the
default 2.47 GB that is 25 layers. Data is random but every value is a finite
bf16 in (-2, 2). Bytes are generated with numpy in 64 MiB pieces and written
straight to disk, so building needs ~64 MiB of memory, not 2x the checkpoint.

    from fastload.bench.checkpoint import ensure_checkpoint
    ckpt = ensure_checkpoint(2.47)          # cached under ~/.cache/fastload/bench
    ckpt.dir, ckpt.files, ckpt.total_bytes
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

INDEX_NAME = "model.safetensors.index.json"
PIECE_BYTES = 64 << 20
BF16_FINITE_MASK = np.uint64(0xBFFF_BFFF_BFFF_BFFF)  # clear exponent MSB: |x| < 2
FORMAT_VERSION = 1  # bump when the layout changes so stale caches are rebuilt


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 2048
    intermediate: int = 5632
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000
    layers: int = 25

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def nbytes(self) -> int:
        return sum(2 * int(np.prod(s)) for _, s in self.tensors())

    def hf_config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "num_hidden_layers": self.layers,
            "vocab_size": self.vocab,
            "torch_dtype": "bfloat16",
            "tie_word_embeddings": False,
        }


def shape_for_size(size_gb: float) -> LlamaShape:
    """TinyLlama dims with as many layers as fit `size_gb` (at least one).

    Below ~0.35 GB the hidden/MLP/vocab dims are halved until two layers fit,
    so tiny test checkpoints keep the same structure.
    """
    target = size_gb * 1e9
    shape = LlamaShape(layers=1)
    while shape.hidden > 64 and LlamaShape(**{**shape.__dict__, "layers": 2}).nbytes() > target:
        shape = LlamaShape(shape.hidden // 2, shape.intermediate // 2, shape.heads,
                           shape.kv_heads, shape.vocab // 2, 1)
    fixed = LlamaShape(**{**shape.__dict__, "layers": 0}).nbytes()
    per_layer = LlamaShape(**{**shape.__dict__, "layers": 1}).nbytes() - fixed
    layers = max(1, round((target - fixed) / per_layer))
    return LlamaShape(**{**shape.__dict__, "layers": layers})


@dataclass(frozen=True)
class Checkpoint:
    dir: Path
    shards: tuple[str, ...]
    tensor_bytes: int
    shape: LlamaShape = field(default_factory=LlamaShape)

    @property
    def files(self) -> list[Path]:
        """Shard paths (not the index)."""
        return [self.dir / s for s in self.shards]

    @property
    def total_bytes(self) -> int:
        """Bytes of all shard files (headers included): the GB/s denominator."""
        return sum(p.stat().st_size for p in self.files)


def _split(tensors: list[tuple[str, tuple[int, ...]]], n_shards: int) -> list[list]:
    total = sum(2 * int(np.prod(s)) for _, s in tensors)
    shards: list[list] = [[] for _ in range(n_shards)]
    done = 0
    for name, shape in tensors:
        nb = 2 * int(np.prod(shape))
        k = min(n_shards - 1, int((done + nb / 2) * n_shards // total))
        shards[k].append((name, shape))
        done += nb
    return shards


def _header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    meta: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in tensors:
        nb = 2 * int(np.prod(shape))
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_random(f, nbytes: int, rng: np.random.Generator) -> None:
    while nbytes > 0:
        n = min(nbytes, PIECE_BYTES)
        words = rng.integers(0, 2**64 - 1, (n + 7) // 8, dtype=np.uint64, endpoint=True)
        words &= BF16_FINITE_MASK
        f.write(memoryview(words).cast("B")[:n])
        nbytes -= n


def build(dest: Path, shape: LlamaShape, n_shards: int = 2, seed: int = 0) -> Checkpoint:
    """Write shards, index and config.json into `dest`; fsync so eviction works."""
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.Generator(np.random.SFC64(seed))
    names = [f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors" for k in range(n_shards)]
    weight_map = {}
    for fname, tensors in zip(names, _split(shape.tensors(), n_shards)):
        tmp = dest / (fname + ".partial")
        with open(tmp, "wb") as f:
            f.write(_header(tensors))
            for name, shp in tensors:
                _write_random(f, 2 * int(np.prod(shp)), rng)
                weight_map[name] = fname
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(dest / fname)
    index = {"metadata": {"total_size": shape.nbytes()}, "weight_map": weight_map}
    (dest / INDEX_NAME).write_text(json.dumps(index, indent=2))
    (dest / "config.json").write_text(json.dumps(shape.hf_config(), indent=2))
    (dest / "READY").write_text(json.dumps(_stamp(shape, n_shards, seed)))
    return Checkpoint(dest, tuple(names), shape.nbytes(), shape)


def _stamp(shape: LlamaShape, n_shards: int, seed: int) -> dict:
    return {"version": FORMAT_VERSION, "shape": shape.__dict__, "shards": n_shards, "seed": seed}


def default_work_dir() -> Path:
    """Where checkpoints and scratch files go unless told otherwise: ~/.cache/fastload/bench."""
    return Path.home() / ".cache" / "fastload" / "bench"


def ensure_checkpoint(size_gb: float = 2.47, work_dir: Path | None = None,
                      n_shards: int = 2, seed: int = 0) -> Checkpoint:
    """Return the cached checkpoint for `size_gb`, building it if missing or stale."""
    shape = shape_for_size(size_gb)
    dest = Path(work_dir or default_work_dir()) / f"llama-{shape.nbytes() / 1e9:.2f}GB"
    ready = dest / "READY"
    if ready.exists() and json.loads(ready.read_text()) == _stamp(shape, n_shards, seed):
        names = [f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors" for k in range(n_shards)]
        if all((dest / n).exists() for n in names):
            return Checkpoint(dest, tuple(names), shape.nbytes(), shape)
    ready.unlink(missing_ok=True)
    return build(dest, shape, n_shards, seed)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the benchmark checkpoint (a Llama-shaped bf16 model).")
    ap.add_argument("--size-gb", type=float, default=2.47)
    ap.add_argument("--work-dir", type=Path, default=None, help="default ~/.cache/fastload/bench")
    args = ap.parse_args(argv)
    ckpt = ensure_checkpoint(args.size_gb, args.work_dir)
    print(f"{ckpt.dir}: {ckpt.shape.layers} layers, {ckpt.total_bytes / 1e9:.3f} GB in {len(ckpt.files)} shards")


if __name__ == "__main__":
    main()
