"""The ingest output folder: finding sources, naming videos, atomic writes, resuming.

Crash safety: every frames file is written to ``frames/<video_id>.npy.tmp-<pid>`` and renamed into
place only when complete; ``manifest.csv`` and ``errors.csv`` are rewritten atomically after
every video. A run that is killed therefore leaves, at worst, a ``*.tmp-*`` file that the next run
deletes and never reads. A video counts as done only when the manifest lists it *and* its frames
file exists with the recorded shape, so a rerun skips exactly the finished work.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np

from medcl.data.manifest import FRAMES_DIR, MANIFEST_NAME, VideoRecord, read_manifest, write_manifest
from medcl.ingest.dicom import DICOM_EXTENSIONS, looks_like_dicom
from medcl.ingest.video import VIDEO_EXTENSIONS

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
ERRORS_NAME = "errors.csv"
SETTINGS_NAME = "ingest.json"
ERROR_COLUMNS = ["file", "reason"]


def source_kind(path: Path) -> str | None:
    """"video", "dicom", "image", or None for files ingest does not read (csv, txt, ...)."""
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if suffix in DICOM_EXTENSIONS:
        return "dicom"
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix == "" and looks_like_dicom(path):  # DICOM files often have no extension
        return "dicom"
    return None


def find_sources(src: Path, exclude: Path | None = None) -> tuple[list[Path], int]:
    """Every readable-looking file under ``src`` (sorted), and how many other files were skipped.

    Hidden files and folders are ignored, and so is ``exclude`` (an output folder inside SRC).
    """
    src = Path(src)
    if src.is_file():
        return ([src] if source_kind(src) else []), (0 if source_kind(src) else 1)
    exclude = exclude.resolve() if exclude is not None else None
    found: list[Path] = []
    skipped = 0
    visited: set[Path] = set()
    for root, dirs, files in os.walk(src, followlinks=True):  # symlinked sub-folders are common
        root_path = Path(root)
        real = root_path.resolve()
        if real in visited:  # a symlink loop
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and (exclude is None or (root_path / d).resolve() != exclude)
        )
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = root_path / name
            if source_kind(path):
                found.append(path)
            else:
                skipped += 1
    return found, skipped


def make_video_id(relative: str, taken: set[str]) -> str:
    """A file-system-safe id from the source path relative to SRC (folders joined by ``__``),
    unique among ``taken`` (the extension, then a counter, is appended on a clash)."""
    stem, _, ext = relative.rpartition(".") if "." in relative.rsplit("/", 1)[-1] else (relative, "", "")
    base = re.sub(r"[^A-Za-z0-9._+-]+", "_", stem.replace("/", "__")).strip("._") or "video"
    candidate = base
    if candidate in taken and ext:
        candidate = f"{base}_{re.sub(r'[^A-Za-z0-9]+', '', ext)}"
    counter = 2
    unique = candidate
    while unique in taken:
        unique = f"{candidate}_{counter}"
        counter += 1
    return unique


def frames_relpath(video_id: str) -> str:
    return f"{FRAMES_DIR}/{video_id}.npy"


def save_frames_atomic(path: Path, frames: np.ndarray) -> None:
    """Write ``frames`` as .npy to a temporary name, then rename into place (safe against a killed
    process; no fsync, so not against a power cut -- a rerun with --overwrite redoes everything)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as handle:
            np.save(handle, np.ascontiguousarray(frames), allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def frames_file_ok(path: Path, record: VideoRecord) -> bool:
    """True when ``path`` is a complete .npy of the shape the record promises."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    expected = (record.n_frames, record.height, record.width)
    if array.dtype != np.uint8 or array.shape != expected:
        return False
    header_end = path.stat().st_size - array.nbytes
    return header_end > 0


def remove_stale_temporaries(out: Path) -> int:
    """Delete ``*.tmp-*`` leftovers of an interrupted run; returns how many."""
    removed = 0
    for tmp in (out / FRAMES_DIR).glob("*.tmp-*"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def load_done(out: Path) -> dict[str, VideoRecord]:
    """Finished videos of an earlier run, keyed by source path; entries whose frames file is
    missing or incomplete are left out (they will be redone)."""
    manifest = out / MANIFEST_NAME
    if not manifest.is_file():
        return {}
    done: dict[str, VideoRecord] = {}
    for record in read_manifest(manifest):
        path = out / (record.frames_file or frames_relpath(record.video_id))
        if frames_file_ok(path, record):
            done[record.source] = record
    return done


def check_settings(out: Path, settings: dict[str, object], *, overwrite: bool) -> bool:
    """Compare this run's settings with the ones OUT was made with. Returns True when earlier
    results may be reused; raises ValueError on a mismatch unless ``overwrite``."""
    path = out / SETTINGS_NAME
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != settings:
            if not overwrite:
                raise ValueError(
                    f"{out} was ingested with {previous}, this run asks for {settings}: use another OUT "
                    f"folder, or --overwrite to redo every video"
                )
            return False
        return True
    return not overwrite


def write_settings(out: Path, settings: dict[str, object]) -> None:
    tmp = out / (SETTINGS_NAME + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    tmp.replace(out / SETTINGS_NAME)


def write_errors(out: Path, errors: list[tuple[str, str]]) -> None:
    """Rewrite ``errors.csv`` atomically (header only when nothing failed)."""
    path = out / ERRORS_NAME
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(ERROR_COLUMNS)
        writer.writerows(sorted(errors))
    tmp.replace(path)


def write_records(out: Path, records: dict[str, VideoRecord]) -> None:
    write_manifest(out / MANIFEST_NAME, [records[k] for k in sorted(records)])
