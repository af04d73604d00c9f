"""The perturbation methods (Ablation-CAM, Recipro-CAM, Score-CAM, Faster Score-CAM)
against loop-by-loop versions of their papers' formulas, one perturbed copy at a time:
on a small numpy network, on the trained zoo models with Keras running the layers after
the CAM layer (an independent reference for the tail the engine cuts out of the ONNX
graph), the tail refused for a skip connection, and ``convlens run`` end to end."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from test_cams import _weighted  # ReLU(sum_k alpha_k A_k) by loops

from convlens.engine import cams_perturb
from convlens.engine import contract as C
from convlens.engine.cams import METHODS, CAMInputs

PERTURB = ["ablationcam", "reciprocam", "scorecam", "fasterscorecam"]

Head = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # one (1, ...) -> scores, probs


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]


# ---- loop references: one perturbed copy at a time, straight from the formulas ---------


def ref_ablationcam(acts: np.ndarray, classes: np.ndarray, head: Head) -> np.ndarray:
    """Desai & Ramaswamy 2020: alpha_k = (y_c - y_c^k) / y_c, channel k of A zeroed."""
    n_img, h, w, k = acts.shape
    alpha = np.zeros((n_img, classes.shape[1], k))
    for n in range(n_img):
        y = head(acts[n : n + 1])[0][0]
        for kk in range(k):
            f = acts[n : n + 1].copy()
            f[0, :, :, kk] = 0.0
            yk = head(f)[0][0]
            for t, c in enumerate(classes[n]):
                alpha[n, t, kk] = (y[c] - yk[c]) / y[c] if y[c] != 0 else 0.0
    return _weighted(acts, alpha)


def ref_reciprocam(acts: np.ndarray, classes: np.ndarray, head: Head) -> np.ndarray:
    """Byun & Lee 2022: M_c(i, j) = softmax(head(A masked to cell (i, j)))_c."""
    n_img, h, w, k = acts.shape
    out = np.zeros((n_img, classes.shape[1], h, w))
    for n in range(n_img):
        for i in range(h):
            for j in range(w):
                f = np.zeros((1, h, w, k), np.float32)
                f[0, i, j, :] = acts[n, i, j, :]
                p = head(f)[1][0]
                for t, c in enumerate(classes[n]):
                    out[n, t, i, j] = p[c]
    return out


def ref_scorecam(
    acts: np.ndarray,
    x: np.ndarray,
    classes: np.ndarray,
    model: Callable[[np.ndarray], np.ndarray],
    top_n: int | None = None,
) -> np.ndarray:
    """Wang et al. 2020 as pytorch-grad-cam / torch-cam: mask X with each upsampled,
    min-max normalised channel; alpha = softmax over channels of the class score.
    ``top_n``: Faster Score-CAM, the channels of largest variance only."""
    n_img, h, w, k = acts.shape
    size_h, size_w = x.shape[1:3]
    alpha = np.zeros((n_img, classes.shape[1], k))
    for n in range(n_img):
        chans = list(range(k))
        if top_n is not None:
            var = [float(np.var(acts[n, :, :, kk].astype(np.float64))) for kk in range(k)]
            chans = sorted(chans, key=lambda kk: -var[kk])[:top_n]
        scores = {}
        for kk in chans:
            up = cv2.resize(acts[n, :, :, kk], (size_w, size_h), interpolation=cv2.INTER_LINEAR)
            lo, hi = float(up.min()), float(up.max())
            mask = np.zeros_like(up) if hi == lo else (up - lo) / (hi - lo)
            masked = x[n].copy()
            for ch in range(x.shape[3]):
                masked[:, :, ch] *= mask
            scores[kk] = model(masked[None])[0]
        for t, c in enumerate(classes[n]):
            top = max(float(scores[kk][c]) for kk in chans)
            total = sum(np.exp(float(scores[kk][c]) - top) for kk in chans)
            for kk in chans:
                alpha[n, t, kk] = np.exp(float(scores[kk][c]) - top) / total
    return _weighted(acts, alpha)


def reference(name: str, inp: CAMInputs, head: Head, model: Callable[..., Any]) -> np.ndarray:
    assert inp.classes is not None and inp.x is not None
    if name == "ablationcam":
        return ref_ablationcam(inp.acts, inp.classes, head)
    if name == "reciprocam":
        return ref_reciprocam(inp.acts, inp.classes, head)
    top_n = cams_perturb.FasterScoreCAM.top_n if name == "fasterscorecam" else None
    return ref_scorecam(inp.acts, inp.x, inp.classes, model, top_n)


def _close(got: np.ndarray, ref: np.ndarray, tol: float = 1e-4) -> None:
    assert got.dtype == np.float32 and got.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-12)
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * scale)
    assert ref.max() > 0  # a map that says something


# ---- a small numpy network: conv features -> nonlinear head ----------------------------


def _numpy_net(seed: int = 0) -> tuple[Callable[..., Any], Head, Callable[..., Any]]:
    """(features, tail, model): features = 2x2 average pooling of the image -> 1x1 conv
    -> ReLU, (N, 4, 5, 6); tail = flatten -> dense -> tanh -> dense (scores, softmax);
    model = tail after features (its scores)."""
    rng = np.random.default_rng(seed)
    h, w, k, c, hidden = 4, 5, 6, 4, 8
    w1 = rng.standard_normal((h * w * k, hidden)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((hidden, c)).astype(np.float32)
    conv = rng.standard_normal((3, k)).astype(np.float32)

    def features(x: np.ndarray) -> np.ndarray:
        pooled = x.reshape(len(x), h, 2, w, 2, 3).mean(axis=(2, 4))
        return np.maximum(pooled @ conv, 0.0).astype(np.float32)  # type: ignore[no-any-return]

    def tail(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = np.tanh(f.reshape(len(f), -1) @ w1) @ w2 + 0.5
        return z, _softmax(z)

    def model(x: np.ndarray) -> np.ndarray:
        return tail(features(x))[0]

    return features, tail, model


@pytest.mark.parametrize("name", PERTURB)
def test_methods_on_a_numpy_network(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batched over images, copies and (small) chunks against the loops."""
    features, tail, model = _numpy_net()
    x = np.random.default_rng(4).random((3, 8, 10, 3)).astype(np.float32)
    acts = features(x)
    acts[1, :, :, 2] = 0.0  # a dead channel: a constant Score-CAM mask
    classes = np.array([[0, 2], [1, 1], [3, 0]], np.int64)
    inp = CAMInputs(acts=acts, classes=classes, x=x, tail=tail, scores=model)
    # several tail / model calls per batch: the chunks must come back in row order
    monkeypatch.setattr(cams_perturb, "TAIL_CHUNK_BYTES", 5 * acts[0].nbytes)
    monkeypatch.setattr(cams_perturb, "MODEL_CHUNK_ROWS", 7)
    got = METHODS[name].maps(inp)
    _close(got, reference(name, inp, tail, model))


def test_registry_and_missing_inputs() -> None:
    assert [n for n, m in METHODS.items() if m.needs_tail] == ["ablationcam", "reciprocam"]
    assert [n for n, m in METHODS.items() if m.needs_model] == ["scorecam", "fasterscorecam"]
    for name in PERTURB:
        m = METHODS[name]
        assert not m.default and not m.needs_gradients and not m.needs_weights
        assert m.label and m.reference and type(m).__doc__
    acts = np.ones((1, 2, 2, 3), np.float32)
    with pytest.raises(ValueError, match="needs the network after the CAM tensor"):
        METHODS["ablationcam"].compute(acts, classes=np.zeros((1, 1), np.int64))
    with pytest.raises(ValueError, match="needs the model input batch"):
        METHODS["scorecam"].compute(acts, classes=np.zeros((1, 1), np.int64))
    with pytest.raises(ValueError, match="needs target classes"):
        METHODS["reciprocam"].compute(acts)


# ---- the trained zoo models: the engine's tail (cut from the ONNX graph) against Keras --


def _keras_net(model: Any, spec: C.ModelSpec) -> tuple[Head, Callable[..., Any]]:
    """(head, model scores) by Keras, re-calling the layers one copy at a time: head =
    the layers after the CAM tensor, the final layer's pre-activation from its kernel
    (scores; ``[-z, z]`` for one sigmoid unit) and the model's output (probabilities)."""
    import tensorflow as tf

    from refs import _flat_layers

    exposed = spec.source["exposed_tensors"][spec.cam_layer]
    layers = [layer for layer in _flat_layers(model) if type(layer).__name__ != "InputLayer"]
    cut = [layer.name for layer in layers].index(exposed) + 1
    front, after = layers[:cut], layers[cut:]

    def head(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = tf.constant(f)
        for layer in after[:-1]:
            h = layer(h, training=False)
        final = after[-1]
        z = tf.matmul(h, final.kernel) + final.bias if type(final).__name__ == "Dense" else h
        p = final(h, training=False)
        if spec.head.binary_sigmoid:
            z, p = tf.concat([-z, z], axis=1), tf.concat([1.0 - p, p], axis=1)
        return np.asarray(z, np.float64), np.asarray(p, np.float64)

    def scores(x: np.ndarray) -> np.ndarray:
        a = tf.constant(x)
        for layer in front:
            a = layer(a, training=False)
        return head(np.asarray(a))[0]

    return head, scores


def _engine_inputs(onnx_path: Path, x: np.ndarray, classes: np.ndarray) -> CAMInputs:
    """What the engine hands a method: the CAM tensor by onnxruntime, the tail cut out of
    the graph (engine.tail) and the scores-only graph, each on its own session."""
    import onnx
    import onnxruntime as ort

    from convlens.engine.graph import pruned
    from convlens.engine.tail import TAIL_OUTPUTS, cut_tail

    spec = C.read_spec(onnx_path)
    proto = onnx.load(str(onnx_path))
    cpu = ["CPUExecutionProvider"]
    acts_s = ort.InferenceSession(pruned(proto, [str(spec.cam_output)]), providers=cpu)
    cut = cut_tail(proto, spec)
    tail_s = ort.InferenceSession(cut.model, providers=cpu)
    scores_s = ort.InferenceSession(pruned(proto, [C.OUT_SCORES]), providers=cpu)

    def tail(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, p = tail_s.run(list(TAIL_OUTPUTS), cut.feeds(f))
        return s, p

    return CAMInputs(
        acts=acts_s.run(None, {C.IN_IMAGE: x})[0],
        classes=classes,
        x=x,
        tail=tail,
        scores=lambda b: scores_s.run(None, {C.IN_IMAGE: b})[0],
    )


@pytest.mark.tf
@pytest.mark.parametrize("name", ["gap_dense", "class_conv", "flatten_softmax", "flatten_sigmoid"])
def test_methods_on_zoo_models_against_keras(zoo: dict[str, dict[str, Path]], name: str) -> None:
    """Every head kind: the batched maps through the ONNX tail against the loops through
    the Keras layers, for two held-out photo patches and two target classes each."""
    import keras

    from refs import _images

    onnx_path = zoo[name]["onnx"]
    spec = C.read_spec(onnx_path)
    x = _images(spec, n=2)
    classes = np.array([[0, 1], [1, 0]], np.int64)
    inp = _engine_inputs(onnx_path, x, classes)
    head, scores = _keras_net(keras.models.load_model(zoo[name]["keras"], compile=False), spec)
    assert inp.tail is not None
    np.testing.assert_allclose(inp.tail(inp.acts)[0], head(inp.acts)[0], rtol=1e-4, atol=1e-5)
    for m in PERTURB:
        _close(METHODS[m].maps(inp), reference(m, inp, head, scores), tol=2e-3)


# ---- end to end ------------------------------------------------------------------------


@pytest.mark.tf
def test_run_end_to_end_on_the_demo_photos(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    """``convlens run --cam ablationcam,reciprocam,scorecam --save-maps``: the saved map of
    one image a folder against the loops, with the demo's GAP -> Dense head written out from
    its weights (``S = mean_ij(F) W + b``) and Score-CAM's masked images scored one by one by
    onnxruntime on the whole graph."""
    import onnxruntime as ort
    from click.testing import CliRunner

    from convlens.cli import main
    from convlens.engine.images import Preprocessor, read_image

    model, photos = demo_model
    methods = ["ablationcam", "reciprocam", "scorecam"]
    out = tmp_path / "o"
    args = [str(model), str(photos), "-o", str(out), "--device", "cpu", "-q", "--top-k", "1"]
    args += ["--runtime", "onnxruntime"]  # the reference runs onnxruntime too
    r = CliRunner().invoke(
        main, ["run", *args, "--cam", ",".join(methods), "--save-maps", "--grids", "none"]
    )
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 15 and all(rec["cam_methods"] == methods for rec in recs)
    spec = C.read_spec(model)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    blank = np.zeros((1, spec.input.height, spec.input.width, spec.input.channels), np.float32)
    one = np.zeros((1, 1), np.int64)
    w, b = sess.run([C.OUT_CAM_WEIGHTS, C.OUT_CAM_BIAS], {C.IN_IMAGE: blank, C.IN_TARGETS: one})

    def head(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = f.astype(np.float64).mean(axis=(1, 2)) @ w + b
        return z, _softmax(z)

    def scores(xb: np.ndarray) -> np.ndarray:
        return sess.run([C.OUT_SCORES], {C.IN_IMAGE: xb, C.IN_TARGETS: one})[0]

    pre = Preprocessor(spec.input, spec.preprocess)
    first = {Path(rec["path"]).parent.name: rec for rec in reversed(recs)}
    for rec in first.values():
        x = pre(read_image(Path(rec["path"])))[None]
        targets = np.array([rec["cam_classes"]], np.int64)
        acts = sess.run([str(spec.cam_output)], {C.IN_IMAGE: x, C.IN_TARGETS: targets})[0]
        inp = CAMInputs(acts=acts, classes=targets, x=x)
        maps = np.load(out / rec["maps"])
        for m in methods:
            saved = maps[f"{m}/{rec['cam_classes'][0]}"][None, None]
            _close(saved.astype(np.float32), reference(m, inp, head, scores), tol=2e-3)


def _skip_model() -> Any:
    """A head that reads an earlier layer too: GAP(conv a) joins GAP(conv b) before the
    Dense, so the network after conv b is not a function of conv b's output alone."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    a = layers.Conv2D(4, 3, activation="relu", padding="same", name="a")(inp)
    bb = layers.Conv2D(6, 3, activation="relu", padding="same", name="b")(a)
    joined = layers.Concatenate()(
        [layers.GlobalAveragePooling2D()(a), layers.GlobalAveragePooling2D()(bb)]
    )
    return keras.Model(inp, layers.Dense(2, activation="softmax", name="out")(joined))


@pytest.mark.tf
@pytest.mark.slow  # exports a model of its own (about 10 s)
def test_tail_refused_for_a_skip_connection(tmp_path: Path) -> None:
    """The tail methods say why they cannot run (one line, exit 2); Score-CAM, which runs
    the whole model, still does."""
    import onnx
    from click.testing import CliRunner

    from convlens.cli import main
    from convlens.engine.cams import availability
    from convlens.engine.tail import tail_problem
    from convlens.exporter.export import export_loaded

    exported = export_loaded(_skip_model(), tmp_path / "skip.onnx", cam_layer="b")
    onnx_path = exported.path
    spec = C.read_spec(onnx_path)
    why = tail_problem(onnx.load(str(onnx_path)), spec)
    assert why is not None and "other than through the CAM tensor of b" in why
    # the export's summary says so too (from the graph before its weights are written)
    assert exported.methods["ablationcam"] == why and exported.methods["scorecam"] is None
    assert any(w.startswith("ablationcam, reciprocam unavailable") for w in exported.warnings)
    assert availability(spec, why)["ablationcam"] == why
    assert availability(spec, why)["scorecam"] is None
    photos = tmp_path / "p"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(photos / f"{i}.png"), rng.integers(0, 255, (20, 20, 3), np.uint8))
    base = ["run", str(onnx_path), str(photos), "--device", "cpu", "-q", "--grids", "none"]
    r = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "o1"), "--cam", "ablationcam"])
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert (
        "CAM method ablationcam is not available for this model" in line
        and "CAM tensor of b" in line
    )
    r = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "o2"), "--cam", "scorecam,gradcam"])
    assert r.exit_code == 0, r.output
