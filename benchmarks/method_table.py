"""Every CAM method's faithfulness on two models, as a Markdown table (issue 11).

    python benchmarks/method_table.py [--models demo,mobilenetv2] [--sample N] [--work DIR]

For each model, one ``convlens run`` (the Python API, as the CLI calls it) with every CAM
method the model serves (``--cam`` all the ids of :data:`convlens.engine.cams.METHODS`
that :func:`~convlens.engine.cams.availability` allows: methods added to the registry
appear here by themselves) and ``--metrics all``; the table is read back from run.json's
``summary.metrics`` (the per-method means), its columns from the metric registry.  The
last column is each method's cost in milliseconds per image on the same photos, measured
as ``bench_methods.py cams`` measures it (:func:`bench_cams.cam_costs`: the method alone
on the analysis graph's tensors, with the network passes of the perturbation methods;
the methods that run the whole model on the first 4 photos, once).

Models:

- ``demo``: the bundled demo model (grayscale textures, 64 x 64) over its 15 bundled
  photos.
- ``mobilenetv2``: keras.applications MobileNetV2 at 96 x 96 in the fine-tune form of
  tests/backbones.py (base without top -> GlobalAveragePooling2D -> Dropout -> Dense),
  trained from random weights (no ImageNet weights offline) on patches of three of
  scikit-image's photographs (cat, coffee, rocket: ``convlens.exporter.demo_data``,
  the photos' top three quarters), exported with ``export_model``, run over held-out
  crops (the bottom quarter) written as JPEG files in one folder per class.  Cached
  under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import cv2

HERE = Path(__file__).resolve().parent
WORK = HERE.parent / "artifacts" / "method_table"
SIZE = 96
EVAL_SIZE = 160  # the held-out crops are written at this size (the engine resizes)
EVAL_PER_CLASS = 8


def demo_case(work: Path) -> tuple[Path, Path]:
    """The bundled model and photos."""
    from convlens.pipeline import demo_paths

    return demo_paths()


def mobilenetv2_case(work: Path) -> tuple[Path, Path]:
    """MobileNetV2 (96 px, fine-tune form) trained on photo patches, exported; the
    held-out crops as JPEG files.  Made once per ``work`` folder."""
    from convlens.exporter.demo_data import PHOTOS, patches

    work.mkdir(parents=True, exist_ok=True)
    onnx = work / "mobilenetv2_96.onnx"
    photos = work / "mobilenetv2_photos"
    labels = ("cat", "coffee", "rocket")
    if not photos.exists():
        x, y = patches(PHOTOS, EVAL_PER_CLASS, EVAL_SIZE, rgb=True, split="holdout", seed=7)
        tmp = work / "mobilenetv2_photos.tmp"
        for i, (img, cls) in enumerate(zip(x, y, strict=True)):
            d = tmp / labels[int(cls)]
            d.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d / f"{labels[int(cls)]}_{i:03d}.jpg"), img[:, :, ::-1])
        tmp.rename(photos)
    if not onnx.exists():
        keras_path = work / "mobilenetv2_96.keras"
        _train_mobilenetv2(keras_path, PHOTOS)
        from convlens.exporter.export import export_model

        (work / "labels.txt").write_text("\n".join(labels) + "\n")
        export_model(keras_path, onnx, labels=work / "labels.txt", preprocess="symmetric")
    return onnx, photos


def _train_mobilenetv2(path: Path, names: tuple[str, ...]) -> None:
    from convlens.exporter.demo_data import patches
    from convlens.exporter.tfenv import import_tf

    _, keras = import_tf()
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=(SIZE, SIZE, 3)
    )
    inp = keras.Input((SIZE, SIZE, 3), name="image_in")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(base(inp))
    x = keras.layers.Dropout(0.2, name="drop")(x)
    out = keras.layers.Dense(len(names), activation="softmax", name="classes")(x)
    model = keras.Model(inp, out, name="mobilenetv2_tuned")
    # keras.applications' BatchNormalization momentum (0.999) leaves the moving statistics
    # near their initial values after a few hundred steps from scratch, and the trained
    # model then answers the same for every image at inference: follow the batches faster
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    xs, ys = patches(names, 300, SIZE, rgb=True, seed=1)
    xs = xs.astype("float32") / 127.5 - 1.0  # the "symmetric" preset, as exported
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    t0 = time.perf_counter()
    model.fit(xs, ys, epochs=6, batch_size=32, verbose=0)
    hx, hy = patches(names, 40, SIZE, rgb=True, split="holdout", seed=3)
    _, acc = model.evaluate(hx.astype("float32") / 127.5 - 1.0, hy, verbose=0)
    print(
        f"mobilenetv2: trained in {time.perf_counter() - t0:.0f} s; held-out patch "
        f"accuracy {acc:.3f} ({len(hy)} patches)",
        file=sys.stderr,
    )
    model.save(path)


CASES = {"demo": demo_case, "mobilenetv2": mobilenetv2_case}


def score(model: Path, photos: Path, out: Path, sample: int | None) -> dict[str, Any]:
    """One run with every method the model serves and every metric; run.json's doc."""
    from convlens.engine import contract as C
    from convlens.engine.cams import availability
    from convlens.engine.run import RunOptions, run

    spec = C.read_spec(model)
    methods = [m for m, why in availability(spec).items() if why is None]
    run(
        model,
        [str(photos)],
        out,
        RunOptions(
            device="cpu",
            labels_from_dirs=True,
            cam_methods=methods,
            metrics=["all"],
            metrics_sample=sample,
        ),
        progress=False,
        warn=lambda m: print(m, file=sys.stderr),
    )
    doc: dict[str, Any] = json.loads((out / "run.json").read_text())
    return doc


def accuracy(outdir: Path) -> str:
    """Top-1 accuracy over the labelled ok records, as "k/n"."""
    from convlens.engine.outdir import read_results

    recs = [r for r in read_results(outdir).records if r.ok and r.label_index is not None]
    top = [max(r.predictions, key=lambda p: p.prob).index for r in recs]
    return f"{sum(t == r.label_index for t, r in zip(top, recs, strict=True))}/{len(recs)}"


def costs(model: Path, photos: Path) -> dict[str, float]:
    """Milliseconds per image of each method on these photos (bench_cams.cam_costs)."""
    from bench_cams import cam_costs
    from bench_methods import preloaded

    files = sorted(p for p in photos.rglob("*") if p.is_file())
    return cam_costs(model, preloaded(model, files), repeats=3, slow_images=4).ms


def markdown(runs: dict[str, dict[str, Any]], cost_ms: dict[str, dict[str, float]]) -> str:
    """One row per (model, method): the means of every score the registry declares, and
    the method's cost per image."""
    from convlens.reports.data import method_label
    from convlens.reports.faithfulness import method_order, score_columns

    cols = score_columns()
    head = ["model", "method", *(f"{c.label} {c.arrow}" for c in cols), "images", "ms/image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, doc in runs.items():
        summary = doc["summary"]
        ms = summary.get("metrics") or {}
        for m in method_order(list(ms)):
            row = [name, method_label(m)]
            row += [f"{ms[m][c.key]:.3f}" if c.key in ms[m] else "—" for c in cols]
            row.append(str(ms[m].get("n", "")))
            cost = cost_ms.get(name, {}).get(m)
            row.append("—" if cost is None else f"{cost:.3g}")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="demo,mobilenetv2", help=", ".join(CASES))
    p.add_argument("--sample", type=int, default=None, help="--metrics-sample N [every image]")
    p.add_argument("--work", type=Path, default=WORK, help=f"cache and run folders [{WORK}]")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in --work (the engine resumes them: a finished one "
        "is not recomputed) [default: fresh runs]",
    )
    args = p.parse_args(argv)
    runs: dict[str, dict[str, Any]] = {}
    cost_ms: dict[str, dict[str, float]] = {}
    for name in args.models.split(","):
        if name not in CASES:
            p.error(f"unknown model {name!r}: choose from {', '.join(CASES)}")
        model, photos = CASES[name](args.work)
        out = args.work / f"run-{name}"
        if not args.resume:
            shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resumed one
        t0 = time.perf_counter()
        doc = score(model, photos, out, args.sample)
        s = doc["summary"]
        print(
            f"{name}: {s.get('ok')} images, top-1 accuracy {accuracy(out)}, "
            f"{len(s.get('metrics') or {})} methods scored in "
            f"{time.perf_counter() - t0:.0f} s (run.json: {out / 'run.json'})",
            file=sys.stderr,
        )
        runs[name] = doc
        cost_ms[name] = costs(model, photos)
    print(markdown(runs, cost_ms))


if __name__ == "__main__":
    main()
