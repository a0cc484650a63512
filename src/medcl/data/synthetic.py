"""Synthetic lung-ultrasound-like videos: the embedded default data for the demo and the tests.

Every video is generated in code (no files shipped): a convex fan on a black background with
Rayleigh speckle that decorrelates slowly over time, depth attenuation, chest-wall layers, a
pleural line that slides with breathing, and one of three class patterns:

* ``regular``   -- A-lines: horizontal reverberations of the pleural line at multiples of its depth;
* ``covid``     -- B-lines: bright radial comet tails from the pleura to the bottom of the fan,
  sliding with the pleura, and an irregular, fragmented pleural line;
* ``pneumonia`` -- a hypoechoic, tissue-like consolidation under the pleura with bright moving
  air bronchograms, sometimes under an anechoic effusion.

Nothing about a class sits at a fixed pixel: depth, gain, attenuation, fan position and angle,
frame size, frame rate, length and pattern strength vary per video, and the patterns overlap
(healthy lungs sometimes show one faint B-line, B-line lungs sometimes faint A-lines), so the
classes are learnable but not trivially. Several videos come from each synthetic patient, who
has one diagnosis and a few traits (chest-wall thickness, gain, attenuation) shared by all of
their videos -- so a split that leaks patients is measurably optimistic, like with real data.
Burned-in text (a fake scanner header and a depth scale) sits outside the fan, the way real
exports carry UI text, to exercise sector cropping.

>>> frames, info = synthetic_video_frames("covid", seed=0, size=128)   # doctest: +SKIP
>>> write_synthetic_videos("synth/", n_videos=36, seed=0)             # doctest: +SKIP
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from scipy import ndimage

CLASSES: tuple[str, ...] = ("covid", "pneumonia", "regular")
METADATA_NAME = "metadata.csv"
METADATA_COLUMNS = [
    "file", "label", "patient_id", "fps", "n_frames", "duration_s", "width", "height", "depth_cm", "seed",
]
_FRAME_RATES = (10, 12, 15, 20, 25, 30)


@dataclass
class PatientTraits:
    """Properties shared by every video of one synthetic patient."""

    patient_id: str
    label: str
    chest_wall_cm: float  # skin-to-pleura distance
    gain: float
    attenuation_db_cm: float


@dataclass
class SyntheticVideoInfo:
    """What was drawn for one video (written to ``metadata.csv``)."""

    label: str
    patient_id: str
    fps: int
    n_frames: int
    width: int
    height: int
    depth_cm: float
    seed: int

    @property
    def duration_s(self) -> float:
        return self.n_frames / self.fps


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 48 or size % 2:
        raise ValueError(f"size must be an even integer >= 48 (mp4 needs even sides), got {size!r}")


def random_patient(label: str, patient_id: str, rng: np.random.Generator) -> PatientTraits:
    if label not in CLASSES:
        raise ValueError(f"unknown synthetic class {label!r}; expected one of {CLASSES}")
    return PatientTraits(
        patient_id=patient_id,
        label=label,
        chest_wall_cm=float(rng.uniform(1.0, 2.4)),
        gain=float(rng.uniform(0.75, 1.3)),
        attenuation_db_cm=float(rng.uniform(0.35, 0.8)),
    )


def _smooth_complex_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float]) -> np.ndarray:
    re = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    im = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    z = re + 1j * im
    return z / np.sqrt(np.mean(np.abs(z) ** 2))


def _burned_in_text(height: int, width: int, lines: list[tuple[int, int, str]]) -> np.ndarray:
    from PIL import Image, ImageDraw

    layer = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(layer)
    for x, y, text in lines:
        draw.text((x, y), text, fill=200)
    return np.asarray(layer, dtype=np.float32) / 255.0


def synthetic_video_frames(
    label: str,
    *,
    seed: int = 0,
    size: int = 128,
    patient: PatientTraits | None = None,
    fps: int | None = None,
    n_frames: int | None = None,
    width: int | None = None,
) -> tuple[np.ndarray, SyntheticVideoInfo]:
    """Generate one synthetic lung-ultrasound clip in memory.

    Returns ``(frames, info)``: frames are uint8 ``[n_frames, size, width]`` (grayscale; width is
    ``size`` plus a random even margin unless given). Anything not given is drawn from ``seed``.
    """
    _check_size(size)
    rng = np.random.default_rng(seed)
    if patient is None:
        patient = random_patient(label, "p0", rng)
    elif patient.label != label:
        raise ValueError(f"patient {patient.patient_id!r} has label {patient.label!r}, video asked for {label!r}")
    fps = int(fps if fps is not None else rng.choice(_FRAME_RATES))
    if n_frames is None:
        n_frames = max(2, int(round(fps * rng.uniform(1.5, 3.5))))
    if width is None:
        width = size + 2 * int(rng.integers(0, size // 8 + 1))
    if width % 2 or width < size // 2:
        raise ValueError(f"width must be even and >= size/2, got {width}")
    height = size

    # --- geometry of the convex fan (pixel units) ---
    top_margin = rng.uniform(0.07, 0.13) * height
    bottom = rng.uniform(0.86, 0.97) * height
    depth_px = bottom - top_margin
    half_angle = math.radians(rng.uniform(28, 40))
    r0 = rng.uniform(0.35, 0.6) * height  # transducer curvature radius
    r1 = r0 + depth_px
    half_angle = min(half_angle, math.asin(min(0.98, (width / 2 - 3) / r1)))
    apex_x = width / 2 + rng.uniform(-0.05, 0.05) * width
    apex_x = float(np.clip(apex_x, r1 * math.sin(half_angle) + 2, width - r1 * math.sin(half_angle) - 2))
    apex_y = top_margin - r0
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = np.hypot(xx - apex_x, yy - apex_y)
    angle = np.arctan2(xx - apex_x, yy - apex_y)  # 0 straight down, positive to the right
    edge_soft = 1.2
    fan = (
        np.clip((radius - r0) / edge_soft + 0.5, 0, 1)
        * np.clip((r1 - radius) / edge_soft + 0.5, 0, 1)
        * np.clip((half_angle - np.abs(angle)) * radius / edge_soft + 0.5, 0, 1)
    ).astype(np.float32)

    depth_cm = float(rng.uniform(8.0, 16.0))
    px_per_cm = depth_px / depth_cm
    depth = np.clip(radius - r0, 0, None) / px_per_cm  # cm below the skin
    chest_wall_cm = patient.chest_wall_cm * rng.uniform(0.9, 1.1)
    r_pleura = r0 + chest_wall_cm * px_per_cm
    pleura_sigma = rng.uniform(0.6, 1.1) * max(1.0, height / 160)

    # --- static echogenicity of the chest wall: skin, fat, striated muscle ---
    wall = np.zeros((height, width), np.float32)
    d_rel = depth / chest_wall_cm
    wall += 0.9 * np.exp(-((depth * px_per_cm) ** 2) / 4.0)  # skin / transducer contact
    wall += np.where(d_rel < 0.35, 0.18, 0.0) + np.where((d_rel >= 0.35) & (d_rel < 0.95), 0.32, 0.0)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * depth * rng.uniform(3, 6) + rng.uniform(0, 6.3))
    wall += np.where((d_rel >= 0.35) & (d_rel < 0.95), 0.18 * stripes, 0.0)
    wall *= radius < r_pleura

    below = radius > r_pleura + 1.5 * pleura_sigma
    lung_floor = 0.025 + 0.03 * rng.random()

    # class-pattern parameters, deliberately overlapping between classes
    a_line_strength = {"regular": rng.uniform(0.45, 0.9), "covid": rng.uniform(0, 0.3) * (rng.random() < 0.4),
                       "pneumonia": rng.uniform(0, 0.25) * (rng.random() < 0.3)}[label]
    if label == "covid":
        n_b_lines = int(rng.integers(2, 6))
    elif label == "regular":
        n_b_lines = int(rng.random() < 0.25)
    else:
        n_b_lines = int(rng.random() < 0.3)
    b_strength = rng.uniform(0.55, 1.0) if label == "covid" else rng.uniform(0.2, 0.45)
    b_angles = rng.uniform(-0.8, 0.8, n_b_lines) * half_angle
    b_widths = rng.uniform(0.012, 0.03, n_b_lines) * (160 / height) ** 0.3
    pleura_fragmentation = rng.uniform(0.5, 0.9) if label == "covid" else rng.uniform(0.0, 0.25)

    # pneumonia: consolidation (and sometimes an effusion above it) under the pleura
    consolidation = np.zeros((height, width), np.float32)
    effusion = np.zeros((height, width), np.float32)
    bronchogram_phase = rng.uniform(0, 2 * np.pi, 12)
    bronchogram_pos = np.stack([rng.uniform(-0.7, 0.7, 12), rng.uniform(0.15, 0.85, 12)], 1)
    if label == "pneumonia":
        c_angle = rng.uniform(-0.5, 0.5) * half_angle
        c_half_width = rng.uniform(0.3, 0.6) * half_angle
        c_depth = rng.uniform(0.25, 0.6) * (r1 - r_pleura)
        has_effusion = rng.random() < 0.4
        eff_thick = rng.uniform(0.08, 0.2) * (r1 - r_pleura) if has_effusion else 0.0
        bumps = ndimage.gaussian_filter1d(rng.standard_normal(256), 12, mode="wrap")
        bumps /= np.abs(bumps).max() + 1e-6
        idx = ((angle - c_angle) / (2 * c_half_width) * 128 + 128).astype(int).clip(0, 255)
        lateral = np.clip(1 - np.abs(angle - c_angle) / c_half_width, 0, 1) ** 0.5
        extent = c_depth * lateral * (1 + 0.25 * bumps[idx])
        rel = radius - r_pleura - 1.5 * pleura_sigma
        effusion = ((rel > 0) & (rel < eff_thick * lateral)).astype(np.float32)
        consolidation = ((rel >= eff_thick * lateral) & (rel < eff_thick * lateral + extent)).astype(np.float32)
        consolidation = ndimage.gaussian_filter(consolidation, 1.5)
        effusion = ndimage.gaussian_filter(effusion, 1.0)
        bronchogram_pos[:, 0] = c_angle + bronchogram_pos[:, 0] * c_half_width
        bronchogram_pos[:, 1] = r_pleura + eff_thick + bronchogram_pos[:, 1] * c_depth * 0.9

    # --- shading, motion and speckle parameters ---
    attenuation = np.power(10.0, -patient.attenuation_db_cm * depth * rng.uniform(0.8, 1.2) / 20 * 2).astype(np.float32)
    tgc = 1 + 0.6 * rng.random() * np.clip(depth / depth_cm, 0, 1)  # partial time-gain compensation
    gain = patient.gain * rng.uniform(0.85, 1.15)
    shading = (attenuation * tgc * gain).astype(np.float32)
    breath_period = rng.uniform(2.5, 4.5)
    breath_phase = rng.uniform(0, 2 * np.pi)
    slide_amp = rng.uniform(0.01, 0.035) * (0.5 if label == "pneumonia" else 1.0)

    # Everything that slides with the pleura is a function of the angle only: tabulate it on a
    # fine angular grid once, and per frame shift the table instead of recomputing images.
    n_bins = 1024
    bin_width = 4 * half_angle / n_bins  # the grid covers twice the fan so shifts never wrap into view
    grid = (np.arange(n_bins) - n_bins / 2) * bin_width
    base_idx = np.clip(np.round(angle / bin_width + n_bins / 2), 0, n_bins - 1).astype(np.intp)
    pleura_texture = ndimage.gaussian_filter1d(rng.standard_normal(n_bins), 3.0, mode="wrap")
    pleura_gaps = ndimage.gaussian_filter1d(rng.standard_normal(n_bins), 9.0, mode="wrap")
    pleura_gaps = pleura_gaps / (np.abs(pleura_gaps).max() + 1e-6)
    pleura_mod_table = (1 + 0.3 * pleura_texture) * (1 - pleura_fragmentation * np.clip(pleura_gaps * 1.5, 0, 1))
    thick_table = pleura_sigma * (1 + 1.2 * pleura_fragmentation * np.clip(-pleura_gaps, 0, 1))
    b_table = np.zeros(n_bins)
    for b_angle, b_width in zip(b_angles, b_widths):
        b_table += b_strength * np.exp(-((grid - b_angle) ** 2) / (2 * b_width**2))
    b_gain = (below / np.maximum(attenuation, 1e-3) ** 0.7).astype(np.float32)  # comet tails barely attenuate
    band = np.flatnonzero((np.abs(radius - r_pleura) < 6 * thick_table.max()) & (radius > r0))
    band_radius_d2 = ((radius.ravel()[band] - r_pleura) ** 2).astype(np.float32)
    band_idx = base_idx.ravel()[band]

    # static echoes: chest wall, lung floor, A-lines (horizontal reverberations do not slide)
    static_lung = lung_floor * below.astype(np.float32)
    for k in range(1, 4):
        r_k = r0 + (k + 1) * (r_pleura - r0)
        static_lung += a_line_strength * 0.7**k * np.exp(-((radius - r_k) ** 2) / (2 * (1.3 * pleura_sigma) ** 2))
    keep_lung = (1 - consolidation) * (1 - effusion)
    static_echo = (wall + static_lung * keep_lung + 0.42 * consolidation + 0.01 * effusion).astype(np.float32)

    # speckle: smoothed complex Gaussian noise evolving as AR(1); innovations are random
    # circular shifts of two pre-smoothed fields (shifting a stationary field keeps its statistics)
    sigma_speckle = (0.6 * height / 160, 1.4 * height / 160)
    pool = [_smooth_complex_noise(rng, (height, width), sigma_speckle).astype(np.complex64) for _ in range(2)]
    z = _smooth_complex_noise(rng, (height, width), sigma_speckle).astype(np.complex64)
    rho = rng.uniform(0.85, 0.95)  # frame-to-frame speckle correlation
    innovation_scale = math.sqrt(1 - rho**2)

    text = _burned_in_text(
        height,
        width,
        [
            (2, 1, f"LUS {int(rng.integers(1, 9))}C{int(rng.integers(1, 6))}"),
            (max(2, width - 44), 1, f"{depth_cm:4.1f}cm"),
            (2, height - 11, f"G{int(gain * 50)} F{int(rng.integers(2, 6))}"),
        ],
    )
    scale_x = int(min(width - 3, apex_x + r1 * math.sin(half_angle) + 3))
    for cm in range(0, int(depth_cm) + 1, 2):
        y = int(top_margin + cm * px_per_cm)
        if 0 <= y < height and scale_x < width - 1:
            text[y, scale_x : scale_x + 2] = 0.8
    text *= fan < 0.05

    frames = np.empty((n_frames, height, width), np.uint8)
    compress = rng.uniform(25, 60)
    log_norm = 1.0 / math.log1p(compress * 1.6)
    spot_half = 5
    for t in range(n_frames):
        time_s = t / fps
        slide = slide_amp * math.sin(2 * math.pi * time_s / breath_period + breath_phase)
        shift = int(round(slide / bin_width))  # the lung and its artefacts move with the pleura
        innovation = np.roll(pool[t % 2], (int(rng.integers(height)), int(rng.integers(width))), axis=(0, 1))
        z = rho * z + innovation_scale * innovation
        speckle = np.abs(z)

        echo = static_echo.copy()
        if n_b_lines:
            echo += np.roll(b_table, shift)[base_idx] * b_gain * keep_lung
        band_table = np.roll(pleura_mod_table, shift)[band_idx]
        band_thick = np.roll(thick_table, shift)[band_idx]
        echo.ravel()[band] += 1.4 * band_table * np.exp(-band_radius_d2 / (2 * band_thick**2))
        if label == "pneumonia":
            for (ba, br), ph in zip(bronchogram_pos[:8], bronchogram_phase):
                r = br + 1.5 * math.sin(2 * math.pi * time_s / breath_period + ph)
                cx, cy = apex_x + r * math.sin(ba + slide), apex_y + r * math.cos(ba + slide)
                x0, y0 = int(cx) - spot_half, int(cy) - spot_half
                xs, ys = slice(max(0, x0), max(0, x0 + 2 * spot_half + 1)), slice(max(0, y0), max(0, y0 + 2 * spot_half + 1))
                patch_y, patch_x = yy[ys, xs], xx[ys, xs]
                spot = np.exp(-((patch_x - cx) ** 2 + (patch_y - cy) ** 2) / 3.0)
                echo[ys, xs] += 0.9 * spot * consolidation[ys, xs]

        image = np.log1p(compress * echo * shading * speckle) * log_norm
        image = np.clip(image, 0, 1) * fan + text
        image = image * 255 + rng.standard_normal(image.shape, dtype=np.float32) * 1.5
        frames[t] = np.clip(image, 0, 255).astype(np.uint8)

    info = SyntheticVideoInfo(label, patient.patient_id, fps, n_frames, width, height, round(depth_cm, 2), int(seed))
    return frames, info


def write_mp4(path: str | Path, frames: np.ndarray, fps: int | float | Fraction, *, crf: int = 20) -> None:
    """Encode uint8 grayscale frames ``[n, H, W]`` (even H, W) as H.264 mp4 (MPEG-4 part 2 when
    libx264 is missing)."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 frames [n, H, W], got {frames.dtype} {frames.shape}")
    n, height, width = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"{path}: mp4 (yuv420p) needs even frame sides, got {height}x{width}")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        if "libx264" in av.codecs_available:
            stream = container.add_stream("libx264", rate=rate)
            stream.options = {"crf": str(crf), "preset": "ultrafast"}
        else:  # pragma: no cover - depends on the FFmpeg build
            stream = container.add_stream("mpeg4", rate=rate)
            stream.bit_rate = 2_000_000
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frames[i], format="gray").reformat(format="yuv420p")
            frame.pts = i
            frame.time_base = Fraction(1) / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_synthetic_videos(
    out_dir: str | Path,
    n_videos: int = 36,
    seed: int = 0,
    size: int = 128,
    *,
    videos_per_patient: int = 3,
    classes: tuple[str, ...] = CLASSES,
) -> Path:
    """Write ``n_videos`` synthetic lung-ultrasound mp4 files and ``metadata.csv`` into ``out_dir``.

    Patients get ``videos_per_patient`` videos each (the last one may get fewer) and one class,
    assigned round-robin so the classes stay balanced. ``metadata.csv`` has the columns
    ``file, label, patient_id, fps, n_frames, duration_s, width, height, depth_cm, seed`` and
    is what ``medcl ingest OUT_DIR INGESTED --metadata OUT_DIR/metadata.csv`` reads.
    Returns the path of ``metadata.csv``.
    """
    _check_size(size)
    if n_videos < 1:
        raise ValueError(f"n_videos must be >= 1, got {n_videos}")
    if videos_per_patient < 1:
        raise ValueError(f"videos_per_patient must be >= 1, got {videos_per_patient}")
    for label in classes:
        if label not in CLASSES:
            raise ValueError(f"unknown synthetic class {label!r}; expected a subset of {CLASSES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = np.random.SeedSequence(seed)
    n_patients = math.ceil(n_videos / videos_per_patient)
    patient_seeds = root.spawn(n_patients)
    rows: list[dict[str, object]] = []
    video_index = 0
    for p in range(n_patients):
        prng = np.random.default_rng(patient_seeds[p])
        label = classes[p % len(classes)]
        patient = random_patient(label, f"synth{p:03d}", prng)
        for v in range(videos_per_patient):
            if video_index >= n_videos:
                break
            video_seed = int(prng.integers(0, 2**31 - 1))
            frames, info = synthetic_video_frames(label, seed=video_seed, size=size, patient=patient)
            name = f"{patient.patient_id}_v{v}.mp4"
            tmp = out / (name + ".tmp.mp4")
            write_mp4(tmp, frames, info.fps)
            tmp.replace(out / name)
            row = asdict(info)
            row.update(file=name, duration_s=round(info.duration_s, 3))
            rows.append({k: row[k] for k in METADATA_COLUMNS})
            video_index += 1
    metadata = out / METADATA_NAME
    tmp = out / (METADATA_NAME + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METADATA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(metadata)
    return metadata
