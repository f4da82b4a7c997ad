"""Checkpoints: one safetensors file per run, checksummed, written atomically, never unpickled.

A checkpoint holds tensors (model, best model, optimizer state, normaliser) and one JSON string (config,
model config, feature names and the spec that computes them, segments, epoch, history, optimizer
hyper-parameters). A SHA-256 over the JSON and every tensor's name, dtype, shape and bytes is stored beside
them and checked on every load, so a damaged file (header or weights) is one error, never a wrong model.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .config import RESUME_KEYS, TrainConfig
from .data import Normaliser, resolve_segments
from .errors import BadInputError, StoreCorruptError
from .fileio import atomic_write_bytes, is_temp
from .models import build_model
from .tensor import StockTensor

CHECKPOINT = "checkpoint.safetensors"
FORMAT = "fintensor.checkpoint/2"      # /2: with a checksum over everything (/1 had none)


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``info`` (the JSON part) and ``tensors`` (by name)."""

    path: Path | None
    info: dict
    tensors: dict[str, torch.Tensor]

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) + 1:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}

    @property
    def normaliser(self) -> Normaliser | None:
        settings = self.info.get("normaliser")
        return Normaliser.from_state(self.group("norm"), settings) if settings else None

    def model(self, prefer_best: bool = True) -> nn.Module:
        """The model rebuilt from its config with the best (else the last) weights, in eval mode."""
        model = build_model(**self.info["model"])
        weights = self.group("best") if prefer_best and self.group("best") else self.group("model")
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            raise StoreCorruptError(f"checkpoint {self.path} does not fit its own model config "
                                    f"({str(exc).splitlines()[0]}); it was damaged or edited") from None
        return model.eval()


def checksum(info_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the format, the JSON part and each tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(FORMAT.encode() + b"\0" + info_json.encode() + b"\0")
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the one in a run directory."""
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` (a file or run directory) holds a fintensor checkpoint of any version (damaged or
    not: reading it then says what is wrong); False for anything else, such as a saved tensor."""
    from safetensors.torch import safe_open

    path = checkpoint_path(path)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as fh:
            return str((fh.metadata() or {}).get("format", "")).startswith("fintensor.checkpoint/")
    except Exception:  # noqa: BLE001 - not safetensors at all
        return False
    except BaseException as exc:  # a Rust panic in the reader on a damaged header  # noqa: B036
        if type(exc).__name__ == "PanicException":
            return False
        raise


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a checkpoint file (or a run directory holding one) without unpickling anything; a file whose
    checksum does not match is refused (``StoreCorruptError``)."""
    from safetensors.torch import safe_open

    path = checkpoint_path(path)
    if not path.is_file():
        what = "a directory without a checkpoint" if path.parent.is_dir() and path.name == CHECKPOINT else "no file"
        raise BadInputError(f"no checkpoint at {path} ({what}); train one with `fintensor train ... --out DIR`")

    def damaged(why: str) -> StoreCorruptError:
        return StoreCorruptError(f"{path} is not a readable fintensor checkpoint ({why}); it was never "
                                 "unpickled — retrain or restore the file")

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise damaged(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    except BaseException as exc:  # noqa: B036 - a Rust panic in the reader is a BaseException
        if type(exc).__name__ != "PanicException":
            raise
        raise damaged("its header does not parse") from None
    fmt = meta.get("format")
    if fmt == "fintensor.checkpoint/1":
        raise StoreCorruptError(f"{path} was written by an older fintensor without a checksum, so it cannot be "
                                "checked; retrain it")
    if fmt != FORMAT or "info" not in meta or "sha256" not in meta:
        raise damaged("not a fintensor checkpoint")
    if checksum(meta["info"], tensors) != meta["sha256"]:
        raise damaged("its checksum does not match: the file was damaged or edited")
    try:
        info = json.loads(meta["info"])
    except ValueError as exc:
        raise damaged(str(exc)) from None
    return Checkpoint(path, info, tensors)


def write_checkpoint(path: Path, info: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write atomically (a crash leaves the old checkpoint or the new one), with the checksum."""
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    info_json = json.dumps(info, default=str)
    blob = save(dict(tensors), metadata={"format": FORMAT, "info": info_json,
                                         "sha256": checksum(info_json, tensors)})
    atomic_write_bytes(path, blob)


def state_tensors(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{prefix.name: CPU copy}`` of a state dict, as a checkpoint stores it."""
    return {f"{prefix}.{k}": v.detach().cpu().clone().contiguous() for k, v in state.items()}


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as tensors plus JSON (hyper-parameters, scalars)."""
    saved = optimizer.state_dict()
    tensors, state = {}, {}
    for pid, entries in saved["state"].items():
        state[str(pid)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().clone().contiguous()
                state[str(pid)][key] = "tensor"
            else:
                state[str(pid)][key] = value
    return tensors, {"param_groups": saved["param_groups"], "state": state}


def load_optimizer(optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    """Restore the optimizer state (load_state_dict moves each tensor where its parameter lives)."""
    meta = ckpt.info["optim"]
    state = {}
    for pid, entries in meta["state"].items():
        state[int(pid)] = {k: (ckpt.tensors[f"optim.{pid}.{k}"] if v == "tensor" else v) for k, v in entries.items()}
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def check_resumable(ckpt: Checkpoint, cfg: TrainConfig, features: StockTensor, label: dict) -> None:
    """A run resumes exactly only with the settings, features, label and segments that wrote the checkpoint
    (epochs and the like may change); anything else is refused naming the checkpoint and what differs."""
    old, new, default = ckpt.info["config"], cfg.to_json(), TrainConfig().to_json()
    changed = [f"{k} {old.get(k, default[k])!r} -> {new[k]!r}" for k in RESUME_KEYS
               if json.dumps(old.get(k, default[k])) != json.dumps(new[k])]
    names = [str(f) for f in features.coords["feature"]]
    if ckpt.info["features"] != names:
        changed.append(feature_change(ckpt.info["features"], names))
    if ckpt.info["label"] != label:
        changed.append(f"label horizon/lag {ckpt.info['label']['horizon']}/{ckpt.info['label']['lag']} -> "
                       f"{label['horizon']}/{label['lag']}")
    segments = {s.name: [s.start, s.end] for s in resolve_segments(features.coords["time"], cfg.segments).values()}
    changed += [f"segment {name} {'..'.join(ckpt.info['segments'].get(name, ['none']))} -> "
                f"{'..'.join(segments.get(name, ['none']))}"
                for name in sorted({*segments, *ckpt.info["segments"]})
                if ckpt.info["segments"].get(name) != segments.get(name)]
    if changed:
        m = ckpt.info["model"]
        raise BadInputError(f"checkpoint {ckpt.path} was written for a {m['name']} on {m['n_features']} features; "
                            f"this run changed {', '.join(changed)}: use the same settings or another --out")


def feature_change(old: list[str], new: list[str]) -> str:
    """``features 1 -> 2 (added 'b')``: how a feature list differs from the checkpoint's."""
    added, removed = [f for f in new if f not in old], [f for f in old if f not in new]
    parts = [f"{what} {', '.join(map(repr, names[:3]))}{' ...' if len(names) > 3 else ''}"
             for what, names in (("added", added), ("removed", removed)) if names]
    return f"features {len(old)} -> {len(new)} ({'; '.join(parts) or 'reordered'})"


def remove_leftovers(out: Path, targets: tuple[str, ...]) -> list[Path]:
    """Delete the half-written temp files of ``targets`` (``fileio.temp_path`` names) that a run killed
    mid-write left in ``out``; nothing else. Returns what was removed."""
    removed = []
    for path in out.glob(".*.tmp") if out.is_dir() else ():
        if any(is_temp(path.name, target) for target in targets) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
