"""`medcl ingest SRC OUT`: videos / cine DICOM / stills -> per-video frame sets + manifest.

Also ``medcl ingest merge OUT_1 ... OUT_N -o OUT`` (join the parts of ``--part k/N`` runs) and
``medcl ingest shard OUT`` (pack an ingest folder into WebDataset shards); ``medcl.cli.main``
routes these two words to :func:`build_merge_parser` / :func:`build_shard_parser`.

Exit status: 0 when every file was ingested (or already done); 2 when any file failed (listed in
OUT/errors.csv; the others are ingested anyway), and 2 with one line ``medcl ingest: <file or
key>: <problem>`` on stderr when the run could not start or had to stop (missing SRC, bad metadata
column or pattern, OUT made with other settings, OUT full or not writable: what finished is kept);
130 when interrupted (Ctrl-C; what finished is kept).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2

EXAMPLES = """examples:
  # POCUS: labels and patients from its metadata.csv (columns file, label, patient_id)
  medcl ingest ../shared/data/pocus runs/pocus --metadata ../shared/data/pocus/metadata.csv
  # COVID-BLUES: patient from the file name, COVID PCR label per patient from patients.csv
  medcl ingest ../shared/data/covid-blues/lus_videos runs/covid-blues \\
      --patient-pattern 'patient_(?P<patient>\\d+)_' \\
      --patient-metadata ../shared/data/covid-blues/patients.csv --patient-label-column cov_test \\
      --label-map 0=negative,1=covid
  # labels from a folder or file-name pattern instead of a table
  medcl ingest videos/ runs/mine --label-pattern '^(?P<label>[^/]+)/'
  # DICOM cine: patient and study from the DICOM tags, stored as salted hashes
  medcl ingest dicom/ runs/dicom --hash-patient-ids "$MY_SECRET_SALT"
  # a corpus too big for one machine: 1/4 of the files per machine, then join (and pack into shards)
  medcl ingest /data/videos runs/part1 --part 1/4 --shards      # ... --part 4/4 on the 4th machine
  medcl ingest merge runs/part1 runs/part2 runs/part3 runs/part4 -o runs/all
  # pack a folder ingested earlier into WebDataset shards (streamed pretraining: data.store)
  medcl ingest shard runs/pocus --shard-size 200MB
"""

PATIENT_PRECEDENCE = (
    "Patient of each file, first found wins: the --metadata row's patient column, --patient-pattern, the DICOM "
    "PatientID (DICOM files), the video id (each file its own patient; the summary counts DICOM files that end "
    "here). study_id: the DICOM StudyInstanceUID, empty for other files. A row of --patient-metadata is looked up "
    "with the patient found this way."
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "ingest",
        help="decode videos / DICOM cine / images into per-video frame sets (manifest.csv + frames/*.npy)",
        description=(
            "Decode every video (anything FFmpeg reads: mp4, avi, mov, mpeg, gif, ...), multi-frame DICOM and "
            "still image (png/jpg: one frame) under SRC; keep FPS frames per second of real time; convert to "
            "grayscale; crop to the ultrasound sector (static borders and UI text dropped; crop box recorded in "
            "the manifest); fit into SIZE x SIZE keeping the aspect ratio (longer side scaled to SIZE, black "
            "padding); write OUT/frames/<video_id>.npy, OUT/manifest.csv, OUT/errors.csv. Rerunning skips "
            "finished videos whose file is unchanged (same size and modification time) and redoes changed ones. "
            "Exit status 2 when any file failed, or with a one-line message when the run cannot start or must stop "
            "(OUT full: what finished is kept, rerun to resume)."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="folder (searched recursively) or a single file")
    parser.add_argument("out", metavar="OUT", help="output folder (created; reused on reruns)")
    parser.add_argument("--fps", type=float, default=3.0, help="frames kept per second of video (default 3)")
    parser.add_argument("--size", type=int, default=224, help="side of the stored square frames (default 224)")
    parser.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")
    labels = parser.add_argument_group("labels and patients (empty label = unlabeled)", PATIENT_PRECEDENCE)
    labels.add_argument("--metadata", metavar="CSV", help="per-file table (matched by path, file name or stem)")
    labels.add_argument("--file-column", default="file", help="file column of --metadata (default 'file')")
    labels.add_argument("--label-column", default="label", help="label column of --metadata (default 'label')")
    labels.add_argument(
        "--patient-column", default="patient_id", help="patient column of --metadata (default 'patient_id')"
    )
    labels.add_argument(
        "--label-pattern", metavar="REGEX", help="regex on the path relative to SRC with a group (?P<label>...)"
    )
    labels.add_argument(
        "--patient-pattern", metavar="REGEX", help="regex on the path relative to SRC with a group (?P<patient>...)"
    )
    labels.add_argument("--patient-metadata", metavar="CSV", help="per-patient table giving a label per patient")
    labels.add_argument(
        "--patient-key-column", default="patient_id", help="patient id column of --patient-metadata (default 'patient_id')"
    )
    labels.add_argument("--patient-label-column", help="label column of --patient-metadata")
    labels.add_argument("--label-map", metavar="RAW=NAME,...", help="rename raw labels, e.g. 0=negative,1=covid")
    labels.add_argument(
        "--hash-patient-ids",
        metavar="SALT",
        help="store patient and study ids as salted hashes (HMAC-SHA256 keyed with SALT, 16 hex digits) instead of "
        "the raw ids (a file without any patient keeps its video id); the same SALT gives the same ids on every "
        "run. Keep SALT secret (and out of shared logs)",
    )
    scale = parser.add_argument_group("large corpora (see also: medcl ingest merge --help, medcl ingest shard --help)")
    scale.add_argument(
        "--part", metavar="K/N", help="ingest only part K of N of the files (a stable hash of each file's path): run "
        "K=1..N on N machines, then join with: medcl ingest merge OUT_1 ... OUT_N -o OUT",
    )
    add_shard_arguments(scale, "then also pack OUT into WebDataset shards (OUT/shards/*.tar + index.json)")
    other = parser.add_argument_group("other")
    other.add_argument("--no-crop", action="store_true", help="keep the whole frame (no sector detection)")
    other.add_argument(
        "--keep-partial", action="store_true", help="keep the decodable part of truncated files instead of failing them"
    )
    other.add_argument("--overwrite", action="store_true", help="redo every video even if OUT has results")
    other.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from medcl.ingest.labels import parse_label_map
    from medcl.ingest.pipeline import ingest_videos

    try:
        summary = ingest_videos(
            args.src,
            args.out,
            fps=args.fps,
            size=args.size,
            metadata=args.metadata,
            file_column=args.file_column,
            label_column=args.label_column,
            patient_column=args.patient_column,
            label_pattern=args.label_pattern,
            patient_pattern=args.patient_pattern,
            patient_metadata=args.patient_metadata,
            patient_key_column=args.patient_key_column,
            patient_label_column=args.patient_label_column,
            label_map=parse_label_map(args.label_map),
            hash_patient_ids=args.hash_patient_ids,
            workers=args.workers,
            crop=not args.no_crop,
            keep_partial=args.keep_partial,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            part=args.part,
            shards=args.shards,
            shard_bytes=parse_bytes(args.shard_size),
        )
    except (OSError, ValueError) as exc:  # LabelSourceError, ManifestError, store.OutputError, ShardError among them
        if getattr(args, "debug", False):
            raise
        print(f"medcl ingest: {one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(f"medcl ingest: {args.out}: interrupted; the videos finished are kept, rerun to resume", file=sys.stderr)
        return 130
    print(summary.describe())
    return summary.exit_code


def one_line(exc: Exception) -> str:
    """``<file or key>: <problem>`` on one line (an OSError from the system names its file)."""
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


def parse_bytes(text: str) -> int:
    """``"200MB"`` -> 200000000 (kB, MB, GB, TB: powers of 1000; a plain number is bytes)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    raw = str(text).strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTB")
    try:
        value = float(number) * units[raw[len(number):]]
    except (ValueError, KeyError):
        value = 0
    if not value >= 1:
        raise ValueError(f"--shard-size {text!r}: expected a size such as 200MB, 1GB or 500000 (bytes)")
    return int(value)


def add_shard_arguments(group: argparse._ActionsContainer, shards_help: str | None) -> None:
    if shards_help:
        group.add_argument("--shards", action="store_true", help=shards_help)
    group.add_argument("--shard-size", default="200MB", metavar="SIZE",
                       help="bytes per shard, e.g. 200MB (default), 1GB; a shard closes once it holds this much")


def subcommand(word: str, description: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """The parser of ``medcl ingest WORD`` (routed by ``medcl.cli.main``, see the module docstring)."""
    parser = argparse.ArgumentParser(prog=f"medcl ingest {word}", description=description)
    parser.set_defaults(func=func, command=f"ingest {word}")
    return parser


def build_merge_parser() -> argparse.ArgumentParser:
    parser = subcommand(
        "merge",
        "Join the ingest folders of `medcl ingest SRC OUT_k --part k/N` (k = 1..N) into one folder that "
        "equals a single-machine ingest of SRC: manifest.csv, errors.csv, frames (hard-linked when on the same file "
        "system, else copied) and, when every part has them, the shards with one merged index. Refused, with one "
        "line naming the folders: parts made with other settings, a part missing or given twice, a video in two parts.",
        run_merge,
    )
    parser.add_argument("parts", metavar="OUT_K", nargs="+", help="ingest folders of the parts")
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="merged folder (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace what OUT holds")
    return parser


def build_shard_parser() -> argparse.ArgumentParser:
    parser = subcommand(
        "shard",
        "Pack an ingest folder's frame sets into WebDataset tar shards (OUT/shards/shard-NNNNNN.tar, one "
        "sample per video: <key>.npy frames + <key>.json manifest row) and OUT/shards/index.json (shard -> videos, "
        "labels, patients, byte offsets). Pretraining with data.store=auto then streams from the shards. Skipped when "
        "the shards already match the manifest.",
        run_shard,
    )
    parser.add_argument("out", metavar="OUT", help="an ingest output folder")
    add_shard_arguments(parser, None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


SUBCOMMANDS = {"merge": build_merge_parser, "shard": build_shard_parser}


def _report_error(args: argparse.Namespace, exc: Exception, command: str) -> int:
    if getattr(args, "debug", False):
        raise exc
    print(f"medcl {command}: {one_line(exc)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run_merge(args: argparse.Namespace) -> int:
    from medcl.ingest.parts import merge_ingests

    try:
        summary = merge_ingests(args.parts, args.out, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:
        return _report_error(args, exc, "ingest merge")
    print(summary.describe())
    return summary.exit_code


def run_shard(args: argparse.Namespace) -> int:
    from medcl.ingest.pack import pack_shards

    try:
        summary = pack_shards(args.out, parse_bytes(args.shard_size), progress=not args.no_progress)
    except (OSError, ValueError) as exc:
        return _report_error(args, exc, "ingest shard")
    print(summary.describe())
    return 0
