"""Segmentation fine-tuning evaluation: splits, Dice, sliding window, tiny end-to-end runs."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medcl.data.seg_manifest import busbra_task, load_case, openkbp_task, read_seg_csv
from medcl.data.splits import kfold_by_patient, select_label_fraction, split_patients
from medcl.evaluate.segment import (
    SegmentConfig,
    dice_per_class,
    precision_recall,
    predict,
    random_crop,
    run_segmentation,
    surface_metrics,
    voxel_counts,
)

TINY_MODEL = {"patch_size": 4, "hidden_size": 16, "mlp_dim": 32, "num_layers": 2, "num_heads": 2, "feature_size": 4}


# --------------------------------------------------------------------------------- splits


def _patients(n_patients: int, seed: int = 0) -> list[str]:
    """Case -> patient list with 1-3 cases per patient, interleaved."""
    rng = np.random.default_rng(seed)
    ids = [f"p{i:02d}" for i in range(n_patients) for _ in range(int(rng.integers(1, 4)))]
    return [ids[i] for i in rng.permutation(len(ids))]


@pytest.mark.parametrize("fraction", [0.05, 0.15, 0.5, 1.0])
def test_label_fraction_selects_whole_patients(fraction):
    patients = _patients(40)
    chosen = select_label_fraction(patients, fraction, seed=3)
    chosen_patients = {patients[i] for i in chosen}
    # every case of a chosen patient is in, no case of another patient
    assert sorted(chosen) == [i for i, p in enumerate(patients) if p in chosen_patients]
    assert len(chosen_patients) == max(1, round(fraction * 40))


def test_label_fraction_is_seeded_and_nested():
    patients = _patients(30)
    a = select_label_fraction(patients, 0.15, seed=1)
    assert a == select_label_fraction(patients, 0.15, seed=1)
    assert a != select_label_fraction(patients, 0.15, seed=2)
    small, large = set(a), set(select_label_fraction(patients, 0.5, seed=1))
    assert small < large
    assert select_label_fraction(patients, 1.0, seed=5) == list(range(len(patients)))
    with pytest.raises(ValueError, match="fraction"):
        select_label_fraction(patients, 0.0, seed=0)


def test_folds_and_validation_never_split_a_patient():
    patients = _patients(23)
    folds = kfold_by_patient(patients, 5, seed=0)
    by_patient: dict[str, set[int]] = {}
    for p, f in zip(patients, folds):
        by_patient.setdefault(p, set()).add(f)
    assert all(len(v) == 1 for v in by_patient.values())
    assert set(folds) == {1, 2, 3, 4, 5}
    held, rest = split_patients(patients, 0.2, seed=4)
    assert not {patients[i] for i in held} & {patients[i] for i in rest}
    assert sorted(held + rest) == list(range(len(patients)))
    assert len({patients[i] for i in held}) == round(0.2 * 23)


# --------------------------------------------------------------------------------- metrics


def test_dice_matches_hand_computation():
    gt = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    pred = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    gt[0, 0, :2, :2] = 1  # 4 pixels of class 1
    pred[0, 0, :2, :1] = 1  # 2 of them predicted
    pred[0, 0, 3, 3] = 1  # plus one false positive
    gt[0, 0, 2:, :2] = 2  # 4 pixels of class 2
    pred[0, 0, 2:, :2] = 2  # all right
    pred[0, 0, 0, 3] = 2  # plus one false positive
    got = dice_per_class(pred, gt, 3)
    # class 1: 2 * 2 / (3 + 4); class 2: 2 * 4 / (5 + 4)
    np.testing.assert_allclose(got, [[4 / 7, 8 / 9]], rtol=1e-6)
    # a class absent from the ground truth is NaN (skipped when averaging), not 0 or 1
    gt2 = torch.zeros_like(gt)
    gt2[0, 0, 0, 0] = 1
    assert np.isnan(dice_per_class(pred, gt2, 3)[0, 1])
    # the same example as voxel counts, and precision / recall pooled over cases
    counts = voxel_counts(pred, gt, 3)
    np.testing.assert_array_equal(counts, [[[2, 3, 4], [4, 5, 4]]])
    pr = precision_recall(np.concatenate([counts, voxel_counts(pred, gt2, 3)]), ["a", "b"])
    # class a: overlap 2 + 1 (gt2 has a at (0, 0), predicted), predicted 3 + 3, true 4 + 1
    assert pr["precision"]["a"] == pytest.approx(3 / 6) and pr["recall"]["a"] == pytest.approx(3 / 5)
    # class b: overlap 4 + 0, predicted 5 + 5, true 4 + 0
    assert pr["precision"]["b"] == pytest.approx(4 / 10) and pr["recall"]["b"] == pytest.approx(1.0)
    empty = precision_recall(np.zeros((1, 2, 3), np.int64), ["a", "b"])
    assert np.isnan(empty["precision"]["a"]) and np.isnan(empty["recall"]["b"])


def test_sliding_window_keeps_the_volume_shape():
    from medcl.evaluate.segment import build_segmentation_model

    torch.manual_seed(0)
    model = build_segmentation_model(3, (16, 16, 16), 1, 3, **TINY_MODEL).eval()
    volume = torch.rand(1, 1, 24, 20, 28)
    out = predict(model, volume, (16, 16, 16), sw_batch_size=2, overlap=0.25)
    assert out.shape == (1, 3, 24, 20, 28)
    assert torch.isfinite(out).all()
    # an input of exactly the ROI size goes straight through the model
    direct = predict(model, volume[..., :16, :16, :16], (16, 16, 16))
    with torch.no_grad():
        np.testing.assert_allclose(direct.numpy(), model(volume[..., :16, :16, :16]).numpy(), rtol=1e-5)


def test_random_crop_centres_on_foreground():
    rng = np.random.default_rng(0)
    image = np.zeros((1, 40, 40, 40), np.float32)
    labels = np.zeros((1, 40, 40, 40), np.int64)
    labels[0, 30:34, 2:5, 35:38] = 2
    for _ in range(10):
        img, lab = random_crop(image, labels, (8, 8, 8), pos_fraction=1.0, rng=rng)
        assert img.shape == (1, 8, 8, 8) and lab.shape == (1, 8, 8, 8)
        assert (lab == 2).any()
    small, _ = random_crop(image[:, :5], labels[:, :5], (8, 8, 8), 0.0, rng)
    assert small.shape == (1, 8, 8, 8)  # padded


# --------------------------------------------------------------------------------- synthetic data


def _disc_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
    r = rng.integers(size // 8, size // 4)
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def write_2d_manifest(root: Path, n_patients: int = 10, size: int = 40, seed: int = 0) -> Path:
    """Bright discs on noise (0/255 PNG masks); two images per patient; two test patients."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    (root / "msk").mkdir()
    rows = []
    for p in range(n_patients):
        for k in range(2):
            mask = _disc_mask(size, rng)
            image = np.clip(rng.normal(60, 20, (size, size)) + 120 * mask, 0, 255).astype(np.uint8)
            name = f"p{p}_{k}"
            Image.fromarray(image).save(root / "img" / f"{name}.png")
            Image.fromarray(mask * 255).save(root / "msk" / f"{name}.png")
            split = "test" if p >= n_patients - 2 else "train"
            rows.append({"image": f"img/{name}.png", "mask": f"msk/{name}.png", "patient_id": f"P{p}", "split": split})
    path = root / "manifest.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_3d_manifest(root: Path, n_patients: int = 6, size: int = 20, seed: int = 0) -> Path:
    """NIfTI volumes with two cuboid organs (labels 1, 2)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(n_patients):
        labels = np.zeros((size, size, size), np.uint8)
        a, b = rng.integers(2, 6, size=2)
        labels[a : a + 6, a : a + 6, 3:10] = 1
        labels[10 + b // 2 : 16, 4:12, 11 + b // 2 : 18] = 2
        ct = rng.normal(0, 30, labels.shape) + 200.0 * (labels == 1) - 100.0 * (labels == 2)
        nib.save(nib.Nifti1Image(ct.astype(np.float32), np.eye(4)), root / f"ct{p}.nii.gz")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), root / f"lab{p}.nii.gz")
        rows.append({"image": f"ct{p}.nii.gz", "mask": f"lab{p}.nii.gz", "patient_id": f"P{p}"})
    path = root / "manifest.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_manifest_reads_and_validates(tmp_path):
    path = write_2d_manifest(tmp_path / "d", n_patients=4, size=16)
    task = read_seg_csv(path)
    assert task.spatial_dims == 2 and task.classes == ["foreground"]
    assert len(task.cases) == 4 and len(task.test_cases) == 4
    image, labels = load_case(task.cases[0], task, (24, 24))
    assert image.shape == (1, 24, 24) and image.dtype == np.float32 and 0 <= image.min() <= image.max() <= 1
    assert set(np.unique(labels)) <= {0, 1} and labels.any()
    bad = tmp_path / "bad.csv"
    bad.write_text("image,patient\nx.png,1\n")
    with pytest.raises(ValueError, match="missing column"):
        read_seg_csv(bad)


# --------------------------------------------------------------------------------- end to end


def _naive_surface(pred: np.ndarray, gt: np.ndarray, tol: float) -> tuple[float, float]:
    """HD95 and NSD of two binary masks by brute force: boundary = mask minus its erosion (face
    connectivity, as MONAI), all pairwise Euclidean distances between the two boundaries."""
    from scipy.ndimage import binary_erosion

    def edge(m):
        return np.argwhere(m & ~binary_erosion(m, border_value=0))

    ep, eg = edge(pred.astype(bool)), edge(gt.astype(bool))
    d = np.sqrt(((ep[:, None, :] - eg[None, :, :]) ** 2).sum(-1))
    d_pg, d_gp = d.min(1), d.min(0)
    hd95 = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    nsd = ((d_pg <= tol).sum() + (d_gp <= tol).sum()) / (len(d_pg) + len(d_gp))
    return float(hd95), float(nsd)


@pytest.mark.parametrize("dims", [2, 3])
def test_surface_metrics_match_a_naive_reference(dims):
    rng = np.random.default_rng(dims)
    shape = (24, 20) if dims == 2 else (14, 12, 10)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    gt, pred = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    for label, centre_gt, centre_pred, r_gt, r_pred in ((1, 0.4, 0.45, 4.5, 3.5), (2, 0.65, 0.6, 3.0, 4.0)):
        cg = np.array(shape) * centre_gt
        cp = np.array(shape) * centre_pred + rng.normal(0, 0.5, dims)
        gt[((grid - cg) ** 2).sum(-1) <= r_gt**2] = label
        pred[((grid - cp) ** 2).sum(-1) <= r_pred**2] = label
    pred[tuple(rng.integers(0, n, 3) for n in shape)] = 1  # stray false positives far away
    got = surface_metrics(torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None], 3, tolerance=1.5)
    assert got.shape == (1, 2, 2)
    for label in (1, 2):
        hd95, nsd = _naive_surface(pred == label, gt == label, 1.5)
        assert got[0, label - 1, 0] == pytest.approx(hd95, rel=1e-4)
        assert got[0, label - 1, 1] == pytest.approx(nsd, rel=1e-4)
    # identical masks: HD95 0, NSD 1; a class missing from the prediction: NSD 0, HD95 = the diagonal;
    # a class absent from the ground truth: NaN for both (skipped like Dice)
    same = surface_metrics(torch.from_numpy(gt)[None, None], torch.from_numpy(gt)[None, None], 3, tolerance=1.0)
    np.testing.assert_allclose(same[0, :, 0], 0.0)
    np.testing.assert_allclose(same[0, :, 1], 1.0)
    missing = surface_metrics(torch.zeros(1, 1, *shape), torch.from_numpy(gt)[None, None], 3, tolerance=1.0)
    np.testing.assert_allclose(missing[0, :, 1], 0.0)
    np.testing.assert_allclose(missing[0, :, 0], np.sqrt(sum(n * n for n in shape)))
    only1 = np.where(gt == 2, 0, gt)
    absent = surface_metrics(torch.from_numpy(pred)[None, None], torch.from_numpy(only1)[None, None], 3, tolerance=1.0)
    assert np.isnan(absent[0, 1]).all() and not np.isnan(absent[0, 0]).any()


def test_tiny_2d_finetune_end_to_end(tmp_path):
    task = read_seg_csv(write_2d_manifest(tmp_path / "data"))
    cfg = SegmentConfig(
        size=[32, 32], model=TINY_MODEL, iterations=6, batch_size=2, val_every=3,
        fractions=[0.5, 1.0], n_folds=2, folds=[1, 2], val_fraction=0.25, n_overlays=2, lr=1e-3,
    )
    out = tmp_path / "run"
    results = run_segmentation(task, cfg, out, log=None)
    assert len(results["runs"]) == 4
    for run in results["runs"]:
        assert 0.0 <= run["test"]["mean_dice"] <= 1.0
        assert 0.0 <= run["external_test"]["mean_dice"] <= 1.0
        assert run["best_iteration"] in (3, 6)
    assert results["runs"][0]["n_train_patients"] < results["runs"][1]["n_train_patients"]
    assert set(results["summary"]) == {"0.5", "1"}
    assert results["summary"]["1"]["test_mean_dice"]["n"] == 2
    for run in results["runs"]:  # surface metrics of the test fold, in pixels of the 32 x 32 grid
        assert 0.0 <= run["test"]["nsd"]["foreground"] <= 1.0 and 0.0 <= run["test"]["hd95"]["foreground"] <= np.sqrt(2) * 32
    assert set(results["summary"]["1"]["test_hd95_per_class"]) == {"foreground"}
    assert "HD95" in (out / "results.md").read_text()
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {"hd95_foreground", "nsd_foreground", "dice_foreground"} <= set(rows[0])
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
    assert "| 100% |" in (out / "results.md").read_text()
    curves = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    assert len(curves) == 4 * 2 and {"fold", "fraction", "iteration", "train_loss", "val_mean_dice"} <= set(curves[0])
    assert (out / "config.yaml").is_file()
    overlays = sorted((out / "overlays").glob("*.npz"))
    assert len(overlays) == 2 * 2  # first fold, each fraction
    with np.load(overlays[0]) as z:
        assert z["image"].shape == z["pred"].shape == z["gt"].shape == (32, 32)
        assert z["pred"].dtype == np.uint8 and z["gt"].max() == 1


def _fake_pretrained_checkpoint(path: Path, spatial_dims: int, img_size, **model) -> None:
    """A checkpoint in the shared medcl-checkpoint-v1 format holding a UNETR encoder."""
    from medcl.models.unetr import build_unetr, encoder_kwargs

    net = build_unetr(spatial_dims=spatial_dims, img_size=img_size, in_channels=1, out_channels=1, **model)
    with torch.no_grad():
        for p in net.encoder.parameters():
            p.add_(0.5)  # recognisable weights
    state = {f"backbone.{k}": v for k, v in net.encoder.state_dict().items()}
    torch.save(
        {"format": "medcl-checkpoint-v1", "method": "mixcl", "config": {}, "model": state, "step": 1,
         "backbone": {"name": "unetr_encoder", "kwargs": encoder_kwargs(net.encoder), "prefix": "backbone."}},
        path,
    )


def test_tiny_3d_finetune_from_checkpoint(tmp_path, monkeypatch):
    task = read_seg_csv(write_3d_manifest(tmp_path / "vol"), classes=["bright", "dark"])
    assert task.spatial_dims == 3 and task.n_classes == 3
    model = {k: v for k, v in TINY_MODEL.items() if k != "feature_size"}
    ckpt = tmp_path / "pre.pt"
    # pretrained on 12^3 patches: fine-tuning on 16^3 interpolates the position embedding
    _fake_pretrained_checkpoint(ckpt, 3, (12, 12, 12), **model)
    loaded = {}
    import medcl.evaluate.segment as seg

    original = seg.load_encoder_into

    def spy(net, state, source="checkpoint"):
        original(net, state, source)
        loaded["proj"] = net.encoder.patch_embedding.patch_embeddings.weight.detach().clone()
        loaded["expected"] = state["patch_embedding.patch_embeddings.weight"]

    monkeypatch.setattr(seg, "load_encoder_into", spy)
    cfg = SegmentConfig(
        roi_size=[16, 16, 16], model={"feature_size": 4, "hidden_size": 999}, checkpoint=str(ckpt),
        iterations=2, batch_size=1, val_every=2, fractions=[1.0], n_folds=3, folds=[1], val_fraction=0.2,
        sw_batch_size=2, n_overlays=1,
    )
    results = run_segmentation(task, cfg, tmp_path / "run3d", log=None)
    torch.testing.assert_close(loaded["proj"], loaded["expected"])
    assert results["init"] == "pretrained"
    assert results["model"]["hidden_size"] == 16  # the checkpoint's encoder, not the config's
    run = results["runs"][0]
    assert set(run["test"]["per_class"]) == {"bright", "dark"}
    assert set(run["test"]["recall"]) == {"bright", "dark"}
    assert all(0.0 <= v <= 1.0 for v in run["test"]["recall"].values())  # every test case holds both organs
    assert "test_precision" in results["summary"]["1"]
    assert "Voxel precision / recall" in (tmp_path / "run3d" / "results.md").read_text()
    overlay = next((tmp_path / "run3d" / "overlays").glob("*.npz"))
    with np.load(overlay) as z:
        assert z["image"].shape == (20, 20) and z["gt"].any()  # the axial slice with most foreground


def test_checkpoint_of_wrong_backbone_is_rejected(tmp_path):
    from medcl.evaluate.segment import load_encoder_checkpoint

    path = tmp_path / "resnet.pt"
    torch.save({"format": "medcl-checkpoint-v1", "method": "uscl", "config": {}, "model": {"backbone.w": torch.zeros(1)},
                "step": 0, "backbone": {"name": "resnet18", "kwargs": {}, "prefix": "backbone."}}, path)
    with pytest.raises(ValueError, match="unetr_encoder"):
        load_encoder_checkpoint(path)


def test_cli_compares_initialisations(tmp_path, capsys):
    from medcl.cli import build_parser

    manifest = write_2d_manifest(tmp_path / "data", n_patients=6, size=24)
    test_manifest = write_2d_manifest(tmp_path / "other", n_patients=2, size=24, seed=1)
    ckpt = tmp_path / "mixcl" / "checkpoints" / "final.pt"
    ckpt.parent.mkdir(parents=True)
    _fake_pretrained_checkpoint(ckpt, 2, (32, 32), **{k: v for k, v in TINY_MODEL.items() if k != "feature_size"})
    parser = build_parser()
    cfg_path = tmp_path / "seg.yaml"
    cfg_path.write_text("segment:\n  model: {patch_size: 4, hidden_size: 16, mlp_dim: 32, num_layers: 2, num_heads: 2,"
                        " feature_size: 4}\n  val_every: 1\n")
    args = parser.parse_args([
        "finetune", str(manifest), "--task", "segment", "--out", str(tmp_path / "cli"), "--config", str(cfg_path), "--folds", "3",
        "--fractions", "0.5,1", "--run-folds", "1,2", "--iterations", "2", "--size", "32,32",
        "--init", "scratch", "--init", str(ckpt), "--test-manifest", str(test_manifest),
    ])
    assert args.task == "segment"
    assert args.func(args) == 0
    for name in ("scratch", "mixcl"):
        assert (tmp_path / "cli" / name / "results.md").is_file()
    saved = json.loads((tmp_path / "cli" / "mixcl" / "results.json").read_text())
    assert all(r["external_test"]["n_cases"] == 4 for r in saved["runs"])  # 2 patients x 2 images
    table = (tmp_path / "cli" / "comparison.md").read_text()
    assert "mixcl - scratch (paired)" in table and "| 50% |" in table and "/2 folds better" in table
    assert "| label fraction | scratch HD95 | scratch NSD | mixcl HD95 | mixcl NSD |" in table
    assert "test mean Dice" in capsys.readouterr().out


# --------------------------------------------------------------------------------- real data


def test_busbra_task_folds_are_patient_level(shared_data):
    root = shared_data / "us-seg" / "busbra"
    task = busbra_task(root)
    assert len(task.cases) == 1875 and task.has_predefined_folds()
    folds: dict[str, set] = {}
    for c in task.cases:
        folds.setdefault(c.patient_id, set()).add(c.fold)
    assert all(len(v) == 1 for v in folds.values())
    image, labels = load_case(task.cases[0], task, (48, 48))
    assert image.shape == labels.shape == (1, 48, 48) and set(np.unique(labels)) == {0, 1}


def test_openkbp_task_keeps_only_fully_contoured_patients(shared_data):
    root = shared_data / "openkbp"
    task = openkbp_task(root, ["Larynx", "Esophagus"])
    index = json.loads((root / "index.json").read_text())["patients"]
    eligible = {p["patient"] for p in index if {"Larynx", "Esophagus"} <= set(p["contoured"])}
    assert {c.patient_id for c in task.cases} == eligible
    assert task.label_map == {6: 1, 5: 2}
    image, labels = load_case(task.cases[0], task, (32, 32, 32))
    assert image.shape == labels.shape == (1, 32, 32, 32)
    assert set(np.unique(labels)) <= {0, 1, 2} and (labels == 1).any()
    lacking = next(p["patient"] for p in index if "Larynx" not in p["contoured"])
    with pytest.raises(ValueError, match="no contour"):
        openkbp_task(root, ["Larynx"], patients=[lacking])


def test_openkbp_source_organ_and_patient_subsets(shared_data):
    """Pretraining sources cut from OpenKBP (benchmarks/mixcl_3d.py): other organs are unknown."""
    from medcl.data.pool import SegmentationPool
    from medcl.data.volumes import openkbp_source
    from medcl.sampling.pixels import IGNORE_INDEX

    root = shared_data / "openkbp"
    source = openkbp_source(root, name="glands", patients=["pt_1", "pt_10"], organs=["Mandible", "LeftParotid"])
    assert [i.case_id for i in source.items] == ["pt_1", "pt_10"]
    assert source.items[0].annotated == ("LeftParotid", "Mandible")  # pt_1 has both
    assert source.items[1].annotated == ("LeftParotid",)  # pt_10: no mandible contour
    sample = SegmentationPool([source]).load(0)
    names = SegmentationPool([source]).class_names
    raw = np.asarray(nib.load(root / "pt_1" / "labels.nii.gz").dataobj)
    label = sample["label"]
    assert (label[raw == 7] == names.index("glands/Mandible")).all()
    assert (label[raw == 1] == IGNORE_INDEX).all()  # brainstem: contoured, but not in this source's subset
    with pytest.raises(ValueError, match="organs"):
        openkbp_source(root, organs=["Liver"])


def test_medcl_finetune_task_segment(tmp_path):
    """The real command: `medcl finetune DATA --task segment` dispatches to the segmentation protocol."""
    from medcl.cli import main

    manifest = write_2d_manifest(tmp_path / "data", n_patients=5, size=24)
    out = tmp_path / "run"
    model = ["--model", "patch_size=4", "--model", "hidden_size=16", "--model", "mlp_dim=32", "--model", "num_layers=2",
             "--model", "num_heads=2", "--model", "feature_size=4"]
    assert main(["finetune", str(manifest), "--task", "segment", "--out", str(out), "--size", "24,24", "--folds", "3",
                 "--run-folds", "2", "--fractions", "1", "--iterations", "2", "--batch-size", "2", *model]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["init"] == "scratch" and [r["fold"] for r in results["runs"]] == [2]
    assert results["model"]["hidden_size"] == 16


def test_segmentation_bootstrap_matches_a_naive_reference():
    from medcl.evaluate.compare import compare_segmentation, patient_resamples

    cases = [("c1", "p1"), ("c2", "p1"), ("c3", "p2"), ("c4", "p3")]
    dice = {"a": [0.5, 0.7, 0.9, 0.2], "b": [0.6, 0.7, 1.0, 0.4]}
    rows = {n: [{"fold": 1, "fraction": 0.5, "split": "test", "case_id": c, "patient_id": p, "mean_dice": d}
                for (c, p), d in zip(cases, dice[n])]
            + [{"fold": 1, "fraction": 0.5, "split": "external", "case_id": "x", "patient_id": "q", "mean_dice": 0.0}]
            for n in dice}
    out = compare_segmentation([rows["a"], rows["b"]], ["a", "b"], n_boot=200, seed=3)
    entry = out["fractions"]["0.5"]
    assert entry["n_cases"] == 4 and entry["n_patients"] == 3  # the external case does not count
    pair = entry["pairs"][0]
    assert pair["diff"] == pytest.approx(np.mean(dice["b"]) - np.mean(dice["a"]))
    # naive: resample patients, pool their cases, difference of case means
    counts = patient_resamples(3, 200, np.random.default_rng(3))
    patients = ["p1", "p2", "p3"]
    diffs = []
    for draw in counts:
        w = np.array([draw[patients.index(p)] for _, p in cases])
        diffs.append(np.sum(w * dice["b"]) / w.sum() - np.sum(w * dice["a"]) / w.sum())
    assert pair["ci_low"] == pytest.approx(np.percentile(diffs, 2.5))
    assert pair["ci_high"] == pytest.approx(np.percentile(diffs, 97.5))
    with pytest.raises(ValueError, match="same folds"):
        compare_segmentation([rows["a"], rows["b"][1:]], ["a", "b"], n_boot=10)


def test_python_api_compares_segmentation_inits_and_checks_them_first(tmp_path):
    from medcl.evaluate.segment import finetune

    task = read_seg_csv(write_2d_manifest(tmp_path / "data", n_patients=6, size=24))
    cfg = SegmentConfig(size=[24, 24], model=TINY_MODEL, iterations=2, batch_size=2, val_every=1, fractions=[1.0],
                        n_folds=3, folds=[1, 2], n_overlays=0)
    with pytest.raises(FileNotFoundError, match="missing.pt"):  # before any fine-tune starts
        finetune(task, ["scratch", f"bad={tmp_path / 'missing.pt'}"], cfg, tmp_path / "bad", log=None)
    assert not (tmp_path / "bad").exists()
    result = finetune(task, ["scratch", "again=scratch"], cfg, tmp_path / "cmp", log=None, n_boot=50)
    assert set(result["runs"]) == {"scratch", "again"}
    pair = result["comparison"]["fractions"]["1"]["pairs"][0]
    assert pair["diff"] == 0.0 and pair["ci_low"] == pair["ci_high"] == 0.0  # same seed, same folds: identical
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "again - scratch (paired)" in text and "bootstrap over patients" in text
    rows = (tmp_path / "cmp" / "scratch" / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("fold,fraction,split,case_id,patient_id") and len(rows) > 1
