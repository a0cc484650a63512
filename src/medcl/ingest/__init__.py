"""Ingestion: videos (PyAV), cine DICOM (pydicom) and stills -> per-video frame sets.

>>> from medcl.ingest import ingest_videos
>>> summary = ingest_videos("videos/", "ingested/", fps=3, size=224)   # doctest: +SKIP
>>> summary.exit_code, summary.failed                                   # doctest: +SKIP

Modules: ``video`` (PyAV decode + real-time fps sampling), ``dicom``, ``sector`` (crop the
ultrasound fan), ``labels`` (metadata tables and file-name patterns), ``store`` (output folder,
atomic writes, resume), ``pipeline`` (``ingest_videos``), ``pack`` (WebDataset shards of an ingest
folder: ``pack_shards``), ``parts`` (``--part k/N`` and ``merge_ingests``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medcl.ingest.pipeline import IngestSummary, ingest_videos

__all__ = ["IngestSummary", "ingest_videos"]


def __getattr__(name: str) -> Any:  # lazy: `import medcl.ingest.video` stays light
    if name in __all__:
        from medcl.ingest import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'medcl.ingest' has no attribute {name!r}")
