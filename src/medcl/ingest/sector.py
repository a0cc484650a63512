"""Find the ultrasound sector (the fan, or a linear probe's rectangle) and crop to it.

Exported ultrasound videos carry black borders, scanner UI, burned-in text, scales and logos
around the image. Those are static, while the ultrasound image itself moves (speckle, breathing,
probe motion). The detector therefore

1. computes, on a reduced copy (<= 128 px) of the kept frames, the per-pixel temporal standard deviation
   (motion) and mean (brightness);
2. takes the largest connected region of moving pixels (after closing small gaps and filling
   holes), with any other moving region at least 15% of its size -- text and rulers do not
   move, so they fall out;
3. grows it by the bright regions that touch it (the static near field under the transducer,
   a lit but still corner of the fan), after an opening that removes thin text strokes;
4. falls back to the largest bright region (after the same opening) when there is too little
   motion to trust: one-frame clips, stills, frozen loops.

The result is a box in source pixel coordinates ``(x0, y0, x1, y1)``, end-exclusive, recorded in
the manifest. :func:`crop_square` then crops and resizes **keeping the aspect ratio**: the box's
longer side is scaled to ``size`` and the shorter side is centred and padded with black (the
colour of the background around a fan), so anatomy is never stretched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_ANALYSIS_SIDE = 128  # detect on a copy whose longer side is at most this many pixels
_MAX_ANALYSIS_FRAMES = 64


@dataclass(frozen=True)
class CropBox:
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


def _largest_component(mask: np.ndarray, keep_fraction: float = 1.0) -> np.ndarray | None:
    """The largest connected region, plus any other at least ``keep_fraction`` of its size (a fan
    split in two by a dark band stays whole; a small moving UI element does not join)."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= keep_fraction * sizes.max()) + 1
    return np.isin(labels, keep)


def detect_sector(frames: Sequence[np.ndarray] | np.ndarray, *, margin: int = 2) -> CropBox:
    """Bounding box of the ultrasound sector in a clip's grayscale frames (see module doc)."""
    if len(frames) == 0:
        raise ValueError("detect_sector needs at least one frame")
    height, width = frames[0].shape[:2]
    step = max(1, int(np.ceil(max(height, width) / _ANALYSIS_SIDE)))
    pick = np.linspace(0, len(frames) - 1, min(len(frames), _MAX_ANALYSIS_FRAMES)).round().astype(int)
    small = np.stack([np.asarray(frames[i])[::step, ::step] for i in np.unique(pick)]).astype(np.float32)
    mean = small.mean(0)  # not smoothed: blurring would fatten text strokes past the opening
    # thresholds relative to the background's own level (exactly 0 for clean exports, a few grey
    # levels for analogue captures), not to the image's brightness: dark moving parts of the fan
    # (acoustic shadows, effusions) must stay inside the box
    bright_level = max(6.0, float(np.percentile(mean, 5)) + 6.0)
    bright = mean > bright_level
    # thin strokes (text, rulers, tick marks) are removed by an opening a few pixels wide
    opened = ndimage.binary_opening(bright, structure=np.ones((5, 5), bool))

    region: np.ndarray | None = None
    if small.shape[0] >= 3:
        motion = ndimage.uniform_filter(small.std(0), 3)
        # moving: above the background's noise, and above what compression noise does to bright
        # static text (a few grey levels on 200) -- speckle varies by 10-50% of its brightness, slow
        # scans and lit near fields still by a few percent
        moving = (motion > max(1.5, 3.0 * float(np.percentile(motion, 5)))) & (motion > 0.015 * mean)
        moving = ndimage.binary_opening(moving, structure=np.ones((3, 3), bool))
        moving = ndimage.binary_closing(moving, structure=np.ones((5, 5), bool), iterations=2)
        moving = ndimage.binary_fill_holes(moving)
        core = _largest_component(moving, keep_fraction=0.15)
        if core is not None and core.mean() > 0.03:
            labels, _ = ndimage.label(opened | core)
            touching = np.unique(labels[core])
            region = np.isin(labels, touching[touching > 0])
    if region is None:
        region = _largest_component(opened)
        if region is None or region.mean() < 0.02:
            region = _largest_component(bright)
    if region is None or region.mean() < 0.01:
        return CropBox(0, 0, width, height)

    rows = np.flatnonzero(region.any(1))
    cols = np.flatnonzero(region.any(0))
    y0 = max(0, rows[0] * step - margin)
    y1 = min(height, (rows[-1] + 1) * step + margin)
    x0 = max(0, cols[0] * step - margin)
    x1 = min(width, (cols[-1] + 1) * step + margin)
    if (y1 - y0) * (x1 - x0) < 0.02 * height * width:
        return CropBox(0, 0, width, height)
    return CropBox(int(x0), int(y0), int(x1), int(y1))


def crop_square(frame: np.ndarray, box: CropBox, size: int, lut: Sequence[int] | None = None) -> np.ndarray:
    """Crop ``frame`` to ``box`` and fit it into a black ``size`` x ``size`` square, keeping the
    aspect ratio (longer side scaled to ``size``, shorter side centred). ``lut`` (256 values) is
    applied to the resized pixels (cheaper there than on the full-resolution frame)."""
    from PIL import Image

    crop = np.ascontiguousarray(frame[box.y0 : box.y1, box.x0 : box.x1])
    h, w = crop.shape
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    # reducing_gap=1: an integer box reduction as far as it goes, then antialiased bilinear for the
    # rest (half the cost of reducing_gap=2, the largest single cost of ingest after decoding)
    image = Image.fromarray(crop).resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=1.0)
    if lut is not None:
        image = image.point(list(lut))
    resized = np.asarray(image)
    out = np.zeros((size, size), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out
