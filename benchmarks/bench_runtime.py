"""The runtimes' session options, measured on the two benchmark models.

    python benchmarks/bench_runtime.py [--models small,vgg] [--images N] [--repeats R]
                                       [--output benchmarks/RUNTIME.md]

Every variant runs the graph the engine runs by default (the analysis ONNX pruned to
predictions, CAM tensor, gradients of the top 3 and the in-graph statistics:
``engine.infer.main_outputs``, ``engine.graph.with_stats``) and the plain tf2onnx export,
over the same preprocessed photos in batches of 32, in memory (decoding excluded).  The
variants' repeats are interleaved (repeat 1 of every variant, then repeat 2, ...), so a
shared machine's load drifts over all of them alike; img/s is the median.

Each repeat opens each variant's session, warms it up on one batch (not timed), times
the batches and closes it: one session alive at a time (VGG's hold GBs each).

Variants: onnxruntime's graph optimisation level (basic, extended, all), intra-op spinning,
threads (one against the default, one per core), plain ``run`` against I/O binding;
OpenVINO's PERFORMANCE_HINT (LATENCY, THROUGHPUT with one request and with two requests
in flight), NUM_STREAMS, INFERENCE_PRECISION_HINT (f32, the CPU's default bf16), CPU
pinning.  The largest difference between each variant's outputs and onnxruntime's
defaults is reported too (precision changes outputs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import bench_data as data
import numpy as np
from bench_methods import BATCH, preloaded

HERE = Path(__file__).resolve().parent
Runner = Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]]


@dataclass
class Variant:
    name: str
    graph: str  # "analysis" or "plain"
    make: Callable[[bytes], Runner]
    seconds: list[float] = field(default_factory=list)
    max_rel: float = float("nan")  # largest |out - ref| / max|ref| over outputs
    error: str = ""


def ort_runner(level: str = "all", spin: bool = False, threads: int = 0, bind: bool = False):
    def make(model: bytes) -> Runner:
        import onnxruntime as ort

        from convlens.engine.runtime import OrtSession, session_options

        opts = session_options(threads or None)
        opts.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        return OrtSession(sess, "cpu", None, bind=bind).run

    return make


def ov_runner(requests: int = 1, **config: str):
    def make(model: bytes) -> Runner:
        from convlens.engine.runtime_ov import CONFIG, OvSession, compile_model

        compiled = compile_model(model, config=CONFIG | config)
        if requests == 1:
            return OvSession(compiled, None).run
        return _async_runner(compiled, requests)

    return make


def _async_runner(compiled, requests: int) -> Runner:
    """Batches split over ``requests`` requests in flight (THROUGHPUT's use case)."""
    import openvino as ov

    queue = ov.AsyncInferQueue(compiled, requests)
    ports = {n: o for o in compiled.outputs for n in o.get_names()}

    def run(names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        n = len(next(iter(feeds.values())))
        parts = np.array_split(np.arange(n), requests)
        got: dict[int, list[np.ndarray]] = {}

        def done(req, i: int) -> None:
            got[i] = [np.array(req.get_tensor(ports[k]).data, copy=True) for k in names]

        queue.set_callback(done)
        for i, idx in enumerate(parts):
            queue.start_async({k: np.ascontiguousarray(v[idx]) for k, v in feeds.items()}, i)
        queue.wait_all()
        return [np.concatenate([got[i][j] for i in range(len(parts))]) for j in range(len(names))]

    return run


def variants() -> list[Variant]:
    out = [
        Variant("onnxruntime: level all, no spinning, default threads", "analysis", ort_runner()),
        Variant("onnxruntime: level extended", "analysis", ort_runner("extended")),
        Variant("onnxruntime: level basic", "analysis", ort_runner("basic")),
        Variant("onnxruntime: spinning on", "analysis", ort_runner(spin=True)),
        Variant("onnxruntime: 1 thread", "analysis", ort_runner(threads=1)),
        Variant("onnxruntime: I/O binding", "analysis", ort_runner(bind=True)),
        Variant("OpenVINO: f32, LATENCY, no pinning (convlens' default)", "analysis", ov_runner()),
        Variant(
            "OpenVINO: f32, THROUGHPUT, 1 request",
            "analysis",
            ov_runner(PERFORMANCE_HINT="THROUGHPUT"),
        ),
        Variant(
            "OpenVINO: f32, THROUGHPUT, 2 requests in flight",
            "analysis",
            ov_runner(2, PERFORMANCE_HINT="THROUGHPUT"),
        ),
        Variant(
            "OpenVINO: f32, LATENCY, NUM_STREAMS 2, 2 requests",
            "analysis",
            ov_runner(2, NUM_STREAMS="2"),
        ),
        Variant(
            "OpenVINO: f32, LATENCY, CPU pinning on (the plugin's default)",
            "analysis",
            ov_runner(ENABLE_CPU_PINNING="YES"),
        ),
        Variant(
            "OpenVINO: bf16 (the CPU plugin's default here), LATENCY",
            "analysis",
            ov_runner(INFERENCE_PRECISION_HINT="bf16"),
        ),
        Variant("plain export, onnxruntime defaults", "plain", ort_runner()),
        Variant("plain export, OpenVINO f32 LATENCY", "plain", ov_runner()),
        Variant(
            "plain export, OpenVINO bf16 LATENCY",
            "plain",
            ov_runner(INFERENCE_PRECISION_HINT="bf16"),
        ),
    ]
    if not _have_openvino():
        out = [v for v in out if "OpenVINO" not in v.name]
    return out


def _have_openvino() -> bool:
    from convlens.engine.runtime_ov import available

    return available()


def graphs(model: str) -> tuple[dict[str, bytes], list[str], list[str], int]:
    """The analysis graph as the default run serves it, the plain export, their outputs."""
    import onnx

    from convlens.engine.graph import with_stats
    from convlens.engine.infer import main_outputs
    from convlens.engine.plan import RunPlan

    files = data.model_files(model)
    plan = RunPlan.build(files.analysis)
    names = main_outputs(plan)
    analysis = with_stats(onnx.load(str(files.analysis)), plan.spec, keep=names)
    plain = files.plain.read_bytes()
    plain_out = [o.name for o in onnx.load(str(files.plain)).graph.output]
    return {"analysis": analysis, "plain": plain}, names, plain_out, plan.top_k


def bench(model: str, n: int, repeats: int, only: list[str] | None = None) -> list[Variant]:
    from convlens.engine import contract as C

    files = data.model_files(model)
    x = preloaded(files.analysis, data.set_files(data.image_set(n, n)))
    protos, names, plain_out, k = graphs(model)
    vs = [v for v in variants() if only is None or any(w in v.name for w in only)]
    feeds: dict[str, list[dict[str, np.ndarray]]] = {}
    targets = np.tile(-(np.arange(k, dtype=np.int64) + 1), (BATCH, 1))
    plain_in = _plain_input(files.plain)
    for graph in ("analysis", "plain"):
        feeds[graph] = []
        for i in range(0, len(x), BATCH):
            xb = x[i : i + BATCH]
            if graph == "plain":
                feeds[graph].append({plain_in: xb})
            else:
                feeds[graph].append({C.IN_IMAGE: xb, C.IN_TARGETS: targets[: len(xb)]})
    outs = {"analysis": names, "plain": plain_out}
    ref: dict[str, list[np.ndarray]] = {}
    for r in range(repeats):
        for v in vs:
            if v.error:
                continue
            try:  # one session alive at a time (VGG's sessions hold GBs each)
                run = v.make(protos[v.graph])
                first = run(outs[v.graph], feeds[v.graph][0])  # warm-up, not timed
            except Exception as exc:  # a variant the runtime refuses is reported, not fatal
                v.error = str(exc).strip().splitlines()[0][:120]
                continue
            if r == 0:
                ref.setdefault(v.graph, first)
                v.max_rel = max(
                    float(
                        np.abs(a.astype(np.float64) - b).max() / max(float(np.abs(b).max()), 1e-12)
                    )
                    for a, b in zip(first, ref[v.graph], strict=True)
                )
            t0 = time.perf_counter()
            for f in feeds[v.graph]:
                run(outs[v.graph], f)
            v.seconds.append(time.perf_counter() - t0)
            del run, first
        print(f"[{model}] repeat {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return vs


def _plain_input(path: Path) -> str:
    import onnx

    g = onnx.load(str(path)).graph
    inits = {i.name for i in g.initializer}
    return next(i.name for i in g.input if i.name not in inits)


def table(model: str, n: int, vs: list[Variant]) -> list[str]:
    base = {
        g: next((v for v in vs if v.graph == g and not v.error), None)
        for g in ("analysis", "plain")
    }
    lines = [
        f"### {model} ({n} images, batches of {BATCH})",
        "",
        "| graph | variant | img/s | vs first row of its graph | max rel. diff | s per repeat |",
        "|---|---|---:|---:|---:|---|",
    ]
    for v in vs:
        if v.error:
            lines.append(f"| {v.graph} | {v.name} | - | - | - | {v.error} |")
            continue
        rate = n / statistics.median(v.seconds)
        b = base[v.graph]
        ratio = rate / (n / statistics.median(b.seconds)) if b else float("nan")
        secs = ", ".join(f"{s:.2f}" for s in v.seconds)
        lines.append(
            f"| {v.graph} | {v.name} | {rate:.1f} | {ratio:.2f} | {v.max_rel:.1e} | {secs} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="small,vgg")
    p.add_argument("--images", type=int, help="default: small 256, vgg 64")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", type=Path, default=HERE / "RUNTIME.md")
    p.add_argument("--only", help="comma-separated substrings: run the variants naming one")
    opts = p.parse_args(argv)
    command = shlex.join(
        ["python", "benchmarks/bench_runtime.py", *(sys.argv[1:] if argv is None else argv)]
    )
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    load0 = os.getloadavg()[0]
    lines = ["# Runtime session options", ""]
    body: list[str] = []
    for model in [m.strip() for m in opts.models.split(",") if m.strip()]:
        data.ensure_model(model)
        n = opts.images or {"small": 256, "vgg": 64}[model]
        only = [w.strip() for w in opts.only.split(",")] if opts.only else None
        body += [*table(model, n, bench(model, n, opts.repeats, only)), ""]
        opts.output.write_text("\n".join([*lines, *body]))  # what is measured so far
    lines += [
        f"- command: `{command}`",
        f"- date: {started}; load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end "
        f"(a shared machine: compare rows within one table)",
        f"- {os.cpu_count()} cores; repeats {opts.repeats}, interleaved; medians",
        "- max rel. diff: the largest |output - first row's| / max |first row's| over the "
        "outputs, on the first batch",
        "",
        *body,
    ]
    text = "\n".join(lines)
    print(text)
    opts.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
