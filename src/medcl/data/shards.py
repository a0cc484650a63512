"""The shard store: an ingest folder's frame sets as WebDataset tar shards plus an index.

For corpora larger than one machine's memory (and file systems that dislike a million small
files). Layout, inside an ingest output folder (see :mod:`medcl.data.manifest`)::

    OUT/shards/shard-000000.tar     WebDataset shards (tar, pax format), ~200 MB each
    OUT/shards/shard-000001.tar     ...
    OUT/shards/index.json           shard -> videos: manifest row, byte offset, size and CRC-32 of
                                    each video's frames

Each video is one WebDataset sample of two members, ``<key>.json`` (its manifest row, UTF-8
JSON) and ``<key>.npy`` (its uint8 frames ``[n_frames, H, W]``, ``numpy.save`` format), where
``<key>`` is the video id with ``.`` written as ``%2E`` (WebDataset splits a member name at its
first dot into key and extension). ``webdataset.WebDataset("OUT/shards/shard-{000000..000009}.tar")``
reads them as ``{"__key__", "json", "npy"}`` samples.

Why an index besides the tars: the index holds every video's manifest row, so label fractions,
class lists and patient-grouped splits are computed without reading a frame, and it holds each
``.npy`` member's byte offset, so a reader seeks straight to a video. That is what makes the
streamed loader (:mod:`medcl.sampling.streamed`) resume exactly in the middle of an epoch, split a
shard between two ranks at video granularity and keep its memory bounded; WebDataset's own
pipeline (sequential streaming, its own shuffle RNG, no resume state) offers none of it, so the
``webdataset`` library is used to *write* the shards (its ``TarWriter`` guarantees the layout its
readers expect) and training reads members by offset with plain file reads. Every read checks
the member's size, CRC-32, dtype and shape, and a damaged shard is reported as one line naming
the shard file and the video.

Videos are written in a pseudo-random order (sorted by a hash of the video id, not by folder),
so every shard is a mix of the corpus' patients and classes: a shuffle buffer that holds a few
shards' videos then mixes the whole corpus, not one folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from medcl.data.manifest import MANIFEST_NAME, VideoRecord, read_manifest

SHARDS_DIR = "shards"
INDEX_NAME = "index.json"
INDEX_FORMAT = "medcl-shards/1"
SHARD_PATTERN = "shard-{:06d}.tar"
DEFAULT_SHARD_BYTES = 200_000_000  # ~200 MB: a few seconds of sequential reading, few files per corpus
_TAR_MEMBER_OVERHEAD = 2 * 1024  # header + padding of the two members of a sample (estimate for rollover)
_RECORD_FIELDS = {f.name for f in fields(VideoRecord)}


class ShardError(ValueError):
    """A missing, stale or damaged shard store: one line naming the file (and video) and what to do."""


@dataclass(frozen=True)
class ShardVideo:
    """Where one video's frames are: ``shard`` (file name in the shards folder), the ``.npy``
    member's data ``offset`` and ``size`` in bytes and its ``crc32``; ``record``: its manifest row."""

    shard: str
    key: str
    offset: int
    size: int
    crc32: int
    record: VideoRecord

    @property
    def video_id(self) -> str:
        return self.record.video_id


def sample_key(video_id: str) -> str:
    """The WebDataset key of a video: its id with dots escaped (WebDataset cuts names at the first dot)."""
    return video_id.replace("%", "%25").replace(".", "%2E")


def shard_order(video_id: str) -> bytes:
    """Sort key that spreads videos pseudo-randomly (and reproducibly) over the shards."""
    return hashlib.sha1(video_id.encode("utf-8")).digest()


def shards_folder(root: str | Path) -> Path:
    """``OUT/shards`` of an ingest folder (or of the folder holding a ``manifest.csv`` given)."""
    root = Path(root)
    if root.name == MANIFEST_NAME or root.is_file():
        root = root.parent
    return root / SHARDS_DIR


def has_shard_index(root: str | Path) -> bool:
    return (shards_folder(root) / INDEX_NAME).is_file()


def resolve_store(store: str, root: str | Path) -> str:
    """``data.store`` -> ``"memory"`` or ``"shards"``: ``auto`` streams when the ingest folder has a
    shard index (``medcl ingest ... --shards`` or ``medcl ingest shard OUT`` made one)."""
    if store not in ("auto", "memory", "shards"):
        raise ValueError(f"data.store={store!r}: expected auto, memory or shards")
    if store == "auto":
        return "shards" if has_shard_index(root) else "memory"
    return store


class ShardStore:
    """Read-only view of ``OUT/shards``: the index, and each video's frames by offset.

    >>> store = ShardStore("ingested/")                  # doctest: +SKIP
    >>> video = store.videos[0]; store.read(video).shape  # doctest: +SKIP

    ``reads`` counts the videos read (the streamed loader's tests use it). Reads are positional
    (``os.pread``: no shared file position), so several threads may read at once (the streamed
    loader's ``data.read_workers``); a few shard files are kept open (readers go through a shard's
    videos in order).
    """

    MAX_OPEN = 4  # shard files kept open at once

    def __init__(self, root: str | Path) -> None:
        self.folder = shards_folder(root)
        self.index_path = self.folder / INDEX_NAME
        if not self.index_path.is_file():
            raise ShardError(f"{self.index_path}: shard index not found; make it with: "
                             f"medcl ingest shard {self.folder.parent}")
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ShardError(f"{self.index_path}: unreadable shard index ({exc}); rebuild it with: "
                             f"medcl ingest shard {self.folder.parent}") from None
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            found = index.get("format") if isinstance(index, dict) else type(index).__name__
            raise ShardError(f"{self.index_path}: not a medcl shard index (format {found!r}, expected {INDEX_FORMAT!r})")
        self.settings: dict[str, Any] = dict(index.get("settings") or {})
        self.shard_bytes = int(index.get("shard_bytes") or DEFAULT_SHARD_BYTES)
        self.shards: list[str] = []
        self.videos: list[ShardVideo] = []
        try:
            for shard in index["shards"]:
                self.shards.append(str(shard["file"]))
                for entry in shard["videos"]:
                    record = VideoRecord(**{k: v for k, v in entry["record"].items() if k in _RECORD_FIELDS})
                    self.videos.append(ShardVideo(str(shard["file"]), str(entry["key"]), int(entry["offset"]),
                                                  int(entry["size"]), int(entry["crc32"]), record))
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardError(f"{self.index_path}: malformed shard index ({type(exc).__name__}: {exc}); rebuild it with: "
                             f"medcl ingest shard {self.folder.parent}") from None
        self.reads = 0
        self._fds: dict[str, int] = {}  # open shard files, least recently used first
        self._readers: dict[str, int] = {}  # threads reading each shard right now
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.videos)

    @property
    def records(self) -> list[VideoRecord]:
        """Every video's manifest row, in index order."""
        return [v.record for v in self.videos]

    def frame_shape(self) -> tuple[int, int]:
        """The most common stored frame size (height, width): what every batch is resized to."""
        return Counter((v.record.height, v.record.width) for v in self.videos).most_common(1)[0][0]

    def check_matches(self, manifest: str | Path) -> None:
        """Refuse an index that no longer describes ``manifest`` (re-ingested, relabelled since packing)."""
        current = {r.video_id: r for r in read_manifest(manifest)}
        packed = {v.video_id: v.record for v in self.videos}
        changed = sorted(k for k in current.keys() | packed.keys() if current.get(k) != packed.get(k))
        if changed:
            example = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
            raise ShardError(f"{self.index_path}: out of date: {len(changed)} video(s) differ from {manifest} "
                             f"(e.g. {example}); repack with: medcl ingest shard {self.folder.parent}")

    def path(self, shard: str) -> Path:
        return self.folder / shard

    def _fd(self, shard: str) -> int:
        """The shard's open descriptor; beyond :attr:`MAX_OPEN` files, the least recently used one
        that no thread is reading is closed."""
        with self._lock:
            if shard in self._fds:
                self._fds[shard] = self._fds.pop(shard)  # now the most recently used
                return self._fds[shard]
            path = self.path(shard)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise ShardError(f"{path}: cannot open shard ({exc.strerror or exc}); it is listed in "
                                 f"{self.index_path}") from None
            self._fds[shard] = fd
            idle = [s for s in self._fds if s != shard and not self._readers.get(s)]
            for old in idle[: max(0, len(self._fds) - self.MAX_OPEN)]:
                os.close(self._fds.pop(old))
            return fd

    def read(self, video: ShardVideo) -> np.ndarray:
        """The video's uint8 frames ``[n, H, W]``, checked against the index (size, CRC-32, shape)."""
        where = f"{self.path(video.shard)}: video {video.video_id!r}"
        try:
            data = self._pread(video)
        except OSError as exc:
            raise ShardError(f"{where}: cannot read ({exc.strerror or exc})") from None
        if len(data) != video.size:
            raise ShardError(f"{where}: truncated shard ({len(data)} of {video.size} bytes at offset {video.offset}); "
                             f"repack with: medcl ingest shard {self.folder.parent}")
        if zlib.crc32(data) != video.crc32:
            raise ShardError(f"{where}: damaged shard (CRC-32 mismatch at offset {video.offset}); "
                             f"repack with: medcl ingest shard {self.folder.parent}")
        try:
            frames = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise ShardError(f"{where}: not a .npy member ({exc})") from None
        expected = (video.record.n_frames, video.record.height, video.record.width)
        if frames.dtype != np.uint8 or frames.shape != expected:
            raise ShardError(f"{where}: expected uint8 frames {expected}, got {frames.dtype} {frames.shape}")
        with self._lock:
            self.reads += 1
        return frames

    def _pread(self, video: ShardVideo) -> bytes:
        """The video's bytes; the shard's descriptor is pinned (not closed by another thread) meanwhile."""
        with self._lock:
            self._readers[video.shard] = self._readers.get(video.shard, 0) + 1
        try:
            fd = self._fd(video.shard)
            chunks, offset, left = [], video.offset, video.size
            while left > 0:
                chunk = os.pread(fd, left, offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset, left = offset + len(chunk), left - len(chunk)
            return b"".join(chunks)
        finally:
            with self._lock:
                self._readers[video.shard] -= 1

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:  # the open shards
        if getattr(self, "_fds", None):
            self.close()


def _npy_bytes(frames: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(frames), allow_pickle=False)
    return buffer.getvalue()


def _member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """``member name -> (data offset, size)`` of a tar (headers only; data is seeked over)."""
    with tarfile.open(path, "r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


def write_shards(
    folder: str | Path,
    videos: Iterable[tuple[VideoRecord, Callable[[], np.ndarray]]],
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    settings: dict[str, Any] | None = None,
    on_video: Callable[[], None] | None = None,
) -> Path:
    """Write ``videos`` (record, frames loader) as WebDataset shards + ``index.json`` into ``folder``.

    A shard is closed once it holds ``shard_bytes`` (the last video may overshoot; a video larger
    than that gets a shard of its own). Writes with ``webdataset.TarWriter`` in pax format (video
    ids of any length) with a fixed member mtime, so the same videos give byte-identical shards.
    ``folder`` must not exist yet (the caller swaps it into place). Returns the index path.
    """
    import webdataset  # only the writer needs it: readers seek by offset (module docstring)

    if shard_bytes < 1:
        raise ValueError(f"shard size must be >= 1 byte, got {shard_bytes}")
    folder = Path(folder)
    folder.mkdir(parents=True)
    shards: list[dict[str, Any]] = []
    current: list[dict[str, Any]] = []
    writer: Any = None
    size = 0

    def close_shard() -> None:
        nonlocal writer
        writer.close()
        name = SHARD_PATTERN.format(len(shards))
        offsets = _member_offsets(folder / name)
        for entry in current:
            entry["offset"], _ = offsets[f"{entry['key']}.npy"]
        shards.append({"file": name, "bytes": (folder / name).stat().st_size, "videos": list(current)})
        writer = None
        current.clear()

    for record, load in videos:
        frames = load()
        data = _npy_bytes(frames)
        row = json.dumps(asdict(record), sort_keys=True).encode("utf-8")
        if writer is not None and size + len(data) + len(row) + _TAR_MEMBER_OVERHEAD > shard_bytes:
            close_shard()
        if writer is None:
            writer = webdataset.TarWriter(str(folder / SHARD_PATTERN.format(len(shards))), encoder=False,
                                          mtime=0, format="PAX_FORMAT")
            size = 0
        key = sample_key(record.video_id)
        writer.write({"__key__": key, "json": row, "npy": data})
        size += len(data) + len(row) + _TAR_MEMBER_OVERHEAD
        current.append({"key": key, "offset": -1, "size": len(data), "crc32": zlib.crc32(data), "record": asdict(record)})
        if on_video is not None:
            on_video()
    if writer is not None:
        close_shard()
    return write_index(folder, shards, shard_bytes=shard_bytes, settings=settings)


def write_index(folder: Path, shards: list[dict[str, Any]], *, shard_bytes: int, settings: dict[str, Any] | None) -> Path:
    """Write ``folder/index.json`` (through a temporary name) for ``shards`` as :func:`write_shards` lists them."""
    from medcl._version import __version__

    index = {"format": INDEX_FORMAT, "created_by": f"medcl {__version__}", "shard_bytes": int(shard_bytes),
             "settings": dict(settings or {}), "n_videos": sum(len(s["videos"]) for s in shards),
             "n_frames": sum(v["record"]["n_frames"] for s in shards for v in s["videos"]), "shards": shards}
    path = folder / INDEX_NAME
    tmp = path.with_name(f"{INDEX_NAME}.tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def index_entries(store: ShardStore) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """``(shard file, [index entry, ...])`` per shard of ``store``, in the layout :func:`write_index` takes."""
    by_shard: dict[str, list[dict[str, Any]]] = {name: [] for name in store.shards}
    for video in store.videos:
        by_shard[video.shard].append({"key": video.key, "offset": video.offset, "size": video.size,
                                      "crc32": video.crc32, "record": asdict(video.record)})
    yield from by_shard.items()


def swap_folder(new: Path, target: Path) -> None:
    """Replace ``target`` (a folder, maybe absent) by ``new``: readers see the old store or the new one."""
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
