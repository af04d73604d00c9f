"""The figures of ``convlens compare``: how similar two CAMs are, and how a layer's
activation statistics moved between two runs.  Pure functions of arrays.

Map similarity, for two maps ``a`` and ``b`` of the same shape (raw maps as saved in
``maps/<id>.npz`` or ``class_cams.npz``, flattened to ``n`` values; a map of another
shape is first resized to ``a``'s with bilinear interpolation):

* Pearson r: ``r = Σ (a_i − ā)(b_i − b̄) / sqrt(Σ (a_i − ā)² · Σ (b_i − b̄)²)``;
  None when either map is constant (the denominator is 0).  1: the same shape of
  attention up to scale and offset; 0: unrelated; −1: reversed.
* top-15 % IoU: ``k = max(1, round(0.15 · n))``; ``T(m) = {i : m_i ≥ t_m}`` where
  ``t_m`` is ``m``'s k-th largest value (ties at the threshold are included, so a set
  can hold more than k cells); ``IoU = |T(a) ∩ T(b)| / |T(a) ∪ T(b)|``.  None when
  either map is constant (it has no top region).  1: the same hottest region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

TOP_FRACTION = 0.15
TOP_CHANNELS = 10  # channels listed per layer for each kind of shift


def _aligned(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.nan_to_num(np.asarray(a, dtype=np.float64))
    b = np.nan_to_num(np.asarray(b, dtype=np.float64))
    if a.ndim != 2 or b.ndim != 2 or 0 in a.shape or 0 in b.shape:
        raise ValueError(f"maps must be non-empty 2-D arrays, got {a.shape} and {b.shape}")
    if b.shape != a.shape:
        b = cv2.resize(b, (a.shape[1], a.shape[0]), interpolation=cv2.INTER_LINEAR)
    return a, b


def pearson_r(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson's correlation of two maps (module docstring); None for a constant map."""
    x, y = _aligned(a, b)
    x = x.ravel() - x.mean()
    y = y.ravel() - y.mean()
    den = math.sqrt(float(x @ x) * float(y @ y))
    if den == 0.0:
        return None
    return max(-1.0, min(1.0, float(x @ y) / den))


def top_mask(m: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray | None:
    """The cells of ``m`` at or above its k-th largest value, k = max(1, round(fraction·n));
    None for a constant map."""
    flat = np.asarray(m, dtype=np.float64).ravel()
    if flat.size == 0 or flat.max() == flat.min():
        return None
    k = max(1, round(fraction * flat.size))
    t = np.partition(flat, flat.size - k)[flat.size - k]
    mask: np.ndarray = np.asarray(m) >= t
    return mask


def top_iou(a: np.ndarray, b: np.ndarray, fraction: float = TOP_FRACTION) -> float | None:
    """IoU of the top-``fraction`` cells of each map (module docstring)."""
    x, y = _aligned(a, b)
    ma, mb = top_mask(x, fraction), top_mask(y, fraction)
    if ma is None or mb is None:
        return None
    union = int(np.count_nonzero(ma | mb))
    return int(np.count_nonzero(ma & mb)) / union


@dataclass
class ChannelShift:
    channel: int
    a: float
    b: float

    @property
    def delta(self) -> float:
        return self.b - self.a


@dataclass
class LayerDelta:
    """One layer present in both runs with the same shape: its channels compared.

    ``died``: channels dead in B (never fired over the run) that were not dead in A;
    ``revived``: dead in A, not in B.  ``mean_shifts`` and ``zero_shifts``: the
    channels with the largest |B − A| of the per-channel mean activation and of the
    per-channel zero fraction, largest first (unchanged channels left out)."""

    name: str
    shape: list[int]
    dead_a: int
    dead_b: int
    died: list[int]
    revived: list[int]
    max_mean_shift: float | None
    max_zero_shift: float | None
    mean_shifts: list[ChannelShift] = field(default_factory=list)
    zero_shifts: list[ChannelShift] = field(default_factory=list)


def _floats(values: object, k: int) -> np.ndarray | None:
    """A per-channel list of stats.json as float64 (None entries as NaN); None when it
    is not a list of k numbers."""
    if not isinstance(values, list) or len(values) != k:
        return None
    out = np.full(k, np.nan)
    for i, v in enumerate(values):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[i] = float(v)
    return out


def _largest(a: np.ndarray | None, b: np.ndarray | None, n: int) -> list[ChannelShift]:
    if a is None or b is None:
        return []
    d = np.abs(b - a)
    order = [int(i) for i in np.argsort(-np.nan_to_num(d, nan=-1.0), kind="stable")]
    moved = [i for i in order if not np.isnan(d[i]) and d[i] > 0]  # unchanged: not a shift
    return [ChannelShift(i, float(a[i]), float(b[i])) for i in moved[:n]]


def _max_shift(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    if a is None or b is None:
        return None
    d = np.abs(b - a)
    return None if np.isnan(d).all() else float(np.nanmax(d))


def layer_delta(
    name: str,
    shape: list[int],
    dead_a: list[int],
    dead_b: list[int],
    st_a: dict[str, object],
    st_b: dict[str, object],
    top: int = TOP_CHANNELS,
) -> LayerDelta:
    """Compare one layer's stats.json entries (``mean``, ``zero_fraction`` per channel)."""
    k = shape[-1] if shape else 0
    mean_a, mean_b = _floats(st_a.get("mean"), k), _floats(st_b.get("mean"), k)
    zf_a, zf_b = _floats(st_a.get("zero_fraction"), k), _floats(st_b.get("zero_fraction"), k)
    means = _largest(mean_a, mean_b, top)
    zeros = _largest(zf_a, zf_b, top)
    sa, sb = set(dead_a), set(dead_b)
    return LayerDelta(
        name=name,
        shape=list(shape),
        dead_a=len(sa),
        dead_b=len(sb),
        died=sorted(sb - sa),
        revived=sorted(sa - sb),
        max_mean_shift=_max_shift(mean_a, mean_b),
        max_zero_shift=_max_shift(zf_a, zf_b),
        mean_shifts=means,
        zero_shifts=zeros,
    )
