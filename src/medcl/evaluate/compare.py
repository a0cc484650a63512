"""Paired comparison of fine-tuning runs evaluated on the same folds (classification and segmentation).

Two initialisations evaluated on the same test videos give paired predictions. Reporting two means
hides how much of the gap is fold-to-fold noise; here the difference gets a 95% interval from a
cluster bootstrap over PATIENTS (the unit that was sampled: all of a patient's videos, frames and
repeats are resampled together), and the per-fold paired differences are listed too.

Statistic (classification): per repeat, the metric of the predictions pooled over that repeat's
test folds, averaged over repeats. ``compare_runs(["runs/scratch", "runs/uscl"])`` or
``medcl evaluate --compare``. Segmentation (:func:`compare_segmentation`): per label fraction,
the mean over test cases of each case's mean foreground Dice. Both resample patients with the
same bootstrap (:func:`patient_resamples`, :func:`interval`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def metric_from_confusion(cm: np.ndarray, metric: str) -> np.ndarray:
    """Metric of confusion matrices [..., C, C] (rows true, columns predicted), same conventions
    as ``medcl.evaluate.metrics.scores_from_confusion``."""
    cm = np.asarray(cm, dtype=float)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, predicted = cm.sum(-1), cm.sum(-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "accuracy":
            return tp.sum(-1) / cm.sum((-2, -1))
        recall = np.where(support > 0, tp / np.where(support > 0, support, 1), 0.0)
        if metric == "balanced_accuracy":
            present = support > 0
            return (recall * present).sum(-1) / present.sum(-1)
        if metric == "macro_f1":
            precision = np.where(predicted > 0, tp / np.where(predicted > 0, predicted, 1), 0.0)
            denom = precision + recall
            f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
            return f1.mean(-1)
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")


def patient_resamples(n_patients: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, n_patients] float: how often each patient is drawn in each bootstrap resample
    (patients drawn with replacement, as many as there are)."""
    return np.stack([np.bincount(rng.integers(0, n_patients, n_patients), minlength=n_patients)
                     for _ in range(n_boot)]).astype(float)


def interval(diff_boot: np.ndarray) -> dict:
    """95% percentile interval of bootstrap differences and the share at or below zero."""
    return {"ci_low": float(np.nanpercentile(diff_boot, 2.5)), "ci_high": float(np.nanpercentile(diff_boot, 97.5)),
            "p_boot_le_0": float(np.mean(diff_boot <= 0))}


def load_predictions(run_dir: str | Path) -> tuple[str, list[dict]]:
    """(init name, rows of predictions.csv) of a classification run folder."""
    run_dir = Path(run_dir)
    path = run_dir / "predictions.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no predictions.csv (not a medcl classification run folder?)")
    name = run_dir.name
    results = run_dir / "results.json"
    if results.is_file():
        name = json.loads(results.read_text()).get("init", {}).get("name", name)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return name, rows


def aligned_keys(tables: list[dict], names: list[str]) -> list:
    """The sorted prediction keys every run shares; runs evaluated on other folds or cases are refused."""
    keys = sorted(tables[0])
    for name, table in zip(names[1:], tables[1:]):
        if set(table) != set(keys):
            diff = sorted(set(table) ^ set(keys))[:3]
            raise ValueError(f"runs {names[0]!r} and {name!r} were not evaluated on the same folds "
                             f"(e.g. {diff}); compare only runs made with the same data, folds and seed")
    return keys


def _paired_arrays(predictions: list[list[dict]], names: list[str], level: str):
    """Align runs on (repeat, fold, video, frame); refuse runs evaluated on different folds."""
    keyed = []
    for name, rows in zip(names, predictions):
        table = {}
        for row in rows:
            frame = int(row["frame"])
            if (level == "video") != (frame == -1):
                continue
            key = (int(row["repeat"]), int(row["fold"]), str(row["video_id"]), frame)
            table[key] = (str(row.get("patient_id") or row["video_id"]), str(row["true"]), str(row["pred"]))
        if not table:
            raise ValueError(f"run {name!r} has no {level}-level predictions")
        keyed.append(table)
    keys = aligned_keys(keyed, names)
    for name, table in zip(names[1:], keyed[1:]):
        if any(table[k][1] != keyed[0][k][1] for k in keys):
            raise ValueError(f"runs {names[0]!r} and {name!r} disagree on true labels")
    classes = sorted({keyed[0][k][1] for k in keys} | {t[k][2] for t in keyed for k in keys})
    cls = {c: i for i, c in enumerate(classes)}
    patients = sorted({keyed[0][k][0] for k in keys})
    pat = {p: i for i, p in enumerate(patients)}
    repeat = np.array([k[0] for k in keys])
    fold = np.array([k[1] for k in keys])
    patient = np.array([pat[keyed[0][k][0]] for k in keys])
    true = np.array([cls[keyed[0][k][1]] for k in keys])
    preds = np.stack([[cls[t[k][2]] for k in keys] for t in keyed])
    return classes, repeat, fold, patient, true, preds


def compare_results(predictions: list[list[dict]], names: list[str], baseline: int = 0,
                    metrics=("accuracy", "macro_f1"), levels=("video", "frame"), n_boot: int = 2000,
                    seed: int = 0) -> dict:
    """Paired differences (run - baseline) with patient-cluster bootstrap 95% intervals.

    ``predictions``: one list of prediction rows (the columns of ``predictions.csv``) per run.
    """
    if len(predictions) != len(names) or len(names) < 2:
        raise ValueError(f"need >= 2 runs with one name each, got {len(predictions)} runs / {len(names)} names")
    rng = np.random.default_rng(seed)
    out = {"baseline": names[baseline], "runs": list(names), "n_boot": n_boot, "unit": "patient",
           "statistic": "metric of each repeat's pooled test predictions, mean over repeats", "levels": {}}
    for level in levels:
        classes, repeat, fold, patient, true, preds = _paired_arrays(predictions, names, level)
        n_classes, repeats = len(classes), np.unique(repeat)
        r_index = np.searchsorted(repeats, repeat)
        n_patients = patient.max() + 1
        cells = len(repeats) * n_classes * n_classes
        # per patient and run: its contribution to every repeat's confusion matrix
        contrib = np.zeros((len(names), n_patients, cells))
        for j in range(len(names)):
            np.add.at(contrib[j], (patient, r_index * n_classes * n_classes + true * n_classes + preds[j]), 1.0)
        counts = patient_resamples(n_patients, n_boot, rng)
        level_out = {"classes": classes, "n_predictions": int(len(true)), "n_patients": int(n_patients),
                     "values": {}, "pairs": []}
        for metric in metrics:
            shape = (len(repeats), n_classes, n_classes)

            def stat(cm_flat: np.ndarray) -> np.ndarray:
                m = metric_from_confusion(cm_flat.reshape(cm_flat.shape[:-1] + shape), metric)
                return np.nanmean(m, axis=-1)

            point = [float(stat(contrib[j].sum(0))) for j in range(len(names))]
            boot = np.stack([stat(counts @ contrib[j]) for j in range(len(names))])  # [runs, n_boot]
            folds = sorted(set(zip(repeat.tolist(), fold.tolist())))
            per_fold = np.zeros((len(names), len(folds)))
            for f_i, (r, f) in enumerate(folds):
                sel = (repeat == r) & (fold == f)
                for j in range(len(names)):
                    cm = np.bincount(true[sel] * n_classes + preds[j][sel], minlength=n_classes ** 2)
                    per_fold[j, f_i] = metric_from_confusion(cm.reshape(n_classes, n_classes), metric)
            level_out["values"][metric] = {
                name: {"pooled": point[j], "fold_mean": float(per_fold[j].mean()),
                       "fold_std": float(per_fold[j].std(ddof=1)) if len(folds) > 1 else 0.0}
                for j, name in enumerate(names)
            }
            for j, name in enumerate(names):
                if j == baseline:
                    continue
                diff_boot = boot[j] - boot[baseline]
                fold_diff = per_fold[j] - per_fold[baseline]
                level_out["pairs"].append({
                    "run": name, "baseline": names[baseline], "metric": metric,
                    "baseline_value": point[baseline], "value": point[j], "diff": point[j] - point[baseline],
                    **interval(diff_boot),
                    "fold_diff_mean": float(fold_diff.mean()),
                    "fold_diff_std": float(fold_diff.std(ddof=1)) if len(folds) > 1 else 0.0,
                    "folds_better": int((fold_diff > 0).sum()), "folds_worse": int((fold_diff < 0).sum()),
                    "n_folds": len(folds),
                })
        out["levels"][level] = level_out
    return out


def compare_runs(run_dirs: list[str | Path], baseline: int = 0, metrics=("accuracy", "macro_f1"),
                 levels=("video", "frame"), n_boot: int = 2000, seed: int = 0,
                 names: list[str] | None = None) -> dict:
    """``compare_results`` over classification run folders (the first is the baseline by default);
    ``names`` overrides the init names the run folders record."""
    loaded = [load_predictions(d) for d in run_dirs]
    if names is not None and len(names) != len(loaded):
        raise ValueError(f"{len(names)} names for {len(loaded)} run folders")
    names = list(names) if names is not None else [n for n, _ in loaded]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # keep names unique for the table
        if n in seen:
            names[i] = f"{n} ({Path(run_dirs[i]).name})"
        seen[n] = i
    result = compare_results([rows for _, rows in loaded], names, baseline, metrics, levels, n_boot, seed)
    result["run_dirs"] = [str(d) for d in run_dirs]
    return result


def comparison_markdown(result: dict) -> str:
    lines = ["# Paired comparison", "",
             f"Baseline: **{result['baseline']}**. Difference = run - baseline; 95% interval from a "
             f"bootstrap over patients ({result['n_boot']} resamples). Statistic: {result['statistic']}. "
             "Folds: paired per-fold differences (mean ± std, folds better / worse).", ""]
    for level, lv in result["levels"].items():
        lines += [f"## {level.capitalize()} level ({lv['n_patients']} patients, {lv['n_predictions']} predictions)", "",
                  "| run | " + " | ".join(f"{m} (folds mean ± std)" for m in lv["values"]) + " |",
                  "|---" * (len(lv["values"]) + 1) + "|"]
        for name in result["runs"]:
            cells = [f"{v[name]['pooled']:.3f} ({v[name]['fold_mean']:.3f} ± {v[name]['fold_std']:.3f})"
                     for v in lv["values"].values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "| run vs baseline | metric | difference | 95% CI | P(boot diff <= 0) | fold diff | folds better/worse |",
                  "|---|---|---|---|---|---|---|"]
        for p in lv["pairs"]:
            lines.append(f"| {p['run']} vs {p['baseline']} | {p['metric']} | {p['diff']:+.3f} | "
                         f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}] | {p['p_boot_le_0']:.3f} | "
                         f"{p['fold_diff_mean']:+.3f} ± {p['fold_diff_std']:.3f} | "
                         f"{p['folds_better']}/{p['folds_worse']} of {p['n_folds']} |")
        lines.append("")
    return "\n".join(lines)


def write_comparison(result: dict, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.json").write_text(json.dumps(result, indent=1))
    (out_dir / "comparison.md").write_text(comparison_markdown(result))


# --------------------------------------------------------------------------------------------
# segmentation


def case_dice(row: dict) -> float:
    """A prediction row's mean foreground Dice (its ``mean_dice``; NaN when no class is present)."""
    value = row.get("mean_dice")
    try:
        return float(value) if value not in (None, "") else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def compare_segmentation(predictions: list[list[dict]], names: list[str], baseline: int = 0, n_boot: int = 2000,
                         seed: int = 0) -> dict:
    """Paired Dice differences (run - baseline) per label fraction, with 95% intervals from a
    bootstrap over patients, and per-fold paired differences.

    ``predictions``: per run, the rows of its ``predictions.csv`` (fold, fraction, split, case_id,
    patient_id, mean_dice, ...). Only the held-out test folds (``split == "test"``) count; cases
    whose Dice is undefined in any run (no foreground) are left out of every run.
    """
    if len(predictions) != len(names) or len(names) < 2:
        raise ValueError(f"need >= 2 runs with one name each, got {len(predictions)} runs / {len(names)} names")
    rng = np.random.default_rng(seed)
    tables = []
    for name, rows in zip(names, predictions):
        table = {(f"{float(r['fraction']):g}", int(r["fold"]), str(r["case_id"])): (str(r["patient_id"]), case_dice(r))
                 for r in rows if str(r.get("split", "test")) == "test"}
        if not table:
            raise ValueError(f"run {name!r} has no test-fold predictions")
        tables.append(table)
    keys = aligned_keys(tables, names)
    out = {"baseline": names[baseline], "runs": list(names), "n_boot": n_boot, "unit": "patient",
           "statistic": "mean over test cases of the case's mean foreground Dice", "fractions": {}}
    for fraction in sorted({k[0] for k in keys}, key=float):
        fkeys = [k for k in keys if k[0] == fraction and all(not np.isnan(t[k][1]) for t in tables)]
        if not fkeys:
            continue
        patients = sorted({tables[0][k][0] for k in fkeys})
        index = {p: i for i, p in enumerate(patients)}
        patient = np.array([index[tables[0][k][0]] for k in fkeys])
        dice = np.array([[t[k][1] for k in fkeys] for t in tables])  # [runs, cases]
        contrib = np.zeros((len(names), len(patients), 2))  # per patient: Dice sum, case count
        for j in range(len(names)):
            np.add.at(contrib[j], (patient, 0), dice[j])
            np.add.at(contrib[j], (patient, 1), 1.0)
        counts = patient_resamples(len(patients), n_boot, rng)
        boot = np.stack([(counts @ contrib[j])[:, 0] / (counts @ contrib[j])[:, 1] for j in range(len(names))])
        point = dice.mean(axis=1)
        folds = sorted({k[1] for k in fkeys})
        per_fold = np.array([[dice[j][[k[1] == f for k in fkeys]].mean() for f in folds] for j in range(len(names))])
        entry = {"n_cases": len(fkeys), "n_patients": len(patients),
                 "values": {n: float(point[j]) for j, n in enumerate(names)}, "pairs": []}
        for j, name in enumerate(names):
            if j == baseline:
                continue
            fold_diff = per_fold[j] - per_fold[baseline]
            entry["pairs"].append({
                "run": name, "baseline": names[baseline], "diff": float(point[j] - point[baseline]),
                **interval(boot[j] - boot[baseline]),
                "folds_better": int((fold_diff > 0).sum()), "n_folds": len(folds),
            })
        out["fractions"][fraction] = entry
    return out


def segmentation_comparison_markdown(result: dict) -> str:
    """The bootstrap table of :func:`compare_segmentation`."""
    lines = [f"Paired test Dice differences against **{result['baseline']}**, 95% intervals from a bootstrap over "
             f"patients ({result['n_boot']} resamples); statistic: {result['statistic']}.", "",
             "| label fraction | run vs baseline | Dice | baseline Dice | difference | 95% CI | P(boot diff <= 0) | folds better |",
             "|---|---|---|---|---|---|---|---|"]
    for fraction, entry in result["fractions"].items():
        for p in entry["pairs"]:
            lines.append(f"| {float(fraction) * 100:g}% | {p['run']} vs {p['baseline']} | {entry['values'][p['run']]:.3f} | "
                         f"{entry['values'][p['baseline']]:.3f} | {p['diff']:+.3f} | [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}] | "
                         f"{p['p_boot_le_0']:.3f} | {p['folds_better']}/{p['n_folds']} |")
    return "\n".join(lines) + "\n"
