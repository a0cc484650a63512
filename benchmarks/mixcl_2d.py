"""MixCL 2D benchmark: pretrain on the ultrasound pool (HC18 fetal head + TG3K thyroid + C-TRUS colon
wall), fine-tune a UNETR on BUS-BRA breast-lesion segmentation (its own patient-level
5-fold-cv.csv; BUS-BRA is never seen in pretraining) at 5 / 15 / 50 / 100 % of the training
patients, against the same UNETR from scratch; plus the paper's ablation rows (identity only,
+ label, + recon = full MixCL) at one label fraction.

    python benchmarks/mixcl_2d.py            # about 60 min on 2 CPU cores (settings below)
    python benchmarks/mixcl_2d.py --quick    # 2-3 min smoke run of every step (numbers meaningless)
    python benchmarks/mixcl_2d.py --fractions 0.05,0.15 --no-ablation --pretrain-set mixcl.alpha=1 --tag alpha1
                                             # a variant: label term weighted 100x (~15 min)

Writes benchmarks/results/mixcl_2d.md (or mixcl_2d_quick.md, mixcl_2d_TAG.md); run folders under
benchmarks/work/mixcl_2d/ (ignored by git): pretraining runs and fine-tune run folders with
results.json, curves.jsonl and overlays/*.npz.

Budget (2 cores): ViT patch 8, width 96, depth 6, 4 heads, MLP 384, decoder feature size 8;
pretraining on 64 px patches of pool images resized to 80 x 80 (so that structures appear at
about the scale of the fine-tuning input), batch 8, 500 steps per variant (3 variants); fine-tuning on
BUS-BRA images resized to 64 x 64, batch 8, 600 iterations, AdamW lr 3e-4, validation every 150
iterations on 100 images of held-out validation patients; folds 1-3 of the five.
"""

from __future__ import annotations

from _segbench import (
    DATA,
    ROOT,
    finetune,
    paired_sentences,
    parse_common_args,
    pretrain_dir,
    pretrain_mixcl,
    restrict,
    tagged,
    write_report,
)

ENCODER = {"vit_patch": 8, "hidden_size": 96, "mlp_dim": 384, "num_layers": 6, "num_heads": 4}
SETTINGS = {
    "full": {"pretrain_steps": 500, "pretrain_batch": 8, "iterations": 600, "batch_size": 8, "val_every": 150,
             "max_val_cases": 100, "folds": [1, 2, 3], "fractions": [0.05, 0.15, 0.5, 1.0],
             "ablation_fraction": 0.15, "lr": 3e-4},
    "quick": {"pretrain_steps": 6, "pretrain_batch": 4, "iterations": 12, "batch_size": 4, "val_every": 6,
              "max_val_cases": 16, "folds": [1], "fractions": [0.05, 0.15, 0.5, 1.0],
              "ablation_fraction": 0.15, "lr": 3e-4},
}
VARIANTS = {  # name -> (use_label, use_recon); the paper's ablation rows
    "identity": (False, False),
    "identity+label": (True, False),
    "mixcl": (True, True),
}


def main() -> None:
    args, s, work, started = parse_common_args("mixcl_2d", __doc__, SETTINGS, "keep existing pretraining checkpoints")
    us = DATA / "us-seg"
    for name in ("busbra", "hc18", "tg3k", "ctrus"):
        if not (us / name).is_dir():
            raise SystemExit(f"data not found: {us / name}")

    # 1. pretraining: the same pool, steps and encoder for every ablation variant
    base = [f"mixcl.{k}={v}" for k, v in ENCODER.items()] + [
        "mixcl.patch_size=64", "mixcl.image_size=[80,80]", "mixcl.feature_size=8", f"optim.max_steps={s['pretrain_steps']}",
        f"optim.batch_size={s['pretrain_batch']}", "train.progress=false", "train.tensorboard=false",
        "train.checkpoint_every=100000", f"train.seed={args.seed}", "train.device=cpu"]
    datasets = [{"adapter": a, "root": str(us / a)} for a in ("hc18", "tg3k", "ctrus")]
    pre = {}
    frac = s["ablation_fraction"]
    # the ablation rows share the main table's runs at this fraction
    run_ablation = frac in s["fractions"] and not args.no_ablation
    for name, (use_label, use_recon) in VARIANTS.items():
        if name != "mixcl" and not run_ablation:
            continue
        print(f"== pretraining {name}", flush=True)
        pre[name] = pretrain_mixcl(
            ROOT / "configs" / "mixcl-2d.yaml",
            base + [f"mixcl.use_label={str(use_label).lower()}", f"mixcl.use_recon={str(use_recon).lower()}"],
            pretrain_dir(work, name, args), datasets=datasets, reuse=args.reuse_pretraining)

    # 2. fine-tuning on BUS-BRA: scratch vs MixCL at every fraction, ablation variants at one
    from medcl.data.seg_manifest import busbra_task
    from medcl.evaluate.segment import DEFAULT_MODEL

    task = busbra_task(us / "busbra")
    ft = {"size": [64, 64], "model": dict(DEFAULT_MODEL), "iterations": s["iterations"], "batch_size": s["batch_size"],
          "lr": s["lr"], "val_every": s["val_every"], "max_val_cases": s["max_val_cases"], "folds": s["folds"],
          "fractions": s["fractions"], "seed": args.seed, "val_fraction": 0.2, "n_overlays": 3}
    main_results = {}
    print("== fine-tuning scratch", flush=True)
    main_results["scratch"] = finetune(task, ft, None, work / tagged("ft-scratch", args.tag))
    print("== fine-tuning mixcl", flush=True)
    main_results["mixcl"] = finetune(task, ft, pre["mixcl"]["checkpoint"], work / tagged("ft-mixcl", args.tag))
    ablation = None
    if run_ablation:
        ablation = {"scratch": restrict(main_results["scratch"], frac)}
        for name in ("identity", "identity+label"):
            print(f"== fine-tuning {name} (ablation, {frac:g})", flush=True)
            ablation[name] = finetune(task, {**ft, "fractions": [frac]}, pre[name]["checkpoint"],
                                      work / tagged(f"ft-{name}", args.tag))
        ablation["mixcl (+recon)"] = restrict(main_results["mixcl"], frac)
        ablation["mixcl (+recon)"]["seconds"] = 0.0  # counted in the main table

    # 3. report
    facts = paired_sentences(main_results, "scratch", "mixcl")
    if ablation is not None:
        facts += paired_sentences(ablation, "scratch", "identity") + paired_sentences(ablation, "scratch", "identity+label")
    discussion = (
        ("QUICK SMOKE RUN: a handful of steps; the numbers below only show that every step runs.\n\n" if args.quick else "")
        + "Measured (paired by fold, same training patients and decoder initialisation for every init):\n\n"
        + "\n".join(f"- {f}" for f in facts) + "\n\n"
        "Caveats: this is a CPU-sized replication, not the paper's setting: a 6-layer, 96-wide ViT"
        f" instead of ViT-B/16, {s['pretrain_steps']} pretraining steps on 64 px patches instead of 1000"
        f" iterations on 6 GPUs, {s['iterations']} fine-tuning iterations instead of 2000, and"
        f" {len(s['folds'])} of the 5 BUS-BRA folds. Pool images are resized to 80 x 80 before the 64 px"
        " pretraining crops, and BUS-BRA images to 64 x 64 for fine-tuning, so both see whole organs or"
        " lesions at a similar scale (both resizes ignore aspect ratio). The pool (fetal head, thyroid, colon wall) shares no"
        " class with the target (breast lesion): only transfer of generic ultrasound features is tested."
        " Every fraction gets the same fine-tuning budget (iterations x batch), so at 50-100% each"
        " training image is seen only a few times: the budget, not the labels, limits the larger"
        " fractions, and Dice barely rises from 5% to 100%; compare inits within a fraction, not"
        " fractions with each other. Read the paired column: the folds differ in difficulty, which"
        " pairing removes; with 3 folds a difference is suggestive only when it has the same sign on"
        " every fold and is several times its paired std."
    )
    settings = {"mode": "quick" if args.quick else "full", **s, "encoder": ENCODER, "finetune": ft, "pretraining pool": ["hc18", "tg3k", "ctrus"],
                "target": "BUS-BRA lesion (5-fold-cv.csv test folds; validation = 20% of the other folds' patients)"}
    out = ROOT / "benchmarks" / "results" / f"mixcl_2d{'_quick' if args.quick else ''}{'_' + args.tag if args.tag else ''}.md"
    write_report(out, "MixCL 2D: ultrasound pool -> BUS-BRA lesion segmentation",
                 "UNETR fine-tuned from MixCL pretraining vs from scratch (Dice, higher is better).",
                 settings, pre, main_results, ablation, discussion, started)


if __name__ == "__main__":
    main()
