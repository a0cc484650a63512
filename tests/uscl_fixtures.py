"""Tiny FrameSets-like data for the USCL / trainer tests (written directly, no ingestion)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medcl.data.manifest import VideoRecord, write_manifest

CLASSES = ["covid", "pneumonia", "regular"]

# What medcl wrote into every run's config.yaml and checkpoint config, MixCL's included, before
# sections became per-method: the defaults of the frame-set sections.
OLD_DEFAULT_SECTIONS = {
    "data": {"manifest": None, "size": 224, "in_channels": 1, "label_fraction": 0.01, "label_seed": 0},
    "sampling": {"pairing": "video", "mixup": "paper", "alpha": 0.5, "beta": 0.5},
    "augment": {"enabled": True, "crop_scale": [0.6, 1.0], "crop_ratio": [0.75, 1.3333333333333333], "flip_p": 0.5,
                "rotate_degrees": 10.0, "brightness": 0.2, "contrast": 0.2},
    "model": {"backbone": "resnet18", "proj_hidden": 512, "proj_dim": 256},
}


def write_frame_sets(
    root: Path,
    n_videos: int = 12,
    size: int = 32,
    seed: int = 0,
    n_frames: list[int] | None = None,
    unlabeled_every: int = 4,
) -> Path:
    """Write manifest.csv + frames/<id>.npy: each video a distinct random pattern plus per-frame noise.

    Video v has label CLASSES[v % 3], except every ``unlabeled_every``-th video (empty label).
    ``n_frames`` fixes each video's frame count (default: cycles 1..6, so 1- and 2-frame videos exist).
    """
    root = Path(root)
    (root / "frames").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for v in range(n_videos):
        n = n_frames[v] if n_frames is not None else 1 + v % 6
        pattern = rng.integers(0, 256, size=(size // 4, size // 4)).repeat(4, 0).repeat(4, 1).astype(float)
        frames = np.clip(pattern[None] + rng.normal(0, 12, size=(n, size, size)), 0, 255).astype(np.uint8)
        np.save(root / "frames" / f"v{v:03d}.npy", frames)
        label = "" if unlabeled_every and v % unlabeled_every == unlabeled_every - 1 else CLASSES[v % 3]
        records.append(VideoRecord(video_id=f"v{v:03d}", source=f"v{v:03d}.mp4", label=label, patient_id=f"p{v}",
                                   fps=30.0, n_source_frames=10 * n, n_frames=n, width=size, height=size,
                                   frames_file=f"frames/v{v:03d}.npy"))
    write_manifest(root / "manifest.csv", records)
    return root


def tiny_overrides(manifest: Path, out: Path, **extra: object) -> list[str]:
    """Overrides for a seconds-long CPU run on ``write_frame_sets`` data."""
    values = {"data.manifest": manifest, "out": out, "data.size": 32, "data.label_fraction": 0.5,
              "optim.batch_size": 4, "optim.max_steps": 6, "optim.warmup_epochs": 0.5, "train.checkpoint_every": 2,
              "train.progress": False, "train.device": "cpu", **extra}
    return [f"{k}={v}" for k, v in values.items()]
