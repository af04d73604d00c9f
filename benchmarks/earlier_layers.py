"""Grad-CAM at an earlier layer (--cam-layer) against tf.GradientTape, three families.

    python benchmarks/earlier_layers.py

For ResNet50 (through residual Adds), DenseNet121 (through dense-block Concatenates)
and VGG16 with its top (through max pooling, Flatten and two Dense(4096)), random
weights, it exports with --cam-layer set inside the backbone and prints, over the
bundled photos, the worst per-map Pearson r and the max error / max map between the
engine's Grad-CAM from the ONNX outputs and a Keras Grad-CAM from tf.GradientTape.
Needs the [export] extra.  The same check is tests/test_backbones.py's earlier-layer test.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    from backbones import EARLIER, earlier_layer_gradcam

    print(
        "| family | --cam-layer | tensor | layers on the path | min r | max err / max | export s |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for spec in EARLIER.values():
        with tempfile.TemporaryDirectory() as tmp:
            f = earlier_layer_gradcam(*spec, Path(tmp))
        print(
            f"| {f['family']} | `{f['cam_layer']}` | {'x'.join(map(str, f['shape']))} "
            f"| {f['path_layers']} | {f['min_r']:.8f} | {f['max_err']:.1e} | {f['export_s']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
