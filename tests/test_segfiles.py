"""One reader for segmentation files: MixCL pretraining (pool) and fine-tuning (SegTask) read the same
file into the same array; the data layer imports without cycles and never imports sampling."""

from __future__ import annotations

import ast
import csv
import graphlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medcl.data.pool import pool_from_specs
from medcl.data.seg_manifest import load_case, read_seg_csv
from medcl.data.segfiles import read_image_and_mask, read_mask, read_volume

SRC = Path(__file__).resolve().parents[1] / "src"
# file axes (S, L->R reversed, A) with a slight tilt: every reader must reorient to RAS
NON_RAS_AFFINE = np.array([[0.0, -1.5, 0.0, 10.0], [0.0, 0.0, 2.0, -5.0], [2.5, 0.0, 0.1, 3.0], [0.0, 0.0, 0.0, 1.0]])


def _manifests(root: Path, image: str, label: str, kind: str) -> Path:
    """One case as a fine-tuning CSV manifest and as a pretraining dataset folder (both in ``root``)."""
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "mask", "patient_id"])
        writer.writeheader()
        writer.writerow({"image": image, "mask": label, "patient_id": "P0"})
    if kind == "3d":
        index = {"labels": {"0": "background", "1": "organ", "2": "gland"},
                 "training": [{"image": image, "label": label}]}
        (root / "dataset.json").write_text(json.dumps(index))
    return root / "manifest.csv"


@pytest.fixture
def volume(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.zeros((14, 12, 10), np.uint8)
    labels[2:6, 3:8, 1:4] = 1
    labels[9:12, 0:3, 6:9] = 2  # asymmetric: a flip or transpose would show
    t2 = rng.normal(100.0, 10.0, labels.shape) + 300.0 * (labels == 1) - 50.0 * (labels == 2)
    t2[0, 0, 0] = 1e6  # one hot voxel: percentiles must ignore it
    image = np.stack([rng.normal(0.0, 1.0, labels.shape), t2], axis=-1).astype(np.float32)  # [X, Y, Z, 2]
    nib.save(nib.Nifti1Image(image, NON_RAS_AFFINE), tmp_path / "img4d.nii.gz")
    nib.save(nib.Nifti1Image(t2.astype(np.float32), NON_RAS_AFFINE), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(labels, NON_RAS_AFFINE), tmp_path / "lab.nii.gz")
    return tmp_path, t2.astype(np.float32), labels


@pytest.mark.parametrize("window,channel", [((50.0, 350.0), None), (None, None), (None, 1), ((50.0, 350.0), 1)])
def test_pretraining_and_fine_tuning_read_the_same_volume(volume, window, channel):
    root, t2, labels = volume
    image_file = "img4d.nii.gz" if channel is not None else "img.nii.gz"
    task = read_seg_csv(_manifests(root, image_file, "lab.nii.gz", "3d"), classes=["organ", "gland"])
    task.intensity_range, task.channel = window, channel
    x_ft, y_ft = load_case(task.cases[0], task, None)
    spec = {"adapter": "nifti_pairs", "root": str(root), "name": "mri", "window": window, "channel": channel}
    pre = pool_from_specs([spec], cache=0).load(0)
    np.testing.assert_array_equal(x_ft, pre["image"])
    np.testing.assert_array_equal(y_ft[0], pre["label"])
    # and both are the RAS volume, scaled as documented (an independent nibabel + numpy reference)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(t2, NON_RAS_AFFINE))
    ras = np.asarray(canonical.dataobj, dtype=np.float32)
    ras_labels = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(labels, NON_RAS_AFFINE)).dataobj)
    np.testing.assert_array_equal(y_ft[0], ras_labels)
    lo, hi = window if window is not None else np.percentile(ras, [0.5, 99.5])
    np.testing.assert_allclose(x_ft[0], (np.clip(ras, lo, hi) - lo) / (hi - lo), atol=1e-6)


def test_volume_channel_errors_name_the_file_and_the_callers_option(volume):
    root = volume[0]
    with pytest.raises(ValueError, match=r"img4d\.nii\.gz: 2 channels.*choose it with --flag"):
        read_volume(root / "img4d.nii.gz", root / "lab.nii.gz", how_to_choose_channel="--flag")
    with pytest.raises(ValueError, match=r"img4d\.nii\.gz: channel 2 asked but the image has 2 channels"):
        read_volume(root / "img4d.nii.gz", channel=2)
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        read_volume(root / "img.nii.gz", root / "nope.nii.gz")
    image, label = read_volume(root / "img.nii.gz", size=(7, 6, 5))  # no label map: zeros, resampled too
    assert image.shape == (1, 7, 6, 5) and image.dtype == np.float32 and label.shape == (7, 6, 5) and not label.any()


@pytest.mark.parametrize("ext,mode", [("jpg", "L"), ("png", "RGB"), ("bmp", "L")])
def test_pretraining_and_fine_tuning_read_the_same_image(tmp_path, ext, mode):
    rng = np.random.default_rng(1)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    pixels = rng.integers(0, 256, (23, 31, 3) if mode == "RGB" else (23, 31)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "images" / f"a.{ext}")
    mask = np.zeros((23, 31), np.uint8)
    mask[5:15, 8:20] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    task = read_seg_csv(_manifests(tmp_path, f"images/a.{ext}", "masks/a.png", "2d"))
    x_ft, y_ft = load_case(task.cases[0], task, (23, 31))  # the native size: no resampling
    pre = pool_from_specs([{"adapter": "image_folder", "root": str(tmp_path), "name": "us"}], cache=0).load(0)
    np.testing.assert_array_equal(x_ft, pre["image"])
    np.testing.assert_array_equal(y_ft[0], pre["label"])
    assert y_ft.sum() == 10 * 12
    with Image.open(tmp_path / "images" / f"a.{ext}") as im:  # grey levels / 255
        np.testing.assert_array_equal(x_ft[0], np.asarray(im.convert("L"), dtype=np.float32) / 255.0)


def test_mask_modes_and_shape_check(tmp_path):
    bits = np.zeros((6, 8), bool)
    bits[1:3, 2:5] = True
    Image.fromarray(bits).save(tmp_path / "one_bit.png")  # mode "1": reads 0 / 255, binarises to 1
    assert set(np.unique(read_mask(tmp_path / "one_bit.png", threshold=None))) == {0, 255}
    assert read_mask(tmp_path / "one_bit.png").sum() == 6
    palette = Image.frombytes("P", (8, 6), np.where(bits, 2, 0).astype(np.uint8).tobytes())
    palette.putpalette([0, 0, 0, 255, 255, 255, 255, 255, 255] + [0] * 759)
    palette.save(tmp_path / "indexed.png")  # raw values of an indexed PNG are its class ids ...
    assert set(np.unique(read_mask(tmp_path / "indexed.png", threshold=None))) == {0, 2}
    assert read_mask(tmp_path / "indexed.png").sum() == 6  # ... binarising reads its grey levels
    Image.fromarray(np.zeros((6, 9), np.uint8)).save(tmp_path / "image.png")
    with pytest.raises(ValueError, match=r"one_bit\.png: mask shape \(6, 8\) != image shape \(6, 9\)"):
        read_image_and_mask(tmp_path / "image.png", tmp_path / "one_bit.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image_and_mask(tmp_path / "missing.png", None)


DATA_MODULES = ["segtypes", "segfiles", "images", "volumes", "pool", "mixcl_views", "seg_manifest"]


@pytest.mark.parametrize("module", [f"medcl.data.{m}" for m in DATA_MODULES] + ["medcl.sampling.pixels"])
def test_module_imports_first_in_a_fresh_interpreter(module):
    run = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def _medcl_imports(path: Path) -> set[str]:
    """``medcl.*`` modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("medcl.")}


def test_data_layer_has_no_import_cycle_and_never_imports_sampling():
    modules = {f"medcl.{p.parent.name}.{p.stem}": p for pkg in ("data", "sampling")
               for p in (SRC / "medcl" / pkg).glob("*.py") if p.stem != "__init__"}
    graph = {name: _medcl_imports(path) & set(modules) - {name} for name, path in modules.items()}
    upward = {(m, d) for m, deps in graph.items() if m.startswith("medcl.data.") for d in deps
              if d.startswith("medcl.sampling")}
    assert not upward, f"the data layer imports the later sampling stage: {sorted(upward)}"
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
