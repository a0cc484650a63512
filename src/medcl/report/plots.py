"""Report figures, rendered with matplotlib's Agg backend to PNG bytes (no display needed)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 100
RUN_COLOURS = plt.get_cmap("tab10").colors


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _smooth(values: Sequence[float]) -> np.ndarray:
    """Centred moving average (no lag) over ~2% of the points; short series are returned as is."""
    values = np.asarray(values, dtype=float)
    if len(values) < 100:
        return values
    half = max(1, len(values) // 100)
    padded = np.pad(values, half, mode="edge")
    kernel = np.ones(2 * half + 1) / (2 * half + 1)
    return np.convolve(padded, kernel, mode="valid")


def training_curves(
    series_per_run: dict[str, dict[str, tuple[list[float], list[float]]]],
    x_label: str = "step",
    colours: dict[str, tuple] | None = None,
) -> bytes:
    """One panel per logged quantity (loss terms, lr, ...); each run a colour, overlaid."""
    colours = colours or {name: RUN_COLOURS[i % len(RUN_COLOURS)] for i, name in enumerate(series_per_run)}
    terms: list[str] = []
    for series in series_per_run.values():
        for key in series:
            if key not in terms:
                terms.append(key)
    # total loss first, loss terms next, learning rate and the rest last
    terms.sort(key=lambda k: (k != "loss", not k.startswith("loss"), k in ("lr", "learning_rate"), k))
    n_cols = min(3, len(terms))
    n_rows = math.ceil(len(terms) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.6 * n_cols, 3.2 * n_rows), squeeze=False)
    for ax, term in zip(axes.flat, terms):
        for run_name, series in series_per_run.items():
            colour = colours.get(run_name, "black")
            if term not in series:
                continue
            xs, ys = series[term]
            smooth = _smooth(ys)
            if len(ys) >= 100:
                ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(xs, smooth, color=colour, linewidth=1.6, label=run_name)
        ax.set_title(term, fontsize=11)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
        if term in ("lr", "learning_rate"):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in list(axes.flat)[len(terms):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(l, h)
    if seen:
        fig.legend(seen.values(), seen.keys(), loc="upper center", ncol=min(len(seen), 5), bbox_to_anchor=(0.5, 1.04), frameon=False)
    fig.tight_layout()
    return figure_png(fig)


GROUP_KEYS = ("repeat", "fold", "fraction")
X_KEYS = ("epoch", "iteration", "step")


def _group_label(key: str, value) -> str:
    if key == "fraction" and isinstance(value, (int, float)):
        return f"{100 * value:g}% labels"
    return f"{key} {value}"


def finetune_curves(rows: list[dict], title: str) -> bytes:
    """Train loss and validation metric(s) vs epoch (or iteration), one line per repeat/fold/fraction."""
    x_key = next((k for k in X_KEYS if any(isinstance(r.get(k), (int, float)) for r in rows)), None)
    if x_key is None:
        raise ValueError("curves have no epoch, iteration or step column")
    group_keys = [k for k in GROUP_KEYS if len({str(r.get(k)) for r in rows}) > 1]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in group_keys), []).append(row)
    numeric = [k for k in dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
               if k not in (x_key, *GROUP_KEYS, *X_KEYS, "lr", "seconds", "time")]
    keys = [k for k in numeric if k == "train_loss"] + [k for k in numeric if k.startswith("val")]
    keys = keys or numeric[:2]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.6 * max(1, len(keys)), 2.9), squeeze=False)
    cmap = plt.get_cmap("tab10") if len(groups) <= 10 else plt.get_cmap("viridis")
    for ax, key in zip(axes.flat, keys):
        for i, (group, members) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
            colour = cmap(i) if len(groups) <= 10 else cmap(i / max(1, len(groups) - 1))
            pts = [(r[x_key], r[key]) for r in members if isinstance(r.get(x_key), (int, float)) and isinstance(r.get(key), (int, float))
                   and math.isfinite(r[key])]
            if pts:
                xs, ys = zip(*sorted(pts))
                label = ", ".join(_group_label(k, v) for k, v in zip(group_keys, group))
                ax.plot(xs, ys, color=colour, linewidth=1.2, marker="." if len(xs) < 30 else None, label=label or None)
        ax.set_title(key.replace("_", " "), fontsize=11)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
    if group_keys and len(groups) <= 10:
        axes.flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return figure_png(fig)


def confusion_matrix_plot(matrix: np.ndarray, classes: Sequence[str], title: str) -> bytes:
    """Row-normalised heatmap (recall per true class) annotated with counts and percentages."""
    matrix = np.asarray(matrix, dtype=float)
    row_sums = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, row_sums, out=np.zeros_like(matrix), where=row_sums > 0)
    size = 1.2 + 0.9 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            colour = "white" if normalised[i, j] > 0.6 else "black"
            ax.text(j, i, f"{int(matrix[i, j])}\n{100 * normalised[i, j]:.0f}%", ha="center", va="center", color=colour, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def _category_colours(values: Sequence[str], cmap_name: str) -> tuple[list, list[str]]:
    categories = sorted(set(values))
    cmap = plt.get_cmap(cmap_name)
    n = max(1, len(categories))
    lookup = {c: cmap(i % cmap.N) if cmap.N < 256 else cmap(i / max(1, n - 1)) for i, c in enumerate(categories)}
    return [lookup[v] for v in values], categories


def embedding_plot(coords: np.ndarray, labels: Sequence[str], videos: Sequence[str], title: str) -> bytes:
    """Two panels: points coloured by class (legend) and by video (one colour per video)."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
    colours, classes = _category_colours([l or "(unlabeled)" for l in labels], "tab10")
    for cls in classes:
        idx = [i for i, l in enumerate(labels) if (l or "(unlabeled)") == cls]
        axes[0].scatter(coords[idx, 0], coords[idx, 1], s=14, color=[colours[i] for i in idx], label=cls, alpha=0.85, edgecolors="none")
    axes[0].legend(fontsize=8, markerscale=1.5, loc="best")
    axes[0].set_title("coloured by class", fontsize=10)
    n_videos = len(set(videos))
    video_colours, _ = _category_colours(list(videos), "tab20" if n_videos <= 20 else "nipy_spectral")
    axes[1].scatter(coords[:, 0], coords[:, 1], s=14, color=video_colours, alpha=0.85, edgecolors="none")
    axes[1].set_title(f"coloured by video ({n_videos} videos)", fontsize=10)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return figure_png(fig)


def gradcam_grid(images: Sequence[np.ndarray], row_titles: Sequence[str], maps: dict[str, Sequence[np.ndarray]]) -> bytes:
    """Rows: sample frames; columns: the frame, then its Grad-CAM overlay for each run."""
    n_rows, n_cols = len(images), 1 + len(maps)
    cell = 2.3
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols, cell * n_rows + 0.4), squeeze=False)
    for r, image in enumerate(images):
        axes[r, 0].imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
        axes[r, 0].set_ylabel(row_titles[r], fontsize=8)
        for c, (run_name, run_maps) in enumerate(maps.items(), start=1):
            axes[r, c].imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
            # opacity follows the map: low-attention regions leave the frame visible
            heat = plt.get_cmap("jet")(np.clip(run_maps[r], 0.0, 1.0))
            heat[..., 3] = 0.6 * np.clip(run_maps[r], 0.0, 1.0)
            axes[r, c].imshow(heat)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("frame", fontsize=9)
    for c, run_name in enumerate(maps, start=1):
        axes[0, c].set_title(run_name, fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def _dice(pred: np.ndarray, gt: np.ndarray, label: int) -> float:
    p, g = pred == label, gt == label
    denom = p.sum() + g.sum()
    return float(2 * (p & g).sum() / denom) if denom else float("nan")


def segmentation_overlay(image: np.ndarray, pred: np.ndarray, gt: np.ndarray, title: str, class_names: Sequence[str] | None = None) -> bytes:
    """Image, ground truth and prediction (filled, semi-transparent), Dice per class in the title."""
    image = np.asarray(image, dtype=float)
    lo, hi = float(np.min(image)), float(np.max(image))
    image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    labels = sorted(set(np.unique(gt).tolist()) | set(np.unique(pred).tolist()) - {0})
    labels = [int(l) for l in labels if l != 0]
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.9))
    for ax, (panel, mask) in zip(axes, (("image", None), ("ground truth", gt), ("prediction", pred))):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        if mask is not None:
            rgba = np.zeros((*mask.shape, 4))
            for label in labels:
                rgba[mask == label] = (*cmap((label - 1) % 10)[:3], 0.45)
            ax.imshow(rgba)
            for label in labels:
                if (mask == label).any() and (mask == label).sum() < mask.size:
                    ax.contour(mask == label, levels=[0.5], colors=[cmap((label - 1) % 10)], linewidths=1.0)
        ax.set_title(panel, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    def name(label: int) -> str:
        return class_names[label] if class_names is not None and label < len(class_names) else f"class {label}"
    dice = ", ".join(f"{name(l)} Dice {_dice(pred, gt, l):.2f}" for l in labels) or "no foreground"
    fig.suptitle(f"{title}: {dice}", fontsize=10)
    fig.tight_layout()
    return figure_png(fig)
