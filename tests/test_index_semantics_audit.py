"""Index and directory semantics: what a load does when a checkpoint directory's pieces disagree.

The reference is transformers' own sharded loading (``modeling_utils._load_pretrained_model`` and
``utils/hub.get_checkpoint_shard_files``, v5): it opens ``sorted(set(weight_map.values()))``, takes *every*
tensor of each shard (the weight_map decides which files, never which tensors), lets a later shard's copy of
a name silently replace an earlier one, joins shard names with ``os.path.join`` (``./x`` is ``x``) and
ignores ``metadata.total_size``. fastload must load what transformers loads unless it has a clear reason,
and where the data is ambiguous or wrong it must raise a typed ``FormatError`` naming the file at fault,
never pick bytes silently. Covered here, over local, ``file://``, HTTP and S3 where the source kind matters:

- tensors a shard holds beyond the weight_map: the same set in ``plan``, ``load``, ``stream``, ``names=``
  and ``from_pretrained`` (unexpected keys, as transformers reports them);
- a weight_map placing a tensor in the wrong shard: a FormatError that names the index;
- the same tensor in two shards (with an index, and in a listed directory): FormatError naming both;
- weight_map values with a ``./`` prefix and sub-directories; shard and directory names with spaces,
  unicode, ``%``, ``#`` and ``?``, percent-encoded over HTTP (both engines) and verbatim on S3;
- a weight_map naming a shard that does not exist, over HTTP and S3;
- an index plus a stray ``model.safetensors``: ``load`` takes the index, ``from_pretrained`` the single file
  (both documented in README.md);
- a directory without index holding ``*.safetensors`` plus other files and sub-directories: local and S3 alike;
- a list mixing an index directory and a single file that share a tensor name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import fastload
from checkpoints import write_single
from reliability_helpers import QUICK, bounded, dir_source, same_bytes

INDEX = "model.safetensors.index.json"
CFG = QUICK


def _write_index(directory: Path, weight_map: dict[str, str], **extra) -> None:
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map, **extra}))


def _two_shards_with_an_extra(directory: Path) -> dict[str, torch.Tensor]:
    """s1 holds a and ``extra`` (not in the weight_map), s2 holds b and c."""
    g = torch.Generator().manual_seed(7)
    s1 = {"a": torch.randn(3000, generator=g), "extra": torch.arange(777, dtype=torch.int32)}
    s2 = {"b": torch.randn(50, 40, generator=g).to(torch.bfloat16), "c": torch.arange(9, dtype=torch.int64)}
    write_single(directory / "s1.safetensors", s1)
    write_single(directory / "s2.safetensors", s2)
    _write_index(directory, {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"})
    return s1 | s2


def _stream_all(source, **kwargs) -> dict[str, torch.Tensor]:
    with fastload.stream(source, config=CFG, **kwargs) as s:
        return dict(s)


def _entry(entry: str, source, **kwargs):
    if entry == "plan":
        return bounded(lambda: fastload.plan(source, config=CFG, **kwargs))
    if entry == "stream":
        return bounded(lambda: _stream_all(source, **kwargs))
    return bounded(lambda: fastload.load(source, config=CFG, **kwargs))


# -- tensors a shard holds beyond its weight_map ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "http", "s3"])
def test_unlisted_shard_tensors_are_loaded_alike_by_plan_load_stream_and_names(tmp_path, request, kind):
    """transformers takes every tensor of every shard the weight_map names (an unlisted one becomes an
    "unexpected key"); fastload must give the same set from every entry point, bit for bit."""
    want = _two_shards_with_an_extra(tmp_path / "ck")
    source = dir_source(kind, tmp_path / "ck", request)
    planned = [t.name for t in _entry("plan", source).tensors]
    loaded = _entry("load", source)
    streamed = _entry("stream", source)
    assert set(planned) == set(loaded) == set(streamed) == set(want)
    assert list(loaded) == planned  # load's dict is in the plan's (checkpoint) order
    for name, tensor in want.items():
        assert same_bytes(loaded[name], tensor) and same_bytes(streamed[name], tensor), name
    trace = fastload.Trace()
    part = bounded(lambda: fastload.load(source, names=["extra", "b"], config=CFG, trace=trace))
    assert list(part) == ["extra", "b"] and same_bytes(part["extra"], want["extra"])
    by_file = {url.rsplit("/", 1)[-1]: n for url, n in trace.summary().bytes_by_file.items()}
    for file, tensor in (("s1.safetensors", "extra"), ("s2.safetensors", "b")):  # its header and that tensor
        header = 8 + int.from_bytes((tmp_path / "ck" / file).read_bytes()[:8], "little")
        assert by_file[file] == header + want[tensor].nbytes, (file, by_file)


# -- a weight_map that is wrong ------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["plan", "load", "stream"])
def test_tensor_placed_in_the_wrong_shard_is_a_format_error_naming_the_index(tmp_path, entry):
    """The index says ``b`` lives in s3.safetensors; it is in s2.safetensors. transformers loads this (the
    weight_map only chooses files); refusing is fine, but the error must point at the file that is wrong --
    the index -- and at the tensor. It named ``s1.safetensors and 2 more file(s)`` instead: a shard that
    has nothing to do with it."""
    write_single(tmp_path / "s1.safetensors", {"a": torch.ones(4)})
    write_single(tmp_path / "s2.safetensors", {"b": torch.ones(5)})
    write_single(tmp_path / "s3.safetensors", {"c": torch.ones(6)})
    _write_index(tmp_path, {"a": "s1.safetensors", "b": "s3.safetensors", "c": "s3.safetensors"})
    with pytest.raises(fastload.FormatError) as info:
        _entry(entry, tmp_path)
    message = str(info.value)
    assert "'b'" in message
    assert INDEX in message, message


@pytest.mark.parametrize("kind", ["local", "s3"])
@pytest.mark.parametrize("layout", ["index", "listing"])
def test_same_tensor_in_two_shards_is_ambiguous_and_names_both(tmp_path, request, kind, layout):
    """s2 holds its own copy of ``a`` (unlisted, or in a directory without index). transformers would silently
    keep whichever shard sorts last; which bytes are right cannot be told, so: FormatError naming both files,
    from plan and load alike, also when ``names=`` asks only for the other tensors."""
    write_single(tmp_path / "ck" / "s1.safetensors", {"a": torch.ones(4)})
    write_single(tmp_path / "ck" / "s2.safetensors", {"b": torch.ones(5), "a": torch.zeros(4)})
    if layout == "index":
        _write_index(tmp_path / "ck", {"a": "s1.safetensors", "b": "s2.safetensors"})
    source = dir_source(kind, tmp_path / "ck", request)
    for entry, kwargs in (("plan", {}), ("load", {}), ("load", {"names": ["b"]})):
        with pytest.raises(fastload.FormatError) as info:
            _entry(entry, source, **kwargs)
        message = str(info.value)
        assert "'a'" in message and "s1.safetensors" in message and "s2.safetensors" in message, message


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_weight_map_naming_a_missing_shard_names_it_over_the_network(tmp_path, request, kind):
    write_single(tmp_path / "ck" / "s1.safetensors", {"a": torch.ones(4)})
    _write_index(tmp_path / "ck", {"a": "s1.safetensors", "b": "gone-00002.safetensors"})
    source = dir_source(kind, tmp_path / "ck", request)
    with pytest.raises(fastload.SourceNotFoundError, match="gone-00002.safetensors"):
        _entry("load", source)


# -- how shard names are written -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "file", "http", "s3"])
def test_weight_map_values_with_a_dot_slash_prefix_load_like_transformers(tmp_path, request, kind):
    """``"./s1.safetensors"`` and ``"./sub/s2.safetensors"`` name files inside the directory (transformers
    ``os.path.join``s them and loads); fastload refused them as entries that "escape the checkpoint
    directory", which they do not. One file spelled both ways is still one file (transformers reads it twice
    and gets the same tensors), not two files that both hold ``a2``."""
    write_single(tmp_path / "ck" / "s1.safetensors", {"a": torch.arange(4.0), "a2": torch.ones(2)})
    write_single(tmp_path / "ck" / "sub" / "s2.safetensors", {"b": torch.arange(3, dtype=torch.int16)})
    _write_index(tmp_path / "ck", {"a": "./s1.safetensors", "a2": "s1.safetensors", "b": "./sub/s2.safetensors"})
    source = dir_source(kind, tmp_path / "ck", request)
    got = _entry("load", source)
    assert set(got) == {"a", "a2", "b"}
    assert same_bytes(got["a"], torch.arange(4.0)) and same_bytes(got["b"], torch.arange(3, dtype=torch.int16))


ODD_DIR = "a b#c?d%e ü"


@pytest.mark.parametrize("kind", ["file", "http-threads", "http-aiohttp", "s3"])
def test_index_in_a_directory_with_url_delimiters_and_odd_shard_names(tmp_path, request, kind):
    """A directory named with ``#``, ``?``, ``%``, a space and unicode, holding an index whose shards have spaces
    and unicode and sit in a sub-directory: every shard is reached (HTTP percent-encodes both the directory, as
    given, and the shard names; S3 keys are verbatim), from the directory and from the index URL."""
    d = tmp_path / ODD_DIR
    want = {"a": torch.arange(10.0), "b": torch.arange(5, dtype=torch.int64)}
    write_single(d / "shard one ü.safetensors", {"a": want["a"]})
    write_single(d / "sub dir" / "ß 2.safetensors", {"b": want["b"]})
    _write_index(d, {"a": "shard one ü.safetensors", "b": "sub dir/ß 2.safetensors"})
    base = dir_source(kind.partition("-")[0], d, request)
    config = CFG.replace(http_engine=kind.partition("-")[2]) if kind.startswith("http") else CFG
    for source in (base, base + INDEX):
        got = bounded(lambda source=source: fastload.load(source, config=config))
        assert set(got) == set(want) and all(same_bytes(got[n], want[n]) for n in want), source
    if kind.startswith("http"):
        paths = {r.path for r in request.getfixturevalue("http_server").requests()}
        assert any(p.endswith(f"/{ODD_DIR}/sub dir/ß 2.safetensors") for p in paths), paths


# -- which files a directory means ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_index_wins_over_a_stray_model_safetensors_over_the_network(tmp_path, request, kind):
    """README: a directory is its index when present, else model.safetensors. A stray model.safetensors of
    other values (an older export) must not be read, over HTTP and S3 as on disk."""
    want = _two_shards_with_an_extra(tmp_path / "ck")
    write_single(tmp_path / "ck" / "model.safetensors", {"a": torch.zeros(3000), "stray": torch.ones(1)})
    source = dir_source(kind, tmp_path / "ck", request)
    got = _entry("load", source)
    assert set(got) == set(want) and same_bytes(got["a"], want["a"])
    assert all("model.safetensors" != f.info.url.rsplit("/", 1)[-1] for f in _entry("plan", source).files)


def test_listing_takes_only_the_safetensors_files_of_that_directory_local_and_s3_alike(tmp_path, request):
    """No index, no model.safetensors: every ``*.safetensors`` in the directory, and nothing else -- not
    notes, partial downloads, a directory named ``*.safetensors`` or files in sub-directories -- the same
    set on disk and on S3 (which lists one level)."""
    d = tmp_path / "ck"
    want = {"p": torch.arange(6.0), "q": torch.arange(4, dtype=torch.int8)}
    write_single(d / "part-1.safetensors", {"p": want["p"]})
    write_single(d / "part-2.safetensors", {"q": want["q"]})
    (d / "README.md").write_text("# notes")
    (d / "part-3.safetensors.incomplete").write_bytes(b"partial download")
    (d / "model.safetensors.index.json.bak").write_text("{not json")
    write_single(d / "sub" / "deep.safetensors", {"deep": torch.ones(2)})
    write_single(d / "dir.safetensors" / "inner.safetensors", {"inner": torch.ones(2)})
    for kind in ("local", "s3"):
        source = dir_source(kind, d, request)
        got = _entry("load", source)
        assert set(got) == set(want) and all(same_bytes(got[n], want[n]) for n in want), kind


def test_list_of_an_index_dir_and_a_single_file_sharing_a_name_is_an_error_naming_both(tmp_path, request):
    """README: "a tensor name found in two members is an error" -- also when one member is an index directory
    (here on S3) and the other a single local file, and also for ``names=`` that avoid the shared name."""
    _two_shards_with_an_extra(tmp_path / "ck")
    single = write_single(tmp_path / "other" / "single.safetensors", {"c": torch.ones(9, dtype=torch.int64)})
    source = [dir_source("s3", tmp_path / "ck", request), str(single)]
    for entry, kwargs in (("plan", {}), ("load", {}), ("load", {"names": ["a"]})):
        with pytest.raises(fastload.FormatError) as info:
            _entry(entry, source, **kwargs)
        message = str(info.value)
        assert "'c'" in message and "s2.safetensors" in message and "single.safetensors" in message, message


# -- from_pretrained against transformers --------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved by transformers in three shards with its index."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    directory = tmp_path_factory.mktemp("llama-index")
    transformers.LlamaForCausalLM(config).save_pretrained(directory, max_shard_size="40KB")
    assert len(set(json.loads((directory / INDEX).read_text())["weight_map"].values())) >= 3
    return directory


def _model_copy(llama_dir: Path, tmp_path: Path) -> tuple[Path, dict]:
    directory = tmp_path / "model"
    shutil.copytree(llama_dir, directory)
    return directory, json.loads((directory / INDEX).read_text())


def _same_models(ours, theirs) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert [k for k in b if not same_bytes(a[k], b[k])] == []


def test_from_pretrained_reports_unlisted_shard_tensors_as_transformers_does(llama_dir, tmp_path):
    directory, index = _model_copy(llama_dir, tmp_path)
    shard = directory / sorted(set(index["weight_map"].values()))[1]
    tensors = load_file(shard)
    tensors["model.surprise.weight"] = torch.ones(3)
    save_file(tensors, shard, metadata={"format": "pt"})
    ours, info = fastload.from_pretrained(directory, output_loading_info=True)
    theirs, want = transformers.LlamaForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert set(info["unexpected_keys"]) == set(want["unexpected_keys"]) == {"model.surprise.weight"}
    _same_models(ours, theirs)


def test_from_pretrained_with_a_dot_slash_weight_map_loads_like_transformers(llama_dir, tmp_path):
    directory, index = _model_copy(llama_dir, tmp_path)
    index["weight_map"] = {name: "./" + file for name, file in index["weight_map"].items()}
    (directory / INDEX).write_text(json.dumps(index))
    theirs = transformers.LlamaForCausalLM.from_pretrained(directory)
    _same_models(fastload.from_pretrained(directory), theirs)


def test_from_pretrained_with_a_misplaced_weight_map_entry_names_the_index(llama_dir, tmp_path):
    """transformers loads this model (the tensor is in exactly one shard); fastload may refuse the wrong index,
    but then with a FormatError that names the index file and the tensor."""
    directory, index = _model_copy(llama_dir, tmp_path)
    files = sorted(set(index["weight_map"].values()))
    moved = next(n for n, f in index["weight_map"].items() if f == files[1])
    index["weight_map"][moved] = files[0]
    (directory / INDEX).write_text(json.dumps(index))
    transformers.LlamaForCausalLM.from_pretrained(directory)  # the reference loads it
    with pytest.raises(fastload.FormatError) as info:
        fastload.from_pretrained(directory)
    assert moved in str(info.value) and INDEX in str(info.value), str(info.value)


def test_from_pretrained_refuses_a_tensor_stored_in_two_shards(llama_dir, tmp_path):
    """transformers silently keeps the copy in the shard that sorts last; fastload must refuse, naming both."""
    directory, index = _model_copy(llama_dir, tmp_path)
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    last = directory / files[-1]
    tensors = load_file(last)
    tensors[name] = torch.zeros_like(load_file(directory / files[0])[name])
    save_file(tensors, last, metadata={"format": "pt"})
    with pytest.raises(fastload.FormatError) as info:
        fastload.from_pretrained(directory)
    message = str(info.value)
    assert name in message and files[0] in message and files[-1] in message, message


@pytest.mark.parametrize("kind", ["local", "http"])
def test_from_pretrained_takes_model_safetensors_over_the_index_as_transformers_does(llama_dir, tmp_path, request,
                                                                                    kind):
    """README: from_pretrained's weights are model.safetensors before the index (transformers' rule), while
    ``load`` of the same directory takes the index. Both documented; both checked against their reference."""
    directory, index = _model_copy(llama_dir, tmp_path)
    sharded = {}
    for file in sorted(set(index["weight_map"].values())):
        sharded |= load_file(directory / file)
    single = {name: (t + 1) if t.is_floating_point() else t for name, t in sharded.items()}
    save_file(single, directory / "model.safetensors", metadata={"format": "pt"})
    theirs = transformers.LlamaForCausalLM.from_pretrained(directory)
    assert same_bytes(theirs.state_dict()["model.norm.weight"], single["model.norm.weight"])
    source = dir_source(kind, directory, request)
    _same_models(fastload.from_pretrained(source), theirs)
    loaded = _entry("load", source)
    assert set(loaded) == set(sharded) and all(same_bytes(loaded[n], sharded[n]) for n in sharded)
