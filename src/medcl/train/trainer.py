"""The one training loop shared by every pretraining method.

    Trainer(method, loader, config, out_dir, resume=False, callbacks=()).fit() -> out_dir

- ``method``: a ``medcl.methods.base.Method`` (``training_step(batch) -> {"loss": ..., ...}``).
- ``loader``: a ``BatchLoader`` (below); ``medcl.sampling.loader.IndexBatchLoader`` is one.
- ``config``: a ``medcl.config.Config``; the trainer reads ``config.optim`` and ``config.train``
  and stores ``config.to_dict()`` in checkpoints.
- ``callbacks``: objects with step hooks (:class:`TrainerCallback`, below), e.g. to time steps.
- ``out_dir``: the run folder. It receives ``config.yaml`` (resolved), ``metrics.jsonl`` (one JSON
  object per logged step: step, epoch, lr, loss and the method's other loss terms),
  ``checkpoints/last.pt`` every ``train.checkpoint_every`` steps and at the end, plus
  ``checkpoints/final.pt`` at the end, and ``checkpoints/step-NNNNNN.pt`` every ``train.snapshot_every``
  steps when set (kept: e.g. to probe the features along the run); TensorBoard events under ``tb/``
  when installed.

Optimisation: Adam or AdamW (``optim.name``, lr, weight_decay) on all method parameters; linear
warm-up for ``optim.warmup_epochs`` then cosine decay to ``min_lr_ratio * lr`` over
``optim.max_steps`` (or ``epochs * len(loader)``) steps; bfloat16 autocast as ``train.precision``
says (``auto``: where the CPU / GPU computes bf16 natively, see :mod:`medcl.precision`; ``train.amp:
false`` forces fp32) and channels_last for 2D CNNs (``train.channels_last``). A step counts one optimiser update; ``step`` in logs and checkpoints is the number
of updates done.

Resume (``resume=True``): loads ``checkpoints/last.pt`` and continues exactly -- model, optimiser,
scheduler, every RNG state and the loader position and generator are restored, and metrics logged
after that checkpoint are dropped from ``metrics.jsonl`` -- so on CPU the resumed loss curve equals
the uninterrupted one. The world size must be the checkpoint's, unless the loader says it
``resumes_at_other_world_size`` (the streamed loader of ``data.store=shards``): each new rank then
takes the RNG and loader states of saved rank ``rank % saved_world_size`` and the loader re-divides
the rest of the interrupted epoch (what stays exact: ``medcl.sampling.streamed``). Keys added to
the shared config sections since a checkpoint was written count as equal when they hold their
default now. The config must match the checkpoint's except for ``train.*``, ``out``,
the run length (``optim.max_steps`` / ``optim.epochs``: extending a finished run re-spans the cosine)
and shared sections the method does not use (``Config.unused_sections``; older checkpoints of MixCL
runs carry USCL's defaults there).

Stop signals: SIGTERM (what schedulers such as SLURM send before killing a job) or SIGINT (Ctrl-C)
lets the current step finish, writes ``checkpoints/last.pt`` and raises :class:`TrainingInterrupted`
(``medcl pretrain`` exits with 128 + the signal number); ``--resume`` continues from there exactly.
A second signal acts at once (the default handlers are back). In distributed runs the ranks agree
on the stop each step (one all-reduce), so they all save at the same step.

Step hooks (``callbacks``): for every update, in the order given, on every rank,

- ``on_step_start(trainer, step)``: the batch of update ``step`` (1-based: the number of updates
  done once it is applied) has been built and moved to the device; its forward pass comes next.
- ``on_step_end(trainer, step, values)``: after the optimiser and scheduler step and after the
  update was logged (when ``train.log_every`` logs it); ``trainer.step == step``; ``values`` are
  the method's loss terms as logged (floats, averaged over ranks), whether or not this step is
  written to ``metrics.jsonl``.

Either method may be left out (:class:`TrainerCallback` has no-op defaults). Hooks run outside the
autocast region and must not change the method, optimiser or random states if the run is to stay
reproducible; an exception raised in a hook propagates out of :meth:`Trainer.fit` like one in the
step (nothing is checkpointed for it). The stop-signal check and the periodic checkpoint follow
``on_step_end``. Example, the seconds of every step (``benchmarks/throughput.py`` times steps so)::

    class StepTimes(TrainerCallback):
        def on_step_start(self, trainer, step):
            self.started = time.perf_counter()

        def on_step_end(self, trainer, step, values):
            print(step, values["loss"], time.perf_counter() - self.started)

    Trainer(method, loader, config, out_dir, callbacks=[StepTimes()]).fit()

Divergence: a non-finite loss stops training with :class:`TrainingDiverged` before the step is
applied; so do weights (parameters or floating-point buffers) holding NaN / Inf after an update
(checked every step with one fused norm: 3 ms, 0.5% of a 112 px batch-32 ResNet-18 step on a
2-core AMD EPYC), an update that overflows inside the optimiser (e.g. ``optim.lr=1e38``) and an
optimiser state that is no longer finite when a checkpoint is due. Nothing of the diverged update
is written: ``checkpoints/last.pt`` stays the last finite state, and the message names it with its
step (or says that none was written). A loss that stops improving for :data:`STALL_STEPS` steps
while the weight norm grows more than :data:`NORM_GROWTH` times its value at the start warns once
(:class:`DivergenceWarning`): such a run ends "successfully" with useless weights otherwise.

Run folder: ``fit`` holds :func:`medcl.runfolder.run_lock` on ``out_dir`` (rank 0; the ranks agree
on the outcome) for the whole run, so a second process writing the same folder is refused at once
with the holder's pid; temporary checkpoint files left by a process killed while writing
(``checkpoints/.last.pt.PID.tmp``) are deleted when a run starts or resumes.

Distributed (``world_size > 1``, torch.distributed initialised, e.g. under torchrun): the method is
wrapped in DistributedDataParallel, the loader must shard batches by rank, only rank 0 writes
files, logged values are averaged over ranks, and checkpoints hold every rank's RNG/loader state.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import statistics
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from medcl.environment import resolve_device, write_environment
from medcl.runfolder import RunFolderError, run_lock
from medcl.precision import autocast, channels_last, is_2d_cnn, make_optimizer, resolve_precision
from medcl.train.checkpoint import rng_state, set_rng_state
from medcl.train.scalars import numeric_items, open_tensorboard
from medcl.weights import (
    CHECKPOINT_FORMAT,
    describe_non_finite,
    first_non_finite,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)

if TYPE_CHECKING:
    from medcl.config import Config
    from medcl.methods.base import Method


class BatchLoader(Protocol):
    """What the trainer needs from a loader."""

    def __len__(self) -> int:  # batches per epoch, constant
        ...

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[Any]:  # from batch ``start`` on
        ...

    def state_dict(self) -> dict[str, Any]:  # random state between two batches
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/Inf; the message names the step and the last good checkpoint."""


class DivergenceWarning(UserWarning):
    """The loss stopped improving while the weight norm exploded: the run is probably diverging."""


# The divergence warning: the median loss of the last STALL_STEPS steps is not STALL_TOLERANCE
# lower than that of the STALL_STEPS before, while the weight norm is NORM_GROWTH times (or more)
# its value before the first update of this process. Healthy runs grow the norm by a few times at
# most; an exploding learning rate grows it by orders of magnitude within a few steps.
STALL_STEPS = 10
STALL_TOLERANCE = 0.01
NORM_GROWTH = 100.0


class DivergenceWatch:
    """Watches (loss, weight norm) per step and returns the warning text once, when the loss has
    stopped improving for ``steps`` steps while the weight norm exploded (see the constants)."""

    def __init__(self, initial_norm: float, steps: int = STALL_STEPS, tolerance: float = STALL_TOLERANCE,
                 growth: float = NORM_GROWTH) -> None:
        self.initial_norm, self.steps, self.tolerance, self.growth = initial_norm, steps, tolerance, growth
        self.losses: list[float] = []
        self.warned = False

    def update(self, step: int, loss: float, norm: float) -> str | None:
        self.losses = (self.losses + [loss])[-2 * self.steps:]
        exploded = self.initial_norm > 0 and norm >= self.growth * self.initial_norm
        if self.warned or len(self.losses) < 2 * self.steps or not exploded:
            return None
        before, recent = (statistics.median(self.losses[:self.steps]), statistics.median(self.losses[self.steps:]))
        if recent < before - self.tolerance * abs(before):
            return None
        self.warned = True
        return (f"the loss stopped improving (median {recent:.4g} over steps {step - self.steps + 1}-{step}, "
                f"{before:.4g} over the {self.steps} steps before: less than {self.tolerance:.0%} lower) while the "
                f"weight norm grew from {self.initial_norm:.3g} to {norm:.3g} (more than {self.growth:g} times): the run "
                "is probably diverging; lower optim.lr")


def start_backbone(method: Method, init: str, backbone: str) -> None:
    """``model.init``: the method's backbone starts from the weights at ``init`` (anything an
    ``--init`` accepts: checkpoint, run folder, export, torchvision / timm resnet18 state dict)."""
    from medcl.weights import InitSpec, load_init

    loaded = load_init(InitSpec("model.init", init))
    if loaded.architecture != backbone:
        raise ValueError(f"model.init={init}: a {loaded.architecture!r} backbone, but model.backbone is {backbone!r}")
    method.start_backbone_from(loaded.network.state_dict(), init)


class TrainerCallback:
    """Step hooks of :class:`Trainer` (see the module docstring); subclass and override either."""

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        """The batch of update ``step`` is on the device; the forward pass comes next."""

    def on_step_end(self, trainer: Trainer, step: int, values: dict[str, float]) -> None:
        """Update ``step`` is applied (and logged); ``values``: the loss terms as logged."""


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def snapshot_name(step: int) -> str:
    """The file name of the snapshot ``train.snapshot_every`` keeps at ``step`` (under ``checkpoints/``)."""
    return f"step-{step:06d}.pt"


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr for update ``step`` (0-based): linear warm-up, then cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainingInterrupted(RuntimeError):
    """A stop signal arrived; the run was checkpointed at ``step`` (``path``) and can be resumed."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"{signal.Signals(signum).name} received: checkpoint at step {step} written to {path};"
                         " continue with --resume")


@contextlib.contextmanager
def _stop_requests(received: list[int]) -> Iterator[None]:
    """While active, SIGTERM / SIGINT append their number to ``received`` instead of killing; the
    first one also restores the previous handlers, so a second signal acts at once."""
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield
        return
    previous: dict[int, Any] = {}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        previous.clear()

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        restore()

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        restore()


class Trainer:
    """Optimise ``method`` on ``loader`` as ``config`` says; see the module docstring."""

    def __init__(
        self,
        method: Method,
        loader: BatchLoader,
        config: Config,
        out_dir: str | Path,
        *,
        resume: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
        callbacks: Sequence[TrainerCallback] = (),
    ) -> None:
        self.method, self.loader, self.config = method, loader, config
        self.callbacks = list(callbacks)
        self.out_dir = Path(out_dir)
        self.resume, self.rank, self.world_size = resume, rank, world_size
        self.device = torch.device(device) if device is not None else resolve_device(config.train.device)
        self.is_main = rank == 0
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.last_path = self.ckpt_dir / "last.pt"
        self.metrics_path = self.out_dir / "metrics.jsonl"

        self.steps_per_epoch = len(loader)
        if self.steps_per_epoch < 1:
            raise ValueError("the loader yields no batch per epoch (fewer items than optim.batch_size?)")
        optim = config.optim
        self.total_steps = optim.max_steps or optim.epochs * self.steps_per_epoch
        self.warmup_steps = min(self.total_steps, round(optim.warmup_epochs * self.steps_per_epoch))

        init = getattr(config.model, "init", None) if config.model is not None else None
        if init and not resume:  # a resumed run takes its backbone from the checkpoint
            start_backbone(self.method, init, config.model.backbone)
        self.method.to(self.device)
        self.autocast_dtype = resolve_precision(config.train.precision if config.train.amp else "fp32", self.device)
        self.channels_last = bool(config.train.channels_last and is_2d_cnn(self.method))
        if self.channels_last:  # before DDP and the optimiser see the parameters
            channels_last(self.method)
        self.model: torch.nn.Module = self.method
        if world_size > 1:
            if config.train.sync_batchnorm:
                self.method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.method)  # type: ignore[assignment]
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.method, device_ids=ids)
        self.optimizer = make_optimizer(optim.name, self.method.parameters(), lr=optim.lr,
                                        weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.warmup_steps, self.total_steps, optim.min_lr_ratio)
        )
        self.step = 0
        self.saved_step: int | None = None  # step of the newest checkpoint on disk
        self._watch: DivergenceWatch | None = None
        self._tb = None
        self._signals: list[int] = []  # stop signals received while fitting

    def _stop_signal(self) -> int:
        """The stop signal to act on now (0 = none); every rank gets the same answer."""
        signum = self._signals[0] if self._signals else 0
        if self.world_size > 1:
            flag = torch.tensor([signum], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        return signum

    # ----------------------------------------------------------------- checkpoints
    def _gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def checkpoint(self) -> dict[str, Any]:
        rngs = self._gather(rng_state())
        loaders = self._gather(self.loader.state_dict())
        return {
            "format": CHECKPOINT_FORMAT,
            "method": self.config.method,
            "config": self.config.to_dict(),
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "rng": rngs[0],
            "rng_per_rank": rngs,
            "loader": loaders[0],
            "loader_per_rank": loaders,
            "world_size": self.world_size,
            "backbone": self.method.backbone_info(),
            "metadata": dict(getattr(self.method, "metadata", {})),
        }

    def save(self, *names: str) -> None:
        ckpt = self.checkpoint()  # collective in distributed runs: every rank calls it
        # the weights were checked after the update; the optimiser state is checked here, once per save
        moments = {f"optimizer.state.{i}.{k}": v for i, state in ckpt["optimizer"]["state"].items()
                   for k, v in state.items()}
        bad = first_non_finite(moments)
        if bad is not None:
            raise TrainingDiverged(f"{describe_non_finite(bad, moments[bad])} at step {self.step}: the optimiser's "
                                   f"state is no longer finite, so it was not saved. {self._last_good()}")
        if self.is_main:
            for name in names:
                save_checkpoint(self.ckpt_dir / name, ckpt)
        self.saved_step = self.step

    def _restore(self) -> None:
        ckpt = load_checkpoint(self.last_path, map_location=self.device)
        if ckpt["method"] != self.config.method:
            raise ValueError(f"{self.last_path}: method {ckpt['method']!r}, but config says {self.config.method!r}")
        # sections the method does not use had no effect (checkpoints written before sections became
        # per-method carry USCL's defaults in a MixCL run's config): they never block a resume
        ignore = ("train", "out", "optim.max_steps", "optim.epochs", *self.config.unused_sections())
        diffs = _config_differences(_with_added_defaults(ckpt["config"], self.config.to_dict()), self.config.to_dict(),
                                    ignore=ignore)
        if diffs:
            raise ValueError(f"{self.last_path}: cannot resume with a different configuration: " + "; ".join(diffs))
        saved_world = int(ckpt.get("world_size", 1))
        if saved_world != self.world_size and not getattr(self.loader, "resumes_at_other_world_size", False):
            raise ValueError(f"{self.last_path}: saved with world_size {saved_world}, now {self.world_size} (only "
                             "the streamed loader, data.store=shards, resumes at another world size)")
        self.method.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = self.saved_step = int(ckpt["step"])
        # at another world size a new rank continues from a saved rank's states; the loader then
        # re-divides the rest of the epoch (medcl.sampling.streamed: what stays exact)
        set_rng_state(ckpt["rng_per_rank"][self.rank % saved_world])
        self.loader.load_state_dict(ckpt["loader_per_rank"][self.rank % saved_world])
        if self.is_main and self.metrics_path.is_file():  # drop what was logged after this checkpoint
            kept = [ln for ln in self.metrics_path.read_text().splitlines() if _logged_step(ln) <= self.step]
            self.metrics_path.write_text("".join(ln + "\n" for ln in kept))

    # ----------------------------------------------------------------- logging
    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in numeric_items(record, skip=("step", "epoch")):
                self._tb.add_scalar(key, value, record["step"])

    def _open_tensorboard(self) -> None:
        if not (self.is_main and self.config.train.tensorboard):
            return
        self._tb = open_tensorboard(self.out_dir / "tb", purge_step=self.step + 1 if self.step else None)

    def _reduce(self, values: dict[str, Tensor]) -> dict[str, float]:
        keys = sorted(values)
        stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])
        if self.world_size > 1:
            torch.distributed.all_reduce(stacked)
            stacked /= self.world_size
        return dict(zip(keys, stacked.tolist()))

    # ----------------------------------------------------------------- loop
    def fit(self) -> Path:
        """Train to ``total_steps`` (from the last checkpoint when resuming); returns ``out_dir``.

        Holds the run folder's lock throughout (see the module docstring)."""
        with self._run_folder():
            return self._fit()

    @contextlib.contextmanager
    def _run_folder(self) -> Iterator[None]:
        """Rank 0 locks ``out_dir`` and checks it may be written; every rank gets the same outcome."""
        with contextlib.ExitStack() as stack:
            error: Exception | None = None
            if self.is_main:
                try:
                    stack.enter_context(run_lock(self.out_dir, "medcl pretrain"))
                    if not self.resume and self.last_path.exists():
                        raise FileExistsError(f"{self.out_dir} already holds a run ({self.last_path}); "
                                              "pass --resume or choose another out")
                    remove_stale_temporaries(self.ckpt_dir, all_stale=True)  # only lock holders write here
                except OSError as exc:  # in use, already holds a run, not writable: no rank may start
                    error = exc
            if self.world_size > 1:
                flag = torch.tensor([int(error is not None)], device=self.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                if flag.item() and error is None:
                    error = RunFolderError(f"{self.out_dir}: rank 0 may not write this run folder (see its message)")
            if error is not None:
                raise error
            yield

    def _fit(self) -> Path:
        if self.resume:
            if not self.last_path.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint at {self.last_path}")
            self._restore()
        if self.is_main:
            (self.out_dir / "config.yaml").write_text(self.config.to_yaml())
            write_environment(self.out_dir, {
                "device": str(self.device), "channels_last": self.channels_last,
                # what train.precision resolved to on this machine (auto: bf16 where native)
                "precision": "fp32" if self.autocast_dtype is None else str(self.autocast_dtype).replace("torch.", "")})
            if not self.resume:
                self.metrics_path.write_text("")
        self._open_tensorboard()

        self.method.train()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=(not self.is_main or not self.config.train.progress) or None,
                   desc=f"pretrain {self.config.method}", unit="step", dynamic_ncols=True)
        started, start_step = time.perf_counter(), self.step
        self._signals.clear()
        self._watch = DivergenceWatch(self._weight_norm())
        try:
            with _stop_requests(self._signals):
                while self.step < self.total_steps:
                    epoch, first = divmod(self.step, self.steps_per_epoch)
                    for batch in self.loader.epoch_batches(epoch, start=first):
                        lr = self.scheduler.get_last_lr()[0]  # the rate this update uses
                        batch = move_to(batch, self.device)
                        self._call("on_step_start", self.step + 1)
                        values = self._train_step(batch, epoch)
                        self.step += 1
                        bar.update(1)
                        bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
                        if self.step % self.config.train.log_every == 0 or self.step == self.total_steps:
                            elapsed = time.perf_counter() - started
                            self._log({"step": self.step, "epoch": epoch, "lr": lr, **values,
                                       "steps_per_s": (self.step - start_step) / max(elapsed, 1e-9)})
                        self._call("on_step_end", self.step, dict(values))
                        if self.step == self.total_steps:
                            break
                        signum = self._stop_signal()
                        if signum:
                            self.save("last.pt")
                            raise TrainingInterrupted(signum, self.step, self.last_path)
                        names = ["last.pt"] if self.step % self.config.train.checkpoint_every == 0 else []
                        snapshot = self.config.train.snapshot_every
                        if snapshot and self.step % snapshot == 0:
                            names.append(snapshot_name(self.step))
                        if names:
                            self.save(*names)
                self.save("last.pt", "final.pt")
                if self.is_main:
                    warn_if_batchnorm_unsettled(self.method, self.step)
        finally:
            bar.close()
            if self._tb is not None:
                self._tb.close()
        return self.out_dir

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self, *args)

    def _train_step(self, batch: Any, epoch: int) -> dict[str, float]:
        if self.channels_last:
            batch = channels_last(batch)
        with autocast(self.device, self.autocast_dtype):
            losses = self.model(batch)
        if "loss" not in losses:
            raise KeyError(f"{type(self.method).__name__}.training_step must return a 'loss' key, got {sorted(losses)}")
        values = self._reduce(losses)
        step = self.step + 1
        if not math.isfinite(values["loss"]):
            raise TrainingDiverged(f"loss is {values['loss']} at step {step} (epoch {epoch}); training stopped before "
                                   f"applying it. {self._last_good()}")
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        try:
            self.optimizer.step()
        except RuntimeError as exc:  # e.g. Adam's step size lr / (1 - beta1^t) beyond float range
            if "overflow" not in str(exc):
                raise
            raise TrainingDiverged(f"the update of step {step} (epoch {epoch}) overflowed in the optimiser "
                                   f"(lr {self.optimizer.param_groups[0]['lr']:g}: {exc}). {self._last_good()}") from None
        self.scheduler.step()
        norm = self._weight_norm()
        if not math.isfinite(norm):  # NaN / Inf somewhere, or finite weights so large that their squares overflow
            state = self.method.state_dict()
            bad = first_non_finite(state)
            if bad is not None:
                raise TrainingDiverged(
                    f"the weights became non-finite in the update of step {step} (epoch {epoch}; its loss was "
                    f"{values['loss']:.4g}): {describe_non_finite(bad, state[bad])}; training stopped and nothing "
                    f"of this update was saved. {self._last_good()}")
            norm = float(torch.nn.utils.get_total_norm([p.detach().double() for p in self.method.parameters()]))
        message = self._watch.update(step, values["loss"], norm) if self._watch is not None else None
        if message and self.is_main:
            warnings.warn(f"step {step}: {message}", DivergenceWarning, stacklevel=2)
        return values

    def _weight_norm(self) -> float:
        """L2 norm of all parameters, NaN / Inf when any parameter or floating-point buffer is not
        finite: one fused reduction per step (the only host sync is ``.tolist()``)."""
        params = [p.detach() for p in self.method.parameters()]
        buffers = [b for b in self.method.buffers() if b.is_floating_point()]
        norms = torch.stack([torch.nn.utils.get_total_norm(params).float().to(self.device),
                             torch.nn.utils.get_total_norm(buffers).float().to(self.device)]).tolist()
        return norms[0] if math.isfinite(norms[1]) else math.nan

    def _last_good(self) -> str:
        if self.saved_step is None:
            return "No checkpoint was written before (none to fall back to). Lower optim.lr or check the data."
        return (f"Last good checkpoint: {self.last_path} (step {self.saved_step}), finite and unchanged. "
                "Lower optim.lr or check the data.")


def _logged_step(line: str) -> float:
    """Step of a metrics.jsonl line; a line cut short by a kill counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _with_added_defaults(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with the keys added to the shared sections since it was written (absent there)
    taken from ``current`` when they hold their default there: they had that effect then."""
    from medcl.config import SHARED_SECTIONS

    saved = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for name, section in SHARED_SECTIONS.items():
        if not isinstance(saved.get(name), dict) or not isinstance(current.get(name), dict):
            continue
        defaults = section().model_dump(mode="json")
        for key, value in current[name].items():
            if key not in saved[name] and value == defaults.get(key):
                saved[name][key] = value
    return saved


def _config_differences(saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if f"{prefix}{key}" in ignore:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_differences(a, b, ignore, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return diffs


# BatchNorm's running statistics move 10% per step (momentum 0.1) from their initial variance of 1,
# far from the true variance of early layers (~1e-3 on [0, 1] ultrasound frames): after fewer than
# ~100 updates they are still off by several times, and every later use of the backbone in eval
# mode (frozen layers in fine-tuning, linear probes, Grad-CAM) computes mis-scaled features.
BATCHNORM_SETTLE_STEPS = 100


def warn_if_batchnorm_unsettled(model: torch.nn.Module, steps: int) -> bool:
    """Warn (and return True) when ``model`` has BatchNorm layers updated fewer than
    ``BATCHNORM_SETTLE_STEPS`` times."""
    has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not has_batchnorm or steps >= BATCHNORM_SETTLE_STEPS:
        return False
    warnings.warn(
        f"training stopped after {steps} steps: BatchNorm running statistics need about "
        f"{BATCHNORM_SETTLE_STEPS} steps to settle, so the saved backbone will compute mis-scaled features "
        "in eval mode (frozen fine-tuning, linear probes). Train longer (optim.epochs / optim.max_steps).",
        UserWarning,
        stacklevel=2,
    )
    return True
