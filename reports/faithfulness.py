"""The faithfulness metrics (``convlens run --metrics``) as page data: a method comparison
table and the deletion and insertion curves, one line per CAM method.

Columns and curves are derived from the metric registry
(:data:`convlens.engine.metrics.METRICS`: each metric's ``score_labels``,
``higher_is_better`` and, for metrics with curves, ``curve_x``); rows from the CAM
method registry's order (:data:`convlens.engine.cams.METHODS`).  The same table serves
the run's means (run.json ``summary.metrics``, index and model page) and one image's
scores (its record's ``metrics``, image page).

Best per column: the values rounded to :data:`DIGITS` decimals (as shown); every method
with the best rounded value is marked, unless all methods tie or only one has a value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from convlens.engine.cams import METHODS
from convlens.engine.metrics import METRICS

from .charts import LineChart, line_chart
from .data import method_label

DIGITS = 3
CURVE_Y = "class probability"


@dataclass(frozen=True)
class ScoreColumn:
    """One score of the metric registry: its key in results.jsonl and run.json."""

    key: str
    label: str
    higher_is_better: bool
    metric: str  # the registry's metric name (--metrics)

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"


def score_columns() -> list[ScoreColumn]:
    """Every score the metric registry declares, in registry order."""
    return [
        ScoreColumn(key, mt.score_labels.get(key, key), better, mt.name)
        for mt in METRICS.values()
        for key, better in mt.higher_is_better.items()
    ]


@dataclass(frozen=True)
class ScoreCell:
    value: float | None
    text: str
    best: bool


@dataclass(frozen=True)
class MethodRow:
    method: str
    label: str
    cells: list[ScoreCell]
    n: int | None  # images scored (None: one image's scores)


@dataclass(frozen=True)
class MethodTable:
    columns: list[ScoreColumn]  # those some method has
    rows: list[MethodRow]
    counts: bool  # whether rows carry the number of images scored


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def method_order(methods: list[str]) -> list[str]:
    """The CAM registry's order, then methods it does not know, sorted."""
    known = [m for m in METHODS if m in methods]
    return known + sorted(m for m in methods if m not in METHODS)


def method_table(scores: Mapping[str, Any], counts: bool) -> MethodTable | None:
    """``scores``: method -> {score key: value, ... [, "n": images]} (run.json's
    ``summary.metrics`` or a record's ``metrics``); None when no method has a score."""
    per = {m: v for m, v in scores.items() if isinstance(v, Mapping)}
    columns = [
        c for c in score_columns() if any(_number(v.get(c.key)) is not None for v in per.values())
    ]
    if not columns:
        return None
    methods = method_order(
        [m for m in per if any(_number(per[m].get(c.key)) is not None for c in columns)]
    )
    best: dict[str, float | None] = {}
    for c in columns:
        shown = [round(x, DIGITS) for m in methods if (x := _number(per[m].get(c.key))) is not None]
        top = max(shown) if c.higher_is_better else min(shown)
        best[c.key] = top if len(shown) > 1 and len(set(shown)) > 1 else None
    rows = []
    for m in methods:
        cells = []
        for c in columns:
            x = _number(per[m].get(c.key))
            mark = x is not None and best[c.key] is not None and round(x, DIGITS) == best[c.key]
            cells.append(ScoreCell(x, "—" if x is None else f"{x:.{DIGITS}f}", mark))
        n = per[m].get("n")
        rows.append(
            MethodRow(m, method_label(m), cells, n if counts and isinstance(n, int) else None)
        )
    return MethodTable(columns, rows, counts)


@dataclass(frozen=True)
class CurveChart:
    metric: str
    title: str
    chart: LineChart


def curve_charts(
    curves: Mapping[str, Any], scores: Mapping[str, Any], *, small: bool = False
) -> list[CurveChart]:
    """One chart per metric with curves (deletion, insertion): ``curves`` is method ->
    {metric: [values]}; ``scores`` gives each line's AUC for its legend."""
    charts = []
    for mt in METRICS.values():
        if not mt.curve_x:
            continue
        series = []
        for m in method_order([m for m in curves if isinstance(curves[m], Mapping)]):
            values = [_number(v) for v in curves[m].get(mt.name) or []]
            if len(values) < 2 or any(v is None for v in values):
                continue
            pts = [v for v in values if v is not None]
            ms = scores.get(m)
            auc = _number(ms.get(mt.name)) if isinstance(ms, Mapping) else None
            label = method_label(m) + ("" if auc is None else f" ({auc:.{DIGITS}f})")
            title = f"{method_label(m)}: {mt.score_labels.get(mt.name, mt.name)} " + (
                "—" if auc is None else f"{auc:.{DIGITS}f}"
            )
            series.append((m, label, title, pts))
        name = mt.score_labels.get(mt.name, mt.name)
        summary = f"{mt.label} curves ({CURVE_Y} against the {mt.curve_x}): " + ", ".join(
            s[2] for s in series
        )
        size = {"height": 200} if small else {}
        chart = line_chart(series, mt.curve_x, CURVE_Y, summary, **size)
        if chart is not None:
            charts.append(CurveChart(mt.name, name, chart))
    return charts


@dataclass(frozen=True)
class Faithfulness:
    """What a page shows of the metrics: the table and (where drawn) the curves."""

    table: MethodTable
    curves: list[CurveChart]
    settings: dict[str, Any]  # the run's metrics / metrics_sample

    @property
    def counts(self) -> bool:
        """Whether these are a run's means (else one image's scores)."""
        return self.table.counts

    @property
    def references(self) -> list[tuple[str, str]]:
        """(label, reference) of each metric in the table, from the registry."""
        shown = dict.fromkeys(c.metric for c in self.table.columns)
        return [(METRICS[m].label, METRICS[m].reference) for m in shown if m in METRICS]


def run_faithfulness(
    summary: Mapping[str, Any], settings: Mapping[str, Any]
) -> Faithfulness | None:
    """From run.json: ``summary.metrics`` (per method ``n``, means, mean ``curves``);
    None when the run scored nothing (no ``--metrics``)."""
    doc = summary.get("metrics")
    if not isinstance(doc, Mapping):
        return None
    table = method_table(doc, counts=True)
    if table is None:
        return None
    mean_curves = {m: v.get("curves") for m, v in doc.items() if isinstance(v, Mapping)}
    drawn = curve_charts({m: c for m, c in mean_curves.items() if isinstance(c, Mapping)}, doc)
    asked = {k: settings[k] for k in ("metrics", "metrics_sample") if k in settings}
    return Faithfulness(table, drawn, asked)


def image_faithfulness(
    metrics: Mapping[str, Any], curves: Mapping[str, Any]
) -> Faithfulness | None:
    """One image's scores and (small) curves; None when the image was not scored."""
    table = method_table(metrics, counts=False)
    if table is None:
        return None
    return Faithfulness(table, curve_charts(curves, metrics, small=True), {})
