"""Real runs for the ``convlens compare`` tests: the demo model, a perturbed copy of it
(some predictions flip, channels die and come alive), and a mismatched one (a class
renamed, a layer fewer, no saved maps), over the demo photos plus a copy under a hostile
file name.  Each run directory has its own rendered report."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from report_fixtures import XSS_NAME

#: the demo model's final dense layer and its copies in the file (the CAM weights, the
#: transposed weights the gradient uses) and its bias (also the cam_bias constant)
DENSE_WEIGHTS = (
    "textures_1/texture_1/Cast/ReadVariableOp:0",
    "cam_weights__const",
    "const_fold_opt__116",  # transposed
)
DENSE_BIAS = ("Const_1:0", "cam_bias__const")
CONV2_BIAS = "textures_1/conv2_1/Squeeze:0"
GRAVEL = 2


@dataclass
class Runs:
    photos: Path
    a: Path  # demo model, --save-maps
    b: Path  # perturbed demo model, --save-maps
    c: Path  # mismatched: a class renamed, conv1 not exposed, no maps
    models: dict[str, Path]


def _edit(src: Path, dst: Path, *, perturb: bool = False, mismatch: bool = False) -> Path:
    """A copy of the demo model.  ``perturb``: gravel's dense weights get noise and its
    bias +4 (grass images flip to gravel); conv2's channel 0 is killed and its dead
    channel 2 woken.  ``mismatch``: class gravel is renamed and conv1 is not exposed."""
    import onnx
    from onnx import numpy_helper as nh

    from convlens.engine import contract as C

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}

    def put(name: str, arr: np.ndarray) -> None:
        inits[name].CopyFrom(nh.from_array(arr.astype(np.float32), name))

    if perturb:
        w = nh.to_array(inits[DENSE_WEIGHTS[1]]).copy()
        rng = np.random.default_rng(0)
        w[:, GRAVEL] += rng.normal(size=w.shape[0]).astype(np.float32) * 1.5 * w[:, GRAVEL].std()
        bias = nh.to_array(inits[DENSE_BIAS[0]]).copy()
        bias[GRAVEL] += 4.0
        conv = nh.to_array(inits[CONV2_BIAS]).copy()
        conv[0], conv[2] = -100.0, conv[2] + 1.0
        for name in DENSE_WEIGHTS[:2]:
            put(name, w)
        put(DENSE_WEIGHTS[2], w.T.copy())
        for name in DENSE_BIAS:
            put(name, bias)
        put(CONV2_BIAS, conv)
    if mismatch:
        spec = C.read_spec(src)
        spec.class_names[GRAVEL] = "stones"
        spec.outputs = [o for o in spec.outputs if o.name != "act/conv1"]
        for prop in model.metadata_props:
            if prop.key == C.METADATA_KEY:
                prop.value = spec.to_json()
        keep = [o for o in model.graph.output if o.name != "act/conv1"]
        del model.graph.output[:]
        model.graph.output.extend(keep)
    onnx.save(model, str(dst))
    return dst


def make_runs(root: Path) -> Runs:
    from convlens.engine.run import RunOptions, run
    from convlens.pipeline import demo_paths
    from convlens.reports import ReportAssetSink, render_report

    model, demo_photos = demo_paths()
    photos = root / "photos"
    shutil.copytree(demo_photos, photos)
    shutil.copy(photos / "grass" / "grass_2.jpg", photos / "grass" / XSS_NAME)
    models = {
        "a": model,
        "b": _edit(model, root / "perturbed.onnx", perturb=True),
        "c": _edit(model, root / "mismatched.onnx", mismatch=True),
    }
    outs = {}
    for key, m in models.items():
        out = outs[key] = root / f"run_{key}"
        summary = run(
            m,
            [str(photos)],
            out,
            RunOptions(device="cpu", labels_from_dirs=True, save_maps=key != "c"),
            sinks=[ReportAssetSink(grids="none")],
            progress=False,
            warn=lambda m: None,
        )
        assert summary.failed == 0 and summary.ok == 16
        render_report(out)
    return Runs(photos, outs["a"], outs["b"], outs["c"], models)
