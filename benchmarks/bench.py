"""convlens against the ways a Keras user gets the same maps, on the same photos and models.

    python benchmarks/bench.py [--images N] [--repeats R] [--models small,vgg] [--quick]
                               [--scale-max 10000] [--notebook-images K] [--rebuild]
                               [--ovxai-python /work/venvs/ovxai/bin/python]

Rows, per model (every method in its own process; img/s is the median over repeats):

 1   the notebook recipe: Keras activation model, one image at a time, a matplotlib grid
     of every conv layer saved as PNG, CAM (GAP head) or Grad-CAM (eager tape); once, on
     a few images (it is slow)
 2   the best a Keras user gets: tf.data decoding, batched predict + Grad-CAM
     (tf.GradientTape) in one tf.function, batches of 32
 3   onnxruntime alone, plain tf2onnx export (predictions only), preprocessed batches in
     memory: rate I                        (3a: the same with the analysis ONNX)
 3v  OpenVINO alone, the same plain export and batches, f32   (3vb: its default precision,
     bf16 on CPUs with AVX512-BF16/AMX): I* is the fastest of 3, 3v, 3vb
 D   decoding + preprocessing alone (read_image + Preprocessor on all cores): rate D
 L   the limit 1 / (1/I + 1/D);  L* = 1 / (1/I* + 1/D)
 P1  OpenVINO XAI: ActivationMap branch inserted into the plain export, JPEG to saved map
     (its own venv, --ovxai-python; benchmarks/bench_ovxai.py)
 P2  pytorch-grad-cam GradCAM, the same architecture and weights rebuilt in PyTorch, JPEG to
     saved top-1 map (benchmarks/bench_rivals.py)
 4   ``convlens run`` end to end (pipeline.analyze, device cpu, runtime auto = onnxruntime,
     report with grids=sample)
 4'  the same with ``report=False``
 4g  ``--cam gradcam --top-k 1 --no-report --save-maps`` (the issue's one-method goal)
 4v, 4'v, 4gv  the same three with ``--runtime openvino`` (what the runtime buys)
 4bf, 4gbf  4 and 4g with ``--precision bf16`` (opt-in; on CPUs with native bf16 only)
 4x, 4gx  4 and 4g with every opt-in speed lever: ``--precision bf16 --stats-every 8
     --fast-decode`` (the same CPUs)
 4gs  4g with ``--stats-every 0``: no activation statistics, the maps exact
 4gn  4g with ``--precision bf16 --fast-decode --stats-every 0``: maps only, every lever
 4'b (--diagnose) 4' with OPENBLAS_NUM_THREADS=1 (numpy's BLAS threads against onnxruntime's)

and a scaling row: ``convlens run`` over 100 and 1000 (``--scale-max``: up to 10000) images
(the photos reused through symlinks), img/s and peak RSS.  Writes benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bench_data as data
from bench_report import CONVLENS_ROWS, ROWS, Result, document, fmt, git_state, machine, row_options

from convlens.reports.gridpolicy import GRID_NOTABLE, GRID_SAMPLE

HERE = Path(__file__).resolve().parent
WORKER = HERE / "bench_worker.py"
TAG = "BENCH-RESULT "

#: what a row needs installed beyond convlens' own dependencies (and the convlens rows
#: whose options name OpenVINO: :func:`needs`)
NEEDS = {
    "3v": ("openvino",),
    "3vb": ("openvino",),
    "P2": ("torch", "torchvision", "pytorch_grad_cam"),
}
DEFAULT_OVXAI = Path("/work/venvs/ovxai/bin/python")
ROW_ENV = {"4'b": {"OPENBLAS_NUM_THREADS": "1"}}  # --diagnose: thread oversubscription
DEFAULT_IMAGES = {"small": 300, "vgg": 64}  # the VGG rows are ~10x slower
QUICK_IMAGES = {"small": 24, "vgg": 8}
GRADCAM_NOTE = (
    "Grad-CAM is implemented by hand (tf.GradientTape, batched, last layer made linear as "
    "tf-keras-vis' ReplaceToLinear does): tf-keras-vis 0.8.7 does not run on Keras 3 as "
    "documented (ReplaceToLinear raises AttributeError: model.output_names; only "
    "model_modifier=None works, i.e. gradients through the softmax)."
)


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
    return run_tagged([sys.executable, str(WORKER), *args], timeout, env)


def run_tagged(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd``; its ``BENCH-RESULT`` line as a dict (``error`` on failure)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(env))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(TAG):
            return json.loads(line[len(TAG) :])
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {p.returncode}: {tail[:200]}"}


def needs(row: str) -> tuple[str, ...]:
    """The modules a row needs beyond convlens' own dependencies."""
    ov = ("openvino",) if row_options(row).get("runtime") == "openvino" else ()
    return NEEDS.get(row, ()) + ov


def not_run(row: str, opts: argparse.Namespace) -> str:
    """Why a peer row cannot run here ('' if it can)."""
    missing = [m for m in needs(row) if importlib.util.find_spec(m) is None]
    if missing:
        return f"not run: {', '.join(missing)} not installed (the [bench] extra)"
    if row == "P1" and not (opts.ovxai_python and Path(opts.ovxai_python).exists()):
        return "not run: no OpenVINO XAI venv (--ovxai-python, $CONVLENS_OVXAI_PYTHON)"
    return ""


def run_ovxai(model: str, folder: Path, opts: argparse.Namespace, repeats: int) -> dict:
    """Row P1 in the OpenVINO XAI venv (bench_ovxai.py, standalone)."""
    cfg, files = data.MODELS[model], data.model_files(model)
    cmd = [str(opts.ovxai_python), str(HERE / "bench_ovxai.py"), "--plain", str(files.plain)]
    cmd += ["--set", str(folder), "--size", str(cfg.size), "--preprocess", cfg.preprocess]
    cmd += ["--repeats", str(repeats), "--outdir", str(data.CACHE / "out" / f"{model}-ovxai")]
    return run_tagged(cmd, opts.timeout)


def measure(row: str, model: str, folder: Path, opts: argparse.Namespace, **kw: int) -> Result:
    method = ROWS[row][1]
    args = [method, "--model", model, "--set", str(folder)]
    args += ["--outdir", str(data.CACHE / "out" / f"{model}-{method}")]
    args += [f"--{k}={v}" for k, v in kw.items()]
    log(f"[{model}] {row:>2} {method} ...")
    if why := not_run(row, opts):
        out: dict = {"error": why}
    elif row == "P1":
        out = run_ovxai(model, folder, opts, kw.get("repeats", 1))
    else:
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


def prepare_torch(model: str, rebuild: bool, timeout: float) -> None:
    """The PyTorch rebuild's weights, written from the .keras file once (row P2)."""
    weights = data.model_files(model).keras.with_suffix(".torch.npz")
    if importlib.util.find_spec("torch") is None or (weights.exists() and not rebuild):
        return
    out = run_worker(["prepare_torch", "--model", model], timeout)
    if "error" in out:
        log(f"[{model}] PyTorch weights: {out['error']}")


def bench_model(model: str, n: int, opts: argparse.Namespace) -> list[Result]:
    folder = data.image_set(n, n)
    R = opts.repeats
    nb = opts.notebook_images or (1 if opts.quick else data.MODELS[model].notebook_images)
    results = [measure("1", model, folder, opts, repeats=1, limit=min(nb, n))]
    bf16 = _has_bf16()
    rows = ["2", "3", "3v", "3vb", "3a", "D", "P1", "P2"]
    rows += [r for r in CONVLENS_ROWS if r != "4'b" and (bf16 or not _bf16_row(r))]
    rows += ["4'b"] if opts.diagnose else []
    for row in rows:
        results.append(measure(row, model, folder, opts, repeats=R))
    return results


def _bf16_row(row: str) -> bool:
    return row_options(row).get("precision") == "bf16"


def _has_bf16() -> bool:
    """Whether the bf16 rows can run: OpenVINO installed, the CPU with native bf16."""
    if importlib.util.find_spec("openvino") is None:
        return False
    from convlens.engine.runtime_ov import has_bf16

    return has_bf16()


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


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--images",
        type=_images,
        help="images per model: N for every model, or small=N,vgg=M (default: small 300, vgg 64)",
    )
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
    p.add_argument(
        "--ovxai-python",
        default=os.environ.get("CONVLENS_OVXAI_PYTHON") or str(DEFAULT_OVXAI),
        help="the python of a venv with openvino-xai (row P1) [default: $CONVLENS_OVXAI_PYTHON, "
        "else /work/venvs/ovxai/bin/python]",
    )
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


def _images(text: str) -> dict[str, int] | int:
    if "=" not in text:
        return int(text)
    return {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(","))}


def images_for(model: str, opts: argparse.Namespace) -> int:
    if isinstance(opts.images, int):
        return opts.images
    if opts.images and model in opts.images:
        return int(opts.images[model])
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
        prepare_torch(m, opts.rebuild, opts.timeout)
        if took:
            notes.append(f"{m}: built/exported this run: " + json.dumps(took))
    shutil.rmtree(data.CACHE / "out", ignore_errors=True)  # a past run's; none during it
    try:
        all_results = {m: bench_model(m, counts[m], opts) for m in opts.models}
        scale = None
        if sizes := scale_sizes(opts):
            sm = opts.scale_model or opts.models[0]
            scale = (sm, scaling(sm, sizes, n_photos, opts))
    finally:
        shutil.rmtree(data.CACHE / "out", ignore_errors=True)
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
        "Rows 1, 2, P1, P2 and 4* time everything from the model file and the image files to "
        "the results (model loading, decoding, session creation included); 3, 3v, 3vb, 3a, D "
        "are components (session creation and the decoding of their inputs excluded).",
        "convlens computes in float32 on every runtime (OpenVINO's bf16 default moved CAM "
        "gradients by per cents); 3vb and P1 run OpenVINO's defaults, bf16 on this CPU, "
        "hence L*f32 beside L*.",
        "Peak RSS is each worker process's VmHWM (one process per row, all its repeats), so "
        "it includes the interpreter and the libraries a method imports (TensorFlow for "
        "rows 1 and 2 only).",
        "Random weights, but the last Dense layer is rescaled so that predictions are "
        "confident and varied, as a trained model's are: the report draws activation grids "
        f"for the first --grid-sample ({GRID_SAMPLE}) images and for at most {GRID_NOTABLE} "
        "misclassified or unsure ones (--grid-notable), the dearest part of the report rows "
        "on VGG16.",
        "Every timed run writes into a directory never used before and nothing is deleted "
        "until the end: ext4 skips recently deleted inodes when it creates files, which "
        "cost the report rows seconds of system time after rm -rf of the previous repeat.",
        "The machine's speed drifts by up to 1.7x between runs (3vb ran at 1325 and 781 "
        "img/s in two runs an hour apart): compare rows within one run.",
    ]


if __name__ == "__main__":
    sys.exit(main())
