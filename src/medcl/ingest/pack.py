"""Pack an ingest folder's frame sets into WebDataset shards (:mod:`medcl.data.shards`).

``medcl ingest SRC OUT --shards`` packs at the end of the ingest; ``medcl ingest shard OUT``
converts a folder ingested earlier. Ingest itself keeps writing one ``frames/<video_id>.npy``
per video (atomic per video, what makes a killed ingest resumable); packing reads those (or, for
videos whose ``.npy`` was deleted to save disk, the current shards) and writes a complete new
store beside the old one, swapped in at the end, so a reader never sees half a store.

Packing is skipped when ``OUT/shards/index.json`` already describes exactly the current
manifest at the same shard size; otherwise every shard is rewritten (a rerun that adds videos or
refreshes labels repacks the whole folder: sequential I/O, minutes per 100 GB).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medcl.data.manifest import FRAMES_DIR, MANIFEST_NAME, VideoRecord, read_manifest
from medcl.data.shards import (
    DEFAULT_SHARD_BYTES,
    INDEX_NAME,
    ShardError,
    ShardStore,
    shard_order,
    shards_folder,
    swap_folder,
    write_shards,
)
from medcl.ingest import store


@dataclass
class PackSummary:
    out: Path
    n_videos: int = 0
    n_shards: int = 0
    n_bytes: int = 0
    skipped: bool = False  # the index already matched the manifest
    seconds: float = 0.0

    def describe(self) -> str:
        where = shards_folder(self.out) / INDEX_NAME
        if self.skipped:
            return f"shards: up to date ({self.n_videos} videos in {self.n_shards} shard(s)), index {where}"
        return (f"shards: {self.n_videos} videos in {self.n_shards} shard(s), {self.n_bytes / 1e6:.1f} MB, "
                f"in {self.seconds:.1f} s; index {where}")


def _existing_store(out: Path) -> ShardStore | None:
    try:
        return ShardStore(out)
    except ShardError:
        return None


def pack_shards(out: str | Path, shard_bytes: int = DEFAULT_SHARD_BYTES, *, progress: bool = False) -> PackSummary:
    """Write ``OUT/shards`` (WebDataset tars + ``index.json``) from ``OUT/manifest.csv``; see the module docstring.

    Raises :class:`medcl.data.shards.ShardError` naming the video when its frames are neither in
    ``frames/`` nor in the current shards, and :class:`store.OutputError` when OUT cannot be written.
    """
    start = time.perf_counter()
    out = Path(out)
    if not (out / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"{out / MANIFEST_NAME}: not an ingest folder (no manifest); run medcl ingest first")
    records = sorted(read_manifest(out), key=lambda r: shard_order(r.video_id))
    settings = store.read_settings(out)
    previous = _existing_store(out)
    summary = PackSummary(out=out, n_videos=len(records))
    if previous is not None and previous.shard_bytes == shard_bytes and previous.settings == settings:
        with contextlib.suppress(ShardError):
            previous.check_matches(out / MANIFEST_NAME)
            if all(previous.path(name).is_file() for name in previous.shards):
                summary.skipped, summary.n_shards = True, len(previous.shards)
                return summary
    packed = {v.video_id: v for v in previous.videos} if previous is not None else {}

    def loader(record: VideoRecord) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            path = out / (record.frames_file or f"{FRAMES_DIR}/{record.video_id}.npy")
            if path.is_file():
                return np.load(path, allow_pickle=False)
            if record.video_id in packed and previous is not None:
                return previous.read(packed[record.video_id])
            raise ShardError(f"{path}: frames of video {record.video_id!r} missing (and not in {shards_folder(out)})")
        return load

    from tqdm import tqdm

    target = shards_folder(out)
    new = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(new, ignore_errors=True)
    bar = tqdm(total=len(records), desc="pack", unit="video", disable=not progress, file=sys.stderr)
    try:
        with store.writing_into(out, "writing shards"):
            write_shards(new, ((r, loader(r)) for r in records), shard_bytes=shard_bytes, settings=settings,
                         on_video=bar.update)
            if previous is not None:
                previous.close()
            swap_folder(new, target)
    finally:
        bar.close()
        shutil.rmtree(new, ignore_errors=True)
    packed_store = ShardStore(out)
    summary.n_shards = len(packed_store.shards)
    summary.n_bytes = sum(packed_store.path(name).stat().st_size for name in packed_store.shards)
    summary.seconds = time.perf_counter() - start
    return summary
