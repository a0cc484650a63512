"""The ingest output folder: finding sources, naming videos, atomic writes, resuming.

Crash safety: every frames file is written to ``frames/<video_id>.npy.tmp-<pid>`` and renamed into
place only when complete; ``manifest.csv`` and ``errors.csv`` are rewritten atomically after
every video. A run that is killed therefore leaves, at worst, a ``*.tmp-*`` file that the next run
deletes and never reads. A video counts as done only when the manifest lists it *and* its frames
file exists with the recorded shape *and* its source file still has the size and modification
time recorded then (:func:`source_fingerprint`), so a rerun skips exactly the finished work and
redoes a file replaced under the same name.

A write into OUT that fails (full disk, quota, read-only file system) raises :class:`OutputError`:
the run stops, the files written so far stay consistent and a rerun resumes.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medcl.data.manifest import (
    FRAMES_DIR,
    MANIFEST_NAME,
    VideoRecord,
    read_manifest,
    replaced_atomically,
    write_manifest,
)
from medcl.ingest.dicom import DICOM_EXTENSIONS, looks_like_dicom
from medcl.ingest.video import VIDEO_EXTENSIONS

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
ERRORS_NAME = "errors.csv"
SETTINGS_NAME = "ingest.json"
ERROR_COLUMNS = ["file", "reason"]
# errors of a frames write that concern the output device, not the file: the run stops on them
DEVICE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class OutputError(OSError):
    """Writing into OUT failed (full disk, quota, permissions): the message names OUT, the reason
    and what was being written; everything finished before is kept and a rerun resumes."""

    def __init__(self, out: Path, exc: OSError, doing: str):
        reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc)).lower()
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        hint = "; free some space and rerun: the videos finished so far are kept and skipped" if full else ""
        super().__init__(f"{out}: {reason} (while {doing}){hint}")


@contextlib.contextmanager
def writing_into(out: Path, doing: str) -> Iterator[None]:
    """Turn an OSError raised by the block into an :class:`OutputError` about ``out``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(out, exc, doing) from exc


def escape_undecodable(text: str) -> str:
    """``text`` with the bytes that are not UTF-8 (file names the file system gives as raw bytes,
    held as surrogates by Python) written as ``\\xNN``: fit for the UTF-8 manifest and messages.
    Text without such bytes is returned unchanged."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def source_fingerprint(path: Path) -> tuple[int, int]:
    """``(size in bytes, modification time in ns)`` of a source file: what resume compares.

    Not a content hash: hashing would read every source on every rerun (as slow as ingesting
    anew for large sets). Size + mtime catch a file replaced or rewritten under the same name, as
    make and rsync rely on; a replacement with the same size *and* a preserved mtime (``cp -p``)
    goes unnoticed: ``--overwrite`` redoes everything.
    """
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


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


class _WriteOnly:
    """Hides the real file from ``np.save``, which then writes through ``write()`` (the same bytes):
    its fast path (``tofile``) reports a full disk as "N requested and M written" without errno."""

    def __init__(self, handle: Any):
        self.write = handle.write


def save_frames_atomic(path: Path, frames: np.ndarray) -> None:
    """Write ``frames`` as .npy to a temporary name, then rename into place (safe against a killed
    process; no fsync, so not against a power cut -- a rerun with --overwrite redoes everything).
    Replacing an existing file is atomic: a reader sees the old frames or the new ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as handle:
            np.save(_WriteOnly(handle), np.ascontiguousarray(frames), allow_pickle=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def is_unchanged(record: VideoRecord, size_and_mtime: tuple[int, int], out: Path) -> bool:
    """True when the source file is still the one ``record`` was made from (see
    :func:`source_fingerprint`). A row from before fingerprints were recorded is trusted when its
    frames file is newer than the source (the source has not been modified since)."""
    if record.source_mtime_ns:
        return (record.source_bytes, record.source_mtime_ns) == size_and_mtime
    frames = out / (record.frames_file or frames_relpath(record.video_id))
    return size_and_mtime[1] <= frames.stat().st_mtime_ns


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
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous != settings:
            if not overwrite:
                if isinstance(previous, dict):
                    was = ", ".join(f"{k}={previous.get(k)!r}" for k in settings if previous.get(k) != settings[k])
                    now = ", ".join(f"{k}={v!r}" for k, v in settings.items() if previous.get(k) != v)
                    problem = f"OUT was ingested with {was}, this run asks for {now}"
                else:
                    problem = "unreadable (not the JSON settings ingest writes)"
                raise ValueError(f"{path}: {problem}: use another OUT folder, or --overwrite to redo every video")
            return False
        return True
    return not overwrite


def prepare_output(out: Path) -> None:
    """Create OUT and OUT/frames, and delete the temporaries of an interrupted run."""
    with writing_into(out, "creating the output folder"):
        (out / FRAMES_DIR).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)


def read_settings(out: Path) -> dict[str, object]:
    """The settings OUT was ingested with (``ingest.json``); empty when OUT has none."""
    path = Path(out) / SETTINGS_NAME
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({exc}); not the JSON settings ingest writes") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: not the JSON settings ingest writes (a {type(settings).__name__})")
    return settings


def write_settings(out: Path, settings: dict[str, object]) -> None:
    with writing_into(out, f"writing {SETTINGS_NAME}"), replaced_atomically(out / SETTINGS_NAME) as tmp:
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_errors(out: Path, errors: list[tuple[str, str]]) -> None:
    """Rewrite ``errors.csv`` atomically (header only when nothing failed)."""
    with writing_into(out, f"writing {ERRORS_NAME}"), replaced_atomically(out / ERRORS_NAME) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(ERROR_COLUMNS)
            writer.writerows(sorted(errors))


def write_records(out: Path, records: dict[str, VideoRecord]) -> None:
    with writing_into(out, f"writing {MANIFEST_NAME}"):
        write_manifest(out / MANIFEST_NAME, [records[k] for k in sorted(records)])
