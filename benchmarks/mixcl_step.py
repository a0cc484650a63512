"""Time split of one MixCL training step on this CPU: loader, pixel sampling, forward, losses,
backward, optimiser; 2D (128 px patches) and 3D (64^3 patches) with a small ViT.

    python benchmarks/mixcl_step.py [--steps 6] [--threads 2] [--out benchmarks/results/mixcl_step.md]

Data: the real pools when ../shared/data is present (2D: hc18 + tg3k + ctrus; 3D: OpenKBP),
else synthetic images. Each phase is timed with perf_counter around the public sub-steps that
``MixCL.training_step`` itself is made of (encode, reconstruct -> sample -> loss_terms, combine), so
the benchmark and training share one implementation; one warm-up step.
Goal of the issue: sampling + losses <= 15% of the step.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medcl.config import load_config  # noqa: E402
from medcl.data.mixcl_views import MixCLViewMaker  # noqa: E402
from medcl.data.pool import pool_from_specs  # noqa: E402
from medcl.environment import cpu_model  # noqa: E402
from medcl.methods.mixcl import build_method  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SMALL_VIT = ["mixcl.hidden_size=192", "mixcl.mlp_dim=768", "mixcl.num_layers=6", "mixcl.num_heads=6",
             "mixcl.feature_size=16"]  # ViT patch, label pooling etc.: the presets' (2D: 16, 3D: 8)
SETTINGS = {
    "2D 128 px": ("mixcl-2d.yaml", ["mixcl.patch_size=128", "optim.batch_size=8"]),
    "3D 64^3": ("mixcl-3d.yaml", ["mixcl.patch_size=64", "optim.batch_size=2", "mixcl.elastic_prob=0.5", "mixcl.cache=16"]),
}
PHASES = ["loader", "sampling", "forward", "losses", "backward", "optimizer"]


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "n/a"


def synthetic_specs(tmp: Path, dims: int) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(0)
    if dims == 2:
        for name in ("a", "b"):
            for sub in ("images", "masks"):
                (tmp / name / sub).mkdir(parents=True, exist_ok=True)
            for i in range(16):
                img = (rng.random((200, 220)) * 255).astype(np.uint8)
                mask = np.zeros((200, 220), np.uint8)
                mask[50:150, 40 + i:160] = 255
                Image.fromarray(img).save(tmp / name / "images" / f"{i}.png")
                Image.fromarray(mask).save(tmp / name / "masks" / f"{i}.png")
        return [{"adapter": "image_folder", "root": str(tmp / n), "name": n} for n in ("a", "b")]
    import json

    import nibabel as nib

    cases = []
    for i in range(4):
        vol = (rng.random((96, 96, 96)) * 400 - 150).astype(np.float32)
        lab = np.zeros((96, 96, 96), np.uint8)
        lab[20:60, 20:60, 20:60] = 1
        lab[60:80, 30:70, 40:80] = 2
        nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp / f"ct{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp / f"lab{i}.nii.gz")
        cases.append({"image": f"ct{i}.nii.gz", "label": f"lab{i}.nii.gz"})
    (tmp / "dataset.json").write_text(json.dumps({"labels": {"1": "a", "2": "b"}, "training": cases}))
    return [{"adapter": "nifti_pairs", "root": str(tmp), "name": "synthetic"}]


def time_setting(label: str, preset: str, overrides: list[str], steps: int, tmp: Path) -> tuple[dict, dict]:
    cfg = load_config(ROOT / "configs" / preset, SMALL_VIT + overrides)
    p = cfg.params
    real = SHARED.is_dir()
    specs = [e.model_dump(exclude_none=True) for e in p.datasets] if real else synthetic_specs(tmp / label.split()[0], p.spatial_dims)
    if real:
        for spec in specs:
            spec["root"] = str((ROOT / spec["root"]).resolve())
    pool = pool_from_specs(specs, cache=p.cache, spacing=p.spacing)
    views = MixCLViewMaker(pool, p.patch_size, same_image_prob=p.same_image_prob, fg_crop_prob=p.fg_crop_prob,
                           affine_prob=p.affine_prob, elastic_prob=p.elastic_prob, intensity_prob=p.intensity_prob)
    torch.manual_seed(0)
    method = build_method(p)
    method.train()
    opt = torch.optim.AdamW(method.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(pool))
    bs = cfg.optim.batch_size
    totals = {k: [] for k in PHASES}
    for step in range(steps + 1):
        t = {}
        t0 = time.perf_counter()
        batch = views.make_batch(order[step * bs:(step + 1) * bs], rng)
        t["loader"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        encoded = method.encode(batch)
        restored = method.reconstruct(encoded)
        t["forward"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        samples = method.sample(batch, tuple(encoded.z[method.label_layer].shape[2:]))
        t["sampling"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        loss = method.combine(method.loss_terms(batch, encoded, samples, restored))["loss"]
        t["losses"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t["backward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        opt.step()
        t["optimizer"] = time.perf_counter() - t0
        if step > 0:  # step 0 is warm-up
            for k in PHASES:
                totals[k].append(t[k])
        print(f"{label} step {step}: " + ", ".join(f"{k} {t[k]:.3f}s" for k in PHASES) + f", loss {loss.item():.2f}", flush=True)
    info = {"data": "real" if real else "synthetic", "pool": pool.describe().splitlines()[0],
            "batch": bs, "patch": p.patch_size, "vit_patch": p.vit_patch, "pooling": p.label_pooling,
            "tokens": int(np.prod(method.backbone.grid_size)),
            "params": sum(q.numel() for q in method.parameters()),
            "sampled": int(sum(s.index.numel() for s in samples))}
    return {k: float(np.mean(v)) for k, v in totals.items()}, info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per setting (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mixcl_step.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import tempfile

    load_before = load()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (preset, overrides) in SETTINGS.items():
            results[label] = time_setting(label, preset, overrides, args.steps, Path(tmp))
    load_after = load()

    lines = [
        "# MixCL training-step time split (CPU)", "",
        f"Command: `python benchmarks/mixcl_step.py --steps {args.steps} --threads {args.threads}`  ",
        f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}  ",
        f"Machine: {os.cpu_count()} cores, {cpu_model()}, torch {torch.__version__}, {args.threads} torch threads  ",
        f"Load before: `{load_before}`  ",
        f"Load after: `{load_after}`  ",
        f"Model: UNETR, ViT {' '.join(o.split('.')[1] for o in SMALL_VIT)} (ViT patch and the rest: the presets); "
        f"mean of {args.steps} steps after 1 warm-up.",
        "", "| phase | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results),
    ]
    for k in PHASES:
        cells = [f"{r[k]:.3f} s ({100 * r[k] / sum(r.values()):.1f}%)" for r, _ in results.values()]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("| **step total** | " + " | ".join(f"**{sum(r.values()):.3f} s**" for r, _ in results.values()) + " |")
    share = [100 * (r["sampling"] + r["losses"]) / sum(r.values()) for r, _ in results.values()]
    share_compute = [100 * (r["sampling"] + r["losses"]) / (sum(r.values()) - r["loader"]) for r, _ in results.values()]
    lines.append("| sampling + losses, share of step | " + " | ".join(f"{s:.1f}%" for s in share) + " |")
    lines.append("| sampling + losses, share of step without loader | " + " | ".join(f"{s:.1f}%" for s in share_compute) + " |")
    lines += ["", "Settings:", ""]
    for label, (_, info) in results.items():
        lines.append(f"- {label}: {info['data']} data ({info['pool']}), batch {info['batch']}, patch {info['patch']}, "
                     f"ViT patch {info['vit_patch']}, {info['tokens']} tokens per view, {info['pooling']} label pooling, {info['params'] / 1e6:.2f} M parameters, "
                     f"{info['sampled']} pixels sampled in the last step (P1 + P2)")
    lines += ["", "Phases: loader = building the batch (read/crop/augment P1, V1, V1', P2, V2); forward = encoder on "
              "the 3 views + all projectors + reconstruction decoder; sampling = labels to the token grid + "
              "boundary-weighted draws; losses = L_id (all layers) + L_label + L_recon; backward; optimizer = AdamW step.",
              "The machine is shared with other jobs: compare columns of one run, not runs."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
