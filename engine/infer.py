"""Inference: batches of decoded images to records, maps and statistics.

onnxruntime executes every node of a graph whatever outputs are asked for, so the model
is pruned in memory to what each session serves: the main session computes
predictions, the CAM tensor, gradients, target indices and the per-channel statistics
(reductions added to the graph) and, when the run has sinks, the activations of the
batch rows a sink surely wants them for (the report's grid sample:
:meth:`Inference._wants_early`; no row: empty outputs), so those images are not run
twice; another, only the activations, for the images a sink wants them for once their
predictions are known; one more (--metrics), only the predictions, for the perturbed copies of the batch's images that the faithfulness
metrics (:mod:`convlens.engine.metrics`) build in memory.  The perturbation CAM methods
open their own, on first use: the network after the CAM tensor cut out of the graph
(:mod:`convlens.engine.tail`: Ablation-CAM, Recipro-CAM) and the class scores alone
(Score-CAM); each batch's methods get one :class:`~convlens.engine.cams.CAMInputs`.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import contract as C
from .cams import METHODS, CAMInputs, normalize, upsample
from .decode import Decoded
from .graph import (
    ACT_ROWS,
    ROW_POSITIONS,
    STATS_PREFIX,
    STATS_ROWS,
    act_row_names,
    act_rows_nchw,
    pruned,
    stat_names,
    with_stats,
)
from .metrics import compute_all
from .outdir import CURVE_POINTS, Prediction
from .plan import RunError, RunPlan
from .results import atomic_save_npz
from .runtime import DeviceError, Session, open_session
from .sinks import ImageOutcome, ResultSink
from .stats import ClassCAMs, RunStats, in_stats_sample
from .tail import TAIL_OUTPUTS, TailError, TailGraph, cut_tail


@dataclass
class Forward:
    """One batch's main-session pass: its decodable images in the order of the pass,
    where each came from in the caller's list (None: the same order), their model
    input, the outputs, the probabilities, the classes by probability, the target
    classes (N, targets) and each method's maps."""

    good: list[Decoded]
    perm: list[int] | None
    x: np.ndarray
    out: dict[str, np.ndarray]
    probs: np.ndarray
    order: np.ndarray
    classes: np.ndarray
    maps: dict[str, np.ndarray]
    #: row -> its activations by layer, for the rows a sink surely wants them for
    early: dict[int, dict[str, np.ndarray]]


def main_outputs(plan: RunPlan) -> list[str]:
    """What every batch needs: predictions, the CAM tensor, statistics (none with
    ``--stats-every 0``), gradients."""
    spec = plan.spec
    names = [C.OUT_PREDICTIONS]
    if spec.cam_output and plan.methods:
        names.append(spec.cam_output)
    for o in spec.activation_outputs if plan.stats_every else ():
        names += stat_names(o.layer or "")
    if spec.head.gradients_available:
        names.append(C.OUT_TARGET_INDICES)
        if plan.needs_grads:
            names.append(C.OUT_GRADIENTS)
    return names


class Inference:
    """The sessions of one run and what a batch becomes."""

    def __init__(self, plan: RunPlan, outdir: Path, sinks: Sequence[ResultSink]):
        from google.protobuf.message import DecodeError

        from . import onnxproto

        self.plan = plan
        self.outdir = outdir
        self.sinks = list(sinks)
        self.names = main_outputs(plan)
        # with sinks, the main graph also hands out the activations of the batch rows
        # ACT_ROWS names (none: empty outputs, nothing copied), see _arrange
        act_rows = bool(self.sinks and plan.spec.activation_outputs)
        self._early_names = act_row_names(plan.spec) if act_rows else []
        self._early_nchw: list[bool] = []  # per early output: NCHW, read as a view
        try:
            self.proto = onnxproto.load(plan.model_path)  # loaded once, pruned per session
            model = with_stats(
                self.proto,
                plan.spec,
                keep=self.names + self._early_names,
                rows=plan.stats_every > 1,
                act_rows=act_rows,
            )
            if act_rows:
                self._early_nchw = act_rows_nchw(self.proto, plan.spec)
            self.session = open_session(
                model,
                plan.device,
                plan.threads,
                plan.runtime,
                precision=plan.precision,
                streams=plan.streams,
            )
        except (DeviceError, DecodeError, OSError) as exc:
            raise RunError(str(exc).splitlines()[0]) from exc
        except RuntimeError as exc:  # onnxruntime's own load failures (Fail, InvalidGraph)
            raise RunError(f"onnxruntime cannot load {plan.model_path}: {_first(exc)}") from exc
        self.takes_targets = C.IN_TARGETS in self.session.input_names
        #: threads for the parts of a batch beyond the first (:meth:`_run_main`)
        streams = self.session.streams
        self._parts = cf.ThreadPoolExecutor(streams - 1, "part") if streams > 1 else None
        self.constants = self._fetch_constants()
        self._acts_session: Session | None = None
        self._predict_session: Session | None = None
        self._tail = self._cut_tail()  # None unless a method re-runs the tail
        self._tail_session: Session | None = None
        self._scores_session: Session | None = None
        #: ids of the images --metrics scores; None: every image (set by the runner)
        self.metric_ids: set[str] | None = None
        self._layers = [
            (o.name, o.layer or "", tuple(int(v) for v in o.shape[1:]))
            for o in plan.spec.activation_outputs
        ]
        #: the layer names sinks get activations under (the outputs' names, no "act/")
        self._layer_keys = [n[len(C.ACT_PREFIX) :] for n, _, _ in self._layers]

    @property
    def device(self) -> str:
        return self.session.device

    def close(self) -> None:
        """Stop the threads of the batch parts (:meth:`_run_main`); the sessions stay."""
        if self._parts is not None:
            self._parts.shutdown(wait=True)

    @property
    def note(self) -> str | None:
        return self.session.note

    def _open(self, model: bytes) -> Session:
        """Another session of this run: the main session's device and runtime."""
        s = self.session
        return open_session(model, s.device, self.plan.threads, s.runtime, precision=s.precision)

    def _fetch_constants(self) -> dict[str, np.ndarray]:
        if not self.plan.spec.has_output(C.OUT_CAM_WEIGHTS):
            return {}
        names = [C.OUT_CAM_WEIGHTS, C.OUT_CAM_BIAS]
        consts = open_session(pruned(self.proto, names), "cpu")  # constants: no input
        w, b = consts.run(names, {})
        return {"weights": w, "bias": b}

    def _activations_session(self) -> Session:
        if self._acts_session is None:
            names = [n for n, _, _ in self._layers]
            model = pruned(self.proto, names)
            self._acts_session = self._open(model)
        return self._acts_session

    def run(self, good: list[Decoded], stats: RunStats, cams: ClassCAMs) -> list[ImageOutcome]:
        """Outcomes of the decodable images of a batch (records filled in, maps saved
        with --save-maps); the batch's statistics and class CAMs go into the
        accumulators.  The same as ``finish(forward(good), ...)``."""
        return self.finish(self.forward(good), stats, cams)

    def forward(self, good: list[Decoded]) -> Forward:
        """The main session's pass over a batch and the CAM methods' maps: it touches
        no accumulator and no file, so the runner runs it on its own thread, one batch
        ahead of :meth:`finish` (onnxruntime and numpy release the GIL).  Only this
        thread uses the sessions the methods open (tail, scores)."""
        plan, spec = self.plan, self.plan.spec
        perm, sampled, (a, b) = self._arrange(good)
        if perm is not None:
            good = [good[i] for i in perm]
        x = np.stack([d.tensor for d in good])  # type: ignore[misc]
        targets = plan.targets(len(x))
        feeds: dict[str, np.ndarray] = {C.IN_IMAGE: x}
        if self.takes_targets:
            feeds[C.IN_TARGETS] = targets
        names = self.names
        if plan.stats_every > 1 and self._layers:
            feeds[STATS_ROWS] = np.array([sampled], np.int64)
            if not sampled:  # nothing to reduce: the statistics are not asked for
                names = [n for n in names if not n.startswith(STATS_PREFIX)]
        early = list(range(a, b))
        if self._early_names:
            feeds[ACT_ROWS[0]], feeds[ACT_ROWS[1]] = np.array([a]), np.array([b])
        if early:
            names = names + self._early_names
        out = dict(zip(names, self._run_main(names, feeds, len(x)), strict=True))
        got = [out.pop(n) for n in self._early_names] if early else []
        by_row = self._early_activations(early, got)
        probs = self._probabilities(out[C.OUT_PREDICTIONS])
        order = np.argsort(-probs, axis=1, kind="stable")
        if C.OUT_TARGET_INDICES in out:
            classes = out[C.OUT_TARGET_INDICES]
        else:
            classes = targets.copy()
            classes[:, : plan.top_k] = order[:, : plan.top_k]
        acts = out.get(spec.cam_output) if spec.cam_output else None  # absent: no method
        inputs = CAMInputs(
            acts=acts,  # type: ignore[arg-type]
            classes=classes,
            weights=self.constants.get("weights"),
            grads=out.get(C.OUT_GRADIENTS),
            x=x,
            tail=self.tail if self._tail is not None else None,
            scores=self.class_scores,
        )
        maps = {m: METHODS[m].maps(inputs) for m in plan.methods}
        return Forward(good, perm, x, out, probs, order, classes, maps, by_row)

    def _run_main(self, names: list[str], feeds: dict[str, np.ndarray], n: int) -> list[np.ndarray]:
        """The main session's outputs for a batch of ``n`` rows: one call, or with
        ``streams`` s > 1 (onnxruntime on the CPU: :func:`.plan.resolve_streams`) s calls
        at once over consecutive parts of the rows, each from a thread of its own (they
        share the session's intra-op pool: on 2 CPUs, one thread each), their outputs
        (all of them per row, the statistics' and grid rows' too) joined in row order.
        Over the whole batch onnxruntime's intra-op threads meet at every node; a part
        per thread does not (README: Speed).  A part's row positions
        (:data:`.graph.ROW_POSITIONS`) count from its first row, clipped to it; every
        other input is cut to its rows."""
        s = min(self.session.streams, n)
        if s <= 1 or self._parts is None:
            return self.session.run(names, feeds)
        bounds = [round(n * i / s) for i in range(s + 1)]
        parts = [_part(feeds, lo, hi) for lo, hi in itertools.pairwise(bounds)]
        later = [self._parts.submit(self.session.run, names, p) for p in parts[1:]]
        try:
            first = self.session.run(names, parts[0])
        finally:
            cf.wait(later)  # the other parts end before this returns or raises
        got = [first, *(f.result() for f in later)]
        return [np.concatenate([g[i] for g in got]) for i in range(len(names))]

    def finish(self, fwd: Forward, stats: RunStats, cams: ClassCAMs) -> list[ImageOutcome]:
        """A forward pass made outcomes: records, map files, metrics, activations for
        the sinks; statistics and class CAMs into the accumulators.  Called in batch
        order, on the runner's thread."""
        plan, out, classes, maps = self.plan, fwd.out, fwd.classes, fwd.maps
        good, x, probs, order = fwd.good, fwd.x, fwd.probs, fwd.order
        for _, layer, shape in self._layers:
            names = stat_names(layer)
            if names[0] in out:  # absent: no sampled image in the batch
                stats.update_reduced(layer, shape, *(out[n] for n in names))  # type: ignore[arg-type]
        if plan.methods:
            cams.add(classes[:, 0], normalize(maps[plan.methods[0]][:, 0]))
        results = [self._outcome(d, i, probs, order, classes, maps) for i, d in enumerate(good)]
        self._attach_metrics(x, probs, classes, maps, results)
        back = list(range(len(good))) if fwd.perm is None else np.argsort(fwd.perm).tolist()
        self._attach_activations(x, results, fwd.early, back)
        return [results[j] for j in back]  # the caller's order

    def _early_activations(
        self, rows: list[int], got: list[np.ndarray]
    ) -> dict[int, dict[str, np.ndarray]]:
        """Row -> layer -> (h, w, k) activations, from the main pass' sliced outputs
        (an NCHW one read as a transposed view)."""
        if not rows:
            return {}
        per_layer = zip(self._layer_keys, got, self._early_nchw, strict=True)
        hwk = [(k, a.transpose(0, 2, 3, 1) if nchw else a) for k, a, nchw in per_layer]
        return {row: {k: a[j] for k, a in hwk} for j, row in enumerate(rows)}

    def _arrange(self, good: list[Decoded]) -> tuple[list[int] | None, int, tuple[int, int]]:
        """The order of a batch in the main pass, so that each graph slice covers a run
        of rows: the images in the statistics' sample first (--stats-every; otherwise
        every image), and those whose activations a sink surely wants
        (:meth:`_wants_early`) on both sides of that boundary: [sampled only, sampled
        and wanted, wanted only, neither], each group in batch order.  Returns the
        order (None: the batch's own), the number of sampled rows and the wanted rows'
        range ``(a, b)``."""
        every = self.plan.stats_every
        sampled = [in_stats_sample(d.record.id, every) for d in good]
        wanted = [self._wants_early(d) for d in good]
        rank = [(0, int(w)) if s else (1, 1 - int(w)) for s, w in zip(sampled, wanted, strict=True)]
        perm = sorted(range(len(good)), key=rank.__getitem__)
        a = rank.count((0, 0))
        rows = (a, a + sum(wanted))
        return (None if perm == list(range(len(good))) else perm), sum(sampled), rows

    def _wants_early(self, d: Decoded) -> bool:
        """Whether a sink will want this image's activations whatever its predictions: a
        sink without ``wants_activations`` wants every image's; one with
        ``surely_wants_activations(record)`` says so before the predictions exist (the
        report: the grid sample's first places).  They come out of the main pass."""
        if not self._early_names:
            return False
        for s in self.sinks:
            surely = getattr(s, "surely_wants_activations", None)
            if not hasattr(s, "wants_activations") or (surely and surely(d.record)):
                return True
        return False

    def _probabilities(self, raw: np.ndarray) -> np.ndarray:
        if self.plan.spec.head.activation == "linear" and raw.shape[1] > 1:
            # a classifier trained from logits: report softmax probabilities
            e = np.exp(raw - raw.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]
        return raw

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities of a batch of model inputs, from a session pruned to the
        predictions (the metrics' perturbed inputs: no statistics, no gradients)."""
        if self._predict_session is None:
            model = pruned(self.proto, [C.OUT_PREDICTIONS])
            self._predict_session = self._open(model)
        feeds = {C.IN_IMAGE: np.ascontiguousarray(batch, np.float32)}
        raw = self._predict_session.run([C.OUT_PREDICTIONS], feeds)[0]
        return self._probabilities(raw)

    def _cut_tail(self) -> TailGraph | None:
        """The network after the CAM tensor, cut out of the graph when a chosen method
        re-runs it (:mod:`convlens.engine.tail`); a RunError says why it cannot be."""
        needs = [m for m in self.plan.methods if METHODS[m].needs_tail]
        if not needs:
            return None
        try:
            return cut_tail(self.proto, self.plan.spec)
        except TailError as exc:
            raise RunError(
                f"CAM method {', '.join(needs)} is not available for this model ({exc})"
            ) from exc

    def tail(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class scores and probabilities of feature maps ``(B, h, w, k)`` put in place of
        the CAM tensor, through the tail's own session (opened on first use)."""
        assert self._tail is not None
        if self._tail_session is None:
            self._tail_session = self._open(self._tail.model)
        scores, raw = self._tail_session.run(list(TAIL_OUTPUTS), self._tail.feeds(feats))
        return scores, self._probabilities(raw)

    def class_scores(self, batch: np.ndarray) -> np.ndarray:
        """Class scores before softmax/sigmoid of a batch of model inputs (Score-CAM's
        masked images), from a session pruned to the scores."""
        if self._scores_session is None:
            self._scores_session = self._open(pruned(self.proto, [C.OUT_SCORES]))
        feeds = {C.IN_IMAGE: np.ascontiguousarray(batch, np.float32)}
        return self._scores_session.run([C.OUT_SCORES], feeds)[0]

    def _attach_metrics(
        self,
        x: np.ndarray,
        probs: np.ndarray,
        classes: np.ndarray,
        maps: dict[str, np.ndarray],
        results: list[ImageOutcome],
    ) -> None:
        """--metrics: each method's map of the first target class (top-1), min-max
        normalised at feature resolution then upsampled to the input (torch-cam's order),
        scored on the batch already in memory; into the records."""
        plan = self.plan
        if not plan.metrics or not maps:
            return
        ids = self.metric_ids
        rows = [i for i, oc in enumerate(results) if ids is None or oc.record.id in ids]
        if not rows:
            return
        xs, cls = x[rows], classes[rows, 0]
        base = probs[rows, cls].astype(np.float64)
        size = (int(xs.shape[1]), int(xs.shape[2]))
        grid = np.linspace(0.0, 1.0, CURVE_POINTS)
        for m, arr in maps.items():
            up = np.stack([upsample(mp, size) for mp in normalize(arr[rows, 0])])
            res = compute_all(plan.metrics, xs, up, cls, self.predict, base=base)
            for j, row in enumerate(rows):
                rec = results[row].record
                rec.metrics[m] = {k: round(float(v[j]), 6) for k, v in res.scores.items()}
                rec.metric_curves[m] = {
                    k: [round(float(p), 5) for p in np.interp(grid, _fractions(v[j]), v[j])]
                    for k, v in res.curves.items()
                }

    def _outcome(
        self,
        d: Decoded,
        i: int,
        probs: np.ndarray,
        order: np.ndarray,
        classes: np.ndarray,
        maps: dict[str, np.ndarray],
    ) -> ImageOutcome:
        plan = self.plan
        names = plan.spec.class_names
        rec = d.record
        rec.predictions = [
            Prediction(int(c), names[int(c)], round(float(probs[i, c]), 6))
            for c in order[i, : plan.top_k]
        ]
        cls = list(dict.fromkeys(int(c) for c in classes[i]))  # top-k may hold a --class
        rec.cam_classes = cls
        rec.cam_methods = list(plan.methods)
        per_image: dict[tuple[str, int], np.ndarray] = {}
        for m, arr in maps.items():
            if arr.shape[1] == 1 and METHODS[m].class_agnostic:
                one = arr[i, 0]  # the same array under every class (sinks copy it once)
                for c in cls:
                    per_image[(m, c)] = one
            else:
                for t, c in enumerate(classes[i].tolist()):
                    per_image.setdefault((m, int(c)), arr[i, t])
        if plan.save_maps:
            rel = f"maps/{rec.id}.npz"
            atomic_save_npz(self.outdir / rel, {f"{m}/{c}": v for (m, c), v in per_image.items()})
            rec.maps = rel
        return ImageOutcome(record=rec, image=d.image, maps=per_image)

    def _attach_activations(
        self,
        x: np.ndarray,
        results: list[ImageOutcome],
        early: dict[int, dict[str, np.ndarray]],
        calls: list[int],
    ) -> None:
        """Give each outcome its activations if a sink wants them for that image.

        A sink may say per image (``wants_activations(record)``, called once per ok
        record, in the batch's own order: ``calls``, the rows of the pass in that
        order); without that method it gets them for every image.  The rows
        :meth:`_wants_early` named came out of the main pass (``early``); the others
        (for the report, the notable images, known from their predictions only) come
        from a second pass, over just those images, on a session pruned to the
        activations: a batch with no such image never pays for copying them out.
        """
        want = np.zeros(len(results), bool)
        for s in self.sinks:
            ask = getattr(s, "wants_activations", None)
            for i in calls:
                if ask is None or ask(results[i].record):
                    want[i] = True
        for row, acts in early.items():
            if want[row]:
                results[row].activations = acts
                want[row] = False
        if not want.any():
            return
        rows = np.flatnonzero(want)
        names = [n for n, _, _ in self._layers]
        got = self._activations_session().run(names, {C.IN_IMAGE: x[rows]})
        for j, row in enumerate(rows.tolist()):
            results[row].activations = {k: a[j] for k, a in zip(self._layer_keys, got, strict=True)}


def _part(feeds: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
    """The feeds of batch rows ``lo`` to ``hi - 1``: row positions counted from ``lo``
    and clipped to the part, every other input cut to those rows."""
    return {
        k: np.clip(v - lo, 0, hi - lo) if k in ROW_POSITIONS else v[lo:hi] for k, v in feeds.items()
    }


def _fractions(curve: np.ndarray) -> np.ndarray:
    return np.linspace(0.0, 1.0, len(curve))


def _first(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
