"""The model page: the analysis file's spec, its export parity as a table, the CAM
methods compared by their faithfulness (``--metrics``: table and mean deletion/insertion
curves), the run's activation statistics (and dead-channel chart), and the per-class
mean CAMs."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from convlens.engine.outdir import CLASS_CAMS

from .charts import HBarChart, dead_channels
from .context import Rendered, ReportContext
from .data import LayerStats, OutputRow, RunInfo, outputs_table
from .faithfulness import Faithfulness, run_faithfulness
from .formatting import flatten
from .imaging import CAM_COLORMAP, encode_image, normalise_map, write_if_changed
from .layout import ASSETS_DIR, CLASS_CAMS_DIR

CLASS_CAM_SIDE = 128


@dataclass
class ClassCam:
    index: int
    name: str
    count: int | None
    src: str


@dataclass
class ParityRow:
    """One output compared at export: the figures of the file's parity metadata."""

    output: str
    max_abs: float | None
    max_rel: float | None
    score: float | None
    passed: bool | None  # None: the metadata does not say
    noise: float | None  # the reference's own noise, where the output was judged by it


@dataclass
class Parity:
    rows: list[ParityRow]
    passed: bool | None
    tolerance: float | None
    images: int | None
    source: str | None
    worst: float | None
    other: list[tuple[str, str]]  # any other keys, flattened


@dataclass
class ModelPage:
    outputs: list[OutputRow]
    sections: list[tuple[str, list[tuple[str, str]]]]
    class_names: list[str]
    parity: Parity | None
    layers: list[LayerStats]
    dead_chart: HBarChart | None
    class_cams: list[ClassCam]
    run_sections: list[tuple[str, list[tuple[str, str]]]]
    faithfulness: Faithfulness | None = None  # --metrics: the method table and curves
    stats_note: str | None = None  # why no layer has statistics (stats_note), if none has


def stats_note(layers: list[LayerStats], settings: dict[str, Any]) -> str | None:
    """What the page says when no layer has statistics: a run that took none on purpose
    (``--stats-every 0``), or a stats.json without them (the run not finished, or no
    image in its sample)."""
    if not layers or any(st.measured for st in layers):
        return None
    if settings.get("stats_every") == 0:
        return "This run took no activation statistics (--stats-every 0)."
    return (
        "stats.json holds no activation statistics: the run has not finished, or no "
        "image was in its sample (--stats-every)."
    )


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


#: keys the table and its line show; any others are listed under it
PARITY_KEYS = (
    "outputs",
    "passed",
    "tolerance",
    "n_images",
    "images",
    "source",
    "worst",
    "failed",
    "noisy",
    "noise",
)


def parity_table(doc: Any) -> Parity | None:
    """The ``parity`` object of the spec (exporter/parity.py's check_parity) as rows.

    An output passes unless ``failed`` names it; metadata without ``failed`` (older files)
    judge each score against ``tolerance``, or take the overall ``passed`` when it is
    true (an output within the reference's noise passed, see ``reference_noise``).
    """
    if not isinstance(doc, dict) or not doc:
        return None
    found = doc.get("outputs")
    outputs: dict[str, Any] = found if isinstance(found, dict) else {}
    tol = _num(doc.get("tolerance"))
    overall = doc.get("passed") if isinstance(doc.get("passed"), bool) else None
    failed = doc.get("failed") if isinstance(doc.get("failed"), list) else None
    rows = []
    for name in sorted(outputs, key=str):
        v = outputs[name] if isinstance(outputs[name], dict) else {}
        score = _num(v.get("score"))
        passed: bool | None
        if failed is not None:
            passed = name not in failed
        elif overall is True:
            passed = True
        elif score is not None and tol is not None:
            passed = score <= tol
        else:
            passed = None
        noise = _num(v.get("reference_noise"))
        if score is None or tol is None or score <= tol:
            noise = None  # within tolerance: the noise did not matter
        rows.append(
            ParityRow(
                str(name),
                _num(v.get("max_abs")),
                _num(v.get("max_rel")),
                score,
                passed,
                noise,
            )
        )
    images = doc.get("n_images", doc.get("images"))
    return Parity(
        rows=rows,
        passed=overall,
        tolerance=tol,
        images=int(images) if isinstance(images, int) else None,
        source=None if doc.get("source") is None else str(doc.get("source")),
        worst=_num(doc.get("worst")),
        other=flatten({k: v for k, v in doc.items() if k not in PARITY_KEYS}),
    )


def class_cam_images(
    outdir: Path,
    names: list[str],
    spec: dict[str, Any] | None,
    notes: list[str],
    colormap: int = CAM_COLORMAP,
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
            img = cv2.applyColorMap(np.clip(up * 255 + 0.5, 0, 255).astype(np.uint8), colormap)
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
    run_sections = [
        (title, flatten(doc))
        for title, doc in (
            ("Run settings", run.settings),
            # the metrics are the method table's (above), not a list of flattened keys
            ("Summary", {k: v for k, v in run.summary.items() if k != "metrics"}),
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
        parity=parity_table(spec.get("parity")),
        layers=layers,
        dead_chart=dead_channels(layers),
        class_cams=class_cams,
        run_sections=run_sections,
        faithfulness=run_faithfulness(run.summary, run.settings),
        stats_note=stats_note(layers, run.settings),
    )


def model_pages(ctx: ReportContext) -> Iterator[Rendered]:
    page = model_page(ctx.run, ctx.layers, ctx.class_cams)
    yield Rendered("model.html", "", f"Model · {ctx.title}", page)
