"""CAM and the gradient methods: channel weights or element-wise products from the CAM
weights and the in-graph gradients ``g = dS_c/dA`` (notation: :mod:`.cams`)."""

from __future__ import annotations

import numpy as np

from .cams import CAMInputs, CAMMethod, _relu_, register


@register
class CAM(CAMMethod):
    """CAM (Zhou et al. 2016, "Learning Deep Features for Discriminative Localization").

    ``M_c = ReLU(sum_k w[k, c] A_k)`` with ``w`` the weights of the Dense layer that
    follows global average pooling (the bias is left out).
    """

    name = "cam"
    label = "CAM"
    needs_weights = True
    reference = "Zhou et al. 2016"

    def channel_weights(self, inp: CAMInputs) -> np.ndarray:
        weights, classes = inp.weights, inp.classes
        assert weights is not None and classes is not None
        # weights[:, classes] is (k, N, T)
        return np.ascontiguousarray(weights[:, classes].transpose(1, 2, 0))


@register
class GradCAM(CAMMethod):
    """Grad-CAM (Selvaraju et al. 2017).

    ``alpha_k = (1 / hw) sum_{i,j} dS_c / dA_k(i, j)``;  ``M = ReLU(sum_k alpha_k A_k)``.
    """

    name = "gradcam"
    label = "Grad-CAM"
    needs_gradients = True
    reference = "Selvaraju et al. 2017"

    def channel_weights(self, inp: CAMInputs) -> np.ndarray:
        grads = inp.grads
        assert grads is not None
        return grads.mean(axis=(2, 3), dtype=np.float32)


@register
class GradCAMpp(CAMMethod):
    """Grad-CAM++ (Chattopadhyay et al. 2018), with the exponential-score closed form.

    With ``Y_c = exp(S_c)`` the 2nd and 3rd derivatives become powers of ``g = dS_c/dA``
    (as in pytorch-grad-cam), giving per position ``(i, j)`` and channel ``k``::

        alpha_k(i, j) = g^2 / (2 g^2 + sum_{a,b} A_k(a, b) * g^3)   (0 where the
                                                                      denominator is 0)
        w_k = sum_{i,j} alpha_k(i, j) * ReLU(g(i, j))
        M   = ReLU(sum_k w_k A_k)

    (``g``, ``g^2``, ``g^3`` evaluated at ``(i, j)``; the common factor ``exp(S_c)`` is
    dropped.)  Evaluated as ``w_k = sum_{i,j: g > 0} g / (2 + S_k g)`` with
    ``S_k = sum_{a,b} A_k(a, b)``, which is the same quantity after cancelling ``g^2``.
    """

    name = "gradcampp"
    label = "Grad-CAM++"
    needs_gradients = True
    reference = "Chattopadhyay et al. 2018"

    def channel_weights(self, inp: CAMInputs) -> np.ndarray:
        acts, grads = inp.acts, inp.grads
        assert grads is not None
        # For g > 0:  alpha * ReLU(g) = g^2 * g / (g^2 (2 + S g)) = g / (2 + S g), with
        # S = sum_ab A_k(a, b); for g <= 0 the term is 0.  Same value, three fewer
        # full-size temporaries than the literal formula.
        sum_a = acts.sum(axis=(1, 2), dtype=np.float32)[:, None, None, None, :]  # (N,1,1,1,k)
        pos = np.maximum(grads, 0.0)  # (N, T, h, w, k)
        den = pos * sum_a
        den += 2.0
        ok = den != 0  # g > 0 and 2 + S g == 0: zero denominator -> alpha = 0
        np.divide(pos, den, out=pos, where=ok)
        if not ok.all():
            pos[~ok] = 0.0
        return pos.sum(axis=(2, 3), dtype=np.float32)


@register
class LayerCAM(CAMMethod):
    """Layer-CAM (Jiang et al. 2021).

    Element-wise weights: ``M(i, j) = ReLU(sum_k ReLU(g_k(i, j)) * A_k(i, j))``.
    """

    name = "layercam"
    label = "LayerCAM"
    needs_gradients = True
    reference = "Jiang et al. 2021"

    def raw_maps(self, inp: CAMInputs) -> np.ndarray:
        acts, grads = inp.acts, inp.grads
        assert grads is not None
        pos = np.maximum(grads, 0.0)  # (N, T, h, w, k)
        pos *= acts[:, None]
        return pos.sum(axis=-1, dtype=np.float32)


@register
class XGradCAM(CAMMethod):
    """XGrad-CAM (Fu et al. 2020, "Axiom-based Grad-CAM").

    ``alpha_k = sum_{i,j} (A_k(i, j) / sum_{a,b} A_k(a, b)) * dS_c / dA_k(i, j)``;
    ``M = ReLU(sum_k alpha_k A_k)``.  A channel whose activations sum to 0 (a dead
    channel) gets ``alpha_k = 0``; pytorch-grad-cam's XGradCAM adds ``1e-7`` to the
    denominator instead, which differs by a relative ``1e-7 / sum A_k`` elsewhere.
    """

    name = "xgradcam"
    label = "XGrad-CAM"
    needs_gradients = True
    default = False
    reference = "Fu et al. 2020"

    def channel_weights(self, inp: CAMInputs) -> np.ndarray:
        acts, grads = inp.acts, inp.grads
        assert grads is not None
        sum_a = acts.sum(axis=(1, 2), dtype=np.float32)[:, None, :]  # (N, 1, k)
        num = np.einsum("nthwk,nhwk->ntk", grads, acts, dtype=np.float32)  # (N, T, k)
        ok = np.broadcast_to(sum_a != 0, num.shape)
        out = np.zeros_like(num)
        np.divide(num, sum_a, out=out, where=ok)
        return out


def _grad_times_acts(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """``g * A`` as ``(N, T, h, w, k)`` float32 (A broadcast over the T targets)."""
    return np.multiply(grads, acts[:, None], dtype=np.float32)


@register
class HiResCAM(CAMMethod):
    """HiResCAM (Draelos & Carin 2020, "Use HiResCAM instead of Grad-CAM for faithful
    explanations of convolutional neural networks").

    Element-wise, no pooling of the gradients:
    ``M(i, j) = ReLU(sum_k dS_c/dA_k(i, j) * A_k(i, j))``.  The final ReLU is the
    reference implementation's (pytorch-grad-cam's HiResCAM: ``(grads * activations)
    .sum(axis=1)``, then the ReLU its BaseCAM applies to every method).  For a GAP ->
    Dense head the gradient is ``w[k, c] / (h w)`` everywhere, so HiResCAM is CAM / (hw).
    """

    name = "hirescam"
    label = "HiResCAM"
    needs_gradients = True
    default = False
    reference = "Draelos & Carin 2020"

    def raw_maps(self, inp: CAMInputs) -> np.ndarray:
        acts, grads = inp.acts, inp.grads
        assert grads is not None
        return np.einsum("nthwk,nhwk->nthw", grads, acts, dtype=np.float32)


@register
class GradCAMElementWise(CAMMethod):
    """Element-wise Grad-CAM (pytorch-grad-cam's GradCAMElementWise).

    ``M(i, j) = sum_k ReLU(dS_c/dA_k(i, j) * A_k(i, j))``: HiResCAM with the ReLU inside
    the channel sum (as ``np.maximum(grads * activations, 0).sum(axis=1)`` there).  The
    method has no paper of its own; it is defined by that library.
    """

    name = "gradcamelementwise"
    label = "Element-wise Grad-CAM"
    needs_gradients = True
    default = False
    reference = "pytorch-grad-cam (Gildenblat et al.)"

    def raw_maps(self, inp: CAMInputs) -> np.ndarray:
        acts, grads = inp.acts, inp.grads
        assert grads is not None
        prod = _relu_(_grad_times_acts(acts, grads))
        return prod.sum(axis=-1, dtype=np.float32)
