"""TensorBoard: optional (medcl[tensorboard]); asked for without the package it warns once; when
present, pretraining and fine-tuning curves both go to it (a stand-in SummaryWriter records them)."""

from __future__ import annotations

import sys
import types
import warnings

import pytest

from medcl.train import scalars


class RecordingWriter:
    events: list[tuple[str, str, float, int]] = []

    def __init__(self, folder, purge_step=None):
        self.folder = folder

    def add_scalar(self, tag, value, step):
        RecordingWriter.events.append((str(self.folder), tag, value, step))

    def close(self):
        pass


@pytest.fixture()
def fake_tensorboard(monkeypatch):
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    RecordingWriter.events = []
    return RecordingWriter


def test_missing_tensorboard_warns_once(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setattr(scalars, "_WARNED", set())
    with pytest.warns(UserWarning, match=r'medcl\[tensorboard\]'):
        assert scalars.open_tensorboard(tmp_path / "a") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scalars.open_tensorboard(tmp_path / "b") is None  # no second warning
        assert scalars.write_curves(tmp_path / "c", [{"epoch": 0, "train_loss": 1.0}], "epoch", ()) is False


def test_finetuning_curves_go_to_tensorboard(fake_tensorboard, tmp_path):
    from medcl.evaluate.protocol import write_run

    curves = [{"repeat": 0, "fold": 1, "epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 2.0} for e in range(3)]
    write_run(tmp_path / "run", {}, {}, curves, [], "", tensorboard=("epoch", ("repeat", "fold")))
    tags = {(tag, step) for _, tag, _, step in fake_tensorboard.events}
    assert ("repeat0/fold1/train_loss", 2) in tags and ("repeat0/fold1/val_loss", 0) in tags
    assert all(folder.endswith("tb") for folder, *_ in fake_tensorboard.events)


def test_pretraining_losses_go_to_tensorboard(fake_tensorboard, tmp_path):
    from pathlib import Path

    from medcl.train.api import pretrain
    from uscl_fixtures import tiny_overrides, write_frame_sets

    frames = write_frame_sets(tmp_path / "frames", n_videos=12)
    preset = Path(__file__).resolve().parents[1] / "configs" / "uscl.yaml"
    pretrain(preset, tiny_overrides(frames, tmp_path / "run", **{"optim.max_steps": 2, "train.tensorboard": "true"}))
    steps = {step for _, tag, _, step in fake_tensorboard.events if tag == "loss"}
    assert steps == {1, 2}


def test_cli_finetune_tensorboard_flag(fake_tensorboard, tmp_path):
    from medcl.cli import main
    from tiny_frames import make_frame_sets

    data = make_frame_sets(tmp_path / "frames", n_patients=6, n_frames=2)
    assert main(["finetune", str(data), "--protocol", "linear", "--epochs", "2", "--image-size", "32", "--folds", "3",
                 "--repeats", "1", "--no-save-models", "--tensorboard", "--out", str(tmp_path / "ft")]) == 0
    tags = {tag for _, tag, _, _ in fake_tensorboard.events}
    assert {"repeat0/fold0/train_loss", "repeat0/fold2/val_loss"} <= tags
