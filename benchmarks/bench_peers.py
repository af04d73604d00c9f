"""convlens's Score-CAM and Ablation-CAM against pytorch-grad-cam's, in one run (see
bench_cams.py for what is measured): ``python benchmarks/bench_methods.py peers``.

Needs the [bench] extra's torch, torchvision and grad-cam.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's progress bars

#: convlens method id -> pytorch-grad-cam class name
PEERS = {"scorecam": "ScoreCAM", "ablationcam": "AblationCAM"}


def torch_chain(keras_model: Any) -> tuple[Any, dict[str, Any]]:
    """The Keras chain model (Conv2D, MaxPooling2D, Flatten, GlobalAveragePooling2D,
    Dense) as a ``torch.nn.Sequential`` with the same weights, NCHW, ending in the last
    Dense layer's pre-activation (class scores, as pytorch-grad-cam's targets read them);
    and each Keras layer's name -> the module whose output is that layer's output."""
    import torch
    from torch import nn

    class FlattenNHWC(nn.Module):  # Keras flattens (h, w, k), PyTorch (k, h, w)
        def forward(self, x: Any) -> Any:
            return torch.flatten(x.permute(0, 2, 3, 1), 1)

    mods: list[Any] = []
    by_name: dict[str, Any] = {}
    layers = [la for la in keras_model.layers if type(la).__name__ != "InputLayer"]
    for i, layer in enumerate(layers):
        kind = type(layer).__name__
        last = i == len(layers) - 1
        if kind in ("Conv2D", "Dense"):
            kernel, bias = (np.asarray(v, np.float32) for v in layer.get_weights())
            if kind == "Conv2D":
                kh, kw, cin, cout = kernel.shape
                if tuple(layer.strides) != (1, 1) or layer.padding not in ("valid", "same"):
                    raise ValueError(f"{layer.name}: strides/padding not rebuilt here")
                mod = nn.Conv2d(
                    cin, cout, (kh, kw), padding=0 if layer.padding == "valid" else kh // 2
                )
                mod.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
            else:
                mod = nn.Linear(kernel.shape[0], kernel.shape[1])
                mod.weight.data = torch.from_numpy(kernel.T.copy())
            mod.bias.data = torch.from_numpy(bias)
            mods.append(mod)
            act = layer.activation.__name__
            if act == "relu" and not last:
                mods.append(nn.ReLU())
            elif act not in ("linear", "relu") and not last:
                raise ValueError(f"{layer.name}: activation {act} not rebuilt here")
        elif kind == "MaxPooling2D":
            mods.append(nn.MaxPool2d(layer.pool_size, stride=layer.strides))
        elif kind == "Flatten":
            mods.append(FlattenNHWC())
        elif kind == "GlobalAveragePooling2D":
            mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        else:
            raise ValueError(f"{layer.name}: {kind} not rebuilt here")
        by_name[layer.name] = mods[-1]
    return nn.Sequential(*mods).eval(), by_name


@dataclass
class PeerRow:
    method: str
    ours: list[float]  # seconds per repeat
    theirs: list[float]
    agreement: float  # median Pearson r of the two maps over the images with non-flat maps
    flat: int  # images whose maps are flat (all zero) on both sides


def _agreement(ours: list[np.ndarray], theirs: np.ndarray) -> tuple[float, int]:
    """Median Pearson r over the images where both maps vary, and how many images have a
    flat map on both sides (Ablation-CAM's weights flip sign when y_c < 0: then every map
    can be zero after the ReLU, in both libraries)."""
    rs, flat = [], 0
    for a, b in zip(ours, theirs, strict=True):
        if a.std() > 0 and b.std() > 0:
            rs.append(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]))
        elif a.std() == 0 and b.std() == 0:
            flat += 1
        else:
            rs.append(0.0)  # one flat, one not: no agreement
    return (statistics.median(rs) if rs else float("nan")), flat


def peers(model: str, x: np.ndarray, repeats: int) -> tuple[list[PeerRow], dict[str, Any]]:
    """Time both libraries on the preprocessed photos ``x`` (NHWC), interleaved."""
    import bench_data as data
    import pytorch_grad_cam as pgc
    import torch
    from bench_cams import Network
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from convlens.engine import contract as C
    from convlens.engine.cams import METHODS, CAMInputs, normalize, upsample
    from convlens.exporter.tfenv import import_tf

    torch.set_num_threads(os.cpu_count() or 1)
    files = data.model_files(model)
    net = Network(files.analysis)
    spec = net.spec
    _, keras = import_tf()
    tm, by_name = torch_chain(keras.models.load_model(files.keras, compile=False))
    layer = by_name[spec.source["exposed_tensors"][spec.cam_layer]]
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        torch_scores = tm(xt).numpy()
    onnx_scores = net.scores(x)
    # one sigmoid unit: convlens's class 1 is its logit z, pytorch-grad-cam's output 0
    if spec.head.binary_sigmoid:
        ours_cls, theirs_cls = np.ones(len(x), np.int64), np.zeros(len(x), np.int64)
        parity = float(np.abs(torch_scores[:, 0] - onnx_scores[:, 1]).max())
    else:
        ours_cls = theirs_cls = onnx_scores.argmax(axis=1)
        parity = float(np.abs(torch_scores - onnx_scores).max())
    cam_session = net.full
    feeds = {C.IN_IMAGE: x, C.IN_TARGETS: ours_cls[:, None]}

    def ours(name: str, n: int) -> np.ndarray:
        fd = {k: v[:n] for k, v in feeds.items()}
        acts = cam_session.run([str(spec.cam_output)], fd)[0]  # the forward pass
        inp = CAMInputs(acts, ours_cls[:n, None], x=x[:n], tail=net.tail, scores=net.scores)
        return METHODS[name].maps(inp)[:, 0]

    def theirs(name: str, n: int) -> np.ndarray:
        cam = getattr(pgc, PEERS[name])(model=tm, target_layers=[layer])
        targets = [ClassifierOutputTarget(int(c)) for c in theirs_cls[:n]]
        return np.asarray(cam(input_tensor=xt[:n], targets=targets))

    rows = []
    for name in PEERS:
        ours(name, 1), theirs(name, 1)  # warm-up on one image, not timed
        t_ours, t_theirs = [], []
        for _ in range(repeats):
            for fn, into in ((ours, t_ours), (theirs, t_theirs)):
                t0 = time.perf_counter()
                got = fn(name, len(x))
                into.append(time.perf_counter() - t0)
                if fn is ours:
                    mine = got
                else:
                    other = got
        size = x.shape[1:3]
        up = [upsample(m, size) for m in normalize(mine)]
        rows.append(PeerRow(name, t_ours, t_theirs, *_agreement(up, other)))
    info = {
        "score_parity": parity,
        "cam_shape": tuple(spec.output(str(spec.cam_output)).shape[1:]),
        "forward": _forward_rates(tm, xt, net, x, repeats),
    }
    return rows, info


def _forward_rates(tm: Any, xt: Any, net: Any, x: np.ndarray, repeats: int) -> dict[str, float]:
    """img/s of one plain forward pass of the batch: the PyTorch rebuild, and onnxruntime
    on the scores-only graph (the runtimes' own speed, apart from the methods)."""
    import torch

    def rate(fn: Callable[[], Any]) -> float:
        fn()
        secs = []
        for _ in range(max(repeats, 3)):
            t0 = time.perf_counter()
            fn()
            secs.append(time.perf_counter() - t0)
        return len(x) / statistics.median(secs)

    with torch.no_grad():
        torch_rate = rate(lambda: tm(xt))
    return {"torch": torch_rate, "onnxruntime": rate(lambda: net.scores(x))}


def peer_table(model: str, n: int, rows: list[PeerRow], info: dict[str, Any]) -> str:
    from convlens.engine.cams import METHODS

    h, w, k = info["cam_shape"]
    lines = [
        f"`{model}` ({h}x{w}x{k} CAM tensor), {n} images, top-1 class; img/s, median of repeats",
        "",
        "| method | convlens img/s | pytorch-grad-cam img/s | convlens / pytorch-grad-cam "
        "| maps' r | flat maps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        a, b = n / statistics.median(r.ours), n / statistics.median(r.theirs)
        label = f"{METHODS[r.method].label} (`{PEERS[r.method]}`)"
        lines.append(
            f"| {label} | {a:.2f} | {b:.2f} | {a / b:.1f}x | {r.agreement:.3f} | {r.flat}/{n} |"
        )
    fwd = info["forward"]
    lines.append(
        f"\nOne forward pass of the {n} images alone: PyTorch {fwd['torch']:.1f} img/s, "
        f"onnxruntime {fwd['onnxruntime']:.1f} img/s.  PyTorch rebuild vs ONNX scores: "
        f"max |diff| {info['score_parity']:.2g}."
    )
    return "\n".join(lines)


def main_peers(models: list[str], images: int, repeats: int, load: Callable[..., Any]) -> str:
    """The tables for ``models``; ``load(model, images)`` gives the preprocessed photos."""
    return "\n\n".join(peer_table(m, images, *peers(m, load(m, images), repeats)) for m in models)
