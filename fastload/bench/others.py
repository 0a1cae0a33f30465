"""Loaders from other projects, in the `loaders.py` signature `loader(source, info)`.

Each imports its package when it runs (they are optional: `loaders.missing`
says when one is not installed). Every one returns tensors that own their
memory, so the harness's page touch measures a load a user could keep.

- `load_transformers` — `AutoModelForCausalLM.from_pretrained(dir, dtype="auto")`;
  returns the model's state dict.
- `load_fastload_from_pretrained` — `fastload.from_pretrained(root)` (local, HTTP, S3).
- `load_runai` — Run:ai Model Streamer's `SafetensorsStreamer` (`stream_files`,
  `get_tensors`); S3 through `runai-model-streamer-s3` with explicit credentials.
- `load_fastsafetensors` — `fastsafe_open(files, device="cpu", nogds=True)`:
  without CUDA, GPUDirect Storage is off and it reads with pread into host memory.
- `load_tensorizer` — `TensorDeserializer` on tensorizer's own serialised copy,
  made once by `ensure_tensorizer_copy` (a child process, cached next to the checkpoint).
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

from .loaders import Source, fastload_config, record_trace

TENSORIZER_NAME = "model.tensors"


def load_transformers(source: Source, info: dict) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source.root, dtype="auto")
    return dict(model.state_dict())


def load_fastload_from_pretrained(source: Source, info: dict) -> dict:
    import fastload

    trace = fastload.Trace()
    root = source.root if source.root.endswith("/") else source.root + "/"
    model = fastload.from_pretrained(root, config=fastload_config(source), trace=trace)
    record_trace(trace, info)
    return dict(model.state_dict())


def _runai_credentials(source: Source):
    if source.kind != "s3" or not source.s3:
        return None
    from runai_model_streamer.s3_utils.s3_utils import S3Credentials

    return S3Credentials(access_key_id=source.s3["access_key"], secret_access_key=source.s3["secret_key"],
                         region_name=source.s3.get("region", "us-east-1"), endpoint=source.s3["endpoint"])


def load_runai(source: Source, info: dict) -> dict:
    from runai_model_streamer import SafetensorsStreamer

    paths = [str(p) for p in source.local_paths()] if source.kind == "local" else \
        [source.url(s) for s in source.shards]
    out = {}
    with SafetensorsStreamer() as streamer:
        owned = "owned" in inspect.signature(streamer.stream_files).parameters
        streamer.stream_files(paths, s3_credentials=_runai_credentials(source), device="cpu")
        for name, tensor in streamer.get_tensors():
            # Before `owned` (0.17) every tensor was a view into a buffer the streamer reuses.
            out[name] = tensor if owned else tensor.clone()
    return out


def load_fastsafetensors(source: Source, info: dict) -> dict:
    from fastsafetensors import fastsafe_open

    with fastsafe_open([str(p) for p in source.local_paths()], framework="pt", device="cpu",
                       nogds=True) as f:
        # Tensors share ownership of their file's buffer, so they outlive the context.
        return {name: f.get_tensor(name) for name in f.keys()}


def load_tensorizer(source: Source, info: dict) -> dict:
    from tensorizer import TensorDeserializer
    from tensorizer.stream_io import open_stream

    if not source.tensorizer:
        raise RuntimeError("no tensorizer copy for this source")
    if source.kind == "s3" and source.s3:
        stream = open_stream(source.tensorizer, "rb", s3_access_key_id=source.s3["access_key"],
                             s3_secret_access_key=source.s3["secret_key"],
                             s3_endpoint=source.s3["endpoint"], force_http=True)
    else:
        stream = open_stream(source.tensorizer, "rb")
    with stream, TensorDeserializer(stream, device="cpu") as d:
        return dict(d)


# --- tensorizer's own copy ------------------------------------------------------------------------

def _stamp(shards: list[Path]) -> dict:
    return {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in shards}


def ensure_tensorizer_copy(shards: list[Path], dest: Path, timeout: float = 1800.0) -> Path:
    """Serialise the checkpoint `shards` once into `dest` (tensorizer's format); reuse it while they match.

    The work runs in a child process so this process never holds the checkpoint in memory.
    """
    stamp = dest.with_suffix(".stamp")
    want = _stamp(shards)
    if dest.exists() and stamp.exists() and json.loads(stamp.read_text(encoding="utf-8")) == want:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "fastload.bench.others", str(dest), *map(str, shards)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"serialising for tensorizer failed: {proc.stderr.strip()[-500:]}")
    stamp.write_text(json.dumps(want), encoding="utf-8")
    return dest


def _serialise(dest: Path, shards: list[Path]) -> None:
    from safetensors.torch import load_file
    from tensorizer import TensorSerializer

    state = {}
    for p in shards:
        state.update(load_file(p))
    tmp = dest.with_name(dest.name + ".partial")
    serializer = TensorSerializer(str(tmp))
    serializer.write_state_dict(state)
    serializer.close()
    tmp.replace(dest)


if __name__ == "__main__":  # a child entry point: `others.py DEST SHARD...`, nothing else
    if len(sys.argv) < 3 or any(a.startswith("-") for a in sys.argv[1:]):
        sys.exit("usage: python -m fastload.bench.others DEST SHARD.safetensors... (serialises for tensorizer)")
    _serialise(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
