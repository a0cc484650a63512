"""Reading segmentation files: 2D images and masks, 3D volumes and label maps.

The one reader behind MixCL pretraining (:mod:`medcl.data.pool`) and segmentation fine-tuning
(:mod:`medcl.data.seg_manifest`): a pretrained encoder sees fine-tuning images exactly as it saw
pretraining images. Callers keep their own label semantics (global ids, label maps).

2D (PNG, JPEG, BMP, TIFF)
    Images become single-channel float32 ``[H, W]`` in [0, 1]: 8-bit grey levels / 255 (colour is
    converted to luminance), 16- and 32-bit images min-max scaled. Masks become int64 ``[H, W]``:
    binarised (grey level ``>= threshold`` -> 1, robust to JPEG noise) or raw values (a palette
    image's indices, the class ids of an indexed PNG; a 1-bit mask reads 0 / 255). ``size``
    resizes with PIL on the stored pixels: bilinear (antialiased when shrinking) for the image,
    nearest for the mask.

3D (NIfTI)
    :func:`read_volume` loads with MONAI (LoadImage, EnsureChannelFirst, Orientation to RAS,
    optional Spacing: bilinear image, nearest label), picks one ``channel`` of a 4D image
    ``[X, Y, Z, C]`` (several MRI modalities), scales intensities to [0, 1] with a ``window``
    (clip to [lo, hi], e.g. [-150, 250] HU for CT as in MixCL) or, without one, the volume's
    ``percentiles`` (robust to a few extreme voxels, as in MRI; (0, 100) is min-max), and
    optionally resamples to a fixed grid ``size`` (trilinear image, nearest label).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# 3D volumes without an intensity window: clip to these percentiles of the volume, scale to [0, 1]
PERCENTILES = (0.5, 99.5)


# --------------------------------------------------------------------------------------------
# 2D
# --------------------------------------------------------------------------------------------


def _open(path: str | Path, kind: str) -> Image.Image:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{kind} file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
    except OSError as exc:
        raise OSError(f"{path}: cannot read {kind} ({exc})") from None
    return im


def _pil_size(size: Sequence[int]) -> tuple[int, int]:
    return int(size[1]), int(size[0])  # [H, W] -> PIL's (width, height)


def _image_array(im: Image.Image, size: Sequence[int] | None) -> np.ndarray:
    if im.mode not in ("L", "I;16", "I"):
        im = im.convert("L")
    if im.mode == "L":
        if size is not None:  # resize the stored 8-bit pixels, then scale (fine-tuning's numbers)
            im = im.resize(_pil_size(size), Image.BILINEAR)
        return np.asarray(im, dtype=np.float32) / 255.0
    array = np.asarray(im).astype(np.float32)
    low, high = float(array.min()), float(array.max())
    array = (array - low) / (high - low) if high > low else np.zeros_like(array)
    if size is not None:
        array = np.asarray(Image.fromarray(array).resize(_pil_size(size), Image.BILINEAR))
    return array


def _mask_array(im: Image.Image, threshold: int | None, size: Sequence[int] | None) -> np.ndarray:
    if im.mode not in ("L", "I;16", "I") and not (im.mode == "P" and threshold is None):
        im = im.convert("L")
    if size is not None:
        im = im.resize(_pil_size(size), Image.NEAREST)
    array = np.asarray(im)
    if threshold is not None:
        return (array >= threshold).astype(np.int64)
    return array.astype(np.int64)


def read_image(path: str | Path, size: Sequence[int] | None = None) -> np.ndarray:
    """Grayscale image -> float32 ``[H, W]`` in [0, 1] (``size`` ``[H, W]``: resized, bilinear)."""
    return _image_array(_open(path, "image"), size)


def read_mask(path: str | Path, threshold: int | None = 128, size: Sequence[int] | None = None) -> np.ndarray:
    """Mask -> int64 ``[H, W]``: binarised (``>= threshold`` -> 1) or raw values (threshold None)."""
    return _mask_array(_open(path, "mask"), threshold, size)


def read_image_and_mask(image_path: str | Path, mask_path: str | Path | None, threshold: int | None = 128,
                        size: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(image [H, W] float32, mask [H, W] int64)``, checked to match before any resize.

    No mask (``mask_path`` None): all zeros."""
    image = _open(image_path, "image")
    if mask_path is None:
        array = _image_array(image, size)
        return array, np.zeros(array.shape, dtype=np.int64)
    mask = _open(mask_path, "mask")
    if mask.size != image.size:
        raise ValueError(f"{mask_path}: mask shape {mask.size[::-1]} != image shape {image.size[::-1]} ({image_path})")
    return _image_array(image, size), _mask_array(mask, threshold, size)


# --------------------------------------------------------------------------------------------
# 3D
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _geometry(spacing: tuple[float, ...] | None, has_label: bool) -> Any:
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    keys = ["image", "label"] if has_label else ["image"]
    steps: list[Any] = [
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if spacing is not None:
        steps.append(Spacingd(keys, pixdim=spacing, mode=("bilinear", "nearest")[: len(keys)]))
    return Compose(steps)


def _scale_intensity(image: np.ndarray, window: Sequence[float] | None = None,
                    percentiles: Sequence[float] = PERCENTILES) -> np.ndarray:
    """Clip to ``window`` (or to the array's ``percentiles`` without one) and scale to [0, 1].

    A (near-)constant array whose percentiles coincide falls back to its min-max range (MONAI's
    ScaleIntensityRange would return the values unscaled there, outside [0, 1])."""
    if window is not None:
        low, high = window
    else:
        low, high = (float(v) for v in np.percentile(image, percentiles))
        if high <= low:
            low, high = float(image.min()), float(image.max())
    return (np.clip(image, low, high) - low) / max(high - low, 1e-6)


def _resize_volume(image: np.ndarray, label: np.ndarray, size: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    import torch
    import torch.nn.functional as F

    image = F.interpolate(torch.from_numpy(image)[None], size=size, mode="trilinear", align_corners=False)[0]
    label = F.interpolate(torch.from_numpy(label)[None, None].float(), size=size, mode="nearest")[0, 0]
    return image.numpy(), label.long().numpy()


def read_volume(
    image_path: str | Path,
    label_path: str | Path | None = None,
    *,
    spacing: Sequence[float] | None = None,
    window: Sequence[float] | None = None,
    percentiles: Sequence[float] = PERCENTILES,
    channel: int | None = None,
    size: Sequence[int] | None = None,
    how_to_choose_channel: str = "channel=K (0-based)",
) -> tuple[np.ndarray, np.ndarray]:
    """``(image [1, X, Y, Z] float32 in [0, 1], label [X, Y, Z] int64)`` in RAS orientation.

    ``spacing`` (mm) resamples before intensity scaling; ``window`` or ``percentiles`` scale (see
    the module doc); ``channel`` picks one channel of a multi-channel image (required there);
    ``size`` resamples to that grid last. ``how_to_choose_channel`` completes the error for a
    multi-channel image without ``channel`` (the caller's flag or option name). No label: zeros.
    """
    for path in (image_path, label_path):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"volume file not found: {path}")
    has_label = label_path is not None
    data = {"image": str(image_path), **({"label": str(label_path)} if has_label else {})}
    try:
        out = _geometry(tuple(spacing) if spacing is not None else None, has_label)(data)
    except Exception as exc:  # noqa: BLE001 - name the files in any loading error
        raise RuntimeError(f"cannot load volume {image_path} / {label_path}: {exc}") from exc
    image = np.asarray(out["image"], dtype=np.float32)
    channels = image.shape[0]
    if channel is None and channels > 1:
        raise ValueError(f"{image_path}: {channels} channels (e.g. several MRI modalities) but one is read;"
                         f" choose it with {how_to_choose_channel}")
    if channel is not None:
        if not 0 <= int(channel) < channels:
            raise ValueError(f"{image_path}: channel {channel} asked but the image has {channels} channels")
        image = image[int(channel) : int(channel) + 1]
    if has_label:
        label = np.rint(np.asarray(out["label"])[0]).astype(np.int64)
        if label.shape != image.shape[1:]:
            raise ValueError(f"{label_path}: label shape {label.shape} != image shape {image.shape[1:]} ({image_path})")
    else:
        label = np.zeros(image.shape[1:], dtype=np.int64)
    image = _scale_intensity(image, window, percentiles)
    if size is not None and tuple(size) != label.shape:
        image, label = _resize_volume(image, label, tuple(int(s) for s in size))
    return image.astype(np.float32), label
