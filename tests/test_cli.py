"""The CLI: every command has help; it stays a thin layer (the library never imports it)."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from convlens.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _commands(group: click.Group) -> list[tuple[str, click.Command]]:
    return [(name, cmd) for name, cmd in group.commands.items()]


def test_every_command_has_help() -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["--help"])
    assert r.exit_code == 0 and "Usage" in r.output
    names = [n for n, _ in _commands(main)]
    assert set(names) >= {"export", "inspect", "run", "report", "demo"}
    for name, cmd in _commands(main):
        assert cmd.help, f"{name} has no help text"
        r = runner.invoke(main, [name, "--help"])
        assert r.exit_code == 0, (name, r.output)
        assert "Usage" in r.output and "--help" in r.output
        for param in cmd.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.help, f"{name} --{param.name} has no help"


def test_version() -> None:
    from convlens import __version__

    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_package_boundaries() -> None:
    """engine/ and reports/ never import the exporter or TensorFlow; the engine knows no
    HTML; nothing in the library imports the CLI."""
    for folder in ("engine", "reports"):
        for f in (ROOT / folder).glob("*.py"):
            mods = _imports(f)
            bad = {
                m
                for m in mods
                if m.startswith(("convlens.exporter", "tensorflow", "keras", "tf2onnx"))
            }
            assert not bad, (f, bad)
            if folder == "engine":
                assert not {m for m in mods if m.startswith(("convlens.reports", "jinja2"))}, f
    for folder in ("engine", "reports", "exporter"):
        for f in (ROOT / folder).glob("*.py"):
            assert "convlens.cli" not in _imports(f), f
    assert "convlens.cli" not in _imports(ROOT / "convlens" / "pipeline.py")


def test_demo_then_report_rerender(tmp_path: Path) -> None:
    """The README's main job, then `convlens report` re-renders with no inference."""
    out = tmp_path / "demo"
    r = CliRunner().invoke(main, ["demo", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    index = out / "index.html"
    first = index.read_bytes()
    results = (out / "results.jsonl").read_bytes()
    assert b"brick" in first and results.count(b"\n") == 15
    index.unlink()
    r = CliRunner().invoke(main, ["report", str(out)])
    assert r.exit_code == 0, r.output
    assert index.read_bytes() == first
    assert (out / "results.jsonl").read_bytes() == results


def test_grid_options_reach_the_report(tmp_path: Path) -> None:
    """--grid-sample and --grid-notable go through analyze() to the sink: the first N
    images get grids, the caps are recorded in assets.json, and a page without grids
    states them (the demo's photos are all confident and correctly labelled, so only
    the first N count; the notable cap itself: test_speed.test_grid_sample_is_capped)."""
    import json

    out = tmp_path / "demo"
    args = ["demo", "-o", str(out), "-q", "--grid-sample", "2", "--grid-notable", "1"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assets = json.loads((out / "assets" / "assets.json").read_text())
    assert (assets["grid_sample"], assets["grid_notable"]) == (2, 1)
    assert assets["counts"]["grid_images"] == 2
    assert len(list((out / "assets" / "grids").iterdir())) == 2
    pages = [p.read_text() for p in (out / "images").glob("*.html")]
    left_out = [p for p in pages if "Activation grids were left out" in p]
    assert len(pages) == 15 and len(left_out) == 13
    assert all("the first 2 images, then at most 1 more" in p for p in left_out)


def test_a_run_without_statistics_says_so(tmp_path: Path) -> None:
    """--stats-every 0: the model page says the run took no statistics and shows no dead
    channel counts; the image pages show no "Run statistics" line (no "no dead
    channels" where none were counted)."""
    out = tmp_path / "demo"
    r = CliRunner().invoke(main, ["demo", "-o", str(out), "-q", "--stats-every", "0"])
    assert r.exit_code == 0, r.output
    model = (out / "model.html").read_text()
    assert "This run took no activation statistics" in model
    assert " / 16</td>" not in model  # conv1's dead count
    pages = [p.read_text() for p in (out / "images").glob("*.html")]
    assert len(pages) == 15 and not any("Run statistics" in p for p in pages)
    assert any("Run statistics" in p for p in _demo_pages(tmp_path / "full"))


def _demo_pages(out: Path) -> list[str]:
    r = CliRunner().invoke(main, ["demo", "-o", str(out), "-q", "--grid-sample", "1"])
    assert r.exit_code == 0, r.output
    return [p.read_text() for p in (out / "images").glob("*.html")]


def test_report_on_a_non_run_dir(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert r.exit_code == 2
    assert "not a convlens run directory" in r.output


def test_run_options_come_from_their_declaration() -> None:
    """Every RunOptions field is a `convlens run` and `convlens demo` option, with the
    help, choices and default it declares: adding one needs no CLI change."""
    import dataclasses

    from convlens.cli import main
    from convlens.engine.cams import METHODS
    from convlens.engine.plan import RunOptions

    for command in ("run", "demo"):
        params = {p.name: p for p in main.commands[command].params}
        for f in dataclasses.fields(RunOptions):
            p = params[f.name]
            assert p.help and p.help.startswith(f.metadata["doc"].help), f.name
            if f.default is not dataclasses.MISSING and f.default is not None:
                assert p.default == f.default, f.name
    help_text = CliRunner().invoke(main, ["run", "--help"]).output
    assert all(m in help_text for m in METHODS)
    r = CliRunner().invoke(main, ["demo", "-o", "/nonexistent/x", "--cam", "gradcam,nope"])
    assert r.exit_code == 2 and "unknown CAM method nope" in r.output


def test_force_starts_both_sides_over(tmp_path: Path) -> None:
    """--force: the engine removes its files and the report side its own; with
    --no-report none of the old report stays to describe results that are gone."""
    from convlens.pipeline import demo_paths

    model, photos = demo_paths()
    out = tmp_path / "o"
    args = ["run", str(model), str(photos / "brick"), "-o", str(out), "-q", "--device", "cpu"]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert (out / "index.html").exists() and any((out / "assets" / "thumbs").iterdir())
    stray = out / "assets" / "thumbs" / "0123456789abcdef.jpg"  # an input no longer there
    stray.write_bytes(b"x")
    assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0
    assert not stray.exists() and (out / "index.html").exists()
    assert CliRunner().invoke(main, [*args, "--force", "--no-report"]).exit_code == 0
    assert (out / "results.jsonl").exists() and not (out / "index.html").exists()
    assert not (out / "assets").exists() or not any((out / "assets").rglob("*.jpg"))


def test_file_modes_follow_the_umask(tmp_path: Path) -> None:
    """Issue 14.14: every file and folder of a run, engine's and report's alike, has the
    mode the umask gives (0666/0777 masked), results.jsonl too after a resume."""
    out = tmp_path / "demo"
    old = os.umask(0o002)  # group-writable, as on shared servers
    try:
        r = CliRunner().invoke(main, ["demo", "-o", str(out), "-q"])
        assert r.exit_code == 0, r.output
        with open(out / "results.jsonl", "rb+") as f:  # a torn last line: resume rewrites
            f.seek(-1, os.SEEK_END)
            f.truncate()
        r = CliRunner().invoke(main, ["demo", "-o", str(out), "-q"])
        assert r.exit_code == 0, r.output
    finally:
        os.umask(old)
    modes = {
        str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode)
        for p in out.rglob("*")
        if not p.is_symlink()
    }
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o775 if (out / p).is_dir() else 0o664)}
    assert not wrong, wrong
    assert "results.jsonl" in modes and "index.html" in modes and "shards" in modes


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(class_names=d["class_names"][:2]), "2 class names for 3 predictions"),
        (lambda d: d["input"].update(height=0), "input height 0 (1 to 16384)"),
        (lambda d: d["input"].update(width=-5), "input width -5 (1 to 16384)"),
        (lambda d: d["input"].update(height=100000), "input height 100000 (1 to 16384)"),
        (lambda d: d["preprocess"].update(scale=float("nan")), "must be finite numbers"),
        (lambda d: d["preprocess"].update(std=[0.0, 1.0, 1.0]), "a preprocessing std of 0"),
        (lambda d: d.update(class_names=[]), "non-empty list of names"),
    ],
)
def test_model_metadata_is_validated_before_the_run(
    tmp_path: Path, edit: Any, message: str
) -> None:
    """Issue 14.16: metadata a run cannot use is refused in one line (exit 2) before any
    image is read, not as an IndexError mid-run or a NaN in results.jsonl."""
    import json

    import onnx

    from convlens.engine.contract import METADATA_KEY
    from convlens.pipeline import demo_paths

    model_path, photos = demo_paths()
    model = onnx.load(str(model_path))
    entry = next(m for m in model.metadata_props if m.key == METADATA_KEY)
    doc = json.loads(entry.value)
    edit(doc)
    entry.value = json.dumps(doc)  # NaN is written as the bare token, as a crafted file has
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["run", str(bad), str(photos), "-o", str(out), "-q"])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.output
    assert not (out / "results.jsonl").exists()
