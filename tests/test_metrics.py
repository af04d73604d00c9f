"""Faithfulness metrics against direct reimplementations of the reference code (RISE's
``evaluation.py``, torch-cam's ``ClassificationMetric``, pytorch-grad-cam's ROAD),
written here loop by loop, on the bundled demo model and its photos; then properties
that a wrong metric fails on a synthetic model where only one region matters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convlens.engine import contract as C
from convlens.engine.cams import METHODS, normalize, upsample
from convlens.engine.graph import pruned
from convlens.engine.images import preprocess, read_image
from convlens.engine.imputation import NEIGHBOURS, linear_impute
from convlens.engine.metrics import (
    METRICS,
    ROAD,
    ROAD_PERCENTILES,
    AverageDrop,
    Deletion,
    Insertion,
    compute_all,
    gaussian_kernel,
    rise_auc,
    rise_blur,
    road_keep,
)
from convlens.pipeline import demo_paths

scipy = pytest.importorskip("scipy")
from scipy.ndimage import correlate, gaussian_filter  # noqa: E402
from scipy.sparse import csc_matrix, lil_matrix  # noqa: E402
from scipy.sparse.linalg import spsolve  # noqa: E402

# ---- the tiny model: the bundled demo, through onnxruntime ---------------------------


@pytest.fixture(scope="module")
def demo() -> dict:
    import onnxruntime as ort

    model, photos = demo_paths()
    spec = C.read_spec(model)
    names = ["predictions", "act/conv3", "cam_weights"]
    sess = ort.InferenceSession(pruned(model, names), providers=["CPUExecutionProvider"])
    files = sorted(Path(photos).glob("*/*"))[::4]  # the three classes
    x = np.stack([preprocess(read_image(f), spec.input, spec.preprocess) for f in files])
    probs, acts, w = sess.run(names, {"image": x})
    top = probs.argmax(axis=1)
    cams = normalize(METHODS["cam"].compute(acts, weights=w, classes=top[:, None])[:, 0])
    h, wd = x.shape[1:3]
    maps = np.stack([upsample(m, (h, wd)) for m in cams])

    def predict(batch: np.ndarray) -> np.ndarray:
        return sess.run(["predictions"], {"image": np.ascontiguousarray(batch, np.float32)})[0]

    return {"x": x, "maps": maps, "classes": top, "predict": predict}


# ---- references, loop by loop ---------------------------------------------------------


def ref_gkern(klen: int, nsig: float) -> np.ndarray:
    """RISE's gkern: gaussian_filter of a Dirac."""
    inp = np.zeros((klen, klen))
    inp[klen // 2, klen // 2] = 1
    return gaussian_filter(inp, nsig)


def ref_blur(img: np.ndarray, klen: int = 11, nsig: float = 5) -> np.ndarray:
    """conv2d(x, kern, padding=klen // 2), one (H, W, C) image, zero padding."""
    k = ref_gkern(klen, nsig)
    return np.stack(
        [
            correlate(img[..., ch].astype(np.float64), k, mode="constant")
            for ch in range(img.shape[-1])
        ],
        axis=-1,
    )


def ref_causal(predict, img, explanation, c, mode: str, step: int) -> np.ndarray:
    """RISE's CausalMetric.single_run, one image at a time (HWC instead of CHW)."""
    h, w, ch = img.shape
    hw = h * w
    n_steps = (hw + step - 1) // step
    if mode == "del":
        start, finish = img.copy(), np.zeros_like(img)
    else:
        start, finish = ref_blur(img).astype(np.float32), img.copy()
    scores = np.empty(n_steps + 1)
    salient_order = np.flip(np.argsort(explanation.reshape(-1, hw), axis=1), axis=-1)
    for i in range(n_steps + 1):
        scores[i] = predict(start[None])[0, c]
        if i < n_steps:
            coords = salient_order[:, step * i : step * (i + 1)]
            start.reshape(1, hw, ch)[0, coords, :] = finish.reshape(1, hw, ch)[0, coords, :]
    return scores


def ref_auc(arr: np.ndarray) -> float:
    return float((arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1))


def ref_classification_metric(predict, imgs, cams, classes):
    """torch-cam ClassificationMetric.update, per image."""
    drops, incs = [], []
    for img, cam, c in zip(imgs, cams, classes, strict=True):
        prob = float(predict(img[None])[0, c])
        masked = float(predict((cam[..., None] * img)[None])[0, c])
        drops.append(max(prob - masked, 0.0) / (prob + 1e-7))
        incs.append(1.0 if prob < masked else 0.0)
    return np.array(drops), np.array(incs)


def ref_impute(img_chw: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam NoisyLinearImputer with noise 0: setup_sparse_system + spsolve."""
    h, w = mask.shape
    maskflt = mask.flatten()
    imgflat = img_chw.reshape(img_chw.shape[0], -1).astype(np.float64)
    indices = np.argwhere(maskflt == 0).flatten()
    coords_to_vidx = np.zeros(len(maskflt), dtype=int)
    coords_to_vidx[indices] = np.arange(len(indices))
    n_eq = len(indices)
    a = lil_matrix((n_eq, n_eq))
    b = np.zeros((n_eq, img_chw.shape[0]))
    sum_neighbors = np.ones(n_eq)
    for dy, dx, weight in NEIGHBOURS:
        cord1 = indices % w + dx
        cord0 = indices // w + dy
        valid = ~((cord0 < 0) | (cord1 < 0) | (cord0 >= h) | (cord1 >= w))
        new_coords = indices + dy * w + dx
        valid_coords = new_coords[valid]
        valid_ids = np.argwhere(valid).flatten()
        has = maskflt[valid_coords] > 0.5
        b[valid_ids[has], :] -= weight * imgflat[:, valid_coords[has]].T
        a[valid_ids[~has], coords_to_vidx[valid_coords[~has]]] = weight
        sum_neighbors[np.argwhere(~valid).flatten()] -= weight
    a[np.arange(n_eq), np.arange(n_eq)] = -sum_neighbors
    res = spsolve(csc_matrix(a), b).reshape(n_eq, -1)
    out = imgflat.copy()
    out[:, indices] = res.T
    return out.reshape(img_chw.shape)


def ref_road(predict, imgs, cams, classes, percentiles=(10, 20, 30, 40, 50, 60, 70, 80, 90)):
    """ROADMostRelevantFirstAverage, ROADLeastRelevantFirstAverage, ROADCombined with
    noise 0 and the softmax target, image by image, percentile by percentile."""
    morf, lerf = [], []
    for img, cam, c in zip(imgs, cams, classes, strict=True):
        base = float(predict(img[None])[0, c])
        per = {True: [], False: []}
        for most in (True, False):
            mask = cam if most else 1 - cam
            for p in percentiles:
                threshold = np.percentile(mask, p)
                binary = np.float32(mask < threshold)
                filled = ref_impute(img.transpose(2, 0, 1), binary).transpose(1, 2, 0)
                per[most].append(float(predict(filled[None].astype(np.float32))[0, c]) - base)
        morf.append(np.mean(np.float32(per[True])))
        lerf.append(np.mean(np.float32(per[False])))
    morf_a, lerf_a = np.array(morf), np.array(lerf)
    return morf_a, lerf_a, (lerf_a - morf_a) / 2


# ---- against the references ------------------------------------------------------------


def test_gaussian_kernel_is_risés_gkern():
    for klen, sig in ((11, 5), (5, 5), (7, 1.5)):
        np.testing.assert_allclose(gaussian_kernel(klen, sig), ref_gkern(klen, sig), atol=1e-12)


def test_blur_is_risés_zero_padded_conv(demo):
    got = rise_blur(demo["x"])
    for i, img in enumerate(demo["x"]):
        np.testing.assert_allclose(got[i], ref_blur(img), atol=1e-5)


@pytest.mark.parametrize("metric, mode", [(Deletion(), "del"), (Insertion(), "ins")])
def test_deletion_insertion_match_rise(demo, metric, mode):
    x, maps, classes, predict = demo["x"], demo["maps"], demo["classes"], demo["predict"]
    res = metric.compute(x, maps, classes, predict, chunk=50)
    step = x.shape[2]
    for i in range(len(x)):
        want = ref_causal(predict, x[i], maps[i], classes[i], mode, step)
        np.testing.assert_allclose(res.curves[metric.name][i], want, atol=2e-5)
        assert res.scores[metric.name][i] == pytest.approx(ref_auc(want), abs=2e-5)
    # a step that does not divide H*W: the last step moves what is left
    odd = type(metric)(step=500).compute(x[:1], maps[:1], classes[:1], predict)
    want = ref_causal(predict, x[0], maps[0], classes[0], mode, 500)
    np.testing.assert_allclose(odd.curves[metric.name][0], want, atol=2e-5)


def test_average_drop_increase_match_torchcam(demo):
    x, maps, classes, predict = demo["x"], demo["maps"], demo["classes"], demo["predict"]
    rng = np.random.default_rng(3)
    # the demo model saturates on images masked by its raw CAMs (every drop 0 or 1):
    # milder masks too, which give drops in between and some increases; and a map
    # outside [0, 1] with a NaN, which torch-cam zeroes (NaN) and we clip
    wild = 0.7 + 0.6 * maps  # up to 1.3
    wild[0, 0, 0] = np.nan
    variants = {
        "cam": maps,
        "mild cam": 0.8 + 0.2 * maps,
        "mild random": (0.9 + 0.1 * rng.random(maps.shape)).astype(np.float32),
        "wild": wild.astype(np.float32),
    }
    between = 0
    for what, m in variants.items():
        res = AverageDrop().compute(x, m, classes, predict)
        ref_map = np.clip(np.nan_to_num(m, nan=0.0), 0, 1)
        drop, inc = ref_classification_metric(predict, x, ref_map, classes)
        np.testing.assert_allclose(res.scores["avg_drop"], drop, atol=1e-5, err_msg=what)
        np.testing.assert_array_equal(res.scores["increase"], inc, err_msg=what)
        between += int(((drop > 0.01) & (drop < 0.99)).sum() + inc.sum())
    assert between >= 4  # the comparison is not only between saturated values


@pytest.mark.parametrize("solver", ["auto", "cg"])
def test_imputation_matches_spsolve(demo, solver):
    x, maps = demo["x"], demo["maps"]
    keeps = np.stack([maps[i] < np.percentile(maps[i], p) for i, p in enumerate((10, 40, 70, 90))])
    keeps[0] = 1 - maps[0] < np.percentile(1 - maps[0], 30)
    keeps[1] = False  # none kept: singular, any constant solves it: the image's mean
    keeps[2] = True  # nothing to impute
    got = linear_impute(x, keeps, solver=solver)
    np.testing.assert_allclose(
        got[1], np.broadcast_to(x[1].mean(axis=(0, 1)), x[1].shape), atol=1e-6
    )
    np.testing.assert_array_equal(got[2], x[2])
    for i in (0, 3):
        want = ref_impute(x[i].transpose(2, 0, 1), keeps[i].astype(np.float32))
        np.testing.assert_allclose(got[i], want.transpose(1, 2, 0), atol=1e-5)


def test_road_keep_matches_reference_with_ties(demo):
    """Real CAMs are 0 over whole regions: the strict ``<`` decides what is kept."""
    maps = demo["maps"]
    assert (maps == 0).mean() > 0.1
    for p in ROAD_PERCENTILES:
        for most in (True, False):
            got = road_keep(maps, p, most)
            for i, cam in enumerate(maps):
                mask = cam if most else 1 - cam
                np.testing.assert_array_equal(got[i], mask < np.percentile(mask, p))


def test_road_matches_pytorch_grad_cam(demo):
    x, classes, predict = demo["x"][:2], demo["classes"][:2], demo["predict"]
    # ties broken (CAMs are 0 over whole regions; with ties MoRF's low percentiles keep
    # no pixel and the reference's spsolve is singular)
    rng = np.random.default_rng(5)
    maps = (demo["maps"][:2] + 1e-3 * rng.random(demo["maps"][:2].shape)).astype(np.float32)
    res = ROAD(noise=0.0).compute(x, maps, classes, predict)
    morf, lerf, comb = ref_road(predict, x, maps, classes)
    np.testing.assert_allclose(res.scores["road_morf"], morf, atol=1e-5)
    np.testing.assert_allclose(res.scores["road_lerf"], lerf, atol=1e-5)
    np.testing.assert_allclose(res.scores["road"], comb, atol=1e-5)
    # with the reference's noise: seeded (repeatable), close to the noise-free value
    a = ROAD(seed=1).compute(x, maps, classes, predict).scores["road"]
    b = ROAD(seed=1).compute(x, maps, classes, predict).scores["road"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, comb, atol=0.05)


# ---- properties on a synthetic model ----------------------------------------------------

H = W = 16
REGION = (slice(4, 8), slice(9, 13))


def region_model(x: np.ndarray) -> np.ndarray:
    """Two classes; class 1's logit is the brightness of REGION only."""
    z = 12.0 * (x[:, REGION[0], REGION[1], :].mean(axis=(1, 2, 3)) - 0.4)
    p = 1.0 / (1.0 + np.exp(-z))
    return np.stack([1 - p, p], axis=1)


def texture_model(x: np.ndarray) -> np.ndarray:
    """Two classes; class 1's logit is the texture (horizontal differences) of REGION:
    ROAD's imputation is smooth, so it removes texture but keeps brightness."""
    r = x[:, REGION[0], REGION[1], :]
    z = 40.0 * (np.abs(np.diff(r, axis=2)).mean(axis=(1, 2, 3)) - 0.1)
    p = 1.0 / (1.0 + np.exp(-z))
    return np.stack([1 - p, p], axis=1)


@pytest.fixture
def synthetic():
    rng = np.random.default_rng(11)
    x = (0.5 + 0.5 * rng.random((6, H, W, 1))).astype(np.float32)
    perfect = np.zeros((6, H, W), np.float32)
    perfect[:, REGION[0], REGION[1]] = 1.0
    perfect += 1e-3 * rng.random(perfect.shape).astype(np.float32)  # no ties
    random = rng.random((6, H, W)).astype(np.float32)
    inverse = 1 - perfect
    return x, np.ones(6, np.int64), perfect, random, inverse


def test_perfect_map_beats_random_and_inverse(synthetic):
    x, c, perfect, random, inverse = synthetic

    def score(name, key, maps):
        return METRICS[name].compute(x, maps, c, region_model).scores[key].mean()

    assert score("deletion", "deletion", perfect) < score("deletion", "deletion", random)
    assert score("deletion", "deletion", random) < score("deletion", "deletion", inverse)
    assert score("insertion", "insertion", perfect) > score("insertion", "insertion", random)
    assert score("insertion", "insertion", random) > score("insertion", "insertion", inverse)
    assert score("avgdrop", "avg_drop", perfect) < 0.02
    assert score("avgdrop", "avg_drop", inverse) > 0.3

    def road(key, maps):
        return METRICS["road"].compute(x, maps, c, texture_model).scores[key].mean()

    assert road("road", perfect) > road("road", random) > road("road", inverse)
    assert road("road_morf", perfect) < road("road_morf", random) < road("road_morf", inverse)
    assert road("road_lerf", perfect) > road("road_lerf", inverse)


def test_curve_endpoints_and_auc(synthetic):
    x, c, perfect, _, _ = synthetic
    base = region_model(x)[:, 1]
    d = Deletion().compute(x, perfect, c, region_model)
    curve = d.curves["deletion"]
    assert curve.shape == (6, H + 1)  # step = W pixels: H steps, H + 1 points
    np.testing.assert_allclose(curve[:, 0], base, rtol=1e-6)
    np.testing.assert_allclose(curve[:, -1], region_model(np.zeros_like(x))[:, 1], rtol=1e-6)
    ins = Insertion().compute(x, perfect, c, region_model).curves["insertion"]
    np.testing.assert_allclose(ins[:, 0], region_model(rise_blur(x))[:, 1], rtol=1e-6)
    np.testing.assert_allclose(ins[:, -1], base, rtol=1e-6)
    assert rise_auc(np.full(5, 0.3)) == pytest.approx(0.3)
    assert rise_auc(np.array([0.0, 1.0])) == pytest.approx(0.5)


def test_batched_like_unbatched_and_calls_are_large(synthetic):
    x, c, perfect, random, _ = synthetic
    calls: list[int] = []

    def counting(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return region_model(batch)

    big = compute_all(tuple(METRICS), x, random, c, counting)
    # one call per metric: base probabilities once, deletion and insertion 6 x 17 curve
    # points each, the 6 masked images, ROAD's 6 x 2 x 9 imputed images
    assert calls == [6, 102, 102, 6, 108]
    small = compute_all(tuple(METRICS), x, random, c, region_model, chunk=7)
    for k, v in big.scores.items():
        np.testing.assert_allclose(small.scores[k], v, atol=1e-6, err_msg=k)
    one = compute_all(tuple(METRICS), x[2:3], random[2:3], c[2:3], region_model)
    for k, v in big.scores.items():
        np.testing.assert_allclose(one.scores[k], v[2:3], atol=1e-6, err_msg=k)


def test_constant_map_and_bad_shapes(synthetic):
    x, c, _, _, _ = synthetic
    flat = np.zeros((6, H, W), np.float32)  # every MoRF percentile removes every pixel
    res = ROAD().compute(x, flat, c, region_model)
    assert all(np.isfinite(v).all() for v in res.scores.values())
    with pytest.raises(ValueError):
        Deletion().compute(x, flat[:, :-1], c, region_model)
    with pytest.raises(ValueError):
        AverageDrop().compute(x, flat, c[:-1], region_model)


# ---- wired into the run (--metrics) -------------------------------------------------------


def test_run_scores_a_seeded_sample_into_records_and_run_json(tmp_path):
    from convlens.engine.outdir import CURVE_POINTS, read_results, read_run_json
    from convlens.engine.run import RunOptions, metric_sample, run

    model, photos = demo_paths()
    files = [str(f) for f in sorted(Path(photos).glob("*/*"))[:5]]
    opts = RunOptions(
        device="cpu",
        batch_size=3,
        cam_methods=["cam", "gradcam"],
        metrics=["deletion", "avgdrop"],
        metrics_sample=2,
    )
    run(model, files, tmp_path / "a", opts)
    recs = read_results(tmp_path / "a").records
    scored = [r for r in recs if r.metrics]
    assert {r.id for r in scored} == metric_sample([r.id for r in recs], 2)
    assert len(scored) == 2
    for r in scored:
        assert set(r.metrics) == {"cam", "gradcam"}
        assert set(r.metrics["cam"]) == {"deletion", "avg_drop", "increase"}
        assert len(r.metric_curves["cam"]["deletion"]) == CURVE_POINTS
    doc = read_run_json(tmp_path / "a")
    assert doc is not None and doc.summary is not None
    summ = doc.summary["metrics"]
    assert summ["cam"]["n"] == 2
    want = np.mean([r.metrics["cam"]["deletion"] for r in scored])
    assert summ["cam"]["deletion"] == pytest.approx(want, abs=1e-6)
    assert len(summ["gradcam"]["curves"]["deletion"]) == CURVE_POINTS
    assert doc.settings["metrics"] == ["deletion", "avgdrop"]

    # the same scores as the library on the images decoded alone (batching, sampling
    # and the engine's map preparation change nothing)
    spec = C.read_spec(model)
    x = np.stack([preprocess(read_image(r.path), spec.input, spec.preprocess) for r in scored])
    import onnxruntime as ort

    names = ["predictions", "act/conv3", "cam_weights"]
    sess = ort.InferenceSession(pruned(model, names), providers=["CPUExecutionProvider"])
    probs, acts, w = sess.run(names, {"image": x})
    top = np.array([r.cam_classes[0] for r in scored])
    cams = normalize(METHODS["cam"].compute(acts, weights=w, classes=top[:, None])[:, 0])
    maps = np.stack([upsample(m, x.shape[1:3]) for m in cams])

    def predict(b):
        return sess.run(["predictions"], {"image": b.astype(np.float32)})[0]

    lib = compute_all(("deletion", "avgdrop"), x, maps, top, predict)
    for j, r in enumerate(scored):
        assert r.metrics["cam"]["deletion"] == pytest.approx(lib.scores["deletion"][j], abs=1e-5)
        assert r.metrics["cam"]["avg_drop"] == pytest.approx(lib.scores["avg_drop"][j], abs=1e-5)

    # resumed: nothing recomputed, the summary still there
    s = run(model, files, tmp_path / "a", opts)
    assert s.processed == 0 and s.metrics["cam"]["n"] == 2

    # without --metrics: no metric fields, the fingerprint as before
    run(model, files[:1], tmp_path / "b", RunOptions(device="cpu", cam_methods=["cam"]))
    line = (tmp_path / "b" / "results.jsonl").read_text()
    assert "metric" not in line
    doc_b = read_run_json(tmp_path / "b")
    assert doc_b is not None and doc_b.fingerprint is not None
    assert "metrics" not in doc_b.fingerprint and "metrics" not in doc_b.summary


def test_metric_options_are_validated():
    from convlens.engine.plan import RunError, RunOptions, RunPlan

    model, _ = demo_paths()
    assert RunPlan.build(model, RunOptions(metrics=["all"])).metrics == tuple(METRICS)
    assert RunPlan.build(model, RunOptions(metrics=["road", "deletion"])).metrics == (
        "deletion",
        "road",
    )
    with pytest.raises(RunError, match="unknown metric"):
        RunPlan.build(model, RunOptions(metrics=["auc"]))
    with pytest.raises(RunError, match="needs --metrics"):
        RunPlan.build(model, RunOptions(metrics_sample=3))


def test_cam_beats_random_inverse_and_image_blind_maps_on_the_mixed_photos():
    """The sanity check that can fail: on the demo model's mixed photos (two textures side
    by side), for each of the two classes a photo shows, the real CAM must score a higher
    insertion AUC than a seeded random map, its own inverse, and a map that ignores the
    image (a centred Gaussian, the same for every photo).

    Deletion cannot separate maps on this model: RISE's deletion canvas is black, and the
    demo model calls a black image grass, so every grass curve stays near 1 and every
    other class's falls to 0 at the first step, whatever the order.  There the CAM must
    merely not be worse than its inverse."""
    import onnxruntime as ort

    model, photos = demo_paths()
    spec = C.read_spec(model)
    names = ["predictions", "act/conv3", "cam_weights"]
    sess = ort.InferenceSession(pruned(model, names), providers=["CPUExecutionProvider"])
    files = sorted((Path(photos) / "mixed").glob("*.jpg"))
    assert len(files) == 3
    x = np.stack([preprocess(read_image(f), spec.input, spec.preprocess) for f in files])
    _, acts, w = sess.run(names, {"image": x})
    pairs = [
        (i, spec.class_names.index(part))
        for i, f in enumerate(files)
        for part in f.stem.split("_")
        if part in spec.class_names
    ]
    rows = np.array([i for i, _ in pairs])
    classes = np.array([c for _, c in pairs])
    assert len(pairs) == 6  # both textures of every photo
    raw = METHODS["cam"].compute(acts[rows], weights=w, classes=classes[:, None])[:, 0]
    h, wd = x.shape[1:3]
    cam = np.stack([upsample(m, (h, wd)) for m in normalize(raw)])
    yy, xx = np.mgrid[0:h, 0:wd]
    blob = np.exp(-((yy - h / 2) ** 2 + (xx - wd / 2) ** 2) / (2 * (h / 4) ** 2))
    maps = {
        "cam": cam,
        "random": np.random.default_rng(0).random(cam.shape, dtype=np.float32),
        "inverse": 1 - cam,
        "image-blind": np.broadcast_to(blob.astype(np.float32), cam.shape).copy(),
    }

    def predict(batch: np.ndarray) -> np.ndarray:
        return sess.run(["predictions"], {"image": np.ascontiguousarray(batch, np.float32)})[0]

    xs = x[rows]
    ins = {
        k: Insertion().compute(xs, m, classes, predict).scores["insertion"].mean()
        for k, m in maps.items()
    }
    dele = {
        k: Deletion().compute(xs, m, classes, predict).scores["deletion"].mean()
        for k, m in maps.items()
    }
    for other in ("random", "inverse", "image-blind"):
        assert ins["cam"] > ins[other] + 0.1, ins
    assert dele["cam"] <= dele["inverse"], dele
