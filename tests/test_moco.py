"""MoCo v2: the queue loss against a naive loop, the momentum update, the queue pointer, exact
resume (queue, pointer and key encoder in checkpoints), export, and two gloo processes = one."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from resume_helpers import assert_same_final_state, killed_run, logged
from uscl_fixtures import tiny_overrides, write_frame_sets

from medcl.config import ConfigError, load_config
from medcl.losses.queue_infonce import QueueInfoNCELoss
from medcl.methods.moco import MoCo, check_queue_size
from medcl.train.api import pretrain
from medcl.weights import load_checkpoint

PROJECT = Path(__file__).resolve().parents[1]
PRESET = PROJECT / "configs/moco.yaml"


def naive_queue_infonce(q, k, queue, temperature):
    """Per query, in plain Python floats: -log exp(q.k/t) / (exp(q.k/t) + sum_j exp(q.n_j/t))."""
    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    negatives = [unit(n) for n in queue.tolist()]
    total = 0.0
    for qi, ki in zip(q.tolist(), k.tolist()):
        qi, ki = unit(qi), unit(ki)
        positive = math.exp(dot(qi, ki) / temperature)
        total += -math.log(positive / (positive + sum(math.exp(dot(qi, n) / temperature) for n in negatives)))
    return total / len(q)


def small_moco(**kwargs) -> MoCo:
    torch.manual_seed(0)
    return MoCo(**{"queue_size": 8, "proj_hidden": 16, "proj_dim": 8, **kwargs})


def views(n=4, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"view1": torch.rand(n, 1, size, size, generator=g), "view2": torch.rand(n, 1, size, size, generator=g)}


@pytest.mark.parametrize("temperature", [0.2, 0.07])
def test_queue_infonce_equals_a_naive_loop(temperature):
    g = torch.Generator().manual_seed(0)
    q, k, queue = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(11, 6, generator=g)
    got = QueueInfoNCELoss(temperature)(q, k, queue)
    assert got.item() == pytest.approx(naive_queue_infonce(q, k, queue, temperature), rel=1e-5)
    with pytest.raises(ValueError, match="queue"):
        QueueInfoNCELoss()(q, k, torch.randn(11, 5))


def test_momentum_update_is_the_ema_formula():
    method = small_moco(momentum=0.9)
    with torch.no_grad():  # make the query encoder differ from its copy
        for p in list(method.backbone.parameters()) + list(method.projection.parameters()):
            p.add_(torch.randn_like(p))
    query = [p.detach().clone() for p in list(method.backbone.parameters()) + list(method.projection.parameters())]
    key = [p.detach().clone() for p in list(method.key_backbone.parameters()) + list(method.key_projection.parameters())]
    method.momentum_update()
    after = list(method.key_backbone.parameters()) + list(method.key_projection.parameters())
    assert len(after) == len(query) > 10
    for p_k, k0, q0 in zip(after, key, query):
        torch.testing.assert_close(p_k.detach(), 0.9 * k0 + 0.1 * q0)
    assert not any(p.requires_grad for p in after)


def test_enqueue_writes_blocks_and_the_pointer_wraps():
    method = small_moco()
    blocks = [F.normalize(torch.randn(4, 8), dim=1) for _ in range(3)]
    method.enqueue(blocks[0])
    assert int(method.queue_ptr) == 4 and torch.allclose(method.queue[:4], blocks[0])
    method.enqueue(blocks[1])
    assert int(method.queue_ptr) == 0 and torch.allclose(method.queue[4:], blocks[1])
    method.enqueue(blocks[2])  # the oldest block is replaced, the newer one kept
    assert int(method.queue_ptr) == 4
    assert torch.allclose(method.queue[:4], blocks[2]) and torch.allclose(method.queue[4:], blocks[1])
    with pytest.raises(ValueError, match="multiple"):
        method.enqueue(torch.randn(3, 8))


def test_training_step_uses_the_updated_key_encoder_and_the_queue_before_enqueueing():
    method = small_moco(momentum=0.5)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.mul_(1.1)
    reference = copy.deepcopy(method)
    batch = views()
    queue_before = method.queue.clone()
    out = method.training_step(batch)

    reference.momentum_update()
    q = reference.projection(reference.backbone(batch["view1"]))
    k = reference.key_projection(reference.key_backbone(batch["view2"]))
    expected = naive_queue_infonce(q.detach(), k.detach(), queue_before, 0.2)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
    torch.testing.assert_close(method.queue[:4], F.normalize(k.detach(), dim=1))
    assert torch.equal(method.queue[4:], queue_before[4:]) and int(method.queue_ptr) == 4
    out["loss"].backward()
    assert method.backbone.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.key_backbone.parameters())


def test_queue_size_must_fit_the_batch_and_the_epoch():
    check_queue_size(64, 32, 64)
    with pytest.raises(ValueError, match=r"multiple of the global optim.batch_size=32.*moco.queue_size=32"):
        check_queue_size(48, 32, 640)
    with pytest.raises(ValueError, match=r"exceeds the 640 frames.*moco.queue_size=640"):
        check_queue_size(65536, 32, 640, "frames")
    with pytest.raises(ConfigError, match="moco.momentum"):
        load_config(PRESET, ["moco.momentum=1.0"])


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory) -> Path:
    return write_frame_sets(tmp_path_factory.mktemp("frames"), n_videos=12)


def moco_overrides(frames_dir: Path, out: Path, **extra) -> list[str]:
    return tiny_overrides(frames_dir, out, **{"moco.queue_size": 8, **extra})


def test_the_preset_refuses_a_queue_larger_than_the_data(frames_dir, tmp_path):
    with pytest.raises(ValueError, match=r"moco.queue_size=65536 exceeds the 40 frames"):
        pretrain(PRESET, tiny_overrides(frames_dir, tmp_path / "run"))


def test_resume_reproduces_queue_pointer_and_key_encoder(frames_dir, tmp_path):
    # 40 frames / batch 4: 10 steps an epoch; queue 8: the pointer wraps every 2 steps
    overrides = moco_overrides(frames_dir, tmp_path / "x", **{"optim.max_steps": 7, "train.checkpoint_every": 3})
    full = pretrain(PRESET, overrides, out=tmp_path / "full")
    cfg = killed_run(PRESET, overrides, tmp_path / "killed", step=6)
    saved = load_checkpoint(cfg.out / "checkpoints" / "last.pt")
    assert saved["step"] == 3 and int(saved["model"]["queue_ptr"]) == 4  # 3 blocks of 4 in a queue of 8

    resumed = pretrain(cfg, resume=True)
    losses = [[r["loss"] for r in logged(run)] for run in (full, resumed)]
    assert len(losses[1]) == 7 and losses[1] == pytest.approx(losses[0], rel=1e-6, abs=1e-7)
    final = assert_same_final_state(full, resumed)
    assert {"queue", "queue_ptr", "key_backbone.conv1.weight", "key_projection.0.weight"} <= set(final)
    assert not torch.equal(final["key_backbone.conv1.weight"], saved["model"]["key_backbone.conv1.weight"])


def test_export_takes_the_query_backbone(frames_dir, tmp_path, capsys):
    from medcl.cli import main
    from medcl.weights import load_backbone

    run = pretrain(PRESET, moco_overrides(frames_dir, tmp_path / "run", **{"optim.max_steps": 2}))
    assert main(["export", str(run), "-o", str(tmp_path / "export"), "--layout", "monai"]) == 0
    backbone = load_backbone(tmp_path / "export")
    state = load_checkpoint(run / "checkpoints" / "final.pt")["model"]
    torch.testing.assert_close(backbone.state_dict()["conv1.weight"], state["backbone.conv1.weight"])
    # after training the key encoder lags the query encoder: the export must not be the key's
    assert not torch.equal(state["backbone.conv1.weight"], state["key_backbone.conv1.weight"])


# ------------------------------------------------------------------ two gloo processes
WORLD, GLOBAL_BATCH, STEPS = 2, 4, 3


def ddp_batches():
    return [views(GLOBAL_BATCH, seed=10 + s) for s in range(STEPS)]


def run_steps(model, method, batches, shard=slice(None)):
    """STEPS optimiser steps; BatchNorm in eval mode so that a sample's features do not depend on
    which process its batch-mates are on (training-mode BN is per-process by design)."""
    method.eval()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    losses = []
    for batch in batches:
        out = model({k: v[shard] for k, v in batch.items()})
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].detach())
    return torch.stack(losses)


def ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        method = small_moco()
        model = torch.nn.parallel.DistributedDataParallel(method)
        half = GLOBAL_BATCH // WORLD
        losses = run_steps(model, method, ddp_batches(), slice(rank * half, (rank + 1) * half))
        dist.all_reduce(losses)
        torch.save({"loss": losses / WORLD, "queue": method.queue, "ptr": method.queue_ptr,
                    "key": method.key_backbone.conv1.weight.detach()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_gather_keys_into_the_single_process_queue(tmp_path):
    mp.spawn(ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    method = small_moco()
    expected_loss = run_steps(method, method, ddp_batches())
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["queue"], method.queue, rtol=1e-4, atol=1e-5)
        assert int(got["ptr"]) == int(method.queue_ptr) == (STEPS * GLOBAL_BATCH) % 8
        torch.testing.assert_close(got["loss"], expected_loss, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["key"], method.key_backbone.conv1.weight.detach(), rtol=1e-4, atol=1e-6)
