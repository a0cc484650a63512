"""Classification fine-tuning: protocols, feature cache, initialisations, filters, run folders."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from medcl.data.manifest import read_manifest
from medcl.evaluate.classify import (
    FinetuneConfig, InputSource, build_classifier, compute_feature_cache, evaluate_fixed, load_frame_data, make_folds, predict, split_backbone, train_fold,
)
from medcl.weights import InitSpec, load_init
from medcl.models.backbones import resnet18_backbone
from tiny_frames import make_frame_sets

TINY = dict(epochs=2, batch_size=16, image_size=32, folds=3, repeats=1, patience=5)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_frame_sets(tmp_path_factory.mktemp("frames"), n_patients=9, n_frames=4)


@pytest.mark.parametrize("protocol", ["last_stage", "linear", "full"])
def test_split_backbone_composes_to_the_backbone(protocol):
    torch.manual_seed(0)
    backbone = resnet18_backbone().eval()
    x = torch.rand(3, 1, 48, 48)
    prefix, suffix = split_backbone(backbone, protocol)
    torch.testing.assert_close(suffix(prefix(x)), backbone(x))


def _train_once(data, protocol, use_cache, epochs=2):
    config = FinetuneConfig(protocol=protocol, **{**TINY, "epochs": epochs})
    torch.manual_seed(1)
    backbone = resnet18_backbone()
    fold = make_folds(data, config)[0]
    model = build_classifier(backbone, protocol, 3, head_seed=7)
    cache = compute_feature_cache(split_backbone(copy.deepcopy(backbone), protocol)[0], data, 1,
                                  torch.device("cpu")) if use_cache else None
    source = InputSource(data, model, 1, False, cache, torch.device("cpu"))
    fit, val, test = data.frames_of(fold.train), data.frames_of(fold.val), data.frames_of(fold.test)
    train_fold(model, source, fit, val, config, seed=3, classes=data.classes)
    plain = InputSource(data, model, 1, False, None, torch.device("cpu"))
    return model, predict(model, plain, test, 32), backbone


@pytest.mark.parametrize("protocol", ["last_stage", "linear"])
def test_feature_cache_gives_the_same_model_as_the_plain_path(tiny_data, protocol):
    data = load_frame_data(tiny_data, FinetuneConfig(**TINY))
    _, probs_plain, _ = _train_once(data, protocol, use_cache=False)
    _, probs_cached, _ = _train_once(data, protocol, use_cache=True)
    np.testing.assert_allclose(probs_cached, probs_plain, atol=1e-5)


def test_protocols_freeze_what_they_should(tiny_data):
    data = load_frame_data(tiny_data, FinetuneConfig(**TINY))
    model, _, backbone = _train_once(data, "last_stage", use_cache=False, epochs=1)
    before, after = backbone.state_dict(), model.state_dict()
    # prefix (stem + layer1..3) incl. BatchNorm running statistics unchanged, layer4 trained
    assert torch.equal(after["prefix.0.weight"], before["conv1.weight"])
    assert torch.equal(after["prefix.1.running_mean"], before["bn1.running_mean"])
    assert torch.equal(after["prefix.6.1.bn2.running_var"], before["layer3.1.bn2.running_var"])
    assert not torch.equal(after["suffix.0.1.conv2.weight"], before["layer4.1.conv2.weight"])
    model, _, backbone = _train_once(data, "linear", use_cache=False, epochs=1)
    for key, value in backbone.state_dict().items():
        assert torch.equal(model.state_dict()[f"prefix.{key}"], value), key


def test_linear_probe_standardises_features_with_training_frames_only(tiny_data):
    data = load_frame_data(tiny_data, FinetuneConfig(**TINY))
    model, _, backbone = _train_once(data, "linear", use_cache=True, epochs=1)
    fold = make_folds(data, FinetuneConfig(protocol="linear", **TINY))[0]
    feats = compute_feature_cache(backbone, data, 1, torch.device("cpu"))
    fit = data.frames_of(fold.train)
    torch.testing.assert_close(model.suffix.mean, feats[fit].mean(0))
    torch.testing.assert_close(model.suffix.std, torch.sqrt(feats[fit].var(0, unbiased=False) + 1e-5))
    z = model.suffix(feats[fit])
    assert z.mean(0).abs().max() < 1e-4
    spread = feats[fit].std(0, unbiased=False)
    big = spread > 0.1  # channels with real spread come out with unit variance
    assert big.any() and (z.std(0, unbiased=False)[big] - 1).abs().max() < 1e-3
    # the test frames play no part: their own mean is not what was removed
    assert not torch.allclose(model.suffix.mean, feats[data.frames_of(fold.test)].mean(0))


def test_init_from_checkpoint_and_export(tmp_path):
    from medcl.report.model_card import export_backbone
    from medcl.weights import save_checkpoint

    def load_backbone(spec):  # the one init reader: (network, input channels)
        loaded = load_init(spec)
        return loaded.network, loaded.input.in_channels

    torch.manual_seed(5)
    net = resnet18_backbone()
    ckpt = {"format": "medcl-checkpoint-v1", "method": "uscl", "config": {}, "step": 3, "epoch": 1,
            "model": {f"backbone.{k}": v for k, v in net.state_dict().items()},
            "backbone": {"name": "resnet18", "kwargs": {"in_channels": 1}, "prefix": "backbone."}}
    path = save_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt", ckpt)
    spec = InitSpec.parse(str(path))
    assert spec.name == "run"
    loaded, channels = load_backbone(spec)
    assert channels == 1 and torch.equal(loaded.layer4[1].conv2.weight, net.layer4[1].conv2.weight)
    exported = export_backbone(path, tmp_path / "export")
    loaded, _ = load_backbone(InitSpec.parse(f"uscl={exported}"))
    assert torch.equal(loaded.conv1.weight, net.conv1.weight)
    bad = dict(ckpt, model={"backbone.nonsense": torch.zeros(1)})
    save_checkpoint(tmp_path / "bad.pt", bad)
    with pytest.raises(ValueError, match="bad.pt"):
        load_backbone(InitSpec.parse(str(tmp_path / "bad.pt")))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_backbone(InitSpec.parse(str(tmp_path / "missing.pt")))


def test_filters_and_label_map(tmp_path):
    root = make_frame_sets(tmp_path / "d", n_patients=6, classes=("covid", "pneumonia", "regular", "viral"),
                           n_frames=2, unlabeled=1)
    data = load_frame_data(root, FinetuneConfig(**TINY, classes=["covid", "pneumonia", "regular"]))
    assert data.classes == ["covid", "pneumonia", "regular"] and len(data.video_ids) == 7  # viral + unlabeled dropped
    mapped = load_frame_data(root, FinetuneConfig(**TINY, label_map={"viral": "pneumonia"}))
    assert mapped.classes == ["covid", "pneumonia", "regular"] and len(mapped.video_ids) == 9
    convex = load_frame_data(root, FinetuneConfig(**TINY, source_contains="/convex/"))
    assert all(v.endswith("_0") for v in convex.video_ids)
    meta = tmp_path / "meta.csv"
    meta.write_text("file,probe\n" + "".join(f"{r.source},{r.source.split('/')[1]}\n" for r in read_manifest(root)))
    linear = load_frame_data(root, FinetuneConfig(**TINY, metadata=str(meta), where={"probe": "linear"}))
    assert linear.video_ids and all(v.endswith("_1") for v in linear.video_ids)
    listed = tmp_path / "ids.txt"
    listed.write_text("v000_0\nv001_1\n")
    assert load_frame_data(root, FinetuneConfig(**TINY, videos_file=str(listed))).video_ids == ["v000_0", "v001_1"]
    with pytest.raises(ValueError, match="no labeled videos"):
        load_frame_data(root, FinetuneConfig(**TINY, classes=["nothing"]))
    with pytest.raises(ValueError, match="probe"):
        load_frame_data(root, FinetuneConfig(**TINY, where={"probe": "linear"}))


def test_train_test_split_and_leakage_check(tmp_path):
    train = make_frame_sets(tmp_path / "train", n_patients=9, n_frames=3, prefix="a")
    test = make_frame_sets(tmp_path / "test", n_patients=3, n_frames=3, prefix="b", seed=1)
    result = evaluate_fixed(train, test, ["scratch"], FinetuneConfig(**TINY, protocol="linear"), tmp_path / "out",
                            log=lambda *_: None)
    folds = result["runs"]["scratch"]["folds"]
    assert len(folds) == 1 and folds[0]["n_test_videos"] == 4  # patients alternate 1 / 2 videos
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert all(line.split(",")[2].startswith("b") for line in rows[1:])
    with pytest.raises(ValueError, match="leaks"):
        evaluate_fixed(train, train, ["scratch"], FinetuneConfig(**TINY), None, log=lambda *_: None)
    from medcl.cli import main

    cli_out = tmp_path / "cli"
    assert main(["evaluate", "--train", str(train / "manifest.csv"), "--test", str(test), "--protocol", "linear",
                 "--epochs", "1", "--image-size", "32", "--classes", "covid,regular", "--out", str(cli_out)]) == 0
    results = json.loads((cli_out / "results.json").read_text())
    assert results["classes"] == ["covid", "regular"] and len(results["folds"]) == 1
    assert results["folds"][0]["n_test_videos"] == 2  # the pneumonia patient (2 videos) is filtered out


def test_cli_finetune_two_inits_same_folds_and_compare(tiny_data, tmp_path, capsys):
    from medcl.cli import main

    out = tmp_path / "cv"
    args = [str(tiny_data), "--init", "scratch", "--init", "other=scratch", "--protocol", "linear",
            "--epochs", "2", "--image-size", "32", "--folds", "3", "--repeats", "1", "--out", str(out)]
    assert main(["finetune", *args]) == 0
    for name in ("scratch", "other"):
        run = out / name
        for f in ("config.yaml", "results.json", "results.md", "predictions.csv", "curves.jsonl"):
            assert (run / f).is_file(), f
    a = json.loads((out / "scratch" / "results.json").read_text())
    assert a["feature_cache"] and len(a["folds"]) == 3
    assert set(a["summary"]["video"]) >= {"accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr"}
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["baseline"] == "scratch" and comparison["levels"]["video"]["pairs"]
    assert main(["evaluate", "--compare", str(out / "scratch"), str(out / "other"), "--n-boot", "50"]) == 0
    assert "Paired comparison" in capsys.readouterr().out
    from medcl.evaluate.compare import compare_runs

    named = compare_runs([out / "scratch", out / "other"], n_boot=20, names=["random A", "random B"])
    assert named["runs"] == ["random A", "random B"] and named["baseline"] == "random A"
    with pytest.raises(ValueError, match="1 names for 2 run folders"):
        compare_runs([out / "scratch", out / "other"], n_boot=20, names=["only one"])
    other_seed = tmp_path / "cv2"
    assert main(["finetune", *args[:3], "--seed", "9", *args[5:-1], str(other_seed)]) == 0
    capsys.readouterr()
    # a user error is one line on stderr and exit status 2 (the traceback only with --debug)
    assert main(["evaluate", "--compare", str(out / "scratch"), str(other_seed), "--n-boot", "10"]) == 2
    err = capsys.readouterr().err
    assert "same folds" in err and err.startswith("medcl evaluate: ") and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="same folds"):
        main(["--debug", "evaluate", "--compare", str(out / "scratch"), str(other_seed), "--n-boot", "10"])


def test_every_init_is_checked_before_the_first_fold(tiny_data, tmp_path):
    from medcl.evaluate.classify import finetune

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        finetune(tiny_data, ["scratch", f"bad={tmp_path / 'missing.pt'}"], FinetuneConfig(**TINY), tmp_path / "out",
                 log=lambda *_: None)
    assert not (tmp_path / "out").exists()  # failed before the scratch cross-validation ran


def test_label_fraction_keeps_whole_patients_of_each_training_fold(tiny_data):
    data = load_frame_data(tiny_data, FinetuneConfig(**TINY))
    full = make_folds(data, FinetuneConfig(**TINY))
    part = make_folds(data, FinetuneConfig(**TINY, label_fraction=0.5))
    patients = np.asarray(data.video_patients)
    for a, b in zip(full, part):
        assert set(b.train) < set(a.train) and np.array_equal(a.test, b.test) and np.array_equal(a.val, b.val)
        kept = set(patients[b.train])
        assert len(kept) == max(1, round(0.5 * len(set(patients[a.train]))))
        assert set(b.train) == {v for v in a.train if patients[v] in kept}  # every video of a kept patient


def _uscl_checkpoint(path, seed):
    from medcl.weights import save_checkpoint

    torch.manual_seed(seed)
    net = resnet18_backbone()
    ckpt = {"format": "medcl-checkpoint-v1", "method": "uscl", "config": {}, "step": 3, "epoch": 1,
            "model": {f"backbone.{k}": v for k, v in net.state_dict().items()},
            "backbone": {"name": "resnet18", "kwargs": {"in_channels": 1}, "prefix": "backbone."}}
    return save_checkpoint(path, ckpt)


def test_per_fold_init_uses_each_folds_own_backbone(tiny_data, tmp_path):
    """``{fold}`` in an init path: fold f is fine-tuned from fold f's file, exactly as a run with
    that file alone does on that fold (e.g. backbones pretrained on each fold's training videos)."""
    import csv

    from medcl.evaluate.classify import finetune

    for fold in range(3):
        _uscl_checkpoint(tmp_path / f"pre-fold{fold}" / "checkpoints" / "final.pt", seed=10 + fold)
    config = FinetuneConfig(protocol="linear", **TINY)
    quiet = lambda *_: None  # noqa: E731
    template = str(tmp_path / "pre-fold{fold}" / "checkpoints" / "final.pt")
    spec = InitSpec.parse(f"perfold={template}")
    assert spec.per_fold and spec.for_fold(0, 2).path.endswith("pre-fold2/checkpoints/final.pt")
    assert not InitSpec.parse(template.format(fold=0)).per_fold

    def probabilities(run: str, fold: int) -> list[list[str]]:
        with (tmp_path / run / "predictions.csv").open(newline="") as handle:
            return [[v for k, v in row.items() if k.startswith("prob_")] for row in csv.DictReader(handle)
                    if row["fold"] == str(fold)]

    finetune(tiny_data, [spec], config, tmp_path / "pf", log=quiet)
    for fold in range(3):
        finetune(tiny_data, [f"f{fold}={template.format(fold=fold)}"], config, tmp_path / f"alone{fold}", log=quiet)
    for fold in range(3):
        assert probabilities("pf", fold) == probabilities(f"alone{fold}", fold)  # fold f from file f, bit for bit
        assert probabilities("pf", fold) != probabilities(f"alone{(fold + 1) % 3}", fold)  # not from another file
    record = json.loads((tmp_path / "pf" / "results.json").read_text())
    assert record["init"]["path"] == template and [f["fold"] for f in record["folds"]] == [0, 1, 2]


def test_per_fold_init_errors(tiny_data, tmp_path):
    from medcl.evaluate.classify import finetune
    from medcl.weights import WeightsError

    _uscl_checkpoint(tmp_path / "pre-fold0" / "final.pt", seed=1)  # folds 1 and 2 are missing
    template = str(tmp_path / "pre-fold{fold}" / "final.pt")
    with pytest.raises(FileNotFoundError, match="pre-fold1"):
        finetune(tiny_data, ["scratch", f"pf={template}"], FinetuneConfig(**TINY), tmp_path / "out", log=lambda *_: None)
    assert not (tmp_path / "out").exists()  # refused before any fold ran
    with pytest.raises(WeightsError, match="placeholders"):
        InitSpec("x", str(tmp_path / "{fold}-{patient}.pt")).for_fold(0, 0)
    for fold in (1, 2):
        _uscl_checkpoint(tmp_path / f"pre-fold{fold}" / "final.pt", seed=1 + fold)
    with pytest.raises(ValueError, match="final model"):
        finetune(tiny_data, [f"pf={template}"], FinetuneConfig(**TINY, final_model=True), tmp_path / "out2",
                 log=lambda *_: None)
