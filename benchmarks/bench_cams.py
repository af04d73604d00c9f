"""The cost of each CAM method, and Score-CAM and Ablation-CAM against pytorch-grad-cam.

    python benchmarks/bench_methods.py cams [--models small,vgg] [--images 64]
                                            [--repeats 3] [--slow-images 4]
    python benchmarks/bench_methods.py peers [--models small] [--images 16] [--repeats 2]

``cams`` prints a Markdown table of milliseconds per image (median over repeats) of every
registered method the model serves: ``METHODS[m].maps`` on the exported tensors (the CAM
tensor, the gradients of the top-3 classes, the CAM weights) of photos run through the
analysis ONNX once beforehand, in batches of 32 as the engine does.  The perturbation
methods' cost includes their network passes: the tail cut out of the graph
(:mod:`convlens.engine.tail`) for Ablation-CAM and Recipro-CAM, the whole model for
Score-CAM, on onnxruntime's CPU provider; the methods that run the whole model are timed
on the first ``--slow-images`` photos only (one repeat).  The onnxruntime call that makes
the tensors is timed alongside for scale.

``peers``: images per second of convlens's Score-CAM and Ablation-CAM against
pytorch-grad-cam's ``ScoreCAM`` and ``AblationCAM`` (its defaults: Score-CAM batches of 16
masked images, Ablation-CAM batches of 32 ablated copies) on the same architecture, the
benchmark model rebuilt in PyTorch layer by layer with the Keras weights (checked against
the ONNX scores), the same preprocessed photos and the same target class, in one run,
each side given the whole batch.  Both sides count the forward pass that gives the
activations.  The maps' agreement (Pearson r of the upsampled, normalised maps) is printed
as a check that the two compute the same thing.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from bench_methods import BATCH, repeat


def _cpu(model: str | bytes) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


class Network:
    """The sessions a method may run: the analysis graph, the tail cut out of it (None
    with ``tail_problem`` when it cannot be cut) and the scores-only graph."""

    def __init__(self, analysis_onnx: Path):
        import onnx

        from convlens.engine import contract as C
        from convlens.engine.graph import pruned
        from convlens.engine.tail import TailError, cut_tail

        self.spec = C.read_spec(analysis_onnx)
        self.full = _cpu(str(analysis_onnx))
        proto = onnx.load(str(analysis_onnx))
        self.scores_session = _cpu(pruned(proto, [C.OUT_SCORES]))
        self.tail_problem: str | None = None
        self.tail_graph: Any = None
        self.tail_session: Any = None
        try:
            self.tail_graph = cut_tail(proto, self.spec)
            self.tail_session = _cpu(self.tail_graph.model)
        except TailError as exc:
            self.tail_problem = str(exc)

    def tail(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from convlens.engine.tail import TAIL_OUTPUTS

        s, p = self.tail_session.run(list(TAIL_OUTPUTS), self.tail_graph.feeds(feats))
        return s, p

    def scores(self, x: np.ndarray) -> np.ndarray:
        from convlens.engine import contract as C

        return self.scores_session.run(None, {C.IN_IMAGE: x})[0]  # type: ignore[no-any-return]

    def inputs(self, x: np.ndarray, out: dict[str, np.ndarray]) -> Any:
        """The CAMInputs of batch ``x`` given the analysis graph's outputs ``out``."""
        from convlens.engine import contract as C
        from convlens.engine.cams import CAMInputs

        return CAMInputs(
            acts=out[str(self.spec.cam_output)],
            classes=out[C.OUT_TARGET_INDICES],
            weights=out.get(C.OUT_CAM_WEIGHTS),
            grads=out[C.OUT_GRADIENTS],
            x=x,
            tail=self.tail if self.tail_session is not None else None,
            scores=self.scores,
        )


@dataclass
class CamCosts:
    model: str
    images: int
    cam_shape: tuple[int, ...]  # (h, w, k)
    targets: int  # T, gradients per image
    ms: dict[str, float]  # method -> ms per image (median); "onnxruntime" for the graph
    unavailable: dict[str, str]  # method -> why the model does not serve it
    slow_images: int  # images the whole-model methods were timed on


def cam_costs(analysis_onnx: Path, x: np.ndarray, repeats: int, slow_images: int) -> CamCosts:
    """Milliseconds per image of every registered CAM method the model serves, on the
    tensors the analysis ONNX gives for ``x`` (preprocessed), in batches of ``BATCH``."""
    from convlens.engine import contract as C
    from convlens.engine.cams import METHODS, availability

    net = Network(analysis_onnx)
    spec, sess = net.spec, net.full
    k = min(3, spec.num_classes)
    names = [str(spec.cam_output), C.OUT_GRADIENTS, C.OUT_TARGET_INDICES]
    if spec.head.cam_available:
        names.append(C.OUT_CAM_WEIGHTS)
    batches = []
    for i in range(0, len(x), BATCH):
        xb = x[i : i + BATCH]
        feeds = {C.IN_IMAGE: xb, C.IN_TARGETS: np.tile(-(np.arange(k) + 1), (len(xb), 1))}
        out = dict(zip(names, sess.run(names, feeds), strict=True))
        batches.append((feeds, net.inputs(xb, out)))

    def graph() -> int:
        for feeds, _ in batches:
            sess.run(names, feeds)
        return len(x)

    why = availability(spec, net.tail_problem)
    ms: dict[str, float] = {}
    for name in (m for m, reason in why.items() if reason is None):
        method = METHODS[name]
        slow = method.needs_model
        todo = [b for _, b in batches]
        if slow:  # the first slow_images photos, once
            a, few = todo[0], slice(0, slow_images)
            todo = [replace(a, acts=a.acts[few], classes=a.classes[few], x=a.x[few], grads=None)]

        def go(method: Any = method, todo: list[Any] = todo) -> int:
            for inp in todo:
                method.maps(inp)
            return sum(len(inp.acts) for inp in todo)

        go(
            todo=[
                replace(
                    todo[0],
                    acts=todo[0].acts[:1],
                    classes=todo[0].classes[:1],
                    x=todo[0].x[:1],
                    grads=None,
                )
            ]
            if slow
            else todo
        )  # warm-up, not timed
        n, secs = repeat(go, 1 if slow else repeats)
        ms[name] = 1000 * statistics.median(secs) / n
    n, secs = repeat(graph, repeats)
    ms["onnxruntime"] = 1000 * statistics.median(secs) / n
    shape = tuple(int(d) for d in batches[0][1].acts.shape[1:])
    unavailable = {m: str(reason) for m, reason in why.items() if reason is not None}
    return CamCosts(analysis_onnx.stem, len(x), shape, k, ms, unavailable, slow_images)


def cam_table(results: Sequence[CamCosts]) -> str:
    """The Markdown table of :func:`cam_costs` results, one column per model."""
    from convlens.engine.cams import METHODS

    def head(r: CamCosts) -> str:
        h, w, k = r.cam_shape
        return f"`{r.model}` {h}x{w}x{k}, T={r.targets} (ms/img)"

    lines = [
        "| method | `--cam` | default | " + " | ".join(head(r) for r in results) + " |",
        "|---|---|---|" + "---:|" * len(results),
    ]
    for name, m in METHODS.items():
        cells = [f"{r.ms[name]:.3f}" if name in r.ms else "n/a" for r in results]
        default = "yes" if m.default else "opt-in"
        lines.append(f"| {m.label} | `{name}` | {default} | " + " | ".join(cells) + " |")
    graph = " | ".join(f"{r.ms['onnxruntime']:.2f}" for r in results)
    lines.append(f"| *onnxruntime: the analysis graph, for scale* | | | {graph} |")
    return "\n".join(lines)
