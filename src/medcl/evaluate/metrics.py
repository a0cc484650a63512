"""Classification metrics at frame level and video level.

All metrics come from one confusion matrix (fast enough to recompute thousands of times inside a
bootstrap) except ROC-AUC, which uses scikit-learn. Tests compare every number against
scikit-learn.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix C[true, pred] of integer labels in ``range(n_classes)``."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"{name} holds labels outside 0..{n_classes - 1}: {np.unique(y).tolist()}")
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # scikit-learn's zero_division=0 convention: 0/0 -> 0
    return np.divide(a, b, out=np.zeros_like(a, dtype=float), where=b > 0)


def scores_from_confusion(cm: np.ndarray) -> dict:
    """Accuracy, balanced accuracy, per-class precision/recall/F1 and macro-F1 from C[true, pred].

    Balanced accuracy averages recall over the classes present in y_true (scikit-learn's
    definition); macro-F1 averages over all classes (absent classes count as F1 = 0 only when
    they were predicted, as in scikit-learn with ``labels=`` all classes).
    """
    cm = np.asarray(cm, dtype=float)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    total = cm.sum()
    present = support > 0
    return {
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
        "macro_f1": float(f1.mean()),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": support.astype(int).tolist(),
    }


def roc_auc_ovr(y_true: np.ndarray, probs: np.ndarray) -> tuple[float | None, list[float | None]]:
    """Macro one-vs-rest ROC-AUC and per-class AUCs; None where a class is absent or alone."""
    y_true = np.asarray(y_true)
    n_classes = probs.shape[1]
    per_class: list[float | None] = []
    for c in range(n_classes):
        positive = y_true == c
        if positive.all() or not positive.any():
            per_class.append(None)
        else:
            per_class.append(float(roc_auc_score(positive, probs[:, c])))
    valid = [a for a in per_class if a is not None]
    macro = float(np.mean(valid)) if len(valid) == n_classes else None
    return macro, per_class


def classification_metrics(y_true, probs, classes: list[str]) -> dict:
    """Every reported metric for integer labels ``y_true`` [n] and class probabilities [n, C]."""
    probs = np.asarray(probs, dtype=float)
    y_true = np.asarray(y_true, dtype=np.int64)
    if probs.ndim != 2 or probs.shape != (len(y_true), len(classes)):
        raise ValueError(f"probs must be [n={len(y_true)}, classes={len(classes)}], got {probs.shape}")
    y_pred = probs.argmax(axis=1)
    cm = confusion(y_true, y_pred, len(classes))
    out = scores_from_confusion(cm)
    macro_auc, per_class_auc = roc_auc_ovr(y_true, probs)
    out["roc_auc_ovr"] = macro_auc
    out["per_class"] = {
        name: {
            "precision": out["precision"][i],
            "recall": out["recall"][i],
            "f1": out["f1"][i],
            "support": out["support"][i],
            "roc_auc": per_class_auc[i],
        }
        for i, name in enumerate(classes)
    }
    for key in ("precision", "recall", "f1", "support"):
        del out[key]
    out["confusion_matrix"] = cm.astype(int).tolist()
    out["n"] = int(len(y_true))
    return out


def video_level(video_ids, y_true, probs) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Aggregate frame predictions to videos: mean of frame probabilities.

    Returns (video ids in first-seen order, video labels, video probabilities). A video whose
    frames carry different labels is an error (labels are per video).
    """
    video_ids = np.asarray(video_ids)
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=float)
    ids, first, inverse = np.unique(video_ids, return_index=True, return_inverse=True)
    sums = np.zeros((len(ids), probs.shape[1]))
    np.add.at(sums, inverse, probs)
    counts = np.bincount(inverse, minlength=len(ids))[:, None]
    labels = y_true[first]
    if np.any(y_true != labels[inverse]):
        bad = ids[np.unique(inverse[y_true != labels[inverse]])]
        raise ValueError(f"videos with frames of different labels: {bad.tolist()[:5]}")
    keep = np.argsort(first)  # first-seen order
    return ids[keep].tolist(), labels[keep], (sums / counts)[keep]


def mean_std(values) -> dict:
    """``{"mean", "std" (ddof=1; 0 for one value), "n"}`` of the finite values (None when none):
    the one summary statistic of results over folds, for every task."""
    arr = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))],
                     dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0, "n": int(arr.size)}


def fmt(stat: dict, digits: int = 3, sep: str = "±") -> str:
    """``'0.812 ± 0.021'`` from a :func:`mean_std` dict; the mean alone for one value; ``n/a`` when empty."""
    mean = stat.get("mean")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)) or stat.get("n", 0) == 0:
        return "n/a"
    if stat.get("n", 0) <= 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} {sep} {stat['std']:.{digits}f}"


def summarize(per_fold: list[dict], keys=SUMMARY_KEYS) -> dict:
    """:func:`mean_std` of scalar metrics over folds (None values skipped)."""
    return {key: mean_std(m.get(key) for m in per_fold) for key in keys}
