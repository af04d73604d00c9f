"""The package as static tools and users see it: mypy across packages, and the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = """\
from convlens.engine.run import RunOptions, run
from convlens.reports import render_report

RunOptions(top_k="three", no_such_field=1)
render_report(42)
run("m.onnx", ["x"], "out", options="fast")
"""


def test_mypy_sees_wrong_cross_package_calls(tmp_path: Path) -> None:
    """A wrong call from outside into convlens.engine / convlens.reports is an error:
    the packages resolve statically (not as Any), so CI's mypy step catches it."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            str(probe),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    assert 'Unexpected keyword argument "no_such_field" for "RunOptions"' in out
    assert 'Argument "top_k" to "RunOptions" has incompatible type "str"' in out
    assert 'Argument 1 to "render_report" has incompatible type "int"' in out
    assert 'Argument "options" to "run" has incompatible type "str"' in out


@pytest.mark.slow
def test_the_wheel_installs_and_runs_the_demo(tmp_path: Path) -> None:
    """Build the wheel, install it alone into a folder and run the demo from there,
    with no access to the source tree (python -S: no editable-install hooks)."""
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(dist.glob("convlens-*.whl"))
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    assert not any(p.is_symlink() for p in site.rglob("*")), "the wheel holds real files"
    env = {
        **os.environ,
        # the wheel first, then the dependencies' site-packages; -S skips .pth files,
        # so the editable install of this checkout is not on the path
        "PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]]),
    }
    code = (
        "import convlens, convlens.engine, convlens.reports, convlens.exporter.train_demo as t;"
        "print(convlens.__file__); print(t.DEMO_DIR.is_dir())"
    )
    r = subprocess.run(
        [sys.executable, "-S", "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    where, demo_dir = r.stdout.split()
    assert where.startswith(str(site)) and demo_dir == "True"
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-S", "-m", "convlens.cli", "demo", "-o", str(out), "--device", "cpu"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (out / "index.html").is_file() and (out / "model.html").is_file()
    assert len(list((out / "images").glob("*.html"))) >= 10
