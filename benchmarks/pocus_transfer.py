"""USCL's transfer experiment on POCUS at a credible CPU scale: which pretraining corpus helps, one command.

    python benchmarks/pocus_transfer.py                   # full run (wall time in the results file)
    python benchmarks/pocus_transfer.py --stage pretrain  # only the (cached) pretraining runs
    python benchmarks/pocus_transfer.py --quick           # plumbing check in a few minutes

1. Ingest POCUS (convex-probe videos of covid / pneumonia / regular) and COVID-BLUES (COVID PCR per
   patient as the weak label) from ../shared/data at 112 px, 3 frames/s.
2. The POCUS folds (5-fold by patient, stratified; validation carved from the training folds) are
   fixed first, because in-domain pretraining must never see a fold's test videos.
3. Pretrain a ResNet-18 with SimCLR (frame-level pairs) and USCL (video pairs, mixup, CE on 1% of
   the labels) on three corpora:
   - ``pocus``: per fold, that fold's POCUS training + validation videos (a hospital pretraining
     on its own archive; ``pretrain_epochs``);
   - ``blues``: COVID-BLUES (another hospital's lung ultrasound; ``blues_epochs``), one run per
     method shared by every fold;
   - ``both``: the COVID-BLUES backbone continued on the fold's POCUS videos (``model.init``).
   Per-fold backbones are evaluated as per-fold inits (``{repeat}`` / ``{fold}`` in the init path).
4. Fine-tune on POCUS, the SAME folds for every initialisation: a ``linear`` probe for every init
   (frozen backbone: the standard self-supervised evaluation; for scratch, a random backbone),
   ``last_stage`` (the paper's protocol: layer4 + a new linear head) for every init, and ``full``
   for scratch and the in-domain inits. The in-domain runs keep a snapshot every ``snapshot_epochs``
   (``train.snapshot_every``): linear probes along the run measure what pretraining length buys.
   The shortcut test (how well frozen features predict the video's SOURCE) and bf16 vs fp32
   pretraining (USCL on COVID-BLUES twice: loss curves and downstream) follow.
5. Paired differences with patient-bootstrap 95% intervals (every init vs scratch, USCL vs SimCLR
   per corpus), the same on the videos of mixed-class sources only (POCUS classes are confounded
   with their sources), the goals, and the published numbers; writes
   benchmarks/results/pocus_transfer.md (``--quick``: pocus_transfer_quick.md) and keeps every
   run folder under benchmarks/work/pocus_transfer/ (ignored by git).

Nothing is tuned on the test folds. ``Settings.tables_1_2()`` keeps the first version's settings
(64 px, COVID-BLUES only, 25 epochs), which benchmarks/table3.py and the shared pretraining cache
use. The committed results file adds a hand-written Discussion of its run (a rerun rewrites the numbers).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["covid", "pneumonia", "regular"]


@dataclass
class Settings:
    size: int = 112
    blues_every: int = 1  # take every N-th COVID-BLUES video
    pocus_every: int = 1  # take every N-th POCUS convex video (quick runs only)
    pretrain_epochs: int = 100  # in-domain (each fold's POCUS videos) and the POCUS part of "both"
    blues_epochs: int = 30  # cross-domain: COVID-BLUES, one run per method shared by every fold
    pretrain_batch: int = 32
    warmup_epochs: float = 2.0
    label_fraction: float = 0.01  # USCL's CE labels: 1% of the videos (at least one per class)
    finetune_epochs_last_stage: int = 15
    finetune_epochs_full: int = 10
    max_train_frames_per_video: int = 10
    folds: int = 5
    repeats: int = 1
    patience: int = 5
    n_boot: int = 2000
    seed: int = 0
    corpora: tuple[str, ...] = ("pocus", "blues", "both")
    methods: tuple[str, ...] = ("simclr", "uscl")
    full_inits: tuple[str, ...] = ("scratch", "simclr-pocus", "uscl-pocus")  # inits that also get `full` fine-tuning
    fp32_twin: bool = True  # USCL on COVID-BLUES once more in fp32: loss curves and downstream side by side
    snapshot_epochs: int = 25  # in-domain runs keep a snapshot every N epochs: linear probes along the run

    @classmethod
    def quick(cls) -> Settings:
        return cls(size=32, blues_every=12, pocus_every=3, pretrain_epochs=2, blues_epochs=1, pretrain_batch=8,
                   warmup_epochs=0.0, finetune_epochs_last_stage=2, finetune_epochs_full=1,
                   max_train_frames_per_video=2, folds=3, patience=2, n_boot=300, snapshot_epochs=1)

    @classmethod
    def tables_1_2(cls) -> Settings:
        """The settings of the first benchmark (64 px, COVID-BLUES only, 25 epochs, 2 repeats): what
        benchmarks/table3.py keeps, so its rows stay comparable with its committed results."""
        return cls(size=64, pretrain_epochs=25, repeats=2)


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


def pretrain_budget(manifest: Path, s: Settings) -> dict[str, int | float]:
    """The step count every pretraining variant runs on ``manifest`` and the corpus sizes behind it:
    ``pretrain_epochs`` video epochs of ``pretrain_batch`` (an "epoch" of frame-level pairing walks
    over every frame, one of video-level pairing over every video: ``frame_steps`` / ``video_steps``)."""
    from medcl.data.manifest import read_manifest

    records = [r for r in read_manifest(manifest) if r.n_frames > 0]
    frames = sum(r.n_frames for r in records)
    video_steps = len(records) // s.pretrain_batch
    return {"videos": len(records), "frames": frames, "video_steps": video_steps,
            "frame_steps": frames // s.pretrain_batch, "total_steps": max(1, s.pretrain_epochs * video_steps),
            "warmup_steps": s.warmup_epochs * video_steps}


def pretrain_all(blues: Path, work: Path, s: Settings, log, only: tuple[str, ...] | None = None,
                 variants: list[tuple[str, str, dict]] | None = None) -> dict[str, Path]:
    """Pretrain each variant of :func:`pretrain_variants` (or ``variants``; ``only``: these names) on
    ``blues``; a run folder under ``work/pretrain`` whose name carries a digest of its config is
    reused (the cache other benchmarks share). A variant's own ``optim`` entries (batch size, warm-up)
    override the shared ones; every variant runs the same number of steps."""
    from medcl.train.api import pretrain

    # same number of optimisation steps (= same images seen) for every variant
    b = pretrain_budget(blues, s)
    video_steps, frame_steps, total_steps, warmup_steps = (b["video_steps"], b["frame_steps"], b["total_steps"],
                                                           b["warmup_steps"])
    log(f"pretraining: {total_steps} steps of {s.pretrain_batch} pairs per variant ({s.pretrain_epochs} video epochs)")
    runs = {}
    for name, label, variant in (pretrain_variants(s) if variants is None else variants):
        if only is not None and name not in only:
            continue
        config = deep_update({
            "data": {"manifest": str(blues), "size": s.size},
            "optim": {"epochs": s.pretrain_epochs, "batch_size": s.pretrain_batch, "max_steps": total_steps,
                      "warmup_epochs": warmup_steps / (frame_steps if variant.get("sampling", {}).get("pairing")
                                                       == "frame" else video_steps)},
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


def setup_run(args: argparse.Namespace, quick: bool, name: str) -> tuple[Path, Path, Callable[[str], None], list[str]]:
    """(work folder, results file, log, log lines) of a POCUS benchmark: the default work folder
    is pocus_transfer's (its ingest and pretraining cache); torch threads from ``--threads``."""
    suffix = "_quick" if quick else ""
    work = args.work or ROOT / "benchmarks" / "work" / f"pocus_transfer{suffix}"
    out_md = args.out or ROOT / "benchmarks" / "results" / f"{name}{suffix}.md"
    for sub in ("pocus", "covid-blues"):
        if not (args.data / sub).is_dir():
            raise SystemExit(f"{name}: {args.data / sub} not found (needs ../shared/data)")
    torch.set_num_threads(args.threads)
    work.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
        lines.append(msg)

    return work, out_md, log, lines


def machine_line(threads: int, device: str) -> str:
    from medcl.environment import collect_environment

    env = collect_environment()
    flags = ", ".join(env.get("cpu_bf16_flags") or []) or "no native bf16"
    return (f"Machine: {env.get('cpu', os.cpu_count())} ({flags}), torch {torch.__version__}, {threads} threads, "
            f"device {device}; load average at the end {os.getloadavg()[0]:.1f}.")


def report_head(script: str, title: str, args: argparse.Namespace, argv, device: str, timings: dict) -> list[str]:
    """Title, command, date, machine and wall time of a results file."""
    cmd = f"python benchmarks/{script}" + (" " + " ".join(sys.argv[1:] if argv is None else argv)).rstrip()
    return [f"# {title}{' -- QUICK plumbing run, numbers meaningless' if args.quick else ''}", "", f"Command: `{cmd}`", "",
            f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
            f"{machine_line(args.threads, device)} Wall time {timings['total'] / 60:.0f} min.", ""]


def write_report(out_md: Path, body: list[str], timings: dict[str, float], baseline: str, sections: list[str],
                 lines_log: list[str], summary: Path, settings: Settings, results: dict, **extra) -> None:
    """The results file (body, timings, the paired comparisons, the log) and its JSON summary."""
    record = {"settings": asdict(settings), "timings": timings, **extra,
              "runs": {p: {n: r["summary"] for n, r in res["runs"].items()} for p, res in results.items()}}
    text = [*body,
            "## Timings", "", "| stage | seconds |", "|---|---|", *[f"| {k} | {v:.0f} |" for k, v in timings.items()], "",
            "# Paired comparisons (accuracy and macro-F1)", "",
            f"Difference = run - {baseline} on the same test videos; 95% interval from a bootstrap over patients.", "",
            *sections, "## Log", "", "```", *lines_log, "```", ""]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(text))
    summary.write_text(json.dumps(record, indent=1))
    print(f"written {out_md} ({timings['total']:.0f} s)")


CORPUS_LABELS = {"pocus": "POCUS training folds", "blues": "COVID-BLUES", "both": "COVID-BLUES, then POCUS training folds",
                 "blues-fp32": "COVID-BLUES, pretrained in fp32"}
METHOD_LABELS = {"simclr": "SimCLR", "uscl": "USCL"}


def init_label(name: str) -> str:
    if name == "scratch":
        return "random init (scratch)"
    if name == "imagenet":
        return "ImageNet (torchvision weights from --imagenet)"
    name, _, epoch = name.partition("@")
    method, corpus = name.split("-", 1)
    return f"{METHOD_LABELS[method]} on {CORPUS_LABELS[corpus]}" + (f", snapshot at epoch {epoch}" if epoch else "")


def link_fold_init(links: Path, repeat: int, fold: int, target: Path) -> None:
    """``links/r<repeat>-f<fold>.pt`` -> ``target``: a stable per-fold name for a cached checkpoint."""
    links.mkdir(parents=True, exist_ok=True)
    link = links / f"r{repeat}-f{fold}.pt"
    link.unlink(missing_ok=True)
    link.symlink_to(target.resolve())


def fold_manifests(pocus: Path, folds, video_ids: list[str]) -> dict[tuple[int, int], Path]:
    """Per (repeat, fold): a manifest of the POCUS videos the fold may pretrain on (its training
    and validation videos; never its test videos), beside the ingest's manifest.csv (frame paths
    are relative to that folder)."""
    from medcl.data.manifest import read_manifest, write_manifest

    records = {r.video_id: r for r in read_manifest(pocus)}
    out = {}
    for f in folds:
        keep = {video_ids[i] for i in (*f.train, *f.val)}
        assert not keep & {video_ids[i] for i in f.test}, "a test video in a pretraining corpus"
        path = pocus / f"pretrain-r{f.repeat}-f{f.fold}.csv"
        write_manifest(path, [records[v] for v in sorted(keep)])
        out[(f.repeat, f.fold)] = path
    return out


def pretrain_corpora(pocus: Path, blues: Path, folds, video_ids: list[str], work: Path, s: Settings, log,
                     ) -> dict[str, str]:
    """Every pretrained init: {name: checkpoint path, or a per-fold template with {repeat} / {fold}}.

    - ``<method>-blues``: one COVID-BLUES run per method (``blues_epochs``), shared by every fold;
    - ``<method>-pocus``: per fold, on that fold's POCUS training + validation videos (``pretrain_epochs``);
    - ``<method>-both``: per fold, the COVID-BLUES run continued on the fold's POCUS videos
      (``model.init`` = the COVID-BLUES backbone; ``pretrain_epochs`` more).
    - ``<method>-pocus@<epoch>``: the in-domain runs' snapshots every ``snapshot_epochs`` epochs
      (``train.snapshot_every``; points along one cosine run, not separately scheduled shorter runs).
    Each run lands in pretrain_all's digest-keyed cache; stable per-fold names are symlinks
    under ``work/inits``."""
    from medcl.train.trainer import snapshot_name

    variants = {name: (name, label, v) for name, label, v in pretrain_variants(s) if name in s.methods}
    inits: dict[str, str] = {}
    blues_runs: dict[str, Path] = {}
    if {"blues", "both"} & set(s.corpora):
        blues_s = replace(s, pretrain_epochs=s.blues_epochs)
        blues_runs = pretrain_all(blues, work, blues_s, log, variants=list(variants.values()))
        if "blues" in s.corpora:
            inits.update({f"{m}-blues": str(path) for m, path in blues_runs.items()})
        if s.fp32_twin and "blues" in s.corpora and "uscl" in variants:
            name, label, variant = variants["uscl"]
            twin = pretrain_all(blues, work, blues_s, log, variants=[
                (name, label + ", fp32", deep_update(variant, {"train": {"precision": "fp32"}}))])
            inits["uscl-blues-fp32"] = str(twin[name])
    manifests = fold_manifests(pocus, folds, video_ids)
    for corpus in [c for c in ("pocus", "both") if c in s.corpora]:
        for method, (name, label, variant) in variants.items():
            if corpus == "both":
                variant = deep_update(variant, {"model": {"init": str(blues_runs[method])}})
            snapshots: set[int] = set()
            for (repeat, fold), manifest in manifests.items():
                log(f"{method} on {CORPUS_LABELS[corpus]}, repeat {repeat} fold {fold} ({manifest.name})")
                every = s.snapshot_epochs * pretrain_budget(manifest, s)["video_steps"]
                fold_variant = (deep_update(variant, {"train": {"snapshot_every": every}})
                                if corpus == "pocus" and 0 < s.snapshot_epochs < s.pretrain_epochs else variant)
                run = pretrain_all(manifest, work / f"pretrain-{corpus}" / f"r{repeat}-f{fold}", s, log,
                                   variants=[(name, label, fold_variant)])[name]
                link_fold_init(work / "inits" / f"{method}-{corpus}", repeat, fold, run)
                if fold_variant is not variant:
                    for k in range(1, -(-s.pretrain_epochs // s.snapshot_epochs)):
                        epoch = k * s.snapshot_epochs
                        link_fold_init(work / "inits" / f"{method}-{corpus}@{epoch}", repeat, fold,
                                       run.parent / snapshot_name(k * every))
                        snapshots.add(epoch)
            inits[f"{method}-{corpus}"] = str(work / "inits" / f"{method}-{corpus}" / "r{repeat}-f{fold}.pt")
            inits.update({f"{method}-{corpus}@{e}": str(work / "inits" / f"{method}-{corpus}@{e}" / "r{repeat}-f{fold}.pt")
                          for e in sorted(snapshots)})
    return inits


def precision_section(pretrained: dict[str, str], out_png: Path) -> list[str]:
    """bf16 (``precision: auto`` on this CPU) vs fp32 pretraining of USCL on COVID-BLUES: the loss
    curves side by side (a table every ~10% of the run, and a plot) and the steps/s of each."""
    if "uscl-blues-fp32" not in pretrained or "uscl-blues" not in pretrained:
        return []

    def curve(ckpt: str) -> tuple[list[dict], str]:
        run = Path(ckpt).parents[1]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        env = json.loads((run / "environment.json").read_text()) if (run / "environment.json").is_file() else {}
        return [r for r in rows if "loss" in r], str(env.get("precision", ""))

    auto, auto_env = curve(pretrained["uscl-blues"])
    fp32, _ = curve(pretrained["uscl-blues-fp32"])
    n = min(len(auto), len(fp32))
    if n == 0:
        return []

    def smooth(rows: list[dict], i: int, w: int = 25) -> float:
        window = rows[max(0, i - w + 1): i + 1]
        return sum(r["loss"] for r in window) / len(window)

    marks = sorted({0, *range(max(1, n // 10) - 1, n, max(1, n // 10)), n - 1})
    gap = [abs(smooth(auto, i) - smooth(fp32, i)) for i in range(n)]
    rate = lambda rows: sorted(r["steps_per_s"] for r in rows if "steps_per_s" in r)[len(rows) // 2]  # noqa: E731
    lines = ["## bf16 vs fp32 pretraining (USCL on COVID-BLUES, same seed and batches)", "",
             f"{n} steps each. Loss = total USCL loss per step; smoothed = mean of the last 25 steps. "
             f"Median steps/s: auto {rate(auto):.2f} vs fp32 {rate(fp32):.2f} ({rate(auto) / rate(fp32):.2f}x). "
             f"auto precision here: {auto_env or 'see the run environment.json'}. "
             f"Largest smoothed-loss gap: {max(gap):.3f}; mean gap {sum(gap) / n:.3f}. "
             f"Plot: `{out_png.name}`. Downstream: the `uscl-blues-fp32` rows above.", "",
             "| step | loss auto (bf16) | loss fp32 | smoothed auto | smoothed fp32 |", "|---|---|---|---|---|"]
    for i in marks:
        lines.append(f"| {auto[i]['step']} | {auto[i]['loss']:.3f} | {fp32[i]['loss']:.3f} | {smooth(auto, i):.3f} | "
                     f"{smooth(fp32, i):.3f} |")
    from medcl.report.plots import figure_png, plt  # the report's headless figures

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for rows, label in ((auto, "auto (bf16 here)"), (fp32, "fp32")):
        ax.plot([r["step"] for r in rows[:n]], [smooth(rows, i) for i in range(n)], label=label)
    ax.set_xlabel("step"), ax.set_ylabel("USCL loss (25-step mean)"), ax.legend()
    ax.set_title("USCL on COVID-BLUES: bf16 autocast vs fp32")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    out_png.write_bytes(figure_png(fig))
    return lines + [""]


def length_section(linear: dict, s: Settings, out_png: Path) -> list[str]:
    """Linear-probe video macro-F1 along the in-domain runs (epoch 0 = the random backbone, then the
    snapshots, then the final checkpoint): a table per method and a plot."""
    runs = linear["runs"]
    curves = {}
    for method in s.methods:
        points = [(0, "scratch")] + sorted((int(n.split("@")[1]), n) for n in runs if n.startswith(f"{method}-pocus@"))
        points.append((s.pretrain_epochs, f"{method}-pocus"))
        points = [(e, n) for e, n in points if n in runs]
        if len(points) > 2:
            curves[method] = [(e, runs[n]["summary"]["video"]["macro_f1"]) for e, n in points]
    if not curves:
        return []
    epochs = sorted({e for c in curves.values() for e, _ in c})
    lines = ["## Pretraining length: linear probe along the in-domain runs", "",
             f"Video macro-F1 (mean ± std over test folds) of a linear probe on the frozen backbone after N of the "
             f"{s.pretrain_epochs} epochs of in-domain pretraining (each fold's own run; epoch 0 = the random backbone). "
             "The intermediate points are snapshots of one cosine-scheduled run (learning rate not yet annealed), "
             f"not separately scheduled shorter runs. Plot: `{out_png.name}`.", "",
             "| method | " + " | ".join(f"epoch {e}" for e in epochs) + " |", "|---|" + "---|" * len(epochs)]
    for method, curve in curves.items():
        at = dict(curve)
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(
            f"{at[e]['mean']:.3f} ± {at[e]['std']:.3f}" if e in at else "" for e in epochs) + " |")
    from medcl.report.plots import figure_png, plt  # the report's headless figures

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for method, curve in curves.items():
        ax.errorbar([e for e, _ in curve], [v["mean"] for _, v in curve], yerr=[v["std"] for _, v in curve],
                    marker="o", capsize=3, label=METHOD_LABELS[method])
    ax.set_xlabel("in-domain pretraining epochs"), ax.set_ylabel("linear probe video macro-F1")
    ax.set_title("POCUS: linear probe along pretraining"), ax.legend()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    out_png.write_bytes(figure_png(fig))
    return lines + [""]


def source_probe(frame_data, folds, inits, sources: dict[str, str], s: Settings, device: str = "cpu") -> list[str]:
    """The shortcut test: how well each init's FROZEN features predict the video's SOURCE (and, on
    the same features, its class), with a logistic regression fitted on each fold's training frames
    and scored on its test frames (at most ``max_train_frames_per_video`` frames per training video;
    per-fold inits use each fold's own backbone). Returns markdown lines."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    from medcl.evaluate.classify import compute_feature_cache, init_backbone
    from medcl.precision import resolve_precision

    video_source = np.array([sources.get(v, "") for v in frame_data.video_ids])
    frame_source = video_source[frame_data.frame_video]
    dtype = resolve_precision("auto", device)
    rows = []
    for init in inits:
        scores = {"source": [], "source_bal": [], "class": []}
        features, loaded_path = None, object()
        for fold in folds:
            spec = init.for_fold(fold.repeat, fold.fold)
            if spec.path != loaded_path:
                loaded = init_backbone(spec, seed=s.seed)
                features = compute_feature_cache(loaded.network, frame_data, loaded.input, torch.device(device),
                                                 dtype=dtype, memory_format=True).numpy()
                loaded_path = spec.path
            train = frame_data.frames_of(np.concatenate([fold.train, fold.val]), s.max_train_frames_per_video)
            test = frame_data.frames_of(fold.test)
            scaler = StandardScaler().fit(features[train])
            x_train, x_test = scaler.transform(features[train]), scaler.transform(features[test])
            for target, y in (("source", frame_source), ("class", frame_data.frame_labels)):
                clf = LogisticRegression(max_iter=2000, C=0.1).fit(x_train, y[train])
                pred = clf.predict(x_test)
                scores[target].append(float((pred == y[test]).mean()))
                if target == "source":
                    scores["source_bal"].append(float(balanced_accuracy_score(y[test], pred)))
        rows.append(f"| {init_label(init.name)} | " + " | ".join(
            f"{np.mean(v):.3f} ± {np.std(v):.3f}" for v in (scores["source"], scores["source_bal"], scores["class"])) + " |")
    n_sources = len({x for x in video_source if x})
    return ["## Shortcut test: do the frozen features identify the source?", "",
            f"A logistic regression (C 0.1, standardised features) on each init's frozen 512-d features, fitted on "
            f"each fold's training + validation frames and scored on its test frames: the video's SOURCE "
            f"({n_sources} sources; frame accuracy and balanced accuracy) and, on the same features, its CLASS "
            "(frame accuracy). High source accuracy with a class gain that vanishes on mixed-class sources = a shortcut.",
            "", "| initialisation | source acc | source balanced acc | class acc |", "|---|---|---|---|", *rows, ""]


def source_of_videos(data: Path, pocus: Path) -> dict[str, str]:
    """video_id -> POCUS source_id (metadata.csv), through the ingest manifest's source paths."""
    import csv

    from medcl.data.manifest import read_manifest

    with (data / "pocus" / "metadata.csv").open(newline="") as handle:
        by_file = {r["file"]: r.get("source_id", "") for r in csv.DictReader(handle)}
    return {r.video_id: by_file.get(r.source, "") for r in read_manifest(pocus)}


def mixed_source_videos(sources: dict[str, str], labels: dict[str, str]) -> set[str]:
    """Videos of the sources that hold more than one class: there the source cannot give the class away."""
    classes_of: dict[str, set[str]] = {}
    for v, src in sources.items():
        if v in labels:
            classes_of.setdefault(src, set()).add(labels[v])
    return {v for v, src in sources.items() if v in labels and src and len(classes_of[src]) > 1}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the whole script in minutes")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=None, help="run folders (default benchmarks/work/pocus_transfer[_quick])")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--stage", choices=("all", "pretrain"), default="all",
                        help="pretrain: only the pretraining runs (cached; a later full run reuses them)")
    parser.add_argument("--imagenet", type=Path, default=os.environ.get("MEDCL_IMAGENET_WEIGHTS") or None,
                        help="a torchvision / timm resnet18 state dict on disk (.pth or .safetensors; default: env "
                             "MEDCL_IMAGENET_WEIGHTS): adds the paper's ImageNet row; nothing is downloaded")
    args = parser.parse_args(argv)
    if args.imagenet is not None and not Path(args.imagenet).is_file():
        print(f"pocus_transfer: --imagenet {args.imagenet}: file not found", file=sys.stderr)
        return 2
    s = Settings.quick() if args.quick else Settings()
    work, out_md, log, lines_log = setup_run(args, args.quick, "pocus_transfer")

    from medcl.evaluate.classify import FinetuneConfig, finetune, load_frame_data, make_folds
    from medcl.evaluate.compare import compare_results, comparison_markdown, load_predictions
    from medcl.weights import InitSpec

    started = time.perf_counter()
    timings = {}
    t0 = time.perf_counter()
    pocus, blues = ingest_data(args.data, work, s, log)
    timings["ingest"] = time.perf_counter() - t0

    base = dict(image_size=s.size, folds=s.folds, repeats=s.repeats, seed=s.seed, classes=CLASSES,
                max_train_frames_per_video=s.max_train_frames_per_video, patience=s.patience,
                device="cuda" if torch.cuda.is_available() else "cpu",
                save_models=False)  # ~100 fold models of 45 MB each would serve no one here
    # the folds every fine-tuning run uses (deterministic in data + seed): pretraining must know them
    frame_data = load_frame_data(pocus, FinetuneConfig(**base))
    folds = make_folds(frame_data, FinetuneConfig(**base))
    t0 = time.perf_counter()
    pretrained = pretrain_corpora(pocus, blues, folds, frame_data.video_ids, work, s, log)
    timings[f"pretrain ({len(pretrained)} inits)"] = time.perf_counter() - t0
    if args.stage == "pretrain":
        log(f"pretraining done in {timings[f'pretrain ({len(pretrained)} inits)'] / 60:.1f} min")
        return 0

    inits_all = [InitSpec("scratch")] + [InitSpec(n, p) for n, p in pretrained.items()]
    if args.imagenet is not None:
        inits_all.append(InitSpec("imagenet", str(args.imagenet)))
    else:
        log("no --imagenet weights file (or MEDCL_IMAGENET_WEIGHTS): the ImageNet row is skipped")
    full = [i for i in inits_all if i.name in (*s.full_inits, "imagenet")]
    # the snapshots and the fp32 twin answer linear-probe questions (length, precision): linear only
    last_stage = [i for i in inits_all if "@" not in i.name and not i.name.endswith("-fp32")]
    results = {}
    quiet = lambda msg: None  # noqa: E731
    plan = (("linear", inits_all, s.finetune_epochs_last_stage), ("last_stage", last_stage, s.finetune_epochs_last_stage),
            ("full", full, s.finetune_epochs_full))
    for protocol, inits, epochs in plan:
        t0 = time.perf_counter()
        config = FinetuneConfig(protocol=protocol, epochs=epochs, **base)
        # the benchmark owns its work folder: a rerun replaces its earlier fine-tuning results
        results[protocol] = finetune(pocus, inits, config, work / "finetune" / protocol, log=quiet, n_boot=s.n_boot,
                                     overwrite=True)
        timings[f"fine-tune {protocol} ({len(inits)} inits)"] = time.perf_counter() - t0
        log(f"fine-tune {protocol}: {time.perf_counter() - t0:.0f} s")
    timings["total"] = time.perf_counter() - started

    ft = work / "finetune"
    sources = source_of_videos(args.data, pocus)
    t0 = time.perf_counter()
    probe_lines = source_probe(frame_data, folds, last_stage, sources, s, base["device"])  # snapshots, twin: no
    timings["source probe"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    labels = dict(zip(frame_data.video_ids, (frame_data.classes[i] for i in frame_data.video_labels)))
    mixed = mixed_source_videos(sources, labels)

    def pairs(protocol: str, names: list[str], only: set[str] | None = None) -> dict:
        """compare_results over run folders of ``protocol`` (first = baseline), optionally on the
        videos in ``only`` (source-controlled)."""
        tables = [load_predictions(ft / protocol / n)[1] for n in names]
        if only is not None:
            tables = [[row for row in table if row["video_id"] in only] for table in tables]
        return compare_results(tables, names, metrics=("accuracy", "macro_f1"), levels=("video",), n_boot=s.n_boot,
                               seed=s.seed)

    def pair_row(protocol: str, pair: dict, scope: str = "all videos") -> str:
        ok = "**yes**" if pair["ci_low"] > 0 else "no"
        return (f"| {protocol} | {scope} | {init_label(pair['run'])} vs {init_label(pair['baseline'])} | {pair['value']:.3f} vs "
                f"{pair['baseline_value']:.3f} | {pair['diff']:+.3f} [{pair['ci_low']:+.3f}, {pair['ci_high']:+.3f}] | "
                f"{pair['folds_better']}/{pair['folds_worse']} of {pair['n_folds']} | {ok} |")

    verdict, sections, controlled = [], [], []
    best_acc = max((res["summary"]["video"]["accuracy"]["mean"], protocol, name)
                   for protocol, r in results.items() for name, res in r["runs"].items())
    for protocol, inits, _ in plan:
        names = [i.name for i in inits]
        everyone = pairs(protocol, names)
        text = comparison_markdown(everyone).replace("# Paired comparison", f"## {protocol}: every init vs scratch", 1)
        sections.append(text.replace("\n## ", "\n### "))
        for pair in everyone["levels"]["video"]["pairs"]:
            if pair["metric"] == "macro_f1":
                verdict.append(pair_row(protocol, pair))
        for baseline, run in [(f"simclr-{c}", f"uscl-{c}") for c in s.corpora] + [("uscl-blues-fp32", "uscl-blues")]:
            if baseline in names and run in names:
                result = pairs(protocol, [baseline, run])
                verdict += [pair_row(protocol, p) for p in result["levels"]["video"]["pairs"] if p["metric"] == "macro_f1"]
        if mixed:
            result = pairs(protocol, names, mixed)
            controlled += [pair_row(protocol, p, f"{len(mixed)} videos of mixed-class sources")
                           for p in result["levels"]["video"]["pairs"] if p["metric"] == "macro_f1"]

    def cell(d: dict, k: str) -> str:
        return f"{d[k]['mean']:.3f} ± {d[k]['std']:.3f}" if d[k]["mean"] is not None else "n/a"

    table = ["| protocol | initialisation | video acc | video macro-F1 | video AUC | frame acc | frame macro-F1 |",
             "|---|---|---|---|---|---|---|"]
    for protocol, _, _ in plan:
        for name, res in results[protocol]["runs"].items():
            v, f = res["summary"]["video"], res["summary"]["frame"]
            table.append(f"| {protocol} | {init_label(name)} | {cell(v, 'accuracy')} | {cell(v, 'macro_f1')} | "
                         f"{cell(v, 'roc_auc_ovr')} | {cell(f, 'accuracy')} | {cell(f, 'macro_f1')} |")

    n_test = sum(f["n_test_videos"] for f in results["linear"]["runs"]["scratch"]["folds"])
    text = [
        *report_head("pocus_transfer.py", "POCUS transfer: in-domain, cross-domain and both", args, argv, base["device"],
                     timings),
        "Settings: " + ", ".join(f"{k}={v}" for k, v in asdict(s).items()) + ".", "",
        f"Fine-tuning data: POCUS convex videos (every {s.pocus_every}.), classes {CLASSES}, {n_test} videos tested per repeat "
        f"({s.folds} folds x {s.repeats} repeat(s), stratified and grouped by patient; validation carved from the "
        "training folds by patient; test fold evaluated once; the same folds for every initialisation). "
        "Pretraining corpora: POCUS training folds (per fold: that fold's training + validation videos, never its test "
        f"videos; {s.pretrain_epochs} epochs), COVID-BLUES (every {s.blues_every}. video, {s.blues_epochs} epochs, one run "
        f"shared by the folds) and both (the COVID-BLUES backbone continued for {s.pretrain_epochs} epochs on the fold's "
        "POCUS videos). USCL's CE uses 1% of the corpus' videos' labels (COVID PCR for COVID-BLUES, the POCUS class for "
        "POCUS training videos).", "",
        "## Results (mean ± std over test folds)", "", *table, "",
        f"Best video accuracy: {best_acc[0]:.3f} ({init_label(best_acc[2])}, {best_acc[1]}); goal >= 0.85 "
        f"{'**met**' if best_acc[0] >= 0.85 else 'not met'}. Published: POCOVID-Net (ImageNet VGG-16) 0.89 5-fold "
        "accuracy; the USCL paper 0.942 (224 px, 300 epochs on US-4, V100).", "",
        "## Paired differences: video macro-F1", "",
        "Pooled video-level macro-F1 of the test predictions (mean over repeats); difference with the patient-bootstrap "
        "95% interval; folds better/worse; ahead = interval above zero. Under `linear`, scratch is the linear probe on "
        "a random frozen backbone.", "",
        "| protocol | videos | comparison | macro-F1 | difference [95% CI] | folds better/worse | ahead |",
        "|---|---|---|---|---|---|---|", *verdict, "",
        "## Source-controlled: only videos of sources that hold more than one class", "",
        "POCUS classes are confounded with their source (several sources give one class only); on the videos of the "
        "mixed-class sources the source cannot give the class away.", "",
        "| protocol | videos | comparison | macro-F1 | difference [95% CI] | folds better/worse | ahead |",
        "|---|---|---|---|---|---|---|", *controlled, "",
        *length_section(results["linear"], s, out_md.with_name(out_md.stem + "_length.png")),
        *probe_lines,
        *precision_section(pretrained, out_md.with_name(out_md.stem + "_precision.png")),
    ]
    write_report(out_md, text, timings, "scratch", sections, lines_log, work / "summary.json", s, results,
                 inits=pretrained)
    return 0


if __name__ == "__main__":
    sys.exit(main())
