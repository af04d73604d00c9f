"""CAM methods against naive references written straight from the papers' formulas."""

from __future__ import annotations

import numpy as np
import pytest

from convlens.engine.cams import METHODS, CAMMethod, get_method, normalize, upsample

N, T, H, W, K, C = 3, 2, 4, 5, 6, 7


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    acts = np.maximum(rng.standard_normal((N, H, W, K)), 0).astype(np.float32)
    return {
        "acts": acts,
        "weights": rng.standard_normal((K, C)).astype(np.float32),
        "grads": rng.standard_normal((N, T, H, W, K)).astype(np.float32),
        "classes": rng.integers(0, C, (N, T)).astype(np.int64),
    }


# ---- naive references: explicit loops over images, classes, channels and positions ----


def ref_cam(acts: np.ndarray, weights: np.ndarray, classes: np.ndarray) -> np.ndarray:
    n_img, n_t = classes.shape
    h, w, k = acts.shape[1:]
    out = np.zeros((n_img, n_t, h, w))
    for n in range(n_img):
        for t in range(n_t):
            c = classes[n, t]
            for i in range(h):
                for j in range(w):
                    s = 0.0
                    for kk in range(k):
                        s += float(weights[kk, c]) * float(acts[n, i, j, kk])
                    out[n, t, i, j] = max(s, 0.0)
    return out


def _weighted(acts: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """ReLU(sum_k alpha[n, t, k] A[n, i, j, k]) with loops."""
    n_img, n_t, k = alpha.shape
    h, w = acts.shape[1:3]
    out = np.zeros((n_img, n_t, h, w))
    for n in range(n_img):
        for t in range(n_t):
            for i in range(h):
                for j in range(w):
                    s = 0.0
                    for kk in range(k):
                        s += alpha[n, t, kk] * float(acts[n, i, j, kk])
                    out[n, t, i, j] = max(s, 0.0)
    return out


def ref_gradcam(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    n_img, n_t, h, w, k = grads.shape
    alpha = np.zeros((n_img, n_t, k))
    for n in range(n_img):
        for t in range(n_t):
            for kk in range(k):
                s = 0.0
                for i in range(h):
                    for j in range(w):
                        s += float(grads[n, t, i, j, kk])
                alpha[n, t, kk] = s / (h * w)
    return _weighted(acts, alpha)


def ref_gradcampp(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    n_img, n_t, h, w, k = grads.shape
    wk = np.zeros((n_img, n_t, k))
    for n in range(n_img):
        for t in range(n_t):
            for kk in range(k):
                sum_a = sum(float(acts[n, a, b, kk]) for a in range(h) for b in range(w))
                total = 0.0
                for i in range(h):
                    for j in range(w):
                        g = float(grads[n, t, i, j, kk])
                        denom = 2 * g**2 + sum_a * g**3
                        alpha = g**2 / denom if denom != 0 else 0.0
                        total += alpha * max(g, 0.0)
                wk[n, t, kk] = total
    return _weighted(acts, wk)


def ref_layercam(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    n_img, n_t, h, w, k = grads.shape
    out = np.zeros((n_img, n_t, h, w))
    for n in range(n_img):
        for t in range(n_t):
            for i in range(h):
                for j in range(w):
                    s = 0.0
                    for kk in range(k):
                        s += max(float(grads[n, t, i, j, kk]), 0.0) * float(acts[n, i, j, kk])
                    out[n, t, i, j] = max(s, 0.0)
    return out


def ref_eigencam(acts: np.ndarray) -> np.ndarray:
    n_img, h, w, k = acts.shape
    out = np.zeros((n_img, 1, h, w))
    for n in range(n_img):
        a = acts[n].reshape(h * w, k).astype(np.float64)
        _, _, vt = np.linalg.svd(a, full_matrices=False)
        proj = a @ vt[0]
        if proj.sum() < 0:
            proj = -proj
        out[n, 0] = np.maximum(proj, 0.0).reshape(h, w)
    return out


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.dtype == np.float32
    assert got.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-12)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * scale)


# ---- tests ---------------------------------------------------------------------------


def test_registry() -> None:
    assert list(METHODS) == ["cam", "gradcam", "gradcampp", "layercam", "eigencam"]
    for name, m in METHODS.items():
        assert isinstance(m, CAMMethod) and m.name == name
        assert get_method(name) is m
    assert [n for n, m in METHODS.items() if m.needs_gradients] == [
        "gradcam",
        "gradcampp",
        "layercam",
    ]
    assert [n for n, m in METHODS.items() if m.class_agnostic] == ["eigencam"]
    with pytest.raises(ValueError, match="choose from cam, gradcam"):
        get_method("scorecam")


def test_cam(data: dict[str, np.ndarray]) -> None:
    got = METHODS["cam"].compute(data["acts"], weights=data["weights"], classes=data["classes"])
    _close(got, ref_cam(data["acts"], data["weights"], data["classes"]))


def test_gradcam(data: dict[str, np.ndarray]) -> None:
    got = METHODS["gradcam"].compute(data["acts"], grads=data["grads"], classes=data["classes"])
    _close(got, ref_gradcam(data["acts"], data["grads"]))


def test_gradcampp(data: dict[str, np.ndarray]) -> None:
    grads = data["grads"].copy()
    grads[0, 0, 1, 2, :] = 0.0  # zero denominators -> alpha 0
    got = METHODS["gradcampp"].compute(data["acts"], grads=grads)
    _close(got, ref_gradcampp(data["acts"], grads))
    assert np.isfinite(got).all()


def test_layercam(data: dict[str, np.ndarray]) -> None:
    got = METHODS["layercam"].compute(data["acts"], grads=data["grads"])
    _close(got, ref_layercam(data["acts"], data["grads"]))


@pytest.mark.parametrize("shape", [(N, H, W, K), (2, 3, 3, 40), (2, 6, 7, 4)])
def test_eigencam_against_svd(shape: tuple[int, int, int, int]) -> None:
    # both branches: hw <= k (Gram A A^T) and hw > k (Gram A^T A)
    rng = np.random.default_rng(7)
    acts = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
    got = METHODS["eigencam"].compute(acts)
    assert got.shape == (shape[0], 1, shape[1], shape[2])
    _close(got, ref_eigencam(acts))


def test_eigencam_sign_and_signed_activations() -> None:
    rng = np.random.default_rng(3)
    acts = rng.standard_normal((4, 5, 5, 8)).astype(np.float32)  # pre-ReLU layer
    got = METHODS["eigencam"].compute(acts)
    _close(got, ref_eigencam(acts))
    # the first singular direction of a positive matrix projects positively: map > 0
    pos = np.abs(acts) + 0.1
    assert (METHODS["eigencam"].compute(pos) > 0).all()


def test_shapes_and_relu(data: dict[str, np.ndarray]) -> None:
    kw = {"weights": data["weights"], "grads": data["grads"], "classes": data["classes"]}
    for name, m in METHODS.items():
        out = m.compute(data["acts"], **kw)
        expected = (N, 1, H, W) if m.class_agnostic else (N, T, H, W)
        assert out.shape == expected, name
        assert out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
        assert (out >= 0).all(), name


def test_cam_equals_gradcam_for_gap_dense_closed_form(data: dict[str, np.ndarray]) -> None:
    # S_c = mean_ij sum_k w[k, c] A_k(i, j) + b_c  =>  dS_c/dA_k(i, j) = w[k, c] / (h w)
    acts, weights, classes = data["acts"], data["weights"], data["classes"]
    grads = weights[:, classes].transpose(1, 2, 0)[:, :, None, None, :] / (H * W)
    grads = np.broadcast_to(grads, (N, T, H, W, K)).astype(np.float32)
    cam = METHODS["cam"].compute(acts, weights=weights, classes=classes)
    gradcam = METHODS["gradcam"].compute(acts, grads=grads, classes=classes)
    np.testing.assert_allclose(gradcam * (H * W), cam, rtol=1e-5, atol=1e-6)
    assert cam.max() > 0


def test_larger_batch_matches_einsum() -> None:
    rng = np.random.default_rng(5)
    n, t, h, w, k = 8, 3, 7, 7, 64
    acts = np.maximum(rng.standard_normal((n, h, w, k)), 0).astype(np.float32)
    grads = rng.standard_normal((n, t, h, w, k)).astype(np.float32)
    alpha = grads.mean(axis=(2, 3))
    ref = np.maximum(np.einsum("nhwk,ntk->nthw", acts, alpha), 0)
    np.testing.assert_allclose(METHODS["gradcam"].compute(acts, grads=grads), ref, atol=1e-5)
    ref_l = np.maximum(np.einsum("nthwk,nhwk->nthw", np.maximum(grads, 0), acts), 0)
    np.testing.assert_allclose(METHODS["layercam"].compute(acts, grads=grads), ref_l, atol=1e-4)


def test_input_errors(data: dict[str, np.ndarray]) -> None:
    acts = data["acts"]
    with pytest.raises(ValueError, match="needs CAM weights"):
        METHODS["cam"].compute(acts, classes=data["classes"])
    with pytest.raises(ValueError, match="needs gradients"):
        METHODS["gradcam"].compute(acts)
    with pytest.raises(ValueError, match="grads must be"):
        METHODS["layercam"].compute(acts, grads=data["grads"][:, :, :2])
    with pytest.raises(ValueError, match="class indices"):
        METHODS["cam"].compute(acts, weights=data["weights"], classes=data["classes"] + C)
    with pytest.raises(ValueError, match="acts must be"):
        METHODS["eigencam"].compute(acts[0])


def test_normalize() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((2, 3, 4, 5)).astype(np.float32) * 10 + 2
    maps[0, 1] = 0.0  # all zeros stays zeros
    maps[1, 2] = 3.5  # constant -> zeros
    out = normalize(maps)
    assert out.shape == maps.shape and out.dtype == np.float32
    for n in range(2):
        for t in range(3):
            m = maps[n, t].astype(np.float64)
            if m.max() == m.min():
                assert not out[n, t].any()
            else:
                np.testing.assert_allclose(
                    out[n, t], (m - m.min()) / (m.max() - m.min()), rtol=1e-6, atol=1e-7
                )
                assert out[n, t].min() == 0.0 and out[n, t].max() == pytest.approx(1.0)
    assert normalize(np.zeros((3, 3))).tolist() == np.zeros((3, 3)).tolist()


def test_upsample() -> None:
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    up = upsample(m, (30, 40))
    assert up.shape == (30, 40) and up.dtype == np.float32
    assert up.min() >= m.min() and up.max() <= m.max()
    assert np.array_equal(
        upsample(np.full((2, 2), 0.25, np.float32), (5, 7)), np.full((5, 7), 0.25)
    )
    # a linear ramp stays linear in the interior (bilinear, half-pixel centres)
    ramp = upsample(np.array([[0.0, 1.0]], np.float32), (1, 8))[0]
    # src x = (x + 0.5) / 4 - 0.5, clamped to [0, 1]
    np.testing.assert_allclose(ramp, [0, 0, 0.125, 0.375, 0.625, 0.875, 1, 1], atol=1e-6)


def test_eigencam_top_eigenvector_orthogonal_to_ones() -> None:
    """Signed activations whose top singular direction is orthogonal to all-ones (where
    power iteration from ones would find the wrong eigenvector)."""
    a = np.zeros((1, 2, 2, 3), np.float32)
    # columns: (1, -1) pattern has the largest energy and sums to zero
    a[0, :, :, 0] = [[3.0, -2.9], [3.0, -2.9]]
    a[0, :, :, 1] = [[1.0, 1.0], [1.0, 1.0]]
    got = METHODS["eigencam"].compute(a)
    flat = a[0].reshape(4, 3).astype(np.float64)
    _, _, vt = np.linalg.svd(flat)
    proj = flat @ vt[0]
    proj = -proj if proj.sum() < 0 else proj
    np.testing.assert_allclose(got[0, 0].ravel(), np.maximum(proj, 0), atol=1e-5)
