"""Pure functions of the Titans neural memory (no parameters, no state).

Everything here is plain PyTorch on explicit tensors, so a lesson can call each piece on its own
and the tests can compare each piece with an independent computation. Equation numbers refer to
``titans-reference.md`` (our numbering) and, where given, to the paper (arXiv 2501.00663 v1).

Contents

* :func:`associative_loss`     ℓ(Φ) = ½‖M(k; Φ) − v‖²  (eq. 2, paper eq. 12; D1: ½ and a *sum*)
* :func:`memory_forward`       M(x; Φ) for the three memory kinds of D4, keeping what the
                               backward needs
* :func:`memory_backward`      δ^{(l)} = ∂ℓ/∂z^{(l)}, the per-token back-propagated errors, by hand
* :func:`chunk_coefficients`   A, B, E_n, c_s, d_s of the weighted-gradient route (eqs. 14–17),
                               in the stable log-space form
* :func:`chunk_coefficients_recurrence`   the same from recurrence (17), a loop (for lessons/tests)
* :func:`linear_memory_chunk`  closed forms (9), (10), (13) of a linear memory over one chunk

Memory kinds (D4), weights Φ = (W_1, …, W_L), W_l of shape (..., out_l, in_l), no biases:

* ``"linear"``       L = 1:  M(x) = W x
* ``"mlp"``          L ≥ 2:  M(x) = W_L GELU(… GELU(W_1 x))
* ``"residual_ln"``  L ≥ 2:  M(x) = x + LN(W_L GELU(… GELU(W_1 x)))   (LN without affine params)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .scan import segsum

__all__ = [
    "MEMORY_KINDS",
    "associative_loss",
    "chunk_coefficients",
    "chunk_coefficients_recurrence",
    "gelu_derivative",
    "l2_normalize",
    "layer_norm_backward",
    "linear_memory_chunk",
    "memory_backward",
    "memory_forward",
    "memory_kind",
]

MEMORY_KINDS = ("linear", "mlp", "residual_ln")
LN_EPS = 1e-5


def memory_kind(depth: int, residual_norm: bool = True) -> str:
    """The memory kind of D4 for a given depth: linear (1), residual-LN MLP or plain MLP (≥ 2)."""
    if depth == 1:
        return "linear"
    return "residual_ln" if residual_norm else "mlp"


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / ‖x‖ over the last dimension (D9: queries and keys are ℓ2-normalised)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def associative_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """ℓ = ½‖M(k) − v‖², summed over the feature (last) dimension (D1). Shape: prediction[..., 0]."""
    return 0.5 * (prediction - target).pow(2).sum(-1)


def gelu_derivative(z: Tensor) -> Tensor:
    """d/dz GELU(z) for the exact (erf) GELU:  Φ(z) + z·φ(z)."""
    cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + z * pdf


def layer_norm_backward(grad_out: Tensor, normalized: Tensor, rstd: Tensor) -> Tensor:
    """Backward of the non-affine LayerNorm u = (z − mean z)·rstd over the last dim.

    ∂ℓ/∂z = rstd · (g − mean(g) − u · mean(g ⊙ u)),  with g = ∂ℓ/∂u.
    Note the factor rstd = 1/σ(z): a memory whose MLP output has a tiny spread amplifies its
    gradients (titans-reference §10, pitfall 4) — hence a sensible scale for M₀.
    """
    mean_g = grad_out.mean(-1, keepdim=True)
    mean_gu = (grad_out * normalized).mean(-1, keepdim=True)
    return rstd * (grad_out - mean_g - normalized * mean_gu)


def memory_forward(weights: tuple[Tensor, ...] | list[Tensor], x: Tensor, kind: str,
                   keep: bool = False):
    """M(x; Φ) for inputs x (..., n, d) and weights W_l (..., out_l, in_l) broadcasting over ``...``.

    Returns ``out`` (..., n, d), or ``(out, cache)`` when ``keep`` — the cache holds, per layer,
    the layer input X^{(l)} and what the hand-written backward needs (GELU pre-activations,
    the LayerNorm input, mean and 1/σ). Matmul outputs are cast to the weights' dtype, so under
    autocast the matmuls may run in bf16 while the element-wise maths stays in fp32.
    """
    if kind not in MEMORY_KINDS:
        raise ValueError(f"unknown memory kind {kind!r}; expected one of {MEMORY_KINDS}")
    n_layers = len(weights)
    inputs: list[Tensor] = []  # X^{(l)}: the input of layer l, (..., n, in_l)
    pre: list[Tensor] = []  # z^{(l)} = X^{(l)} W_lᵀ for the hidden layers (GELU inputs)
    h = x
    for layer, w in enumerate(weights):
        inputs.append(h)
        z = torch.matmul(h, w.transpose(-1, -2)).to(w.dtype)  # (..., n, out_l)
        if layer < n_layers - 1:
            pre.append(z)
            h = F.gelu(z)
        else:
            h = z
    cache = {"inputs": inputs, "pre": pre}
    if kind == "residual_ln":
        # u = (z − mean z) / sqrt(var z + ε), non-affine; one fused kernel (it has a double
        # backward, which the outer loop needs)
        normalized, mean, rstd = torch.native_layer_norm(h, [h.shape[-1]], None, None, LN_EPS)
        out = x.to(normalized.dtype) + normalized
        cache["ln"] = (h, mean, rstd)
    else:
        out = h
    return (out, cache) if keep else out


def memory_backward(weights: tuple[Tensor, ...] | list[Tensor], cache: dict,
                    grad_out: Tensor) -> list[Tensor]:
    """Hand-written backward: δ^{(l)} = ∂ℓ/∂z^{(l)} for every layer l, from grad_out = ∂ℓ/∂M(x).

    For ℓ = ½‖M(k) − v‖², grad_out = M(k) − v. Because M treats tokens independently, the δ of
    the *summed* loss Σ_s ℓ_s at row s is token s's own δ_s (reference §3.6), and the gradient of
    ℓ_s w.r.t. W_l is the outer product δ_s^{(l)} x_s^{(l)ᵀ} (eq. 18) — which we never form.

        last layer:   δ^{(L)} = LN'(z^{(L)})ᵀ grad_out        (residual-LN; = grad_out otherwise)
        hidden layer: δ^{(l)} = (δ^{(l+1)} W_{l+1}) ⊙ GELU'(z^{(l)})

    LN' and GELU' use PyTorch's fused backward kernels (:func:`layer_norm_backward` and
    :func:`gelu_derivative` spell out the same maths and are tested equal). Everything is an
    ordinary differentiable op, so autograd can differentiate *through* this backward: that is
    how the outer loss reaches W_K, W_V, the gates and M₀ via the inner updates.
    Returns a list of (..., n, out_l) tensors, in layer order.
    """
    n_layers = len(weights)
    if "ln" in cache:
        # the fused kernel reads z, mean and 1/σ as flat arrays: they must be contiguous
        z, mean, rstd = (t.contiguous() for t in cache["ln"])
        delta = torch.ops.aten.native_layer_norm_backward(
            grad_out, z, [z.shape[-1]], mean, rstd, None, None, [True, False, False])[0]
    else:
        delta = grad_out
    deltas = [delta]
    for layer in range(n_layers - 1, 0, -1):
        back = torch.matmul(delta, weights[layer]).to(weights[layer].dtype)  # (..., n, in_layer)
        delta = torch.ops.aten.gelu_backward(back, cache["pre"][layer - 1])  # back ⊙ GELU'(z)
        deltas.append(delta)
    return deltas[::-1]


# ----------------------------------------------------------------------------------------------
# Within-chunk coefficients (reference §3.5–3.6)
# ----------------------------------------------------------------------------------------------


def chunk_coefficients(theta: Tensor, log_eta: Tensor, log_keep: Tensor):
    """Coefficients of the weighted-gradient route for chunks of n tokens (eqs. 14–17).

    Inputs, all over the chunk's tokens s = 1..n in the last dim (theta may have an extra
    trailing layer dim L for per-layer step sizes):

        theta     θ_s                 (..., n) or (..., n, L)
        log_eta   log η_s  ≤ 0        (..., n)   (−inf allowed: η = 0, no momentum)
        log_keep  log(1 − α_s) ≤ 0    (..., n)

    With every g_s taken at the chunk-start state, the end of the chunk is (eqs. 14–15)

        Φ_end = A·Φ_start + B·S_start − Σ_s c_s g_s,      S_end = E_n·S_start − Σ_s d_s g_s

    and, with suffix products a_s = Π_{j>s}(1 − α_j) and e_s = Π_{j>s} η_j,

        G_s = Σ_{r ≥ s} a_r · Π_{j=s+1}^{r} η_j,   c_s = θ_s G_s,   d_s = θ_s e_s,
        A = Π_j (1 − α_j),   B = η_1 G_1,   E_n = Π_j η_j.                         (17)

    Computed from masked sums of log-gates (:func:`titans_mini.scan.segsum`): every exponent is
    ≤ 0, nothing is divided, so no under/overflow even when some η_j or 1 − α_j is tiny.

    Returns c, d (shaped like theta), A, B, E (shaped like log_eta without the last dim).
    """
    # seg_eta[r, s] = Σ_{j=s+1}^{r} log η_j  (r ≥ s; −inf above the diagonal)
    seg_eta = segsum(log_eta)  # (..., n, n)
    # suffix sums: Σ_{j>r} log(1 − α_j) and Σ_{j>s} log η_j
    total_keep = log_keep.sum(-1, keepdim=True)
    total_eta = log_eta.sum(-1, keepdim=True)
    suffix_keep = total_keep - torch.cumsum(log_keep, -1)  # (..., n), at r: Σ_{j>r}
    # G_s = Σ_r exp(suffix_keep[r] + seg_eta[r, s])   (a masked n×n sum of exp(≤ 0))
    G = torch.exp(suffix_keep.unsqueeze(-1) + seg_eta).sum(-2)  # (..., n)
    # e_s = Π_{j>s} η_j = exp(seg_eta[n, s]) — the last row of the segment sums
    e = torch.exp(seg_eta[..., -1, :])  # (..., n)
    A = torch.exp(total_keep.squeeze(-1))
    E = torch.exp(total_eta.squeeze(-1))
    B = torch.exp(log_eta[..., 0]) * G[..., 0]
    if theta.ndim == log_eta.ndim + 1:  # per-layer θ: (..., n, L)
        G, e = G.unsqueeze(-1), e.unsqueeze(-1)
    return theta * G, theta * e, A, B, E


def chunk_coefficients_recurrence(theta: Tensor, eta: Tensor, alpha: Tensor):
    """Recurrence (17), one token at a time from the end of the chunk (reference for tests).

    G_n = 1,  G_s = a_s + η_{s+1} G_{s+1},  a_s = Π_{j>s}(1 − α_j),  e_s = Π_{j>s} η_j.
    Same outputs as :func:`chunk_coefficients` (theta without a layer dim).
    """
    n = theta.shape[-1]
    keep = 1.0 - alpha
    a = [None] * n
    e = [None] * n
    G = [None] * n
    a[n - 1] = torch.ones_like(theta[..., 0])
    e[n - 1] = torch.ones_like(theta[..., 0])
    G[n - 1] = torch.ones_like(theta[..., 0])
    for s in range(n - 2, -1, -1):
        a[s] = a[s + 1] * keep[..., s + 1]
        e[s] = e[s + 1] * eta[..., s + 1]
        G[s] = a[s] + eta[..., s + 1] * G[s + 1]
    a, e, G = torch.stack(a, -1), torch.stack(e, -1), torch.stack(G, -1)
    A = keep[..., 0] * a[..., 0]
    B = eta[..., 0] * G[..., 0]
    E = eta[..., 0] * e[..., 0]
    return theta * G, theta * e, A, B, E


# ----------------------------------------------------------------------------------------------
# Linear memory closed forms (reference §3.3, §3.5) — for lessons and tests
# ----------------------------------------------------------------------------------------------


def linear_memory_chunk(W: Tensor, S: Tensor, K: Tensor, V: Tensor, Q: Tensor,
                        theta: Tensor, eta: Tensor, alpha: Tensor):
    """One chunk of a *linear* memory M(k) = W k in closed form (eqs. 9, 10, 13 generalised).

    W, S: (..., d, d) chunk-start weights and momentum; K, V, Q: (..., n, d) keys, values, queries
    as rows; theta, eta, alpha: (..., n). Gradients are taken at W (D5): g_s = r_s k_sᵀ with the
    residual r_s = W k_s − v_s.

    Returns (W_end, S_end, Y_own): the end-of-chunk weights and momentum, and the reads of the
    queries *after each token's own write*, y_t = W_t q_t (the dual form of eq. 13; with η ≡ 0 it
    reduces to eq. 10):

        Y = (W Q) diag(β) + (S Q) diag(B_t) − R (T ⊙ KᵀQ),   T[s,t] = θ_s Γ[t,s]·1[s ≤ t]
        Γ[t,s] = Σ_{r=s}^{t} (β_t/β_r)(E_r/E_s),   B_t = Σ_{r ≤ t} (β_t/β_r) E_r.

    Products are formed as exp of log-space segment sums (no divisions).
    """
    n = K.shape[-2]
    log_keep = torch.log1p(-alpha)
    log_eta = torch.log(eta)
    # 1-indexed helper: prepend position 0 (the chunk start) with log-gate 0
    zero = torch.zeros_like(log_keep[..., :1])
    seg_keep = segsum(torch.cat([zero, log_keep], -1))  # [t, r] = log Π_{j=r+1}^{t}(1−α_j)
    seg_eta = segsum(torch.cat([zero, log_eta], -1))  # [r, s] = log Π_{j=s+1}^{r} η_j
    # Γ[t, s] = Σ_{r=s}^{t} exp(seg_keep[t, r] + seg_eta[r, s])   (t, s, r in 1..n)
    sk = seg_keep[..., 1:, 1:]  # (..., t, r)
    se = seg_eta[..., 1:, 1:]  # (..., r, s)
    Gamma = torch.exp(sk.unsqueeze(-1) + se.unsqueeze(-3)).sum(-2)  # (..., t, s)
    beta = torch.exp(seg_keep[..., 1:, 0])  # β_t
    Bt = torch.exp(sk + seg_eta[..., 1:, 0].unsqueeze(-2)).sum(-1)  # Σ_r β_t/β_r E_r
    R = torch.matmul(K, W.transpose(-1, -2)) - V  # residual rows r_s, (..., n, d)
    # reads after own write, as rows: y_t = β_t W q_t + B_t S q_t − Σ_{s≤t} θ_s Γ[t,s] (k_s·q_t) r_s
    T = (theta.unsqueeze(-1) * Gamma.transpose(-1, -2))  # (..., s, t), zero for s > t
    scores = torch.matmul(K, Q.transpose(-1, -2)) * T  # (..., s, t)
    Y = (beta.unsqueeze(-1) * torch.matmul(Q, W.transpose(-1, -2))
         + Bt.unsqueeze(-1) * torch.matmul(Q, S.transpose(-1, -2))
         - torch.matmul(scores.transpose(-1, -2), R))
    # end of chunk (eqs. 9 / 14–15): the last row of Γ and the suffix products of η
    c = theta * Gamma[..., n - 1, :]
    d = theta * torch.exp(se[..., n - 1, :])
    W_end = (beta[..., n - 1, None, None] * W + Bt[..., n - 1, None, None] * S
             - torch.matmul((R * c.unsqueeze(-1)).transpose(-1, -2), K))
    E_n = torch.exp(seg_eta[..., n, 0])
    S_end = E_n[..., None, None] * S - torch.matmul((R * d.unsqueeze(-1)).transpose(-1, -2), K)
    return W_end, S_end, Y

