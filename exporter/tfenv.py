"""Lazy, quiet import of TensorFlow and Keras (the [export] extra)."""

from __future__ import annotations

import os
from typing import Any

from .errors import ExportError


def import_tf() -> tuple[Any, Any]:
    """Return ``(tensorflow, keras)``, imported with quiet logs.

    oneDNN is switched off unless the user chose otherwise: tf.GradientTape through
    some models segfaults in oneDNN's conv2d_backprop_filter on TF 2.21 CPU.
    """
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import keras
        import tensorflow as tf
    except ImportError as exc:
        raise ExportError(
            "exporting needs TensorFlow and tf2onnx: pip install 'convlens[export]'"
        ) from exc
    tf.get_logger().setLevel("ERROR")
    return tf, keras
