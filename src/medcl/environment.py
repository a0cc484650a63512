"""Where a run ran: versions and machine, written as ``RUN_DIR/environment.json`` for the report
(and used by the benchmarks to state their machine).

Run writers (trainer, fine-tuning) call :func:`write_environment` once per run folder; the report
shows it in its "Configuration and environment" section (and says so when a run lacks it).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

ENVIRONMENT_FILE = "environment.json"


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

    from medcl import __version__

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
    }
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["cuda"] = torch.version.cuda
    return env


def write_environment(run_dir: str | Path) -> Path:
    """Write ``run_dir/environment.json`` (overwriting: a resumed run records where it finished)."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(collect_environment(), indent=2) + "\n")
    return path
