"""convlens.reports: static HTML reports over an engine run directory.

``ReportAssetSink`` writes per-image assets while the engine runs (a
:class:`convlens.engine.sinks.ResultSink`); ``render_report`` turns a finished (or
still running) OUTDIR into ``index.html``, ``model.html`` and ``images/<id>.html``.
"""

from pathlib import Path

from .assets import ReportAssetSink
from .layout import clean_assets
from .render import clean_report, render_report

__all__ = ["ReportAssetSink", "clean", "render_report"]


def clean(outdir: str | Path) -> None:
    """Remove every file the report side wrote into OUTDIR (pages, static, assets),
    none of the engine's."""
    clean_report(Path(outdir))
    clean_assets(Path(outdir))
