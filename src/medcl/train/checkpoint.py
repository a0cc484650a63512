"""Checkpoints: written atomically, read with ``weights_only=True``, format ``medcl-checkpoint-v1``.

A checkpoint is a ``torch.save``-d dict of plain types and tensors::

    {"format": "medcl-checkpoint-v1", "method": str, "config": dict (Config.to_dict()),
     "model": method.state_dict(), "optimizer": ..., "scheduler": ..., "step": int, "epoch": int,
     "rng": {"python", "numpy", "torch", "cuda"}, "loader": loader.state_dict(),
     "backbone": {"name": "resnet18", "kwargs": {...}, "prefix": "backbone."},
     "metadata": method.metadata}

Readers: :func:`load_checkpoint` (validates the format) and :func:`backbone_state_dict`
(the backbone's weights, prefix stripped) plus :func:`build_pretrained_backbone`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

CHECKPOINT_FORMAT = "medcl-checkpoint-v1"
REQUIRED_KEYS = ("format", "method", "config", "model", "step", "backbone")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the key."""


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (temporary file in the same folder, then rename).

    A crash while writing leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(checkpoint, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a medcl checkpoint (``weights_only=True``) and check its format and required keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any unreadable file the same way
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: format {found!r}, expected {CHECKPOINT_FORMAT!r}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {missing}")
    return ckpt


def backbone_state_dict(ckpt: dict[str, Any]) -> dict[str, Tensor]:
    """The backbone's weights from a loaded checkpoint, keys without the ``backbone.`` prefix."""
    prefix = ckpt.get("backbone", {}).get("prefix", "backbone.")
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"checkpoint has no weights under prefix {prefix!r} in 'model'")
    return state


def build_pretrained_backbone(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the backbone named in the checkpoint and load its weights (strict)."""
    from medcl.models.backbones import build_backbone

    info = ckpt["backbone"]
    backbone = build_backbone(info["name"], **info.get("kwargs", {}))
    backbone.load_state_dict(backbone_state_dict(ckpt), strict=True)
    return backbone


def rng_state() -> dict[str, Any]:
    """Every global random state, as checkpoint-safe plain types and tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
