"""Pooled segmentation sources with different label sets, in one global label space."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medcl.data.mixcl_views import MixCLViewMaker, crop_patch
from medcl.data.pool import SegmentationPool, build_source, pool_from_specs
from medcl.sampling.pixels import IGNORE_INDEX
from conftest import shared_subdir


def write_2d(root, name, values, masks, ext="png"):
    (root / name / "images").mkdir(parents=True)
    (root / name / "masks").mkdir(parents=True)
    for i, (value, mask) in enumerate(zip(values, masks)):
        Image.fromarray(np.full(mask.shape, value, np.uint8)).save(root / name / "images" / f"im{i}.{ext}")
        Image.fromarray(mask.astype(np.uint8)).save(root / name / "masks" / f"im{i}.png")
    return root / name


@pytest.fixture
def two_sources(tmp_path):
    """Source 'a': binary lesion masks (0/255). Source 'b': multi-class masks {1: liver, 2: tumour}."""
    m_a = np.zeros((20, 24), np.uint8)
    m_a[5:12, 6:14] = 255
    a = write_2d(tmp_path, "a", [40, 50, 60], [m_a, m_a, np.zeros_like(m_a)], ext="jpg")
    m_b = np.zeros((20, 24), np.uint8)
    m_b[2:10, 2:10] = 1
    m_b[4:6, 4:6] = 2
    b = write_2d(tmp_path, "b", [200, 210], [m_b, m_b])
    return [
        {"adapter": "image_folder", "root": str(a), "name": "a", "classes": {1: "lesion"}},
        {"adapter": "image_folder", "root": str(b), "name": "b", "classes": {"1": "liver", "2": "tumour"}, "threshold": None},
    ]


def test_global_label_space_and_annotated(two_sources):
    pool = pool_from_specs(two_sources)
    assert pool.class_names == ["background", "a/lesion", "b/liver", "b/tumour"]
    assert len(pool) == 5 and pool.items_of_source[1].tolist() == [3, 4]
    s = pool[0]
    assert s["image"].shape == (1, 20, 24) and s["image"].dtype == np.float32
    assert s["image"][0, 0, 0] == pytest.approx(40 / 255, abs=2 / 255)  # JPEG
    assert set(np.unique(s["label"])) == {0, 1}
    assert s["annotated"].tolist() == [True, True, False, False]  # background of 'a' says nothing about b's organs
    s = pool[3]
    assert set(np.unique(s["label"])) == {0, 2, 3} and s["label"][4, 4] == 3 and s["label"][3, 3] == 2
    assert s["annotated"].tolist() == [True, False, True, True]
    assert s["source"] == 1 and s["case_id"] == "im0"


def test_image_size_resizes_image_and_mask_together(two_sources):
    pool = pool_from_specs(two_sources, image_size=[10, 12])  # halve 20 x 24
    s = pool[0]
    assert s["image"].shape == (1, 10, 12) and s["label"].shape == (10, 12)
    assert s["image"][0, 0, 0] == pytest.approx(40 / 255, abs=2 / 255)  # flat image stays flat
    # the 7 x 8 lesion box at rows 5-11, cols 6-13 becomes (nearest) rows 3-5, cols 3-6
    assert set(np.unique(s["label"])) == {0, 1}
    assert s["label"].sum() == pytest.approx(7 * 8 / 4, abs=4)
    assert s["label"][4, 4] == 1 and s["label"][0, 0] == 0 and s["label"][9, 11] == 0
    t = pool[3]  # multi-class source: global ids survive (no interpolation between ids)
    assert set(np.unique(t["label"])) <= {0, 2, 3} and 2 in t["label"]
    with pytest.raises(ValueError, match="image_size must be two positive ints"):
        pool_from_specs(two_sources, image_size=[10])


def test_unannotated_class_values_are_ignored_and_unknown_values_fail(tmp_path):
    import nibabel as nib

    root = tmp_path / "ct"
    root.mkdir()
    vol = np.zeros((12, 12, 8), np.int16) - 1000
    lab = np.zeros((12, 12, 8), np.uint8)
    lab[2:5, 2:5, 2:4] = 1
    lab[7:10, 7:10, 4:6] = 2
    for name, arr in [("ct0", vol), ("lab0", lab), ("ct1", vol + 100), ("lab1", lab)]:
        nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 3.0, 1.0])), root / f"{name}.nii.gz")
    bad = lab.copy()
    bad[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(bad, np.eye(4)), root / "bad.nii.gz")
    index = {"labels": {"0": "background", "1": "liver", "2": "kidney"},
             "training": [{"image": "ct0.nii.gz", "label": "lab0.nii.gz"},
                          {"image": "ct1.nii.gz", "label": "lab1.nii.gz", "annotated": ["liver"]},
                          {"image": "ct1.nii.gz", "label": "bad.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(index))
    pool = pool_from_specs([{"adapter": "nifti_pairs", "root": str(root), "name": "ct", "window": [-150, 250]}], cache=0)
    assert pool.class_names == ["background", "ct/liver", "ct/kidney"] and pool.spatial_dims == 3
    full, partial = pool[0], pool[1]
    assert full["image"].shape == (1, 12, 12, 8) and full["image"].max() == 0.0  # -1000 HU clipped at -150
    assert np.isclose(partial["image"].max(), 0.0)  # -900 HU still below the window
    assert (full["label"] == 2).sum() == 18 and full["annotated"].tolist() == [True, True, True]
    # kidney was not annotated on case 1: its mask values are not trusted -> IGNORE, never background
    assert (partial["label"] == 2).sum() == 0 and (partial["label"] == IGNORE_INDEX).sum() == 18
    assert partial["annotated"].tolist() == [True, True, False]
    with pytest.raises(ValueError, match=r"bad\.nii\.gz.*\[7\]"):
        pool[2]


def test_pool_validation(tmp_path, two_sources):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pool_from_specs([{"adapter": "hc18", "root": str(tmp_path / "nope")}])
    with pytest.raises(ValueError, match="unknown dataset adapter"):
        pool_from_specs([{"adapter": "dicom_magic", "root": str(tmp_path)}])
    with pytest.raises(ValueError, match="unique"):
        pool_from_specs([two_sources[0], two_sources[0]])
    (tmp_path / "c" / "images").mkdir(parents=True)
    (tmp_path / "c" / "masks").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "c" / "images" / "x.png")
    with pytest.raises(FileNotFoundError, match="no mask"):
        build_source("image_folder", tmp_path / "c")


def test_crop_pads_with_ignore_and_fg_crop_hits_foreground():
    image = np.ones((1, 10, 6), np.float32)
    label = np.zeros((10, 6), np.int64)
    label[8, 5] = 4
    rng = np.random.default_rng(0)
    img, lab = crop_patch(image, label, (8, 8), rng, fg_prob=1.0)
    assert img.shape == (1, 8, 8) and (lab == 4).sum() == 1
    assert (lab == IGNORE_INDEX).sum() == 16 and (img == 0).sum() == 16  # 2 padded columns
    for _ in range(20):
        _, lab = crop_patch(image, label, (4, 4), rng, fg_prob=1.0)
        assert (lab == 4).sum() == 1


def test_view_maker_pairs_within_a_source_and_is_reproducible(two_sources):
    pool = pool_from_specs(two_sources)
    plain = dict(affine_prob=0.0, intensity_prob=0.0, fg_crop_prob=0.5)
    other = MixCLViewMaker(pool, 16, same_image_prob=0.0, **plain)
    rng = np.random.default_rng(1)
    for _ in range(5):
        batch = other.make_batch([0, 1, 2, 3, 4], rng)
        v1 = batch["patch1"][:, 0, 8, 8] * 255
        v2 = batch["patch2"][:, 0, 8, 8] * 255
        assert torch.all((v1 > 128) == (v2 > 128))  # P2 from the same source (a: dark, b: bright)
        assert torch.all((v1 - v2).abs() > 5)  # ... but from another image of it
        assert torch.equal(batch["view1"], batch["patch1"])  # no augmentation configured
        assert torch.equal(batch["annotated1"][3:], batch["annotated2"][3:])
    same = MixCLViewMaker(pool, 16, same_image_prob=1.0, **plain)
    batch = same.make_batch([0, 3], rng)
    torch.testing.assert_close(batch["patch1"][:, 0, 8, 8], batch["patch2"][:, 0, 8, 8])
    # full augmentation: shapes, dtypes, aligned views differ only in intensity, reproducible
    aug = MixCLViewMaker(pool, 16, affine_prob=1.0, elastic_prob=1.0, intensity_prob=1.0)
    b1 = aug.make_batch([0, 3, 4], np.random.default_rng(5))
    b2 = aug.make_batch([0, 3, 4], np.random.default_rng(5))
    for key, value in b1.items():
        assert torch.equal(value, b2[key]), key
    assert b1["view1"].shape == (3, 1, 16, 16) and b1["label1"].dtype == torch.int64
    assert b1["annotated1"].shape == (3, 4) and b1["source"].tolist() == [0, 1, 1]
    assert not torch.equal(b1["view1"], b1["view1b"])
    assert set(b1["label1"].unique().tolist()) <= {IGNORE_INDEX, 0, 1, 2, 3}


# ---------------------------------------------------------------- real data (skipped when absent)
@pytest.mark.realdata
@pytest.mark.parametrize("adapter,n_items,cls", [("hc18", 806, "head"), ("tg3k", 500, "thyroid"),
                                                 ("ctrus", 827, "colon_wall"), ("busbra", 1875, "lesion")])
def test_real_ultrasound_adapters(adapter, n_items, cls):
    root = shared_subdir(f"us-seg/{adapter}")
    source = build_source(adapter, root)
    assert len(source.items) == n_items and source.classes == {1: cls}
    pool = SegmentationPool([source], cache=0)
    s = pool[0]
    assert s["image"].ndim == 3 and s["image"].shape[1:] == s["label"].shape
    assert set(np.unique(s["label"])) <= {0, 1} and 0.0 <= s["image"].min() <= s["image"].max() <= 1.0
    if adapter == "busbra":
        assert source.items[0].patient_id == source.items[1].patient_id == "case1"  # bus_0001-l / -r


@pytest.mark.realdata
def test_real_openkbp_contoured_and_views():
    root = shared_subdir("openkbp")
    index = json.loads((root / "index.json").read_text())
    pool = pool_from_specs([{"adapter": "openkbp", "root": str(root)}], cache=2)
    assert len(pool) == len(index["patients"]) == 110 and pool.num_classes == 8
    k = next(i for i, p in enumerate(index["patients"]) if len(p["contoured"]) < 7)
    sample = pool[k]
    names = [pool.class_names[c].split("/")[1] for c in np.flatnonzero(sample["annotated"][1:]) + 1]
    assert sorted(names) == sorted(index["patients"][k]["contoured"])
    assert sample["image"].shape == (1, 128, 128, 128)
    present = set(np.unique(sample["label"]).tolist()) - {0, IGNORE_INDEX}
    assert all(sample["annotated"][c] for c in present)
    views = MixCLViewMaker(pool, 32, elastic_prob=0.0)
    batch = views.make_batch([k, 0], np.random.default_rng(0))
    assert batch["view1"].shape == (2, 1, 32, 32, 32) and batch["annotated1"].shape == (2, 8)
