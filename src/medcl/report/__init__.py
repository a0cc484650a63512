"""Reports (one self-contained HTML file comparing run folders) and their figures.

>>> from medcl.report import write_report     # doctest: +SKIP
>>> write_report(["runs/scratch", "runs/uscl"], "report.html", manifest="ingested/")   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path


def write_report(run_dirs, out_path, manifest=None, **kwargs) -> Path:
    """See :func:`medcl.report.html.write_report` (imported lazily: matplotlib and torch are heavy)."""
    from medcl.report.html import write_report as _write_report

    return _write_report(run_dirs, out_path, manifest, **kwargs)


__all__ = ["write_report"]
