"""Class activation maps, vectorised over the batch (torch-cam style).

Notation (all arrays float32 unless stated):

``acts``    ``(N, h, w, k)``      the CAM layer's activations ``A_k(i, j)`` for N images.
``weights`` ``(k, C)``            CAM weights ``w[k, c]`` (the dense kernel after GAP, or
                                  identity for class-conv heads).
``classes`` ``(N, T)`` int64      the T target classes of every image.
``grads``   ``(N, T, h, w, k)``   ``g = dS_c / dA_k(i, j)``, the gradient of the class score
                                  ``S_c`` (before softmax) for each target class.

Every method returns raw maps ``(N, T, h, w)`` float32 at feature resolution, after the
method's own ReLU, before upsampling and normalisation.  Class-agnostic methods
(Eigen-CAM) return ``(N, 1, h, w)``; callers broadcast that over the T targets.

A method only says how its channel weights ``alpha`` ``(N, T, k)`` are computed
(:meth:`CAMMethod.channel_weights`); the base class forms
``M = ReLU(sum_k alpha_k A_k)`` with one batched matmul.  Methods that are not a weighted
sum of whole channels (Layer-CAM, HiResCAM, Element-wise Grad-CAM, Eigen-CAM,
Eigen-Grad-CAM) override :meth:`CAMMethod.raw_maps` instead.

Adding a method is a class here and its entry in :data:`METHODS`: the CLI's ``--cam``
choices and help, availability, the run's default set (``default``) and the report's
labels all come from the registry.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np


def _relu_(x: np.ndarray) -> np.ndarray:
    """In-place ReLU; returns ``x``."""
    np.maximum(x, 0.0, out=x)
    return x


def weighted_sum(acts: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``out[n, t, i, j] = sum_k alpha[n, t, k] * acts[n, i, j, k]`` as ``(N, T, h, w)``.

    One batched matmul: ``acts (N, hw, k) @ alpha^T (N, k, T) -> (N, hw, T)``.
    """
    n, h, w, k = acts.shape
    prod = np.matmul(acts.reshape(n, h * w, k), alpha.transpose(0, 2, 1))  # (N, hw, T)
    return np.ascontiguousarray(prod.transpose(0, 2, 1)).reshape(n, alpha.shape[1], h, w)


class CAMMethod:
    """Base class: validates inputs, computes raw maps, applies the final ReLU."""

    name: str = ""
    #: the name as people write it (reports, summaries); ``name`` is the id in files
    label: str = ""
    needs_gradients: bool = False
    needs_weights: bool = False
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
        """Raw maps ``(N, T, h, w)`` (``(N, 1, h, w)`` if class-agnostic), float32, >= 0."""
        acts = np.asarray(acts, dtype=np.float32)
        if acts.ndim != 4:
            raise ValueError(f"{self.name}: acts must be (N, h, w, k), got {acts.shape}")
        n, h, w, k = acts.shape
        if self.needs_weights and (weights is None or classes is None):
            raise ValueError(f"{self.name} needs CAM weights and target classes")
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
        maps = self.raw_maps(acts, weights=weights, grads=grads, classes=classes)
        return _relu_(maps.astype(np.float32, copy=False))

    def raw_maps(
        self,
        acts: np.ndarray,
        *,
        weights: np.ndarray | None,
        grads: np.ndarray | None,
        classes: np.ndarray | None,
    ) -> np.ndarray:
        """Maps before the final ReLU; default ``sum_k alpha_k A_k``."""
        alpha = self.channel_weights(acts, weights=weights, grads=grads, classes=classes)
        return weighted_sum(acts, alpha)

    def channel_weights(
        self,
        acts: np.ndarray,
        *,
        weights: np.ndarray | None,
        grads: np.ndarray | None,
        classes: np.ndarray | None,
    ) -> np.ndarray:
        """Channel weights ``alpha`` ``(N, T, k)``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class CAM(CAMMethod):
    """CAM (Zhou et al. 2016, "Learning Deep Features for Discriminative Localization").

    ``M_c = ReLU(sum_k w[k, c] A_k)`` with ``w`` the weights of the Dense layer that
    follows global average pooling (the bias is left out).
    """

    name = "cam"
    label = "CAM"
    needs_weights = True
    reference = "Zhou et al. 2016"

    def channel_weights(
        self,
        acts: np.ndarray,
        *,
        weights: np.ndarray | None,
        grads: np.ndarray | None,
        classes: np.ndarray | None,
    ) -> np.ndarray:
        assert weights is not None and classes is not None
        # weights[:, classes] is (k, N, T)
        return np.ascontiguousarray(weights[:, classes].transpose(1, 2, 0))


class GradCAM(CAMMethod):
    """Grad-CAM (Selvaraju et al. 2017).

    ``alpha_k = (1 / hw) sum_{i,j} dS_c / dA_k(i, j)``;  ``M = ReLU(sum_k alpha_k A_k)``.
    """

    name = "gradcam"
    label = "Grad-CAM"
    needs_gradients = True
    reference = "Selvaraju et al. 2017"

    def channel_weights(
        self,
        acts: np.ndarray,
        *,
        weights: np.ndarray | None,
        grads: np.ndarray | None,
        classes: np.ndarray | None,
    ) -> np.ndarray:
        assert grads is not None
        return grads.mean(axis=(2, 3), dtype=np.float32)


class GradCAMpp(CAMMethod):
    """Grad-CAM++ (Chattopadhyay et al. 2018), with the exponential-score closed form.

    With ``Y_c = exp(S_c)`` the 2nd and 3rd derivatives become powers of ``g = dS_c/dA``
    (as in pytorch-grad-cam), giving per position ``(i, j)`` and channel ``k``::

        alpha_k(i, j) = g^2 / (2 g^2 + sum_{a,b} A_k(a, b) * g^3)   (0 where the
                                                                      denominator is 0)
        w_k = sum_{i,j} alpha_k(i, j) * ReLU(g(i, j))
        M   = ReLU(sum_k w_k A_k)

    (``g``, ``g^2``, ``g^3`` evaluated at ``(i, j)``; the common factor ``exp(S_c)`` is
    dropped.)  Evaluated as ``w_k = sum_{i,j: g > 0} g / (2 + S_k g)`` with
    ``S_k = sum_{a,b} A_k(a, b)``, which is the same quantity after cancelling ``g^2``.
    """

    name = "gradcampp"
    label = "Grad-CAM++"
    needs_gradients = True
    reference = "Chattopadhyay et al. 2018"

    def channel_weights(
        self,
        acts: np.ndarray,
        *,
        weights: np.ndarray | None,
        grads: np.ndarray | None,
        classes: np.ndarray | None,
    ) -> np.ndarray:
        assert grads is not None
        # For g > 0:  alpha * ReLU(g) = g^2 * g / (g^2 (2 + S g)) = g / (2 + S g), with
        # S = sum_ab A_k(a, b); for g <= 0 the term is 0.  Same value, three fewer
        # full-size temporaries than the literal formula.
        sum_a = acts.sum(axis=(1, 2), dtype=np.float32)[:, None, None, None, :]  # (N,1,1,1,k)
        pos = np.maximum(grads, 0.0)  # (N, T, h, w, k)
        den = pos * sum_a
        den += 2.0
        ok = den != 0  # g > 0 and 2 + S g == 0: zero denominator -> alpha = 0
        np.divide(pos, den, out=pos, where=ok)
        if not ok.all():
            pos[~ok] = 0.0
        return pos.sum(axis=(2, 3), dtype=np.float32)


class LayerCAM(CAMMethod):
    """Layer-CAM (Jiang et al. 2021).

    Element-wise weights: ``M(i, j) = ReLU(sum_k ReLU(g_k(i, j)) * A_k(i, j))``.
    """

    name = "layercam"
    label = "LayerCAM"
    needs_gradients = True
    reference = "Jiang et al. 2021"

    def raw_maps(
        self,
        acts: np.ndarray,
        *,
        weights: np.ndarray | None,
        grads: np.ndarray | None,
        classes: np.ndarray | None,
    ) -> np.ndarray:
        assert grads is not None
        pos = np.maximum(grads, 0.0)  # (N, T, h, w, k)
        pos *= acts[:, None]
        return pos.sum(axis=-1, dtype=np.float32)


class XGradCAM(CAMMethod):
    """XGrad-CAM (Fu et al. 2020, "Axiom-based Grad-CAM").

    ``alpha_k = sum_{i,j} (A_k(i, j) / sum_{a,b} A_k(a, b)) * dS_c / dA_k(i, j)``;
    ``M = ReLU(sum_k alpha_k A_k)``.  A channel whose activations sum to 0 (a dead
    channel) gets ``alpha_k = 0``; pytorch-grad-cam's XGradCAM adds ``1e-7`` to the
    denominator instead, which differs by a relative ``1e-7 / sum A_k`` elsewhere.
    """

    name = "xgradcam"
    label = "XGrad-CAM"
    needs_gradients = True
    default = False
    reference = "Fu et al. 2020"

    def channel_weights(
        self,
        acts: np.ndarray,
        *,
        weights: np.ndarray | None,
        grads: np.ndarray | None,
        classes: np.ndarray | None,
    ) -> np.ndarray:
        assert grads is not None
        sum_a = acts.sum(axis=(1, 2), dtype=np.float32)[:, None, :]  # (N, 1, k)
        num = np.einsum("nthwk,nhwk->ntk", grads, acts, dtype=np.float32)  # (N, T, k)
        ok = np.broadcast_to(sum_a != 0, num.shape)
        out = np.zeros_like(num)
        np.divide(num, sum_a, out=out, where=ok)
        return out


def _grad_times_acts(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """``g * A`` as ``(N, T, h, w, k)`` float32 (A broadcast over the T targets)."""
    return np.multiply(grads, acts[:, None], dtype=np.float32)


class HiResCAM(CAMMethod):
    """HiResCAM (Draelos & Carin 2020, "Use HiResCAM instead of Grad-CAM for faithful
    explanations of convolutional neural networks").

    Element-wise, no pooling of the gradients:
    ``M(i, j) = ReLU(sum_k dS_c/dA_k(i, j) * A_k(i, j))``.  The final ReLU is the
    reference implementation's (pytorch-grad-cam's HiResCAM: ``(grads * activations)
    .sum(axis=1)``, then the ReLU its BaseCAM applies to every method).  For a GAP ->
    Dense head the gradient is ``w[k, c] / (h w)`` everywhere, so HiResCAM is CAM / (hw).
    """

    name = "hirescam"
    label = "HiResCAM"
    needs_gradients = True
    default = False
    reference = "Draelos & Carin 2020"

    def raw_maps(
        self,
        acts: np.ndarray,
        *,
        weights: np.ndarray | None,
        grads: np.ndarray | None,
        classes: np.ndarray | None,
    ) -> np.ndarray:
        assert grads is not None
        return np.einsum("nthwk,nhwk->nthw", grads, acts, dtype=np.float32)


class GradCAMElementWise(CAMMethod):
    """Element-wise Grad-CAM (pytorch-grad-cam's GradCAMElementWise).

    ``M(i, j) = sum_k ReLU(dS_c/dA_k(i, j) * A_k(i, j))``: HiResCAM with the ReLU inside
    the channel sum (as ``np.maximum(grads * activations, 0).sum(axis=1)`` there).  The
    method has no paper of its own; it is defined by that library.
    """

    name = "gradcamelementwise"
    label = "Element-wise Grad-CAM"
    needs_gradients = True
    default = False
    reference = "pytorch-grad-cam (Gildenblat et al.)"

    def raw_maps(
        self,
        acts: np.ndarray,
        *,
        weights: np.ndarray | None,
        grads: np.ndarray | None,
        classes: np.ndarray | None,
    ) -> np.ndarray:
        assert grads is not None
        prod = _relu_(_grad_times_acts(acts, grads))
        return prod.sum(axis=-1, dtype=np.float32)


class EigenCAM(CAMMethod):
    """Eigen-CAM (Muhammad & Yeasin 2020): class-agnostic.

    For each image, with ``A`` reshaped to ``(hw, k)`` (not centred, as in the paper) and
    ``v_1`` its first right singular vector, ``M = ReLU(A v_1) = ReLU(sigma_1 u_1)``
    reshaped to ``(h, w)``.  The sign of a singular vector is arbitrary; it is fixed so
    that ``sum(A v_1) >= 0``.  Returns ``(N, 1, h, w)``; callers broadcast over targets.

    Computed from the smaller Gram matrix, batched (:func:`top_eigenvectors`): if ``hw <= k``,
    ``u_1`` is the top eigenvector of ``A A^T`` (``hw x hw``) and ``A v_1 = sigma_1 u_1``
    with ``sigma_1 = sqrt(lambda_1)``; otherwise ``v_1`` is the top eigenvector of
    ``A^T A`` (``k x k``).  This matches ``np.linalg.svd`` per image.
    """

    name = "eigencam"
    label = "Eigen-CAM"
    class_agnostic = True
    reference = "Muhammad & Yeasin 2020"

    def raw_maps(
        self,
        acts: np.ndarray,
        *,
        weights: np.ndarray | None,
        grads: np.ndarray | None,
        classes: np.ndarray | None,
    ) -> np.ndarray:
        n, h, w, k = acts.shape
        proj = first_component(acts.reshape(n, h * w, k))
        return proj.astype(np.float32).reshape(n, 1, h, w)


class EigenGradCAM(CAMMethod):
    """Eigen-Grad-CAM (pytorch-grad-cam's EigenGradCAM: Eigen-CAM, Muhammad & Yeasin
    2020, applied to the gradient times the activations).

    Per image and target class, ``X = dS_c/dA * A`` reshaped to ``(hw, k)``, centred
    over the positions as the reference's ``get_2d_projection`` does
    (``X_c = X - mean_ij X``, one mean per channel), ``v_1`` the first right singular
    vector of ``X_c``: ``M = ReLU(X_c v_1)`` reshaped to ``(h, w)``.

    Sign: the reference leaves it to LAPACK.  Eigen-CAM's rule here (``sum(X v_1) >= 0``)
    cannot be applied to ``X_c`` itself, whose columns sum to zero, so it is applied to
    the un-centred ``X``: ``v_1`` is turned so that ``sum_ij (X v_1)(i, j) >= 0``, i.e.
    it points along the mean of ``g * A`` over positions.  Computed like Eigen-CAM
    (:func:`first_component`, the smaller Gram matrix), but a centred Gram matrix nearly
    always has negative entries, so by ``eigh`` rather than power iteration: the one
    method here whose cost shows next to the graph (README, "CAM methods").  The
    reference also sets NaN entries of ``g * A`` to 0; finite gradients are assumed here.
    """

    name = "eigengradcam"
    label = "Eigen-Grad-CAM"
    needs_gradients = True
    default = False
    reference = "pytorch-grad-cam; Muhammad & Yeasin 2020"

    def raw_maps(
        self,
        acts: np.ndarray,
        *,
        weights: np.ndarray | None,
        grads: np.ndarray | None,
        classes: np.ndarray | None,
    ) -> np.ndarray:
        assert grads is not None
        n, t, h, w, k = grads.shape
        x = _grad_times_acts(acts, grads).reshape(n * t, h * w, k)
        proj = first_component(x, centre=True)
        return proj.astype(np.float32).reshape(n, t, h, w)


def first_component(a: np.ndarray, *, centre: bool = False) -> np.ndarray:
    """Projection of each matrix ``a[b]`` ``(m, k)`` on its first right singular vector
    ``v_1``: ``(B, m)`` float64, ``= sigma_1 u_1``.

    ``centre``: subtract each column's mean first (PCA, as pytorch-grad-cam's
    ``get_2d_projection``).  The sign is fixed so that ``sum(a v_1) >= 0`` with the
    un-centred ``a`` (for ``centre=False`` that is ``sum(projection) >= 0``).

    Computed from the smaller Gram matrix, batched (:func:`top_eigenvectors`): if
    ``m <= k``, ``u_1`` is the top eigenvector of ``X X^T`` and ``X v_1 = sigma_1 u_1``
    with ``sigma_1 = sqrt(lambda_1)``; otherwise ``v_1`` is the top eigenvector of
    ``X^T X``.  This matches ``np.linalg.svd`` per matrix.
    """
    b, m, k = a.shape
    x = a - a.mean(axis=1, dtype=np.float64, keepdims=True).astype(np.float32) if centre else a
    small_side = m <= k
    xt = np.ascontiguousarray(x.transpose(0, 2, 1))  # contiguous: matmul uses BLAS
    gram = np.matmul(x, xt) if small_side else np.matmul(xt, x)
    vec, lam = top_eigenvectors(gram.astype(np.float64))
    if small_side:  # vec = u_1, X v_1 = sigma_1 u_1
        proj = vec * np.sqrt(np.maximum(lam, 0.0))[:, None]
    else:  # vec = v_1
        proj = np.matmul(x, vec.astype(np.float32)[:, :, None])[:, :, 0].astype(np.float64)
    if centre:
        # v_1 = X_c^T proj / sigma_1^2, so sign(sum(a v_1)) = sign(proj . (X_c colsum(a)))
        side = np.einsum("bm,bm->b", proj, np.matmul(x, a.sum(axis=1)[:, :, None])[:, :, 0])
    else:
        side = proj.sum(axis=1)
    proj *= np.where(side < 0, -1.0, 1.0)[:, None]
    return proj


def top_eigenvectors(
    gram: np.ndarray, tol: float = 1e-16, max_iter: int = 300
) -> tuple[np.ndarray, np.ndarray]:
    """Top eigenvector and eigenvalue of each symmetric PSD matrix in ``gram`` (N, m, m).

    Batched power iteration from the all-ones vector (for non-negative activations the
    Gram matrix is non-negative, so by Perron-Frobenius its top eigenvector is too and
    the start is close), stopped per matrix when the Rayleigh residual
    ``||G v - lambda v|| <= sqrt(tol) * lambda``; matrices that have not converged after
    ``max_iter`` steps (close top eigenvalues) fall back to ``np.linalg.eigh``.  Cost is
    O(N m^2) per step instead of eigh's O(N m^3).
    """
    n, m, _ = gram.shape
    # Perron-Frobenius holds for a non-negative Gram matrix only: a matrix with negative
    # entries (signed activations) goes straight to eigh, since the all-ones start could
    # be orthogonal to its top eigenvector
    signed = (gram < 0).any(axis=(1, 2))
    vec = np.full((n, m), 1.0 / np.sqrt(m))
    lam = np.zeros(n)
    todo = np.flatnonzero(~signed)
    for step in range(max_iter):
        g = gram[todo]
        gv = np.matmul(g, vec[todo][:, :, None])[:, :, 0]
        rayleigh = np.einsum("nm,nm->n", vec[todo], gv)
        norm = np.linalg.norm(gv, axis=1)
        if step % 5 == 4 or step == max_iter - 1:
            resid = np.linalg.norm(gv - rayleigh[:, None] * vec[todo], axis=1)
            done = resid <= np.sqrt(tol) * np.maximum(rayleigh, 1e-300)
            lam[todo[done]] = rayleigh[done]
            done_idx = todo[done]
            vec[todo] = gv / np.maximum(norm, 1e-300)[:, None]
            vec[done_idx] = vec[done_idx]  # converged rows keep their vector
            todo = todo[~done]
            if not len(todo):
                break
        else:
            vec[todo] = gv / np.maximum(norm, 1e-300)[:, None]
    todo = np.union1d(todo, np.flatnonzero(signed)).astype(np.int64)
    if len(todo):
        evals, evecs = np.linalg.eigh(gram[todo])
        vec[todo] = evecs[:, :, -1]
        lam[todo] = evals[:, -1]
    return vec, lam


#: name -> method instance, in the order reports list them.
METHODS: dict[str, CAMMethod] = {
    m.name: m
    for m in (
        CAM(),
        GradCAM(),
        GradCAMpp(),
        LayerCAM(),
        EigenCAM(),
        XGradCAM(),
        HiResCAM(),
        GradCAMElementWise(),
        EigenGradCAM(),
    )
}


def default_methods(available: list[str]) -> list[str]:
    """The methods a run computes when none are asked for: the ``default`` ones among
    ``available`` (names), in registry order."""
    return [m for m in available if METHODS[m].default]


def availability(spec: Any) -> dict[str, str | None]:
    """Each method for an analysis file (a ModelSpec): None if the file serves it, else
    the reason it does not."""
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
