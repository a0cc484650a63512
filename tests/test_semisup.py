"""FixMatch, Pi-model and Temporal Ensembling: their losses against naive loops, the ramp-up, the
per-sample ensemble, the strong augmentation, the labeled + unlabeled sampler, the presets
(train, resume exactly, export)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from resume_helpers import assert_same_final_state, killed_run, logged
from uscl_fixtures import tiny_overrides, write_frame_sets

from medcl.config import ConfigError, load_config
from medcl.losses.consistency import ConsistencyMSE, gaussian_rampup
from medcl.losses.pseudo_label import PseudoLabelLoss
from medcl.methods.fixmatch import FixMatch
from medcl.methods.pimodel import PiModel
from medcl.methods.temporal_ensembling import TemporalEnsembling
from medcl.sampling.augment import STRONG_OPS, AugmentParams, StrongAugmentParams, augment_frames, cutout, strong_augment_frames
from medcl.sampling.labeled_unlabeled import LabeledUnlabeledBatches
from medcl.sampling.loader import IndexBatchLoader
from medcl.train.api import pretrain
from medcl.weights import load_checkpoint

PROJECT = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]


def softmax(row):
    exps = [math.exp(v - max(row)) for v in row]
    return [e / sum(exps) for e in exps]


def images(n, seed=0, size=16):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def semisup_batch(n_labeled=3, n_unlabeled=5, views=2, seed=0, items=None):
    return {"labeled": images(n_labeled, seed), "label": torch.tensor([0, -1, 2, 1, 0][:n_labeled]),
            "unlabeled": [images(n_unlabeled, seed + 1 + v) for v in range(views)],
            "item": torch.as_tensor(items if items is not None else range(n_unlabeled))}


# ------------------------------------------------------------------ losses
def test_pseudo_label_loss_equals_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    weak, strong = torch.randn(12, 3, generator=g) * 3, torch.randn(12, 3, generator=g)
    loss, mask = PseudoLabelLoss(0.8)(weak, strong)
    total, passed = 0.0, []
    for w, s in zip(weak.tolist(), strong.tolist()):
        p = softmax(w)
        passed.append(float(max(p) >= 0.8))
        if max(p) >= 0.8:
            total += -math.log(softmax(s)[p.index(max(p))])
    assert 0 < sum(passed) < 12  # both cases occur
    assert mask.tolist() == passed
    assert loss.item() == pytest.approx(total / 12, rel=1e-5)


def test_consistency_mse_and_gaussian_rampup_equal_their_formulas():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(6, 4, generator=g), torch.rand(6, 4, generator=g).softmax(1)
    valid = torch.tensor([True, False, True, True, False, True])
    per_sample = [sum((p - t) ** 2 for p, t in zip(softmax(row), trow)) / 4 for row, trow in zip(logits.tolist(), target.tolist())]
    assert ConsistencyMSE()(logits, target).item() == pytest.approx(sum(per_sample) / 6, rel=1e-5)
    kept = [v for v, ok in zip(per_sample, valid.tolist()) if ok]
    assert ConsistencyMSE()(logits, target, valid).item() == pytest.approx(sum(kept) / len(kept), rel=1e-5)
    assert ConsistencyMSE()(logits, target, torch.zeros(6, dtype=torch.bool)).item() == 0.0
    for t in (0.0, 0.3, 0.9):
        assert gaussian_rampup(t) == pytest.approx(math.exp(-5 * (1 - t) ** 2))
    assert gaussian_rampup(1.0) == gaussian_rampup(7.0) == 1.0


# ------------------------------------------------------------------ methods
def test_fixmatch_step_is_supervised_plus_weighted_pseudo_label_loss():
    torch.manual_seed(0)
    method = FixMatch(CLASSES, threshold=0.0, lambda_u=0.5).eval()  # eval: no BatchNorm coupling between views
    batch = semisup_batch()
    batch["unlabeled"][0].requires_grad_(True)
    batch["unlabeled"][1].requires_grad_(True)
    out = method.training_step(batch)
    assert out["loss"].item() == pytest.approx((out["loss_sup"] + 0.5 * out["loss_unlabeled"]).item(), rel=1e-6)
    assert out["mask_rate"].item() == 1.0 and out["loss_unlabeled"].item() > 0
    logits = method.classify(batch["labeled"], *batch["unlabeled"])
    expected, _ = PseudoLabelLoss(0.0)(logits[1], logits[2])
    assert out["loss_unlabeled"].item() == pytest.approx(expected.item(), rel=1e-5)
    out["loss"].backward()
    assert batch["unlabeled"][0].grad is None or float(batch["unlabeled"][0].grad.abs().sum()) == 0.0  # pseudo-label fixed
    assert float(batch["unlabeled"][1].grad.abs().sum()) > 0
    high = FixMatch(CLASSES, threshold=1.0).training_step(semisup_batch())
    assert high["mask_rate"].item() == 0.0 and high["loss_unlabeled"].item() == 0.0


def test_pimodel_weight_ramps_up_per_step_and_consistency_compares_the_two_passes():
    torch.manual_seed(0)
    method = PiModel(CLASSES, consistency_weight=10.0, rampup_steps=4).eval()
    batch = semisup_batch()
    for step in range(6):
        out = method.training_step(batch)
        assert out["consistency_weight"].item() == pytest.approx(10.0 * math.exp(-5 * (1 - min(1, step / 4)) ** 2), rel=1e-6)
        assert out["loss"].item() == pytest.approx((out["loss_sup"] + out["consistency_weight"] * out["loss_consistency"]).item(), rel=1e-5)
    assert int(method.steps_done) == 6
    _, first, second = method.classify(batch["labeled"], *batch["unlabeled"])
    naive = sum(sum((a - b) ** 2 for a, b in zip(softmax(r1), softmax(r2))) / 3
                for r1, r2 in zip(first.tolist(), second.tolist())) / 5
    assert out["loss_consistency"].item() == pytest.approx(naive, rel=1e-5) and naive > 0


def test_temporal_ensembling_equals_a_naive_per_sample_ensemble():
    torch.manual_seed(0)
    alpha, n_items = 0.6, 7
    method = TemporalEnsembling(CLASSES, n_items, alpha=alpha).eval()  # eval: a frame's prediction depends on it only
    ensemble = {i: [0.0] * 3 for i in range(n_items)}
    updates = dict.fromkeys(range(n_items), 0)
    for step, items in enumerate([[0, 1, 2, 3], [2, 3, 4, 5], [0, 5, 6, 1], [3, 2, 1, 0]]):
        batch = semisup_batch(n_unlabeled=4, views=1, seed=10 * step, items=items)
        out = method.training_step(batch)
        _, logits = method.classify(batch["labeled"], *batch["unlabeled"])
        terms = []
        for item, row in zip(items, logits.tolist()):
            p = softmax(row)
            if updates[item]:
                target = [z / (1 - alpha ** updates[item]) for z in ensemble[item]]
                terms.append(sum((a - b) ** 2 for a, b in zip(p, target)) / 3)
            ensemble[item] = [alpha * z + (1 - alpha) * v for z, v in zip(ensemble[item], p)]
            updates[item] += 1
        expected = sum(terms) / len(terms) if terms else 0.0
        assert out["loss_consistency"].item() == pytest.approx(expected, rel=1e-5, abs=1e-9), step
    assert step == 3 and terms  # the last steps had targets
    torch.testing.assert_close(method.ensemble, torch.tensor([ensemble[i] for i in range(n_items)]))
    assert method.ensemble_updates.tolist() == [updates[i] for i in range(n_items)]
    assert {"ensemble", "ensemble_updates", "steps_done"} <= set(method.state_dict())


# ------------------------------------------------------------------ augmentation and sampling
def frames(n=6, size=24, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(n, size, size), dtype=np.uint8))


def test_every_strong_op_keeps_the_range_and_changes_the_image():
    x = images(3, size=24)
    magnitude = torch.full((3,), 0.7)
    for name, op in STRONG_OPS.items():
        out = op(x.clone(), magnitude, torch.Generator().manual_seed(0)).clamp(0, 1)
        assert out.shape == x.shape, name
        assert (name == "identity") == torch.equal(out, x), name
    posterized = STRONG_OPS["posterize"](x, torch.zeros(3), None)  # 2 bits: at most 4 levels
    assert len(posterized.unique()) <= 4


def test_cutout_fills_one_square_with_gray_and_keeps_the_rest():
    x = torch.ones(20, 1, 16, 16)
    out = cutout(x, np.random.default_rng(0), 0.5)
    holes = out[:, 0] == 0.5
    assert torch.all((out == 1) | (out == 0.5)) and holes.any()
    for hole in holes:
        if hole.any():
            rows, cols = hole.any(1).nonzero()[:, 0], hole.any(0).nonzero()[:, 0]
            assert hole[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one rectangle
            assert rows.max() - rows.min() + 1 <= 8 and cols.max() - cols.min() + 1 <= 8
    assert torch.equal(cutout(x, np.random.default_rng(0), 0.0), x)


def test_strong_view_is_the_weak_geometry_plus_intensity_ops_and_reproducible():
    params, strong = AugmentParams(), StrongAugmentParams(ops=2, cutout=0.5)
    weak = augment_frames(frames(), 16, np.random.default_rng(3), params)
    a = strong_augment_frames(frames(), 16, np.random.default_rng(3), params, strong, channels=3)
    b = strong_augment_frames(frames(), 16, np.random.default_rng(3), params, strong, channels=3)
    assert a.shape == (6, 3, 16, 16) and torch.equal(a, b) and 0.0 <= a.min() and a.max() <= 1.0
    changed = (a[:, :1] - weak).abs().amax((1, 2, 3)) > 1e-4
    assert int(changed.sum()) >= 5
    with pytest.raises(ValueError, match="n_ops"):
        strong_augment_frames(frames(), 16, np.random.default_rng(3), params, StrongAugmentParams(ops=len(STRONG_OPS) + 1))


def test_labeled_unlabeled_batches_take_labels_from_labeled_videos_only():
    videos = [np.full((n, 20, 20), 40 * v, dtype=np.uint8) for v, n in enumerate([3, 2, 4, 1, 2])]
    targets = np.array([1, -1, 0, -1, -1])
    batches = LabeledUnlabeledBatches(videos, targets, labeled_batch=4, views=("weak", "strong", "weak"), size=16)
    assert batches.n_items == 12 and batches.labeled.tolist() == [0, 1, 2, 5, 6, 7, 8]
    batch = batches.make_batch(np.array([11, 3, 0]), np.random.default_rng(0))
    assert batch["labeled"].shape == (4, 1, 16, 16) and [v.shape for v in batch["unlabeled"]] == [(3, 1, 16, 16)] * 3
    assert batch["item"].tolist() == [11, 3, 0]
    assert set(batch["label"].tolist()) <= {0, 1}
    again = batches.make_batch(np.array([11, 3, 0]), np.random.default_rng(0))
    assert all(torch.equal(x, y) for x, y in zip(batch["unlabeled"], again["unlabeled"]))
    with pytest.raises(ValueError, match="no labeled video"):
        LabeledUnlabeledBatches(videos, np.full(5, -1), labeled_batch=2)
    # under DDP each rank gets its shard of the unlabeled batch (the loader) and its own labeled draw
    shards = [IndexBatchLoader(12, 6, batches.make_batch, rank=r, world_size=2) for r in range(2)]
    items = [next(iter(loader.epoch_batches(0)))["item"].tolist() for loader in shards]
    assert len(items[0]) == len(items[1]) == 3 and not set(items[0]) & set(items[1])


# ------------------------------------------------------------------ presets through the trainer
@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory) -> Path:
    return write_frame_sets(tmp_path_factory.mktemp("frames"), n_videos=12)


def overrides(frames_dir: Path, out: Path, **extra) -> list[str]:
    return tiny_overrides(frames_dir, out, **{"optim.warmup_epochs": 0, **extra})


def test_config_validation_and_data_checks(frames_dir, tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(PROJECT / "configs/fixmatch.yaml", overrides(frames_dir, tmp_path / "a", **{
            "fixmatch.threshold": 1.5, "fixmatch.randaugment_ops": 20, "fixmatch.mu": 0}))
    assert all(key in str(info.value) for key in ("fixmatch.threshold", "fixmatch.randaugment_ops", "fixmatch.mu"))
    with pytest.raises(ConfigError, match="temporal_ensembling.alpha"):
        load_config(PROJECT / "configs/temporal_ensembling.yaml", overrides(frames_dir, tmp_path / "a", **{"temporal_ensembling.alpha": 1.0}))
    with pytest.raises(ConfigError, match="sampling: not used by method 'pimodel'"):
        load_config(PROJECT / "configs/pimodel.yaml", overrides(frames_dir, tmp_path / "a", **{"sampling.pairing": "frame"}))
    with pytest.raises(ValueError, match=r"optim.batch_size=8 x fixmatch.mu=7 = 56 unlabeled frames per step, but .* holds 42"):
        pretrain(PROJECT / "configs/fixmatch.yaml", overrides(frames_dir, tmp_path / "b", **{"optim.batch_size": 8}))


@pytest.mark.parametrize("preset", ["fixmatch", "pimodel", "temporal_ensembling"])
def test_presets_pretrain_from_the_cli(frames_dir, tmp_path, preset, capsys):
    from medcl.cli import main

    code = main(["pretrain", "--config", str(PROJECT / f"configs/{preset}.yaml"),
                 *overrides(frames_dir, tmp_path / "run", **{"optim.max_steps": 2})])
    assert code == 0, capsys.readouterr().err
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")
    assert ckpt["method"] == preset and ckpt["step"] == 2 and ckpt["metadata"]["classes"] == ["covid", "pneumonia", "regular"]
    records = logged(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) and r["loss_sup"] > 0 for r in records)


def test_temporal_ensembling_resumes_exactly_and_exports(frames_dir, tmp_path, capsys):
    """42 frames, 28 unlabeled per step: one step an epoch; the ensemble, its counts and the ramp-up
    position must come back from the checkpoint for the resumed run to equal the uninterrupted one."""
    from medcl.cli import main

    preset = PROJECT / "configs/temporal_ensembling.yaml"
    extra = {"optim.max_steps": 6, "train.checkpoint_every": 3, "temporal_ensembling.rampup_epochs": 4}
    full = pretrain(preset, overrides(frames_dir, tmp_path / "x", **extra), out=tmp_path / "full")
    cfg = killed_run(preset, overrides(frames_dir, tmp_path / "x", **extra), tmp_path / "killed", step=5)
    saved = load_checkpoint(cfg.out / "checkpoints" / "last.pt")["model"]
    assert int(saved["steps_done"]) == 3 and int(saved["ensemble_updates"].sum()) == 3 * 28

    resumed = pretrain(cfg, resume=True)
    records = [logged(run) for run in (full, resumed)]
    for key in ("loss", "loss_consistency", "consistency_weight"):
        assert [r[key] for r in records[1]] == pytest.approx([r[key] for r in records[0]], rel=1e-6, abs=1e-7), key
    assert records[0][-1]["loss_consistency"] > 0
    assert_same_final_state(full, resumed)

    assert main(["export", str(full), "-o", str(tmp_path / "export")]) == 0, capsys.readouterr().err
    assert (tmp_path / "export" / "backbone.safetensors").is_file()
