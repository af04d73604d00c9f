"""Parity: onnxruntime against Keras, TensorFlow and tf.GradientTape, on real photos.

Values are judged on max |onnx - reference| / max(1, max |reference|); gradients on what
the CAM methods consume (:func:`gradient_diff`), which is right at max-pooling ties.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from convlens.engine import contract as C
from convlens.engine.images import ImageError, Preprocessor, discover, read_image
from convlens.pipeline import demo_paths

from .build import output_names
from .errors import ExportError
from .plan import Plan, scores_from_trace
from .trace import Recorder


def parity_inputs(
    calibration: str | Path | None, inp: C.InputSpec, pre: C.Preprocess, n: int, seed: int
) -> tuple[np.ndarray, str]:
    """Real photographs: ``--calibration DIR``, else the bundled demo photos (spread over
    their classes); seeded noise only if neither is there."""
    prep = Preprocessor(inp, pre)
    given = calibration is not None
    folder = Path(calibration) if calibration is not None else demo_paths()[1]
    if given or folder.is_dir():
        found = discover([str(folder)])
        if not found.files:
            reason = found.problems[0][1] if found.problems else "no images"
            raise ExportError(f"--calibration {calibration}: {reason}")
        files = found.files if given else found.files[:: max(1, len(found.files) // n)]
        batch = []
        for f in files:
            try:
                batch.append(prep(read_image(f)))
            except ImageError:
                continue
            if len(batch) >= n:
                break
        if not batch:
            raise ExportError(f"--calibration {calibration}: no readable image")
        what = "calibration" if given else "bundled photos"
        return np.stack(batch).astype(np.float32), f"{what}:{len(batch)} images"
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(n, inp.height, inp.width, 3), dtype=np.uint8)
    return np.stack([prep(img) for img in noise]), f"noise:{n} images, seed {seed}"


def gradient_diff(
    ref: np.ndarray, got: np.ndarray, ref_a: np.ndarray, got_a: np.ndarray
) -> dict[str, float]:
    """Gradients (N, T, h, w, k) judged on what the CAM methods consume.

    ``score`` is the worst relative L2 error of the per-channel sums over positions of
    g (Grad-CAM's weights) and of g * A (what Grad-CAM++'s and the map's weighting
    read), with A (N, h, w, k) the CAM tensor.  Where two values of a max-pooling
    window tie to float precision, TensorFlow and onnxruntime may route that window's
    gradient to different, equally correct cells: both sums are the same either way
    (tied cells hold the same A), while an element-wise comparison would call it a
    failure.  A wrong gradient (scaled, shifted, routed to a cell that is not a max)
    changes one of the sums.  The element-wise figures are reported too.
    """
    out = _diff(ref, got)
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    worst = 0.0
    for r, g in (
        (ref.sum(axis=(2, 3)), got.sum(axis=(2, 3))),
        (
            (ref * np.asarray(ref_a, np.float64)[:, None]).sum(axis=(2, 3)),
            (got * np.asarray(got_a, np.float64)[:, None]).sum(axis=(2, 3)),
        ),
    ):
        norm = float(np.linalg.norm(r))
        err = float(np.linalg.norm(r - g))
        worst = max(worst, err / norm if norm > 0 else err)
    out["elementwise_rel_l2"] = out["rel_l2"]
    out["score"] = worst
    return out


def _diff(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """max abs, relative and relative L2 difference; ``score`` (what the tolerance
    applies to) is max |got - ref| / max(1, max |ref|)."""
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    if ref.shape != got.shape:
        raise ExportError(f"internal: parity shapes differ {ref.shape} vs {got.shape}")
    max_abs = float(np.max(np.abs(ref - got))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    norm = float(np.linalg.norm(ref))
    rel_l2 = float(np.linalg.norm(ref - got)) / norm if norm > 0 else 0.0
    return {
        "max_abs": max_abs,
        "max_rel": max_abs / scale if scale > 0 else 0.0,
        "rel_l2": rel_l2,
        "score": max_abs / max(1.0, scale),
        "ref_max_abs": scale,
    }


def check_parity(
    tf: Any,
    model: Any,
    recorder: Recorder,
    plan: Plan,
    fn: Any,
    model_path: str,
    images: np.ndarray,
    with_grads: bool,
    tolerance: float,
) -> dict[str, Any]:
    """Compare onnxruntime (CPU) with Keras (predictions), TensorFlow (every output) and
    tf.GradientTape (gradients); ``passed`` when every output is within tolerance, or
    within the reference's own noise (:func:`reference_noise`) where that is larger."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # the file as written, unoptimised: onnxruntime's graph optimisations hold two more
    # copies of the weights (a 94 MB ResNet50 takes +282 MB at ORT_ENABLE_ALL, +101 MB
    # unoptimised); the engine's optimised runs are checked against Keras by the tests
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    n_cls = plan.num_classes
    targets = np.array([[-1, -2 if n_cls > 1 else -1, 0]] * len(images), np.int64)
    feeds: dict[str, np.ndarray] = {C.IN_IMAGE: images}
    if with_grads:
        feeds[C.IN_TARGETS] = targets
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, feeds), strict=True))
    ref_list = (
        fn(tf.constant(images), tf.constant(targets)) if with_grads else fn(tf.constant(images))
    )
    ref = dict(zip(output_names(plan, with_grads), [np.asarray(r) for r in ref_list], strict=True))
    result: dict[str, Any] = {"n_images": int(len(images)), "outputs": {}}
    cam_act = C.ACT_PREFIX + plan.cam_layer
    for name, value in ref.items():
        if name == C.OUT_TARGET_INDICES:
            agree = float(np.mean(value == got[name]))
            result["outputs"][name] = {
                "max_abs": 0.0 if agree == 1 else 1.0,
                "max_rel": 0.0,
                "score": 0.0 if agree == 1 else 1.0,
                "ref_max_abs": 0.0,
            }
            continue
        if name == C.OUT_GRADIENTS:
            result["outputs"][name] = gradient_diff(value, got[name], ref[cam_act], got[cam_act])
        else:
            result["outputs"][name] = _diff(value, got[name])
    keras_pred = np.asarray(model(tf.constant(images), training=False))
    if plan.binary_sigmoid:
        keras_pred = np.concatenate([1.0 - keras_pred, keras_pred], axis=1)
    result["outputs"]["predictions_vs_keras"] = _diff(keras_pred, got[C.OUT_PREDICTIONS])
    if with_grads:
        resolved = got[C.OUT_TARGET_INDICES]
        tape = tape_gradients(tf, model, recorder, plan, images, resolved)
        result["outputs"]["gradients_vs_gradienttape"] = gradient_diff(
            tape, got[C.OUT_GRADIENTS], ref[cam_act], got[cam_act]
        )
    outputs = result["outputs"]
    if any(v["score"] > tolerance for v in outputs.values()):
        noise = reference_noise(tf, fn, plan, images, targets, ref, with_grads)
        if noise.get(C.OUT_SCORES, 0.0) > tolerance:  # the ranks of noisy scores are noise
            noise[C.OUT_TARGET_INDICES] = 1.0
        aliases = {"predictions_vs_keras": C.OUT_PREDICTIONS}
        aliases["gradients_vs_gradienttape"] = C.OUT_GRADIENTS
        for name, v in outputs.items():
            v["reference_noise"] = noise.get(aliases.get(name, name), 0.0)
    allowed = {
        n: max(tolerance, NOISE_FACTOR * v.get("reference_noise", 0.0)) for n, v in outputs.items()
    }
    result["worst"] = max(v["score"] for v in outputs.values())
    result["passed"] = all(v["score"] <= allowed[n] for n, v in outputs.items())
    result["failed"] = sorted(n for n, v in outputs.items() if v["score"] > allowed[n])
    result["noisy"] = sorted(n for n, v in outputs.items() if v["score"] > tolerance)
    result["noise"] = max((v.get("reference_noise", 0.0) for v in outputs.values()), default=0.0)
    return result


NOISE_FACTOR = 10.0  # an output within 10x the reference's own noise agrees with it


def reference_noise(
    tf: Any,
    fn: Any,
    plan: Plan,
    images: np.ndarray,
    targets: np.ndarray,
    ref: dict[str, np.ndarray],
    with_grads: bool,
) -> dict[str, float]:
    """How much TensorFlow disagrees with itself, scored like the parity: every output
    of the same function computed image by image instead of as one batch, and on inputs
    moved by one part in a million (the larger of the two).  A model
    whose float32 rounding is amplified without bound (a very deep network with random
    or untrained weights: one pixel changed by 1e-3 moves its activations by 90 %)
    cannot be matched by any runtime more closely than this."""
    names = output_names(plan, with_grads)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(len(images)):
        x = tf.constant(images[i : i + 1])
        outs = fn(x, tf.constant(targets[i : i + 1])) if with_grads else fn(x)
        for n, o in zip(names, outs, strict=True):
            parts[n].append(np.asarray(o))
    single = {n: np.concatenate(v) for n, v in parts.items()}
    # and the inputs moved by one part in a million, about what float32 rounding does
    rng = np.random.default_rng(0)
    moved = images * (1 + 1e-6 * rng.choice([-1.0, 1.0], size=images.shape)).astype(np.float32)
    outs = fn(tf.constant(moved), tf.constant(targets)) if with_grads else fn(tf.constant(moved))
    nudged = {n: np.asarray(o) for n, o in zip(names, outs, strict=True)}
    noise_single = _noise(plan, names, ref, single)
    noise_nudged = _noise(plan, names, ref, nudged)
    return {n: max(noise_single[n], noise_nudged[n]) for n in names}


def _noise(
    plan: Plan, names: list[str], ref: dict[str, np.ndarray], other: dict[str, np.ndarray]
) -> dict[str, float]:
    """Each output of ``other`` against ``ref``, scored like the parity."""
    cam_act = C.ACT_PREFIX + plan.cam_layer
    noise = {}
    for n in names:
        if n == C.OUT_TARGET_INDICES:
            noise[n] = 0.0 if np.array_equal(ref[n], other[n]) else 1.0
        elif n == C.OUT_GRADIENTS:
            noise[n] = gradient_diff(ref[n], other[n], ref[cam_act], other[cam_act])["score"]
        else:
            noise[n] = _diff(ref[n], other[n])["score"]
    return noise


def tape_gradients(
    tf: Any,
    model: Any,
    recorder: Recorder,
    plan: Plan,
    images: np.ndarray,
    classes: np.ndarray,
) -> np.ndarray:
    """Reference d scores[class] / d A by tf.GradientTape through the real Keras layers."""
    x = tf.constant(images, dtype=tf.float32)
    # only what the CAM tensor feeds is recorded (not every weight the model reads),
    # and one forward pass serves every target
    with tf.GradientTape(watch_accessed_variables=False, persistent=True) as tape:
        held: dict[str, Any] = {}
        hook = functools.partial(_watch, tape, held)
        with recorder.recording(hooks={plan.cam_exposed: hook}) as trace:
            model(x, training=False)
        _, scores, _ = scores_from_trace(tf, plan, trace)
        selected = [
            tf.reduce_sum(scores * tf.one_hot(classes[:, t], scores.shape[-1]), axis=1)
            for t in range(classes.shape[1])
        ]
    result = [np.asarray(tape.gradient(sel, held["a"])) for sel in selected]
    del tape
    return np.stack(result, axis=1)


def _watch(tape: Any, held: dict[str, Any], out: Any) -> Any:
    tape.watch(out)
    held["a"] = out
    return out
