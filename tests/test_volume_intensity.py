"""3D volumes outside CT: percentile intensity scaling, RAS orientation shared by pretraining and
fine-tuning, 4D multi-modal images (one channel chosen), and the CLI flags that set them."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medcl.data.pool import build_source
from medcl.data.seg_manifest import load_case, read_seg_csv
from medcl.data.volumes import load_volume
from medcl.cli.finetune import apply_intensity_options


def _write(root: Path, image: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> Path:
    """One case as a CSV manifest (fine-tuning) and an MSD dataset.json (pretraining)."""
    root.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "img.nii.gz")
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), root / "lab.nii.gz")
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "mask", "patient_id"])
        writer.writeheader()
        writer.writerow({"image": "img.nii.gz", "mask": "lab.nii.gz", "patient_id": "P0"})
    (root / "dataset.json").write_text(json.dumps(
        {"labels": {"0": "background", "1": "organ"}, "training": [{"image": "img.nii.gz", "label": "lab.nii.gz"}]}))
    return root / "manifest.csv"


def _mri_like(rng: np.random.Generator, shape=(12, 10, 8)) -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros(shape, np.uint8)
    labels[2:6, 3:7, 1:4] = 1
    image = rng.normal(100.0, 10.0, shape) + 300.0 * labels
    image[0, 0, 0] = 1e6  # one hot voxel (MRI artefact): min-max would squash everything else to ~0
    return image, labels


def test_percentile_scaling_is_robust_to_an_extreme_voxel(tmp_path):
    image, labels = _mri_like(np.random.default_rng(0))
    task = read_seg_csv(_write(tmp_path, image, labels, np.eye(4)))
    assert task.intensity_range is None and task.percentiles == (0.5, 99.5)
    x, y = load_case(task.cases[0], task, None)
    assert x.shape == (1, 12, 10, 8) and 0.0 <= x.min() and x.max() <= 1.0
    inside, outside = x[0][labels == 1].mean(), x[0][labels == 0].mean()
    assert inside > 0.7 and outside < 0.3  # organ vs tissue contrast survives
    # the definition: clip to the volume's percentiles, then scale to [0, 1]
    lo, hi = np.percentile(image.astype(np.float32), [0.5, 99.5])
    np.testing.assert_allclose(x[0], (np.clip(image, lo, hi) - lo) / (hi - lo), atol=1e-5)
    task.percentiles = (0.0, 100.0)  # plain min-max: the hot voxel takes the whole range
    x_mm, _ = load_case(task.cases[0], task, None)
    assert x_mm[0][labels == 1].mean() < 0.01


def test_pretraining_and_fine_tuning_load_the_same_array(tmp_path):
    """A volume stored in LPS order: both loaders reorient to RAS, so a pretrained encoder sees
    fine-tuning volumes the way it saw pretraining volumes."""
    rng = np.random.default_rng(1)
    image, labels = _mri_like(rng)
    labels[8:11, 0:2, 5:8] = 1  # asymmetric, so a flip would show
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    task = read_seg_csv(_write(tmp_path, image, labels, affine))
    x_ft, y_ft = load_case(task.cases[0], task, None)
    source = build_source("nifti_pairs", tmp_path, name="mri", window=None)
    x_pre, y_pre = load_volume(source.items[0], source)
    np.testing.assert_allclose(x_ft, x_pre, atol=1e-4)
    np.testing.assert_array_equal(y_ft[0], y_pre)
    np.testing.assert_array_equal(y_ft[0], labels[::-1, ::-1, :])  # LPS -> RAS flips x and y


def test_4d_image_needs_one_channel(tmp_path):
    rng = np.random.default_rng(2)
    t2, labels = _mri_like(rng)
    noise = rng.normal(0.0, 1.0, t2.shape)
    image = np.stack([noise, t2], axis=-1)  # [X, Y, Z, 2]: two modalities, mask is 3D
    manifest = _write(tmp_path, image, labels, np.eye(4))
    task = read_seg_csv(manifest)
    with pytest.raises(ValueError, match=r"2 channels.*--channel"):
        load_case(task.cases[0], task, None)
    task.channel = 1
    x, _ = load_case(task.cases[0], task, None)
    assert x.shape == (1, 12, 10, 8) and x[0][labels == 1].mean() > 0.7  # the T2 channel, not the noise
    task.channel = 5
    with pytest.raises(ValueError, match="channel 5 asked but .* has 2 channels"):
        load_case(task.cases[0], task, None)
    # pretraining: the same choice as a dataset option
    with pytest.raises(ValueError, match="channel: K"):
        load_volume(build_source("nifti_pairs", tmp_path, window=None).items[0], build_source("nifti_pairs", tmp_path, window=None))
    source = build_source("nifti_pairs", tmp_path, window=None, channel=1)
    x_pre, _ = load_volume(source.items[0], source)
    np.testing.assert_allclose(x_pre, x, atol=1e-4)


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"window": None, "percentiles": None, "channel": None, **kw})


def test_cli_intensity_flags(tmp_path):
    image, labels = _mri_like(np.random.default_rng(3))
    task = read_seg_csv(_write(tmp_path, image, labels, np.eye(4)))
    apply_intensity_options(task, _args(percentiles="1,99", channel=0))
    assert task.percentiles == (1.0, 99.0) and task.intensity_range is None and task.channel == 0
    apply_intensity_options(task, _args(window="-150,250"))
    assert task.intensity_range == (-150.0, 250.0)
    assert task.summary()["intensity"] == "window [-150.0, 250.0]"
    for bad, message in [("250,-150", "LO < HI"), ("1,2,3", "two numbers"), ("a,b", "two numbers")]:
        with pytest.raises(SystemExit, match=message):
            apply_intensity_options(task, _args(window=bad))
    with pytest.raises(SystemExit, match=r"\[0, 100\]"):
        apply_intensity_options(task, _args(percentiles="-1,99"))
    task.spatial_dims = 2
    with pytest.raises(SystemExit, match="3D volumes only"):
        apply_intensity_options(task, _args(channel=0))
