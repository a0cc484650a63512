"""Which items form a batch: resumable, shardable batch loading without worker processes.

The trainer needs three things from a loader (the ``BatchLoader`` protocol documented in
``medcl.train.trainer``): a constant number of batches per epoch (``len``), the batches of an
epoch from any position (``epoch_batches(epoch, start)``), and its random state
(``state_dict`` / ``load_state_dict``) so that a resumed run draws exactly what the uninterrupted
run would have drawn.

:class:`IndexBatchLoader` implements it for any "list of items": each epoch is a permutation of
``range(n_items)`` seeded by (seed, epoch) and identical on every process; each global batch of
``batch_size`` items is split into ``world_size`` equal shards (the distributed sampler); a
per-process ``numpy.random.Generator`` (seeded by (seed, rank)) supplies all per-sample
randomness through ``make_batch(indices, rng)``. Batches are built lazily, one at a time, so the
saved generator state always sits exactly between two steps. The last incomplete batch of an
epoch is dropped (contrastive losses want a constant batch).

On two CPU cores, worker processes gain nothing (they compete with the compute threads), so
batches are built in the training process, between the steps. A prefetch thread that builds the
next batch during the step was measured too (commit cbd1730, reverted): slower on 2 cores (224 px
USCL 30.5-31.4 vs 32.0-32.6 images/s; U-Net step 0.49-0.53 vs 0.45-0.49 s), because the compute
threads already hold both cores and whatever runs beside them stalls their OpenMP team.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


class IndexBatchLoader:
    """Batches of item indices -> ``make_batch(indices, rng)``; see the module docstring."""

    def __init__(
        self,
        n_items: int,
        batch_size: int,
        make_batch: Callable[[np.ndarray, np.random.Generator], Any],
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        what: str = "items",
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size} invalid")
        if batch_size < world_size or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of world_size {world_size}")
        if n_items < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {n_items} {what} available; lower optim.batch_size")
        self.n_items, self.batch_size = n_items, batch_size
        self.make_batch = make_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.local_batch_size = batch_size // world_size
        self.rng = np.random.default_rng([seed, rank, 0x5EED])

    def __len__(self) -> int:
        return self.n_items // self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of items, the same on every process."""
        return np.random.default_rng([self.seed, epoch, 0x0DE5]).permutation(self.n_items)

    def batch_indices(self, epoch: int, index: int) -> np.ndarray:
        """This process's shard of global batch ``index`` of ``epoch``."""
        order = self.epoch_order(epoch)
        start = index * self.batch_size + self.rank * self.local_batch_size
        return order[start : start + self.local_batch_size]

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[Any]:
        order = self.epoch_order(epoch)
        for index in range(start, len(self)):
            begin = index * self.batch_size + self.rank * self.local_batch_size
            yield self.make_batch(order[begin : begin + self.local_batch_size], self.rng)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("store", "memory") != "memory":
            raise ValueError(f"the checkpoint was trained with the streamed loader (data.store={state['store']}); resume "
                             f"with data.store={state['store']}")
        if state.get("world_size", self.world_size) != self.world_size:
            raise ValueError(f"checkpoint loader was saved with world_size {state['world_size']}, now {self.world_size}")
        self.rng.bit_generator.state = state["rng"]
