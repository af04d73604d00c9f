"""Eigen-CAM and Eigen-Grad-CAM: projections on the first principal direction
(notation: :mod:`.cams`)."""

from __future__ import annotations

import numpy as np

from .cams import CAMInputs, CAMMethod, register
from .cams_gradient import _grad_times_acts


@register
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

    def raw_maps(self, inp: CAMInputs) -> np.ndarray:
        acts = inp.acts
        n, h, w, k = acts.shape
        proj = first_component(acts.reshape(n, h * w, k))
        return proj.astype(np.float32).reshape(n, 1, h, w)


@register
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

    def raw_maps(self, inp: CAMInputs) -> np.ndarray:
        acts, grads = inp.acts, inp.grads
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
            vec[todo] = gv / np.maximum(norm, 1e-300)[:, None]  # converged rows too
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
