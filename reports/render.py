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
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from convlens import __version__
from convlens.engine.results import RESULTS

from .assets import (
    ASSETS_DIR,
    CLASS_CAMS_DIR,
    LOW_CONFIDENCE,
    cam_file_name,
    safe_name,
)
from .data import (
    AssetIndex,
    fmt_num,
    list_dir,
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
    OVERLAY_ALPHA,
    encode_image,
    legend_bar,
    write_if_changed,
)
from .pages import (
    NAV,
    TEMPLATE,
    ImagePage,
    IndexPage,
    cam_rows,
    class_names,
    grid_views,
    model_page,
    title_of,
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


def _copy_static(outdir: Path) -> None:
    dest = outdir / "static"
    dest.mkdir(parents=True, exist_ok=True)
    for name in STATIC_FILES:
        write_if_changed(dest / name, (STATIC / name).read_bytes())
    for cmap, cname in ((CAM_COLORMAP, CAM_COLORMAP_NAME), (GRID_COLORMAP, GRID_COLORMAP_NAME)):
        write_if_changed(dest / f"cmap-{cname}.png", encode_image(legend_bar(cmap), ".png"))


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
    names = class_names(run, results)
    env = make_env()
    title = title_of(run)
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
        "nav": NAV,
    }

    _copy_static(outdir)
    images_dir = outdir / "images"
    images_dir.mkdir(exist_ok=True)

    ok = [e for e in results.entries if e.ok]
    methods_index: dict[str, int] = {}
    items: list[list[Any]] = []
    tpl_image = env.get_template(TEMPLATE["image"])
    for i, e in enumerate(ok):
        cams = assets.cams(e.id)
        grid_files = assets.grids(e.id)
        methods, rows = cam_rows(e, cams, names)
        page = ImagePage(
            entry=e,
            thumb=assets.thumb(e.id),
            position=i + 1,
            total=len(ok),
            prev_id=ok[i - 1].id if i > 0 else None,
            next_id=ok[i + 1].id if i + 1 < len(ok) else None,
            methods=methods,
            cam_rows=rows,
            grids=grid_views(e, grid_files, layers),
            grids_written=any(f.endswith(".jpg") for f in grid_files),
            grid_policy=policy,
        )
        html = tpl_image.render(root="../", page_kind="image", title=e.relpath, p=page, **common)
        write_if_changed(images_dir / f"{e.id}.html", html.encode("utf-8"))

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
    write_if_changed(outdir / "static" / GALLERY_JS, js.encode("ascii"))

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
    html = env.get_template(TEMPLATE["index"]).render(
        root="", page_kind="index", title=title, p=index, **common
    )
    index_path = outdir / "index.html"
    write_if_changed(index_path, html.encode("utf-8"))

    model = model_page(outdir, run, layers, names)
    html = env.get_template(TEMPLATE["model"]).render(
        root="", page_kind="model", title=f"Model · {title}", p=model, **common
    )
    write_if_changed(outdir / "model.html", html.encode("utf-8"))
    return index_path


def clean_report(outdir: Path) -> None:
    """Remove what :func:`render_report` wrote (not the run's data or the sink's assets)."""
    outdir = Path(outdir)
    for name in ("index.html", "model.html"):
        (outdir / name).unlink(missing_ok=True)
    for sub in ("images", "static", f"{ASSETS_DIR}/{CLASS_CAMS_DIR}"):
        shutil.rmtree(outdir / sub, ignore_errors=True)
