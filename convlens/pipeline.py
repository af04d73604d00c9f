"""The main job as one call: run the engine over images, then render the report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from convlens.engine.run import ProgressCallback, RunOptions, RunSummary, run


@dataclass
class AnalysisResult:
    summary: RunSummary
    report: Path | None


def analyze(
    model: str | Path,
    inputs: Sequence[str],
    outdir: str | Path,
    options: RunOptions | None = None,
    *,
    grids: str = "sample",
    grid_sample: int | None = None,
    grid_notable: int | None = None,
    report: bool = True,
    progress: ProgressCallback | None = None,
    warn: Callable[[str], None] | None = None,
) -> AnalysisResult:
    """``convlens run``: engine results in ``outdir`` and, unless ``report=False``, its
    HTML report (``outdir/index.html``); ``grids``, ``grid_sample`` and ``grid_notable``
    are the report's grid policy (:mod:`convlens.reports.gridpolicy`)."""
    sinks = []
    if report:
        from convlens.reports import ReportAssetSink
        from convlens.reports.assets import GRID_NOTABLE, GRID_SAMPLE

        sinks.append(
            ReportAssetSink(
                grids=grids,
                grid_sample=GRID_SAMPLE if grid_sample is None else grid_sample,
                grid_notable=GRID_NOTABLE if grid_notable is None else grid_notable,
            )
        )
    summary = run(model, inputs, outdir, options, sinks=sinks, progress=progress, warn=warn)
    if options is not None and options.force and not report:
        from convlens.reports import clean  # no report this time: none of the old one stays

        clean(outdir)
    index = None
    if report:
        from convlens.reports import render_report

        index = render_report(Path(outdir))
    return AnalysisResult(summary, index)


def demo_paths() -> tuple[Path, Path]:
    """The embedded default: a bundled trained model and real photographs."""
    here = Path(__file__).parent / "demo"
    return here / "textures.onnx", here / "photos"
