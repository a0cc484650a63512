"""Steady-state throughput of the real USCL pretraining path against a bare PyTorch loop, in fp32
and in medcl's automatic precision (bf16 autocast + channels_last where the CPU does bf16 natively).

    python benchmarks/throughput.py [--sizes 112,224] [--batch 32] [--steps 12] [--warmup 3] [--rounds 3]
                                    [--threads 2] [--out benchmarks/results/throughput.md]

Rows per input size: bare fp32, bare bf16 + channels_last (PyTorch's default Adam), the same with
``Adam(fused=True)``, medcl fp32 (train.precision=fp32, channels_last off), medcl auto (the
default; medcl's optimisers are fused where PyTorch has it: ``medcl.precision.make_optimizer``). Goals of the performance issue on a
bf16-capable CPU: medcl auto >= 1.8x the fp32 bare loop, and >= 0.95x the bf16 bare loop. Then one
fine-tuning epoch (classification, ``full`` protocol) and one segmentation step (the CNN U-Net of
segment_2d.py), each as medcl's real loop in fp32 and auto next to the same work as a bare torch loop
in fp32 and in bf16 + channels_last, side by side, order alternated per round.

Real path: ``medcl.train.Trainer.fit`` on frame sets read through ``FrameSets`` (a synthetic
manifest of 224 px frames written under benchmarks/work/, like ``medcl ingest``'s default output):
resumable loader, USCL pair generation (3 frames per video, Beta mixing), augmentation of every
frame, ONE backbone forward of the 2N views, projection head, classifier, NT-Xent + masked CE,
backward, Adam, cosine schedule, metrics logging. No checkpoint is written inside the timed window.

Bare loop: the same ResNet-18 (1 channel), same number of images per step (2N) at the same input
size, from one in-memory tensor: forward, mean-square loss on the features, backward, Adam.

Both run in this process with the same thread count, alternating (bare, real, bare, real, ...)
(who goes first alternates) so that load from other processes hits both; the median over rounds
is reported, and each ratio as the median of its per-round ratios (the two loops of a ratio ran
within a minute of each other in that round; drift between rounds, e.g. 33 -> 35 images/s for the
same bare loop, cancels), with the ratio of the medians beside it. A profile of the
real step (pair generation + augmentation vs. the model step) says where any gap goes.

The real path is timed from outside, without touching the trainer: the trainer's step hooks
(``Trainer(callbacks=[...])``, ``on_step_end`` after every optimiser step) stamp the steps, a
wrapper of the loader (the trainer's ``BatchLoader`` protocol) times batch building, and PyTorch
module hooks on the method time its forward pass (backbone, heads and losses).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medcl.config import load_config  # noqa: E402
from medcl.data.manifest import VideoRecord, write_manifest  # noqa: E402
from medcl.environment import cpu_model  # noqa: E402
from medcl.methods.base import build_method  # noqa: E402
from medcl.models.backbones import resnet18_backbone  # noqa: E402
from medcl.train.trainer import Trainer, TrainerCallback  # noqa: E402


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def write_frames(root: Path, n_videos: int, n_frames: int, size: int = 224, seed: int = 0) -> Path:
    if (root / "manifest.csv").is_file():
        from medcl.data.manifest import read_manifest

        if len(read_manifest(root)) >= n_videos:
            return root
        shutil.rmtree(root)  # made by an earlier run with fewer videos
    (root / "frames").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for v in range(n_videos):
        frames = rng.integers(0, 256, size=(n_frames, size, size), dtype=np.uint8)
        np.save(root / "frames" / f"v{v:03d}.npy", frames)
        records.append(VideoRecord(f"v{v:03d}", f"v{v:03d}.mp4", ["covid", "pneumonia", "regular", ""][v % 4], f"p{v}",
                                   30.0, 10 * n_frames, n_frames, size, size, frames_file=f"frames/v{v:03d}.npy"))
    write_manifest(root / "manifest.csv", records)
    return root


def bare_loop(size: int, images: int, steps: int, warmup: int, fast: bool = False,
              fused: bool = False) -> tuple[float, float]:
    """(images per second of forward + backward + Adam on an in-memory batch, forward s/step);
    ``fast``: bf16 autocast + channels_last, written directly with torch (no medcl code);
    ``fused``: ``torch.optim.Adam(fused=True)`` instead of PyTorch's default per-tensor update."""
    torch.manual_seed(0)
    model = resnet18_backbone(in_channels=1)
    x = torch.rand(images, 1, size, size)
    if fast:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, weight_decay=1e-4, **({"fused": True} if fused else {}))
    forward = []
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            loss = model(x).float().pow(2).mean()
        forward.append(time.perf_counter() - t0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * images / (time.perf_counter() - start), statistics.median(forward[warmup:])


class StepStamps(TrainerCallback):
    """The time at which every update was applied (the trainer's ``on_step_end`` hook)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, trainer: Trainer, step: int, values: dict[str, float]) -> None:
        self.ends.append(time.perf_counter())


class TimedLoader:
    """A ``BatchLoader`` that delegates to ``loader`` and records how long each batch took to build."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.seconds: list[float] = []

    def __len__(self) -> int:
        return len(self.loader)

    def epoch_batches(self, epoch: int, start: int = 0):
        batches = self.loader.epoch_batches(epoch, start)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return
            self.seconds.append(time.perf_counter() - t0)
            yield batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def time_forward(module: torch.nn.Module) -> list[float]:
    """Seconds of every forward call of ``module`` (PyTorch forward pre- and post-hooks)."""
    seconds: list[float] = []
    started: list[float] = []
    module.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    module.register_forward_hook(lambda *_: seconds.append(time.perf_counter() - started[-1]))
    return seconds


def real_path(manifest: Path, work: Path, size: int, batch: int, steps: int, warmup: int,
              precision: str = "auto") -> tuple[float, float, float]:
    """(images per second of Trainer.fit in steady state, batch building s/step, forward + losses s/step).
    ``precision``: ``fp32`` (channels_last off: the path before medcl.precision) or ``auto``."""
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(ROOT / "configs/uscl.yaml", [
        f"data.manifest={manifest}", f"out={out}", f"data.size={size}", f"optim.batch_size={batch}",
        f"optim.max_steps={warmup + steps}", "optim.warmup_epochs=0", f"train.checkpoint_every={10**6}",
        "train.progress=false", "train.device=cpu", "data.label_fraction=0.1", f"train.precision={precision}",
        f"train.channels_last={precision != 'fp32'}"])
    torch.manual_seed(0)
    method, loader = build_method(cfg)
    loader = TimedLoader(loader)
    forward_times = time_forward(method)  # the trainer calls method(batch) -> training_step
    stamps = StepStamps()
    Trainer(method, loader, cfg, out, callbacks=[stamps]).fit()  # the final checkpoint is written after the last stamp
    images = 2 * batch
    rate = steps * images / (stamps.ends[warmup + steps - 1] - stamps.ends[warmup - 1])
    return rate, statistics.median(loader.seconds[warmup:]), statistics.median(forward_times[warmup:])


def _classification_data(size: int, frames: int):
    from medcl.evaluate.classify import FrameData

    rng = np.random.default_rng(0)
    n_videos = frames // 8
    return FrameData(["a", "b", "c"], [f"v{i}" for i in range(n_videos)], np.arange(n_videos) % 3,
                     [f"p{i}" for i in range(n_videos)],
                     torch.from_numpy(rng.integers(0, 256, (frames, 1, size, size), dtype=np.uint8)),
                     np.repeat(np.arange(n_videos), 8), np.tile(np.arange(8), n_videos))


def finetune_epoch(precision: str, size: int = 112, frames: int = 256, batch: int = 64) -> float:
    """Seconds per classification fine-tuning epoch (``full`` protocol: every layer trains) on
    random frames, plus its validation pass: medcl's ``train_fold`` for 2 epochs (the first warms
    up), total / 2."""
    from medcl.evaluate.classify import FinetuneConfig, InputSource, build_classifier, compute_settings, train_fold
    from medcl.precision import channels_last

    data = _classification_data(size, frames)
    config = FinetuneConfig(protocol="full", epochs=2, batch_size=batch, precision=precision,
                            channels_last=precision != "fp32", save_models=False, patience=5)
    device, dtype, memory_format = compute_settings(config)
    torch.manual_seed(0)
    model = build_classifier(resnet18_backbone(), "full", 3, head_seed=1)
    if memory_format:
        channels_last(model)
    source = InputSource(data, model, 1, False, None, device, dtype=dtype, memory_format=memory_format)
    fit, val = np.arange(0, frames - 32), np.arange(frames - 32, frames)
    t0 = time.perf_counter()
    train_fold(model, source, fit, val, config, seed=2, classes=data.classes)  # epoch 1 warms up
    return (time.perf_counter() - t0) / 2


def bare_finetune_epoch(fast: bool, size: int = 112, frames: int = 256, batch: int = 64) -> float:
    """The same work as :func:`finetune_epoch` written directly with torch: a ResNet-18 + linear
    head, frames already float in memory, shuffled batches, cross-entropy, backward,
    ``torch.optim.SGD`` (momentum 0.9, PyTorch's default implementation), then one no-grad pass
    over the 32 validation frames; 2 epochs, total / 2. ``fast``: bf16 autocast + channels_last."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(resnet18_backbone(), torch.nn.Linear(512, 3))
    x = torch.rand(frames, 1, size, size)
    y = torch.randint(0, 3, (frames,))
    if fast:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    fit = frames - 32
    memory_format = torch.channels_last if fast else torch.contiguous_format
    t0 = time.perf_counter()
    for _ in range(2):
        model.train()
        order = torch.randperm(fit)
        for start in range(0, fit, batch):
            idx = order[start:start + batch]
            xb = x[idx].contiguous(memory_format=memory_format)  # indexing returns the default layout
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
                logits = model(xb)
            loss = torch.nn.functional.cross_entropy(logits.float(), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            model(x[fit:].contiguous(memory_format=memory_format)).float().softmax(1)
    return (time.perf_counter() - t0) / 2


def segment_path(precision: str, size: int = 128, batch: int = 16, steps: int = 10, warmup: int = 2,
                 n_images: int = 64) -> float:
    """Seconds per training step of medcl's segmentation loop (``finetune_once``: the CNN U-Net on a
    ResNet-18 encoder that segment_2d.py uses, MONAI augmentation of every sample, Dice + CE,
    fused AdamW, warm-up + cosine) on random images with blob masks: the median interval between
    consecutive training forward passes (stamped by a global forward pre-hook, the trainer untouched),
    i.e. batch building + forward + backward + update."""
    from medcl.data.seg_manifest import SegTask
    from medcl.evaluate.segment import SegmentConfig, finetune_once
    from medcl.models.unet import ResNetUNet

    rng = np.random.default_rng(0)
    images = [rng.random((1, size, size), dtype=np.float32) for _ in range(n_images)]
    yy, xx = np.mgrid[:size, :size]
    labels = []
    for _ in range(n_images):
        cy, cx, r = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [int(rng.integers(size // 10, size // 4))]
        labels.append(((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.int64)[None])
    cfg = SegmentConfig(arch="unet", augment="monai", batch_size=batch, iterations=warmup + steps,
                        val_every=warmup + steps, precision=precision, lr=1e-3, weight_decay=1e-4, save_models=False)
    task = SegTask("throughput", 2, ["blob"], [])
    stamps: list[float] = []

    def stamp(module, _inputs):
        if isinstance(module, ResNetUNet) and module.training:
            stamps.append(time.perf_counter())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(stamp)
    try:
        finetune_once(task, (images, labels), (images[:2], labels[:2]), cfg, None, {}, seed=0)
    finally:
        handle.remove()
    return statistics.median(np.diff(stamps[warmup:]).tolist())


def bare_segment(fast: bool, size: int = 128, batch: int = 16, steps: int = 10, warmup: int = 2) -> float:
    """Seconds per step of the same U-Net written as a bare torch loop: one in-memory batch, no
    augmentation, MONAI's DiceCELoss, ``torch.optim.AdamW`` (PyTorch's default implementation).
    ``fast``: bf16 autocast + channels_last."""
    from monai.losses import DiceCELoss

    from medcl.models.unet import build_unet

    torch.manual_seed(0)
    model = build_unet(out_channels=2)
    x, y = torch.rand(batch, 1, size, size), torch.randint(0, 2, (batch, 1, size, size))
    if fast:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:])


def side_by_side(rounds: int, paths: dict) -> dict[str, list[float]]:
    """Each of ``paths`` (name -> callable returning seconds) once per round, the order alternated."""
    seconds: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds):
        for name in (list(paths) if r % 2 == 0 else list(reversed(paths))):
            seconds[name].append(paths[name]())
    return seconds


def paired(num: list[float], den: list[float]) -> str:
    """``num / den`` as the median of the per-round ratios (bold), the rounds, and the ratio of the medians."""
    ratios = [a / b for a, b in zip(num, den)]
    return (f"**{statistics.median(ratios):.3f}** (per round {', '.join(f'{r:.3f}' for r in ratios)}; ratio of the "
            f"medians {statistics.median(num) / statistics.median(den):.3f})")


def other_section(seconds: dict[str, list[float]], what: str, unit: str, medcl_fp32: str) -> list[str]:
    """A markdown table of seconds per unit (lower is better) with the speed ratios the issue asks
    for: medcl auto vs the fp32 and the bf16 bare loops."""
    m = {k: statistics.median(v) for k, v in seconds.items()}
    names = {"bare fp32": "bare loop, fp32", "bare bf16": "bare loop, bf16 autocast + channels_last",
             "medcl fp32": f"medcl, precision=fp32 ({medcl_fp32})", "medcl auto": "medcl, precision=auto"}
    return [f"- {what}:", "", f"| loop | {unit} (median) | per round | speed x bare fp32 |", "|---|---|---|---|",
            *[f"| {names[k]} | {m[k]:.3f} | {', '.join(f'{v:.3f}' for v in seconds[k])} | {m['bare fp32'] / m[k]:.2f} |"
              for k in names],
            "", f"  medcl auto, speed x the bare fp32 loop: {paired(seconds['bare fp32'], seconds['medcl auto'])}; "
                f"x the bare bf16 + channels_last loop: {paired(seconds['bare bf16'], seconds['medcl auto'])}; "
                f"x medcl fp32: {paired(seconds['medcl fp32'], seconds['medcl auto'])}.", ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="112,224", help="input sizes, comma-separated")
    parser.add_argument("--batch", type=int, default=32, help="videos per step at 112 px (2x images); scaled by "
                                                              "(112 / size)^2 at other sizes, at least 8")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--videos", type=int, default=96)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/throughput.md")
    args = parser.parse_args()
    from medcl.precision import cpu_bf16_flags, resolve_precision

    torch.set_num_threads(args.threads)
    work = ROOT / "benchmarks/work/throughput"
    manifest = write_frames(work / "frames", args.videos, n_frames=12)
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    load_before = load_average()
    auto = "bf16 autocast + channels_last" if resolve_precision("auto", "cpu") is not None else "fp32 (no native bf16)"
    names = {"bare fp32": "bare loop, fp32", "bare bf16": "bare loop, bf16 autocast + channels_last",
             "bare bf16 fused": "bare loop, bf16 autocast + channels_last, fused Adam (`Adam(fused=True)`)",
             "medcl fp32": "medcl `Trainer.fit`, train.precision=fp32, channels_last off",
             "medcl auto": f"medcl `Trainer.fit`, train.precision=auto (here: {auto})"}
    sections = []
    for size in [int(v) for v in args.sizes.split(",")]:
        batch = max(4, min(args.batch, round(args.batch * (112 / size) ** 2)))
        rates: dict[str, list[float]] = {k: [] for k in names}
        build: list[float] = []
        for r in range(args.rounds):
            order = list(names) if r % 2 == 0 else list(reversed(names))  # alternate who goes first
            for which in order:
                if which.startswith("bare"):
                    rate, _ = bare_loop(size, 2 * batch, args.steps, args.warmup, fast=which != "bare fp32",
                                        fused=which == "bare bf16 fused")
                else:
                    rate, build_s, _ = real_path(manifest, work, size, batch, args.steps, args.warmup,
                                                 precision=which.split()[1])
                    build.append(build_s)
                rates[which].append(rate)
            print(f"{size} px round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()) + " img/s",
                  flush=True)
        m = {k: statistics.median(v) for k, v in rates.items()}
        sections += [f"### {size} px, batch {batch} videos = {2 * batch} images per step", "",
                     "| loop | images/s (median) | per round | x bare fp32 |", "|---|---|---|---|"]
        sections += [f"| {names[k]} | {m[k]:.1f} | {', '.join(f'{v:.1f}' for v in rates[k])} | {m[k] / m['bare fp32']:.2f} |"
                     for k in names]
        sections += ["", f"- medcl auto / bare fp32: {paired(rates['medcl auto'], rates['bare fp32'])} (goal >= 1.8 on a bf16 CPU)",
                     f"- medcl auto / bare bf16 + channels_last: {paired(rates['medcl auto'], rates['bare bf16'])} (goal >= 0.95)",
                     f"- medcl auto / bare bf16 + channels_last + fused Adam: {paired(rates['medcl auto'], rates['bare bf16 fused'])} "
                     "(the same optimiser implementation on both sides: the real path's own overhead)",
                     f"- bare fused / bare default Adam (bf16 + channels_last): "
                     f"{paired(rates['bare bf16 fused'], rates['bare bf16'])} (what the optimiser implementation alone is worth)",
                     f"- medcl fp32 / bare fp32: {paired(rates['medcl fp32'], rates['bare fp32'])}",
                     f"- batch building (pairs, augmentation, mixing): {statistics.median(build) * 1000:.0f} ms/step", ""]
    ft = side_by_side(args.rounds, {"bare fp32": lambda: bare_finetune_epoch(False),
                                    "bare bf16": lambda: bare_finetune_epoch(True),
                                    "medcl fp32": lambda: finetune_epoch("fp32"),
                                    "medcl auto": lambda: finetune_epoch("auto")})
    print(f"fine-tuning s/epoch: {ft}", flush=True)
    seg = side_by_side(args.rounds, {"bare fp32": lambda: bare_segment(False),
                                     "bare bf16": lambda: bare_segment(True),
                                     "medcl fp32": lambda: segment_path("fp32"),
                                     "medcl auto": lambda: segment_path("auto")})
    print(f"segmentation s/step: {seg}", flush=True)
    load_after = load_average()
    lines = [
        "# Throughput: medcl's training paths vs bare PyTorch loops, fp32 and automatic precision",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {os.cpu_count()} cores, {cpu_model()}, native bf16 flags: {', '.join(cpu_bf16_flags()) or 'none'}; "
        f"torch {torch.__version__}, {args.threads} threads, Python {platform.python_version()}",
        f"- Setting: ResNet-18 (1 channel, stride-2 stem); real path = USCL on FrameSets (pairs, augmentation, "
        f"heads, NT-Xent + CE, Adam from `medcl.precision.make_optimizer` (fused where PyTorch has it), logging); "
        f"bare = forward + mean-square loss + backward + Adam (PyTorch's default implementation unless the row says "
        f"fused) on one in-memory tensor. {args.steps} timed steps after {args.warmup} warm-up, {args.rounds} rounds, order alternated; "
        "median reported. Compare ratios, not absolute speeds.",
        f"- Load average (1, 5, 15 min) before: {load_before}; after: {load_after}.",
        "",
        *sections,
        "## Fine-tuning and segmentation",
        "",
        *other_section(ft, "classification fine-tuning, `full` protocol, 224 training + 32 validation frames at "
                           "112 px, batch 64 (`medcl.evaluate.classify.train_fold` vs a bare SGD loop on float "
                           "frames in memory)", "s/epoch", "channels_last off"),
        *other_section(seg, "segmentation step, the CNN U-Net (ResNet-18 encoder, segment_2d.py's model) at 128 px, "
                            "batch 16 (`medcl.evaluate.segment.finetune_once` with MONAI augmentation vs a bare "
                            "AdamW loop on one in-memory batch)", "s/step",
                       "channels_last stays on: the U-Net loop always uses it"),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
