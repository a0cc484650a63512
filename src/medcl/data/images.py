"""2D images + masks (PNG/JPEG): readers and source adapters for the ultrasound segmentation sets.

Each adapter returns a :class:`medcl.data.pool.SegSource` (see there for the label semantics):

- :func:`busbra_source`: BUS-BRA breast lesions, ``images/<id>.jpg`` + ``masks/<id>.png``,
  patient = ``Case`` of ``bus_data.csv``; class ``lesion``.
- :func:`hc18_source`: HC18 fetal head, ``images/*.jpg`` + ``masks/*.png``; class ``head``.
- :func:`tg3k_source`: TG3K thyroid, ``{train,val,test}/images`` + ``masks``; class ``thyroid``.
- :func:`ctrus_source`: C-TRUS colon wall, ``images`` + ``masks``, patient from ``c-trus.csv``;
  class ``colon_wall``. Empty masks (frames where the wall is absent) count as annotated: the
  annotator looked and found no wall, so their background is a confident negative.
- :func:`image_folder_source`: any "folder of images + folder of masks" (matched by file stem)
  for users' own data, with a mask-value -> class-name map or a binarising threshold.

Images are read as single-channel float32 in [0, 1] (colour images are converted to luminance);
masks as local label values (binary masks: pixel >= ``threshold`` -> 1, robust to JPEG noise).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medcl.data.pool import SegItem, SegSource

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def read_image(path: str | Path) -> np.ndarray:
    """Grayscale image -> float32 ``[H, W]`` in [0, 1]."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("L") if im.mode not in ("L", "I;16", "I") else im)
    except OSError as exc:
        raise OSError(f"{path}: cannot read image ({exc})") from None
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def read_mask(path: str | Path, threshold: int | None = 128) -> np.ndarray:
    """Mask -> int64 ``[H, W]``: binarised (``>= threshold`` -> 1) or raw values (threshold None)."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("L") if im.mode in ("RGB", "RGBA", "P", "LA") else im)
    except OSError as exc:
        raise OSError(f"{path}: cannot read mask ({exc})") from None
    if threshold is not None:
        return (array >= threshold).astype(np.int64)
    return array.astype(np.int64)


def load_image_and_mask(item: SegItem, source: SegSource) -> tuple[np.ndarray, np.ndarray]:
    """``(image [1, H, W] float32, local mask [H, W] int64)``; no mask -> all zeros."""
    image = read_image(item.image)
    if item.mask is None:
        return image[None], np.zeros(image.shape, dtype=np.int64)
    mask = read_mask(item.mask, source.options.get("threshold", 128))
    if mask.shape != image.shape:
        raise ValueError(f"{item.mask}: mask shape {mask.shape} != image shape {image.shape} ({item.image})")
    return image[None], mask


def _paired(images_dir: Path, masks_dir: Path, mask_suffix: str | None = None) -> list[tuple[Path, Path]]:
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {images_dir}")
    if not masks_dir.is_dir():
        raise FileNotFoundError(f"mask folder not found: {masks_dir}")
    masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    pairs, missing = [], []
    for image in sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        stem = image.stem + (mask_suffix or "")
        if stem in masks:
            pairs.append((image, masks[stem]))
        else:
            missing.append(image.name)
    if missing:
        raise FileNotFoundError(f"{masks_dir}: no mask for {len(missing)} image(s), e.g. {missing[:3]}")
    return pairs


def _binary_source(name: str, cls: str, pairs: list[tuple[Path, Path]], patients: dict[str, str] | None = None) -> SegSource:
    items = [
        SegItem(image=str(img), mask=str(msk), annotated=(cls,), case_id=img.stem,
                patient_id=(patients or {}).get(img.stem, img.stem))
        for img, msk in pairs
    ]
    return SegSource(name=name, spatial_dims=2, classes={1: cls}, items=items)


def busbra_source(root: Path, name: str = "busbra") -> SegSource:
    patients = {}
    table = root / "bus_data.csv"
    if table.is_file():
        with table.open(newline="") as handle:
            patients = {row["ID"]: f"case{row['Case']}" for row in csv.DictReader(handle)}
    return _binary_source(name, "lesion", _paired(root / "images", root / "masks"), patients)


def hc18_source(root: Path, name: str = "hc18") -> SegSource:
    return _binary_source(name, "head", _paired(root / "images", root / "masks"))


def tg3k_source(root: Path, name: str = "tg3k", splits: tuple[str, ...] | list[str] = ("train", "val", "test")) -> SegSource:
    pairs = []
    for split in splits:
        pairs += _paired(root / split / "images", root / split / "masks")
    return _binary_source(name, "thyroid", pairs)


def ctrus_source(root: Path, name: str = "ctrus") -> SegSource:
    patients = {}
    table = root / "c-trus.csv"
    if table.is_file():
        with table.open(newline="") as handle:
            patients = {Path(row["file"]).stem: f"patient{row['patient']}" for row in csv.DictReader(handle)}
    return _binary_source(name, "colon_wall", _paired(root / "images", root / "masks"), patients)


def image_folder_source(
    root: Path,
    name: str = "images",
    images: str = "images",
    masks: str = "masks",
    classes: dict[Any, str] | None = None,
    threshold: int | None = 128,
    mask_suffix: str | None = None,
) -> SegSource:
    """Generic adapter: ``root/images/<stem>.*`` with ``root/masks/<stem><mask_suffix>.*``.

    ``threshold`` set (default 128): binary masks, class ``classes[1]`` (default ``foreground``).
    ``threshold: null``: multi-class masks whose raw values are the keys of ``classes``
    (e.g. ``{1: liver, 2: tumour}``). Every listed class counts as annotated on every image.
    """
    classes = {int(k): str(v) for k, v in (classes or {}).items()}
    if threshold is not None:
        classes = {1: classes.get(1, next(iter(classes.values()), "foreground"))}
    elif not classes:
        raise ValueError(f"image_folder {root}: multi-class masks (threshold null) need classes {{value: name}}")
    pairs = _paired(root / images, root / masks, mask_suffix)
    items = [SegItem(image=str(i), mask=str(m), annotated=tuple(classes.values()), case_id=i.stem, patient_id=i.stem)
             for i, m in pairs]
    return SegSource(name=name, spatial_dims=2, classes=classes, items=items, options={"threshold": threshold})
