"""What the engine hands to consumers (e.g. the report's asset writer) while it runs.

The engine knows nothing of HTML: it calls every sink with plain arrays and the record
it wrote to results.jsonl.  A sink must not keep references to the arrays after
``on_batch`` returns (memory stays flat).
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
    """Receives every batch's outcomes.  A sink may also define
    ``wants_activations(record) -> bool``: the engine calls it once per ok record,
    before ``on_batch``, and fetches activations only for the images it says yes to
    (without it, every image gets them)."""

    def open(self, outdir: Path, spec: ModelSpec, settings: dict[str, Any]) -> None: ...

    def on_batch(self, outcomes: list[ImageOutcome]) -> None: ...

    def close(self, summary: dict[str, Any]) -> None: ...
