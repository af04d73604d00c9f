"""CAM methods against naive references written straight from the papers' formulas
(and, where a method is defined by pytorch-grad-cam rather than a paper, that library's
code): on random tensors, on the tensors of the trained zoo models, and end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convlens.engine import contract
from convlens.engine.cams import METHODS, CAMMethod, get_method, normalize, upsample

NEW = ["xgradcam", "hirescam", "gradcamelementwise", "eigengradcam"]
#: the perturbation methods run the network: tested in tests/test_cams_perturb.py
PERTURB = [n for n, m in METHODS.items() if m.needs_tail or m.needs_model]
#: the methods computed from the tensors alone
TENSOR_ONLY = [n for n, m in METHODS.items() if not (m.needs_tail or m.needs_model)]

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


def ref_xgradcam(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Fu et al. 2020, eq. 13: w_k = sum_ij (A_k(i,j) / sum_ab A_k(a,b)) dS/dA_k(i,j)."""
    n_img, n_t, h, w, k = grads.shape
    wk = np.zeros((n_img, n_t, k))
    for n in range(n_img):
        for kk in range(k):
            sum_a = sum(float(acts[n, a, b, kk]) for a in range(h) for b in range(w))
            for t in range(n_t):
                total = 0.0
                for i in range(h):
                    for j in range(w):
                        if sum_a != 0:
                            total += float(acts[n, i, j, kk]) / sum_a * float(grads[n, t, i, j, kk])
                wk[n, t, kk] = total
    return _weighted(acts, wk)


def ref_hirescam(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Draelos & Carin 2020: sum_k g_k * A_k, then ReLU (pytorch-grad-cam's BaseCAM)."""
    n_img, n_t, h, w, k = grads.shape
    out = np.zeros((n_img, n_t, h, w))
    for n in range(n_img):
        for t in range(n_t):
            for i in range(h):
                for j in range(w):
                    s = 0.0
                    for kk in range(k):
                        s += float(grads[n, t, i, j, kk]) * float(acts[n, i, j, kk])
                    out[n, t, i, j] = max(s, 0.0)
    return out


def ref_gradcamelementwise(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's GradCAMElementWise: sum_k ReLU(g_k * A_k)."""
    n_img, n_t, h, w, k = grads.shape
    out = np.zeros((n_img, n_t, h, w))
    for n in range(n_img):
        for t in range(n_t):
            for i in range(h):
                for j in range(w):
                    s = 0.0
                    for kk in range(k):
                        s += max(float(grads[n, t, i, j, kk]) * float(acts[n, i, j, kk]), 0.0)
                    out[n, t, i, j] = s
    return out


def ref_eigengradcam(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's EigenGradCAM: get_2d_projection(grads * activations), i.e. X =
    g * A as (hw, k), centred per channel over positions, projected on the first right
    singular vector of the centred matrix; sign: sum(X v_1) >= 0 on the un-centred X;
    then ReLU."""
    n_img, n_t, h, w, k = grads.shape
    out = np.zeros((n_img, n_t, h, w))
    for n in range(n_img):
        for t in range(n_t):
            x = np.zeros((h * w, k))
            for i in range(h):
                for j in range(w):
                    for kk in range(k):
                        x[i * w + j, kk] = float(grads[n, t, i, j, kk]) * float(acts[n, i, j, kk])
            xc = x.copy()
            for kk in range(k):
                mean = sum(x[p, kk] for p in range(h * w)) / (h * w)
                for p in range(h * w):
                    xc[p, kk] -= mean
            _, _, vt = np.linalg.svd(xc, full_matrices=True)
            v = vt[0]
            if sum(x[p] @ v for p in range(h * w)) < 0:
                v = -v
            for p in range(h * w):
                out[n, t, p // w, p % w] = max(float(xc[p] @ v), 0.0)
    return out


def pgc_get_2d_projection(activation_batch: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's utils/svd_on_activations.get_2d_projection as written there
    (jacobgil/pytorch-grad-cam 084273b, NCHW input), for the layout and the centring."""
    activation_batch = activation_batch.copy()
    activation_batch[np.isnan(activation_batch)] = 0
    projections = []
    for activations in activation_batch:
        reshaped_activations = (activations).reshape(activations.shape[0], -1).transpose()
        reshaped_activations = reshaped_activations - reshaped_activations.mean(axis=0)
        U, S, VT = np.linalg.svd(reshaped_activations, full_matrices=True)
        projection = reshaped_activations @ VT[0, :]
        projection = projection.reshape(activations.shape[1:])
        projections.append(projection)
    return np.float32(projections)


#: name -> loop reference taking (acts, grads, weights, classes)
REFS: dict[str, Any] = {
    "cam": lambda a, g, w, c: ref_cam(a, w, c),
    "gradcam": lambda a, g, w, c: ref_gradcam(a, g),
    "gradcampp": lambda a, g, w, c: ref_gradcampp(a, g),
    "layercam": lambda a, g, w, c: ref_layercam(a, g),
    "eigencam": lambda a, g, w, c: ref_eigencam(a),
    "xgradcam": lambda a, g, w, c: ref_xgradcam(a, g),
    "hirescam": lambda a, g, w, c: ref_hirescam(a, g),
    "gradcamelementwise": lambda a, g, w, c: ref_gradcamelementwise(a, g),
    "eigengradcam": lambda a, g, w, c: ref_eigengradcam(a, g),
}


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.dtype == np.float32
    assert got.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-12)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * scale)


# ---- tests ---------------------------------------------------------------------------


def test_registry() -> None:
    assert list(METHODS) == ["cam", "gradcam", "gradcampp", "layercam", "eigencam", *NEW, *PERTURB]
    for name, m in METHODS.items():
        assert isinstance(m, CAMMethod) and m.name == name
        assert get_method(name) is m
        assert m.label and m.reference and type(m).__doc__, name
    assert set(REFS) == set(TENSOR_ONLY)  # every such method has its loop reference here
    assert [n for n, m in METHODS.items() if m.needs_gradients] == [
        "gradcam",
        "gradcampp",
        "layercam",
        *NEW,
    ]
    assert [n for n, m in METHODS.items() if m.class_agnostic] == ["eigencam"]
    # the new methods are opt-in: the default run computes what it did before
    assert [n for n, m in METHODS.items() if m.default] == [
        "cam",
        "gradcam",
        "gradcampp",
        "layercam",
        "eigencam",
    ]
    labels = {n: METHODS[n].label for n in NEW}
    assert labels == {
        "xgradcam": "XGrad-CAM",
        "hirescam": "HiResCAM",
        "gradcamelementwise": "Element-wise Grad-CAM",
        "eigengradcam": "Eigen-Grad-CAM",
    }
    with pytest.raises(ValueError, match="choose from cam, gradcam"):
        get_method("gradcam2")


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


@pytest.mark.parametrize("name", NEW)
def test_new_methods_on_random_tensors(name: str, data: dict[str, np.ndarray]) -> None:
    acts, grads = data["acts"].copy(), data["grads"]
    acts[1, :, :, 2] = 0.0  # a dead channel: XGrad-CAM's sum_ij A_k is 0 there
    got = METHODS[name].compute(acts, grads=grads, classes=data["classes"])
    assert np.isfinite(got).all()
    _close(got, REFS[name](acts, grads, None, None))


def test_xgradcam_signed_activations() -> None:
    # a pre-ReLU CAM tensor (class_conv heads): channel sums of either sign
    rng = np.random.default_rng(11)
    acts = rng.standard_normal((2, 3, 4, 5)).astype(np.float32) + 0.3
    grads = rng.standard_normal((2, 2, 3, 4, 5)).astype(np.float32)
    _close(METHODS["xgradcam"].compute(acts, grads=grads), ref_xgradcam(acts, grads))


@pytest.mark.parametrize("shape", [(2, 3, 3, 40), (2, 6, 7, 4), (1, 1, 2, 3)])
def test_eigengradcam_both_gram_sides(shape: tuple[int, int, int, int]) -> None:
    # hw <= k (Gram X X^T) and hw > k (Gram X^T X), and hw = 2 (rank 1 after centring)
    rng = np.random.default_rng(8)
    acts = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
    grads = rng.standard_normal((shape[0], 3, *shape[1:])).astype(np.float32)
    got = METHODS["eigengradcam"].compute(acts, grads=grads)
    _close(got, ref_eigengradcam(acts, grads))


def test_eigengradcam_is_pytorch_grad_cams_projection(data: dict[str, np.ndarray]) -> None:
    """Up to the sign (which the library leaves to LAPACK), the map is ReLU of the
    library's get_2d_projection of grads * activations in its NCHW layout."""
    acts, grads = data["acts"], data["grads"]
    got = METHODS["eigengradcam"].compute(acts, grads=grads)
    for t in range(T):
        nchw = (grads[:, t] * acts).transpose(0, 3, 1, 2)
        proj = pgc_get_2d_projection(nchw)  # (N, h, w)
        for n in range(N):
            x = (grads[n, t] * acts[n]).reshape(H * W, K).astype(np.float64)
            centred = x - x.mean(axis=0)
            # proj = centred @ v (v = +-v_1); ours turns v_1 so that sum(x v_1) >= 0
            v = np.linalg.lstsq(centred, proj[n].ravel().astype(np.float64), rcond=None)[0]
            want = proj[n] if (x @ v).sum() >= 0 else -proj[n]
            np.testing.assert_allclose(got[n, t], np.maximum(want, 0), rtol=1e-4, atol=1e-5)


def test_hirescam_is_cam_over_hw_for_gap_dense(data: dict[str, np.ndarray]) -> None:
    # dS_c/dA_k(i, j) = w[k, c] / (h w) everywhere: HiResCAM = CAM / (hw); so is XGrad-CAM
    # (its weights sum_ij A / sum A * w / (hw) = w / (hw))
    acts, weights, classes = data["acts"], data["weights"], data["classes"]
    grads = weights[:, classes].transpose(1, 2, 0)[:, :, None, None, :] / (H * W)
    grads = np.broadcast_to(grads, (N, T, H, W, K)).astype(np.float32)
    cam = METHODS["cam"].compute(acts, weights=weights, classes=classes)
    for name in ("hirescam", "xgradcam"):
        got = METHODS[name].compute(acts, grads=grads, classes=classes)
        np.testing.assert_allclose(got * (H * W), cam, rtol=1e-4, atol=1e-5 * cam.max())


@pytest.mark.tf
@pytest.mark.parametrize(
    "name", ["gap_dense", "class_conv", "flatten_softmax", "flatten_sigmoid", "nested"]
)
def test_every_method_on_zoo_tensors(zoo: dict[str, dict[str, Path]], name: str) -> None:
    """Every registered method against its loop reference on a trained model's exported
    tensors: the CAM tensor, the in-graph gradients for the top 2 classes and class 0,
    and the CAM weights, for held-out photo patches."""
    from convlens.engine.cams import availability

    from refs import _images, _ort

    onnx = zoo[name]["onnx"]
    spec = contract.read_spec(onnx)
    x = _images(spec, n=3)
    targets = np.tile(np.array([-1, -2, 0], np.int64), (len(x), 1))
    out = _ort(onnx, {contract.IN_IMAGE: x, contract.IN_TARGETS: targets})
    acts, grads = out[spec.cam_output], out[contract.OUT_GRADIENTS]
    classes = out[contract.OUT_TARGET_INDICES]
    weights = out.get(contract.OUT_CAM_WEIGHTS)
    served = [m for m, why in availability(spec).items() if why is None]
    assert set(NEW) <= set(served)  # every head with gradients serves them
    assert np.abs(grads).max() > 0
    for m in (m for m in served if m in TENSOR_ONLY):
        got = METHODS[m].compute(acts, weights=weights, grads=grads, classes=classes)
        ref = REFS[m](acts, grads, weights, classes)
        _close(got, ref)
        assert ref.max() > 0, m  # a map that says something, not zeros against zeros


@pytest.mark.tf
def test_run_new_methods_end_to_end(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    """``convlens run --cam xgradcam,hirescam,... --save-maps`` on the demo photos: every
    saved map against the loop reference on the tensors the exported graph gives for that
    image and its classes; the report names the methods by their labels."""
    import json

    import onnxruntime as ort
    from click.testing import CliRunner

    from convlens.cli import main
    from convlens.engine.images import Preprocessor, read_image

    model, photos = demo_model
    out = tmp_path / "o"
    args = [str(model), str(photos), "-o", str(out), "--device", "cpu", "-q"]
    args += ["--cam", ",".join(NEW), "--save-maps", "--grids", "none", "--top-k", "2"]
    r = CliRunner().invoke(main, ["run", *args])
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 15 and all(rec["status"] == "ok" for rec in recs)
    spec = contract.read_spec(model)
    pre = Preprocessor(spec.input, spec.preprocess)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [spec.cam_output, contract.OUT_GRADIENTS]
    for rec in recs:
        assert rec["cam_methods"] == NEW
    first = {Path(rec["path"]).parent.name: rec for rec in reversed(recs)}
    assert len(first) == 4
    for rec in first.values():  # the loop references take a while: one image a folder
        x = pre(read_image(Path(rec["path"])))[None]
        classes = np.array([rec["cam_classes"]], np.int64)
        acts, grads = sess.run(names, {contract.IN_IMAGE: x, contract.IN_TARGETS: classes})
        maps = np.load(out / rec["maps"])
        assert sorted(maps.files) == sorted(f"{m}/{c}" for m in NEW for c in rec["cam_classes"])
        for m in NEW:
            ref = REFS[m](acts, grads, None, classes)[0]
            for t, c in enumerate(rec["cam_classes"]):
                saved = maps[f"{m}/{c}"]
                scale = max(float(np.abs(ref[t]).max()), 1e-12)
                np.testing.assert_allclose(saved, ref[t], rtol=1e-4, atol=1e-4 * scale)
    page = next((out / "images").glob("*.html")).read_text()
    for m in NEW:
        assert METHODS[m].label in page


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
    for name in TENSOR_ONLY:
        m = METHODS[name]
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
