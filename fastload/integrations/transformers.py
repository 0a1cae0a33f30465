"""``fastload.from_pretrained``: a ``transformers`` model whose weights fastload streamed.

It stays equal to ``transformers``' own loading by letting ``transformers`` do
everything but the I/O: fastload fetches ``config.json`` and
``generation_config.json`` through its source layer into a temporary directory,
streams the weights into a state dict, and hands both to the supported entry
point ``cls.from_pretrained(None, config=<that directory>, state_dict=...)``.
``transformers`` then applies its key renames and fusions (e.g. MoE experts),
ties weights, builds non-persistent buffers, reports missing and unexpected
keys (and returns them with ``output_loading_info=True``) exactly as it does
for a local checkpoint.

The weights stream while ``transformers`` imports: a fresh process spends a
second or more importing its config and model modules, which is the time a
cold read of the weights takes. The imports and the config run in a thread of
their own; the load runs where ``fastload.load`` would, so the tensors come from
the caller's thread (and its malloc arena). The dtype the weights are created
in is read from ``config.json`` itself before the load starts, and checked
against the config ``transformers`` parsed before anything is handed to it (a
mismatch loads again, in the dtype it keeps).

No double copies: the tensors are created in the dtype ``transformers`` will
keep (the ``dtype`` asked for; for ``"auto"``, the default, the config's) and
on ``device``, so the ``.to(device, dtype)`` ``transformers`` applies is a
no-op and the model's parameters are fastload's tensors. Weights stored in
another dtype wait for the model: those it keeps in float32 (its dtype plan,
sub-models included) are created in float32, and checkpoint keys it renames
stay as stored for it to convert. Fusions (stacking MoE experts) copy, as they
do in ``transformers``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
import threading
from dataclasses import fields, replace
from importlib import metadata, util
from pathlib import Path
from types import SimpleNamespace

from .. import runner
from ..config import LoadConfig
from ..errors import ConfigError, FastloadError, FormatError, SourceNotFoundError, SourcePermissionError
from ..format import INDEX_NAME, SINGLE_NAME, parse_index
from ..pipeline import make_request
from ..resolve import join
from ..redact import redact_url
from ..sources import ObjectInfo, Transports, normalize_url, read_bytes, scheme_of
from ..sources.hub_refs import with_revision
from ..sources.local import to_path
from ..trace import NULL_TRACE

#: Files besides the weights that building the model reads (tokenizers are not part of a model).
MODEL_FILES = ("config.json", "generation_config.json")
MAX_MODEL_FILE_BYTES = 64 << 20
_OURS = ("state_dict", "pretrained_model_name_or_path")
_CONFIG_FIELDS = frozenset(f.name for f in fields(LoadConfig))


def _check_transformers() -> None:
    """transformers is installed, version 5 or later: asked of its metadata, without importing it (which takes
    seconds, spent while the weights stream)."""
    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        raise ConfigError("fastload.from_pretrained needs transformers: pip install fastload[transformers]") from None
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 5:
        raise ConfigError(f"fastload.from_pretrained needs transformers >= 5 (found {version})")


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError("fastload.from_pretrained needs transformers: pip install fastload[transformers]") from exc
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ConfigError(f"fastload.from_pretrained needs transformers >= 5 (found {transformers.__version__})")
    return transformers


async def _model_dir(source: str, transports: Transports) -> str:
    """The model directory's URL; for ``hf://``, the local cache snapshot when complete, else a pinned URL."""
    scheme = scheme_of(source)
    if scheme == "hf":
        hub = transports.for_url(source)
        located = await hub.locate(source)
        if (scheme_of(located) == "local" and not os.path.isfile(os.path.join(located, "config.json"))
                and not hub.settings.offline):  # the weights are cached, the config is not: the Hub has both
            located = await hub.pinned(source)
        source, scheme = located, scheme_of(located)
    if scheme == "local":
        path = to_path(source)
        if not os.path.isdir(path):
            raise SourceNotFoundError(f"from_pretrained needs a model directory, and {source} is not one", url=source)
        return str(path)
    return join(source, "")


def _in_subfolder(source: str, subfolder: str) -> str:
    """``source``'s sub-directory ``subfolder`` (transformers' ``subfolder=``), which must stay inside it."""
    parts = subfolder.replace("\\", "/").strip("/").split("/")
    if subfolder.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"subfolder must be a relative path inside the model directory, got {subfolder!r}")
    if scheme_of(source) == "local":
        return os.path.join(str(to_path(source)), *parts)
    return join(source, "/".join(parts) + "/")


def _variant_name(name: str, variant: str) -> str:
    """transformers' ``variant=`` naming: ``model.safetensors`` -> ``model.<variant>.safetensors``."""
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{variant}.{ext}"


async def _stage(source: str, folder: Path, config, variant: str | None = None,
                 trace=NULL_TRACE) -> tuple[str | list[str], ObjectInfo | None]:
    """Fetch the non-weight model files into ``folder``; return where the weights are: the index or the single
    file (of ``variant`` when given), or the shards of an index ``config.json`` names in a sub-folder; and what
    looking the file up gave, where the load can take it instead of asking again. The probes
    of the weights' names count in ``trace`` (the load's: it covers the weights); the model files do not.

    The model files and the standard weights names are asked for at once, not one after another: on a remote
    source each is a round trip (two for a file), all of them before the first weight byte."""
    transports = Transports(config, NULL_TRACE)
    weights = Transports(config, trace)

    async def there(t: Transports, url: str, denied: list) -> ObjectInfo | None:
        """The file at ``url``, or None. S3 answers 403 for a missing key without ListBucket: none, too."""
        try:
            return await t.for_url(url).stat(url)
        except SourceNotFoundError:
            return None
        except SourcePermissionError as exc:
            if scheme_of(url) != "s3":
                raise
            denied.append(exc)
            return None

    async def model_file(name: str) -> bytes | None:
        """The file's bytes, or None; a missing or unreadable config.json ends the whole call at once (the
        weights' probes with it): the folder is not a model, whatever they would find."""
        url, denied = join(base, name), []
        info = await there(transports, url, denied)
        if info is None:
            if name != "config.json":
                return None
            if denied:
                raise denied[0]
            raise SourceNotFoundError(f"no config.json in {redact_url(source)}: not a transformers model "
                                      "directory", url=url)
        if info.size > MAX_MODEL_FILE_BYTES:
            raise FormatError(f"{redact_url(url)}: {info.size} bytes is too large for a model file")
        raw = await read_bytes(transports.for_url(url), info, 0, info.size)
        if name == "config.json":
            try:
                json.loads(raw)
            except ValueError as exc:
                raise FormatError(f"{redact_url(url)}: not valid JSON ({exc})") from None
        return raw

    async def guess(name: str, denied: list) -> ObjectInfo | FastloadError | None:
        """A standard name, asked for before config.json says whether it is the one: its error is kept, to count
        only if transformers would ask for that name (a config naming other weights makes it nobody's)."""
        try:
            return await there(weights, join(base, name), denied)
        except FastloadError as exc:
            return exc.with_traceback(None)

    async def first_of(names: list[str], denied: list) -> tuple[str, ObjectInfo] | None:
        """transformers' order: the first of ``names`` that is there."""
        found = await runner.gather(there(weights, join(base, name), denied) for name in names)
        return next(((name, info) for name, info in zip(names, found) if info is not None), None)

    try:
        base = await _model_dir(source, transports)
        denied: list[SourcePermissionError] = []
        # transformers' rule: the file config.json names, else the single file, else the index (other
        # *.safetensors files are not its weights); the standard two are asked for while config.json comes
        standard = [_variant_name(n, variant) if variant else n for n in (SINGLE_NAME, INDEX_NAME)]
        raws, guesses = await runner.gather([runner.gather(model_file(name) for name in MODEL_FILES),
                                             runner.gather(guess(name, denied) for name in standard)])
        for name, raw in zip(MODEL_FILES, raws):
            if raw is not None:
                (folder / name).write_bytes(raw)
        names = _weights_named_by(folder / "config.json")
        if names:
            denied.clear()
            weight = await first_of(names, denied)
        else:
            names, weight = standard, None
            for name, found in zip(standard, guesses):
                if isinstance(found, FastloadError):
                    raise found
                if found is not None:
                    weight = name, found
                    break
        if weight is None:
            if denied:  # nothing found, something refused: that is the error
                raise denied[0]
            raise SourceNotFoundError(f"no {' or '.join(names)} in {redact_url(source)}"
                                      + (f" (variant={variant!r})" if variant else ""), url=join(base, names[0]))
        name, info = weight
        if "/" in name and name.endswith(".index.json"):
            # transformers reads a shard name against the model directory, wherever config.json put the
            # index (a load reads it against the index's own folder): the shards, named from here
            raw = await read_bytes(weights.for_url(info.url), info, 0, info.size)
            return [join(base, shard) for shard in parse_index(raw, url=info.url).files], None
        # What finding it gave, for the load to take instead of asking again (its probe: the size, validators and
        # first bytes, an index's whole body; the load signs an S3 object's GETs again, as its own): not a local
        # file's (a stat, and the load's own checks of local files go with it)
        return join(base, name), info if scheme_of(base) != "local" else None
    finally:
        await transports.aclose()
        await weights.aclose()


def _model_class(transformers, hf_config, model_class):
    from transformers.models.auto.auto_factory import _BaseAutoModelClass, _get_model_class

    if model_class is None:
        names = list(getattr(hf_config, "architectures", None) or [])
        for name in names:
            found = getattr(transformers, name, None)
            if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel):
                return found
        if names:
            raise ConfigError(f"transformers has no class {names[0]} (remote code is not supported); "
                              "pass model_class=")
        model_class = transformers.AutoModel
    if isinstance(model_class, type) and issubclass(model_class, _BaseAutoModelClass):
        try:
            return _get_model_class(hf_config, model_class._model_mapping)
        except KeyError:
            raise ConfigError(f"{model_class.__name__} has no model for {type(hf_config).__name__}") from None
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise ConfigError(f"model_class must be a transformers model class or Auto class, got {model_class!r}")
    return model_class


def _dtypes(dtype, hf_config):
    """(the dtype fastload creates floating tensors in, or None to keep them as stored; the dtype for transformers)."""
    import torch

    if dtype is None:
        dtype = "auto"  # transformers' own default
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype != "auto" and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError("dtype must be 'auto', a floating-point torch dtype or its name")
    want = getattr(hf_config, "dtype", None) if dtype == "auto" else dtype
    if isinstance(want, str):
        want = getattr(torch, want, None)
    if getattr(hf_config, "quantization_config", None) is not None:
        want = None  # quantized checkpoints are converted by transformers' quantizer, not by us
    if not (isinstance(want, torch.dtype) and want.is_floating_point):
        want = None
    return want, dtype


def _weights_named_by(config_file: Path) -> list[str]:
    """``transformers_weights`` in config.json: the one weights file transformers loads in place of the standard
    names (checked as transformers checks it: a safetensors file or index, inside the directory)."""
    try:
        doc = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    name = doc.get("transformers_weights") if isinstance(doc, dict) else None
    if name is None:
        return []
    if not isinstance(name, str) or not name.endswith((".safetensors", ".safetensors.index.json")):
        raise ConfigError(f"config.json's transformers_weights is neither *.safetensors nor "
                          f"*.safetensors.index.json: {name!r}")
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"config.json's transformers_weights must name a file inside the model directory: {name!r}")
    return [name]


def _raw_config(folder: Path) -> SimpleNamespace:
    """The config's ``dtype`` and ``quantization_config`` as ``transformers`` will read them (``dtype`` before the
    legacy ``torch_dtype``), from ``config.json`` alone: known before ``transformers`` is imported."""
    try:
        doc = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        doc = None  # transformers will say what is wrong with it
    doc = doc if isinstance(doc, dict) else {}
    dtype = doc.get("dtype") if doc.get("dtype") is not None else doc.get("torch_dtype")
    return SimpleNamespace(dtype=dtype, quantization_config=doc.get("quantization_config"))


def _converted(plan, create) -> list[str]:
    """The floating tensors that creating in ``create`` would convert (none when ``create`` is None)."""
    import torch

    return [] if create is None else [t.name for t in plan.tensors
                                      if t.spec.dtype.is_float and getattr(torch, t.spec.dtype.torch_name) != create]


async def _stream_weights(base: str, request, create):
    """(the plan of every tensor, the state dict of those that need no conversion to ``create``, the files and
    headers read). They can stream before transformers is imported; the converted ones wait for the model (see
    ``_targets``), and are planned from the same headers."""
    from ..api import _collect

    plans: list = []
    read: list = []

    def select(plan):
        plans.append(plan)
        converted = set(_converted(plan, create))
        return [t.name for t in plan.tensors if t.name not in converted] if converted else None

    state_dict = await _collect(replace(request, source=base, dtype=create, select=select, seen=read.append))
    return plans[0], state_dict, read[0]


def _targets(cls, hf_config, create, names: list[str]) -> dict:
    """{dtype: names} for tensors stored in another floating dtype than ``create``, as transformers would end them:
    ``create``, unless the model keeps the weight in float32 (``_keep_in_fp32_modules``, its sub-models' too) or
    builds it in another dtype, which it is read in directly: never through a narrower dtype. A checkpoint key
    that is not one of the model's (transformers renames, fuses or drops it) stays as stored, and transformers
    converts it after its renames, as it would from the file."""
    import torch

    if create not in (torch.float16, torch.bfloat16):  # transformers' dtype plans exist for these only
        return {create: names}
    default = torch.get_default_dtype()
    try:  # how transformers builds it: default dtype set, parameters on the meta device (no memory)
        torch.set_default_dtype(create)
        with torch.device("meta"):
            model = cls(hf_config)
    finally:
        torch.set_default_dtype(default)
    plan = model._get_dtype_plan(create)
    if plan:
        from transformers.core_model_loading import build_glob_alternation

        pattern, groups, _ = build_glob_alternation(list(plan))
    params = model.state_dict()
    targets: dict = {}
    for name in names:
        if name not in params:
            target = None
        elif plan and (found := pattern.search(name)):
            target = plan[groups[found.lastgroup]]
        else:
            target = params[name].dtype
        targets.setdefault(target if target is None or target.is_floating_point else None, []).append(name)
    return targets


def _reading_order(state_dict: dict, plan) -> dict:
    """``state_dict`` in the order transformers reads checkpoint files (shards by name, keys sorted): with
    ``dtype="auto"`` and no dtype in the config it takes the first floating tensor's."""
    names = {t.name: os.path.basename(plan.files[t.spec.file].info.url) for t in plan.tensors}
    return dict(sorted(state_dict.items(), key=lambda item: (names.get(item[0], ""), item[0])))


def _generation_config(transformers, folder: Path, overrides: dict):
    """What ``transformers`` loads for a local directory: the file, else one made from ``config.json``; with the
    caller's keyword arguments that name generation settings (``eos_token_id``...) applied, as transformers
    applies them when called on a model class (an Auto class absorbs them into the model's config instead)."""
    known = vars(transformers.GenerationConfig())
    overrides = {k: v for k, v in overrides.items() if k in known}
    try:
        return transformers.GenerationConfig.from_pretrained(folder, **overrides)
    except OSError:
        return transformers.GenerationConfig.from_pretrained(folder, config_file_name="config.json",
                                                             _from_model_config=True, **overrides)


def from_pretrained(source, *, model_class=None, device="cpu", dtype=None, config=None, trace=None, **hf_kwargs):
    """A ``transformers`` model from a model directory (``config.json`` + safetensors weights) at ``source``.

    ``source`` is a local path, an ``http(s)://`` base URL, an ``s3://`` prefix or ``hf://org/name[@revision]``.
    ``model_class`` is a concrete ``transformers`` class or an Auto class; by default the config's
    ``architectures`` chooses, as ``transformers`` does. ``dtype`` is ``"auto"`` (the default, as in
    ``transformers``), a torch dtype or its name. ``config`` and ``trace`` are fastload's (``LoadConfig``,
    ``Trace``: the trace covers the weights). Other keyword arguments go to ``transformers``' ``from_pretrained``
    (``output_loading_info=True``, ``attn_implementation=...``, config overrides, ...).
    """
    _check_transformers()
    taken = [k for k in _OURS if k in hf_kwargs]
    if taken:
        raise ConfigError(f"from_pretrained sets {taken[0]!r} itself")
    if "progress" in hf_kwargs:  # transformers would get it, and fail in the model's constructor after the load
        raise ConfigError("from_pretrained takes no progress= (its weights may stream in several parts); "
                          "fastload.pull(source, progress=...) first shows a download's progress")
    # fastload.load's arguments and LoadConfig's fields: transformers would get them too, and the model's
    # constructor refuse them with a TypeError once every weight had been fetched
    loads = [k for k in hf_kwargs if k in ("names", "shard", "verify") or k in _CONFIG_FIELDS]
    if loads:
        hint = "" if loads[0] in ("names", "shard", "verify") else f": config=fastload.LoadConfig({loads[0]}=...)"
        raise ConfigError(f"from_pretrained takes no {loads[0]}= (it loads the whole model){hint}")
    if dtype is None and "torch_dtype" in hf_kwargs:
        dtype = hf_kwargs.pop("torch_dtype")
    request = make_request(source, device=device, config=config, trace=trace)  # checks device, config, trace
    if request.device.type != "cpu" and util.find_spec("accelerate") is None:
        raise ConfigError(f"from_pretrained on {request.device} needs accelerate (transformers places the model "
                          "with a device_map): pip install 'fastload[transformers]'")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise ConfigError(f"from_pretrained needs one model directory (path or URL), got {source!r}")
    source = normalize_url(source)
    if "revision" in hf_kwargs:  # a Hub revision: part of an hf:// source
        if scheme_of(source) != "hf":
            raise ConfigError("revision applies to hf:// sources only")
        source = with_revision(source, hf_kwargs.pop("revision"))
    subfolder, variant = hf_kwargs.pop("subfolder", None) or "", hf_kwargs.pop("variant", None)
    if variant is not None and (not isinstance(variant, str) or not re.fullmatch(r"[\w.-]+", variant)):
        raise ConfigError(f"variant must be a plain name such as 'fp16', got {variant!r}")
    model_dir = _in_subfolder(source, subfolder) if subfolder else source
    if scheme_of(model_dir) == "s3" and request.config.s3.session is None:
        # The staging's two sets of transports and the load's each make a botocore client: from one session,
        # botocore reads its models once (a client from a fresh session costs ~0.1 s of CPU, a second one from
        # the same session ~0.03 s, a third ~0.005 s)
        import botocore.session

        s3 = request.config.s3
        shared = replace(s3, profile=None, session=botocore.session.Session(profile=s3.profile))
        request = replace(request, config=request.config.replace(s3=shared))
    with tempfile.TemporaryDirectory(prefix="fastload-model-") as tmp:
        folder = Path(tmp)
        with request.trace.one_load():  # the weights' parts are one load: one span, one trace file
            base, found = runner.run(lambda: _stage(model_dir, folder, request.config, variant, request.trace))
            if found is not None:
                request = replace(request, found=(base, found))
            guess = _dtypes(dtype, _raw_config(folder))[0]

            given_up = threading.Event()

            def model_parts():  # in a thread of its own: transformers' imports take seconds; the weights stream
                transformers = _transformers()  # (an import cannot be stopped: one the call gave up on ends here)
                if given_up.is_set():
                    raise asyncio.CancelledError
                hf_config = transformers.AutoConfig.from_pretrained(folder)
                return (transformers, hf_config, _model_class(transformers, hf_config, model_class),
                        *_dtypes(dtype, hf_config))

            async def both():  # all or nothing: a config transformers refuses stops the load at once
                return await runner.gather([runner.detached(model_parts), _stream_weights(base, request, guess)])

            try:
                (transformers, hf_config, cls, create, dtype), (plan, state_dict, read) = runner.run(both)
            except BaseException:
                given_up.set()  # the folder goes with this call: the thread must not read it after
                raise
            if create != guess:  # transformers read the config otherwise: load again, in the dtype it keeps
                del state_dict
                plan, state_dict, read = runner.run(lambda: _stream_weights(base, request, create))
            if converted := _converted(plan, create):
                from ..api import _collect

                for target, names in _targets(cls, hf_config, create, converted).items():
                    part = replace(request, source=base, names=names, dtype=target, read=read)  # headers known
                    state_dict.update(runner.run(lambda: _collect(part)))
            state_dict = _reading_order(state_dict, plan)
        kwargs = dict(hf_kwargs, dtype=dtype)
        if request.device.type != "cpu":
            kwargs.setdefault("device_map", {"": request.device})
        try:
            result = cls.from_pretrained(None, config=str(folder), state_dict=state_dict, **kwargs)
        except BaseException as exc:  # transformers refused the model: a kept error must not keep its weights
            state_dict.clear()
            runner.shed_callees(exc)
            raise
        del state_dict
        model = result[0] if isinstance(result, tuple) else result
        model.config.name_or_path = redact_url(source)  # configs get logged (W&B, MLflow): no tokens in them
        if model.can_generate() and "generation_config" not in hf_kwargs:
            from transformers.models.auto.auto_factory import _BaseAutoModelClass

            auto = isinstance(model_class, type) and issubclass(model_class, _BaseAutoModelClass)
            model.generation_config = _generation_config(transformers, folder, {} if auto else hf_kwargs)
    return result
