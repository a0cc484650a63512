"""Segmentation target tasks: which images and masks, which patient, which fold, which classes.

A :class:`SegTask` is what ``medcl finetune --task segment`` evaluates. It is built from

- a simple CSV manifest for user data (:func:`read_seg_csv`): columns ``image, mask, patient_id``
  and optionally ``fold`` (predefined patient-level folds) and ``split`` (``train`` / ``test``);
- BUS-BRA breast lesions (:func:`busbra_task`) with its patient-level ``5-fold-cv.csv``;
- OpenKBP head-and-neck CT (:func:`openkbp_task`) restricted to an organ subset and to the
  patients on whom every organ of the subset was contoured (label 0 is "background OR not
  contoured" there, so a patient missing one organ cannot supervise it).

Masks must hold only the values the task declares (:meth:`SegTask.allowed_mask_values`: the
label map's raw values and 0, plus ``mask_values`` a dataset lists as known, e.g. OpenKBP's other
organs, which become background; a binary task without a map takes 0/1 or 0/255 masks); any other
value is an error naming the file and the values. ``binarize`` (``--binarize 127``) is the
explicit way to threshold noisy 8-bit masks (JPEG) into one foreground class. ``label_map`` maps raw
mask values to class indices 0 (background) .. n_classes. Loading (:func:`load_case`)
reads files with :mod:`medcl.data.segfiles`, the reader MixCL pretraining uses too, and
returns channel-first float32 image in [0, 1] and int64 label arrays, resized (2D) or
resampled (3D) to a fixed grid so batches stack.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medcl.data.segfiles import PERCENTILES, read_image_and_mask, read_volume

IMAGE_SUFFIXES_3D = (".nii", ".nii.gz")


@dataclass(frozen=True)
class SegCase:
    """One labeled image or volume. ``fold`` is a predefined test fold (1-based) or None."""

    case_id: str
    patient_id: str
    image: str
    mask: str
    fold: int | None = None


@dataclass
class SegTask:
    """A segmentation target: cases (train/validation pool), optional held-out test cases."""

    name: str
    spatial_dims: int
    classes: list[str]  # foreground class names; class index i+1 is classes[i]
    cases: list[SegCase]
    label_map: dict[int, int] | None = None  # raw mask value -> class index; None = identity
    test_cases: list[SegCase] = field(default_factory=list)
    # 3D intensity window (Hounsfield units for CT); None = per-volume percentile scaling
    intensity_range: tuple[float, float] | None = None
    # 3D without a window: clip each volume to these percentiles and scale to [0, 1] (robust to a
    # few extreme voxels, e.g. MRI); (0, 100) is plain min-max
    percentiles: tuple[float, float] = PERCENTILES
    # 3D: which channel (modality) of a 4D image [X, Y, Z, C] to use; None = images must be 3D
    channel: int | None = None
    # raw mask values known to the dataset beyond the label map (they become background)
    mask_values: tuple[int, ...] = ()
    # binary tasks: foreground = raw mask value > binarize (explicit thresholding of noisy 8-bit masks)
    binarize: int | None = None

    def allowed_mask_values(self) -> list[set[int]]:
        """The value sets a mask may draw from (one of them): see the module docstring."""
        extra = {0, *self.mask_values}
        if self.label_map is not None:
            return [extra | set(self.label_map)]
        if len(self.classes) == 1:
            return [extra | {1}, extra | {255}]
        return [extra | set(range(self.n_classes))]

    @property
    def n_classes(self) -> int:
        """Number of output channels including background."""
        return len(self.classes) + 1

    def has_predefined_folds(self) -> bool:
        return bool(self.cases) and all(c.fold is not None for c in self.cases)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "spatial_dims": self.spatial_dims,
            "classes": list(self.classes),
            "n_cases": len(self.cases),
            "n_patients": len({c.patient_id for c in self.cases}),
            "n_test_cases": len(self.test_cases),
            "predefined_folds": self.has_predefined_folds(),
            "intensity": (f"window {list(self.intensity_range)}" if self.intensity_range is not None
                          else f"percentiles {list(self.percentiles)}"),
            **({"channel": self.channel} if self.channel is not None else {}),
        }


def _is_volume(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES_3D)


# --------------------------------------------------------------------------------------------
# task builders
# --------------------------------------------------------------------------------------------


def read_seg_csv(
    path: str | Path,
    classes: Sequence[str] | None = None,
    label_map: dict[int, int] | None = None,
    name: str | None = None,
) -> SegTask:
    """Read a user segmentation manifest (CSV with ``image, mask, patient_id`` [, fold, split]).

    Relative paths are resolved against the CSV's folder. Rows with ``split == test`` become the
    held-out test set; all others form the cross-validation pool. Without ``classes`` a binary
    task ("foreground": every non-zero mask value) is assumed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmentation manifest not found: {path}")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"image", "mask", "patient_id"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {sorted(missing)}; expected image, mask, patient_id"
                f" [, fold, split], found {reader.fieldnames}"
            )
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no rows")
    cases, test_cases = [], []
    dims = set()
    for line, row in enumerate(rows, start=2):
        image = (path.parent / row["image"]).as_posix() if not Path(row["image"]).is_absolute() else row["image"]
        mask = (path.parent / row["mask"]).as_posix() if not Path(row["mask"]).is_absolute() else row["mask"]
        if not row["patient_id"]:
            raise ValueError(f"{path} line {line}: empty patient_id")
        fold_text = (row.get("fold") or "").strip()
        try:
            fold = int(fold_text) if fold_text else None
        except ValueError:
            raise ValueError(f"{path} line {line}: fold must be an integer, got {fold_text!r}") from None
        split = (row.get("split") or "train").strip().lower()
        if split not in {"train", "test", ""}:
            raise ValueError(f"{path} line {line}: split must be 'train' or 'test', got {split!r}")
        case = SegCase(Path(image).name.split(".")[0] + f"_{line}", row["patient_id"], image, mask, fold)
        dims.add(3 if _is_volume(image) else 2)
        (test_cases if split == "test" else cases).append(case)
    if len(dims) > 1:
        raise ValueError(f"{path}: mixes 2D images and 3D volumes")
    if classes is None:
        classes = ["foreground"]
    return SegTask(
        name=name or path.stem,
        spatial_dims=dims.pop(),
        classes=list(classes),
        cases=cases,
        label_map=label_map,
        test_cases=test_cases,
    )


def busbra_task(root: str | Path) -> SegTask:
    """BUS-BRA lesion segmentation with its patient-level folds (Gomez-Flores et al. 2023).

    ``5-fold-cv.csv`` column ``kFold`` is each image's test fold; the patient is ``Case`` in
    ``bus_data.csv`` (one patient can have two images, e.g. ``bus_0001-l`` and ``-r``). The
    CSV's own ``valid_k`` columns are NOT used: they put images of one patient on both sides of
    the train/validation split, so validation patients are drawn by patient instead.
    """
    root = Path(root)
    folds_csv, data_csv = root / "5-fold-cv.csv", root / "bus_data.csv"
    for p in (folds_csv, data_csv):
        if not p.is_file():
            raise FileNotFoundError(f"BUS-BRA file not found: {p}")
    with data_csv.open(newline="") as fh:
        patient_of = {r["ID"]: r["Case"] for r in csv.DictReader(fh)}
    cases = []
    with folds_csv.open(newline="") as fh:
        for r in csv.DictReader(fh):
            image_id = r["ID"]
            if image_id not in patient_of:
                raise ValueError(f"{folds_csv}: ID {image_id!r} not in {data_csv}")
            cases.append(
                SegCase(
                    case_id=image_id,
                    patient_id=f"bus_{patient_of[image_id]}",
                    image=str(root / "images" / f"{image_id}.jpg"),
                    mask=str(root / "masks" / f"{image_id}.png"),
                    fold=int(r["kFold"]),
                )
            )
    return SegTask("busbra-lesion", 2, ["lesion"], cases, label_map={255: 1})


OPENKBP_ORGANS = {
    "Brainstem": 1,
    "SpinalCord": 2,
    "RightParotid": 3,
    "LeftParotid": 4,
    "Esophagus": 5,
    "Larynx": 6,
    "Mandible": 7,
}


def openkbp_patients(root: str | Path) -> list[dict]:
    """The ``patients`` list of OpenKBP's ``index.json`` (patient, split, spacing_mm, contoured)."""
    index = Path(root) / "index.json"
    if not index.is_file():
        raise FileNotFoundError(f"OpenKBP index not found: {index}")
    return json.loads(index.read_text())["patients"]


def openkbp_task(
    root: str | Path,
    organs: Sequence[str],
    patients: Sequence[str] | None = None,
    test_patients: Sequence[str] = (),
    intensity_range: tuple[float, float] = (-150.0, 250.0),
) -> SegTask:
    """OpenKBP CT restricted to ``organs``; only patients on whom all of them were contoured.

    ``patients`` restricts the cross-validation pool (default: every eligible patient not in
    ``test_patients``). A requested patient who lacks one of the organs is an error, because
    its label 0 would teach "background" where the organ really is.
    """
    root = Path(root)
    unknown = [o for o in organs if o not in OPENKBP_ORGANS]
    if unknown or not organs:
        raise ValueError(f"unknown OpenKBP organ(s) {unknown}; choose from {sorted(OPENKBP_ORGANS)}")
    info = {p["patient"]: p for p in openkbp_patients(root)}
    eligible = [pid for pid, p in info.items() if set(organs) <= set(p["contoured"])]

    def check(ids: Sequence[str]) -> list[str]:
        for pid in ids:
            if pid not in info:
                raise ValueError(f"OpenKBP patient {pid!r} not in {root / 'index.json'}")
            lacking = set(organs) - set(info[pid]["contoured"])
            if lacking:
                raise ValueError(f"OpenKBP patient {pid!r} has no contour for {sorted(lacking)}")
        return list(ids)

    test_ids = check(test_patients)
    pool = check(patients) if patients is not None else [p for p in eligible if p not in set(test_ids)]

    def case(pid: str) -> SegCase:
        return SegCase(pid, pid, str(root / pid / "ct.nii.gz"), str(root / pid / "labels.nii.gz"))

    label_map = {OPENKBP_ORGANS[o]: i + 1 for i, o in enumerate(organs)}
    return SegTask(
        name="openkbp-" + "-".join(o.lower() for o in organs),
        spatial_dims=3,
        classes=list(organs),
        cases=[case(p) for p in sorted(pool)],
        label_map=label_map,
        mask_values=tuple(sorted(OPENKBP_ORGANS.values())),  # the other organs' contours become background
        test_cases=[case(p) for p in sorted(test_ids)],
        intensity_range=intensity_range,
    )


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def map_labels(mask: np.ndarray, label_map: dict[int, int] | None, where: str = "") -> np.ndarray:
    """Raw mask values -> class indices (values outside ``label_map`` become 0)."""
    mask = np.asarray(mask)
    if label_map is None:
        return mask.astype(np.int64)
    out = np.zeros(mask.shape, dtype=np.int64)
    for raw, cls in label_map.items():
        out[mask == raw] = cls
    return out


def labels_from_mask(raw: np.ndarray, task: SegTask, mask_path: str) -> np.ndarray:
    """Raw mask values -> class indices, refusing values the task does not declare."""
    raw = np.asarray(raw)
    if task.binarize is not None:
        if len(task.classes) != 1:
            raise ValueError(f"--binarize makes one foreground class, but the task has classes {task.classes}")
        return (raw > task.binarize).astype(np.int64)
    uniques, counts = np.unique(raw, return_counts=True)
    values = set(uniques.tolist())
    allowed = task.allowed_mask_values()
    if not any(values <= a for a in allowed):
        # name the values outside the declared set that covers most pixels (a 0/255 mask with a few
        # 1s from JPEG noise: the 1s)
        covered = [sum(int(c) for v, c in zip(uniques.tolist(), counts) if v in a) for a in allowed]
        bad = sorted(values - allowed[int(np.argmax(covered))])
        declared = " or ".join(str(sorted(a)) for a in allowed)
        raise ValueError(f"{mask_path}: mask values {bad[:10]}{' ...' if len(bad) > 10 else ''} are not declared by "
                         f"task {task.name!r} (mask values {declared}; classes {task.classes}); for 8-bit 0/255 masks "
                         "with compression noise (JPEG) pass --binarize 127, else give the classes / label map")
    if task.label_map is None and len(task.classes) == 1:
        return (raw > 0).astype(np.int64)  # 0/1 or 0/255
    return map_labels(raw, task.label_map)


def _load_2d(case: SegCase, task: SegTask, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    image, raw = read_image_and_mask(case.image, case.mask, threshold=None, size=size)
    return image[None], labels_from_mask(raw, task, case.mask)[None]


def _load_3d(case: SegCase, task: SegTask, size: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    image, raw = read_volume(case.image, case.mask, window=task.intensity_range, percentiles=task.percentiles,
                             channel=task.channel, size=size, how_to_choose_channel="--channel K (0-based)")
    return image, labels_from_mask(raw, task, case.mask)[None]


def load_case(case: SegCase, task: SegTask, size: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Image [1, *size] float32 in [0, 1] and labels [1, *size] int64 (class indices).

    2D images are resized to ``size`` (bilinear image, nearest mask); 3D volumes are put in RAS
    orientation (as pretraining loads them), clipped to ``task.intensity_range`` (or to the
    volume's ``task.percentiles``) and resampled to ``size`` when given (None keeps the grid).
    """
    if task.spatial_dims == 2:
        if size is None:
            raise ValueError("2D cases need a size to resize to")
        image, labels = _load_2d(case, task, size)
    else:
        image, labels = _load_3d(case, task, size)
    if labels.min() < 0 or labels.max() >= task.n_classes:
        raise ValueError(
            f"case {case.case_id}: mask {case.mask} has class values {np.unique(labels).tolist()}"
            f" but the task has {task.n_classes} classes (0 = background, {task.classes});"
            " give a label_map"
        )
    return image, labels
