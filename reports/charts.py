"""Charts as plain data: bars with their geometry worked out here, drawn as inline SVG by
templates/charts.html (Jinja autoescaping; colours from report.css classes, no styles in
the page, no script).

- :func:`confidence_histogram`: the top-1 probability of every analysed image in
  ``CONFIDENCE_BINS`` equal bins over [0, 1] (numpy.histogram's bins: the last one holds
  1.0), each bar stacked by outcome (correct, wrong, unlabelled).
- :func:`class_accuracy`: top-1 accuracy per true class, over the labelled images.
- :func:`dead_channels`: per exposed layer, the channels that never fired over the run.
- :func:`line_chart`: curves sampled at evenly spaced x on [0, 1], values on [0, 1] (the
  faithfulness metrics' deletion and insertion curves), one line per series.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import ImageEntry, LayerStats

CONFIDENCE_BINS = 10
#: per-class accuracy bars drawn at most; with more classes, the least accurate ones
ACCURACY_BARS_MAX = 30
LABEL_CHARS = 28  # longer axis labels are cut (the full name is in the bar's tooltip)

#: (series key, legend label) of the histogram's stacks, bottom first
OUTCOMES = (("correct", "correct"), ("wrong", "wrong"), ("unlabelled", "no label"))

# geometry (SVG user units = CSS px at 100 %)
HIST_W, HIST_H = 560, 240
HIST_LEFT, HIST_RIGHT, HIST_TOP, HIST_BOTTOM = 44, 12, 12, 40
HBAR_ROW, HBAR_GAP, HBAR_LABEL_W, HBAR_TEXT_W, HBAR_W = 18, 4, 190, 110, 560
LINE_W, LINE_H = 420, 260
LINE_LEFT, LINE_RIGHT, LINE_TOP, LINE_BOTTOM = 44, 12, 12, 40
#: line colours (report.css classes l-0 ... l-<LINE_COLOURS - 1>), then repeated
LINE_COLOURS = 12


@dataclass(frozen=True)
class Segment:
    """One outcome's part of a histogram bar."""

    series: str
    count: int
    y: float
    h: float


@dataclass(frozen=True)
class HistBin:
    lo: float
    hi: float
    total: int
    x: float
    w: float
    segments: list[Segment]

    @property
    def title(self) -> str:
        parts = ", ".join(f"{s.count} {s.series}" for s in self.segments if s.count)
        images = "image" if self.total == 1 else "images"
        return f"top-1 probability {self.lo:.1f}–{self.hi:.1f}: {self.total} {images}" + (
            f" ({parts})" if parts else ""
        )


@dataclass(frozen=True)
class Tick:
    text: str
    pos: float


@dataclass(frozen=True)
class Plot:
    """A chart's frame: its size, the plot area inside it, and the ticks of its axes
    (drawn by templates/charts.html's ``axes``)."""

    width: int
    height: int
    left: float
    top: float
    plot_w: float
    plot_h: float
    y_ticks: list[Tick]
    x_ticks: list[Tick]


@dataclass(frozen=True)
class Histogram(Plot):
    bins: list[HistBin]
    series: list[tuple[str, str]]  # the outcomes present, for the legend
    total: int

    @property
    def summary(self) -> str:
        return (
            f"Histogram of the top-1 probability of {self.total} images in "
            f"{len(self.bins)} bins: " + ", ".join(str(b.total) for b in self.bins)
        )


@dataclass(frozen=True)
class HBar:
    """One row of a horizontal bar chart: a share from 0 to 1 of the full width."""

    label: str  # as drawn (cut to LABEL_CHARS)
    full_label: str
    value: float  # 0..1
    num: int  # e.g. correct images, dead channels
    den: int  # e.g. labelled images, channels
    text: str  # drawn right of the bar
    y: float
    w: float
    series: str  # css class of the bar

    @property
    def title(self) -> str:
        return f"{self.full_label}: {self.text}"


@dataclass(frozen=True)
class HBarChart:
    rows: list[HBar]
    width: int
    height: int
    bar_x: float
    bar_w: float
    row_h: float
    text_x: float
    omitted: int  # rows left out (ACCURACY_BARS_MAX)
    summary: str


def _nice_step(top: int) -> int:
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000):
        if top / step <= 5:
            return step
    return 10 ** len(str(top)) // 10


def _cut(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def _outcome(e: ImageEntry) -> str:
    c = e.correct
    return "unlabelled" if c is None else "correct" if c else "wrong"


def confidence_histogram(entries: list[ImageEntry]) -> Histogram | None:
    """The top-1 probabilities of the ok entries, binned as numpy.histogram(p, 10, (0, 1))
    does; None when no image has a prediction."""
    scored = [e for e in entries if e.ok and e.top is not None]
    if not scored:
        return None
    probs = np.array([e.top.prob for e in scored if e.top is not None], dtype=np.float64)
    edges = np.linspace(0.0, 1.0, CONFIDENCE_BINS + 1)
    kinds = [_outcome(e) for e in scored]
    counts = {
        key: np.histogram(probs[[k == key for k in kinds]], bins=edges)[0] for key, _ in OUTCOMES
    }
    totals = np.sum(list(counts.values()), axis=0)
    top = int(totals.max())
    step = _nice_step(max(top, 1))
    y_max = max(step, -(-top // step) * step)
    plot_w = HIST_W - HIST_LEFT - HIST_RIGHT
    plot_h = HIST_H - HIST_TOP - HIST_BOTTOM
    bw = plot_w / CONFIDENCE_BINS
    bins = []
    for i in range(CONFIDENCE_BINS):
        base = float(HIST_TOP + plot_h)
        segs = []
        for key, _ in OUTCOMES:
            n = int(counts[key][i])
            h = plot_h * n / y_max
            base -= h
            segs.append(Segment(key, n, round(base, 2), round(h, 2)))
        bins.append(
            HistBin(
                round(float(edges[i]), 6),
                round(float(edges[i + 1]), 6),
                int(totals[i]),
                round(HIST_LEFT + i * bw + 1, 2),
                round(bw - 2, 2),
                segs,
            )
        )
    y_ticks = [
        Tick(str(v), round(HIST_TOP + plot_h * (1 - v / y_max), 2))
        for v in range(0, y_max + 1, step)
    ]
    x_ticks = [Tick(f"{v:.1f}", round(HIST_LEFT + plot_w * v, 2)) for v in edges[::2]]
    present = [(k, label) for k, label in OUTCOMES if counts[k].sum()]
    return Histogram(
        HIST_W,
        HIST_H,
        HIST_LEFT,
        HIST_TOP,
        plot_w,
        plot_h,
        y_ticks,
        x_ticks,
        bins=bins,
        series=present,
        total=len(scored),
    )


def _hbar_chart(
    rows: list[tuple[str, int, int, str, str]], omitted: int, summary: str
) -> HBarChart | None:
    """rows: (label, num, den, text, series); a bar is num/den of the full width."""
    if not rows:
        return None
    bar_w = HBAR_W - HBAR_LABEL_W - HBAR_TEXT_W
    pitch = HBAR_ROW + HBAR_GAP
    bars = []
    for i, (label, num, den, text, series) in enumerate(rows):
        value = num / den if den else 0.0
        bars.append(
            HBar(
                _cut(label),
                label,
                value,
                num,
                den,
                text,
                i * pitch,
                round(bar_w * value, 2),
                series,
            )
        )
    return HBarChart(
        bars,
        HBAR_W,
        len(rows) * pitch - HBAR_GAP,
        HBAR_LABEL_W,
        bar_w,
        HBAR_ROW,
        HBAR_LABEL_W + bar_w + 6,
        omitted,
        summary,
    )


def class_accuracy(entries: list[ImageEntry], names: list[str]) -> HBarChart | None:
    """Top-1 accuracy per true class over the labelled ok images, in class order; past
    ACCURACY_BARS_MAX classes, the least accurate ones (then by class index)."""
    seen: dict[int, list[int]] = {}
    for e in entries:
        if e.ok and e.correct is not None and e.label_index is not None:
            n_k = seen.setdefault(e.label_index, [0, 0])
            n_k[0] += 1
            n_k[1] += 1 if e.correct else 0
    classes = sorted(seen)
    omitted = 0
    if len(classes) > ACCURACY_BARS_MAX:
        worst = sorted(classes, key=lambda c: (seen[c][1] / seen[c][0], c))[:ACCURACY_BARS_MAX]
        omitted = len(classes) - len(worst)
        classes = sorted(worst)

    def name(c: int) -> str:
        return names[c] if 0 <= c < len(names) else f"class {c}"

    rows = []
    for c in classes:
        n, k = seen[c]
        rows.append((name(c), k, n, f"{100 * k / n:.0f}% ({k} of {n})", "acc"))
    return _hbar_chart(
        rows,
        omitted,
        "Top-1 accuracy per true class: "
        + ", ".join(f"{name(c)} {seen[c][1]} of {seen[c][0]}" for c in classes),
    )


def dead_channels(layers: list[LayerStats]) -> HBarChart | None:
    """Per layer with known channels: the dead ones (never fired on any image) out of all."""
    rows = [
        (st.name, len(st.dead), st.channels, f"{len(st.dead)} of {st.channels}", "dead")
        for st in layers
        if st.channels > 0 and st.count is not None
    ]
    return _hbar_chart(
        rows,
        0,
        "Dead channels per layer: " + ", ".join(f"{r[0]} {r[1]} of {r[2]}" for r in rows),
    )


@dataclass(frozen=True)
class Line:
    """One series of a line chart: its polyline in SVG units and its values."""

    key: str  # the series' id (e.g. a CAM method), for data-series
    label: str  # for the legend
    title: str  # the line's tooltip
    colour: int  # css class l-<colour>
    points: str  # "x,y x,y ..." for <polyline points>
    values: list[float]


@dataclass(frozen=True)
class LineChart(Plot):
    lines: list[Line]
    x_label: str
    y_label: str
    summary: str


def line_chart(
    series: list[tuple[str, str, str, list[float]]],
    x_label: str,
    y_label: str,
    summary: str,
    *,
    width: int = LINE_W,
    height: int = LINE_H,
) -> LineChart | None:
    """series: (key, legend label, tooltip, values); point ``i`` of ``n`` values is drawn
    at ``x = i / (n - 1)`` and ``y = value``, both axes [0, 1] (values clipped to it).
    None when no series has two points or more."""
    drawn = [s for s in series if len(s[3]) >= 2]
    if not drawn:
        return None
    plot_w = width - LINE_LEFT - LINE_RIGHT
    plot_h = height - LINE_TOP - LINE_BOTTOM

    def x_at(f: float) -> float:
        return round(LINE_LEFT + plot_w * f, 2)

    def y_at(v: float) -> float:
        return round(LINE_TOP + plot_h * (1 - min(1.0, max(0.0, v))), 2)

    lines = []
    for i, (key, label, title, values) in enumerate(drawn):
        n = len(values)
        pts = " ".join(f"{x_at(j / (n - 1))},{y_at(v)}" for j, v in enumerate(values))
        lines.append(Line(key, label, title, i % LINE_COLOURS, pts, [float(v) for v in values]))
    ticks = [Tick(f"{v:g}", x_at(v)) for v in (0.0, 0.25, 0.5, 0.75, 1.0)]
    y_ticks = [Tick(t.text, y_at(float(t.text))) for t in ticks]
    return LineChart(
        width,
        height,
        LINE_LEFT,
        LINE_TOP,
        plot_w,
        plot_h,
        y_ticks,
        ticks,
        lines=lines,
        x_label=x_label,
        y_label=y_label,
        summary=summary,
    )
