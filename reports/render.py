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
from convlens.engine.outdir import RESULTS
from convlens.engine.results import refuse_links

from .assets import LOW_CONFIDENCE
from .data import (
    AssetIndex,
    list_dir,
    read_entries,
    read_run,
    read_stats,
)
from .formatting import fmt_num
from .imaging import (
    CAM_COLORMAP_NAME,
    COLORMAPS,
    GRID_COLORMAP_NAME,
    OVERLAY_ALPHA,
    encode_image,
    legend_bar,
    write_if_changed,
)
from .layout import ASSETS_DIR, CLASS_CAMS_DIR, REPORT_PATHS, clean_temporaries
from .pages import (
    IMAGES_DIR,
    NAV,
    PAGES,
    ReportContext,
    class_cam_images,
    class_names,
    gallery_data,
    title_of,
)

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
STATIC_FILES = ("report.css", "report.js")
GALLERY_JS = "gallery-data.js"
GALLERY_GLOBAL = "CONVLENS_GALLERY"
DEFAULT_PAGE_SIZE = 100
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


def _copy_static(outdir: Path, colormaps: tuple[str, ...]) -> None:
    dest = outdir / "static"
    dest.mkdir(parents=True, exist_ok=True)
    for name in STATIC_FILES:
        write_if_changed(dest / name, (STATIC / name).read_bytes())
    for cname in colormaps:
        bar = encode_image(legend_bar(COLORMAPS[cname]), ".png")
        write_if_changed(dest / f"cmap-{cname}.png", bar)


def cam_colormap_of(assets: dict[str, Any]) -> str:
    """The colour map the run's CAM files were made with (assets.json says; a name this
    version does not know, or none: this version's)."""
    name = assets.get("cam_colormap")
    return name if isinstance(name, str) and name in COLORMAPS else CAM_COLORMAP_NAME


def render_report(outdir: Path, *, page_size: int = DEFAULT_PAGE_SIZE) -> Path:
    """Render the report of ``outdir`` (see OUTDIR.md) and return the path of index.html.

    ``page_size`` is the number of gallery cards a page shows.
    """
    outdir = Path(outdir)
    if not (outdir / RESULTS).exists():
        raise FileNotFoundError(f"{outdir}: no {RESULTS} (not a convlens run directory)")
    if page_size < 1:
        raise ValueError("page_size must be >= 1")
    refuse_links(outdir, REPORT_PATHS)
    clean_temporaries(outdir)
    notes: list[str] = []
    run = read_run(outdir, notes)
    results = read_entries(outdir, run.class_names)
    names = class_names(run, results)
    cam_cmap = cam_colormap_of(run.assets)
    ctx = ReportContext(
        outdir=outdir,
        run=run,
        results=results,
        layers=read_stats(outdir, run.spec, notes),
        assets=AssetIndex.scan(outdir),
        names=names,
        class_cams=class_cam_images(outdir, names, run.spec, notes, COLORMAPS[cam_cmap]),
        policy=str(run.assets.get("grids") or run.settings.get("grids") or "unknown"),
        page_size=page_size,
        title=title_of(run),
        notes=notes,
        cam_colormap=cam_cmap,
    )
    common = {
        "version": __version__,
        "model_name": os.path.basename(run.model) if run.model else "",
        "model_path": run.model or "",
        "low_confidence": LOW_CONFIDENCE,
        "grid_sample": run.assets.get("grid_sample"),
        "grid_notable": run.assets.get("grid_notable"),  # None: a run from before the key
        "grids_hint": GRIDS_HINT,
        "cam_colormap": cam_cmap,
        "grid_colormap": GRID_COLORMAP_NAME,
        "overlay_alpha": OVERLAY_ALPHA,
        "nav": NAV,
        "notes": notes,
    }
    _copy_static(outdir, tuple(dict.fromkeys((cam_cmap, GRID_COLORMAP_NAME))))
    (outdir / IMAGES_DIR).mkdir(exist_ok=True)
    env = make_env()
    written: set[str] = set()
    for kind in PAGES:
        template = env.get_template(kind.template)
        for page in kind.build(ctx):
            html = template.render(
                root=page.root, page_kind=kind.kind, title=page.title, p=page.data, **common
            )
            write_if_changed(outdir / page.path, html.encode("utf-8"))
            written.add(page.path)
    # pages of images that are no longer ok inputs (a re-run, a changed results.jsonl)
    for name in list_dir(outdir / IMAGES_DIR):
        if name.endswith(".html") and f"{IMAGES_DIR}/{name}" not in written:
            (outdir / IMAGES_DIR / name).unlink(missing_ok=True)
    js = f"window.{GALLERY_GLOBAL} = {js_literal(gallery_data(ctx))};\n"
    write_if_changed(outdir / "static" / GALLERY_JS, js.encode("ascii"))
    return outdir / "index.html"


def clean_report(outdir: Path) -> None:
    """Remove what :func:`render_report` wrote (not the run's data or the sink's assets)."""
    outdir = Path(outdir)
    refuse_links(outdir, REPORT_PATHS)
    for name in ("index.html", "model.html"):
        (outdir / name).unlink(missing_ok=True)
    for sub in ("images", "static", f"{ASSETS_DIR}/{CLASS_CAMS_DIR}"):
        shutil.rmtree(outdir / sub, ignore_errors=True)
