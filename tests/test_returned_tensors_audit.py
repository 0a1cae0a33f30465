"""Audit: the tensors fastload returns behave exactly like tensors torch itself makes (``torch.empty``), on every
path: ``load``, ``stream``, ``aload``, ``dtype=``, ``shard=`` (dim 0 and dim 1), ``direct_io``, HTTP, S3 and the
parameters of ``from_pretrained``.

Covered elsewhere (not repeated): storage size == bytes and no shared storages (test_contract, test_shard,
test_mixed_sources_audit, test_combinations_oracle_audit), tied storages of from_pretrained
(test_from_pretrained_memory_audit). Here: the storage's ``resizable()`` flag and ``resize_`` (torch's own
``out=`` growth), default strides of 0-d / zero-element tensors, ``requires_grad``, ``is_pinned``, 64-byte
alignment, numpy writability, pickle / ``torch.save`` round trips, a ``torch.multiprocessing`` queue,
``share_memory_``, memory released on ``del``, and writes into one result never reaching another.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastload
from checkpoints import llama_config, llama_like_tensors, write_single

PATHS = ["load", "stream", "aload", "f16", "f32", "direct_io", "shard0", "shard1", "http", "s3"]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0),
        "zero_dim": torch.empty(4, 0, 3),
        "flags": torch.tensor([True, False, True]),
        "odd16": torch.randn(7, 5, generator=g).to(torch.float16),
        "w": torch.randn(64, 48, generator=g),
        "i8": torch.arange(13, dtype=torch.int8),
        "bf": torch.randn(33, 17, generator=g).to(torch.bfloat16),
        "big": torch.randn(256, 1024, generator=g),
    }


SPLIT = ["w", "bf", "odd16", "big"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_single(tmp_path_factory.mktemp("ret") / "m.safetensors", _tensors())


def _load(how: str, path: Path, request) -> dict[str, torch.Tensor]:
    if how == "load":
        return fastload.load(path)
    if how == "stream":
        with fastload.stream(path) as s:
            return dict(s)
    if how == "aload":
        return asyncio.run(fastload.aload(path))
    if how == "f16":
        return fastload.load(path, dtype=torch.float16)
    if how == "f32":
        return fastload.load(path, dtype=torch.float32)
    if how == "direct_io":
        return fastload.load(path, config=fastload.LoadConfig(direct_io=True))
    if how in ("shard0", "shard1"):
        dim = int(how[-1])
        got = {}
        for rank in (0, 1):
            part = fastload.load(path, names=SPLIT, shard=fastload.Shard(rank, 2, {n: dim for n in SPLIT}))
            got |= {f"{n}@{rank}": t for n, t in part.items()}
        return got
    if how == "http":
        server, where = request.getfixturevalue("http_server"), request.getfixturevalue("http_dir")
        target = where / path.name
        target.write_bytes(path.read_bytes())
        return fastload.load(server.url_for(target))
    if how == "s3":
        s3, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        s3.put(bucket, path.name, path.read_bytes())
        return fastload.load(f"s3://{bucket}/{path.name}")
    raise AssertionError(how)


def _torch_made(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype)


@pytest.mark.parametrize("how", PATHS)
def test_storage_resizable_and_resize_like_torch_empty(checkpoint, request, how):
    """``torch.empty``'s storage is resizable: ``t.resize_(bigger)`` and ``torch.cat(..., out=t)`` grow it in place.
    A returned tensor must take the same calls."""
    got = _load(how, checkpoint, request)
    not_resizable = sorted(n for n, t in got.items()
                           if t.untyped_storage().resizable() != _torch_made(t).untyped_storage().resizable())
    assert not_resizable == [], f"{how}: storages not resizable as torch.empty's are: {not_resizable}"
    for name, t in got.items():
        want = t.clone()
        t.resize_(t.numel() * 2 + 8)  # grows the storage, as torch does for an out= argument
        assert torch.equal(t[:want.numel()].view(want.shape), want), (how, name)


@pytest.mark.parametrize("how", PATHS)
def test_layout_grad_pinned_and_alignment_like_torch(checkpoint, request, how):
    got = _load(how, checkpoint, request)
    pointers = set()
    for name, t in got.items():
        ref = _torch_made(t)
        assert t.is_contiguous() and t.stride() == ref.stride(), (how, name, t.stride(), ref.stride())
        assert t.storage_offset() == 0, (how, name)
        assert t.untyped_storage().nbytes() == t.nbytes, (how, name)
        assert t.requires_grad is False and t.grad_fn is None and t.is_leaf, (how, name)
        assert t.is_pinned() is False and t.device.type == "cpu", (how, name)
        assert not t.is_shared(), (how, name)
        if t.numel():
            assert t.data_ptr() % 64 == 0, (how, name, t.data_ptr() % 64)  # torch's CPU allocator: 64 bytes
            assert t.untyped_storage().data_ptr() not in pointers, (how, name)
            pointers.add(t.untyped_storage().data_ptr())


@pytest.mark.parametrize("how", ["load", "f16", "shard1", "http"])
def test_numpy_pickle_and_torch_save_round_trips(checkpoint, request, how):
    got = _load(how, checkpoint, request)
    for name, t in got.items():
        if t.dtype != torch.bfloat16:
            a = t.numpy()
            assert a.flags.writeable and a.flags.c_contiguous, (how, name)
            if a.size:
                a.reshape(-1)[0] = a.reshape(-1)[-1]
                assert t.reshape(-1)[0] == t.reshape(-1)[-1], (how, name)  # the array is the tensor's memory
        back = pickle.loads(pickle.dumps(t))
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t), (how, name)
        buf = io.BytesIO()
        torch.save(t, buf)
        buf.seek(0)
        again = torch.load(buf)
        assert again.dtype == t.dtype and again.shape == t.shape and torch.equal(again, t), (how, name)
    buf = io.BytesIO()
    torch.save(got, buf)  # a whole state dict: no storages shared by accident, each saved once
    buf.seek(0)
    whole = torch.load(buf)
    assert all(torch.equal(whole[n], got[n]) for n in got)
    assert sum(t.nbytes for t in got.values()) <= len(buf.getvalue()) < sum(t.nbytes for t in got.values()) + 65536


def test_share_memory_and_in_place_ops_like_torch(checkpoint):
    got = fastload.load(checkpoint)
    for name, t in got.items():
        if t.dtype.is_floating_point:
            want = t.clone().mul_(2).add_(1)
            t.mul_(2).add_(1)
            assert torch.equal(t, want), name
        t.share_memory_()
        assert t.is_shared() == _torch_made(t).share_memory_().is_shared(), name


def test_pin_memory_fails_or_works_exactly_as_for_torch_made(checkpoint):
    got = fastload.load(checkpoint)
    for name, t in got.items():
        try:
            _torch_made(t).pin_memory()
            expected = None
        except RuntimeError as exc:
            expected = type(exc)
        try:
            pinned = t.pin_memory()
            assert expected is None, name
            assert pinned.is_pinned() and torch.equal(pinned, t), name
        except RuntimeError as exc:
            assert expected is type(exc), (name, exc)


CHILD = textwrap.dedent("""
    import sys, torch, torch.multiprocessing as mp
    import fastload

    def child(q, out):
        got = q.get()
        out.put({n: (t.sum().item() if t.dtype.is_floating_point else int(t.to(torch.int64).sum()), t.is_shared())
                 for n, t in got.items()})
        got["w"].fill_(1.0)  # shared memory: the parent sees this
        out.put("done")

    if __name__ == "__main__":
        ctx = mp.get_context("spawn")
        q, out = ctx.Queue(), ctx.Queue()
        p = ctx.Process(target=child, args=(q, out))
        p.start()
        got = fastload.load(sys.argv[1])
        mine = {n: (t.sum().item() if t.dtype.is_floating_point else int(t.to(torch.int64).sum()))
                for n, t in got.items()}
        q.put(got)
        sums = out.get(timeout=60)
        assert out.get(timeout=60) == "done"
        p.join(30)
        assert p.exitcode == 0, p.exitcode
        assert {n: s for n, (s, _) in sums.items()} == mine, (sums, mine)
        assert all(shared for n, (_, shared) in sums.items() if got[n].numel()), sums  # as torch's: empty ones not
        assert bool((got["w"] == 1.0).all()), "the child's write did not reach the parent's tensor"
        print("OK")
""")


def test_multiprocessing_queue_transfer(checkpoint, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run = subprocess.run([sys.executable, str(script), str(checkpoint)], capture_output=True, text=True, timeout=90)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-3000:]


@pytest.mark.parametrize("how", ["load", "stream", "f16", "shard0", "direct_io"])
def test_writes_into_one_result_reach_no_other_and_no_later_load(checkpoint, request, how):
    first = _load(how, checkpoint, request)
    keep = {n: t.clone() for n, t in first.items()}
    second = _load(how, checkpoint, request)
    for t in first.values():
        if t.numel():
            t.reshape(-1).view(torch.uint8).fill_(0xA5) if t.dtype != torch.bool else t.fill_(True)
    third = _load(how, checkpoint, request)
    for name in keep:
        assert torch.equal(second[name], keep[name]), (how, name)
        assert torch.equal(third[name], keep[name]), (how, name)


RSS = textwrap.dedent("""
    import ctypes, gc, sys, torch, fastload

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    path, how = sys.argv[1], sys.argv[2]
    fastload.load(path, names=["small"])  # warm up: threads, imports
    base = rss()
    for _ in range(3):
        if how == "torch":  # the control: the same tensors made by torch
            got = {n: torch.empty(t.shape).copy_(t) for n, t in fastload.load(path).items()}
            got.pop("small")
        elif how == "stream":
            with fastload.stream(path) as s:
                got = dict(s)
        else:
            got = fastload.load(path, dtype=torch.float16 if how == "f16" else None)
        held = rss()
        del got
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what glibc keeps in its heap (free, reusable) is not a leak
        print(held - base, rss() - base)
""")


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(1)
    # ~210 MB in tensors above glibc's largest mmap threshold (32 MiB): freed memory goes back to the system
    # (in float16 too)
    tensors = {f"layer{i}": torch.randn(1024, 25600, generator=g) for i in range(2)}
    tensors["small"] = torch.ones(4)
    return write_single(tmp_path_factory.mktemp("big") / "big.safetensors", tensors)


@pytest.mark.parametrize("how", ["torch", "load", "stream", "f16"])
def test_del_releases_the_memory(big_checkpoint, tmp_path, how):
    script = tmp_path / "rss.py"
    script.write_text(RSS)
    run = subprocess.run([sys.executable, str(script), str(big_checkpoint), how], capture_output=True, text=True,
                         timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [tuple(int(x) for x in line.split()) for line in run.stdout.split("\n") if line.strip()]
    assert len(rows) == 3
    for held, after in rows:
        assert held > 90 << 20, rows  # the result was in memory
        assert after < 40 << 20, rows  # and is gone once dropped


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for tied in (False, True):
        d = tmp_path_factory.mktemp("tied" if tied else "untied")
        tensors = llama_like_tensors(dtype=torch.float32)
        config = llama_config() | {"tie_word_embeddings": tied, "torch_dtype": "float32"}
        if tied:
            del tensors["lm_head.weight"]
        write_single(d / "model.safetensors", tensors)
        (d / "config.json").write_text(json.dumps(config))
        dirs["tied" if tied else "untied"] = d
    return dirs


@pytest.mark.parametrize("tied", ["untied", "tied"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_from_pretrained_parameters_like_transformers_own(llama_dirs, tied, dtype):
    import transformers
    kwargs = {} if dtype is None else {"dtype": dtype}
    ours = fastload.from_pretrained(llama_dirs[tied], **kwargs)
    theirs = transformers.LlamaForCausalLM.from_pretrained(llama_dirs[tied], **kwargs)
    mine, other = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert mine.keys() == other.keys()
    for name, p in mine.items():
        q = other[name]
        assert (p.requires_grad, p.is_leaf, p.is_contiguous(), p.stride(), p.storage_offset(), p.is_pinned()) == \
               (q.requires_grad, q.is_leaf, q.is_contiguous(), q.stride(), q.storage_offset(), q.is_pinned()), name
        # resizable as torch.empty's (transformers' own, views of its safetensors mmap or numpy, are not)
        assert p.untyped_storage().resizable() or not q.untyped_storage().resizable(), (name, "resizable")
        assert p.untyped_storage().nbytes() == q.untyped_storage().nbytes(), name
        assert p.data_ptr() % 64 == 0, (name, p.data_ptr() % 64)
    if tied == "tied":
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    # a training step works on our parameters as on theirs
    ids = torch.tensor([[1, 2, 3, 4]])
    for model in (ours, theirs):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    for name, p in mine.items():
        assert torch.equal(p, other[name]), name
    gc.collect()
