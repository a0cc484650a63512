"""A pool of segmentation datasets whose label sets differ, in one global label space (MixCL).

MixCL pretrains on many datasets at once: one labels the breast lesion, another the fetal head,
another only some of seven head-and-neck organs per patient. This module puts them in one
global label space and keeps track of what was annotated where.

Sources and items
    A :class:`SegSource` is one dataset: a name, its local label map (mask value -> class name)
    and :class:`SegItem` s (image, mask, the classes annotated on that item, patient id); both are
    defined in :mod:`medcl.data.segtypes` and importable from here. The adapters that build
    sources live in :mod:`medcl.data.images` (2D: busbra, hc18, tg3k, ctrus, image_folder) and
    :mod:`medcl.data.volumes` (3D: openkbp, nifti_pairs); :data:`ADAPTERS` names them for configs.
    Both read files with :mod:`medcl.data.segfiles`, as segmentation fine-tuning does.

Global label space
    Class ``"<source>/<class>"`` (``"busbra/lesion"``, ``"openkbp/Mandible"``) gets global id
    1..K in source order; id 0 is ``BACKGROUND``.

Label 0 is NOT a confident negative (the rule every consumer must follow)
    In a pooled set, 0 in a mask means "background OR a class that was not annotated here": an
    OpenKBP patient without a contoured mandible has label 0 on their mandible, and a breast
    ultrasound has label 0 on everything that is not the lesion. So each sample carries
    ``annotated``: a bool vector over the K + 1 global ids, True for the classes annotated on that
    sample (column 0 is always True). A label-0 pixel is known NOT to be class c only when
    ``annotated[c]`` is True. :class:`medcl.losses.pixel_contrast.PixelContrastLoss` uses exactly
    this: background pixels are negatives only for annotated classes, background-background
    pairs are ignored. For supervised segmentation, restrict to items (or classes) where every
    trained class is annotated, or mask the loss for unannotated classes.
    ``IGNORE_INDEX`` (-1) marks pixels with no label at all: padding outside the image after crops
    or rotations, and mask values of a class that the item does not list as annotated (they are
    not trusted). A mask value that is not in the source's label map is an error naming the file.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medcl.data.images import load_image_and_mask
from medcl.data.segtypes import BACKGROUND, IGNORE_INDEX, SegItem, SegSource
from medcl.data.volumes import load_volume

# adapter name -> "module:function" building a SegSource from (root, name=..., **options)
ADAPTERS: dict[str, str] = {
    "busbra": "medcl.data.images:busbra_source",
    "hc18": "medcl.data.images:hc18_source",
    "tg3k": "medcl.data.images:tg3k_source",
    "ctrus": "medcl.data.images:ctrus_source",
    "image_folder": "medcl.data.images:image_folder_source",
    "openkbp": "medcl.data.volumes:openkbp_source",
    "nifti_pairs": "medcl.data.volumes:nifti_pairs_source",
}


def build_source(adapter: str, root: str | Path, name: str | None = None, **options: Any) -> SegSource:
    """Build a source with a named adapter (see :data:`ADAPTERS`)."""
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown dataset adapter {adapter!r}; choose one of {sorted(ADAPTERS)}")
    module_name, _, func = ADAPTERS[adapter].partition(":")
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"dataset {adapter!r}: root {root} does not exist")
    build = getattr(importlib.import_module(module_name), func)
    return build(root, name=name or adapter, **options)


class SegmentationPool:
    """Several sources in one global label space; ``pool[i]`` loads one whole image or volume.

    Returns a dict: ``image`` float32 ``[C, *S]`` in [0, 1], ``label`` int64 ``[*S]`` (global ids,
    ``IGNORE_INDEX`` where unknown), ``annotated`` bool ``[K + 1]``, ``source`` (index), ``case_id``.
    Reusable for supervised segmentation (same arrays, whole images). ``cache``: how many loaded
    items to keep in memory (LRU; 0 = none, -1 = all). ``image_size`` (2D only): resize every
    image (bilinear, antialiased) and mask (nearest) to ``[H, W]``, as segmentation fine-tuning's
    ``size`` does, so that pretraining sees structures at the scale the target task will.
    """

    def __init__(self, sources: Sequence[SegSource], cache: int = -1, spacing: Sequence[float] | None = None,
                 image_size: Sequence[int] | None = None) -> None:
        if not sources:
            raise ValueError("the pool needs at least one source")
        dims = {s.spatial_dims for s in sources}
        if len(dims) != 1:
            raise ValueError(f"sources mix 2D and 3D: {[(s.name, s.spatial_dims) for s in sources]}")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names} (set name=... in the dataset entry)")
        self.sources = list(sources)
        self.spatial_dims = dims.pop()
        self.spacing = tuple(spacing) if spacing is not None else None
        if image_size is not None:
            if self.spatial_dims != 2:
                raise ValueError("image_size resizes 2D images; for volumes use spacing")
            if len(image_size) != 2 or min(image_size) < 1:
                raise ValueError(f"image_size must be two positive ints [H, W], got {list(image_size)}")
        self.image_size = tuple(int(v) for v in image_size) if image_size is not None else None
        self.class_names: list[str] = ["background"]
        self._local_to_global: list[dict[int, int]] = []
        for source in self.sources:
            mapping = {}
            for value, cls in sorted(source.classes.items()):
                mapping[value] = len(self.class_names)
                self.class_names.append(f"{source.name}/{cls}")
            self._local_to_global.append(mapping)
        self.index: list[tuple[int, int]] = [(s, i) for s, src in enumerate(self.sources) for i in range(len(src.items))]
        if not self.index:
            raise ValueError(f"the pool's sources {names} hold no items")
        self.items_of_source: list[np.ndarray] = []
        for s in range(len(self.sources)):
            self.items_of_source.append(np.array([k for k, (src, _) in enumerate(self.index) if src == s]))
        self.source_of = np.array([s for s, _ in self.index])
        self.cache_size = cache
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()

    @property
    def num_classes(self) -> int:
        """K + 1 (global classes plus background)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.index)

    def annotated_vector(self, source: int, item: SegItem) -> np.ndarray:
        vec = np.zeros(self.num_classes, dtype=bool)
        vec[BACKGROUND] = True
        by_name = {cls: value for value, cls in self.sources[source].classes.items()}
        for cls in item.annotated:
            vec[self._local_to_global[source][by_name[cls]]] = True
        return vec

    def to_global(self, source: int, item: SegItem, local: np.ndarray) -> np.ndarray:
        """Local mask values -> global ids (unannotated classes -> IGNORE_INDEX); see module doc."""
        src = self.sources[source]
        lut_size = int(max(src.classes, default=0)) + 1
        values = np.unique(local)
        unknown = [int(v) for v in values if v != 0 and int(v) not in src.classes]
        if unknown or values.min(initial=0) < 0:
            raise ValueError(f"{item.mask}: mask values {unknown or [int(values.min())]} not in the label map of "
                             f"source {src.name!r} ({src.classes})")
        lut = np.full(lut_size, IGNORE_INDEX, dtype=np.int64)
        lut[0] = BACKGROUND
        annotated = set(item.annotated)
        for value, cls in src.classes.items():
            if cls in annotated:
                lut[value] = self._local_to_global[source][value]
        return lut[local.astype(np.int64)]

    def load(self, index: int) -> dict[str, Any]:
        source, k = self.index[index]
        src, item = self.sources[source], self.sources[source].items[k]
        if self.spatial_dims == 2:
            image, local = load_image_and_mask(item, src)
            if self.image_size is not None and image.shape[1:] != self.image_size:
                image, local = _resize_2d(image, local, self.image_size)
        else:
            image, local = load_volume(item, src, spacing=self.spacing)
        return {
            "image": image,
            "label": self.to_global(source, item, local),
            "annotated": self.annotated_vector(source, item),
            "source": source,
            "case_id": item.case_id,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"pool index {index} out of range [0, {len(self)})")
        if self.cache_size == 0:
            return self.load(index)
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        sample = self.load(index)
        self._cache[index] = sample
        if self.cache_size > 0 and len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return sample

    def describe(self) -> str:
        lines = [f"{len(self)} items, {self.spatial_dims}D, {self.num_classes - 1} classes"]
        for s, src in enumerate(self.sources):
            lines.append(f"  {src.name}: {len(src.items)} items, classes {sorted(src.classes.values())}")
        return "\n".join(lines)


def _resize_2d(image: np.ndarray, local: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``image [C, H, W]`` bilinear (antialiased when shrinking), ``local [H, W]`` nearest."""
    import torch
    import torch.nn.functional as F

    img = F.interpolate(torch.from_numpy(np.ascontiguousarray(image))[None], size=size, mode="bilinear",
                        align_corners=False, antialias=True)[0]
    lab = F.interpolate(torch.from_numpy(local.astype(np.float32))[None, None], size=size, mode="nearest")[0, 0]
    return img.clamp_(0.0, 1.0).numpy(), lab.round().long().numpy()


def pool_from_specs(specs: Sequence[Mapping[str, Any]], cache: int = -1, spacing: Sequence[float] | None = None,
                    image_size: Sequence[int] | None = None) -> SegmentationPool:
    """Build a pool from dataset entries ``{"adapter": ..., "root": ..., "name": ..., **options}``."""
    sources = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        try:
            adapter, root = spec.pop("adapter"), spec.pop("root")
        except KeyError as exc:
            raise ValueError(f"dataset entry {i} {spec}: missing key {exc.args[0]!r}") from None
        sources.append(build_source(adapter, root, **spec))
    return SegmentationPool(sources, cache=cache, spacing=spacing, image_size=image_size)
