"""Class activation maps, vectorised over the batch (torch-cam style): the base class,
the bundle of inputs a method gets, the registry, and the map helpers.

Notation (all arrays float32 unless stated), the fields of :class:`CAMInputs`:

``acts``    ``(N, h, w, k)``      the CAM layer's activations ``A_k(i, j)`` for N images.
``weights`` ``(k, C)``            CAM weights ``w[k, c]`` (the dense kernel after GAP, or
                                  identity for class-conv heads).
``classes`` ``(N, T)`` int64      the T target classes of every image.
``grads``   ``(N, T, h, w, k)``   ``g = dS_c / dA_k(i, j)``, the gradient of the class score
                                  ``S_c`` (before softmax) for each target class.
``x``       ``(N, H, W, c)``      the model input batch (preprocessed), for methods that
                                  run the whole model on perturbed copies of it.
``tail``    ``feats -> (S, P)``   the part of the network after the CAM tensor: feature
                                  maps ``(B, h, w, k)`` to class scores ``S`` and
                                  probabilities ``P``, both ``(B, C)``.
``scores``  ``x -> S``            the whole model: inputs ``(B, H, W, c)`` to class scores
                                  ``S`` ``(B, C)`` before softmax/sigmoid.

Every method returns raw maps ``(N, T, h, w)`` float32 at feature resolution, after the
method's own ReLU, before upsampling and normalisation.  Class-agnostic methods
(Eigen-CAM) return ``(N, 1, h, w)``; callers broadcast that over the T targets.

A method says how its channel weights ``alpha`` ``(N, T, k)`` are computed
(:meth:`CAMMethod.channel_weights`); the base class forms ``M = ReLU(sum_k alpha_k A_k)``
with one batched matmul.  Methods that are not a weighted sum of whole channels override
:meth:`CAMMethod.raw_maps` instead.

The methods live by family: :mod:`.cams_gradient` (CAM and the gradient methods),
:mod:`.cams_eigen` (the SVD methods), :mod:`.cams_perturb` (the perturbation methods:
Ablation-CAM, Recipro-CAM, Score-CAM).  Adding a method is one class in its family's module,
decorated with :func:`register`: :data:`METHODS`, the CLI's ``--cam`` choices and help,
availability, the run's default set (``default``) and the report's labels all derive from
the registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import cv2
import numpy as np

from . import contract as C

#: feature maps (B, h, w, k) -> (class scores (B, C), probabilities (B, C))
TailFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
#: model inputs (B, H, W, c) -> class scores (B, C) before softmax/sigmoid
ScoresFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class CAMInputs:
    """Everything a method may use for one batch (see the module docstring)."""

    acts: np.ndarray
    classes: np.ndarray | None = None
    weights: np.ndarray | None = None
    grads: np.ndarray | None = None
    x: np.ndarray | None = None
    tail: TailFn | None = None
    scores: ScoresFn | None = None


def _relu_(x: np.ndarray) -> np.ndarray:
    """In-place ReLU; returns ``x``."""
    np.maximum(x, 0.0, out=x)
    return x


def weighted_sum(acts: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``out[n, t, i, j] = sum_k alpha[n, t, k] * acts[n, i, j, k]`` as ``(N, T, h, w)``.

    One batched matmul: ``acts (N, hw, k) @ alpha^T (N, k, T) -> (N, hw, T)``.
    """
    n, h, w, k = acts.shape
    alpha = np.asarray(alpha, dtype=np.float32)
    prod = np.matmul(acts.reshape(n, h * w, k), alpha.transpose(0, 2, 1))  # (N, hw, T)
    return np.ascontiguousarray(prod.transpose(0, 2, 1)).reshape(n, alpha.shape[1], h, w)


class CAMMethod:
    """Base class: validates the inputs, computes raw maps, applies the final ReLU."""

    name: str = ""
    #: the name as people write it (reports, summaries); ``name`` is the id in files
    label: str = ""
    needs_gradients: bool = False
    needs_weights: bool = False
    #: runs the network after the CAM tensor (``CAMInputs.tail``) on perturbed features
    needs_tail: bool = False
    #: runs the whole model (``CAMInputs.scores``) on perturbed copies of the input
    needs_model: bool = False
    class_agnostic: bool = False
    #: computed when ``--cam`` is not given (and the model serves it); others are opt-in
    default: bool = True
    reference: str = ""

    def compute(
        self,
        acts: np.ndarray,
        *,
        weights: np.ndarray | None = None,
        grads: np.ndarray | None = None,
        classes: np.ndarray | None = None,
    ) -> np.ndarray:
        """:meth:`maps` from the tensors alone (the methods that need no network)."""
        return self.maps(CAMInputs(acts=acts, classes=classes, weights=weights, grads=grads))

    def maps(self, inp: CAMInputs) -> np.ndarray:
        """Raw maps ``(N, T, h, w)`` (``(N, 1, h, w)`` if class-agnostic), float32, >= 0."""
        inp = self._checked(inp)
        maps = self.raw_maps(inp)
        return _relu_(maps.astype(np.float32, copy=False))

    def _checked(self, inp: CAMInputs) -> CAMInputs:
        """``inp`` with arrays of the right dtype; ``ValueError`` on a wrong shape or a
        missing input."""
        acts = np.asarray(inp.acts, dtype=np.float32)
        if acts.ndim != 4:
            raise ValueError(f"{self.name}: acts must be (N, h, w, k), got {acts.shape}")
        n, h, w, k = acts.shape
        weights, grads, classes = inp.weights, inp.grads, inp.classes
        if self.needs_weights and (weights is None or classes is None):
            raise ValueError(f"{self.name} needs CAM weights and target classes")
        if (self.needs_tail or self.needs_model) and classes is None:
            raise ValueError(f"{self.name} needs target classes")
        if self.needs_tail and inp.tail is None:
            raise ValueError(f"{self.name} needs the network after the CAM tensor (tail)")
        if self.needs_model and (inp.x is None or inp.scores is None):
            raise ValueError(f"{self.name} needs the model input batch and the model")
        if inp.x is not None and (np.ndim(inp.x) != 4 or len(inp.x) != n):
            raise ValueError(f"{self.name}: x must be (N={n}, H, W, c), got {np.shape(inp.x)}")
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float32)
            if weights.ndim != 2 or weights.shape[0] != k:
                raise ValueError(f"{self.name}: weights must be (k={k}, C), got {weights.shape}")
        if classes is not None:
            classes = np.asarray(classes, dtype=np.int64)
            if classes.ndim != 2 or classes.shape[0] != n:
                raise ValueError(f"{self.name}: classes must be (N={n}, T), got {classes.shape}")
            if (
                weights is not None
                and classes.size
                and (classes.min() < 0 or classes.max() >= weights.shape[1])
            ):
                raise ValueError(
                    f"{self.name}: class indices must be in [0, {weights.shape[1]}), "
                    f"got {classes.min()}..{classes.max()}"
                )
        if self.needs_gradients:
            if grads is None:
                raise ValueError(f"{self.name} needs gradients (cam_gradients)")
            grads = np.asarray(grads, dtype=np.float32)
            if grads.ndim != 5 or grads.shape[0] != n or grads.shape[2:] != (h, w, k):
                raise ValueError(
                    f"{self.name}: grads must be (N={n}, T, {h}, {w}, {k}), got {grads.shape}"
                )
            if classes is not None and classes.shape[1] != grads.shape[1]:
                raise ValueError(
                    f"{self.name}: {classes.shape[1]} classes but gradients for {grads.shape[1]}"
                )
        x = None if inp.x is None else np.asarray(inp.x, dtype=np.float32)
        return CAMInputs(acts, classes, weights, grads, x, inp.tail, inp.scores)

    def raw_maps(self, inp: CAMInputs) -> np.ndarray:
        """Maps before the final ReLU; default ``sum_k alpha_k A_k``."""
        return weighted_sum(inp.acts, self.channel_weights(inp))

    def channel_weights(self, inp: CAMInputs) -> np.ndarray:
        """Channel weights ``alpha`` ``(N, T, k)``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


#: name -> method instance: the default methods first, then the opt-in ones, each group
#: in the order the family modules register them (the order reports list them).
METHODS: dict[str, CAMMethod] = {}

M = TypeVar("M", bound=type[CAMMethod])


def register(cls: M) -> M:
    """Class decorator: add one instance of ``cls`` to :data:`METHODS` (kept ordered)."""
    method = cls()
    if not method.name or method.name in METHODS:
        raise ValueError(f"CAM method name {method.name!r} is empty or taken")
    ordered = sorted([*METHODS.values(), method], key=lambda m: not m.default)  # stable
    METHODS.clear()
    METHODS.update((m.name, m) for m in ordered)
    return cls


def default_methods(available: list[str]) -> list[str]:
    """The methods a run computes when none are asked for: the ``default`` ones among
    ``available`` (names), in registry order."""
    return [m for m in available if METHODS[m].default]


def availability(spec: Any, tail_problem: str | None = None) -> dict[str, str | None]:
    """Each method for an analysis file (a ModelSpec): None if the file serves it, else
    the reason it does not.

    ``tail_problem``: why the network after the CAM tensor cannot be cut out of this
    file's graph (:func:`convlens.engine.tail.tail_problem`), for callers that have the
    graph; the spec alone cannot tell, and the engine checks it when its session opens.
    """
    problems = list(spec.source.get("gradient_problems") or [])
    out: dict[str, str | None] = {}
    for name, method in METHODS.items():
        why = None
        if method.needs_weights and not spec.head.cam_available:
            why = (
                f"the head after {spec.cam_layer} is not global average pooling then a "
                f"linear layer ({spec.head.kind} head)"
            )
        elif method.needs_gradients and not spec.head.gradients_available:
            why = "no gradient rule for " + ("; ".join(problems[:5]) or "this head")
        elif (method.needs_tail or method.needs_model) and spec.cam_output is None:
            why = "the file exposes no CAM tensor"
        elif (method.needs_tail or method.needs_model) and not spec.has_output(C.OUT_SCORES):
            why = "the file has no class scores output (re-export it)"
        elif method.needs_tail and tail_problem:
            why = tail_problem
        out[name] = why
    return out


def get_method(name: str) -> CAMMethod:
    """The method called ``name``; ``ValueError`` listing the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown CAM method {name!r}: choose from {', '.join(METHODS)}") from None


def normalize(maps: np.ndarray) -> np.ndarray:
    """Min-max normalise every map over its last two axes ``(h, w)`` to ``[0, 1]``.

    ``out = (m - min m) / (max m - min m)``; a constant map (``max == min``, e.g. all
    zeros) becomes all zeros.  Works for any leading shape; returns float32.
    """
    m = np.asarray(maps, dtype=np.float32)
    lo = m.min(axis=(-2, -1), keepdims=True)
    hi = m.max(axis=(-2, -1), keepdims=True)
    span = hi - lo
    out = m - lo
    np.divide(out, span, out=out, where=span > 0)
    out[np.broadcast_to(span <= 0, out.shape)] = 0.0
    return out


def upsample(map2d: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize one ``(h, w)`` map to ``size = (H, W)`` with bilinear interpolation
    (``cv2.INTER_LINEAR``, half-pixel centres); returns float32."""
    height, width = size
    m = np.asarray(map2d, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"upsample expects a 2-D map, got {m.shape}")
    return cv2.resize(m, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)


def resize_matrix(out_size: int, in_size: int) -> np.ndarray:
    """``R`` ``(out_size, in_size)`` float32 with ``R @ v`` the bilinear resize of ``v``
    with half-pixel centres, as :func:`upsample` (``cv2.INTER_LINEAR``): output pixel
    ``x`` reads the source at ``s = (x + 0.5) * in / out - 0.5``, clamped to the edges.
    ``R_H @ A @ R_W^T`` resizes a 2-D map; applied to all channels at once by einsum."""
    s = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    s = np.clip(s, 0.0, in_size - 1)
    lo = np.floor(s).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = s - lo
    r = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(r, (rows, lo), 1.0 - frac)
    np.add.at(r, (rows, hi), frac)
    return r.astype(np.float32)


#: the modules that define (and register) the methods, imported once the base above exists
FAMILIES = ("cams_gradient", "cams_eigen", "cams_perturb")
for _family in FAMILIES:
    importlib.import_module(f"{__package__}.{_family}")
