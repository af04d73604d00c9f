"""The GPU check behind benchmarks/device_check.sh (see there for how to run it).

1. Correctness, per model: the default run's graph (predictions, CAM tensor, gradients of
   the top 3, in-graph statistics) on onnxruntime's CPU provider and on CUDA, over the same
   preprocessed photos: top-1 equal for every image; every default CAM method's map per
   image and target with Pearson r >= 0.999; the statistics within 1e-3 relative.  Then
   ``convlens run --device cuda --save-maps`` end to end against ``--device cpu
   --runtime onnxruntime``: the same top-1 and maps r >= 0.999.
2. Speed on the GPU: onnxruntime CUDA alone on the plain export (I) and on the default
   run's graph, each with I/O binding (pinned host inputs, outputs bound on the device)
   and with plain ``run``; ``convlens run --device cuda`` (defaults without the report,
   and --cam gradcam --top-k 1) end to end; decoding alone (D) for L.

Writes device_check.md and device_check.json into ``--out``.  Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BATCH = 32
TARGET = ["cuda"]  # the device checked against the CPU (--device; cpu: a dry run)


def photos(limit: int) -> list[Path]:
    """The benchmark photos where carried over, else the bundled demo photos."""
    bench = sorted((HERE / ".cache" / "photos").glob("photo_*.jpg"))
    demo = sorted((ROOT / "convlens" / "demo" / "photos").rglob("*.jpg"))
    return (bench or demo)[:limit]


def models() -> dict[str, Path]:
    found = {"demo": ROOT / "convlens" / "demo" / "textures.onnx"}
    for name in ("small", "vgg"):
        hits = sorted((HERE / ".cache" / "models").glob(f"export-*/{name}.onnx"))
        if hits:
            found[name] = hits[-1]
    return found


def preprocessed(model: Path, files: list[Path]) -> np.ndarray:
    from convlens.engine import contract as C
    from convlens.engine.images import Preprocessor, read_image

    spec = C.read_spec(model)
    pre = Preprocessor(spec.input, spec.preprocess)
    return np.stack([pre(read_image(f)) for f in files])


def _r(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if a.std() < 1e-12 and b.std() < 1e-12:
        return 1.0 if np.allclose(a, b, atol=1e-6) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def graph_check(model: Path, x: np.ndarray) -> dict:
    """CPU vs CUDA on the default run's graph."""
    import onnx

    from convlens.engine import contract as C
    from convlens.engine.cams import METHODS
    from convlens.engine.graph import with_stats
    from convlens.engine.infer import main_outputs
    from convlens.engine.plan import RunPlan
    from convlens.engine.runtime import open_session

    plan = RunPlan.build(model)
    names = main_outputs(plan)
    graph = with_stats(onnx.load(str(model)), plan.spec, keep=names)
    outs = {}
    for key, dev in (("cpu", "cpu"), ("target", TARGET[0])):
        s = open_session(graph, dev, runtime="onnxruntime")
        got = [s.run(names, _feeds(s, x[i : i + BATCH], plan)) for i in range(0, len(x), BATCH)]
        outs[key] = {n: np.concatenate([g[j] for g in got]) for j, n in enumerate(names)}
    cpu, gpu = outs["cpu"], outs["target"]
    top1 = bool((cpu[C.OUT_PREDICTIONS].argmax(1) == gpu[C.OUT_PREDICTIONS].argmax(1)).all())
    weights = None
    if plan.spec.has_output(C.OUT_CAM_WEIGHTS):
        from convlens.engine.graph import pruned

        cs = open_session(pruned(onnx.load(str(model)), [C.OUT_CAM_WEIGHTS]), "cpu")
        weights = cs.run([C.OUT_CAM_WEIGHTS], {})[0]
    min_r: dict[str, float] = {}
    for m in plan.methods:
        maps = {}
        for key, o in outs.items():
            classes = o.get(C.OUT_TARGET_INDICES, cpu.get(C.OUT_TARGET_INDICES))
            maps[key] = METHODS[m].compute(
                o[plan.spec.cam_output], weights=weights, grads=o.get(C.OUT_GRADIENTS),
                classes=classes,
            )  # fmt: skip
        rs = [_r(a, b) for a, b in zip(maps["cpu"].reshape(-1, *maps["cpu"].shape[2:]),
                                       maps["target"].reshape(-1, *maps["target"].shape[2:]),
                                       strict=True)]  # fmt: skip
        min_r[m] = min(rs)
    stats = [n for n in names if n.startswith("stats/") and not n.endswith("/zeros")]
    stat_rel = max(
        (
            float(np.abs(cpu[n] - gpu[n]).max() / max(float(np.abs(cpu[n]).max()), 1e-12))
            for n in stats
        ),
        default=0.0,
    )
    ok = top1 and all(r >= 0.999 for r in min_r.values()) and stat_rel <= 1e-3
    return {"top1_equal": top1, "min_map_r": min_r, "stats_max_rel": stat_rel, "ok": ok}


def _feeds(session, x: np.ndarray, plan) -> dict[str, np.ndarray]:
    from convlens.engine import contract as C

    feeds = {C.IN_IMAGE: np.ascontiguousarray(x)}
    if C.IN_TARGETS in session.input_names:
        feeds[C.IN_TARGETS] = plan.targets(len(x))
    return feeds


def run_check(model: Path, folder: Path, out: Path) -> dict:
    """convlens run --device cuda --save-maps against --device cpu --runtime onnxruntime."""
    from convlens.engine.outdir import read_results
    from convlens.engine.plan import RunOptions
    from convlens.engine.run import run

    dirs, lines = {}, {}
    for key, dev in (("cpu", "cpu"), ("target", TARGET[0])):
        opts = RunOptions(device=dev, runtime="onnxruntime", save_maps=True, force=True)
        s = run(model, [str(folder)], out / f"run-{key}", opts, warn=lambda m: None)
        dirs[key], lines[key] = out / f"run-{key}", s.line()
    a = {r.id: r for r in read_results(dirs["cpu"]).records}
    b = {r.id: r for r in read_results(dirs["target"]).records}
    top1 = all(a[i].predictions[0].index == b[i].predictions[0].index for i in a)
    rs = []
    for i, ra in a.items():
        with np.load(dirs["cpu"] / ra.maps) as ma, np.load(dirs["target"] / b[i].maps) as mb:
            rs += [_r(ma[k], mb[k]) for k in ma.files]
    ok = top1 and min(rs) >= 0.999 and f"on {TARGET[0]} via onnxruntime" in lines["target"]
    return {"top1_equal": top1, "min_map_r": min(rs), "maps": len(rs), "lines": lines, "ok": ok}


def rate(fn, n: int, repeats: int) -> float:
    fn()  # warm-up (CUDA kernels, cuDNN algorithm search)
    secs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        secs.append(time.perf_counter() - t0)
    return n / statistics.median(secs)


def speed(name: str, model: Path, x: np.ndarray, folder: Path, out: Path, repeats: int) -> dict:
    import onnx

    from convlens.engine.graph import with_stats
    from convlens.engine.infer import main_outputs
    from convlens.engine.plan import RunOptions, RunPlan
    from convlens.engine.run import run
    from convlens.engine.runtime import open_session

    res: dict[str, float] = {}
    plan = RunPlan.build(model)
    names = main_outputs(plan)
    graphs = {"analysis": (with_stats(onnx.load(str(model)), plan.spec, keep=names), names)}
    plain = model.with_name(model.stem + ".plain.onnx")
    if plain.exists():
        pm = onnx.load(str(plain))
        graphs["plain"] = (plain.read_bytes(), [o.name for o in pm.graph.output])
    for g, (proto, outs) in graphs.items():
        for bind in (True, False):
            s = open_session(proto, TARGET[0], runtime="onnxruntime", bind=bind)
            inp = s.input_names[0]
            batches = [x[i : i + BATCH] for i in range(0, len(x), BATCH)]

            def go(s=s, outs=outs, batches=batches, inp=inp, g=g) -> None:
                for xb in batches:
                    feeds = _feeds(s, xb, plan) if g == "analysis" else {inp: xb}
                    s.run(outs, feeds)

            res[f"{g} graph alone, {'I/O binding' if bind else 'run()'}"] = rate(
                go, len(x), repeats
            )
        res.update(graph_replay(g, proto, outs, x, plan, repeats))
    t0 = time.perf_counter()
    preprocessed(model, sorted(folder.iterdir()))
    res["decode alone, 1 thread (D1)"] = len(list(folder.iterdir())) / (time.perf_counter() - t0)
    for label, extra in (("defaults, no report", {}), ("--cam gradcam --top-k 1 --save-maps",
                         {"cam_methods": ["gradcam"], "top_k": 1, "save_maps": True})):  # fmt: skip
        if extra.get("cam_methods") and "gradcam" not in plan.methods:
            continue
        opts = RunOptions(device=TARGET[0], runtime="onnxruntime", force=True, **extra)
        rates = []
        for _ in range(repeats):
            s = run(model, [str(folder)], out / f"speed-{name}", opts, warn=lambda m: None)
            rates.append(s.images_per_second)
        res[f"convlens run {label}"] = statistics.median(rates)
    return res


def graph_replay(g: str, proto: bytes, outs: list[str], x: np.ndarray, plan, repeats: int) -> dict:
    """Full batches through FixedBinder (CUDA graph on CUDA): img/s, and whether its
    outputs match a plain session's (allclose 1e-4); the error if it fails."""
    from convlens.engine.runtime import open_session
    from convlens.engine.runtime_bind import FixedBinder

    key = f"{g} graph alone, fixed buffers (CUDA graph)"
    n = len(x) // BATCH * BATCH
    if n == 0:
        return {}
    plain = open_session(proto, TARGET[0], runtime="onnxruntime")
    inp = plain.input_names[0]
    batches = [x[i : i + BATCH] for i in range(0, n, BATCH)]
    feeds = [_feeds(plain, b, plan) if g == "analysis" else {inp: b} for b in batches]
    try:
        fixed = FixedBinder(proto, outs, feeds[0], TARGET[0])
        same = all(
            np.allclose(a, b, rtol=1e-4, atol=1e-5)
            for f in feeds[:2]
            for a, b in zip(fixed.run(f), plain.run(outs, f), strict=True)
        )

        def go() -> None:
            for f in feeds:
                fixed.run(f)

        return {key: rate(go, n, repeats), key + ": outputs match": float(same)}
    except Exception as exc:  # a measurement: say why it failed, go on with the check
        print(f"{key}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        return {key + ": failed": 0.0}


def image_folder(files: list[Path], out: Path, n: int) -> Path:
    """n symlinks to the photos, reused cyclically."""
    folder = out / f"images{n}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        link = folder / f"img_{i:05d}.jpg"
        if not link.exists():
            link.symlink_to(files[i % len(files)].resolve())
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "device_check_out"))
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run")
    opts = p.parse_args()
    TARGET[0] = opts.device
    out = opts.out
    (out / "work").mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    report: dict = {
        "device": opts.device,
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
    }
    files = photos(opts.images)
    folder = image_folder(files, out / "work", opts.images)
    ok = True
    for name, model in models().items():
        t0 = time.perf_counter()
        x = preprocessed(model, files[:64])
        entry = {"graph": graph_check(model, x)}
        small = image_folder(files, out / "work", 16)
        entry["run"] = run_check(model, small, out / "work" / name)
        ok = ok and entry["graph"]["ok"] and entry["run"]["ok"]
        xs = preprocessed(model, sorted(folder.iterdir()))
        entry["speed_img_s"] = speed(name, model, xs, folder, out / "work", opts.repeats)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report[name] = entry
        print(json.dumps({name: entry}, indent=1, default=str), flush=True)
    report["ok"] = ok
    (out / "device_check.json").write_text(json.dumps(report, indent=1, default=str))
    lines = ["# device check", "", f"- onnxruntime {report['onnxruntime']}, "
             f"{', '.join(report['providers'])}", f"- all checks passed: {ok}", ""]  # fmt: skip
    for name in models():
        e = report[name]
        lines += [f"## {name}", "", f"- graph CPU vs CUDA: {e['graph']}", f"- run: {e['run']}", ""]
        lines += ["| measurement | img/s |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in e["speed_img_s"].items()] + [""]
    (out / "device_check.md").write_text("\n".join(lines))
    import shutil

    shutil.rmtree(out / "work", ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
