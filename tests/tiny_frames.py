"""Tiny labeled frame sets (an ingest output folder) for fast classification tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medcl.data.manifest import FRAMES_DIR, VideoRecord, write_manifest

CLASSES = ("covid", "pneumonia", "regular")


def class_pattern(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A class-dependent texture with per-frame noise (learnable in a few epochs)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    if label == "covid":  # vertical bright lines (B-lines-like)
        base = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * xx + rng.uniform(0, 6))
    elif label == "pneumonia":  # a bright consolidation blob
        cy, cx = rng.uniform(0.3, 0.7, 2)
        base = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.03)
    else:  # horizontal lines (A-lines-like)
        base = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * yy + rng.uniform(0, 6))
    img = 0.7 * base + 0.3 * rng.random((size, size))
    return (255 * np.clip(img, 0, 1)).astype(np.uint8)


def make_frame_sets(root: Path, n_patients: int = 12, videos_per_patient=(1, 2), n_frames: int = 5,
                    size: int = 32, seed: int = 0, prefix: str = "v", classes=CLASSES,
                    unlabeled: int = 0) -> Path:
    """Write OUT/manifest.csv + OUT/frames/*.npy; patient p has class classes[p % len(classes)]."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / FRAMES_DIR).mkdir(parents=True, exist_ok=True)
    records = []
    for p in range(n_patients + unlabeled):
        label = classes[p % len(classes)] if p < n_patients else ""
        n_videos = videos_per_patient[p % len(videos_per_patient)]
        for k in range(n_videos):
            vid = f"{prefix}{p:03d}_{k}"
            pattern_label = label or classes[p % len(classes)]
            frames = np.stack([class_pattern(pattern_label, size, rng) for _ in range(n_frames)])
            np.save(root / FRAMES_DIR / f"{vid}.npy", frames)
            probe = "convex" if k == 0 else "linear"
            records.append(VideoRecord(
                video_id=vid, source=f"videos/{probe}/{vid}.mp4", label=label, patient_id=f"{prefix}p{p:03d}",
                fps=3.0, n_source_frames=n_frames, n_frames=n_frames, width=size, height=size,
                frames_file=f"{FRAMES_DIR}/{vid}.npy"))
    write_manifest(root / "manifest.csv", records)
    return root
