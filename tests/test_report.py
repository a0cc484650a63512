"""Report generation on tiny fake run folders written in the agreed formats (contracts.md)."""

from __future__ import annotations

import base64
import csv
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medcl.data.manifest import VideoRecord, write_manifest
from medcl.models.backbones import resnet18_backbone

CLASSES = ["covid", "pneumonia", "regular"]
SIZE = 32


def make_manifest(root: Path, videos_per_class: int = 2, frames_per_video: int = 4, size: int = SIZE) -> Path:
    """Tiny ingest folder: class-dependent bright bars on noise (32 px by default)."""
    rng = np.random.default_rng(0)
    (root / "frames").mkdir(parents=True)
    records = []
    for c, label in enumerate(CLASSES):
        for v in range(videos_per_class):
            video_id = f"{label}_{v}"
            frames = rng.integers(0, 60, size=(frames_per_video, size, size), dtype=np.uint8)
            bar = size // 8
            frames[:, bar * (1 + 2 * c) : bar * (2 + 2 * c), :] = 200 + v * 10
            np.save(root / "frames" / f"{video_id}.npy", frames)
            records.append(VideoRecord(video_id, f"{video_id}.mp4", label, f"p{c}{v}", 30.0, 40, frames_per_video, size, size))
    write_manifest(root / "manifest.csv", records)
    return root


def make_checkpoint(path: Path, method: str = "uscl", seed: int = 0, config: dict | None = None) -> Path:
    torch.manual_seed(seed)
    backbone = resnet18_backbone()
    model = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    model["classifier.weight"] = torch.zeros(3, 512)
    ckpt = {
        "format": "medcl-checkpoint-v1", "method": method, "config": config or {}, "model": model,
        "optimizer": {}, "scheduler": {}, "step": 30, "epoch": 3, "rng": {},
        "backbone": {"name": "resnet18", "kwargs": {"in_channels": 1, "spatial_dims": 2}, "prefix": "backbone."},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def make_pretrain_run(root: Path, manifest: Path, method: str = "uscl", seed: int = 0) -> Path:
    config = {"method": method, "data": {"manifest": str(manifest), "size": SIZE, "in_channels": 1},
              "optim": {"lr": 3e-4, "batch_size": 4}, "out": str(root)}
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    with (root / "metrics.jsonl").open("w") as handle:
        for step in range(1, 41):
            row = {"step": step, "epoch": step // 10, "lr": 3e-4 * min(1, step / 10), "loss": 5.0 / step + 0.1,
                   "loss_con": 4.0 / step, "loss_sup": 1.0 / step}
            handle.write(json.dumps(row) + "\n")
        handle.write('{"step": 41, "lo')  # a torn last line, as a killed run leaves it
    (root / "environment.json").write_text(json.dumps({"python": "3.11", "torch": "2.13", "monai": "1.6", "machine": "test"}))
    make_checkpoint(root / "checkpoints" / "final.pt", method, seed, config)
    return root


def make_finetune_run(root: Path, manifest: Path, init_path: Path | None) -> Path:
    """A classification run folder as medcl.evaluate.classify writes it."""
    root.mkdir(parents=True)
    init = {"name": "scratch", "path": None} if init_path is None else {"name": init_path.parent.parent.name, "path": str(init_path)}
    (root / "config.yaml").write_text(yaml.safe_dump({"protocol": "last_stage", "image_size": SIZE, "seed": 0,
                                                       "data": str(manifest), "init": init}))
    rng = np.random.default_rng(1)
    folds, rows = [], []
    for fold in range(2):
        cm = rng.integers(0, 5, size=(3, 3)) + np.eye(3, dtype=int) * 6
        stats = {"accuracy": 0.8 + 0.05 * fold, "balanced_accuracy": 0.78, "macro_f1": 0.77, "roc_auc_ovr": 0.9,
                 "per_class": {c: {"precision": 0.8, "recall": 0.7, "f1": 0.75, "support": 4, "roc_auc": 0.9} for c in CLASSES},
                 "confusion_matrix": cm.tolist(), "n": int(cm.sum())}
        folds.append({"repeat": 0, "fold": fold, "frame": stats, "video": stats})
        for v, true in enumerate(CLASSES):
            pred = CLASSES[(v + fold) % 3] if v == 2 else true
            for frame in (0, 1, -1):
                rows.append({"repeat": 0, "fold": fold, "video_id": f"{true}_{fold}", "patient_id": "p", "frame": frame,
                             "true": true, "pred": pred, **{f"prob_{c}": 1.0 / 3 for c in CLASSES}})
    summary = {level: {k: {"mean": 0.82, "std": 0.03, "n": 2} for k in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr")}
               for level in ("frame", "video")}
    results = {"format": "medcl-classification-v1", "init": init, "protocol": "last_stage", "classes": CLASSES,
               "folds": folds, "summary": summary}
    (root / "results.json").write_text(json.dumps(results))
    (root / "results.md").write_text("# Classification\n\n| level | accuracy |\n|---|---|\n| frame | 0.820 ± 0.030 |\n")
    with (root / "predictions.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with (root / "curves.jsonl").open("w") as handle:
        for fold in range(2):
            for epoch in range(5):
                handle.write(json.dumps({"repeat": 0, "fold": fold, "epoch": epoch, "train_loss": 1.0 / (epoch + 1),
                                         "val_metric": 0.5 + 0.05 * epoch}) + "\n")
    return root


def make_segment_run(root: Path) -> Path:
    from medcl.report.runs import write_overlay

    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"task": {"name": "toy"}, "segment": {"fractions": [1.0]}}))
    yy, xx = np.mgrid[:48, :48]
    for i in range(2):
        gt = ((yy - 24) ** 2 + (xx - 20 - i * 4) ** 2 < 100).astype(np.uint8)
        pred = ((yy - 22) ** 2 + (xx - 22 - i * 4) ** 2 < 90).astype(np.uint8)
        write_overlay(root, f"case{i}", np.random.default_rng(i).random((48, 48)).astype(np.float32), pred, gt, ["lesion"])
    summary = {"1": {"n_folds": 1, "test_mean_dice": {"mean": 0.71, "std": 0.0, "n": 1},
                     "test_per_class": {"lesion": {"mean": 0.71, "std": 0.0, "n": 1}}}}
    (root / "results.json").write_text(json.dumps({"format": "medcl-segment-results-v1", "summary": summary}))
    with (root / "curves.jsonl").open("w") as handle:  # as medcl.evaluate.segment logs validation
        for it in (10, 20, 30):
            handle.write(json.dumps({"fold": 1, "fraction": 1.0, "iteration": it, "train_loss": 1.0 / it,
                                     "val_mean_dice": 0.02 * it, "lr": 1e-3, "seconds": 1.0}) + "\n")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    manifest = make_manifest(root / "ingested")
    uscl = make_pretrain_run(root / "uscl", manifest, "uscl", seed=0)
    simclr = make_pretrain_run(root / "simclr", manifest, "simclr", seed=1)
    finetune = make_finetune_run(root / "ft_uscl", manifest, uscl / "checkpoints" / "final.pt")
    scratch = make_finetune_run(root / "ft_scratch", manifest, None)
    (root / "comparison.md").write_text("# Paired comparison\n\nBaseline: **ft_scratch**.\n\n"
                                        "| run vs baseline | metric | difference |\n|---|---|---|\n"
                                        "| ft_uscl vs ft_scratch | accuracy | +0.050 |\n")
    segment = make_segment_run(root / "segment")
    return {"root": root, "manifest": manifest, "uscl": uscl, "simclr": simclr, "finetune": finetune,
            "scratch": scratch, "segment": segment}


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.section_ids: list[str] = []
        self.links: list[str] = []
        self._section: str | None = None
        self.notes: dict[str, list[str]] = {}
        self._in_note = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "section":
            self._section = attrs.get("id")
            self.section_ids.append(self._section)
        if tag in ("link", "script"):
            self.links.append(tag)
        if tag == "p" and "note" in (attrs.get("class") or ""):
            self._in_note = True

    def handle_endtag(self, tag):
        if tag == "p":
            self._in_note = False

    def handle_data(self, data):
        if self._in_note and self._section:
            self.notes.setdefault(self._section, []).append(data)


def _parse(path: Path) -> _Collector:
    collector = _Collector()
    collector.feed(path.read_text())
    return collector


def _decode_images(sources: list[str]):
    from PIL import Image

    images = []
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:40]
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        image.load()
        images.append(image)
    return images


EVERY_SECTION = ["runs", "training", "results", "confusion", "gradcam", "embedding", "segmentation", "config"]


def test_report_has_every_section_with_decodable_images(runs, tmp_path):
    from medcl.report import write_report

    out = write_report([runs["uscl"], runs["simclr"], runs["finetune"], runs["scratch"], runs["segment"]],
                       tmp_path / "report.html", max_embedding_frames=24, gradcam_min_size=64)
    text = out.read_text()
    parsed = _parse(out)
    assert parsed.section_ids == EVERY_SECTION
    for section in EVERY_SECTION[1:-1]:  # no content section was skipped or failed
        joined = " ".join(parsed.notes.get(section, []))
        assert "skipped" not in joined and "failed" not in joined, (section, joined)
    assert "This section failed" not in text
    assert parsed.links == []  # self-contained: no stylesheet or script links
    images = _decode_images(parsed.images)
    # curves (1 pretrain + 2 fine-tune + 1 segmentation), 2x2 confusion, 1 Grad-CAM grid, 4 embeddings, 2 overlays
    assert len(images) == 4 + 4 + 1 + 4 + 2
    assert all(min(im.size) > 50 for im in images)
    for name in ("uscl", "simclr", "ft_uscl", "ft_scratch", "segment"):
        assert name in text
    assert "loss_con" in text or "loss con" in text  # the loss terms appear (figure alt / tables)
    assert "0.820 ± 0.030" in text  # CV table from results.json
    assert "<th>run vs baseline</th>" in text and "<td>+0.050</td>" in text  # comparison.md as a table
    assert "<strong>ft_scratch</strong>" in text
    assert "random initialisation (scratch, seed 0)" in text
    assert "torch" in text and "monai" in text  # environment


def test_report_skips_absent_inputs_with_notes(tmp_path):
    from medcl.report import write_report

    run = tmp_path / "empty_run"
    run.mkdir()
    (run / "config.yaml").write_text("method: uscl\n")
    out = write_report([run], tmp_path / "r.html")
    parsed = _parse(out)
    assert parsed.section_ids == EVERY_SECTION
    for section in ("training", "results", "confusion", "gradcam", "embedding", "segmentation"):
        assert parsed.notes.get(section), f"section {section} has no skip note"
    assert parsed.images == []


def test_report_survives_a_corrupt_checkpoint(runs, tmp_path):
    from medcl.report import write_report

    broken = tmp_path / "broken"
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "checkpoints" / "final.pt").write_bytes(b"not a checkpoint")
    (broken / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    out = write_report([runs["uscl"], broken], tmp_path / "r.html", manifest=runs["manifest"], max_embedding_frames=12,
                       gradcam_min_size=32)
    text = out.read_text()
    assert "broken: backbone could not be loaded" in text
    assert "final.pt" in text
    _decode_images(_parse(out).images)


def test_report_cli(runs, tmp_path):
    from medcl.cli import main

    out = tmp_path / "cli.html"
    assert main(["report", str(runs["finetune"]), "-o", str(out), "--max-frames", "12", "--names", "USCL fine-tuned"]) == 0
    assert out.is_file() and "USCL fine-tuned" in out.read_text()
    assert main(["report", str(runs["finetune"]), "-o", str(out), "--names", "a,b"]) == 2
    assert main(["report", str(tmp_path / "missing"), "-o", str(out)]) == 2


def test_report_rejects_missing_manifest(runs, tmp_path):
    from medcl.report import write_report

    with pytest.raises(FileNotFoundError, match="nowhere"):
        write_report([runs["uscl"]], tmp_path / "r.html", manifest=tmp_path / "nowhere")


def test_confusion_from_predictions_counts(runs):
    from medcl.report.html import confusion_from_run
    from medcl.report.runs import load_run

    levels = {level: (m, c) for level, m, c in confusion_from_run(load_run(runs["finetune"]))}
    video, classes = levels["video"]
    assert classes == CLASSES
    # fold 0: all correct; fold 1: the "regular" video predicted as covid
    assert video.tolist() == [[2, 0, 0], [0, 2, 0], [1, 0, 1]]
    assert levels["frame"][0].sum() == 12


def test_gradcam_map_shape_range_and_input_dependence():
    from medcl.report.gradcam import PrototypeClassifier, backbone_features, gradcam_maps

    torch.manual_seed(0)
    backbone = resnet18_backbone()
    images = torch.rand(4, 1, 64, 48)
    features = backbone_features(backbone, images)
    model = PrototypeClassifier.from_features(backbone, features, ["a", "a", "b", "b"], ["a", "b"])
    maps = gradcam_maps(model, images, [0, 0, 1, 1])
    assert maps.shape == (4, 64, 48)
    assert maps.min() >= 0.0 and maps.max() <= 1.0 and maps.max() == pytest.approx(1.0)
    shifted = gradcam_maps(model, torch.roll(images, shifts=20, dims=-1), [0, 0, 1, 1])
    assert np.abs(maps - shifted).mean() > 0.05  # the map follows the input
    one_by_one = np.concatenate([gradcam_maps(model, images[i : i + 1], [c]) for i, c in enumerate([0, 0, 1, 1])])
    np.testing.assert_allclose(maps, one_by_one, atol=1e-3)  # batching per class changes nothing (up to float noise)
    other_class = gradcam_maps(model, images, [1, 1, 0, 0])
    assert np.abs(maps - other_class).mean() > 0.01  # the explained class matters


def test_embed_2d_uses_tsne_or_pca():
    from medcl.report.html import embed_2d

    rng = np.random.default_rng(0)
    coords, method = embed_2d(rng.normal(size=(10, 16)))
    assert coords.shape == (10, 2) and method == "PCA"
    coords, method = embed_2d(rng.normal(size=(40, 16)))
    assert coords.shape == (40, 2) and method.startswith("t-SNE")
    with pytest.raises(ValueError, match="at least 3"):
        embed_2d(rng.normal(size=(2, 16)))


def test_overlay_roundtrip_and_validation(tmp_path):
    from medcl.report.runs import load_run, write_overlay

    with pytest.raises(ValueError, match="one \\[H, W\\] shape"):
        write_overlay(tmp_path, "bad", np.zeros((4, 4)), np.zeros((4, 5)), np.zeros((4, 4)))
    write_overlay(tmp_path, "ok", np.zeros((4, 4)), np.ones((4, 4)), np.ones((4, 4)), ["liver"])
    (tmp_path / "overlays" / "torn.npz").write_bytes(b"garbage")
    run = load_run(tmp_path)
    assert [o.name for o in run.overlays] == ["ok"]
    assert run.overlays[0].class_names == ["background", "liver"]
    assert any("torn.npz" in n for n in run.notes)


def test_unetr_run_is_listed_but_not_explained(runs, tmp_path):
    """A MixCL (UNETR encoder) checkpoint: curves are shown, Grad-CAM/embedding skip it by name."""
    from medcl.models.unetr import build_encoder, encoder_kwargs
    from medcl.report import write_report

    encoder = build_encoder(spatial_dims=2, img_size=32, in_channels=1, patch_size=8, hidden_size=32, mlp_dim=64,
                            num_layers=2, num_heads=2)
    run = tmp_path / "mixcl"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"format": "medcl-checkpoint-v1", "method": "mixcl", "config": {}, "step": 1, "epoch": 0, "rng": {},
                "model": {f"encoder.{k}": v for k, v in encoder.state_dict().items()}, "optimizer": {}, "scheduler": {},
                "backbone": {"name": "unetr_encoder", "kwargs": encoder_kwargs(encoder), "prefix": "encoder."}},
               run / "checkpoints" / "last.pt")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "loss_id": 1.5}\n{"step": 2, "loss": 1.0, "loss_id": 0.7}\n')
    out = write_report([runs["uscl"], run], tmp_path / "r.html", max_embedding_frames=12, gradcam_min_size=32)
    text = out.read_text()
    assert "mixcl: UNETREncoder backbone" in text
    assert "This section failed" not in text
    _decode_images(_parse(out).images)


def test_environment_file_is_shown(tmp_path):
    from medcl.report import write_report
    from medcl.environment import write_environment

    run = tmp_path / "run"
    env = json.loads(write_environment(run).read_text())
    assert env["torch"] == torch.__version__ and "python" in env and "cpu" in env
    text = write_report([run], tmp_path / "r.html").read_text()
    assert torch.__version__ in text and "Environment not recorded" not in text


def test_unique_run_names():
    from medcl.report.runs import unique_names

    assert unique_names([Path("d/finetune/uscl"), Path("d/pretrain/uscl"), Path("d/finetune/scratch")]) == [
        "finetune/uscl", "pretrain/uscl", "scratch"]
    assert unique_names([Path("a/x/run"), Path("b/x/run")]) == ["x/run (1)", "x/run (2)"]


def test_markdown_to_html_tables_and_escaping():
    from medcl.report.html import markdown_to_html

    out = markdown_to_html("# Title <x>\n\ntext with **bold** and `code`\n\n| a | b |\n|---|--:|\n| 1 | <script> |\n")
    assert "<h4>Title &lt;x&gt;</h4>" in out
    assert "<strong>bold</strong>" in out and "<code>code</code>" in out
    assert "<thead><tr><th>a</th><th>b</th></tr></thead>" in out and "<td>&lt;script&gt;</td>" in out
    assert "---" not in out


def test_report_feeds_a_finetuned_backbone_exactly_what_finetuning_fed_it(tmp_path):
    """One input convention (medcl.inputs): the report's Grad-CAM / embedding inputs of a frame are
    the very tensor fine-tuning computed for it, also for a backbone with its own normalisation."""
    from medcl.data.frames import FrameSets
    from medcl.evaluate.classify import FinetuneConfig, finetune, load_frame_data
    from medcl.inputs import InputSpec
    from medcl.models.backbones import resnet18_backbone
    from medcl.report.html import model_inputs, run_backbone, run_input_size
    from medcl.report.runs import load_run
    from medcl.weights import save_backbone
    from tiny_frames import make_frame_sets

    data_dir = make_frame_sets(tmp_path / "frames", n_patients=6, n_frames=3, size=40)
    spec = InputSpec(in_channels=1, mean=(0.4,), std=(0.3,))  # a backbone that expects standardised inputs
    torch.manual_seed(0)
    exported = save_backbone(resnet18_backbone(), tmp_path / "own" / "backbone.safetensors", "resnet18",
                             {"in_channels": 1}, input_spec=spec)
    config = FinetuneConfig(protocol="linear", epochs=1, image_size=32, folds=3, repeats=1, batch_size=16)
    out = tmp_path / "ft"
    finetune(data_dir, ["scratch", f"own={exported.parent}"], config, out, log=lambda *_: None, n_boot=10)
    data = load_frame_data(data_dir, config)
    sets = FrameSets(data_dir, cache=False)
    record = next(r for r in sets.records if r.video_id == data.video_ids[1])
    raw = sets.load_frames(record)[1]
    index = int(np.flatnonzero((data.frame_video == 1) & (data.frame_index == 1))[0])
    for name, expected_spec in (("scratch", InputSpec()), ("own", spec)):
        run = load_run(out / name)
        network, _, run_spec = run_backbone(run)
        assert network is not None and run_spec == expected_spec
        fed_in_finetuning = data.inputs(np.array([index]), expected_spec)
        fed_in_report = model_inputs([raw], run_input_size(run), run_spec)
        assert run_input_size(run) == 32
        assert torch.equal(fed_in_report, fed_in_finetuning), name
    # the model card states the same convention (no mean 0.5 / std 0.25 that nobody applies)
    from medcl.report.model_card import model_card_markdown

    card = model_card_markdown({"architecture": "resnet18", "kwargs": {"in_channels": 1}, "n_parameters": 1,
                                "weights_file": "backbone.safetensors", "sha256": "0" * 64, "source_checkpoint": "x",
                                "exported": "now", "environment": {"python": "3", "torch": "2", "monai": "1"},
                                "input": InputSpec().to_dict()})
    assert "x / 255 in [0, 1]" in card and "0.25" not in card
