"""The OpenVINO XAI peer of benchmarks/bench.py, run by the venv that has it (it pins
openvino 2024.4, so it cannot share convlens' environment)::

    python -m venv /work/venvs/ovxai
    /work/venvs/ovxai/bin/pip install openvino-xai==1.1.0 opencv-python-headless numpy
    /work/venvs/ovxai/bin/python benchmarks/bench_ovxai.py --plain M.plain.onnx --set DIR \
        --size 150 --preprocess unit [--repeats 3] [--outdir DIR]

Standalone on purpose (imports only cv2, numpy, openvino, openvino_xai).  End to end, per
repeat: read the plain tf2onnx export, insert OpenVINO XAI's ActivationMap saliency branch
(``insert_xai``, target layer found automatically), compile for the CPU with OpenVINO's
defaults; JPEG -> cv2 decode, resize (area), preprocess on one thread per core ->
batches of 32 -> predictions and saliency maps -> one map per image saved (.npy).
ActivationMap is class-agnostic (the mean of the target layer's channels), the cheapest
map OpenVINO XAI offers; its ReciproCAM did not insert on these exports (issue 10).

Prints ``BENCH-RESULT {json}`` like bench_worker.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
BATCH = 32


def load(path: Path, size: int, preprocess: str) -> np.ndarray:
    rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    x = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    return x[..., ::-1] - CAFFE_MEAN_BGR if preprocess == "caffe" else x / 255.0


def once(args: argparse.Namespace, files: list[Path]) -> tuple[int, str]:
    import openvino as ov
    import openvino_xai as xai

    core = ov.Core()
    model = xai.insert_xai(
        core.read_model(str(args.plain)),
        xai.Task.CLASSIFICATION,
        explain_method=xai.Method.ACTIVATIONMAP,
    )
    compiled = core.compile_model(model, "CPU")
    req = compiled.create_infer_request()
    # a directory never used before, nothing deleted during the benchmark (bench.py
    # clears it at the end): see bench_rivals.fresh_dir
    Path(args.outdir).mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(dir=args.outdir, prefix="run-"))
    n = 0
    with cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        xs = pool.map(lambda f: load(f, args.size, args.preprocess), files)
        while batch := list(itertools.islice(xs, BATCH)):
            res = req.infer({0: np.ascontiguousarray(np.stack(batch))})
            maps = res[compiled.output("saliency_map")]
            for m in maps:
                np.save(out / f"{n:06d}.npy", m)
                n += 1
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    return n, getattr(precision, "get_type_name", precision.__str__)()


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--plain", type=Path, required=True)
    p.add_argument("--set", type=Path, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--preprocess", choices=["unit", "caffe"], required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--outdir", default="/tmp/convlens-bench-ovxai")
    args = p.parse_args()
    logging.getLogger("openvino_xai").setLevel(logging.WARNING)
    files = sorted(args.set.glob("img_*.jpg"))[: args.limit]
    seconds, n, precision = [], 0, ""
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        n, precision = once(args, files)
        seconds.append(time.perf_counter() - t0)
    import openvino

    result = {
        "images": n,
        "seconds": seconds,
        "note": f"insert_xai ActivationMap, batch 32, openvino {openvino.__version__.split('-')[0]} "
        f"defaults ({precision}); JPEG to saved map",
        "extra": {},
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print("BENCH-RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
