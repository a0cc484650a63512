"""Synthetic lung-ultrasound-like videos: shapes, determinism, class patterns, files on disk."""

from __future__ import annotations

import csv
import subprocess
import sys

import av
import numpy as np
import pytest

from medcl.data.synthetic import (
    CLASSES,
    METADATA_COLUMNS,
    random_patient,
    synthetic_video_frames,
    write_synthetic_videos,
)


def test_frames_shape_dtype_and_determinism():
    frames, info = synthetic_video_frames("covid", seed=3, size=64, n_frames=5, fps=10, width=80)
    assert frames.shape == (5, 64, 80) and frames.dtype == np.uint8
    assert (info.n_frames, info.fps, info.width, info.height) == (5, 10, 80, 64)
    again, _ = synthetic_video_frames("covid", seed=3, size=64, n_frames=5, fps=10, width=80)
    other, _ = synthetic_video_frames("covid", seed=4, size=64, n_frames=5, fps=10, width=80)
    np.testing.assert_array_equal(frames, again)
    assert not np.array_equal(frames, other)
    # the picture moves (speckle, sliding) but is not noise: consecutive frames are correlated
    a, b = frames[0].astype(float).ravel(), frames[1].astype(float).ravel()
    assert 0.5 < np.corrcoef(a, b)[0, 1] < 0.999


def test_fan_on_black_with_text_outside():
    frames, _ = synthetic_video_frames("regular", seed=1, size=96, n_frames=2, fps=10)
    frame = frames[0]
    h, w = frame.shape
    # bottom corners are outside a convex fan: black; the middle is bright tissue
    assert np.median(frame[h - 15 :, :6]) < 5 and np.median(frame[h - 15 :, w - 6 :]) < 5
    assert frame[h // 3 : 2 * h // 3, w // 2 - 5 : w // 2 + 5].mean() > 20
    # burned-in text: some bright pixels in the top rows' corners
    assert frame[:10, :30].max() > 100


def _row_column_structure(frames: np.ndarray) -> tuple[float, float]:
    """Variance of row means vs column means in the lower half: A-lines are rows, B-lines columns."""
    lower = frames[:, frames.shape[1] // 2 :, :].astype(float).mean(0)
    w = lower.shape[1]
    centre = lower[:, w // 4 : 3 * w // 4]
    return float(centre.mean(1).std()), float(centre.mean(0).std())


def test_class_patterns_differ_in_the_expected_direction():
    stats = {c: [] for c in CLASSES}
    for c in CLASSES:
        for seed in range(5):
            frames, _ = synthetic_video_frames(c, seed=100 + seed, size=96, n_frames=3, fps=10)
            stats[c].append(_row_column_structure(frames))
    rows = {c: np.mean([s[0] / (s[1] + 1e-6) for s in stats[c]]) for c in CLASSES}
    # A-lines (regular) give horizontal structure, B-lines (covid) vertical structure
    assert rows["regular"] > rows["covid"]


def test_no_single_pixel_separates_classes():
    """Learnable but not trivial: no pixel position whose value alone tells the class."""
    firsts = {c: [] for c in CLASSES}
    for c in CLASSES:
        for seed in range(6):
            frames, _ = synthetic_video_frames(c, seed=200 + seed, size=64, n_frames=2, fps=10, width=64)
            firsts[c].append(frames[0].astype(float))
    for a in CLASSES:
        for b in CLASSES:
            if a >= b:
                continue
            xa, xb = np.stack(firsts[a]), np.stack(firsts[b])
            gap = np.maximum(xa.min(0) - xb.max(0), xb.min(0) - xa.max(0))  # > 0: ranges do not overlap
            assert (gap > 0).mean() < 0.01, f"{a} vs {b}: {(gap > 0).mean():.3f} of pixels separate the classes"


def test_patient_label_must_match():
    patient = random_patient("covid", "p1", np.random.default_rng(0))
    with pytest.raises(ValueError, match="label"):
        synthetic_video_frames("regular", patient=patient, size=64, n_frames=2)
    with pytest.raises(ValueError, match="unknown synthetic class"):
        random_patient("flu", "p2", np.random.default_rng(0))
    with pytest.raises(ValueError, match="even"):
        synthetic_video_frames("covid", size=63)


def test_write_synthetic_videos_files_decode_and_metadata(tmp_path):
    metadata = write_synthetic_videos(tmp_path / "synth", n_videos=7, seed=5, size=64, videos_per_patient=3)
    rows = list(csv.DictReader(metadata.open()))
    assert list(rows[0].keys()) == METADATA_COLUMNS
    assert len(rows) == 7
    patients = {r["patient_id"] for r in rows}
    assert len(patients) == 3  # 3 + 3 + 1 videos
    for pid in patients:  # one diagnosis per patient
        assert len({r["label"] for r in rows if r["patient_id"] == pid}) == 1
    assert {r["label"] for r in rows} == set(CLASSES)
    for row in rows:
        path = tmp_path / "synth" / row["file"]
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            decoded = [f for f in container.decode(stream)]
            assert len(decoded) == int(row["n_frames"])
            assert float(stream.average_rate) == pytest.approx(float(row["fps"]))
            assert (decoded[0].width, decoded[0].height) == (int(row["width"]), int(row["height"]))
    assert not list((tmp_path / "synth").glob("*.tmp*"))


def test_same_seed_same_metadata(tmp_path):
    a = write_synthetic_videos(tmp_path / "a", n_videos=3, seed=9, size=48)
    b = write_synthetic_videos(tmp_path / "b", n_videos=3, seed=9, size=48)
    assert a.read_text() == b.read_text()


def test_cli_synth_videos(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "medcl", "synth", "videos", str(out), "--videos", "2", "--seed", "1", "--size", "48"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert len(list(out.glob("*.mp4"))) == 2 and (out / "metadata.csv").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "medcl", "synth", "videos", str(out), "--size", "47"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "even" in bad.stderr


def test_classes_are_learnable_across_patients():
    """A linear model on coarse frames, trained on some patients, beats chance on others."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score

    features, labels, groups = [], [], []
    for p in range(12):
        label = CLASSES[p // 4]  # GroupKFold(4) then puts one patient of every class in each fold
        rng = np.random.default_rng(1000 + p)
        patient = random_patient(label, f"p{p}", rng)
        for v in range(2):
            frames, _ = synthetic_video_frames(label, seed=int(rng.integers(1 << 30)), size=64, patient=patient,
                                               n_frames=2, fps=10, width=64)
            coarse = frames[0].reshape(16, 4, 16, 4).mean((1, 3))
            # row and column profiles: A-lines are rows, B-lines columns, consolidation a blob
            features.append(np.concatenate([coarse.mean(1), np.sort(coarse[8:].mean(0)), np.sort(coarse.ravel())]))
            labels.append(label)
            groups.append(p)
    scores = cross_val_score(LogisticRegression(max_iter=2000), np.array(features) / 255, labels,
                             groups=groups, cv=GroupKFold(4))
    assert scores.mean() > 0.5  # chance is 1/3
