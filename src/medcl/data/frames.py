"""Per-video frame sets: the unit USCL pretraining and classification fine-tuning work on."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medcl.data.manifest import FRAMES_DIR, MANIFEST_NAME, ManifestError, VideoRecord, read_manifest


@dataclass
class FrameSet:
    """One video's kept frames (uint8, [n_frames, H, W]) with its label and patient."""

    record: VideoRecord
    frames: np.ndarray

    @property
    def video_id(self) -> str:
        return self.record.video_id

    @property
    def label(self) -> str:
        return self.record.label

    @property
    def patient_id(self) -> str:
        return self.record.patient_id


class FrameSets:
    """Read-only view over an ingest output folder (or its ``manifest.csv``).

    >>> sets = FrameSets("ingested/")          # doctest: +SKIP
    >>> fs = sets[0]; fs.frames.shape, fs.label, fs.patient_id   # doctest: +SKIP

    Frames are loaded lazily from ``frames/<video_id>.npy`` and cached when ``cache=True``
    (a frame set of a few thousand 224 px frames is a few hundred MB). A row's ``frames_file``
    must resolve inside the manifest's folder (an absolute path or ``../`` in a manifest from
    elsewhere would read arbitrary files) unless ``allow_outside=True``.
    """

    def __init__(self, manifest: str | Path, *, cache: bool = True, records: list[VideoRecord] | None = None,
                 allow_outside: bool = False):
        path = Path(manifest)
        self.root = path if path.is_dir() else path.parent
        self.manifest_path = self.root / MANIFEST_NAME if path.is_dir() else path
        self.records: list[VideoRecord] = records if records is not None else read_manifest(self.manifest_path)
        self.allow_outside = allow_outside
        self._row = {r.video_id: i + 2 for i, r in enumerate(self.records)}  # line in manifest.csv (1 = header)
        self._cache: dict[str, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[FrameSet]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, index: int) -> FrameSet:
        record = self.records[index]
        return FrameSet(record, self.load_frames(record))

    def where(self, record: VideoRecord) -> str:
        """``manifest.csv line N (video ID)``, for messages."""
        return f"{self.manifest_path} line {self._row.get(record.video_id, '?')} (video {record.video_id!r})"

    def frames_path(self, record: VideoRecord) -> Path:
        path = self.root / (record.frames_file or f"{FRAMES_DIR}/{record.video_id}.npy")
        if not self.allow_outside and not path.resolve().is_relative_to(self.root.resolve()):
            raise ManifestError(f"{self.where(record)}: frames_file {record.frames_file!r} points outside the manifest's "
                                f"folder {self.root}; move the frames there, or allow it explicitly "
                                "(--allow-outside-frames / allow_outside_frames)")
        return path

    def load_frames(self, record: VideoRecord) -> np.ndarray:
        if self._cache is not None and record.video_id in self._cache:
            return self._cache[record.video_id]
        path = self.frames_path(record)
        if not path.is_file():
            raise ManifestError(f"{self.where(record)}: frames missing: {path}")
        try:
            frames = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # truncated, not an .npy, pickled objects
            raise ManifestError(f"{path}: cannot read the frames of {self.where(record)}: {exc}") from None
        if frames.ndim != 3 or frames.dtype != np.uint8:
            raise ManifestError(f"{path}: expected uint8 [n, H, W] frames for {self.where(record)}, "
                                f"got {frames.dtype} {frames.shape}")
        if self._cache is not None:
            self._cache[record.video_id] = frames
        return frames

    def subset(self, indices: list[int] | np.ndarray) -> FrameSets:
        """A view over some videos (shares the frame cache)."""
        view = FrameSets.__new__(FrameSets)
        view.root, view.manifest_path, view.allow_outside = self.root, self.manifest_path, self.allow_outside
        view._row = self._row
        view.records = [self.records[int(i)] for i in indices]
        view._cache = self._cache
        return view

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.records]

    @property
    def patients(self) -> list[str]:
        return [r.patient_id for r in self.records]

    @property
    def classes(self) -> list[str]:
        """Sorted distinct non-empty labels."""
        return sorted({r.label for r in self.records if r.label})

    def __repr__(self) -> str:
        n_frames = sum(r.n_frames for r in self.records)
        return f"FrameSets({str(self.manifest_path)!r}, videos={len(self)}, frames={n_frames}, classes={self.classes})"
