"""Deterministic, real safetensors checkpoints for tests.

Everything is written with ``safetensors.torch.save_file`` so the files are the
reference format, not a re-implementation of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save, save_file

# safetensors dtype name -> torch dtype attribute.  Entries the installed torch
# or safetensors cannot save are skipped by ``saveable_dtypes``.
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}

# Odd shapes every dtype is written in: scalars, empties, a prime-ish 3-D block
# and a length that is not a multiple of any usual alignment.
SHAPES: dict[str, tuple[int, ...]] = {
    "scalar": (),
    "one": (1,),
    "empty": (0,),
    "empty_0x4": (0, 4),
    "empty_4x0x3": (4, 0, 3),
    "block_3x5x7": (3, 5, 7),
    "vector_1023": (1023,),
}


def saveable_dtypes() -> dict[str, torch.dtype]:
    """The safetensors dtypes that this torch + safetensors can write."""
    found = {}
    for name, attr in SAFETENSORS_DTYPES.items():
        dtype = getattr(torch, attr, None)
        if dtype is None:
            continue
        try:
            save({"probe": torch.zeros(1, dtype=dtype)})
        except Exception:  # noqa: BLE001 - unsupported by this safetensors
            continue
        found[name] = dtype
    return found


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype,
                  generator: torch.Generator) -> torch.Tensor:
    """Seeded values that exercise every byte of the dtype where possible."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype.is_complex:
        return torch.randn(shape, generator=generator, dtype=dtype)
    if dtype.is_floating_point:
        values = torch.randn(shape, generator=generator, dtype=torch.float32) * 4
        if dtype == getattr(torch, "float8_e8m0fnu", None):
            values = values.abs() + 2.0**-10  # only positive powers of two
        return values.to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(low, high, shape, generator=generator, dtype=torch.int64).to(dtype)


def all_dtypes_tensors(seed: int = 0,
                       dtypes: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """One tensor per (saveable dtype, odd shape), named ``"<dtype>.<shape>"``.

    ``dtypes`` limits it to some safetensors dtype names (e.g. ``["F32", "BF16"]``).
    """
    available = saveable_dtypes()
    chosen = available if dtypes is None else {name: available[name] for name in dtypes}
    generator = torch.Generator().manual_seed(seed)
    return {
        f"{dtype_name}.{shape_name}": random_tensor(shape, dtype, generator)
        for dtype_name, dtype in chosen.items()
        for shape_name, shape in SHAPES.items()
    }


def llama_like_tensors(layers: int = 2, hidden: int = 64, intermediate: int = 176,
                       vocab: int = 256, heads: int = 4, kv_heads: int = 2, seed: int = 0,
                       dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A tiny Llama state dict with the names ``transformers`` uses."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (hidden, hidden),
            f"{p}.self_attn.k_proj.weight": (kv, hidden),
            f"{p}.self_attn.v_proj.weight": (kv, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, hidden),
            f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.mlp.gate_proj.weight": (intermediate, hidden),
            f"{p}.mlp.up_proj.weight": (intermediate, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, intermediate),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    generator = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(shape, generator=generator) * 0.02).to(dtype)
            for name, shape in shapes.items()}


def llama_config(layers: int = 2, hidden: int = 64, intermediate: int = 176, vocab: int = 256,
                 heads: int = 4, kv_heads: int = 2) -> dict[str, object]:
    """A ``config.json`` body matching ``llama_like_tensors`` with the same sizes."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def chunky_tensors(seed: int, layers: int, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """f32 ``layer{i}.weight`` tensors of ``shape`` (several 64 KiB chunks each), a bf16 and an int64 one:
    a small checkpoint whose trace has something to say."""
    g = torch.Generator().manual_seed(seed)
    tensors = {f"layer{i}.weight": torch.randn(*shape, generator=g) for i in range(layers)}
    tensors["norm.weight"] = torch.randn(1000, generator=g).to(torch.bfloat16)
    tensors["positions"] = torch.arange(5000, dtype=torch.int64)
    return tensors


def write_single(path: Path, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> Path:
    """Write one ``.safetensors`` file; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def write_sharded(directory: Path, tensors: dict[str, torch.Tensor], n_shards: int,
                  metadata: dict[str, str] | None = None) -> Path:
    """Split ``tensors`` (in order, about evenly by count) over ``n_shards`` files.

    Also writes ``model.safetensors.index.json`` the way ``transformers`` does.
    Returns ``directory``.
    """
    if not 1 <= n_shards <= len(tensors):
        raise ValueError(f"cannot split {len(tensors)} tensors into {n_shards} shards")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map: dict[str, str] = {}
    for shard in range(n_shards):
        part = names[shard * len(names) // n_shards:(shard + 1) * len(names) // n_shards]
        filename = shard_name(shard + 1, n_shards)
        save_file({n: tensors[n] for n in part}, str(directory / filename), metadata=metadata)
        weight_map |= {n: filename for n in part}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return directory


def seeded_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Three small tensors (float32, int64, bfloat16) named after ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {f"a{seed}": torch.randn(300, generator=g), f"b{seed}": torch.arange(13, dtype=torch.int64) * seed,
            f"c{seed}": torch.randn(4, 6, generator=g).to(torch.bfloat16)}


def seeded_file(tmp_path: Path, seed: int) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A safetensors file of :func:`seeded_tensors` under ``tmp_path``: its bytes, and safetensors' reading of it."""
    from safetensors.torch import load_file

    path = tmp_path / f"f{seed}-{os.urandom(3).hex()}.safetensors"
    save_file(seeded_tensors(seed), str(path))
    return path.read_bytes(), load_file(str(path))


def same_size_other_bytes(data: bytes) -> bytes:
    """The same safetensors file (same header, same size) with every tensor byte changed."""
    start = 8 + int.from_bytes(data[:8], "little")
    return data[:start] + bytes((b ^ 0x5A) for b in data[start:])


def files_under(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but hidden ones (``.fastload/``), by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.relative_to(root).as_posix().startswith(".")}


def evict(path, offset: int = 0, length: int = 0) -> None:
    """Drop ``[offset, offset + length)`` of a file (all of it by default) from the page cache; it works
    on these machines. The fsync first: a file just written has dirty pages, which DONTNEED keeps."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
