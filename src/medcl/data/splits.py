"""Splits of videos by label.

Label fraction (USCL pretraining with 1% / 10% labels): :func:`select_labeled_videos` keeps the
labels of a seeded, per-class stratified fraction of the labeled videos; the rest are treated as
unlabeled (target ``-1``, never a fake class). Used by every pretraining method; downstream
k-fold helpers live in separate functions of this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

UNLABELED = -1


def select_labeled_videos(labels: Sequence[str], fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask over videos: which keep their label.

    For every class (non-empty label), ``max(1, round(fraction * n_class))`` of its videos are
    chosen uniformly at random with ``seed``; videos with an empty label are never selected.
    ``fraction == 1`` keeps every label. Deterministic for a given (labels, fraction, seed).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    labels = list(labels)
    mask = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(seed)
    for cls in sorted({label for label in labels if label}):
        members = np.array([i for i, label in enumerate(labels) if label == cls])
        keep = min(len(members), max(1, round(fraction * len(members))))
        mask[rng.choice(members, size=keep, replace=False)] = True
    return mask


def label_targets(labels: Sequence[str], classes: Sequence[str], keep: np.ndarray | None = None) -> np.ndarray:
    """Class indices (int64) per video; ``-1`` for unlabeled videos or those not in ``keep``."""
    index = {c: i for i, c in enumerate(classes)}
    targets = np.full(len(labels), UNLABELED, dtype=np.int64)
    for i, label in enumerate(labels):
        if label and (keep is None or keep[i]):
            if label not in index:
                raise ValueError(f"label {label!r} of video {i} not in classes {list(classes)}")
            targets[i] = index[label]
    return targets


# --------------------------------------------------------------------------------------------
# Downstream cross-validation (classification fine-tuning): folds that never leak a patient.
# Folds are a deterministic function of (video ids, labels, patients, seed): videos are put in a
# canonical order (sorted by id) before splitting, so every compared initialisation sees exactly
# the same folds whatever the manifest's row order.

import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from sklearn.model_selection import StratifiedGroupKFold  # noqa: E402


@dataclass(frozen=True)
class Fold:
    """One train / validation / test partition (indices into the caller's video list)."""

    repeat: int
    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _check_lengths(labels, groups) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if labels.shape != groups.shape or labels.ndim != 1:
        raise ValueError(f"labels and groups must be 1-D of equal length, got {labels.shape} and {groups.shape}")
    return labels, groups


def stratified_group_split(labels, groups, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_splits`` (train, held-out) index pairs, stratified by label, grouped by patient
    (scikit-learn's ``StratifiedGroupKFold(shuffle=True)``), with readable errors."""
    labels, groups = _check_lengths(labels, groups)
    n_groups = len(np.unique(groups))
    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2, got {n_splits}")
    if n_groups < n_splits:
        raise ValueError(f"cannot make {n_splits} patient-grouped folds from only {n_groups} patients")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        return [(np.sort(tr), np.sort(te)) for tr, te in splitter.split(np.zeros(len(labels)), labels, groups)]


def carve_validation(train: np.ndarray, labels, groups, fraction: float = 0.2,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split training indices into (fit, validation), grouped by patient, stratified by label.

    The validation part comes from ``train`` only, so the test fold is never used for model
    selection. ``fraction`` is approximate (one of ``round(1/fraction)`` grouped folds).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    labels, groups = _check_lengths(labels, groups)
    train = np.asarray(train)
    n_groups = len(np.unique(groups[train]))
    # scikit-learn refuses more splits than the largest class has members; tiny data sets then get
    # a larger validation share rather than no validation at all
    largest_class = int(np.unique(labels[train], return_counts=True)[1].max())
    n_splits = min(max(2, int(round(1 / fraction))), n_groups, largest_class)
    if n_splits < 2:
        raise ValueError(f"cannot carve a patient-grouped validation set from {n_groups} patient(s)")
    fit_local, val_local = stratified_group_split(labels[train], groups[train], n_splits, seed)[0]
    return np.sort(train[fit_local]), np.sort(train[val_local])


def canonical_order(video_ids) -> np.ndarray:
    """Permutation that sorts videos by id (folds must not depend on manifest row order)."""
    ids = np.asarray(video_ids)
    if len(set(ids.tolist())) != len(ids):
        raise ValueError("video ids must be unique to build deterministic folds")
    return np.argsort(ids, kind="stable")


def repeated_group_kfold(video_ids, labels, groups, n_folds: int = 5, n_repeats: int = 3, seed: int = 0,
                         val_fraction: float = 0.2) -> list[Fold]:
    """Repeated stratified group k-fold with a grouped validation part inside each training fold.

    Repeat ``r`` uses seed ``seed + r``. Indices refer to the caller's order of ``video_ids``.
    Every video is in exactly one test fold per repeat; a patient never appears in two of a
    repeat's test folds, nor in two of a fold's train / validation / test parts.
    """
    labels, groups = _check_lengths(labels, groups)
    order = canonical_order(video_ids)
    if len(order) != len(labels):
        raise ValueError(f"got {len(order)} video ids but {len(labels)} labels")
    folds: list[Fold] = []
    for repeat in range(n_repeats):
        split_seed = seed + repeat
        splits = stratified_group_split(labels[order], groups[order], n_folds, split_seed)
        for fold, (train_c, test_c) in enumerate(splits):
            train, test = order[train_c], order[test_c]
            fit, val = carve_validation(train, labels, groups, val_fraction, seed=split_seed * 1000 + fold)
            folds.append(Fold(repeat, fold, np.sort(fit), np.sort(val), np.sort(test)))
    return folds


def fixed_split_with_validation(video_ids, labels, groups, n_repeats: int = 1, seed: int = 0,
                                val_fraction: float = 0.2) -> list[Fold]:
    """Folds for a fixed training list (the test set is separate): only a validation part is
    carved, a different one per repeat; ``test`` is empty."""
    labels, groups = _check_lengths(labels, groups)
    order = canonical_order(video_ids)
    folds = []
    for repeat in range(n_repeats):
        fit, val = carve_validation(order, labels, groups, val_fraction, seed=seed + repeat)
        folds.append(Fold(repeat, 0, fit, val, np.array([], dtype=int)))
    return folds
