"""The engine on real trained models: CAM maps against formulas, resume, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from convlens.engine import contract as C
from convlens.engine.run import RunOptions, run

# ---------------------------------------------------------------- helpers


def _write_photos(dest: Path, size: int, n: int = 6, rgb: bool = True) -> list[Path]:
    """Real photo crops (scikit-image's sample photographs) as PNG files."""
    from convlens.exporter.demo_data import PHOTOS, TEXTURES, patches

    names = PHOTOS if rgb else TEXTURES
    x, _ = patches(names, n // len(names) + 1, size * 3, rgb=True, split="holdout", seed=5)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(x[:n]):
        p = dest / f"img{i:02d}.png"
        cv2.imwrite(str(p), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        paths.append(p)
    return paths


def _records(outdir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (outdir / "results.jsonl").read_text().splitlines()]


def _ref_inputs(spec: C.ModelSpec, paths: list[Path]) -> np.ndarray:
    from convlens.engine.images import Preprocessor, read_image

    pre = Preprocessor(spec.input, spec.preprocess)
    return np.stack([pre(read_image(p)) for p in paths])


# naive formulas, straight from the papers, with explicit loops


def ref_cam(a: np.ndarray, w: np.ndarray, c: int) -> np.ndarray:
    h, wd, k = a.shape
    m = np.zeros((h, wd))
    for i in range(h):
        for j in range(wd):
            m[i, j] = sum(w[ch, c] * a[i, j, ch] for ch in range(k))
    return np.maximum(m, 0)


def ref_gradcam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    alpha = g.mean(axis=(0, 1))
    return np.maximum((a * alpha).sum(-1), 0)


def ref_gradcampp(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    k = a.shape[-1]
    weights = np.zeros(k)
    for ch in range(k):
        # Chattopadhyay et al. 2018, eq. 19 with exponential scores:
        # alpha_ij = g_ij^2 / (2 g_ij^2 + sum_ab A_ab * g_ij^3)
        g2, g3 = g[..., ch] ** 2, g[..., ch] ** 3
        denom = 2 * g2 + a[..., ch].sum() * g3
        alpha = np.where(denom != 0, g2 / np.where(denom != 0, denom, 1), 0)
        weights[ch] = (alpha * np.maximum(g[..., ch], 0)).sum()
    return np.maximum((a * weights).sum(-1), 0)


def ref_layercam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    return np.maximum((np.maximum(g, 0) * a).sum(-1), 0)


def ref_eigencam(a: np.ndarray) -> np.ndarray:
    h, w, k = a.shape
    flat = a.reshape(h * w, k).astype(np.float64)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    proj = flat @ vt[0]
    if proj.sum() < 0:
        proj = -proj
    return np.maximum(proj, 0).reshape(h, w)


def _close_map(ref: np.ndarray, got: np.ndarray, tol: float = 2e-4) -> None:
    scale = max(1e-6, float(np.abs(ref).max()))
    err = float(np.abs(ref - got).max()) / scale
    assert err < tol, f"relative error {err:.3g}"


# ---------------------------------------------------------------- CAMs against formulas


@pytest.mark.tf
@pytest.mark.parametrize(
    "name", ["gap_dense", "class_conv", "flatten_softmax", "flatten_sigmoid", "nested"]
)
def test_every_cam_method_against_formula(
    zoo: dict[str, dict[str, Path]], tmp_path: Path, name: str
) -> None:
    import keras

    from refs import _tape_reference, keras_activation

    onnx = zoo[name]["onnx"]
    spec = C.read_spec(onnx)
    paths = _write_photos(tmp_path / "in", spec.input.height, n=5, rgb=spec.input.channels == 3)
    out = tmp_path / "out"
    k = min(2, spec.num_classes)
    summary = run(
        onnx,
        [str(tmp_path / "in")],
        out,
        RunOptions(device="cpu", batch_size=2, top_k=k, classes=["0"], save_maps=True),
        progress=False,
    )
    assert summary.ok == 5 and summary.failed == 0
    methods = ["gradcam", "gradcampp", "layercam", "eigencam"]
    if spec.head.cam_available:
        methods = ["cam", *methods]
    model = keras.models.load_model(zoo[name]["keras"], compile=False)
    x = _ref_inputs(spec, paths)
    exposed = spec.source["exposed_tensors"][spec.cam_layer]
    acts = keras_activation(model, exposed, x)
    probs = model.predict(x, verbose=0)
    if spec.head.binary_sigmoid:
        probs = np.concatenate([1 - probs, probs], axis=1)
    by_path = {r["path"]: r for r in _records(out)}
    for i, p in enumerate(paths):
        rec = by_path[str(p)]
        assert rec["cam_methods"] == methods
        top = list(np.argsort(-probs[i], kind="stable")[:k])
        assert [pr["index"] for pr in rec["predictions"]] == top
        np.testing.assert_allclose(
            [pr["prob"] for pr in rec["predictions"]], probs[i][top], atol=1e-5
        )
        classes = np.array([rec["cam_classes"]])
        assert rec["cam_classes"] == list(dict.fromkeys([*top, 0]))  # --class 0, once
        grads = _tape_reference(model, spec, x[i : i + 1], classes)[0]
        maps = np.load(out / rec["maps"])
        for t, c in enumerate(rec["cam_classes"]):
            a, g = acts[i], grads[t]
            refs = {
                "gradcam": ref_gradcam(a, g),
                "gradcampp": ref_gradcampp(a, g),
                "layercam": ref_layercam(a, g),
                "eigencam": ref_eigencam(a),
            }
            if spec.head.cam_available:
                w = (
                    np.eye(spec.num_classes)
                    if spec.head.kind == "class_conv"
                    else ([ly for ly in refs_dense(model)][-1].get_weights()[0])
                )
                if spec.head.binary_sigmoid:
                    w = np.concatenate([-w, w], axis=1)
                refs["cam"] = ref_cam(a, w, c)
            for m in methods:
                _close_map(refs[m], maps[f"{m}/{c}"])


def refs_dense(model: Any) -> list[Any]:
    from refs import _flat_layers

    return [ly for ly in _flat_layers(model) if type(ly).__name__ == "Dense"]


def test_gradcam_is_cam_up_to_scale_for_gap_dense(
    demo_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """For GAP -> Dense, dS_c/dA_k = w_kc / (h w): Grad-CAM equals CAM / (h w)."""
    model, photos = demo_model
    out = tmp_path / "o"
    run(
        model,
        [str(photos)],
        out,
        RunOptions(device="cpu", save_maps=True, cam_methods=["cam", "gradcam"]),
        progress=False,
    )
    for rec in _records(out):
        maps = np.load(out / rec["maps"])
        for c in rec["cam_classes"]:
            cam, grad = maps[f"cam/{c}"], maps[f"gradcam/{c}"]
            h, w = cam.shape
            np.testing.assert_allclose(grad * h * w, cam, rtol=1e-4, atol=1e-5 * cam.max())


def test_cam_localises_texture_in_mixed_photos(
    demo_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """The bundled model on photos with two textures side by side: the CAM of each
    texture's class is stronger on the half that shows it."""
    model, photos = demo_model
    out = tmp_path / "o"
    run(
        model,
        [str(photos / "mixed")],
        out,
        RunOptions(
            device="cpu",
            save_maps=True,
            cam_methods=["cam", "layercam"],
            classes=["brick", "grass", "gravel"],
        ),
        progress=False,
    )
    names = C.read_spec(model).class_names
    checked = 0
    for rec in _records(out):
        left, right = Path(rec["path"]).stem.split("_left_")
        right = right.replace("_right", "")
        maps = np.load(out / rec["maps"])
        for method in ("cam", "layercam"):
            ml = maps[f"{method}/{names.index(left)}"]
            mr = maps[f"{method}/{names.index(right)}"]
            half = ml.shape[1] // 2
            assert ml[:, :half].mean() > ml[:, half:].mean(), (rec["path"], method, left)
            assert mr[:, half:].mean() > mr[:, :half].mean(), (rec["path"], method, right)
            checked += 1
    assert checked == 6


# ---------------------------------------------------------------- bad input


def _bad_inputs(d: Path, good_src: Path) -> dict[str, str]:
    """A directory of every kind of bad input mixed with good ones: name -> expected reason."""
    d.mkdir()
    good = good_src.read_bytes()
    (d / "good1.jpg").write_bytes(good)
    (d / "sub").mkdir()
    (d / "sub" / "good2.jpg").write_bytes(good)
    (d / "zero.jpg").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "notes.png").write_text("this is a text file, not an image\n")
    png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    # a valid PNG whose header claims 100000 x 100000 pixels (a decompression bomb)
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    (d / "bomb.png").write_bytes(png[:8] + chunk + png[33:])
    (d / "empty_dir").mkdir()
    return {
        "zero.jpg": "empty",
        "truncated.jpg": "truncated",
        "notes.png": "not an image",
        "bomb.png": "too large",
    }


def test_bad_inputs_are_recorded_and_skipped(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, photos = demo_model
    src = next((photos / "brick").glob("*.jpg"))
    expected = _bad_inputs(tmp_path / "in", src)
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "convlens.cli",
            "run",
            str(model),
            str(tmp_path / "in"),
            str(tmp_path / "in" / "empty_dir"),
            str(tmp_path / "missing"),
            str(tmp_path / "in" / "*.nomatch"),
            "-o",
            str(out),
            "--device",
            "cpu",
            "--no-report",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    recs = {Path(x["path"]).name: x for x in _records(out)}
    assert recs["good1.jpg"]["status"] == "ok" and recs["good2.jpg"]["status"] == "ok"
    for name, reason in expected.items():
        assert recs[name]["status"] == "error", name
        assert reason in recs[name]["error"], (name, recs[name]["error"])
        assert name in r.stderr
    assert "no image" in recs["empty_dir"]["error"]
    assert "no such file" in recs["missing"]["error"]
    assert recs["*.nomatch"]["status"] == "error"
    assert "2 ok, 7 failed" in r.stderr


def test_not_an_analysis_model_is_refused(tmp_path: Path, demo_model: tuple[Path, Path]) -> None:
    import onnx

    m = onnx.load(str(demo_model[0]))
    del m.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    onnx.save(m, str(plain))
    for model in (plain, demo_model[1] / "brick" / "brick_1.jpg"):
        r = _cli_run(str(model), str(demo_model[1]), "-o", str(tmp_path / "o"))
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1 and "convlens export" in r.stderr, r.stderr


def test_options_errors_are_one_line(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, photos = demo_model
    for args, needle in [
        (["--cam", "nosuch"], "unknown CAM method"),
        (["--class", "marble"], "not a class of this model"),
        (["--device", "cuda"], "CUDA not available"),
    ]:
        r = _cli_run(str(model), str(photos), "-o", str(tmp_path / "o"), *args)
        assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_device_auto_says_one_line(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    from convlens.engine.runtime import open_session

    model, photos = demo_model
    s = open_session(model, "auto")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "convlens.cli",
            "run",
            str(model),
            str(photos / "grass"),
            "-o",
            str(tmp_path / "o"),
            "--no-report",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    if s.device == "cpu":
        assert (
            s.note and s.note.startswith("CUDA not available (") and s.note.endswith("); using CPU")
        )
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert lines[0] == s.note
        assert len(lines) == 2  # the note and the summary: no onnxruntime noise


# ---------------------------------------------------------------- resume


def _many_images(d: Path, photos: Path, n: int) -> None:
    srcs = sorted(photos.rglob("*.jpg"))
    for i in range(n):
        sub = d / srcs[i % len(srcs)].parent.name
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:04d}.jpg").write_bytes(srcs[i % len(srcs)].read_bytes())


def _comparable(outdir: Path) -> dict[str, Any]:
    recs = _records(outdir)
    return {r["id"]: (r["status"], r.get("predictions"), r.get("cam_classes")) for r in recs}


def test_resume_after_sigkill(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, photos = demo_model
    inp = tmp_path / "in"
    _many_images(inp, photos, 400)
    (inp / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    args = [
        sys.executable,
        "-m",
        "convlens.cli",
        "run",
        str(model),
        str(inp),
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--save-maps",
        "--labels-from-dirs",
        "-q",
        "--no-report",
    ]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*args, "-o", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    results = killed / "results.jsonl"
    while time.time() < deadline:
        if results.exists() and results.read_bytes().count(b"\n") >= 40:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = results.read_bytes().count(b"\n")
    assert 0 < n_before < 401, "the run should have been killed midway"
    r = subprocess.run([*args, "-o", str(killed)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr  # broken.jpg
    clean = tmp_path / "clean"
    r2 = subprocess.run([*args, "-o", str(clean)], capture_output=True, text=True, timeout=300)
    assert r2.returncode == 1
    a, b = _comparable(killed), _comparable(clean)
    assert len(_records(killed)) == len(a) == 401  # nothing twice
    assert a == b  # nothing lost, same results
    sa = json.loads((killed / "stats.json").read_text())
    sb = json.loads((clean / "stats.json").read_text())
    for layer in sb:
        assert sa[layer]["count"] == sb[layer]["count"] == 400
        np.testing.assert_allclose(sa[layer]["mean"], sb[layer]["mean"], rtol=1e-5)
        assert sa[layer]["max"] == sb[layer]["max"]
    assert sorted(p.name for p in (killed / "maps").iterdir()) == sorted(
        p.name for p in (clean / "maps").iterdir()
    )
    assert not list(killed.rglob("*.tmp"))
    # once more: everything is skipped, nothing changes
    before = (killed / "results.jsonl").read_bytes()
    r3 = subprocess.run([*args, "-o", str(killed)], capture_output=True, text=True, timeout=300)
    # broken.jpg is tried again (and fails again); the 400 others are skipped
    assert r3.returncode == 1 and "(1 processed, 400 already done)" in r3.stderr, r3.stderr
    # the same records (failed inputs are tried again, so their line may move to the end)
    assert _comparable(killed) == b and len(_records(killed)) == before.count(b"\n")
    # --force recomputes from scratch
    r4 = subprocess.run(
        [*args, "-o", str(killed), "--force"], capture_output=True, text=True, timeout=300
    )
    assert r4.returncode == 1 and _comparable(killed) == b


# ---------------------------------------------------------------- no TensorFlow at run time


def test_run_works_without_tensorflow(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, photos = demo_model
    code = (
        "import sys\n"
        "for m in ('tensorflow', 'tf2onnx', 'keras', 'tf_keras'):\n"
        "    sys.modules[m] = None  # any import of them now fails\n"
        "import convlens.engine, convlens.engine.run, convlens.reports\n"
        "from convlens.cli import main\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    assert not any(k.startswith('tensorflow') for k in sys.modules if sys.modules[k])\n"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "run",
            str(model),
            str(photos),
            "-o",
            str(tmp_path / "o"),
            "--device",
            "cpu",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "index.html").exists()


def test_stats_from_graph_match_numpy(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    """stats.json (reduced inside the graph by onnxruntime) against numpy over the full
    activations of the same images, with dead channels named."""
    import onnxruntime as ort

    from convlens.engine.images import Preprocessor, read_image

    model, photos = demo_model
    spec = C.read_spec(model)
    out = tmp_path / "o"
    run(model, [str(photos)], out, RunOptions(device="cpu", batch_size=4), progress=False)
    stats = json.loads((out / "stats.json").read_text())
    paths = sorted(photos.rglob("*.jpg"))
    pre = Preprocessor(spec.input, spec.preprocess)
    x = np.stack([pre(read_image(p)) for p in paths])
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in spec.activation_outputs]
    acts = dict(
        zip(
            names,
            sess.run(names, {C.IN_IMAGE: x, C.IN_TARGETS: np.full((len(x), 1), -1)}),
            strict=True,
        )
    )
    for o in spec.activation_outputs:
        a = acts[o.name].astype(np.float64)
        s = stats[o.layer]
        assert s["count"] == len(paths) and s["shape"] == list(a.shape[1:])
        np.testing.assert_allclose(s["mean"], a.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(s["max"], a.max(axis=(0, 1, 2)), rtol=1e-5)
        np.testing.assert_allclose(s["zero_fraction"], (a == 0).mean(axis=(0, 1, 2)), atol=1e-6)
        assert s["dead"] == [int(c) for c in np.flatnonzero(a.max(axis=(0, 1, 2)) <= 0)]


class _PickySink:
    """Wants activations for every other image; remembers what it got."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.got: dict[str, dict[str, np.ndarray]] = {}

    def open(self, outdir: Path, spec: C.ModelSpec, settings: dict[str, Any]) -> None:
        pass

    def wants_activations(self, record: Any) -> bool:
        self.asked.append(record.id)
        return len(self.asked) % 2 == 0

    def on_batch(self, outcomes: list[Any]) -> None:
        for oc in outcomes:
            if oc.activations:
                self.got[oc.record.path] = {k: v.copy() for k, v in oc.activations.items()}

    def close(self, summary: dict[str, Any]) -> None:
        pass


def test_activations_only_for_images_a_sink_wants(
    demo_model: tuple[Path, Path], tmp_path: Path
) -> None:
    import onnxruntime as ort

    from convlens.engine.images import Preprocessor, read_image

    model, photos = demo_model
    spec = C.read_spec(model)
    sink = _PickySink()
    run(
        model,
        [str(photos)],
        tmp_path / "o",
        RunOptions(device="cpu", batch_size=4),
        sinks=[sink],
        progress=False,
    )
    assert len(sink.asked) == 15 and len(sink.got) == 7
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    pre = Preprocessor(spec.input, spec.preprocess)
    for path, acts in sink.got.items():
        x = pre(read_image(Path(path)))[None]
        names = [o.name for o in spec.activation_outputs]
        ref = sess.run(names, {C.IN_IMAGE: x, C.IN_TARGETS: np.full((1, 1), -1)})
        for name, r in zip(names, ref, strict=True):
            np.testing.assert_allclose(acts[name[len(C.ACT_PREFIX) :]], r[0], rtol=1e-5, atol=1e-6)


def _cli_run(*args: str) -> Any:
    """``convlens run ARGS`` in this process (click's runner): the same command, exit
    status and streams as a subprocess, without starting Python again."""
    from types import SimpleNamespace

    from click.testing import CliRunner

    from convlens.cli import main

    r = CliRunner().invoke(main, ["run", *args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def test_non_utf8_file_name(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, photos = demo_model
    d = tmp_path / "in"
    d.mkdir()
    src = next((photos / "brick").glob("*.jpg")).read_bytes()
    (d / "plain.jpg").write_bytes(src)
    with open(os.path.join(os.fsencode(d), b"caf\xe9.jpg"), "wb") as f:
        f.write(src)
    for _ in range(2):  # and again: the results file stays readable
        r = _cli_run(str(model), str(d), "-o", str(tmp_path / "o"), "--device", "cpu", "-q")
        assert r.returncode == 0, r.stderr
    recs = _records(tmp_path / "o")
    assert len(recs) == 2 and all(x["status"] == "ok" for x in recs)
    assert any(os.fsencode(x["path"]).endswith(b"caf\xe9.jpg") for x in recs)


def test_failed_inputs_are_retried(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, photos = demo_model
    late = tmp_path / "late.jpg"
    args = (
        str(model),
        str(late),
        "-o",
        str(tmp_path / "o"),
        "--device",
        "cpu",
        "-q",
        "--no-report",
    )
    assert _cli_run(*args).returncode == 1
    late.write_bytes(next((photos / "grass").glob("*.jpg")).read_bytes())
    r = _cli_run(*args)
    assert r.returncode == 0, r.stderr
    recs = _records(tmp_path / "o")
    assert [x["status"] for x in recs] == ["ok"]


def test_outdir_of_another_model_is_refused(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    import onnx

    model, photos = demo_model
    out = tmp_path / "o"
    assert (
        _cli_run(
            str(model), str(photos / "grass"), "-o", str(out), "--device", "cpu", "-q"
        ).returncode
        == 0
    )
    other = tmp_path / "other.onnx"
    m = onnx.load(str(model))
    m.doc_string = "another model"
    onnx.save(m, str(other))
    r = _cli_run(str(other), str(photos / "grass"), "-o", str(out), "--device", "cpu")
    assert r.returncode == 2 and "another model or other settings (model_sha1" in r.stderr
    r = _cli_run(
        str(model), str(photos / "grass"), "-o", str(out), "--device", "cpu", "--top-k", "1"
    )
    assert r.returncode == 2 and "top_k" in r.stderr
    # --force that cannot start removes nothing
    before = (out / "results.jsonl").read_bytes()
    r = _cli_run(str(model), str(photos / "grass"), "-o", str(out), "--force", "--cam", "nosuch")
    assert r.returncode == 2 and (out / "results.jsonl").read_bytes() == before
    # --force with a working setup recomputes, report files included; a file convlens
    # did not make is never deleted
    stale = out / "assets" / "thumbs" / "0123456789abcdef.jpg"
    stale.write_text("old")
    (out / "assets" / "mine.txt").write_text("a user's note")
    r = _cli_run(
        str(other), str(photos / "grass"), "-o", str(out), "--device", "cpu", "--force", "-q"
    )
    assert r.returncode == 0 and not stale.exists()
    assert (out / "assets" / "mine.txt").read_text() == "a user's note"


def test_duplicate_classes_are_mapped_once(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, photos = demo_model
    out = tmp_path / "o"
    run(
        model,
        [str(photos / "brick")],
        out,
        RunOptions(device="cpu", top_k=1, classes=["brick", "0", "grass"], save_maps=True),
        progress=False,
    )
    for rec in _records(out):
        assert rec["cam_classes"] == [0, 1]
        assert sorted(np.load(out / rec["maps"]).files) == sorted(
            f"{m}/{c}" for m in rec["cam_methods"] for c in (0, 1)
        )


def test_one_run_at_a_time_per_outdir(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    import fcntl

    model, photos = demo_model
    out = tmp_path / "o"
    out.mkdir()
    with open(out / ".lock", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        r = _cli_run(str(model), str(photos / "grass"), "-o", str(out), "--device", "cpu")
        assert r.returncode == 2 and "another convlens run is writing to it" in r.stderr
    r = _cli_run(str(model), str(photos / "grass"), "-o", str(out), "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr


def test_relpaths_keep_folders_apart(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, photos = demo_model
    for cls in ("brick", "grass"):
        (tmp_path / "in" / cls).mkdir(parents=True)
        (tmp_path / "in" / cls / "1.jpg").write_bytes(
            next((photos / cls).glob("*.jpg")).read_bytes()
        )
    out = tmp_path / "o"
    run(
        model, [str(tmp_path / "in" / "*" / "*.jpg")], out, RunOptions(device="cpu"), progress=False
    )
    assert sorted(r["relpath"] for r in _records(out)) == ["brick/1.jpg", "grass/1.jpg"]
    out2 = tmp_path / "o2"
    run(model, [str(tmp_path / "in")], out2, RunOptions(device="cpu"), progress=False)
    assert sorted(r["relpath"] for r in _records(out2)) == ["brick/1.jpg", "grass/1.jpg"]


def test_relpath_under_an_input_directory(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, photos = demo_model
    (tmp_path / "in" / "cats").mkdir(parents=True)
    (tmp_path / "in" / "cats" / "a.jpg").write_bytes(
        next((photos / "brick").glob("*.jpg")).read_bytes()
    )
    run(model, [str(tmp_path / "in")], tmp_path / "o", RunOptions(device="cpu"), progress=False)
    assert [r["relpath"] for r in _records(tmp_path / "o")] == ["cats/a.jpg"]


def test_damaged_or_foreign_run_json_refuses_the_run(
    demo_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """A run.json that cannot be read, or is not convlens', is never silently taken as
    "no earlier run": the run refuses with one line that says to use --force."""
    from convlens.engine.run import RunError

    model, photos = demo_model
    opts = RunOptions(device="cpu")
    for name, text in (("cut", '{"fingerprint": {"model_sha1"'), ("foreign", '{"hello": 1}')):
        out = tmp_path / name
        out.mkdir()
        (out / "run.json").write_text(text)
        with pytest.raises(RunError) as err:
            run(model, [str(photos)], out, opts, progress=False)
        msg = str(err.value)
        assert "\n" not in msg and "run.json" in msg and "--force" in msg
        assert not (out / "results.jsonl").exists()  # nothing was written
        forced = run(model, [str(photos)], out, RunOptions(device="cpu", force=True))
        assert forced.failed == 0 and forced.ok > 0


def test_links_in_outdir_are_refused(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    """Symbolic links planted where convlens writes or deletes inside OUTDIR are never
    followed: one line, exit 2, and the files outside are untouched (issue 14.1)."""
    from click.testing import CliRunner

    from convlens.cli import main

    model, photos = demo_model
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.html").write_text("mine")
    (outside / "keep.json").write_text("{}")
    (outside / ".x.tmp").write_text("mine too")
    victim = tmp_path / "victim.jsonl"
    victim.write_bytes(b'{"a": 1}\n{"half')
    base = tmp_path / "out"
    args = [str(model), str(photos / "grass"), "--device", "cpu", "-q"]
    assert _cli_run(*args, "-o", str(base)).returncode == 0
    for name, target in (("images", outside), ("shards", outside), ("results.jsonl", victim)):
        out = tmp_path / f"out_{name.replace('.', '_')}"
        shutil.copytree(base, out, symlinks=True)
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        p.symlink_to(target)
        r = _cli_run(*args, "-o", str(out))
        assert r.returncode == 2 and "is a symbolic link" in r.stderr, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
        rep = CliRunner().invoke(main, ["report", str(out)])
        if name == "images":
            assert rep.exit_code == 2 and "is a symbolic link" in rep.output
    assert sorted(p.name for p in outside.iterdir()) == [".x.tmp", "keep.html", "keep.json"]
    assert victim.read_bytes() == b'{"a": 1}\n{"half'


def test_outdir_inside_an_input_directory_is_never_walked(
    demo_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """`convlens run M photos -o photos/report`, run again and again, and a glob over the
    photos: the report's own thumbnails and heatmaps never become inputs (issue 14.3)."""
    model, photos = demo_model
    inp = tmp_path / "photos"
    shutil.copytree(photos / "grass", inp)
    n = len(list(inp.glob("*.jpg")))
    out = inp / "report"
    for _ in range(3):
        assert (
            _cli_run(str(model), str(inp), "-o", str(out), "--device", "cpu", "-q").returncode == 0
        )
    assert len(_records(out)) == n
    r = _cli_run(str(model), str(inp / "**" / "*.jpg"), "-o", str(tmp_path / "g"), "-q")
    assert r.returncode == 0 and len(_records(tmp_path / "g")) == n
    # another run's OUTDIR given as an input is named, not walked
    r = _cli_run(str(model), str(out), "-o", str(tmp_path / "h"), "--device", "cpu", "-q")
    assert r.returncode == 1
    assert [x["error"] for x in _records(tmp_path / "h")] == [
        "a convlens run directory (OUTDIR), not an input"
    ]


def test_hostile_file_names_are_one_escaped_line(
    demo_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """A bad input whose name holds a newline and a terminal escape: stderr gets one
    escaped line for it, so it can neither forge a summary line nor reach the terminal
    raw (issue 14.18)."""
    model, photos = demo_model
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(next((photos / "grass").glob("*.jpg")), inp / "fine.jpg")
    evil = "x\n99 ok, 0 failed \x1b[31mred.jpg"
    (inp / evil).write_bytes(b"not an image")
    r = _cli_run(str(model), str(inp), "-o", str(tmp_path / "o"), "--device", "cpu")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert "\x1b" not in r.stderr
    assert not any(line.startswith("99 ok") for line in lines)
    bad = [line for line in lines if "red.jpg" in line]
    assert len(bad) == 1 and "\\n99 ok" in bad[0] and "\\x1b[31m" in bad[0]


def test_sigint_exits_130_and_resumes(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    """Issue 14.9: Ctrl-C ends a run promptly with status 130 and one line saying how to
    go on; the same command then finishes it, equal to an uninterrupted run.  A run
    whose stderr is closed still finishes."""
    model, photos = demo_model
    inp = tmp_path / "in"
    n = 1000  # the demo runs at ~400 img/s: plenty left after 20 for the signal to land
    _many_images(inp, photos, n)
    args = [sys.executable, "-m", "convlens.cli", "run", str(model), str(inp)]
    args += ["--device", "cpu", "--batch-size", "4", "--workers", "1", "--no-report"]
    out = tmp_path / "out"
    proc = subprocess.Popen(  # SIGINT as a terminal gives it, even when this process
        [*args, "-o", str(out)],  # runs as a background job that ignores it (inherited)
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    results = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if results.exists() and results.read_bytes().count(b"\n") >= 20:
            break
        time.sleep(0.02)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert time.time() - t0 < 30
    lines = err.decode().strip().splitlines()
    assert lines[-1] == "convlens: interrupted; the same command resumes where it stopped"
    assert "Traceback" not in err.decode()
    assert 0 < results.read_bytes().count(b"\n") < n
    r = subprocess.run([*args, "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    closed = tmp_path / "closed"
    p = subprocess.Popen(
        [*args, "-o", str(closed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert p.stderr is not None
    p.stderr.close()  # the reader went away before the first message
    assert p.wait(timeout=300) == 0
    assert _comparable(out) == _comparable(closed)
    assert len(_records(out)) == n


def test_shards_and_records_agree_after_damage(tmp_path: Path) -> None:
    """Issue 14.4 and part of 14.10: a results.jsonl line deleted or cut, a shard whose
    ids are not a list, a shard missing its arrays: the rerun recomputes what they
    covered, and stats.json counts every image exactly once, as a clean run does."""
    from click.testing import CliRunner

    from convlens.cli import main

    def demo(out: Path) -> str:
        args = ["demo", "-o", str(out), "--no-report", "--batch-size", "1"]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
        return r.output

    clean = tmp_path / "clean"
    demo(clean)
    want = json.loads((clean / "stats.json").read_text())
    assert len(list((clean / "shards").glob("*.json"))) >= 2
    damages = {
        "line deleted": lambda out: (out / "results.jsonl").write_bytes(
            b"".join((out / "results.jsonl").read_bytes().splitlines(keepends=True)[1:])
        ),
        "line NUL-filled": lambda out: (out / "results.jsonl").write_bytes(
            b"\0" * 40 + b"\n" + (out / "results.jsonl").read_bytes().split(b"\n", 1)[1]
        ),
        "ids not a list": lambda out: sorted((out / "shards").glob("*.json"))[0].write_text(
            '{"ids": 42}'
        ),
        "arrays missing": lambda out: sorted((out / "shards").glob("*.stats.npz"))[-1].unlink(),
    }
    for name, damage in damages.items():
        out = tmp_path / name.replace(" ", "_")
        assert "repaired" not in demo(out)
        damage(out)
        said = [line for line in demo(out).splitlines() if "repaired on resume" in line]
        assert len(said) == 1 and "to be recomputed" in said[0], (name, said)
        got = json.loads((out / "stats.json").read_text())
        for layer, s in want.items():
            assert got[layer]["count"] == s["count"] == 15, (name, layer, got[layer]["count"])
            np.testing.assert_allclose(got[layer]["mean"], s["mean"], rtol=1e-5, err_msg=name)
        assert _comparable(out) == _comparable(clean), name
        with np.load(out / "class_cams.npz") as z, np.load(clean / "class_cams.npz") as c:
            np.testing.assert_array_equal(z["counts"], c["counts"], err_msg=name)


def test_run_with_no_cam_method(tmp_path: Path, demo_model: tuple[Path, Path]) -> None:
    """cam_methods=[]: predictions and statistics, no map (the CAM tensor is not asked)."""
    from convlens.engine.outdir import read_results
    from convlens.engine.run import RunOptions, run

    model, photos = demo_model
    s = run(model, [str(photos)], tmp_path / "o", RunOptions(cam_methods=[]), progress=False)
    recs = [r for r in read_results(tmp_path / "o").records if r.ok]
    assert s.processed == len(recs) == 15
    assert all(r.predictions and r.cam_methods == [] for r in recs)
