"""The page of one analysed image: its predictions, its CAMs (one column per
class-specific method, one row per class; class-agnostic methods once), beside them the
faithfulness scores of each method's top-1 map (``--metrics``, when the image was
scored), and its activation grids."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from convlens.engine.cams import METHODS

from .context import Rendered, ReportContext
from .data import AssetIndex, ImageEntry, LayerStats, method_label
from .faithfulness import Faithfulness, image_faithfulness
from .imaging import GRID_COLS, grid_shape
from .layout import GRID_EXT, cam_file_name, grid_file_name

#: grid files of runs made before the PNG grids (upscaled JPEG, shown as they are)
LEGACY_GRID_EXT = ".jpg"

IMAGES_DIR = "images"


def class_agnostic(name: str) -> bool:
    """Whether the method makes one map per image (the same for every class)."""
    m = METHODS.get(name)
    return bool(m is not None and m.class_agnostic)


@dataclass
class CamCell:
    method: str
    label: str
    src: str | None


@dataclass
class CamRow:
    index: int
    name: str
    prob: float | None
    is_label: bool
    cells: list[CamCell]


@dataclass
class MethodCol:
    name: str
    label: str


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
    methods: list[MethodCol]  # the class-specific methods: the table's columns
    cam_rows: list[CamRow]
    agnostic: list[CamCell]  # class-agnostic maps, shown once
    grids: list[GridView]
    grids_written: bool
    grid_policy: str
    faithfulness: Faithfulness | None = None  # --metrics: this image's scores, if scored


def cam_rows(
    e: ImageEntry, cams: set[str], names: list[str]
) -> tuple[list[MethodCol], list[CamRow], list[CamCell]]:
    """The class-specific methods, a row of their maps per class, and the class-agnostic
    maps (any class's file: the engine writes the same map for each)."""
    methods = [m for m in e.cam_methods if not class_agnostic(m)]
    classes = list(e.cam_classes)
    if not classes:
        classes = [p.index for p in e.predictions]
    probs = {p.index: p.prob for p in e.predictions}
    rows = []
    for c in classes:
        cells = []
        for m in methods:
            fname = cam_file_name(m, c)
            src = AssetIndex.cam_path(e.id, m, c) if fname in cams else None
            cells.append(CamCell(m, method_label(m), src))
        if any(cell.src for cell in cells):
            name = names[c] if 0 <= c < len(names) else f"class {c}"
            rows.append(CamRow(c, name, probs.get(c), c == e.label_index, cells))
    agnostic = []
    for m in e.cam_methods:
        if class_agnostic(m):
            found = next((c for c in classes if cam_file_name(m, c) in cams), None)
            if found is not None:
                agnostic.append(CamCell(m, method_label(m), AssetIndex.cam_path(e.id, m, found)))
    return [MethodCol(m, method_label(m)) for m in methods], rows, agnostic


def grid_views(e: ImageEntry, files: set[str], layers: list[LayerStats]) -> list[GridView]:
    """One view per layer.  The page shows a grid at :func:`grid_shape` (width and height
    attributes): the file holds small maps at their own size and the browser scales it
    up with crisp pixels (``image-rendering: pixelated``); an older run's upscaled JPEG
    grid is that size already."""
    views = []
    known = set()
    for st in layers:
        fname = grid_file_name(st.name)
        legacy = fname.removesuffix(GRID_EXT) + LEGACY_GRID_EXT
        known |= {fname, legacy}
        src = None
        if fname in files:
            src = AssetIndex.grid_path(e.id, st.name)
        elif legacy in files:
            src = AssetIndex.grid_file_path(e.id, legacy)
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
    stems: set[str] = set()
    # grids of layers stats.json does not know (a PNG before an older run's JPEG)
    for fname in sorted(
        files - known, key=lambda f: (os.path.splitext(f)[0], f.endswith(LEGACY_GRID_EXT))
    ):
        stem, ext = os.path.splitext(fname)
        if ext in (GRID_EXT, LEGACY_GRID_EXT) and stem not in stems:
            stems.add(stem)
            src = AssetIndex.grid_file_path(e.id, fname)
            views.append(GridView(stem, [], 0, GRID_COLS, src, None, None, None))
    return views


def image_pages(ctx: ReportContext) -> Iterator[Rendered]:
    """One page per ok image, in the index's default order (previous/next follow it)."""
    ok = ctx.ok
    for i, e in enumerate(ok):
        grid_files = ctx.assets.grids(e.id)
        methods, rows, agnostic = cam_rows(e, ctx.assets.cams(e.id), ctx.names)
        page = ImagePage(
            entry=e,
            thumb=ctx.assets.thumb(e.id),
            position=i + 1,
            total=len(ok),
            prev_id=ok[i - 1].id if i > 0 else None,
            next_id=ok[i + 1].id if i + 1 < len(ok) else None,
            methods=methods,
            cam_rows=rows,
            agnostic=agnostic,
            grids=grid_views(e, grid_files, ctx.layers),
            grids_written=any(f.endswith((GRID_EXT, LEGACY_GRID_EXT)) for f in grid_files),
            grid_policy=ctx.policy,
            faithfulness=image_faithfulness(e.metrics, e.metric_curves),
        )
        yield Rendered(f"{IMAGES_DIR}/{e.id}.html", "../", e.relpath, page)
