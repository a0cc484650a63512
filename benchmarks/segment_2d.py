"""USCL backbone -> breast lesion segmentation (the USCL paper's second downstream row), one command.

    python benchmarks/segment_2d.py            # full run (budget and wall time in the results file)
    python benchmarks/segment_2d.py --quick    # plumbing check in a few minutes

1. Pretrain a ResNet-18 on COVID-BLUES lung ultrasound videos with SimCLR (frame-level pairs) and
   USCL (video pairs, mixup positives, CE on 1% of the videos), exactly as
   ``benchmarks/pocus_transfer.py`` does, in its work folder: its pretraining cache is shared
   (a run folder whose name carries a digest of its config is reused by either script).
2. Fine-tune a 2D U-Net on that ResNet-18 (``medcl finetune --task segment --arch unet``) on
   BUS-BRA with its published patient-level folds, from scratch, SimCLR and USCL, at 5%, 15% and
   100% of the training folds' patients (the same folds, fractions and cases for every init;
   validation patients carved from the training folds; each test fold evaluated once).
3. Writes benchmarks/results/segment_2d.md (``--quick``: segment_2d_quick.md): test Dice, HD95
   and NSD (mean +- std over folds), per-fold paired differences and a patient bootstrap of the
   paired difference against scratch, with the published references and medcl's UNETR + MixCL
   numbers beside. Run folders stay under benchmarks/work/segment_2d/ (ignored by git).

Budget (``Settings``, recorded in the results file): BUS-BRA folds 1-2 of 5 at 128 px, 8 epochs of
the training cases but at least 350 steps of batch 16, 12 validations; pretraining 25 video epochs
at 128 px per method. About 85 min on 2 idle CPU cores (``--folds 1,2,3,4,5``: ~3.5 h). Scratch alone
on all five folds (``--inits scratch --folds 1,2,3,4,5 --out benchmarks/results/segment_2d_scratch.md``,
no pretraining): about 65 min. A longer budget for one fraction, e.g. 100% of the labels at 20 epochs on all
five folds (``--inits scratch --fractions 1 --epochs 20 --folds 1,2,3,4,5 --out
benchmarks/results/segment_2d_scratch_100.md``): about 75 min.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pocus_transfer  # noqa: E402  (the shared COVID-BLUES ingest and pretraining cache)
from _segbench import (  # noqa: E402
    Log,
    apply_recipe_options,
    command_line,
    machine,
    markdown_table_rows,
    per_fold_table,
    recipe_options,
    unet_bench_args,
    write_results,
)
from medcl.evaluate.segment import (  # noqa: E402  (UNET_*: the library's U-Net recipe, 2D part below)
    UNET_BUDGET,
    UNET_RECIPE,
    SegmentConfig,
    comparison_markdown,
    finetune,
    results_markdown,
    surface_comparison_markdown,
)

RECIPE, BUDGET = UNET_RECIPE[2], UNET_BUDGET[2]


@dataclass
class Settings:
    size: int = 128  # BUS-BRA fine-tuning input (the issue asks >= 128 px)
    folds: list[int] = field(default_factory=lambda: [1, 2])
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.15, 1.0])
    # epochs of the training cases (8, not the library's 20: three inits x two folds must fit 90 min; the 100%
    # rows at 20 epochs: --inits scratch --fractions 1 --epochs 20, segment_2d_scratch_100.md) ...
    epochs: float = 8.0
    min_iterations: int = BUDGET["min_iterations"]  # ... but at least this many steps (5% / 15% train longer)
    max_validations: int = BUDGET["max_validations"]
    patience: int | None = None  # a dozen noisy validations: keep the best, never stop early
    batch_size: int = RECIPE["batch_size"]
    lr: float = RECIPE["lr"]
    weight_decay: float = RECIPE["weight_decay"]
    max_val_cases: int = 150
    pretrain_size: int = 128
    pretrain_epochs: int = 25
    n_boot: int = 2000
    seed: int = 0

    @classmethod
    def quick(cls) -> Settings:
        return cls(size=64, folds=[1], fractions=[0.05, 1.0], epochs=0.5, min_iterations=8, max_validations=2,
                   patience=2, batch_size=8, max_val_cases=16, pretrain_size=32, pretrain_epochs=1, n_boot=200)

    def segment_config(self, threads: int):
        """The U-Net fine-tuning recipe (medcl.evaluate.segment.SegmentConfig) of these settings."""
        return SegmentConfig(arch="unet", size=[self.size, self.size], augment=RECIPE["augment"], batch_size=self.batch_size,
                             lr=self.lr, weight_decay=self.weight_decay, epochs=self.epochs,
                             min_iterations=self.min_iterations, max_validations=self.max_validations,
                             patience=self.patience, fractions=self.fractions, folds=self.folds,
                             max_val_cases=self.max_val_cases, seed=self.seed, save_models=False, n_overlays=2,
                             num_threads=threads)

    def pretraining(self) -> pocus_transfer.Settings:
        """pocus_transfer's settings for the same pretraining (its cache key)."""
        base = pocus_transfer.Settings.quick() if self.pretrain_epochs <= 1 else pocus_transfer.Settings()
        return pocus_transfer.Settings(**{**asdict(base), "size": self.pretrain_size,
                                          "pretrain_epochs": self.pretrain_epochs, "seed": self.seed})


REFERENCES = [
    ("U-Nets with ImageNet encoders on BUS-BRA (reported)", "~0.89 Dice"),
    ("BUS-Set benchmark, Mask R-CNN, 5-fold CV on 1154 public breast ultrasound images", "0.851 Dice"),
    ("DeepLabV3+ at 128 x 128 on the harder BUSI set", "0.73 Dice"),
    ("USCL paper: Mask R-CNN (ResNet-18 FPN) on UDIAT breast lesions, USCL vs ImageNet", "+4.6 points"),
]
UNETR_MIXCL = "benchmarks/results/mixcl_2d.md"  # medcl's UNETR numbers on the same folds (64 px, 3 folds)


def main(argv=None) -> int:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--pretrain-work", type=Path, default=None,
                            help="pretraining cache (default: pocus_transfer's work folder, shared)")
        parser.add_argument("--inits", default="scratch,simclr,uscl",
                            help="which of scratch, simclr, uscl to fine-tune (scratch first; 'scratch' alone: no "
                                 "pretraining, e.g. for all five folds within 90 min)")
        recipe_options(parser)

    args, work, out_md = unet_bench_args("segment_2d", __doc__, argv, extra)
    names = [n.strip() for n in args.inits.split(",") if n.strip()]
    if not names or names[0] != "scratch" or not set(names) <= {"scratch", "simclr", "uscl"}:
        print(f"segment_2d: --inits must start with scratch and name only scratch, simclr, uscl; got {args.inits!r}",
              file=sys.stderr)
        return 2
    s = Settings.quick() if args.quick else Settings()
    s.folds = args.fold_list or s.folds
    apply_recipe_options(args, s)
    pre_work = args.pretrain_work or ROOT / "benchmarks" / "work" / f"pocus_transfer{'_quick' if args.quick else ''}"
    for sub in ("covid-blues", "us-seg/busbra"):
        if not (args.data / sub).is_dir():
            print(f"segment_2d: {args.data / sub} not found (needs ../shared/data)", file=sys.stderr)
            return 2
    started = time.time()
    log = Log()

    from medcl.data.seg_manifest import busbra_task
    from medcl.evaluate.compare import segmentation_comparison_markdown

    # 1. pretraining (shared cache with pocus_transfer.py)
    ps = s.pretraining()
    t0 = time.time()
    checkpoints = {}
    if len(names) > 1:
        pre_work.mkdir(parents=True, exist_ok=True)
        blues = pocus_transfer.ingest_blues(args.data, pre_work, ps, log)
        checkpoints = pocus_transfer.pretrain_all(blues, pre_work, ps, log, only=tuple(names[1:]))
    pretrain_minutes = (time.time() - t0) / 60

    # 2. fine-tuning: the same folds, fractions and cases for every init
    task = busbra_task(args.data / "us-seg" / "busbra")
    cfg = s.segment_config(args.threads)
    inits = ["scratch", *[f"{n}={checkpoints[n]}" for n in names[1:]]]
    t0 = time.time()
    result = finetune(task, inits, cfg, work / "finetune", log=log, n_boot=s.n_boot, overwrite=True)
    finetune_minutes = (time.time() - t0) / 60
    results = result["comparison"]["results"] if result["comparison"] else result["runs"]
    minutes = {name: sum(r["train_seconds"] for r in res["runs"]) / 60 for name, res in results.items()}

    # 3. report
    lines = [
        "# BUS-BRA lesion segmentation: 2D U-Net on a ResNet-18, "
        + " vs ".join({"scratch": "scratch", "simclr": "SimCLR", "uscl": "USCL"}[n] for n in names), "",
        "The USCL paper's second downstream row (USCL backbone -> breast lesion segmentation) at CPU scale:"
        " ResNet-18s pretrained on COVID-BLUES lung ultrasound videos (the pretraining of"
        " `benchmarks/pocus_transfer.py`, shared cache), fine-tuned as the encoder of medcl's 2D U-Net"
        " (`--arch unet`) on BUS-BRA's published patient-level folds. Model selection on validation patients"
        " carved from the training folds; each test fold evaluated once; the same folds, label fractions and"
        " cases for every init.", "",
        f"- command: `{command_line()}`",
        f"- machine: {machine()}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- wall time: {(time.time() - started) / 60:.1f} min (pretraining incl. ingest {pretrain_minutes:.1f},"
        f" fine-tuning {finetune_minutes:.1f})",
        f"- folds run: {s.folds} of BUS-BRA's 5; test images per fold ~375", "",
        "## Settings", "", "```json", json.dumps({"benchmark": asdict(s), "pretraining": asdict(ps),
                                                  "segment_config": cfg.model_dump()}, indent=1, default=str),
        "```", "",
    ]
    if result["comparison"]:
        lines += ["## Test Dice (mean +- std over folds) and per-fold paired differences against scratch", "",
                  comparison_markdown(results), "",
                  f"HD95 (pixels of the {s.size} x {s.size} input grid, lower is better) and NSD (tolerance"
                  f" {cfg.nsd_tolerance:g} px, higher is better):", "", surface_comparison_markdown(results), "",
                  segmentation_comparison_markdown(result["comparison"]), ""]
    else:  # scratch alone
        lines += ["## Test Dice, scratch (mean +- std over folds)", "",
                  results_markdown(results["scratch"]).split("\n", 2)[2], *per_fold_table(results["scratch"])]
    lines += [
        "Fine-tuning minutes per init (training loops only): "
        + ", ".join(f"{n} {m:.1f}" for n, m in minutes.items()), "",
        "## Beside it", "",
        "| reference | result |", "|---|---|",
        *[f"| {name} | {value} |" for name, value in REFERENCES], "",
    ]
    unetr = markdown_table_rows(ROOT / UNETR_MIXCL, "| label fraction | scratch test Dice")
    if unetr:
        lines += [f"medcl's UNETR (MixCL's encoder) on BUS-BRA at 64 px, 600 iterations, folds 1-3, from"
                  f" `{UNETR_MIXCL}`:", "", *unetr, ""]
    write_results(out_md, lines, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
