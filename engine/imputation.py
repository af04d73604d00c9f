"""ROAD's noisy linear imputation (Rong et al. 2022), batched, numpy only.

pytorch-grad-cam (``pytorch_grad_cam/metrics/road.py``, ``NoisyLinearImputer``, taken
from the authors' ``road_evaluation/imputations.py``) fills every removed pixel ``i``
with the value that makes it the weighted mean of its in-image 8 neighbours::

    sum_{n in N(i)} w_n (x_i - x_n) = 0,   w = 1/6 (edge neighbours), 1/12 (diagonal)

where ``x_n`` is the image's value when ``n`` is kept and an unknown otherwise: one
sparse linear system per image (the same matrix for every channel), which the
reference builds with ``scipy.sparse.lil_matrix`` and solves with ``spsolve``; then it
adds ``noise * N(0, 1)`` (``noise = 0.01``, absolute) to every imputed value.

Where scipy is importable (it is not a dependency of convlens; scikit-image, in the
test and export extras, brings it) each system is built as a sparse matrix at once and
solved directly with ``scipy.sparse.linalg.spsolve``, as the reference does: about ten
times faster than the fallback at 224 x 224.  Otherwise, numpy only, the systems of a
whole batch of masks are solved at once by conjugate gradients
(Jacobi-preconditioned) on the full pixel grid, the operator applied as a 3x3 stencil
over array slices, to a relative residual of ``tol`` per system: the matrix
``s_i x_i - sum_{n unknown} w_n x_n`` (``s_i`` the sum of the in-image neighbour
weights) is a weighted graph Laplacian plus a positive diagonal wherever an unknown
touches a kept pixel, so symmetric positive definite whenever at least one pixel is
kept (every connected set of removed pixels then borders a kept one).  With no pixel
kept at all the system is singular (the reference's ``spsolve`` fails there); any
constant solves it and we take the image's per-channel mean.
"""

from __future__ import annotations

import numpy as np

#: (dy, dx) -> weight, as pytorch-grad-cam's ``neighbors_weights``
NEIGHBOURS: tuple[tuple[int, int, float], ...] = (
    (1, 1, 1 / 12),
    (0, 1, 1 / 6),
    (-1, 1, 1 / 12),
    (1, -1, 1 / 12),
    (0, -1, 1 / 6),
    (-1, -1, 1 / 12),
    (1, 0, 1 / 6),
    (-1, 0, 1 / 6),
)


def _neighbour_sum(x: np.ndarray) -> np.ndarray:
    """``out[b, i, j] = sum_(dy, dx) w * x[b, i + dy, j + dx]`` (zero outside the image)
    for ``x`` of shape ``(B, H, W, C)``."""
    _, h, w, _ = x.shape
    out = np.zeros_like(x)
    for dy, dx, wt in NEIGHBOURS:
        # rows i with 0 <= i + dy < h, columns j with 0 <= j + dx < w
        oi = slice(max(0, -dy), h - max(0, dy))
        oj = slice(max(0, -dx), w - max(0, dx))
        si = slice(max(0, dy), h - max(0, -dy))
        sj = slice(max(0, dx), w - max(0, -dx))
        out[:, oi, oj] += wt * x[:, si, sj]
    return out


def linear_impute(
    images: np.ndarray,
    keep: np.ndarray,
    *,
    tol: float = 1e-7,
    max_iter: int = 5000,
    solver: str = "auto",
) -> np.ndarray:
    """The images ``(B, H, W, C)`` with every pixel where ``keep`` ``(B, H, W)`` is False
    replaced by the solution of the linear system above (no noise).  float64 inside,
    returns float32.  ``solver``: ``"auto"`` (scipy's direct solver when importable,
    else conjugate gradients) or ``"cg"``."""
    img = np.asarray(images, np.float64)
    if img.ndim != 4 or keep.shape != img.shape[:3]:
        raise ValueError(f"images (B, H, W, C) and keep (B, H, W): {img.shape}, {keep.shape}")
    keep = keep.astype(bool)
    if solver != "cg" and _scipy():
        return np.stack([_direct(im, k) for im, k in zip(img, keep, strict=True)]).astype(
            np.float32
        )
    known = keep[..., None]  # (B, H, W, 1)
    unknown = ~known
    b_, h, w, c = img.shape
    s = _neighbour_sum(np.ones((1, h, w, 1)))  # in-image neighbour weight sum (H, W)
    rhs = np.where(unknown, _neighbour_sum(np.where(known, img, 0.0)), 0.0)

    def apply(x: np.ndarray) -> np.ndarray:  # x is 0 on known pixels
        return np.where(unknown, s * x - _neighbour_sum(x), 0.0)

    x = np.zeros_like(img)
    r = rhs.copy()
    z = r / s
    p = z.copy()
    rz = np.einsum("bhwc,bhwc->bc", r, z)
    bnorm = np.sqrt(np.einsum("bhwc,bhwc->bc", rhs, rhs))
    active = np.sqrt(np.einsum("bhwc,bhwc->bc", r, r)) > tol * bnorm
    for _ in range(max_iter):
        if not active.any():
            break
        ap = apply(p)
        pap = np.einsum("bhwc,bhwc->bc", p, ap)
        alpha = np.divide(rz, pap, out=np.zeros_like(rz), where=active & (pap > 0))
        x += alpha[:, None, None, :] * p
        r -= alpha[:, None, None, :] * ap
        z = r / s
        rz_new = np.einsum("bhwc,bhwc->bc", r, z)
        beta = np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 0)
        p = z + beta[:, None, None, :] * p
        rz = rz_new
        active &= np.sqrt(np.einsum("bhwc,bhwc->bc", r, r)) > tol * bnorm
    out = np.where(known, img, x)
    none_kept = ~known.any(axis=(1, 2, 3))
    if none_kept.any():  # singular: any constant solves it
        out[none_kept] = img[none_kept].mean(axis=(1, 2), keepdims=True)
    return out.astype(np.float32)


def _scipy() -> bool:
    try:
        import scipy.sparse.linalg  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


def _direct(img: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """One image ``(H, W, C)``: the system built at once (COO) and solved by
    ``spsolve``; every pixel kept or none kept: as the CG path."""
    from scipy.sparse import coo_matrix  # type: ignore[import-untyped]
    from scipy.sparse.linalg import spsolve  # type: ignore[import-untyped]

    h, w, c = img.shape
    flat = img.reshape(h * w, c)
    keepf = keep.reshape(-1)
    idx = np.flatnonzero(~keepf)
    out = flat.copy()
    if not len(idx):
        return img
    if keepf.sum() == 0:  # singular: any constant solves it
        return np.broadcast_to(flat.mean(axis=0), img.shape).copy()
    vid = np.full(h * w, -1)
    vid[idx] = np.arange(len(idx))
    y0, x0 = np.divmod(idx, w)
    diag = np.zeros(len(idx))
    rhs = np.zeros((len(idx), c))
    rows, cols, vals = [], [], []
    for dy, dx, wt in NEIGHBOURS:
        y, x = y0 + dy, x0 + dx
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        diag[inside] += wt
        eq = np.flatnonzero(inside)
        nb = y[eq] * w + x[eq]
        has = keepf[nb]
        rhs[eq[has]] += wt * flat[nb[has]]
        rows.append(eq[~has])
        cols.append(vid[nb[~has]])
        vals.append(np.full(int((~has).sum()), -wt))
    rows.append(np.arange(len(idx)))
    cols.append(np.arange(len(idx)))
    vals.append(diag)
    n = len(idx)
    a = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), (n, n))
    sol = spsolve(a.tocsc(), rhs)
    out[idx] = sol.reshape(n, c)
    return out.reshape(img.shape)


def noisy_linear_impute(
    images: np.ndarray, keep: np.ndarray, eps: np.ndarray, noise: float = 0.01
) -> np.ndarray:
    """:func:`linear_impute` plus ``noise * eps`` on every imputed value, ``eps`` standard
    normal draws of the images' shape: pytorch-grad-cam's
    ``NoisyLinearImputer(noise=0.01)`` (``res + noise * randn_like(res)``)."""
    out = linear_impute(images, keep)
    if noise:
        out += np.where(keep[..., None], 0.0, noise * eps).astype(np.float32)
    return out
