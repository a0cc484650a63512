"""Where a run runs: the compute device it uses and the versions and machine it ran on.

:func:`resolve_device` turns a ``train.device`` setting into a ``torch.device`` (the trainer, the
pretraining API and the frame-set sampler agree through it). :func:`write_environment` records
versions and machine as ``RUN_DIR/environment.json`` for the report (the benchmarks use it to state
their machine); run writers (trainer, fine-tuning) call it once per run folder, and the report
shows it in its "Configuration and environment" section (and says so when a run lacks it).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ENVIRONMENT_FILE = "environment.json"


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given
    (a CUDA device without CUDA available is an error naming the setting)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available")
    return device


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def collect_environment() -> dict[str, Any]:
    """python / torch / MONAI / medcl versions, OS, CPU model and count, GPU names when present."""
    import torch

    from medcl._version import __version__
    from medcl.precision import describe_hardware

    try:
        import monai

        monai_version = monai.__version__
    except ImportError:  # pragma: no cover
        monai_version = "not installed"
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai_version,
        "medcl": __version__,
        "os": platform.platform(),
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores)",
        "torch_threads": torch.get_num_threads(),
        **describe_hardware(),
    }
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["cuda"] = torch.version.cuda
    return env


def write_environment(run_dir: str | Path, extra: dict | None = None) -> Path:
    """Write ``run_dir/environment.json`` (overwriting: a resumed run records where it finished);
    ``extra``: what the run resolved from the machine (e.g. the precision ``auto`` chose)."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**collect_environment(), **(extra or {})}, indent=2) + "\n")
    return path
