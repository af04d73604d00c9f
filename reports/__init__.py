"""convlens.reports: static HTML reports over an engine run directory.

``ReportAssetSink`` writes per-image assets while the engine runs (a
:class:`convlens.engine.sinks.ResultSink`); ``render_report`` turns a finished (or
still running) OUTDIR into ``index.html``, ``model.html`` and ``images/<id>.html``.
"""

from .assets import ReportAssetSink
from .render import render_report

__all__ = ["ReportAssetSink", "render_report"]
