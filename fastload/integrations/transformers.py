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

No double copies: the tensors are created in the dtype ``transformers`` will
keep (the ``dtype`` asked for; for ``"auto"``, the default, the config's) and
on ``device``, so the ``.to(device, dtype)`` ``transformers`` applies is a
no-op and the model's parameters are fastload's tensors. Weights the model
keeps in float32 while the rest is converted (``_keep_in_fp32_modules``) are
created in float32. Fusions (stacking MoE experts) copy, as they do in
``transformers``.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .. import runner
from ..errors import ConfigError, SourceNotFoundError
from ..format import INDEX_NAME, SINGLE_NAME
from ..pipeline import make_request
from ..resolve import join
from ..sources import Transports, read_bytes, scheme_of
from ..sources.hub_refs import with_revision
from ..sources.local import to_path
from ..trace import NULL_TRACE

#: Files besides the weights that building the model reads (tokenizers are not part of a model).
MODEL_FILES = ("config.json", "generation_config.json")
MAX_MODEL_FILE_BYTES = 64 << 20
_OURS = ("state_dict", "pretrained_model_name_or_path")


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
        source = await transports.for_url(source).locate(source)
        scheme = scheme_of(source)
    if scheme == "local":
        path = to_path(source)
        if not path.is_dir():
            raise SourceNotFoundError(f"from_pretrained needs a model directory, and {source} is not one", url=source)
        return str(path)
    return source if source.endswith("/") else source + "/"


def _in_subfolder(source: str, subfolder: str) -> str:
    """``source``'s sub-directory ``subfolder`` (transformers' ``subfolder=``), which must stay inside it."""
    parts = subfolder.replace("\\", "/").strip("/").split("/")
    if subfolder.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"subfolder must be a relative path inside the model directory, got {subfolder!r}")
    if scheme_of(source) == "local":
        return os.path.join(str(to_path(source)), *parts)
    return source.rstrip("/") + "/" + "/".join(parts) + "/"


def _variant_name(name: str, variant: str) -> str:
    """transformers' ``variant=`` naming: ``model.safetensors`` -> ``model.<variant>.safetensors``."""
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{variant}.{ext}"


async def _stage(source: str, folder: Path, config, variant: str | None = None) -> str:
    """Fetch the non-weight model files into ``folder``; return where the weights are: the model directory,
    or with ``variant`` its variant's index or single file."""
    transports = Transports(config, NULL_TRACE)
    try:
        base = await _model_dir(source, transports)
        for name in MODEL_FILES:
            url = join(base, name)
            transport = transports.for_url(url)
            try:
                info = await transport.stat(url)
            except SourceNotFoundError:
                if name == "config.json":
                    raise SourceNotFoundError(f"no config.json in {source}: not a transformers model directory",
                                              url=url) from None
                continue
            if info.size > MAX_MODEL_FILE_BYTES:
                raise ConfigError(f"{url}: {info.size} bytes is too large for a model file")
            (folder / name).write_bytes(await read_bytes(transport, info, 0, info.size))
        if not variant:
            return base
        names = [_variant_name(n, variant) for n in (INDEX_NAME, SINGLE_NAME)]
        for name in names:
            try:
                await transports.for_url(join(base, name)).stat(join(base, name))
            except SourceNotFoundError:
                continue
            return join(base, name)
        raise SourceNotFoundError(f"no {names[1]} or {names[0]} in {source} (variant={variant!r})",
                                  url=join(base, names[1]))
    finally:
        await transports.aclose()


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


def _kept_in_float32(cls, dtype) -> re.Pattern | None:
    """Which weights ``cls`` keeps in float32 when the rest is in ``dtype`` (its ``dtype_plan``), as a regex
    searched the way ``transformers`` searches it (``*`` is ``.*``)."""
    import torch

    def listed(value) -> list[str]:
        return [p for p in value if isinstance(p, str)] if isinstance(value, (list, tuple, set)) else []

    patterns = listed(getattr(cls, "_keep_in_fp32_modules", None)) if dtype == torch.float16 else []
    if dtype in (torch.float16, torch.bfloat16):
        patterns += listed(getattr(cls, "_keep_in_fp32_modules_strict", None))
    return re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in patterns)) if patterns else None


def _load_weights(base: str, request, create, kept: re.Pattern | None) -> dict:
    """The state dict, each tensor created in the dtype the model keeps it in."""
    from ..api import load, plan

    load_as = dict(device=request.device, config=request.config)
    if create is None or kept is None:
        return load(base, dtype=create, trace=request.trace, **load_as)
    names = [t.name for t in plan(base, config=request.config, trace=request.trace).tensors]
    rest = [n for n in names if not kept.search(n)]
    state_dict = load(base, names=rest, dtype=create, trace=request.trace, **load_as) if rest else {}
    fp32 = [n for n in names if kept.search(n)]
    if fp32:
        import torch

        state_dict.update(load(base, names=fp32, dtype=torch.float32, trace=request.trace, **load_as))
    return state_dict


def _generation_config(transformers, folder: Path):
    """What ``transformers`` loads for a local directory: the file, else one made from ``config.json``."""
    try:
        return transformers.GenerationConfig.from_pretrained(folder)
    except OSError:
        return transformers.GenerationConfig.from_pretrained(folder, config_file_name="config.json",
                                                             _from_model_config=True)


def from_pretrained(source, *, model_class=None, device="cpu", dtype=None, config=None, trace=None, **hf_kwargs):
    """A ``transformers`` model from a model directory (``config.json`` + safetensors weights) at ``source``.

    ``source`` is a local path, an ``http(s)://`` base URL, an ``s3://`` prefix or ``hf://org/name[@revision]``.
    ``model_class`` is a concrete ``transformers`` class or an Auto class; by default the config's
    ``architectures`` chooses, as ``transformers`` does. ``dtype`` is ``"auto"`` (the default, as in
    ``transformers``), a torch dtype or its name. ``config`` and ``trace`` are fastload's (``LoadConfig``,
    ``Trace``: the trace covers the weights). Other keyword arguments go to ``transformers``' ``from_pretrained``
    (``output_loading_info=True``, ``attn_implementation=...``, config overrides, ...).
    """
    transformers = _transformers()
    taken = [k for k in _OURS if k in hf_kwargs]
    if taken:
        raise ConfigError(f"from_pretrained sets {taken[0]!r} itself")
    if dtype is None and "torch_dtype" in hf_kwargs:
        dtype = hf_kwargs.pop("torch_dtype")
    request = make_request(source, device=device, config=config, trace=trace)  # checks device, config, trace
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise ConfigError(f"from_pretrained needs one model directory (path or URL), got {source!r}")
    if "revision" in hf_kwargs:  # a Hub revision: part of an hf:// source
        if scheme_of(source) != "hf":
            raise ConfigError("revision applies to hf:// sources only")
        source = with_revision(source, hf_kwargs.pop("revision"))
    subfolder, variant = hf_kwargs.pop("subfolder", None) or "", hf_kwargs.pop("variant", None)
    if variant is not None and (not isinstance(variant, str) or not re.fullmatch(r"[\w.-]+", variant)):
        raise ConfigError(f"variant must be a plain name such as 'fp16', got {variant!r}")
    model_dir = _in_subfolder(source, subfolder) if subfolder else source
    with tempfile.TemporaryDirectory(prefix="fastload-model-") as tmp:
        folder = Path(tmp)
        base = runner.run(lambda: _stage(model_dir, folder, request.config, variant))
        hf_config = transformers.AutoConfig.from_pretrained(folder)
        cls = _model_class(transformers, hf_config, model_class)
        create, dtype = _dtypes(dtype, hf_config)
        state_dict = _load_weights(base, request, create, _kept_in_float32(cls, create))
        kwargs = dict(hf_kwargs, dtype=dtype)
        if request.device.type != "cpu":
            kwargs.setdefault("device_map", {"": request.device})
        result = cls.from_pretrained(None, config=str(folder), state_dict=state_dict, **kwargs)
        del state_dict
        model = result[0] if isinstance(result, tuple) else result
        model.config.name_or_path = source
        if model.can_generate() and "generation_config" not in hf_kwargs:
            model.generation_config = _generation_config(transformers, folder)
    return result
