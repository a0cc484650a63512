"""End-to-end: `medcl demo --tiny` runs every stage on synthetic data and writes its outputs."""

from __future__ import annotations

import importlib.util
import json

import pytest

from medcl.cli import main


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Paired comparison" in printed and "uscl vs scratch" in printed
    assert (out / "ingested" / "manifest.csv").is_file()
    assert (out / "pretrain" / "uscl" / "checkpoints" / "final.pt").is_file()
    for name in ("scratch", "uscl"):
        results = json.loads((out / "finetune" / name / "results.json").read_text())
        assert len(results["folds"]) == 3 and results["init"]["name"] == name
    comparison = json.loads((out / "finetune" / "comparison.json").read_text())
    assert comparison["runs"] == ["scratch", "uscl"]
    # second comparison on the same folds: frozen backbone + linear head
    linear = json.loads((out / "finetune-linear" / "uscl" / "results.json").read_text())
    assert linear["protocol"] == "linear" and len(linear["folds"]) == 3
    assert "Protocol **linear**" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["timings"]) >= {"synthesize_s", "ingest_s", "pretrain_s", "finetune_s", "linear_probe_s", "total_s"}
    assert summary["linear"]["comparison"]["runs"] == ["scratch", "uscl"] and summary["cpu_s"] > 0
    # what a user does next: a torchvision-layout export and predictions for videos of new patients
    from safetensors import safe_open

    with safe_open(str(out / "export" / "backbone.safetensors"), framework="pt") as handle:
        assert handle.metadata()["layout"] == "torchvision" and "layer2.0.downsample.0.bias" not in handle.keys()
    assert summary["use"]["n_videos"] >= 6 and summary["use"]["failed"] == 0
    assert 0.0 <= summary["use"]["video_accuracy"] <= 1.0
    rows = (out / "predictions" / "videos.csv").read_text().splitlines()
    assert len(rows) == summary["use"]["n_videos"] + 1
    if importlib.util.find_spec("medcl.report.html") is not None:
        assert (out / "report.html").is_file()
    # a second run into the same folder refuses instead of mixing outputs
    assert main(["demo", "--tiny", "--out", str(out), "--no-report"]) == 2
