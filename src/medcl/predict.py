"""Predict with a fine-tuned model on new data: ``medcl predict MODEL INPUT... -o OUT``.

MODEL is a file from a fine-tuning run's ``models/`` folder (or a folder holding a
``final.safetensors``), read by :func:`medcl.evaluate.models.load_finetuned`; everything about
the inputs comes from its card, so new data is prepared exactly as the training data was.

Classification (``frame_classifier``). Inputs: videos, DICOM cine, still images, folders of them,
or an ingest folder (its ``manifest.csv``: the stored frames are used as they are). Files go
through ingest's own per-file step (:func:`medcl.ingest.pipeline.process_file`: decode at the
card's fps, grayscale, sector crop, fit into the ingest size), then :mod:`medcl.inputs` (resize
to the model's image size, ``x / 255``, normalisation). Writes ``OUT/frames.csv`` (one row per
frame: class probabilities, predicted class) and ``OUT/videos.csv`` (one row per video: the mean
of its frames' probabilities, the predicted class, the number of frames used).

Segmentation (``unetr_segmenter``, ``unet_segmenter``). Inputs: 2D images or NIfTI volumes (or folders of them), read
as fine-tuning read them (:mod:`medcl.data.segfiles`: 2D resized to the card's size; 3D in RAS
orientation with the card's intensity window or percentiles and channel, resampled to its size).
Masks (class index per pixel, 0 = background) go back to each input's own size and geometry:
``OUT/masks/NAME.png`` for images; ``OUT/masks/NAME.nii.gz`` for volumes, on the input's voxel
grid, in its orientation, with its affine. ``OUT/volumes.csv``: per input and class, the pixels
(2D) or voxels and mm^3 (3D, voxel size from the affine).

Always: ``OUT/errors.csv`` (input, reason) of the inputs that could not be read (damaged,
missing), which are skipped, and ``OUT/predict.json`` (the model, its card's task and classes,
counts). Inputs that do not fit the model (a volume for a 2D model, an image for a 3D one, a
video for a segmentation model, a volume with channels the model was not trained on) are refused
before anything is written. OUT is refused when it already holds predictions, unless
``overwrite``.

>>> summary = predict("runs/ft/models/final.safetensors", ["new_videos/"], "preds")   # doctest: +SKIP
>>> summary.exit_code        # 2 when any input failed (listed in preds/errors.csv)   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcl.precision import autocast, channels_last, is_2d_cnn, resolve_precision
from medcl.evaluate.models import load_finetuned
from medcl.inputs import InputSpec, resize_frames, to_model_input
from medcl.runfolder import refuse_existing, run_lock

OUTPUT_NAMES = ("videos.csv", "frames.csv", "volumes.csv", "errors.csv", "predict.json", "masks")
VOLUME_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class PredictSummary:
    """What a prediction run did; ``exit_code`` is 2 when any input failed."""

    out: Path
    task: str
    model: str
    n_inputs: int = 0
    n_predicted: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 2 if self.failed else 0

    def describe(self) -> str:
        written = "videos.csv, frames.csv" if self.task == "classify" else "masks/, volumes.csv"
        lines = [f"{self.n_predicted} of {self.n_inputs} input(s) predicted with {self.model}: {self.out}/ ({written})"]
        if self.failed:
            first = "".join(f"\n  {name}: {reason}" for name, reason in self.failed[:10])
            lines.append(f"{len(self.failed)} failed, skipped and listed in {self.out / 'errors.csv'}"
                         + (" (the first 10):" if len(self.failed) > 10 else ":") + first)
        return "\n".join(lines)


@dataclass
class Item:
    """One thing to predict: a file (``relative``: its name inside the folder it was found in),
    or a video of an ingest folder (``record`` of its manifest, read through ``frame_sets``)."""

    path: Path
    relative: str
    record: Any = None
    frame_sets: Any = None

    @property
    def name(self) -> str:
        return self.record.source if self.record is not None else str(self.path)


def predict(model: str | Path, inputs: Sequence[str | Path], out: str | Path, *, device: str = "cpu",
            batch_size: int | None = None, overwrite: bool = False, progress: bool = True,
            precision: str = "auto") -> PredictSummary:
    """Predict every input with a fine-tuned model and write ``out`` (see the module docstring).

    ``batch_size``: frames (classification, default 64) or 2D images (segmentation, default 8)
    per forward pass; volumes go one at a time through a sliding window. Raises ValueError when
    an input does not fit the model, :class:`~medcl.runfolder.RunFolderError` when ``out``
    already holds predictions (unless ``overwrite``) or is in use. ``precision``: as in
    fine-tuning (:mod:`medcl.precision`; the same setting on the same machine reproduces its numbers).
    """
    network, card = load_finetuned(model, device)
    if is_2d_cnn(network) and card.get("task") == "classify":
        channels_last(network)
    task = card.get("task")
    if task not in ("classify", "segment"):
        raise ValueError(f"{card['file']}: the card's task is {task!r}; this medcl predicts 'classify' and 'segment'")
    classify = task == "classify"
    out = Path(out)
    items, failed = (collect_videos if classify else collect_images)(inputs, card, exclude=out)
    summary = PredictSummary(out, task, card["file"], n_inputs=len(items) + len(failed), failed=failed)
    with run_lock(out, "medcl predict"):
        for found in refuse_existing(out, OUTPUT_NAMES, overwrite, "predictions"):
            shutil.rmtree(found) if found.is_dir() else found.unlink()
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="predict", unit="input", disable=not progress or not items, file=sys.stderr)
        with torch.no_grad(), bar, autocast(device, resolve_precision(precision, device, network)):
            if classify:
                _classify(network, card, items, out, batch_size or 64, device, summary, bar)
            else:
                _segment(network, card, items, out, batch_size or 8, device, summary, bar)
        _write_rows(out / "errors.csv", [{"input": name, "reason": reason} for name, reason in summary.failed],
                    ["input", "reason"])
        (out / "predict.json").write_text(json.dumps({
            "model": card["file"], "task": task, "classes": card.get("classes"), "input": card.get("input"),
            "n_inputs": summary.n_inputs, "n_predicted": summary.n_predicted, "n_failed": len(summary.failed),
            "medcl_version": card.get("medcl_version")}, indent=1) + "\n")
    return summary


# --------------------------------------------------------------------------------------------
# finding the inputs


def _expand(inputs: Sequence[str | Path], wanted, exclude: Path | None = None) -> Iterator[tuple[Path, str | None]]:
    """``(file, name relative to the folder it was found in)`` of every input file and of every
    file under an input folder for which ``wanted(path)`` (hidden ones and those under ``exclude``,
    the output folder, left out); ``(path, None)`` for a missing input."""
    skip = exclude.resolve() if exclude is not None else None
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file() and wanted(p)
                               and not any(part.startswith(".") for part in p.relative_to(path).parts)
                               and not (skip is not None and p.resolve().is_relative_to(skip))):
                yield file, file.relative_to(path).as_posix()
        elif path.exists():
            yield path, path.name
        else:
            yield path, None


def _is_volume(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def _refuse(mismatched: list[str], card: dict, what: str) -> None:
    if mismatched:
        more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        raise ValueError(f"{'; '.join(mismatched[:3])}{more}: model {card['file']} {what}; nothing was predicted")


def collect_videos(inputs: Sequence[str | Path], card: dict,
                   exclude: Path | None = None) -> tuple[list[Item], list[tuple[str, str]]]:
    """Items of a classification run: ingest folders' videos and video / DICOM / image files."""
    from medcl.data.frames import FrameSets
    from medcl.data.manifest import MANIFEST_NAME
    from medcl.ingest.store import source_kind

    items, failed, mismatched = [], [], []
    for given in inputs:
        path = Path(given)
        manifest = path / MANIFEST_NAME if path.is_dir() else path
        if manifest.name == MANIFEST_NAME and manifest.is_file():  # an ingest folder: its stored frames
            sets = FrameSets(manifest, cache=False)
            items += [Item(manifest.parent, r.video_id, r, sets) for r in sets.records]
            continue
        for file, relative in _expand([path], lambda p: source_kind(p) is not None or _is_volume(p), exclude):
            if relative is None:
                failed.append((str(file), "not found"))
            elif _is_volume(file):
                mismatched.append(f"{file} is a 3D volume")
            elif source_kind(file) is None:
                failed.append((str(file), "not a video, DICOM cine or image file"))
            else:
                items.append(Item(file, relative))
    _refuse(mismatched, card, "classifies 2D ultrasound frames (videos, DICOM cine, images, ingest folders)")
    return items, failed


def collect_images(inputs: Sequence[str | Path], card: dict,
                   exclude: Path | None = None) -> tuple[list[Item], list[tuple[str, str]]]:
    """Items of a segmentation run: 2D images or NIfTI volumes, as the card's dimensionality and
    channel allow."""
    from medcl.ingest.store import IMAGE_EXTENSIONS, source_kind

    dims, channel = card["input"]["spatial_dims"], card["input"].get("channel")
    items, failed, mismatched = [], [], []
    for file, relative in _expand(inputs, lambda p: p.suffix.lower() in IMAGE_EXTENSIONS or _is_volume(p), exclude):
        if relative is None:
            failed.append((str(file), "not found"))
            continue
        kind = 3 if _is_volume(file) else 2 if file.suffix.lower() in IMAGE_EXTENSIONS else None
        if kind is None and source_kind(file) in ("video", "dicom"):
            mismatched.append(f"{file} is a video / DICOM cine")
        elif kind is None:
            failed.append((str(file), "not an image or NIfTI volume"))
        elif kind != dims:
            mismatched.append(f"{file} is a {'3D volume' if kind == 3 else '2D image'}")
        else:
            problem = _channel_problem(file, channel) if kind == 3 else None
            if problem is None:
                items.append(Item(file, relative))
            elif problem.startswith("unreadable"):
                failed.append((str(file), problem))
            else:
                mismatched.append(f"{file} {problem}")
    what = "segments " + ("2D images (PNG, JPEG, BMP, TIFF)" if dims == 2 else "3D NIfTI volumes (.nii, .nii.gz)")
    if channel is not None:
        what += f" using channel {channel} of 4D volumes"
    _refuse(mismatched, card, what)
    return items, failed


def _channel_problem(path: Path, channel: int | None) -> str | None:
    """Why a volume's channels do not fit the model (from the header alone), or None."""
    import nibabel as nib

    try:
        shape = nib.load(str(path)).shape
    except Exception as exc:  # noqa: BLE001 - a damaged header: the file is skipped, not refused
        return f"unreadable NIfTI header ({type(exc).__name__}: {exc})"
    channels = shape[3] if len(shape) > 3 else 1
    if channel is None and channels > 1:
        return f"has {channels} channels (shape {tuple(shape)}), but the model was trained on single-channel volumes"
    if channel is not None and channel >= channels:
        return f"has {channels} channel(s) (shape {tuple(shape)}), but the model reads channel {channel}"
    return None


# --------------------------------------------------------------------------------------------
# classification


def _classify(model: torch.nn.Module, card: dict, items: list[Item], out: Path, batch_size: int, device: str,
              summary: PredictSummary, bar) -> None:
    classes = card["classes"]
    spec = InputSpec.from_dict(card["input"]["normalization"])
    size = int(card["input"]["image_size"])
    probs_fields = [f"prob_{c}" for c in classes]
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="medcl-predict-") as tmp:
        frames_csv = _writer(stack, out / "frames.csv", ["input", "video_id", "frame", "pred", *probs_fields])
        videos_csv = _writer(stack, out / "videos.csv", ["input", "video_id", "frames", "pred", *probs_fields])
        for item in items:
            bar.set_postfix_str(item.relative[-30:], refresh=False)
            try:
                frames = _frames_of(item, card["input"].get("ingest") or {}, size, Path(tmp))
            except (OSError, ValueError, EOFError) as exc:  # a damaged or missing frames file
                summary.failed.append((item.name, str(exc) or type(exc).__name__))
                bar.update()
                continue
            x = resize_frames(torch.from_numpy(np.ascontiguousarray(frames)), size)
            probs = torch.cat([torch.softmax(model(channels_last(to_model_input(x[i:i + batch_size], spec).to(device))
                                                   ).float(), 1).cpu()
                               for i in range(0, len(x), batch_size)]).numpy()
            for i, p in enumerate(probs):
                frames_csv.writerow(_prob_row(item, classes, p, frame=i))
            videos_csv.writerow(_prob_row(item, classes, probs.astype(np.float64).mean(0), frames=len(probs)))
            summary.n_predicted += 1
            bar.update()


def _frames_of(item: Item, ingest: dict, size: int, tmp: Path) -> np.ndarray:
    """uint8 frames [n, H, W] of an item: an ingest folder's stored frames, or the file put
    through ingest's per-file step with the card's ingest settings."""
    if item.record is not None:
        frames = item.frame_sets.load_frames(item.record)
    else:
        from medcl.ingest.pipeline import process_file

        frames_path = tmp / "frames.npy"
        result = process_file({"path": str(item.path), "fps": float(ingest.get("fps", 3.0)), "threads": 0,
                               "keep_partial": False, "crop": bool(ingest.get("crop", True)),
                               "size": int(ingest.get("size") or size), "frames_path": str(frames_path)})
        if not result["ok"]:
            raise ValueError(result["reason"])
        frames = np.load(frames_path)
    if len(frames) == 0:
        raise ValueError("no frames")
    return frames


def _prob_row(item: Item, classes: list[str], probs: np.ndarray, **counts: int) -> dict:
    video_id = item.record.video_id if item.record is not None else item.relative
    return {"input": item.name, "video_id": video_id, **counts, "pred": classes[int(np.argmax(probs))],
            **{f"prob_{c}": float(p) for c, p in zip(classes, probs)}}


# --------------------------------------------------------------------------------------------
# segmentation


def _segment(model: torch.nn.Module, card: dict, items: list[Item], out: Path, batch_size: int, device: str,
             summary: PredictSummary, bar) -> None:
    from medcl.evaluate.segment import postprocess_batch
    from medcl.evaluate.segment import predict as window_predict

    inp = card["input"]
    classes = ["background", *card["classes"]]
    window = inp.get("sliding_window") or {}
    # a UNETR's own input grid (larger inputs are tiled); the U-Net takes the training roi or the whole image
    img_size = getattr(model.encoder, "img_size", None) or window.get("roi_size")
    roi = tuple(img_size) if img_size else None
    # the post-processing chosen on the model's validation patients (cards before it existed: none)
    largest = [classes.index(c) for c in card.get("model", {}).get("postprocess", {}).get("keep_largest_component", [])]

    def forward(x: torch.Tensor) -> np.ndarray:
        logits = window_predict(model, x.to(device), roi, int(window.get("sw_batch_size", 4)),
                                float(window.get("overlap", 0.25)))
        pred = postprocess_batch(logits.float().argmax(1, keepdim=True).cpu(), largest)
        return pred[:, 0].numpy().astype(np.uint8)

    (out / "masks").mkdir(parents=True, exist_ok=True)
    names: set[str] = set()
    rows = []
    step = batch_size if inp["spatial_dims"] == 2 else 1
    for start in range(0, len(items), step):
        batch = []
        for item in items[start:start + step]:
            try:
                batch.append((item, _read_input(item.path, inp)))
            except (OSError, ValueError, RuntimeError, EOFError) as exc:  # damaged: named and skipped
                summary.failed.append((item.name, str(exc) or type(exc).__name__))
                bar.update()
        if not batch:
            continue
        preds = forward(torch.from_numpy(np.stack([image for _, (image, _) in batch])))
        for (item, (_, geometry)), pred in zip(batch, preds):
            mask_path = out / "masks" / _mask_name(item, names)
            rows.append(_write_mask(pred, geometry, mask_path, item, classes, out))
            summary.n_predicted += 1
            bar.update()
    fields = list(dict.fromkeys(k for row in rows for k in row)) or ["input", "mask"]
    _write_rows(out / "volumes.csv", rows, fields)


def _read_input(path: Path, inp: dict) -> tuple[np.ndarray, dict]:
    """(model input [1, *grid] float32 in [0, 1], what puts the mask back where it belongs)."""
    if inp["spatial_dims"] == 2:
        from PIL import Image

        from medcl.data.segfiles import read_image

        image = read_image(path, inp["size"])
        with Image.open(path) as im:
            width, height = im.size
        return image[None], {"shape": (height, width)}
    import nibabel as nib

    from medcl.data.segfiles import PERCENTILES, read_volume

    image, _ = read_volume(path, None, window=inp.get("window"), percentiles=inp.get("percentiles") or PERCENTILES,
                           channel=inp.get("channel"), size=inp.get("size"))
    return image, {"nifti": nib.load(str(path))}


def _mask_name(item: Item, taken: set[str]) -> str:
    """The input's name inside its folder, as PNG (2D) or .nii.gz (3D); unique in OUT/masks."""
    relative = item.relative
    stem = relative[: -len(".nii.gz")] if relative.lower().endswith(".nii.gz") else relative.rsplit(".", 1)[0]
    suffix = ".nii.gz" if _is_volume(item.path) else ".png"
    name, n = stem + suffix, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}{suffix}"
    taken.add(name)
    return name


def _write_mask(pred: np.ndarray, geometry: dict, path: Path, item: Item, classes: list[str], out: Path) -> dict:
    """Put the model-grid mask back on the input's own grid, write it, and count each class."""
    path.parent.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"input": item.name, "mask": path.relative_to(out).as_posix()}
    if "shape" in geometry:  # 2D: back to the image's size
        from PIL import Image

        height, width = geometry["shape"]
        mask = Image.fromarray(pred)
        if mask.size != (width, height):
            mask = mask.resize((width, height), Image.NEAREST)
        mask.save(path)
        counts = np.bincount(np.asarray(mask).ravel(), minlength=len(classes))
        row.update({f"{c}_pixels": int(counts[i]) for i, c in enumerate(classes)})
        return row
    mask, image = volume_to_input_grid(pred, geometry["nifti"]), geometry["nifti"]
    header = image.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    type(image)(mask, image.affine, header).to_filename(str(path))
    voxel = voxel_volume_mm3(image)
    counts = np.bincount(mask.ravel(), minlength=len(classes))
    row["voxel_mm3"] = voxel
    for i, c in enumerate(classes):
        row[f"{c}_voxels"] = int(counts[i])
        row[f"{c}_mm3"] = float(counts[i] * voxel)
    return row


def volume_to_input_grid(pred: np.ndarray, image: Any) -> np.ndarray:
    """A label volume on the RAS grid :func:`medcl.data.segfiles.read_volume` produced (resampled
    to its ``size`` or not) -> the same labels on ``image``'s own voxel grid and orientation
    (nearest neighbour; orientation by the same nibabel transforms MONAI's Orientation uses)."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    original = io_orientation(image.affine)
    spatial = image.shape[:3]
    ras_shape = [0, 0, 0]
    for axis, (target, _) in enumerate(original):
        ras_shape[int(target)] = spatial[axis]
    if tuple(pred.shape) != tuple(ras_shape):
        grid = torch.nn.functional.interpolate(torch.from_numpy(pred)[None, None].float(), size=tuple(ras_shape),
                                               mode="nearest")
        pred = grid[0, 0].to(torch.uint8).numpy()
    back = apply_orientation(pred, ornt_transform(axcodes2ornt("RAS"), original))
    return np.ascontiguousarray(back).astype(np.uint8)


def voxel_volume_mm3(image: Any) -> float:
    """Volume of one voxel in mm^3 from the affine (the header's spatial unit: mm unless it says m or um)."""
    unit = image.header.get_xyzt_units()[0] if hasattr(image.header, "get_xyzt_units") else "mm"
    scale = {"meter": 1e3, "micron": 1e-3}.get(unit, 1.0)
    return float(abs(np.linalg.det(image.affine[:3, :3])) * scale ** 3)


# --------------------------------------------------------------------------------------------
# CSV


def _writer(stack: ExitStack, path: Path, fields: list[str]) -> csv.DictWriter:
    writer = csv.DictWriter(stack.enter_context(path.open("w", newline="")), fieldnames=fields)
    writer.writeheader()
    return writer


def _write_rows(path: Path, rows: list[dict], fields: list[str]) -> None:
    with ExitStack() as stack:
        _writer(stack, path, fields).writerows(rows)

