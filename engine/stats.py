"""Per-channel activation statistics over a whole run, mergeable across batches/shards.

For a layer with activations ``A`` of shape ``(N, h, w, k)`` seen over the run, with
``P = N * h * w`` positions per channel in total, channel ``c`` accumulates::

    sum[c]   = sum over all images and positions of A[..., c]      (float64)
    max[c]   = max over all images and positions of A[..., c]
    zeros[c] = number of positions where A[..., c] == 0 exactly
    P        = number of positions summed (same for every channel)

and reports ``mean = sum / P``, ``zero_fraction = zeros / P`` and
``dead = {c : max[c] <= 0}`` (channels that never fired over the run).  All of these
merge exactly: sums and counts add, maxima take the maximum, so statistics computed per
batch or per shard and merged equal those of the whole run (up to float64 summation
order).

Sampling (``--stats-every K``): the statistics cover the images whose id hashes to 0
modulo K (:func:`in_stats_sample`: about one image in K, the same images whatever the
order, batches or resumes), so ``count`` is the number of images sampled; ``mean`` and
``zero_fraction`` are then estimates over that sample, ``max`` a lower bound of the
whole run's, and ``dead`` may name a channel that fires only on images left out.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .results import atomic_save_npz


def in_stats_sample(image_id: str, every: int) -> bool:
    """Whether ``--stats-every every`` counts this image:
    ``int(sha1("stats:" + id)[:8], 16) % every == 0`` (every image when ``every`` is 1,
    none when it is 0)."""
    if every <= 1:
        return every == 1
    digest = hashlib.sha1(f"stats:{image_id}".encode()).hexdigest()
    return int(digest[:8], 16) % every == 0


def _sig6(values: np.ndarray) -> list[float | None]:
    """Floats rounded to 6 significant digits; non-finite values become ``None``."""
    return [float(f"{v:.6g}") if math.isfinite(v) else None for v in values.tolist()]


@dataclass
class LayerStats:
    """Running per-channel statistics of one layer with feature shape ``(h, w, k)``."""

    shape: tuple[int, int, int]
    count: int = 0  # images
    positions: int = 0  # images * h * w
    sum: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    max: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    zeros: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        k = self.shape[2]
        if self.sum.size == 0:
            self.sum = np.zeros(k, np.float64)
        if self.max.size == 0:
            self.max = np.full(k, -np.inf, np.float64)
        if self.zeros.size == 0:
            self.zeros = np.zeros(k, np.int64)

    @classmethod
    def empty(cls, shape: tuple[int, int, int]) -> LayerStats:
        h, w, k = (int(v) for v in shape)
        return cls(shape=(h, w, k))

    def update(self, acts: np.ndarray) -> None:
        """Add a batch ``(N, h, w, k)``."""
        if acts.ndim != 4 or tuple(acts.shape[1:]) != self.shape:
            raise ValueError(f"expected activations (N, {self.shape}), got {acts.shape}")
        n = acts.shape[0]
        if n == 0:
            return
        flat = acts.reshape(-1, self.shape[2])
        self.sum += flat.sum(axis=0, dtype=np.float64)
        np.maximum(self.max, flat.max(axis=0), out=self.max)
        self.zeros += np.count_nonzero(flat == 0, axis=0)
        self.count += n
        self.positions += flat.shape[0]

    def update_reduced(self, sums: np.ndarray, maxes: np.ndarray, zeros: np.ndarray) -> None:
        """Add a batch already reduced over positions: per image and channel ``(N, k)``
        sums, maxima and counts of zeros (e.g. computed by onnxruntime in the graph)."""
        n = sums.shape[0]
        if n == 0:
            return
        k = self.shape[2]
        if sums.shape != (n, k) or maxes.shape != (n, k) or zeros.shape != (n, k):
            raise ValueError(f"expected reduced statistics (N, {k})")
        self.sum += sums.sum(axis=0, dtype=np.float64)
        np.maximum(self.max, maxes.max(axis=0), out=self.max)
        self.zeros += np.rint(zeros.sum(axis=0, dtype=np.float64)).astype(np.int64)
        self.count += n
        self.positions += n * self.shape[0] * self.shape[1]

    def merge(self, other: LayerStats) -> None:
        """Fold ``other`` (same shape) into this one."""
        if other.shape != self.shape:
            raise ValueError(f"cannot merge layer stats of shape {other.shape} into {self.shape}")
        self.sum += other.sum
        np.maximum(self.max, other.max, out=self.max)
        self.zeros += other.zeros
        self.count += other.count
        self.positions += other.positions

    @property
    def mean(self) -> np.ndarray:
        """``sum / positions`` per channel (zeros before any update)."""
        return self.sum / self.positions if self.positions else np.zeros_like(self.sum)

    @property
    def zero_fraction(self) -> np.ndarray:
        """``zeros / positions`` per channel."""
        return (
            self.zeros / self.positions if self.positions else np.zeros(self.shape[2], np.float64)
        )

    @property
    def dead(self) -> list[int]:
        """Channels whose maximum over the run is ``<= 0`` (never fired)."""
        if not self.count:
            return []
        return [int(i) for i in np.flatnonzero(self.max <= 0)]

    def to_json_dict(self) -> dict[str, Any]:
        """``shape``, ``count``, per-channel ``mean``/``max``/``zero_fraction`` (6
        significant digits) and ``dead``."""
        return {
            "shape": list(self.shape),
            "count": self.count,
            "mean": _sig6(self.mean),
            "max": _sig6(self.max) if self.count else [None] * self.shape[2],
            "zero_fraction": _sig6(self.zero_fraction),
            "dead": self.dead,
        }


class RunStats:
    """Layer name -> :class:`LayerStats`, in the order layers were first seen."""

    def __init__(self) -> None:
        self.layers: dict[str, LayerStats] = {}

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, layer: object) -> bool:
        return layer in self.layers

    def __getitem__(self, layer: str) -> LayerStats:
        return self.layers[layer]

    def update(self, layer: str, acts: np.ndarray) -> None:
        """Add a batch of activations ``(N, h, w, k)`` of ``layer``."""
        if acts.ndim != 4:
            raise ValueError(f"{layer}: expected activations (N, h, w, k), got {acts.shape}")
        st = self.layers.get(layer)
        if st is None:
            h, w, k = acts.shape[1:]
            st = self.layers[layer] = LayerStats.empty((h, w, k))
        st.update(acts)

    def update_reduced(
        self,
        layer: str,
        shape: tuple[int, int, int],
        sums: np.ndarray,
        maxes: np.ndarray,
        zeros: np.ndarray,
    ) -> None:
        """Add a batch of ``layer`` (feature shape ``(h, w, k)``) reduced over positions;
        a batch of no image adds nothing (not even the layer)."""
        if len(sums) == 0:
            return
        st = self.layers.get(layer)
        if st is None:
            st = self.layers[layer] = LayerStats.empty(shape)
        st.update_reduced(sums, maxes, zeros)

    def merge(self, other: RunStats) -> None:
        """Fold ``other`` into this one (layers missing here are copied)."""
        for name, st in other.layers.items():
            mine = self.layers.get(name)
            if mine is None:
                mine = self.layers[name] = LayerStats.empty(st.shape)
            mine.merge(st)

    def to_json_dict(self) -> dict[str, Any]:
        """``{layer: LayerStats.to_json_dict()}`` (the ``stats.json`` document)."""
        return {name: st.to_json_dict() for name, st in self.layers.items()}

    # ---- persistence ----------------------------------------------------------------
    def save_npz(self, path: str | os.PathLike[str]) -> None:
        """Write to ``path`` atomically (temporary file in the same directory, then
        ``os.replace``), so a reader never sees a partial file."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "layers": np.array(json.dumps(list(self.layers))),
        }
        for i, st in enumerate(self.layers.values()):
            arrays[f"l{i}_shape"] = np.array(st.shape, np.int64)
            arrays[f"l{i}_counts"] = np.array([st.count, st.positions], np.int64)
            arrays[f"l{i}_sum"] = st.sum
            arrays[f"l{i}_max"] = st.max
            arrays[f"l{i}_zeros"] = st.zeros
        atomic_save_npz(path, arrays)

    @classmethod
    def load_npz(cls, path: str | os.PathLike[str]) -> RunStats:
        """Read a file written by :meth:`save_npz`."""
        out = cls()
        with np.load(path, allow_pickle=False) as z:
            names = json.loads(str(z["layers"]))
            for i, name in enumerate(names):
                h, w, k = (int(v) for v in z[f"l{i}_shape"])
                count, positions = (int(v) for v in z[f"l{i}_counts"])
                out.layers[name] = LayerStats(
                    shape=(h, w, k),
                    count=count,
                    positions=positions,
                    sum=z[f"l{i}_sum"].astype(np.float64),
                    max=z[f"l{i}_max"].astype(np.float64),
                    zeros=z[f"l{i}_zeros"].astype(np.int64),
                )
        return out


class ClassCAMs:
    """Per predicted class: the sum and count of the normalised top-1 CAMs, mergeable
    across batches and shards like :class:`RunStats`; ``means`` gives class_cams.npz."""

    def __init__(self) -> None:
        self.sums: dict[int, np.ndarray] = {}
        self.counts: dict[int, int] = {}

    def add(self, classes: np.ndarray, maps: np.ndarray) -> None:
        """classes (N,) top-1 class of each image, maps (N, h, w) normalised to 0..1."""
        for c, m in zip(classes.tolist(), maps, strict=True):
            c = int(c)
            if c in self.sums:
                self.sums[c] += m
                self.counts[c] += 1
            else:
                self.sums[c] = m.astype(np.float64)
                self.counts[c] = 1

    def merge(self, other: ClassCAMs) -> None:
        for c, s in other.sums.items():
            if c in self.sums:
                self.sums[c] = self.sums[c] + s
                self.counts[c] += other.counts[c]
            else:
                self.sums[c] = s.astype(np.float64)
                self.counts[c] = other.counts[c]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """A shard's arrays: ``class_<c>`` sums and ``count_class_<c>`` counts."""
        out: dict[str, np.ndarray] = {}
        for c, s in self.sums.items():
            out[f"class_{c}"] = s
            out[f"count_class_{c}"] = np.asarray(float(self.counts[c]))
        return out

    @classmethod
    def from_arrays(cls, arrays: Any) -> ClassCAMs:
        cams = cls()
        for key in arrays.files if hasattr(arrays, "files") else arrays:
            if key.startswith("class_"):
                c = int(key[len("class_") :])
                cams.sums[c] = np.asarray(arrays[key], np.float64)
                cams.counts[c] = int(arrays[f"count_{key}"])
        return cams

    def means(self, num_classes: int) -> dict[str, np.ndarray]:
        """class_cams.npz: ``class_<c>`` mean maps (float32) and ``counts`` (num_classes,)."""
        out = {f"class_{c}": (s / self.counts[c]).astype(np.float32) for c, s in self.sums.items()}
        counts = np.zeros(num_classes, np.int64)
        for c, n in self.counts.items():
            counts[c] = n
        return out | {"counts": counts}

    def __len__(self) -> int:
        return len(self.sums)
