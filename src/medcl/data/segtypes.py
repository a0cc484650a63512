"""The items and sources of a segmentation pool, and the label values every consumer shares.

Kept apart from :mod:`medcl.data.pool` so that the adapters (:mod:`medcl.data.images`,
:mod:`medcl.data.volumes`) can build sources while the pool imports the adapters' loaders, and so
that later stages (:mod:`medcl.sampling.pixels`) import the label constants without the pool.
The label semantics (what 0 and ``IGNORE_INDEX`` mean in a pooled set) are described in
:mod:`medcl.data.pool`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BACKGROUND = 0
# a pixel with no label at all: padding outside the image, or a class not annotated on its item
IGNORE_INDEX = -1


@dataclass(frozen=True)
class SegItem:
    """One image (or volume) with its mask. ``annotated``: class names annotated on this item."""

    image: str
    mask: str | None
    annotated: tuple[str, ...]
    case_id: str
    patient_id: str
    spacing: tuple[float, ...] | None = None


@dataclass
class SegSource:
    """One dataset of the pool: ``classes`` maps a local mask value (> 0) to a class name."""

    name: str
    spatial_dims: int
    classes: dict[int, str]
    items: list[SegItem]
    # 3D: intensity window in the image's units (HU for CT); None = per-volume percentile scaling
    intensity_range: tuple[float, float] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "/" in self.name or not self.name:
            raise ValueError(f"source name {self.name!r} must be non-empty and contain no '/'")
        if 0 in self.classes:
            raise ValueError(f"source {self.name!r}: local label 0 is background and cannot name a class")
        names = set(self.classes.values())
        for item in self.items:
            unknown = set(item.annotated) - names
            if unknown:
                raise ValueError(f"source {self.name!r}, case {item.case_id}: annotated classes {sorted(unknown)} "
                                 f"not in the label map {sorted(names)}")
