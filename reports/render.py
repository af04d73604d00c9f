"""Render the static HTML report of an OUTDIR: plain data first, then Jinja2 templates.

Writes ``index.html``, ``model.html``, ``images/<id>.html`` (ok images only),
``static/`` (report.css, report.js, colour legends, gallery-data.js) and
``assets/class_cams/class_<i>.png``.  Rendering is deterministic (no clocks): rendering
the same OUTDIR twice writes the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from convlens import __version__
from convlens.engine.results import RESULTS
from convlens.engine.rundir import CLASS_CAMS

from .assets import (
    ASSETS_DIR,
    CLASS_CAMS_DIR,
    LOW_CONFIDENCE,
    cam_file_name,
    grid_file_name,
    safe_name,
)
from .data import (
    AssetIndex,
    ImageEntry,
    LayerStats,
    OutputRow,
    Results,
    RunInfo,
    Summary,
    flatten,
    fmt_num,
    list_dir,
    outputs_table,
    read_results,
    read_run,
    read_stats,
    summarise,
)
from .imaging import (
    CAM_COLORMAP,
    CAM_COLORMAP_NAME,
    GRID_COLORMAP,
    GRID_COLORMAP_NAME,
    GRID_COLS,
    OVERLAY_ALPHA,
    atomic_write_bytes,
    encode_image,
    grid_shape,
    legend_bar,
    normalise_map,
)

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
STATIC_FILES = ("report.css", "report.js")
GALLERY_JS = "gallery-data.js"
GALLERY_GLOBAL = "CONVLENS_GALLERY"
DEFAULT_PAGE_SIZE = 100
#: failed inputs listed in index.html (all of them are in the gallery's "failed" filter)
FAILED_TABLE_MAX = 1000
CLASS_CAM_SIDE = 128
GRIDS_HINT = "convlens run ... --grids all"


# ---- page data ---------------------------------------------------------------------
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


# ---- helpers -----------------------------------------------------------------------
def js_literal(value: Any) -> str:
    """JSON for a .js file, with ``<``, ``>`` and ``&`` escaped as ``\\u00XX`` so that no
    markup-looking text appears in the file at all."""
    text = json.dumps(value, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.1f}%"


def _shape(shape: list[int] | None) -> str:
    return " × ".join(str(d) for d in shape) if shape else "?"


def make_env() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = fmt_num
    env.filters["pct"] = _pct
    env.filters["shape"] = _shape
    return env


def _write_if_changed(path: Path, data: bytes) -> None:
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    atomic_write_bytes(path, data)


def _copy_static(outdir: Path) -> None:
    dest = outdir / "static"
    dest.mkdir(parents=True, exist_ok=True)
    for name in STATIC_FILES:
        _write_if_changed(dest / name, (STATIC / name).read_bytes())
    for cmap, cname in ((CAM_COLORMAP, CAM_COLORMAP_NAME), (GRID_COLORMAP, GRID_COLORMAP_NAME)):
        _write_if_changed(dest / f"cmap-{cname}.png", encode_image(legend_bar(cmap), ".png"))


def _class_names(run: RunInfo, results: Results) -> list[str]:
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
def _cam_rows(e: ImageEntry, cams: set[str], names: list[str]) -> tuple[list[str], list[CamRow]]:
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


def _grid_views(e: ImageEntry, files: set[str], layers: list[LayerStats]) -> list[GridView]:
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
def _class_cams(outdir: Path, names: list[str], spec: dict[str, Any] | None) -> list[ClassCam]:
    path = outdir / CLASS_CAMS
    if not path.exists():
        return []
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
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
            _write_if_changed(out_dir / fname, encode_image(img, ".png"))
            count = int(counts[idx]) if counts is not None and idx < counts.size else None
            name = names[idx] if 0 <= idx < len(names) else f"class {idx}"
            cams.append(ClassCam(idx, name, count, f"{ASSETS_DIR}/{CLASS_CAMS_DIR}/{fname}"))
    return cams


def _model_page(
    outdir: Path, run: RunInfo, layers: list[LayerStats], names: list[str]
) -> ModelPage:
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
        class_cams=_class_cams(outdir, names, spec),
        run_sections=run_sections,
    )


# ---- main --------------------------------------------------------------------------
def _title(run: RunInfo) -> str:
    if run.model:
        return f"convlens report: {os.path.basename(run.model)}"
    return "convlens report"


def render_report(outdir: Path, *, page_size: int = DEFAULT_PAGE_SIZE) -> Path:
    """Render the report of ``outdir`` (see OUTDIR.md) and return the path of index.html.

    ``page_size`` is the number of gallery cards a page shows.
    """
    outdir = Path(outdir)
    if not (outdir / RESULTS).exists():
        raise FileNotFoundError(f"{outdir}: no {RESULTS} (not a convlens run directory)")
    if page_size < 1:
        raise ValueError("page_size must be >= 1")
    run = read_run(outdir)
    results = read_results(outdir / RESULTS, run.class_names)
    layers = read_stats(outdir, run.spec)
    assets = AssetIndex.scan(outdir)
    names = _class_names(run, results)
    env = make_env()
    title = _title(run)
    policy = str(run.assets.get("grids") or run.settings.get("grids") or "unknown")
    common = {
        "version": __version__,
        "model_name": os.path.basename(run.model) if run.model else "",
        "model_path": run.model or "",
        "low_confidence": LOW_CONFIDENCE,
        "grid_sample": run.assets.get("grid_sample"),
        "grids_hint": GRIDS_HINT,
        "cam_colormap": CAM_COLORMAP_NAME,
        "grid_colormap": GRID_COLORMAP_NAME,
        "overlay_alpha": OVERLAY_ALPHA,
    }

    _copy_static(outdir)
    images_dir = outdir / "images"
    images_dir.mkdir(exist_ok=True)

    ok = [e for e in results.entries if e.ok]
    methods_index: dict[str, int] = {}
    items: list[list[Any]] = []
    tpl_image = env.get_template("image.html")
    for i, e in enumerate(ok):
        cams = assets.cams(e.id)
        grid_files = assets.grids(e.id)
        methods, cam_rows = _cam_rows(e, cams, names)
        page = ImagePage(
            entry=e,
            thumb=assets.thumb(e.id),
            position=i + 1,
            total=len(ok),
            prev_id=ok[i - 1].id if i > 0 else None,
            next_id=ok[i + 1].id if i + 1 < len(ok) else None,
            methods=methods,
            cam_rows=cam_rows,
            grids=_grid_views(e, grid_files, layers),
            grids_written=any(f.endswith(".jpg") for f in grid_files),
            grid_policy=policy,
        )
        html = tpl_image.render(root="../", page_kind="image", title=e.relpath, p=page, **common)
        _write_if_changed(images_dir / f"{e.id}.html", html.encode("utf-8"))

        top = e.top
        overlay = -1
        if top is not None and methods and cam_file_name(methods[0], top.index) in cams:
            overlay = methods_index.setdefault(methods[0], len(methods_index))
        items.append(
            [
                e.id,
                e.relpath,
                top.index if top else -1,
                round(top.prob, 4) if top else -1,
                -1 if e.label_index is None else e.label_index,
                1 if page.thumb else 0,
                overlay,
                "",
            ]
        )
    # pages of images that are no longer ok inputs (a re-run, a changed results.jsonl)
    current = {f"{e.id}.html" for e in ok}
    for name in list_dir(images_dir) - current:
        if name.endswith(".html"):
            (images_dir / name).unlink(missing_ok=True)
    for e in results.entries:
        if not e.ok:
            label = -1 if e.label_index is None else e.label_index
            items.append([e.id, e.relpath, -1, -1, label, 0, -1, e.error or "unknown error"])

    method_names = sorted(methods_index, key=lambda m: methods_index[m])
    gallery = {
        "pageSize": page_size,
        "classes": names,
        # CAM heatmap of item i, laid over its thumbnail:
        # assets/cams/<id>/<overlays[item.overlay]>_<item.pred>.png
        "overlays": [safe_name(m) for m in method_names],
        "methods": method_names,
        "items": items,
        "fields": ["id", "relpath", "pred", "prob", "label", "thumb", "overlay", "error"],
    }
    js = f"window.{GALLERY_GLOBAL} = {js_literal(gallery)};\n"
    _write_if_changed(outdir / "static" / GALLERY_JS, js.encode("ascii"))

    summary = summarise(results, run)
    failed = [e for e in results.entries if not e.ok]
    facts = []
    if run.model:
        facts.append(("Model", run.model))
    facts.append(("Grid policy", policy))
    index = IndexPage(
        title=title,
        summary=summary,
        failed=failed[:FAILED_TABLE_MAX],
        failed_more=max(0, len(failed) - FAILED_TABLE_MAX),
        bad_lines=results.bad_lines,
        duplicates=results.duplicates,
        page_size=page_size,
        grid_policy=policy,
        facts=facts,
    )
    html = env.get_template("index.html").render(
        root="", page_kind="index", title=title, p=index, **common
    )
    index_path = outdir / "index.html"
    _write_if_changed(index_path, html.encode("utf-8"))

    model = _model_page(outdir, run, layers, names)
    html = env.get_template("model.html").render(
        root="", page_kind="model", title=f"Model · {title}", p=model, **common
    )
    _write_if_changed(outdir / "model.html", html.encode("utf-8"))
    return index_path


def clean_report(outdir: Path) -> None:
    """Remove what :func:`render_report` wrote (not the run's data or the sink's assets)."""
    outdir = Path(outdir)
    for name in ("index.html", "model.html"):
        (outdir / name).unlink(missing_ok=True)
    for sub in ("images", "static", f"{ASSETS_DIR}/{CLASS_CAMS_DIR}"):
        shutil.rmtree(outdir / sub, ignore_errors=True)
