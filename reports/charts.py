"""Charts as plain data: bars with their geometry worked out here, drawn as inline SVG by
templates/charts.html (Jinja autoescaping; colours from report.css classes, no styles in
the page, no script).

- :func:`confidence_histogram`: the top-1 probability of every analysed image in
  ``CONFIDENCE_BINS`` equal bins over [0, 1] (numpy.histogram's bins: the last one holds
  1.0), each bar stacked by outcome (correct, wrong, unlabelled).
- :func:`class_accuracy`: top-1 accuracy per true class, over the labelled images.
- :func:`dead_channels`: per exposed layer, the channels that never fired over the run.
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
class Histogram:
    bins: list[HistBin]
    series: list[tuple[str, str]]  # the outcomes present, for the legend
    total: int
    width: int
    height: int
    left: float
    top: float
    plot_w: float
    plot_h: float
    y_ticks: list[Tick]
    x_ticks: list[Tick]

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
        bins,
        present,
        len(scored),
        HIST_W,
        HIST_H,
        HIST_LEFT,
        HIST_TOP,
        plot_w,
        plot_h,
        y_ticks,
        x_ticks,
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
