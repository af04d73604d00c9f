"""What a run will do: the options as given (:class:`RunOptions`) and the frozen
:class:`RunPlan` built from them and the model's spec, the only place that validates."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import contract as C
from .cams import METHODS, availability, default_methods
from .images import DEFAULT_MAX_PIXELS
from .metrics import METRICS
from .runtime import DEVICES, PRECISIONS, RUNTIMES


class RunError(Exception):
    """The run cannot start (bad model, bad options); ``str(e)`` is one line."""


#: the parts of a batch onnxruntime's CPU session runs at once by default (2+ CPUs, no
#: --threads): two halves, each called from its own thread.  On 2 CPUs each half runs on
#: one thread instead of the whole batch over both, whose intra-op threads meet at every
#: node (benchmark models: 1.04-1.11x img/s, less CPU and less memory; README: Speed).
#: On more CPUs the halves share the session's one intra-op pool (runtime._cpu): not
#: measured here.
AUTO_STREAMS = 2


def resolve_streams(streams: int | None, threads: int | None) -> int:
    """``--streams``, else :data:`AUTO_STREAMS` where there are that many CPUs and
    ``--threads`` is not given (an explicit thread count keeps one batch at a time)."""
    if streams is not None:
        return streams
    cpus = os.cpu_count() or 1
    return AUTO_STREAMS if threads is None and cpus >= AUTO_STREAMS else 1


@dataclass(frozen=True)
class OptionDoc:
    """How an option reads on the command line: its help, and where it differs from
    the field, its flag, choices and lower bound.  The CLI builds each ``convlens run``
    option from these (convlens/cli.py), so an option is declared once, here."""

    help: str
    flag: str | None = None  # default: --field-name
    choices: tuple[str, ...] | None = None
    min: int | None = None
    repeat: bool = False  # a list: repeatable, comma-separated values allowed
    flag_value: str | None = None  # the value of the bare flag (its value is optional)


def _doc(help: str, **kw: Any) -> dict[str, OptionDoc]:
    return {"doc": OptionDoc(help, **kw)}


@dataclass
class RunOptions:
    """What ``convlens run`` and :func:`convlens.engine.run.run` take."""

    device: str = field(
        default="auto",
        metadata=_doc("auto uses CUDA only where it really loads.", choices=DEVICES),
    )
    runtime: str = field(
        default="auto",
        metadata=_doc(
            "What runs the graph: openvino (CPU only, the [openvino] extra) or "
            "onnxruntime; auto is onnxruntime, measured the faster in float32 here "
            "(README: Benchmarks).",
            choices=RUNTIMES,
        ),
    )
    precision: str = field(
        default="f32",
        metadata=_doc(
            "Arithmetic of the graph: bf16 runs it on OpenVINO on the CPU (native bf16 "
            "instructions needed), faster on convolution-heavy models; on trained test "
            "models probabilities moved by up to 0.014 and maps kept r >= 0.995 against "
            "f32 (README: Speed).",
            choices=PRECISIONS,
        ),
    )
    batch_size: int = field(default=16, metadata=_doc("Images per onnxruntime call.", min=1))
    workers: int | None = field(
        default=None,
        metadata=_doc(
            "Decoding threads [default: half the CPUs on the CPU, every CPU with CUDA].", min=1
        ),
    )
    threads: int | None = field(
        default=None,
        metadata=_doc(
            "Inference threads (onnxruntime intra-op, OpenVINO INFERENCE_NUM_THREADS) "
            "[default: the runtime's own; for onnxruntime's CPU session with --streams S "
            "> 1, the CPUs less S - 1]; given without --streams, a batch runs in one call.",
            min=1,
        ),
    )
    streams: int | None = field(
        default=None,
        metadata=_doc(
            "Parts of each batch onnxruntime's CPU session runs at once, each called from "
            "a thread of its own; they share one intra-op pool of --threads, by default "
            "the CPUs less the other parts [default: 2 on 2 or more CPUs without "
            "--threads (Ray's actors get --threads), else 1; CUDA and OpenVINO run a "
            "batch in one call] (README: Speed).",
            min=1,
        ),
    )
    stats_every: int = field(
        default=1,
        metadata=_doc(
            "Activation statistics over one image in K, picked by a hash of its id (the "
            "same images on every run and resume); 1: every image. Cuts their cost about "
            "K times; means and zero fractions become estimates, maxima lower bounds, and "
            "a channel firing only on other images is called dead. 0: no statistics at "
            "all (stats.json empty, the report without them) (README: Speed).",
            min=0,
        ),
    )
    fast_decode: bool = field(
        default=False,
        metadata=_doc(
            "Decode a JPEG at least twice the model input scaled down by 2, 4 or 8 "
            "inside libjpeg (DCT domain): faster decoding, model inputs within a few "
            "grey levels of a full decode (README: Speed)."
        ),
    )
    cam_methods: list[str] | None = field(
        default=None,
        metadata=_doc(
            "CAM method(s), repeated or comma-separated [default: "
            + ", ".join(default_methods(list(METHODS)))
            + " where the model supports them].",
            flag="--cam",
            choices=tuple(METHODS),
            repeat=True,
        ),
    )
    top_k: int = field(default=3, metadata=_doc("Maps for the K top classes.", min=1))
    classes: list[str] = field(
        default_factory=list,
        metadata=_doc(
            "Also map this class (name or index); repeatable.", flag="--class", repeat=True
        ),
    )
    labels_from_dirs: bool = field(
        default=False, metadata=_doc("Each image's parent folder names its true class.")
    )
    save_maps: bool = field(
        default=False, metadata=_doc("Write raw maps per image to maps/<id>.npz.")
    )
    max_pixels: int = field(
        default=DEFAULT_MAX_PIXELS,
        metadata=_doc(
            "Refuse images whose decode would need more pixels, weighted by what decoding "
            "the format and depth costs; read from the header, before decoding. 0 lifts "
            "this guard (OpenCV's own cap, OPENCV_IO_MAX_IMAGE_PIXELS, still holds).",
            min=0,
        ),
    )
    force: bool = field(
        default=False, metadata=_doc("Recompute everything, ignoring earlier results.")
    )
    metrics: list[str] = field(
        default_factory=list,
        metadata=_doc(
            "Faithfulness metrics of each CAM method's top-1 map, repeated or "
            "comma-separated, or 'all'; computed through the model on the batch in memory.",
            choices=(*METRICS, "all"),
            repeat=True,
        ),
    )
    metrics_sample: int | None = field(
        default=None,
        metadata=_doc(
            "With --metrics: score a seeded sample of N of the inputs [default: every image].",
            min=1,
        ),
    )
    ray: str | None = field(
        default=None,
        metadata=_doc(
            "Run on Ray (the [ray] extra): bare --ray (or 'local') starts a local Ray "
            "instance, 'auto' or HOST:PORT joins a cluster; OUTDIR and the inputs must be "
            "on storage every node sees.",
            flag_value="local",
        ),
    )
    ray_workers: int | None = field(
        default=None,
        metadata=_doc(
            "With --ray: actors, each with one onnxruntime session [default: the cluster's "
            "GPUs with --device cuda, else its CPUs].",
            min=1,
        ),
    )
    ray_unit: int | None = field(
        default=None,
        metadata=_doc(
            "With --ray: images per task, the unit a worker writes atomically [default: "
            "8 batches].",
            min=1,
        ),
    )


@dataclass(frozen=True)
class RunPlan:
    """Validated settings of one run over one model; never changes the options."""

    model_path: Path
    spec: C.ModelSpec
    device: str
    runtime: str
    batch_size: int
    workers: int | None  # None: by the device the session runs on (decode.decode_workers)
    threads: int | None
    streams: int  # parts of a batch run at once on onnxruntime's CPU (resolve_streams)
    methods: tuple[str, ...]
    top_k: int  # at most the number of classes
    extra_classes: tuple[int, ...]  # --class, as indices, once each
    labels_from_dirs: bool
    save_maps: bool
    max_pixels: int
    force: bool
    metrics: tuple[str, ...] = ()  # faithfulness metrics (engine.metrics), in registry order
    metrics_sample: int | None = None  # None: every image
    stats_every: int = 1  # statistics over one image in K, 0: none (stats.in_stats_sample)
    fast_decode: bool = False  # large JPEGs decoded scaled down (engine.decode)
    precision: str = "f32"  # engine.runtime.PRECISIONS

    @classmethod
    def build(cls, model_path: str | Path, options: RunOptions | None = None) -> RunPlan:
        o = options or RunOptions()
        path = Path(model_path)
        try:
            spec = C.read_spec(path)
        except C.ContractError as exc:
            raise RunError(str(exc)) from exc
        if o.batch_size < 1:
            raise RunError("--batch-size must be at least 1")
        if o.top_k < 1:
            raise RunError("--top-k must be at least 1")
        metrics = _metrics(o.metrics)
        if o.metrics_sample is not None and not metrics:
            raise RunError("--metrics-sample needs --metrics")
        if o.metrics_sample is not None and o.metrics_sample < 1:
            raise RunError("--metrics-sample must be at least 1")
        if o.stats_every < 0:
            raise RunError("--stats-every must be 0 (no statistics) or more")
        if o.streams is not None and o.streams < 1:
            raise RunError("--streams must be at least 1")
        methods = _methods(spec, o.cam_methods)
        if metrics and not methods:
            raise RunError("--metrics scores CAM maps: this run computes none")
        return cls(
            model_path=path,
            spec=spec,
            device=o.device,
            runtime=o.runtime,
            batch_size=o.batch_size,
            workers=o.workers,
            threads=o.threads,
            streams=resolve_streams(o.streams, o.threads),
            methods=methods,
            top_k=min(o.top_k, spec.num_classes),
            extra_classes=_classes(spec, o.classes),
            labels_from_dirs=o.labels_from_dirs,
            save_maps=o.save_maps,
            max_pixels=o.max_pixels,
            force=o.force,
            metrics=metrics,
            metrics_sample=o.metrics_sample,
            stats_every=o.stats_every,
            fast_decode=o.fast_decode,
            precision=o.precision,
        )

    @property
    def needs_grads(self) -> bool:
        return any(METHODS[m].needs_gradients for m in self.methods)

    def targets(self, n: int) -> np.ndarray:
        """The graph's ``targets`` for n images: the top-k ranks, then the --class ones."""
        row = [-(r + 1) for r in range(self.top_k)] + list(self.extra_classes)
        return np.tile(np.asarray(row, np.int64), (n, 1))

    def fingerprint(self, model_sha1: str) -> dict[str, Any]:
        """What makes earlier results in OUTDIR reusable: the model file and the
        settings that change a record."""
        return {
            "model_sha1": model_sha1,
            "cam_methods": list(self.methods),
            "top_k": self.top_k,
            "classes": sorted(set(self.extra_classes)),
            "labels_from_dirs": self.labels_from_dirs,
            "save_maps": self.save_maps,
            **self._opt_in(),
        }

    def _opt_in(self) -> dict[str, Any]:
        """The opt-in settings, only when asked: runs without them keep their earlier
        fingerprint and settings."""
        return {
            **({"stats_every": self.stats_every} if self.stats_every != 1 else {}),
            **({"fast_decode": True} if self.fast_decode else {}),
            **({"precision": self.precision} if self.precision != "f32" else {}),
            **(
                {"metrics": list(self.metrics), "metrics_sample": self.metrics_sample}
                if self.metrics
                else {}
            ),
        }

    def settings(self, inputs: list[str]) -> dict[str, Any]:
        """run.json's settings (and the report's)."""
        return {
            "model": str(self.model_path),
            "inputs": list(inputs),
            "cam_methods": list(self.methods),
            "top_k": self.top_k,
            "classes": [self.spec.class_names[i] for i in self.extra_classes],
            "labels_from_dirs": self.labels_from_dirs,
            "batch_size": self.batch_size,
            "save_maps": self.save_maps,
            "max_pixels": self.max_pixels,
            "force": self.force,  # sinks start their own files over too
            **self._opt_in(),
        }


def _methods(spec: C.ModelSpec, asked: list[str] | None) -> tuple[str, ...]:
    why_not = availability(spec)
    avail = [m for m, why in why_not.items() if why is None]
    if asked is None:
        return tuple(default_methods(avail))
    unknown = [m for m in asked if m not in METHODS]
    if unknown:
        raise RunError(f"unknown CAM method {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    missing = [m for m in asked if m not in avail]
    if missing:
        raise RunError(
            f"CAM method {', '.join(missing)} is not available for this model "
            f"({why_not[missing[0]]}); available: {', '.join(avail)}"
        )
    return tuple(dict.fromkeys(asked))


def _metrics(asked: list[str]) -> tuple[str, ...]:
    if "all" in asked:
        return tuple(METRICS)
    unknown = [m for m in asked if m not in METRICS]
    if unknown:
        raise RunError(
            f"unknown metric {', '.join(unknown)}: choose from {', '.join(METRICS)} or all"
        )
    return tuple(m for m in METRICS if m in asked)


def _classes(spec: C.ModelSpec, asked: list[str]) -> tuple[int, ...]:
    out: list[int] = []
    for c in asked:
        if c in spec.class_names:
            out.append(spec.class_names.index(c))
        elif c.isdigit() and int(c) < spec.num_classes:
            out.append(int(c))
        else:
            more = ", ..." if spec.num_classes > 20 else ""
            raise RunError(
                f"--class {c!r}: not a class of this model "
                f"({', '.join(spec.class_names[:20])}{more})"
            )
    return tuple(dict.fromkeys(out))
