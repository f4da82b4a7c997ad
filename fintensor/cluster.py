"""Past one machine: fintensor's own tensor and feature builds as Ray tasks over blocks of stocks, and
its training function under Ray Train.

The store's ``symbol=`` partitions give each task whole, independent histories, so a block of stocks
needs no overlap with its neighbours: a task runs ``ft.build`` on its block (reading the store from its
path, which every node must see) and then ``ft.features.compute``; the driver assembles the blocks along
the stock axis into exactly the tensor the single-process call returns (values, mask, coords and meta).
Ray is optional (``pip install 'fintensor[ray]'``); these functions are the bodies of
``engine="ray"`` in ``ft.build`` / ``ft.features.compute`` (found through ``builder.ENGINES``: the
single-process modules never import this one) and of the CLI's ``--ray [ADDRESS]``.

Blocks never reach the tensor cache; only a fully assembled build is cached, under the key the
single-process ``ft.build`` uses, so either path finds the other's entry.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from . import builder as _builder
from . import calendars as _calendars
from . import checks
from .errors import BadInputError, FintensorError
from .schema import interval_kind, parse_interval
from .store import Store
from .tensor import StockTensor

__all__ = ["ClusterError", "connect", "plan_blocks", "build", "features", "train", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'fintensor[ray]'"
#: Bytes of one block's (time, block, feature) result a task aims at (0.5-1 GB keeps tasks few and
#: their memory bounded; see README "Past one machine").
TARGET_BLOCK_BYTES = 768 * 2**20
#: Test hook: "crash-once:MARKER:SYMBOL" makes the task holding SYMBOL die (os._exit) the first time
#: (creating MARKER), "crash:SYMBOL" every time, "raise:SYMBOL" raises every time.
FAULT_ENV = "FINTENSOR_CLUSTER_FAULT"
#: Meta entries that are one value per symbol: merged across blocks, in symbol order.
_PER_SYMBOL_META = ("store_checksums", "rows")
#: what ``ft.build(engine="ray", engine_options=...)`` and ``ft.features.compute(engine="ray", ...)`` pass on
ENGINE_OPTIONS = ("address", "num_cpus", "block_size", "retries", "progress")


class ClusterError(FintensorError):
    """A block of the Ray build failed after its retries (the message names the block's symbols), or the
    cluster asked for cannot be joined."""


# ------------------------------------------------------------------------------------------ Ray
def _ray():
    """The ray module, or one clear error saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise BadInputError(f"fintensor.cluster (and --ray) needs Ray, which is not installed here ({exc}); "
                            f"install it with {INSTALL_HINT}, or leave engine unset to build in this process") from None
    return ray


def connect(address: str | None = None, *, num_cpus: int | None = None):
    """Join a Ray cluster and return the ray module: ``address="auto"`` (or "ray://host:port", "host:port")
    = an existing cluster, None = start a local one (``num_cpus``: its size; default all cores).
    A session already connected (``ray.init`` called before) is reused as it is."""
    if address is not None and not (isinstance(address, str) and address.strip()):
        raise BadInputError(f"address must be 'auto', 'HOST:PORT' or 'ray://HOST:PORT', got {address!r}")
    checks.optional(checks.positive_int, "num_cpus", num_cpus)
    ray = _ray()
    if ray.is_initialized():
        return ray
    if address is None:
        # offline local clusters: Ray's token auth only guards a cluster other users could reach
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:  # no cluster there, or a malformed address
            raise ClusterError(f"cannot join a Ray cluster at {address!r} ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); start one with "
                               "`ray start --head` (then address='auto', CLI --ray auto), or give no address for "
                               "a local cluster") from None
    return ray


def _cluster_cpus(ray) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def plan_blocks(symbols: Sequence[str], n_time: int, n_features: int, *, block_size: int | None = None,
                workers: int = 1, itemsize: int = 4) -> list[list[str]]:
    """Consecutive blocks of ``symbols``: ``block_size`` each, or as many as keep one block's
    ``n_time x block x n_features x itemsize`` bytes near TARGET_BLOCK_BYTES, and at least two blocks
    per worker (so a slow block does not leave the others idle)."""
    if block_size is None:
        by_bytes = max(1, TARGET_BLOCK_BYTES // max(1, n_time * n_features * itemsize))
        by_workers = max(1, math.ceil(len(symbols) / (2 * workers)))
        block_size = min(by_bytes, by_workers)
    return [list(symbols[i:i + block_size]) for i in range(0, len(symbols), block_size)]


# ------------------------------------------------------------------------------------ the task
def _fault_hook(fault: str | None, syms: Sequence[str]) -> None:
    """The FAULT_ENV test hook (read by the driver and passed in, so it reaches already-running workers)."""
    if not fault:
        return
    kind, _, rest = fault.partition(":")
    marker, _, symbol = rest.rpartition(":")
    if symbol not in syms:
        return
    if kind == "crash-once":
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # only the first attempt wins
        except FileExistsError:
            return
        os.close(fd)
        os._exit(17)
    if kind == "crash":
        os._exit(17)
    if kind == "raise":
        raise RuntimeError(f"injected failure in the block holding {symbol}")


def _run_block(syms: list[str], build_kwargs: dict | None, tensor: StockTensor | None, spec: Any,
               feature_kwargs: dict | None, fault: str | None) -> dict:
    """One block: build its stocks (or take the given slice), then compute features when ``spec`` is set.
    Returns numpy arrays (zero-copy through Ray's object store) plus coords and meta."""
    from . import features as _features

    _fault_hook(fault, syms)
    st = _builder.build(syms, cache=False, **build_kwargs) if tensor is None else tensor
    if spec is not None:
        st = _features.compute(st, spec, **(feature_kwargs or {}))
    return {"values": st.values.numpy(), "mask": st.mask.numpy(), "dims": st.dims, "coords": st.coords,
            "meta": st.meta}


# ---------------------------------------------------------------------------------- the driver
def _progress(enabled: bool | None, total: int, what: str):
    """A rich bar on a TTY (``enabled=None``), or nothing."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   transient=True)
    bar.start()
    bar.add_task(what, total=total)
    return bar


def _symbol_text(syms: Sequence[str]) -> str:
    return ", ".join(syms[:6]) + (f" ... ({len(syms)} symbols)" if len(syms) > 6 else "")


def _run_blocks(ray, blocks: list[list[str]], make_args: Callable[[list[str]], tuple], *, retries: int,
                progress: bool | None, what: str, in_order: Callable[[dict], None] | None = None) -> list[dict]:
    """Submit one task per block (retried by Ray up to ``retries`` times when its worker dies), collect
    results in block order; a block that still fails cancels the rest and raises ClusterError.
    ``in_order``: called with each result in block order as soon as its predecessors are done, and the
    result then dropped (the driver holds only blocks that finished ahead of their turn)."""
    # a dead worker (killed, out of memory, node lost) or an I/O error is retried; a bug or bad data is not
    task = ray.remote(_run_block).options(max_retries=retries, retry_exceptions=[OSError])
    fault = os.environ.get(FAULT_ENV) or None
    refs = [task.remote(*make_args(b), fault) for b in blocks]
    index = {r: i for i, r in enumerate(refs)}
    results: list[dict | None] = [None] * len(refs)
    bar = _progress(progress, len(refs), what)
    pending = list(refs)
    handed = 0
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = index[done[0]]
            try:
                results[i] = ray.get(done[0])
            except Exception as exc:  # RayTaskError (raised in the task) or a worker that kept dying
                for r in pending:
                    ray.cancel(r, force=True)
                cause = getattr(exc, "cause", None) or exc
                text = str(cause).strip().splitlines()
                retried = isinstance(cause, (OSError, ray.exceptions.WorkerCrashedError))
                tries = f" after {retries} retries" if retried else ""
                raise ClusterError(
                    f"block {i + 1}/{len(blocks)} of the Ray build ({_symbol_text(blocks[i])}) failed{tries}: "
                    f"{type(cause).__name__}: {text[0] if text else ''}; nothing was cached: fix the cause "
                    "(or build those symbols alone to see it) and rerun") from None
            while in_order is not None and handed < len(results) and results[handed] is not None:
                in_order(results[handed])
                results[handed] = {}  # handed over: free it
                handed += 1
            if bar is not None:
                bar.advance(bar.task_ids[0])
    finally:
        if bar is not None:
            bar.stop()
    return results  # type: ignore[return-value]


def _assemble(results: list[dict], blocks: list[list[str]], meta: dict) -> StockTensor:
    """Concatenate the blocks along the stock axis into one preallocated array."""
    dims = tuple(results[0]["dims"])
    axis = dims.index("stock")
    for r in results[1:]:
        for d in dims:
            if d != "stock" and not np.array_equal(r["coords"][d], results[0]["coords"][d]):
                raise ClusterError(f"the blocks disagree on the {d!r} axis; rebuild without Ray (ft.build) and "
                                   "report this as a bug")
    shape = list(results[0]["values"].shape)
    shape[axis] = sum(r["values"].shape[axis] for r in results)
    values = np.empty(shape, dtype=results[0]["values"].dtype)
    mask = np.empty(shape, dtype=bool)
    at = 0
    for r in results:
        n = r["values"].shape[axis]
        where = (slice(None),) * axis + (slice(at, at + n),)
        values[where] = r["values"]
        mask[where] = r["mask"]
        at += n
    coords = {d: (np.concatenate([r["coords"]["stock"] for r in results]) if d == "stock" else results[0]["coords"][d])
              for d in dims}
    if list(coords["stock"]) != [s for b in blocks for s in b]:
        raise ClusterError("the assembled stock axis is not the requested symbol order; report this as a bug")
    return StockTensor(torch.from_numpy(values), dims, coords, torch.from_numpy(mask), meta)


def _merge_meta(results: list[dict], blocks: list[list[str]], fingerprint: str | None) -> dict:
    """The meta the single-process build writes, from the blocks' metas (per-symbol entries merged)."""
    metas = [r["meta"] for r in results]
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for m in metas for k in m):
        have = [m[key] for m in metas if key in m]
        if key == "source":
            names = sorted({s for v in have for s in (v if isinstance(v, list) else [v])})
            out[key] = names[0] if len(names) == 1 else names
        elif key == "adjusted_from":
            notes: dict[str, str] = {}
            for m, syms in zip(metas, blocks):
                v = m[key]
                notes.update(v if isinstance(v, dict) else dict.fromkeys(syms, v))
            out[key] = notes if len(set(notes.values())) > 1 else next(iter(notes.values()))
        elif key in _PER_SYMBOL_META:
            out[key] = {k: v for h in have for k, v in h.items()}
        elif key == "store_fingerprint" and fingerprint is not None:
            out[key] = fingerprint
        elif all(v == have[0] for v in have) and len(have) == len(metas):
            out[key] = have[0]
        else:
            raise ClusterError(f"the blocks disagree on meta[{key!r}] ({have[:2]}...); rebuild without "
                               "Ray (ft.build) and report this as a bug")
    return out


# ----------------------------------------------------------------------------------- build
def _plan(symbols, start, end, fields="close", interval="1d", store=None, calendar=None, adjust="full",
          fill=None, dtype=torch.float32, label="start") -> tuple[_builder.BuildPlan, dict]:
    """``ft.build``'s own checks and cache key (``builder.plan_build``, on the driver: bad input is refused
    before any cluster starts), and the arguments each block's ``ft.build`` gets."""
    plan = _builder.plan_build(symbols, start, end, fields, interval, store, calendar, adjust, fill, dtype, label)
    if plan.request["calendar"] == _calendars.DATA:
        raise BadInputError("calendar='data' aligns on the stored dates of all symbols together, which a block "
                            "of them does not see; name the exchange (e.g. calendar='XNYS') or build without Ray")
    # the store by path or URI (a Store object holds this process's state; a remote store's URI lets each
    # worker mirror only the parts its block reads)
    kwargs = dict(start=start, end=end, fields=plan.fields, interval=interval, store=plan.store.uri,
                  calendar=calendar, adjust=adjust, fill=fill, dtype=plan.dtype, label=label)
    return plan, kwargs


def _check_common(block_size, retries, progress) -> None:
    checks.optional(checks.positive_int, "block_size", block_size)
    checks.nonnegative_int("retries", retries)
    checks.optional(checks.boolean, "progress", progress)


def build(symbols: str | Iterable[str], start, end, fields: str | Sequence[str] = ("close",), *,
          interval: str = "1d", store: Store | str | os.PathLike | None = None, calendar: str | None = None,
          adjust: str = "full", fill=None, dtype: torch.dtype = torch.float32, cache: bool = True,
          address: str | None = None, num_cpus: int | None = None, block_size: int | None = None,
          retries: int = 3, progress: bool | None = None, label: str = "start") -> StockTensor:
    """``ft.build`` (daily, weekly, monthly bars) on a Ray cluster: the same arguments, the same checks,
    warnings and cache entry, and the same tensor, bit for bit.

    ``address``: "auto" = an existing cluster, None = a local one of ``num_cpus``. ``block_size``:
    symbols per task (default: see ``plan_blocks``). ``retries``: how often Ray reruns a block whose
    worker died. ``progress``: a bar (default: on a TTY). ``cache``: look up / keep the assembled
    tensor under the same key as ``ft.build`` (blocks are never cached).
    """
    _check_common(block_size, retries, progress)
    if interval_kind(parse_interval(interval)) == "intraday":
        raise BadInputError(f"Ray builds daily, weekly or monthly bars; build interval {interval!r} "
                            "in one process (ft.build; the CLI without --ray)")
    plan, kwargs = _plan(symbols, start, end, fields, interval, store, calendar, adjust, fill, dtype, label)

    def make() -> StockTensor:
        ray = connect(address, num_cpus=num_cpus)
        blocks = plan_blocks(plan.syms, len(plan.days), len(plan.fields), block_size=block_size,
                             workers=_cluster_cpus(ray), itemsize=plan.dtype.itemsize)
        results = _run_blocks(ray, blocks, lambda b: (b, kwargs, None, None, None), retries=retries,
                              progress=progress, what=f"building {len(plan.syms)} stocks on Ray")
        return _assemble(results, blocks, _merge_meta(results, blocks, plan.request["fingerprint"]))

    tensor = _builder._cached(plan.store, plan.request, bool(cache), make)
    _builder._warn_unkept(tensor, plan.syms, *plan.row_range)
    return tensor


# -------------------------------------------------------------------------------- features
def features(source: StockTensor | Mapping[str, Any], spec: str | Iterable | Mapping = "alpha158", *,
             min_periods: int | None = None, dtype=None, address: str | None = None, num_cpus: int | None = None,
             block_size: int | None = None, retries: int = 3, progress: bool | None = None,
             out: str | os.PathLike | None = None) -> StockTensor:
    """``ft.features.compute`` on a Ray cluster, bit for bit the single-process result.

    ``out=PATH``: the blocks are written, in stock order as they arrive, into an on-disk panel
    (``fintensor.ondisk``; the same files ``compute(out=PATH)`` writes) and the map is returned, so the
    whole feature panel never sits in the driver's memory.

    ``source``: a (time, stock, feature) StockTensor (its stock blocks are shipped to the tasks), or the
    keyword arguments of ``ft.build`` ({"symbols": [...], "start": ..., "end": ..., "fields": [...],
    "store": PATH, ...}): each task then builds its own block from the store and computes its features,
    so the whole OHLCV panel never sits in one process. The intermediate build is not cached.
    """
    from . import features as _features

    _check_common(block_size, retries, progress)
    wanted = _features.names(spec)  # an unknown feature is refused before any cluster starts
    feature_kwargs = {"min_periods": min_periods, "dtype": dtype}
    if isinstance(source, Mapping):
        args = dict(source)
        unknown = set(args) - {"symbols", "start", "end", "fields", "store", "calendar", "adjust", "fill",
                               "dtype", "interval", "cache", "label"}
        if unknown or not {"symbols", "start", "end"} <= set(args):
            raise BadInputError(f"features(source=dict) takes ft.build's arguments (symbols, start, end, fields, "
                                f"store, calendar, adjust, fill, dtype, interval, label); got {sorted(args)}")
        args.pop("cache", None)
        if interval_kind(parse_interval(args.get("interval", "1d"))) == "intraday":
            raise BadInputError("Ray builds daily, weekly or monthly bars; compute intraday features "
                                "in one process (ft.build; the CLI without --ray)")
        plan, kwargs = _plan(**args)
        syms, n_time, width, itemsize = plan.syms, len(plan.days), len(wanted) + len(plan.fields), \
            plan.dtype.itemsize
        make_args = lambda b: (b, kwargs, None, spec, feature_kwargs)  # noqa: E731
        fingerprint = plan.request["fingerprint"]
    elif isinstance(source, StockTensor):
        if sorted(source.dims) != ["feature", "stock", "time"]:
            raise BadInputError(f"features need a (time, stock, feature) tensor, got dims {tuple(source.dims)}")
        syms, n_time = [str(s) for s in source.coords["stock"]], source.shape[source.dims.index("time")]
        width, itemsize = len(wanted) + source.shape[source.dims.index("feature")], source.values.element_size()
        position = {s: i for i, s in enumerate(syms)}
        cpu = source.to("cpu")

        def make_args(b):
            return (b, None, cpu.isel(stock=slice(position[b[0]], position[b[-1]] + 1)), spec, feature_kwargs)
        fingerprint = None
    else:
        raise BadInputError(f"features(source=...) takes a (time, stock, feature) StockTensor or a dict of "
                            f"ft.build's arguments, got {type(source).__name__}")
    if out is not None:
        from .fileio import check_output_path

        check_output_path(out, "feature panel") if not Path(out).is_dir() else None
    ray = connect(address, num_cpus=num_cpus)
    blocks = plan_blocks(syms, n_time, width, block_size=block_size, workers=_cluster_cpus(ray), itemsize=itemsize)
    what = f"features of {len(syms)} stocks on Ray"
    if out is not None:
        return _features_to_disk(ray, blocks, make_args, Path(out), syms, fingerprint, retries, progress, what)
    results = _run_blocks(ray, blocks, make_args, retries=retries, progress=progress, what=what)
    result = _assemble(results, blocks, _merge_meta(results, blocks, fingerprint))
    if isinstance(source, StockTensor) and source.device.type != "cpu":
        result = result.to(source.device)
    return result


def _features_to_disk(ray, blocks, make_args, out: Path, syms: list[str], fingerprint, retries, progress,
                      what: str) -> StockTensor:
    """Blocks appended to an ondisk.PanelWriter in stock order; committed (atomically) only when all are in."""
    from . import ondisk

    state: dict[str, Any] = {"metas": []}

    def write(result: dict) -> None:
        if "writer" not in state:
            c = result["coords"]
            state["writer"] = ondisk.PanelWriter(out, c["time"], np.array(syms), c["feature"],
                                                 result["values"].dtype)
        state["writer"].write(result["values"].transpose(1, 0, 2), result["mask"].transpose(1, 0, 2))
        state["metas"].append({"meta": result["meta"]})

    try:
        _run_blocks(ray, blocks, make_args, retries=retries, progress=progress, what=what, in_order=write)
        writer = state["writer"]
        writer.meta = ondisk.json_meta(_merge_meta(state["metas"], blocks, fingerprint))
        writer.commit()
    finally:
        if "writer" in state:
            state["writer"].__exit__(None)
    return ondisk.load(out, verify=False)


# ------------------------------------------------------------------------------------ training
def _train_worker(config: dict) -> None:
    """Ray Train's per-worker loop: fintensor's own ``train`` (it joins the process group Ray Train set up)."""
    from .trainer import train as _train

    _train(config["features"], config["labels"], config["config"], **config["options"])


def train(features, labels, config=None, *, num_workers: int = 2, use_gpu: bool = False,
          address: str | None = None, num_cpus: int | None = None, **options):
    """``ft.train`` under Ray Train's ``TorchTrainer`` on ``num_workers`` processes (DDP; gloo on CPU, NCCL
    with ``use_gpu``), for users who live on Ray; torchrun remains the plain way (README).

    ``options`` are ``ft.train``'s (``out`` defaults to a new temporary directory, which must be on a file
    system every worker sees). Returns rank 0's checkpoint (``fintensor.trainer.read_checkpoint(out)``):
    ``.model()`` the trained network, ``.info`` the history, metrics and world size. Ray Train v2 no longer
    returns metrics reported without a checkpoint, so they come from the checkpoint file rank 0 wrote.
    """
    checks.positive_int("num_workers", num_workers)
    checks.boolean("use_gpu", use_gpu)
    from .config import make_config
    from .trainer import read_checkpoint

    cfg = make_config(config, options)  # bad options are refused here, before any cluster starts
    if cfg.out is None:
        cfg.out = tempfile.mkdtemp(prefix="fintensor-ray-train-")
    connect(address, num_cpus=num_cpus)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"features": features, "labels": labels, "config": cfg, "options": {}},
        scaling_config=ScalingConfig(num_workers=int(num_workers), use_gpu=bool(use_gpu)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(storage_path=str(Path(cfg.out).resolve() / "ray"), name="fintensor"),
    )
    try:
        trainer.fit()
    except Exception as exc:
        raise ClusterError(f"training on Ray ({num_workers} workers) failed: {type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    return read_checkpoint(Path(cfg.out))
