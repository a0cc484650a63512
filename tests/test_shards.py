"""The shard store and the streamed frame-set loader: WebDataset layout, every video once per epoch
(one process and two gloo ranks), I1 in every batch, the memory bound, exact resume (and resume at
another world size), and one-line errors for damaged or missing shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from resume_helpers import assert_same_final_state, killed_run, logged
from uscl_fixtures import tiny_overrides, write_frame_sets

from medcl.config import load_config
from medcl.data.manifest import read_manifest, write_manifest
from medcl.data.shards import ShardError, ShardStore
from medcl.ingest.pack import pack_shards
from medcl.sampling.loader import IndexBatchLoader
from medcl.sampling.pairs import frame_set_loader
from medcl.sampling.streamed import StreamedFrameSetLoader

PRESET = Path(__file__).resolve().parents[1] / "configs" / "uscl.yaml"
N_VIDEOS, BATCH, SHARD_BYTES = 16, 4, 8000  # 1-6 frames of 32 x 32: one to three videos per shard
WORLD = 2


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    root = write_frame_sets(tmp_path_factory.mktemp("shards") / "data", n_videos=N_VIDEOS)
    pack_shards(root, SHARD_BYTES)
    return root


def config(root: Path, out: Path, **extra):
    values = {"data.store": "shards", "optim.batch_size": BATCH, **extra}
    return load_config(PRESET, tiny_overrides(root, out, **values))


def make_loader(root: Path, rank: int = 0, world_size: int = 1, **extra) -> StreamedFrameSetLoader:
    loader, _, _ = frame_set_loader(config(root, root / "unused", **extra), rank=rank, world_size=world_size)
    assert isinstance(loader, StreamedFrameSetLoader)
    return loader


def epoch_videos(loader, epoch: int, start: int = 0) -> list[list[int]]:
    return [batch["video"].tolist() for batch in loader.epoch_batches(epoch, start)]


def test_pack_writes_webdataset_shards_and_an_index(packed):
    import webdataset as wds

    store = ShardStore(packed)
    assert len(store) == N_VIDEOS and len(store.shards) > 3
    manifest = {r.video_id: r for r in read_manifest(packed)}
    assert {r.video_id: r for r in store.records} == manifest  # labels, patients, n_frames without reading frames
    for video in store.videos:
        np.testing.assert_array_equal(store.read(video), np.load(packed / manifest[video.video_id].frames_file))
    largest = max(v.size for v in store.videos)
    assert all(store.path(name).stat().st_size <= SHARD_BYTES + largest + 4096 for name in store.shards)
    # what webdataset itself reads: one sample per video, the manifest row as json and the frames as npy
    urls = [str(store.path(name)) for name in store.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert len(samples) == N_VIDEOS
    for sample in samples:
        row = sample["json"]
        np.testing.assert_array_equal(sample["npy"], np.load(packed / row["frames_file"]))
        assert row["label"] == manifest[row["video_id"]].label
    assert pack_shards(packed, SHARD_BYTES).skipped  # nothing changed: nothing rewritten


def test_every_video_once_per_epoch_i1_and_the_memory_bound(packed):
    for world_size, buffer in ((1, 5), (WORLD, 5), (WORLD, 2)):
        loaders = [make_loader(packed, r, world_size, **{"data.shuffle_buffer": buffer}) for r in range(world_size)]
        assert {len(loader) for loader in loaders} == {N_VIDEOS // BATCH}
        for epoch in range(2):
            reads = sum(loader.store.reads for loader in loaders)
            per_rank = [epoch_videos(loader, epoch) for loader in loaders]
            for batches in per_rank:
                assert all(len(set(b)) == len(b) == BATCH // world_size for b in batches)  # I1
            seen = [v for batches in per_rank for b in batches for v in b]
            assert sorted(seen) == list(range(N_VIDEOS))  # every video once, no video on two ranks
            assert sum(loader.store.reads for loader in loaders) - reads == N_VIDEOS  # each read once
        for loader in loaders:
            assert loader.max_held == buffer and loader.held == 0
    orders = [sum(epoch_videos(make_loader(packed), epoch), []) for epoch in (0, 1)]
    assert orders[0] != orders[1]  # shuffled anew each epoch


def test_read_workers_give_the_same_batches_within_the_memory_bound(packed):
    """``data.read_workers``: the buffer's newcomers are read by threads in the background; the
    batches (videos and rendered views) are those of the in-line reads, the bound still holds, and
    a consumer that stops early leaves nothing held."""
    for buffer in (5, BATCH):
        plain = make_loader(packed, **{"data.shuffle_buffer": buffer})
        threaded = make_loader(packed, **{"data.shuffle_buffer": buffer, "data.read_workers": 3})
        assert threaded.read_workers == 3
        for epoch in range(2):
            for a, b in zip(plain.epoch_batches(epoch), threaded.epoch_batches(epoch), strict=True):
                assert a["video"].tolist() == b["video"].tolist()
                torch.testing.assert_close(a["view1"], b["view1"])
                torch.testing.assert_close(a["view2"], b["view2"])
        assert threaded.max_held <= buffer and threaded.held == 0 and threaded.store.reads == 2 * N_VIDEOS
        batches = threaded.epoch_batches(2)  # stop after one batch: what is held or being read is let go
        assert len(next(batches)["video"]) == BATCH  # the buffer is refilled (reads in flight) by now
        batches.close()
        assert threaded.held == 0


def test_shard_reads_from_many_threads_at_once(packed):
    from concurrent.futures import ThreadPoolExecutor

    store = ShardStore(packed)
    store.MAX_OPEN = 2  # fewer open files than shards: descriptors are closed while others read
    expected = [np.load(packed / v.record.frames_file) for v in store.videos]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(store.read, store.videos * 4))
    for i, frames in enumerate(got):
        np.testing.assert_array_equal(frames, expected[i % len(expected)])
    assert store.reads == 4 * len(store.videos)
    assert len(store._fds) <= 2 + 6  # MAX_OPEN, plus at most one per concurrent reader while all were busy
    store.close()


def test_frame_pairing_streams_one_anchor_per_video(packed):
    loader = make_loader(packed, **{"sampling.pairing": "frame", "sampling.mixup": "none"})
    videos = epoch_videos(loader, 0)
    assert sorted(sum(videos, [])) == list(range(N_VIDEOS)) and all(len(set(b)) == BATCH for b in videos)


def test_resume_at_the_same_world_size_gives_the_same_batches(packed):
    whole = make_loader(packed, **{"data.shuffle_buffer": 6})
    list(whole.epoch_batches(0))
    expected = list(whole.epoch_batches(1))
    stopped = make_loader(packed, **{"data.shuffle_buffer": 6})
    list(stopped.epoch_batches(0))
    batches = stopped.epoch_batches(1)
    for _ in range(2):
        next(batches)
    state = stopped.state_dict()
    assert (state["epoch"], state["position"]) == (1, 2)
    resumed = make_loader(packed, **{"data.shuffle_buffer": 6})
    resumed.load_state_dict(state)
    rest = list(resumed.epoch_batches(1, start=2))
    assert len(rest) == len(expected) - 2
    for got, want in zip(rest, expected[2:]):
        for key in ("view1", "view2", "label", "video"):
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert resumed.store.reads <= 6 + 2 * BATCH  # the buffer then the rest: no replayed read


@pytest.mark.parametrize("old, new", [(WORLD, 1), (1, WORLD)])
def test_resume_at_another_world_size_never_repeats_a_video_in_the_epoch(packed, old, new):
    stopped = [make_loader(packed, r, old) for r in range(old)]
    done = []
    for loader in stopped:
        batches = loader.epoch_batches(0)
        done += next(batches)["video"].tolist()
    resumed = [make_loader(packed, r, new) for r in range(new)]
    for rank, loader in enumerate(resumed):
        loader.load_state_dict(stopped[rank % old].state_dict())
    rest = [v for loader in resumed for b in epoch_videos(loader, 0, start=1) for v in b]
    assert sorted(done + rest) == list(range(N_VIDEOS))
    fresh = [make_loader(packed, r, new) for r in range(new)]
    assert [epoch_videos(a, 1) for a in resumed] == [epoch_videos(b, 1) for b in fresh]  # later epochs: as at `new`


def test_store_selection_and_refusals(packed, tmp_path):
    from medcl.sampling.labeled_unlabeled import labeled_unlabeled_loader

    auto, _, _ = frame_set_loader(config(packed, tmp_path, **{"data.store": "auto"}))
    memory, _, _ = frame_set_loader(config(packed, tmp_path, **{"data.store": "memory"}))
    assert isinstance(auto, StreamedFrameSetLoader) and isinstance(memory, IndexBatchLoader)
    with pytest.raises(ValueError, match="in-memory loader"):
        auto.load_state_dict(memory.state_dict())
    with pytest.raises(ValueError, match="data.store=shards"):
        memory.load_state_dict(auto.state_dict())
    with pytest.raises(ValueError, match="shuffle_buffer=2 is smaller than the 4 videos"):
        make_loader(packed, **{"data.shuffle_buffer": 2})
    with pytest.raises(ValueError, match="reads every frame into memory"):
        labeled_unlabeled_loader(config(packed, tmp_path), mu=1, views=("weak",))
    plain = write_frame_sets(tmp_path / "plain", n_videos=8)  # no shards
    assert isinstance(frame_set_loader(config(plain, tmp_path, **{"data.store": "auto"}))[0], IndexBatchLoader)
    with pytest.raises(ShardError, match=r"plain/shards/index.json: shard index not found.*medcl ingest shard"):
        frame_set_loader(config(plain, tmp_path))


def one_line_error(call, *words):
    with pytest.raises(ShardError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_damaged_or_missing_shards_give_one_line_errors(packed, tmp_path):
    root = Path(shutil.copytree(packed, tmp_path / "copy"))
    store = ShardStore(root)
    video = store.videos[0]
    path = store.path(video.shard)
    data = bytearray(path.read_bytes())
    data[video.offset + video.size - 5] ^= 0xFF  # a flipped byte inside the frames
    path.write_bytes(bytes(data))
    one_line_error(lambda: ShardStore(root).read(video), video.shard, video.video_id, "damaged")
    path.write_bytes(bytes(data[: video.offset + 10]))
    one_line_error(lambda: ShardStore(root).read(video), video.shard, video.video_id, "truncated")
    path.unlink()
    one_line_error(lambda: ShardStore(root).read(video), video.shard, "cannot open shard")
    records = read_manifest(root)
    records[0].label = "" if records[0].label else "covid"  # relabelled after packing
    write_manifest(root / "manifest.csv", records)
    one_line_error(lambda: frame_set_loader(config(root, tmp_path)), "index.json", "out of date", records[0].video_id)
    (root / "shards" / "index.json").write_text(json.dumps({"format": "other"}))
    one_line_error(lambda: ShardStore(root), "index.json", "not a medcl shard index")


def test_checkpoints_from_before_data_store_still_resume(packed, tmp_path):
    from medcl.train.trainer import _config_differences, _with_added_defaults

    current = config(packed, tmp_path, **{"data.store": "auto"}).to_dict()
    saved = {**current, "data": {k: v for k, v in current["data"].items() if k not in ("store", "shuffle_buffer")}}
    assert _config_differences(_with_added_defaults(saved, current), current, ignore=()) == []
    streamed = {**current, "data": {**current["data"], "store": "shards"}}
    assert _config_differences(_with_added_defaults(saved, streamed), streamed, ignore=()) == [
        "data.store: checkpoint None, now 'shards'"]


def test_trainer_resumes_a_streamed_run_exactly(packed, tmp_path):
    overrides = tiny_overrides(packed, tmp_path / "x", **{"data.store": "shards", "data.shuffle_buffer": 6,
                                                          "optim.max_steps": 6, "train.checkpoint_every": 3})
    from medcl.train.api import pretrain

    full = pretrain(PRESET, overrides, out=tmp_path / "full")
    cfg = killed_run(PRESET, overrides, tmp_path / "killed", step=5)  # epochs of 4 steps: stops inside epoch 1
    resumed = pretrain(cfg, resume=True)
    losses = [[r["loss"] for r in logged(run)] for run in (full, resumed)]
    assert len(losses[1]) == 6 and losses[1] == pytest.approx(losses[0], rel=1e-6, abs=1e-7)
    assert_same_final_state(full, resumed)


def ddp_worker(rank: int, init_file: str, root: str, out: str) -> None:
    """Two gloo ranks: the loader's epochs, then a streamed pretraining run under DDP."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        loader = make_loader(Path(root), rank, WORLD)
        epochs = [epoch_videos(loader, epoch) for epoch in range(2)]
        gathered: list = [None] * WORLD
        dist.all_gather_object(gathered, {"epochs": epochs, "max_held": loader.max_held})
        if rank == 0:
            Path(out, "epochs.json").write_text(json.dumps(gathered))
        import os

        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD)})
        from medcl.train.api import pretrain

        pretrain(PRESET, tiny_overrides(Path(root), Path(out) / "run", **{
            "data.store": "shards", "optim.max_steps": 2}))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_share_each_epoch_and_resume_on_one(packed, tmp_path):
    mp.spawn(ddp_worker, args=(str(tmp_path / "init"), str(packed), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = json.loads((tmp_path / "epochs.json").read_text())
    for epoch in range(2):
        per_rank = [set(v for b in rank["epochs"][epoch] for v in b) for rank in ranks]
        assert not per_rank[0] & per_rank[1]  # no video on two ranks in one epoch
        assert per_rank[0] | per_rank[1] == set(range(N_VIDEOS))  # every video once
        assert all(len(set(b)) == len(b) == BATCH // WORLD for rank in ranks for b in rank["epochs"][epoch])
    assert all(rank["max_held"] <= 256 for rank in ranks)
    from medcl.train.api import pretrain
    from medcl.weights import load_checkpoint

    run = tmp_path / "run"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["world_size"] == WORLD
    pretrain(PRESET, tiny_overrides(packed, run, **{"data.store": "shards", "optim.max_steps": 4}), resume=True)
    final = load_checkpoint(run / "checkpoints" / "final.pt")
    assert final["world_size"] == 1 and final["step"] == 4
    assert [r["step"] for r in logged(run)] == [1, 2, 3, 4]
