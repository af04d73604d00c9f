"""The alternatives to convlens in benchmarks/bench.py, and convlens with chosen options.

* ``ov_batches``: OpenVINO's runtime alone on the plain tf2onnx export, batches of 32
  preprocessed in memory (a candidate for I*, the fastest runtime for the plain export),
  in f32 or in the CPU plugin's own default precision (bf16 on CPUs with AVX512-BF16/AMX).
* ``torch_gradcam``: pytorch-grad-cam's GradCAM on the same architecture rebuilt in PyTorch
  with the same weights (:func:`export_torch_weights` writes them from the .keras file,
  once, in a TensorFlow process; the timed process imports no TensorFlow): JPEG ->
  cv2 decode, resize, preprocess (one decode thread per core) -> batches of 32 ->
  GradCAM of the top-1 class on the last convolution -> one map per image saved (.npy).
* OpenVINO XAI runs in its own venv (it pins openvino 2024.4): benchmarks/bench_ovxai.py.
* ``convlens_run``: pipeline.analyze with the given RunOptions (runtime, methods, top-k).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from bench_data import ModelConfig, keras_preprocess
from bench_methods import BATCH, preloaded

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's progress bars

# -- OpenVINO alone ----------------------------------------------------------------------


def fresh_dir(parent: Path) -> Path:
    """A directory never used before, under ``parent``, for one timed run's files.
    Nothing is deleted while a benchmark runs (bench.py clears its ``out`` before the
    first row and after the last): ext4 skips the inodes of files deleted in the last
    minute or more when it creates new ones (``recently_deleted``), which made a run
    that writes thousands of small files after ``rm -rf`` of the last one pay seconds
    of system time (perf: ext4_create -> find_inode_bit -> recently_deleted)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix="run-"))


def ov_batches(
    plain: Path, analysis: Path, files: Sequence[Path], precision: str | None
) -> tuple[Callable[[], int], str]:
    """A function running the plain export over the photos (preprocessed in memory first)
    with OpenVINO in batches of 32, and the precision used; ``precision`` None: the
    plugin's default."""
    import openvino as ov

    x = preloaded(analysis, files)
    core = ov.Core()
    cfg = {"PERFORMANCE_HINT": "LATENCY"}
    if precision:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(core.read_model(str(plain)), "CPU", cfg)
    req = compiled.create_infer_request()
    batches = [np.ascontiguousarray(x[i : i + BATCH]) for i in range(0, len(x), BATCH)]
    req.infer({0: batches[0]})  # warm-up, not timed
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    used = getattr(hint, "get_type_name", hint.__str__)()

    def go() -> int:
        for b in batches:
            req.infer({0: b}, share_inputs=True)
        return len(x)

    return go, used


# -- pytorch-grad-cam --------------------------------------------------------------------


def export_torch_weights(keras_path: Path, out: Path) -> dict[str, Any]:
    """The .keras model's layers as plain arrays (+ a JSON list of the layers) for the
    PyTorch rebuild; runs in a TensorFlow process."""
    from convlens.exporter.tfenv import import_tf

    _, keras = import_tf()
    model = keras.models.load_model(keras_path, compile=False)
    layers: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    for layer in model.layers:
        kind = type(layer).__name__
        cfg = layer.get_config()
        i = len(layers)
        if kind in ("Conv2D", "Dense"):
            k, b = layer.get_weights()
            arrays[f"{i}/w"] = np.transpose(k, (3, 2, 0, 1)) if kind == "Conv2D" else k.T
            arrays[f"{i}/b"] = b
            spec = {"kind": kind, "act": cfg["activation"], "padding": cfg.get("padding")}
            layers.append(spec)
        elif kind == "MaxPooling2D":
            layers.append({"kind": kind, "size": cfg["pool_size"][0], "stride": cfg["strides"][0]})
        elif kind in ("Flatten", "GlobalAveragePooling2D"):
            layers.append({"kind": kind})
        elif kind != "InputLayer":
            raise ValueError(f"no PyTorch rebuild for layer {kind}")
    np.savez(out, layers=np.array(json.dumps(layers)), **arrays)
    return {"layers": len(layers)}


def torch_model(weights: Path) -> Any:
    """The rebuilt network: NCHW input; class scores out (the last activation dropped, as
    Grad-CAM differentiates the score before softmax/sigmoid)."""
    import torch
    from torch import nn

    with np.load(weights) as z:
        layers = json.loads(str(z["layers"]))
        arrays = {k: torch.from_numpy(np.ascontiguousarray(z[k])) for k in z.files if "/" in k}
    feats: list[Any] = []
    head: list[Any] = []
    flatten = any(spec["kind"] == "Flatten" for spec in layers)
    last_dense = max(i for i, spec in enumerate(layers) if spec["kind"] == "Dense")
    for i, spec in enumerate(layers):
        kind = spec["kind"]
        if kind == "Conv2D":
            w = arrays[f"{i}/w"]
            conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=spec["padding"])
            conv.weight.data, conv.bias.data = w, arrays[f"{i}/b"]
            feats += [conv, nn.ReLU()] if spec["act"] == "relu" else [conv]
        elif kind == "MaxPooling2D":
            feats.append(nn.MaxPool2d(spec["size"], spec["stride"]))
        elif kind == "Dense":
            w = arrays[f"{i}/w"]
            dense = nn.Linear(w.shape[1], w.shape[0])
            dense.weight.data, dense.bias.data = w, arrays[f"{i}/b"]
            head.append(dense)
            if spec["act"] == "relu" and i != last_dense:
                head.append(nn.ReLU())

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*feats)
            self.head = nn.Sequential(*head)

        def forward(self, x: Any) -> Any:
            f = self.features(x)
            # Keras flattens NHWC: the same order, so the Dense weights apply unchanged
            f = f.permute(0, 2, 3, 1).flatten(1) if flatten else f.mean(dim=(2, 3))
            return self.head(f)

    return Net().eval()


def last_conv(net: Any) -> Any:
    """Grad-CAM's target: the last convolution's output after its ReLU (as row 2's)."""
    from torch import nn

    mods = list(net.features)
    i = max(j for j, m in enumerate(mods) if isinstance(m, nn.Conv2d))
    return mods[i + 1] if i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU) else mods[i]


def _load(path: Path, cfg: ModelConfig) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    rgb = cv2.resize(rgb, (cfg.size, cfg.size), interpolation=cv2.INTER_AREA)
    return keras_preprocess(rgb, cfg)


def batches(files: Sequence[Path], cfg: ModelConfig) -> Iterator[np.ndarray]:
    """Decoded, preprocessed NHWC batches of 32, decoded on one thread per core."""
    with cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        buf: list[np.ndarray] = []
        for x in pool.map(lambda f: _load(f, cfg), files):
            buf.append(x)
            if len(buf) == BATCH:
                yield np.stack(buf)
                buf = []
        if buf:
            yield np.stack(buf)


def torch_gradcam(weights: Path, files: Sequence[Path], cfg: ModelConfig, out: Path) -> int:
    """JPEG to one top-1 Grad-CAM map per image saved, with pytorch-grad-cam."""
    import torch
    from pytorch_grad_cam import GradCAM

    torch.set_num_threads(os.cpu_count() or 1)
    out = fresh_dir(out)
    net = torch_model(weights)
    cam = GradCAM(model=net, target_layers=[last_conv(net)])
    n = 0
    for x in batches(files, cfg):
        t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        for m in cam(input_tensor=t, targets=None):  # the top-1 class of each image
            np.save(out / f"{n:06d}.npy", m.astype(np.float32))
            n += 1
    return n


def torch_parity(weights: Path, analysis: Path, files: Sequence[Path]) -> float:
    """Largest |probability difference| between the PyTorch rebuild and the analysis ONNX
    (onnxruntime) on 16 photos: the rebuild's check."""
    import onnxruntime as ort
    import torch

    from convlens.engine import contract as C

    x = preloaded(analysis, files[:16])
    sess = ort.InferenceSession(str(analysis), providers=["CPUExecutionProvider"])
    feeds = {C.IN_IMAGE: x}
    if any(i.name == C.IN_TARGETS for i in sess.get_inputs()):
        feeds[C.IN_TARGETS] = np.full((len(x), 1), -1, np.int64)
    want = sess.run([C.OUT_PREDICTIONS], feeds)[0]
    with torch.no_grad():
        scores = torch_model(weights)(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    single = scores.shape[1] == 1
    got = (torch.sigmoid(scores) if single else torch.softmax(scores, dim=1)).numpy()
    if single and want.shape[1] == 2:  # a sigmoid head reported as (1 - p, p)
        got = np.concatenate([1 - got, got], axis=1)
    return float(np.abs(got - want).max())


# -- convlens with options ---------------------------------------------------------------


def convlens_run(
    model: Path, folder: Path, outdir: Path, report: bool, **options: Any
) -> tuple[int, dict[str, Any]]:
    """``convlens run`` end to end via pipeline.analyze into a new directory under
    ``outdir`` (:func:`fresh_dir`), with RunOptions ``options`` (device cpu, force)."""
    from convlens.engine.run import RunOptions
    from convlens.pipeline import analyze

    outdir = fresh_dir(outdir)
    warnings: list[str] = []
    res = analyze(
        model,
        [str(folder)],
        outdir,
        RunOptions(device="cpu", force=True, **options),
        grids="sample",
        report=report,
        progress=False,
        warn=warnings.append,
    )
    s = res.summary
    if s.failed or warnings:
        raise RuntimeError(f"convlens run: {s.line()}; {warnings[:3]}")
    size = sum(p.stat().st_size for p in outdir.rglob("*") if p.is_file())
    return s.processed, {
        "engine_img_s": round(s.images_per_second, 2),
        "runtime": s.runtime,
        "outdir_mb": round(size / 2**20, 1),
    }
