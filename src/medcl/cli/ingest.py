"""`medcl ingest SRC OUT`: videos / cine DICOM / stills -> per-video frame sets + manifest.

Exit status: 0 when every file was ingested (or already done); 2 when any file failed (listed in
OUT/errors.csv; the others are ingested anyway), and 2 with one line ``medcl ingest: <file or
key>: <problem>`` on stderr when the run could not start or had to stop (missing SRC, bad metadata
column or pattern, OUT made with other settings, OUT full or not writable: what finished is kept);
130 when interrupted (Ctrl-C; what finished is kept).
"""

from __future__ import annotations

import argparse
import sys

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
        )
    except (OSError, ValueError) as exc:  # LabelSourceError, ManifestError, store.OutputError among them
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
