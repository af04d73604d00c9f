"""The ``convlens`` command: thin click commands over the Python API."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from convlens import __version__

F = TypeVar("F", bound=Callable[..., Any])

EXIT_INPUT_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's 128 + SIGINT


def say(message: str) -> None:
    """One message on stderr.  When stderr has been closed (``convlens … 2>&1 | head``
    ended) the run goes on without its messages, which results.jsonl and run.json
    hold too, rather than dying on the first one."""
    try:
        click.echo(message, err=True)
    except BrokenPipeError:
        with contextlib.suppress(OSError):  # stop Python's own complaint at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


def printable(text: str, lines: bool = True) -> str:
    """Control characters (from layer names, paths) shown escaped, never sent raw; with
    ``lines=False`` newlines too, so that one message is one line (a file name holding
    a newline cannot forge a summary line).  Non-UTF-8 names show as U+FFFD."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(
        c if c.isprintable() or (lines and c == "\n") else c.encode("unicode_escape").decode()
        for c in text
    )


def one_line_errors(fn: F) -> F:
    """Known errors become one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from convlens.engine.contract import ContractError
        from convlens.engine.run import RunError

        known: tuple[type[BaseException], ...] = (ContractError, RunError, OSError, ValueError)
        try:
            from convlens.exporter.errors import ExportError

            known = (*known, ExportError)
        except ImportError:  # pragma: no cover - exporter package always importable
            pass
        try:
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except KeyboardInterrupt:  # the run has closed its files: it resumes
            say("convlens: interrupted; the same command resumes where it stopped")
            sys.exit(EXIT_INTERRUPTED)
        except known as exc:
            msg = str(exc).strip().splitlines()
            line = msg[0] if msg else type(exc).__name__
            say(f"convlens: error: {printable(line, False)}")
            sys.exit(EXIT_ERROR)
        except Exception as exc:  # a bug or a library failure: still one line, exit 2
            if os.environ.get("CONVLENS_DEBUG"):
                raise
            msg = str(exc).strip().splitlines()
            first = printable(msg[0][:300], False) if msg else ""
            say(
                f"convlens: error: {type(exc).__name__}: {first} "
                "(set CONVLENS_DEBUG=1 for the traceback)"
            )
            sys.exit(EXIT_ERROR)

    return wrapper  # type: ignore[return-value]


def _engine_option(f: dataclasses.Field[Any]) -> Callable[[F], F]:
    """A click option built from a RunOptions field and its OptionDoc."""
    doc = f.metadata["doc"]
    flag = doc.flag or "--" + f.name.replace("_", "-")
    kw: dict[str, Any] = {"help": doc.help}
    if f.type in ("bool", bool):
        kw["is_flag"] = True
    elif doc.repeat:
        kw.update(multiple=True, callback=_comma_separated)
        if doc.choices:
            kw["help"] += f" Choices: {', '.join(doc.choices)}."
    else:
        if doc.choices:
            kw["type"] = click.Choice(doc.choices)
        elif doc.min is not None:
            kw["type"] = click.IntRange(min=doc.min)
        if doc.flag_value is not None:  # --flag alone, or --flag VALUE
            kw.update(is_flag=False, flag_value=doc.flag_value)
        if f.default is not None and f.default is not dataclasses.MISSING:
            kw.update(default=f.default, show_default=True)
    return click.option(flag, f.name, **kw)


def _comma_separated(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> list[str]:
    """Repeated and comma-separated values as one list (RunPlan validates them)."""
    return [v.strip() for raw in value for v in raw.split(",") if v.strip()]


def run_options(fn: F) -> F:
    """Options shared by ``run`` and ``demo``: the engine's, from RunOptions' fields,
    then the report's and the command's own."""
    from convlens.engine.plan import RunOptions
    from convlens.reports.assets import GRID_NOTABLE, GRID_POLICIES, GRID_SAMPLE

    opts = [
        click.option(
            "-o",
            "--output",
            "outdir",
            type=click.Path(file_okay=False, path_type=Path),
            required=True,
            help="Run directory (results.jsonl, maps, report).",
        ),
        *(_engine_option(f) for f in dataclasses.fields(RunOptions)),
        click.option(
            "--grids",
            type=click.Choice(GRID_POLICIES),
            default="sample",
            show_default=True,
            help="Activation grids in the report: every image, a sample "
            "(first images, misclassified, least confident), or none.",
        ),
        click.option(
            "--grid-sample",
            type=click.IntRange(min=0),
            default=GRID_SAMPLE,
            show_default=True,
            help="With --grids sample: how many of the first images get grids.",
        ),
        click.option(
            "--grid-notable",
            type=click.IntRange(min=0),
            default=GRID_NOTABLE,
            show_default=True,
            help="With --grids sample: how many more get grids for being misclassified "
            "or below 0.5 top-1 probability (the first such images in input order).",
        ),
        click.option("--no-report", is_flag=True, help="Results only, no HTML report."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar, no notes."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _analyze(model: str, inputs: tuple[str, ...] | list[str], outdir: Path, **kw: Any) -> None:
    from convlens.engine.run import RunOptions
    from convlens.pipeline import analyze
    from convlens.progress import TerminalBar

    fields = {f.name for f in dataclasses.fields(RunOptions)}
    options = RunOptions(**{k: v for k, v in kw.items() if k in fields})
    options.cam_methods = options.cam_methods or None  # none given: the defaults it supports
    quiet = kw["quiet"]
    warn = (lambda m: None) if quiet else (lambda m: say(printable(m, False)))
    result = analyze(
        model,
        list(inputs),
        outdir,
        options,
        grids=kw["grids"],
        grid_sample=kw["grid_sample"],
        grid_notable=kw["grid_notable"],
        report=not kw["no_report"],
        progress=None if quiet else TerminalBar(),
        warn=warn,
    )
    s = result.summary
    say(s.line())
    if result.report is not None:
        say(f"report: {result.report}")
    if s.exit_code:
        sys.exit(EXIT_INPUT_FAILED)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="convlens")
def main() -> None:
    """See what a Keras CNN looks at, over whole directories of images.

    \b
    convlens export model.keras -o model.onnx     # needs the [export] extra
    convlens run model.onnx photos/ -o out/        # results + out/index.html
    convlens demo -o out/                          # the bundled model and photos

    Exit status: 0 success; 1 some inputs failed (the rest were processed);
    2 the command could not run (bad model, bad option).
    """


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The analysis ONNX file to write.",
)
@click.option(
    "--layers",
    default=None,
    help="Comma-separated layers to expose (any 4-D output; a nested model's layer as "
    "outer/inner) [default: every convolution, after its BN/activation].",
)
@click.option(
    "--cam-layer",
    default=None,
    help="The layer CAMs and gradients are computed on: any layer with a 4-D output, by "
    "name or outer/inner path [default: the final feature map, what the head pools].",
)
@click.option(
    "--labels",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Class names, one per line [default: from the model, else indices].",
)
@click.option(
    "--preprocess",
    default=None,
    help="none | unit (x/255) | symmetric (x/127.5-1) | caffe (BGR mean subtraction) | "
    "imagenet | mean_std:M1,M2,M3/S1,S2,S3 [default: none if the model has a "
    "Rescaling layer, else unit].",
)
@click.option(
    "--calibration",
    type=click.Path(path_type=Path),
    default=None,
    help="Images for the parity check [default: seeded noise].",
)
@click.option(
    "--tolerance",
    type=float,
    default=1e-3,
    show_default=True,
    help="Parity tolerance on max|onnx-keras| / max(1, max|keras|).",
)
@one_line_errors
def export(
    model: Path,
    out: Path,
    layers: str | None,
    cam_layer: str | None,
    labels: Path | None,
    preprocess: str | None,
    calibration: Path | None,
    tolerance: float,
) -> None:
    """Export a trained Keras model (.keras, .h5, SavedModel) to one analysis ONNX file."""
    from convlens.exporter.export import export_model

    r = export_model(
        model,
        out,
        layers=[s.strip() for s in layers.split(",") if s.strip()] if layers else None,
        cam_layer=cam_layer,
        labels=labels,
        preprocess=preprocess,
        calibration=calibration,
        tolerance=tolerance,
    )
    click.echo(printable(r.summary()))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def inspect(model: Path, as_json: bool) -> None:
    """Print an analysis ONNX's outputs, shapes, roles, metadata and parity."""
    from convlens.engine.inspect import describe, format_text

    info = describe(model)
    click.echo(json.dumps(info, indent=2) if as_json else format_text(info))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True)
@run_options
@one_line_errors
def run(model: Path, inputs: tuple[str, ...], outdir: Path, **kw: Any) -> None:
    """Analyse images (files, directories, globs) with an analysis ONNX; write a report."""
    _analyze(str(model), inputs, outdir, **kw)


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@one_line_errors
def report(outdir: Path) -> None:
    """Render the HTML report of a run directory again, with no inference."""
    from convlens.engine.outdir import RESULTS
    from convlens.reports import render_report

    if not (outdir / RESULTS).exists():
        raise ValueError(f"{outdir}: not a convlens run directory (no {RESULTS})")
    say(f"report: {render_report(outdir)}")


@main.command()
@run_options
@one_line_errors
def demo(outdir: Path, **kw: Any) -> None:
    """Run the bundled texture model over the bundled photographs, with a report."""
    from convlens.pipeline import demo_paths

    model, photos = demo_paths()
    if not kw["labels_from_dirs"]:
        kw["labels_from_dirs"] = True
    _analyze(str(model), [str(photos)], outdir, **kw)


@main.command()
@click.argument("run_a", type=click.Path(file_okay=False, path_type=Path))
@click.argument("run_b", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for the comparison report (not either run).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary figures as JSON.")
@one_line_errors
def compare(run_a: Path, run_b: Path, out: Path, as_json: bool) -> None:
    """What changed from run A to run B (two model versions over the same images, or one
    model over two datasets): flipped predictions, moved CAMs, died channels.  Inputs are
    matched by their path relative to each run's input root; what cannot be compared is
    named in the report."""
    from convlens.reports.compare import compare as compare_runs

    s = compare_runs(run_a, run_b, out)
    if as_json:
        click.echo(json.dumps(s.to_json(), indent=2))
    say(f"compared {s.compared} inputs: {s.agree} agree, {sum(s.flips.values())} changed")
    say(f"report: {s.report}")


if __name__ == "__main__":  # pragma: no cover
    main()
