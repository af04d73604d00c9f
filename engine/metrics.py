"""Faithfulness metrics of CAM maps, computed batched through the model (issue 11).

Every metric takes

``images``   ``(N, H, W, C)`` float32  preprocessed model inputs (what the model was fed),
``maps``     ``(N, H, W)``             one map per image at input size (upsampled),
``classes``  ``(N,)`` int              the class each map explains,
``predict``  ``(B, H, W, C) -> (B, num_classes)`` probabilities,

and builds all of its perturbed inputs as large batches (at most ``chunk`` images per
``predict`` call), never one image at a time.  ``base`` may give the class
probabilities on the unperturbed images, ``(N,)``, when the caller already has them.
The result is a :class:`MetricResult`: per-image scores (``(N,)`` float64 each, by
score name) and, for deletion and insertion, per-image curves.

Registry: :data:`METRICS` (name -> instance), like :data:`convlens.engine.cams.METHODS`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .imputation import noisy_linear_impute

Predict = Callable[[np.ndarray], np.ndarray]

#: images per ``predict`` call (and per block of perturbed inputs held in memory)
CHUNK = 256


@dataclass
class MetricResult:
    """Per-image scores ``(N,)`` and curves ``(N, S)`` (x evenly spaced on [0, 1])."""

    scores: dict[str, np.ndarray]
    curves: dict[str, np.ndarray] = field(default_factory=dict)


def class_scores(
    predict: Predict,
    n_rows: int,
    make_rows: Callable[[int, int], np.ndarray],
    row_class: np.ndarray,
    chunk: int = CHUNK,
) -> np.ndarray:
    """``predict(make_rows(a, b))[row, row_class[row]]`` for every row, ``chunk`` rows
    per call: the perturbed inputs are built one block at a time."""
    out = np.empty(n_rows, np.float64)
    for a in range(0, n_rows, chunk):
        b = min(n_rows, a + chunk)
        probs = np.asarray(predict(make_rows(a, b)))
        out[a:b] = probs[np.arange(b - a), row_class[a:b]]
    return out


def _slicer(arr: np.ndarray) -> Callable[[int, int], np.ndarray]:
    """``make_rows`` for inputs already built: rows ``a:b`` of ``arr``."""
    return lambda a, b: arr[a:b]


def _check(images: np.ndarray, maps: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, ...]:
    x = np.asarray(images, np.float32)
    m = np.asarray(maps, np.float32)
    c = np.asarray(classes, np.int64).reshape(-1)
    if x.ndim != 4 or m.shape != x.shape[:3] or c.shape != (x.shape[0],):
        raise ValueError(
            f"images (N, H, W, C), maps (N, H, W), classes (N,): got {x.shape}, {m.shape}, "
            f"{c.shape}"
        )
    return x, m, c


def _base(predict: Predict, x: np.ndarray, c: np.ndarray, base: np.ndarray | None, chunk: int):
    if base is not None:
        return np.asarray(base, np.float64).reshape(-1)
    return class_scores(predict, len(x), _slicer(x), c, chunk)


class Metric:
    """Base class of a faithfulness metric."""

    name: str = ""
    label: str = ""
    reference: str = ""
    #: score name -> True when higher is better
    higher_is_better: dict[str, bool] = {}
    #: score name -> its name as people write it (report columns); same keys as above
    score_labels: dict[str, str] = {}
    #: metrics with curves: what the curve's x axis (0..1) is; y is the class probability
    curve_x: str = ""

    def compute(
        self,
        images: np.ndarray,
        maps: np.ndarray,
        classes: np.ndarray,
        predict: Predict,
        *,
        base: np.ndarray | None = None,
        chunk: int = CHUNK,
    ) -> MetricResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# ---- RISE: deletion and insertion ------------------------------------------------------


def gaussian_kernel(klen: int = 11, sigma: float = 5.0) -> np.ndarray:
    """RISE's ``gkern(klen, nsig)``: ``scipy.ndimage.gaussian_filter`` (truncate 4, mode
    ``'reflect'``) of a ``klen x klen`` Dirac at the centre, computed here without scipy:
    the filter is separable, so the kernel is ``outer(k1, k1)`` with ``k1`` the 1-D
    filter of a Dirac, whose Gaussian taps reach past the ``klen`` window and are folded
    back in by the half-sample reflection."""
    radius = int(4.0 * sigma + 0.5)
    t = np.arange(-radius, radius + 1)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    g /= g.sum()
    centre = klen // 2
    k1 = np.zeros(klen)
    for tap, wt in zip(t, g, strict=True):
        # output[j] gathers input[j + tap]; the Dirac at `centre` contributes where the
        # reflected index of j + tap is the centre, i.e. j = reflect(centre - tap)
        j = (centre - tap) % (2 * klen)
        j = j if j < klen else 2 * klen - 1 - j
        k1[j] += wt
    return np.outer(k1, k1)


def rise_blur(images: np.ndarray, klen: int = 11, sigma: float = 5.0) -> np.ndarray:
    """RISE's insertion canvas: ``conv2d(x, gkern(klen, sigma), padding=klen // 2)``,
    each channel on its own, zero padding (borders darken, as in RISE)."""
    x = np.asarray(images, np.float32)
    k = gaussian_kernel(klen, sigma).astype(np.float32)
    pad = klen // 2
    n, h, w, c = x.shape
    padded = np.zeros((n, h + 2 * pad, w + 2 * pad, c), np.float32)
    padded[:, pad : pad + h, pad : pad + w] = x
    out = np.zeros_like(x)
    for dy in range(klen):
        for dx in range(klen):
            out += k[dy, dx] * padded[:, dy : dy + h, dx : dx + w]
    return out


def rise_auc(curves: np.ndarray) -> np.ndarray:
    """RISE's ``auc(arr) = (sum(arr) - arr[0] / 2 - arr[-1] / 2) / (len(arr) - 1)``: the
    trapezoid rule on [0, 1], per row."""
    a = np.asarray(curves, np.float64)
    return (a.sum(axis=-1) - a[..., 0] / 2 - a[..., -1] / 2) / (a.shape[-1] - 1)


class _Causal(Metric):
    """RISE's ``CausalMetric`` (Petsiuk et al. 2018, ``evaluation.py``).

    Pixels are ranked by ``np.flip(np.argsort(map.reshape(-1)))`` (decreasing map value,
    RISE's exact call, so ties fall the same way); ``n_steps = ceil(HW / step)``; the
    curve has ``n_steps + 1`` points: point ``i`` is the class probability when the
    first ``step * i`` ranked pixels (all channels) have been moved from ``start`` to
    ``finish``.  The score is :func:`rise_auc` of the curve.  ``step`` defaults to the
    image width, RISE's 224 pixels per step at 224 x 224 (one row's worth of pixels).
    """

    def __init__(self, step: int | None = None, klen: int = 11, sigma: float = 5.0):
        self.step = step
        self.klen = klen
        self.sigma = sigma

    def endpoints(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def compute(self, images, maps, classes, predict, *, base=None, chunk=CHUNK):
        x, m, c = _check(images, maps, classes)
        n, h, w, ch = x.shape
        hw = h * w
        step = self.step or w
        n_steps = (hw + step - 1) // step
        order = np.flip(np.argsort(m.reshape(n, hw), axis=1), axis=-1)
        rank = np.empty_like(order)
        rank[np.arange(n)[:, None], order] = np.arange(hw)[None, :]
        start, finish = self.endpoints(x)
        start = start.reshape(n, hw, ch)
        finish = finish.reshape(n, hw, ch)
        pts = n_steps + 1

        def rows(a: int, b: int) -> np.ndarray:
            r = np.arange(a, b)
            img, i = r // pts, r % pts
            moved = rank[img] < (step * i)[:, None]  # (rows, HW)
            out = np.where(moved[..., None], finish[img], start[img])
            return out.reshape(b - a, h, w, ch)

        curves = class_scores(predict, n * pts, rows, np.repeat(c, pts), chunk).reshape(n, pts)
        return MetricResult({self.name: rise_auc(curves)}, {self.name: curves})


class Deletion(_Causal):
    """Deletion AUC (RISE): start from the image, move the most salient pixels to a
    zero canvas (``torch.zeros_like`` on the preprocessed tensor, as RISE's deletion
    substrate); lower is better."""

    name = "deletion"
    label = "Deletion AUC"
    reference = "Petsiuk et al. 2018 (RISE evaluation.py, CausalMetric 'del', zero substrate)"
    higher_is_better = {"deletion": False}
    score_labels = {"deletion": "Deletion AUC"}
    curve_x = "fraction of pixels removed, most salient first"

    def endpoints(self, x):
        return x, np.zeros_like(x)


class Insertion(_Causal):
    """Insertion AUC (RISE): start from the blurred image (:func:`rise_blur`,
    ``gkern(11, 5)``, as RISE's insertion substrate) and move in the image's most
    salient pixels first; higher is better."""

    name = "insertion"
    label = "Insertion AUC"
    reference = "Petsiuk et al. 2018 (RISE evaluation.py, CausalMetric 'ins', blur klen=11 sigma=5)"
    higher_is_better = {"insertion": True}
    score_labels = {"insertion": "Insertion AUC"}
    curve_x = "fraction of pixels inserted into the blurred image, most salient first"

    def endpoints(self, x):
        return rise_blur(x, self.klen, self.sigma), x


# ---- torch-cam: Average Drop, Increase in Confidence ---------------------------------


class AverageDrop(Metric):
    """Average Drop and Increase in Confidence (Chattopadhyay et al. 2018, Grad-CAM++),
    as ``torchcam.metrics.ClassificationMetric.update`` computes them.

    With ``y_c`` the class probability on the image and ``o_c`` on ``E * x``, the image
    multiplied by its map ``E`` (torch-cam's CAMs are min-max normalised to [0, 1] at
    feature resolution, then bilinearly resized to the input; here ``maps`` are that
    resized map: values outside [0, 1] are clipped, NaN read as 0, as torch-cam's
    safeguard)::

        avg_drop = max(0, y_c - o_c) / (y_c + 1e-7)      (mean over images: Average Drop)
        increase = 1 if y_c < o_c else 0                 (mean: Increase in Confidence)

    Lower drop is better, higher increase is better.  One masked input per image.
    """

    name = "avgdrop"
    label = "Average Drop / Increase in Confidence"
    reference = "Chattopadhyay et al. 2018; torch-cam metrics.ClassificationMetric"
    higher_is_better = {"avg_drop": False, "increase": True}
    score_labels = {"avg_drop": "Average Drop", "increase": "Increase in Confidence"}

    def compute(self, images, maps, classes, predict, *, base=None, chunk=CHUNK):
        x, m, c = _check(images, maps, classes)
        y = _base(predict, x, c, base, chunk)
        e = np.clip(np.nan_to_num(m, nan=0.0), 0.0, 1.0)[..., None]
        o = class_scores(predict, len(x), lambda a, b: e[a:b] * x[a:b], c, chunk)
        drop = np.maximum(y - o, 0.0) / (y + 1e-7)
        return MetricResult({"avg_drop": drop, "increase": (y < o).astype(np.float64)})


# ---- pytorch-grad-cam: ROAD --------------------------------------------------------------

ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def road_keep(maps: np.ndarray, percentile: float, morf: bool) -> np.ndarray:
    """Kept pixels ``(N, H, W)`` of pytorch-grad-cam's ``RemoveMostRelevantFirst`` /
    ``RemoveLeastRelevantFirst``: ``m < np.percentile(m, p)`` with ``m`` the map (MoRF)
    or ``1 - map`` (LeRF); every other pixel is imputed."""
    m = np.asarray(maps, np.float32)
    m = m if morf else 1 - m
    thr = np.percentile(m.reshape(len(m), -1), percentile, axis=1)
    return m < thr.astype(m.dtype)[:, None, None]


class ROAD(Metric):
    """ROAD, RemOve And Debias (Rong et al. 2022), as pytorch-grad-cam's
    ``metrics/road.py`` (``ROADMostRelevantFirstAverage``,
    ``ROADLeastRelevantFirstAverage``, ``ROADCombined``) with its default percentiles
    10, 20, ..., 90.

    For percentile ``p``, MoRF keeps the pixels ``map < percentile(map, p)`` (removing
    the ``100 - p`` % most relevant), LeRF keeps ``1 - map < percentile(1 - map, p)``;
    removed pixels are filled by noisy linear imputation
    (:func:`convlens.engine.imputation.noisy_linear_impute`, noise 0.01, its draws
    seeded by ``seed`` and the image, :meth:`draws`).  The score at ``p`` is
    ``prob_c(imputed) - prob_c(image)``
    (``PerturbationConfidenceMetric`` with ``return_diff=True``; the target is the class
    probability, pytorch-grad-cam's ``ClassifierOutputSoftmaxTarget``).  Per image::

        road_morf = mean_p MoRF(p)          (lower is better)
        road_lerf = mean_p LeRF(p)          (higher is better)
        road      = (road_lerf - road_morf) / 2   (ROADCombined; higher is better)

    The 2 x 9 imputed inputs of every image are built together and go through the
    model as one batch.
    """

    name = "road"
    label = "ROAD"
    reference = "Rong et al. 2022; pytorch-grad-cam metrics/road.py"
    higher_is_better = {"road_morf": False, "road_lerf": True, "road": True}
    score_labels = {"road_morf": "ROAD MoRF", "road_lerf": "ROAD LeRF", "road": "ROAD combined"}

    def __init__(
        self,
        percentiles: tuple[float, ...] = ROAD_PERCENTILES,
        noise: float = 0.01,
        seed: int = 0,
    ):
        self.percentiles = tuple(percentiles)
        self.noise = noise
        self.seed = seed

    def draws(self, image: np.ndarray, k: int) -> np.ndarray:
        """The noise's standard normal draws ``(k, H, W, C)`` for one image: seeded by
        ``seed`` and the image's bytes, so an image's scores do not depend on the batch
        it came in (or on a resumed run)."""
        rng = np.random.default_rng([self.seed, zlib.crc32(image.tobytes())])
        return rng.standard_normal((k, *image.shape)).astype(np.float32)

    def compute(self, images, maps, classes, predict, *, base=None, chunk=CHUNK):
        x, m, c = _check(images, maps, classes)
        y = _base(predict, x, c, base, chunk)
        n = len(x)
        # rows: (image, morf/lerf, percentile), image-major
        keep = np.stack(
            [
                np.stack([road_keep(m, p, morf) for p in self.percentiles], axis=1)
                for morf in (True, False)
            ],
            axis=1,
        )  # (N, 2, P, H, W)
        k = 2 * len(self.percentiles)
        keep = keep.reshape(n * k, *m.shape[1:])
        # imputation works on blocks of images (its memory is a few copies of a block)
        per_block = max(1, chunk // k)
        scores = np.empty(n * k)
        for a in range(0, n, per_block):
            b = min(n, a + per_block)
            src = np.repeat(x[a:b], k, axis=0)
            eps = np.concatenate([self.draws(img, k) for img in x[a:b]])
            filled = noisy_linear_impute(src, keep[a * k : b * k], eps, self.noise)
            scores[a * k : b * k] = class_scores(
                predict, len(filled), _slicer(filled), np.repeat(c[a:b], k), chunk
            )
        diff = scores.reshape(n, 2, len(self.percentiles)) - y[:, None, None]
        morf, lerf = diff[:, 0].mean(axis=1), diff[:, 1].mean(axis=1)
        return MetricResult({"road_morf": morf, "road_lerf": lerf, "road": (lerf - morf) / 2})


#: name -> metric instance, in the order reports list them.
METRICS: dict[str, Metric] = {
    mt.name: mt for mt in (Deletion(), Insertion(), AverageDrop(), ROAD())
}


def get_metric(name: str) -> Metric:
    """The metric called ``name``; ``ValueError`` listing the choices otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}: choose from {', '.join(METRICS)}") from None


def compute_all(
    names: tuple[str, ...] | list[str],
    images: np.ndarray,
    maps: np.ndarray,
    classes: np.ndarray,
    predict: Predict,
    *,
    base: np.ndarray | None = None,
    chunk: int = CHUNK,
) -> MetricResult:
    """Every named metric on the same images and maps, the unperturbed probabilities
    (``base``, else computed) once; scores and curves merged (their names do not
    clash)."""
    x, m, c = _check(images, maps, classes)
    base = _base(predict, x, c, base, chunk)
    out = MetricResult({}, {})
    for name in names:
        r = get_metric(name).compute(x, m, c, predict, base=base, chunk=chunk)
        out.scores.update(r.scores)
        out.curves.update(r.curves)
    return out
