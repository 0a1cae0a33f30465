"""Audit: ``fastload.from_pretrained`` from remote sources (HTTP(S) base URLs, S3 prefixes, hf://).

Every model is compared with transformers' own ``from_pretrained`` of the same files on local disk (tiny
Llama/GPT-2/BERT built here). Real servers only: the fixtures' Range HTTP server, moto S3 (sometimes behind a
small front that answers as real S3 does where moto does not) and the stand-in Hub of ``hub_server``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import torch

import fastload
from hub_server import HubServer, hub, hub_session, repo_name  # noqa: F401 -- fixtures
from servers import FaultProxy, Faults, RangeHTTPServer
from servers.http_range import Reply, _FileHandler
from servers.proxy import _ProxyHandler

transformers = pytest.importorskip("transformers")

FAST = fastload.LoadConfig(chunk_bytes=1 << 20, max_concurrency=4, host_buffer_bytes=8 << 20,
                           stall_timeout_s=2.0, connect_timeout_s=2.0,
                           retry=fastload.RetryConfig(max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.02,
                                                      deadline_s=5.0))
TOKENS = torch.tensor([[1, 5, 9, 33, 2, 70, 11]])
SECRET = "s3cr3t-T0KEN"


# -- models ----------------------------------------------------------------------------------------------------


def _llama_config(**kw):
    kwargs = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)
    kwargs.update(kw)
    return transformers.LlamaConfig(**kwargs)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """bf16 Llama, sharded with an index, with its own generation_config.json."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config()).to(torch.bfloat16)
    model.generation_config = transformers.GenerationConfig(do_sample=True, temperature=0.6, top_k=7,
                                                            bos_token_id=1, eos_token_id=2, max_new_tokens=5)
    directory = tmp_path_factory.mktemp("remote-llama")
    model.save_pretrained(directory, max_shard_size="20KB")
    assert (directory / "model.safetensors.index.json").exists() and (directory / "generation_config.json").exists()
    assert not (directory / "model.safetensors").exists()
    return directory


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """float32 GPT-2 (Conv1D, tied head) in one model.safetensors."""
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=3, eos_token_id=4)
    directory = tmp_path_factory.mktemp("remote-gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    assert (directory / "model.safetensors").exists()
    return directory


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    torch.manual_seed(2)
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=64)
    directory = tmp_path_factory.mktemp("remote-bert")
    transformers.BertModel(config).save_pretrained(directory)
    return directory


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_model(ours, theirs) -> None:
    assert type(ours) is type(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for name in b:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(_bits(a[name]), _bits(b[name])), name
    ca, cb = ours.config.to_dict(), theirs.config.to_dict()
    ca.pop("_name_or_path", None), cb.pop("_name_or_path", None)
    assert ca == cb
    assert ours.can_generate() == theirs.can_generate()
    if theirs.can_generate():
        assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()
    assert not ours.training
    with torch.no_grad():
        out_a, out_b = ours(input_ids=TOKENS), theirs(input_ids=TOKENS)
    key = "logits" if "logits" in out_a else "last_hidden_state"
    assert torch.equal(out_a[key], out_b[key])


def theirs_of(directory: Path, **kwargs):
    torch.manual_seed(4321)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs) if "bert" not in str(directory) \
        else transformers.AutoModel.from_pretrained(directory, **kwargs)


def ours_of(source, **kwargs):
    torch.manual_seed(4321)
    return fastload.from_pretrained(source, config=kwargs.pop("config", FAST), **kwargs)


def _published(transport: str, directory: Path, request, name: str | None = None) -> str:
    """``directory`` as a model directory URL over ``transport`` (no trailing slash: a base URL as users give it)."""
    if transport == "http":
        server = request.getfixturevalue("http_server")
        target = request.getfixturevalue("http_dir") / (name or directory.name)
        shutil.copytree(directory, target)
        return server.url_for(target)
    if transport == "s3":
        s3 = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        s3.upload_dir(bucket, name or directory.name, directory)
        return f"s3://{bucket}/{name or directory.name}"
    if transport == "hf":
        hub_server = request.getfixturevalue("hub")
        repo = repo_name(name or "remote")
        hub_server.add_repo(repo, directory)
        return f"hf://{repo}"
    raise AssertionError(transport)


def _causes(exc: BaseException) -> str:
    """Every message in the exception's chain (cause and context)."""
    seen, out = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(f"{type(exc).__name__}: {exc} {getattr(exc, 'url', '')}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


@pytest.fixture
def private_tmp(tmp_path_factory, monkeypatch) -> Path:
    """tempfile's directory for this test alone: a staging folder left behind is seen."""
    directory = tmp_path_factory.mktemp("fp-private-tmp")
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


# -- the same model over every transport --------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["http", "s3", "hf"])
@pytest.mark.parametrize("model", ["llama_dir", "gpt2_dir"])
def test_sharded_and_single_file_over_each_transport(request, transport: str, model: str) -> None:
    directory = request.getfixturevalue(model)
    url = _published(transport, directory, request)
    assert_same_model(ours_of(url), theirs_of(directory))


@pytest.mark.parametrize("given", [False, True])
def test_s3_clients_of_one_call_come_from_one_botocore_session(request, llama_dir: Path, monkeypatch, given) -> None:
    """from_pretrained over S3 makes three botocore clients (the staging's two sets of transports and the load's):
    from one session, so botocore reads its service models once (a client from a fresh session costs ~0.1 s of
    CPU). A session the caller gives (S3Options.session) is the one used."""
    import botocore.session

    url = _published("s3", llama_dir, request, name="one-session")
    made: list[int] = []
    create = botocore.session.Session.create_client

    def noted(self, *args, **kwargs):  # a spy: the real method runs
        made.append(id(self))
        return create(self, *args, **kwargs)

    monkeypatch.setattr(botocore.session.Session, "create_client", noted)
    mine = botocore.session.Session() if given else None
    config = fastload.LoadConfig(s3=fastload.S3Options(session=mine))
    assert_same_model(fastload.from_pretrained(url, config=config), theirs_of(llama_dir))
    assert len(made) >= 3 and len(set(made)) == 1, made
    assert not given or made[0] == id(mine)


@pytest.mark.parametrize("transport", ["http", "s3", "hf"])
def test_subfolder_and_variant_remotely(request, tmp_path: Path, transport: str) -> None:
    """``subfolder=`` and ``variant=`` mean what they mean in transformers, over every transport: the plain
    weights are skipped when a variant is asked for."""
    root = tmp_path / "repo"
    torch.manual_seed(5)
    transformers.LlamaForCausalLM(_llama_config()).save_pretrained(root / "text")  # plain model.safetensors
    torch.manual_seed(6)
    transformers.LlamaForCausalLM(_llama_config()).to(torch.float16).save_pretrained(
        root / "text", variant="fp16", max_shard_size="20KB")
    assert (root / "text" / "model.safetensors.index.fp16.json").exists()
    url = _published(transport, root, request, name="sv")
    for kwargs in ({"subfolder": "text"}, {"subfolder": "text", "variant": "fp16"}):
        assert_same_model(ours_of(url, **kwargs), theirs_of(root, **kwargs))


def test_hub_revision_branch_tag_and_commit(hub: HubServer, llama_dir: Path, gpt2_dir: Path, tmp_path: Path) -> None:
    """``revision=`` is a branch, a tag or a commit: the model at that revision, whatever main holds."""
    repo = repo_name("rev")
    hub.add_repo(repo, gpt2_dir)  # main: another model altogether
    commit = hub.add_repo(repo, llama_dir, revision="v1.0")
    theirs = theirs_of(llama_dir)
    for revision in ("v1.0", commit):
        assert_same_model(ours_of(f"hf://{repo}", revision=revision), theirs)
    assert_same_model(ours_of(f"hf://{repo}@{commit}"), theirs)
    assert_same_model(ours_of(f"hf://{repo}"), theirs_of(gpt2_dir))


def test_bf16_weights_loaded_as_float32_over_http(request, llama_dir: Path) -> None:
    url = _published("http", llama_dir, request)
    ours = ours_of(url + "/", dtype=torch.float32)
    theirs = theirs_of(llama_dir, dtype=torch.float32)
    assert ours.dtype == torch.float32
    assert_same_model(ours, theirs)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_explicit_cpu_device_over_s3(request, gpt2_dir: Path, device) -> None:
    url = _published("s3", gpt2_dir, request)
    ours = ours_of(url + "/", device=device)
    assert all(p.device.type == "cpu" for p in ours.parameters())
    assert_same_model(ours, theirs_of(gpt2_dir))


# -- model files: config.json, generation_config.json, transformers_weights ----------------------------------------


@pytest.mark.parametrize("transport", ["http", "s3", "hf"])
def test_missing_config_json_is_not_found_naming_it(request, tmp_path: Path, gpt2_dir: Path, transport: str) -> None:
    model = tmp_path / "noconfig"
    shutil.copytree(gpt2_dir, model)
    (model / "config.json").unlink()
    url = _published(transport, model, request)
    with pytest.raises(fastload.SourceNotFoundError) as info:
        ours_of(url)
    assert "config.json" in str(info.value)
    assert info.value.url is not None and info.value.url.endswith("config.json")


@pytest.mark.parametrize("transport", ["http", "s3", "hf"])
def test_generation_config_absent_remotely_is_made_like_transformers(request, tmp_path: Path, gpt2_dir: Path,
                                                                     transport: str) -> None:
    model = tmp_path / "nogen"
    shutil.copytree(gpt2_dir, model)
    (model / "generation_config.json").unlink(missing_ok=True)
    url = _published(transport, model, request)
    ours, theirs = ours_of(url), theirs_of(model)
    assert_same_model(ours, theirs)
    assert ours.generation_config.eos_token_id == 4


@pytest.mark.parametrize("transport", ["http", "s3"])
def test_transformers_weights_named_in_remote_config(request, tmp_path: Path, gpt2_dir: Path, transport: str) -> None:
    """config.json names the weights file (a name that needs percent-encoding in a URL): that file is loaded,
    not model.safetensors (here another model's weights)."""
    model = tmp_path / "named"
    shutil.copytree(gpt2_dir, model)
    (model / "model.safetensors").rename(model / "weights v2+final.safetensors")
    torch.manual_seed(99)
    decoy = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_pretrained(gpt2_dir))
    decoy.save_pretrained(tmp_path / "decoy")
    shutil.copy(tmp_path / "decoy" / "model.safetensors", model / "model.safetensors")
    doc = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**doc, "transformers_weights": "weights v2+final.safetensors"}))
    url = _published(transport, model, request)
    assert_same_model(ours_of(url), theirs_of(model))


def test_transformers_weights_index_in_a_subfolder_resolves_shards_like_transformers(request, tmp_path: Path,
                                                                                    llama_dir: Path) -> None:
    """``transformers_weights`` may name an index below the model directory. transformers resolves the index's
    shard names against the model directory (``get_checkpoint_shard_files``: ``join(model_dir, subfolder, f)``),
    not against the index's own folder; over HTTP fastload must read the same files."""
    model = tmp_path / "nested"
    model.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(llama_dir / name, model / name)
    (model / "ckpt").mkdir()
    index = json.loads((llama_dir / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        shutil.copy(llama_dir / shard, model / "ckpt" / shard)
    index["weight_map"] = {k: f"ckpt/{v}" for k, v in index["weight_map"].items()}
    (model / "ckpt" / "model.safetensors.index.json").write_text(json.dumps(index))
    doc = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**doc, "transformers_weights": "ckpt/model.safetensors.index.json"}))
    theirs = theirs_of(model)
    reference = theirs_of(llama_dir).state_dict()  # transformers loads the shards at model/ckpt/...
    assert all(torch.equal(_bits(t), _bits(reference[k])) for k, t in theirs.state_dict().items())
    url = _published("http", model, request)
    assert_same_model(ours_of(url), theirs)


def test_huge_remote_config_is_refused_without_reading_it(request, tmp_path: Path, gpt2_dir: Path) -> None:
    """A config.json of 80 MB (sparse here) is refused from its size alone: a typed error naming the file, and
    the server sent no more than the size probe of it."""
    model = tmp_path / "hugecfg"
    shutil.copytree(gpt2_dir, model)
    with open(model / "config.json", "r+b") as f:
        f.truncate(80 << 20)
    url = _published("http", model, request)
    server = request.getfixturevalue("http_server")
    with pytest.raises(fastload.FastloadError) as info:
        ours_of(url)
    assert "config.json" in str(info.value)
    assert server.bytes_sent("*/config.json") < 1 << 20


def test_remote_config_that_is_not_json_names_the_url(request, tmp_path: Path, gpt2_dir: Path) -> None:
    """A config.json that is not JSON: the error must say which file, i.e. the remote URL, not a path in a
    temporary staging folder that no longer exists when the caller reads the message."""
    model = tmp_path / "badcfg"
    shutil.copytree(gpt2_dir, model)
    (model / "config.json").write_text("<html>this is a login page, not a config</html>")
    url = _published("http", model, request)
    with pytest.raises((fastload.FastloadError, OSError, ValueError)) as info:
        ours_of(url)
    text = _causes(info.value)
    assert "fastload-model-" not in str(info.value), str(info.value)
    assert f"{url}/config.json" in str(info.value), str(info.value)
    assert text


# -- credentials in the base URL --------------------------------------------------------------------------------


BASIC = "Basic " + __import__("base64").b64encode(f"user:{SECRET}".encode()).decode()


class _TokenHandler(_FileHandler):
    """Serves files only to requests whose query carries ``sig=SECRET`` (an Azure-SAS-like token) or whose
    ``Authorization`` is ``user:SECRET`` (from a ``user:password@`` URL)."""

    def produce(self, path, headers, body):
        owner: _TokenServer = self.server.owner  # type: ignore[assignment]
        query = parse_qs(urlsplit(self.path).query)
        auth = dict((k.lower(), v) for k, v in headers).get("authorization")
        ok = query.get("sig") == [SECRET] or auth == BASIC
        with owner.lock:
            owner.targets.append((path, SECRET if ok else None))
        if not ok:
            return Reply.simple(403)
        return super().produce(path, headers, body)


class _TokenServer(RangeHTTPServer):
    handler_class = _TokenHandler

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.lock = threading.Lock()
        self.targets: list[tuple[str, str | None]] = []


@pytest.fixture
def token_server(tmp_path: Path):
    with _TokenServer(tmp_path / "served") as server:
        (tmp_path / "served").mkdir(exist_ok=True)
        yield server


def _with_credentials(url: str, how: str) -> str:
    if how == "query":
        return url + f"/?sig={SECRET}"
    return url.replace("http://", f"http://user:{SECRET}@", 1) + "/"


@pytest.mark.parametrize("how", ["query", "password"])
@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_url_credentials_go_with_config_and_every_weight_file(token_server: _TokenServer, llama_dir: Path,
                                                              engine: str, how: str) -> None:
    """README: the query string (a SAS-style token) and ``user:password@`` go with every file: the config
    files and the weights alike."""
    shutil.copytree(llama_dir, token_server.root / "m")
    url = _with_credentials(token_server.url_for(token_server.root / "m"), how)
    ours = ours_of(url, config=FAST.replace(http_engine=engine))
    assert_same_model(ours, theirs_of(llama_dir))
    names = {p.rsplit("/", 1)[-1] for p, _ in token_server.targets}
    shards = {p.name for p in llama_dir.glob("model-*.safetensors")}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} | shards <= names
    assert all(sig == SECRET for _, sig in token_server.targets), token_server.targets


@pytest.mark.parametrize("how", ["query", "password"])
def test_secret_of_the_base_url_is_not_kept_in_the_model_config(token_server: _TokenServer, gpt2_dir: Path,
                                                                how: str) -> None:
    """fastload sets ``model.config.name_or_path`` to the source. A SAS-style token (or a password) must not end
    up there: ``config.to_dict()`` is what trainers log to experiment trackers (W&B, MLflow)."""
    shutil.copytree(gpt2_dir, token_server.root / "m")
    url = _with_credentials(token_server.url_for(token_server.root / "m"), how)
    ours = ours_of(url)
    assert_same_model(ours, theirs_of(gpt2_dir))
    assert SECRET not in str(ours.config.name_or_path)
    assert SECRET not in json.dumps(ours.config.to_dict(), default=str)


@pytest.mark.parametrize("how", ["query", "password"])
@pytest.mark.parametrize("case", ["no-config", "huge-config", "no-weights", "weights-denied"])
def test_errors_for_a_tokened_url_name_the_file_and_hide_the_token(token_server: _TokenServer, gpt2_dir: Path,
                                                                   case: str, how: str) -> None:
    """README: "Presigned query strings, passwords and header values never appear in fastload's errors"."""
    model = token_server.root / "m"
    shutil.copytree(gpt2_dir, model)
    if case == "no-config":
        (model / "config.json").unlink()
    elif case == "huge-config":
        with open(model / "config.json", "r+b") as f:
            f.truncate(80 << 20)
    elif case == "no-weights":
        (model / "model.safetensors").unlink()
    else:
        token_server.faults.fail_first(100, 403, path="*/model.safetensors")
    url = _with_credentials(token_server.url_for(model), how)
    with pytest.raises(fastload.FastloadError) as info:
        ours_of(url)
    text = _causes(info.value)
    assert SECRET not in text, text
    named = {"no-config": "config.json", "huge-config": "config.json"}.get(case, "model.safetensors")
    assert named in str(info.value), str(info.value)


# -- S3 permissions -----------------------------------------------------------------------------------------------


def _s3_error(status: int, code: str, head: bool) -> Reply:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>m</Message>'
            "<RequestId>1</RequestId><HostId>h</HostId></Error>").encode()
    headers = [("Content-Type", "application/xml"), ("Content-Length", str(0 if head else len(body)))]
    return Reply(status, headers, [] if head else [body])


class _S3FrontHandler(_ProxyHandler):
    def produce(self, path, headers, body):
        front: _S3Front = self.server.owner  # type: ignore[assignment]
        if front.deny is not None and front.deny(self.command, self.path):
            return _s3_error(403, "AccessDenied", self.command == "HEAD")
        reply = super().produce(path, headers, body)
        if front.get_object_only:  # a GetObject-only policy: a missing key is 403, listing is refused
            if self.command == "HEAD" and reply.status == 404:
                return _s3_error(403, "Forbidden", True)
            if self.command == "GET" and "list-type" in self.path:
                return _s3_error(403, "AccessDenied", False)
        return reply


class _S3Front(FaultProxy):
    handler_class = _S3FrontHandler

    def __init__(self, upstream: str):
        super().__init__(upstream, Faults())
        self.get_object_only = False
        self.deny = None


@pytest.fixture
def s3_front(s3_server):
    with _S3Front(s3_server.endpoint_url) as proxy:
        yield proxy


@pytest.mark.parametrize("with_generation_config", [True, False])
def test_s3_get_object_only_policy_loads_a_sharded_model(s3_server, s3_bucket: str, s3_front: _S3Front,
                                                         llama_dir: Path, tmp_path: Path,
                                                         with_generation_config: bool) -> None:
    """The common read-only policy (s3:GetObject, no s3:ListBucket): S3 answers HEAD of a missing key with 403.
    README: "A HEAD refused with 403 while probing an S3 prefix counts as 'not there' ... unless nothing else is
    found". A sharded model has no model.safetensors (and may have no generation_config.json): both probes are
    refused, and the model must still load from its index, as ``fastload.load`` of the same prefix does."""
    model = tmp_path / "ro"
    shutil.copytree(llama_dir, model)
    if not with_generation_config:
        (model / "generation_config.json").unlink()
    s3_server.upload_dir(s3_bucket, "ro", model)
    s3_front.get_object_only = True
    config = FAST.replace(s3=fastload.S3Options(endpoint_url=s3_front.url.rstrip("/")))
    fastload.load(f"s3://{s3_bucket}/ro/", config=config)  # the plain load copes with the 403 probes
    assert_same_model(ours_of(f"s3://{s3_bucket}/ro", config=config), theirs_of(model))


def test_s3_weights_denied_config_readable_names_the_weights(s3_server, s3_bucket: str, s3_front: _S3Front,
                                                             gpt2_dir: Path) -> None:
    s3_server.upload_dir(s3_bucket, "denied", gpt2_dir)
    s3_front.deny = lambda method, target: ".safetensors" in target
    config = FAST.replace(s3=fastload.S3Options(endpoint_url=s3_front.url.rstrip("/")))
    with pytest.raises(fastload.SourcePermissionError) as info:
        ours_of(f"s3://{s3_bucket}/denied/", config=config)
    assert f"s3://{s3_bucket}/denied/model.safetensors" in str(info.value)
    assert "X-Amz" not in _causes(info.value)


def test_s3_weights_get_denied_after_head_names_the_weights(s3_server, s3_bucket: str, s3_front: _S3Front,
                                                            gpt2_dir: Path) -> None:
    """HEAD allowed, the presigned GET of the weights refused (a KMS key the caller may not use, for one)."""
    s3_server.upload_dir(s3_bucket, "kms", gpt2_dir)
    s3_front.deny = lambda method, target: (method == "GET" and ".safetensors" in target
                                            and "X-Amz-Signature" in target)
    config = FAST.replace(s3=fastload.S3Options(endpoint_url=s3_front.url.rstrip("/")))
    with pytest.raises(fastload.SourcePermissionError) as info:
        ours_of(f"s3://{s3_bucket}/kms", config=config)
    assert f"s3://{s3_bucket}/kms/model.safetensors" in str(info.value)
    assert "X-Amz" not in _causes(info.value)


# -- trace, staging folder, cancel --------------------------------------------------------------------------------


def test_trace_counts_exactly_the_weight_bytes_the_server_sent(request, gpt2_dir: Path) -> None:
    """Over HTTP the trace's bytes_fetched is every byte of the weights the server sent (the probes included,
    they crossed the wire); config.json and generation_config.json are not the weights."""
    url = _published("http", gpt2_dir, request)
    server = request.getfixturevalue("http_server")
    server.reset()
    trace = fastload.Trace(otel=False)
    assert_same_model(ours_of(url, trace=trace), theirs_of(gpt2_dir))
    s = trace.summary()
    sent = server.bytes_sent("*.safetensors")
    assert sent >= (gpt2_dir / "model.safetensors").stat().st_size
    assert s.bytes_fetched == sent, (s.bytes_fetched, sent)
    assert [u.rsplit("/", 1)[-1] for u in s.bytes_by_file] == ["model.safetensors"]


def test_staging_folder_removed_after_success_and_failures(request, private_tmp: Path, gpt2_dir: Path,
                                                           tmp_path: Path) -> None:
    url = _published("http", gpt2_dir, request)
    server = request.getfixturevalue("http_server")
    assert_same_model(ours_of(url), theirs_of(gpt2_dir))
    assert os.listdir(private_tmp) == []
    server.faults.fail_first(100, 404, path="*/model.safetensors")  # weights vanish
    with pytest.raises(fastload.SourceNotFoundError):
        ours_of(url)
    assert os.listdir(private_tmp) == []
    server.reset()
    server.faults.fail_first(100, 500, path="*/model.safetensors")  # a server error for good
    with pytest.raises(fastload.FastloadError):
        ours_of(url)
    assert os.listdir(private_tmp) == []


_SIGINT_CHILD = r"""
import json, os, signal, sys, tempfile, threading, time, traceback
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import transformers, fastload
from servers import RangeHTTPServer
from servers.http_range import _FileHandler

private = tempfile.mkdtemp(prefix="fp-sigint-")
tempfile.tempdir = private
streaming = threading.Event()


class Hold(_FileHandler):
    # Replies to the probes and the header; a ranged read of tensor bytes (from past the header) hangs.
    def produce(self, path, headers, body):
        rng = dict((k.lower(), v) for k, v in headers).get("range", "")
        if path.endswith(".safetensors") and rng.startswith("bytes=") and int(rng[6:].split("-")[0]) > 4096:
            streaming.set()
            self.server.owner.stopping.wait()
        return super().produce(path, headers, body)


class Server(RangeHTTPServer):
    handler_class = Hold


def interrupt():
    if streaming.wait(20):
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)


root = Path(sys.argv[2])
with Server(root.parent) as server:
    before = set(threading.enumerate())
    threading.Thread(target=interrupt, daemon=True, name="interrupter").start()
    cfg = fastload.LoadConfig(chunk_bytes=1 << 20, stall_timeout_s=30)
    t0 = time.monotonic()
    outcome = "returned"
    try:
        fastload.from_pretrained(server.url_for(root) + "/", config=cfg)
    except KeyboardInterrupt:
        outcome = "interrupted"
    took = time.monotonic() - t0
    # (6 s: the config is read on a detached thread, which a Ctrl-C does not stop but which ends by itself; under
    # a loaded machine its imports took over 3 s once)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        alive = [t for t in threading.enumerate() if t not in before and t.is_alive()
                 and "process_request" not in t.name and t.name != "interrupter"]
        left = [t.name for t in alive]
        if not left:
            break
        time.sleep(0.05)
    frames = sys._current_frames()
    stacks = {t.name: "".join(traceback.format_stack(frames[t.ident])[-6:]) for t in alive if t.ident in frames}
    print(json.dumps({"outcome": outcome, "took": took, "threads": left, "tmp": os.listdir(private),
                      "stacks": stacks}))
"""


def test_ctrl_c_while_weights_stream_leaves_no_staging_folder_or_thread(tmp_path: Path) -> None:
    torch.manual_seed(7)
    config = transformers.GPT2Config(vocab_size=4096, n_embd=64, n_layer=1, n_head=4, n_positions=64)
    model_dir = tmp_path / "big" / "m"
    transformers.GPT2LMHeadModel(config).save_pretrained(model_dir)  # ~1.5 MB: several 1 MiB chunks
    child = subprocess.run([sys.executable, "-c", _SIGINT_CHILD, str(Path(__file__).parent), str(model_dir)],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["outcome"] == "interrupted", result
    assert result["took"] < 20, result
    assert result["threads"] == [], result  # (with their stacks, under "stacks")
    assert result["tmp"] == [], result


def test_private_hub_repo_config_and_weights_with_hf_token(hub: HubServer, llama_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A private repo: config.json, generation_config.json and the weights all come with HF_TOKEN; the token goes
    to the Hub only, never to the CDN it redirects to."""
    repo = repo_name("private")
    hub.add_repo(repo, llama_dir)
    hub.token = SECRET
    monkeypatch.setenv("HF_TOKEN", SECRET)
    try:
        assert_same_model(ours_of(f"hf://{repo}"), theirs_of(llama_dir))
    finally:
        hub.token = None
    paths = [r.path for r in hub.log]
    assert any(p.endswith("/config.json") for p in paths) and any(p.endswith("/generation_config.json") for p in paths)
    cdn = [auth for path, auth in hub.auth_seen if path.startswith("/lfs/")]
    assert cdn and not any(cdn)


def test_bert_over_http_without_generation(request, bert_dir: Path) -> None:
    url = _published("http", bert_dir, request)
    ours = ours_of(url + "/")
    assert_same_model(ours, theirs_of(bert_dir))
    assert ours.config.name_or_path == url + "/"
