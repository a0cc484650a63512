"""The one fine-tuning protocol, shared by every downstream task.

A task (classification: :mod:`medcl.evaluate.classify`; segmentation:
:mod:`medcl.evaluate.segment`) supplies only what is its own: how data is read, the head, the
loss and the metrics. Everything else is defined here, once:

- **splits** by patient (:mod:`medcl.data.splits`: folds, validation carved from the training
  folds, label fractions drawn by patient);
- **one training loop**, :func:`train_with_selection`: periods of optimiser steps (an epoch for
  classification, ``val_every`` iterations for segmentation), the trainer's learning-rate
  schedule (:func:`medcl.train.trainer.lr_factor`: linear warm-up then cosine), validation after
  every period, the best-validation weights kept, early stopping after ``patience`` periods
  without improvement;
- **summary statistics** (:func:`medcl.evaluate.metrics.mean_std`: mean +- std over folds);
- **the run folder** (:func:`write_run`): ``config.yaml``, ``environment.json``, ``results.json``,
  ``results.md``, ``curves.jsonl``, ``predictions.csv``;
- **several initialisations on the same folds** (:func:`compare_inits`): one run folder per init
  and the paired comparison with the patient bootstrap (:mod:`medcl.evaluate.compare`).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from medcl.environment import write_environment
from medcl.runfolder import refuse_existing, run_lock
from medcl.train.scalars import write_curves
from medcl.train.trainer import lr_factor
from medcl.weights import InitSpec, unique_inits

# ---------------------------------------------------------------------------------------------
# the one training loop


@dataclass
class Validation:
    """What validation after a period says: ``score`` (higher is better; None = no validation
    data, keep the newest weights) and the metrics to log in the curve."""

    score: float | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Schedule:
    """How long to train and when to look: ``periods`` of steps, validation after each."""

    total_steps: int
    periods: int
    warmup_steps: int = 0
    patience: int | None = None  # periods without improvement before stopping; None = never stop early


@dataclass
class Selection:
    """Result of :func:`train_with_selection` (the model holds the selected weights)."""

    best_period: int
    best_step: int
    best_score: float | None
    periods_run: int
    train_seconds: float
    curve: list[dict[str, Any]]


def train_with_selection(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    period_batches: Callable[[int], Iterable[Any]],
    step_loss: Callable[[Any], tuple[torch.Tensor, int]],
    validate: Callable[[], Validation],
    frozen_prefixes: Sequence[str] = (),
    on_period: Callable[[dict[str, Any]], None] | None = None,
) -> Selection:
    """Optimise ``model`` and keep the weights of the best validation score.

    ``period_batches(p)`` yields the batches of period ``p``; ``step_loss(batch)`` returns the
    loss (with grad) and the number of samples it averages. The learning rate of step ``s`` is
    ``lr * lr_factor(s, warmup_steps, total_steps)``, the pretraining trainer's schedule.
    State-dict entries under ``frozen_prefixes`` never change, so they are not copied.
    """
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, schedule.warmup_steps, schedule.total_steps))

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()
                if not any(k.startswith(p) for p in frozen_prefixes)}

    best_score, best_state, best_period, best_step, stale = -math.inf, None, -1, 0, 0
    curve: list[dict[str, Any]] = []
    step, started = 0, time.perf_counter()
    for period in range(schedule.periods):
        model.train()
        total, count = 0.0, 0
        for batch in period_batches(period):
            loss, n = step_loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning loss became {loss.item()} at step {step + 1}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            total += loss.item() * n
            count += n
        result = validate()
        row = {"period": period, "step": step, "train_loss": total / max(count, 1),
               "lr": optimizer.param_groups[0]["lr"], **result.metrics,
               "seconds": round(time.perf_counter() - started, 1)}
        curve.append(row)
        if on_period is not None:
            on_period(row)
        if result.score is None or result.score > best_score:
            best_score = result.score if result.score is not None else -math.inf
            best_period, best_step, stale = period, step, 0
            best_state = snapshot()
        else:
            stale += 1
            if schedule.patience is not None and stale >= schedule.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state, strict=not frozen_prefixes)
    model.eval()
    return Selection(best_period, best_step, None if best_score == -math.inf else best_score, len(curve),
                     round(time.perf_counter() - started, 1), curve)


# ---------------------------------------------------------------------------------------------
# run folder


def write_run(out: str | Path, config: dict[str, Any], results: dict[str, Any], curves: Sequence[dict[str, Any]],
              predictions: Sequence[dict[str, Any]], markdown: str,
              tensorboard: tuple[str, Sequence[str]] | None = None) -> Path:
    """Write a fine-tuning run folder (see the module docstring); returns it. ``tensorboard``
    ``(step key, group keys)`` also writes the curves as TensorBoard scalars under ``out/tb``, as
    pretraining does."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_environment(out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    with (out / "curves.jsonl").open("w") as handle:
        for row in curves:
            handle.write(json.dumps(row) + "\n")
    if predictions:
        fields = list(dict.fromkeys(k for row in predictions for k in row))
        with (out / "predictions.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(predictions)
    (out / "results.md").write_text(markdown)
    if tensorboard is not None:
        write_curves(out / "tb", curves, *tensorboard)
    return out


# ---------------------------------------------------------------------------------------------
# several initialisations on the same folds


@dataclass
class RunResult:
    """One initialisation's cross-validation: its results dict and prediction rows."""

    init: str
    out: Path | None
    results: dict[str, Any]
    predictions: list[dict[str, Any]] = field(repr=False, default_factory=list)


def compare_inits(
    inits: Sequence[str | InitSpec],
    run_one: Callable[[InitSpec, Path | None], RunResult],
    compare: Callable[[list[RunResult]], dict[str, Any]],
    write_comparison: Callable[[dict[str, Any], Path], None],
    out: str | Path | None,
    check: Callable[[InitSpec], None] | None = None,
    overwrite: bool = False,
    command: str = "medcl finetune",
) -> dict[str, Any]:
    """Run every init on the same folds (``out`` itself for one init, ``out/<name>/`` for several),
    then compare them pairwise against the first with ``compare``.

    ``check`` is called on every init before the first run starts, so a bad second init fails at
    once rather than after the first init's whole cross-validation. ``out`` is locked for the
    whole run (a second process is refused), and results already there are refused unless
    ``overwrite``. Returns ``{"runs": {name: results}, "comparison": dict | None}``.
    """
    specs = unique_inits(list(inits))
    if not specs:
        raise ValueError("no initialisation given")
    for spec in specs:
        if check is not None:
            check(spec)
    if out is None:
        return _compare_inits(specs, run_one, compare, write_comparison, None)
    out = Path(out)
    with run_lock(out, command):
        names = ["results.json", "comparison.json", "comparison.md"]
        if len(specs) > 1:
            names += [f"{spec.name}/results.json" for spec in specs]
        refuse_existing(out, names, overwrite, "fine-tuning results")
        return _compare_inits(specs, run_one, compare, write_comparison, out)


def _compare_inits(specs: list[InitSpec], run_one, compare, write_comparison, out: Path | None) -> dict[str, Any]:
    runs: list[RunResult] = []
    for spec in specs:
        run_out = None if out is None else (Path(out) if len(specs) == 1 else Path(out) / spec.name)
        runs.append(run_one(copy.copy(spec), run_out))
    comparison = None
    if len(runs) > 1:
        comparison = compare(runs)
        if out is not None:
            write_comparison(comparison, Path(out))
    return {"runs": {r.init: r.results for r in runs}, "comparison": comparison}
