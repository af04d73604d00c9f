"""What an analysis export costs, per head kind: export time, parity, size, inference.

    python benchmarks/export_costs.py [--repeats 7] [--batch 32]

For every test model (tests/zoo.py: real models trained in seconds on real photo
patches) it exports the analysis ONNX and the plain tf2onnx export of the predictions
only, then times onnxruntime (CPU) on the same in-memory batch, alternating the two,
and prints medians: img/s of each and their ratio.  Needs the [export] extra.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def _rate(sess: object, feeds: dict[str, np.ndarray], names: list[str], n: int) -> float:
    t = time.perf_counter()
    sess.run(names, feeds)  # type: ignore[attr-defined]
    return n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from convlens.engine import contract as C
    from convlens.engine.runtime import session_options
    from convlens.exporter.export import export_model, export_plain

    import zoo

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (build, ext) in zoo.BUILDERS.items():
            kpath = build(Path(tmp) / f"{name}{ext}")
            r = export_model(kpath, Path(tmp) / f"{name}.onnx")
            plain = export_plain(kpath, Path(tmp) / f"{name}.plain.onnx")
            spec = r.spec
            rng = np.random.default_rng(0)
            x = rng.random(
                (args.batch, spec.input.height, spec.input.width, spec.input.channels), np.float32
            )
            a_sess = ort.InferenceSession(
                str(r.path), session_options(), providers=["CPUExecutionProvider"]
            )
            p_sess = ort.InferenceSession(
                str(plain), session_options(), providers=["CPUExecutionProvider"]
            )
            a_names = [o.name for o in a_sess.get_outputs()]
            a_feeds = {C.IN_IMAGE: x}
            if spec.head.gradients_available:
                a_feeds[C.IN_TARGETS] = np.tile(
                    np.array([[-1, -2, -3][: spec.num_classes]]), (args.batch, 1)
                )
            p_feeds = {C.IN_IMAGE: x}
            p_names = [o.name for o in p_sess.get_outputs()]
            for _ in range(2):  # warm up
                _rate(a_sess, a_feeds, a_names, args.batch)
                _rate(p_sess, p_feeds, p_names, args.batch)
            a_rates, p_rates = [], []
            for _ in range(args.repeats):
                p_rates.append(_rate(p_sess, p_feeds, p_names, args.batch))
                a_rates.append(_rate(a_sess, a_feeds, a_names, args.batch))
            a_med, p_med = statistics.median(a_rates), statistics.median(p_rates)
            rows.append(
                (
                    name,
                    spec.head.kind,
                    r.seconds,
                    spec.parity["worst"],
                    r.size_bytes / 1e3,
                    plain.stat().st_size / 1e3,
                    p_med,
                    a_med,
                    a_med / p_med,
                )
            )
    header = (
        "| model | head | export s | parity worst | analysis KB | plain KB | plain img/s | "
        "analysis img/s | analysis/plain |"
    )
    print(header)
    print("|" + "---|" * 9)
    for row in rows:
        print(
            f"| {row[0]} | {row[1]} | {row[2]:.1f} | {row[3]:.1e} | {row[4]:.0f} | {row[5]:.0f} | "
            f"{row[6]:.0f} | {row[7]:.0f} | {row[8]:.2f} |"
        )
    print(
        f"\nonnxruntime {ort.__version__}, CPU, batch {args.batch}, medians of {args.repeats}; "
        "analysis = every output incl. gradients for the top 3 classes"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
