"""The 2D U-Net on medcl's ResNet-18 backbone and its segmentation fine-tuning (``arch='unet'``)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_segment import TINY_MODEL, _fake_pretrained_checkpoint, write_2d_manifest

from medcl.cli import main
from medcl.data.seg_manifest import read_seg_csv
from medcl.evaluate.models import UNET_SEGMENTER, load_finetuned
from medcl.evaluate.segment import SegmentConfig, budget, monai_augmenter, run_segmentation
from medcl.inputs import InputSpec
from medcl.models.backbones import resnet18_backbone
from medcl.models.unet import build_unet
from medcl.weights import WeightsError

TINY = dict(size=[32, 32], iterations=4, batch_size=2, val_every=2, fractions=[1.0], n_folds=3, folds=[1],
            n_overlays=0, lr=1e-3, arch="unet")


def _uscl_checkpoint(path: Path, in_channels: int = 1, spec: InputSpec | None = None) -> dict[str, torch.Tensor]:
    """A medcl-checkpoint-v1 around a real resnet18_backbone with recognisable weights; returns them."""
    torch.manual_seed(1)
    backbone = resnet18_backbone(in_channels=in_channels)
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    info = {"name": "resnet18", "kwargs": {"in_channels": in_channels, "spatial_dims": 2}, "prefix": "backbone."}
    if spec is not None:
        info["input"] = spec.to_dict()
    torch.save({"format": "medcl-checkpoint-v1", "method": "uscl", "config": {}, "step": 3,
                "model": {f"backbone.{k}": v for k, v in state.items()}, "backbone": info}, path)
    return state


@pytest.mark.parametrize("size", [64, 96, 128])
def test_unet_output_has_the_input_resolution(size):
    net = build_unet(out_channels=3).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 1, size, size)).shape == (2, 3, size, size)
        assert net(torch.rand(1, 1, size, size + 20)).shape == (1, 3, size, size + 20)  # not a multiple of 32


def test_encoder_loads_a_backbone_strictly_and_gives_its_features():
    backbone = resnet18_backbone().eval()
    net = build_unet(out_channels=2).eval()
    net.encoder.load_state_dict(backbone.state_dict(), strict=True)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        feats = net.encode(x)
        assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]
        pooled = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(feats[-1], 1), 1)
        torch.testing.assert_close(pooled, backbone(x))
    # the backbone's input convention (3 channels, ImageNet-like statistics) is applied inside
    spec = InputSpec(3, (0.45, 0.45, 0.45), (0.22, 0.22, 0.22))
    net3 = build_unet(out_channels=2, in_channels=3, input=spec.to_dict()).eval()
    with torch.no_grad():
        torch.testing.assert_close(net3.encode(spec.normalize(x))[0], net3.encoder.act(net3.encoder.bn1(
            net3.encoder.conv1(((x - 0.45) / 0.22).expand(-1, 3, -1, -1)))))
    with pytest.raises(ValueError, match="2D or 3D"):
        build_unet(out_channels=2, spatial_dims=1)


def test_3d_unet_output_shape_and_3d_encoder_features():
    backbone = resnet18_backbone(spatial_dims=3).eval()
    net = build_unet(out_channels=3, spatial_dims=3).eval()
    net.encoder.load_state_dict(backbone.state_dict(), strict=True)  # a 3D ResNet-18 loads strictly
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        feats = net.encode(x)
        assert [tuple(f.shape[2:]) for f in feats] == [(16,) * 3, (8,) * 3, (4,) * 3, (2,) * 3, (1,) * 3]
        pooled = torch.flatten(torch.nn.functional.adaptive_avg_pool3d(feats[-1], 1), 1)
        torch.testing.assert_close(pooled, backbone(x))
        assert net(torch.rand(1, 1, 24, 40, 20)).shape == (1, 3, 24, 40, 20)  # padded to 32, cropped back
    assert isinstance(net.head, torch.nn.Conv3d)


def _resnet3d_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    state = {k: v.clone() for k, v in resnet18_backbone(spatial_dims=3).state_dict().items()}
    torch.save({"format": "medcl-checkpoint-v1", "method": "supervised", "config": {}, "step": 1,
                "model": {f"backbone.{k}": v for k, v in state.items()},
                "backbone": {"name": "resnet18", "kwargs": {"in_channels": 1, "spatial_dims": 3}, "prefix": "backbone."}},
               path)
    return state


def test_3d_unet_finetunes_with_crops_and_sliding_window_from_a_3d_checkpoint(tmp_path):
    from test_segment import write_3d_manifest

    task = read_seg_csv(write_3d_manifest(tmp_path / "vol", size=20), classes=["bright", "dark"])
    state = _resnet3d_checkpoint(tmp_path / "r3d.pt")
    seen = {}
    import medcl.evaluate.segment as seg

    original_crop, original_load = seg.random_crop, seg.load_encoder_into

    def crop_spy(image, labels, roi_size, pos_fraction, rng):
        seen.setdefault("rois", set()).add(tuple(roi_size))
        return original_crop(image, labels, roi_size, pos_fraction, rng)

    def load_spy(net, encoder_state, source="checkpoint"):
        original_load(net, encoder_state, source)
        seen["conv1"] = net.encoder.conv1.weight.detach().clone()

    cfg = SegmentConfig(arch="unet", roi_size=[16, 16, 16], checkpoint=str(tmp_path / "r3d.pt"), epochs=2,
                        batch_size=2, fractions=[1.0], n_folds=3, folds=[1], val_fraction=0.2, n_overlays=1, lr=1e-3)
    try:
        seg.random_crop, seg.load_encoder_into = crop_spy, load_spy
        results = run_segmentation(task, cfg, tmp_path / "run", log=None)
    finally:
        seg.random_crop, seg.load_encoder_into = original_crop, original_load
    assert seen["rois"] == {(16, 16, 16)}  # trained on foreground-oversampled crops ...
    torch.testing.assert_close(seen["conv1"], state["conv1.weight"])
    run = results["runs"][0]  # ... and tested on whole 20^3 volumes (sliding window of 16^3 tiles)
    assert set(run["test"]["per_class"]) == {"bright", "dark"} and set(run["test"]["hd95"]) == {"bright", "dark"}
    model, card = load_finetuned(tmp_path / "run" / "models" / "fold1_frac100.safetensors")
    assert model.spatial_dims == 3 and card["input"]["spatial_dims"] == 3
    # a bigger inference tile than the training crop (the U-Net is fully convolutional)
    tiles = []
    original_predict = seg.predict

    def predict_spy(model, image, roi_size, *a, **k):
        tiles.append(tuple(roi_size))
        return original_predict(model, image, roi_size, *a, **k)

    try:
        seg.predict = predict_spy
        run_segmentation(task, cfg.model_copy(update={"sw_roi_size": [20, 20, 20], "checkpoint": None}), None, log=None)
    finally:
        seg.predict = original_predict
    assert set(tiles) == {(20, 20, 20)}
    with pytest.raises(ValueError, match="sw_roi_size needs arch 'unet'"):
        SegmentConfig(arch="unetr", roi_size=[16, 16, 16], sw_roi_size=[20, 20, 20])
    # a 2D backbone cannot initialise the 3D U-Net (and the reverse): one clear error
    _uscl_checkpoint(tmp_path / "uscl2d.pt")
    with pytest.raises(WeightsError, match="2D resnet18.*3D task"):
        run_segmentation(task, cfg.model_copy(update={"checkpoint": str(tmp_path / "uscl2d.pt")}), None, log=None)
    task2d = read_seg_csv(write_2d_manifest(tmp_path / "data", n_patients=6, size=32))
    with pytest.raises(WeightsError, match="3D resnet18.*2D task"):
        run_segmentation(task2d, SegmentConfig(**TINY, checkpoint=str(tmp_path / "r3d.pt")), None, log=None)


def test_arch_unet_takes_the_measured_recipe_for_fields_left_unset():
    from medcl.evaluate.segment import UNET_BUDGET, UNET_RECIPE

    # the UNETR (MixCL's paper setting) keeps the plain defaults
    unetr = SegmentConfig(size=[32, 32])
    assert unetr.for_task(2) is unetr and (unetr.batch_size, unetr.lr, unetr.epochs) == (2, 1e-4, None)
    # arch unet, nothing else given: the 2D recipe and its budget in epochs
    cfg = SegmentConfig(arch="unet", size=[128, 128]).for_task(2)
    assert (cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.augment) == (16, 1e-3, 1e-4, "monai")
    assert (cfg.epochs, cfg.min_iterations, cfg.max_validations) == (20.0, 350, 12)
    assert budget(cfg, 1200) == (1500, 150)  # 20 epochs of 1200 cases at batch 16, validated every 2nd epoch
    assert budget(cfg, 40) == (350, 3 * 10)  # few cases: the 350-step floor, validated every 10 epochs (12 times)
    # 3D: its own recipe (foreground-oversampled crops, flips) and a longer budget
    cfg3 = SegmentConfig(arch="unet", roi_size=[16, 16, 16]).for_task(3)
    assert (cfg3.batch_size, cfg3.lr, cfg3.augment, cfg3.pos_fraction) == (2, 1e-3, "flips", 0.67)
    assert (cfg3.epochs, cfg3.min_iterations, cfg3.max_validations) == (120.0, 1200, 5)
    # whatever is given wins, field by field; a given iteration count or epochs keeps the recipe's budget out
    mine = SegmentConfig(arch="unet", size=[64, 64], batch_size=4, augment="flips", iterations=30).for_task(2)
    assert (mine.batch_size, mine.augment, mine.lr, mine.iterations) == (4, "flips", 1e-3, 30)
    assert (mine.epochs, mine.min_iterations, mine.max_validations) == (None, None, None)
    assert budget(mine, 1000) == (30, mine.val_every)
    short = SegmentConfig(arch="unet", size=[64, 64], epochs=2).for_task(2)
    assert (short.epochs, short.min_iterations, short.max_validations) == (2, None, None)
    # defined once: the recipe tables are what for_task applies, for both dimensionalities
    for dims in (2, 3):
        got = SegmentConfig(arch="unet").for_task(dims)
        assert {k: getattr(got, k) for k in {**UNET_RECIPE[dims], **UNET_BUDGET[dims]}} == {
            **UNET_RECIPE[dims], **UNET_BUDGET[dims]}


def test_epochs_budget_scales_with_training_cases():
    cfg = SegmentConfig(epochs=3, batch_size=4)
    assert budget(cfg, 10) == (math.ceil(3 * 10 / 4), 3)
    assert budget(cfg, 100) == (75, 25)
    assert budget(SegmentConfig(epochs=0.5, batch_size=4), 10) == (2, 3)
    assert budget(SegmentConfig(iterations=50, val_every=10), 10) == (50, 10)  # default: iterations
    with pytest.raises(ValueError):
        SegmentConfig(epochs=0)
    # a floor in iterations: 10 cases x 3 epochs / 4 = 8 steps -> 40 steps (16 epochs), validated every epoch
    assert budget(SegmentConfig(epochs=3, batch_size=4, min_iterations=40), 10) == (40, 3)
    assert budget(SegmentConfig(epochs=3, batch_size=4, min_iterations=40), 100) == (75, 25)  # epochs already give more
    # at most 5 validations: 14 epochs of 3 steps -> every 3 epochs (9 steps), 5 validations
    total, period = budget(SegmentConfig(epochs=3, batch_size=4, min_iterations=40, max_validations=5), 10)
    assert (total, period) == (40, 9) and math.ceil(total / period) <= 5
    with pytest.raises(ValueError):
        SegmentConfig(min_iterations=0)


def test_monai_augmentation_keeps_image_and_mask_aligned():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    changed = 0
    apply = monai_augmenter(seed=3)
    for _ in range(20):
        cy, cx = rng.integers(16, 48, 2)
        mask = (((yy - cy) ** 2 + (xx - cx) ** 2) < 12 ** 2).astype(np.uint8)[None]
        image = np.where(mask > 0, 0.9, 0.1).astype(np.float32)
        image2, mask2 = apply(image, mask)
        assert image2.shape == image.shape and mask2.shape == mask.shape and mask2.dtype == np.uint8
        assert 0.0 <= image2.min() and image2.max() <= 1.0
        assert set(np.unique(mask2)) <= {0, 1}
        from_image = image2 > 0.5  # the mask made from the augmented image
        disagree = np.logical_xor(from_image, mask2 > 0).sum()
        assert disagree <= 0.05 * max(1, mask2.sum())  # only interpolation at the boundary may differ
        changed += int(not np.array_equal(mask2, mask))
    assert changed > 5  # it does augment
    first = monai_augmenter(seed=3)(image, mask)
    again = monai_augmenter(seed=3)(image, mask)
    np.testing.assert_array_equal(first[0], again[0])  # seeded


def test_unet_finetune_from_scratch_and_from_a_uscl_checkpoint(tmp_path):
    task = read_seg_csv(write_2d_manifest(tmp_path / "data", n_patients=6, size=32))
    scratch = run_segmentation(task, SegmentConfig(**TINY, augment="monai", patience=1), tmp_path / "scratch", log=None)
    run = scratch["runs"][0]
    assert 0.0 <= run["test"]["mean_dice"] <= 1.0 and run["iterations"] == 4
    assert scratch["model"]["arch"] == "unet"
    model, card = load_finetuned(tmp_path / "scratch" / "models" / "fold1_frac100.safetensors")
    assert type(model).__name__ == "ResNetUNet" and card["task"] == "segment"

    spec = InputSpec(3, (0.4, 0.4, 0.4), (0.25, 0.25, 0.25))
    state = _uscl_checkpoint(tmp_path / "uscl.pt", in_channels=3, spec=spec)
    seen = {}
    import medcl.evaluate.segment as seg

    original = seg.load_encoder_into

    def spy(net, encoder_state, source="checkpoint"):
        original(net, encoder_state, source)
        seen["conv1"] = net.encoder.conv1.weight.detach().clone()
        seen["spec"] = net.input_spec

    try:
        seg.load_encoder_into = spy
        pretrained = run_segmentation(task, SegmentConfig(**TINY, checkpoint=str(tmp_path / "uscl.pt"), epochs=2),
                                      tmp_path / "pre", log=None)
    finally:
        seg.load_encoder_into = original
    torch.testing.assert_close(seen["conv1"], state["conv1.weight"])
    assert seen["spec"] == spec
    run = pretrained["runs"][0]
    assert pretrained["init"] == "pretrained"
    assert run["iterations"] == math.ceil(2 * run["n_train_cases"] / 2)
    model, _ = load_finetuned(tmp_path / "pre" / "models" / "fold1_frac100.safetensors")
    assert model.input_spec == spec and model.encoder.conv1.in_channels == 3


def test_architecture_and_init_must_match(tmp_path):
    task = read_seg_csv(write_2d_manifest(tmp_path / "data", n_patients=6, size=32))
    _fake_pretrained_checkpoint(tmp_path / "mixcl.pt", 2, (32, 32), **{k: v for k, v in TINY_MODEL.items() if k != "feature_size"})
    with pytest.raises(WeightsError, match=r"'unetr_encoder'.*'resnet18'.*--arch unet"):
        run_segmentation(task, SegmentConfig(**TINY, checkpoint=str(tmp_path / "mixcl.pt")), None, log=None)
    _uscl_checkpoint(tmp_path / "uscl.pt")
    with pytest.raises(WeightsError, match=r"'resnet18'.*'unetr_encoder'.*--arch unetr"):
        run_segmentation(task, SegmentConfig(**{**TINY, "arch": "unetr", "model": TINY_MODEL},
                                             checkpoint=str(tmp_path / "uscl.pt")), None, log=None)


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float("nan") if not truth.any() else 2.0 * np.logical_and(pred, truth).sum() / (pred.sum() + truth.sum())


def test_saved_unet_reproduces_the_runs_dice_with_medcl_predict(tmp_path):
    task = read_seg_csv(write_2d_manifest(tmp_path / "data", n_patients=6, size=32))
    spec = InputSpec(1, (0.3,), (0.2,))  # a non-identity input convention must be applied by predict too
    _uscl_checkpoint(tmp_path / "uscl.pt", spec=spec)
    run = tmp_path / "run"
    run_segmentation(task, SegmentConfig(**TINY, checkpoint=str(tmp_path / "uscl.pt")), run, log=None)
    model_file = run / "models" / "fold1_frac100.safetensors"
    from medcl.weights import read_backbone_file

    assert read_backbone_file(model_file)[1]["architecture"] == UNET_SEGMENTER
    with (run / "predictions.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["fold"] == "1"]
    cases = {c.case_id: c for c in task.cases + task.test_cases}
    images = [cases[r["case_id"]].image for r in rows]
    assert main(["predict", str(model_file), *images, "-o", str(tmp_path / "pred"), "--no-progress"]) == 0
    for row in rows:
        case = cases[row["case_id"]]
        mask = np.asarray(Image.open(tmp_path / "pred" / "masks" / Path(case.image).name))
        truth = np.asarray(Image.open(case.mask)) > 0
        expected = float(row["dice_foreground"])
        got = _dice(mask == 1, truth)
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-6)


def test_cli_arch_unet_with_epochs_and_monai_augmentation(tmp_path, capsys):
    data = write_2d_manifest(tmp_path / "data", n_patients=6, size=32)
    out = tmp_path / "cli"
    code = main(["finetune", str(data), "--task", "segment", "--arch", "unet", "--size", "32,32", "--run-folds", "1",
                 "--folds", "3", "--fractions", "1", "--batch-size", "4", "--epochs", "1", "--seg-augment", "monai",
                 "--patience", "2", "--class-weights", "1,3", "--postprocess", "none", "--no-save-models", "--out", str(out)])
    assert code == 0
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())["segment"]
    assert (config["arch"], config["augment"], config["epochs"], config["patience"]) == ("unet", "monai", 1, 2)
    assert config["class_weights"] == [1.0, 3.0] and config["postprocess"] == "none"
    # flags left out take the U-Net recipe (lr, weight decay); --epochs keeps its budget (no step floor)
    assert (config["batch_size"], config["lr"], config["weight_decay"], config["min_iterations"]) == (4, 1e-3, 1e-4, None)
    assert json.loads((out / "results.json").read_text())["runs"][0]["postprocess"] == {"keep_largest_component": []}
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main(["finetune", str(data), "--task", "segment", "--size", "32,32", "--seg-augment", "elastic",
              "--out", str(out / "x")])
    assert "seg-augment" in capsys.readouterr().err
    # the classification flag before DATA does not swallow DATA
    from medcl.cli import build_parser

    assert build_parser().parse_args(["finetune", "--augment", str(data)]).data == str(data)


def test_a_torchvision_resnet18_file_initialises_the_unet_with_imagenet_normalisation(tmp_path):
    import json

    from medcl.evaluate.segment import load_encoder_checkpoint, load_encoder_into
    from medcl.models import layouts

    shapes = json.loads((Path(__file__).parent / "fixtures" / "torchvision_resnet18_state_dict.json").read_text())
    torch.manual_seed(0)
    state = {k: torch.tensor(0) if k.endswith("num_batches_tracked") else torch.rand(shape) + 0.5
             for k, shape in shapes.items()}
    torch.save(state, tmp_path / "resnet18-imagenet.pth")
    encoder_state, kwargs = load_encoder_checkpoint(tmp_path / "resnet18-imagenet.pth", "unet")
    assert kwargs["in_channels"] == 1
    assert InputSpec.from_dict(kwargs["input"]) == InputSpec(1, layouts.IMAGENET_GRAY_MEAN, layouts.IMAGENET_GRAY_STD)
    net = build_unet(out_channels=2, **kwargs)
    load_encoder_into(net, encoder_state)
    torch.testing.assert_close(net.encoder.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_monai_augmentation_in_3d_keeps_volume_and_mask_aligned():
    rng = np.random.default_rng(1)
    zz, yy, xx = np.mgrid[:24, :24, :16]
    changed = 0
    apply = monai_augmenter(seed=5, spatial_dims=3)
    for _ in range(12):
        cz, cy, cx = rng.integers(8, 16, 3)
        mask = (((zz - cz) ** 2 + (yy - cy) ** 2 + (xx - min(cx, 10)) ** 2) < 5 ** 2).astype(np.uint8)[None]
        image = np.where(mask > 0, 0.9, 0.1).astype(np.float32)
        image2, mask2 = apply(image, mask)
        assert image2.shape == image.shape and mask2.shape == mask.shape and mask2.dtype == np.uint8
        assert 0.0 <= image2.min() and image2.max() <= 1.0 and set(np.unique(mask2)) <= {0, 1}
        disagree = np.logical_xor(image2 > 0.5, mask2 > 0).sum()
        assert disagree <= 0.1 * max(1, mask2.sum())  # image and labels moved together
        changed += int(not np.array_equal(mask2, mask))
    assert changed > 3
    # the last (slice) axis is never flipped: a mask occupying only the first slices stays there
    mask = np.zeros((1, 24, 24, 16), np.uint8)
    mask[0, 8:16, 8:16, :3] = 1
    for seed in range(10):
        _, mask2 = monai_augmenter(seed=seed, spatial_dims=3)(mask.astype(np.float32), mask)
        assert mask2[0, :, :, 8:].sum() == 0
    with pytest.raises(ValueError, match="spatial_dims"):
        monai_augmenter(seed=0, spatial_dims=4)


@pytest.mark.parametrize("dims,shape", [(2, (1, 48, 40)), (3, (1, 24, 20, 12))])
def test_monai_augmentation_without_metadata_gives_the_same_values(monkeypatch, dims, shape):
    """The augmenter switches MONAI's metadata tracking off inside each call (speed) and back on after:
    the values equal those of the same transform with tracking on, and the global setting is restored."""
    import monai
    import monai.data.meta_obj as meta_obj

    from medcl.evaluate.segment import monai_augmenter

    rng = np.random.default_rng(0)
    image = rng.random(shape, dtype=np.float32)
    labels = (rng.random(shape) > 0.7).astype(np.int64)
    fast = monai_augmenter(3, dims)
    got = [fast(image, labels) for _ in range(6)]
    assert monai.data.get_track_meta() is True
    monkeypatch.setattr(meta_obj, "set_track_meta", lambda value: None)  # tracking stays on inside the calls
    tracked = monai_augmenter(3, dims)
    expected = [tracked(image, labels) for _ in range(6)]
    for (gi, gl), (ei, el) in zip(got, expected):
        np.testing.assert_array_equal(gi, ei)
        np.testing.assert_array_equal(gl, el)
    assert any(not np.array_equal(gi, image) for gi, _ in got)  # the draws did change the images


def test_class_weights_reach_the_loss_and_a_wrong_count_is_an_error(tmp_path):
    task = read_seg_csv(write_2d_manifest(tmp_path / "data", n_patients=6, size=32))
    tiny = {**TINY, "save_models": False}

    def loss_curve(weights):
        out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        run_segmentation(task, SegmentConfig(**tiny, class_weights=weights), out, log=None)
        return [json.loads(line)["train_loss"] for line in (out / "curves.jsonl").read_text().splitlines()]

    plain = loss_curve(None)
    assert loss_curve([1.0] * task.n_classes) == plain  # all-ones weights are the unweighted loss
    assert loss_curve([1.0] + [10.0] * (task.n_classes - 1)) != plain
    with pytest.raises(ValueError, match=rf"class_weights has 5 values; task .* has {task.n_classes} classes"):
        run_segmentation(task, SegmentConfig(**tiny, class_weights=[1.0] * 5), None, log=None)
    with pytest.raises(ValueError, match="must be > 0"):
        SegmentConfig(**tiny, class_weights=[1.0, 0.0])
