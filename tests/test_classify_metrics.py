"""Metric computations against scikit-learn; paired comparison mechanics."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from medcl.evaluate.compare import compare_results, metric_from_confusion
from medcl.evaluate.metrics import classification_metrics, confusion, summarize, video_level

CLASSES = ["covid", "pneumonia", "regular"]


def _random_case(seed, n=200, never_predicted=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]
    if never_predicted is not None:
        logits[:, never_predicted] -= 100
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


@pytest.mark.parametrize("seed,never", [(0, None), (1, None), (2, 1)])
def test_metrics_match_sklearn(seed, never):
    y, probs = _random_case(seed, never_predicted=never)
    pred = probs.argmax(1)
    m = classification_metrics(y, probs, CLASSES)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", labels=[0, 1, 2], zero_division=0))
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=[0, 1, 2], zero_division=0)
    for i, c in enumerate(CLASSES):
        assert m["per_class"][c]["precision"] == pytest.approx(p[i])
        assert m["per_class"][c]["recall"] == pytest.approx(r[i])
        assert m["per_class"][c]["f1"] == pytest.approx(f[i])
        assert m["per_class"][c]["support"] == s[i]
        assert m["per_class"][c]["roc_auc"] == pytest.approx(skm.roc_auc_score(y == i, probs[:, i]))
    assert m["roc_auc_ovr"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
    cm = confusion(y, pred, 3)
    for name, ref in (("accuracy", skm.accuracy_score(y, pred)),
                      ("balanced_accuracy", skm.balanced_accuracy_score(y, pred)),
                      ("macro_f1", skm.f1_score(y, pred, average="macro", labels=[0, 1, 2], zero_division=0))):
        assert metric_from_confusion(cm, name) == pytest.approx(ref)


@pytest.mark.filterwarnings("ignore:y_pred contains classes")
def test_auc_is_none_when_a_class_is_absent():
    y, probs = _random_case(3, n=50)
    keep = y != 2
    m = classification_metrics(y[keep], probs[keep], CLASSES)
    assert m["roc_auc_ovr"] is None and m["per_class"]["regular"]["roc_auc"] is None
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y[keep], probs[keep].argmax(1)))


def test_video_level_is_mean_of_frame_probabilities():
    vids = np.array(["b", "a", "b", "a", "c"])
    y = np.array([1, 0, 1, 0, 2])
    probs = np.array([[0.2, 0.8, 0], [0.9, 0.1, 0], [0.6, 0.4, 0], [0.5, 0.5, 0], [0, 0, 1.0]])
    ids, labels, vp = video_level(vids, y, probs)
    assert ids == ["b", "a", "c"] and labels.tolist() == [1, 0, 2]
    np.testing.assert_allclose(vp[0], [0.4, 0.6, 0])
    np.testing.assert_allclose(vp[1], [0.7, 0.3, 0])
    with pytest.raises(ValueError, match="different labels"):
        video_level(vids, np.array([1, 0, 0, 0, 2]), probs)


def test_summarize_mean_std():
    s = summarize([{"accuracy": 0.5}, {"accuracy": 0.7}, {"accuracy": None}], keys=("accuracy",))
    assert s["accuracy"]["mean"] == pytest.approx(0.6) and s["accuracy"]["n"] == 2
    assert s["accuracy"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))


def _rows(pred_fn, n_patients=30, repeats=2, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(repeats):
        for p in range(n_patients):
            true = CLASSES[p % 3]
            rows.append({"repeat": r, "fold": p % 5, "video_id": f"v{p}", "patient_id": f"p{p}", "frame": -1,
                         "true": true, "pred": pred_fn(true, rng)})
    return rows


def test_paired_comparison_detects_a_clear_gain_and_refuses_other_folds():
    perfect = _rows(lambda t, rng: t)
    coin = _rows(lambda t, rng: CLASSES[rng.integers(0, 3)])
    result = compare_results([coin, perfect], ["coin", "perfect"], metrics=("accuracy",), levels=("video",),
                             n_boot=500)
    pair = result["levels"]["video"]["pairs"][0]
    assert pair["value"] == pytest.approx(1.0)
    assert pair["diff"] > 0.3 and 0 < pair["ci_low"] <= pair["diff"] <= pair["ci_high"] <= 1
    assert pair["folds_better"] + pair["folds_worse"] <= pair["n_folds"] == 10
    same = compare_results([perfect, perfect], ["a", "b"], metrics=("accuracy",), levels=("video",), n_boot=100)
    assert same["levels"]["video"]["pairs"][0]["ci_low"] == same["levels"]["video"]["pairs"][0]["ci_high"] == 0
    shifted = [dict(r, fold=(r["fold"] + 1) % 5) for r in perfect]
    with pytest.raises(ValueError, match="same folds"):
        compare_results([perfect, shifted], ["a", "b"], levels=("video",), n_boot=10)
