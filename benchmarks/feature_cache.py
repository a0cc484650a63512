"""Feature cache benchmark: time per fine-tuning epoch with the frozen backbone prefix recomputed
every step (plain) vs computed once and reused (cached), same data, same run, same model.

    python benchmarks/feature_cache.py [--frames 600 --size 112 --epochs 3 --threads 2]

Writes benchmarks/results/feature_cache.md. Both paths train the same model (the script checks
that the test probabilities agree) so the ratio is a pure speed difference.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medcl.evaluate.classify import (
    FinetuneConfig,
    FrameData,
    InputSource,
    build_classifier,
    compute_feature_cache,
    predict,
    split_backbone,
    train_fold,
)
from medcl.models.backbones import resnet18_backbone

ROOT = Path(__file__).resolve().parents[1]


def random_frame_data(n_frames: int, size: int, frames_per_video: int = 10, seed: int = 0) -> FrameData:
    rng = np.random.default_rng(seed)
    n_videos = n_frames // frames_per_video
    labels = np.arange(n_videos) % 3
    frames = torch.from_numpy(rng.integers(0, 256, (n_videos * frames_per_video, 1, size, size), dtype=np.uint8))
    return FrameData(["a", "b", "c"], [f"v{i}" for i in range(n_videos)], labels, [f"p{i}" for i in range(n_videos)],
                     frames, np.repeat(np.arange(n_videos), frames_per_video),
                     np.tile(np.arange(frames_per_video), n_videos))


def time_protocol(data: FrameData, protocol: str, cached: bool, epochs: int, batch_size: int):
    config = FinetuneConfig(protocol=protocol, epochs=epochs, batch_size=batch_size, patience=epochs + 1)
    torch.manual_seed(0)
    backbone = resnet18_backbone()
    model = build_classifier(backbone, protocol, 3, head_seed=1)
    n = len(data.frames)
    fit, val = np.arange(0, int(n * 0.8)), np.arange(int(n * 0.8), n)
    cache_s = 0.0
    cache = None
    if cached:
        t0 = time.perf_counter()
        prefix, _ = split_backbone(backbone, protocol)
        cache = compute_feature_cache(prefix, data, 1, torch.device("cpu"))
        cache_s = time.perf_counter() - t0
    source = InputSource(data, model, 1, False, cache, torch.device("cpu"))
    t0 = time.perf_counter()
    train_fold(model, source, fit, val, config, seed=2, classes=data.classes)
    epoch_s = (time.perf_counter() - t0) / epochs
    probs = predict(model, InputSource(data, model, 1, False, None, torch.device("cpu")), val, 128)
    return epoch_s, cache_s, probs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "feature_cache.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = random_frame_data(args.frames, args.size)
    rows = []
    for protocol in ("linear", "last_stage"):
        plain_s, _, p_plain = time_protocol(data, protocol, False, args.epochs, args.batch_size)
        cached_s, cache_s, p_cached = time_protocol(data, protocol, True, args.epochs, args.batch_size)
        max_diff = float(np.abs(p_plain - p_cached).max())
        rows.append((protocol, plain_s, cached_s, cache_s, plain_s / cached_s, max_diff))
        print(f"{protocol}: plain {plain_s:.2f} s/epoch, cached {cached_s:.3f} s/epoch "
              f"(+ {cache_s:.2f} s once), ratio {plain_s / cached_s:.1f}x, max |dp| {max_diff:.1e}")
    load = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "# Feature cache: plain vs cached fine-tuning epochs", "",
        f"Command: `python benchmarks/feature_cache.py {' '.join(sys.argv[1:] if argv is None else argv)}`".rstrip(), "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {os.cpu_count()} cores, {cpu}, "
        f"torch {torch.__version__}, {args.threads} threads; load average at the end {load[0]:.1f} "
        "(the machine was shared: absolute times vary with load, the ratio is measured in the same run).", "",
        f"Data: {args.frames} random frames at {args.size} px, 3 classes; 80% fit / 20% validation; batch "
        f"{args.batch_size}; {args.epochs} epochs; time per epoch includes the validation pass.", "",
        "| protocol | plain s/epoch | cached s/epoch | one-time cache s | speed-up per epoch | max abs diff of probabilities |",
        "|---|---|---|---|---|---|",
    ]
    for protocol, plain_s, cached_s, cache_s, ratio, diff in rows:
        lines.append(f"| {protocol} | {plain_s:.2f} | {cached_s:.3f} | {cache_s:.2f} | {ratio:.1f}x | {diff:.1e} |")
    lines += ["", "The cache is computed once per initialisation and reused by every fold and repeat of a "
              "cross-validation (15 folds x epochs by default), so the one-time cost is amortised.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
