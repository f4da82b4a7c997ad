"""fintensor: market data as labeled 0D-4D tensors.

Modules are named for the stage (builder, trainer) so they never shadow the functions ft.build and
ft.train that this package re-exports.

sources -> Parquet store -> tensor builder -> numba kernels -> windowed datasets -> sequence models -> metrics

The public API is re-exported here and imported lazily, so ``import fintensor`` (and the CLI) stays fast.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> "module:attribute" (attribute None = the module itself)
_API = {
    "Store": "store:Store",
    "download": "sources.yahoo:download",
    "import_csv": "sources.files:import_csv",
    "IngestReport": "sources.report:IngestReport",
    "synthetic": "sources.synthetic:",
    "StockTensor": "tensor:StockTensor",
    "load": "tensor:load",
    "build": "builder:build",
    "build_ticks": "builder:build_ticks",
    "build_days": "builder:build_days",
    "rolling": "rolling:",
    "features": "features:",
    "data": "data:",
    "models": "models:",
    "metrics": "metrics:",
    "train": "trainer:train",
    "predict": "trainer:predict",
    "TrainConfig": "config:TrainConfig",
    "evaluate": "metrics:evaluate",
    "symbols": "symbols:",
    "calendars": "calendars:",
    "cluster": "cluster:",
    "errors": "errors:",
    "FintensorError": "errors:FintensorError",
    "BadInputError": "errors:BadInputError",
    "BuildWarning": "builder:BuildWarning",
}
__all__ = sorted(_API)

if TYPE_CHECKING:  # what IDEs and type checkers see: the real objects and signatures (loaded lazily at run time)
    from . import calendars, cluster, data, errors, features, metrics, models, rolling, symbols
    from .builder import BuildWarning, build, build_days, build_ticks
    from .config import TrainConfig
    from .errors import BadInputError, FintensorError
    from .metrics import evaluate
    from .sources import synthetic
    from .sources.files import import_csv
    from .sources.report import IngestReport
    from .sources.yahoo import download
    from .store import Store
    from .tensor import StockTensor, load
    from .trainer import predict, train


def __getattr__(name: str):
    target = _API.get(name)
    if target is None:
        raise AttributeError(f"module 'fintensor' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    mod = importlib.import_module(f"fintensor.{module}")
    value = getattr(mod, attr) if attr else mod
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
