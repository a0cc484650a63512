"""Every split medcl makes: by label for pretraining, by patient for evaluation.

Pretraining label fraction (USCL with 1% / 10% labels): :func:`select_labeled_videos` keeps the
labels of a seeded, per-class stratified fraction of the labeled videos; the rest are treated as
unlabeled (target ``-1``, never a fake class).

Evaluation (the fine-tuning protocol of :mod:`medcl.evaluate.protocol`, for every task): folds
that never split a patient (:func:`repeated_group_kfold`, stratified by label, scikit-learn's
``StratifiedGroupKFold``; :func:`kfold_by_patient` when there is no label to stratify on), a
validation part carved from the training folds by patient (:func:`carve_validation`,
:func:`split_patients`) and label fractions drawn by patient (:func:`select_label_fraction`).
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


def kfold_by_patient(patient_ids: Sequence[str], n_folds: int, seed: int) -> list[int]:
    """1-based fold of every case; all cases of one patient share a fold (seeded shuffle of the
    sorted patients, dealt round-robin: fold sizes differ by at most one patient)."""
    patients = sorted(set(patient_ids))
    if len(patients) < n_folds:
        raise ValueError(f"{len(patients)} patients cannot make {n_folds} patient-level folds")
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of = {patients[j]: rank % n_folds + 1 for rank, j in enumerate(order)}
    return [fold_of[p] for p in patient_ids]


def split_patients(patient_ids: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split case indices into (held, rest) by patient: ``round(fraction * n_patients)`` patients
    (at least one when fraction > 0, at most n - 1) go into ``held``."""
    patients = sorted(set(patient_ids))
    if fraction <= 0 or len(patients) < 2:
        return [], list(range(len(patient_ids)))
    n_held = min(max(1, round(fraction * len(patients))), len(patients) - 1)
    order = np.random.default_rng(seed).permutation(len(patients))
    held = {patients[j] for j in order[:n_held]}
    held_idx = [i for i, p in enumerate(patient_ids) if p in held]
    rest_idx = [i for i, p in enumerate(patient_ids) if p not in held]
    return held_idx, rest_idx


def select_label_fraction(patient_ids: Sequence[str], fraction: float, seed: int) -> list[int]:
    """Indices of the cases of ``max(1, round(fraction * n_patients))`` patients.

    Patients are drawn in one seeded order, so for a fixed seed a smaller fraction's patients are
    a subset of a larger fraction's (the curves compare like with like), and every initialisation
    of a comparison sees exactly the same labeled cases.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    patients = sorted(set(patient_ids))
    if not patients:
        raise ValueError("no training cases to take a label fraction of")
    if fraction == 1.0:
        return list(range(len(patient_ids)))
    n_keep = max(1, round(fraction * len(patients)))
    order = np.random.default_rng(seed).permutation(len(patients))
    keep = {patients[j] for j in order[:n_keep]}
    return [i for i, p in enumerate(patient_ids) if p in keep]
