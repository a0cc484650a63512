"""The end-to-end demo: synthetic lung-ultrasound videos -> ingest -> USCL pretraining ->
cross-validated fine-tuning (scratch vs USCL, same folds, paired bootstrap) -> report.

Everything is generated, so it runs anywhere in a few minutes on a CPU and needs no data:

>>> from medcl.demo import DemoSettings, run_demo        # doctest: +SKIP
>>> summary = run_demo("medcl-demo", DemoSettings())      # doctest: +SKIP

The numbers it prints are real, but on a toy problem with a toy pretraining budget: they show the
machinery, not what USCL achieves at the paper's scale (see benchmarks/pocus_transfer.py).
"""

from __future__ import annotations

import json
import platform
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# folders the demo writes inside its output folder (and removes again with overwrite=True)
DEMO_PARTS = ("videos", "ingested", "pretrain", "finetune", "finetune-linear", "report.html", "summary.md",
              "summary.json", "export", "new-videos", "predictions")


@dataclass
class DemoSettings:
    """Sizes of the demo (defaults: about 5 CPU-minutes, i.e. ~3-4 minutes on 2 idle cores).

    Budget notes (measured on the default data, seed 0; see the docstring of ``run_demo``):
    45 videos at batch 16 give 2 pretraining steps per epoch, so ``pretrain_epochs`` = 150 is 300
    USCL steps (~0.55 CPU-s each at 64 px). Do not go much below ~100 steps: BatchNorm running
    variances start at 1.0 while the first layer's activations have a variance of ~1e-3 (inputs in
    [0, 1]), and with momentum 0.1 they need that long to forget the start value. After 20 epochs
    (40 steps) bn1's running variance was still 0.016 vs 0.0014 measured, so the frozen layers (eval
    mode) of last_stage computed mis-scaled features: USCL 0.733 vs scratch 0.911 video accuracy;
    the same checkpoint with recalibrated BatchNorm statistics gave 0.911 vs 0.911. After 300 steps
    the statistics match (within 1.1-1.3x) and a standardized linear probe of the features beats
    random features (video accuracy 0.96 vs 0.89). Fine-tuning fits the training folds in ~3
    epochs, so 8 epochs suffice.
    """

    n_videos: int = 45
    videos_per_patient: int = 3
    video_size: int = 96  # synthetic video width/height
    image_size: int = 64  # ingested frame size = network input size
    pretrain_epochs: int = 150
    pretrain_batch: int = 16  # videos per step
    warmup_epochs: float = 5.0
    finetune_epochs: int = 8
    protocol: str = "last_stage"  # USCL's protocol: layer4 + a new head trained, the rest frozen
    linear_epochs: int = 30  # second comparison: frozen backbone + linear head (0 = skip it)
    folds: int = 5
    repeats: int = 1
    n_boot: int = 2000
    seed: int = 0

    @classmethod
    def tiny(cls) -> DemoSettings:
        """Seconds instead of minutes (tests): correctness of the plumbing only."""
        return cls(n_videos=18, video_size=64, image_size=32, pretrain_epochs=1, pretrain_batch=8,
                   warmup_epochs=0.0, finetune_epochs=2, linear_epochs=2, folds=3, n_boot=200)


def _prepare_out(out: Path, overwrite: bool) -> None:
    existing = [p for p in DEMO_PARTS if (out / p).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds demo output {existing}; use another --out or --overwrite")
    for name in existing:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def use_models(out: Path, run_dir: Path, s: DemoSettings, log) -> dict:
    """What a user does next: export the pretrained backbone for other code (torchvision layout),
    and predict videos of new patients with the model fine-tuned on all labeled videos."""
    import csv

    from medcl.data.synthetic import write_synthetic_videos
    from medcl.predict import predict
    from medcl.report.model_card import export_backbone

    exported = export_backbone(run_dir / "checkpoints" / "final.pt", out / "export", layout="torchvision")
    n_new = max(6, s.n_videos // 5)
    metadata = write_synthetic_videos(out / "new-videos", n_videos=n_new, seed=s.seed + 1000, size=s.video_size,
                                      videos_per_patient=s.videos_per_patient)
    model = out / "finetune" / "uscl" / "models" / "final.safetensors"
    summary = predict(model, [out / "new-videos"], out / "predictions", progress=False)
    with open(metadata, newline="") as handle:
        truth = {row["file"]: row["label"] for row in csv.DictReader(handle)}
    with open(out / "predictions" / "videos.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    label_of = {Path(r["input"]).name: r for r in rows}
    hits = [label_of[name]["pred"] == label for name, label in truth.items() if name in label_of]
    accuracy = sum(hits) / len(hits) if hits else float("nan")
    log(f"exported {exported}; predicted {summary.n_predicted} new videos -> {out / 'predictions'}/videos.csv, "
        f"video accuracy {accuracy:.3f}")
    return {"export": str(exported), "model": str(model), "n_videos": summary.n_predicted,
            "video_accuracy": accuracy, "failed": len(summary.failed)}


def run_demo(out: str | Path = "medcl-demo", settings: DemoSettings | None = None, *, overwrite: bool = False,
             report: bool = True, log=print) -> dict:
    """Run every stage into ``out``; returns a summary dict (also written to summary.json/.md)."""
    from medcl.data.synthetic import write_synthetic_videos
    from medcl.evaluate.classify import FinetuneConfig, finetune
    from medcl.evaluate.compare import comparison_markdown
    from medcl.ingest.pipeline import ingest_videos
    from medcl.train.api import pretrain
    from medcl.weights import InitSpec

    s = settings or DemoSettings()
    out = Path(out)
    _prepare_out(out, overwrite)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def stage(name: str, message: str) -> float:
        log(f"\n== {name}: {message}")
        return time.perf_counter()

    t0 = stage("1/5 synthesize", f"{s.n_videos} lung-ultrasound-like videos ({s.videos_per_patient} per patient)")
    metadata = write_synthetic_videos(out / "videos", n_videos=s.n_videos, seed=s.seed, size=s.video_size,
                                      videos_per_patient=s.videos_per_patient)
    timings["synthesize_s"] = time.perf_counter() - t0

    t0 = stage("2/5 ingest", f"3 frames per second, sector crop, {s.image_size} px")
    summary = ingest_videos(out / "videos", out / "ingested", fps=3.0, size=s.image_size, metadata=metadata,
                            progress=False)
    if summary.failed:
        raise RuntimeError(f"demo ingest failed for {len(summary.failed)} file(s): {summary.failed[:3]}")
    log(f"{summary.n_ingested} videos, {summary.n_frames} frames")
    timings["ingest_s"] = time.perf_counter() - t0

    t0 = stage("3/5 pretrain", f"USCL (paper settings, 1% labels), {s.pretrain_epochs} epochs, batch {s.pretrain_batch}")
    run_dir = pretrain({
        "method": "uscl",
        "data": {"manifest": str(out / "ingested"), "size": s.image_size},
        "optim": {"epochs": s.pretrain_epochs, "batch_size": s.pretrain_batch, "warmup_epochs": s.warmup_epochs},
        "train": {"seed": s.seed, "device": "auto", "progress": False, "tensorboard": False},
        "out": str(out / "pretrain" / "uscl"),
    })
    timings["pretrain_s"] = time.perf_counter() - t0

    t0 = stage("4/5 fine-tune", f"{s.protocol}, {s.folds}-fold CV by patient x {s.repeats}, scratch vs USCL")
    config = FinetuneConfig(protocol=s.protocol, epochs=s.finetune_epochs, image_size=s.image_size, folds=s.folds,
                            repeats=s.repeats, seed=s.seed, batch_size=32, patience=max(5, s.finetune_epochs // 2),
                            device="cuda" if torch.cuda.is_available() else "cpu",
                            save_models=False, final_model=True)  # one model per init, trained on every labeled video
    result = finetune(out / "ingested", [InitSpec("scratch"), InitSpec("uscl", str(run_dir / "checkpoints" / "final.pt"))],
                      config, out / "finetune", log=log, n_boot=s.n_boot)
    timings["finetune_s"] = time.perf_counter() - t0
    table = f"Protocol **{s.protocol}** (fine-tuned part: see medcl.evaluate.classify).\n\n" + comparison_markdown(result["comparison"])
    linear = None
    if s.linear_epochs > 0 and s.protocol != "linear":
        # The frozen-feature comparison isolates what pretraining learned: with last_stage the
        # trainable layer4 (8.4 M of ResNet-18's 11 M weights) can make up for random frozen layers.
        t0 = stage("4b/5 linear probe", "frozen backbone + linear head, same folds, scratch vs USCL")
        lin_config = config.model_copy(update={"protocol": "linear", "epochs": s.linear_epochs, "save_models": False,
                                               "patience": max(5, s.linear_epochs // 2)})
        linear = finetune(out / "ingested",
                          [InitSpec("scratch"), InitSpec("uscl", str(run_dir / "checkpoints" / "final.pt"))],
                          lin_config, out / "finetune-linear", log=log, n_boot=s.n_boot)
        timings["linear_probe_s"] = time.perf_counter() - t0
        table += "\n\nProtocol **linear** (frozen backbone, linear head).\n\n" + comparison_markdown(linear["comparison"])

    t0 = stage("5/6 use", "export the USCL backbone (torchvision layout); predict new patients with the fine-tuned model")
    used = use_models(out, run_dir, s, log)
    timings["use_s"] = time.perf_counter() - t0

    report_path = None
    t0 = stage("6/6 report", "HTML report")
    if report:
        try:
            from medcl.report import write_report
        except ImportError as exc:
            log(f"report skipped: medcl.report is not available ({exc})")
        else:
            try:
                report_path = write_report([out / "finetune" / "scratch", out / "finetune" / "uscl", run_dir],
                                           out / "report.html", manifest=out / "ingested")
                log(f"report: {report_path}")
            except Exception as exc:  # noqa: BLE001  (the results are already written; say why the report is missing)
                log(f"report skipped: {type(exc).__name__}: {exc}")
    else:
        log("report skipped (report=False)")
    timings["report_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = usage.ru_utime + usage.ru_stime  # all threads of this process (load on a shared machine inflates wall time only)

    summary_dict = {
        "settings": asdict(s), "timings": timings, "cpu_s": cpu_s, "report": str(report_path) if report_path else None,
        "machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
        "runs": {name: r["summary"] for name, r in result["runs"].items()},
        "comparison": result["comparison"],
        "use": used,
        "linear": None if linear is None else {
            "runs": {name: r["summary"] for name, r in linear["runs"].items()}, "comparison": linear["comparison"]},
    }
    (out / "summary.json").write_text(json.dumps(summary_dict, indent=1))
    lines = ["# medcl demo", "", "Synthetic data, toy budget: this shows the pipeline, not USCL's real effect.", "",
             "| stage | seconds |", "|---|---|"] + [f"| {k[:-2]} | {v:.1f} |" for k, v in timings.items()]
    table += (f"\n\nNew patients (never trained on): the final USCL model ({s.protocol}) predicted "
              f"{used['n_videos']} synthetic videos, video accuracy {used['video_accuracy']:.3f}; "
              f"backbone exported to {used['export']} (torchvision layout).")
    (out / "summary.md").write_text("\n".join(lines) + "\n\n" + table)
    log("\n" + table)
    log(f"total {timings['total_s']:.0f} s wall, {cpu_s:.0f} s CPU; everything is in {out}/ (summary.md, finetune/, "
        + ("finetune-linear/, " if linear is not None else "") + "pretrain/"
        + (", report.html)" if report_path else ")"))
    return summary_dict
