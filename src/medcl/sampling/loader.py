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
batches are built in the training process.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
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


def one_kernel_thread() -> None:
    """Run the calling thread's torch kernels on one OpenMP thread. A producer thread that kept
    torch's team size (the compute threads' count) would oversubscribe the cores, and OpenMP teams
    that spin-wait for each other slow the training step itself (measured on 2 cores: a prefetch
    thread with 2 kernel threads made the step ~4% slower than building batches inline).
    ``torch.set_num_threads`` is process-wide; OpenMP's setting is per thread, so it is set there.
    Without OpenMP (another build), nothing changes."""
    try:
        import torch

        torch.get_num_threads()  # torch sets this thread's team size on first use: do it before overriding
        ctypes.CDLL(None).omp_set_num_threads(1)
    except (ImportError, AttributeError, OSError):
        pass


class prefetch:  # noqa: N801 - used like a function: ``with prefetch(items) as batches``
    """Iterate ``items`` one step ahead in a background thread: the next batch is built while the
    model computes on the current one (on a 2-core CPU, batch building in the training process
    costs 4-6% of a step; a worker process would compete with the compute threads, a thread
    mostly waits on numpy / torch kernels that release the GIL).

    Yields ``(item, snapshot())`` pairs, ``snapshot`` called in the producer thread right after
    the item was made (e.g. the loader's ``state_dict``: the random state *between* this batch and
    the next, which a checkpoint taken after this batch's step must record; the loader itself is
    already one batch further). ``depth`` items at most wait in the queue. The items are exactly
    those of plain iteration, in order, as long as only the producer thread draws from the
    generators that make them. An exception raised while making an item is raised in the consumer
    at that item. Use it as a context manager, so that leaving early (break, an error in the step)
    stops the producer before anything else touches the loader; ``enabled=False`` iterates inline.
    """

    _DONE = object()

    def __init__(self, items: Iterable[Any], snapshot: Callable[[], Any] | None = None, *, depth: int = 1,
                 enabled: bool = True) -> None:
        self._items, self._snapshot, self._enabled = iter(items), snapshot, enabled
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _produce(self) -> None:
        one_kernel_thread()
        try:
            for item in self._items:
                state = self._snapshot() if self._snapshot is not None else None
                if not self._put((item, state)):
                    return
            self._put(self._DONE)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(error)

    def _put(self, entry: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __enter__(self) -> Iterator[tuple[Any, Any]]:
        if not self._enabled:
            return ((item, self._snapshot() if self._snapshot is not None else None) for item in self._items)
        self._thread = threading.Thread(target=self._produce, name="medcl-prefetch", daemon=True)
        self._thread.start()
        return self._consume()

    def _consume(self) -> Iterator[tuple[Any, Any]]:
        while True:
            entry = self._queue.get()
            if entry is self._DONE:
                return
            if isinstance(entry, BaseException):
                raise entry
            yield entry

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the producer (it finishes the item it is making, then ends) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        close = getattr(self._items, "close", None)
        if close is not None:  # a generator: run its ``finally`` (e.g. the streamed loader's buffer release)
            close()
