"""Ingest split across machines: ``medcl ingest SRC OUT_k --part k/N`` on N machines, then
``medcl ingest merge OUT_1 ... OUT_N -o OUT``.

Which files a part takes: file ``f`` belongs to part ``1 + h(base id of f) mod N``, where the base
id is the video id the file would get alone (:func:`medcl.ingest.store.make_video_id` of its path
relative to SRC) and ``h`` is the first 8 bytes of its SHA-256. A stable hash rather than "sorted
index mod N": a file added to SRC later does not move the others to other parts (a rerun of every
part stays a resume), and it needs no agreement between machines beyond the same SRC tree. Files
whose ids would clash (``a.mp4`` and ``a.avi`` -> ``a``, ``a_avi``) share a base id, so they land in
the same part and get the ids a single-machine ingest gives them: the merged folder then equals
a single ingest of SRC (the same manifest rows in the same order, the same errors and frames).

Merge checks, each refusal one line naming the folders: every input is an ingest folder made with
the same settings (fps, size, crop, keep_partial); parts of a split are all present, each once,
of the same N; no video id (and no source file) is in two inputs. Frames files are hard-linked
into OUT when OUT is on the same file system (else copied); when every input has shards, they are
linked too, renumbered in part order, with one merged index (else ``medcl ingest shard OUT``
packs OUT afterwards).
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medcl.data.manifest import FRAMES_DIR, MANIFEST_NAME, VideoRecord, read_manifest
from medcl.data.shards import (
    INDEX_NAME,
    SHARD_PATTERN,
    ShardError,
    ShardStore,
    has_shard_index,
    index_entries,
    shards_folder,
    swap_folder,
    write_index,
)
from medcl.ingest import store

PART_KEY = "part"  # in ingest.json: [k, N]


def parse_part(text: str) -> tuple[int, int]:
    """``"k/N"`` -> ``(k, N)`` with ``1 <= k <= N``."""
    k, sep, n = str(text).partition("/")
    try:
        part = (int(k), int(n))
    except ValueError:
        part = (0, 0)
    if not sep or not 1 <= part[0] <= part[1]:
        raise ValueError(f"--part {text!r}: expected k/N with 1 <= k <= N, e.g. --part 1/4")
    return part


def part_of(relative: str, n_parts: int) -> int:
    """The part (1-based) that ingests the file at ``relative`` (its path under SRC); see the module docstring."""
    base = store.make_video_id(relative, set())
    return int.from_bytes(hashlib.sha256(base.encode("utf-8")).digest()[:8], "big") % n_parts + 1


@dataclass
class MergeSummary:
    out: Path
    n_inputs: int = 0
    n_videos: int = 0
    n_frames: int = 0
    n_failed: int = 0
    n_shards: int = 0
    n_linked: int = 0
    n_copied: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 2 if self.n_failed else 0

    def describe(self) -> str:
        lines = [f"merged {self.n_inputs} ingest folder(s): {self.n_videos} videos ({self.n_frames} frames), "
                 f"{self.n_failed} failed file(s), in {self.seconds:.1f} s",
                 f"manifest: {self.out / MANIFEST_NAME}; files hard-linked: {self.n_linked}, copied: {self.n_copied}"]
        if self.n_shards:
            lines.append(f"shards: {self.n_shards}, index {shards_folder(self.out) / INDEX_NAME}")
        if self.n_failed:
            lines.append(f"failures are listed in {self.out / store.ERRORS_NAME}")
        return "\n".join(lines + self.notes)


@dataclass
class _Input:
    path: Path
    settings: dict[str, object]
    part: tuple[int, int] | None
    records: list[VideoRecord]
    errors: list[tuple[str, str]]

    @property
    def name(self) -> str:
        return f"{self.path} (part {self.part[0]}/{self.part[1]})" if self.part else str(self.path)


def read_errors(out: Path) -> list[tuple[str, str]]:
    """``errors.csv`` of an ingest folder as ``(file, reason)`` (empty when absent)."""
    path = out / store.ERRORS_NAME
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [(row.get("file", ""), row.get("reason", "")) for row in csv.DictReader(handle)]


def _read_input(path: Path) -> _Input:
    if not (path / store.SETTINGS_NAME).is_file() or not (path / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"{path}: not an ingest folder (no {store.SETTINGS_NAME} and {MANIFEST_NAME})")
    settings = store.read_settings(path)
    raw = settings.pop(PART_KEY, None)
    part = (int(raw[0]), int(raw[1])) if isinstance(raw, (list, tuple)) and len(raw) == 2 else None
    return _Input(path, settings, part, read_manifest(path), read_errors(path))


def _check_inputs(inputs: list[_Input]) -> None:
    first = inputs[0]
    seen: dict[Path, _Input] = {}
    for item in inputs:
        real = item.path.resolve()
        if real in seen:
            raise ValueError(f"{item.path}: given twice (also as {seen[real].path})")
        seen[real] = item
        if item.settings != first.settings:
            diff = ", ".join(f"{k}={first.settings.get(k)!r} vs {item.settings.get(k)!r}"
                             for k in sorted(first.settings.keys() | item.settings.keys())
                             if first.settings.get(k) != item.settings.get(k))
            raise ValueError(f"{first.path} and {item.path}: ingested with different settings ({diff}); "
                             "merge only parts of one ingest")
    with_part = [i for i in inputs if i.part]
    if with_part and len(with_part) != len(inputs):
        other = next(i for i in inputs if not i.part)
        raise ValueError(f"{with_part[0].name} is one part of a split ingest but {other.path} is not; merge the "
                         "parts of one split (or ingest folders without --part)")
    if not with_part:
        return
    n = with_part[0].part[1]  # type: ignore[index]
    by_k: dict[int, _Input] = {}
    for item in with_part:
        k, n_item = item.part  # type: ignore[misc]
        if n_item != n:
            raise ValueError(f"{with_part[0].name} and {item.name}: parts of splits into different numbers of parts")
        if k in by_k:
            raise ValueError(f"part {k}/{n} given twice: {by_k[k].path} and {item.path} (the parts overlap)")
        by_k[k] = item
    missing = [f"{k}/{n}" for k in range(1, n + 1) if k not in by_k]
    if missing:
        raise ValueError(f"part(s) {', '.join(missing)} missing: a merge needs all {n} parts (ingest them with "
                         f"--part k/{n}, then merge all)")


def _link_or_copy(source: Path, target: Path, summary: MergeSummary) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
        summary.n_linked += 1
    except OSError:  # another file system, or links not allowed: copy
        shutil.copy2(source, target)
        summary.n_copied += 1


def _prepare_out(out: Path, inputs: list[_Input], overwrite: bool) -> None:
    for item in inputs:
        if item.path.resolve() == out.resolve():
            raise ValueError(f"-o {out}: is one of the inputs; merge into a new folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: not empty; choose a new folder or pass --overwrite")
        for name in (FRAMES_DIR, shards_folder(out).name):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (MANIFEST_NAME, store.ERRORS_NAME, store.SETTINGS_NAME):
            (out / name).unlink(missing_ok=True)
    (out / FRAMES_DIR).mkdir(parents=True, exist_ok=True)


def merge_ingests(inputs: Sequence[str | Path], out: str | Path, *, overwrite: bool = False) -> MergeSummary:
    """Join ingest folders (the parts of ``--part k/N`` runs) into ``out``; see the module docstring.

    Raises ValueError / FileNotFoundError with a one-line message naming the folders (and the
    video) on any refusal; ``out`` is then left as it was.
    """
    start = time.perf_counter()
    out = Path(out)
    if not inputs:
        raise ValueError("nothing to merge: give the ingest folders of the parts")
    parts = [_read_input(Path(p)) for p in inputs]
    _check_inputs(parts)
    parts.sort(key=lambda i: i.part or (0, 0))  # part order (a stable sort keeps the given order otherwise)
    owner: dict[str, _Input] = {}
    source_owner: dict[str, _Input] = {}
    for item in parts:
        for record in item.records:
            for key, table, what in ((record.video_id, owner, "video"), (record.source, source_owner, "source file")):
                if key in table:
                    raise ValueError(f"{what} {key!r} is in both {table[key].name} and {item.name}: the parts overlap; "
                                     "each video must come from exactly one part")
                table[key] = item
    all_shards = all(has_shard_index(item.path) for item in parts)
    stores = {item.path: ShardStore(item.path) for item in parts} if all_shards else {}
    for item in parts:
        if item.path in stores:
            stores[item.path].check_matches(item.path / MANIFEST_NAME)
        else:
            for record in item.records:
                frames = item.path / (record.frames_file or f"{FRAMES_DIR}/{record.video_id}.npy")
                if not frames.is_file():
                    raise ShardError(f"{frames}: frames of video {record.video_id!r} missing in {item.name}, and it "
                                     "has no shards")
    _prepare_out(out, parts, overwrite)
    summary = MergeSummary(out=out, n_inputs=len(parts))
    records: dict[str, VideoRecord] = {}
    errors: list[tuple[str, str]] = []
    with store.writing_into(out, "merging"):
        for item in parts:
            for record in item.records:
                relative = record.frames_file or f"{FRAMES_DIR}/{record.video_id}.npy"
                frames = item.path / relative
                if frames.is_file() and Path(relative).parts[:1] == (FRAMES_DIR,) and ".." not in Path(relative).parts:
                    _link_or_copy(frames, out / relative, summary)
                records[record.source] = record
            errors += item.errors
        if stores:
            summary.n_shards = _merge_shards(parts, stores, out, summary)
        elif any(has_shard_index(item.path) for item in parts):
            summary.notes.append(f"not every input has shards: pack the merged folder with: medcl ingest shard {out}")
        store.write_settings(out, parts[0].settings)
        store.write_errors(out, errors)
        store.write_records(out, records)
    summary.n_videos = len(records)
    summary.n_frames = sum(r.n_frames for r in records.values())
    summary.n_failed = len(errors)
    summary.seconds = time.perf_counter() - start
    return summary


def _merge_shards(parts: list[_Input], stores: dict[Path, ShardStore], out: Path, summary: MergeSummary) -> int:
    """Link every input's shards into ``out/shards`` renumbered in part order, with one merged index."""
    target = shards_folder(out)
    new = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    shards: list[dict[str, object]] = []
    shard_bytes = max(s.shard_bytes for s in stores.values())
    for item in parts:
        part_store = stores[item.path]
        for old_name, entries in index_entries(part_store):
            name = SHARD_PATTERN.format(len(shards))
            _link_or_copy(part_store.path(old_name), new / name, summary)
            shards.append({"file": name, "bytes": (new / name).stat().st_size, "videos": entries})
        part_store.close()
    write_index(new, shards, shard_bytes=shard_bytes, settings=parts[0].settings)
    swap_folder(new, target)
    return len(shards)
