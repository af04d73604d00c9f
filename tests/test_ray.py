"""The run on Ray (convlens.engine.distributed) against the single-process run, on a
local Ray cluster this module starts on 127.0.0.1 with 2 CPUs and shuts down after.

The demo model over the demo photos (copied into a few folders, so that a run lasts long
enough to be killed in the middle) with bad inputs mixed in.  Compared: the records
(same ids, once each, in input order; probabilities to 1e-5: a unit batches differently
from a local run), stats.json, class_cams.npz, the maps, and the report's asset files.

.ci/run runs this file as its own step (``== ray``) after installing the [ray] extra;
elsewhere it is skipped when Ray is not installed, unless CONVLENS_REQUIRE_RAY=1.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convlens.engine.outdir import Record, read_results
from convlens.engine.plan import RunOptions

pytestmark = pytest.mark.ray

if os.environ.get("CONVLENS_REQUIRE_RAY") != "1":
    pytest.importorskip("ray")

import ray  # noqa: E402

COPIES = 8  # copies of the 15 demo photos: 120 images
BAD = {
    "bad/not_an_image.jpg": b"this is text, not a JPEG\n",
    "bad/empty.png": b"",
}


@pytest.fixture(scope="module")
def cluster() -> Any:
    """A local Ray instance, 2 CPUs, on loopback; its address for other processes."""
    ctx = ray.init(
        address="local",  # a new instance, whatever else runs on the machine
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, demo_model: tuple[Path, Path]) -> Path:
    _, photos = demo_model
    root = tmp_path_factory.mktemp("ray_inputs")
    for i in range(COPIES):
        shutil.copytree(photos, root / f"set{i}")
    good = next(root.glob("set0/*/*.jpg")).read_bytes()
    (root / "bad").mkdir()
    for name, data in BAD.items():
        (root / name).write_bytes(data)
    (root / "bad/truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


def options(**kw: Any) -> RunOptions:
    return RunOptions(save_maps=True, labels_from_dirs=True, **kw)


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, demo_model: tuple[Path, Path], inputs: Path
) -> Path:
    """The single-process run, with its report."""
    from convlens.pipeline import analyze

    out = tmp_path_factory.mktemp("ray_ref")
    analyze(demo_model[0], [str(inputs)], out, options(), grid_sample=4, warn=lambda m: None)
    return out


@pytest.fixture(scope="module")
def on_ray(
    tmp_path_factory: pytest.TempPathFactory,
    demo_model: tuple[Path, Path],
    inputs: Path,
    cluster: str,
) -> tuple[Path, list[str]]:
    """The same run on the cluster (this process is already connected), with its
    report; and what it said."""
    from convlens.pipeline import analyze

    out = tmp_path_factory.mktemp("ray_run")
    said: list[str] = []
    events: list[Any] = []
    opts = options(ray=cluster, ray_unit=5)
    result = analyze(
        demo_model[0],
        [str(inputs)],
        out,
        opts,
        grid_sample=4,
        warn=said.append,
        progress=events.append,
    )
    # progress as in a local run: after every merged unit, up to every input to do
    done = [e.done for e in events]
    assert done == sorted(done) and len(done) >= 2
    assert events[-1].done == events[-1].total and all(e.rate > 0 for e in events)
    assert result.report is not None and result.report.exists()
    assert result.summary.failed == 3 and result.summary.ok == 15 * COPIES
    return out, said


# ---- comparisons ----------------------------------------------------------------------
def records(out: Path) -> list[Record]:
    return read_results(out).records


def assert_same_records(got: Path, want: Path, in_order: bool = True) -> None:
    """Each input once, with the same record; in input order unless resumed (a resumed
    run appends what it redoes, as a local one does: the failed inputs, tried again)."""
    a, b = records(got), records(want)
    assert len({r.id for r in a}) == len(a)
    if not in_order:
        a, b = sorted(a, key=lambda r: r.id), sorted(b, key=lambda r: r.id)
    assert [r.id for r in a] == [r.id for r in b]
    for ra, rb in zip(a, b, strict=True):
        da, db = ra.to_json(), rb.to_json()
        pa, pb = da.pop("predictions", []), db.pop("predictions", [])
        assert da == db
        assert [p["index"] for p in pa] == [p["index"] for p in pb]
        np.testing.assert_allclose([p["prob"] for p in pa], [p["prob"] for p in pb], atol=1e-5)


def assert_same_stats(got: Path, want: Path) -> None:
    a = json.loads((got / "stats.json").read_text())
    b = json.loads((want / "stats.json").read_text())
    assert a.keys() == b.keys() and a
    for layer in b:
        assert a[layer]["count"] == b[layer]["count"]
        assert a[layer]["dead"] == b[layer]["dead"]
        for k in ("mean", "max", "zero_fraction"):
            np.testing.assert_allclose(a[layer][k], b[layer][k], rtol=1e-5, atol=1e-7)
    with np.load(got / "class_cams.npz") as za, np.load(want / "class_cams.npz") as zb:
        assert sorted(za.files) == sorted(zb.files)
        for k in zb.files:
            np.testing.assert_allclose(za[k], zb[k], rtol=1e-5, atol=1e-6)


def assert_same_maps(got: Path, want: Path) -> None:
    names = sorted(p.name for p in (want / "maps").glob("*.npz"))
    assert names and sorted(p.name for p in (got / "maps").glob("*.npz")) == names
    for name in names:
        with np.load(got / "maps" / name) as za, np.load(want / "maps" / name) as zb:
            assert sorted(za.files) == sorted(zb.files)
            for k in zb.files:
                np.testing.assert_allclose(za[k], zb[k], rtol=1e-4, atol=1e-5)


def asset_files(out: Path) -> list[str]:
    root = out / "assets"
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "assets.json"
    )


# ---- tests ------------------------------------------------------------------------------
def test_ray_run_equals_single_process(on_ray: tuple[Path, list[str]], reference: Path) -> None:
    out, said = on_ray
    assert_same_records(out, reference)
    assert_same_stats(out, reference)
    assert_same_maps(out, reference)
    # the report's files, made by the workers: the same thumbnails, heatmaps and grids
    assert asset_files(out) == asset_files(reference)
    assert any(p.startswith("grids/") for p in asset_files(out))
    assert (out / "index.html").exists() and (out / "model.html").exists()
    summary = json.loads((out / "run.json").read_text())["summary"]
    assert summary["device"].startswith("Ray, 2 worker(s) on 1 node(s)")
    workers = [m for m in said if m.startswith("worker ")]  # where each ran, its speed
    assert len(workers) == 2 and all("img/s busy, pid" in m for m in workers)
    assert sum(int(m.split(": ")[1].split()[0]) for m in workers) == 15 * COPIES + 3


def test_bad_inputs_are_records_with_reasons(
    on_ray: tuple[Path, list[str]], reference: Path
) -> None:
    out, said = on_ray
    bad = {r.relpath: r.error for r in records(out) if not r.ok}
    want = {r.relpath: r.error for r in records(reference) if not r.ok}
    assert sorted(bad) == ["bad/empty.png", "bad/not_an_image.jpg", "bad/truncated.jpg"]
    assert bad == want and all(bad.values())
    for rel in bad:  # each said once, on one line, as a local run says it
        assert sum(1 for m in said if m.endswith(f"{rel}: {bad[rel]}")) == 1


def cli(model: Path, inputs: Path, out: Path, address: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "convlens.cli", "run", str(model), str(inputs), "-o", str(out)]
    cmd += ["--save-maps", "--labels-from-dirs", "--no-report", "-q", "--ray", address]
    cmd += ["--ray-unit", "3"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(cond: Any, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    """Until ``cond()`` holds, with the run still going (else the kill would come after
    the end and test nothing)."""
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the kill: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("the run made no unit in time")
        time.sleep(0.05)


def units(out: Path) -> list[dict[str, Any]]:
    docs = []
    for p in (out / "shards").glob("u-*.json"):
        try:
            docs.append(json.loads(p.read_bytes()))
        except (OSError, ValueError):  # a name seen as it was replaced
            continue
    return docs


def test_worker_killed_mid_run(
    tmp_path: Path, demo_model: tuple[Path, Path], inputs: Path, reference: Path, cluster: str
) -> None:
    out = tmp_path / "out"
    proc = cli(demo_model[0], inputs, out, cluster)
    wait_for(lambda: (out / "shards").is_dir() and len(units(out)) >= 1, proc)
    victim = units(out)[0]["worker"]["pid"]
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err.decode()[-2000:]  # three bad inputs, the rest ok
    assert_same_records(out, reference)  # nothing lost, nothing doubled
    assert_same_stats(out, reference)
    assert_same_maps(out, reference)
    with pytest.raises(ProcessLookupError):  # it was a process of this run, and it died
        os.kill(victim, 0)


def test_driver_killed_then_rerun(
    tmp_path: Path, demo_model: tuple[Path, Path], inputs: Path, reference: Path, cluster: str
) -> None:
    out = tmp_path / "out"
    proc = cli(demo_model[0], inputs, out, cluster)
    wait_for(lambda: (out / "shards").is_dir() and len(units(out)) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(records(out)) < 15 * COPIES + 3  # killed in the middle
    again = cli(demo_model[0], inputs, out, cluster)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 1, err.decode()[-2000:]
    assert_same_records(out, reference, in_order=False)  # exactly once
    assert_same_stats(out, reference)
    assert_same_maps(out, reference)
    summary = json.loads((out / "run.json").read_text())["summary"]
    assert summary["skipped"] > 0  # resumed, not started over


def test_missing_ray_is_one_line(
    tmp_path: Path, demo_model: tuple[Path, Path], inputs: Path
) -> None:
    """Without the extra: one line naming it (Ray hidden from a child process)."""
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from convlens.cli import main\n"
        f"main(['run', {str(demo_model[0])!r}, {str(inputs)!r}, '-o', {str(tmp_path)!r},"
        " '--ray', '--no-report'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "convlens: error: --ray needs Ray (ray is not installed): pip install 'convlens[ray]'"
    ]


def test_placement_defaults_from_the_cluster() -> None:
    """Actors from the cluster's resources: one per GPU (with the CPUs per GPU for
    decoding) where there are GPUs, else one per CPU; --ray-workers sets the count."""
    from convlens.engine.distributed_cluster import Placement
    from convlens.engine.plan import RunError

    gpu = Placement.of({"CPU": 32.0, "GPU": 4.0}, RunOptions())
    assert (gpu.workers, gpu.cpus, gpu.gpus, gpu.device) == (4, 8, 1, "cuda")
    cpu = Placement.of({"CPU": 32.0, "GPU": 4.0}, RunOptions(device="cpu", ray_workers=6))
    assert (cpu.workers, cpu.cpus, cpu.gpus, cpu.device) == (6, 1, 0, "cpu")
    assert Placement.of({"CPU": 2.0}, RunOptions()).workers == 2
    one = cpu.actor_options(RunOptions(device="cpu", ray="auto"))
    assert (one.threads, one.workers, one.ray) == (1, 1, None)
    with pytest.raises(RunError, match="no GPU"):
        Placement.of({"CPU": 8.0}, RunOptions(device="cuda"))
    # OpenVINO's runs (and so bf16) are CPU only: CPU actors on a GPU cluster, or one line
    for cpu_only in (RunOptions(precision="bf16"), RunOptions(runtime="openvino")):
        p = Placement.of({"CPU": 32.0, "GPU": 4.0}, cpu_only)
        assert (p.workers, p.gpus, p.device) == (32, 0, "cpu")
    with pytest.raises(RunError, match="run on the CPU"):
        Placement.of({"CPU": 8.0, "GPU": 1.0}, RunOptions(device="cuda", precision="bf16"))
