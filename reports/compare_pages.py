"""The compare report's pages: page data from a :class:`Comparison`, the images they
show, and their rendering through the run report's environment, base template, CSS and
CSP.  Everything is written inside OUT with the project's atomic writer.

OUT holds ``index.html`` (agreement, per-class accuracy, the flips gallery, the images
whose maps moved most), ``classes.html`` (mean CAMs per class), ``layers.html``
(activation statistics), ``images/<A id>-<B id>.html`` (one page per input analysed in
both runs), ``static/`` and ``assets/`` (thumbnails copied from each run's report,
heatmaps drawn from the saved maps).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convlens import __version__
from convlens.engine.outdir import RESULTS
from convlens.engine.results import refuse_links

from .compare import (
    FAILED,
    FLIP_ORDER,
    FLIP_TEXT,
    ClassCamDelta,
    CompareSummary,
    Comparison,
    Pair,
    read_comparison,
)
from .compare_figures import TOP_FRACTION
from .compare_match import Side
from .imaging import (
    CAM_COLORMAP,
    CAM_COLORMAP_NAME,
    cam_levels,
    encode_image,
    encode_indexed_png,
    legend_bar,
    write_if_changed,
)
from .layout import list_dir
from .pages import IMAGES_DIR
from .render import STATIC, make_env

STATIC_FILES = ("report.css", "compare.js", "compare.css")  # the run report's CSS, and ours
ASSETS = "assets"
THUMBS, CAMS, CLASS_CAMS = f"{ASSETS}/thumbs", f"{ASSETS}/cams", f"{ASSETS}/class_cams"
MOVED_MAX = 50  # images listed under "maps that moved most"
OUT_PATHS: tuple[str, ...] = ("index.html", "classes.html", "layers.html", IMAGES_DIR, "static")
OUT_PATHS += (ASSETS, THUMBS, CAMS, CLASS_CAMS)


@dataclass(frozen=True)
class Tab:
    tab: str
    href: str
    current_for: tuple[str, ...]


NAV = (
    Tab("Predictions", "index.html", ("compare-index", "compare-image")),
    Tab("Classes", "classes.html", ("compare-classes",)),
    Tab("Layers", "layers.html", ("compare-layers",)),
)


@dataclass
class SideView:
    """One run's half of a pair as a page shows it."""

    entry: Any  # ImageEntry
    thumb: str | None  # relative to OUT
    heat: str | None
    run_page: str | None  # the run's own image page, relative to OUT


@dataclass
class PairView:
    pair: Pair
    a: SideView
    b: SideView
    change_text: str
    pos: int = 0
    total: int = 0
    prev_pid: str | None = None
    next_pid: str | None = None


@dataclass
class AccuracyBar:
    name: str
    y: int
    wa: float  # bar widths, px
    wb: float


class Writer:
    """OUT and the files written into it this time (stale pages are removed after)."""

    def __init__(self, out: Path):
        self.out = out
        self.written: set[str] = set()

    def put(self, rel: str, data: bytes) -> str:
        write_if_changed(self.out / rel, data)
        self.written.add(rel)
        return rel

    def prune(self, folder: str) -> None:
        for name in list_dir(self.out / folder):
            if f"{folder}/{name}" not in self.written:
                (self.out / folder / name).unlink(missing_ok=True)


def _heat(x: np.ndarray) -> bytes:
    return encode_indexed_png(cam_levels(x))


def _run_pages(side: Side, out: Path) -> tuple[set[str], str]:
    """The ids with a page in the run's own report, and the way from OUT to them."""
    pages = {n[:-5] for n in list_dir(side.outdir / IMAGES_DIR) if n.endswith(".html")}
    return pages, os.path.relpath(side.outdir.resolve() / IMAGES_DIR, out.resolve())


def _views(c: Comparison, w: Writer) -> dict[str, PairView]:
    views: dict[str, PairView] = {}
    links = {"a": _run_pages(c.a, w.out), "b": _run_pages(c.b, w.out)}
    for p in c.pairs:
        if p.change == FAILED:
            continue
        halves = []
        for tag, side, e in (("a", c.a, p.a), ("b", c.b, p.b)):
            thumb = side.assets.thumb(e.id)
            if thumb is not None:
                thumb = w.put(f"{THUMBS}/{tag}_{e.id}.jpg", (side.outdir / thumb).read_bytes())
            heat = f"{CAMS}/{p.pid}_{tag}.png"
            pages, base = links[tag]
            halves.append(
                SideView(
                    e,
                    thumb,
                    heat if heat in w.written else None,
                    f"{base}/{e.id}.html" if e.id in pages else None,
                )
            )
        views[p.pid] = PairView(p, halves[0], halves[1], FLIP_TEXT.get(p.change, "same prediction"))
    order = list(views)
    for i, pid in enumerate(order):
        v = views[pid]
        v.pos, v.total = i + 1, len(order)
        v.prev_pid = order[i - 1] if i else None
        v.next_pid = order[i + 1] if i + 1 < len(order) else None
    return views


def _class_cam_images(cams: list[ClassCamDelta], w: Writer) -> list[tuple[ClassCamDelta, str, str]]:
    return [
        (
            c,
            w.put(f"{CLASS_CAMS}/a_{c.index_a}.png", _heat(c.map_a)),
            w.put(f"{CLASS_CAMS}/b_{c.index_b}.png", _heat(c.map_b)),
        )
        for c in cams
    ]


def _accuracy_bars(s: CompareSummary) -> tuple[list[AccuracyBar], int]:
    bars = [
        AccuracyBar(c.name, 8 + 34 * i, round(300 * c.accuracy_a, 1), round(300 * c.accuracy_b, 1))
        for i, c in enumerate(s.per_class)
    ]
    return bars, 16 + 34 * len(bars)


def _pages(c: Comparison, views: dict[str, PairView], w: Writer) -> list[tuple[str, str, str, Any]]:
    """(path, template, page kind, data) of every page."""
    s = c.summary
    flips = [views[p.pid] for p in c.flips]
    moved = [views[p.pid] for p in c.moved[:MOVED_MAX]]
    failed = [p for p in c.pairs if p.change == FAILED]

    def options(values: list[str]) -> list[str]:
        return sorted({v for v in values if v})

    index = {
        "s": s,
        "a": c.a,
        "b": c.b,
        "flips": flips,
        "kinds": [(k, FLIP_TEXT[k], s.flips[k]) for k in FLIP_ORDER],
        "true_options": options([v.pair.a.label or "" for v in flips]),
        "pred_options": options(
            [e.top.name for v in flips for e in (v.pair.a, v.pair.b) if e.top is not None]
        ),
        "moved": moved,
        "moved_total": len(c.moved),
        "failed": failed,
        "only_a": c.matching.only_a[:200],
        "only_b": c.matching.only_b[:200],
        "bars": _accuracy_bars(s),
        "by_suffix": c.matching.by_suffix,
    }
    pages: list[tuple[str, str, str, Any]] = [
        ("index.html", "compare_index.html", "compare-index", index)
    ]
    classes = {"s": s, "rows": _class_cam_images(c.class_cams, w), "a": c.a, "b": c.b}
    pages.append(("classes.html", "compare_classes.html", "compare-classes", classes))
    pages.append(
        ("layers.html", "compare_layers.html", "compare-layers", {"s": s, "layers": c.layers})
    )
    for pid, v in views.items():
        pages.append((f"{IMAGES_DIR}/{pid}.html", "compare_image.html", "compare-image", v))
    return pages


def render_compare(
    run_a: str | Path, run_b: str | Path, out: Path, *, page_size: int = 100
) -> CompareSummary:
    """Read, compare and write the report into ``out``; see :func:`compare`."""
    if page_size < 1:
        raise ValueError("page_size must be >= 1")
    if (out / RESULTS).exists():
        raise ValueError(f"{out}: is a run directory; write the comparison elsewhere (-o)")
    out.mkdir(parents=True, exist_ok=True)
    refuse_links(out, OUT_PATHS)
    w = Writer(out)

    def on_maps(pair: Pair, x: np.ndarray, y: np.ndarray) -> None:
        w.put(f"{CAMS}/{pair.pid}_a.png", _heat(x))
        w.put(f"{CAMS}/{pair.pid}_b.png", _heat(y))

    c = read_comparison(run_a, run_b, on_maps)
    views = _views(c, w)
    for name in STATIC_FILES:
        w.put(f"static/{name}", (STATIC / name).read_bytes())
    legend = encode_image(legend_bar(CAM_COLORMAP), ".png")
    w.put(f"static/cmap-{CAM_COLORMAP_NAME}.png", legend)
    model_a, model_b = (os.path.basename(s.run.model or "?") for s in (c.a, c.b))
    notes = [f"run A: {n}" for n in c.a.notes] + [f"run B: {n}" for n in c.b.notes]
    common = {
        "version": __version__,
        "model_name": model_a if model_a == model_b else f"{model_a} vs {model_b}",
        "model_path": f"A: {c.a.outdir} · B: {c.b.outdir}",
        "nav": NAV,
        "notes": notes,
        "cam_colormap": CAM_COLORMAP_NAME,
        "top_pct": round(TOP_FRACTION * 100),
        "page_size": page_size,
    }
    env = make_env()
    (out / IMAGES_DIR).mkdir(exist_ok=True)
    for path, template, kind, data in _pages(c, views, w):
        root = "../" if "/" in path else ""
        title = data.pair.key if kind == "compare-image" else "convlens compare"
        html = env.get_template(template).render(
            root=root, page_kind=kind, title=title, p=data, **common
        )
        w.put(path, html.encode("utf-8"))
    for folder in (IMAGES_DIR, THUMBS, CAMS, CLASS_CAMS):
        w.prune(folder)
    c.summary.report = str(out / "index.html")
    return c.summary
