"""Build the analysis tf.function from a plan: predictions, scores, exposed
activations, and the head gradients from the backward rules."""

from __future__ import annotations

from typing import Any

from convlens.engine import contract as C

from .backward import Ops, backward, matmul_t
from .errors import UnsupportedHead
from .plan import Plan, scores_from_trace
from .trace import Recorder, Trace


def resolve_targets(tf: Any, scores: Any, targets: Any) -> Any:
    """Targets (N, T): >= 0 class index, -r the r-th best class.  Returns int64 (N, T)."""
    n_cls = scores.shape[-1]
    order = tf.argsort(scores, axis=1, direction="DESCENDING")  # (N, C)
    rank = tf.clip_by_value(-targets - 1, 0, n_cls - 1)
    ranked = tf.reduce_sum(
        tf.one_hot(rank, n_cls, dtype=tf.float32) * tf.cast(order[:, None, :], tf.float32),
        axis=-1,
    )
    ranked = tf.cast(tf.round(ranked), tf.int64)
    direct = tf.clip_by_value(targets, 0, n_cls - 1)
    return tf.where(targets < 0, ranked, direct)


def head_gradients(tf: Any, plan: Plan, trace: Trace, scores: Any, resolved: Any) -> Any:
    """d scores[n, resolved[n, t]] / d A, shape (N, T, h, w, k), by the registered rules."""
    by_name = {c.name: c for c in trace.calls}
    n_cls = plan.num_classes
    seed = tf.one_hot(resolved, n_cls, dtype=scores.dtype)  # (N, T, C) on scores
    g = seed[..., 1:2] - seed[..., 0:1] if plan.binary_sigmoid else seed  # on z
    last = by_name[plan.final]
    nt = tf.shape(resolved)[:2]
    if plan.final_mode == "dense":
        g = matmul_t(Ops(tf, nt), g, tf.convert_to_tensor(last.layer.kernel))
    end = last.output if plan.final_mode == "linear" else last.input_tensors[0]
    return backward(tf, trace, by_name[plan.cam_exposed].output, end, g, nt)


def probe_gradients(tf: Any, plan: Plan, trace: Trace) -> None:
    """Run the head's backward rules once, eagerly, on a recorded trace: layers whose
    configuration no rule covers (e.g. ReLU(max_value=6), overlapping pooling) are
    added to ``plan.gradient_problems`` instead of failing the conversion later."""
    if not plan.gradients_available:
        return
    try:
        _, scores, _ = scores_from_trace(tf, plan, trace)
        resolved = tf.zeros((scores.shape[0], 1), dtype=tf.int64)
        head_gradients(tf, plan, trace, scores, resolved)
    except UnsupportedHead as exc:
        plan.gradient_problems.extend(exc.problems)


def output_names(plan: Plan, with_gradients: bool) -> list[str]:
    names = [C.OUT_PREDICTIONS, C.OUT_SCORES]
    names += [C.ACT_PREFIX + e.name for e in plan.exposed]
    if with_gradients:
        names += [C.OUT_GRADIENTS, C.OUT_TARGET_INDICES]
    return names


def make_function(
    tf: Any,
    model: Any,
    recorder: Recorder,
    plan: Plan,
    input_shape: tuple[int, int, int],
    with_gradients: bool,
    plain: bool = False,
) -> tuple[Any, list[Any]]:
    """The analysis tf.function and its input signature.

    ``plain=True`` gives the model's predictions only (the baseline export).
    """
    image_spec = tf.TensorSpec([None, *input_shape], tf.float32, name=C.IN_IMAGE)
    target_spec = tf.TensorSpec([None, None], tf.int64, name=C.IN_TARGETS)

    def outputs(image: Any, targets: Any | None) -> list[Any]:
        with recorder.recording(rewrite_with=tf) as trace:
            y = model(image, training=False)
        if plain:
            return [y]
        by_name = {c.name: c for c in trace.calls}
        _, scores, preds = scores_from_trace(tf, plan, trace)
        outs = [preds, scores]
        outs += [by_name[e.exposed].output for e in plan.exposed]
        if targets is not None:
            resolved = resolve_targets(tf, scores, targets)
            outs += [head_gradients(tf, plan, trace, scores, resolved), resolved]
        return outs

    if with_gradients and not plain:
        sig = [image_spec, target_spec]

        @tf.function(input_signature=sig)
        def fn2(image: Any, targets: Any) -> list[Any]:
            return outputs(image, targets)

        return fn2, sig

    sig = [image_spec]

    @tf.function(input_signature=sig)
    def fn1(image: Any) -> list[Any]:
        return outputs(image, None)

    return fn1, sig
