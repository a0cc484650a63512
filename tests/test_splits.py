"""Split logic: patient grouping, stratification, validation carved from train only, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from medcl.data.splits import carve_validation, fixed_split_with_validation, repeated_group_kfold


def _toy(n_patients=60, seed=0):
    rng = np.random.default_rng(seed)
    ids, labels, groups = [], [], []
    for p in range(n_patients):
        label = p % 3 if p < 45 else 0  # imbalanced: class 0 has more patients
        for k in range(rng.integers(1, 4)):
            ids.append(f"vid{p:03d}_{k}")
            labels.append(label)
            groups.append(f"pat{p:03d}")
    return np.array(ids), np.array(labels), np.array(groups)


def test_every_video_tested_once_per_repeat_and_no_patient_leaks():
    ids, labels, groups = _toy()
    folds = repeated_group_kfold(ids, labels, groups, n_folds=5, n_repeats=3, seed=1)
    assert len(folds) == 15
    for r in range(3):
        rep = [f for f in folds if f.repeat == r]
        tested = np.concatenate([f.test for f in rep])
        assert sorted(tested.tolist()) == list(range(len(ids)))  # each video exactly once
        test_patients = [set(groups[f.test]) for f in rep]
        for i in range(5):
            for j in range(i + 1, 5):
                assert not test_patients[i] & test_patients[j]
    for f in folds:
        fit, val, test = (set(groups[x]) for x in (f.train, f.val, f.test))
        assert not fit & val and not fit & test and not val & test
        # validation is carved from the training part: together they are everything but the test fold
        assert sorted(np.concatenate([f.train, f.val, f.test]).tolist()) == list(range(len(ids)))
        assert len(f.val) > 0 and len(f.train) > len(f.val)


def test_folds_are_stratified():
    ids, labels, groups = _toy(n_patients=90)
    global_share = np.bincount(labels) / len(labels)
    for f in repeated_group_kfold(ids, labels, groups, 5, 1, seed=0):
        share = np.bincount(labels[f.test], minlength=3) / len(f.test)
        assert np.abs(share - global_share).max() < 0.12, (share, global_share)
        assert set(labels[f.val]) == {0, 1, 2}


def test_folds_depend_only_on_content_and_seed():
    ids, labels, groups = _toy()
    perm = np.random.default_rng(5).permutation(len(ids))
    a = repeated_group_kfold(ids, labels, groups, 5, 2, seed=3)
    b = repeated_group_kfold(ids[perm], labels[perm], groups[perm], 5, 2, seed=3)
    for fa, fb in zip(a, b):
        for part in ("train", "val", "test"):
            assert set(ids[getattr(fa, part)]) == set(ids[perm][getattr(fb, part)])
    c = repeated_group_kfold(ids, labels, groups, 5, 2, seed=4)
    assert any(set(fa.test.tolist()) != set(fc.test.tolist()) for fa, fc in zip(a, c))
    # repeats differ from each other
    assert [set(f.test.tolist()) for f in a[:5]] != [set(f.test.tolist()) for f in a[5:]]


def test_carve_validation_only_uses_given_indices():
    ids, labels, groups = _toy()
    train = np.arange(0, len(ids), 2)
    train = train[np.isin(groups[train], groups[train])]
    fit, val = carve_validation(train, labels, groups, 0.25, seed=0)
    assert set(fit) | set(val) == set(train)
    assert not set(groups[fit]) & set(groups[val])


def test_fixed_split_has_no_test_and_grouped_validation():
    ids, labels, groups = _toy()
    folds = fixed_split_with_validation(ids, labels, groups, n_repeats=2, seed=0)
    assert len(folds) == 2 and all(len(f.test) == 0 for f in folds)
    for f in folds:
        assert not set(groups[f.train]) & set(groups[f.val])
    assert set(folds[0].val.tolist()) != set(folds[1].val.tolist())


def test_too_few_patients_is_an_error():
    with pytest.raises(ValueError, match="patients"):
        repeated_group_kfold(["a", "b", "c"], [0, 1, 0], ["p", "p", "q"], n_folds=5, n_repeats=1)
    with pytest.raises(ValueError, match="unique"):
        repeated_group_kfold(["a", "a"], [0, 1], ["p", "q"], n_folds=2, n_repeats=1)
