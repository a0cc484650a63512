"""``ingest_videos``: every video, cine DICOM or still under SRC -> per-video frame sets in OUT.

Per file: decode (PyAV / pydicom / PIL) keeping frames at ``fps`` per second of real time ->
grayscale -> detect the ultrasound sector on the kept frames -> crop, fit into a black square of
``size`` (aspect kept) -> ``OUT/frames/<video_id>.npy`` (uint8 ``[n, size, size]``) -> a row of
``OUT/manifest.csv``. Failures go to ``OUT/errors.csv`` with a readable reason and the run goes
on. Reruns skip finished videos whose source file is unchanged (size and modification time; their
labels and patients are refreshed from the current options) and redo changed ones.

What stops a run instead: a write into OUT that fails (full disk: :class:`store.OutputError`),
with the manifest, frames and errors written so far left consistent for a rerun to resume.
Worker processes end with the ingest process, even when it is killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcl.data.manifest import MANIFEST_NAME, VideoRecord
from medcl.ingest import store
from medcl.ingest.dicom import read_identity
from medcl.ingest.labels import LabelSource, hash_id
from medcl.ingest.pack import DEFAULT_SHARD_BYTES, PackSummary, pack_shards
from medcl.ingest.parts import PART_KEY, parse_part, part_of
from medcl.ingest.sector import CropBox, crop_square, detect_sector
from medcl.ingest.video import STUDIO_TO_FULL_RANGE, DecodedClip, DecodeError, decode_video


@dataclass
class IngestSummary:
    """What a run did. ``failed`` lists ``(file, reason)``; ``exit_code`` is 2 when any failed."""

    out: Path
    n_sources: int = 0
    n_ingested: int = 0
    n_skipped: int = 0  # already done by an earlier run
    n_changed: int = 0  # done by an earlier run, but the source file changed since: redone
    n_frames: int = 0  # frames written by this run
    failed: list[tuple[str, str]] = field(default_factory=list)
    n_ignored_files: int = 0  # files under SRC that are not videos / images / DICOM
    n_unlabeled: int = 0
    n_unmatched_metadata_rows: int = 0
    dicom_without_patient: list[str] = field(default_factory=list)  # no PatientID and no other patient source
    part: tuple[int, int] | None = None  # --part k/N: this run ingested the files of part k only
    n_other_parts: int = 0  # source files left to the other parts
    packed: PackSummary | None = None  # --shards
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 2 if self.failed else 0

    @property
    def manifest(self) -> Path:
        return self.out / MANIFEST_NAME

    def describe(self) -> str:
        lines = [
            f"{self.n_sources} source file(s): {self.n_ingested} ingested ({self.n_frames} frames), "
            f"{self.n_skipped} already done, {len(self.failed)} failed, in {self.seconds:.1f} s",
            f"manifest: {self.manifest}",
        ]
        if self.part:
            lines.append(f"part {self.part[0]}/{self.part[1]}: {self.n_other_parts} other source file(s) are left to the "
                         "other parts (join them with: medcl ingest merge)")
        if self.n_ignored_files:
            lines.append(f"ignored {self.n_ignored_files} file(s) that are not video, image or DICOM")
        if self.n_unlabeled:
            lines.append(f"{self.n_unlabeled} video(s) without a label (empty label = unlabeled)")
        if self.n_unmatched_metadata_rows:
            lines.append(f"{self.n_unmatched_metadata_rows} metadata row(s) matched no file under SRC")
        if self.n_changed:
            lines.append(f"{self.n_changed} file(s) changed (size or modification time) since they were ingested: redone")
        if self.dicom_without_patient:
            examples = ", ".join(self.dicom_without_patient[:3]) + (", ..." if len(self.dicom_without_patient) > 3 else "")
            lines.append(
                f"{len(self.dicom_without_patient)} DICOM file(s) have no PatientID (and no patient from --metadata or "
                f"--patient-pattern): each counts as its own patient, e.g. {examples}"
            )
        if self.failed:
            lines.append(f"failures ({len(self.failed)}) are listed in {self.out / store.ERRORS_NAME}:")
            lines += [f"  {name}: {reason}" for name, reason in self.failed[:10]]
            if len(self.failed) > 10:
                lines.append(f"  ... and {len(self.failed) - 10} more")
        if self.packed is not None:
            lines.append(self.packed.describe())
        return "\n".join(lines)


def read_still(path: Path) -> DecodedClip:
    """A still image (PNG/JPEG/...) as a one-frame clip (EXIF orientation applied)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            gray = np.asarray(image.convert("L"))
    except UnidentifiedImageError:
        raise DecodeError("not an image Pillow can identify") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DecodeError(f"cannot read image (truncated or damaged?): {exc}") from None
    if gray.size == 0:
        raise DecodeError("image has no pixels")
    return DecodedClip(frames=[gray], times=[0.0], n_source_frames=1, duration_s=0.0)


def decode_any(path: Path, fps: float, *, threads: int = 0, keep_partial: bool = False) -> DecodedClip:
    """Decode a video, DICOM or still image into kept grayscale frames (see the modules)."""
    if path.stat().st_size == 0:
        raise DecodeError("empty file (0 bytes)")
    kind = store.source_kind(path)
    if kind == "dicom":
        from medcl.ingest.dicom import read_dicom

        return read_dicom(path, fps)
    if kind == "image":
        return read_still(path)
    if path.suffix.lower() == ".gif" and not keep_partial:
        with path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\x3b":  # every complete GIF ends with the trailer byte 0x3B
                raise DecodeError("truncated GIF (the end-of-file trailer byte is missing)")
    return decode_video(path, fps, threads=threads, keep_partial=keep_partial)


def process_file(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: one source file -> frames file on disk; returns the record fields or an error.

    Runs in a worker process when ``workers > 1``; everything in and out is plain data.
    """
    path = Path(task["path"])
    try:
        clip = decode_any(path, task["fps"], threads=task["threads"], keep_partial=task["keep_partial"])
        if not clip.frames:
            raise DecodeError("no frames kept")
        shapes = {f.shape for f in clip.frames}
        if len(shapes) > 1:  # a resolution change mid-stream: fit every frame to the first size
            from PIL import Image

            h, w = clip.frames[0].shape
            clip.frames = [
                f if f.shape == (h, w) else np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BILINEAR))
                for f in clip.frames
            ]
        box = detect_sector(clip.frames) if task["crop"] else CropBox(0, 0, clip.frames[0].shape[1], clip.frames[0].shape[0])
        size = task["size"]
        lut = STUDIO_TO_FULL_RANGE if clip.studio_range else None
        converted: dict[int, np.ndarray] = {}
        out_frames = np.empty((len(clip.frames), size, size), np.uint8)
        for i, frame in enumerate(clip.frames):
            key = id(frame)  # repeated frames (slow sources) are resized once
            if key not in converted:
                converted[key] = crop_square(frame, box, size, lut=lut)
            out_frames[i] = converted[key]
        store.save_frames_atomic(Path(task["frames_path"]), out_frames)
    except DecodeError as exc:
        return {"ok": False, "reason": str(exc)}
    except MemoryError:
        return {"ok": False, "reason": "out of memory while decoding (video too long or too large?)"}
    except Exception as exc:  # keep going on anything a damaged file can trigger; say what it was
        if isinstance(exc, OSError) and exc.errno in store.DEVICE_ERRNOS:  # OUT's fault, not the file's: stop
            return {"ok": False, "device_errno": exc.errno, "reason": exc.strerror or str(exc)}
        return {"ok": False, "reason": f"unexpected {type(exc).__name__}: {exc}"}
    return {
        "ok": True,
        "fps": round(clip.source_fps, 4),
        "n_source_frames": clip.n_source_frames,
        "n_frames": len(out_frames),
        "crop": (box.x0, box.y0, box.x1, box.y1),
    }


def end_with_parent(parent_pid: int) -> None:
    """Worker initializer: end this worker when the ingest process ends, even by SIGKILL (a worker
    otherwise waits forever for work that nobody will send, and so does multiprocessing's
    resource tracker, which waits for every holder of its pipe)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1  # <linux/prctl.h>
        if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL) == 0:
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)
            return
    import threading

    def watch_parent() -> None:  # elsewhere: poll (an orphan is adopted by another process)
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch_parent, name="end-with-parent", daemon=True).start()


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel the files not started and end the workers now, abandoning the ones they decode."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    processes = list((pool._processes or {}).values())  # noqa: SLF001 (no public way before 3.14)
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=10)


def ingest_videos(
    src: str | Path,
    out: str | Path,
    fps: float = 3.0,
    size: int = 224,
    *,
    metadata: str | Path | None = None,
    file_column: str = "file",
    label_column: str | None = "label",
    patient_column: str | None = "patient_id",
    label_pattern: str | None = None,
    patient_pattern: str | None = None,
    patient_metadata: str | Path | None = None,
    patient_key_column: str = "patient_id",
    patient_label_column: str | None = None,
    label_map: dict[str, str] | None = None,
    hash_patient_ids: str | None = None,
    workers: int = 1,
    crop: bool = True,
    keep_partial: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    part: tuple[int, int] | str | None = None,
    shards: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> IngestSummary:
    """Ingest every video / cine DICOM / still image under ``src`` into ``out``.

    Keeps ``fps`` frames per second of real time (see :mod:`medcl.ingest.video`), crops the
    ultrasound sector (:mod:`medcl.ingest.sector`), fits it into ``size`` x ``size`` keeping the
    aspect ratio, and writes ``out/frames/<video_id>.npy``, ``out/manifest.csv`` and
    ``out/errors.csv``. Labels and patients come from ``metadata`` / ``patient_metadata`` tables
    and/or ``label_pattern`` / ``patient_pattern`` (see :mod:`medcl.ingest.labels`); for DICOM
    files without those, from the PatientID tag. ``study_id`` is the DICOM StudyInstanceUID.
    ``hash_patient_ids``: a salt; patient and study ids are then stored as
    :func:`medcl.ingest.labels.hash_id` of the raw ones. ``workers > 1`` decodes in that many
    processes. Resumable: finished videos whose source is unchanged are skipped.
    ``part`` (``(k, N)`` or ``"k/N"``): ingest only the files of part k of N (see
    :mod:`medcl.ingest.parts`; join the parts with :func:`medcl.ingest.parts.merge_ingests`).
    ``shards``: then pack OUT into WebDataset shards of about ``shard_bytes`` (:mod:`medcl.ingest.pack`).
    Returns an :class:`IngestSummary` (``exit_code`` 2 when any file failed). Raises
    :class:`store.OutputError` when OUT cannot be written (full disk): earlier work is kept.
    """
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"{src}: source folder not found")
    if not fps > 0:
        raise ValueError(f"fps: must be > 0, got {fps}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size: must be an integer >= 8, got {size!r}")
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    if hash_patient_ids is not None and not hash_patient_ids:
        raise ValueError("hash_patient_ids: the salt must not be empty")
    labels = LabelSource(
        src_root=src if src.is_dir() else src.parent,
        metadata=Path(metadata) if metadata else None,
        file_column=file_column,
        label_column=label_column,
        patient_column=patient_column,
        label_pattern=label_pattern,
        patient_pattern=patient_pattern,
        patient_metadata=Path(patient_metadata) if patient_metadata else None,
        patient_key_column=patient_key_column,
        patient_label_column=patient_label_column,
        label_map=dict(label_map or {}),
    )
    settings: dict[str, object] = {"fps": float(fps), "size": int(size), "crop": bool(crop),
                                   "keep_partial": bool(keep_partial)}
    if part is not None:
        part = parse_part(part if isinstance(part, str) else f"{part[0]}/{part[1]}")
        settings[PART_KEY] = list(part)  # a folder of one part is never resumed as another part
    reuse = store.check_settings(out, settings, overwrite=overwrite)
    store.prepare_output(out)
    store.write_settings(out, settings)
    done = store.load_done(out) if reuse else {}

    def stored_id(raw: str) -> str:
        return store.escape_undecodable(hash_id(raw, hash_patient_ids) if hash_patient_ids and raw else raw)

    sources, n_ignored = store.find_sources(src, exclude=out)
    root = src if src.is_dir() else src.parent
    if part is not None:
        n_all = len(sources)
        sources = [p for p in sources
                   if part_of(store.escape_undecodable(p.relative_to(root).as_posix()), part[1]) == part[0]]
    summary = IngestSummary(out=out, n_sources=len(sources), n_ignored_files=n_ignored, part=part)
    if part is not None:
        summary.n_other_parts = n_all - len(sources)
    records: dict[str, VideoRecord] = {}
    taken = {r.video_id for r in done.values()}
    listed: set[str] = set()
    tasks: list[dict[str, Any]] = []
    threads = 0 if workers == 1 else max(1, (os.cpu_count() or 2) // workers)
    for path in sources:
        # not resolved: symlinked files stay where they are listed; bytes that are not UTF-8 escaped
        relative = store.escape_undecodable(path.relative_to(root).as_posix())
        if relative in listed:
            summary.failed.append((relative, "its name, with the bytes that are not UTF-8 escaped, is another file's"))
            continue
        listed.add(relative)
        try:
            size_and_mtime = store.source_fingerprint(path)
        except OSError as exc:  # gone since the listing, or a dangling link
            summary.failed.append((relative, f"cannot read it: {exc.strerror or exc}"))
            continue
        is_dicom = store.source_kind(path) == "dicom"
        tag_patient, study = read_identity(path) if is_dicom else ("", "")
        label, patient, _ = labels.lookup(path, tag_patient)
        if is_dicom and not patient:
            summary.dicom_without_patient.append(relative)
        identity = {"label": store.escape_undecodable(label), "patient_id": stored_id(patient), "study_id": stored_id(study)}
        previous = done.get(relative)
        if previous is not None and store.is_unchanged(previous, size_and_mtime, out):
            identity["patient_id"] = identity["patient_id"] or previous.video_id
            for key, value in identity.items():
                setattr(previous, key, value)
            previous.source_bytes, previous.source_mtime_ns = size_and_mtime
            records[relative] = previous
            summary.n_skipped += 1
            continue
        if previous is not None:  # same name, other content: redo it under its id (frames replaced atomically)
            video_id = previous.video_id
            summary.n_changed += 1
        else:
            video_id = store.make_video_id(relative, taken)
            taken.add(video_id)
        tasks.append(
            {
                "path": str(path),
                "relative": relative,
                "video_id": video_id,
                **identity,
                "patient_id": identity["patient_id"] or video_id,
                "source_bytes_mtime": size_and_mtime,
                "replaces_frames": previous is not None,
                "frames_path": str(out / store.frames_relpath(video_id)),
                "fps": float(fps),
                "size": int(size),
                "crop": crop,
                "threads": threads,
                "keep_partial": keep_partial,
            }
        )
    # a part sees only its files: the other parts' metadata rows are not "unmatched"
    summary.n_unmatched_metadata_rows = labels.n_unmatched_rows if metadata and part is None else 0
    store.write_records(out, records)  # drops rows of videos that are gone or being redone
    store.write_errors(out, summary.failed)

    last_write = [time.monotonic()]

    def finish(task: dict[str, Any], result: dict[str, Any]) -> None:
        if "device_errno" in result:
            device_error = OSError(result["device_errno"], result["reason"])
            raise store.OutputError(out, device_error, f"writing {store.frames_relpath(task['video_id'])}")
        if result["ok"]:
            x0, y0, x1, y1 = result["crop"]
            records[task["relative"]] = VideoRecord(
                video_id=task["video_id"],
                source=task["relative"],
                label=task["label"],
                patient_id=task["patient_id"],
                fps=result["fps"],
                n_source_frames=result["n_source_frames"],
                n_frames=result["n_frames"],
                width=task["size"],
                height=task["size"],
                crop_x0=x0,
                crop_y0=y0,
                crop_x1=x1,
                crop_y1=y1,
                frames_file=store.frames_relpath(task["video_id"]),
                study_id=task["study_id"],
                source_bytes=task["source_bytes_mtime"][0],
                source_mtime_ns=task["source_bytes_mtime"][1],
            )
            summary.n_ingested += 1
            summary.n_frames += result["n_frames"]
            # rewriting the whole manifest after every video is quadratic: at most every 5 s (a
            # crash loses at most those seconds' manifest rows; their videos are simply redone)
            if time.monotonic() - last_write[0] > 5.0:
                store.write_records(out, records)
                last_write[0] = time.monotonic()
        else:
            if task["replaces_frames"]:  # the frames of the file's earlier version are no one's now
                Path(task["frames_path"]).unlink(missing_ok=True)
            summary.failed.append((task["relative"], store.escape_undecodable(result["reason"])))
            store.write_errors(out, summary.failed)

    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="ingest", unit="video", disable=not progress or not tasks, file=sys.stderr)
    try:
        if workers == 1 or len(tasks) <= 1:
            for task in tasks:
                bar.set_postfix_str(Path(task["relative"]).name[-30:], refresh=False)
                finish(task, process_file(task))
                bar.update()
        else:
            import multiprocessing

            # spawn: workers never inherit the parent's threads or open FFmpeg state
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                max_workers=workers, mp_context=context, initializer=end_with_parent, initargs=(os.getpid(),)
            ) as pool:
                futures = {pool.submit(process_file, task): task for task in tasks}
                try:
                    for future in as_completed(futures):
                        task = futures[future]
                        try:
                            result = future.result()
                        except Exception as exc:  # a worker that died (crash in a codec, killed)
                            result = {"ok": False, "reason": f"worker process failed: {type(exc).__name__}: {exc}"}
                        finish(task, result)
                        bar.update()
                except BaseException:  # Ctrl-C, a full disk: stop now
                    _stop_workers(pool)
                    raise
    except BaseException:
        # keep what finished (if the disk still takes the manifest: else the previous one stays,
        # consistent with the frames) and drop the temporaries of the abandoned files
        with contextlib.suppress(OSError):
            store.write_records(out, records)
        with contextlib.suppress(OSError):
            store.remove_stale_temporaries(out)
        raise
    finally:
        bar.close()
    store.write_records(out, records)
    if shards:
        summary.packed = pack_shards(out, shard_bytes, progress=progress)
    summary.n_unlabeled = sum(1 for r in records.values() if not r.label)
    summary.seconds = time.perf_counter() - start
    return summary
