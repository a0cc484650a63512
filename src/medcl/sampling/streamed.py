"""Streamed frame-set batches from WebDataset shards, with bounded memory per process.

The loader of the frame-set methods (USCL, SimCLR, MoCo, supervised) when ``data.store`` resolves
to ``shards`` (:func:`medcl.sampling.pairs.frame_set_loader` dispatches here); the in-memory
:class:`~medcl.sampling.loader.IndexBatchLoader` path stays the one for small corpora. It follows
the trainer's ``BatchLoader`` protocol (``len``, ``epoch_batches(epoch, start)``, ``state_dict``
/ ``load_state_dict``) and builds the same batches as :class:`~medcl.sampling.pairs.PairGenerator`.

An epoch, on each of ``world_size`` processes:

1. Shard order: a permutation of the shards seeded by (seed, epoch), the same on every process.
   Their videos, in that order, form the epoch's sequence (the shards are written in a hashed
   order, so each is a mix of the corpus: :mod:`medcl.data.shards`).
2. Rank share: the sequence is cut into ``world_size`` contiguous, equal parts (``n // W`` videos
   each); rank r streams part r. The shares are disjoint in videos; a shard is read by one rank,
   except at most ``W - 1`` shards on the cuts, whose videos are split between two neighbouring
   ranks (each seeks to its own). Equal shares rather than whole shards per rank: DDP needs every
   rank to take the same number of steps, and whole shards would leave ranks with unequal
   counts, so each epoch would have to drop up to a shard of videos per rank (or repeat some).
3. Shuffle buffer: a rank holds at most ``buffer_size`` whole videos. It fills the buffer from
   its stream, takes the ``B / W`` videos of its next batch at random out of it (a schedule RNG
   seeded by (seed, epoch, rank, W)), renders the batch, releases those videos and refills. A
   video therefore enters at most one batch per epoch: every batch holds at most one positive
   pair per video (USCL's I1) and no video is in two batches of an epoch, on any rank.
4. Length: ``n // B`` batches per epoch, as in memory (``B`` = ``optim.batch_size``); the videos
   left in a rank's buffer at the end of its share (fewer than ``B / W`` plus the rounding of
   ``n / W``) wait for the next epoch, which shuffles anew. With ``n`` a multiple of ``B`` every
   video is seen exactly once per epoch.

``sampling.pairing=frame`` (SimCLR's vanilla pairs) draws one anchor frame per video of the batch:
the views are SimCLR's, but a streamed epoch visits each video once (not each frame), and a batch
never holds two frames of one video.

Resume. The buffer's choices come from their own seeded RNG, so the videos of any batch are a
function of (seed, epoch, rank, W, buffer size, index) alone: ``epoch_batches(epoch, start)``
replays the schedule of the first ``start`` batches on video indices only (no frame is read),
loads the videos then in the buffer and continues. The state (``state_dict``) holds the
per-process augmentation RNG (the one :class:`IndexBatchLoader` keeps too), the epoch and the
position in it; so at the same world size a resumed run draws exactly the batches of the
uninterrupted one. At another world size (the trainer allows it for this loader): the videos of
the interrupted epoch's first ``start`` batches (on the old ranks) are known from the replay and
are not drawn again; the rest of that epoch is shared among the new ranks as above (every video at
most once in the epoch still), and every later epoch is what a run at the new world size would
draw. What then differs from an uninterrupted run: which videos meet in a batch and the
augmentation draws (each new rank's augmentation RNG is seeded from (seed, rank, resume point)).

Memory: ``held`` counts the videos in memory (buffer + batch being rendered) and ``max_held``
its peak, which never exceeds ``buffer_size``; the tests assert it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from medcl.data.shards import ShardStore, ShardVideo
from medcl.sampling.augment import AugmentParams

if TYPE_CHECKING:
    from medcl.config import Config

STORE = "shards"  # the loader state's "store": checkpoints of the in-memory loader are refused


@dataclass
class PairRecipe:
    """Everything a :class:`~medcl.sampling.pairs.PairGenerator` needs besides the frames: renders
    the batch of a few videos. ``generator``: the class (given by ``pairs``, which imports this module)."""

    generator: Callable[..., Any]  # medcl.sampling.pairs.PairGenerator (passed in: pairs imports this module)
    pairing: str = "video"
    mixup: str = "paper"
    alpha: float = 0.5
    beta: float = 0.5
    size: int = 224
    channels: int = 1
    augment: AugmentParams | None = None
    device: torch.device | str = "cpu"
    frame_shape: tuple[int, int] | None = None  # the corpus' frame size: every batch is resized to it

    def make_batch(self, frames: list[np.ndarray], targets: np.ndarray, videos: np.ndarray,
                   rng: np.random.Generator) -> dict[str, Tensor]:
        """The batch of these videos (one item each), ``"video"`` holding their global indices."""
        generator = self.generator(frames, targets, pairing=self.pairing, mixup=self.mixup, alpha=self.alpha,
                                  beta=self.beta, size=self.size, channels=self.channels, augment=self.augment,
                                  device=self.device, frame_shape=self.frame_shape)
        if self.pairing == "video":
            items = np.arange(len(frames))
        else:  # one anchor frame per video
            items = generator.offsets + rng.integers(generator.counts)
        batch = generator.make_batch(items, rng)
        batch["video"] = torch.as_tensor(np.asarray(videos, dtype=np.int64))
        return batch


class BufferSchedule:
    """Which videos form each batch of one rank's epoch: ids only, no frames (module docstring, step 3)."""

    def __init__(self, stream: np.ndarray, buffer_size: int, local_batch: int, rng: np.random.Generator) -> None:
        self.stream, self.buffer_size, self.local_batch, self.rng = stream, buffer_size, local_batch, rng
        self.position = 0
        self.buffer: list[int] = []

    def fill(self) -> None:
        room = self.buffer_size - len(self.buffer)
        self.buffer.extend(int(v) for v in self.stream[self.position : self.position + room])
        self.position += min(room, len(self.stream) - self.position)

    def take(self) -> list[int]:
        """Fill, then take the next batch's videos out of the buffer at random."""
        self.fill()
        taken = []
        for _ in range(self.local_batch):
            i = int(self.rng.integers(len(self.buffer)))
            taken.append(self.buffer[i])
            self.buffer[i] = self.buffer[-1]
            self.buffer.pop()
        return taken


class StreamedFrameSetLoader:
    """Batches of ``batch_size`` videos (global) streamed from shards; see the module docstring.

    ``videos``: the videos to train on (their index here is the batch's ``"video"``), ``targets``
    their class index (-1 = unlabeled), ``recipe`` renders a batch.
    """

    resumes_at_other_world_size = True  # the trainer lets a checkpoint of another world size resume

    def __init__(self, store: ShardStore, videos: list[ShardVideo], targets: np.ndarray, batch_size: int,
                 recipe: PairRecipe, *, buffer_size: int = 256, seed: int = 0, rank: int = 0, world_size: int = 1,
                 what: str = "videos", read_workers: int = 0) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size} invalid")
        if batch_size < world_size or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of world_size {world_size}")
        if len(videos) < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {len(videos)} {what} available; lower optim.batch_size")
        if len(videos) != len(targets):
            raise ValueError(f"{len(videos)} videos but {len(targets)} targets")
        self.local_batch_size = batch_size // world_size
        if buffer_size < self.local_batch_size:
            raise ValueError(f"data.shuffle_buffer={buffer_size} is smaller than the {self.local_batch_size} videos of "
                             f"one process's batch (optim.batch_size {batch_size} / {world_size} processes); raise it")
        if read_workers < 0:
            raise ValueError(f"data.read_workers must be >= 0, got {read_workers}")
        self.store, self.videos, self.recipe = store, videos, recipe
        self.read_workers = read_workers
        self.targets = np.asarray(targets, dtype=np.int64)
        self.batch_size, self.buffer_size = batch_size, buffer_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        shard_number = {name: i for i, name in enumerate(store.shards)}
        by_shard: list[list[int]] = [[] for _ in store.shards]
        for i, video in enumerate(videos):
            by_shard[shard_number[video.shard]].append(i)
        self.shard_videos = [np.asarray(v, dtype=np.int64) for v in by_shard]
        self.rng = np.random.default_rng([seed, rank, 0x5EED])
        self.epoch, self.position = 0, 0  # the next batch to yield
        self.held = self.max_held = 0  # videos in memory now / at most (module docstring: memory)
        self._count_lock = threading.Lock()
        self._resume_from: tuple[int, int, int] | None = None  # (world size, epoch, start) of a checkpoint

    def __len__(self) -> int:
        return len(self.videos) // self.batch_size

    # ------------------------------------------------------------- the schedule (no frames)
    def epoch_sequence(self, epoch: int) -> np.ndarray:
        """Every video of the epoch, shard after shard in the epoch's shard order (same on every rank)."""
        order = np.random.default_rng([self.seed, epoch, 0x5A4D]).permutation(len(self.shard_videos))
        return np.concatenate([self.shard_videos[s] for s in order] or [np.zeros(0, np.int64)])

    @staticmethod
    def share(sequence: np.ndarray, rank: int, world_size: int) -> np.ndarray:
        """Rank ``rank``'s contiguous, equal part of ``sequence``."""
        each = len(sequence) // world_size
        return sequence[rank * each : (rank + 1) * each]

    def schedule(self, epoch: int, rank: int, world_size: int) -> BufferSchedule:
        stream = self.share(self.epoch_sequence(epoch), rank, world_size)
        rng = np.random.default_rng([self.seed, epoch, rank, world_size, 0xB0F])
        return BufferSchedule(stream, self.buffer_size, self.batch_size // world_size, rng)

    def consumed(self, epoch: int, start: int, world_size: int) -> np.ndarray:
        """The videos of the first ``start`` batches of ``epoch`` at ``world_size``, all ranks together."""
        taken: list[int] = []
        for rank in range(world_size):
            schedule = self.schedule(epoch, rank, world_size)
            for _ in range(start):
                taken += schedule.take()
        return np.asarray(taken, dtype=np.int64)

    def _epoch_schedule(self, epoch: int, start: int) -> tuple[BufferSchedule, int]:
        """This rank's schedule for ``epoch`` and how many of its batches to replay before ``start``."""
        resume, self._resume_from = self._resume_from, None
        if resume is None or resume[0] == self.world_size or start == 0 or (epoch, start) != resume[1:]:
            return self.schedule(epoch, self.rank, self.world_size), start
        # resumed at another world size in the middle of an epoch: share what the old ranks left
        sequence = self.epoch_sequence(epoch)
        rest = sequence[~np.isin(sequence, self.consumed(epoch, start, resume[0]))]  # in stream order
        rng = np.random.default_rng([self.seed, epoch, self.rank, self.world_size, start, 0xB0F])
        return BufferSchedule(self.share(rest, self.rank, self.world_size), self.buffer_size, self.local_batch_size,
                              rng), 0

    # ------------------------------------------------------------- batches
    def _read(self, video: int) -> np.ndarray:
        frames = self.store.read(self.videos[video])
        with self._count_lock:  # reader threads count too
            self.held += 1
            self.max_held = max(self.max_held, self.held)
        return frames

    def _release(self, n: int) -> None:
        with self._count_lock:
            self.held -= n

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, Tensor]]:
        """The batches of ``epoch`` from ``start``. With ``read_workers`` threads, the videos that
        enter the buffer are read in the background (while the model computes the step); the batches
        are the same as without (the schedule, not the reading order, decides them)."""
        schedule, replay = self._epoch_schedule(epoch, start)
        for _ in range(replay):
            schedule.take()
        held: dict[int, Any] = {}  # video -> frames, or the Future reading them
        pool = ThreadPoolExecutor(self.read_workers, thread_name_prefix="medcl-shard-read") if self.read_workers else None

        def fill() -> None:
            schedule.fill()
            for video in schedule.buffer:
                if video not in held:
                    held[video] = pool.submit(self._read, video) if pool is not None else self._read(video)

        try:
            if start < len(self):
                fill()
            for index in range(start, len(self)):
                taken = schedule.take()
                frames = [held.pop(v) for v in taken]
                frames = [f.result() if isinstance(f, Future) else f for f in frames]
                batch = self.recipe.make_batch(frames, self.targets[taken], np.asarray(taken), self.rng)
                del frames
                self._release(len(taken))
                self.epoch, self.position = epoch, index + 1
                if index + 1 < len(self):
                    fill()  # the next batch's newcomers: read by the workers while the model uses this batch
                yield batch
        finally:  # the trainer stopped early, or the epoch ended: what the buffer holds is let go
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            self._release(sum(1 for v in held.values()
                              if not isinstance(v, Future) or (not v.cancelled() and v.exception() is None)))
            held.clear()
            self.store.close()

    # ------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"store": STORE, "rng": self.rng.bit_generator.state, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "buffer_size": self.buffer_size, "n_videos": len(self.videos),
                "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("store", "memory") != STORE:
            raise ValueError("the checkpoint was trained with the in-memory loader (data.store=memory); resume with "
                             "data.store=memory")
        for key, now in (("n_videos", len(self.videos)), ("buffer_size", self.buffer_size)):
            if state.get(key) != now:
                raise ValueError(f"the checkpoint's streamed loader had {key} {state.get(key)}, now {now}: the batches "
                                 "cannot continue where they stopped")
        epoch, position = int(state["epoch"]), int(state["position"])
        if state["world_size"] == self.world_size:
            self.rng.bit_generator.state = state["rng"]
            self.epoch, self.position = epoch, position
            return
        if position >= len(self):
            epoch, position = epoch + 1, 0
        self._resume_from = (int(state["world_size"]), epoch, position)
        self.rng = np.random.default_rng([self.seed, self.rank, 0x5EED, epoch, position])


def streamed_frame_set_loader(config: Config, generator: Callable[..., Any], device: torch.device, *,
                              rank: int = 0, world_size: int = 1,
                              labeled_only: bool = False) -> tuple[StreamedFrameSetLoader, PairRecipe, list[str]]:
    """The streamed counterpart of :func:`medcl.sampling.pairs.frame_set_loader`: (loader, recipe, classes).
    ``generator``: :class:`~medcl.sampling.pairs.PairGenerator`; ``device``: where batches are augmented.

    Labels come from the manifest, in its row order, exactly as the in-memory path selects them
    (``data.label_fraction`` per class, seeded by ``data.label_seed``); the shard index must
    describe that manifest (:meth:`ShardStore.check_matches`). No frame is read here.
    """
    from medcl.data.manifest import MANIFEST_NAME, read_manifest
    from medcl.data.shards import shards_folder
    from medcl.data.splits import label_targets, select_labeled_videos

    root = shards_folder(config.data.manifest).parent
    manifest = root / MANIFEST_NAME
    store = ShardStore(root)
    store.check_matches(manifest)
    records = read_manifest(manifest)
    located = {v.video_id: v for v in store.videos}
    labels = [r.label for r in records]
    classes = sorted({label for label in labels if label})
    targets = label_targets(labels, classes, select_labeled_videos(labels, config.data.label_fraction,
                                                                   config.data.label_seed))
    keep = np.flatnonzero(targets >= 0) if labeled_only else np.arange(len(records))
    if labeled_only and len(keep) == 0:
        raise ValueError(f"{manifest}: no labeled video; this method needs labels")
    sampling = config.sampling
    recipe = PairRecipe(generator, pairing=sampling.pairing, mixup=sampling.mixup, alpha=sampling.alpha,
                        beta=sampling.beta, size=config.data.size, channels=config.data.in_channels,
                        augment=AugmentParams.from_config(config.augment), device=device,
                        frame_shape=store.frame_shape())
    loader = StreamedFrameSetLoader(store, [located[records[int(i)].video_id] for i in keep], targets[keep],
                                    config.optim.batch_size, recipe, buffer_size=config.data.shuffle_buffer,
                                    seed=config.train.seed, rank=rank, world_size=world_size,
                                    what=f"videos in {store.index_path}", read_workers=config.data.read_workers)
    return loader, recipe, classes
