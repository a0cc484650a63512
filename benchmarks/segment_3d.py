"""OpenKBP head-and-neck CT: the 3D U-Net (ResNet-18 encoder) from scratch at 5%, 15% and 100% labels.

    python benchmarks/segment_3d.py            # full run (budget and wall time in the results file)
    python benchmarks/segment_3d.py --quick    # plumbing check in a few minutes

Task: mandible + spinal cord (the 70 OpenKBP patients on whom both were contoured), one 3-class
model (background, mandible, spinal cord). 5-fold cross-validation by patient (validation patients
carved from the training folds, each test fold evaluated once), label fractions 5%, 15% and 100%
of the training folds' patients (whole patients, nested). ``medcl finetune --task segment --arch
unet`` on 3D: foreground-oversampled crops for training, sliding-window inference on whole
volumes, Dice + CE (the cord weighted 2x), warm-up + cosine, model selection on validation Dice, then
each organ's post-processing (keep its largest connected component or not) decided on the validation
patients. Fold 1 of 5 by default: at >= 1200 steps per run (2700 at 100%) one fold fits 90 minutes on 2 cores.

Writes benchmarks/results/segment_3d.md (``--quick``: segment_3d_quick.md): test Dice, HD95, NSD
per organ (mean +- std over folds), with medcl's UNETR numbers and published references beside.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

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

from medcl.evaluate.segment import (  # noqa: E402  (UNET_*: the library's U-Net recipe, 3D part below)
    UNET_BUDGET,
    UNET_RECIPE,
    SegmentConfig,
    finetune,
    fmt,
    results_markdown,
)

ORGANS = ["Mandible", "SpinalCord"]
RECIPE, BUDGET = UNET_RECIPE[3], UNET_BUDGET[3]


@dataclass
class Settings:
    folds: list[int] = field(default_factory=lambda: [1])  # one fold fits 90 min on 2 cores (--folds 1,2,3,4,5: ~5 h)
    n_folds: int = 5
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.15, 1.0])
    roi_size: list[int] = field(default_factory=lambda: [64, 64, 32])  # ~256 x 256 x 80 mm training crops
    sw_roi_size: list[int] = field(default_factory=lambda: [128, 128, 128])  # inference tile: the whole volume
    pos_fraction: float = RECIPE["pos_fraction"]  # crops centred on an organ voxel (organs are ~0.1% of the volume)
    batch_size: int = RECIPE["batch_size"]
    # epochs of the training patients (100%: 2700 steps; at 360 the mandible had not been learned, at 1350 the
    # validation Dice was still rising)
    epochs: float = BUDGET["epochs"]
    min_iterations: int = BUDGET["min_iterations"]  # ... but at least this many steps (5% / 15% of the patients train longer)
    max_validations: int = BUDGET["max_validations"]
    augment: str = RECIPE["augment"]  # "monai": + axial rotation, scale and intensity (medcl.evaluate.segment.monai_augmenter)
    max_val_cases: int = 4
    lr: float = RECIPE["lr"]
    # loss weight per class (background, Mandible, SpinalCord), ~ sqrt of the mandible / cord voxel ratio (~4):
    # unweighted, the cord was never predicted (1350 steps); at 1:5 the mandible never was; 1:2 learns both
    class_weights: list[float] | None = field(default_factory=lambda: [1.0, 1.0, 2.0])
    weight_decay: float = RECIPE["weight_decay"]
    window: list[float] = field(default_factory=lambda: [-150.0, 250.0])
    seed: int = 0
    n_patients: int | None = None  # all

    def segment_config(self, threads: int):
        """The 3D U-Net recipe as a ``SegmentConfig`` (also the fine-tuning of mixcl_cnn_3d.py)."""
        return SegmentConfig(arch="unet", roi_size=self.roi_size, sw_roi_size=self.sw_roi_size,
                             pos_fraction=self.pos_fraction, batch_size=self.batch_size, epochs=self.epochs,
                             min_iterations=self.min_iterations, max_validations=self.max_validations,
                             max_val_cases=self.max_val_cases, lr=self.lr, weight_decay=self.weight_decay,
                             fractions=self.fractions, n_folds=self.n_folds, folds=self.folds, augment=self.augment,
                             class_weights=self.class_weights, seed=self.seed, save_models=False, n_overlays=2,
                             num_threads=threads)

    @classmethod
    def quick(cls) -> Settings:
        return cls(folds=[1], n_folds=3, fractions=[0.15, 1.0], roi_size=[32, 32, 32], sw_roi_size=[128, 128, 128],
                   epochs=0.5, min_iterations=4, max_validations=1, max_val_cases=1, n_patients=12)


REFERENCES = [
    ("Mandible, head-and-neck CT auto-contouring (routine level, e.g. nnU-Net-class models)", "Dice ~0.90-0.95"),
    ("Spinal cord, head-and-neck CT auto-contouring (routine level)", "Dice ~0.80-0.90"),
]
UNETR = "benchmarks/results/mixcl_3d.md"  # medcl's UNETR on the mandible (3 folds, 500 iterations)


def main(argv=None) -> int:
    def extra(parser) -> None:  # the recipe's knobs, for trying a longer or otherwise different budget
        recipe_options(parser)
        parser.add_argument("--augment", choices=("flips", "monai"), default=None,
                            help="flips, or monai (flips + axial rotation / scale + intensity)")
        parser.add_argument("--class-weights", default=None,
                            help="loss weight per class, background first, e.g. 1,1,5")

    args, work, out_md = unet_bench_args("segment_3d", __doc__, argv, extra)
    s = Settings.quick() if args.quick else Settings()
    s.folds = args.fold_list or s.folds
    apply_recipe_options(args, s)
    if args.class_weights:
        s.class_weights = [float(w) for w in args.class_weights.split(",")]
    if args.augment is not None:
        s.augment = args.augment
    root = args.data / "openkbp"
    if not (root / "index.json").is_file():
        print(f"segment_3d: {root / 'index.json'} not found (needs ../shared/data)", file=sys.stderr)
        return 2
    started = time.time()
    log = Log()

    from medcl.data.seg_manifest import openkbp_patients, openkbp_task

    patients = sorted(p["patient"] for p in openkbp_patients(root) if set(ORGANS) <= set(p["contoured"]))
    if s.n_patients:
        patients = patients[: s.n_patients]
    task = openkbp_task(root, ORGANS, patients=patients, intensity_range=tuple(s.window))
    cfg = s.segment_config(args.threads)
    log(f"OpenKBP: {len(patients)} patients with {' + '.join(ORGANS)} contoured; folds {s.folds} of {s.n_folds}")
    result = finetune(task, ["scratch"], cfg, work / "scratch", log=log, overwrite=True)
    results = result["runs"]["scratch"]
    minutes = sum(r["train_seconds"] for r in results["runs"]) / 60

    lines = [
        "# OpenKBP head-and-neck CT: 3D U-Net (ResNet-18 encoder) from scratch", "",
        f"Organs: {', '.join(ORGANS)} (one 3-class model) on the {len(patients)} OpenKBP patients with both contoured,"
        " CT on OpenKBP's 128^3 grid (~4 x 4 x 2.5 mm), HU window"
        f" {s.window}. {s.n_folds}-fold cross-validation by patient (validation patients carved from the training"
        " folds; each test fold evaluated once); label fractions are whole patients of the training folds.", "",
        f"- command: `{command_line()}`",
        f"- machine: {machine()}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- wall time: {(time.time() - started) / 60:.1f} min (training loops {minutes:.1f})",
        f"- folds run: {s.folds} of {s.n_folds}", "",
        "## Settings", "", "```json", json.dumps({"benchmark": asdict(s), "segment_config": cfg.model_dump()},
                                                 indent=1, default=str), "```", "",
        "## Results (test folds)", "", results_markdown(results).split("\n", 2)[2], "", *per_fold_table(results),
    ]
    lines += [f"Training minutes: {minutes:.1f}", "", *curve_table(work / "scratch" / "curves.jsonl"),
              "## Beside it", "", "| reference | result |", "|---|---|",
              *[f"| {n} | {v} |" for n, v in REFERENCES], ""]
    unetr = markdown_table_rows(ROOT / UNETR, "| label fraction | scratch test Dice")
    if unetr:
        lines += [f"medcl's UNETR on the mandible alone (3 folds, 500 iterations of 32^3 crops), from `{UNETR}`:", "",
                  *unetr, ""]
    summary = results["summary"]
    lines += ["Mandible Dice by label fraction: "
              + ", ".join(f"{float(f) * 100:g}% {fmt(v['test_per_class']['Mandible'])}" for f, v in summary.items()), ""]
    write_results(out_md, lines, log)
    return 0


def curve_table(path: Path) -> list[str]:
    """The training curves (each validation: training loss since the last one, validation Dice) as a table:
    whether a run was still improving when its budget ended is the first question about a low Dice."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    if not rows:
        return []
    return ["## Learning curves (validation patients)", "",
            "| fold | label fraction | iteration | training loss (Dice + CE) | val mean Dice | seconds |", "|---|---|---|---|---|---|",
            *[f"| {r['fold']} | {r['fraction'] * 100:g}% | {r['iteration']} | {r['train_loss']:.3f} | "
              f"{r['val_mean_dice']:.3f} | {r['seconds']:.0f} |" for r in rows], ""]


if __name__ == "__main__":
    raise SystemExit(main())
