"""For the methods' resume-exactness tests: a run killed while computing a given step, seeded as
``medcl.train.api.pretrain`` seeds it, and the comparison of two runs' final states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medcl.config import Config, load_config
from medcl.methods.base import build_method
from medcl.train.api import seed_everything
from medcl.train.trainer import Trainer, TrainerCallback
from medcl.weights import load_checkpoint


class Interrupt(Exception):
    """What kills the run (an exception in a step hook: nothing is checkpointed for it)."""


class DieAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_start(self, trainer, step):
        if step == self.step:
            raise Interrupt


def killed_run(preset: Path, overrides: list[str], out: Path, step: int) -> Config:
    """Train ``preset`` + ``overrides`` into ``out`` until the hook kills update ``step``; returns the config."""
    cfg = load_config(preset, overrides + [f"out={out}"])
    seed_everything(cfg.train.seed)
    method, loader = build_method(cfg)
    seed_everything(cfg.train.seed)
    with pytest.raises(Interrupt):
        Trainer(method, loader, cfg, cfg.out, callbacks=[DieAt(step)]).fit()
    return cfg


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_final_state(run_a: Path, run_b: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the two runs' final.pt models (buffers included) agrees; returns run_a's."""
    a = load_checkpoint(run_a / "checkpoints" / "final.pt")["model"]
    b = load_checkpoint(run_b / "checkpoints" / "final.pt")["model"]
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    return a
