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

              2 and 3 are capped: only the first ``grid_notable`` (``GRID_NOTABLE``,
              16) such images of the input order get grids for being notable, so a run
              gives grids to at most ``grid_sample + grid_notable`` images whatever
              its size and whatever the model (a random-weight model is unsure of every
              image), and OUTDIR's grids stay bounded.

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
#: grids=sample: the first images of a run that get grids, and at most this many more,
#: misclassified or unsure.  16 + 16 rather than 50 + 50: grids are the report's dearest
#: part (VGG16 at 160 px: 3.5 MB an image, and the notable images' activations take a
#: second pass over the network), and 32 images are more than a reader browses.  The
#: default run with the report, 64 VGG16 photos: 11.5 -> 14.0 img/s, OUTDIR 190 -> 73
#: MB; 300 small-model photos: 150 -> 157 img/s, 39 -> 22 MB (the benchmark's models and
#: photos, medians of two runs each; README, Speed).
GRID_SAMPLE = 16
GRID_NOTABLE = 16


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

    def __init__(
        self,
        grids: str = "sample",
        grid_sample: int = GRID_SAMPLE,
        grid_notable: int = GRID_NOTABLE,
    ):
        if grids not in GRID_POLICIES:
            raise ValueError(f"grids must be one of {', '.join(GRID_POLICIES)}, got {grids!r}")
        if grid_sample < 0 or grid_notable < 0:
            raise ValueError("grid_sample and grid_notable must be >= 0")
        self.grids = grids
        self.grid_sample = int(grid_sample)
        self.grid_notable = int(grid_notable)
        self._position: dict[str, int] = {}  # id -> place in the run's input order
        self._first_ok: list[int] = []  # sorted places of the first ok images known
        self._first_notable: list[int] = []  # the same, of the notable ones

    def expect(self, order: Sequence[str], done: Mapping[str, Record]) -> None:
        """The run's input order (ids) and the ok records already done, by id."""
        self._expect(order, done, [i for i, r in done.items() if notable(r)])

    def expect_ids(self, order: Sequence[str], ok: Iterable[str]) -> None:
        """The run's input order and ok images known by id alone, none of them notable (a
        Ray worker's copy of the sink: :meth:`ReportAssetSink.for_worker`)."""
        self._expect(order, ok, [])

    def _expect(self, order: Sequence[str], ok: Iterable[str], notable_ids: list[str]) -> None:
        self._position = places(order)
        ok_at = (self._position[i] for i in ok if i in self._position)
        self._first_ok = sorted(ok_at)[: self.grid_sample]
        notable_at = (self._position[i] for i in notable_ids if i in self._position)
        self._first_notable = sorted(notable_at)[: self.grid_notable]

    def decide(self, record: Record) -> bool:
        """Whether this ok record gets grids; the same answer when asked again."""
        if self.grids != "sample":
            return self.grids == "all"
        pos = self._position.setdefault(record.id, len(self._position))
        first = _among_first(self._first_ok, self.grid_sample, pos)
        if not notable(record):
            return first
        return _among_first(self._first_notable, self.grid_notable, pos) or first

    def surely(self, record_id: str) -> bool:
        """Whether the image gets grids if it is ok, whatever its predictions: every
        image with "all"; with "sample", one among the first ``grid_sample`` places of
        the order (fewer than ``grid_sample`` ok images can come before it)."""
        if self.grids != "sample":
            return self.grids == "all"
        pos = self._position.get(record_id)
        return pos is not None and pos < self.grid_sample

    def head(self) -> list[str]:
        """The ids of the first ``grid_sample`` places of the order given to
        :meth:`expect`: each gets grids when it is ok, whatever the others turn out
        to be (what a worker that sees only part of the run can decide alone)."""
        return [i for i, p in self._position.items() if p < self.grid_sample]

    def certain(self, order: Sequence[str], done: Mapping[str, Record]) -> set[str]:
        """The done records that get grids whatever the inputs still to run turn out
        to be (an input not done yet may fail, and then it takes no place among the
        first ok images): what a resume may expect to find on disk."""
        if self.grids != "sample":
            return set(done) if self.grids == "all" else set()
        places_ = places(order)
        out = _certain_first(places_, done, set(done), self.grid_sample)
        worth = {i for i, r in done.items() if notable(r)}
        return out | _certain_first(places_, done, worth, self.grid_notable)


def _among_first(first: list[int], n: int, pos: int) -> bool:
    """Whether place ``pos`` is among the first ``n`` of ``first`` (sorted places),
    inserting it (and dropping what falls past ``n``) when it is."""
    i = bisect.bisect_left(first, pos)
    if i >= n:
        return False
    if i == len(first) or first[i] != pos:
        first.insert(i, pos)
        del first[n:]
    return True


def _certain_first(
    order: Mapping[str, int], done: Mapping[str, Record], members: set[str], n: int
) -> set[str]:
    """The ``members`` (done ids of one kind) certainly among the first ``n`` of their
    kind in ``order``: fewer than ``n`` members and inputs not done yet (each may turn
    out to be one) come before them."""
    out = set()
    seen = unknown = 0
    for rid in order:
        if rid in members:
            if seen + unknown < n:
                out.add(rid)
            seen += 1
        elif rid not in done:
            unknown += 1
    return out


def places(order: Sequence[str]) -> dict[str, int]:
    """id -> first place in ``order`` (an id given twice keeps its first place)."""
    out: dict[str, int] = {}
    for rid in order:
        out.setdefault(rid, len(out))
    return out
