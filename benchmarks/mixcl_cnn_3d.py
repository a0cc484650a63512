"""MixCL on the 3D ResNet-18 (method mixcl_cnn) -> OpenKBP mandible with the 3D U-Net, against scratch.

    python benchmarks/mixcl_cnn_3d.py --stage pretrain   # MixCL-CNN on the pool (cached; resumes if stopped)
    python benchmarks/mixcl_cnn_3d.py --stage finetune   # fold 1 of 5, 5% and 15%: scratch vs MixCL-CNN + report
    python benchmarks/mixcl_cnn_3d.py --quick            # both stages, plumbing check in minutes (numbers meaningless)

Two stages, each within 90 minutes on 2 cores (the default --stage all runs both in one go): 3D
pretraining runs in fp32 (configs/mixcl-cnn-3d.yaml says why) at ~6 s per step of 2 x 3 views of 64^3.

Pool and target as in benchmarks/mixcl_3d.py (the UNETR version): the target is every OpenKBP patient
with the mandible contoured; the other patients are the pretraining pool, split into two sources that
annotate different organs (the parotids; brainstem + spinal cord). The mandible is never annotated in
pretraining and no target patient is seen by it. MixCL-CNN pretrains the 3D ResNet-18 on 64^3 patches
of the pool (configs/mixcl-cnn-3d.yaml); the mandible is then fine-tuned with segment_3d.py's recipe
(its ``Settings.segment_config``: 64 x 64 x 32 crops, Dice + CE, warm-up + cosine, an epoch budget
with a floor of steps, sliding-window inference) from scratch and from the MixCL-CNN encoder, on the
same fold, label fractions, cases and seeds; a paired bootstrap over test patients compares them.

Writes benchmarks/results/mixcl_cnn_3d.md (``--quick``: mixcl_cnn_3d_quick.md).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _segbench import Log, command_line, machine, unet_bench_args, write_results  # noqa: E402
from joint_2d import cached_path, cached_pretrain, logged_rows, term_account  # noqa: E402  (pretraining cache, its account)
from mixcl_3d import SOURCE_ORGANS, TARGET_ORGANS, split_patients  # noqa: E402
from segment_3d import Settings as Recipe  # noqa: E402


@dataclass
class Settings:
    folds: list[int] = field(default_factory=lambda: [1])
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.15])
    pretrain_steps: int = 300
    pretrain_batch: int = 2  # pool patches per step (each gives the method its two views + a second patch)
    pretrain_patients: int | None = None  # per source; None = all
    target_patients: int | None = None  # None = all
    seed: int = 0

    @classmethod
    def quick(cls) -> Settings:
        return cls(fractions=[0.15], pretrain_steps=3, pretrain_patients=3, target_patients=12)


def recipe(s: Settings, quick: bool) -> Recipe:
    """segment_3d.py's recipe (its defaults, or its --quick ones), on this benchmark's folds and fractions."""
    r = Recipe.quick() if quick else Recipe()
    r.folds, r.fractions, r.seed = s.folds, s.fractions, s.seed
    r.class_weights = None  # one organ: background + mandible
    return r


def pretrain_config(root: Path, sources: dict[str, list[str]], s: Settings) -> dict:
    config = yaml.safe_load((ROOT / "configs" / "mixcl-cnn-3d.yaml").read_text())
    config["mixcl_cnn"]["datasets"] = [
        {"adapter": "openkbp", "root": str(root), "name": name, "patients": sources[name], "organs": SOURCE_ORGANS[name],
         "window": [-150, 250]} for name in SOURCE_ORGANS]
    config["optim"].update(batch_size=s.pretrain_batch, max_steps=s.pretrain_steps)
    config["train"] = {**config.get("train", {}), "device": "cpu", "progress": False, "tensorboard": False,
                       "checkpoint_every": 100, "seed": s.seed}
    # no log_grad_norms: it adds one backward pass per term (three) to every 3D step
    return config


def main(argv=None) -> int:
    def extra(parser) -> None:
        parser.add_argument("--stage", choices=("all", "pretrain", "finetune"), default="all")
        parser.add_argument("--fractions", default=None, help="label fractions to fine-tune, e.g. 0.05 (default 0.05,0.15)")

    args, work, out_md = unet_bench_args("mixcl_cnn_3d", __doc__, argv, extra)
    s = Settings.quick() if args.quick else Settings()
    s.folds = args.fold_list or s.folds
    if args.fractions:
        s.fractions = sorted(float(f) for f in args.fractions.split(","))
    root = args.data / "openkbp"
    if not (root / "index.json").is_file():
        print(f"mixcl_cnn_3d: {root / 'index.json'} not found (needs ../shared/data)", file=sys.stderr)
        return 2
    started = time.time()
    log = Log()

    target, sources = split_patients(root / "index.json", s.seed)
    if s.pretrain_patients:
        sources = {k: v[: s.pretrain_patients] for k, v in sources.items()}
    if s.target_patients:
        target = target[: s.target_patients]
    assert not set(target) & (set(sources["glands"]) | set(sources["neuro"]))
    log(f"OpenKBP: {len(target)} target patients ({' + '.join(TARGET_ORGANS)}); pool "
        + ", ".join(f"{k} {len(v)} patients ({' + '.join(SOURCE_ORGANS[k])})" for k, v in sources.items()))

    # 1. MixCL-CNN pretraining on the pool (cached by config; a stopped run resumes from its last checkpoint)
    config = pretrain_config(root, sources, s)
    if args.stage in ("all", "pretrain"):
        checkpoint = cached_pretrain("mixcl_cnn", config, work, log)
        if args.stage == "pretrain":
            return 0
    checkpoint = cached_path("mixcl_cnn", config, work)
    if not checkpoint.is_file():
        print(f"mixcl_cnn_3d: {checkpoint} not found: run --stage pretrain first", file=sys.stderr)
        return 2
    metrics = checkpoint.parents[1] / "metrics.jsonl"
    steps = len(logged_rows(metrics, "loss"))

    # 2. fine-tuning: scratch and MixCL-CNN on the same fold, fractions, cases and seeds
    from medcl.data.seg_manifest import openkbp_task
    from medcl.evaluate.compare import segmentation_comparison_markdown
    from medcl.evaluate.segment import comparison_markdown, finetune, surface_comparison_markdown

    r = recipe(s, args.quick)
    cfg = r.segment_config(args.threads)
    task = openkbp_task(root, TARGET_ORGANS, patients=target, intensity_range=tuple(r.window))
    t0 = time.time()
    result = finetune(task, ["scratch", f"mixcl_cnn={checkpoint}"], cfg, work / "finetune", log=log, overwrite=True)
    finetune_minutes = (time.time() - t0) / 60
    results = result["comparison"]["results"]
    minutes = {name: sum(x["train_seconds"] for x in res["runs"]) / 60 for name, res in results.items()}
    wall = checkpoint.parents[1] / "wall_seconds.txt"
    pretrain_time = (f"the pretraining stage took {float(wall.read_text()) / 60:.1f} min" if wall.is_file()
                     else "the pretraining stage's wall time was not recorded")

    # 3. report
    lines = [
        "# MixCL-CNN 3D: OpenKBP organ-subset pool -> mandible, 3D U-Net (ResNet-18 encoder)", "",
        "MixCL's three terms on the stages of medcl's 3D ResNet-18 (`method: mixcl_cnn`), pretrained on OpenKBP"
        f" patients contoured for other organs ({'; '.join(f'{k}: ' + ' + '.join(v) for k, v in SOURCE_ORGANS.items())};"
        " the mandible never annotated, no target patient seen), then the 3D U-Net fine-tuned on the mandible"
        " with `benchmarks/segment_3d.py`'s recipe, from scratch and from that encoder. Folds by patient"
        " (5-fold, validation patients carved from the training folds, each test fold evaluated once).", "",
        f"- command: `{command_line()}`",
        f"- machine: {machine()}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- wall time of this command: {(time.time() - started) / 60:.1f} min (fine-tuning {finetune_minutes:.1f});"
        f" {pretrain_time} ({steps} steps)",
        f"- folds run: {s.folds} of {r.n_folds}; target patients {len(target)}", "",
        "## Settings", "", "```json",
        json.dumps({"benchmark": asdict(s), "pretraining": config, "segment_config": cfg.model_dump()}, indent=1,
                   default=str), "```", "",
        *term_account(metrics, ("loss", "loss_id", "loss_label", "loss_recon"), None, "Pretraining",
                      "Unweighted terms (loss = id + alpha * label + beta * recon)."),
        "## Test Dice: scratch vs MixCL-CNN", "", comparison_markdown(results), "",
        "HD95 and NSD (voxels of the ~4 mm grid):", "", surface_comparison_markdown(results), "",
        segmentation_comparison_markdown(result["comparison"]), "",
        "Fine-tuning minutes per init (training loops only): " + ", ".join(f"{n} {m:.1f}" for n, m in minutes.items()),
        "",
    ]
    write_results(out_md, lines, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
