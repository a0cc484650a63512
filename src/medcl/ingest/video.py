"""Decode videos with PyAV and keep frames at a fixed rate of *real* time.

Sampling rule (shared by video, DICOM cine and stills): a clip covers ``[t0, t_end)`` where
``t0`` is the first frame's presentation time and ``t_end`` the last frame's time plus its
duration. Frames are kept at the target times ``t0 + k / fps`` for ``k = 0, 1, ...`` while the
target is before ``t_end``; each target keeps the frame on screen at that moment (the last frame
whose timestamp is <= the target). So a clip of ``T`` seconds yields ``ceil(T * fps)`` frames
(at least one), whatever its codec, frame rate, variable frame timing or gif frame delays.
A source slower than ``fps`` repeats a frame rather than inventing one.

Timing comes from each frame's ``pts * time_base`` (never from the container's nominal rate
unless a frame carries no timestamp). Only the kept frames are converted to grayscale arrays;
every other frame is decoded (inter-frame codecs need it) and dropped, which is what keeps
ingestion close to a bare decode loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")

# Containers FFmpeg reads that ingest looks for (a still image goes through medcl.ingest.store).
VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .avi .mpeg .mpg .mpe .m2v .mkv .webm .wmv .asf .flv .gif .ogv .ogg .3gp .3g2 "
    ".ts .mts .m2ts .mxf .vob .dv .apng".split()
)


# a longer gap between two frames' timestamps is a broken clock, not a real pause in the clip
_MAX_GAP_S = 10.0


class DecodeError(Exception):
    """A file that could not be turned into frames; the message is the readable reason."""


@dataclass
class DecodedClip:
    """Kept frames of one clip, grayscale uint8 at source resolution (after display rotation)."""

    frames: list[np.ndarray]
    times: list[float]  # presentation time (s) of each kept target, from the clip start
    n_source_frames: int
    duration_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    studio_range: bool = False  # frames hold studio-range luma (16..235): expand after resizing

    @property
    def source_fps(self) -> float:
        """Average source frame rate over the clip (0 for a still)."""
        return self.n_source_frames / self.duration_s if self.duration_s > 0 else 0.0


class RealTimeSampler(Generic[T]):
    """Streaming sampler: push frames in presentation order, get back the ones to keep.

    ``push(time, item)`` returns the items kept for targets that fall before ``time`` (they
    belong to the previous frame); ``finish(end_time)`` flushes the targets up to the clip end.
    """

    def __init__(self, fps: float):
        if not fps > 0 or not math.isfinite(fps):
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        self.interval = 1.0 / fps
        self.t0: float | None = None
        self.k = 0
        self._prev: T | None = None
        self._prev_time = 0.0
        self.kept_times: list[float] = []

    def _target(self) -> float:
        assert self.t0 is not None
        return self.t0 + self.k * self.interval

    def _emit(self) -> T:
        self.kept_times.append(self._target() - (self.t0 or 0.0))
        self.k += 1
        return self._prev  # type: ignore[return-value]

    def push(self, time: float, item: T) -> list[T]:
        out: list[T] = []
        if self.t0 is None:
            self.t0 = time
        else:
            while self._target() < time - 1e-9:
                out.append(self._emit())
        self._prev, self._prev_time = item, time
        return out

    def finish(self, end_time: float) -> list[T]:
        out: list[T] = []
        if self.t0 is None:
            return out
        while self.k == 0 or self._target() < end_time - 1e-9:
            out.append(self._emit())
        return out


def expected_frame_count(duration_s: float, fps: float) -> int:
    """Frames the sampler keeps from a clip of ``duration_s`` seconds: ``max(1, ceil(T * fps))``."""
    return max(1, math.ceil(duration_s * fps - 1e-6))


def _ffmpeg_reason(exc: BaseException, logs: list | None = None) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    details = [m.strip() for level, _name, m in (logs or []) if m and m.strip()]
    if details:
        text = f"{text} ({details[-1]})"
    return text


# studio-range luma (16..235) to full range (0..255), the same mapping swscale applies for "gray"
_LIMITED_TO_FULL = np.clip(np.round((np.arange(256) - 16) * 255 / 219), 0, 255).astype(np.uint8)
STUDIO_TO_FULL_RANGE: tuple[int, ...] = tuple(int(v) for v in _LIMITED_TO_FULL)
_PLANAR_YUV_8BIT = frozenset(
    "yuv420p yuv422p yuv444p yuv410p yuv411p yuv440p yuvj420p yuvj422p yuvj444p yuvj440p yuva420p nv12 nv21".split()
)


def expand_studio_range(gray: np.ndarray) -> np.ndarray:
    """Map studio-range luma (16..235) to full range (0..255)."""
    return _LIMITED_TO_FULL[gray]


def frame_to_gray(frame: Any) -> tuple[np.ndarray, bool]:
    """Grayscale uint8 copy of a decoded frame, and whether it is still studio range (16..235).

    For 8-bit YUV the luma plane *is* the grayscale image: it is copied instead of a full swscale
    conversion, and the range expansion is left to the caller, who applies it to the small
    resized frames instead of the full-resolution ones (:func:`expand_studio_range`).
    """
    name = frame.format.name
    if name in _PLANAR_YUV_8BIT:
        plane = frame.planes[0]
        luma = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]
        full_range = name.startswith("yuvj") or frame.color_range == 2  # 2: AVCOL_RANGE_JPEG
        return luma.copy(), not full_range
    return frame.to_ndarray(format="gray"), False


def _rotate(gray: np.ndarray, rotation: int) -> np.ndarray:
    """Apply the display matrix rotation (counter-clockwise degrees, as PyAV reports it)."""
    quarter = int(round(rotation / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(gray, quarter)) if quarter else gray


def _check_complete(
    stream: Any, time_base: float, end_time: float, n_decoded: int, declared_frames: int, interval: float
) -> None:
    """Raise for a stream that stops well before the end its container declares (a truncated file).

    The declared duration is the reliable signal (mp4/mov sample tables, avi headers). The
    declared frame count is not: edit lists and dropped leading B-frames make decoders output fewer
    frames than there are packets, so it is used only when no duration is declared.
    """
    if stream.duration:
        start = float((stream.start_time or 0) * time_base)
        declared_end = start + float(stream.duration * time_base)
        missing = declared_end - end_time
        if missing > max(3 * interval, 0.05 * (declared_end - start)):
            raise DecodeError(
                f"truncated: frames stop at {end_time:.2f} s but the container declares {declared_end:.2f} s "
                f"({n_decoded} frames decoded)"
            )
    elif declared_frames and n_decoded < 0.9 * declared_frames - 2:
        raise DecodeError(f"truncated: decoded {n_decoded} of the {declared_frames} frames the container declares")


def decode_video(path: str | Path, fps: float = 3.0, *, threads: int = 0, keep_partial: bool = False) -> DecodedClip:
    """Decode ``path`` with PyAV, keeping grayscale frames at ``fps`` per second of real time.

    ``threads``: decoder threads (0 = FFmpeg's automatic choice). Raises :class:`DecodeError`
    with a readable reason for files that cannot be read: no video stream, undecodable codec,
    no frames, decode errors, or a stream that ends well before the frame count its container
    declares (a truncated file; ``keep_partial=True`` keeps what decoded instead).
    For 8-bit YUV sources the frames are the raw luma plane; when ``clip.studio_range`` is True
    it is studio range (16..235) and :func:`expand_studio_range` maps it to 0..255.
    """
    import av
    import av.logging

    path = Path(path)
    av.logging.set_level(av.logging.ERROR)
    av.logging.set_skip_repeated(False)  # the same message for the next damaged file must not be swallowed
    with av.logging.Capture(local=False) as logs:
        try:
            container = av.open(str(path), metadata_errors="ignore")
        except av.FFmpegError as exc:
            raise DecodeError(f"FFmpeg cannot open it as a video: {_ffmpeg_reason(exc, logs)}") from None
        except (OSError, ValueError, IndexError) as exc:
            raise DecodeError(f"cannot open it as a video: {exc}") from None
    with container:
        streams = [s for s in container.streams.video if not (s.disposition & av.stream.Disposition.attached_pic)]
        if not streams:
            raise DecodeError(
                f"no video stream in the {container.format.name} container (truncated file, or not a video)"
            )
        stream = streams[0]
        if stream.codec_context is None:
            raise DecodeError(f"no decoder for the video codec of stream {stream.index}")
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        time_base = float(stream.time_base or Fraction(1, 90000))  # float: Fraction maths per frame is slow
        nominal_rate = stream.average_rate or stream.base_rate or stream.guessed_rate
        nominal_interval = float(1 / nominal_rate) if nominal_rate else 1 / 25
        declared_frames = int(stream.frames or 0)

        sampler: RealTimeSampler[Any] = RealTimeSampler(fps)
        kept: list[np.ndarray] = []
        last_obj: Any = None
        last_array: np.ndarray | None = None

        studio_range = False

        def keep(frames: list[Any]) -> None:
            nonlocal last_obj, last_array, studio_range
            for frame in frames:
                if frame is not last_obj:  # a slow source repeats a frame: convert it once
                    last_obj = frame
                    gray, studio_range = frame_to_gray(frame)
                    last_array = _rotate(gray, frame.rotation)
                kept.append(last_array)  # type: ignore[arg-type]

        n_decoded = n_corrupt = 0
        prev_time: float | None = None
        last_duration = 0.0
        error: str | None = None
        with av.logging.Capture(local=False) as logs:
            try:
                for frame in container.decode(stream):
                    time = frame.pts * time_base if frame.pts is not None else None
                    if time is None or (
                        prev_time is not None and (time <= prev_time or time - prev_time > _MAX_GAP_S)
                    ):
                        # no, non-increasing or wildly jumping timestamp (a broken or wrapped clock,
                        # not a real pause): continue at the nominal rate
                        time = (prev_time + nominal_interval) if prev_time is not None else 0.0
                    duration = frame.duration * time_base if frame.duration else 0.0
                    last_duration = duration
                    keep(sampler.push(time, frame))
                    prev_time = time
                    n_decoded += 1
                    n_corrupt += frame.is_corrupt
            except av.FFmpegError as exc:
                error = f"decoding failed after {n_decoded} frame(s): {_ffmpeg_reason(exc, logs)}"
            except (MemoryError, ValueError, RuntimeError) as exc:
                error = f"decoding failed after {n_decoded} frame(s): {exc}"
        if n_decoded == 0:
            raise DecodeError(error or f"no frames could be decoded ({stream.codec_context.name} stream)")
        if error and not keep_partial:
            raise DecodeError(error)
        if n_corrupt and not keep_partial:  # the decoder concealed damaged data in these frames
            last = _ffmpeg_reason(RuntimeError("damaged data"), logs)
            raise DecodeError(f"{n_corrupt} of {n_decoded} decoded frames are marked corrupt: {last}")
        assert prev_time is not None and sampler.t0 is not None
        if last_duration <= 0:  # no per-frame duration: the clip's average frame interval
            last_duration = (prev_time - sampler.t0) / (n_decoded - 1) if n_decoded > 1 else nominal_interval
        end_time = prev_time + last_duration
        if not keep_partial:
            _check_complete(stream, time_base, end_time, n_decoded, declared_frames, last_duration)
        keep(sampler.finish(end_time))
        return DecodedClip(
            frames=kept,
            times=sampler.kept_times,
            n_source_frames=n_decoded,
            duration_s=end_time - sampler.t0,
            extra={"codec": stream.codec_context.name, "container": container.format.name},
            studio_range=studio_range,
        )


def bare_decode(path: str | Path, *, threads: int = 0) -> int:
    """Decode every frame of ``path`` and do nothing else (the benchmark's reference loop)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        return sum(1 for _ in container.decode(stream))
