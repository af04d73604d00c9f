"""Which ok images get activation grids (``--grids``), decided from the record and its
place in the run alone.

``"all"``     every ok image.
``"none"``    none.
``"sample"``  an ok image gets grids when ANY of

              1. it is among the first ``grid_sample`` ok images in the run's input order
                 (the order ``convlens run`` discovers its inputs: the arguments in turn,
                 directories walked sorted); the engine gives that order to the sink
                 (``expect``), with the records already done;
              2. its record has a ``label_index`` and the top-1 prediction differs
                 (misclassified);
              3. its top-1 probability is below ``LOW_CONFIDENCE`` (0.5).

              2 and 3 are not capped: a run where a third of the images is wrong gets
              grids for that third.

Why the input order and not "the first images this process saw": a killed run resumed,
whatever it recomputes, then picks exactly the images a clean run picks (a count of what
was seen, or of thumbnails on disk, counted the images a resume recomputed twice).  The
engine streams the images still to do in input order, so when one is decided every
earlier one is either done or already decided.  A sink driven without ``expect`` places
images in the order it receives them.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence

from convlens.engine.outdir import Record

GRID_POLICIES = ("all", "sample", "none")
LOW_CONFIDENCE = 0.5
GRID_SAMPLE = 50  # grids=sample: the first images of a run that get grids


def top1(record: Record) -> tuple[int | None, float | None]:
    """(index, probability) of the record's most probable prediction."""
    if not record.predictions:
        return None, None
    best = max(record.predictions, key=lambda p: p.prob)
    return best.index, best.prob


def is_misclassified(record: Record) -> bool:
    label = record.label_index
    idx, _ = top1(record)
    return label is not None and idx is not None and label != idx


def is_low_confidence(record: Record) -> bool:
    _, prob = top1(record)
    return prob is not None and prob < LOW_CONFIDENCE


def notable(record: Record) -> bool:
    """Rules 2 and 3: grids whatever the image's place."""
    return is_misclassified(record) or is_low_confidence(record)


class GridPolicy:
    """The grid decision of one run (see the module docstring)."""

    def __init__(self, grids: str = "sample", grid_sample: int = GRID_SAMPLE):
        if grids not in GRID_POLICIES:
            raise ValueError(f"grids must be one of {', '.join(GRID_POLICIES)}, got {grids!r}")
        if grid_sample < 0:
            raise ValueError("grid_sample must be >= 0")
        self.grids = grids
        self.grid_sample = int(grid_sample)
        self._position: dict[str, int] = {}  # id -> place in the run's input order
        self._first_ok: list[int] = []  # sorted places of the first ok images known

    def expect(self, order: Sequence[str], done: Iterable[str]) -> None:
        """The run's input order (ids) and the ok images already done."""
        self._position = places(order)
        done_at = (self._position[i] for i in done if i in self._position)
        self._first_ok = sorted(done_at)[: self.grid_sample]

    def decide(self, record: Record) -> bool:
        """Whether this ok record gets grids; the same answer when asked again."""
        if self.grids != "sample":
            return self.grids == "all"
        pos = self._position.setdefault(record.id, len(self._position))
        return self._among_first(pos) or notable(record)

    def _among_first(self, pos: int) -> bool:
        i = bisect.bisect_left(self._first_ok, pos)
        if i >= self.grid_sample:
            return False
        if i == len(self._first_ok) or self._first_ok[i] != pos:
            self._first_ok.insert(i, pos)
            del self._first_ok[self.grid_sample :]
        return True

    def certain(self, order: Sequence[str], done: Mapping[str, Record]) -> set[str]:
        """The done records that get grids whatever the inputs still to run turn out
        to be (an input not done yet may fail, and then it takes no place among the
        first ok images): what a resume may expect to find on disk."""
        if self.grids != "sample":
            return set(done) if self.grids == "all" else set()
        out = {i for i, r in done.items() if notable(r)}
        known_ok = unknown = 0
        for rid in places(order):
            if rid in done:
                if known_ok + unknown < self.grid_sample:
                    out.add(rid)
                known_ok += 1
            else:
                unknown += 1
        return out


def places(order: Sequence[str]) -> dict[str, int]:
    """id -> first place in ``order`` (an id given twice keeps its first place)."""
    out: dict[str, int] = {}
    for rid in order:
        out.setdefault(rid, len(out))
    return out
