"""Scaling past one machine's memory: streamed shards vs in-memory frames, and ingest split in parts.

    python benchmarks/scale.py [--data ../shared/data] [--size 112] [--batch 32] [--steps 20]
    python benchmarks/scale.py --quick          # plumbing check in a minute or two (scale_quick.md)

On the COVID-BLUES corpus (``--blues-every``-th video; ingested as benchmarks/pocus_transfer.py
ingests it: 3 frames/s, patient from the file name, COVID PCR per patient as the label), it measures

1. ingest: ``medcl ingest`` in one process vs ``medcl ingest --part k/2`` in two processes at once
   followed by ``medcl ingest merge``; the merged manifest must equal the single one;
2. corpora of 1x, 4x and 16x the videos (renamed copies: ``<id>__copyK``, their own patients),
   each packed into WebDataset shards (``pack_shards``);
3. pretraining (USCL, ``--steps`` timed steps after ``--warmup``): images/s in steady state and the
   peak resident memory of the process (``resource.getrusage``: each run is a fresh process), with
   ``data.store=shards`` at every size and ``data.store=memory`` at 1x and 4x;
4. the streamed loader alone (no model) at 1x: images/s one process builds, and shard read MB/s;

then writes ``benchmarks/results/scale.md`` (``scale_quick.md`` with ``--quick``): command,
machine, date, the numbers and a cost model for a 100k-video corpus derived from them. The GPU
training rate of the cost model is an input (``--gpu-images-per-s``), not a measurement.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pocus_transfer import link_subset  # noqa: E402  (a folder of symlinks: ingest a subset)

REPLICAS = (1, 4, 16)
BLUES_PATIENT = r"patient_(?P<patient>\d+)_"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def blues_options(data: Path) -> dict:
    """How benchmarks/pocus_transfer.py ingests COVID-BLUES (patient from the name, PCR label per patient)."""
    return {"patient_pattern": BLUES_PATIENT, "patient_metadata": data / "covid-blues" / "patients.csv",
            "patient_label_column": "cov_test", "label_map": {"0": "negative", "1": "covid"}}


# ------------------------------------------------------------------------------ 1. ingest
def ingest_processes(src: Path, data: Path, size: int, outs: list[Path]) -> float:
    """Seconds to run ``medcl ingest`` into every folder of ``outs`` at once (``--part k/len(outs)``
    when more than one): processes on both sides, so both pay the same start-up."""
    options = blues_options(data)
    label_map = ",".join(f"{k}={v}" for k, v in options["label_map"].items())
    command = [sys.executable, "-m", "medcl", "ingest", str(src), "OUT", "--size", str(size), "--no-progress",
               "--patient-pattern", BLUES_PATIENT, "--patient-metadata", str(options["patient_metadata"]),
               "--patient-label-column", "cov_test", "--label-map", label_map]
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    processes = [subprocess.Popen([out if arg == "OUT" else arg for arg in map(str, command)]
                                  + (["--part", f"{k}/{len(outs)}"] if len(outs) > 1 else []),
                                  stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
                 for k, out in enumerate(map(str, outs), 1)]
    codes = [p.wait() for p in processes]
    if any(code not in (0, 2) for code in codes):  # 2: some files failed (listed in errors.csv)
        raise RuntimeError(f"medcl ingest exited with {codes}")
    return time.perf_counter() - t0


def ingest_both_ways(data: Path, work: Path, every: int, size: int, log) -> dict:
    from medcl.data.manifest import read_manifest
    from medcl.ingest.parts import merge_ingests

    root = data / "covid-blues" / "lus_videos"
    files = sorted(root.glob("*.mp4"))[::every]
    src = link_subset(files, root, work / f"src-every{every}")
    single = work / "ingest-1proc"
    one_process = ingest_processes(src, data, size, [single])
    log(f"ingest, 1 process: {len(read_manifest(single))} videos, {one_process:.1f} s")
    parts = [work / f"ingest-part{k}" for k in (1, 2)]
    two_parts = ingest_processes(src, data, size, parts)
    shutil.rmtree(work / "ingest-merged", ignore_errors=True)
    t0 = time.perf_counter()
    merge_ingests(parts, work / "ingest-merged")
    merge_s = time.perf_counter() - t0
    equal = read_manifest(work / "ingest-merged") == read_manifest(single)
    log(f"ingest, 2 parts at once: {two_parts:.1f} s, merge {merge_s:.2f} s, merged manifest equal: {equal}")
    if not equal:
        raise RuntimeError("the merged parts differ from the single-process ingest")
    records = read_manifest(single)
    return {"videos": len(records), "frames": sum(r.n_frames for r in records), "one_process_s": one_process,
            "two_parts_s": two_parts, "merge_s": merge_s, "equal": equal, "folder": str(single)}


# ------------------------------------------------------------------------------ 2. replicas
def replicate(source: Path, out: Path, copies: int, shard_bytes: int) -> dict:
    """``copies`` renamed copies of every video (frames hard-linked), packed into shards."""
    from medcl.data.manifest import read_manifest, write_manifest
    from medcl.ingest.pack import pack_shards

    shutil.rmtree(out, ignore_errors=True)
    (out / "frames").mkdir(parents=True)
    records = []
    for record in read_manifest(source):
        for k in range(copies):
            copy = dict(record.__dict__)
            copy.update(video_id=f"{record.video_id}__copy{k}", source=f"copy{k}/{record.source}",
                        patient_id=f"{record.patient_id}__copy{k}", frames_file=f"frames/{record.video_id}__copy{k}.npy")
            os.link(source / record.frames_file, out / copy["frames_file"])
            records.append(type(record)(**copy))
    write_manifest(out / "manifest.csv", records)
    shutil.copy(source / "ingest.json", out / "ingest.json")
    t0 = time.perf_counter()
    packed = pack_shards(out, shard_bytes)
    return {"copies": copies, "videos": len(records), "shards": packed.n_shards, "bytes": packed.n_bytes,
            "pack_s": time.perf_counter() - t0, "folder": str(out)}


# ------------------------------------------------------------------------------ 3./4. child runs
def child(spec: dict) -> dict:
    """One measurement in this (fresh) process; returns what :func:`main` tabulates."""
    import torch

    from medcl.config import load_config
    from medcl.methods.base import build_method
    from medcl.train.trainer import Trainer, TrainerCallback

    torch.manual_seed(0)
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    steps, warmup, batch = spec["steps"], spec["warmup"], spec["batch"]
    cfg = load_config(ROOT / "configs" / "uscl.yaml", [
        f"data.manifest={spec['corpus']}", f"out={out}", f"data.size={spec['size']}", f"data.store={spec['store']}",
        f"data.shuffle_buffer={spec['buffer']}", f"optim.batch_size={batch}", f"optim.max_steps={warmup + steps}",
        "optim.warmup_epochs=0", f"train.checkpoint_every={10**6}", "train.progress=false", "train.device=cpu",
        "data.label_fraction=0.1"])
    rss_start = peak_rss_mb()
    t0 = time.perf_counter()
    method, loader = build_method(cfg)
    build_s = time.perf_counter() - t0
    rss_built = peak_rss_mb()
    if spec["mode"] == "loader":  # the loader alone: what one process feeds
        store = loader.store
        t0 = time.perf_counter()
        size = sum(store.read(v).nbytes for v in store.videos)
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = 0
        for n, _ in enumerate(loader.epoch_batches(0), 1):
            if n == steps:
                break
        rate = n * 2 * batch / (time.perf_counter() - t0)
        return {"images_per_s": rate, "read_mb_per_s": size / 1e6 / read_s, "peak_rss_mb": peak_rss_mb()}

    class Stamps(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, trainer, step, values):
            self.ends.append(time.perf_counter())

    stamps = Stamps()
    Trainer(method, loader, cfg, out, callbacks=[stamps]).fit()
    rate = steps * 2 * batch / (stamps.ends[-1] - stamps.ends[warmup - 1])
    return {"images_per_s": rate, "build_s": build_s, "rss_start_mb": rss_start, "rss_built_mb": rss_built,
            "peak_rss_mb": peak_rss_mb(), "max_held": getattr(loader, "max_held", None)}


def run_child(spec: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"child run failed ({spec}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ report
COST_MODEL = """## Cost model: a 100k-video corpus

Derived from the numbers above (this machine, {size} px measurements scaled to {target} px where
the stored size matters); change the inputs by rerunning with other options.

| quantity | estimate | from |
|---|---|---|
| frames per video | {frames_per_video:.1f} | COVID-BLUES at 3 frames/s (mean of {videos} videos) |
| stored bytes per video at {target} px | {bytes_per_video_mb:.2f} MB | frames x {target}^2 bytes (uint8) |
| disk, shards only | {disk_shards_gb:,.0f} GB | 100k x bytes per video |
| disk, shards + frames/*.npy (ingest's working copy, kept by default) | {disk_both_gb:,.0f} GB | twice that |
| shards of 200 MB | {n_shards:,} | disk / 200 MB |
| ingest, one worker process | {ingest_hours_one:,.1f} h | {ingest_s_per_video:.2f} s per video measured (1 process) |
| ingest, {workers} machines x 2 processes (`--part k/{parts}`) | {ingest_hours_many:,.1f} h | measured 2-part speed-up {part_speedup:.2f}x per machine |
| memory per rank, streamed (`data.shuffle_buffer={buffer}`) | {stream_rank_gb:.1f} GB | measured base {base_rss_gb:.2f} GB + buffer x bytes per video |
| memory per rank, in memory (`data.store=memory`) | {memory_rank_gb:,.0f} GB | every frame in every rank |
| CPU loader processes to feed one GPU | {procs_per_gpu:.0f} | GPU {gpu_rate:,.0f} images/s (ASSUMED input, `--gpu-images-per-s`) / {loader_rate:.0f} images/s per CPU loader process measured at {size} px |

Reading: the streamed loader's memory does not grow with the corpus (the 1x/4x/16x rows above),
so a rank needs only its shuffle buffer beside the model; the corpus lives on disk. At 100k
videos, in-memory training would need {memory_rank_gb:,.0f} GB per rank. The loader builds batches
in the training process (augmentation included), so one CPU core feeds about {loader_rate:.0f}
images/s at {size} px; with `train.device=cuda` the augmentation runs on the GPU and only shard
reading and frame packing stay on the CPU (shards read at {read_mb_s:.0f} MB/s here), so the
process count above is an upper bound. Multi-node: ranks read disjoint video shares of the
shards each epoch, so the shards must be on storage every node reads (NFS / Lustre / object
store mounted), {shard_read_note}.
"""


def cost_model(s: argparse.Namespace, ingest: dict, replicas: list[dict], runs: dict, loader: dict) -> str:
    target = 224
    frames_per_video = ingest["frames"] / ingest["videos"]
    bytes_per_video = frames_per_video * target * target
    buffer_bytes_at_size = s.buffer * frames_per_video * s.size * s.size
    base_rss_gb = max(runs[("shards", 1)]["peak_rss_mb"] * 2**20 - buffer_bytes_at_size, 0.0) / 1e9  # without the buffer
    s_per_video = ingest["one_process_s"] / ingest["videos"]
    part_speedup = ingest["one_process_s"] / ingest["two_parts_s"]
    workers = 10
    loader_rate = loader["images_per_s"]
    read_per_gpu = s.gpu_images_per_s / 2 * bytes_per_video  # bytes/s: a video is read whole for its 2 views
    return COST_MODEL.format(
        size=s.size, target=target, frames_per_video=frames_per_video, videos=ingest["videos"],
        bytes_per_video_mb=bytes_per_video / 1e6, disk_shards_gb=1e5 * bytes_per_video / 1e9,
        disk_both_gb=2e5 * bytes_per_video / 1e9, n_shards=math.ceil(1e5 * bytes_per_video / 200e6),
        ingest_hours_one=1e5 * s_per_video / 3600, ingest_s_per_video=s_per_video, workers=workers, parts=2 * workers,
        ingest_hours_many=1e5 * s_per_video / 3600 / (workers * part_speedup), part_speedup=part_speedup,
        buffer=s.buffer, stream_rank_gb=base_rss_gb + s.buffer * bytes_per_video / 1e9, base_rss_gb=base_rss_gb,
        memory_rank_gb=1e5 * bytes_per_video / 1e9, procs_per_gpu=math.ceil(s.gpu_images_per_s / loader_rate),
        gpu_rate=s.gpu_images_per_s, loader_rate=loader_rate, read_mb_s=loader["read_mb_per_s"],
        shard_read_note=f"and each GPU at {s.gpu_images_per_s:,.0f} images/s reads about {read_per_gpu / 1e6:,.0f} MB/s "
                        "of shards: a video is read whole (all its frames) for the 3 frames of its pair, so local "
                        "NVMe copies or a page cache that holds the corpus matter more than network bandwidth")


def report(s: argparse.Namespace, ingest: dict, replicas: list[dict], runs: dict, loader: dict, seconds: float) -> str:
    import torch

    from medcl.environment import cpu_model

    lines = [f"# Scale: streamed shards vs in-memory frames, ingest in parts{' (quick: plumbing check)' if s.quick else ''}",
             "", f"Command: `python benchmarks/scale.py {' '.join(sys.argv[1:])}`",
             f"Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.platform()}, torch {torch.__version__}; "
             f"load average at the end {os.getloadavg()[0]:.2f}",
             f"Date: {dt.datetime.now().isoformat(timespec='minutes')}; total {seconds / 60:.1f} min", "",
             f"Corpus: every {s.blues_every}-th COVID-BLUES video, {ingest['videos']} videos, {ingest['frames']} frames "
             f"at 3 frames/s, stored at {s.size} px. Pretraining: USCL, batch {s.batch} videos (2 views each), "
             f"{s.steps} timed steps after {s.warmup} warm-up steps, CPU, `data.shuffle_buffer={s.buffer}`.", "",
             "## Ingest", "", "| how | seconds | videos/s |", "|---|---|---|",
             f"| 1 process | {ingest['one_process_s']:.1f} | {ingest['videos'] / ingest['one_process_s']:.2f} |",
             f"| `--part 1/2` + `--part 2/2` at once, then merge ({ingest['merge_s']:.2f} s) | "
             f"{ingest['two_parts_s'] + ingest['merge_s']:.1f} | "
             f"{ingest['videos'] / (ingest['two_parts_s'] + ingest['merge_s']):.2f} |", "",
             f"Merged manifest equal to the single-process one: {ingest['equal']}.", "",
             "## Corpora and pretraining", "",
             "| corpus | videos | shards | shard bytes | pack s | store | images/s | peak RSS (MB) | videos held (max) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rep in replicas:
        for store in ("shards", "memory"):
            run = runs.get((store, rep["copies"]))
            if run is None:
                continue
            lines.append(f"| {rep['copies']}x | {rep['videos']} | {rep['shards']} | {rep['bytes'] / 1e6:.1f} MB | "
                         f"{rep['pack_s']:.1f} | {store} | {run['images_per_s']:.1f} | {run['peak_rss_mb']:.0f} | "
                         f"{run['max_held'] if run['max_held'] is not None else 'all'} |")
    lines += ["", f"Streamed loader alone (1x, no model): {loader['images_per_s']:.0f} images/s built by one process; "
              f"shards read at {loader['read_mb_per_s']:.0f} MB/s (page cache warm after packing).", "",
              cost_model(s, ingest, replicas, runs, loader)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "scale")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the plumbing in a minute or two")
    parser.add_argument("--blues-every", type=int, default=1, help="every N-th COVID-BLUES video (default all)")
    parser.add_argument("--size", type=int, default=112, help="stored and model input size (default 112)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed pretraining steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--buffer", type=int, default=64, help="data.shuffle_buffer of the streamed runs")
    parser.add_argument("--shard-size", default="200MB")
    parser.add_argument("--gpu-images-per-s", type=float, default=2500.0,
                        help="ASSUMED training rate of one GPU for the cost model (not measured here)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    s = parser.parse_args()
    if s.child:
        print(json.dumps(child(json.loads(s.child))))
        return 0
    if s.quick:
        s.blues_every, s.size, s.batch, s.steps, s.warmup, s.buffer = 24, 32, 8, 3, 1, 16
        s.shard_size = "256kB"
        s.work = s.work.with_name(s.work.name + "_quick")
    from medcl.cli.ingest import parse_bytes

    started = time.perf_counter()
    s.work.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    ingest = ingest_both_ways(s.data, s.work, s.blues_every, s.size, log)
    replicas = []
    for copies in REPLICAS:
        replicas.append(replicate(Path(ingest["folder"]), s.work / f"corpus-{copies}x", copies, parse_bytes(s.shard_size)))
        log(f"corpus {copies}x: {replicas[-1]['videos']} videos in {replicas[-1]['shards']} shards")
    runs: dict[tuple[str, int], dict] = {}
    common = {"size": s.size, "batch": s.batch, "steps": s.steps, "warmup": s.warmup, "buffer": s.buffer,
              "out": str(s.work / "run")}
    for rep in replicas:
        for store in ("shards", "memory"):
            if store == "memory" and rep["copies"] > 4:
                continue  # 16x in memory: what streaming is for
            runs[(store, rep["copies"])] = run_child({**common, "mode": "train", "store": store,
                                                      "corpus": rep["folder"]})
            log(f"pretrain {rep['copies']}x {store}: {runs[(store, rep['copies'])]['images_per_s']:.1f} images/s, "
                f"peak RSS {runs[(store, rep['copies'])]['peak_rss_mb']:.0f} MB")
    loader = run_child({**common, "mode": "loader", "store": "shards", "corpus": replicas[0]["folder"],
                        "steps": max(s.steps, 5)})
    log(f"loader alone: {loader['images_per_s']:.0f} images/s")
    out = ROOT / "benchmarks" / "results" / ("scale_quick.md" if s.quick else "scale.md")
    out.write_text(report(s, ingest, replicas, runs, loader, time.perf_counter() - started))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
