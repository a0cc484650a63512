"""Python API of pretraining: ``pretrain(config) -> run_dir`` (what ``medcl pretrain`` calls)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcl.config import Config, ConfigError, load_config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pretrain(
    config: Config | Mapping[str, Any] | str | Path,
    overrides: Sequence[str] = (),
    *,
    resume: bool = False,
    out: str | Path | None = None,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Pretrain as ``config`` says and return the run folder.

    ``config``: a validated :class:`~medcl.config.Config`, a mapping in the YAML layout, or the path
    of a YAML preset; ``overrides``: ``key.sub=value`` strings; ``out`` overrides ``config.out``.
    The run folder receives config.yaml, metrics.jsonl and checkpoints/{last,final}.pt (see
    ``medcl.train.trainer``). ``resume=True`` continues from checkpoints/last.pt exactly.
    ``callbacks``: step hooks (``medcl.train.trainer.TrainerCallback``) passed to the trainer.
    Under torchrun (WORLD_SIZE > 1) each process trains its shard with DDP.

    >>> run_dir = pretrain("configs/uscl.yaml", ["data.manifest=ingested/", "optim.epochs=1"], out="runs/x")  # doctest: +SKIP
    """
    from medcl.distributed import init_from_env
    from medcl.environment import resolve_device
    from medcl.methods.base import build_method
    from medcl.train.trainer import Trainer

    if isinstance(config, Config):
        cfg = load_config(None, overrides, **config.to_dict()) if overrides else config
    elif isinstance(config, Mapping):
        cfg = load_config(None, overrides, **dict(config))
    else:
        cfg = load_config(config, overrides)
    if out is not None:
        cfg = Config.from_dict({**cfg.to_dict(), "out": str(out)})
    if cfg.out is None:
        raise ConfigError("out: required (the run folder), e.g. out=runs/uscl")

    rank, world_size, local_rank = init_from_env()
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
    # Same initial weights on every rank (DDP also broadcasts them); different sampling streams per rank.
    seed_everything(cfg.train.seed)
    method, loader = build_method(cfg, rank=rank, world_size=world_size)
    seed_everything(cfg.train.seed + rank)
    return Trainer(method, loader, cfg, cfg.out, resume=resume, rank=rank, world_size=world_size, device=device,
                   callbacks=callbacks).fit()
