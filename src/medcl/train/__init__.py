"""Training machinery shared by every method: the trainer (loop, checkpoints, logging, DDP).

``pretrain(config) -> run_dir`` is the Python API behind ``medcl pretrain``.
"""

from __future__ import annotations

from typing import Any


def pretrain(*args: Any, **kwargs: Any):
    """See :func:`medcl.train.api.pretrain` (imported lazily to keep ``import medcl.train`` light)."""
    from medcl.train.api import pretrain as _pretrain

    return _pretrain(*args, **kwargs)


__all__ = ["pretrain"]
