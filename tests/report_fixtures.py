"""A fake OUTDIR for report development and tests, written WITHOUT the engine.

This is a stand-in until the report tests can run a real ``convlens run``: it writes
real photos (``skimage.data``, no downloads) as JPEG inputs, results.jsonl records per
OUTDIR.md, run.json with a real :class:`ModelSpec` (``dataclasses.asdict``), stats.json
and class_cams.npz, and drives :class:`ReportAssetSink` with :class:`ImageOutcome`
objects whose maps and activations are derived deterministically from each image
(gradient magnitudes at feature resolution), not from a network.

Hostile names on purpose: one input is literally named ``<img src=x onerror=alert(1)>.jpg``,
one class name contains ``<b>&"'``, and failed inputs carry markup in their names/errors.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from skimage import data as skdata

from convlens.engine.contract import (
    FORMAT_VERSION,
    HeadSpec,
    InputSpec,
    ModelSpec,
    OutputSpec,
    Preprocess,
)
from convlens.engine.metrics import METRICS as METRICS_REGISTRY
from convlens.engine.outdir import CURVE_POINTS, Record, ResultsLog
from convlens.engine.run import metric_summary
from convlens.engine.rundir import RunDir
from convlens.engine.sinks import ImageOutcome
from convlens.reports import ReportAssetSink

XSS_NAME = "<img src=x onerror=alert(1)>.jpg"
ODD_CLASS = "odd <b>&\"' class"
CLASS_NAMES = ["tabby cat", "coffee mug", "astronaut", "rocket", "cameraman", ODD_CLASS]
#: (skimage.data loader, folder under the input dir) per class
PHOTOS = [
    ("chelsea", "cat"),
    ("coffee", "coffee"),
    ("astronaut", "astronaut"),
    ("rocket", "rocket"),
    ("camera", "camera"),
    ("immunohistochemistry", "odd"),
]
LAYERS = [("conv1", 56, 16), ("conv2", 28, 32), ("conv3", 14, 64), ("conv4", 7, 128)]
CAM_LAYER = "conv4"
METHODS = ["cam", "gradcam", "eigencam"]  # eigencam: class-agnostic, one map for every class
TOP_K = 5
CAM_CLASSES = 3
FAILED_NAMES = ["broken_0.jpg", "<svg onload=alert(2)>.png", 'truncated "quote".jpg']


def _diff(max_abs: float, ref: float, **more: float) -> dict[str, float]:
    return {
        "max_abs": max_abs,
        "max_rel": max_abs / ref,
        "score": max_abs / max(1.0, ref),
        "ref_max_abs": ref,
        **more,
    }


#: exporter/parity.py's figures, as the metadata carries them: one output within the
#: tolerance only through TensorFlow's own noise, one output name with markup
PARITY: dict[str, Any] = {
    "n_images": 8,
    "source": "calibration:8 images",
    "tolerance": 1e-3,
    "outputs": {
        "predictions": _diff(3.1e-07, 0.998),
        "predictions_vs_keras": _diff(2.9e-07, 0.998),
        "scores": _diff(4.2e-06, 17.5),
        "act/conv4": _diff(2.4e-05, 9.7),
        "cam_gradients": _diff(0.0021, 1.4, reference_noise=4e-4),
        "act/<b>conv</b>": _diff(1.5e-06, 3.0),
    },
    "worst": 0.0015,
    "passed": True,
    "failed": [],
    "noisy": ["cam_gradients"],
    "noise": 4e-4,
}


@dataclass
class FakeRun:
    outdir: Path
    input_dir: Path
    spec: ModelSpec
    records: list[dict[str, Any]]
    sink: ReportAssetSink
    grid_ids: list[str] = field(default_factory=list)  # ids the sample policy must cover

    @property
    def ok_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] == "ok"]

    def record_named(self, name: str) -> dict[str, Any]:
        return next(r for r in self.records if Path(r["path"]).name == name)


def _photo(name: str) -> np.ndarray:
    img = getattr(skdata, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = np.ascontiguousarray(img[:, :, :3])
    h, w = img.shape[:2]
    s = 360 / max(h, w)
    if s < 1:
        img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    return img


def _variant(img: np.ndarray, i: int) -> np.ndarray:
    """A deterministic crop/flip of a photo so that inputs differ."""
    rng = np.random.default_rng(1000 + i)
    h, w = img.shape[:2]
    f = rng.uniform(0.65, 1.0)
    ch, cw = max(16, int(h * f)), max(16, int(w * f))
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    out = img[y : y + ch, x : x + cw]
    if i % 2:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _spec(num_classes: int) -> ModelSpec:
    outputs = [
        OutputSpec("predictions", "predictions", ["N", num_classes]),
        OutputSpec("scores", "scores", ["N", num_classes]),
    ]
    outputs += [
        OutputSpec(f"act/{name}", "activation", ["N", s, s, k], layer=name) for name, s, k in LAYERS
    ]
    k_cam = LAYERS[-1][2]
    outputs += [
        OutputSpec("cam_weights", "cam_weights", [k_cam, num_classes], layer="predictions"),
        OutputSpec("cam_bias", "cam_bias", [num_classes], layer="predictions"),
        OutputSpec("cam_gradients", "gradients", ["N", "T", 7, 7, k_cam], layer=CAM_LAYER),
        OutputSpec("target_indices", "target_indices", ["N", "T"]),
    ]
    return ModelSpec(
        format_version=FORMAT_VERSION,
        class_names=list(CLASS_NAMES[:num_classes]),
        input=InputSpec(name="image", height=112, width=112, channels=3),
        preprocess=Preprocess.parse("imagenet"),
        outputs=outputs,
        cam_layer=CAM_LAYER,
        head=HeadSpec(
            kind="gap_dense",
            activation="softmax",
            cam_available=True,
            gradients_available=True,
            layers=["global_average_pooling2d", "predictions"],
        ),
        parity=PARITY,
        source={
            "keras_file": "fake_cnn.keras",
            "name": "fake <i>CNN</i> (report fixture, not a real model)",
            "keras_version": "3.x",
        },
    )


def _gray(img: np.ndarray, side: int) -> np.ndarray:
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    return cv2.resize(g, (side, side), interpolation=cv2.INTER_AREA)


def _activations(img: np.ndarray) -> dict[str, np.ndarray]:
    """Oriented gradient responses: channel c of a k-channel layer is relu(gradient
    along angle pi*c/k + a brightness term); every 13th channel is dead."""
    acts = {}
    for name, s, k in LAYERS:
        g = _gray(img, s)
        gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
        theta = np.pi * np.arange(k, dtype=np.float32) / k
        bias = np.linspace(-0.3, 0.3, k, dtype=np.float32)
        a = gx[..., None] * np.cos(theta) + gy[..., None] * np.sin(theta)
        a += (g[..., None] - 0.5) * bias
        a = np.maximum(a, 0.0).astype(np.float32)
        a[:, :, 5::13] = 0.0
        acts[name] = a
    return acts


def _maps(img: np.ndarray, classes: list[int]) -> dict[tuple[str, int], np.ndarray]:
    """CAM stand-ins at 7x7: blurred gradient magnitude times a class-dependent blob."""
    g = _gray(img, 112)
    mag = cv2.GaussianBlur(
        cv2.magnitude(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1)), (0, 0), 6
    )
    base = cv2.resize(mag, (7, 7), interpolation=cv2.INTER_AREA)
    yy, xx = np.mgrid[0:7, 0:7].astype(np.float32)
    out = {}
    for rank, c in enumerate(classes):
        cy, cx = 3 + 2 * math.sin(c * 1.7), 3 + 2 * math.cos(c * 1.3)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
        cam = (base * (0.4 + blob) / (1 + rank)).astype(np.float32)
        out[("cam", c)] = cam
        out[("gradcam", c)] = np.maximum(cam - cam.mean() * 0.5, 0).astype(np.float32) ** 1.5
        out[("eigencam", c)] = base  # as the engine writes it: the same map for each class
    return out


def _fake_metrics(i: int) -> dict[str, Any]:
    """Made-up faithfulness scores and curves of image ``i`` for every METHODS entry (a
    record's ``metrics`` and ``metric_curves``): method m's deletion curve falls, its
    insertion curve rises, at rates that depend on m and i."""
    scores: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    x = np.linspace(0.0, 1.0, CURVE_POINTS)
    for j, m in enumerate(METHODS):
        rate = 3.0 + 2.0 * j + (i % 5)
        dele = 0.9 * np.exp(-rate * x) + 0.05
        ins = 0.9 - 0.6 * np.exp(-(rate + 1.0) * x)
        morf = -0.1 * (1 + j) - 0.01 * (i % 3)
        lerf = -0.05 + 0.01 * j
        scores[m] = {
            "deletion": round(float(np.trapezoid(dele, x)), 6),
            "insertion": round(float(np.trapezoid(ins, x)), 6),
            "avg_drop": round(0.2 + 0.1 * j + 0.01 * (i % 4), 6),
            "increase": float((i + j) % 2),
            "road_morf": round(morf, 6),
            "road_lerf": round(lerf, 6),
            "road": round((lerf - morf) / 2, 6),
        }
        curves[m] = {
            "deletion": [round(float(v), 5) for v in dele],
            "insertion": [round(float(v), 5) for v in ins],
        }
    return {"metrics": scores, "metric_curves": curves}


def _predict(true: int, i: int, n_classes: int) -> np.ndarray:
    rng = np.random.default_rng(7 + i)
    logits = rng.normal(0.0, 1.0, n_classes)
    r = i % 10
    if r in (3, 7):  # wrong, confidently
        logits[(true + 1 + i % (n_classes - 1)) % n_classes] += 4.0
    elif r == 5:  # right but unsure
        logits[true] += 0.6
    else:
        logits[true] += 3.0 + rng.uniform(0, 2)
    e = np.exp(logits - logits.max())
    p: np.ndarray = e / e.sum()
    return p


def make_fake_run(
    outdir: Path,
    n_images: int = 24,
    *,
    input_dir: Path | None = None,
    grids: str = "sample",
    grid_sample: int = 6,
    n_failed: int = 2,
    batch_size: int = 16,
    num_classes: int = len(CLASS_NAMES),
    metrics: bool = False,
) -> FakeRun:
    """Write a realistic OUTDIR with ``n_images`` ok inputs and ``n_failed`` failed ones.

    Every 10th image (i % 10 == 9) has no label (an "unsorted" folder); i % 10 in (3, 7)
    are misclassified, i % 10 == 5 has low confidence.  Image 1 is the XSS-named file.
    ``metrics``: as ``--metrics all --metrics-sample``: every other ok image gets
    faithfulness scores and curves (:func:`_fake_metrics`, made up, not computed), and
    run.json their means through the engine's own ``metric_summary``.
    """
    outdir = Path(outdir)
    input_dir = (
        Path(input_dir) if input_dir is not None else outdir.parent / (outdir.name + "-inputs")
    )
    outdir.mkdir(parents=True, exist_ok=True)
    input_dir.mkdir(parents=True, exist_ok=True)
    n_classes = min(num_classes, len(CLASS_NAMES))
    spec = _spec(n_classes)
    photos = [_photo(name) for name, _ in PHOTOS[:n_classes]]

    # ---- the inputs ----------------------------------------------------------------
    inputs: list[tuple[Path, int | None, int]] = []  # (path, label, i)
    for i in range(n_images):
        cls = i % n_classes
        labelled = i % 10 != 9
        folder = PHOTOS[cls][1] if labelled else "unsorted"
        name = XSS_NAME if i == 1 else f"img_{i:04d}.jpg"
        path = input_dir / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img = _variant(photos[cls], i)
        cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        inputs.append((path, cls if labelled else None, i))
    for j in range(n_failed):
        path = input_dir / "broken" / FAILED_NAMES[j % len(FAILED_NAMES)]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"this is not an image " * (j + 1))
        inputs.append((path, None, -1 - j))
    inputs.sort(key=lambda t: str(t[0]))

    # ---- run ---------------------------------------------------------------------------
    sink = ReportAssetSink(grids=grids, grid_sample=grid_sample, thumb_size=256)
    settings = {
        "model": str(outdir.parent / "fake_cnn.onnx"),
        "inputs": [str(input_dir)],
        "batch_size": batch_size,
        "top_k": TOP_K,
        "cam_methods": METHODS,
        "grids": grids,
        "grid_sample": grid_sample,
    }
    if metrics:
        settings.update(metrics=list(METRICS_REGISTRY), metrics_sample=(n_images + 1) // 2)
    sink.open(outdir, spec, settings)
    stats: dict[str, dict[str, Any]] = {
        name: {
            "sum_mean": np.zeros(k),
            "max": np.zeros(k),
            "zero": np.zeros(k),
            "fired": np.zeros(k, bool),
            "shape": [s, s, k],
        }
        for name, s, k in LAYERS
    }
    cam_sum = np.zeros((n_classes, 7, 7))
    cam_count = np.zeros(n_classes, dtype=np.int64)
    records: list[dict[str, Any]] = []
    grid_ids: list[str] = []
    n_ok_seen = 0
    batch: list[ImageOutcome] = []
    log = ResultsLog(outdir)  # the engine's own writer, as the report's reader expects
    try:
        for path, label, i in inputs:
            abspath = str(path.resolve())
            rid = hashlib.sha1(abspath.encode("utf-8")).hexdigest()[:16]
            rec: dict[str, Any] = {
                "id": rid,
                "path": abspath,
                "relpath": str(path.relative_to(input_dir)),
            }
            bgr = cv2.imread(abspath, cv2.IMREAD_COLOR)
            if bgr is None:
                rec.update(
                    status="error",
                    error=f"cannot decode {path.name!r}: not a JPEG, PNG, BMP, TIFF or WebP image",
                    width=None,
                    height=None,
                )
                outcome = ImageOutcome(record=Record.from_json(rec))
            else:
                img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                true = label if label is not None else i % n_classes
                probs = _predict(true, i, n_classes)
                order = [int(c) for c in np.argsort(-probs, kind="stable")[: min(TOP_K, n_classes)]]
                cam_classes = order[:CAM_CLASSES]
                rec.update(
                    status="ok",
                    error=None,
                    width=int(img.shape[1]),
                    height=int(img.shape[0]),
                    predictions=[
                        {"index": c, "name": CLASS_NAMES[c], "prob": round(float(probs[c]), 6)}
                        for c in order
                    ],
                    label=None if label is None else CLASS_NAMES[label],
                    label_index=label,
                    maps=None,
                    cam_classes=cam_classes,
                    cam_methods=METHODS,
                )
                if metrics and i % 2 == 0:
                    rec.update(_fake_metrics(i))
                acts = _activations(img)
                maps = _maps(img, cam_classes)
                for name, a in acts.items():
                    st = stats[name]
                    st["sum_mean"] += a.mean(axis=(0, 1))
                    st["max"] = np.maximum(st["max"], a.max(axis=(0, 1)))
                    st["zero"] += (a == 0).mean(axis=(0, 1))
                    st["fired"] |= a.max(axis=(0, 1)) > 0
                top = order[0]
                first = maps[(METHODS[0], top)]
                rng_ = first.max() - first.min()
                cam_sum[top] += (first - first.min()) / rng_ if rng_ > 0 else 0
                cam_count[top] += 1
                wrong = label is not None and top != label
                if n_ok_seen < grid_sample or wrong or probs[top] < 0.5:
                    grid_ids.append(rid)
                n_ok_seen += 1
                outcome = ImageOutcome(
                    record=Record.from_json(rec), image=img, maps=maps, activations=acts
                )
            log.append([outcome.record])
            records.append(outcome.record.to_json())
            batch.append(outcome)
            if len(batch) >= batch_size:
                sink.on_batch(batch)
                batch = []
        if batch:
            sink.on_batch(batch)
    finally:
        log.close()

    n_ok = sum(1 for r in records if r["status"] == "ok")
    stats_doc = {}
    for name, st in stats.items():
        n = max(n_ok, 1)
        stats_doc[name] = {
            "shape": st["shape"],
            "mean": [round(float(v), 6) for v in st["sum_mean"] / n],
            "max": [round(float(v), 6) for v in st["max"]],
            "zero_fraction": [round(float(v), 6) for v in st["zero"] / n],
            "dead": [int(c) for c in np.flatnonzero(~st["fired"])],
            "count": n_ok,
        }
    (outdir / "stats.json").write_text(json.dumps(stats_doc, indent=1, sort_keys=True))
    cams = {
        f"class_{c}": (cam_sum[c] / cam_count[c]).astype(np.float32)
        for c in range(n_classes)
        if cam_count[c]
    }
    np.savez(outdir / "class_cams.npz", counts=cam_count, **cams)
    summary = {"images": len(records), "ok": n_ok, "failed": len(records) - n_ok}
    # run.json through the engine's own (one) writer of it
    RunDir(outdir).write_run_json(
        outdir.parent / "fake_cnn.onnx",
        spec,
        settings,
        {"model_sha1": "0" * 40},
        {
            "total": len(records),
            "ok": n_ok,
            "failed": len(records) - n_ok,
            "processed": len(records),
            "skipped": 0,
            "seconds": round(0.05 * len(records), 3),
            "images_per_second": 20.0,
            "device": "cpu (fake run, no engine)",
            **(
                {"metrics": metric_summary([Record.from_json(r) for r in records])}
                if metrics
                else {}
            ),
        },
    )
    sink.close(summary)
    return FakeRun(outdir, input_dir, spec, records, sink, grid_ids)


# ---- a real run with --metrics ------------------------------------------------------
METRIC_SAMPLE = 4
_METRIC_RUNS: dict[Path, Path] = {}


def real_metric_run(root: Path) -> Path:
    """The OUTDIR of a real ``convlens run`` of the bundled demo model over 8 of its
    photos (2 a class, labelled by folder, and two of the mixed ones), the registry's
    default CAM methods, ``--metrics all --metrics-sample METRIC_SAMPLE``, report
    rendered.  Made once per session and ``root`` (test modules share it)."""
    root = Path(root)
    if root in _METRIC_RUNS:
        return _METRIC_RUNS[root]
    from convlens.engine.run import RunOptions, run
    from convlens.pipeline import demo_paths
    from convlens.reports import render_report

    model_path, photos = demo_paths()
    inputs = root / "metric-photos"
    for folder in ("brick", "grass", "gravel", "mixed"):
        (inputs / folder).mkdir(parents=True)
        for src in sorted((photos / folder).glob("*.jpg"))[:2]:
            (inputs / folder / src.name).write_bytes(src.read_bytes())
    out = root / "metric-out"
    summary = run(
        model_path,
        [str(inputs)],
        out,
        RunOptions(
            device="cpu",
            labels_from_dirs=True,
            batch_size=8,
            metrics=["all"],
            metrics_sample=METRIC_SAMPLE,
        ),
        sinks=[ReportAssetSink(grids="sample", grid_sample=2)],
        progress=False,
        warn=lambda m: None,
    )
    assert summary.ok == 8 and summary.failed == 0
    render_report(out, page_size=4)
    _METRIC_RUNS[root] = out
    return out
