"""convlens against the ways a Keras user gets the same maps, on the same photos and models.

    python benchmarks/bench.py [--images N] [--repeats R] [--models small,vgg] [--quick]
                               [--scale-max 10000] [--notebook-images K] [--rebuild]

Rows, per model (every method in its own process; img/s is the median over repeats):

 1   the notebook recipe: Keras activation model, one image at a time, a matplotlib grid
     of every conv layer saved as PNG, CAM (GAP head) or Grad-CAM (eager tape); once, on
     a few images (it is slow)
 2   the best a Keras user gets: tf.data decoding, batched predict + Grad-CAM
     (tf.GradientTape) in one tf.function, batches of 32
 3   onnxruntime alone, plain tf2onnx export (predictions only), preprocessed batches in
     memory: rate I                        (3a: the same with the analysis ONNX)
 D   decoding + preprocessing alone (read_image + Preprocessor on all cores): rate D
 L   the limit 1 / (1/I + 1/D)
 4   ``convlens run`` end to end (pipeline.analyze, device cpu, report with grids=sample)
 4'  the same with ``report=False``
 4'b (--diagnose) 4' with OPENBLAS_NUM_THREADS=1 (numpy's BLAS threads against onnxruntime's)

and a scaling row: ``convlens run`` over 100 and 1000 (``--scale-max``: up to 10000) images
(the photos reused through symlinks), img/s and peak RSS.  Writes benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import bench_data as data

HERE = Path(__file__).resolve().parent
WORKER = HERE / "bench_worker.py"
TAG = "BENCH-RESULT "

ROWS = {  # key: (label, worker method)
    "1": ("notebook recipe (Keras, 1 image at a time, matplotlib grids)", "notebook"),
    "2": ("Keras batched: tf.data + predict + Grad-CAM (tape), batch 32", "keras"),
    "3": ("onnxruntime alone, plain export (I)", "ort_plain"),
    "3a": ("onnxruntime alone, analysis ONNX, every output", "ort_analysis"),
    "D": ("decode + preprocess alone, all cores (D)", "decode"),
    "4": ("convlens run (analyze, report)", "convlens"),
    "4'": ("convlens run, report=False", "convlens_noreport"),
    "4'b": ("convlens run, report=False, OPENBLAS_NUM_THREADS=1", "convlens_noreport"),
}
ROW_ENV = {"4'b": {"OPENBLAS_NUM_THREADS": "1"}}  # --diagnose: thread oversubscription
DEFAULT_IMAGES = {"small": 300, "vgg": 64}  # the VGG rows are ~10x slower
QUICK_IMAGES = {"small": 24, "vgg": 8}
GRADCAM_NOTE = (
    "Grad-CAM is implemented by hand (tf.GradientTape, batched, last layer made linear as "
    "tf-keras-vis' ReplaceToLinear does): tf-keras-vis 0.8.7 does not run on Keras 3 as "
    "documented (ReplaceToLinear raises AttributeError: model.output_names; only "
    "model_modifier=None works, i.e. gradients through the softmax)."
)


@dataclass
class Result:
    row: str
    model: str
    images: int = 0
    seconds: list[float] = field(default_factory=list)
    peak_mb: float = float("nan")
    note: str = ""
    extra: dict = field(default_factory=dict)
    error: str = ""

    @property
    def rate(self) -> float:
        if self.error or not self.seconds:
            return float("nan")
        return self.images / statistics.median(self.seconds)


# ---------------------------------------------------------------------------------------
# running the workers
# ---------------------------------------------------------------------------------------


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ) | (extra or {})
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    return env


def run_worker(args: list[str], timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run bench_worker.py with ``args``; its result line as a dict (``error`` on failure)."""
    cmd = [sys.executable, str(WORKER), *args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(env))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(TAG):
            return json.loads(line[len(TAG) :])
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {p.returncode}: {tail[:200]}"}


def measure(row: str, model: str, folder: Path, opts: argparse.Namespace, **kw: int) -> Result:
    method = ROWS[row][1]
    args = [method, "--model", model, "--set", str(folder)]
    args += ["--outdir", str(data.CACHE / "out" / f"{model}-{method}")]
    args += [f"--{k}={v}" for k, v in kw.items()]
    log(f"[{model}] {row:>2} {method} ...")
    out = run_worker(args, opts.timeout, ROW_ENV.get(row))
    res = Result(row, model, error=out.get("error", ""))
    if not res.error:
        res.images, res.seconds = out["images"], out["seconds"]
        res.peak_mb, res.note, res.extra = out["peak_rss_mb"], out["note"], out["extra"]
    log(f"[{model}] {row:>2} {method}: " + (res.error or f"{fmt(res.rate)} img/s"))
    return res


def prepare(model: str, rebuild: bool, timeout: float) -> dict:
    files = data.model_files(model)
    if not rebuild and all(p.exists() for p in (files.keras, files.analysis, files.plain)):
        return {}
    log(f"[{model}] building and exporting the model (once, cached) ...")
    extra = ["--rebuild"] if rebuild else []
    out = run_worker(["prepare", "--model", model, *extra], timeout)
    if "error" in out:
        raise SystemExit(f"[{model}] preparing the model failed: {out['error']}")
    return out["seconds"]


def bench_model(model: str, n: int, opts: argparse.Namespace) -> list[Result]:
    folder = data.image_set(n, n)
    R = opts.repeats
    nb = opts.notebook_images or (1 if opts.quick else data.MODELS[model].notebook_images)
    results = [measure("1", model, folder, opts, repeats=1, limit=min(nb, n))]
    rows = ["2", "3", "3a", "D", "4", "4'"] + (["4'b"] if opts.diagnose else [])
    for row in rows:
        results.append(measure(row, model, folder, opts, repeats=R))
    return results


def scaling(model: str, sizes: list[int], n_photos: int, opts: argparse.Namespace) -> list[Result]:
    out = []
    for size in sizes:
        folder = data.image_set(size, n_photos)
        out.append(measure("4", model, folder, opts, repeats=1))
    return out


# ---------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt(x: float) -> str:
    if x != x:  # nan
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def limit_rate(rate_i: float, rate_d: float) -> float:
    return 1.0 / (1.0 / rate_i + 1.0 / rate_d)


def model_table(model: str, results: list[Result]) -> list[str]:
    by = {r.row: r for r in results}
    lines = [
        f"### {model}",
        "",
        "| # | method | images | img/s | peak RSS MiB | s per repeat | notes |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        if r.row == "4":
            lim = limit_rate(by["3"].rate, by["D"].rate)
            lines.append(f"| L | limit 1/(1/I + 1/D) | | {fmt(lim)} | | | |")
        secs = ", ".join(f"{s:.2f}" for s in r.seconds)
        note = r.error or "; ".join([r.note, *(f"{k}={v}" for k, v in r.extra.items())])
        lines.append(
            f"| {r.row} | {ROWS[r.row][0]} | {r.images} | {fmt(r.rate)} | "
            f"{fmt(r.peak_mb)} | {secs} | {note} |"
        )
    return lines


def ratios(all_results: dict[str, list[Result]]) -> list[str]:
    lines = [
        "| model | run | 4/L | 4/3 | 4/2 | 4/1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for model, results in all_results.items():
        by = {r.row: r.rate for r in results}
        lim = limit_rate(by["3"], by["D"])
        names = (
            ("4", "with report"),
            ("4'", "report=False"),
            ("4'b", "report=False, 1 BLAS thread"),
        )
        for row, name in names:
            if row not in by:
                continue
            v = by[row]
            cells = [v / lim, v / by["3"], v / by["2"], v / by["1"]]
            lines.append(f"| {model} | {name} | " + " | ".join(fmt(c) for c in cells) + " |")
    return lines


def scaling_table(model: str, results: list[Result]) -> list[str]:
    lines = [
        f"Scaling, `convlens run` with report, model `{model}`, photos reused via symlinks:",
        "",
        "| images | img/s | peak RSS MiB | seconds | outdir MiB |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        secs = f"{r.seconds[0]:.1f}" if r.seconds else r.error
        mb = r.extra.get("outdir_mb", "-")
        lines.append(f"| {r.images} | {fmt(r.rate)} | {fmt(r.peak_mb)} | {secs} | {mb} |")
    return lines


def _version(*dists: str) -> str:
    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def git_state() -> str:
    """The commit benchmarked, and whether the engine, exporter or reports are edited."""
    root = HERE.parent

    def git(*args: str) -> str:
        p = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return p.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "--", "engine", "exporter", "reports", "convlens")
    return f"commit {head}" + (" with uncommitted changes" if dirty else "")


def machine() -> list[str]:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "onnxruntime": _version("onnxruntime-gpu", "onnxruntime"),
        "tensorflow": _version("tensorflow", "tensorflow-cpu"),
        "keras": _version("keras"),
        "opencv": _version("opencv-python-headless", "opencv-python"),
        "tf2onnx": _version("tf2onnx"),
        "matplotlib": _version("matplotlib"),
        "convlens": _version("convlens"),
    }
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores available "
        f"({len(os.sched_getaffinity(0))} usable), {platform.system()} {platform.release()}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    ]


def document(
    header: list[str],
    all_results: dict[str, list[Result]],
    scale: tuple[str, list[Result]] | None,
    notes: list[str],
) -> str:
    lines = ["# convlens benchmark", "", *header, ""]
    for model, results in all_results.items():
        lines += [*model_table(model, results), ""]
    lines += ["### ratios (img/s of convlens run over the others)", "", *ratios(all_results), ""]
    if scale:
        lines += ["### scaling", "", *scaling_table(*scale), ""]
    lines += ["### notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, help="images per model (default: small 300, vgg 64)")
    p.add_argument("--repeats", type=int, help="repeats per row, median reported (default 3)")
    p.add_argument("--models", default="small,vgg", help="comma-separated: small, vgg")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test")
    p.add_argument("--notebook-images", type=int, help="images for row 1 (small 8, vgg 2)")
    p.add_argument("--scale-max", type=int, default=1000, help="largest scaling run (0: none)")
    p.add_argument("--scale-model", help="model of the scaling runs (default: the first)")
    p.add_argument("--diagnose", action="store_true", help="add row 4'b (one BLAS thread)")
    p.add_argument("--rebuild", action="store_true", help="build and export the models again")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    p.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    opts = p.parse_args(argv)
    opts.models = [m.strip() for m in opts.models.split(",") if m.strip()]
    unknown = [m for m in opts.models if m not in data.MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(data.MODELS)}")
    opts.repeats = opts.repeats or (1 if opts.quick else 3)
    return opts


def scale_sizes(opts: argparse.Namespace) -> list[int]:
    if opts.quick:
        return [16, 64] if opts.scale_max else []
    sizes, n = [], 100
    while n <= opts.scale_max:
        sizes.append(n)
        n *= 10
    return sizes


def images_for(model: str, opts: argparse.Namespace) -> int:
    if opts.images:
        return opts.images
    return (QUICK_IMAGES if opts.quick else DEFAULT_IMAGES)[model]


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    t0 = time.perf_counter()
    command = shlex.join(
        ["python", "benchmarks/bench.py", *(sys.argv[1:] if argv is None else argv)]
    )
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    load0 = os.getloadavg()[0]
    counts = {m: images_for(m, opts) for m in opts.models}
    n_photos = max(counts.values())
    data.ensure_photos(n_photos)
    notes = [GRADCAM_NOTE]
    for m in opts.models:
        took = prepare(m, opts.rebuild, opts.timeout)
        if took:
            notes.append(f"{m}: built/exported this run: " + json.dumps(took))
    all_results = {m: bench_model(m, counts[m], opts) for m in opts.models}
    scale = None
    if sizes := scale_sizes(opts):
        sm = opts.scale_model or opts.models[0]
        scale = (sm, scaling(sm, sizes, n_photos, opts))
    header = [
        f"- command: `{command}`",
        f"- date: {started}; total {time.perf_counter() - t0:.0f} s; load average "
        f"{load0:.2f} at start, {os.getloadavg()[0]:.2f} at end",
        *machine(),
        f"- convlens: {git_state()}",
        f"- images: {data.PHOTO_SIZE[0]}x{data.PHOTO_SIZE[1]} JPEG q{data.JPEG_QUALITY} made "
        "from scikit-image's photographs; models with random weights (seeded); "
        f"repeats {opts.repeats} (row 1 once), medians; device cpu",
    ]
    text = document(header, all_results, scale, notes + _standing_notes())
    print(text)
    opts.output.write_text(text)
    log(f"written {opts.output}")
    return 0


def _standing_notes() -> list[str]:
    return [
        "Rows 1, 2, 4, 4' time everything from the model file and the image files to the "
        "results (model loading, decoding, session creation included); 3, 3a, D are "
        "components (session creation and the decoding of row 3's inputs excluded).",
        "Peak RSS is each worker process's VmHWM (one process per row, all its repeats), so "
        "it includes the interpreter and the libraries a method imports (TensorFlow for "
        "rows 1 and 2 only).",
        "Random weights, but the last Dense layer is rescaled so that predictions are "
        "confident and varied, as a trained model's are: the report draws activation grids "
        "for the first --grid-sample (50) images and for every low-confidence one.",
    ]


if __name__ == "__main__":
    sys.exit(main())
