"""Two gloo processes on CPU reproduce the single-process loss and gradients on the same global batch."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from medcl.losses.ntxent import NTXentLoss
from medcl.losses.supcon import SupConLoss

WORLD = 2
GLOBAL_BATCH = 6


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8))


def make_batch():
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(GLOBAL_BATCH, 10, generator=g), torch.randn(GLOBAL_BATCH, 10, generator=g)
    labels = torch.tensor([0, 1, -1, 0, 2, 1])
    return x1, x2, labels


def step(model, loss_name, x1, x2, labels, gather):
    z1, z2 = model(x1), model(x2)
    if loss_name == "ntxent":
        loss = NTXentLoss(0.3, gather_distributed=gather)(z1, z2)
    else:
        loss = SupConLoss(0.3, gather_distributed=gather)(z1, z2, labels)
    loss.backward()
    return loss.detach()


LOSSES = ("ntxent", "supcon")


def worker(rank: int, init_file: str, out_dir: str, pretrain_args: tuple[str, list[str]]) -> None:
    """Both checks in one pair of processes (spawning is the slow part on a loaded 2-core machine)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for loss_name in LOSSES:
            model = nn.parallel.DistributedDataParallel(make_model())
            x1, x2, labels = make_batch()
            shard = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
            loss = step(model, loss_name, x1[shard], x2[shard], labels[shard], gather=True)
            dist.all_reduce(loss)
            grads = {n: p.grad for n, p in model.module.named_parameters()}
            torch.save({"loss": loss / WORLD, "grads": grads}, Path(out_dir) / f"{loss_name}-rank{rank}.pt")
        # the whole pretraining path under torch.distributed, as torchrun would run it
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD)})
        from medcl.train.api import pretrain

        pretrain(*pretrain_args)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    from uscl_fixtures import tiny_overrides, write_frame_sets

    tmp = tmp_path_factory.mktemp("dist")
    data = write_frame_sets(tmp / "data", n_videos=8)
    overrides = tiny_overrides(data, tmp / "run", **{"optim.max_steps": 2, "train.checkpoint_every": 1})
    config = str(Path(__file__).resolve().parents[1] / "configs/uscl.yaml")
    mp.spawn(worker, args=(str(tmp / "init"), str(tmp), (config, overrides)), nprocs=WORLD, join=True)
    return tmp


def test_two_processes_equal_one(two_process_run):
    for loss_name in LOSSES:
        model = make_model()
        x1, x2, labels = make_batch()
        expected_loss = step(model, loss_name, x1, x2, labels, gather=False)
        for rank in range(WORLD):
            got = torch.load(two_process_run / f"{loss_name}-rank{rank}.pt", weights_only=True)
            torch.testing.assert_close(got["loss"], expected_loss, rtol=1e-5, atol=1e-5)
            for name, param in model.named_parameters():
                torch.testing.assert_close(got["grads"][name], param.grad, rtol=1e-5, atol=1e-5)
        # the test can fail: without the gather each rank sees only its own negatives
        half = GLOBAL_BATCH // WORLD
        local = [step(make_model(), loss_name, x1[s:s + half], x2[s:s + half], labels[s:s + half], gather=False)
                 for s in range(0, GLOBAL_BATCH, half)]
        assert not torch.allclose(sum(local) / WORLD, expected_loss, rtol=1e-3)


def test_distributed_pretrain_writes_one_run(two_process_run):
    from medcl.weights import load_checkpoint

    run = two_process_run / "run"
    ckpt = load_checkpoint(run / "checkpoints" / "final.pt")
    assert ckpt["world_size"] == WORLD and len(ckpt["loader_per_rank"]) == WORLD and ckpt["step"] == 2
    assert ckpt["loader_per_rank"][0] != ckpt["loader_per_rank"][1]  # each rank has its own sampling stream
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
