"""TensorBoard for every curve medcl writes: pretraining losses and fine-tuning curves.

TensorBoard is optional (``pip install "medcl[tensorboard]"``). Asking for it without the package
installed warns once per process, naming the extra, instead of silently writing nothing; the
JSONL curves (``metrics.jsonl``, ``curves.jsonl``) are written either way.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_WARNED: set[str] = set()


def open_tensorboard(folder: str | Path, purge_step: int | None = None) -> Any | None:
    """A ``SummaryWriter`` on ``folder``, or None (with one warning per process) when TensorBoard
    is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken tensorboard install
        if "missing" not in _WARNED:
            _WARNED.add("missing")
            warnings.warn(f"TensorBoard was asked for but is not available ({exc}); install it with "
                          "`pip install \"medcl[tensorboard]\"`. Curves are still written as JSONL.",
                          UserWarning, stacklevel=2)
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)


def numeric_items(record: Mapping[str, Any], skip: Iterable[str] = ()) -> Iterable[tuple[str, float]]:
    """The (key, value) pairs of a log record that are plain numbers (booleans and ``skip`` excluded)."""
    skipped = set(skip)
    for key, value in record.items():
        if key not in skipped and isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, float(value)


def write_curves(folder: str | Path, curves: Iterable[Mapping[str, Any]], step_key: str,
                 group_keys: Iterable[str]) -> bool:
    """Write fine-tuning curve rows as scalars ``<group>/<key>`` (group from e.g. repeat / fold /
    fraction) at ``row[step_key]``; returns False when TensorBoard is not available."""
    writer = open_tensorboard(folder)
    if writer is None:
        return False
    groups = list(group_keys)
    try:
        for row in curves:
            group = "/".join(f"{k}{row[k]:g}" if isinstance(row[k], float) else f"{k}{row[k]}" for k in groups if k in row)
            for key, value in numeric_items(row, skip=[step_key, *groups]):
                writer.add_scalar(f"{group}/{key}" if group else key, value, int(row[step_key]))
    finally:
        writer.close()
    return True
