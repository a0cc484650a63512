"""`medcl synth KIND OUT`: generate synthetic data sets (today: lung-ultrasound-like videos)."""

from __future__ import annotations

import argparse
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "synth",
        help="generate synthetic data (lung-ultrasound-like videos)",
        description="Generate synthetic data sets in code: the embedded default data for the demo and tests.",
    )
    kinds = parser.add_subparsers(dest="synth_kind", metavar="KIND", required=True)
    videos = kinds.add_parser(
        "videos",
        help="lung-ultrasound-like mp4 videos + metadata.csv (classes covid, pneumonia, regular)",
        description=(
            "Write synthetic lung-ultrasound-like mp4 videos (convex fan, speckle, sliding pleura; A-lines for "
            "'regular', B-lines for 'covid', consolidation/effusion for 'pneumonia') and OUT/metadata.csv "
            "(file, label, patient_id, ...). Ingest them with: medcl ingest OUT INGESTED --metadata OUT/metadata.csv"
        ),
    )
    videos.add_argument("out", metavar="OUT", help="output folder (created)")
    videos.add_argument("--videos", type=int, default=36, help="number of videos (default 36)")
    videos.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    videos.add_argument("--size", type=int, default=128, help="frame height in pixels, even (default 128)")
    videos.add_argument("--videos-per-patient", type=int, default=3, help="videos per synthetic patient (default 3)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from medcl.data.synthetic import write_synthetic_videos

    if args.synth_kind != "videos":  # argparse enforces the choice; kept for future kinds
        print(f"medcl synth: unknown kind {args.synth_kind!r}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        metadata = write_synthetic_videos(
            args.out, n_videos=args.videos, seed=args.seed, size=args.size, videos_per_patient=args.videos_per_patient
        )
    except ValueError as exc:
        print(f"medcl synth videos: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.videos} videos and {metadata} in {time.perf_counter() - start:.1f} s")
    return 0
