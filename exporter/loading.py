"""Load a trained Keras model from .keras, legacy .h5/.hdf5 or a SavedModel directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ExportError
from .tfenv import import_tf

_H5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"


def load_keras_model(path: str | Path) -> Any:
    """Load a Keras model, with one clear error line for anything that is not one."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p}: no such file or directory")
    tf, keras = import_tf()
    if p.is_dir():
        return _load_savedmodel(p, tf, keras)
    head = p.read_bytes()[:8] if p.stat().st_size else b""
    if not head:
        raise ExportError(f"{p}: empty file, not a Keras model")
    if head.startswith(_ZIP_MAGIC):
        kind = ".keras archive"
    elif head.startswith(_H5_MAGIC):
        kind = "legacy HDF5 model"
    else:
        raise ExportError(
            f"{p}: not a Keras model (expected a .keras archive, a legacy .h5 file "
            "or a SavedModel directory)"
        )
    try:
        model = keras.models.load_model(str(p), compile=False)
    except Exception as exc:
        raise ExportError(f"{p}: could not load as a {kind}: {_one_line(exc)}") from exc
    return _check_model(p, model, keras)


def _load_savedmodel(p: Path, tf: Any, keras: Any) -> Any:
    if not (p / "saved_model.pb").exists():
        raise ExportError(f"{p}: a directory, but not a SavedModel (no saved_model.pb)")
    if (p / "keras_metadata.pb").exists():
        # A tf.keras (Keras 2) SavedModel carries its layer structure; tf_keras reads it.
        try:
            import tf_keras
        except ImportError as exc:
            raise ExportError(
                f"{p}: a Keras 2 SavedModel; reading its layers needs tf_keras "
                "(pip install tf_keras), or re-save it as .keras"
            ) from exc
        try:
            model = tf_keras.models.load_model(str(p), compile=False)
        except Exception as exc:
            raise ExportError(f"{p}: could not load SavedModel: {_one_line(exc)}") from exc
        return _check_model(p, model, tf_keras)
    raise ExportError(
        f"{p}: a SavedModel without Keras layer metadata (e.g. from model.export()); "
        "convlens needs the layers: save the model with model.save('model.keras')"
    )


def _check_model(p: Path, model: Any, keras: Any) -> Any:
    if not isinstance(model, keras.Model):
        raise ExportError(f"{p}: loaded object is a {type(model).__name__}, not a Keras model")
    return model


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return msg if len(msg) < 300 else msg[:297] + "..."
