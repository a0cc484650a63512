import json
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from uscl_fixtures import tiny_overrides, write_frame_sets

from medcl.config import load_config
from medcl.methods.base import build_method
from medcl.train.api import pretrain, seed_everything
from medcl.weights import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    backbone_state_dict,
    build_pretrained_backbone,
    load_checkpoint,
)
from medcl.train.trainer import Trainer, TrainerCallback, TrainingDiverged, TrainingInterrupted, lr_factor

PROJECT = Path(__file__).resolve().parents[1]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory) -> Path:
    return write_frame_sets(tmp_path_factory.mktemp("frames"), n_videos=12)


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 4, 20) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20) == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, min_ratio=0.1) == pytest.approx(0.1)
    values = [lr_factor(s, 4, 20) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_run_folder_and_checkpoint_format(frames_dir, tmp_path):
    run = pretrain(PROJECT / "configs/uscl.yaml", tiny_overrides(frames_dir, tmp_path / "run"))
    assert (run / "config.yaml").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {"step", "epoch", "lr", "loss", "loss_con", "loss_sup"} <= set(records[0])
    ckpt = load_checkpoint(run / "checkpoints" / "final.pt")
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["method"] == "uscl" and ckpt["step"] == 6
    assert ckpt["backbone"] == {"name": "resnet18", "kwargs": {"in_channels": 1}, "prefix": "backbone.",
                                "input": {"in_channels": 1, "scale": "x / 255", "mean": [0.0], "std": [1.0]}}
    assert ckpt["metadata"]["classes"] == ["covid", "pneumonia", "regular"]
    assert ckpt["config"]["uscl"]["temperature"] == 0.5
    backbone = build_pretrained_backbone(ckpt)
    state = backbone_state_dict(ckpt)
    assert not any(k.startswith("backbone.") for k in state)
    assert torch.equal(backbone.state_dict()["conv1.weight"], ckpt["model"]["backbone.conv1.weight"])
    # the resolved config reloads to the same run
    again = load_config(run / "config.yaml")
    assert again.to_dict() == load_config(PROJECT / "configs/uscl.yaml", tiny_overrides(frames_dir, tmp_path / "run")).to_dict()
    # an existing run is never overwritten silently
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(PROJECT / "configs/uscl.yaml", tiny_overrides(frames_dir, tmp_path / "run"))


def test_load_checkpoint_rejects_other_files(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_short_pretrain_lowers_the_loss(frames_dir, tmp_path):
    with pytest.warns(UserWarning, match="BatchNorm running statistics"):  # 20 steps: too few for BN
        run = pretrain(PROJECT / "configs/uscl.yaml", tiny_overrides(
            frames_dir, tmp_path / "run", **{"optim.max_steps": 20, "optim.lr": 1e-3, "optim.warmup_epochs": 0,
                                             "train.checkpoint_every": 100}))
    values = [loss for _, loss in losses(run)]
    first, last = sum(values[:4]) / 4, sum(values[-4:]) / 4
    assert last < first - 0.15, (first, last)  # seeds 0-2 drop by about 0.4


class _Interrupt(Exception):
    pass


def _trainer(overrides: list[str], out: Path, callbacks=()):
    """(config, Trainer) seeded as ``pretrain`` seeds them, for tests that reach into the loop."""
    cfg = load_config(PROJECT / "configs/uscl.yaml", overrides + [f"out={out}"])
    seed_everything(cfg.train.seed)
    method, loader = build_method(cfg)
    seed_everything(cfg.train.seed)
    return cfg, Trainer(method, loader, cfg, cfg.out, callbacks=callbacks)


class _OnStepStart(TrainerCallback):
    """Runs ``action(trainer)`` when update ``at`` is about to be computed."""

    def __init__(self, at: int, action) -> None:
        self.at, self.action = at, action

    def on_step_start(self, trainer, step):
        if step == self.at:
            self.action(trainer)


# 12 videos, batch 4: 3 steps per epoch. Checkpoints every 3 steps fall on epoch boundaries; every 2 steps,
# the one at step 4 falls inside an epoch, where the loader's random state sits between two of its batches.
@pytest.mark.parametrize("max_steps, every, saved", [(7, 3, 3), (8, 2, 4)])
def test_resume_continues_exactly(frames_dir, tmp_path, max_steps, every, saved):
    overrides = tiny_overrides(frames_dir, tmp_path / "x", **{"optim.max_steps": max_steps, "train.checkpoint_every": every})
    full = pretrain(PROJECT / "configs/uscl.yaml", overrides, out=tmp_path / "full")

    # The same run, killed while computing step 6: the last checkpoint is at step `saved`, metrics reach step 5.
    def die(trainer):
        raise _Interrupt

    cfg, trainer = _trainer(overrides, tmp_path / "killed", callbacks=[_OnStepStart(6, die)])
    with pytest.raises(_Interrupt):
        trainer.fit()
    assert [s for s, _ in losses(cfg.out)] == [1, 2, 3, 4, 5]
    assert load_checkpoint(cfg.out / "checkpoints" / "last.pt")["step"] == saved
    with (cfg.out / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 6, "lo')  # a line cut short by the kill

    resumed = pretrain(cfg, resume=True)
    assert [s for s, _ in losses(resumed)] == list(range(1, max_steps + 1))
    expected, got = losses(full), losses(resumed)
    for (s1, a), (s2, b) in zip(expected, got):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-6, abs=1e-7), (s1, a, b)
    final_a = load_checkpoint(full / "checkpoints" / "final.pt")["model"]
    final_b = load_checkpoint(resumed / "checkpoints" / "final.pt")["model"]
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_checkpoints_then_resumes_exactly(frames_dir, tmp_path, signum):
    """SIGTERM (a scheduler's warning) or Ctrl-C during step 3: the step finishes, last.pt is
    written at step 3 (checkpoint_every would have waited until 6), and --resume reproduces the
    uninterrupted run."""
    overrides = tiny_overrides(frames_dir, tmp_path / "x", **{"optim.max_steps": 7, "train.checkpoint_every": 6})
    full = pretrain(PROJECT / "configs/uscl.yaml", overrides, out=tmp_path / "full")

    def send_signal(trainer):
        os.kill(os.getpid(), signum)

    cfg, trainer = _trainer(overrides, tmp_path / "stopped", callbacks=[_OnStepStart(3, send_signal)])  # computing step 3
    before = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted, match=f"{signal.Signals(signum).name} received: checkpoint at step 3"):
        trainer.fit()
    assert signal.getsignal(signum) is before  # handlers restored
    assert [s for s, _ in losses(cfg.out)] == [1, 2, 3]
    assert load_checkpoint(cfg.out / "checkpoints" / "last.pt")["step"] == 3
    assert not (cfg.out / "checkpoints" / "final.pt").exists()

    resumed = pretrain(cfg, resume=True)
    expected, got = losses(full), losses(resumed)
    assert [s for s, _ in got] == list(range(1, 8))
    for (s1, a), (s2, b) in zip(expected, got):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-6, abs=1e-7), (s1, a, b)


class _Recorder(TrainerCallback):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_step_start(self, trainer, step):
        self.events.append(("start", step, trainer.step))

    def on_step_end(self, trainer, step, values):
        self.events.append(("end", step, trainer.step, values))


def test_step_hooks_see_every_step_and_change_nothing(frames_dir, tmp_path):
    """on_step_start / on_step_end run once per update, in order, with the values that are logged;
    a run with hooks logs exactly the losses of the same run without them."""
    overrides = tiny_overrides(frames_dir, tmp_path / "x", **{"optim.max_steps": 5, "train.checkpoint_every": 2})
    plain = pretrain(PROJECT / "configs/uscl.yaml", overrides, out=tmp_path / "plain")

    first, second = _Recorder(), _Recorder()
    cfg, trainer = _trainer(overrides, tmp_path / "hooked", callbacks=[first, second])
    trainer.fit()
    records = [json.loads(line) for line in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    expected = []
    for r in records:  # log_every=1: one record per step
        values = {k: v for k, v in r.items() if k not in ("step", "epoch", "lr", "steps_per_s")}
        expected += [("start", r["step"], r["step"] - 1), ("end", r["step"], r["step"], values)]
    assert [e[1] for e in expected] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert first.events == expected and second.events == expected
    assert set(expected[1][3]) == {"loss", "loss_con", "loss_sup", "labeled_fraction"}
    assert losses(cfg.out) == losses(plain)
    for name in ("final.pt", "last.pt"):
        a = load_checkpoint(plain / "checkpoints" / name)["model"]
        b = load_checkpoint(cfg.out / "checkpoints" / name)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_exit_status_on_a_stop_signal(frames_dir, tmp_path, monkeypatch, capsys):
    from medcl.cli import main
    from medcl.train import api

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted(signal.SIGTERM, 4, tmp_path / "checkpoints" / "last.pt")

    monkeypatch.setattr(api, "pretrain", interrupted)
    code = main(["pretrain", "--config", str(PROJECT / "configs/uscl.yaml"), *tiny_overrides(frames_dir, tmp_path / "run")])
    assert code == 128 + signal.SIGTERM
    assert "SIGTERM received: checkpoint at step 4" in capsys.readouterr().err


def test_resume_refuses_a_changed_config(frames_dir, tmp_path):
    overrides = tiny_overrides(frames_dir, tmp_path / "run", **{"optim.max_steps": 2})
    pretrain(PROJECT / "configs/uscl.yaml", overrides)
    with pytest.raises(ValueError, match="uscl.temperature"):
        pretrain(PROJECT / "configs/uscl.yaml", overrides + ["uscl.temperature=0.1"], resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        pretrain(PROJECT / "configs/uscl.yaml", overrides, out=tmp_path / "empty", resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(frames_dir, tmp_path):
    cfg = load_config(PROJECT / "configs/uscl.yaml", tiny_overrides(frames_dir, tmp_path / "run"))
    seed_everything(0)
    method, loader = build_method(cfg)
    original = method.training_step
    calls = {"n": 0}

    def poisoned(batch):
        calls["n"] += 1
        out = original(batch)
        if calls["n"] == 4:
            out["loss"] = out["loss"] * math.nan
        return out

    method.training_step = poisoned
    trainer = Trainer(method, loader, cfg, cfg.out)
    with pytest.raises(TrainingDiverged, match=r"step 4.*last\.pt \(step 2\)"):
        trainer.fit()
    assert load_checkpoint(cfg.out / "checkpoints" / "last.pt")["step"] == 2
    assert not (cfg.out / "checkpoints" / "final.pt").exists()


@pytest.mark.parametrize("preset", ["simclr", "supervised"])
def test_other_methods_train(frames_dir, tmp_path, preset):
    run = pretrain(PROJECT / f"configs/{preset}.yaml", tiny_overrides(frames_dir, tmp_path / preset, **{"optim.max_steps": 2}))
    ckpt = load_checkpoint(run / "checkpoints" / "final.pt")
    assert ckpt["method"] == preset and ckpt["step"] == 2
    assert all(math.isfinite(loss) for _, loss in losses(run))


def test_cli_pretrain_and_resume(frames_dir, tmp_path, capsys):
    from medcl.cli import main

    args = ["pretrain", "--config", str(PROJECT / "configs/uscl.yaml"), *tiny_overrides(frames_dir, tmp_path / "run")]
    args = [a for a in args if not a.startswith("optim.max_steps")] + ["optim.max_steps=2"]
    assert main(args) == 0
    assert main(args) == 2  # existing run without --resume
    assert "--resume" in capsys.readouterr().err
    assert main([a if a != "optim.max_steps=2" else "optim.max_steps=4" for a in args] + ["--resume"]) == 0
    assert [s for s, _ in losses(tmp_path / "run")] == [1, 2, 3, 4]
    assert main(["pretrain", "--config", str(PROJECT / "configs/uscl.yaml"), "out=x", "uscl.tau=1"]) == 2
    err = capsys.readouterr().err
    assert "uscl.tau=1: unknown key" in err and "data.manifest" in err


def test_trainer_with_a_minimal_method_adamw_and_schedule(frames_dir, tmp_path):
    """The trainer works with any Method that follows the base-class contract (MixCL relies on it)."""
    from medcl.methods.base import Method
    from medcl.sampling.loader import IndexBatchLoader

    class Linear(Method):
        name = "linear"

        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Linear(4, 2)
            self.backbone_spec = {"name": "linear", "kwargs": {}}

        def training_step(self, batch):
            loss = (self.backbone(batch["x"]) - 1).pow(2).mean()
            return {"loss": loss, "norm": self.backbone.weight.norm().detach()}

    def make_batch(items, rng):
        return {"x": torch.from_numpy(rng.normal(size=(len(items), 4))).float()}

    cfg = load_config(PROJECT / "configs/uscl.yaml", tiny_overrides(frames_dir, tmp_path / "run", **{
        "optim.name": "adamw", "optim.max_steps": 10, "optim.warmup_epochs": 1, "optim.min_lr_ratio": 0.1,
        "optim.lr": 0.01, "train.log_every": 2, "train.checkpoint_every": 4}))
    loader = IndexBatchLoader(12, 4, make_batch, seed=0)
    torch.manual_seed(0)
    trainer = Trainer(Linear(), loader, cfg, cfg.out)
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.warmup_steps == 3
    trainer.fit()
    records = [json.loads(line) for line in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
    for r in records:  # the logged lr is the one the update used
        assert r["lr"] == pytest.approx(0.01 * lr_factor(r["step"] - 1, 3, 10, 0.1))
    assert "norm" in records[0] and all(math.isfinite(r["loss"]) for r in records)
    assert load_checkpoint(cfg.out / "checkpoints" / "last.pt")["step"] == 10


def test_batchnorm_warning_only_for_short_runs_of_batchnorm_models():
    from medcl.models.backbones import resnet18_backbone
    from medcl.train.trainer import BATCHNORM_SETTLE_STEPS, warn_if_batchnorm_unsettled

    with pytest.warns(UserWarning, match="BatchNorm"):
        assert warn_if_batchnorm_unsettled(resnet18_backbone(), BATCHNORM_SETTLE_STEPS - 1)
    assert not warn_if_batchnorm_unsettled(resnet18_backbone(), BATCHNORM_SETTLE_STEPS)
    assert not warn_if_batchnorm_unsettled(torch.nn.Linear(2, 2), 1)


# --------------------------------------------------------------------------- reliability: divergence, run folder


def _poison_update(method, at: int):
    """Make update ``at`` write NaN into backbone.conv1.weight while its loss stays finite
    (0 * sqrt(0) is 0, its gradient 0 / 0 is NaN): what an exploding step does."""
    original = method.training_step
    calls = {"n": 0}

    def poisoned(batch):
        calls["n"] += 1
        out = original(batch)
        if calls["n"] == at:
            s = method.backbone.conv1.weight.sum()
            out["loss"] = out["loss"] + 0.0 * torch.sqrt(s - s)
        return out

    method.training_step = poisoned


def test_non_finite_weights_after_an_update_stop_the_run_and_are_never_saved(frames_dir, tmp_path):
    """The loss of update 4 is finite but the update makes the weights NaN: training stops at once,
    last.pt stays the finite state of step 2 and the message names it (not a NaN checkpoint)."""
    cfg = load_config(PROJECT / "configs/uscl.yaml", tiny_overrides(frames_dir, tmp_path / "run"))
    seed_everything(0)
    method, loader = build_method(cfg)
    _poison_update(method, at=4)
    trainer = Trainer(method, loader, cfg, cfg.out)
    with pytest.raises(TrainingDiverged, match=r"non-finite in the update of step 4.*'backbone\.conv1\.weight' holds "
                                               r"\d+ NaN.*last\.pt \(step 2\), finite") as info:
        trainer.fit()
    assert "\n" not in str(info.value)
    last = load_checkpoint(cfg.out / "checkpoints" / "last.pt")  # load_checkpoint refuses NaN weights
    assert last["step"] == 2
    assert not (cfg.out / "checkpoints" / "final.pt").exists()
    assert [s for s, _ in losses(cfg.out)] == [1, 2, 3]  # the diverged update is not logged
    assert list((cfg.out / "checkpoints").iterdir()) == [cfg.out / "checkpoints" / "last.pt"]


def test_divergence_before_any_checkpoint_says_there_is_none(frames_dir, tmp_path):
    cfg = load_config(PROJECT / "configs/uscl.yaml", tiny_overrides(frames_dir, tmp_path / "run"))
    seed_everything(0)
    method, loader = build_method(cfg)
    _poison_update(method, at=1)
    with pytest.raises(TrainingDiverged, match="step 1 .*No checkpoint was written before"):
        Trainer(method, loader, cfg, cfg.out).fit()
    assert not (cfg.out / "checkpoints").exists()


def test_an_overflowing_learning_rate_ends_with_the_divergence_message(frames_dir, tmp_path, capsys):
    """lr=1e38: the first update is beyond float range (the fused Adam of make_optimizer writes Inf weights;
    PyTorch's per-tensor Adam raised on its step size lr / (1 - 0.9)); that is divergence, not a traceback."""
    from medcl.cli import main

    overrides = tiny_overrides(frames_dir, tmp_path / "run", **{"optim.lr": 1e38, "optim.warmup_epochs": 0})
    with pytest.raises(TrainingDiverged, match=r"weights became non-finite in the update of step 1 .*Inf.*No checkpoint"):
        pretrain(PROJECT / "configs/uscl.yaml", overrides)
    code = main(["pretrain", "--config", str(PROJECT / "configs/uscl.yaml"), *tiny_overrides(
        frames_dir, tmp_path / "cli", **{"optim.lr": 1e38, "optim.warmup_epochs": 0})])
    err = capsys.readouterr().err
    assert code == 3 and "Traceback" not in err
    assert err.startswith("medcl pretrain: stopped: the weights became non-finite in the update of step 1") and err.count("\n") == 1


def test_a_stalled_loss_with_an_exploding_weight_norm_warns(frames_dir, tmp_path):
    """lr=1e6 on SimCLR: the loss sits at log(2N - 1) while the weights grow to ~1e25; the run
    would otherwise end 'successfully'. The warning states the window and both thresholds."""
    from medcl.train.trainer import NORM_GROWTH, STALL_STEPS, DivergenceWarning

    overrides = tiny_overrides(frames_dir, tmp_path / "run", **{
        "optim.lr": 1e6, "optim.max_steps": 2 * STALL_STEPS + 2, "train.checkpoint_every": 100})
    with pytest.warns(DivergenceWarning) as record:
        pretrain(PROJECT / "configs/simclr.yaml", overrides)
    messages = [str(w.message) for w in record if issubclass(w.category, DivergenceWarning)]
    assert len(messages) == 1, messages  # once per run
    assert re.search(rf"step {2 * STALL_STEPS}: the loss stopped improving \(median \S+ over steps "
                     rf"{STALL_STEPS + 1}-{2 * STALL_STEPS}, \S+ over the {STALL_STEPS} steps before: less than 1% "
                     rf"lower\) while the weight norm grew from \S+ to \S+ \(more than {NORM_GROWTH:g} times\)",
                     messages[0]), messages[0]


def test_divergence_watch_needs_both_a_stalled_loss_and_an_exploded_norm():
    from medcl.train.trainer import DivergenceWatch

    def run(losses_, norms):
        watch = DivergenceWatch(initial_norm=10.0, steps=3)
        return [watch.update(i + 1, loss, norm) for i, (loss, norm) in enumerate(zip(losses_, norms))]

    flat, falling = [2.0] * 8, [2.0 - 0.1 * i for i in range(8)]
    assert not any(run(flat, [20.0] * 8))  # flat loss, weights grow 2x: a plateau, not divergence
    assert not any(run(falling, [1e6] * 8))  # huge weights but learning
    warned = run(flat, [1e6] * 8)
    assert warned[:5] == [None] * 5 and warned[5] and not any(warned[6:])  # after 2 x 3 steps, once


def test_checkpoint_writer_refuses_non_finite_weights(tmp_path):
    from medcl.weights import save_checkpoint

    with pytest.raises(CheckpointError, match=r"last\.pt: non-finite weights: tensor 'b' holds 1 NaN and 1 Inf of 3"):
        save_checkpoint(tmp_path / "last.pt", {"model": {"a": torch.ones(2), "b": torch.tensor([1.0, math.nan, math.inf])}})
    assert list(tmp_path.iterdir()) == []


def test_readers_refuse_a_checkpoint_with_non_finite_weights(frames_dir, tmp_path):
    """A NaN checkpoint written by an older medcl is refused by every reader (export, --init)."""
    from medcl.report.model_card import export_backbone
    from medcl.weights import load_init

    run = pretrain(PROJECT / "configs/uscl.yaml", tiny_overrides(frames_dir, tmp_path / "run", **{"optim.max_steps": 2}))
    final = run / "checkpoints" / "final.pt"
    ckpt = torch.load(final, weights_only=True)
    ckpt["model"]["backbone.layer2.0.conv1.weight"][0, 0, 0, 0] = math.nan
    torch.save(ckpt, final)
    message = rf"{re.escape(str(final))}: non-finite weights: tensor 'backbone\.layer2\.0\.conv1\.weight' holds 1 NaN"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(final)
    with pytest.raises(CheckpointError, match=message):
        load_init(f"x={final}")
    with pytest.raises(CheckpointError, match=message):
        export_backbone(final, tmp_path / "export")
    assert not (tmp_path / "export" / "backbone.safetensors").exists()
    from medcl.weights import build_checked

    state = backbone_state_dict(torch.load(final, weights_only=True))
    with pytest.raises(CheckpointError, match=r"memory: non-finite weights: tensor 'layer2\.0\.conv1\.weight'"):
        build_checked("resnet18", {"in_channels": 1}, state, "memory")


def test_a_second_process_on_the_run_folder_is_refused_before_writing(frames_dir, tmp_path):
    from medcl.runfolder import RunFolderError, run_lock

    out = tmp_path / "run"
    with run_lock(out, "medcl pretrain"):
        with pytest.raises(RunFolderError, match=rf"in use by pid {os.getpid()} .*medcl pretrain"):
            pretrain(PROJECT / "configs/uscl.yaml", tiny_overrides(frames_dir, out))
        assert sorted(p.name for p in out.iterdir()) == [".medcl.lock"]  # nothing written


def test_stale_temporary_checkpoints_are_removed_when_a_run_resumes(frames_dir, tmp_path):
    """A kill -9 during torch.save leaves .last.pt.PID.tmp (up to a checkpoint's size); the next
    run of the folder, holding its lock, deletes every such file."""
    from medcl.weights import remove_stale_temporaries

    overrides = tiny_overrides(frames_dir, tmp_path / "run", **{"optim.max_steps": 2})
    run = pretrain(PROJECT / "configs/uscl.yaml", overrides)
    ckpts = run / "checkpoints"
    dead = ckpts / ".last.pt.999999999.tmp"  # beyond pid_max: never alive
    alive = ckpts / f".last.pt.{os.getpid()}.tmp"
    other = ckpts / "notes.tmp"
    for path in (dead, alive, other):
        path.write_bytes(b"partial")
    assert remove_stale_temporaries(ckpts) == [dead]  # without the lock: only dead writers' files
    dead.write_bytes(b"partial")
    longer = [o for o in overrides if not o.startswith("optim.max_steps=")] + ["optim.max_steps=3"]
    pretrain(PROJECT / "configs/uscl.yaml", longer, resume=True)
    assert not dead.exists() and not alive.exists() and other.exists()
    assert load_checkpoint(ckpts / "last.pt")["step"] == 3


def test_snapshots_keep_the_model_of_their_step(frames_dir, tmp_path):
    """train.snapshot_every keeps checkpoints/step-NNNNNN.pt at its multiples (the end is final.pt),
    each holding the model of that step: the same weights as last.pt of a run stopped there."""
    overrides = tiny_overrides(frames_dir, tmp_path / "x", **{"optim.max_steps": 7, "train.snapshot_every": 3})
    run = pretrain(PROJECT / "configs/uscl.yaml", overrides, out=tmp_path / "snap")
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*.pt"))
    assert kept == ["step-000003.pt", "step-000006.pt"]

    def stop(trainer):
        raise _Interrupt

    plain = tiny_overrides(frames_dir, tmp_path / "x", **{"optim.max_steps": 7, "train.checkpoint_every": 3})
    cfg, trainer = _trainer(plain, tmp_path / "stopped", callbacks=[_OnStepStart(4, stop)])
    with pytest.raises(_Interrupt):
        trainer.fit()
    at3 = load_checkpoint(cfg.out / "checkpoints" / "last.pt")
    snap = load_checkpoint(run / "checkpoints" / "step-000003.pt")
    assert snap["step"] == at3["step"] == 3
    for key, value in at3["model"].items():
        torch.testing.assert_close(snap["model"][key], value, rtol=1e-5, atol=1e-6)
    # a snapshot is a backbone init like any checkpoint
    path = run / "checkpoints" / "step-000006.pt"
    backbone = build_pretrained_backbone(load_checkpoint(path), path)
    assert sum(p.numel() for p in backbone.parameters()) > 0
