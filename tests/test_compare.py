"""``convlens compare`` on real runs (tests/compare_runs.py): every figure against a
direct computation from the two runs' results.jsonl, maps and stats.json; mismatched
runs; the CLI; the report in a real Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from compare_runs import Runs, make_runs
from test_reports_browser import SCREENSHOTS, Watched, _url, browser  # noqa: F401 (fixture)

from convlens.cli import main
from convlens.reports.compare import FLIP_ORDER, compare, read_comparison
from convlens.reports.compare_figures import pearson_r, top_iou, top_mask
from convlens.reports.compare_match import match_inputs
from convlens.reports.data import ImageEntry

from report_fixtures import XSS_NAME


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return make_runs(tmp_path_factory.mktemp("compare"))


@pytest.fixture(scope="session")
def report(runs: Runs, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("compare_out") / "ab"
    return out, compare(runs.a, runs.b, out, page_size=3)


# ---- the reference: straight from the files ------------------------------------------
def _records(run: Path) -> dict[str, dict[str, Any]]:
    lines = (run / "results.jsonl").read_text().splitlines()
    return {d["relpath"]: d for d in map(json.loads, lines)}


def _top(rec: dict[str, Any]) -> dict[str, Any]:
    top: dict[str, Any] = max(rec["predictions"], key=lambda p: p["prob"])
    return top


def _ref_r(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _ref_iou(a: np.ndarray, b: np.ndarray) -> float:
    def top(m: np.ndarray) -> set[int]:
        flat = m.ravel()
        k = max(1, round(0.15 * flat.size))
        t = np.sort(flat)[::-1][k - 1]
        return {i for i, v in enumerate(flat) if v >= t}

    ta, tb = top(a), top(b)
    return len(ta & tb) / len(ta | tb)


def test_predictions_match_a_direct_count(runs: Runs, report: tuple[Path, Any]) -> None:
    _, s = report
    ra, rb = _records(runs.a), _records(runs.b)
    assert set(ra) == set(rb) and s.matched == s.compared == len(ra) == 16
    agree = sum(_top(ra[k])["name"] == _top(rb[k])["name"] for k in ra)
    assert s.agree == agree and s.agreement == pytest.approx(agree / 16)

    def right(rec: dict[str, Any]) -> bool:
        return bool(_top(rec)["index"] == rec["label_index"])

    labelled = [k for k in ra if ra[k]["label_index"] is not None]
    r2w = [k for k in labelled if right(ra[k]) and not right(rb[k])]
    w2r = [k for k in labelled if not right(ra[k]) and right(rb[k])]
    other = [
        k
        for k in ra
        if k not in r2w and k not in w2r and _top(ra[k])["name"] != _top(rb[k])["name"]
    ]
    assert s.flips == {"right_to_wrong": len(r2w), "wrong_to_right": len(w2r), "other": len(other)}
    assert len(r2w) >= 2 and len(other) >= 1  # the perturbation flips some
    # per-class accuracy and its change
    assert s.labelled == len(labelled)
    rows = {c.name: c for c in s.per_class}
    for name in {ra[k]["label"] for k in labelled}:
        keys = [k for k in labelled if ra[k]["label"] == name]
        acc_a = sum(map(right, (ra[k] for k in keys))) / len(keys)
        acc_b = sum(map(right, (rb[k] for k in keys))) / len(keys)
        assert rows[name].images == len(keys)
        assert rows[name].accuracy_a == pytest.approx(acc_a)
        assert rows[name].delta == pytest.approx(acc_b - acc_a)
    assert rows["grass"].delta < 0
    # the flips gallery's order: right -> wrong first, then wrong -> right, then others
    c = read_comparison(runs.a, runs.b)
    kinds = [p.change for p in c.flips]
    assert kinds == sorted(kinds, key=FLIP_ORDER.index) and kinds[0] == "right_to_wrong"
    assert sorted(p.key for p in c.flips) == sorted(r2w + w2r + other)


def test_cam_similarity_matches_the_maps(runs: Runs) -> None:
    ra, rb = _records(runs.a), _records(runs.b)
    c = read_comparison(runs.a, runs.b)
    assert len(c.pairs) == 16 and all(p.cam is not None for p in c.pairs)
    rs = []
    for p in c.pairs:
        assert p.cam is not None
        cls = _top(ra[p.key])["index"]  # A's top-1 class, first method both saved: cam
        assert (p.cam.method, p.cam.class_a, p.cam.class_b) == ("cam", cls, cls)
        with np.load(runs.a / ra[p.key]["maps"]) as fa, np.load(runs.b / rb[p.key]["maps"]) as fb:
            ma, mb = fa[f"cam/{cls}"], fb[f"cam/{cls}"]
        rs.append(_ref_r(ma, mb))
        assert p.cam.r == pytest.approx(rs[-1], abs=1e-9)
        assert p.cam.iou == pytest.approx(_ref_iou(ma, mb), abs=1e-12)
    assert c.summary.median_r == pytest.approx(float(np.median(rs)))
    assert min(rs) < 0.99  # the maps moved
    moved = [p.cam.r for p in c.moved if p.cam]
    assert moved == sorted(moved) and len(moved) == 16


def test_class_cams_and_stats_match_the_files(runs: Runs) -> None:
    c = read_comparison(runs.a, runs.b)
    with np.load(runs.a / "class_cams.npz") as fa, np.load(runs.b / "class_cams.npz") as fb:
        for cc in c.class_cams:
            ma, mb = fa[f"class_{cc.index_a}"], fb[f"class_{cc.index_b}"]
            assert cc.r == pytest.approx(_ref_r(ma, mb), abs=1e-6)
            assert cc.iou == pytest.approx(_ref_iou(ma, mb))
            assert (cc.count_a, cc.count_b) == (fa["counts"][cc.index_a], fb["counts"][cc.index_b])
    assert {cc.name for cc in c.class_cams} == {"brick", "grass", "gravel"}
    sa = json.loads((runs.a / "stats.json").read_text())
    sb = json.loads((runs.b / "stats.json").read_text())
    assert [d.name for d in c.layers] == ["conv1", "conv2", "conv3"]
    for d in c.layers:
        a, b = sa[d.name], sb[d.name]
        assert d.died == sorted(set(b["dead"]) - set(a["dead"]))
        assert d.revived == sorted(set(a["dead"]) - set(b["dead"]))
        dm = np.array(b["mean"]) - np.array(a["mean"])
        dz = np.array(b["zero_fraction"]) - np.array(a["zero_fraction"])
        assert d.max_mean_shift == pytest.approx(np.abs(dm).max())
        assert d.max_zero_shift == pytest.approx(np.abs(dz).max())
        if d.mean_shifts:
            assert d.mean_shifts[0].channel == int(np.argmax(np.abs(dm)))
            assert d.mean_shifts[0].delta == pytest.approx(dm[d.mean_shifts[0].channel])
    conv2 = c.layers[1]
    assert 0 in conv2.died and 2 in conv2.revived  # the perturbation's doing


def test_mismatched_runs_compare_what_they_can(runs: Runs, tmp_path: Path) -> None:
    s = compare(runs.a, runs.c, tmp_path / "ac")
    text = "\n".join(s.mismatches)
    assert "class names differ" in text and "stones" in text and "gravel" in text
    assert "layer conv1 is only in run A" in text
    assert "run B has no saved maps" in text
    assert s.compared == 16 and s.cams_compared == 0 and s.mean_r is None
    assert [d["name"] for d in s.layers] == ["conv2", "conv3"]
    # gravel predictions of A are "stones" in C: named as changed, the rest agree
    ra, rc = _records(runs.a), _records(runs.c)
    assert s.agree == sum(_top(ra[k])["name"] == _top(rc[k])["name"] for k in ra)
    assert (
        s.flips == {"right_to_wrong": 0, "wrong_to_right": 0, "other": 16 - s.agree}
        and s.agree == 12
    )
    # gravel is not a class of C: its images are labelled in A only, left out of accuracy
    assert {c.name for c in s.per_class} == {"brick", "grass"} and s.labelled == 9
    assert {c["name"] for c in s.class_cams} == {"brick", "grass"}
    index = (tmp_path / "ac" / "index.html").read_text()
    assert "Not compared" in index and "layer conv1 is only in run A" in index


def test_a_run_without_statistics_is_named_not_read_as_no_dead_channels(
    runs: Runs, tmp_path: Path
) -> None:
    """A run with an empty stats.json (--stats-every 0) has no layer compared, either
    way round, and is named once: its layers read from the spec are not 'no dead
    channel', so nothing 'came alive' or 'died'."""
    b = tmp_path / "b"
    shutil.copytree(runs.b, b)
    (b / "stats.json").write_text("{}")
    assert any(json.loads((runs.a / "stats.json").read_text()).values())
    for first, second, label in ((runs.a, b, "B"), (b, runs.a, "A")):
        s = compare(first, second, tmp_path / f"x{label}")
        assert s.layers == []
        named = [m for m in s.mismatches if "no activation statistics" in m]
        assert named == [
            f"run {label} has no activation statistics (stats.json; "
            "--stats-every 0 takes none): layers not compared"
        ]
    full = compare(runs.a, runs.b, tmp_path / "ab")
    assert full.layers and not [m for m in full.mismatches if "statistics" in m]


def test_damaged_files_are_named_not_fatal(runs: Runs, tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(runs.b, b)
    rec = _records(b)["brick/brick_1.jpg"]
    (b / rec["maps"]).write_bytes(b"PK\x03\x04 cut")
    (b / "class_cams.npz").write_bytes(b"")
    s = compare(runs.a, b, tmp_path / "out")
    assert s.cams_compared == 15 and s.class_cams == []
    text = "\n".join(s.mismatches)
    assert "run B's maps of brick/brick_1.jpg could not be read" in text
    assert "run B's class_cams.npz could not be read" in text


def test_inputs_matched_across_roots(runs: Runs, tmp_path: Path) -> None:
    """A run given a sub-folder has shorter relpaths: matched by their common end; the
    others are named as only in one run."""
    from convlens.engine.run import RunOptions, run

    out = tmp_path / "grass_only"
    run(
        runs.models["b"],
        [str(runs.photos / "grass")],
        out,
        RunOptions(device="cpu", save_maps=True),
        progress=False,
        warn=lambda m: None,
    )
    s = compare(runs.a, out, tmp_path / "cmp")
    assert (s.matched, s.only_a, s.only_b) == (5, 11, 0)
    assert any("only in run A" in m for m in s.mismatches)
    assert s.cams_compared == 5 and s.labelled == 0


def test_cli_json_help_and_errors(runs: Runs, tmp_path: Path) -> None:
    cli = CliRunner()
    r = cli.invoke(main, ["compare", "--help"])
    assert r.exit_code == 0 and "--json" in r.output and "relative" in r.output
    r = cli.invoke(main, ["compare", str(runs.a), str(runs.b), "-o", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    ra, rb = _records(runs.a), _records(runs.b)
    assert doc["agree"] == sum(_top(ra[k])["name"] == _top(rb[k])["name"] for k in ra)
    assert doc["flips"]["right_to_wrong"] >= 2 and doc["same_model"] is False
    assert doc["report"].endswith("index.html") and Path(doc["report"]).exists()
    assert {"agreement", "accuracy_a", "accuracy_b", "per_class", "layers"} <= set(doc)
    # bad input: one line, exit 2
    r = cli.invoke(main, ["compare", str(tmp_path), str(runs.b), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not a convlens run directory" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "results.jsonl").write_bytes((runs.a / "results.jsonl").read_bytes())
    (damaged / "run.json").write_text("[1, 2")
    r = cli.invoke(main, ["compare", str(runs.a), str(damaged), "-o", str(tmp_path / "y")])
    assert r.exit_code == 2 and "run.json is damaged" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli.invoke(main, ["compare", str(runs.a), str(runs.b), "-o", str(runs.a)])
    assert r.exit_code == 2 and "overwrite" in r.stderr


def test_report_files_and_links(runs: Runs, report: tuple[Path, Any]) -> None:
    out, s = report
    c = read_comparison(runs.a, runs.b)
    pages = sorted(p.name for p in (out / "images").iterdir())
    assert pages == sorted(f"{p.pid}.html" for p in c.pairs)
    html = (out / "images" / pages[0]).read_text()
    pid = pages[0][:-5]
    ida, idb = pid.split("-")
    # links into both runs' own image pages (relative), and every link resolves
    links = [h.split('"')[0] for h in html.split('href="')[1:]]
    targets = {(out / "images" / h).resolve() for h in links if h.endswith(".html")}
    assert runs.a / "images" / f"{ida}.html" in targets
    assert runs.b / "images" / f"{idb}.html" in targets
    assert all(t.exists() for t in targets) and not any(h.startswith("/") for h in links)
    assert XSS_NAME not in (out / "index.html").read_text()  # escaped, never raw
    assert s.report == str(out / "index.html")


# ---- pure parts -------------------------------------------------------------------------
def _entry(rid: str, rel: str, path: str = "") -> ImageEntry:
    return ImageEntry(rid, path or f"/r/{rel}", rel, True, None, 1, 1, [], None, None, [], [])


def test_matching_rules() -> None:
    """Exact relpath first; a relpath several inputs share is paired by absolute path
    or counted ambiguous; what is left by whole trailing components, unique both ways."""
    a = [
        _entry("a1", "cats/1.jpg"),
        _entry("a2", "cats/2.jpg"),
        _entry("a3", "dogs/3.jpg"),
        _entry("a4", "dup.jpg", "/r1/dup.jpg"),
        _entry("a5", "dup.jpg", "/r2/dup.jpg"),
        _entry("a6", "p/x.jpg"),
        _entry("a7", "q/x.jpg"),
        _entry("a8", "ats/9.jpg"),
    ]
    b = [
        _entry("b1", "cats/1.jpg", "/elsewhere/cats/1.jpg"),
        _entry("b2", "2.jpg"),
        _entry("b3", "3.jpg"),
        _entry("b4", "dup.jpg", "/r1/dup.jpg"),
        _entry("b6", "x.jpg"),  # ends both p/x.jpg and q/x.jpg: not matched
        _entry("b8", "cats/9.jpg"),  # "ats/9.jpg" is not a whole-component end of it
    ]
    m = match_inputs(a, b)
    pairs = {(x.id, y.id) for x, y in m.pairs}
    assert pairs == {("a1", "b1"), ("a2", "b2"), ("a3", "b3"), ("a4", "b4")}
    assert m.by_suffix == 2 and m.ambiguous == 1
    assert {e.id for e in m.only_a} == {"a6", "a7", "a8"}
    assert {e.id for e in m.only_b} == {"b6", "b8"}


def test_similarity_figures() -> None:
    rng = np.random.default_rng(1)
    x = rng.random((7, 7))
    assert pearson_r(x, x) == pytest.approx(1.0) and top_iou(x, x) == 1.0
    assert pearson_r(x, -x) == pytest.approx(-1.0) and top_iou(x, -x) == 0.0
    assert pearson_r(x, 3 * x + 2) == pytest.approx(1.0)  # scale and offset do not count
    flat = np.zeros((4, 4))
    assert pearson_r(x[:4, :4], flat) is None and top_iou(flat, x[:4, :4]) is None
    # ties at the threshold are in the top set: k = round(0.15 * 16) = 2, three cells tie
    tied = np.zeros((4, 4))
    tied.flat[[0, 5, 9]] = 1.0
    mask = top_mask(tied)
    assert mask is not None and int(mask.sum()) == 3
    # another resolution: resized (bilinear) to the first map's shape
    big = np.kron(x, np.ones((2, 2)))
    r = pearson_r(x, big)
    assert r is not None and r > 0.9


# ---- in a real browser -----------------------------------------------------------------
@pytest.mark.browser
def test_report_in_chromium(runs: Runs, report: tuple[Path, Any], browser: Any) -> None:  # noqa: F811
    """Index and an image page: no console errors or CSP violations, nothing from the
    network, every image loads, the flips gallery filters and pages, the hostile file
    name is text."""
    out, s = report
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    w = Watched(page)
    page.on("console", lambda m: w.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: w.errors.append(f"pageerror: {exc}"))
    page.on("dialog", lambda d: (w.dialogs.append(d.message), d.dismiss()))
    remote: list[str] = []
    page.on("request", lambda r: None if r.url.startswith("file:") else remote.append(r.url))
    try:
        page.goto(_url(out / "index.html"))
        w.assert_images_loaded()
        cards = "#flips .card:not([hidden])"
        n_flips = sum(s.flips.values())
        assert page.locator("#flips .card").count() == n_flips > 3
        assert page.locator(cards).count() == 3  # page_size=3
        assert page.text_content("#pg-info") == f"page 1 of {-(-n_flips // 3)}"
        page.click("#pg-next")
        assert page.get_attribute("#flips", "data-page") == "2"
        page.select_option("#f-kind", "right_to_wrong")
        assert page.locator(cards).count() == s.flips["right_to_wrong"]
        kinds = page.eval_on_selector_all(cards, "cs => cs.map(c => c.dataset.kind)")
        assert set(kinds) == {"right_to_wrong"}
        page.select_option("#f-kind", "")
        page.select_option("#f-pred-b", "gravel")
        preds = page.eval_on_selector_all(
            "#flips .card", "cs => cs.filter(c => !c.hidden).map(c => c.dataset.predB)"
        )
        assert preds and set(preds) == {"gravel"}
        page.screenshot(path=str(_shots() / "compare-index.png"), full_page=True)
        # the hostile name: text in the moved-maps table, no element made of it
        link = page.locator("#moved td.path a", has_text="onerror")
        assert link.text_content() == f"grass/{XSS_NAME}"
        assert page.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0
        link.click()
        page.wait_for_selector("h1.path")
        assert page.text_content("h1.path") == f"grass/{XSS_NAME}"
        assert page.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0
        w.assert_images_loaded()
        assert page.locator("a.run-link").count() == 2
        assert page.locator(".cam-stack img.cam-heat").count() == 2
        page.screenshot(path=str(_shots() / "compare-image.png"), full_page=True)
        with page.expect_navigation():
            page.keyboard.press("ArrowRight")
        assert page.url.endswith(".html") and "/images/" in page.url
        page.locator("a.run-link").first.click()  # into run A's own image page
        page.wait_for_selector("h1.path")
        assert page.url.startswith(_url(runs.a / "images"))
        page.goto(_url(out / "classes.html"))
        w.assert_images_loaded()
        page.goto(_url(out / "layers.html"))
        assert page.locator("table.layer-moves tbody tr").count() == 3
    finally:
        ctx.close()
    assert remote == []
    w.assert_clean()


def _shots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
