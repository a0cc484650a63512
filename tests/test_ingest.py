"""medcl ingest: fps sampling, sector crop, DICOM, damaged files, labels, resume, CLI exit status."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from medcl.data.frames import FrameSets
from medcl.data.manifest import read_manifest
from medcl.data.synthetic import synthetic_video_frames
from medcl.ingest import ingest_videos
from medcl.ingest.dicom import read_dicom
from medcl.ingest.labels import LabelSource, LabelSourceError, parse_label_map
from medcl.ingest.sector import CropBox, crop_square, detect_sector
from medcl.ingest.store import make_video_id
from medcl.ingest.video import RealTimeSampler, decode_video, expected_frame_count


def index_frames(n: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frames that carry their index in binary: 8 vertical stripes, black (0) or white (1) bits."""
    frames = np.zeros((n, height, width), np.uint8)
    stripe = width // 8
    for i in range(n):
        for bit in range(8):
            if (i >> bit) & 1:
                frames[i, :, bit * stripe : (bit + 1) * stripe] = 255
    return frames


def frame_index(gray: np.ndarray) -> int:
    stripe = gray.shape[1] // 8
    bits = [gray[:, b * stripe + 2 : (b + 1) * stripe - 2].mean() > 128 for b in range(8)]
    return sum(1 << b for b, on in enumerate(bits) if on)


def write_video(path: Path, frames: np.ndarray, fps, codec="libx264", options=None, rotation=None) -> Path:
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "10", "preset": "ultrafast"}
        else:
            stream.bit_rate = 4_000_000
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(frame, format="gray").reformat(format="yuv420p")
            vf.pts = i
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def ultrasound_clip(n: int = 12, size: int = 64, seed: int = 0) -> np.ndarray:
    frames, _ = synthetic_video_frames("covid", seed=seed, size=size, n_frames=n, fps=10, width=size)
    return frames


# ---------------------------------------------------------------- sampling


def test_sampler_constant_rate_picks_the_frame_on_screen():
    sampler: RealTimeSampler[int] = RealTimeSampler(3)
    kept = []
    for i in range(100):  # 25 fps, 4 s
        kept += sampler.push(i / 25, i)
    kept += sampler.finish(100 / 25)
    assert kept == [math.floor(k * 25 / 3 + 1e-9) for k in range(12)]


def test_sampler_variable_rate_and_slow_and_short_sources():
    # variable frame rate: frame i shown from times[i]
    times = [0.0, 0.05, 0.5, 0.55, 1.2, 1.25, 1.3]
    sampler: RealTimeSampler[int] = RealTimeSampler(2)
    kept = []
    for i, t in enumerate(times):
        kept += sampler.push(t, i)
    kept += sampler.finish(1.9)
    # targets 0, 0.5, 1.0, 1.5 -> frames on screen then: 1 s at 0.5 is frame 2, 1.0 is still frame 3
    assert kept == [0, 2, 3, 6]
    # a 1 fps source sampled at 3 fps repeats frames rather than inventing any
    sampler = RealTimeSampler(3)
    kept = []
    for i in range(3):
        kept += sampler.push(float(i), i)
    kept += sampler.finish(3.0)
    assert kept == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # shorter than one interval: one frame
    sampler = RealTimeSampler(3)
    kept = sampler.push(0.0, "a") + sampler.push(0.1, "b") + sampler.finish(0.2)
    assert kept == ["a"]
    assert expected_frame_count(0.2, 3) == 1 and expected_frame_count(4.0, 3) == 12
    with pytest.raises(ValueError, match="fps"):
        RealTimeSampler(0)


@pytest.mark.parametrize(
    "fps,n,codec,suffix", [(25, 100, "libx264", ".mp4"), (30000 / 1001, 45, "libx264", ".mov"), (10, 23, "mpeg4", ".avi")]
)
def test_decode_video_keeps_3_fps_of_real_time(tmp_path, fps, n, codec, suffix):
    path = write_video(tmp_path / f"clip{suffix}", index_frames(n), fps, codec=codec)
    clip = decode_video(path, fps=3)
    duration = n / fps
    assert clip.n_source_frames == n
    assert clip.duration_s == pytest.approx(duration, abs=1e-3)
    assert len(clip.frames) == expected_frame_count(duration, 3)
    got = [frame_index(f) for f in clip.frames]
    want = [math.floor(k * fps / 3 + 1e-6) for k in range(len(clip.frames))]
    assert got == want
    assert clip.source_fps == pytest.approx(fps, rel=1e-3)


def test_gif_frame_durations_are_respected(tmp_path):
    durations_ms = [100, 500, 100, 1000, 300]  # 2.0 s in total
    images = [Image.fromarray(f) for f in index_frames(len(durations_ms))]
    path = tmp_path / "delays.gif"
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations_ms, loop=0)
    clip = decode_video(path, fps=4)  # targets every 0.25 s
    starts = np.cumsum([0] + durations_ms[:-1]) / 1000
    want = [int(np.searchsorted(starts, k / 4, side="right") - 1) for k in range(8)]
    assert [frame_index(f) for f in clip.frames] == want == [0, 1, 1, 3, 3, 3, 3, 4]
    assert clip.duration_s == pytest.approx(2.0)


def test_rotation_metadata_is_applied(tmp_path):
    frames = np.zeros((3, 48, 64), np.uint8)
    frames[:, :8, :] = 200  # a bright band at the top
    path = write_video(tmp_path / "rot.mp4", frames, 10, rotation=90)
    clip = decode_video(path, fps=3)
    assert clip.frames[0].shape == (64, 48)
    # rotated 90 degrees counter-clockwise for display: the top band becomes the left column band
    assert clip.frames[0][:, :8].mean() > 150 and clip.frames[0][:, -8:].mean() < 50


# ---------------------------------------------------------------- sector crop


def test_sector_excludes_static_text_and_borders():
    frames = np.zeros((10, 120, 160), np.uint8)
    rng = np.random.default_rng(0)
    frames[:, 20:110, 40:130] = rng.integers(30, 200, (10, 90, 90))  # moving "ultrasound"
    frames[:, 2:10, 2:30] = 220  # static text block top-left, outside the image
    frames[:, 50:60, 145:150] = 255  # static scale marks on the right
    box = detect_sector(frames)
    assert 36 <= box.x0 <= 40 and 130 <= box.x1 <= 134 and 16 <= box.y0 <= 20 and 110 <= box.y1 <= 114


def test_sector_on_synthetic_fan_and_still_fallback():
    frames = ultrasound_clip(n=8, size=128)
    box = detect_sector(frames)
    moving = frames.astype(float).std(0) > 8  # the fan's speckle
    rows, cols = np.flatnonzero(moving.any(1)), np.flatnonzero(moving.any(0))
    assert box.y0 <= rows[0] and box.x0 <= cols[0] and box.x1 > cols[-1] and box.y1 > rows[-1]
    assert rows[0] - box.y0 <= 4  # the static text rows above the fan are dropped
    still = np.zeros((80, 100), np.uint8)
    still[10:70, 20:90] = 120
    still[2:4, 2:40] = 255  # a thin text line: removed by the opening
    box = detect_sector([still])
    assert (box.x0, box.y0, box.x1, box.y1) == (18, 8, 92, 72)


def test_crop_square_keeps_aspect_with_black_padding():
    frame = np.full((40, 80), 100, np.uint8)
    out = crop_square(frame, CropBox(0, 0, 80, 40), 32)
    assert out.shape == (32, 32)
    assert out[:7].max() == 0 and out[-7:].max() == 0 and out[8:24].min() == 100


# ---------------------------------------------------------------- DICOM


def make_dicom(path: Path, pixels: np.ndarray, photometric="MONOCHROME2", **tags) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2")
    n = pixels.shape[0]
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = pixels.shape[1], pixels.shape[2]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_dicom_multiframe_with_frame_time(tmp_path):
    path = make_dicom(tmp_path / "cine.dcm", index_frames(30), FrameTime="100")  # 10 fps, 3 s
    clip = read_dicom(path, fps=3)
    assert clip.n_source_frames == 30 and clip.duration_s == pytest.approx(3.0)
    assert [frame_index(f) for f in clip.frames] == [math.floor(k * 10 / 3 + 1e-6) for k in range(9)]
    assert clip.extra["assumed_timing"] is False


def test_dicom_16bit_ybr_and_timing_fallbacks(tmp_path):
    ramp = np.linspace(0, 4000, 48 * 64).reshape(1, 48, 64).astype(np.uint16).repeat(4, 0)
    clip = read_dicom(make_dicom(tmp_path / "u16.dcm", ramp, CineRate="2"), fps=1)
    assert clip.frames[0].dtype == np.uint8 and clip.frames[0].min() <= 2 and clip.frames[0].max() >= 253
    assert len(clip.frames) == 2  # 4 frames at 2 fps = 2 s
    # RGB -> YBR_FULL by hand, stored as YBR: decoded back to the grey level
    rgb = np.full((2, 16, 16, 3), 0, np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    r, g, b = (rgb[..., i].astype(float) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    ybr = np.stack([y, -0.168736 * r - 0.331264 * g + 0.5 * b + 128, 0.5 * r - 0.418688 * g - 0.081312 * b + 128], -1)
    clip = read_dicom(make_dicom(tmp_path / "ybr.dcm", ybr.round().astype(np.uint8), "YBR_FULL"), fps=3)
    assert abs(int(clip.frames[0][0, 0]) - round(y[0, 0, 0])) <= 2
    assert clip.extra["assumed_timing"] is True  # no timing tag: 30 fps assumed
    mono1 = read_dicom(make_dicom(tmp_path / "m1.dcm", index_frames(1), "MONOCHROME1"), fps=3)
    assert mono1.frames[0].min() == 255  # frame 0 is all black, inverted to white


# ---------------------------------------------------------------- labels and ids


def test_video_ids_are_unique_and_safe():
    taken: set[str] = set()
    ids = []
    for rel in ["a/b c.mp4", "a/b c.avi", "a__b c.mp4", "x.gif"]:
        ids.append(make_video_id(rel, taken))
        taken.add(ids[-1])
    assert ids == ["a__b_c", "a__b_c_avi", "a__b_c_mp4", "x"]


def test_label_source_tables_patterns_and_errors(tmp_path):
    src = tmp_path / "videos"
    (src / "sub").mkdir(parents=True)
    meta = tmp_path / "severity.csv"
    meta.write_text("video_file,score\npatient_7_L1,2.0\npatient_8_R2,\n")
    patients = tmp_path / "patients.csv"
    patients.write_text("patient_id,cov_test\n7,1\n8,0\n")
    source = LabelSource(
        src_root=src,
        metadata=meta,
        file_column="video_file",
        label_column="score",
        patient_column=None,
        patient_pattern=r"patient_(?P<patient>\d+)_",
        patient_metadata=patients,
        patient_label_column="cov_test",
        label_map=parse_label_map("0=negative,1=covid"),
    )
    assert source.lookup(src / "sub" / "patient_7_L1.mp4") == ("2.0", "7", True)
    assert source.lookup(src / "patient_8_R2.mp4") == ("negative", "8", True)  # empty score: patient label
    assert source.lookup(src / "other.mp4") == ("", "", False)
    pattern = LabelSource(src_root=src, label_pattern=r"^(?P<label>[A-Za-z]+)_")
    assert pattern.lookup(src / "Cov_x.mp4")[0] == "Cov"
    with pytest.raises(LabelSourceError, match="no column 'nope'"):
        LabelSource(src_root=src, metadata=meta, file_column="video_file", label_column="nope")
    with pytest.raises(LabelSourceError, match="named group"):
        LabelSource(src_root=src, label_pattern=r"(a)(b)")
    with pytest.raises(LabelSourceError, match="RAW=NAME"):
        parse_label_map("0negative")


# ---------------------------------------------------------------- the whole pipeline


def make_source_folder(root: Path) -> Path:
    """Three good ultrasound-like videos, a still, a DICOM cine, plus a metadata table."""
    root.mkdir(parents=True)
    write_video(root / "Cov_a.mp4", ultrasound_clip(20, seed=1), 10)  # 2 s -> 6 frames
    write_video(root / "Reg_b.avi", ultrasound_clip(15, seed=2), 5, codec="mpeg4")  # 3 s -> 9 frames
    (root / "sub").mkdir()
    Image.fromarray(ultrasound_clip(1, seed=3)[0]).save(root / "sub" / "Pneu_c.png")
    make_dicom(root / "sub" / "Cov_d", ultrasound_clip(12, seed=4), FrameTime="250")  # no extension, 3 s
    (root / "notes.txt").write_text("not a video, ignored")
    (root / "meta.csv").write_text("file,label,patient_id\nCov_a.mp4,covid,p1\nReg_b.avi,regular,p2\n")
    return root


def test_ingest_folder_end_to_end_and_resume(tmp_path):
    src = make_source_folder(tmp_path / "src")
    out = tmp_path / "out"
    summary = ingest_videos(
        src, out, fps=3, size=32, metadata=src / "meta.csv", label_pattern=r"(?:^|/)(?P<label>[A-Z][a-z]+)_",
        progress=False,
    )
    assert summary.failed == [] and summary.exit_code == 0
    assert summary.n_ingested == 4 and summary.n_ignored_files == 2  # notes.txt, meta.csv
    records = {r.source: r for r in read_manifest(out)}
    assert {s: r.n_frames for s, r in records.items()} == {
        "Cov_a.mp4": 6, "Reg_b.avi": 9, "sub/Pneu_c.png": 1, "sub/Cov_d": 9
    }
    assert records["Cov_a.mp4"].label == "covid" and records["Cov_a.mp4"].patient_id == "p1"
    assert records["sub/Pneu_c.png"].label == "Pneu"  # from the pattern
    assert records["sub/Cov_d"].patient_id == records["sub/Cov_d"].video_id
    sets = FrameSets(out)
    for fs in sets:
        assert fs.frames.shape[1:] == (32, 32) and fs.frames.dtype == np.uint8 and fs.frames.max() > 0
    rec = records["Cov_a.mp4"]
    assert 0 <= rec.crop_x0 < rec.crop_x1 <= 64 and 0 <= rec.crop_y0 < rec.crop_y1 <= 64
    assert (out / "errors.csv").read_text().strip() == "file,reason"

    # a stale temporary from an interrupted run, and a frames file lost since: both handled
    frames_dir = out / "frames"
    (frames_dir / "Cov_a.npy.tmp-99999").write_bytes(b"half written")
    (frames_dir / f"{records['Reg_b.avi'].video_id}.npy").unlink()
    mtime = (frames_dir / f"{rec.video_id}.npy").stat().st_mtime_ns
    again = ingest_videos(src, out, fps=3, size=32, metadata=src / "meta.csv", progress=False)
    assert again.n_skipped == 3 and again.n_ingested == 1 and again.exit_code == 0
    assert (frames_dir / f"{rec.video_id}.npy").stat().st_mtime_ns == mtime  # not rewritten
    assert not list(frames_dir.glob("*.tmp-*"))
    assert len(read_manifest(out)) == 4
    # labels are refreshed from the current options without decoding again (no pattern now)
    assert {r.source: r.label for r in read_manifest(out)}["sub/Pneu_c.png"] == ""

    with pytest.raises(ValueError, match="--overwrite"):
        ingest_videos(src, out, fps=2, size=32, progress=False)
    redo = ingest_videos(src, out, fps=2, size=32, overwrite=True, progress=False)
    assert redo.n_ingested == 4 and redo.n_skipped == 0


def test_stale_frames_without_manifest_row_are_not_trusted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_video(src / "v.mp4", ultrasound_clip(10), 10)
    out = tmp_path / "out"
    (out / "frames").mkdir(parents=True)
    np.save(out / "frames" / "v.npy", np.zeros((1, 8, 8), np.uint8))  # left by a crash before the manifest
    summary = ingest_videos(src, out, size=16, progress=False)
    assert summary.n_ingested == 1
    assert np.load(out / "frames" / "v.npy").shape == (3, 16, 16)


def damaged_files(folder: Path) -> dict[str, str]:
    """Write damaged files; returns name -> a word the reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("this is a text file, not a video\n" * 20)
    good = write_video(folder / "full.mp4", ultrasound_clip(30), 10)
    data = good.read_bytes()
    good.unlink()
    (folder / "cut_moov_at_end.mp4").write_bytes(data[: len(data) // 2])
    fast = write_video(folder / "fast.mp4", ultrasound_clip(30), 10, options={"movflags": "faststart"})
    data = fast.read_bytes()
    fast.unlink()
    (folder / "cut_faststart.mp4").write_bytes(data[: int(len(data) * 0.6)])
    images = [Image.fromarray(f) for f in ultrasound_clip(5)]
    images[0].save(folder / "g.gif", save_all=True, append_images=images[1:], duration=100)
    data = (folder / "g.gif").read_bytes()
    (folder / "g.gif").unlink()
    (folder / "cut.gif").write_bytes(data[: len(data) // 2])
    (folder / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    return {
        "empty.mp4": "0 bytes",
        "text.mp4": "cannot open",
        "cut_moov_at_end.mp4": "",  # "moov atom not found" or "no video stream", depending on the cut
        "cut_faststart.mp4": "",
        "cut.gif": "truncated",
        "bad.dcm": "DICOM",
    }


def test_damaged_files_reported_and_good_ones_ingested(tmp_path):
    src = tmp_path / "src"
    expected = damaged_files(src)
    images = [Image.fromarray(ultrasound_clip(1)[0])]
    images[0].save(src / "one_frame.gif", save_all=True, duration=100)  # valid: 1 frame
    write_video(src / "good.mp4", ultrasound_clip(12), 12)
    summary = ingest_videos(src, tmp_path / "out", size=16, progress=False)
    reasons = dict(summary.failed)
    assert set(reasons) == set(expected), summary.describe()
    for name, word in expected.items():
        assert word in reasons[name], (name, reasons[name])
    rows = list(csv.DictReader((tmp_path / "out" / "errors.csv").open()))
    assert {r["file"] for r in rows} == set(expected) and all(r["reason"] for r in rows)
    records = {r.source: r for r in read_manifest(tmp_path / "out")}
    assert set(records) == {"one_frame.gif", "good.mp4"}
    assert records["one_frame.gif"].n_frames == 1 and records["good.mp4"].n_frames == 3
    assert summary.exit_code == 2


def test_workers_give_the_same_result(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        write_video(src / f"v{i}.mp4", ultrasound_clip(10, seed=i), 10)
    (src / "broken.mp4").write_bytes(b"xx")
    one = ingest_videos(src, tmp_path / "one", size=16, progress=False)
    two = ingest_videos(src, tmp_path / "two", size=16, workers=2, progress=False)
    assert one.failed == two.failed and len(one.failed) == 1
    for r1, r2 in zip(read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")):
        assert r1 == r2
        np.testing.assert_array_equal(
            np.load(tmp_path / "one" / r1.frames_file), np.load(tmp_path / "two" / r2.frames_file)
        )


def test_cli_exit_status(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_video(src / "ok.mp4", ultrasound_clip(10), 10)
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "medcl", "ingest", str(src), str(tmp_path / "out"), "--size", "16", "--no-progress", *extra],
        capture_output=True,
        text=True,
    )
    clean = run()
    assert clean.returncode == 0, clean.stderr
    (src / "zero.avi").write_bytes(b"")
    failed = run()
    assert failed.returncode == 2 and "zero.avi" in failed.stdout
    assert "zero.avi" in (tmp_path / "out" / "errors.csv").read_text()
    bad_column = run("--metadata", str(src / "missing.csv"))
    assert bad_column.returncode == 2 and "missing.csv" in bad_column.stderr


def test_dicom_jpeg_baseline_ybr_422(tmp_path):
    """The usual ultrasound cine export: JPEG-compressed YBR_FULL_422 frames."""
    import io

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, UltrasoundMultiFrameImageStorage, generate_uid

    encoded, luma = [], []
    for i in range(6):
        rgb = np.zeros((32, 48, 3), np.uint8)
        rgb[..., 0], rgb[..., 1], rgb[..., 2] = 40 * i, 100, 30
        luma.append(0.299 * 40 * i + 0.587 * 100 + 0.114 * 30)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
        encoded.append(buffer.getvalue())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = FileDataset(str(tmp_path / "j.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.NumberOfFrames, ds.Rows, ds.Columns, ds.SamplesPerPixel = 6, 32, 48, 3
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.FrameTime = "500"  # 2 fps, 3 s
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(str(tmp_path / "j.dcm"), enforce_file_format=True)
    clip = read_dicom(tmp_path / "j.dcm", fps=3)
    assert len(clip.frames) == 9 and clip.duration_s == pytest.approx(3.0)
    shown = [math.floor(k * 2 / 3 + 1e-6) for k in range(9)]
    for frame, index in zip(clip.frames, shown):
        assert abs(float(frame.mean()) - luma[index]) < 3


def test_symlinked_files_and_folders(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    write_video(real / "a.mp4", ultrasound_clip(10), 10)
    src = tmp_path / "src"
    (src / "linked_dir").parent.mkdir(parents=True)
    (src / "linked_dir").symlink_to(real, target_is_directory=True)
    (src / "b.mp4").symlink_to(real / "a.mp4")
    (src / "meta.csv").write_text("file,label\nlinked_dir/a.mp4,x\nb.mp4,y\n")
    summary = ingest_videos(src, tmp_path / "out", size=16, metadata=src / "meta.csv", progress=False)
    assert summary.exit_code == 0 and summary.n_ingested == 2
    assert {r.source: r.label for r in read_manifest(tmp_path / "out")} == {"b.mp4": "y", "linked_dir/a.mp4": "x"}


def test_variable_frame_rate_mp4_uses_timestamps(tmp_path):
    pts_ms = [0, 40, 80, 500, 540, 1500, 1540]
    frames = index_frames(len(pts_ms))
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"crf": "10", "preset": "ultrafast", "bf": "0"}
        for frame, pts in zip(frames, pts_ms):
            vf = av.VideoFrame.from_ndarray(frame, format="gray").reformat(format="yuv420p")
            vf.pts, vf.time_base = pts, Fraction(1, 1000)
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    clip = decode_video(path, fps=3)
    # targets 0, 1/3, 2/3, 1, 4/3 s (the clip ends at 1.54 s + the last frame's duration)
    assert [frame_index(f) for f in clip.frames][:5] == [0, 2, 4, 4, 4]
    assert 1.54 < clip.duration_s < 1.6 + 1e-6
    assert len(clip.frames) == expected_frame_count(clip.duration_s, 3)
