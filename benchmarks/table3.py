"""The USCL paper's Table 3 baselines at pocus_transfer's CPU budget, one command.

    python benchmarks/table3.py            # full run (see the results file for its wall time)
    python benchmarks/table3.py --quick    # plumbing check in a few minutes (table3_quick.md)

Rows: scratch, SimCLR (frame-level pairs), USCL, MoCo v2, FixMatch, Pi-model, Temporal Ensembling,
each ResNet-18 pretrained on COVID-BLUES (3 frames/s, COVID PCR per patient as the weak label;
1% of the videos labeled for the semi-supervised methods, as for USCL's CE), then evaluated on POCUS
with the protocols and folds of benchmarks/pocus_transfer.py (5-fold by patient, validation carved
from the training folds, test folds evaluated once, the same folds for every initialisation):
``linear`` (frozen backbone + linear head), ``last_stage`` (the paper's protocol) and ``full``.

It reuses pocus_transfer.py's ingest and pretraining cache at the settings of its first version
(``Settings.tables_1_2()``: 64 px, COVID-BLUES, 25 epochs, 2 repeats; SimCLR and USCL runs already
under benchmarks/work/pocus_transfer/pretrain at these settings are not redone).

Budget: every method runs the same number of optimisation steps as USCL (pocus_transfer's
``pretrain_epochs`` video epochs of ``pretrain_batch`` pairs) with about the same number of
images through the network per step (2 x pretrain_batch = 64 at the defaults):
- MoCo v2: pretrain_batch frames, two views each (query with gradients, key without);
- FixMatch: B labeled + 7B unlabeled frames (weak + strong view), B = round(2N / 15) = 4;
- Pi-model: (B labeled + 7B unlabeled) x 2 passes, B = round(N / 8) = 4;
- Temporal Ensembling: B labeled + 7B unlabeled frames, one pass, B = round(2N / 8) = 8.
Adapted to a run of a few hundred steps (stated in the results file): MoCo's key momentum 0.99
(0.999 would leave the key encoder ~76% at its random initialisation after 275 steps) and a queue
of about half an epoch's frames (the paper's 65536 exceeds the corpus); the Pi-model / TE
consistency ramp-up spans the same share of the run as in the papers (80 of 300 epochs).

Writes benchmarks/results/table3.md: the table (mean +- std over test folds) and the paired
differences vs USCL (patient bootstrap) per protocol.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pocus_transfer import (  # noqa: E402
    CLASSES,
    ROOT,
    Settings,
    ingest_data,
    pretrain_all,
    pretrain_budget,
    pretrain_variants,
    report_head,
    setup_run,
    write_report,
)

PROTOCOLS = ("linear", "last_stage", "full")
UNUSED_SETTINGS = ("blues_epochs", "corpora", "methods", "full_inits", "fp32_twin")  # pocus_transfer's own corpora and rows
RAMPUP_SHARE = 80 / 300  # Laine & Aila: the consistency weight ramps up over 80 of 300 epochs
MU = 7

LABELS = {
    "scratch": "random init (scratch)",
    "simclr": "SimCLR (frame-level pairs)",
    "uscl": "USCL",
    "moco": "MoCo v2",
    "fixmatch": "FixMatch",
    "pimodel": "Pi-model",
    "temporal_ensembling": "Temporal Ensembling",
}
KIND = {"scratch": "-", "simclr": "self-supervised", "uscl": "semi-supervised (contrastive + CE)",
        "moco": "self-supervised", "fixmatch": "semi-supervised", "pimodel": "semi-supervised",
        "temporal_ensembling": "semi-supervised"}


def table3_variants(s: Settings, b: dict) -> list[tuple[str, str, dict]]:
    """MoCo v2, FixMatch, Pi-model and TE at USCL's step count and ~its images per step."""
    n = s.pretrain_batch
    total, warm, frames = b["total_steps"], b["warmup_steps"], b["frames"]

    def semi(labeled_batch: int) -> tuple[dict, float]:
        """(optim, consistency ramp-up in epochs) of a semi-supervised method whose B is ``labeled_batch``:
        its epoch is one pass over the unlabeled frames (mu * B per step)."""
        labeled_batch = max(2, labeled_batch)  # optim.batch_size >= 2 (quick runs only; 4-8 at the defaults)
        steps_per_epoch = max(1, frames // (MU * labeled_batch))
        return ({"batch_size": labeled_batch, "warmup_epochs": warm / steps_per_epoch},
                RAMPUP_SHARE * total / steps_per_epoch)

    frame_steps = max(1, frames // n)
    queue = max(n, min(4096, (frames // 2) // n * n))
    fix_optim, _ = semi(round(2 * n / (1 + 2 * MU)))
    pi_optim, pi_rampup = semi(round(n / (1 + MU)))
    te_optim, te_rampup = semi(round(2 * n / (1 + MU)))
    labels = {"data": {"label_fraction": s.label_fraction}}
    return [
        ("moco", LABELS["moco"], {"method": "moco", "sampling": {"pairing": "frame", "mixup": "none"},
                                  "optim": {"warmup_epochs": warm / frame_steps},
                                  "moco": {"momentum": 0.99, "queue_size": queue, "temperature": 0.2}}),
        ("fixmatch", LABELS["fixmatch"], {"method": "fixmatch", **labels, "optim": fix_optim, "fixmatch": {"mu": MU}}),
        ("pimodel", LABELS["pimodel"], {"method": "pimodel", **labels, "optim": pi_optim,
                                        "pimodel": {"mu": MU, "rampup_epochs": pi_rampup}}),
        ("temporal_ensembling", LABELS["temporal_ensembling"],
         {"method": "temporal_ensembling", **labels, "optim": te_optim,
          "temporal_ensembling": {"mu": MU, "rampup_epochs": te_rampup}}),
    ]


def reusable(folder: Path, inits, config) -> dict | None:
    """``{"runs": {name: results}}`` when every init's run folder under ``folder`` holds results made
    with ``config`` and that init; else None (the protocol is fine-tuned again)."""
    runs = {}
    for init in inits:
        run = folder / init.name
        try:
            recorded = yaml.safe_load((run / "config.yaml").read_text())
            results = json.loads((run / "results.json").read_text())
        except (OSError, ValueError):
            return None
        wanted = {**config.model_dump(), "init": init.to_dict()}
        if any(recorded.get(k) != v for k, v in wanted.items()):
            return None
        runs[init.name] = results
    return {"runs": runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the whole script in minutes")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=None,
                        help="run folders (default benchmarks/work/pocus_transfer[_quick], pocus_transfer's cache)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help=f"comma-separated subset of {PROTOCOLS}")
    parser.add_argument("--repeats", type=int, default=None, help="fold assignments (default pocus_transfer's)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true",
                        help="keep a protocol's fine-tuning results when every init's run folder holds them with the "
                             "same fine-tuning config and init (e.g. to write the report of an interrupted run)")
    args = parser.parse_args(argv)
    protocols = [p for p in args.protocols.split(",") if p]
    if not protocols or any(p not in PROTOCOLS for p in protocols):
        print(f"table3: --protocols must be a comma-separated subset of {PROTOCOLS}, got {args.protocols!r}",
              file=sys.stderr)
        return 2
    s = Settings.quick() if args.quick else Settings.tables_1_2()  # 64 px, COVID-BLUES 25 epochs, 2 repeats
    if args.repeats is not None:
        s.repeats = args.repeats
    work, out_md, log, lines_log = setup_run(args, args.quick, "table3")

    from medcl.evaluate.classify import FinetuneConfig, finetune
    from medcl.evaluate.compare import compare_runs, comparison_markdown
    from medcl.weights import InitSpec

    started = time.perf_counter()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    pocus, blues = ingest_data(args.data, work, s, log)
    timings["ingest"] = time.perf_counter() - t0
    b = pretrain_budget(blues, s)
    variants = [v for v in pretrain_variants(s) if v[0] in ("simclr", "uscl")] + table3_variants(s, b)
    log(f"corpus: {b['videos']} videos, {b['frames']} frames; every method {b['total_steps']} steps")
    for name, _, variant in variants:
        log(f"  {name}: {json.dumps({k: v for k, v in variant.items() if k != 'method'}, sort_keys=True)}")
    checkpoints = {}
    for name, label, variant in variants:  # one at a time, so each method's wall time is its own
        t0 = time.perf_counter()
        checkpoints.update(pretrain_all(blues, work, s, log, variants=[(name, label, variant)]))
        timings[f"pretrain {name}"] = time.perf_counter() - t0

    base = dict(image_size=s.size, folds=s.folds, repeats=s.repeats, seed=s.seed, classes=CLASSES,
                max_train_frames_per_video=s.max_train_frames_per_video, patience=s.patience,
                device="cuda" if torch.cuda.is_available() else "cpu", save_models=False)
    epochs = {"linear": s.finetune_epochs_last_stage, "last_stage": s.finetune_epochs_last_stage,
              "full": s.finetune_epochs_full}
    inits = [InitSpec("scratch")] + [InitSpec(n, str(p)) for n, p in checkpoints.items()]
    ft = work / "finetune_table3"
    results = {}
    for protocol in protocols:
        t0 = time.perf_counter()
        config = FinetuneConfig(protocol=protocol, epochs=epochs[protocol], **base)
        kept = reusable(ft / protocol, inits, config) if args.reuse else None
        if kept is not None:
            results[protocol] = kept
            seconds = sum(sum(r["timing"].values()) for r in kept["runs"].values())
            timings[f"fine-tune {protocol} ({len(inits)} inits, reused: their recorded training time)"] = seconds
            log(f"fine-tune {protocol}: reused {ft / protocol} ({seconds:.0f} s recorded)")
            continue
        results[protocol] = finetune(pocus, inits, config, ft / protocol, log=lambda msg: None, n_boot=s.n_boot,
                                     overwrite=True)
        timings[f"fine-tune {protocol} ({len(inits)} inits)"] = time.perf_counter() - t0
        log(f"fine-tune {protocol}: {time.perf_counter() - t0:.0f} s")
    timings["total"] = time.perf_counter() - started

    def cell(d: dict, k: str) -> str:
        return f"{d[k]['mean']:.3f} ± {d[k]['std']:.3f}" if d[k]["mean"] is not None else "n/a"

    table = ["| protocol | initialisation | kind | video acc | video macro-F1 | video AUC | frame acc | frame macro-F1 |",
             "|---|---|---|---|---|---|---|---|"]
    for protocol in protocols:
        for name, res in results[protocol]["runs"].items():
            v, f = res["summary"]["video"], res["summary"]["frame"]
            table.append(f"| {protocol} | {LABELS[name]} | {KIND[name]} | {cell(v, 'accuracy')} | "
                         f"{cell(v, 'macro_f1')} | {cell(v, 'roc_auc_ovr')} | {cell(f, 'accuracy')} | "
                         f"{cell(f, 'macro_f1')} |")

    verdict, sections = [], []
    order = ["uscl"] + [i.name for i in inits if i.name != "uscl"]
    for protocol in protocols:
        result = compare_runs([ft / protocol / n for n in order], metrics=("accuracy", "macro_f1"),
                              n_boot=s.n_boot, seed=s.seed)
        for pair in result["levels"]["video"]["pairs"]:
            if pair["metric"] == "macro_f1":
                verdict.append(
                    f"| {protocol} | {LABELS.get(pair['run'], pair['run'])} | {pair['value']:.3f} vs "
                    f"{pair['baseline_value']:.3f} | {pair['diff']:+.3f} [{pair['ci_low']:+.3f}, "
                    f"{pair['ci_high']:+.3f}] | {pair['folds_better']}/{pair['folds_worse']} of {pair['n_folds']} |")
        text = comparison_markdown(result).replace("# Paired comparison", f"## {protocol}: every init vs USCL", 1)
        sections.append(text.replace("\n## ", "\n### "))

    first = next(iter(results.values()))["runs"]["scratch"]
    n_test = sum(f["n_test_videos"] for f in first["folds"])
    text = [
        *report_head("table3.py", "USCL Table 3 baselines on POCUS at CPU scale", args, argv, base["device"], timings),
        "Settings (pocus_transfer.py's `Settings.tables_1_2()`; COVID-BLUES pretraining for `pretrain_epochs`): "
        + ", ".join(f"{k}={v}" for k, v in asdict(s).items() if k not in UNUSED_SETTINGS) + ".", "",
        f"Pretraining corpus: COVID-BLUES, {b['videos']} videos, {b['frames']} frames at 3 frames/s; every method "
        f"{b['total_steps']} steps. Per-method settings (over the configs/ presets):", "",
        *[f"- `{name}`: `{json.dumps(variant, sort_keys=True)}`" for name, _, variant in variants], "",
        f"Fine-tuning: POCUS convex videos, classes {CLASSES}, {n_test} videos tested per repeat ({s.folds} folds x "
        f"{s.repeats} repeat(s), grouped by patient; the same folds for every init).", "",
        "Published (USCL paper, 224 px, 300 epochs on US-4, last 3 layers fine-tuned, accuracy): USCL 94.2, "
        "ImageNet 84.2; the paper reports every Table 3 baseline below USCL.", "",
        "## Results (mean ± std over test folds)", "", *table, "",
        "## Every init vs USCL: video macro-F1, paired", "",
        "Pooled video-level macro-F1 (mean over repeats); run - USCL with the patient-bootstrap 95% interval; "
        "folds where the run is better/worse than USCL.", "",
        "| protocol | initialisation | macro-F1 vs USCL | difference [95% CI] | folds better/worse |", "|---|---|---|---|---|",
        *verdict, "",
    ]
    write_report(out_md, text, timings, "USCL", sections, lines_log, work / "table3_summary.json", s, results, budget=b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
