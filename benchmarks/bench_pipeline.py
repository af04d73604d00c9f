"""``convlens run`` with each pipeline lever on and off, side by side in one run.

    python benchmarks/bench_pipeline.py MODEL.onnx IMAGES_DIR [--repeats 3] [--configs a,b]
                                        [--out table.md]

Every configuration runs in its own process (``pipeline.analyze`` end to end, report
rendering included, device cpu), the configurations interleaved repeat by repeat, so
that a busy machine slows them alike; the table gives the median wall time in img/s,
the engine's own img/s, the process's CPU time (user + system, all threads) per image
(what a shared machine disturbs least: on a saturated CPU, throughput is the cores
over it), peak RSS, OUTDIR size per image and the ratios to the first configuration.  The levers (issue 10):

* ``report_thread``: the report's files encoded and written on a thread behind a
  bounded queue (``reports.assets.REPORT_WORKERS``; 0 = inside ``on_batch``, as before)
* ``forward_ahead``: each batch's forward pass (session + CAM maps) on a thread, one
  batch ahead of the records, files and sinks of the one before (``engine.run.FORWARD_AHEAD``;
  off: inline, as before)
* ``grid_cap``: at most ``GRID_NOTABLE`` misclassified/unsure images get grids besides
  the first ``grid_sample`` (off: no cap, as before)
* ``fast_decode``: ``--fast-decode`` (libjpeg DCT-domain downscaling)
* ``stats_every``: ``--stats-every K``
* ``workers`` / ``threads``: decode threads and onnxruntime intra-op threads

``--costs`` instead times decoding (full and fast) and the session with and without
statistics in isolation (ms per image); ``--stats-check K`` compares ``--stats-every K`` with exact statistics, and
``--decode-check`` compares the fast decode with the full one on the images:
max and mean absolute difference of the model input, top-1 agreement and the
correlation of the top-1 Grad-CAM/CAM maps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BASE: dict[str, Any] = {  # the defaults before issue 10's pipeline work
    "report": True,
    "report_thread": False,
    "grid_cap": False,
    "forward_ahead": False,
    "fast_decode": False,
    "stats_every": 1,
    "workers": os.cpu_count() or 1,  # None: by device (decode.decode_workers)
    "threads": None,
    "cam": None,
    "top_k": 3,
}
ALL_ON = {"report_thread": True, "grid_cap": True, "fast_decode": True, "stats_every": 8}
FWD = {"report_thread": True, "grid_cap": True, "forward_ahead": True}
NEW = {**FWD, "report_thread": 2, "workers": None}  # today's defaults
G1 = {"report": False, "cam": "gradcam", "top_k": 1}
CONFIGS: dict[str, dict[str, Any]] = {
    "before (defaults of 5b8dfc6^)": {},
    "+ report thread": {"report_thread": True},
    "+ report thread + grid cap": {"report_thread": True, "grid_cap": True},
    "+ fast decode": {"report_thread": True, "grid_cap": True, "fast_decode": True},
    "+ stats every 8": {"report_thread": True, "grid_cap": True, "stats_every": 8},
    "all levers": ALL_ON,
    "no report": {"report": False},
    "no report, all levers": {"report": False, **ALL_ON},
    "gradcam top-1, no report": G1,
    "gradcam top-1, no report, all levers": {**G1, **ALL_ON},
    "+ forward thread": FWD,
    "+ forward thread, 2 report threads": {**FWD, "report_thread": 2},
    "+ forward thread, 2 report threads, decode threads by device (new defaults)": NEW,
    "gradcam top-1, no report, forward thread, decode threads by device": {
        **G1,
        "forward_ahead": True,
        "workers": None,
    },
    "gradcam top-1, no report, forward thread": {**G1, "forward_ahead": True},
    "gradcam top-1, no report, forward thread, 1 thread": {
        **G1,
        "forward_ahead": True,
        "threads": 1,
    },
    "gradcam top-1, no report, forward thread, all levers": {**G1, **ALL_ON, "forward_ahead": True},
    "gradcam top-1, no report, forward thread, all levers, 1 thread": {
        **G1,
        **ALL_ON,
        "forward_ahead": True,
        "threads": 1,
    },
}


def one(model: str, images: str, cfg: dict[str, Any], scratch: str) -> dict[str, Any]:
    """One configuration in this process (the child's side)."""
    import convlens.engine.run as run
    import convlens.reports.assets as assets
    import convlens.reports.gridpolicy as gridpolicy
    from convlens.engine.run import RunOptions
    from convlens.reports import render_report

    assets.REPORT_WORKERS = int(cfg["report_thread"])  # True: 1 thread
    run.FORWARD_AHEAD = 1 if cfg["forward_ahead"] else 0
    notable = gridpolicy.GRID_NOTABLE if cfg["grid_cap"] else 10**9
    opts = RunOptions(
        device="cpu",
        workers=cfg["workers"],
        threads=cfg["threads"],
        stats_every=cfg["stats_every"],
        fast_decode=cfg["fast_decode"],
        cam_methods=[cfg["cam"]] if cfg["cam"] else None,
        top_k=cfg["top_k"],
    )
    # a directory never used before; the parent deletes them all at the end, not
    # between runs (bench_rivals.fresh_dir: ext4 and recently deleted inodes)
    out = Path(tempfile.mkdtemp(dir=scratch, prefix="run-"))
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    # convlens.pipeline.analyze's two steps, with the sink's grid cap as configured
    sinks = [assets.ReportAssetSink(grid_notable=notable)] if cfg["report"] else []
    summary = run.run(model, [images], out / "o", opts, sinks=sinks)
    if cfg["report"]:
        render_report(out / "o")
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    size = sum(p.stat().st_size for p in (out / "o").rglob("*") if p.is_file())
    grids = out / "o" / "assets" / "grids"
    gridded = sum(1 for d in grids.iterdir() if any(d.iterdir())) if grids.is_dir() else 0
    n = summary.processed
    return {
        "images": n,
        "wall": wall,
        "engine": summary.seconds,
        "cpu": cpu,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "kb_per_image": size / 1024 / max(n, 1),
        "grid_images": gridded,
    }


def decode_check(model: str, images: str) -> dict[str, Any]:
    """Fast against full decoding on the same images: the model input and the results."""
    import numpy as np

    from convlens.engine import contract as C
    from convlens.engine.cams import normalize
    from convlens.engine.decode import DecodePool
    from convlens.engine.images import discover
    from convlens.engine.infer import Inference
    from convlens.engine.plan import RunOptions, RunPlan
    from convlens.engine.stats import ClassCAMs, RunStats

    files = discover([images]).files
    got = {}
    for fast in (False, True):
        plan = RunPlan.build(model, RunOptions(device="cpu", fast_decode=fast, top_k=1))
        pool = DecodePool(plan, keep_images=False)
        decoded = [pool.decode(i, f, [Path(images)]) for i, f in enumerate(files)]
        x = np.stack([d.tensor for d in decoded])  # type: ignore[misc]
        inf = Inference(plan, Path(tempfile.mkdtemp()), [])
        outs = []
        for s in range(0, len(decoded), 32):
            outs += inf.run(decoded[s : s + 32], RunStats(), ClassCAMs())
        top = np.array([o.record.predictions[0].index for o in outs])
        method = plan.methods[0]
        maps = np.stack(
            [normalize(o.maps[(method, int(t))][None])[0] for o, t in zip(outs, top, strict=True)]
        )
        got[fast] = (x, top, maps, method)
    (x0, t0, m0, method), (x1, t1, m1, _) = got[False], got[True]
    d = np.abs(x1 - x0)
    same = t0 == t1
    pairs = [(a, b) for a, b in zip(m0[same], m1[same], strict=True) if a.std() and b.std()]
    r = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in pairs]
    return {
        "images": len(files),
        "input_scale": C.read_spec(Path(model)).preprocess.kind,
        "max_abs_diff": float(d.max()),
        "mean_abs_diff": float(d.mean()),
        "top1_agreement": float(same.mean()),
        "method": method,
        "map_r_median": float(np.median(r)) if r else float("nan"),
        "map_r_min": float(np.min(r)) if r else float("nan"),
        "maps_compared": len(r),  # top-1 agreeing, neither map constant (all zero)
    }


def stats_check(model: str, images: str, every: int) -> dict[str, Any]:
    """--stats-every ``every`` against every image: per layer, the largest relative error
    of a channel's mean (over channels whose exact mean is at least 1 % of the layer's
    largest), the largest absolute error of a zero fraction, the max's largest relative
    shortfall, and dead channels that only the sample calls dead."""
    import numpy as np

    from convlens.engine.run import RunOptions, run

    got = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, every):
            opts = RunOptions(device="cpu", stats_every=k, top_k=1)
            run(model, [images], Path(tmp) / str(k), opts, progress=False)
            got[k] = json.loads((Path(tmp) / str(k) / "stats.json").read_text())
    out: dict[str, Any] = {"every": every, "layers": {}}
    for layer, exact in got[1].items():
        est = got[every][layer]
        m0, m1 = (np.array(d["mean"], float) for d in (exact, est))
        big = m0 >= 0.01 * m0.max() if m0.max() > 0 else np.ones_like(m0, bool)
        x0, x1 = (np.array(d["max"], float) for d in (exact, est))
        z0, z1 = (np.array(d["zero_fraction"], float) for d in (exact, est))
        out["layers"][layer] = {
            "images": [exact["count"], est["count"]],
            "mean_rel_err_max": float(np.max(np.abs(m1 - m0)[big] / m0[big])),
            "mean_rel_err_median": float(np.median(np.abs(m1 - m0)[big] / m0[big])),
            "zero_fraction_abs_err_max": float(np.max(np.abs(z1 - z0))),
            "max_shortfall_rel_max": float(np.max((x0 - x1) / np.where(x0 > 0, x0, 1))),
            "dead_only_in_sample": sorted(set(est["dead"]) - set(exact["dead"])),
        }
    return out


def costs(model: str, images: str, repeats: int) -> dict[str, float]:
    """ms per image, median over ``repeats``, interleaved: decoding + preprocessing a
    photo (CPU time, one thread) full and with --fast-decode; the main session on one
    thread for a batch of 16 with statistics over every image, none, and 2 rows of 16
    (--stats-every 8's share)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from convlens.engine import contract as C
    from convlens.engine.decode import DISPLAY_MIN
    from convlens.engine.graph import STATS_PREFIX, STATS_ROWS, with_stats
    from convlens.engine.images import Preprocessor, discover, read_image_shrunk
    from convlens.engine.infer import main_outputs
    from convlens.engine.plan import RunOptions, RunPlan

    plan = RunPlan.build(model, RunOptions(device="cpu"))
    spec = plan.spec
    pre = Preprocessor(spec.input, spec.preprocess)
    files = discover([images]).files[:64]
    side = max(spec.input.height, spec.input.width)
    shrink = {"decode full": None, "decode fast": (side, DISPLAY_MIN)}
    proto = onnx.load(model)
    names = main_outputs(plan)
    plain = [n for n in names if not n.startswith(STATS_PREFIX)]
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1

    def session(rows: bool) -> ort.InferenceSession:
        graph = with_stats(proto, spec, keep=names, rows=rows)
        return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])

    every, sampled = session(False), session(True)
    x = np.random.default_rng(0).random((16, spec.input.height, spec.input.width, 3))
    feeds = {C.IN_IMAGE: (x * 255).astype(np.float32), C.IN_TARGETS: plan.targets(16)}
    runs = {
        "session, stats every image": (every, names, feeds),
        "session, no stats": (sampled, plain, feeds | {STATS_ROWS: np.array([0])}),
        "session, stats on 2 of 16": (sampled, names, feeds | {STATS_ROWS: np.array([2])}),
    }
    got: dict[str, list[float]] = {k: [] for k in (*shrink, *runs)}
    for _ in range(repeats):
        for k, sh in shrink.items():
            t0 = time.process_time()
            for f in files:
                pre(read_image_shrunk(f, 0, sh)[0])
            got[k].append((time.process_time() - t0) / len(files) * 1e3)
        for k, (sess, outs, fd) in runs.items():
            t0 = time.perf_counter()
            sess.run(outs, fd)
            got[k].append((time.perf_counter() - t0) / 16 * 1e3)
    return {k: round(statistics.median(v), 2) for k, v in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("images")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", help="comma-separated indices into the list (default: all)")
    ap.add_argument("--set", action="append", default=[], help="KEY=JSON for every config")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--decode-check", action="store_true")
    ap.add_argument("--stats-check", type=int, metavar="K")
    ap.add_argument("--costs", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(a.model, a.images, json.loads(a.one), a.scratch)))
        return
    if a.costs:
        print(json.dumps(costs(a.model, a.images, a.repeats), indent=1))
        return
    if a.stats_check:
        print(json.dumps(stats_check(a.model, a.images, a.stats_check), indent=1))
        return
    if a.decode_check:
        print(json.dumps(decode_check(a.model, a.images), indent=1))
        return
    names = list(CONFIGS)
    if a.configs:
        names = [names[int(i)] for i in a.configs.split(",")]
    common = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    scratch = tempfile.mkdtemp(prefix="bench_pipeline_")
    try:
        for rep in range(a.repeats):
            for n in names:
                cfg = BASE | CONFIGS[n] | common
                cmd = [sys.executable, __file__, a.model, a.images, "--one", json.dumps(cfg)]
                p = subprocess.run([*cmd, "--scratch", scratch], capture_output=True, text=True)
                line = [s for s in p.stdout.splitlines() if s.startswith("RESULT ")]
                if not line:
                    raise SystemExit(f"{n}: {p.stderr.strip().splitlines()[-1:]}")
                runs[n].append(json.loads(line[0][7:]))
                r = runs[n][-1]
                print(f"[{rep}] {n}: {r['images'] / r['wall']:.1f} img/s", file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = [
        "| configuration | img/s end to end | engine img/s | x first | CPU ms/image | "
        "x first | peak RSS MB | OUTDIR KB/image | grid images |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    first = first_cpu = None
    for n in names:
        rs = runs[n]
        rate = statistics.median(r["images"] / r["wall"] for r in rs)
        eng = statistics.median(r["images"] / r["engine"] for r in rs)
        cpu = statistics.median(1000 * r["cpu"] / r["images"] for r in rs)
        first, first_cpu = first or rate, first_cpu or cpu
        last = rs[-1]
        rows.append(
            f"| {n} | {rate:.1f} | {eng:.1f} | {rate / first:.2f} | {cpu:.1f} | "
            f"{cpu / first_cpu:.2f} | {last['peak_mb']:.0f} | {last['kb_per_image']:.0f} | "
            f"{last['grid_images']} |"
        )
    table = "\n".join(rows)
    print(table)
    if a.out:
        a.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
