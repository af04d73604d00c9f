"""The report as a product (issue 13): method names as people write them, class-agnostic
maps once, export parity as a table, a perceptually uniform CAM colour map with its
legend, and the charts, each checked against a reference computed here from the run's
own files (results.jsonl, stats.json, run.json), not from the report's code."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from convlens.reports import imaging as I
from convlens.reports import render_report
from convlens.reports.modelpage import parity_table

from report_fixtures import PARITY, FakeRun, make_fake_run

AS_WRITTEN = {"cam": "CAM", "gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++"}
AS_WRITTEN |= {"layercam": "LayerCAM", "eigencam": "Eigen-CAM"}


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> FakeRun:
    run = make_fake_run(tmp_path_factory.mktemp("charts") / "out", 40, n_failed=2)
    render_report(run.outdir, page_size=10)
    return run


class Tree(HTMLParser):
    """Start tags with attributes, and the text inside each element of interest."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.stack: list[list[str]] = []  # text collectors of open tags
        self.texts: list[tuple[str, dict[str, str], list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag in ("img", "meta", "link", "br", "input"):
            return
        buf: list[str] = []
        self.stack.append(buf)
        self.texts.append((tag, a, buf))

    def handle_endtag(self, tag: str) -> None:
        if self.stack:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        for buf in self.stack:
            buf.append(data)


def tree(path: Path) -> Tree:
    t = Tree()
    t.feed(path.read_text(encoding="utf-8"))
    return t


def text_of(parts: list[str]) -> str:
    return " ".join("".join(parts).split())


def jsonl(outdir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (outdir / "results.jsonl").read_text().splitlines()]


# ---- method names, class-agnostic maps once ----------------------------------------
def test_method_names_as_people_write_them(fake: FakeRun) -> None:
    for rec in fake.ok_records[:5]:
        t = tree(fake.outdir / "images" / f"{rec['id']}.html")
        heads = [text_of(b) for tag, a, b in t.texts if tag == "th" and a.get("data-method")]
        assert heads == ["CAM", "Grad-CAM"]  # Eigen-CAM is not a per-class column
        once = [a for tag, a in t.tags if tag == "figure" and "cam-once" in a.get("class", "")]
        assert [a["data-method"] for a in once] == ["eigencam"]
        caption = [text_of(b) for tag, a, b in t.texts if tag == "figcaption"]
        assert any(c.startswith("Eigen-CAM") for c in caption)
        eigen = [a["src"] for tag, a in t.tags if tag == "img" and "/eigencam_" in a.get("src", "")]
        assert len(eigen) == 1  # once per image, not once per class
        alts = [a["alt"] for tag, a in t.tags if tag == "img" and "cam-heat" in a.get("class", "")]
        assert all(not a.startswith(("cam ", "gradcam ", "eigencam ")) for a in alts), alts
        assert all(a.split(" ")[0] in AS_WRITTEN.values() for a in alts), alts


def test_registry_labels() -> None:
    from convlens.engine.cams import METHODS

    # these as people write them; a method added later brings its own label (its test
    # in test_cams.py), so this list does not have to grow with the registry
    labels = {n: m.label for n, m in METHODS.items()}
    assert AS_WRITTEN.items() <= labels.items()
    assert all(labels.values()) and len(set(labels.values())) == len(labels)
    assert [n for n, m in METHODS.items() if m.class_agnostic] == ["eigencam"]


# ---- export parity as a table --------------------------------------------------------
def _num(cell: str) -> float:
    return float(cell)


def test_parity_table_cells_are_the_metadata(fake: FakeRun) -> None:
    meta = json.loads((fake.outdir / "run.json").read_text())["spec"]["parity"]
    html = (fake.outdir / "model.html").read_text(encoding="utf-8")
    table = html[html.index('<table class="data parity">') :]
    t = Tree()
    t.feed(table[: table.index("</table>")])
    heads = [text_of(b) for tag, a, b in t.texts if tag == "th"]
    assert heads == ["output", "max abs", "relative", "score", "pass"]
    rows = [[text_of(b) for tag, a, b in t.texts if tag == "td"]][0]
    got = {rows[i]: rows[i + 1 : i + 5] for i in range(0, len(rows), 5)}
    assert set(got) == set(meta["outputs"])  # "act/<b>conv</b>" too, as text
    for name, v in meta["outputs"].items():
        max_abs, rel, score, verdict = got[name]
        assert _num(max_abs) == pytest.approx(v["max_abs"], rel=1e-3)
        assert _num(rel) == pytest.approx(v["max_rel"], rel=1e-3)
        assert _num(score) == pytest.approx(v["score"], rel=1e-3)
        passed = name not in meta["failed"]
        assert verdict.split(" ")[0] == ("pass" if passed else "fail"), (name, verdict)
        noisy = v["score"] > meta["tolerance"]
        assert ("noise" in verdict) == noisy, (name, verdict)
    # no flattened dump of the figures under it
    after = Tree()
    after.feed(html[html.index('id="parity"') : html.index("Activation statistics")])
    dts = [text_of(b) for tag, a, b in after.texts if tag == "dt"]
    assert not any(d.startswith("outputs.") for d in dts) and "max_abs" not in html, dts


def test_parity_verdicts() -> None:
    doc = json.loads(json.dumps(PARITY))
    doc["outputs"]["scores"]["score"] = 0.5
    doc["failed"], doc["passed"] = ["scores"], False
    p = parity_table(doc)
    assert p is not None and p.passed is False and p.tolerance == 1e-3
    verdicts = {r.output: r.passed for r in p.rows}
    assert verdicts.pop("scores") is False and all(verdicts.values())
    # older metadata (no "failed"): each score against the tolerance
    del doc["failed"]
    doc["passed"] = False
    verdicts = {r.output: r.passed for r in parity_table(doc).rows}  # type: ignore[union-attr]
    assert verdicts["scores"] is False and verdicts["cam_gradients"] is False
    assert verdicts["predictions"] is True
    assert parity_table({}) is None and parity_table(None) is None


# ---- the CAM colour map --------------------------------------------------------------
def lightness(colormap: int) -> np.ndarray:
    ramp = np.arange(256, dtype=np.uint8).reshape(1, 256)
    bgr = cv2.applyColorMap(ramp, colormap)
    lab = cv2.cvtColor(bgr.astype(np.float32) / 255, cv2.COLOR_BGR2Lab)
    return np.asarray(lab[0, :, 0], dtype=np.float64)


def test_cam_colour_map_is_perceptually_ordered() -> None:
    """Lightness (CIE L*) rises with the value, in steps of about equal size: more is
    always lighter.  Turbo, the map before, goes light and dark again (fails both)."""
    for cmap in (I.CAM_COLORMAP, I.GRID_COLORMAP):
        steps = np.diff(lightness(cmap)[::16])
        assert (steps > 0).all(), steps
        assert steps.max() < 2.5 * steps.min(), steps
    assert not (np.diff(lightness(cv2.COLORMAP_TURBO)[::16]) > 0).all()


def test_legend_is_the_run_colour_map(fake: FakeRun, tmp_path: Path) -> None:
    def bar(outdir: Path, name: str) -> np.ndarray:
        img = cv2.imread(str(outdir / "static" / f"cmap-{name}.png"))
        assert img is not None
        return img

    ramp = np.linspace(0, 255, 256).round().astype(np.uint8).reshape(1, 256)
    inferno = cv2.applyColorMap(ramp, cv2.COLORMAP_INFERNO)[0]
    assert (bar(fake.outdir, "inferno")[6] == inferno).all()
    for page in ("index.html", "model.html", f"images/{fake.ok_records[0]['id']}.html"):
        t = tree(fake.outdir / page)
        legends = [
            a["src"] for tag, a in t.tags if tag == "img" and "legend-bar" in a.get("class", "")
        ]
        assert any(s.endswith("static/cmap-inferno.png") for s in legends), page
        spans = [text_of(b) for tag, a, b in t.texts if tag == "div" and a.get("class") == "legend"]
        assert spans and all(s.startswith("lowhigh") for s in spans), spans
    # a run made with turbo heatmaps (an older version) gets turbo's legend and mean CAMs
    old = tmp_path / "old"
    shutil.copytree(fake.outdir, old)
    assets = json.loads((old / "assets" / "assets.json").read_text())
    assets["cam_colormap"] = "turbo"
    (old / "assets" / "assets.json").write_text(json.dumps(assets))
    render_report(old)
    turbo = cv2.applyColorMap(ramp, cv2.COLORMAP_TURBO)[0]
    assert (bar(old, "turbo")[6] == turbo).all()
    assert "static/cmap-turbo.png" in (old / "index.html").read_text()
    mean = cv2.imread(str(old / "assets" / "class_cams" / "class_0.png"))
    lut = {
        tuple(c)
        for c in cv2.applyColorMap(np.arange(256, dtype=np.uint8)[None], cv2.COLORMAP_TURBO)[0]
    }
    assert mean is not None and all(tuple(p) in lut for p in mean.reshape(-1, 3)[::97])


# ---- charts ------------------------------------------------------------------------
def _svg(t: Tree, chart_id: str) -> list[tuple[str, dict[str, str]]]:
    """The tags inside the figure with id chart_id."""
    start = next(i for i, (tag, a) in enumerate(t.tags) if a.get("id") == chart_id)
    end = next((i for i in range(start + 1, len(t.tags)) if t.tags[i][0] == "figure"), len(t.tags))
    return t.tags[start:end]


def test_confidence_histogram_is_numpy_histogram(fake: FakeRun) -> None:
    ok = [r for r in jsonl(fake.outdir) if r["status"] == "ok"]
    top = np.array([max(p["prob"] for p in r["predictions"]) for r in ok])
    expected, edges = np.histogram(top, bins=10, range=(0.0, 1.0))
    tags = _svg(tree(fake.outdir / "index.html"), "chart-confidence")
    bins = [a for tag, a in tags if tag == "g" and a.get("class") == "bin"]
    assert [int(b["data-count"]) for b in bins] == expected.tolist()
    assert [float(b["data-lo"]) for b in bins] == pytest.approx(edges[:-1].tolist())
    # stacked by outcome: each outcome's segments are its own histogram
    for outcome, keep in (
        ("correct", lambda r: r["label_index"] is not None and _top(r) == r["label_index"]),
        ("wrong", lambda r: r["label_index"] is not None and _top(r) != r["label_index"]),
        ("unlabelled", lambda r: r["label_index"] is None),
    ):
        probs = [max(p["prob"] for p in r["predictions"]) for r in ok if keep(r)]
        want = np.histogram(probs, bins=10, range=(0.0, 1.0))[0]
        segs = [a for tag, a in tags if tag == "rect" and a.get("data-series") == outcome]
        assert sum(int(s["data-count"]) for s in segs) == want.sum() > 0, outcome
        got = np.zeros(10, int)
        order = [b for tag, b in tags if tag in ("g", "rect")]
        b = -1
        for a in order:
            if a.get("class") == "bin":
                b += 1
            elif a.get("data-series") == outcome:
                got[b] = int(a["data-count"])
        assert got.tolist() == want.tolist(), outcome
    # taller bars for more images
    heights = {}
    b = -1
    for tag, a in tags:
        if a.get("class") == "bin":
            b += 1
        elif tag == "rect" and a.get("data-series"):
            heights[b] = heights.get(b, 0.0) + float(a["height"])
    for i, j in zip(range(10), range(1, 10), strict=False):
        if expected[i] and expected[j]:
            assert (heights[i] > heights[j]) == (expected[i] > expected[j])


def _top(r: dict[str, Any]) -> int:
    return int(max(r["predictions"], key=lambda p: p["prob"])["index"])


def test_accuracy_bars_are_per_class_accuracy(fake: FakeRun) -> None:
    labelled = [r for r in jsonl(fake.outdir) if r["status"] == "ok" and r["label"] is not None]
    want: dict[str, list[int]] = {}
    for r in labelled:
        n_k = want.setdefault(r["label"], [0, 0])
        n_k[0] += 1
        n_k[1] += _top(r) == r["label_index"]
    tags = _svg(tree(fake.outdir / "index.html"), "chart-accuracy")
    bars = [a for tag, a in tags if tag == "g" and a.get("class") == "hbar"]
    got = {b["data-label"]: [int(b["data-den"]), int(b["data-num"])] for b in bars}
    assert got == want
    assert any(k < n for n, k in want.values())  # the fixture has mistakes
    widths = [float(a["width"]) for tag, a in tags if tag == "rect" and a.get("class") == "b-acc"]
    track = float(next(a["width"] for tag, a in tags if a.get("class") == "track"))
    for b, w in zip(bars, widths, strict=True):
        n, k = got[b["data-label"]]
        assert w == pytest.approx(track * k / n, abs=0.01)


def test_dead_channel_bars_are_stats_json(fake: FakeRun) -> None:
    stats = json.loads((fake.outdir / "stats.json").read_text())
    tags = _svg(tree(fake.outdir / "model.html"), "chart-dead")
    bars = [a for tag, a in tags if tag == "g" and a.get("class") == "hbar"]
    got = {b["data-label"]: (int(b["data-num"]), int(b["data-den"])) for b in bars}
    assert got == {k: (len(v["dead"]), v["shape"][-1]) for k, v in stats.items()}
    assert all(n > 0 for n, _ in got.values())


def test_charts_escape_and_stay_offline(fake: FakeRun) -> None:
    """Class names in the charts are text (the fixture has one with markup)."""
    index = (fake.outdir / "index.html").read_text(encoding="utf-8")
    assert "odd &lt;b&gt;&amp;&#34;&#39; class" in index
    assert "<b>" not in index
    svg = index[index.index("<svg") : index.rindex("</svg>")]
    assert "http" not in svg.replace("http://www.w3.org", "") and "<script" not in svg
    assert "style=" not in svg and "<style" not in svg


def test_accuracy_chart_of_many_classes_shows_the_worst() -> None:
    from convlens.engine.outdir import Prediction
    from convlens.reports.charts import ACCURACY_BARS_MAX, class_accuracy
    from convlens.reports.data import ImageEntry

    n_classes = ACCURACY_BARS_MAX + 10
    entries = []
    for c in range(n_classes):  # class c: 4 images, (c % 5) of them wrong
        for i in range(4):
            pred = (c + 1) % n_classes if i < c % 5 else c
            entries.append(
                ImageEntry(f"{c}-{i}", "p", "p", True, None, 8, 8,
                           [Prediction(pred, "x", 0.9)], f"c{c}", c, [], [])
            )  # fmt: skip
    chart = class_accuracy(entries, [f"c{c}" for c in range(n_classes)])
    assert chart is not None and chart.omitted == 10
    shown = [int(r.full_label[1:]) for r in chart.rows]
    assert len(shown) == ACCURACY_BARS_MAX and shown == sorted(shown)
    # every class left out is at least as accurate as every class drawn
    left_out = set(range(n_classes)) - set(shown)
    assert min(4 - c % 5 for c in left_out) >= max(4 - c % 5 for c in shown)
