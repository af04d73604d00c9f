"""The index's summary figures: counts, accuracy, the confusion matrix and the most
confused pairs; and the small formatting helpers the templates use."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .data import Results, RunInfo

CONFUSION_MAX_CLASSES = 25
CONFUSED_PAIRS = 25
HEAT_LEVELS = 6


@dataclass
class ConfusionCell:
    count: int
    level: int  # 0..HEAT_LEVELS-1 (row-normalised), for a CSS class
    diagonal: bool


@dataclass
class ConfusionRow:
    index: int
    name: str
    total: int
    cells: list[ConfusionCell]


@dataclass
class ConfusedPair:
    true_index: int
    true_name: str
    pred_index: int
    pred_name: str
    count: int


@dataclass
class Summary:
    images: int
    ok: int
    failed: int
    classes: int
    labelled: int
    correct: int
    accuracy: float | None
    topk: int
    topk_accuracy: float | None
    confusion_classes: list[tuple[int, str]] = field(default_factory=list)
    confusion: list[ConfusionRow] = field(default_factory=list)
    confused_pairs: list[ConfusedPair] = field(default_factory=list)


# ---- summary ----------------------------------------------------------------------
def heat_level(fraction: float) -> int:
    if fraction <= 0:
        return 0
    return min(HEAT_LEVELS - 1, 1 + int(fraction * (HEAT_LEVELS - 1)))


def summarise(results: Results, run: RunInfo) -> Summary:
    ok = [e for e in results.entries if e.ok]
    labelled = [e for e in ok if e.label_index is not None and e.predictions]
    correct = sum(1 for e in labelled if e.correct)
    topk = max((len(e.predictions) for e in ok), default=0)
    in_topk = sum(1 for e in labelled if any(p.index == e.label_index for p in e.predictions))
    n_classes = len(run.class_names) or len(
        {p.index for e in ok for p in e.predictions} | {e.label_index for e in labelled}
    )
    s = Summary(
        images=len(results.entries),
        ok=len(ok),
        failed=len(results.entries) - len(ok),
        classes=n_classes,
        labelled=len(labelled),
        correct=correct,
        accuracy=correct / len(labelled) if labelled else None,
        topk=topk,
        topk_accuracy=in_topk / len(labelled) if labelled and topk > 1 else None,
    )
    if not labelled:
        return s
    pairs: Counter[tuple[int, int]] = Counter()
    names: dict[int, str] = {}
    for e in labelled:
        assert e.label_index is not None and e.top is not None
        pairs[(e.label_index, e.top.index)] += 1
        names.setdefault(e.top.index, e.top.name)
        if e.label is not None:
            names.setdefault(e.label_index, e.label)

    def name(i: int) -> str:
        return run.class_name(i) if i < len(run.class_names) else names.get(i, f"class {i}")

    classes = sorted({t for t, _ in pairs} | {p for _, p in pairs})
    if len(classes) <= CONFUSION_MAX_CLASSES:
        s.confusion_classes = [(c, name(c)) for c in classes]
        for t in classes:
            total = sum(pairs[(t, p)] for p in classes)
            cells = []
            for p in classes:
                n = pairs[(t, p)]
                cells.append(ConfusionCell(n, heat_level(n / total if total else 0.0), t == p))
            s.confusion.append(ConfusionRow(t, name(t), total, cells))
    wrong = [(n, t, p) for (t, p), n in pairs.items() if t != p]
    wrong.sort(key=lambda x: (-x[0], x[1], x[2]))
    s.confused_pairs = [
        ConfusedPair(t, name(t), p, name(p), n) for n, t, p in wrong[:CONFUSED_PAIRS]
    ]
    return s
