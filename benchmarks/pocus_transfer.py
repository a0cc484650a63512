"""USCL's transfer experiment at CPU scale (Chen et al., MICCAI 2021, Tables 1-2), one command.

    python benchmarks/pocus_transfer.py            # full run, about 45 min on 2 idle CPU cores
    python benchmarks/pocus_transfer.py --quick    # plumbing check in a few minutes

1. Ingest COVID-BLUES (pretraining corpus, COVID PCR per patient as the weak label) and POCUS
   (convex-probe videos of covid / pneumonia / regular) from ../shared/data.
2. Pretrain a ResNet-18 on COVID-BLUES four times: the rows of the paper's ablation (Table 2):
   frame-level pairs (= SimCLR), + video-level negatives (I1), + mixup positives (I2), + CE (= USCL).
3. Fine-tune on POCUS with 5-fold cross-validation by patient (validation carved from the training
   folds, test folds evaluated once; the SAME folds for every initialisation):
   - ``last_stage`` (the paper's protocol: layer4 + a new linear head) for scratch and all four;
   - ``full`` fine-tuning for scratch, SimCLR and USCL;
   - a linear probe on a RANDOMLY initialised backbone (how much a frozen random network gives).
4. Paired differences with patient-bootstrap 95% intervals; writes
   benchmarks/results/pocus_transfer.md (``--quick``: pocus_transfer_quick.md) and keeps every
   run folder under benchmarks/work/pocus_transfer/ (ignored by git).

Budget (full): 64 px inputs everywhere (the paper uses 224 px; 12x less compute per image),
COVID-BLUES at 3 frames/s, 25 epochs (of videos) of batch 32 pairs per method, the same number of
steps for every method (frame-level pairing included), fine-tuning at most
15 epochs per fold (last_stage; full: 10) on at most 10 frames per training video, 5 folds x 2
repeats (different fold assignments; the same for every initialisation). Nothing is tuned on the
test folds. Measured on the idle 2-core machine: pretraining ~9 min, fine-tuning ~18 min per repeat.
The committed results file adds a hand-written Discussion of that run (a rerun rewrites the numbers).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["covid", "pneumonia", "regular"]


@dataclass
class Settings:
    size: int = 64
    blues_every: int = 1  # take every N-th COVID-BLUES video
    pocus_every: int = 1  # take every N-th POCUS convex video (quick runs only)
    pretrain_epochs: int = 25
    pretrain_batch: int = 32
    warmup_epochs: float = 2.0
    label_fraction: float = 0.01  # USCL's CE labels: 1% of the videos (at least one per class)
    finetune_epochs_last_stage: int = 15
    finetune_epochs_full: int = 10
    max_train_frames_per_video: int = 10
    folds: int = 5
    repeats: int = 2
    patience: int = 5
    n_boot: int = 2000
    seed: int = 0

    @classmethod
    def quick(cls) -> Settings:
        return cls(size=32, blues_every=12, pocus_every=3, pretrain_epochs=1, pretrain_batch=8, warmup_epochs=0.0,
                   finetune_epochs_last_stage=2, finetune_epochs_full=1, max_train_frames_per_video=2,
                   patience=2, n_boot=300, repeats=1)


# (run name, pretraining config) for the ablation rows of Table 2
def pretrain_variants(s: Settings) -> list[tuple[str, str, dict]]:
    return [
        ("simclr", "frame-level pairs (SimCLR)", {"method": "simclr", "sampling": {"pairing": "frame", "mixup": "none"}}),
        ("plus_i1", "+ video-level negatives (I1)", {"method": "simclr", "sampling": {"pairing": "video", "mixup": "none"}}),
        ("plus_i2", "+ mixup positives (I2)", {"method": "simclr", "sampling": {"pairing": "video", "mixup": "paper"}}),
        ("uscl", "+ CE on 1% labels (USCL)", {"method": "uscl", "sampling": {"pairing": "video", "mixup": "paper"},
                                              "data": {"label_fraction": s.label_fraction}}),
    ]


def link_subset(files: list[Path], src_root: Path, dst: Path) -> Path:
    """A folder of symlinks mirroring ``files``' paths relative to ``src_root`` (ingest a subset)."""
    for f in files:
        target = dst / f.relative_to(src_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(f.resolve())
    return dst


def ingest_data(data: Path, work: Path, s: Settings, log) -> tuple[Path, Path]:
    import csv

    from medcl.ingest.pipeline import ingest_videos

    pocus_meta = data / "pocus" / "metadata.csv"
    with pocus_meta.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle)
                if r["kind"] == "video" and r["probe"] == "convex" and r["label"] in CLASSES][::s.pocus_every]
    pocus_src = link_subset([data / "pocus" / r["file"] for r in rows], data / "pocus",
                            work / "src" / f"pocus-every{s.pocus_every}")
    pocus_out = work / f"pocus-every{s.pocus_every}-{s.size}"
    t0 = time.perf_counter()
    summary = ingest_videos(pocus_src, pocus_out, fps=3.0, size=s.size, metadata=pocus_meta, progress=False)
    log(f"POCUS: {summary.n_ingested + summary.n_skipped} convex videos ({summary.n_frames} new frames), "
        f"{len(summary.failed)} failed, {time.perf_counter() - t0:.0f} s")
    return pocus_out, ingest_blues(data, work, s, log)


def ingest_blues(data: Path, work: Path, s: Settings, log) -> Path:
    """COVID-BLUES (every ``s.blues_every``-th video) ingested at ``s.size``, 3 frames/s, COVID PCR
    per patient as the weak label: the pretraining corpus (also of benchmarks/segment_2d.py)."""
    from medcl.ingest.pipeline import ingest_videos

    blues_root = data / "covid-blues" / "lus_videos"
    blues_files = sorted(blues_root.glob("*.mp4"))[::s.blues_every]
    blues_src = link_subset(blues_files, blues_root, work / "src" / f"blues-every{s.blues_every}")
    blues_out = work / f"blues-every{s.blues_every}-{s.size}"
    t0 = time.perf_counter()
    summary = ingest_videos(blues_src, blues_out, fps=3.0, size=s.size, progress=False,
                            patient_pattern=r"patient_(?P<patient>\d+)_",
                            patient_metadata=data / "covid-blues" / "patients.csv", patient_label_column="cov_test",
                            label_map={"0": "negative", "1": "covid"})
    log(f"COVID-BLUES: {len(blues_files)} videos ({summary.n_frames} new frames), {len(summary.failed)} failed, "
        f"{time.perf_counter() - t0:.0f} s")
    return blues_out


def deep_update(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_update(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def pretrain_all(blues: Path, work: Path, s: Settings, log, only: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Pretrain each variant of :func:`pretrain_variants` (``only``: these names) on ``blues``;
    a run folder under ``work/pretrain`` whose name carries a digest of its config is reused
    (the cache other benchmarks share)."""
    from medcl.data.manifest import read_manifest
    from medcl.train.api import pretrain

    # Same number of optimisation steps (= same images seen) for every variant: an "epoch" of
    # frame-level pairing walks over every frame, one of video-level pairing over every video.
    records = [r for r in read_manifest(blues) if r.n_frames > 0]
    video_steps = len(records) // s.pretrain_batch
    frame_steps = sum(r.n_frames for r in records) // s.pretrain_batch
    total_steps = max(1, s.pretrain_epochs * video_steps)
    warmup_steps = s.warmup_epochs * video_steps
    log(f"pretraining: {total_steps} steps of {s.pretrain_batch} pairs per variant ({s.pretrain_epochs} video epochs)")
    runs = {}
    for name, label, variant in pretrain_variants(s):
        if only is not None and name not in only:
            continue
        config = deep_update({
            "data": {"manifest": str(blues), "size": s.size},
            "optim": {"epochs": s.pretrain_epochs, "batch_size": s.pretrain_batch, "max_steps": total_steps,
                      "warmup_epochs": warmup_steps / (frame_steps if variant["sampling"]["pairing"] == "frame"
                                                       else video_steps)},
            "train": {"seed": s.seed, "device": "auto", "progress": False, "tensorboard": False},
        }, variant)
        # the folder name carries a digest of the settings: a changed setting never reuses a stale run
        digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
        out = work / "pretrain" / f"{name}-{digest}"
        config["out"] = str(out)
        final = out / "checkpoints" / "final.pt"
        if final.is_file():
            log(f"pretrain {name}: reusing {final}")
            runs[name] = final
            continue
        t0 = time.perf_counter()
        pretrain(config)
        log(f"pretrain {name} ({label}): {time.perf_counter() - t0:.0f} s")
        runs[name] = final
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the whole script in minutes")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=None, help="run folders (default benchmarks/work/pocus_transfer[_quick])")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--imagenet", type=Path, default=os.environ.get("MEDCL_IMAGENET_WEIGHTS") or None,
                        help="a torchvision / timm resnet18 state dict on disk (.pth or .safetensors; default: env "
                             "MEDCL_IMAGENET_WEIGHTS): adds the paper's ImageNet row; nothing is downloaded")
    args = parser.parse_args(argv)
    if args.imagenet is not None and not Path(args.imagenet).is_file():
        print(f"pocus_transfer: --imagenet {args.imagenet}: file not found", file=sys.stderr)
        return 2
    s = Settings.quick() if args.quick else Settings()
    suffix = "_quick" if args.quick else ""
    work = args.work or ROOT / "benchmarks" / "work" / f"pocus_transfer{suffix}"
    out_md = args.out or ROOT / "benchmarks" / "results" / f"pocus_transfer{suffix}.md"
    for sub in ("pocus", "covid-blues"):
        if not (args.data / sub).is_dir():
            print(f"pocus_transfer: {args.data / sub} not found (needs ../shared/data)", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    work.mkdir(parents=True, exist_ok=True)
    lines_log: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines_log.append(msg)

    from medcl.evaluate.classify import FinetuneConfig, finetune
    from medcl.weights import InitSpec
    from medcl.evaluate.compare import compare_runs, comparison_markdown

    started = time.perf_counter()
    timings = {}
    t0 = time.perf_counter()
    pocus, blues = ingest_data(args.data, work, s, log)
    timings["ingest"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    checkpoints = pretrain_all(blues, work, s, log)
    timings["pretrain (4 runs)"] = time.perf_counter() - t0

    base = dict(image_size=s.size, folds=s.folds, repeats=s.repeats, seed=s.seed, classes=CLASSES,
                max_train_frames_per_video=s.max_train_frames_per_video, patience=s.patience,
                device="cuda" if torch.cuda.is_available() else "cpu",
                save_models=False)  # ~90 fold models of 45 MB each would serve no one here
    quiet = lambda msg: None  # noqa: E731
    inits_all = [InitSpec("scratch")] + [InitSpec(n, str(p)) for n, p in checkpoints.items()]
    if args.imagenet is not None:
        inits_all.append(InitSpec("imagenet", str(args.imagenet)))
    else:
        log("no --imagenet weights file (or MEDCL_IMAGENET_WEIGHTS): the ImageNet row is skipped")
    with_imagenet = ["imagenet"] if args.imagenet is not None else []
    results = {}
    sections = []
    for protocol, inits, epochs in (
        ("last_stage", inits_all, s.finetune_epochs_last_stage),
        ("full", [i for i in inits_all if i.name in ("scratch", "simclr", "uscl", *with_imagenet)], s.finetune_epochs_full),
        ("linear", [InitSpec("scratch")], s.finetune_epochs_last_stage),
    ):
        t0 = time.perf_counter()
        config = FinetuneConfig(protocol=protocol, epochs=epochs, **base)
        # the benchmark owns its work folder: a rerun replaces its earlier fine-tuning results
        results[protocol] = finetune(pocus, inits, config, work / "finetune" / protocol, log=quiet, n_boot=s.n_boot,
                                     overwrite=True)
        timings[f"fine-tune {protocol} ({len(inits)} inits)"] = time.perf_counter() - t0
        log(f"fine-tune {protocol}: {time.perf_counter() - t0:.0f} s")
    timings["total"] = time.perf_counter() - started

    ft = work / "finetune"
    # all initialisations vs scratch (last_stage and full); ablation rows vs frame-level pairs; USCL vs SimCLR
    # (title, run folders with the baseline first, display names or None for the recorded init names)
    comparisons = [
        ("last_stage: every initialisation vs scratch", [ft / "last_stage" / i.name for i in inits_all], None),
        ("last_stage: ablation rows vs frame-level pairs (SimCLR)",
         [ft / "last_stage" / n for n in ("simclr", "plus_i1", "plus_i2", "uscl")], None),
        ("full: SimCLR and USCL vs scratch", [ft / "full" / n for n in ("scratch", "simclr", "uscl")], None),
        ("full: USCL vs SimCLR", [ft / "full" / n for n in ("simclr", "uscl")], None),
        *([("last_stage: USCL vs ImageNet", [ft / "last_stage" / n for n in ("imagenet", "uscl")], None),
           ("full: USCL vs ImageNet", [ft / "full" / n for n in ("imagenet", "uscl")], None)] if with_imagenet else []),
        ("random backbone: linear probe vs last_stage", [ft / "linear", ft / "last_stage" / "scratch"],
         ["linear probe (random)", "last_stage (random)"]),
    ]
    verdict = []
    for title, dirs, names in comparisons:
        result = compare_runs(dirs, metrics=("accuracy", "macro_f1"), n_boot=s.n_boot, seed=s.seed, names=names)
        for pair in result["levels"]["video"]["pairs"]:
            if pair["metric"] == "macro_f1" and pair["run"] == "uscl" and pair["baseline"] in ("scratch", "simclr",
                                                                                                "imagenet"):
                ok = pair["ci_low"] > 0
                verdict.append(
                    f"| {title.split(':')[0]} | USCL vs {pair['baseline']} | {pair['value']:.3f} vs "
                    f"{pair['baseline_value']:.3f} | {pair['diff']:+.3f} [{pair['ci_low']:+.3f}, {pair['ci_high']:+.3f}] | "
                    f"{pair['folds_better']}/{pair['folds_worse']} of {pair['n_folds']} | {'**yes**' if ok else 'no'} |")
        text = comparison_markdown(result).replace("# Paired comparison", f"## {title}", 1)
        sections.append(text.replace("\n## ", "\n### "))

    def row(protocol: str, name: str, label: str) -> str:
        res = results[protocol]["runs"][name]
        v, f = res["summary"]["video"], res["summary"]["frame"]
        cell = lambda d, k: f"{d[k]['mean']:.3f} ± {d[k]['std']:.3f}" if d[k]["mean"] is not None else "n/a"  # noqa: E731
        return (f"| {protocol} | {label} | {cell(v, 'accuracy')} | {cell(v, 'macro_f1')} | {cell(v, 'roc_auc_ovr')} | "
                f"{cell(f, 'accuracy')} | {cell(f, 'macro_f1')} |")

    labels = ({"scratch": "random init (scratch)", "imagenet": "ImageNet (torchvision weights from --imagenet)"}
              | {n: lbl for n, lbl, _ in pretrain_variants(s)})
    table = ["| protocol | initialisation | video acc | video macro-F1 | video AUC | frame acc | frame macro-F1 |",
             "|---|---|---|---|---|---|---|"]
    for protocol in ("last_stage", "full"):
        for name in results[protocol]["runs"]:
            table.append(row(protocol, name, labels[name]))
    table.append(row("linear", "scratch", "linear probe on a random backbone"))

    first = results["last_stage"]["runs"]["scratch"]
    n_test = sum(f["n_test_videos"] for f in first["folds"])
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cmd = "python benchmarks/pocus_transfer.py" + (" " + " ".join(sys.argv[1:] if argv is None else argv)).rstrip()
    text = [
        f"# POCUS transfer (USCL Tables 1-2 at CPU scale){' -- QUICK plumbing run, numbers meaningless' if args.quick else ''}",
        "", f"Command: `{cmd}`", "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {os.cpu_count()} cores, {cpu}, "
        f"torch {torch.__version__}, {args.threads} threads, device {base['device']}; load average at the end "
        f"{os.getloadavg()[0]:.1f}.", "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in asdict(s).items()) + ".", "",
        f"Fine-tuning data: POCUS convex videos (every {s.pocus_every}.), classes {CLASSES}, {n_test} videos tested per repeat "
        f"({s.folds} folds x {s.repeats} repeat(s), stratified and grouped by patient; validation carved from the "
        "training folds by patient; test fold evaluated once). Pretraining: COVID-BLUES "
        f"(every {s.blues_every}. video), weak label = COVID PCR of the patient (USCL's CE only).", "",
        "## Results (mean ± std over test folds)", "", *table, "",
        "## The goal: USCL above scratch and above SimCLR in video macro-F1, paired 95% interval above zero", "",
        "Pooled video-level macro-F1 of the test predictions (mean over repeats); difference with the "
        "patient-bootstrap interval; folds better/worse; met = interval excludes zero.", "",
        "| protocol | comparison | macro-F1 | difference [95% CI] | folds better/worse | met |",
        "|---|---|---|---|---|---|", *verdict, "",
        "## Timings", "", "| stage | seconds |", "|---|---|", *[f"| {k} | {v:.0f} |" for k, v in timings.items()], "",
        "# Paired comparisons", "",
        "Difference = run - baseline on the same test videos; 95% interval from a bootstrap over patients.", "",
        *sections,
        "## Log", "", "```", *lines_log, "```", "",
    ]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(text))
    (work / "summary.json").write_text(json.dumps({"settings": asdict(s), "timings": timings,
                                                   "runs": {p: {n: r["summary"] for n, r in res["runs"].items()}
                                                            for p, res in results.items()}}, indent=1))
    print(f"written {out_md} ({timings['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
