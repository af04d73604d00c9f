"""Shared fixtures: real models trained in seconds, exported once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def require_tf() -> None:
    """Skip without TensorFlow, unless CI demands it (CONVLENS_REQUIRE_TF=1): then fail."""
    if _have("tensorflow") and _have("tf2onnx"):
        return
    if os.environ.get("CONVLENS_REQUIRE_TF") == "1":
        pytest.fail("TensorFlow/tf2onnx missing but CONVLENS_REQUIRE_TF=1")
    pytest.skip("needs the [export] extra (TensorFlow, tf2onnx)")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Every head kind, trained and exported: name -> {"keras": path, "onnx": path}."""
    require_tf()
    from convlens.exporter.export import export_model

    import zoo as z

    root = tmp_path_factory.mktemp("zoo")
    out: dict[str, dict[str, Path]] = {}
    for name, (build, ext) in z.BUILDERS.items():
        kpath = build(root / f"{name}{ext}")
        onnx = root / f"{name}.onnx"
        export_model(kpath, onnx)
        out[name] = {"keras": kpath, "onnx": onnx}
    return out


@pytest.fixture(scope="session")
def demo_model() -> tuple[Path, Path]:
    from convlens.pipeline import demo_paths

    return demo_paths()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first (stable otherwise): with one worker per core (.ci/run), the long
    backbone exports start at once instead of ending the run on one busy worker."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
