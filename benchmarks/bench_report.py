"""benchmarks/bench.py's rows and its Markdown: per-model tables, the ratios against L, L*
and every peer, the issue's goals, scaling, the machine.

    L  = 1 / (1/I + 1/D)    I: onnxruntime alone on the plain export (row 3)
    L* = 1 / (1/I* + 1/D)   I*: the fastest runtime on the plain export (rows 3, 3v, 3vb)
    L*f32: the same over the float32 rows (3, 3v), the precision convlens computes in
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent

ROWS = {  # key: (label, worker method)
    "1": ("notebook recipe (Keras, 1 image at a time, matplotlib grids)", "notebook"),
    "2": ("Keras batched: tf.data + predict + Grad-CAM (tape), batch 32", "keras"),
    "3": ("onnxruntime alone, plain export (I)", "ort_plain"),
    "3v": ("OpenVINO alone, plain export, f32", "ov_plain"),
    "3vb": ("OpenVINO alone, plain export, its default precision", "ov_plain_default"),
    "3a": ("onnxruntime alone, analysis ONNX, every output", "ort_analysis"),
    "D": ("decode + preprocess alone, all cores (D)", "decode"),
    "P1": ("OpenVINO XAI, ActivationMap inserted, batch 32", "ovxai"),
    "P2": ("pytorch-grad-cam GradCAM, PyTorch rebuild, batch 32", "torch_gradcam"),
    "4": ("convlens run (analyze, report)", "convlens"),
    "4v": ("convlens run (analyze, report), --runtime openvino", "convlens_ov"),
    "4'": ("convlens run, report=False", "convlens_noreport"),
    "4'v": ("convlens run, report=False, --runtime openvino", "convlens_noreport_ov"),
    "4g": ("convlens run --cam gradcam --top-k 1 --no-report --save-maps", "convlens_one"),
    "4gv": ("the same, --runtime openvino", "convlens_one_ov"),
    "4bf": ("convlens run (analyze, report), --precision bf16 (OpenVINO)", "convlens_bf16"),
    "4gbf": ("4g with --precision bf16 (OpenVINO)", "convlens_one_bf16"),
    "4x": ("4 with every opt-in lever: bf16, --stats-every 8, --fast-decode", "convlens_fast"),
    "4gx": ("4g with the same levers", "convlens_one_fast"),
    "4gs": ("4g with --stats-every 0 (maps exact, no statistics)", "convlens_one_nostats"),
    "4gn": ("4g with bf16, --fast-decode and --stats-every 0", "convlens_one_bare"),
    "4'b": ("convlens run, report=False, OPENBLAS_NUM_THREADS=1", "convlens_noreport"),
}
CONVLENS_ROWS = ("4", "4v", "4'", "4'v", "4g", "4gv", "4bf", "4gbf", "4x", "4gx", "4gs", "4gn")
CONVLENS_ROWS += ("4'b",)
#: a convlens worker method's suffix: the RunOptions fields it adds to the base method's
SUFFIXES: dict[str, dict[str, object]] = {
    "": {},
    "_ov": {"runtime": "openvino"},
    "_bf16": {"runtime": "openvino", "precision": "bf16"},
    # every opt-in speed lever at once (their accuracy costs: README, Speed)
    "_fast": {"runtime": "openvino", "precision": "bf16", "stats_every": 8, "fast_decode": True},
    # no activation statistics: the maps as exact as the default run's
    "_nostats": {"stats_every": 0},
    # maps only, every lever that speeds them
    "_bare": {"runtime": "openvino", "precision": "bf16", "stats_every": 0, "fast_decode": True},
}


def split_method(method: str) -> tuple[str, str]:
    """``convlens_one_bf16`` -> (``convlens_one``, ``_bf16``)."""
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if suffix and method.endswith(suffix):
            return method.removesuffix(suffix), suffix
    return method, ""


def row_options(row: str) -> dict[str, object]:
    """The RunOptions fields a convlens row's suffix adds (``{}`` for other rows)."""
    return SUFFIXES[split_method(ROWS[row][1])[1]] if row in CONVLENS_ROWS else {}


PEERS = (("2", "Keras"), ("P1", "OV XAI"), ("P2", "pt-grad-cam"), ("1", "notebook"))


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


def limits(by: dict[str, float]) -> dict[str, float]:
    """L, L*f32 and L* from the rows' rates (nan where a row is missing)."""
    nan = float("nan")

    def best(rows: tuple[str, ...]) -> float:
        rates = [by.get(r, nan) for r in rows]
        rates = [r for r in rates if r == r]
        return max(rates) if rates else nan

    d = by.get("D", nan)
    return {
        "L": limit_rate(by.get("3", nan), d),
        "L*f32": limit_rate(best(("3", "3v")), d),
        "L*": limit_rate(best(("3", "3v", "3vb")), d),
    }


def model_table(model: str, results: list[Result]) -> list[str]:
    by = {r.row: r.rate for r in results}
    lim = limits(by)
    lines = [
        f"### {model}",
        "",
        "| # | method | images | img/s | peak RSS MiB | s per repeat | notes |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        if r.row == "P1":
            lines.append(f"| L | limit 1/(1/I + 1/D) | | {fmt(lim['L'])} | | | |")
            lines.append(
                f"| L*f32 | the same, I* over the f32 runtimes | | {fmt(lim['L*f32'])} | | | |"
            )
            lines.append(f"| L* | the same, I* over every runtime | | {fmt(lim['L*'])} | | | |")
        secs = ", ".join(f"{s:.2f}" for s in r.seconds)
        note = r.error or "; ".join([r.note, *(f"{k}={v}" for k, v in r.extra.items())])
        lines.append(
            f"| {r.row} | {ROWS[r.row][0]} | {r.images} | {fmt(r.rate)} | "
            f"{fmt(r.peak_mb)} | {secs} | {note} |"
        )
    return lines


def ratios(all_results: dict[str, list[Result]]) -> list[str]:
    """Every convlens row over L, L*f32, L*, and over each peer."""
    heads = ["/L", "/L*f32", "/L*", *(f"/{p} ({name})" for p, name in PEERS)]
    lines = [
        "| model | row | img/s | " + " | ".join(heads) + " |",
        "|---|---|---:|" + "---:|" * len(heads),
    ]
    for model, results in all_results.items():
        by = {r.row: r.rate for r in results}
        lim = limits(by)
        for row in CONVLENS_ROWS:
            if row not in by:
                continue
            v = by[row]
            cells = [v / lim["L"], v / lim["L*f32"], v / lim["L*"]]
            cells += [v / by.get(p, float("nan")) for p, _ in PEERS]
            lines.append(
                f"| {model} | {row} | {fmt(v)} | " + " | ".join(fmt(c) for c in cells) + " |"
            )
    return lines


#: the issue's goals: (name, row, over: "L*" or the peer row, bar the ratio must reach)
GOALS: tuple[tuple[str, str, str, float], ...] = (
    ("4g (one method, top-1, no report) >= 0.95 L*", "4g", "L*", 0.95),
    ("4 (the full default run, report) >= 0.8 L*", "4", "L*", 0.8),
    ("4 faster than OpenVINO XAI (4 / P1 > 1)", "4", "P1", 1),
    ("4 faster than Keras batched (4 / 2 > 1)", "4", "2", 1),
    ("4g faster than OpenVINO XAI (4g / P1 > 1)", "4g", "P1", 1),
    ("4g faster than Keras batched (4g / 2 > 1)", "4g", "2", 1),
    # the same goals for the opt-in bf16 rows (their accuracy: README, Speed)
    ("opt-in: 4gbf >= 0.95 L*", "4gbf", "L*", 0.95),
    ("opt-in: 4bf >= 0.8 L*", "4bf", "L*", 0.8),
    ("opt-in: 4gbf faster than OpenVINO XAI", "4gbf", "P1", 1),
    ("opt-in, every lever: 4gx >= 0.95 L*", "4gx", "L*", 0.95),
    ("opt-in, every lever: 4x >= 0.8 L*", "4x", "L*", 0.8),
    ("opt-in, every lever: 4gx faster than OpenVINO XAI", "4gx", "P1", 1),
    # maps only (--stats-every 0): exact in float32 (4gs), with bf16 and DCT decoding
    ("opt-in, no statistics: 4gs >= 0.95 L*", "4gs", "L*", 0.95),
    ("opt-in, no statistics: 4gs faster than OpenVINO XAI", "4gs", "P1", 1),
    ("opt-in, maps only, every lever: 4gn >= 0.95 L*", "4gn", "L*", 0.95),
    ("opt-in, maps only, every lever: 4gn faster than OpenVINO XAI", "4gn", "P1", 1),
)


def goals(all_results: dict[str, list[Result]]) -> list[str]:
    """The issue's goals (:data:`GOALS`), met or not, per model."""
    lines = ["| model | goal | measured | met |", "|---|---|---:|---|"]
    nan = float("nan")
    for model, results in all_results.items():
        by = {r.row: r.rate for r in results}
        by["L*"] = limits(by)["L*"]
        for name, row, over, bar in GOALS:
            value = by.get(row, nan) / by.get(over, nan)
            met = "-" if value != value else ("yes" if value >= bar else "**no**")
            lines.append(f"| {model} | {name} | {fmt(value)} | {met} |")
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
        "openvino": _version("openvino"),
        "tensorflow": _version("tensorflow", "tensorflow-cpu"),
        "keras": _version("keras"),
        "torch": _version("torch"),
        "grad-cam": _version("grad-cam"),
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
    lines += ["### ratios (img/s of each convlens row over the limits and the peers)", ""]
    lines += [*ratios(all_results), ""]
    lines += ["### the issue's goals (issue 10)", "", *goals(all_results), ""]
    if scale:
        lines += ["### scaling", "", *scaling_table(*scale), ""]
    lines += ["### notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)
