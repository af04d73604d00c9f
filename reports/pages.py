"""The report's pages as plain data, built from what the readers return.

:data:`PAGES` declares every page kind once: its template and, for the pages the nav
links to, the tab's label and the kinds it is current for; the nav is made from it.
Builders make page data (and the images a page needs, such as the per-class mean CAMs)
from the run's data; templates only render them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .charts import HBarChart, Histogram, class_accuracy, confidence_histogram
from .context import PageKind, Rendered, ReportContext
from .data import ImageEntry, Results, RunInfo, method_label
from .faithfulness import Faithfulness, run_faithfulness
from .imagepage import IMAGES_DIR, image_pages
from .layout import cam_file_name, safe_name
from .modelpage import ClassCam, class_cam_images, model_pages
from .summary import Summary, summarise

__all__ = [
    "IMAGES_DIR",
    "NAV",
    "PAGES",
    "ClassCam",
    "PageKind",
    "ReportContext",
    "Rendered",
    "class_cam_images",
    "class_names",
    "gallery_data",
    "title_of",
]


@dataclass
class IndexPage:
    title: str
    summary: Summary
    failed: list[ImageEntry]
    failed_more: int
    bad_lines: int
    duplicates: int
    page_size: int
    grid_policy: str
    confidence: Histogram | None = None
    accuracy: HBarChart | None = None
    facts: list[tuple[str, str]] = field(default_factory=list)
    faithfulness: Faithfulness | None = None  # --metrics: the method table (curves: model page)


def class_names(run: RunInfo, results: Results) -> list[str]:
    """Spec class names, extended by names seen in the records for any other index."""
    names: dict[int, str] = dict(enumerate(run.class_names))
    for e in results.entries:
        for p in e.predictions:
            names.setdefault(p.index, p.name)
        if e.label_index is not None and e.label is not None:
            names.setdefault(e.label_index, e.label)
    size = max(names, default=-1) + 1
    return [names.get(i, f"class {i}") for i in range(size)]


def title_of(run: RunInfo) -> str:
    if run.model:
        return f"convlens report: {os.path.basename(run.model)}"
    return "convlens report"


FAILED_TABLE_MAX = 1000  # failed inputs listed in index.html (the gallery has them all)


def index_pages(ctx: ReportContext) -> Iterator[Rendered]:
    failed = [e for e in ctx.results.entries if not e.ok]
    facts = [("Model", ctx.run.model)] if ctx.run.model else []
    facts.append(("Grid policy", ctx.policy))
    page = IndexPage(
        title=ctx.title,
        summary=summarise(ctx.results, ctx.run),
        failed=failed[:FAILED_TABLE_MAX],
        failed_more=max(0, len(failed) - FAILED_TABLE_MAX),
        bad_lines=ctx.results.bad_lines,
        duplicates=ctx.results.duplicates,
        page_size=ctx.page_size,
        grid_policy=ctx.policy,
        confidence=confidence_histogram(ctx.results.entries),
        accuracy=class_accuracy(ctx.results.entries, ctx.names),
        facts=facts,
        faithfulness=run_faithfulness(ctx.run.summary, ctx.run.settings),
    )
    yield Rendered("index.html", "", ctx.title, page)


def gallery_data(ctx: ReportContext) -> dict[str, Any]:
    """The gallery's data file: every input, ok ones with their top class, probability
    and whether a thumbnail and a CAM overlay exist."""
    methods_index: dict[str, int] = {}
    items: list[list[Any]] = []
    for e in ctx.ok:
        top = e.top
        overlay = -1
        methods = list(e.cam_methods)
        has = top is not None and methods and cam_file_name(methods[0], top.index)
        if has and has in ctx.assets.cams(e.id):
            overlay = methods_index.setdefault(methods[0], len(methods_index))
        items.append(
            [
                e.id,
                e.relpath,
                top.index if top else -1,
                round(top.prob, 4) if top else -1,
                -1 if e.label_index is None else e.label_index,
                1 if ctx.assets.thumb(e.id) else 0,
                overlay,
                "",
            ]
        )
    for e in ctx.results.entries:
        if not e.ok:
            label = -1 if e.label_index is None else e.label_index
            items.append([e.id, e.relpath, -1, -1, label, 0, -1, e.error or "unknown error"])
    method_names = sorted(methods_index, key=lambda m: methods_index[m])
    return {
        "pageSize": ctx.page_size,
        "classes": ctx.names,
        # CAM heatmap of item i, laid over its thumbnail:
        # assets/cams/<id>/<overlays[item.overlay]>_<item.pred>.png
        "overlays": [safe_name(m) for m in method_names],
        "methods": method_names,
        "methodLabels": [method_label(m) for m in method_names],
        "items": items,
        "fields": ["id", "relpath", "pred", "prob", "label", "thumb", "overlay", "error"],
    }


#: Every page kind of the report, in nav order; the nav and the renderer come from this.
PAGES: tuple[PageKind, ...] = (
    PageKind("index", "index.html", index_pages, "Images", "index.html", ("index", "image")),
    PageKind("model", "model.html", model_pages, "Model", "model.html", ("model",)),
    PageKind("image", "image.html", image_pages),
)
NAV = [p for p in PAGES if p.tab]
