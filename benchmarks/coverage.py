"""Export every keras.applications architecture, in both forms, and tabulate the result.

    python benchmarks/coverage.py [--size 128] [--only ResNet50,VGG16] [--no-readme]

For each architecture (random weights) in the two forms of tests/backbones.py it runs
``export_loaded`` with the default options in a fresh process (so the peak RSS is that
export's alone) and records whether it exported, the head kind, the CAM tensor and its
size, the CAM methods the file serves, export seconds, peak RSS, the ONNX size, and the
exported gradients against tf.GradientTape through the real Keras layers (parity score,
on what the maps consume).  VGG16/VGG19 with their top are also run at 224 px.
Results accumulate in benchmarks/coverage.json (a rerun skips what is there unless
--again) and the table is written into README.md between the coverage markers.
Needs the [export] extra.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
CACHE = ROOT / "benchmarks" / "coverage.json"
README = ROOT / "README.md"
START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"
EXTRA = [("VGG16", "top", 224), ("VGG19", "top", 224)]


def one(arch: str, form: str, size: int) -> dict[str, Any]:
    """Run in the child process: export one model, return its row."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # as `convlens export` has it (tfenv)
    from backbones import build

    from convlens.engine import contract as C
    from convlens.exporter.errors import ExportError
    from convlens.exporter.export import export_loaded, peak_rss_mb

    row: dict[str, Any] = {"arch": arch, "form": form, "size": size}
    model = build(arch, form, size)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            r = export_loaded(model, Path(tmp) / "m.onnx")
        except ExportError as exc:
            row.update(ok=False, error=str(exc)[:300], seconds=time.perf_counter() - t0)
            row["rss_mb"] = peak_rss_mb()
            return row
    spec = r.spec
    cam = {o.name: o for o in spec.outputs}[C.ACT_PREFIX + str(spec.cam_layer)]
    tape = spec.parity["outputs"].get("gradients_vs_gradienttape", {})
    row.update(
        ok=True,
        head=spec.head.kind,
        cam=spec.cam_layer,
        cam_hw="x".join(str(d) for d in cam.shape[1:3]),
        methods=[m for m, why in r.methods.items() if why is None],
        seconds=r.seconds,
        rss_mb=r.peak_rss_mb,
        onnx_mb=r.size_bytes / 1e6,
        tape_score=tape.get("score"),
        parity_worst=spec.parity["worst"],
        preprocess=spec.preprocess.kind,
        warnings=r.warnings,
        noisy=bool(spec.parity.get("noisy")),
        noise=spec.parity.get("noise", 0.0),
    )
    return row


def _failure(code: int, stderr: str) -> str:
    """Why a child gave no row: a signal (-9: the kernel's OOM killer), else its last
    line that is not TensorFlow's log chatter."""
    if code < 0:
        return f"killed by signal {-code}" + (" (out of memory)" if code == -9 else "")
    lines = [
        ln
        for ln in stderr.splitlines()
        if ln.strip() and not ln.startswith(("I0000", "W0000", "WARNING"))
    ]
    return lines[-1][:300] if lines else f"exit {code}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| architecture | form | px | exports | head | CAM tensor | methods | export s "
        "| peak RSS GB | ONNX MB | Grad vs tape |",
        "|---|---|---:|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["ok"]:
            methods = "all 5" if len(r["methods"]) == 5 else ", ".join(r["methods"])
            tape = f"{r['tape_score']:.0e}" if r.get("tape_score") is not None else "-"
            noisy = " ⚠" if r.get("noisy") else ""
            lines.append(
                f"| {r['arch']}{noisy} | {r['form']} | {r['size']} | yes | {r['head']} "
                f"| `{r['cam']}` {r['cam_hw']} | {methods} | {r['seconds']:.0f} "
                f"| {r['rss_mb'] / 1024:.1f} | {r['onnx_mb']:.0f} | {tape} |"
            )
        else:
            err = str(r.get("error", "")).replace("|", "/")[:120]
            lines.append(
                f"| {r['arch']} | {r['form']} | {r['size']} | **no**: {err} | | | | "
                f"{r.get('seconds', 0):.0f} | {r.get('rss_mb', 0) / 1024:.1f} | | |"
            )
    return "\n".join(lines)


def write_readme(rows: list[dict[str, Any]]) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{table(rows)}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--only", default=None, help="comma-separated architectures")
    ap.add_argument("--again", action="store_true", help="redo rows already in the cache")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--one", nargs=3, metavar=("ARCH", "FORM", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], int(args.one[2]))))
        return 0

    from backbones import MIN_SIZE, architectures

    cache: dict[str, dict[str, Any]] = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    archs = args.only.split(",") if args.only else architectures()
    jobs = [(a, f, max(args.size, MIN_SIZE.get(a, 0))) for a in archs for f in ("top", "tune")]
    jobs += [j for j in EXTRA if j[0] in archs]
    for arch, form, size in jobs:
        key = f"{arch}/{form}/{size}"
        if key in cache and not args.again:
            continue
        cmd = [sys.executable, __file__, "--one", arch, form, str(size)]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            if lines:
                row = json.loads(lines[-1])
            else:
                row = {"arch": arch, "form": form, "size": size, "ok": False}
                row["error"] = _failure(p.returncode, p.stderr)
        except subprocess.TimeoutExpired:
            row = {"arch": arch, "form": form, "size": size, "ok": False, "error": "timed out"}
        row.setdefault("seconds", time.perf_counter() - t0)
        cache[key] = row
        CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True))
        status = "ok" if row["ok"] else "FAILED " + str(row.get("error"))[:200]
        print(f"{key}: {status} ({row['seconds']:.0f} s)", flush=True)
    order = {a: i for i, a in enumerate(architectures())}
    rows = sorted(
        cache.values(), key=lambda r: (order.get(r["arch"], 99), r["form"] != "top", r["size"])
    )
    print(table(rows))
    if not args.no_readme:
        write_readme(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
