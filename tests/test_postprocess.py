"""Segmentation post-processing: keep the largest connected component of a class, decided per model
on its validation cases (nnU-Net's rule), applied to test metrics and to ``medcl predict``."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest
import torch
from torch import nn

from medcl.evaluate.segment import SegmentConfig, choose_postprocess, evaluate_cases, keep_largest_component


def naive_largest_component(label_map: np.ndarray, c: int) -> np.ndarray:
    """Flood fill over all 3^d - 1 neighbours, components found in raster order; keep the biggest
    (the first found among equals) of class ``c``."""
    seen = np.zeros(label_map.shape, bool)
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=label_map.ndim) if any(o)]
    components = []
    for start in zip(*np.nonzero(label_map == c)):
        if seen[start]:
            continue
        seen[start] = True
        queue, members = deque([start]), []
        while queue:
            p = queue.popleft()
            members.append(p)
            for o in offsets:
                q = tuple(a + b for a, b in zip(p, o))
                if all(0 <= q[i] < label_map.shape[i] for i in range(label_map.ndim)) and not seen[q] and label_map[q] == c:
                    seen[q] = True
                    queue.append(q)
        components.append(members)
    out = label_map.copy()
    if len(components) > 1:
        best = max(range(len(components)), key=lambda k: (len(components[k]), -k))
        for k, members in enumerate(components):
            if k != best:
                for p in members:
                    out[p] = 0
    return out


@pytest.mark.parametrize("shape", [(14, 17), (7, 8, 9)])
def test_keep_largest_component_matches_a_naive_flood_fill(shape):
    rng = np.random.default_rng(len(shape))
    for _ in range(5):
        label_map = rng.choice(3, size=shape, p=[0.6, 0.25, 0.15]).astype(np.uint8)
        expected = naive_largest_component(label_map, 1)
        got = keep_largest_component(label_map, [1])
        np.testing.assert_array_equal(got, expected)
        assert (got == 2).sum() == (label_map == 2).sum()  # classes not listed are untouched
        both = keep_largest_component(label_map, [1, 2])
        np.testing.assert_array_equal(both, naive_largest_component(naive_largest_component(label_map, 1), 2))
    # diagonal neighbours are connected (8 in 2D, 26 in 3D): a diagonal line is one component
    line = np.zeros(shape, np.uint8)
    for k in range(min(shape)):
        line[(k,) * len(shape)] = 1
    np.testing.assert_array_equal(keep_largest_component(line, [1]), line)


class Echo(nn.Module):
    """A 'model' whose prediction is its input: the image holds the label map it predicts."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.n_classes = n_classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10.0 * torch.nn.functional.one_hot(x[:, 0].long(), self.n_classes).movedim(-1, 1).float()


def _case(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return pred.astype(np.float32)[None], truth.astype(np.int64)[None]


def test_choose_postprocess_follows_the_validation_rule():
    truth = np.zeros((20, 20), np.int64)
    truth[2:8, 2:8] = 1                       # class 1: one organ
    truth[12:16, 2:6] = 2                     # class 2: two separate lesions
    truth[12:16, 12:16] = 2
    pred = truth.copy()
    pred[17:19, 17:19] = 1                    # a false island of class 1 far from the organ
    images, labels = zip(_case(pred, truth), _case(truth, truth))
    cfg = SegmentConfig(precision="fp32")
    model = Echo(3)
    # auto: class 1 loses a false island (validation Dice rises) -> kept; class 2's second
    # lesion is real (Dice would fall) -> not post-processed
    assert choose_postprocess(model, images, labels, 3, None, cfg) == [1]
    assert choose_postprocess(model, images, labels, 3, None, cfg.model_copy(update={"postprocess": "none"})) == []
    forced = cfg.model_copy(update={"postprocess": "largest_component"})
    assert choose_postprocess(model, images, labels, 3, None, forced) == [1, 2]
    # nothing to remove in any validation prediction -> no evidence -> not post-processed
    clean = [_case(truth, truth)]
    assert choose_postprocess(model, [c[0] for c in clean], [c[1] for c in clean], 3, None, cfg) == []
    # a class absent from every validation ground truth is never chosen (its Dice is undefined)
    empty = np.zeros_like(truth)
    island = empty.copy()
    island[1:3, 1:3] = 1
    island[10:12, 10:12] = 1
    assert choose_postprocess(model, [island.astype(np.float32)[None]], [empty[None]], 3, None, cfg) == []

    # the metrics use the post-processed prediction; the raw Dice is kept beside
    raw: list[np.ndarray] = []
    scores, kept, counts = evaluate_cases(model, [images[0]], [labels[0]], 3, None, cfg, keep=1,
                                          keep_largest=[1], raw=raw)
    assert scores[0, 0] == pytest.approx(1.0) and raw[0][0, 0] == pytest.approx(2 * 36 / (36 + 40))
    assert scores[0, 1] == pytest.approx(1.0) and counts[0, 0].tolist() == [36, 36, 36]
    assert (kept[0][1] == 1).sum() == 36  # overlays show what was scored
