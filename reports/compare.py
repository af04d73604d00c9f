"""``convlens compare``: what changed between two runs (two model versions over the same
images, or one model over two datasets).

:func:`compare` reads two run directories (through :mod:`convlens.reports.compare_match`,
which matches their inputs by relative path), computes the figures here, and writes a
static report into OUT (:mod:`convlens.reports.compare_pages`).  What cannot be compared
(other classes, other layers, no saved maps, no labels) is named in ``mismatches`` and
the rest is compared.  Classes are matched by name, layers by name and shape; the map
similarity figures (Pearson r, top-15 % IoU) are defined in
:mod:`convlens.reports.compare_figures`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .compare_figures import TOP_FRACTION, LayerDelta, pearson_r, top_iou
from .compare_match import (
    ClassCamDelta,
    Matching,
    Side,
    class_cams,
    layer_deltas,
    load_npz,
    match_inputs,
    mismatches_of,
    read_side,
)
from .data import ImageEntry

SAME, RIGHT_TO_WRONG, WRONG_TO_RIGHT, OTHER = "same", "right_to_wrong", "wrong_to_right", "other"
FAILED = "failed"  # failed in one run or both
#: order of the flips gallery
FLIP_ORDER = (RIGHT_TO_WRONG, WRONG_TO_RIGHT, OTHER)
FLIP_TEXT = {RIGHT_TO_WRONG: "right → wrong", WRONG_TO_RIGHT: "wrong → right", OTHER: "changed"}


@dataclass
class CamPair:
    """The two CAMs of one input compared: the class (by name, its index in each run)
    and method both runs saved maps for."""

    method: str
    class_name: str
    class_a: int
    class_b: int
    r: float | None
    iou: float | None


@dataclass
class Pair:
    key: str  # A's relpath
    pid: str  # the compare page's file-name id: <A id>-<B id>
    a: ImageEntry
    b: ImageEntry
    change: str  # SAME, RIGHT_TO_WRONG, WRONG_TO_RIGHT, OTHER or FAILED
    cam: CamPair | None = None


@dataclass
class ClassAccuracy:
    """Top-1 accuracy of each run on the compared images of one true class."""

    name: str
    images: int
    correct_a: int
    correct_b: int

    @property
    def accuracy_a(self) -> float:
        return self.correct_a / self.images

    @property
    def accuracy_b(self) -> float:
        return self.correct_b / self.images

    @property
    def delta(self) -> float:
        return self.accuracy_b - self.accuracy_a


@dataclass
class CompareSummary:
    """The figures of a comparison (``convlens compare --json`` prints ``to_json()``)."""

    run_a: str
    run_b: str
    report: str | None
    same_model: bool | None  # None: a run does not say which model it used
    images_a: int
    images_b: int
    matched: int
    only_a: int
    only_b: int
    ambiguous: int
    compared: int  # matched and analysed in both runs
    status_changed: int  # matched, failed in one run or both
    agree: int  # compared with the same top-1 class name
    flips: dict[str, int]
    labelled: int  # compared, with a true class in both runs
    correct_a: int
    correct_b: int
    per_class: list[ClassAccuracy]
    cam_method: str | None
    cams_compared: int
    mean_r: float | None
    median_r: float | None
    mean_iou: float | None
    median_iou: float | None
    class_cams: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    mismatches: list[str]

    @property
    def agreement(self) -> float | None:
        return self.agree / self.compared if self.compared else None

    @property
    def accuracy_a(self) -> float | None:
        return self.correct_a / self.labelled if self.labelled else None

    @property
    def accuracy_b(self) -> float | None:
        return self.correct_b / self.labelled if self.labelled else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["agreement"], d["accuracy_a"], d["accuracy_b"] = (
            self.agreement,
            self.accuracy_a,
            self.accuracy_b,
        )
        d["per_class"] = [
            {**asdict(c), "accuracy_a": c.accuracy_a, "accuracy_b": c.accuracy_b, "delta": c.delta}
            for c in self.per_class
        ]
        d["top_fraction"] = TOP_FRACTION
        return d


@dataclass
class Comparison:
    """Everything the compare report shows."""

    a: Side
    b: Side
    matching: Matching
    pairs: list[Pair]
    class_cams: list[ClassCamDelta]
    layers: list[LayerDelta]
    summary: CompareSummary

    @property
    def flips(self) -> list[Pair]:
        """Changed predictions: right → wrong first, then wrong → right, then others."""
        rank = {k: i for i, k in enumerate(FLIP_ORDER)}
        flips = [p for p in self.pairs if p.change in rank]
        return sorted(flips, key=lambda p: (rank[p.change], p.key))

    @property
    def moved(self) -> list[Pair]:
        """Pairs with compared CAMs, least similar first (r, then IoU; None first)."""
        have = [p for p in self.pairs if p.cam is not None]

        def key(p: Pair) -> tuple[float, float, str]:
            assert p.cam is not None
            r = -2.0 if p.cam.r is None else p.cam.r
            iou = -1.0 if p.cam.iou is None else p.cam.iou
            return (r, iou, p.key)

        return sorted(have, key=key)


MapsHook = Callable[[Pair, np.ndarray, np.ndarray], None]


def change_of(a: ImageEntry, b: ImageEntry) -> str:
    if not (a.ok and b.ok and a.top and b.top):
        return FAILED
    if a.correct is True and b.correct is False:
        return RIGHT_TO_WRONG
    if a.correct is False and b.correct is True:
        return WRONG_TO_RIGHT
    return SAME if a.top.name == b.top.name else OTHER


def _cam_pair(
    pair: Pair, a: Side, b: Side, notes: list[str], hook: MapsHook | None
) -> CamPair | None:
    pa, pb = a.maps.get(pair.a.id), b.maps.get(pair.b.id)
    methods = [m for m in pair.a.cam_methods if m in pair.b.cam_methods]
    if pa is None or pb is None or not methods:
        return None
    ma = load_npz(pa, notes, f"run A's maps of {pair.key}")
    mb = load_npz(pb, notes, f"run B's maps of {pair.key}") if ma is not None else None
    if ma is None or mb is None:
        return None
    names = [e.top.name for e in (pair.a, pair.b) if e.top]
    names += [a.names[c] for c in pair.a.cam_classes if 0 <= c < len(a.names)]
    for name in names:
        ia, ib = a.index_of(name), b.index_of(name)
        for m in methods:
            ka, kb = f"{m}/{ia}", f"{m}/{ib}"
            if ia is None or ib is None or ka not in ma or kb not in mb:
                continue
            x, y = ma[ka], mb[kb]
            if x.ndim != 2 or y.ndim != 2 or 0 in x.shape or 0 in y.shape:
                continue
            cam = CamPair(m, name, ia, ib, pearson_r(x, y), top_iou(x, y))
            if hook is not None:
                pair.cam = cam
                hook(pair, x, y)
            return cam
    return None


def read_comparison(
    run_a: str | Path, run_b: str | Path, on_maps: MapsHook | None = None
) -> Comparison:
    """Read two run directories and compute every figure.  ``on_maps(pair, map_a, map_b)``
    is called with the raw maps of each pair whose CAMs are compared (the report draws
    them).  Raises ValueError (one line) when a path is not a run directory or its
    run.json is damaged."""
    a, b = read_side(run_a), read_side(run_b)
    m = match_inputs(a.entries, b.entries)
    mismatches = mismatches_of(a, b, m)
    notes: list[str] = []
    pairs = [Pair(ea.relpath, f"{ea.id}-{eb.id}", ea, eb, change_of(ea, eb)) for ea, eb in m.pairs]
    for p in pairs:
        if p.change != FAILED:
            p.cam = _cam_pair(p, a, b, notes, on_maps)
    compared = [p for p in pairs if p.change != FAILED]
    if a.maps and b.maps and compared and not any(p.cam for p in compared):
        mismatches.append("no input has maps of a common class and CAM method in both runs")
    labelled = [p for p in compared if p.a.label_index is not None and p.b.label_index is not None]
    per_class: dict[str, ClassAccuracy] = {}
    for p in labelled:
        name = p.a.label if p.a.label is not None else a.names[p.a.label_index or 0]
        row = per_class.setdefault(name, ClassAccuracy(name, 0, 0, 0))
        row.images += 1
        row.correct_a += bool(p.a.correct)
        row.correct_b += bool(p.b.correct)
    if compared and not labelled:
        mismatches.append("no compared input has a known true class in both runs: no accuracy")
    cams = class_cams(a, b, notes)
    layers = layer_deltas(a, b, mismatches)
    rs = [p.cam.r for p in compared if p.cam and p.cam.r is not None]
    ious = [p.cam.iou for p in compared if p.cam and p.cam.iou is not None]
    methods = sorted({p.cam.method for p in compared if p.cam})
    sha_a, sha_b = a.model_sha1, b.model_sha1
    summary = CompareSummary(
        run_a=str(a.outdir),
        run_b=str(b.outdir),
        report=None,
        same_model=None if sha_a is None or sha_b is None else sha_a == sha_b,
        images_a=len(a.entries),
        images_b=len(b.entries),
        matched=len(pairs),
        only_a=len(m.only_a),
        only_b=len(m.only_b),
        ambiguous=m.ambiguous,
        compared=len(compared),
        status_changed=len(pairs) - len(compared),
        agree=sum(1 for p in compared if p.change == SAME or _same_top(p)),
        flips={k: sum(1 for p in compared if p.change == k) for k in FLIP_ORDER},
        labelled=len(labelled),
        correct_a=sum(1 for p in labelled if p.a.correct),
        correct_b=sum(1 for p in labelled if p.b.correct),
        per_class=sorted(per_class.values(), key=lambda c: c.name),
        cam_method=", ".join(methods) or None,
        cams_compared=sum(1 for p in compared if p.cam),
        mean_r=statistics.fmean(rs) if rs else None,
        median_r=statistics.median(rs) if rs else None,
        mean_iou=statistics.fmean(ious) if ious else None,
        median_iou=statistics.median(ious) if ious else None,
        class_cams=[
            {"name": c.name, "count_a": c.count_a, "count_b": c.count_b, "r": c.r, "iou": c.iou}
            for c in cams
        ],
        layers=[
            {
                "name": d.name,
                "died": d.died,
                "revived": d.revived,
                "max_mean_shift": d.max_mean_shift,
                "max_zero_shift": d.max_zero_shift,
            }
            for d in layers
        ],
        mismatches=mismatches + notes,
    )
    return Comparison(a, b, m, pairs, cams, layers, summary)


def _same_top(p: Pair) -> bool:
    """A right→wrong or wrong→right change with the same top-1 name (the true class
    changed between the runs) still agrees on the prediction."""
    return p.change in (RIGHT_TO_WRONG, WRONG_TO_RIGHT) and bool(
        p.a.top and p.b.top and p.a.top.name == p.b.top.name
    )


def compare(
    run_a: str | Path, run_b: str | Path, out: str | Path, *, page_size: int = 100
) -> CompareSummary:
    """Compare two run directories and write the static report into ``out`` (its
    index.html); returns the summary figures.  ``out`` must not be either run."""
    from .compare_pages import render_compare

    out = Path(out)
    for run in (run_a, run_b):
        if Path(run).resolve() == out.resolve():
            raise ValueError(f"{out}: the report would overwrite run {run}'s own; use another -o")
    return render_compare(run_a, run_b, out, page_size=page_size)
