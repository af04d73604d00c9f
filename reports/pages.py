"""The report's pages as plain data, built from what the readers return.

:data:`PAGES` declares every page kind once: its template and, for the pages the nav
links to, the tab's label and the kinds it is current for; the nav is made from it.
Builders make page data (and the images a page needs, such as the per-class mean CAMs)
from the run's data; templates only render them.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from convlens.engine.outdir import CLASS_CAMS

from .assets import ASSETS_DIR, CLASS_CAMS_DIR, cam_file_name, grid_file_name, safe_name
from .data import (
    AssetIndex,
    ImageEntry,
    LayerStats,
    OutputRow,
    Results,
    RunInfo,
    outputs_table,
)
from .formatting import flatten
from .imaging import (
    CAM_COLORMAP,
    GRID_COLS,
    encode_image,
    grid_shape,
    normalise_map,
    write_if_changed,
)
from .summary import Summary, summarise

CLASS_CAM_SIDE = 128


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


@dataclass
class CamCell:
    method: str
    src: str | None


@dataclass
class CamRow:
    index: int
    name: str
    prob: float | None
    is_label: bool
    cells: list[CamCell]


@dataclass
class GridView:
    name: str
    shape: list[int]
    channels: int
    cols: int
    src: str | None
    width: int | None
    height: int | None
    stats: LayerStats | None


@dataclass
class ImagePage:
    entry: ImageEntry
    thumb: str | None
    position: int
    total: int
    prev_id: str | None
    next_id: str | None
    methods: list[str]
    cam_rows: list[CamRow]
    grids: list[GridView]
    grids_written: bool
    grid_policy: str


@dataclass
class ClassCam:
    index: int
    name: str
    count: int | None
    src: str


@dataclass
class ModelPage:
    outputs: list[OutputRow]
    sections: list[tuple[str, list[tuple[str, str]]]]
    class_names: list[str]
    parity: list[tuple[str, str]]
    layers: list[LayerStats]
    class_cams: list[ClassCam]
    run_sections: list[tuple[str, list[tuple[str, str]]]]


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
    facts: list[tuple[str, str]] = field(default_factory=list)


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


# ---- per image ---------------------------------------------------------------------
def cam_rows(e: ImageEntry, cams: set[str], names: list[str]) -> tuple[list[str], list[CamRow]]:
    methods = list(e.cam_methods)
    classes = list(e.cam_classes)
    if not classes:
        classes = [p.index for p in e.predictions]
    probs = {p.index: p.prob for p in e.predictions}
    rows = []
    for c in classes:
        cells = []
        for m in methods:
            fname = cam_file_name(m, c)
            cells.append(CamCell(m, AssetIndex.cam_path(e.id, m, c) if fname in cams else None))
        if any(cell.src for cell in cells):
            name = names[c] if 0 <= c < len(names) else f"class {c}"
            rows.append(CamRow(c, name, probs.get(c), c == e.label_index, cells))
    return methods, rows


def grid_views(e: ImageEntry, files: set[str], layers: list[LayerStats]) -> list[GridView]:
    views = []
    known = set()
    for st in layers:
        fname = grid_file_name(st.name)
        known.add(fname)
        src = AssetIndex.grid_path(e.id, st.name) if fname in files else None
        width = height = None
        if len(st.shape) == 3:
            height, width = grid_shape(*st.shape)
        views.append(
            GridView(
                st.name,
                st.shape,
                st.channels,
                min(GRID_COLS, st.channels or GRID_COLS),
                src,
                width,
                height,
                st,
            )
        )
    for fname in sorted(files - known):  # grids of layers stats.json does not know
        if fname.endswith(".jpg"):
            stem = fname[:-4]
            src = f"{ASSETS_DIR}/grids/{e.id}/{fname}"
            views.append(GridView(stem, [], 0, GRID_COLS, src, None, None, None))
    return views


# ---- model page --------------------------------------------------------------------
def class_cam_images(
    outdir: Path, names: list[str], spec: dict[str, Any] | None, notes: list[str]
) -> list[ClassCam]:
    """The per-class mean CAM images (assets/class_cams/class_<i>.png) and their data."""
    path = outdir / CLASS_CAMS
    if not path.exists():
        return []
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        notes.append(f"{CLASS_CAMS} could not be read ({type(exc).__name__}); shown without it")
        return []
    inp = (spec or {}).get("input") or {}
    ih, iw = int(inp.get("height") or 1), int(inp.get("width") or 1)
    if ih >= iw:
        size = (max(1, round(CLASS_CAM_SIDE * iw / ih)), CLASS_CAM_SIDE)
    else:
        size = (CLASS_CAM_SIDE, max(1, round(CLASS_CAM_SIDE * ih / iw)))
    out_dir = outdir / ASSETS_DIR / CLASS_CAMS_DIR
    cams: list[ClassCam] = []
    with npz:
        counts = np.asarray(npz["counts"]).ravel() if "counts" in npz.files else None
        keys = []
        for k in npz.files:
            if k.startswith("class_") and k[6:].isdigit():
                keys.append((int(k[6:]), k))
        if keys:
            out_dir.mkdir(parents=True, exist_ok=True)
        for idx, key in sorted(keys):
            arr = np.asarray(npz[key], dtype=np.float32)
            if arr.ndim != 2 or arr.size == 0:
                continue
            norm = normalise_map(arr)
            up = cv2.resize(norm, size, interpolation=cv2.INTER_LINEAR)
            img = cv2.applyColorMap(np.clip(up * 255 + 0.5, 0, 255).astype(np.uint8), CAM_COLORMAP)
            fname = f"class_{idx}.png"
            write_if_changed(out_dir / fname, encode_image(img, ".png"))
            count = int(counts[idx]) if counts is not None and idx < counts.size else None
            name = names[idx] if 0 <= idx < len(names) else f"class {idx}"
            cams.append(ClassCam(idx, name, count, f"{ASSETS_DIR}/{CLASS_CAMS_DIR}/{fname}"))
    return cams


def model_page(run: RunInfo, layers: list[LayerStats], class_cams: list[ClassCam]) -> ModelPage:
    spec = run.spec or {}
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    general = {
        "format_version": spec.get("format_version"),
        "cam_layer": spec.get("cam_layer"),
        "classes": len(spec.get("class_names") or []),
    }
    if run.model is not None:
        general["model"] = run.model
    if spec:
        sections.append(("Model", flatten(general)))
    for key, title in (
        ("input", "Input"),
        ("preprocess", "Preprocessing"),
        ("head", "Head"),
        ("source", "Source"),
    ):
        if isinstance(spec.get(key), dict) and spec[key]:
            sections.append((title, flatten(spec[key])))
    parity = spec.get("parity") if isinstance(spec.get("parity"), dict) else {}
    run_sections = [
        (title, flatten(doc))
        for title, doc in (
            ("Run settings", run.settings),
            ("Summary", run.summary),
            ("Timings", run.timings),
            ("Other run facts", run.extra),
            ("Report assets", run.assets),
        )
        if doc
    ]
    return ModelPage(
        outputs=outputs_table(spec),
        sections=sections,
        class_names=[str(n) for n in spec.get("class_names") or []],
        parity=flatten(parity or {}),
        layers=layers,
        class_cams=class_cams,
        run_sections=run_sections,
    )


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
        facts=facts,
    )
    yield Rendered("index.html", "", ctx.title, page)


def model_pages(ctx: ReportContext) -> Iterator[Rendered]:
    page = model_page(ctx.run, ctx.layers, ctx.class_cams)
    yield Rendered("model.html", "", f"Model · {ctx.title}", page)


def image_pages(ctx: ReportContext) -> Iterator[Rendered]:
    """One page per ok image, in the index's default order (previous/next follow it)."""
    ok = ctx.ok
    for i, e in enumerate(ok):
        grid_files = ctx.assets.grids(e.id)
        methods, rows = cam_rows(e, ctx.assets.cams(e.id), ctx.names)
        page = ImagePage(
            entry=e,
            thumb=ctx.assets.thumb(e.id),
            position=i + 1,
            total=len(ok),
            prev_id=ok[i - 1].id if i > 0 else None,
            next_id=ok[i + 1].id if i + 1 < len(ok) else None,
            methods=methods,
            cam_rows=rows,
            grids=grid_views(e, grid_files, ctx.layers),
            grids_written=any(f.endswith(".jpg") for f in grid_files),
            grid_policy=ctx.policy,
        )
        yield Rendered(f"{IMAGES_DIR}/{e.id}.html", "../", e.relpath, page)


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
        "items": items,
        "fields": ["id", "relpath", "pred", "prob", "label", "thumb", "overlay", "error"],
    }


IMAGES_DIR = "images"

#: Every page kind of the report, in nav order; the nav and the renderer come from this.
PAGES: tuple[PageKind, ...] = (
    PageKind("index", "index.html", index_pages, "Images", "index.html", ("index", "image")),
    PageKind("model", "model.html", model_pages, "Model", "model.html", ("model",)),
    PageKind("image", "image.html", image_pages),
)
NAV = [p for p in PAGES if p.tab]
