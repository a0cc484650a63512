import numpy as np
import pytest
import torch
from scipy import stats

from medcl.data.splits import label_targets, select_labeled_videos
from medcl.sampling.augment import AugmentParams, affine_grid, augment_frames, random_affine
from medcl.sampling.pairs import PairGenerator
from medcl.sampling.loader import IndexBatchLoader

NO_AUGMENT = AugmentParams(enabled=False)


def frame_sets(counts, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(n, size, size), dtype=np.uint8) for n in counts]


def generator(counts, **kwargs):
    kwargs.setdefault("size", 8)
    kwargs.setdefault("augment", NO_AUGMENT)
    return PairGenerator(frame_sets(counts), np.full(len(counts), -1), **kwargs)


def test_one_positive_pair_per_video_per_batch():
    gen = generator([5] * 20)
    loader = IndexBatchLoader(gen.n_items, 6, gen.make_batch, seed=3)
    assert len(loader) == 3
    for epoch in range(3):
        seen = []
        for batch in loader.epoch_batches(epoch):
            videos = batch["video"].tolist()
            assert len(videos) == len(set(videos)) == 6  # I1: distinct videos in a batch
            seen += videos
        assert len(seen) == len(set(seen))  # and no video twice in an epoch


def test_three_distinct_frames_around_the_anchor():
    gen = generator([3, 4, 10, 50])
    rng = np.random.default_rng(0)
    for _ in range(50):
        plan = gen.plan(np.arange(4), rng)
        for row, video in enumerate(plan.video):
            lo, hi = gen.offsets[video], gen.offsets[video] + gen.counts[video]
            x1, x2, x3 = plan.view1_a[row], plan.view1_b[row], plan.view2_a[row]
            assert plan.view2_b[row] == x2  # the anchor appears in both views
            assert len({x1, x2, x3}) == 3
            assert all(lo <= x < hi for x in (x1, x2, x3))


def test_mixing_weights_follow_beta_independently_per_view():
    gen = generator([6] * 8)
    rng = np.random.default_rng(1)
    plans = [gen.plan(np.arange(8), rng) for _ in range(250)]
    w1 = np.concatenate([p.view1_w for p in plans])
    w2 = np.concatenate([p.view2_w for p in plans])
    assert ((w1 >= 0) & (w1 <= 1)).all() and ((w2 >= 0) & (w2 <= 1)).all()
    assert stats.kstest(w1, "beta", args=(0.5, 0.5)).pvalue > 0.01
    assert stats.kstest(w2, "beta", args=(0.5, 0.5)).pvalue > 0.01
    assert stats.kstest(w1, "uniform").pvalue < 1e-6  # the test can tell Beta(0.5, 0.5) from uniform
    assert abs(np.corrcoef(w1, w2)[0, 1]) < 0.1
    other = generator([6] * 8, alpha=5.0, beta=2.0)
    w = np.concatenate([other.plan(np.arange(8), rng).view1_w for _ in range(250)])
    assert stats.kstest(w, "beta", args=(5.0, 2.0)).pvalue > 0.01


def test_shared_lambda_uses_one_weight():
    gen = generator([6] * 4, mixup="shared_lambda")
    plan = gen.plan(np.arange(4), np.random.default_rng(0))
    assert np.array_equal(plan.view1_w, plan.view2_w)
    assert len(set(plan.view1_w.tolist())) == 4


def test_fallbacks_for_two_and_one_frame_videos():
    gen = generator([2, 1, 3])
    rng = np.random.default_rng(0)
    for _ in range(20):
        plan = gen.plan(np.array([0, 1]), rng)
        assert {plan.view1_a[0], plan.view2_a[0]} == {0, 1}  # the two frames are the pair
        assert plan.view1_b[0] == plan.view2_b[0] == -1 and plan.view1_w[0] == plan.view2_w[0] == 1
        assert plan.view1_a[1] == plan.view2_a[1] == 2  # the one frame, twice
        assert plan.view1_b[1] == plan.view2_b[1] == -1


def test_no_mixup_pairs_two_distinct_frames():
    gen = generator([4, 7], mixup="none")
    plan = gen.plan(np.array([0, 1]), np.random.default_rng(0))
    assert (plan.view1_b == -1).all() and (plan.view1_w == 1).all()
    assert (plan.view1_a != plan.view2_a).all()


def test_frame_pairing_is_vanilla_simclr():
    gen = generator([30, 2, 2], pairing="frame", mixup="none")
    assert gen.n_items == 34
    plan = gen.plan(np.array([0, 31, 5]), np.random.default_rng(0))
    assert np.array_equal(plan.view1_a, [0, 31, 5]) and np.array_equal(plan.view2_a, [0, 31, 5])
    assert plan.video.tolist() == [0, 1, 0]  # two frames of video 0 in one batch: negatives
    loader = IndexBatchLoader(gen.n_items, 8, gen.make_batch, seed=0)
    assert any(len(set(b["video"].tolist())) < 8 for b in loader.epoch_batches(0))
    mixed = generator([5, 5], pairing="frame").plan(np.array([3, 7]), np.random.default_rng(0))
    assert mixed.view1_b.tolist() == [3, 7] and mixed.view2_b.tolist() == [3, 7]  # the drawn frame is the anchor


def test_views_are_the_weighted_mix_of_the_frames():
    gen = generator([4, 5, 6])
    rng = np.random.default_rng(2)
    plan = gen.plan(np.arange(3), rng)
    view1, view2 = gen.render(plan, rng)
    frames = gen.frames.float() / 255
    for row in range(3):
        expected1 = plan.view1_w[row] * frames[plan.view1_a[row]] + (1 - plan.view1_w[row]) * frames[plan.view1_b[row]]
        expected2 = plan.view2_w[row] * frames[plan.view2_a[row]] + (1 - plan.view2_w[row]) * frames[plan.view2_b[row]]
        torch.testing.assert_close(view1[row, 0], expected1, atol=1e-5, rtol=0)
        torch.testing.assert_close(view2[row, 0], expected2, atol=1e-5, rtol=0)


def test_batch_layout_and_labels():
    gen = PairGenerator(frame_sets([3, 3, 3], size=20), np.array([2, -1, 0]), size=16, channels=3)
    batch = gen.make_batch(np.array([2, 1]), np.random.default_rng(0))
    assert batch["view1"].shape == batch["view2"].shape == (2, 3, 16, 16)
    assert batch["view1"].dtype == torch.float32
    assert 0 <= float(batch["view1"].min()) and float(batch["view1"].max()) <= 1
    assert batch["label"].tolist() == [0, -1] and batch["video"].tolist() == [2, 1]


def test_augment_geometry():
    frames = torch.arange(16, dtype=torch.uint8).view(1, 4, 4).repeat(2, 1, 1) * 10
    rng = np.random.default_rng(0)
    flip = AugmentParams(crop_scale=(1, 1), crop_ratio=(1, 1), flip_p=1.0, rotate_degrees=0, brightness=0, contrast=0)
    out = augment_frames(frames, 4, rng, flip)
    torch.testing.assert_close(out[:, 0], frames.flip(-1).float() / 255)
    same = augment_frames(frames, 4, rng, NO_AUGMENT)
    torch.testing.assert_close(same[:, 0], frames.float() / 255)
    jitter = augment_frames(frames.repeat(50, 1, 1), 4, rng, AugmentParams())
    assert jitter.shape == (100, 1, 4, 4) and 0 <= float(jitter.min()) and float(jitter.max()) <= 1
    assert len({tuple(x.flatten().tolist()) for x in jitter}) > 90  # every image augmented independently


def test_mixed_frame_sizes_are_resized_once():
    with pytest.warns(UserWarning, match="resizing"):
        gen = PairGenerator([np.zeros((3, 8, 8), np.uint8), np.zeros((2, 8, 8), np.uint8), np.zeros((1, 6, 6), np.uint8)],
                            np.full(3, -1), size=8)
    assert gen.frames.shape == (6, 8, 8)


def test_invalid_options_fail_clearly():
    with pytest.raises(ValueError, match="mixup"):
        generator([3], mixup="cutmix")
    with pytest.raises(ValueError, match="Beta"):
        generator([3], alpha=0)
    with pytest.raises(ValueError, match="exceeds the 3 videos"):
        IndexBatchLoader(3, 4, lambda i, r: i, what="videos")


def test_loader_shards_global_batches_by_rank():
    shards = [IndexBatchLoader(40, 8, lambda i, r: i, seed=5, rank=r, world_size=2) for r in range(2)]
    whole = IndexBatchLoader(40, 8, lambda i, r: i, seed=5)
    for epoch in range(2):
        for a, b, c in zip(shards[0].epoch_batches(epoch), shards[1].epoch_batches(epoch), whole.epoch_batches(epoch)):
            assert np.array_equal(np.concatenate([a, b]), c)


def test_label_fraction_is_stratified_and_seeded():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 3 + [""] * 10
    mask = select_labeled_videos(labels, 0.1, seed=0)
    chosen = [labels[i] for i in np.flatnonzero(mask)]
    assert chosen.count("a") == 5 and chosen.count("b") == 3 and chosen.count("c") == 1 and "" not in chosen
    assert np.array_equal(mask, select_labeled_videos(labels, 0.1, seed=0))
    assert not np.array_equal(mask, select_labeled_videos(labels, 0.1, seed=1))
    assert select_labeled_videos(labels, 1.0).sum() == 83
    targets = label_targets(labels, ["a", "b", "c"], mask)
    assert set(targets[~mask].tolist()) == {-1} and set(targets[mask].tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="fraction"):
        select_labeled_videos(labels, 0.0)


def test_large_frames_are_shrunk_once_to_what_the_crops_need():
    params = AugmentParams(crop_scale=(0.64, 1.0))
    gen = PairGenerator([np.full((2, 64, 64), 200, np.uint8)], np.full(1, -1), size=16, augment=params)
    assert gen.frames.shape == (2, 20, 20)  # ceil(16 / sqrt(0.64)): the smallest crop still has 16 pixels
    assert int(gen.frames.min()) == int(gen.frames.max()) == 200
    assert generator([2], size=8).frames.shape == (2, 8, 8)


@pytest.mark.parametrize("size", [1, 2, 7, 112, 224])
def test_affine_grid_is_torchs_bit_for_bit(size):
    theta = random_affine(6, np.random.default_rng(size), AugmentParams(rotate_degrees=30))
    theta[0] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # identity: the pixel centres themselves
    expected = torch.nn.functional.affine_grid(theta, [6, 1, size, size], align_corners=False)
    got = affine_grid(theta, size)
    assert got.shape == expected.shape == (6, size, size, 2)
    assert torch.equal(got, expected)  # the same values to the last bit: augmentation streams are unchanged
