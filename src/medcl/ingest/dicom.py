"""Multi-frame (cine) and single-frame DICOM with pydicom.

Frame timing, first found wins: Frame Time Vector (0018,1065) [ms between frames], Frame Time
(0018,1063) [ms], Cine Rate (0018,0040) [frames/s], Recommended Display Frame Rate (0008,2144).
Without any of them the clip is assumed to run at ``default_fps`` (30, the usual ultrasound
cine rate) and ``DecodedClip.extra["assumed_timing"]`` says so.

Pixels: decoded by pydicom (YBR_FULL / YBR_FULL_422 / palette colour converted to RGB, then to
luma; MONOCHROME1 inverted). 16-bit data goes to uint8 through the VOI window when the file has
one, else through the clip's own 0.5-99.5 percentile range (one range for the whole clip, so the
brightness does not flicker between frames).

Identity: :func:`read_identity` reads PatientID (0010,0020) and StudyInstanceUID (0020,000D)
from the header alone, so that two cine loops of one patient get one ``patient_id`` whatever
their file names.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from medcl.ingest.video import DecodedClip, DecodeError, RealTimeSampler

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom", ".dic"})
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def looks_like_dicom(path: str | Path) -> bool:
    """True when the file carries the DICOM Part 10 preamble magic ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def read_identity(path: str | Path) -> tuple[str, str]:
    """``(PatientID, StudyInstanceUID)`` of a DICOM file, ``""`` for each one that is missing or
    blank, or when the header cannot be read (decoding the file then says what is wrong)."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["PatientID", "StudyInstanceUID"])
    except Exception:  # pydicom raises many types for damaged files
        return "", ""
    return str(ds.get("PatientID", "") or "").strip(), str(ds.get("StudyInstanceUID", "") or "").strip()


def _frame_times(ds, n_frames: int, default_fps: float) -> tuple[np.ndarray, float, bool]:
    """Start time (s) of every frame and the duration of the last one; True when assumed."""
    vector = ds.get("FrameTimeVector")
    if vector is not None and n_frames > 1:
        values = [float(v) for v in (vector if isinstance(vector, (list, tuple)) or hasattr(vector, "__len__") else [vector])]
        if len(values) == n_frames and all(math.isfinite(v) and v >= 0 for v in values) and sum(values[1:]) > 0:
            # the first entry is 0 by definition; entry i is the time from frame i-1 to frame i
            starts = np.cumsum([0.0] + values[1:]) / 1000.0
            return starts, float(np.median(values[1:])) / 1000.0, False
    for keyword, to_seconds in (
        ("FrameTime", lambda v: float(v) / 1000.0),
        ("CineRate", lambda v: 1.0 / float(v)),
        ("RecommendedDisplayFrameRate", lambda v: 1.0 / float(v)),
    ):
        value = ds.get(keyword)
        try:
            interval = to_seconds(value) if value not in (None, "") else None
        except (TypeError, ValueError, ZeroDivisionError):
            interval = None
        if interval is not None and math.isfinite(interval) and interval > 0:
            return np.arange(n_frames) * interval, interval, False
    interval = 1.0 / default_fps
    return np.arange(n_frames) * interval, interval, True


def _to_uint8(pixels: np.ndarray, ds) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    data = pixels.astype(np.float32)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center = float(center[0] if hasattr(center, "__len__") and not isinstance(center, str) else center)
        width = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        data = data * slope + intercept
        lo, hi = center - width / 2, center + width / 2
    else:
        lo, hi = np.percentile(data, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1
    return np.clip((data - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)


def read_dicom(path: str | Path, fps: float = 3.0, *, default_fps: float = 30.0) -> DecodedClip:
    """Read a DICOM file and keep frames at ``fps`` per second of real time (see module doc)."""

    path = Path(path)
    with warnings.catch_warnings():  # damaged files make pydicom warn; the DecodeError says it
        warnings.simplefilter("ignore")
        return _read_dicom(path, fps, default_fps)


def _read_dicom(path: Path, fps: float, default_fps: float) -> DecodedClip:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
    except InvalidDicomError as exc:
        raise DecodeError(f"not a DICOM file: {exc}") from None
    except Exception as exc:  # pydicom raises many types for damaged files
        raise DecodeError(f"cannot read DICOM (damaged or truncated?): {type(exc).__name__}: {exc}") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DecodeError("DICOM file has no pixel data (not an image or cine)")
    try:
        from pydicom.pixels import pixel_array

        pixels = pixel_array(ds, as_rgb=True)
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise DecodeError(
            f"cannot decode DICOM pixel data (transfer syntax {name}): {type(exc).__name__}: {exc}"
        ) from None

    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, ds)
        samples = 3
    colour = samples == 3
    if n_frames == 1:
        pixels = pixels[None]
    if pixels.ndim != (4 if colour else 3) or pixels.shape[0] != n_frames:
        raise DecodeError(f"unexpected DICOM pixel array shape {pixels.shape} for {n_frames} frame(s)")
    if colour:
        if pixels.dtype != np.uint8:
            pixels = _to_uint8(pixels, ds)
        gray = np.tensordot(pixels.astype(np.float32), _LUMA, axes=([-1], [0]))
        frames = np.clip(gray + 0.5, 0, 255).astype(np.uint8)
    else:
        frames = _to_uint8(pixels, ds)
        if photometric == "MONOCHROME1":
            frames = 255 - frames
    if frames.shape[0] == 0:
        raise DecodeError("DICOM file has no frames")

    starts, last_duration, assumed = _frame_times(ds, n_frames, default_fps)
    sampler: RealTimeSampler[int] = RealTimeSampler(fps)
    kept_index: list[int] = []
    for i, start in enumerate(starts):
        kept_index += sampler.push(float(start), i)
    end_time = float(starts[-1]) + last_duration
    kept_index += sampler.finish(end_time)
    return DecodedClip(
        frames=[frames[i] for i in kept_index],
        times=sampler.kept_times,
        n_source_frames=n_frames,
        duration_s=end_time - float(starts[0]),
        extra={"assumed_timing": assumed, "photometric": photometric},
    )
