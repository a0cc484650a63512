"""`medcl predict`: the models a fine-tuning run keeps reproduce its predictions on new inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medcl.cli import main
from medcl.data.seg_manifest import read_seg_csv
from medcl.evaluate.classify import FinetuneConfig, finetune
from medcl.evaluate.models import load_finetuned
from medcl.evaluate.segment import SegmentConfig, keep_largest_component, run_segmentation
from test_segment import TINY_MODEL, write_2d_manifest
from tiny_frames import class_pattern, make_frame_sets

TINY = dict(epochs=2, batch_size=16, image_size=32, folds=3, repeats=1, patience=5)


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def predict_cli(*args) -> int:
    return main(["predict", *map(str, args), "--no-progress"])


# --------------------------------------------------------------------------------- classification


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    # stored at 40 px, fine-tuned at 32 px: prediction must resize exactly as fine-tuning did
    return make_frame_sets(tmp_path_factory.mktemp("frames"), n_patients=9, n_frames=4, size=40)


@pytest.fixture(scope="module")
def classify_run(frames_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cls") / "run"
    finetune(frames_dir, ["scratch"], FinetuneConfig(**TINY), out, log=lambda *_: None)
    return out


def _probabilities(rows: list[dict], classes: list[str]) -> np.ndarray:
    return np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])


def _assert_reproduces_fold(run: Path, model: Path, frames_dir: Path, out: Path, repeat: int, fold: int) -> None:
    assert predict_cli(model, frames_dir, "-o", out) == 0
    classes = json.loads((run / "results.json").read_text())["classes"]
    expected = [r for r in read_csv(run / "predictions.csv") if (int(r["repeat"]), int(r["fold"])) == (repeat, fold)]
    frames = {(r["video_id"], int(r["frame"])): r for r in read_csv(out / "frames.csv")}
    videos = {r["video_id"]: r for r in read_csv(out / "videos.csv")}
    frame_rows = [r for r in expected if int(r["frame"]) >= 0]
    video_rows = [r for r in expected if int(r["frame"]) < 0]
    assert frame_rows and video_rows
    got = [frames[(r["video_id"], int(r["frame"]))] for r in frame_rows]
    np.testing.assert_allclose(_probabilities(got, classes), _probabilities(frame_rows, classes), atol=1e-5)
    assert [g["pred"] for g in got] == [r["pred"] for r in frame_rows]
    got = [videos[r["video_id"]] for r in video_rows]
    np.testing.assert_allclose(_probabilities(got, classes), _probabilities(video_rows, classes), atol=1e-5)
    assert all(int(g["frames"]) == 4 for g in got) and [g["pred"] for g in got] == [r["pred"] for r in video_rows]


def test_fold_model_reproduces_the_folds_test_predictions(classify_run, frames_dir, tmp_path):
    models = classify_run / "models"
    assert sorted(p.name for p in models.glob("*.safetensors")) == [f"repeat0_fold{f}.safetensors" for f in range(3)]
    _assert_reproduces_fold(classify_run, models / "repeat0_fold1.safetensors", frames_dir, tmp_path / "pred", 0, 1)
    model, card = load_finetuned(models / "repeat0_fold1.safetensors")
    assert card["classes"] == ["covid", "pneumonia", "regular"] and card["protocol"] == "last_stage"
    assert card["input"]["image_size"] == 32 and card["input"]["ingest"]["size"] == 40
    assert card["input"]["normalization"] == {"in_channels": 1, "scale": "x / 255", "mean": [0.0], "std": [1.0]}
    assert card["model"]["fold"] == 1 and card["init"]["name"] == "scratch"
    manifest = frames_dir / "manifest.csv"
    import hashlib

    assert card["data"]["manifests"] == [{"path": str(manifest), "sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}]
    accuracy = card["cross_validation"]["video"]["accuracy"]
    assert accuracy["n"] == 3 and 0 <= accuracy["ci95"][0] <= accuracy["mean"] <= accuracy["ci95"][1] <= 1
    run_card = json.loads((models / "model_card.json").read_text())
    assert [m["file"] for m in run_card["models"]] == [f"repeat0_fold{f}.safetensors" for f in range(3)]
    assert "95% interval" in (models / "MODEL_CARD.md").read_text()


def test_final_model_cli_and_predict_with_it(frames_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["finetune", str(frames_dir), "--protocol", "linear", "--epochs", "3", "--image-size", "32",
                 "--folds", "3", "--repeats", "1", "--final-model", "--out", str(run)]) == 0
    capsys.readouterr()
    models = run / "models"
    assert (models / "final.safetensors").is_file() and (models / "repeat0_fold2.safetensors").is_file()
    _, card = load_finetuned(run)  # a run folder: its final model
    best = [f["best_epoch"] + 1 for f in json.loads((run / "results.json").read_text())["folds"]]
    assert card["model"]["final"] and card["model"]["epochs"] == max(1, int(np.median(best) + 0.5))
    assert "median" in card["model"]["selection"] and card["model"]["n_videos"] == 13
    assert "median" in (models / "MODEL_CARD.md").read_text()
    # the linear protocol's feature standardiser travels with the fold models too
    _assert_reproduces_fold(run, models / "repeat0_fold0.safetensors", frames_dir, tmp_path / "fold0", 0, 0)
    assert predict_cli(run, frames_dir, "-o", tmp_path / "final") == 0
    videos = read_csv(tmp_path / "final" / "videos.csv")
    assert len(videos) == 13 and len(read_csv(tmp_path / "final" / "frames.csv")) == 13 * 4
    assert "13 of 13 input(s) predicted" in capsys.readouterr().out
    # a fine-tuned model is no initialisation: refused before the first fold
    with pytest.raises(ValueError, match="is a fine-tuned frame_classifier"):
        finetune(frames_dir, ["scratch", f"ft={models / 'final.safetensors'}"], FinetuneConfig(**TINY),
                 tmp_path / "refused", log=lambda *_: None)
    assert not (tmp_path / "refused").exists()
    # --no-save-models: no fold models, and a rerun into the same folder leaves none of the old ones
    assert main(["finetune", str(frames_dir), "--protocol", "linear", "--epochs", "1", "--image-size", "32",
                 "--folds", "3", "--repeats", "1", "--no-save-models", "--out", str(run), "--overwrite"]) == 0
    assert not list(models.glob("*.safetensors"))


def write_video(path: Path, frames: np.ndarray, fps: int = 10) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.bit_rate = 4_000_000
        for i, frame in enumerate(frames):
            image = av.VideoFrame.from_ndarray(frame, format="gray").reformat(format="yuv420p")
            image.pts = i
            container.mux(stream.encode(image))
        container.mux(stream.encode())
    return path


def test_raw_files_go_through_ingest_and_damaged_ones_are_skipped(classify_run, tmp_path, capsys):
    from medcl.ingest.pipeline import ingest_videos

    rng = np.random.default_rng(3)
    src = tmp_path / "new"
    src.mkdir()
    write_video(src / "clip.avi", np.stack([class_pattern("covid", 48, rng) for _ in range(10)]))
    Image.fromarray(class_pattern("regular", 40, rng)).save(src / "still.png")
    (src / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    model = classify_run / "models" / "repeat0_fold0.safetensors"
    assert predict_cli(model, src, tmp_path / "missing.avi", "-o", tmp_path / "pred") == 2
    out = tmp_path / "pred"
    errors = {Path(r["input"]).name: r["reason"] for r in read_csv(out / "errors.csv")}
    assert set(errors) == {"broken.mp4", "missing.avi"} and errors["missing.avi"] == "not found"
    assert "broken.mp4" in capsys.readouterr().out
    videos = {r["video_id"]: r for r in read_csv(out / "videos.csv")}
    assert set(videos) == {"clip.avi", "still.png"} and videos["still.png"]["frames"] == "1"
    assert int(videos["clip.avi"]["frames"]) == 3  # 1 s at 3 frames per second
    assert json.loads((out / "predict.json").read_text())["n_failed"] == 2
    # the same files ingested first, then predicted from the ingest folder: the same numbers
    ingest_videos(src, tmp_path / "ingested", fps=3.0, size=40, progress=False)
    assert predict_cli(model, tmp_path / "ingested", "-o", tmp_path / "via_ingest") == 0
    again = {Path(r["input"]).name: r for r in read_csv(tmp_path / "via_ingest" / "videos.csv")}
    for name, row in videos.items():
        for key in ("prob_covid", "prob_pneumonia", "prob_regular", "frames"):
            assert float(again[name][key]) == pytest.approx(float(row[key]), abs=1e-6)
    # OUT holds predictions: refused unless --overwrite
    assert predict_cli(model, src / "still.png", "-o", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert predict_cli(model, src / "still.png", "-o", out, "--overwrite") == 0
    assert not (out / "errors.csv").read_text().strip().splitlines()[1:]


def test_inputs_that_do_not_fit_the_model_are_refused(classify_run, tmp_path, capsys):
    volume = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), volume)
    assert predict_cli(classify_run / "models" / "repeat0_fold0.safetensors", volume, "-o", tmp_path / "p") == 2
    err = capsys.readouterr().err
    assert "ct.nii.gz is a 3D volume" in err and "classifies 2D" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()
    from medcl.models.backbones import resnet18_backbone
    from medcl.weights import save_backbone

    export = save_backbone(resnet18_backbone(), tmp_path / "export" / "backbone.safetensors", "resnet18", {"in_channels": 1})
    assert predict_cli(export, volume, "-o", tmp_path / "p") == 2
    assert "not a fine-tuned model" in capsys.readouterr().err
    # metadata and weights that disagree: refused with the file and the tensor named
    from medcl.evaluate.models import frame_classifier, save_finetuned
    from medcl.inputs import InputSpec
    from medcl.weights import WeightsError

    bad = save_finetuned(frame_classifier(n_classes=4), tmp_path / "bad.safetensors", "frame_classifier",
                         {"backbone": "resnet18", "protocol": "last_stage", "n_classes": 3, "in_channels": 1},
                         {"task": "classify", "classes": ["a", "b", "c"]}, InputSpec())
    with pytest.raises(WeightsError, match=r"bad.safetensors: the weights do not fit .*size mismatch for head.weight"):
        load_finetuned(bad)


# --------------------------------------------------------------------------------- segmentation


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    both = pred.sum() + truth.sum()
    return float("nan") if not truth.any() else 2.0 * np.logical_and(pred, truth).sum() / both


@pytest.fixture(scope="module")
def seg2d_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg2d")
    task = read_seg_csv(write_2d_manifest(root / "data", n_patients=6, size=32))
    cfg = SegmentConfig(size=[32, 32], model=TINY_MODEL, iterations=4, batch_size=2, val_every=2, fractions=[1.0],
                        n_folds=3, folds=[1], n_overlays=0, lr=1e-3)
    run_segmentation(task, cfg, root / "run", log=None)
    return task, root / "run"


def test_2d_segmentation_model_reproduces_the_folds_dice(seg2d_run, tmp_path):
    task, run = seg2d_run
    model = run / "models" / "fold1_frac100.safetensors"
    rows = [r for r in read_csv(run / "predictions.csv") if r["fold"] == "1"]
    cases = {c.case_id: c for c in task.cases + task.test_cases}
    images = [cases[r["case_id"]].image for r in rows]
    assert predict_cli(model, *images, "--batch-size", "3", "-o", tmp_path / "pred") == 0
    volumes = {Path(r["input"]).name: r for r in read_csv(tmp_path / "pred" / "volumes.csv")}
    for row in rows:
        case = cases[row["case_id"]]
        mask = np.asarray(Image.open(tmp_path / "pred" / "masks" / Path(case.image).name))
        truth = np.asarray(Image.open(case.mask)) > 0
        assert _dice(mask == 1, truth) == pytest.approx(float(row["dice_foreground"]), abs=1e-6)
        counts = volumes[Path(case.image).name]
        assert int(counts["foreground_pixels"]) == int((mask == 1).sum())
        assert int(counts["background_pixels"]) + int(counts["foreground_pixels"]) == 32 * 32
    # a folder of images, OUT inside it: a rerun does not predict its own masks
    folder = tmp_path / "images"
    folder.mkdir()
    for image in images[:3]:
        (folder / Path(image).name).write_bytes(Path(image).read_bytes())
    for extra in ([], ["--overwrite"]):
        assert predict_cli(model, folder, "-o", folder / "pred", *extra) == 0
        assert len(read_csv(folder / "pred" / "volumes.csv")) == 3
    # an image of another size: its mask comes back at that size
    Image.fromarray(np.full((45, 50), 90, np.uint8)).save(tmp_path / "other.png")
    assert predict_cli(model, tmp_path / "other.png", "-o", tmp_path / "other") == 0
    assert np.asarray(Image.open(tmp_path / "other" / "masks" / "other.png")).shape == (45, 50)
    card = json.loads((run / "models" / "model_card.json").read_text())
    assert card["task"] == "segment" and card["classes"] == ["foreground"] and card["input"]["size"] == [32, 32]
    assert card["cross_validation"]["1"]["test_mean_dice"]["n"] == 1 and len(card["data"]["case_list_sha256"]) == 64


def test_3d_volume_to_a_2d_model_is_refused(seg2d_run, tmp_path, capsys):
    _, run = seg2d_run
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "ct.nii.gz")
    assert predict_cli(run / "models" / "fold1_frac100.safetensors", tmp_path / "ct.nii.gz", "-o", tmp_path / "p") == 2
    err = capsys.readouterr().err
    assert "ct.nii.gz is a 3D volume" in err and "segments 2D images" in err
    assert not (tmp_path / "p").exists()


# A volume stored with permuted, flipped axes and 2 x 1.5 x 1 mm voxels: masks must come back in
# exactly this grid and affine.
AFFINE = np.array([[0.0, 0.0, -1.0, 10.0], [-2.0, 0.0, 0.0, 5.0], [0.0, 1.5, 0.0, -3.0], [0.0, 0.0, 0.0, 1.0]])


def write_oblique_volumes(root: Path, n_patients: int = 6, shape=(12, 20, 24), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = ["image,mask,patient_id"]
    for p in range(n_patients):
        labels = np.zeros(shape, np.uint8)
        a = int(rng.integers(1, 4))
        labels[a:a + 5, 3:11, 4:14] = 1
        labels[7:11, 12:18, 15 + a:22] = 2
        image = rng.normal(0, 30, shape) + 200.0 * (labels == 1) - 100.0 * (labels == 2)
        nib.save(nib.Nifti1Image(image.astype(np.float32), AFFINE), root / f"ct{p}.nii.gz")
        nib.save(nib.Nifti1Image(labels, AFFINE), root / f"lab{p}.nii.gz")
        rows.append(f"ct{p}.nii.gz,lab{p}.nii.gz,P{p}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def test_volume_grid_round_trip_matches_monai_orientation(tmp_path):
    from medcl.data.segfiles import read_volume
    from medcl.predict import volume_to_input_grid, voxel_volume_mm3

    manifest = write_oblique_volumes(tmp_path / "vol", n_patients=1)
    image, label = read_volume(manifest.parent / "ct0.nii.gz", manifest.parent / "lab0.nii.gz")
    original = nib.load(manifest.parent / "lab0.nii.gz")
    assert label.shape != original.shape  # the RAS grid is another axis order
    np.testing.assert_array_equal(volume_to_input_grid(label.astype(np.uint8), original), np.asarray(original.dataobj))
    assert voxel_volume_mm3(original) == pytest.approx(3.0)


def test_3d_segmentation_masks_keep_the_inputs_grid_and_reproduce_the_folds_dice(tmp_path, capsys, monkeypatch):
    from medcl.data.segfiles import read_volume

    task = read_seg_csv(write_oblique_volumes(tmp_path / "vol"), classes=["bright", "dark"])
    # post-processing forced on: the masks must be the post-processed ones the fold's Dice was computed on
    cfg = SegmentConfig(roi_size=[16, 16, 16], model=TINY_MODEL, iterations=2, batch_size=1, val_every=2,
                        fractions=[1.0], n_folds=3, folds=[1], sw_batch_size=2, n_overlays=0,
                        postprocess="largest_component")
    results = run_segmentation(task, cfg, tmp_path / "run", log=None)
    assert results["runs"][0]["postprocess"] == {"keep_largest_component": ["bright", "dark"]}
    assert set(results["runs"][0]["test_raw"]["per_class"]) == {"bright", "dark"}
    model = tmp_path / "run" / "models" / "fold1_frac100.safetensors"
    rows = [r for r in read_csv(tmp_path / "run" / "predictions.csv") if r["fold"] == "1"]
    cases = {c.case_id: c for c in task.cases}
    images = [cases[r["case_id"]].image for r in rows]
    assert predict_cli(model, *images, "-o", tmp_path / "pred") == 0
    volumes = {Path(r["input"]).name: r for r in read_csv(tmp_path / "pred" / "volumes.csv")}
    network, card = load_finetuned(model)
    assert card["input"]["spatial_dims"] == 3 and card["classes"] == ["bright", "dark"]
    assert card["model"]["postprocess"] == {"keep_largest_component": ["bright", "dark"]}
    for row in rows:
        case = cases[row["case_id"]]
        written = nib.load(tmp_path / "pred" / "masks" / Path(case.image).name)
        source = nib.load(case.image)
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
        mask, truth = np.asarray(written.dataobj), np.asarray(nib.load(case.mask).dataobj)
        for k, name in enumerate(["bright", "dark"], start=1):
            assert _dice(mask == k, truth == k) == pytest.approx(float(row[f"dice_{name}"]), abs=1e-6)
            assert float(volumes[Path(case.image).name][f"{name}_mm3"]) == pytest.approx(3.0 * (mask == k).sum())
        # read back through MONAI's orientation, the mask is what the model predicts on the RAS grid
        image, back = read_volume(case.image, tmp_path / "pred" / "masks" / Path(case.image).name)
        from medcl.evaluate.segment import predict as window_predict

        from medcl.precision import autocast, resolve_precision

        with torch.no_grad(), autocast("cpu", resolve_precision("auto", "cpu")):  # as predict's default precision
            raw = window_predict(network, torch.from_numpy(image)[None], (16, 16, 16), 2).float().argmax(1)[0].numpy()
        expected = keep_largest_component(raw, [1, 2])
        assert len(np.unique(expected)) > 1  # a real test of the geometry, not an all-background mask
        np.testing.assert_array_equal(back, expected)

    # a prediction with islands: predict writes only each class's largest component
    def islands(model, image, roi, sw_batch_size=4, overlap=0.25):
        labels = torch.zeros(image.shape[0], *image.shape[2:], dtype=torch.long)
        labels[:, :2, :2, :2] = 1      # 8 voxels
        labels[:, -1, -1, -1] = 1      # a 1-voxel island
        labels[:, 5:8, 5:8, 5] = 2     # 9 voxels
        labels[:, 10, 10, 10] = 2      # an island
        return torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float()

    monkeypatch.setattr("medcl.evaluate.segment.predict", islands)
    assert predict_cli(model, images[0], "-o", tmp_path / "islands") == 0
    mask = np.asarray(nib.load(tmp_path / "islands" / "masks" / Path(images[0]).name).dataobj)
    assert (mask == 1).sum() == 8 and (mask == 2).sum() == 9
    # a 2D image to this 3D model, a 4-channel volume: refused; a damaged volume: skipped
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "slice.png")
    assert predict_cli(model, tmp_path / "slice.png", "-o", tmp_path / "p2") == 2
    assert "slice.png is a 2D image" in capsys.readouterr().err
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 4), np.float32), np.eye(4)), tmp_path / "mri.nii.gz")
    assert predict_cli(model, tmp_path / "mri.nii.gz", "-o", tmp_path / "p3") == 2
    assert "has 4 channels" in capsys.readouterr().err
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume")
    assert predict_cli(model, images[0], tmp_path / "broken.nii.gz", "-o", tmp_path / "p4") == 2
    assert [Path(r["input"]).name for r in read_csv(tmp_path / "p4" / "errors.csv")] == ["broken.nii.gz"]
    assert (tmp_path / "p4" / "masks" / Path(images[0]).name).is_file()
