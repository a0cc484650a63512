"""Real data: ingest every POCUS video and image; each video keeps 3 frames per second of its
duration (+-1), the duration read here independently from what the container declares."""

from __future__ import annotations

import av
import pytest

from medcl.data.frames import FrameSets
from medcl.ingest import ingest_videos
from medcl.ingest.store import source_kind
from conftest import shared_subdir

pytestmark = pytest.mark.realdata


def declared_duration(path) -> float:
    """The duration the container declares for the video stream (independent of our decoding;
    demuxed packet timestamps when no duration is declared). No decoding, so it is fast."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.duration:
            return float(stream.duration * stream.time_base)
        starts, ends = [], []
        for packet in container.demux(stream):
            if packet.pts is not None:
                starts.append(packet.pts)
                ends.append(packet.pts + (packet.duration or 0))
        return float((max(ends) - min(starts)) * stream.time_base)


def test_ingest_all_of_pocus(tmp_path):
    pocus = shared_subdir("pocus")
    summary = ingest_videos(
        pocus, tmp_path / "pocus", fps=3, size=64, metadata=pocus / "metadata.csv", workers=2, progress=False
    )
    assert summary.failed == [], summary.describe()
    assert summary.n_unmatched_metadata_rows == 0
    sets = FrameSets(tmp_path / "pocus")
    n_videos = 0
    for record in sets.records:
        path = pocus / record.source
        assert record.label and record.patient_id, record
        frames = sets.load_frames(record)
        assert frames.shape == (record.n_frames, 64, 64)
        if source_kind(path) == "image":
            assert record.n_frames == 1
            continue
        n_videos += 1
        expected = 3 * declared_duration(path)
        assert abs(record.n_frames - expected) <= 1, (record.source, record.n_frames, expected)
    assert n_videos >= 100
    assert set(sets.classes) >= {"covid", "pneumonia", "regular"}
