"""Inputs, arguments and outputs: one place that validates what every public function takes and
turns it into a (T, M) panel (and a result back into the input's type)."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .. import checks
from ..errors import BadInputError
from ..tensor import StockTensor

def _time_axis(dims: tuple) -> int:
    for name in ("time", "tick"):
        if name in dims:
            return dims.index(name)
    return 0


def _resolve_axis(axis, ndim: int, dims: tuple | None, default: int) -> int:
    if axis is None:
        return default
    if isinstance(axis, str):
        if dims is None or axis not in dims:
            raise BadInputError(f"axis {axis!r} is not a dimension of the input (dims: {dims}); "
                                "pass an int axis or one of the dims")
        return dims.index(axis)
    if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise BadInputError(f"axis {axis!r} is out of range for a {ndim}-D input; pass 0..{ndim - 1}")
    return int(axis) % ndim


class _Input:
    """An input unwrapped to an array (numpy, or torch for the torch path) plus how to wrap a result
    of the same shape back into the input's type."""

    def __init__(self, x, what: str, engine: str):
        self.tensor = x if isinstance(x, StockTensor) else None
        data = x.values if self.tensor is not None else x
        self.dims = tuple(self.tensor.dims) if self.tensor is not None else None
        self.is_torch = isinstance(data, torch.Tensor)
        if engine not in ("auto", "numba", "torch"):
            raise BadInputError(f"engine {engine!r} is unknown; use 'auto', 'numba' or 'torch'")
        self.use_torch = engine == "torch" or (self.is_torch and data.device.type != "cpu")
        if self.use_torch and engine == "numba":
            raise BadInputError("engine='numba' runs on the CPU; move the tensor with .cpu() first")
        if self.is_torch:
            data = data.detach()
            if not (data.is_floating_point() and data.dtype in (torch.float32, torch.float64)):
                data = data.to(torch.float64)
            self.device = data.device
            self.array = data if self.use_torch else data.numpy()
        else:
            array = np.asarray(data)
            if array.dtype not in (np.float32, np.float64):
                if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
                    raise BadInputError(f"{what} must be numeric, got dtype {array.dtype}")
                array = array.astype(np.float64)
            self.array = torch.from_numpy(array) if self.use_torch else array
        if self.array.ndim == 0 or self.array.ndim > 4:
            raise BadInputError(f"{what} must have 1 to 4 dimensions, got {self.array.ndim}")
        self.dtype = self.array.dtype

    @property
    def shape(self) -> tuple:
        return tuple(self.array.shape)

    def axis(self, axis, default: int | None = None) -> int:
        fallback = _time_axis(self.dims) if self.dims is not None else 0
        return _resolve_axis(axis, self.array.ndim, self.dims, fallback if default is None else default)

    def wrap(self, result):
        """Result (numpy or torch, input's shape) -> the input's type."""
        if self.is_torch or self.tensor is not None:
            if isinstance(result, np.ndarray):
                result = torch.from_numpy(result)
            result = result.to(self.device) if self.is_torch else result
        if self.tensor is not None:
            return self.tensor.with_values(result, mask=~torch.isnan(result))
        return result


def _panel(a, axis: int):
    """(T, M) C-contiguous view (or copy) of ``a`` with ``axis`` first."""
    width = math.prod(a.shape[:axis] + a.shape[axis + 1:])
    if isinstance(a, torch.Tensor):
        return torch.movedim(a, axis, 0).reshape(a.shape[axis], width).contiguous()
    return np.ascontiguousarray(np.moveaxis(a, axis, 0)).reshape(a.shape[axis], width)


def _unpanel(p, shape: tuple, axis: int):
    """Inverse of ``_panel`` for a result of the same shape."""
    moved = (shape[axis],) + shape[:axis] + shape[axis + 1:]
    if isinstance(p, torch.Tensor):
        return torch.movedim(p.reshape(moved), 0, axis)
    return np.moveaxis(p.reshape(moved), 0, axis)


def _check_out(out, inp: _Input):
    """The array to write into (numpy, or torch for torch and StockTensor inputs), validated."""
    if out is None:
        return None
    target = out.values if isinstance(out, StockTensor) else out
    wants_torch = inp.is_torch or inp.tensor is not None
    kind = "a torch.Tensor" if wants_torch else "a numpy array"
    if not isinstance(target, torch.Tensor if wants_torch else np.ndarray):
        raise BadInputError(f"out must be {kind} like the input, got {type(out).__name__}")
    dtype = inp.array.dtype
    if wants_torch and isinstance(dtype, np.dtype):
        dtype = torch.from_numpy(np.empty(0, dtype)).dtype
    if tuple(target.shape) != inp.shape or target.dtype != dtype:
        raise BadInputError(f"out has shape {tuple(target.shape)} and dtype {target.dtype}; the result "
                            f"needs shape {inp.shape} and dtype {dtype}")
    return target


def _apply(x, axis, out, engine: str, numba_fn: Callable, torch_fn: Callable, what: str = "x"):
    """Run one statistic along ``axis``: the numba kernel on a (T, M) panel, or the torch ops;
    write into ``out`` when given (directly when its layout allows, else through a copy)."""
    inp = _Input(x, what, engine)
    ax = inp.axis(axis)
    target = _check_out(out, inp)
    if inp.use_torch:
        with torch.no_grad():
            res = _unpanel(torch_fn(_panel(inp.array, ax)), inp.shape, ax)
    else:
        panel = _panel(inp.array, ax)
        dest = target.numpy() if isinstance(target, torch.Tensor) else target
        direct = (dest is not None and ax == 0 and dest.flags.c_contiguous
                  and not np.shares_memory(dest, inp.array))
        res2d = dest.reshape(panel.shape) if direct else np.empty_like(panel)
        if panel.size:
            numba_fn(panel, res2d)
        if direct:
            return inp.wrap(target)
        res = _unpanel(res2d, inp.shape, ax)
    return _deliver(inp, target, res)


def _deliver(inp: _Input, target, res):
    """The result in the input's type, copied into ``out`` (``target``) when one was given."""
    if target is None:
        return inp.wrap(res)
    if isinstance(target, torch.Tensor):
        target.copy_(torch.as_tensor(res))
    else:
        np.copyto(target, res)
    return inp.wrap(target)


RANK_METHODS = {"average": 0, "min": 1, "max": 2}
_UNSET = object()


def checked(*, window=_UNSET, min_periods=_UNSET, ddof=_UNSET, method=_UNSET, q=_UNSET, periods=_UNSET,
            com=None, span=None, halflife=None, alpha=None) -> dict:
    """Every public function's arguments, validated in one place (bottleneck's ``mover()``): pass
    the ones the function takes; get them back converted. ``min_periods`` defaults to the window
    when a window is given; without one (exponential weights) it is a non-negative count, at least
    1 as in pandas. com / span / halflife / alpha come back as ``com``, the center of mass."""
    args = {}
    if window is not _UNSET:
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise BadInputError(f"window must be a positive integer, got {window!r}")
        args["window"] = window = int(window)
        if min_periods is None:
            min_periods = window
        elif isinstance(min_periods, bool) or not isinstance(min_periods, (int, np.integer)) \
                or not 0 <= min_periods <= window:
            raise BadInputError(f"min_periods must be an integer from 0 to the window ({window}), "
                                f"got {min_periods!r}")
        args["min_periods"] = int(min_periods)
    elif min_periods is not _UNSET:
        args["com"] = center_of_mass(com, span, halflife, alpha)
        args["min_periods"] = max(checks.nonnegative_int("min_periods", min_periods), 1)  # as pandas
    if ddof is not _UNSET:
        args["ddof"] = checks.nonnegative_int("ddof", ddof)
    if method is not _UNSET:
        if method not in RANK_METHODS:
            raise BadInputError(f"method {method!r} is unknown; use one of {sorted(RANK_METHODS)}")
        args["method"] = method
    if q is not _UNSET:
        if isinstance(q, bool) or not isinstance(q, (int, float, np.floating)) or not 0.0 <= q <= 1.0:
            raise BadInputError(f"quantile q must be a number from 0 to 1, got {q!r}")
        args["q"] = float(q)
    if periods is not _UNSET:
        if isinstance(periods, bool) or not isinstance(periods, (int, np.integer)):
            raise BadInputError(f"periods must be an integer, got {periods!r}")
        args["periods"] = int(periods)
    return args


def center_of_mass(com, span, halflife, alpha) -> float:
    """pandas' decay (exactly one of com, span, halflife, alpha) as a center of mass."""
    given = {k: v for k, v in dict(com=com, span=span, halflife=halflife, alpha=alpha).items()
             if v is not None}
    if len(given) != 1:
        raise BadInputError("give exactly one of com, span, halflife, alpha "
                            f"(got {', '.join(given) or 'none'})")
    (name, value), = given.items()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise BadInputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if name == "com" and value >= 0:
        return value
    if name == "span" and value >= 1:
        return (value - 1) / 2
    if name == "halflife" and value > 0:
        return 1 / (1 - math.exp(math.log(0.5) / value)) - 1
    if name == "alpha" and 0 < value <= 1:
        return 1 / value - 1
    limits = {"com": ">= 0", "span": ">= 1", "halflife": "> 0", "alpha": "in (0, 1]"}
    raise BadInputError(f"{name} must be {limits[name]}, got {value!r}")


