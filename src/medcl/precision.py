"""Mixed precision and memory format, decided once for every compute path.

``precision: auto | fp32 | bf16`` (``train.precision`` in pretraining configs, ``--precision`` in
fine-tuning, prediction and the report):

- ``auto`` (default): bfloat16 autocast where the hardware computes bf16 natively (CPUs with
  AVX512-BF16 or AMX, CUDA GPUs that support bf16), fp32 elsewhere: emulated bf16 on an older CPU
  is slower than fp32, and a CPU-only machine without it gets exactly the fp32 results;
- ``fp32``: no autocast;
- ``bf16``: autocast even where it is emulated (for checking numerics, not speed).

Under autocast, matrix products and convolutions run in bf16 while reductions, losses and the
optimiser stay in fp32 (PyTorch's autocast policy); weights stay fp32. 2D CNNs also use the
channels_last memory format (:func:`channels_last`), which the CPU convolution kernels prefer.
Whether the CPU has native bf16 is recorded in every run's ``environment.json``.

Every optimiser (pretraining, fine-tuning, segmentation) comes from :func:`make_optimizer`: the
fused single-pass update where PyTorch has one for the parameters' device (CPU, CUDA): the same
algorithm as the default per-tensor loop (worth ~1% of a ResNet-18 step on 2 CPU cores, measured in
benchmarks/results/throughput.md; more where the optimiser is a larger share of the step).
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The native-bf16 instruction sets this CPU advertises (Linux /proc/cpuinfo flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def native_bf16(device: torch.device | str) -> bool:
    """True when ``device`` computes bf16 natively (so autocast pays)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_bf16_flags())
    return False


def resolve_precision(precision: str, device: torch.device | str, module: nn.Module | None = None) -> torch.dtype | None:
    """The autocast dtype for a precision setting on ``device`` (None = fp32, no autocast).
    ``auto`` keeps a ``module`` whose ``prefers_fp32`` attribute is true in fp32 (a network
    measured not to gain from bf16, e.g. the 3D U-Net); ``bf16`` still forces it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32" or (precision == "auto" and getattr(module, "prefers_fp32", False)):
        return None
    if precision == "bf16" or native_bf16(device):
        return torch.bfloat16
    return None


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``'s type, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def make_optimizer(name: str, params, **kwargs: Any) -> torch.optim.Optimizer:
    """``torch.optim.<Adam|AdamW|SGD>(params, **kwargs)``, fused (one kernel over all tensors per
    update) when every parameter is a floating-point tensor on one CPU or CUDA device; the plain
    implementation otherwise. ``params``: tensors or parameter-group dicts, as for torch.optim."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    devices = {p.device.type for p in tensors}
    if tensors and devices in ({"cpu"}, {"cuda"}):
        if all(p.is_floating_point() and not p.is_sparse for p in tensors):
            kwargs.setdefault("fused", True)
    return OPTIMIZERS[name](params, **kwargs)


def is_2d_cnn(module: nn.Module) -> bool:
    """Whether ``module`` holds 2D convolutions (channels_last helps those only)."""
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def channels_last(value: Any) -> Any:
    """A module, a 4D / 5D tensor, or a (nested) dict / list / tuple of tensors in channels_last
    format (``channels_last_3d`` for 5D tensors and modules with 3D convolutions: oneDNN's 3D
    convolution backward is ~1.35x faster in it on CPUs); anything else unchanged. Values are
    identical; only the memory layout changes."""
    if isinstance(value, nn.Module):
        is_3d = any(isinstance(m, nn.Conv3d) for m in value.modules())
        return value.to(memory_format=torch.channels_last_3d if is_3d else torch.channels_last)
    if isinstance(value, torch.Tensor):
        if value.ndim == 5:
            return value.contiguous(memory_format=torch.channels_last_3d)
        return value.contiguous(memory_format=torch.channels_last) if value.ndim == 4 else value
    if isinstance(value, dict):
        return {k: channels_last(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(channels_last(v) for v in value)
    return value


def describe_hardware() -> dict[str, Any]:
    """For environment.json: native bf16 support of the CPU (and GPUs)."""
    info: dict[str, Any] = {"cpu_native_bf16": bool(cpu_bf16_flags()), "cpu_bf16_flags": list(cpu_bf16_flags())}
    if torch.cuda.is_available():
        info["cuda_bf16"] = bool(torch.cuda.is_bf16_supported())
    return info
