"""Why pretraining hurt POCUS: which invariances cost it its cues? One command.

    python benchmarks/pocus_study.py                       # full run (wall time in the results file)
    python benchmarks/pocus_study.py --methods uscl        # one method only (half the time)
    python benchmarks/pocus_study.py --quick               # plumbing check in a few minutes

The augmentation-strength part of pocus_transfer's question 5 (the pretraining length, the domain
and the shortcut parts are in benchmarks/pocus_transfer.py, which this script builds on: same ingest,
same folds, same in-domain pretraining budget and cache). For each augmentation variant below and
each method (SimCLR, USCL), a ResNet-18 is pretrained per fold on that fold's POCUS training +
validation videos (never its test videos) for pocus_transfer's ``pretrain_epochs``, then evaluated
with a linear probe on the frozen backbone (video macro-F1, the same folds), paired against the
same method at the default augmentation (pocus_transfer's in-domain run, reused from its cache or
run here) and against the random backbone:

- ``weak``: nearly no invariance imposed (crop area 0.9-1, no rotation, intensity jitter 0.05);
- ``crop``: strong crops (area 0.2-1; the rest at the defaults): scale / position invariance;
- ``intensity``: strong intensity jitter (brightness and contrast 0.5; the rest at the defaults).

Defaults (``medcl.config.AugmentConfig``): crop area 0.6-1, aspect 3/4-4/3, flips 0.5, rotation 10
degrees, brightness and contrast 0.2. Writes benchmarks/results/pocus_study.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pocus_transfer import (  # noqa: E402
    CLASSES,
    METHOD_LABELS,
    Settings,
    deep_update,
    fold_manifests,
    ingest_data,
    init_label,
    link_fold_init,
    pretrain_all,
    pretrain_corpora,
    pretrain_variants,
    report_head,
    setup_run,
)

AUGMENTATIONS = {
    "weak": ("nearly none: crop area 0.9-1, no rotation, brightness / contrast 0.05",
             {"crop_scale": (0.9, 1.0), "rotate_degrees": 0.0, "brightness": 0.05, "contrast": 0.05}),
    "crop": ("strong crops: area 0.2-1", {"crop_scale": (0.2, 1.0)}),
    "intensity": ("strong intensity jitter: brightness / contrast 0.5", {"brightness": 0.5, "contrast": 0.5}),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the whole script in minutes")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--work", type=Path, default=None, help="default: pocus_transfer's work folder (its cache)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--methods", default="simclr,uscl", help="comma-separated: simclr, uscl")
    parser.add_argument("--variants", default=",".join(AUGMENTATIONS), help=f"comma-separated: {', '.join(AUGMENTATIONS)}")
    args = parser.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    augmentations = [a for a in args.variants.split(",") if a]
    for name in [*methods, *augmentations]:
        if name not in METHOD_LABELS and name not in AUGMENTATIONS:
            parser.error(f"unknown method or variant {name!r} (methods: {', '.join(METHOD_LABELS)}; variants: "
                         f"{', '.join(AUGMENTATIONS)})")
    s = replace(Settings.quick() if args.quick else Settings(), corpora=("pocus",), methods=methods)
    work, out_md, log, lines_log = setup_run(args, args.quick, "pocus_study")

    from medcl.evaluate.classify import FinetuneConfig, finetune, load_frame_data, make_folds
    from medcl.evaluate.compare import compare_results, load_predictions
    from medcl.weights import InitSpec

    started = time.perf_counter()
    timings: dict[str, float] = {}
    pocus, blues = ingest_data(args.data, work, s, log)
    base = dict(image_size=s.size, folds=s.folds, repeats=s.repeats, seed=s.seed, classes=CLASSES,
                max_train_frames_per_video=s.max_train_frames_per_video, patience=s.patience,
                device="cuda" if torch.cuda.is_available() else "cpu", save_models=False)
    frame_data = load_frame_data(pocus, FinetuneConfig(**base))
    folds = make_folds(frame_data, FinetuneConfig(**base))

    t0 = time.perf_counter()
    # the default augmentation: pocus_transfer's in-domain runs (cached there; snapshots included)
    defaults = {k: v for k, v in pretrain_corpora(pocus, blues, folds, frame_data.video_ids, work, s, log).items()
                if "@" not in k}
    timings["pretrain default (cached by pocus_transfer)"] = time.perf_counter() - t0
    variants = {name: (name, label, v) for name, label, v in pretrain_variants(s) if name in methods}
    manifests = fold_manifests(pocus, folds, frame_data.video_ids)
    inits = [InitSpec("scratch")] + [InitSpec(n, p) for n, p in defaults.items()]
    for aug in augmentations:
        t0 = time.perf_counter()
        for method in methods:
            name, label, variant = variants[method]
            variant = deep_update(variant, {"augment": AUGMENTATIONS[aug][1]})
            for (repeat, fold), manifest in manifests.items():
                log(f"{method}, augmentation {aug}, repeat {repeat} fold {fold}")
                run = pretrain_all(manifest, work / f"pretrain-aug-{aug}" / f"r{repeat}-f{fold}", s, log,
                                   variants=[(name, f"{label}, {aug} augmentation", variant)])[name]
                link_fold_init(work / "inits" / f"{method}-pocus-{aug}", repeat, fold, run)
            inits.append(InitSpec(f"{method}-pocus-{aug}", str(work / "inits" / f"{method}-pocus-{aug}" / "r{repeat}-f{fold}.pt")))
        timings[f"pretrain {aug} ({len(methods)} methods x {len(manifests)} folds)"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    config = FinetuneConfig(protocol="linear", epochs=s.finetune_epochs_last_stage, **base)
    results = finetune(pocus, inits, config, work / "finetune_study" / "linear", log=lambda m: None, n_boot=s.n_boot,
                       overwrite=True)
    timings[f"linear probe ({len(inits)} inits)"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started

    def label(name: str) -> str:
        for aug in AUGMENTATIONS:
            if name.endswith(f"-{aug}"):
                return f"{init_label(name[: -len(aug) - 1])}, {aug} augmentation"
        return init_label(name) + (", default augmentation" if name != "scratch" else "")

    def row(pair: dict) -> str:
        ok = "**yes**" if pair["ci_low"] > 0 else ("below" if pair["ci_high"] < 0 else "no")
        return (f"| {label(pair['run'])} | {label(pair['baseline'])} | {pair['value']:.3f} vs {pair['baseline_value']:.3f} | "
                f"{pair['diff']:+.3f} [{pair['ci_low']:+.3f}, {pair['ci_high']:+.3f}] | "
                f"{pair['folds_better']}/{pair['folds_worse']} of {pair['n_folds']} | {ok} |")

    ft = work / "finetune_study" / "linear"
    pair_rows = []
    for method in methods:
        for baseline in (f"{method}-pocus", "scratch"):
            names = [baseline] + [f"{method}-pocus-{aug}" for aug in augmentations]
            if baseline == "scratch":
                names.insert(1, f"{method}-pocus")
            tables = [load_predictions(ft / n)[1] for n in names]
            result = compare_results(tables, names, metrics=("macro_f1",), levels=("video",), n_boot=s.n_boot, seed=s.seed)
            pair_rows += [row(p) for p in result["levels"]["video"]["pairs"]]

    def cell(d: dict) -> str:
        return f"{d['mean']:.3f} ± {d['std']:.3f}" if d["mean"] is not None else "n/a"

    table = ["| initialisation | video acc | video macro-F1 | frame acc |", "|---|---|---|---|"]
    for name, res in results["runs"].items():
        v, f = res["summary"]["video"], res["summary"]["frame"]
        table.append(f"| {label(name)} | {cell(v['accuracy'])} | {cell(v['macro_f1'])} | {cell(f['accuracy'])} |")
    text = [
        *report_head("pocus_study.py", "POCUS: which augmentation invariances cost the linear probe", args, argv,
                     base["device"], timings),
        "Settings (pocus_transfer's): " + ", ".join(f"{k}={v}" for k, v in asdict(s).items()) + ".", "",
        "Variants (pretraining augmentation; everything else as pocus_transfer's in-domain runs): "
        + "; ".join(f"`{a}` = {AUGMENTATIONS[a][0]}" for a in augmentations)
        + ". Default: crop area 0.6-1, rotation 10 degrees, brightness / contrast 0.2, flips 0.5.", "",
        f"Linear probe (frozen backbone + linear head, {s.finetune_epochs_last_stage} epochs, early stopping on validation) "
        f"on the POCUS folds of pocus_transfer ({s.folds} folds by patient); per-fold in-domain pretraining on the "
        "fold's training + validation videos.", "",
        "## Results (mean ± std over test folds)", "", *table, "",
        "## Paired differences: video macro-F1 (patient-bootstrap 95% interval)", "",
        "| run | baseline | macro-F1 | difference [95% CI] | folds better/worse | ahead |", "|---|---|---|---|---|---|",
        *pair_rows, "",
        "## Timings", "", "| stage | seconds |", "|---|---|", *[f"| {k} | {v:.0f} |" for k, v in timings.items()], "",
        "## Log", "", "```", *lines_log, "```", ""]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(text))
    print(f"written {out_md} ({timings['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
