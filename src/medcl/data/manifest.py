"""The frame-set manifest: one row per ingested video, written by ``medcl ingest``.

Layout of an ingest output folder::

    OUT/manifest.csv        one row per video (columns below)
    OUT/frames/<video_id>.npy   uint8 array [n_frames, size, size], grayscale, sector-cropped
    OUT/errors.csv          files that failed, with a readable reason

An empty ``label`` means the video is unlabeled (never a fake class). Columns added later
(``study_id``, ``source_bytes``, ``source_mtime_ns``) are optional when reading: a manifest written
before them reads with their defaults.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

MANIFEST_NAME = "manifest.csv"
FRAMES_DIR = "frames"


@dataclass
class VideoRecord:
    video_id: str
    source: str  # path relative to the ingest source folder
    label: str  # "" when unlabeled
    patient_id: str  # falls back to video_id when unknown
    fps: float  # source frame rate (average)
    n_source_frames: int
    n_frames: int  # frames kept
    width: int  # stored frame width
    height: int  # stored frame height
    crop_x0: int = 0  # sector crop box in source pixel coordinates
    crop_y0: int = 0
    crop_x1: int = 0
    crop_y1: int = 0
    frames_file: str = ""  # relative to the manifest's folder
    study_id: str = ""  # the DICOM StudyInstanceUID (hashed with --hash-patient-ids); "" when unknown
    # the source file when it was ingested: a rerun redoes the video when either differs
    source_bytes: int = 0
    source_mtime_ns: int = 0  # 0: not recorded (a manifest from before these columns)

    @property
    def is_labeled(self) -> bool:
        return self.label != ""


COLUMNS = [f.name for f in fields(VideoRecord)]
_INT_COLUMNS = {f.name for f in fields(VideoRecord) if f.type in ("int", int)}
_FLOAT_COLUMNS = {f.name for f in fields(VideoRecord) if f.type in ("float", float)}


class ManifestError(ValueError):
    """A manifest that cannot be read: names the file, row and column."""


def _parse_int(raw: str) -> int:
    try:
        return int(raw)  # exact: a float would round nanosecond times
    except ValueError:
        return int(float(raw))  # "12.0" from a spreadsheet


def read_manifest(path: str | Path) -> list[VideoRecord]:
    """Read ``manifest.csv`` (or a folder holding one) into records, validating every row."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    records: list[VideoRecord] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("video_id", "label", "patient_id", "n_frames") if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        for line_no, row in enumerate(reader, start=2):
            values: dict[str, object] = {}
            for name in COLUMNS:
                raw = row.get(name, "") or ""
                try:
                    if name in _INT_COLUMNS:
                        values[name] = _parse_int(raw) if raw != "" else 0
                    elif name in _FLOAT_COLUMNS:
                        values[name] = float(raw) if raw != "" else 0.0
                    else:
                        values[name] = raw
                except ValueError:
                    raise ManifestError(f"{path}:{line_no}: column {name!r} has invalid value {raw!r}") from None
            record = VideoRecord(**values)  # type: ignore[arg-type]
            if not record.patient_id:
                record.patient_id = record.video_id
            records.append(record)
    return records


@contextlib.contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """Yield ``<path>.tmp`` to write; it replaces ``path`` when the block ends without an error and
    is removed when it fails (a full disk leaves the previous ``path`` as it was, and no ``.tmp``)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(path: str | Path, records: list[VideoRecord]) -> None:
    """Write records atomically (a temporary file renamed into place)."""
    with replaced_atomically(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for record in records:
            writer.writerow(asdict(record))
