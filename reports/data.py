"""Plain data for the report: read an OUTDIR (see OUTDIR.md) into dataclasses.

Nothing here knows about HTML.  Every reader is tolerant: a missing optional file gives
an empty value, a torn last line of results.jsonl is skipped (and counted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convlens.engine.cams import METHODS
from convlens.engine.outdir import (
    STATS_JSON,
    Prediction,
    Record,
    RunDoc,
    RunJsonError,
    read_results,
    read_run_json,
)

from .formatting import compress_ranges
from .layout import (
    ASSETS_DIR,
    ASSETS_JSON,
    CAMS_DIR,
    GRIDS_DIR,
    THUMBS_DIR,
    cam_file_name,
    grid_file_name,
    list_dir,
    safe_id,
)

# the run directory's file names come from the module that owns that contract (OUTDIR.md)

#: a full confusion matrix is drawn up to this many classes; above, the most confused pairs


@dataclass(slots=True)
class ImageEntry:
    """One input, from its results.jsonl record (only what the report shows)."""

    id: str  # file-name-safe id (== the record's id for engine-written records)
    path: str
    relpath: str
    ok: bool
    error: str | None
    width: int | None
    height: int | None
    predictions: list[Prediction]
    label: str | None
    label_index: int | None
    cam_classes: list[int]
    cam_methods: list[str]
    #: --metrics: per CAM method, the scores of its top-1 map (empty: not scored)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    #: per method, the deletion and insertion curves (engine.outdir.CURVE_POINTS points)
    metric_curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    @property
    def top(self) -> Prediction | None:
        return self.predictions[0] if self.predictions else None

    @property
    def correct(self) -> bool | None:
        """True/False when the label is known and there is a prediction, else None."""
        if self.label_index is None or not self.predictions:
            return None
        return self.predictions[0].index == self.label_index


@dataclass
class Results:
    entries: list[ImageEntry]  # ok images sorted by relpath, then failed ones
    bad_lines: int = 0  # unreadable lines (e.g. a torn last line while the run writes)
    duplicates: int = 0  # records superseded by a later record with the same id

    @property
    def ok(self) -> list[ImageEntry]:
        return [e for e in self.entries if e.ok]

    @property
    def failed(self) -> list[ImageEntry]:
        return [e for e in self.entries if not e.ok]


@dataclass
class LayerStats:
    name: str
    shape: list[int]  # (h, w, k) when known
    channels: int
    mean: float | None  # mean over channels of the per-channel means
    max: float | None
    zero_fraction: float | None
    dead: list[int]
    count: int | None

    @property
    def dead_text(self) -> str:
        return compress_ranges(self.dead)

    @property
    def measured(self) -> bool:
        """Whether stats.json has this layer's statistics (not ``--stats-every 0``, a
        sample with no image, or a run not finished): without them ``dead`` is empty
        because nothing was counted, not because every channel fired."""
        return self.count is not None or self.mean is not None


@dataclass
class OutputRow:
    name: str
    role: str
    shape: str
    layer: str | None


@dataclass
class RunInfo:
    model: str | None
    spec: dict[str, Any] | None
    settings: dict[str, Any]
    summary: dict[str, Any]  # run.json "summary" (total, ok, failed, seconds, device, ...)
    timings: dict[str, Any]
    extra: dict[str, Any]  # any other top-level keys of run.json
    assets: dict[str, Any]  # assets/assets.json (the asset sink's settings), if any
    class_names: list[str]

    def class_name(self, index: int | None) -> str:
        if index is None:
            return ""
        if 0 <= index < len(self.class_names):
            return self.class_names[index]
        return f"class {index}"


def method_label(name: str) -> str:
    """A CAM method's name as people write it (the registry's ``label``)."""
    m = METHODS.get(name)
    return m.label if m is not None and m.label else name


# ---- readers ----------------------------------------------------------------------
def read_json(path: Path, notes: list[str]) -> dict[str, Any]:
    """A JSON object, or {} when the file is missing (a run still going) or damaged; a
    damaged one gets a line in ``notes``, so the report says what it could not show."""
    if not path.exists():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name} could not be read ({type(exc).__name__}); shown without it")
        return {}
    if not isinstance(doc, dict):
        notes.append(f"{path.name} is not a JSON object; shown without it")
        return {}
    return doc


def _int_or_none(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


def _entry(rec: Record, class_names: list[str]) -> ImageEntry:
    """The report's view of a record: a file-name-safe id, printable strings,
    predictions most probable first, each with a name."""
    preds = [
        Prediction(
            p.index,
            _displayable(p.name)
            or (class_names[p.index] if 0 <= p.index < len(class_names) else f"class {p.index}"),
            p.prob,
        )
        for p in (rec.predictions if rec.ok else [])
    ]
    preds.sort(key=lambda p: -p.prob)
    return ImageEntry(
        id=safe_id(rec.id),
        path=_displayable(rec.path),
        relpath=_displayable(rec.relpath),
        ok=rec.ok,
        error=None if rec.error is None else _displayable(rec.error),
        width=rec.width,
        height=rec.height,
        predictions=preds,
        label=None if rec.label is None else _displayable(rec.label),
        label_index=rec.label_index,
        cam_classes=list(rec.cam_classes),
        cam_methods=list(rec.cam_methods),
        metrics=rec.metrics if rec.ok else {},
        metric_curves=rec.metric_curves if rec.ok else {},
    )


def _displayable(value: str) -> str:
    """A string made printable: a file name that is not valid UTF-8 reaches Python as
    surrogate escapes (\\udcXX), which cannot be written as UTF-8; show U+FFFD instead."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def read_entries(outdir: Path, class_names: list[str]) -> Results:
    """results.jsonl (through the engine's reader) as the report's entries: the first
    record per id wins, as in the engine's resume; unreadable lines are counted.

    Order: ok images by (relpath, id), then failed inputs by (relpath, id).  This is the
    index's default order and the order of the image pages' previous/next links.
    """
    found = read_results(outdir)
    by_id: dict[str, ImageEntry] = {}
    dup = 0
    for rec in found.records:
        if rec.id in by_id:
            dup += 1  # the engine keeps the first record of an id, and so do we
            continue
        by_id[rec.id] = _entry(rec, class_names)  # keep the small entry, not the record
    entries = list(by_id.values())
    entries.sort(key=lambda e: (not e.ok, e.relpath, e.id))
    return Results(entries, found.bad_lines, dup)


def read_run(outdir: Path, notes: list[str]) -> RunInfo:
    """run.json, through the contract's one reader (``read_run_json``): ``model_path``,
    ``spec``, ``settings``, ``summary``; other top-level keys are kept in ``extra`` (an
    older run's ``model``, ``counts`` and ``timings`` are read too).  Missing (e.g. while
    a run is going) -> empty; damaged -> empty, with a line in ``notes``."""
    try:
        doc = read_run_json(outdir) or RunDoc()
    except RunJsonError as exc:
        notes.append(f"{exc.path.name} {exc.reason}; shown without it")
        doc = RunDoc()

    def as_dict(v: Any) -> dict[str, Any]:
        return v if isinstance(v, dict) else {}

    older = ("model", "counts", "timings")
    settings = doc.settings
    model = doc.model_path or doc.extra.get("model") or settings.get("model")
    summary = {**as_dict(doc.extra.get("counts")), **(doc.summary or {})}
    extra = {k: v for k, v in doc.extra.items() if k not in older}
    if doc.fingerprint is not None:
        extra["fingerprint"] = doc.fingerprint
    if doc.schema_version is not None:
        extra["schema_version"] = doc.schema_version
    spec = doc.spec
    return RunInfo(
        model=None if model is None else str(model),
        spec=spec,
        settings=settings,
        summary=summary,
        timings=as_dict(doc.extra.get("timings")),
        extra=dict(sorted(extra.items())),
        assets=read_json(outdir / ASSETS_DIR / ASSETS_JSON, notes),
        class_names=[str(n) for n in (spec or {}).get("class_names") or []],
    )


def _mean(values: Any) -> float | None:
    if not isinstance(values, list) or not values:
        return None
    try:
        xs = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return sum(xs) / len(xs)


def _max(values: Any) -> float | None:
    if isinstance(values, (int, float)):
        return float(values)
    if not isinstance(values, list) or not values:
        return None
    try:
        return max(float(v) for v in values)
    except (TypeError, ValueError):
        return None


def layer_order(spec: dict[str, Any] | None) -> list[tuple[str, list[int]]]:
    """Exposed layers in the spec's output order, with their (h, w, k) shape when fixed."""
    out: list[tuple[str, list[int]]] = []
    for o in (spec or {}).get("outputs") or []:
        if not isinstance(o, dict) or o.get("role") != "activation":
            continue
        name = o.get("layer") or str(o.get("name", "")).removeprefix("act/")
        shape = o.get("shape") or []
        dims = [d for d in shape[1:] if isinstance(d, int)]
        out.append((str(name), dims if len(dims) == 3 else []))
    return out


def read_stats(outdir: Path, spec: dict[str, Any] | None, notes: list[str]) -> list[LayerStats]:
    """stats.json per exposed layer, in the spec's layer order (then any others, sorted)."""
    doc = read_json(outdir / STATS_JSON, notes)
    nested = doc.get("layers")
    layers: dict[str, Any] = nested if isinstance(nested, dict) else doc
    order = layer_order(spec)
    names = [n for n, _ in order]
    names += sorted(k for k, v in layers.items() if isinstance(v, dict) and k not in names)
    spec_shapes = dict(order)
    result = []
    for name in names:
        st = layers.get(name)
        st = st if isinstance(st, dict) else {}
        shape = [int(d) for d in st.get("shape") or [] if _int_or_none(d) is not None]
        if len(shape) == 4:  # (N, h, w, k)
            shape = shape[1:]
        if len(shape) != 3:
            shape = spec_shapes.get(name, [])
        dead = sorted(int(c) for c in st.get("dead") or [] if _int_or_none(c) is not None)
        means = st.get("mean")
        channels = shape[-1] if shape else (len(means) if isinstance(means, list) else 0)
        result.append(
            LayerStats(
                name=name,
                shape=shape,
                channels=channels,
                mean=_mean(means),
                max=_max(st.get("max")),
                zero_fraction=_mean(st.get("zero_fraction")),
                dead=dead,
                count=_int_or_none(st.get("count")),
            )
        )
    return result


def outputs_table(spec: dict[str, Any] | None) -> list[OutputRow]:
    rows = []
    for o in (spec or {}).get("outputs") or []:
        if not isinstance(o, dict):
            continue
        shape = " × ".join(str(d) for d in o.get("shape") or [])
        layer = o.get("layer")
        rows.append(
            OutputRow(
                str(o.get("name", "")),
                str(o.get("role", "")),
                shape,
                None if layer is None else str(layer),
            )
        )
    return rows


# ---- assets present --------------------------------------------------------------
@dataclass
class AssetIndex:
    """Which per-image asset files and folders exist (one scandir per folder)."""

    root: Path
    thumbs: set[str]
    cam_dirs: set[str]
    grid_dirs: set[str]

    @classmethod
    def scan(cls, outdir: Path) -> AssetIndex:
        root = outdir / ASSETS_DIR
        return cls(
            root,
            list_dir(root / THUMBS_DIR),
            list_dir(root / CAMS_DIR),
            list_dir(root / GRIDS_DIR),
        )

    def thumb(self, image_id: str) -> str | None:
        name = f"{image_id}.jpg"
        return f"{ASSETS_DIR}/{THUMBS_DIR}/{name}" if name in self.thumbs else None

    def cams(self, image_id: str) -> set[str]:
        return list_dir(self.root / CAMS_DIR / image_id) if image_id in self.cam_dirs else set()

    def grids(self, image_id: str) -> set[str]:
        return list_dir(self.root / GRIDS_DIR / image_id) if image_id in self.grid_dirs else set()

    @staticmethod
    def cam_path(image_id: str, method: str, cls: int) -> str:
        return f"{ASSETS_DIR}/{CAMS_DIR}/{image_id}/{cam_file_name(method, cls)}"

    @staticmethod
    def grid_path(image_id: str, layer: str) -> str:
        return AssetIndex.grid_file_path(image_id, grid_file_name(layer))

    @staticmethod
    def grid_file_path(image_id: str, fname: str) -> str:
        """The report-relative path of the grid file ``fname`` of an image."""
        return f"{ASSETS_DIR}/{GRIDS_DIR}/{image_id}/{fname}"
