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

Files are read by :mod:`medcl.data.segfiles` (as segmentation fine-tuning reads them): images as
single-channel float32 in [0, 1] (colour images are converted to luminance); masks as local label
values (binary masks: pixel >= ``threshold`` -> 1, robust to JPEG noise).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from medcl.data.segfiles import read_image, read_image_and_mask, read_mask  # noqa: F401  (this module's readers)
from medcl.data.segtypes import SegItem, SegSource

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def load_image_and_mask(item: SegItem, source: SegSource) -> tuple[np.ndarray, np.ndarray]:
    """``(image [1, H, W] float32, local mask [H, W] int64)``; no mask -> all zeros."""
    image, mask = read_image_and_mask(item.image, item.mask, source.options.get("threshold", 128))
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
