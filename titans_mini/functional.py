"""Pure functions of the Titans neural memory (no parameters, no state).

Everything here is plain PyTorch on explicit tensors, so a lesson can call each piece on its own
and the tests can compare each piece with an independent computation. "paper eq. N" is the v1
numbering of arXiv 2501.00663; "paper-map §…" is a section of ``docs/paper-map.md`` (§Cn: formulas
we derived, §Dn: our decisions where the paper is ambiguous). Built in lessons 02 (the loss),
05 (deep memory and its hand-written backward), 06a/06b (chunks) and 07 (conv, gates).

Contents

* :func:`associative_loss`     ℓ(Φ) = ½‖M(k; Φ) − v‖²  (paper eq. 12; paper-map §D1: ½ and a *sum*)
* :func:`attentional_bias_loss`, :func:`attentional_bias_grad`   the inner loss as a switch, after
                               Miras (arXiv 2504.13173): ℓ2 (Titans, the default), Huber, ℓp
* :func:`memory_forward`       M(x; Φ) for the three memory kinds of paper-map §D4, keeping what the
                               backward needs
* :func:`memory_backward`      δ^{(l)} = ∂ℓ/∂z^{(l)}, the per-token back-propagated errors, by hand
* :func:`token_grad_norm`, :func:`clip_factor`   per-token gradient norms and clipping
* :func:`causal_conv`          the causal depthwise convolution after the projections (§D9)
* :func:`gate_values`, :func:`pool_over_chunks`   θ, η, α from their logits (paper-map §D2)
* :func:`chunk_coefficients`   A, B, E, c_s, d_s of the weighted-gradient route (paper-map §C2),
                               in the stable log-space form
* :func:`chunk_coefficients_recurrence`   the same from the recurrence, a loop (lessons/tests)
* :func:`chunk_update`         one chunk of the memory: read, then write (paper eq. 16;
                               paper-map §C1–§C3) — the plain form of what ``NeuralMemory`` runs
* :func:`linear_memory_chunk`  a linear memory over one chunk in closed form (paper-map §C4)

Memory kinds (paper-map §D4), weights Φ = (W_1, …, W_L), W_l of shape (..., out_l, in_l), no biases:

* ``"linear"``       L = 1:  M(x) = W x
* ``"mlp"``          L ≥ 2:  M(x) = W_L GELU(… GELU(W_1 x))
* ``"residual_ln"``  L ≥ 2:  M(x) = x + LN(W_L GELU(… GELU(W_1 x)))   (LN without affine params)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .scan import segsum

__all__ = [
    "MEMORY_KINDS",
    "ChunkCoefficients",
    "ATTENTIONAL_BIASES",
    "associative_loss",
    "attentional_bias_grad",
    "attentional_bias_loss",
    "check_attentional_bias",
    "causal_conv",
    "chunk_coefficients",
    "chunk_coefficients_recurrence",
    "chunk_update",
    "clip_factor",
    "gate_values",
    "gelu_derivative",
    "init_memory_weights",
    "l2_normalize",
    "layer_norm_backward",
    "linear_memory_chunk",
    "memory_backward",
    "memory_forward",
    "memory_kind",
    "memory_layer_shapes",
    "pool_over_chunks",
    "token_grad_norm",
]

MEMORY_KINDS = ("linear", "mlp", "residual_ln")
LN_EPS = 1e-5


def memory_kind(depth: int, residual_norm: bool = True) -> str:
    """The memory kind (paper-map §D4) for a given depth: linear (1), residual-LN MLP or plain MLP (≥ 2)."""
    if depth == 1:
        return "linear"
    return "residual_ln" if residual_norm else "mlp"


def memory_layer_shapes(depth: int, d_head: int, hidden: int) -> list[tuple[int, int]]:
    """(out, in) of each memory layer: (d, d) for the linear memory, else d → hidden → … → d."""
    if depth == 1:
        return [(d_head, d_head)]
    return [(hidden, d_head)] + [(hidden, hidden)] * (depth - 2) + [(d_head, hidden)]


def init_memory_weights(kind: str, heads: int, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """A random initial memory M₀, one (heads, out, in) tensor per layer (the layer learns it).

    Linear memory: zeros (it starts empty, the delta rule's usual start). A deeper memory must
    not start at zero: an all-zero MLP is a fixed point where every token's gradient vanishes
    (each layer has either a zero input or a zero back-propagated error). Scales:

    * first layer std 1: its inputs are unit vectors, so pre-activations are ~N(0, 1) and GELU
      works in its non-linear range;
    * hidden layers std 1.5/√in (GELU outputs have second moment ≈ 0.43);
    * last layer: residual-LN std 1. LN makes the output independent of this scale, but its
      gradient is scaled by 1/σ(W_L a): with std 1 one token's loss has curvature ≈ 1 in W_L,
      like the linear memory with unit keys. Plain MLP: std 1/√in.
    """
    if kind == "linear":
        return [torch.zeros(heads, *shapes[0])]
    weights = []
    for i, (out, inp) in enumerate(shapes):
        if i == 0:
            std = 1.0
        elif i < len(shapes) - 1:
            std = 1.5 / math.sqrt(inp)
        else:
            std = 1.0 if kind == "residual_ln" else 1.0 / math.sqrt(inp)
        weights.append(torch.randn(heads, out, inp) * std)
    return weights


def gate_values(logits: Tensor, theta_max: float, n_theta: int = 1, momentum: bool = True,
                forget: bool = True):
    """The data-dependent gates from their logits (..., G), G = n_theta [+ 1] [+ 1].

    θ = θ_max·σ(z_θ) (..., n_theta);  η = σ(z_η), log η = logsigmoid(z_η);
    α = σ(z_α), log(1 − α) = logsigmoid(−z_α)   (logs straight from the logits: no log(0)).
    Switched-off momentum gives η = 0 (log η = −inf); switched-off forgetting gives α = 0.
    Returns θ, log η, log(1 − α), η, α.
    """
    theta = theta_max * torch.sigmoid(logits[..., :n_theta])
    i = n_theta
    if momentum:
        log_eta, eta = F.logsigmoid(logits[..., i]), torch.sigmoid(logits[..., i])
        i += 1
    else:
        eta = torch.zeros_like(logits[..., 0])
        log_eta = torch.full_like(eta, float("-inf"))
    if forget:
        log_keep, alpha = F.logsigmoid(-logits[..., i]), torch.sigmoid(logits[..., i])
    else:
        alpha = torch.zeros_like(logits[..., 0])
        log_keep = torch.zeros_like(alpha)
    return theta, log_eta, log_keep, eta, alpha


def pool_over_chunks(logits: Tensor, chunk_size: int) -> Tensor:
    """Mean-pool (..., N, G) over each chunk of ``chunk_size`` positions (per-chunk gates; the
    logits are linear in x, so this equals the gates of the chunk's mean x). A trailing partial
    chunk is pooled over the positions it has so far, which keeps it causal."""
    *lead, N, G = logits.shape
    full = (N // chunk_size) * chunk_size
    parts = []
    if full:
        chunks = logits[..., :full, :].reshape(*lead, N // chunk_size, chunk_size, G)
        parts.append(chunks.mean(-2, keepdim=True).expand_as(chunks).reshape(*lead, full, G))
    if N > full:
        rest = logits[..., full:, :]
        parts.append(rest.mean(-2, keepdim=True).expand_as(rest))
    return torch.cat(parts, -2) if parts else logits  # N = 0: nothing to pool


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / ‖x‖ over the last dimension (paper-map §D9: queries and keys are ℓ2-normalised)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def associative_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """ℓ = ½‖M(k) − v‖², summed over the feature (last) dimension (§D1). Shape: prediction[..., 0]."""
    return 0.5 * (prediction - target).pow(2).sum(-1)


# Miras (arXiv 2504.13173) calls the memory's inner loss its *attentional bias*; Titans' is ℓ2.
ATTENTIONAL_BIASES = ("l2", "huber", "lp")
_DEFAULT_BIAS_PARAM = {"l2": None, "huber": 1.0, "lp": 3.0}


def check_attentional_bias(bias: str, param: float | None) -> float | None:
    """Validate an attentional bias and return its parameter (δ for Huber, p for ℓp; filled in
    with the default when None)."""
    if bias not in ATTENTIONAL_BIASES:
        raise ValueError(f"attentional_bias must be one of {ATTENTIONAL_BIASES}, got {bias!r}")
    if bias == "l2":
        if param is not None:
            raise ValueError("the l2 attentional bias has no parameter; leave bias_param=None")
        return None
    param = _DEFAULT_BIAS_PARAM[bias] if param is None else float(param)
    low, what = (0.0, "> 0 (Huber's δ)") if bias == "huber" else (1.0, ">= 1 (the p of ℓp)")
    if not (param > low if bias == "huber" else param >= low) or not math.isfinite(param):
        raise ValueError(f"bias_param must be {what}, got {param}")
    return param


def attentional_bias_loss(prediction: Tensor, target: Tensor, bias: str = "l2",
                          param: float | None = None) -> Tensor:
    """The memory's inner loss per token, summed over features, e = prediction − target:

    * ``"l2"``     ½‖e‖²                                    Titans (paper eq. 12), the default
    * ``"huber"``  Σ_i h_δ(e_i), h_δ(x) = ½x² for |x| ≤ δ, δ(|x| − ½δ) beyond   (Yaad in Miras:
                   robust to outlier values; δ = ``param``)
    * ``"lp"``     (1/p) Σ_i |e_i|^p                        (Moneta in Miras; p = 2 is ℓ2)

    Shape: prediction[..., 0]."""
    e = prediction - target
    if bias == "l2":
        return 0.5 * e.pow(2).sum(-1)
    if bias == "huber":
        return F.huber_loss(e, torch.zeros_like(e), reduction="none", delta=param).sum(-1)
    return e.abs().pow(param).sum(-1) / param


def attentional_bias_grad(err: Tensor, bias: str = "l2", param: float | None = None) -> Tensor:
    """∂ℓ/∂prediction of :func:`attentional_bias_loss`, from the error err = prediction − target:
    err (ℓ2), clamp(err, −δ, δ) (Huber), |err|^(p−1)·sign(err) (ℓp). The chunked route needs
    nothing else: every other step is linear in this per-token output gradient."""
    if bias == "l2":
        return err
    if bias == "huber":
        return err.clamp(-param, param)
    return err.abs().pow(param - 1) * err.sign()


def gelu_derivative(z: Tensor) -> Tensor:
    """d/dz GELU(z) for the exact (erf) GELU:  Φ(z) + z·φ(z)."""
    cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + z * pdf


def layer_norm_backward(grad_out: Tensor, normalized: Tensor, rstd: Tensor) -> Tensor:
    """Backward of the non-affine LayerNorm u = (z − mean z)·rstd over the last dim.

    ∂ℓ/∂z = rstd · (g − mean(g) − u · mean(g ⊙ u)),  with g = ∂ℓ/∂u.
    Note the factor rstd = 1/σ(z): a memory whose MLP output has a tiny spread amplifies its
    gradients — hence a sensible scale for M₀ (paper-map §D3).
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
    the *summed* loss Σ_s ℓ_s at row s is token s's own δ_s (paper-map §C3), and the gradient of
    ℓ_s w.r.t. W_l is the outer product δ_s^{(l)} x_s^{(l)ᵀ} — which we never form.

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


def token_grad_norm(deltas: list[Tensor], inputs: list[Tensor]) -> Tensor:
    """‖∇_Φ ℓ_s‖ of every token s (..., n) from the per-layer δ_s^{(l)} and layer inputs x_s^{(l)}.

    Token s's gradient in layer l is the outer product δ_s x_sᵀ (rank one), so
    ‖g_s‖² = Σ_l ‖δ_s^{(l)}‖² · ‖x_s^{(l)}‖² — no per-token gradient is formed.
    """
    return sum(dl.pow(2).sum(-1) * xl.pow(2).sum(-1) for dl, xl in zip(deltas, inputs)).sqrt()


def clip_factor(grad_norm: Tensor, max_norm: float | None) -> Tensor | None:
    """Per-token clipping factor min(1, max_norm / ‖g‖) (None when clipping is off)."""
    if max_norm is None:
        return None
    return (max_norm / (grad_norm + 1e-6)).clamp(max=1.0)


def causal_conv(x: Tensor, weight: Tensor | None, context: Tensor | None = None):
    """Causal depthwise convolution over time (paper §4.4: after the q/k/v projections).

    x (B, T, C); weight (C, kernel) — the last tap multiplies the current token, the others the
    kernel − 1 tokens before it; ``context`` (B, kernel − 1, C): the inputs just before x (None =
    start of a document: zeros). Returns (out (B, T, C), new context for the next call).
    ``weight=None`` is no convolution (the identity, no context).
    """
    if weight is None:
        return x, None
    k = weight.shape[-1]
    B, T, C = x.shape
    if T == 0:  # nothing new: the context is unchanged
        return x, context
    if context is None:
        context = x.new_zeros(B, k - 1, C)
    elif context.shape != (B, k - 1, C):
        raise ValueError(f"conv context must have shape {(B, k - 1, C)}, "
                         f"got {tuple(context.shape)}")
    full = torch.cat([context.to(x.dtype), x], 1)  # (B, k−1+T, C)
    out = F.conv1d(full.transpose(1, 2), weight.unsqueeze(1), groups=C).transpose(1, 2)
    return out, full[:, full.shape[1] - (k - 1):]


# ----------------------------------------------------------------------------------------------
# Within-chunk coefficients (paper-map §C2)
# ----------------------------------------------------------------------------------------------


class ChunkCoefficients(NamedTuple):
    """The five coefficients of one chunk's update (weighted-gradient route), as returned by
    :func:`chunk_coefficients`; a tuple, so ``c, d, A, B, E = coeffs`` works too.

        Φ_end = A·Φ_start + B·S_start − Σ_s c_s g_s,      S_end = E·S_start − Σ_s d_s g_s

    c, d   (..., n) or (..., n, L)  weight of token s's gradient in Φ_end and in S_end
    A      (...)  Π_s (1 − α_s): how much of Φ_start survives the chunk's forgetting
    B      (...)  how much of the carried momentum S_start flows into Φ_end
    E      (...)  Π_s η_s: how much of S_start survives in S_end
    """

    c: Tensor
    d: Tensor
    A: Tensor
    B: Tensor
    E: Tensor


def chunk_coefficients(theta: Tensor, log_eta: Tensor, log_keep: Tensor) -> ChunkCoefficients:
    """Coefficients of the weighted-gradient route for chunks of n tokens (paper-map §C2).

    Inputs, all over the chunk's tokens s = 1..n in the last dim (theta may have an extra
    trailing layer dim L for per-layer step sizes):

        theta     θ_s                 (..., n) or (..., n, L)
        log_eta   log η_s  ≤ 0        (..., n)   (−inf allowed: η = 0, no momentum)
        log_keep  log(1 − α_s) ≤ 0    (..., n)

    With every g_s taken at the chunk-start state, the end of the chunk is

        Φ_end = A·Φ_start + B·S_start − Σ_s c_s g_s,      S_end = E_n·S_start − Σ_s d_s g_s

    and, with suffix products a_s = Π_{j>s}(1 − α_j) and e_s = Π_{j>s} η_j,

        G_s = Σ_{r ≥ s} a_r · Π_{j=s+1}^{r} η_j,   c_s = θ_s G_s,   d_s = θ_s e_s,
        A = Π_j (1 − α_j),   B = η_1 G_1,   E_n = Π_j η_j.

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
    return ChunkCoefficients(theta * G, theta * e, A, B, E)


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
    return ChunkCoefficients(theta * G, theta * e, A, B, E)


# ----------------------------------------------------------------------------------------------
# Linear memory closed forms (paper-map §C4; paper eq. 17) — for lessons and tests
# ----------------------------------------------------------------------------------------------


def linear_memory_chunk(W: Tensor, S: Tensor, K: Tensor, V: Tensor, Q: Tensor,
                        theta: Tensor, eta: Tensor, alpha: Tensor):
    """One chunk of a *linear* memory M(k) = W k in closed form (paper-map §C4;
    paper eq. 17 generalised).

    W, S: (..., d, d) chunk-start weights and momentum; K, V, Q: (..., n, d) keys, values, queries
    as rows; theta, eta, alpha: (..., n). Gradients are taken at W (paper-map §D5): g_s = r_s k_sᵀ with the
    residual r_s = W k_s − v_s.

    Returns (W_end, S_end, Y_own): the end-of-chunk weights and momentum, and the reads of the
    queries *after each token's own write*, y_t = W_t q_t (the dual form, paper-map §C4):

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
    # end of chunk (paper-map §C2): the last row of Γ and the suffix products of η
    c = theta * Gamma[..., n - 1, :]
    d = theta * torch.exp(se[..., n - 1, :])
    W_end = (beta[..., n - 1, None, None] * W + Bt[..., n - 1, None, None] * S
             - torch.matmul((R * c.unsqueeze(-1)).transpose(-1, -2), K))
    E_n = torch.exp(seg_eta[..., n, 0])
    S_end = E_n[..., None, None] * S - torch.matmul((R * d.unsqueeze(-1)).transpose(-1, -2), K)
    return W_end, S_end, Y



# ----------------------------------------------------------------------------------------------
# One chunk of the memory: read, then write (the chunked form of the update)
# ----------------------------------------------------------------------------------------------


def chunk_update(weights, momentum, keys: Tensor, values: Tensor, queries: Tensor | None,
                 coeffs: ChunkCoefficients, kind: str, max_grad_norm: float | None = None,
                 bias: str = "l2", bias_param: float | None = None):
    """One chunk of the Titans memory: every token reads, and takes its gradient at, the
    chunk-start state; the chunk's end state follows the exact per-token recurrences.

    weights, momentum: sequences of (..., out_l, in_l) tensors — Φ and S at the chunk start;
    keys, values: (..., n, d); queries: (..., m, d) or None; coeffs: :func:`chunk_coefficients`
    of the chunk's gates (c, d (..., n) or (..., n, L); A, B, E (...)).

    1. read:      y = M(queries; Φ_start)                            (no write)
    2. errors:    δ_s^{(l)} of ℓ_s = ½‖M(k_s; Φ_start) − v_s‖² for every token s and layer l,
                  by the hand-written backward (:func:`memory_backward`); another attentional
                  bias (``bias``, :func:`attentional_bias_loss`) only changes ∂ℓ_s/∂M(k_s)
    3. write:     Φ_end = A·Φ + B·S − (c ⊙ Δ)ᵀX,   S_end = E·S − (d ⊙ Δ)ᵀX     per layer,
                  where (c ⊙ Δ)ᵀX = Σ_s c_s δ_s x_sᵀ = Σ_s c_s g_s never forms a per-token gradient

    This is the plain, readable form of what ``NeuralMemory`` runs per chunk; the layer itself
    uses ``titans_mini.memory_fast``, the same maths with fewer passes over the weights, and
    the tests prove the two equal. Optional per-token clipping ‖g_s‖ ≤ max_grad_norm scales c_s
    and d_s.

    Returns (weights_end, momentum_end, reads (..., m, d) or None, surprise ℓ_s (..., n),
    grad_norm ‖g_s‖ (..., n)).
    """
    reads = None if queries is None else memory_forward(weights, queries, kind)
    out, cache = memory_forward(weights, keys, kind, keep=True)
    err = attentional_bias_grad(out - values, bias, bias_param)  # ∂ℓ_s/∂M(k_s)
    deltas = memory_backward(weights, cache, err)  # δ^{(l)}: (..., n, out_l)
    xs = cache["inputs"]  # x^{(l)}: (..., n, in_l)
    grad_norm = token_grad_norm(deltas, xs)
    c, d = coeffs.c, coeffs.d
    if c.ndim == keys.ndim - 1:  # one θ for all layers: add a layer axis of size 1
        c, d = c.unsqueeze(-1), d.unsqueeze(-1)
    f = clip_factor(grad_norm, max_grad_norm)
    if f is not None:
        c, d = c * f.unsqueeze(-1), d * f.unsqueeze(-1)
    A, B, E = (t[..., None, None] for t in (coeffs.A, coeffs.B, coeffs.E))
    new_weights, new_momentum = [], []
    for layer, (w, s, delta, x) in enumerate(zip(weights, momentum, deltas, xs)):
        i = min(layer, c.shape[-1] - 1)  # this layer's θ (shared unless per-layer θ)
        sum_c = torch.matmul((delta * c[..., i: i + 1]).transpose(-1, -2), x)  # Σ_s c_s g_s
        sum_d = torch.matmul((delta * d[..., i: i + 1]).transpose(-1, -2), x)  # Σ_s d_s g_s
        new_weights.append(A * w + B * s - sum_c)
        new_momentum.append(E * s - sum_d)
    surprise = attentional_bias_loss(out, values, bias, bias_param)
    return new_weights, new_momentum, reads, surprise, grad_norm
