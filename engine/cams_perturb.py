"""Perturbation methods: no gradients, so they work on any head (notation: :mod:`.cams`).

Ablation-CAM and Recipro-CAM perturb the CAM tensor and re-run only the network after it
(``CAMInputs.tail``, cut out of the analysis graph by :mod:`convlens.engine.tail`): K or
h*w tail passes per image.  Score-CAM masks the input image and runs the whole model
(``CAMInputs.scores``): K passes per image.  Every perturbed copy of a batch goes through
the network in large batches (:func:`batched`), never one call per copy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .cams import CAMInputs, CAMMethod, normalize, register, resize_matrix

#: at most this many bytes of perturbed feature maps per tail call
TAIL_CHUNK_BYTES = 32 * 2**20
#: at most this many bytes, and rows, of masked images per whole-model call
MODEL_CHUNK_BYTES = 32 * 2**20
MODEL_CHUNK_ROWS = 64


def batched(
    fn: Callable[[np.ndarray], np.ndarray],
    total: int,
    build: Callable[[np.ndarray], np.ndarray],
    chunk: int,
) -> np.ndarray:
    """``fn`` over ``total`` perturbed rows, ``chunk`` rows a call: ``build(rows)`` makes
    the inputs of the row indices ``rows``; the outputs are concatenated in row order."""
    chunk = max(1, chunk)
    parts = [fn(build(np.arange(a, min(a + chunk, total)))) for a in range(0, total, chunk)]
    return np.concatenate(parts, axis=0)


def _per_target(out: np.ndarray, n: int, classes: np.ndarray) -> np.ndarray:
    """Rows ``(n * V, C)`` (V variants of each image) -> ``(N, T, V)``: each variant's
    output for each target class of its image."""
    per = out.reshape(n, -1, out.shape[-1])  # (N, V, C)
    return np.take_along_axis(per, classes[:, None, :], axis=2).transpose(0, 2, 1)


def _tail_chunk(acts: np.ndarray) -> int:
    return TAIL_CHUNK_BYTES // max(1, acts[0].nbytes)


@register
class AblationCAM(CAMMethod):
    """Ablation-CAM (Desai & Ramaswamy 2020, "Ablation-CAM: Visual Explanations for Deep
    Convolutional Network via Gradient-free Localization").

    ``y_c`` the class score (before softmax) of the CAM tensor as it is, ``y_c^k`` the
    score with channel ``k`` of the CAM tensor set to zero (both through the tail)::

        alpha_k = (y_c - y_c^k) / y_c          (0 where y_c = 0)
        M       = ReLU(sum_k alpha_k A_k)

    as pytorch-grad-cam's AblationCAM (with its default ``ratio_channels_to_ablate=1``: every
    channel ablated; it divides by ``y_c`` unguarded).  K tail passes per image, batched.
    """

    name = "ablationcam"
    label = "Ablation-CAM"
    needs_tail = True
    default = False
    reference = "Desai & Ramaswamy 2020"

    def channel_weights(self, inp: CAMInputs) -> np.ndarray:
        acts, classes, tail = inp.acts, inp.classes, inp.tail
        assert classes is not None and tail is not None
        n, h, w, k = acts.shape

        def ablated(rows: np.ndarray) -> np.ndarray:
            feats = acts[rows // k]  # a copy
            feats[np.arange(len(rows)), :, :, rows % k] = 0.0
            return feats

        y = np.take_along_axis(tail(acts)[0], classes, axis=1)[:, :, None]  # (N, T, 1)
        yk = _per_target(
            batched(lambda f: tail(f)[0], n * k, ablated, _tail_chunk(acts)), n, classes
        )
        alpha = np.zeros(yk.shape, np.float32)
        np.divide(y - yk, y, out=alpha, where=np.broadcast_to(y != 0, yk.shape))
        return alpha


@register
class ReciproCAM(CAMMethod):
    """Recipro-CAM (Byun & Lee 2022, "Recipro-CAM: Fast gradient-free visual explanations
    for convolutional neural networks").

    For each position ``(i, j)``, the mosaic feature map ``F^(i,j)`` keeps the CAM tensor's
    activations at ``(i, j)`` (all channels) and is zero elsewhere; the map is the class
    probability of the tail on it::

        M_c(i, j) = P_c(F^(i,j)),   F^(i,j)(a, b, k) = A_k(i, j) [a = i, b = j]

    ``P`` is the model's own output (its softmax; ``[1 - p, p]`` for one sigmoid unit), as
    OpenVINO XAI's ReciproCAM reads its softmax node.  The one-hot mask is the paper's and
    OpenVINO XAI's for CNNs (the 3x3 Gaussian variant is not offered).  h*w tail passes per
    image, batched.
    """

    name = "reciprocam"
    label = "Recipro-CAM"
    needs_tail = True
    default = False
    reference = "Byun & Lee 2022"

    def raw_maps(self, inp: CAMInputs) -> np.ndarray:
        acts, classes, tail = inp.acts, inp.classes, inp.tail
        assert classes is not None and tail is not None
        n, h, w, k = acts.shape

        def mosaic(rows: np.ndarray) -> np.ndarray:
            img, cell = rows // (h * w), rows % (h * w)
            i, j = cell // w, cell % w
            feats = np.zeros((len(rows), h, w, k), np.float32)
            feats[np.arange(len(rows)), i, j, :] = acts[img, i, j, :]
            return feats

        probs = batched(lambda f: tail(f)[1], n * h * w, mosaic, _tail_chunk(acts))
        return _per_target(probs, n, classes).reshape(n, classes.shape[1], h, w)


@register
class ScoreCAM(CAMMethod):
    """Score-CAM (Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations for
    Convolutional Neural Networks").

    Each channel ``A_k``, upsampled to the input size ``U(A_k)`` (bilinear, half-pixel
    centres) and min-max normalised to ``H_k = (U - min U) / (max U - min U)`` (0 for a
    constant channel), masks the input; the whole model scores the masked image::

        s_k     = S_c(X * H_k)                  (class score before softmax)
        alpha_k = exp(s_k) / sum_m exp(s_m)     (softmax over the channels)
        M       = ReLU(sum_k alpha_k A_k)

    as pytorch-grad-cam's ScoreCAM and torch-cam's ScoreCAM compute it (torch-cam subtracts
    the unmasked score first, which the softmax cancels).  K whole-model passes per image,
    batched.
    """

    name = "scorecam"
    label = "Score-CAM"
    needs_model = True
    default = False
    reference = "Wang et al. 2020"

    def channels(self, acts: np.ndarray) -> np.ndarray:
        """The channels that mask the input, ``(N, m)`` indices: all of them."""
        n, k = acts.shape[0], acts.shape[-1]
        return np.tile(np.arange(k), (n, 1))

    def channel_weights(self, inp: CAMInputs) -> np.ndarray:
        acts, x, classes, scores = inp.acts, inp.x, inp.classes, inp.scores
        assert x is not None and classes is not None and scores is not None
        n, h, w, k = acts.shape
        size = x.shape[1:3]
        chans = self.channels(acts)
        m = chans.shape[1]
        r_h, r_w = resize_matrix(size[0], h), resize_matrix(size[1], w)

        def masked(rows: np.ndarray) -> np.ndarray:
            img = rows // m
            a = acts[img, :, :, chans[img, rows % m]]  # (B, h, w)
            up = np.matmul(np.matmul(r_h, a), r_w.T)  # (B, H, W)
            return x[img] * normalize(up)[..., None]

        chunk = min(MODEL_CHUNK_ROWS, MODEL_CHUNK_BYTES // max(1, x[0].nbytes))
        s = _per_target(batched(scores, n * m, masked, chunk), n, classes)  # (N, T, m)
        s = s.astype(np.float64)
        e = np.exp(s - s.max(axis=2, keepdims=True))
        soft = e / e.sum(axis=2, keepdims=True)
        alpha = np.zeros((n, classes.shape[1], k), np.float32)  # channels not kept: 0
        t = classes.shape[1]
        alpha[np.arange(n)[:, None, None], np.arange(t)[None, :, None], chans[:, None, :]] = soft
        return alpha


@register
class FasterScoreCAM(ScoreCAM):
    """Faster Score-CAM (tabayashi0117/Score-CAM, "Faster Score-CAM"; tf-keras-vis'
    ``Scorecam(max_N=...)``): Score-CAM over the ``top_n`` channels of largest variance
    over positions (per image) only; the others get weight 0, the softmax runs over the
    kept ones::

        kept    = the top_n k by var_ij A_k(i, j)
        alpha_k = softmax_{m in kept}(s_m)_k for k in kept, else 0

    ``top_n`` (10 here) whole-model passes per image instead of K.
    """

    name = "fasterscorecam"
    label = "Faster Score-CAM"
    reference = "tabayashi0117 (Faster Score-CAM); Wang et al. 2020"
    #: channels kept per image
    top_n = 10

    def channels(self, acts: np.ndarray) -> np.ndarray:
        var = acts.var(axis=(1, 2), dtype=np.float64)  # (N, k)
        order = np.argsort(-var, axis=1, kind="stable")
        return order[:, : min(self.top_n, acts.shape[-1])]
