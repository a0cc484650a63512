"""One ultrasound encoder for classification AND segmentation: scratch / SimCLR / USCL / MixCL-CNN / joint,
each evaluated on POCUS classification and on BUS-BRA lesion segmentation, in stages that cache their work.

    python benchmarks/joint_2d.py --stage pretrain   # the encoders (cached; SimCLR / USCL shared with segment_2d.py)
    python benchmarks/joint_2d.py --stage pocus      # POCUS: linear probe + last_stage, 5 folds by patient
    python benchmarks/joint_2d.py --stage busbra     # BUS-BRA: 2D U-Net at 5% and 15% of the patients, folds 1-2
    python benchmarks/joint_2d.py --stage report     # benchmarks/results/joint_2d.md from the stages' run folders
    python benchmarks/joint_2d.py                    # every stage in turn (see the results file for the wall time)
    python benchmarks/joint_2d.py --quick            # every stage, tiny (joint_2d_quick.md)

Encoders (ResNet-18, 2D, 128 px), each for the same number of optimisation steps (pocus_transfer's
COVID-BLUES budget: ``pretrain_epochs`` video epochs of 32 pairs):
- SimCLR and USCL on COVID-BLUES videos (benchmarks/pocus_transfer.py's pretraining, shared cache);
- MixCL-CNN on the 2D ultrasound segmentation pool (HC18 fetal heads, TG3K thyroid nodules, CTRUS;
  NOT BUS-BRA, the segmentation target), ``log_grad_norms`` on: the scale of each term and of its
  gradient on the encoder is reported (does the label term fall, and does it push the encoder?);
- joint: one run on both (``method: joint``: USCL batch + pool batch every step, weight_video = 1 and
  ``weight_pixel`` from the measured gradient norms of the two streams, logged: ``grad_video`` / ``grad_pixel``).

Evaluations, the same folds / cases for every encoder: POCUS with pocus_transfer's protocols at
128 px (``linear`` probe and ``last_stage``, 5 folds by patient); BUS-BRA with segment_2d's U-Net
recipe at 5% and 15% of the training patients (where pretraining should matter), folds 1-2.
Goals (issue 17): the joint encoder at least as good as the best single-method encoder on both
tasks (paired intervals), and MixCL-CNN ahead of scratch at 5% on BUS-BRA (interval above zero).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pocus_transfer  # noqa: E402  (COVID-BLUES / POCUS ingest, the shared pretraining cache)
import segment_2d  # noqa: E402  (the BUS-BRA U-Net recipe)
from _segbench import Log, command_line, machine, write_results  # noqa: E402

ENCODERS = ("scratch", "simclr", "uscl", "mixcl_cnn", "joint")
LABELS = {"scratch": "scratch", "simclr": "SimCLR (videos)", "uscl": "USCL (videos)",
          "mixcl_cnn": "MixCL-CNN (pixel labels)", "joint": "joint (videos + pixel labels)"}
POOL = ("hc18", "tg3k", "ctrus")
STAGES = ("pretrain", "pocus", "busbra", "report")


@dataclass
class Settings:
    size: int = 128
    pretrain_epochs: int = 25  # COVID-BLUES video epochs (the step count of every encoder)
    pixel_batch: int = 8  # pooled images per step (MixCL-CNN, joint)
    # MixCL-CNN's label-term weight (MixCL-CNN and the joint's pixel part), set from measured gradient norms:
    # at the paper's 0.01 the label term pushed the encoder 1e-4 x as hard as the identity term (session 6)
    alpha: float = 100.0
    # the joint's pool weight (weight_video = 1), set from the measured grad_video / grad_pixel: at 1 / 1 the
    # pool's identity term dominated the shared encoder and the joint tracked MixCL-CNN on POCUS (session 6);
    # over the first 12 steps at weight 1 and alpha 100, grad_pixel / grad_video = 4058 / 7.05 = 576; measured at
    # 0.005 (session 8): the pool pushes 2.5x the videos over the first 25 steps, 0.4-0.5x from then on
    weight_pixel: float = 0.005
    pocus_folds: int = 5
    finetune_epochs: int = 15
    max_train_frames_per_video: int = 10
    seg_folds: list[int] = field(default_factory=lambda: [1, 2])
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.15])
    n_boot: int = 2000
    seed: int = 0
    quick: bool = False

    @property
    def patch(self) -> int:
        """Pool patch size (MixCL-CNN, joint): pool images resized so that a patch covers about what
        BUS-BRA's fine-tuning input shows (the whole image)."""
        return self.size if not self.quick else 32

    @classmethod
    def tiny(cls) -> Settings:
        return cls(size=64, pretrain_epochs=1, pixel_batch=2, pocus_folds=3, finetune_epochs=2,
                   max_train_frames_per_video=2, seg_folds=[1], fractions=[0.05], n_boot=200, quick=True)

    def pretraining(self) -> pocus_transfer.Settings:
        """pocus_transfer's settings for SimCLR / USCL (segment_2d's at the defaults: one shared cache)."""
        base = pocus_transfer.Settings.quick() if self.quick else pocus_transfer.Settings()
        return replace(base, size=self.size, pretrain_epochs=self.pretrain_epochs, seed=self.seed)

    def segmentation(self) -> segment_2d.Settings:
        base = segment_2d.Settings.quick() if self.quick else segment_2d.Settings()
        return replace(base, size=self.size, folds=list(self.seg_folds), fractions=list(self.fractions),
                       seed=self.seed)


def pool_datasets(data: Path) -> list[dict]:
    return [{"adapter": name, "root": str(data / "us-seg" / name)} for name in POOL]


def cached_path(name: str, config: dict, work: Path) -> Path:
    """Where :func:`cached_pretrain` puts ``config``'s final checkpoint: ``work/pretrain/<name>-<digest>``."""
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return work / "pretrain" / f"{name}-{digest}" / "checkpoints" / "final.pt"


def cached_pretrain(name: str, config: dict, work: Path, log) -> Path:
    """``medcl pretrain`` of ``config`` into ``work/pretrain/<name>-<digest>`` unless its final.pt exists;
    a run of the same config that stopped part-way (checkpoints/last.pt, no final.pt) is resumed."""
    from medcl.train.api import pretrain

    final = cached_path(name, config, work)
    out = final.parents[1]
    if final.is_file():
        log(f"pretrain {name}: reusing {final}")
        return final
    resume = (out / "checkpoints" / "last.pt").is_file()
    if out.exists() and not resume:  # stopped before its first checkpoint: nothing to keep
        shutil.rmtree(out)
    t0 = time.time()
    pretrain({**config, "out": str(out)}, resume=resume)
    seconds = time.time() - t0
    log(f"pretrain {name}: {'resumed, ' if resume else ''}{seconds:.0f} s")
    (out / "wall_seconds.txt").write_text(f"{seconds:.0f}\n")  # this (last) invocation's wall time, for reports
    return final


TRAIN = {"device": "auto", "progress": False, "tensorboard": False, "checkpoint_every": 100}


def mixcl_config(data: Path, s: Settings, steps: int) -> dict:
    """MixCL-CNN on the pool, ``steps`` optimisation steps, gradient norms of its terms logged."""
    mixcl = yaml.safe_load((ROOT / "configs" / "mixcl-cnn-2d.yaml").read_text())
    mixcl["mixcl_cnn"].update(datasets=pool_datasets(data), patch_size=s.patch, image_size=[s.patch * 5 // 4] * 2,
                              log_grad_norms=True, alpha=s.alpha)
    mixcl["optim"].update(batch_size=s.pixel_batch, max_steps=steps)
    mixcl["train"] = {**mixcl.get("train", {}), **TRAIN, "seed": s.seed}
    return mixcl


def joint_config(data: Path, s: Settings, blues: Path, steps: int) -> dict:
    """The joint encoder: USCL on the COVID-BLUES videos (pocus_transfer's settings) + the pool, ``steps``
    steps, grad_video / grad_pixel logged."""
    ps = s.pretraining()
    joint = yaml.safe_load((ROOT / "configs" / "joint-2d.yaml").read_text())
    joint["data"].update(manifest=str(blues), size=ps.size, label_fraction=ps.label_fraction)
    joint["optim"].update(batch_size=ps.pretrain_batch, epochs=ps.pretrain_epochs, max_steps=steps,
                          warmup_epochs=ps.warmup_epochs)
    joint["train"] = {**joint["train"], **TRAIN, "seed": s.seed}
    joint["joint"].update(pixel_batch_size=s.pixel_batch, weight_pixel=s.weight_pixel, log_grad_norms=True)
    joint["joint"]["pixel"].update(datasets=pool_datasets(data), patch_size=s.patch, image_size=[s.patch * 5 // 4] * 2,
                                   alpha=s.alpha)
    return joint


def stage_pretrain(args, s: Settings, work: Path, log) -> dict[str, str]:
    ps = s.pretraining()
    pre_work = ROOT / "benchmarks" / "work" / f"pocus_transfer{'_quick' if s.quick else ''}"
    pre_work.mkdir(parents=True, exist_ok=True)
    blues = pocus_transfer.ingest_blues(args.data, pre_work, ps, log)
    checkpoints = {k: str(v) for k, v in pocus_transfer.pretrain_all(blues, pre_work, ps, log,
                                                                    only=("simclr", "uscl")).items()}
    steps = pocus_transfer.pretrain_budget(blues, ps)["total_steps"]  # SimCLR's / USCL's step count
    checkpoints["mixcl_cnn"] = str(cached_pretrain("mixcl_cnn", mixcl_config(args.data, s, steps), work, log))
    checkpoints["joint"] = str(cached_pretrain("joint", joint_config(args.data, s, blues, steps), work, log))
    (work / "encoders.json").write_text(json.dumps(checkpoints, indent=1))
    return checkpoints


def inits(work: Path) -> list[str]:
    encoders = json.loads((work / "encoders.json").read_text())
    return ["scratch"] + [f"{name}={encoders[name]}" for name in ENCODERS[1:]]


def stage_pocus(args, s: Settings, work: Path, log) -> None:
    from medcl.evaluate.classify import FinetuneConfig, finetune

    ps = s.pretraining()
    pocus, _ = pocus_transfer.ingest_data(args.data, ROOT / "benchmarks" / "work" /
                                          f"pocus_transfer{'_quick' if s.quick else ''}", ps, log)
    base = dict(image_size=s.size, folds=s.pocus_folds, repeats=1, seed=s.seed, classes=pocus_transfer.CLASSES,
                max_train_frames_per_video=s.max_train_frames_per_video, patience=5, save_models=False,
                epochs=s.finetune_epochs)
    for protocol in ("linear", "last_stage"):
        t0 = time.time()
        finetune(pocus, inits(work), FinetuneConfig(protocol=protocol, **base), work / "pocus" / protocol,
                 log=lambda msg: None, n_boot=s.n_boot, overwrite=True)
        log(f"POCUS {protocol}: {time.time() - t0:.0f} s")


def stage_busbra(args, s: Settings, work: Path, log) -> None:
    from medcl.data.seg_manifest import busbra_task
    from medcl.evaluate.segment import finetune

    ss = s.segmentation()
    task = busbra_task(args.data / "us-seg" / "busbra")
    cfg = ss.segment_config(args.threads).model_copy(update={"n_overlays": 0})
    t0 = time.time()
    finetune(task, inits(work), cfg, work / "busbra", log=log, n_boot=s.n_boot, overwrite=True)
    log(f"BUS-BRA: {time.time() - t0:.0f} s")


# ------------------------------------------------------------------------------------------ report
def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def logged_rows(metrics: Path, key: str) -> list[dict]:
    """The rows of a pretraining run's metrics.jsonl that hold ``key``."""
    if not metrics.is_file():
        return []
    return [r for r in (json.loads(line) for line in metrics.read_text().splitlines() if line.strip()) if key in r]


def term_account(metrics: Path, keys: tuple[str, ...], ratio: tuple[str, str] | None, title: str,
                 note: str) -> list[str]:
    """The first-10% and last-10% means of ``keys`` over a pretraining run's metrics.jsonl, and
    sum(ratio[0]) / sum(ratio[1]) over the run (unless ``ratio`` is None)."""
    rows = logged_rows(metrics, keys[0])
    if not rows:
        return []
    tenth = max(1, len(rows) // 10)

    def mean(key: str, part: list[dict]) -> float:
        values = [r[key] for r in part if key in r]
        return sum(values) / len(values) if values else float("nan")

    lines = [f"## {title}", "", f"From the pretraining run's metrics ({len(rows)} steps; first and last 10% of the "
             f"steps averaged). {note}", "", "| quantity | first 10% | last 10% | change |", "|---|---|---|---|"]
    for key in keys:
        a, b = mean(key, rows[:tenth]), mean(key, rows[-tenth:])
        lines.append(f"| {key} | {a:.4g} | {b:.4g} | {(b - a) / a * 100 if a else float('nan'):+.0f}% |")
    if ratio is None:
        return lines + [""]
    value = sum(r[ratio[0]] for r in rows) / max(sum(r[ratio[1]] for r in rows), 1e-30)
    return lines + ["", f"Over the run (summed over the steps), {ratio[0]} / {ratio[1]} = **{value:.3g}**.", ""]


def label_term_account(work: Path, s: Settings) -> list[str]:
    """Scale of MixCL-CNN's terms and of each weighted term's gradient on the encoder, over its run;
    and the joint run's two streams (grad_video / grad_pixel on the shared encoder)."""
    encoders = json.loads((work / "encoders.json").read_text())
    lines = term_account(Path(encoders["mixcl_cnn"]).parents[1] / "metrics.jsonl",
                         ("loss_id", "loss_label", "loss_recon", "grad_id", "grad_label", "grad_recon"),
                         ("grad_label", "grad_id"), "MixCL-CNN: the scale of each term and of its gradient on the encoder",
                         f"`grad_*`: norm of the WEIGHTED term's gradient on the encoder's parameters (alpha = "
                         f"{s.alpha:g}, beta = 0.01).")
    lines += term_account(Path(encoders["joint"]).parents[1] / "metrics.jsonl",
                          ("grad_video", "grad_pixel", "video_loss", "pixel_loss", "pixel_loss_label"),
                          ("grad_pixel", "grad_video"), "Joint: how hard each stream pushes the shared encoder",
                          f"`grad_video` / `grad_pixel`: norm of the gradient of weight_video x L_USCL / weight_pixel "
                          f"x L_MixCL on the encoder (weight_video = 1, weight_pixel = {s.weight_pixel:g}).")
    return lines


def stage_report(args, s: Settings, work: Path, log, started: float, out_md: Path) -> None:
    from medcl.evaluate.compare import compare_results, compare_segmentation, comparison_markdown

    lines = ["# One ultrasound encoder for classification and segmentation: scratch / SimCLR / USCL / MixCL-CNN / joint",
             "", f"- command: `{command_line()}`", f"- machine: {machine()}",
             f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- wall time of this invocation: {(time.time() - started) / 60:.1f} min (stages cache their work)", "",
             "Settings: `" + json.dumps(asdict(s)) + "`", ""]
    names = list(ENCODERS)
    verdict = []
    pocus_dir = work / "pocus"
    if (pocus_dir / "last_stage" / "scratch" / "predictions.csv").is_file():
        lines += [f"## POCUS classification (video level, {s.pocus_folds} folds by patient)", "",
                  "| protocol | encoder | video acc | video macro-F1 |", "|---|---|---|---|"]
        for protocol in ("linear", "last_stage"):
            for name in names:
                summary = json.loads((pocus_dir / protocol / name / "results.json").read_text())["summary"]["video"]
                lines.append(f"| {protocol} | {LABELS[name]} | {summary['accuracy']['mean']:.3f} ± "
                             f"{summary['accuracy']['std']:.3f} | {summary['macro_f1']['mean']:.3f} ± "
                             f"{summary['macro_f1']['std']:.3f} |")
        lines.append("")
        for protocol in ("linear", "last_stage"):
            tables = [_rows(pocus_dir / protocol / n / "predictions.csv") for n in names]
            result = compare_results(tables, names, metrics=("macro_f1",), levels=("video",), n_boot=s.n_boot,
                                     seed=s.seed)
            lines.append(comparison_markdown(result).replace("\n## ", "\n#### ")
                         .replace("# Paired comparison", f"### POCUS {protocol}: vs scratch", 1))
            singles = [n for n in names if n not in ("scratch", "joint")]
            best = max(singles, key=lambda n: next(p["value"] for p in result["levels"]["video"]["pairs"]
                                                     if p["run"] == n))
            pair = compare_results([tables[names.index(best)], tables[names.index("joint")]], [best, "joint"],
                                   metrics=("macro_f1",), levels=("video",), n_boot=s.n_boot,
                                   seed=s.seed)["levels"]["video"]["pairs"][0]
            verdict.append(f"| POCUS {protocol} macro-F1 | joint vs best single ({LABELS[best]}) | {pair['diff']:+.3f} "
                           f"[{pair['ci_low']:+.3f}, {pair['ci_high']:+.3f}] | "
                           f"{'met' if pair['ci_high'] >= 0 else 'not met'} (at least as good: interval reaches 0) |")
    seg_dir = work / "busbra"
    if (seg_dir / "scratch" / "predictions.csv").is_file():
        tables = [_rows(seg_dir / n / "predictions.csv") for n in names]
        result = compare_segmentation(tables, names, n_boot=s.n_boot, seed=s.seed)
        lines += ["## BUS-BRA lesion segmentation (2D U-Net; test Dice, paired vs scratch)", "",
                  "| fraction | " + " | ".join(LABELS[n] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
        for fraction, entry in result["fractions"].items():
            lines.append(f"| {float(fraction) * 100:g}% | " + " | ".join(f"{entry['values'][n]:.3f}" for n in names) + " |")
        lines.append("")
        for fraction, entry in result["fractions"].items():
            for pair in entry["pairs"]:
                lines.append(f"- {float(fraction) * 100:g}%: {LABELS[pair['run']]} - scratch {pair['diff']:+.3f} "
                             f"[{pair['ci_low']:+.3f}, {pair['ci_high']:+.3f}], folds better {pair['folds_better']}/"
                             f"{pair['n_folds']}")
                if pair["run"] == "mixcl_cnn" and float(fraction) == 0.05:
                    verdict.append(f"| BUS-BRA 5% Dice | MixCL-CNN vs scratch | {pair['diff']:+.3f} [{pair['ci_low']:+.3f}, "
                                   f"{pair['ci_high']:+.3f}] | {'met' if pair['ci_low'] > 0 else 'not met'} |")
            singles = [n for n in names if n not in ("scratch", "joint")]
            best = max(singles, key=lambda n: entry["values"][n])
            pair = compare_segmentation([tables[names.index(best)], tables[names.index("joint")]], [best, "joint"],
                                        n_boot=s.n_boot, seed=s.seed)["fractions"][fraction]["pairs"][0]
            verdict.append(f"| BUS-BRA {float(fraction) * 100:g}% Dice | joint vs best single ({LABELS[best]}) | "
                           f"{pair['diff']:+.3f} [{pair['ci_low']:+.3f}, {pair['ci_high']:+.3f}] | "
                           f"{'met' if pair['ci_high'] >= 0 else 'not met'} (at least as good: interval reaches 0) |")
        lines.append("")
    lines += ["## Goals", "", "| goal | comparison | difference [95% CI] | verdict |", "|---|---|---|---|", *verdict, ""]
    if (work / "encoders.json").is_file():
        lines += label_term_account(work, s)
    write_results(out_md, lines, log)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every stage, tiny: checks the plumbing in minutes")
    parser.add_argument("--stage", choices=("all", *STAGES), default="all")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=None, help="default benchmarks/work/joint_2d[_quick]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/joint_2d[_quick].md")
    args = parser.parse_args(argv)
    for sub in ("covid-blues", "pocus", "us-seg/busbra", *(f"us-seg/{p}" for p in POOL)):
        if not (args.data / sub).is_dir():
            print(f"joint_2d: {args.data / sub} not found (needs ../shared/data)", file=sys.stderr)
            return 2
    s = Settings.tiny() if args.quick else Settings()
    suffix = "_quick" if args.quick else ""
    work = args.work or ROOT / "benchmarks" / "work" / f"joint_2d{suffix}"
    out_md = args.out or ROOT / "benchmarks" / "results" / f"joint_2d{suffix}.md"
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    log, started = Log(), time.time()
    stages = STAGES if args.stage == "all" else (args.stage,)
    if "pretrain" not in stages and not (work / "encoders.json").is_file():
        print(f"joint_2d: {work / 'encoders.json'} not found: run --stage pretrain first", file=sys.stderr)
        return 2
    for stage in stages:
        t0 = time.time()
        if stage == "pretrain":
            stage_pretrain(args, s, work, log)
        elif stage == "pocus":
            stage_pocus(args, s, work, log)
        elif stage == "busbra":
            stage_busbra(args, s, work, log)
        else:
            stage_report(args, s, work, log, started, out_md)
        log(f"stage {stage}: {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
