"""Fault injection on pretraining: real processes, killed with SIGKILL at random moments, and two
processes on one run folder. A tiny convolutional backbone (registered by the driver below) keeps a
checkpoint per step cheap; the trainer, the USCL method, its sampler and the checkpoint files are
the real ones."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from uscl_fixtures import tiny_overrides, write_frame_sets

from medcl.weights import load_checkpoint

PROJECT = Path(__file__).resolve().parents[1]
MAX_STEPS = 12

# `python driver.py ARGS...` = `medcl ARGS...` with the tiny backbone registered; with
# MEDCL_TEST_GATE=FILE it calls medcl.train.api.pretrain instead and waits before step 2 until FILE exists.
DRIVER = '''
import os, sys, time
import torch
from torch import nn
torch.set_num_threads(1)
from medcl.models.backbones import register_backbone


class TinyConvNet(nn.Module):
    def __init__(self, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


register_backbone("tiny_faults", TinyConvNet)
gate = os.environ.get("MEDCL_TEST_GATE")
if not gate:
    from medcl.cli import main
    sys.exit(main(sys.argv[1:]))

from medcl.train.api import pretrain
from medcl.train.trainer import TrainerCallback


class Gate(TrainerCallback):
    def on_step_start(self, trainer, step):
        deadline = time.monotonic() + 120
        while step == 2 and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.02)


args = sys.argv[1:]
pretrain(args[2], args[3:], callbacks=[Gate()])
'''


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("faults")
    (root / "driver.py").write_text(DRIVER)
    return root / "driver.py", write_frame_sets(root / "data", n_videos=12)


def _command(driver: Path, data: Path, out: Path, *extra: str, **overrides: object) -> list[str]:
    values = {"model.backbone": "tiny_faults", "optim.max_steps": MAX_STEPS, "train.checkpoint_every": 1,
              "train.tensorboard": False, **overrides}
    return [sys.executable, str(driver), "pretrain", "--config", str(PROJECT / "configs/uscl.yaml"),
            *tiny_overrides(data, out, **values), *extra]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", **extra}


def _metrics(out: Path) -> list[dict]:
    """metrics.jsonl without the timing column."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in records]


def _logged_lines(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


def _kill_at(command: list[str], out: Path, lines: int, delay: float) -> int:
    """Start ``command``; SIGKILL it ``delay`` seconds after metrics.jsonl reaches ``lines`` lines."""
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _logged_lines(out) < lines and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"finished before the kill (rc {process.returncode}): {err.decode()}"
    return _logged_lines(out)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_the_uninterrupted_run(driver, tmp_path):
    """For several seeds: SIGKILL a USCL run (checkpoint every step) at a random step and a random
    moment within it (during the update, the log line or the checkpoint write), then --resume: the
    final weights and every logged loss equal those of the run that was never interrupted, and no
    temporary checkpoint file is left behind."""
    script, data = driver
    reference = subprocess.Popen(_command(script, data, tmp_path / "reference"), env=_env(), stderr=subprocess.PIPE)
    for seed in range(3):
        rng = random.Random(seed)
        out = tmp_path / f"killed-{seed}"
        # from 2 lines on, last.pt exists (step 1 is checkpointed before step 2 is logged)
        logged = _kill_at(_command(script, data, out), out, lines=rng.randint(2, MAX_STEPS - 5), delay=rng.uniform(0, 0.03))
        assert logged < MAX_STEPS and not (out / "checkpoints" / "final.pt").exists()
        resumed = subprocess.run(_command(script, data, out, "--resume"), env=_env(), capture_output=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr.decode()
        if seed == 0:
            assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()
        assert _metrics(out) == _metrics(tmp_path / "reference"), f"seed {seed}: killed after {logged} lines"
        expected = load_checkpoint(tmp_path / "reference" / "checkpoints" / "final.pt")
        got = load_checkpoint(out / "checkpoints" / "final.pt")
        assert got["step"] == MAX_STEPS and set(got["model"]) == set(expected["model"])
        for key, value in expected["model"].items():
            assert torch.equal(got["model"][key], value), (seed, key)
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["final.pt", "last.pt"]


@pytest.mark.slow
def test_a_second_pretraining_process_on_the_same_folder_is_refused(driver, tmp_path):
    """Process A runs (held before its step 2); process B, the same command, exits 2 at once naming
    A's pid and leaves A's files untouched; A then finishes normally."""
    script, data = driver
    out, gate = tmp_path / "run", tmp_path / "gate"
    first = subprocess.Popen(_command(script, data, out, **{"train.checkpoint_every": 100}),
                             env=_env(MEDCL_TEST_GATE=str(gate)), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _logged_lines(out) < 1 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, first.stderr.read().decode()
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        second = subprocess.run(_command(script, data, out), env=_env(), capture_output=True, timeout=300)
        assert second.returncode == 2
        assert second.stderr.decode() == (f"medcl pretrain: error: {out}: in use by pid {first.pid} on {os.uname().nodename} "
                                          f"(medcl pretrain: {' '.join(_command(script, data, out)[2:])[:200]}); "
                                          "wait for it to finish or choose another output folder\n")
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    finally:
        gate.touch()
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    assert [r["step"] for r in _metrics(out)] == list(range(1, MAX_STEPS + 1))
    assert load_checkpoint(out / "checkpoints" / "final.pt")["step"] == MAX_STEPS
    assert (out / "config.yaml").read_bytes() == before["config.yaml"]
    assert not (out / ".medcl.lock").exists()
