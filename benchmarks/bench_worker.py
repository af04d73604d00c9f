"""One benchmark method in its own process (so its peak RSS is its own).

    python benchmarks/bench_worker.py METHOD --model NAME --set DIR [--limit K]
        [--repeats R] [--outdir DIR]

Prints one line ``BENCH-RESULT {json}``: images, seconds per repeat, peak RSS (VmHWM).
``METHOD`` is one of ``prepare`` (build and export the model), ``prepare_torch`` (the
weights of the PyTorch rebuild), ``notebook``, ``keras``, ``ort_plain``, ``ort_analysis``,
``decode``, ``ov_plain`` / ``ov_plain_default`` (OpenVINO alone, f32 / its default
precision), ``torch_gradcam`` (pytorch-grad-cam), or a convlens run: ``convlens``,
``convlens_noreport``, ``convlens_one`` (--cam gradcam --top-k 1 --no-report --save-maps),
each also with ``_ov`` (--runtime openvino) or ``_bf16`` (--precision bf16, on OpenVINO).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # GradientTape segfaults otherwise
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import bench_data as data  # noqa: E402
import bench_methods as m  # noqa: E402
import bench_rivals as rivals  # noqa: E402
from bench_report import SUFFIXES, split_method  # noqa: E402

TAG = "BENCH-RESULT "


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _timed(args: argparse.Namespace) -> m.Timing:
    cfg, files = data.MODELS[args.model], data.model_files(args.model)
    images = data.set_files(args.set, args.limit)
    out = Path(args.outdir)
    R = args.repeats
    if args.method == "notebook":
        n, secs = m.repeat(lambda: m.notebook(files.keras, images, cfg, out), R)
        return m.Timing(n, secs, "one image at a time; matplotlib grids; " + _cam_note(cfg))
    if args.method == "keras":
        n, secs = m.repeat(lambda: m.keras_batched(files.keras, images, cfg), R)
        return m.Timing(n, secs, "tf.data decode + tf.function predict + Grad-CAM (tape)")
    if args.method in ("ort_plain", "ort_analysis"):
        return _ort(args.method, files, images, R)
    if args.method == "decode":
        n, secs = m.repeat(lambda: m.decode(files.analysis, images), R)
        return m.Timing(n, secs, f"read_image + Preprocessor, {os.cpu_count()} threads")
    if args.method.startswith("ov_plain"):
        precision = None if args.method == "ov_plain_default" else "f32"
        go, used = rivals.ov_batches(files.plain, files.analysis, images, precision)
        n, secs = m.repeat(go, R)
        return m.Timing(n, secs, f"OpenVINO {used}, LATENCY; batches of 32 in memory")
    if args.method == "torch_gradcam":
        weights = torch_weights(args.model)
        n, secs = m.repeat(lambda: rivals.torch_gradcam(weights, images, cfg, out / "maps"), R)
        err = rivals.torch_parity(weights, files.analysis, images)
        note = f"JPEG to saved top-1 map, batch 32; rebuild vs ONNX max |dp| {err:.1e}"
        return m.Timing(n, secs, note)
    return _convlens(args.method, files.analysis, args.set, out, R)


def _cam_note(cfg: data.ModelConfig) -> str:
    return "CAM from dense weights" if cfg.name == "vgg" else "Grad-CAM by hand (eager tape)"


def _ort(method: str, files: data.ModelFiles, images: list[Path], R: int) -> m.Timing:
    x = m.preloaded(files.analysis, images)
    if method == "ort_plain":
        go = m.ort_batches(files.plain, x)
        note = "plain tf2onnx export, predictions only"
    else:
        go = m.ort_batches(files.analysis, x)
        note = "analysis ONNX, every output (activations, gradients for top-3)"
    n, secs = m.repeat(go, R)
    return m.Timing(n, secs, note + "; batches of 32 preprocessed in memory")


CONVLENS = {  # method: (report, RunOptions fields, note)
    "convlens": (True, {}, "analyze(), report (grids=sample)"),
    "convlens_noreport": (False, {}, "analyze(report=False)"),
    "convlens_one": (
        False,
        {"cam_methods": ["gradcam"], "top_k": 1, "save_maps": True},
        "--cam gradcam --top-k 1 --no-report --save-maps",
    ),
}


def _convlens(method: str, model: Path, folder: Path, out: Path, R: int) -> m.Timing:
    base, suffix = split_method(method)
    report, options, note = CONVLENS[base]
    options = options | SUFFIXES[suffix]
    extra: dict = {}

    def once() -> int:
        n, info = rivals.convlens_run(model, folder, out, report, **options)
        extra.update(info)
        return n

    n, secs = m.repeat(once, R)
    return m.Timing(n, secs, note + ", fresh outdir each repeat", extra)


def torch_weights(model: str) -> Path:
    return data.model_files(model).keras.with_suffix(".torch.npz")


METHODS = ("notebook", "keras", "ort_plain", "ort_analysis", "decode", "ov_plain")
METHODS += ("ov_plain_default", "torch_gradcam")
METHODS += tuple(k + s for k in CONVLENS for s in SUFFIXES)


def _prepare(args: argparse.Namespace) -> dict:
    return {"seconds": data.ensure_model(args.model, rebuild=args.rebuild)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("method", choices=["prepare", "prepare_torch", *METHODS])
    p.add_argument("--model", required=True, choices=list(data.MODELS))
    p.add_argument("--set", type=Path)
    p.add_argument("--limit", type=int)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--outdir", default=str(data.CACHE / "out"))
    p.add_argument("--rebuild", action="store_true")
    args = p.parse_args(argv)
    if args.method == "prepare":
        result = _prepare(args)
    elif args.method == "prepare_torch":
        keras_path = data.model_files(args.model).keras
        result = rivals.export_torch_weights(keras_path, torch_weights(args.model))
    else:
        t = _timed(args)
        result = {"images": t.images, "seconds": t.seconds, "note": t.note, "extra": t.extra}
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    sys.stdout.flush()
    print(TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
