"""3D NIfTI volumes + label maps: loading and source adapters.

Loading (:func:`load_volume`) is :func:`medcl.data.segfiles.read_volume`, the reader segmentation
fine-tuning uses too: RAS orientation, optional resampling to ``spacing`` (mm), the source's
intensity window (e.g. [-150, 250] HU for CT as in the MixCL paper, clipped and scaled to [0, 1];
without a window: the volume's 0.5-99.5 percentiles, robust to a few extreme voxels as in MRI).
A 4D image [X, Y, Z, C] (several MRI modalities) needs ``channel``. Patch crops and augmentation
happen later (:mod:`medcl.data.mixcl_views`), so whole volumes are reusable for supervised
segmentation.

Adapters (label semantics: :mod:`medcl.data.pool`):

- :func:`openkbp_source`: OpenKBP head-and-neck CT (``index.json``: label ids, spacing and, per
  patient, the ``contoured`` organs -- label 0 there is background OR not contoured).
- :func:`nifti_pairs_source`: generic image/label NIfTI pairs described by a JSON file, in the
  Medical Segmentation Decathlon ``dataset.json`` layout::

      {"labels": {"0": "background", "1": "liver", "2": "tumour"},
       "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz",
                     "annotated": ["liver"], "patient": "a"}, ...]}

  (``cases`` may replace ``training``; ``annotated`` defaults to every label, ``label`` may be
  omitted for unlabeled volumes; paths are relative to the JSON file.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medcl.data.segfiles import read_volume
from medcl.data.segtypes import SegItem, SegSource

CT_WINDOW = (-150.0, 250.0)


def load_volume(item: SegItem, source: SegSource, spacing: tuple[float, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(image [1, X, Y, Z] float32 in [0, 1], local label [X, Y, Z] int64)`` in RAS orientation."""
    return read_volume(item.image, item.mask, spacing=spacing, window=source.intensity_range,
                       channel=source.options.get("channel"),
                       how_to_choose_channel="the dataset option channel: K (0-based)")


def openkbp_source(root: Path, name: str = "openkbp", window: tuple[float, float] | list[float] | None = CT_WINDOW,
                   splits: list[str] | None = None, patients: list[str] | None = None,
                   organs: list[str] | None = None) -> SegSource:
    """OpenKBP: ``root/index.json`` + ``root/<patient>/{ct,labels}.nii.gz``.

    ``patients`` keeps only those patients; ``organs`` treats only those organs as annotated (the
    others become unknown, never a class): several sources with different organ subsets can be
    cut from one OpenKBP copy (benchmarks/mixcl_3d.py does).
    """
    index_path = root / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"OpenKBP index not found: {index_path}")
    index = json.loads(index_path.read_text())
    wanted = list(patients) if patients is not None else None
    try:
        classes = {int(k): str(v) for k, v in index["labels"].items() if int(k) != 0}
        patients = index["patients"]
    except (KeyError, ValueError, AttributeError) as exc:
        raise ValueError(f"{index_path}: expected 'labels' {{id: name}} and 'patients' [...] ({exc})") from None
    unknown = sorted(set(organs or []) - set(classes.values()))
    if unknown:
        raise ValueError(f"{index_path}: organs {unknown} not in the label map {sorted(classes.values())}")
    listed = {entry["patient"] for entry in patients}
    if wanted is not None and set(wanted) - listed:
        raise ValueError(f"{index_path}: patients {sorted(set(wanted) - listed)[:5]} not in the index")
    items = []
    for entry in patients:
        if splits is not None and entry.get("split") not in splits:
            continue
        pid = entry["patient"]
        if wanted is not None and pid not in set(wanted):
            continue
        annotated = tuple(o for o in entry.get("contoured", []) if organs is None or o in organs)
        folder = root / pid
        items.append(SegItem(image=str(folder / "ct.nii.gz"), mask=str(folder / "labels.nii.gz"),
                             annotated=annotated, case_id=pid, patient_id=pid,
                             spacing=tuple(entry["spacing_mm"]) if "spacing_mm" in entry else None))
    return SegSource(name=name, spatial_dims=3, classes=classes, items=items,
                     intensity_range=tuple(window) if window is not None else None)


def nifti_pairs_source(root: Path, name: str = "nifti", index: str = "dataset.json",
                       window: tuple[float, float] | list[float] | None = CT_WINDOW,
                       channel: int | None = None) -> SegSource:
    """Generic NIfTI image/label pairs listed in ``root/index`` (MSD ``dataset.json`` layout).

    ``window: null`` for MRI (percentile scaling); ``channel`` picks one modality of 4D images."""
    index_path = root / index
    if not index_path.is_file():
        raise FileNotFoundError(f"{name}: index file not found: {index_path}")
    spec = json.loads(index_path.read_text())
    labels = spec.get("labels")
    cases = spec.get("cases", spec.get("training"))
    if not isinstance(labels, dict) or not isinstance(cases, list):
        raise ValueError(f"{index_path}: expected 'labels' {{id: name}} and 'training' (or 'cases') [...]")
    classes = {int(k): str(v) for k, v in labels.items() if int(k) != 0}
    items = []
    for i, case in enumerate(cases):
        if "image" not in case:
            raise ValueError(f"{index_path}: case {i} has no 'image'")
        image = (index_path.parent / case["image"]).resolve()
        mask = (index_path.parent / case["label"]).resolve() if case.get("label") else None
        annotated = tuple(case.get("annotated", classes.values() if mask is not None else ()))
        cid = case.get("patient", Path(case["image"]).name.split(".")[0])
        items.append(SegItem(image=str(image), mask=str(mask) if mask else None, annotated=annotated,
                             case_id=Path(case["image"]).name.split(".")[0], patient_id=str(cid)))
    return SegSource(name=name, spatial_dims=3, classes=classes, items=items,
                     intensity_range=tuple(window) if window is not None else None,
                     options={"channel": channel} if channel is not None else {})
