"""The pipeline's speed levers keep results right: sampled statistics against numpy over
exactly the sampled images, DCT-domain JPEG scaling against a full decode, the report's
background writer (errors raised, queue bounded) and the capped grid sample."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from convlens.engine import contract as C
from convlens.engine.images import Preprocessor, jpeg_reduction, read_image, read_image_shrunk
from convlens.engine.outdir import Prediction, Record, read_results
from convlens.engine.results import image_id
from convlens.engine.run import RunOptions, run
from convlens.engine.stats import in_stats_sample
from convlens.reports.background import Background
from convlens.reports.gridpolicy import GridPolicy


# ---- statistics over a sample ----------------------------------------------------------
def _numpy_stats(model: Path, paths: list[Path]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    spec = C.read_spec(model)
    pre = Preprocessor(spec.input, spec.preprocess)
    x = np.stack([pre(read_image(p)) for p in paths])
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in spec.activation_outputs]
    got = sess.run(names, {C.IN_IMAGE: x, C.IN_TARGETS: np.full((len(x), 1), -1)})
    pairs = zip(spec.activation_outputs, got, strict=True)
    return {o.layer or "": a.astype(np.float64) for o, a in pairs}


def test_stats_every_is_numpy_over_the_sampled_images(
    demo_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """--stats-every 3: stats.json is exactly numpy's statistics over the images whose id
    hashes into the sample, and a run resumed from half the inputs gives the same."""
    model, photos = demo_model
    paths = sorted(photos.rglob("*.jpg"))
    sampled = [p for p in paths if in_stats_sample(image_id(p), 3)]
    assert 0 < len(sampled) < len(paths)
    opts = RunOptions(device="cpu", batch_size=4, stats_every=3, save_maps=True)
    out = tmp_path / "o"
    run(model, [str(photos)], out, opts, progress=False)
    stats = json.loads((out / "stats.json").read_text())
    # the engine puts a batch's sampled images first for the graph: every record and map
    # still belongs to its own image, in the input order
    every = tmp_path / "every"
    run(model, [str(photos)], every, RunOptions(device="cpu", batch_size=4, save_maps=True))
    got, want = read_results(out).records, read_results(every).records
    assert [r.id for r in got] == [r.id for r in want]
    for g, w in zip(got, want, strict=True):
        assert [p.index for p in g.predictions] == [p.index for p in w.predictions]
        np.testing.assert_allclose(
            [p.prob for p in g.predictions], [p.prob for p in w.predictions], atol=1e-6
        )
        with np.load(out / str(g.maps)) as a, np.load(every / str(w.maps)) as b:
            assert sorted(a.files) == sorted(b.files)
            for k in a.files:
                np.testing.assert_allclose(a[k], b[k], atol=1e-5)
    for layer, a in _numpy_stats(model, sampled).items():
        s = stats[layer]
        assert s["count"] == len(sampled)
        np.testing.assert_allclose(s["mean"], a.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(s["max"], a.max(axis=(0, 1, 2)), rtol=1e-5)
        np.testing.assert_allclose(s["zero_fraction"], (a == 0).mean(axis=(0, 1, 2)), atol=1e-6)
    resumed = tmp_path / "r"
    half = [str(p) for p in paths[: len(paths) // 2]]
    run(model, half, resumed, opts, progress=False)
    run(model, [str(p) for p in paths], resumed, opts, progress=False)
    assert json.loads((resumed / "stats.json").read_text()) == stats
    with pytest.raises(Exception, match="stats-every"):
        run(model, [str(photos)], tmp_path / "x", RunOptions(stats_every=-1), progress=False)


def test_stats_every_0_takes_no_statistics(demo_model: tuple[Path, Path], tmp_path: Path) -> None:
    """--stats-every 0: the main session has no statistics outputs, stats.json is empty,
    the records and maps are the full run's, and the OUTDIR remembers the setting."""
    from convlens.engine.infer import Inference, main_outputs
    from convlens.engine.plan import RunPlan

    model, photos = demo_model
    assert not any(in_stats_sample(image_id(p), 0) for p in photos.rglob("*.jpg"))
    plan = RunPlan.build(model, RunOptions(device="cpu", stats_every=0))
    assert not [n for n in main_outputs(plan) if n.startswith("stats/")]
    session = Inference(plan, tmp_path, []).session
    assert not [n for n in session.output_names if n.startswith("stats/")]
    runs = {}
    for every in (0, 1):
        out = runs[every] = tmp_path / f"e{every}"
        opts = RunOptions(device="cpu", batch_size=4, stats_every=every, save_maps=True)
        assert run(model, [str(photos)], out, opts, progress=False).ok == 15
    assert json.loads((runs[0] / "stats.json").read_text()) == {}
    assert json.loads((runs[1] / "stats.json").read_text()) != {}
    assert (runs[0] / "results.jsonl").read_bytes() == (runs[1] / "results.jsonl").read_bytes()
    for rec in read_results(runs[0]).records:
        with np.load(runs[0] / str(rec.maps)) as a, np.load(runs[1] / str(rec.maps)) as b:
            for k in a.files:
                np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(Exception, match="stats_every"):  # not resumed with statistics
        run(model, [str(photos)], runs[0], RunOptions(device="cpu", batch_size=4), progress=False)


# ---- DCT-domain JPEG scaling -------------------------------------------------------------
def _photo(tmp: Path, w: int, h: int, orientation: int | None = None) -> Path:
    """A real photograph (scikit-image's astronaut) as a JPEG of w x h, optionally with
    an EXIF orientation."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(cv2.resize(data.astronaut(), (w, h), interpolation=cv2.INTER_AREA))
    path = tmp / f"photo_{w}x{h}_{orientation}.jpg"
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    img.save(path, "JPEG", quality=90, exif=exif.tobytes())
    return path


def test_jpeg_reduction_keeps_the_input_size() -> None:
    assert jpeg_reduction(640, 480, 150) == 2  # 320 x 240; by 4: 160 x 120 < 150
    assert jpeg_reduction(640, 480, 100) == 4
    assert jpeg_reduction(4000, 3000, 224) == 8
    assert jpeg_reduction(299, 299, 150) == 1  # less than twice
    assert jpeg_reduction(640, 480, 150, 400) == 1  # the longer side must stay >= 400
    assert jpeg_reduction(480, 640, 120, 160) == 4
    assert jpeg_reduction(639, 479, 120) == 2  # 479 < 4 x 120


def test_shrunk_decode_against_full_decode(tmp_path: Path) -> None:
    """The model input from a JPEG decoded at half size stays within a few grey levels of
    the full decode's; the size reported is the full image's, EXIF orientation
    included; a small JPEG and a PNG are decoded at full size."""
    pre = Preprocessor(
        C.InputSpec("image", 150, 150, 3, "NHWC", "rgb", "float32"), C.Preprocess(scale=1.0)
    )
    path = _photo(tmp_path, 640, 480)
    full = read_image(path)
    small, size = read_image_shrunk(path, 0, (150, 0))
    assert small.shape == (240, 320, 3) and size == (480, 640)
    diff = np.abs(pre(small) - pre(full))
    assert diff.mean() < 1.5 and diff.max() < 40, (diff.mean(), diff.max())
    rotated = _photo(tmp_path, 640, 480, orientation=6)
    img, size = read_image_shrunk(rotated, 0, (150, 0))
    assert img.shape == (320, 240, 3) and size == read_image(rotated).shape[:2] == (640, 480)
    same, size = read_image_shrunk(_photo(tmp_path, 280, 280), 0, (150, 0))
    assert same.shape == (280, 280, 3) and size == (280, 280)
    png = tmp_path / "p.png"
    cv2.imwrite(str(png), cv2.cvtColor(full, cv2.COLOR_RGB2BGR))
    img, size = read_image_shrunk(png, 0, (150, 0))
    assert img.shape == (480, 640, 3) and np.array_equal(img, full)


# ---- the report's background writer ------------------------------------------------------
def test_background_collects_in_order_bounded_and_raises() -> None:
    got: list[int] = []
    running = 0
    most = 0
    lock = threading.Lock()

    def job(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.002)
        with lock:
            running -= 1
        return i

    work: Background[int] = Background(2, 3, got.append)
    for i in range(20):
        work.submit(job, i)
        assert len(work) <= 3
    work.drain()
    assert got == list(range(20)) and most <= 2
    got.clear()
    work = Background(2, 100, got.append, max_bytes=10)  # weight 6 each: one at a time
    for i in range(6):
        work.submit(job, i, weight=6)
        assert len(work) == 1
    work.drain()
    assert got == list(range(6))

    def bad(i: int) -> int:
        if i == 2:
            raise OSError("disk full")
        return i

    got.clear()
    work = Background(1, 8, got.append)
    for i in range(5):
        work.submit(bad, i)
    with pytest.raises(OSError, match="disk full"):
        work.drain()
    inline: Background[int] = Background(0, 1, got.append)
    with pytest.raises(OSError, match="disk full"):
        inline.submit(bad, 2)


# ---- capped grid sample -------------------------------------------------------------------
def _rec(i: str, prob: float) -> Record:
    return Record(i, i, i, predictions=[Prediction(0, "a", prob)])


def test_grid_sample_is_capped() -> None:
    """The first 2 images, and of the unsure ones (top-1 below 0.5) only the first 3:
    at most 5 images get grids however many are unsure."""
    order = [f"i{n:02d}" for n in range(20)]
    policy = GridPolicy("sample", 2, grid_notable=3)
    policy.expect(order, {})
    got = [i for i in order if policy.decide(_rec(i, 0.2 if i >= "i01" else 0.9))]
    assert got == ["i00", "i01", "i02", "i03"]
    # a resume: i00..i09 done, all unsure but i00; i01..i03 are certain, i04.. not
    done = {i: _rec(i, 0.9 if i == "i00" else 0.2) for i in order[:10]}
    policy = GridPolicy("sample", 2, grid_notable=3)
    assert policy.certain(order, done) == {"i00", "i01", "i02", "i03"}
    # with i00 still to run, it may be unsure too: only i01 and i02 are certain
    del done["i00"]
    assert policy.certain(order, done) == {"i01", "i02"}


# ---- activations from the main pass --------------------------------------------------------
class _ActivationRecorder:
    """A sink that surely wants the activations of the ``early`` images before their
    predictions, and decides on the ``late`` ones afterwards."""

    def __init__(self, early: set[str], late: set[str]):
        self.early, self.late = early, late
        self.got: dict[str, dict[str, np.ndarray]] = {}
        self.asked: list[str] = []  # wants_activations' calls, in order

    def open(self, outdir: Path, spec: C.ModelSpec, settings: dict) -> None:
        pass

    def close(self, summary: dict) -> None:
        pass

    def surely_wants_activations(self, record: Record) -> bool:
        return record.id in self.early

    def wants_activations(self, record: Record) -> bool:
        self.asked.append(record.id)
        return record.id in self.early or record.id in self.late

    def on_batch(self, outcomes: list) -> None:
        for oc in outcomes:
            if oc.activations:
                self.got[oc.record.id] = {k: np.array(v) for k, v in oc.activations.items()}


def _count_second_pass(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of images of each second activations pass, as the runs make them."""
    from convlens.engine.infer import Inference

    second_pass_rows: list[int] = []
    opened = Inference._activations_session

    def spy(self: Inference):  # type: ignore[no-untyped-def]
        session = opened(self)
        run_ = session.run

        class Counting:
            def run(self, names: list[str], feeds: dict) -> list[np.ndarray]:
                second_pass_rows.append(len(feeds[C.IN_IMAGE]))
                return run_(names, feeds)

        return Counting()

    monkeypatch.setattr(Inference, "_activations_session", spy)
    return second_pass_rows


@pytest.mark.parametrize(
    ("runtime", "stats_every"),
    [("onnxruntime", 1), ("onnxruntime", 3), ("openvino", 3)],
)
def test_activations_a_sink_surely_wants_come_from_the_main_pass(
    demo_model: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    runtime: str,
    stats_every: int,
) -> None:
    """The images a sink surely wants activations for get them from the main pass (its
    rows sliced out of the same session run; the engine reorders a batch so that they,
    and the statistics' sample, are runs of rows), the others from a second pass over
    just those images; both equal onnxruntime's activation outputs of the analysis
    file, each image its own."""
    from convlens.engine.runtime_ov import available

    if runtime == "openvino" and not available():
        pytest.skip("needs the [openvino] extra")

    model, photos = demo_model
    paths = sorted(photos.rglob("*.jpg"))
    ids = [image_id(p) for p in paths]
    early, late = set(ids[1:9:2]), {ids[0], ids[-1]}
    second_pass_rows = _count_second_pass(monkeypatch)
    sink = _ActivationRecorder(early, late)
    opts = RunOptions(device="cpu", batch_size=4, runtime=runtime, stats_every=stats_every)
    run(model, [str(photos)], tmp_path / "o", opts, sinks=[sink], progress=False)
    assert set(sink.got) == early | late
    assert sink.asked == ids  # in the input order, as the report's grid policy needs
    assert sum(second_pass_rows) == len(late)  # the early ones were not run again
    ref = _numpy_stats(model, paths)  # onnxruntime's activation outputs, by layer
    for i, rid in enumerate(ids):
        for layer, acts in sink.got.get(rid, {}).items():
            np.testing.assert_allclose(acts, ref[layer][i], rtol=1e-5, atol=1e-5)


def test_batches_arranged_for_the_slices_keep_each_image_its_own(
    demo_model: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forced statistics sample and wanted set: a batch with all four groups (sampled
    only, sampled and wanted, wanted only, neither), one with no sampled image, one all
    sampled.  Every record, map and activation stays its image's, the sink is asked in
    input order, the statistics are numpy's over exactly the sample; a run sampling no
    image has no statistics at all."""
    import convlens.engine.infer as infer_mod

    model, photos = demo_model
    paths = sorted(photos.rglob("*.jpg"))
    ids = [image_id(p) for p in paths]
    assert len(ids) == 15  # batches of 4: 0-3, 4-7, 8-11, 12-14
    sampled = {ids[i] for i in (1, 2, 8, 9, 10, 11)}
    early, late = {ids[i] for i in (0, 2, 5, 9, 13)}, {ids[14]}
    monkeypatch.setattr(infer_mod, "in_stats_sample", lambda rid, every: rid in sampled)
    sink = _ActivationRecorder(early, late)
    second_pass_rows = _count_second_pass(monkeypatch)
    opts = RunOptions(device="cpu", batch_size=4, stats_every=5, save_maps=True)
    run(model, [str(photos)], tmp_path / "o", opts, sinks=[sink], progress=False)
    assert sink.asked == ids and set(sink.got) == early | late
    assert sum(second_pass_rows) == len(late)  # the wanted rows were the sliced ones
    ref = _numpy_stats(model, paths)
    for i, rid in enumerate(ids):
        for layer, acts in sink.got.get(rid, {}).items():
            np.testing.assert_allclose(acts, ref[layer][i], rtol=1e-5, atol=1e-5)
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    rows = [i for i, rid in enumerate(ids) if rid in sampled]
    for layer, a in ref.items():
        assert stats[layer]["count"] == len(rows)
        np.testing.assert_allclose(
            stats[layer]["mean"], a[rows].mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-7
        )
        np.testing.assert_allclose(stats[layer]["max"], a[rows].max(axis=(0, 1, 2)), rtol=1e-5)
    every = tmp_path / "every"
    run(model, [str(photos)], every, RunOptions(device="cpu", batch_size=4, save_maps=True))
    got, want = read_results(tmp_path / "o").records, read_results(every).records
    assert [r.id for r in got] == [r.id for r in want] == ids
    for g, w in zip(got, want, strict=True):
        assert [p.index for p in g.predictions] == [p.index for p in w.predictions]
        with np.load(tmp_path / "o" / str(g.maps)) as ga, np.load(every / str(w.maps)) as wa:
            for k in wa.files:
                np.testing.assert_allclose(ga[k], wa[k], atol=1e-5)
    monkeypatch.setattr(infer_mod, "in_stats_sample", lambda rid, every: False)
    run(model, [str(photos)], tmp_path / "none", opts, progress=False)
    assert json.loads((tmp_path / "none" / "stats.json").read_text()) == {}


def test_grid_policy_surely_promises_decide() -> None:
    """What the report tells the engine before the predictions (``surely``) holds: every
    image it names gets grids when it is ok, confident or not, whatever was done before."""
    order = [f"i{k}" for k in range(130)]
    for done in ({}, {f"i{k}": _rec(f"i{k}", 0.9) for k in (3, 60, 61)}):
        p = GridPolicy("sample", 50, 50)
        p.expect(order, done)
        for k, rid in enumerate(order):
            if rid in done:
                continue
            surely = p.surely(rid)
            assert surely == (k < 50)
            decided = p.decide(_rec(rid, 0.2 if k % 3 == 0 else 0.9))
            assert decided or not surely
    assert GridPolicy("all").surely("x") and not GridPolicy("none").surely("x")


def test_forward_ahead_is_in_order_one_batch_ahead_and_raises_at_its_batch() -> None:
    """The forward thread: results in batch order, at most one batch ahead of the
    consumer, a pass's exception raised where its batch is consumed, nothing dropped
    before it; a batch with nothing decodable gets no pass."""
    from convlens.engine.decode import Decoded
    from convlens.engine.run import forward_ahead

    class Fake:
        def __init__(self) -> None:
            self.started: list[int] = []

        def forward(self, good: list) -> int:
            self.started.append(good[0].index)
            if good[0].index == 4:
                raise RuntimeError("pass 4 failed")
            return int(good[0].index)

    def batch(i: int, ok: bool = True) -> list:
        rec = Record(id=str(i), path=str(i), relpath=str(i))
        return [Decoded(i, Path(str(i)), rec, tensor=np.zeros(1) if ok else None)]

    fake = Fake()
    got: list[int | None] = []
    batches = [batch(0), batch(1, ok=False), batch(2), batch(3), batch(4), batch(5), batch(6)]
    with pytest.raises(RuntimeError, match="pass 4 failed"):
        for b, fut in forward_ahead(iter(batches), fake):  # type: ignore[arg-type]
            assert max(fake.started) <= b[0].index + 1
            got.append(None if fut is None else fut.result())
    assert got == [0, None, 2, 3]
    assert 1 not in fake.started and max(fake.started) <= 5


def test_streams_give_the_run_one_stream_gives(
    demo_model: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--streams 2 (the default on 2+ CPUs): each batch's main pass is two calls at once
    over its two parts (the first two meet at a barrier, which they only pass running
    together), and the run is byte for byte the one-stream run: records in input order,
    maps, statistics (sampled: their rows, and the grid images' rows, are positions the
    parts count from their own first row; batches of 5 split 2 + 3), class CAMs and the
    report's files."""
    from convlens.engine.runtime import OrtSession
    from convlens.reports import ReportAssetSink

    model, photos = demo_model
    meet = threading.Barrier(2, timeout=10)
    rows: dict[int, list[int]] = {1: [], 2: []}  # per run: the rows of each main call
    session_run = OrtSession.run

    def spied(self: OrtSession, names: list[str], feeds: dict) -> list:
        if C.IN_TARGETS in feeds:  # the main session (the others take no targets)
            rows[streams].append(len(feeds[C.IN_IMAGE]))
            if streams == 2 and len(rows[2]) <= 2:
                meet.wait()  # one call at a time: broken after 10 s
        return session_run(self, names, feeds)

    monkeypatch.setattr(OrtSession, "run", spied)
    outs = {}
    for streams in (1, 2):
        out = outs[streams] = tmp_path / f"s{streams}"
        opts = RunOptions(
            device="cpu", batch_size=5, threads=1, streams=streams, stats_every=3, save_maps=True
        )
        sink = ReportAssetSink(grids="sample", grid_sample=3)
        summary = run(model, [str(photos)], out, opts, sinks=[sink], progress=False)
        assert summary.ok == 15
    assert not meet.broken
    assert rows[1] == [5, 5, 5] and sorted(rows[2]) == [2, 2, 2, 3, 3, 3]  # parts at once

    def files(root: Path) -> dict[str, bytes]:
        skip = ("run.json", "assets.json", ".lock")  # times and the summary's seconds
        return {
            str(f.relative_to(root)): f.read_bytes()
            for f in sorted(root.rglob("*"))
            if f.is_file() and f.name not in skip and "shards" not in f.parts
        }

    a, b = files(outs[1]), files(outs[2])
    assert a.keys() == b.keys() and any(k.startswith("assets/grids/") for k in a)
    for name in a:
        if name.endswith(".npz"):
            with np.load(outs[1] / name) as x, np.load(outs[2] / name) as y:
                assert sorted(x.files) == sorted(y.files)
                for k in x.files:
                    np.testing.assert_array_equal(x[k], y[k])
        else:
            assert a[name] == b[name], name


def test_iter_results_streams_what_read_results_reads(tmp_path: Path) -> None:
    """The run's summary streams results.jsonl: the same records as read_results, a bad
    line and a trailing line cut by a kill skipped."""
    from convlens.engine.outdir import RESULTS, ResultsLog, iter_results, read_results

    recs = [Record(id=str(i), path=f"/p/{i}.jpg", relpath=f"{i}.jpg") for i in range(5)]
    recs[2].fail("cannot decode")
    log = ResultsLog(tmp_path)
    log.append(recs[:3])
    log.close()
    with open(tmp_path / RESULTS, "ab") as f:
        f.write(b"{not json\n")
    log = ResultsLog(tmp_path)
    log.append(recs[3:])
    log.close()
    with open(tmp_path / RESULTS, "ab") as f:
        f.write(b'{"id": "cut by a ki')
    streamed = list(iter_results(tmp_path))
    assert [r.to_json() for r in streamed] == [r.to_json() for r in recs]
    assert [r.to_json() for r in streamed] == [r.to_json() for r in read_results(tmp_path).records]
    assert [r.ok for r in streamed] == [True, True, False, True, True]


def test_decode_workers_by_device() -> None:
    """--workers wins; otherwise every CPU decodes for CUDA, half of them on the CPU."""
    import os

    from convlens.engine.decode import decode_workers

    cpus = os.cpu_count() or 1
    assert decode_workers(3, "cpu") == decode_workers(3, "cuda") == 3
    assert decode_workers(None, "cuda") == cpus
    assert decode_workers(None, "cpu") == max(1, cpus // 2)


def test_streams_by_cpus_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """--streams wins; otherwise two where there are two CPUs or more and no --threads
    (an explicit thread count keeps a batch in one call); the onnxruntime CPU session
    opened for s streams takes s calls, and as its one intra-op pool, which they share,
    the CPUs less the s - 1 other callers (on 2 CPUs, one thread each); a session on
    OpenVINO one call whatever is asked."""
    import os

    from convlens.engine import runtime as rt
    from convlens.engine.plan import resolve_streams

    for cpus, want in ((1, 1), (2, 2), (16, 2)):
        monkeypatch.setattr(os, "cpu_count", lambda n=cpus: n)
        assert resolve_streams(None, None) == want
        assert resolve_streams(None, 4) == 1 and resolve_streams(3, 4) == 3
    model = str(Path(__file__).parent.parent / "convlens" / "demo" / "textures.onnx")
    threads: list[int | None] = []
    options = rt.session_options
    monkeypatch.setattr(rt, "session_options", lambda t=None: threads.append(t) or options(t))
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert rt.open_session(model, "cpu", streams=2).streams == 2 and threads == [7]
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert rt.open_session(model, "cpu", streams=2).streams == 2 and threads[-1] == 1
    assert rt.open_session(model, "cpu", threads=3, streams=2).streams == 2 and threads[-1] == 3
    assert rt.open_session(model, "cpu").streams == 1 and threads[-1] is None
    from convlens.engine.runtime_ov import available

    if available():
        assert rt.open_session(model, "cpu", runtime="openvino", streams=2).streams == 1
    with pytest.raises(Exception, match="streams"):
        run(model, ["x.jpg"], "/nonexistent/out", RunOptions(streams=0), progress=False)
