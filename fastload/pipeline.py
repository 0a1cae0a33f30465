"""The async core: resolve -> header -> plan -> fetch -> sink, for one load.

Everything here runs inside one event loop; the sync API in ``api.py`` meets it
through ``runner.py`` and nowhere else.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .buffers import BufferPool
from .config import LoadConfig
from .errors import ConfigError, DeviceError
from .fetch import run_plan
from .plan import LoadPlan, Shard, build_plan
from .resolve import read_header, resolve
from .runner import gather, guarded, own_workers
from .sinks import HostSink, Sink
from .sources import Transports
from .sources.local import check_not_pulling_into
from .trace import Trace, as_trace


@dataclass(frozen=True)
class LoadRequest:
    source: Any
    device: torch.device
    dtype: torch.dtype | None
    names: Sequence[str] | None
    shard: Shard | None
    config: LoadConfig
    trace: Trace
    progress: Callable[[int, int], None] | None
    # Internal (from_pretrained): given the plan of every tensor, the names to load instead (None: all of them),
    # so that a load can choose by what the headers say without reading them twice.
    select: Callable[[LoadPlan], Sequence[str] | None] | None = None
    # Internal (from_pretrained): ``seen`` gets (resolved files, headers) once read; a later load of other
    # tensors of the same checkpoint passes them as ``read`` and plans without reading them again.
    seen: Callable[[Any], None] | None = None
    read: Any = None
    # Internal (from_pretrained): (URL, ObjectInfo) of the weights file already looked up, which resolving
    # ``source`` (that URL) takes instead of asking again.
    found: tuple[str, Any] | None = None


def make_request(source, *, device="cpu", dtype=None, names=None, shard=None, config=None, trace=None,
                 progress=None) -> LoadRequest:
    """Check and normalise the public arguments (shared by every entry point)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"not a device: {device!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device} is not supported (use cpu or cuda[:N])")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if not dtype.startswith("torch.") else getattr(torch, dtype[6:], None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError("dtype must be a torch dtype or its name, e.g. 'bfloat16'")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ConfigError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    if dtype is not None:
        try:  # floating, yet not every one is a conversion target (float4_e2m1fn_x2 packs two values a byte)
            torch.zeros(1).to(dtype)
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            raise ConfigError(f"dtype {dtype} is not one torch converts to ({str(exc).splitlines()[0]})") from None
    if isinstance(names, str):
        names = [names]
    elif names is not None:
        try:
            names = list(names)
        except TypeError:
            raise ConfigError(f"names must be a tensor name or an iterable of names, got {names!r}") from None
        if bad := [n for n in names if not isinstance(n, str)]:
            raise ConfigError(f"names must be strings, got {bad[:5]!r}")
    if shard is not None and not isinstance(shard, Shard):
        raise ConfigError("shard must be a fastload.Shard")
    if config is None:
        config = LoadConfig()
    elif not isinstance(config, LoadConfig):
        raise ConfigError("config must be a fastload.LoadConfig")
    check_progress(progress)
    check_not_pulling_into(source)
    return LoadRequest(source, device, dtype, names, shard, config, as_trace(trace), guarded(progress))


def check_progress(progress) -> None:
    """``progress`` is None or a plain callable: a coroutine function's calls would only make coroutines that
    nobody awaits (no progress shown at all)."""
    if progress is None:
        return
    if not callable(progress):
        raise ConfigError("progress must be a callable(done_bytes, total_bytes)")
    if inspect.iscoroutinefunction(progress) or inspect.iscoroutinefunction(getattr(progress, "__call__", None)):
        raise ConfigError("progress must be a plain callable(done_bytes, total_bytes), not a coroutine function: "
                          "it is called from the load's own loop and nothing awaits what it returns")


async def make_plan(request: LoadRequest, transports: Transports) -> LoadPlan:
    trace = request.trace
    if request.read is not None:
        resolved, headers = request.read
    else:
        with trace.span("resolve"):
            resolved = await resolve(request.source, transports, found=request.found)
        with trace.span("header"):
            headers = await gather(read_header(transports, info, i) for i, info in enumerate(resolved.files))
        if request.seen is not None:
            request.seen((resolved, headers))
    with trace.span("plan"):
        plan = build_plan(headers, resolved.files, config=request.config, names=request.names,
                          shard=request.shard, indexes=resolved.indexes)
        if request.select is not None and (names := request.select(plan)) is not None:
            plan = build_plan(headers, resolved.files, config=request.config, names=names,
                              shard=request.shard, indexes=resolved.indexes)
        return plan


def make_sink(plan: LoadPlan, request: LoadRequest) -> Sink:
    if request.device.type == "cuda":
        try:
            from .sinks.cuda import CudaSink
        except ImportError as exc:  # pragma: no cover - depends on the build
            raise DeviceError(f"device {request.device} needs fastload's CUDA sink: {exc}") from exc
        return CudaSink(plan, device=request.device, dtype=request.dtype, trace=request.trace)
    return HostSink(plan, dtype=request.dtype, trace=request.trace)


async def plan_only(request: LoadRequest) -> LoadPlan:
    transports = Transports(request.config, request.trace)
    request.trace.begin()  # (right before the try: each begin has its finish)
    error = None
    try:
        return await make_plan(request, transports)
    except BaseException as exc:
        error = exc
        raise
    finally:
        await transports.aclose()
        request.trace.finish(error)


async def produce(request: LoadRequest, put: Callable[[str, torch.Tensor], None],
                  on_plan: Callable[[LoadPlan], None] | None = None) -> None:
    """Run one load, calling ``put(name, tensor)`` for each tensor as it completes."""
    async with own_workers():
        await _produce(request, put, on_plan)


async def _produce(request: LoadRequest, put: Callable[[str, torch.Tensor], None],
                   on_plan: Callable[[LoadPlan], None] | None) -> None:
    trace, config = request.trace, request.config
    transports = Transports(config, trace)
    trace.begin()  # (right before the try: each begin has its finish)
    sink = error = None
    try:
        plan = await make_plan(request, transports)
        transports.expect(plan)  # checksum verification: which files this load reads whole
        if on_plan is not None:
            on_plan(plan)
        with trace.span("alloc"):
            sink = make_sink(plan, request)
        pool_bytes = config.host_buffer_bytes
        if config.direct_io and any(sink.staged(c) for c in plan.chunks):
            # One budget for all memory in flight: staging and the O_DIRECT scratch share it.
            pool_bytes = max(2 * plan.chunk_bytes, config.host_buffer_bytes // 2)
            transports.set_direct_budget(config.host_buffer_bytes - pool_bytes)
        pool = BufferPool(plan.chunk_bytes, max(2, pool_bytes // plan.chunk_bytes), pin=request.device.type == "cuda")

        def emit(indices: list[int]) -> None:
            for i in indices:
                put(plan.tensors[i].name, sink.tensor(i))

        emit(sink.initially_complete())
        done = 0
        total = plan.output_bytes  # progress counts the result's bytes (stored dtype), not the spans read

        def progress(n: int) -> None:
            nonlocal done
            done += n
            request.progress(done, total)

        if request.progress is not None:
            request.progress(0, total)  # the total before the first byte, as pull reports it (and a load with
            # nothing to fetch reports that it is complete)
        await run_plan(plan, transports=transports, sink=sink, pool=pool, trace=trace, emit=emit,
                       progress=progress if request.progress is not None else None,
                       workers=config.max_concurrency)
    except BaseException as exc:
        error = exc
        raise
    finally:
        closing = trace.now()
        try:  # a cancel may land here too (a stream left as its load ends): the trace is written all the same
            if sink is not None:
                sink.close()
            await transports.aclose()
        finally:
            trace.interval("close", closing, trace.now())
            trace.finish(error)  # stops the clock; writes trace="x.json"; emits OpenTelemetry spans
