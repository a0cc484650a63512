"""Fault probes of fine-tuning and evaluation: every bad input is named with its problem (one line,
exit 2), no finished result is overwritten silently, no second process shares a run folder."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medcl.cli import main
from medcl.data.manifest import read_manifest, write_manifest
from tiny_frames import make_frame_sets

FAST = ["--protocol", "linear", "--epochs", "1", "--image-size", "32", "--folds", "3", "--repeats", "1"]


@pytest.fixture()
def frames(tmp_path) -> Path:
    return make_frame_sets(tmp_path / "frames", n_patients=6, n_frames=2)


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medcl {command}: ") and len(err.splitlines()) == 1, err
    return err


def test_finetune_refuses_to_overwrite_results(frames, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", str(frames), *FAST, "--out", str(out)]) == 0
    before = (out / "results.json").read_bytes()
    assert main(["finetune", str(frames), *FAST, "--seed", "5", "--out", str(out)]) == 2
    err = _one_line_error(capsys, "finetune")
    assert "results.json" in err and "--overwrite" in err
    assert (out / "results.json").read_bytes() == before  # the finished result is intact
    assert main(["finetune", str(frames), *FAST, "--seed", "5", "--out", str(out), "--overwrite"]) == 0
    assert (out / "results.json").read_bytes() != before
    assert not (out / ".medcl.lock").exists()


def test_a_second_process_on_the_same_run_folder_is_refused(frames, tmp_path, capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom medcl.runfolder import run_lock\n"
        f"with run_lock({str(out)!r}, 'medcl finetune'):\n    print('locked', flush=True)\n    time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["finetune", str(frames), *FAST, "--out", str(out)]) == 2
        err = _one_line_error(capsys, "finetune")
        assert f"pid {holder.pid}" in err and "in use" in err
        holder.send_signal(signal.SIGKILL)  # the kernel releases the lock of a killed holder
        holder.wait(timeout=10)
        assert main(["finetune", str(frames), *FAST, "--out", str(out)]) == 0
    finally:
        if holder.poll() is None:
            holder.kill()


def test_classes_must_exist_in_the_data(frames, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["finetune", str(frames), *FAST, "--classes", "covid,pneumonia,regular,bogus", "--out", str(out)]) == 2
    err = _one_line_error(capsys, "finetune")
    assert "['bogus']" in err and "covid, pneumonia, regular" in err
    assert main(["finetune", str(frames), *FAST, "--classes", "covid,bogus", "--out", str(out)]) == 2
    assert "['bogus']" in _one_line_error(capsys, "finetune")
    assert not (out / "results.json").exists()


def test_a_bad_second_init_fails_before_the_first_cross_validation(frames, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    started = time.perf_counter()
    assert main(["finetune", str(frames), *FAST, "--init", "scratch", "--init", f"x={bad}", "--out", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys, "finetune")
    assert "bad.pt" in err and "not a readable checkpoint" in err
    assert not (tmp_path / "o").exists() and time.perf_counter() - started < 30


def test_manifest_frames_outside_the_folder_are_refused(frames, tmp_path, capsys):
    records = read_manifest(frames)
    outside = tmp_path / "elsewhere.npy"
    np.save(outside, np.zeros((2, 32, 32), np.uint8))
    for i, frames_file in enumerate([str(outside), "../elsewhere.npy"]):
        edited = [r for r in records]
        edited[0] = type(edited[0])(**{**edited[0].__dict__, "frames_file": frames_file})
        write_manifest(frames / "manifest.csv", edited)
        assert main(["finetune", str(frames), *FAST, "--out", str(tmp_path / f"o{i}")]) == 2
        err = _one_line_error(capsys, "finetune")
        assert "line 2" in err and "outside the manifest's folder" in err and records[0].video_id in err
        assert main(["finetune", str(frames), *FAST, "--allow-outside-frames", "--out", str(tmp_path / f"o{i}")]) == 0


def test_unreadable_frames_name_file_and_row(frames, tmp_path, capsys):
    records = read_manifest(frames)
    target = frames / (records[3].frames_file or f"frames/{records[3].video_id}.npy")
    target.write_bytes(target.read_bytes()[:60])  # truncated
    assert main(["finetune", str(frames), *FAST, "--out", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys, "finetune")
    assert target.name in err and "line 5" in err and records[3].video_id in err


def test_patients_equal_to_videos_warn_about_leakage(tmp_path):
    from medcl.evaluate.classify import FinetuneConfig, load_frame_data

    root = make_frame_sets(tmp_path / "f", n_patients=6, n_frames=2)
    records = read_manifest(root)
    write_manifest(root / "manifest.csv", [type(r)(**{**r.__dict__, "patient_id": r.video_id}) for r in records])
    with pytest.warns(UserWarning, match="every patient_id equals its video_id"):
        load_frame_data(root, FinetuneConfig(image_size=32))


# ----------------------------------------------------------------------------------- segmentation masks


def _seg_manifest(root: Path, masks: list[np.ndarray], suffix: str = ".png") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    rng = np.random.default_rng(0)
    for i, mask in enumerate(masks):
        image = (rng.random(mask.shape) * 255).astype(np.uint8)
        Image.fromarray(image).save(root / f"img{i}.png")
        if suffix == ".jpg":
            Image.fromarray(mask.astype(np.uint8)).save(root / f"mask{i}.jpg", quality=75)
        else:
            Image.fromarray(mask.astype(np.uint8)).save(root / f"mask{i}.png")
        rows.append({"image": f"img{i}.png", "mask": f"mask{i}{suffix}", "patient_id": f"p{i}"})
    with (root / "seg.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "mask", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "seg.csv"


def _square_mask(value: int = 255) -> np.ndarray:
    mask = np.zeros((24, 24), np.uint8)
    mask[6:18, 6:18] = value
    return mask


def test_undeclared_mask_values_are_refused_and_binarize_is_explicit(tmp_path):
    from medcl.data.seg_manifest import load_case, read_seg_csv

    multi = _square_mask(1)
    multi[0:3, 0:3], multi[20:24, 20:24] = 2, 7
    task = read_seg_csv(_seg_manifest(tmp_path / "multi", [multi, _square_mask(1)]))
    with pytest.raises(ValueError, match=r"mask0\.png: mask values \[2, 7\] are not declared"):
        load_case(task.cases[0], task, (24, 24))
    assert load_case(task.cases[1], task, (24, 24))[1].sum() == 144  # a clean 0/1 mask is fine
    noisy = _square_mask(255)
    noisy[0, 0:4] = 1  # compression noise in a 0/255 mask: not foreground, and not silently accepted
    task = read_seg_csv(_seg_manifest(tmp_path / "noisy", [noisy, _square_mask(255)]))
    with pytest.raises(ValueError, match=r"mask0\.png: mask values \[1\].*--binarize 127"):
        load_case(task.cases[0], task, (24, 24))
    assert load_case(task.cases[1], task, (24, 24))[1].sum() == 144  # a clean 0/255 mask is fine
    task.binarize = 127
    labels = load_case(task.cases[0], task, (24, 24))[1]
    assert labels.sum() == 144 and labels[0, 0, 0:4].sum() == 0  # the noise is background


def test_cli_binarize_for_jpeg_masks(tmp_path, capsys):
    csv_path = _seg_manifest(tmp_path / "jpeg", [_square_mask(255) for _ in range(6)], suffix=".jpg")
    common = ["finetune", str(csv_path), "--task", "segment", "--size", "24,24", "--folds", "3", "--run-folds", "1",
              "--fractions", "1", "--iterations", "1", "--batch-size", "2",
              "--model", "patch_size=4", "--model", "hidden_size=16", "--model", "mlp_dim=32",
              "--model", "num_layers=2", "--model", "num_heads=2", "--model", "feature_size=4"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "mask" in err and ".jpg" in err and "--binarize" in err
    assert main([*common, "--binarize", "127", "--out", str(tmp_path / "b")]) == 0
