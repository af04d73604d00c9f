"""Screenshots of the report's pages, for the README: one command makes them all.

    python docs/screenshots.py            # docs/screenshots/<name>.png for every SHOTS entry
    python docs/screenshots.py --only model

Each page comes from a fresh run of the bundled demo (the model and photos that
``convlens demo`` uses, with grids for every image) and is shot in the headless Debian
Chromium that tests/test_reports_browser.py drives through Playwright, from file://
URLs, with the network refused: a screenshot also proves the page draws offline.

:data:`SHOTS` declares the pages: a name, how to find the page in the demo OUTDIR (a
page that needs more than the run, such as a comparison of two runs, makes it there
first), what to wait for, and how tall to shoot.  A page kind is added in one line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
WIDTH, HEIGHT = 1280, 900  # the viewport, CSS px
#: a mixed photo: each class's CAM lights up its own half
IMAGE_RELPATH = "mixed/brick_left_grass_right.jpg"


@dataclass(frozen=True)
class Shot:
    name: str  # docs/screenshots/<name>.png
    page: Callable[[Path], Path]  # the demo OUTDIR -> the HTML file to open
    wait_for: str  # a CSS selector present once the page has drawn
    max_height: int = 2000  # px: the top of a long page
    element: str | None = None  # shoot only this element (CSS selector), not the page top


def image_page(outdir: Path) -> Path:
    """The page of IMAGE_RELPATH (image pages are named by record id)."""
    from convlens.engine.outdir import read_results

    rec = next(r for r in read_results(outdir).records if r.relpath == IMAGE_RELPATH)
    return outdir / "images" / f"{rec.id}.html"


def compare_page(outdir: Path) -> Path:
    """``convlens compare`` of the demo run against a run of a perturbed copy of the demo
    model (tests/compare_runs.py: some predictions flip, channels die), over the same
    photos."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from compare_runs import _edit

    from convlens.engine.run import RunOptions
    from convlens.pipeline import analyze, demo_paths
    from convlens.reports.compare import compare

    model, photos = demo_paths()
    perturbed = _edit(model, outdir.parent / "perturbed.onnx", perturb=True)
    run_b = outdir.parent / "perturbed-run"
    options = RunOptions(device="cpu", labels_from_dirs=True, save_maps=True)
    analyze(perturbed, [str(photos)], run_b, options, grids="none", warn=lambda m: None)
    compare(outdir, run_b, outdir.parent / "compare")
    return outdir.parent / "compare" / "index.html"


#: every screenshot, in README order
SHOTS: tuple[Shot, ...] = (
    Shot("index", lambda out: out / "index.html", "#gallery .card"),
    Shot("image", image_page, "img.cam-heat", max_height=1500),
    Shot("model", lambda out: out / "model.html", "table.layers"),
    Shot("compare", compare_page, "main h1"),
    Shot("faithfulness", lambda out: out / "model.html", "#faithfulness", element="#faithfulness"),
)


def demo_run(outdir: Path) -> Path:
    """The demo, as ``convlens demo`` runs it, with activation grids for every image and
    the faithfulness metrics (``--metrics all``) of its default CAM methods."""
    from convlens.engine.run import RunOptions
    from convlens.pipeline import analyze, demo_paths

    model, photos = demo_paths()
    analyze(
        model,
        [str(photos)],
        outdir,
        RunOptions(device="cpu", labels_from_dirs=True, save_maps=True, metrics=["all"]),
        grids="all",
        warn=lambda m: None,
    )
    return outdir


def shoot(shots: tuple[Shot, ...], dest: Path = OUT) -> list[Path]:
    from playwright.sync_api import sync_playwright

    dest.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="convlens-shots-") as tmp:
        outdir = demo_run(Path(tmp) / "demo")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                ctx = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
                refused: list[str] = []

                def offline(route: Any) -> None:
                    url = route.request.url
                    if url.startswith("file:"):
                        route.continue_()
                    else:
                        refused.append(url)
                        route.abort()

                ctx.route("**/*", offline)
                page = ctx.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                for shot in shots:
                    page.goto(shot.page(outdir).resolve().as_uri())
                    page.wait_for_selector(shot.wait_for)
                    page.evaluate(
                        "() => document.querySelectorAll('img').forEach(i => i.loading = 'eager')"
                    )
                    page.wait_for_function(
                        "() => Array.from(document.images).every(i => i.complete)"
                    )
                    height = page.evaluate("document.documentElement.scrollHeight")
                    path = dest / f"{shot.name}.png"
                    if shot.element:
                        page.locator(shot.element).screenshot(path=str(path))
                        written.append(path)
                        continue
                    page.screenshot(
                        path=str(path),
                        full_page=True,
                        clip={
                            "x": 0,
                            "y": 0,
                            "width": WIDTH,
                            "height": min(height, shot.max_height),
                        },
                    )
                    written.append(path)
                if errors or refused:
                    raise SystemExit(f"the pages were not clean: {errors + refused}")
            finally:
                browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated names of SHOTS to make")
    ap.add_argument("-o", "--out", type=Path, default=OUT, help="folder (default docs/screenshots)")
    args = ap.parse_args(argv)
    shots = SHOTS
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in SHOTS}
        if unknown:
            ap.error(
                f"unknown: {', '.join(sorted(unknown))}; choose from {', '.join(s.name for s in SHOTS)}"
            )
        shots = tuple(s for s in SHOTS if s.name in wanted)
    for path in shoot(shots, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
