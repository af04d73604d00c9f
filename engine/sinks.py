"""What the engine hands to consumers (e.g. the report's asset writer) while it runs.

The engine knows nothing of HTML: it calls every sink with plain arrays and the record
it wrote to results.jsonl.  The engine never writes into those arrays after handing
them over; a sink may keep them past ``on_batch`` (e.g. to encode files on another
thread) only for a bounded number of images, so memory stays flat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .contract import ModelSpec
from .outdir import Record


@dataclass
class ImageOutcome:
    """One input's result, with the in-memory arrays a sink may render."""

    record: Record
    #: decoded original after EXIF orientation, uint8, RGB (H, W, 3), shrunk so that its
    #: longest side is at most 1024 px (for display); None when the input failed.
    image: np.ndarray | None = None
    #: (method, class_index) -> raw map (h, w) float32 at feature resolution, after the
    #: method's ReLU, before upsampling and normalisation.
    maps: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    #: layer name -> activations (h, w, k) float32 for this image.
    activations: dict[str, np.ndarray] = field(default_factory=dict)


class ResultSink(Protocol):
    """Receives every batch's outcomes.  A sink may also define:

    ``missing(outdir, spec, order, done) -> set[str]``
        called on resume, before ``open``: ``order`` is the ids of this run's input
        files in the order they stream (the done ones included), ``done`` the ok records
        of earlier runs by id; returns the ids of those whose files the sink lacks
        (deleted, or never written): the engine drops and recomputes them.
    ``expect(order, done)``
        called after ``open``, before the first batch, with the same ``order`` and the
        ok records that stay done, so that what the sink decides per image can depend
        on the image's place in the run rather than on what this process has seen.
    ``wants_activations(record) -> bool``
        called once per ok record, before ``on_batch``: the engine fetches activations
        only for the images it says yes to (without it, every image gets them).
    ``surely_wants_activations(record) -> bool``
        called before the record has predictions, on the engine's forward thread: a yes
        promises that ``wants_activations`` will say yes if the record turns out ok, and
        the main pass hands out that image's activations instead of a second pass over
        the network for it (the report: the first images of the grid sample).
    """

    def open(self, outdir: Path, spec: ModelSpec, settings: dict[str, Any]) -> None: ...

    def on_batch(self, outcomes: list[ImageOutcome]) -> None: ...

    def close(self, summary: dict[str, Any]) -> None: ...
