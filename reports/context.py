"""What every page builder reads (:class:`ReportContext`) and what it returns
(:class:`Rendered`); :class:`PageKind` declares a kind of page (see pages.PAGES)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import AssetIndex, ImageEntry, LayerStats, Results, RunInfo

if TYPE_CHECKING:
    from .modelpage import ClassCam


@dataclass
class ReportContext:
    """Everything the builders read, read once per rendering."""

    outdir: Path
    run: RunInfo
    results: Results
    layers: list[LayerStats]
    assets: AssetIndex
    names: list[str]
    policy: str
    page_size: int
    title: str
    class_cams: list[ClassCam]  # made (images written) before any page is rendered
    notes: list[str]  # what could not be read; every page shows them
    cam_colormap: str = ""  # the colour map the run's CAM files were made with

    @property
    def ok(self) -> list[ImageEntry]:
        return [e for e in self.results.entries if e.ok]


@dataclass(frozen=True)
class Rendered:
    """One page to write: its path under OUTDIR, the way back to the root, its title."""

    path: str
    root: str
    title: str
    data: Any


@dataclass(frozen=True)
class PageKind:
    """One kind of page: its template, its builder, and its tab in the nav (None: not
    in the nav)."""

    kind: str
    template: str
    build: Callable[[ReportContext], Iterator[Rendered]]
    tab: str | None = None
    href: str | None = None  # relative to the report's root
    current_for: tuple[str, ...] = ()  # page kinds on which this tab is the current one
