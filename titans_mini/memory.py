"""The Titans neural long-term memory (LMM): a memory that learns key → value at test time.

Paper: Behrouz, Zhong, Mirrokni, *Titans: Learning to Memorize at Test Time* (arXiv 2501.00663),
§3.1–3.2. Equation numbers (1)–(19) refer to ``titans-reference.md`` (decisions D1–D5, D9–D11).

Per head, with fast weights Φ (the memory MLP's weights) and momentum S:

    k_t, v_t, q_t = SiLU(conv(W_K x_t)), SiLU(conv(W_V x_t)), SiLU(conv(W_Q x_t))   (1) + D9
    k_t, q_t ← k_t / ‖k_t‖, q_t / ‖q_t‖
    ℓ_t(Φ) = ½ ‖M(k_t; Φ) − v_t‖²                                                  (2), D1
    S_t = η_t S_{t−1} − θ_t ∇ℓ_t(Φ_{t'})        surprise with momentum              (4)
    Φ_t = (1 − α_t) Φ_{t−1} + S_t               forgetting (weight decay)           (5)
    y_t = M*(q_t; Φ_{t'})                        read, no write                      (3)

where t' is the end of the previous chunk of ``chunk_size`` tokens (D5; chunk boundaries at
absolute positions 0, b, 2b, …): every token of a chunk takes its gradient at — and reads — the
state at the start of its chunk. ``chunk_size=1`` is exact online gradient descent.

Two implementations of exactly the same maths live here:

* :class:`NeuralMemory` — the fast, chunked *weighted-gradient route* (reference §3.6): per chunk
  one memory forward on the keys and one on the queries (the reads), one hand-written backward
  of the chunk's summed loss giving every token's δ_s, then per layer
  Φ_end = AΦ + BS − (c ⊙ Δ)ᵀX  (eqs. 14–19). No per-token gradient is ever formed; the
  coefficients c, d, A, B, E of all chunks come from the gates in one vectorised step.
* :func:`sequential_reference` — the slow, obviously correct loop: per token, autograd of that
  token's loss, then literally S ← ηS − θg, Φ ← (1 − α)Φ + S. The oracle of the tests and the
  "slow but clear" code of lesson 06.

Output (D10): o_t = W_O(RMSNorm(y_t) ⊙ SiLU(W_g x_t)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from .functional import (
    associative_loss,
    chunk_coefficients,
    l2_normalize,
    memory_backward,
    memory_forward,
    memory_kind,
)

__all__ = ["MemoryState", "MemoryStats", "NeuralMemory", "clip_factor", "sequential_reference"]


# ----------------------------------------------------------------------------------------------
# State and statistics
# ----------------------------------------------------------------------------------------------


@dataclass
class MemoryState:
    """Everything the memory carries from one call to the next (reference §3.7).

    weights   tuple, one tensor per memory layer, (B, H, out_l, in_l): Φ at the last *completed*
              chunk boundary (depth 1: one (B, H, d_head, d_head) matrix).
    momentum  tuple shaped like ``weights``: S at that boundary (S₀ = 0).
    pending_keys, pending_values   (B, H, P, d_head): the P < chunk_size tokens of the unfinished
              chunk, already seen (and read) but not yet written; they are written when their
              chunk completes in a later call (or by :meth:`NeuralMemory.flush`).
    pending_gates  (B, H, P, G): their gate logits.
    conv_context   (B, kernel − 1, 3·dim) or None: the last pre-conv projections [q|k|v] of the
              stream, so the causal conv continues seamlessly (None = start of a document).
    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]
    pending_keys: Tensor
    pending_values: Tensor
    pending_gates: Tensor
    conv_context: Tensor | None = None

    @property
    def pending(self) -> int:
        """Number of buffered tokens of the unfinished chunk."""
        return self.pending_keys.shape[-2]

    def detach(self) -> MemoryState:
        """A copy cut from the autograd graph (truncated back-propagation through time)."""
        def cut(v):
            if isinstance(v, tuple):
                return tuple(t.detach() for t in v)
            return None if v is None else v.detach()
        return MemoryState(**{f.name: cut(getattr(self, f.name)) for f in fields(self)})


@dataclass
class MemoryStats:
    """Per-token diagnostics of one call (for lessons and plots).

    reads      (B, H, T, d_head)  raw retrievals M*(q_t) before output norm, gate and projection
    surprise   (B, H, T)  ℓ_t = ½‖M(k_t) − v_t‖² at the state where token t's gradient is taken
    grad_norm  (B, H, T)  ‖∇_Φ ℓ_t‖ over all memory layers, from ‖δ^{(l)}‖·‖x^{(l)}‖ (before
               any clipping)
    theta      (B, H, T), or (B, H, T, depth) with per-layer step sizes
    eta, alpha (B, H, T)  (0 where momentum / forgetting is disabled)
    """

    reads: Tensor
    surprise: Tensor
    grad_norm: Tensor
    theta: Tensor
    eta: Tensor
    alpha: Tensor


def clip_factor(grad_norm: Tensor, max_norm: float | None) -> Tensor | None:
    """Per-token clipping factor min(1, max_norm / ‖g‖) (None when clipping is off)."""
    if max_norm is None:
        return None
    return (max_norm / (grad_norm + 1e-6)).clamp(max=1.0)


class _StateUpdate(torch.autograd.Function):
    """Φ_end = AΦ + BS + Pᵀ X,  S_end = E·S + Qᵀ X   (eqs. 14–15, 19) with P = −c ⊙ Δ, Q = −d ⊙ Δ.

    Shapes: Φ, S (N, out, in); A, B, E (N, 1, 1); P, Q (N, n, out); X (N, n, in).
    Plain autograd gives the same gradients; this hand-written backward only saves passes over
    the large (out × in) weight tensors (each pass is memory-bound on a CPU):

        ∂Φ = A·gΦ,  ∂S = B·gΦ + E·gS,  ∂A = ⟨gΦ, Φ⟩,  ∂B = ⟨gΦ, S⟩,  ∂E = ⟨gS, S⟩,
        ∂P = X gΦᵀ,  ∂Q = X gSᵀ,  ∂X = P gΦ + Q gS.
    """

    @staticmethod
    def forward(ctx, W, S, A, B, E, P, Q, X):
        ctx.save_for_backward(W, S, A, B, E, P, Q, X)
        W_new = torch.matmul(P.transpose(-1, -2), X).to(W.dtype)
        S_new = torch.matmul(Q.transpose(-1, -2), X).to(S.dtype)
        if torch.compiler.is_compiling():
            # out of place: torch 2.11's Dynamo routes the gradients of an autograd.Function
            # whose forward mutates its result to the wrong outputs (pytorch/pytorch#180642;
            # test_compiled_chunks_match_eager). The compiler fuses these ops anyway.
            return (torch.addcmul(torch.addcmul(W_new, A, W), B, S),
                    torch.addcmul(S_new, E, S))
        # eager: the products first (freshly allocated), then the decay terms added in place:
        # fewer passes over the big tensors than A*W + B*S − PᵀX written out
        W_new.addcmul_(A, W).addcmul_(B, S)
        S_new.addcmul_(E, S)
        return W_new, S_new

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gW, gS):
        W, S, A, B, E, P, Q, X = ctx.saved_tensors
        # incoming gradients are often transposed views (from the memory's W·x matmuls); one
        # contiguous copy makes every product below and the next chunk's backward faster
        gW = torch.zeros_like(W) if gW is None else gW.contiguous()
        gS = torch.zeros_like(S) if gS is None else gS.contiguous()
        grad_W = gW * A
        grad_S = (gS * E).addcmul_(gW, B)
        grad_P = torch.matmul(X, gW.transpose(-1, -2).to(X.dtype)).to(P.dtype)
        grad_Q = torch.matmul(X, gS.transpose(-1, -2).to(X.dtype)).to(Q.dtype)
        grad_X = torch.matmul(P, gW.to(P.dtype))
        grad_X = grad_X.add_(torch.matmul(Q, gS.to(Q.dtype))).to(X.dtype)
        return (grad_W, grad_S, _batch_dot(gW, W), _batch_dot(gW, S), _batch_dot(gS, S),
                grad_P, grad_Q, grad_X)


def _batch_dot(u: Tensor, v: Tensor) -> Tensor:
    """⟨u_i, v_i⟩ for each leading index i of (N, a, b) tensors -> (N, 1, 1), without forming u ⊙ v
    when both are contiguous (a batched 1×K by K×1 matmul)."""
    N = u.shape[0]
    if u.is_contiguous() and v.is_contiguous() and u.dtype == v.dtype and v.shape[0] == N:
        return torch.bmm(u.view(N, 1, -1), v.view(N, -1, 1))
    return (u * v).sum((-1, -2), keepdim=True)


# torch.compile of the chunk update (with its custom autograd backward) is verified against the
# eager path on torch 2.11 (Colab's version) and 2.13; older versions are not tested.
MIN_TORCH_FOR_COMPILE = (2, 11)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _compute_dtype(t: Tensor) -> torch.dtype:
    """fp32 for low-precision tensors (gates, norms); otherwise the tensor's own dtype."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _chunk_update(W, S, keys, values, queries, coeffs, kind: str, max_grad_norm: float | None,
                  need_stats: bool, inplace: bool):
    """One chunk, batched over (batch·heads) = N rows: read at the chunk-start state and write.

    W, S: lists of (N, out, in); keys, values: (N, n, d); queries: (N, m, d) or None;
    coeffs: (−c, −d, A, B, E) with −c, −d (N, n, n_theta) and A, B, E (N, 1, 1) — already
    negated and shaped by the caller for all chunks at once, since none of them depends on the
    state (fewer small kernels per chunk, in the forward and in autograd's backward).
    Returns (W_end, S_end, reads (N, m, d) or None, surprise (N, n) or None,
    grad_norm (N, n) or None).

    1. forward M at Φ_start on the keys (kept for the backward) and on the queries (the
       reads, D5)
    2. δ^{(l)} of L = Σ_s ½‖M(k_s) − v_s‖² w.r.t. every pre-activation: one hand-written
       backward (the row-s δ is token s's own δ_s)
    3. per layer: Φ_end = AΦ + BS − (c ⊙ Δ)ᵀX,  S_end = E S − (d ⊙ Δ)ᵀX   (eqs. 14, 15, 19)

    A plain function of explicit tensors and constants (no module state), so ``torch.compile``
    can trace it once and every layer with the same shapes reuses the compiled code. The
    compiled path keeps the hand-written :class:`_StateUpdate` backward: on a CPU it measured
    1.5× faster than eager this way, but 2.6× *slower* with step 3 as plain ops whose backward
    the compiler derives (dim 384, 6 heads, chunk 16).
    """
    n = keys.shape[1]
    if queries is not None:
        # one forward on [keys; queries]: each weight is used by fewer ops, so the outer
        # backward accumulates fewer (out × in) gradients (slices of activations are cheap)
        out, cache = memory_forward(W, torch.cat([keys, queries], 1), kind, keep=True)
        # split, not two slices: autograd joins the two gradients with one cat instead of two
        # zero-filled slice gradients and an add; the first layer's input rows are the keys
        out, reads = out.split([n, queries.shape[1]], 1)
        cache = {"inputs": [keys] + [t[:, :n] for t in cache["inputs"][1:]],
                 "pre": [t[:, :n] for t in cache["pre"]],
                 **({"ln": tuple(t[:, :n] for t in cache["ln"])} if "ln" in cache else {})}
    else:
        out, cache = memory_forward(W, keys, kind, keep=True)
        reads = None
    err = out - values  # ∂ℓ_s/∂M(k_s), (N, n, d)
    deltas = memory_backward(W, cache, err)  # δ^{(l)}: (N, n, out_l)
    xs = cache["inputs"]  # X^{(l)}: (N, n, in_l)
    neg_c, neg_d, A, B, E = coeffs
    surprise = grad_norm = None
    if need_stats or max_grad_norm is not None:
        # ‖g_s‖² = Σ_l ‖δ_s^{(l)}‖²·‖x_s^{(l)}‖²  (g_s^{(l)} = δ_s x_sᵀ is rank one)
        sq = sum(dl.pow(2).sum(-1) * xl.pow(2).sum(-1) for dl, xl in zip(deltas, xs))
        grad_norm = sq.sqrt()
        surprise = 0.5 * err.pow(2).sum(-1)
        f = clip_factor(grad_norm, max_grad_norm)
        if f is not None:
            neg_c, neg_d = neg_c * f.unsqueeze(-1), neg_d * f.unsqueeze(-1)
    per_layer = neg_c.shape[-1] > 1
    W_new, S_new = [], []
    for layer, (w, s, dl, xl) in enumerate(zip(W, S, deltas, xs)):
        # Σ_s c_s δ_s x_sᵀ = (c ⊙ Δ)ᵀ X: one batched matmul, fused with the decay terms
        # the minus signs of −(c ⊙ Δ)ᵀX, −(d ⊙ Δ)ᵀX sit on the small n×out factors; one shared
        # θ broadcasts its (N, n, 1) coefficient as is (no per-layer select in the graph)
        cl = neg_c[..., layer: layer + 1] if per_layer else neg_c
        dl_ = neg_d[..., layer: layer + 1] if per_layer else neg_d
        P, Q = dl * cl, dl * dl_
        if inplace:  # inference on buffers this call owns: no new (out × in) tensors
            w.mul_(A).addcmul_(B, s).baddbmm_(P.transpose(-1, -2).to(w.dtype), xl.to(w.dtype))
            s.mul_(E).baddbmm_(Q.transpose(-1, -2).to(s.dtype), xl.to(s.dtype))
            w_end, s_end = w, s
        else:
            w_end, s_end = _StateUpdate.apply(w, s, A, B, E, P, Q, xl)
        W_new.append(w_end)
        S_new.append(s_end)
    return W_new, S_new, reads, surprise, grad_norm


_COMPILED_CHUNK_UPDATE = None


def _compiled_chunk_update():
    """:func:`_chunk_update` wrapped in ``torch.compile`` (built on first use, shared by all layers).

    Why: on a GPU the chunk loop is bound by kernel launches and Python overhead (dozens of
    small kernels per chunk, replayed by autograd backward), not by FLOPs. The compiler fuses
    the element-wise work of a chunk into a few kernels, forward and backward. ``dynamic=False``:
    every full chunk has the same shapes, so one specialised graph per configuration serves
    the whole loop (a new batch size or layer shape compiles once more)."""
    global _COMPILED_CHUNK_UPDATE
    if _COMPILED_CHUNK_UPDATE is None:
        _COMPILED_CHUNK_UPDATE = torch.compile(_chunk_update, dynamic=False)
    return _COMPILED_CHUNK_UPDATE


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------


class NeuralMemory(nn.Module):
    """Titans neural long-term memory layer, chunked and paper-faithful (see the module docstring).

    Usage::

        mem = NeuralMemory(dim, heads=1, depth=2, expansion=4, chunk_size=16)
        y, state = mem(x)                        # x (B, T, dim) -> y (B, T, dim)
        y2, state = mem(x2, state)               # continue the same documents (any split)
        y, state, stats = mem(x, return_stats=True)   # reads, surprise, grad_norm, θ, η, α
        q, k, v = mem.project(x)                 # (B, H, T, d_head) each
        theta, eta, alpha = mem.gates(x)         # (B, H, T) each
        out = mem.memory_fn(state.weights, k)    # M(k; Φ), pure function
        h, ctx = mem.retrieve(x, state)          # read-only retrieval (MAC)
        state = mem.flush(state)                 # end of document: write the partial chunk

    Args:
        dim: model width; x is (B, T, dim).
        heads: H memory heads; d_head = dim / heads. Each head has its own memory, M₀ and gates (D11).
        depth: memory layers L. 1 = linear memory M(k) = W k; ≥ 2 = MLP (D4).
        expansion: hidden width of the MLP memory = expansion · d_head.
        chunk_size: b, the inner mini-batch (D5). Semantic, not just speed: 1 = exact online GD.
        momentum: False makes η ≡ 0 (S_t = −θ_t g_t).
        forget: False makes α ≡ 0 (no weight decay).
        residual_norm: depth ≥ 2 only: M(x) = x + LN(MLP(x)) (default, non-affine LN) or the plain
            MLP M(x) = MLP(x). Note that a non-affine LN fixes ‖M(k) − k‖ = √d_head, so values
            are only matched once v − k has that scale; the outer loop learns W_V accordingly.
        conv: causal depthwise conv (kernel ``conv_kernel``) after the q/k/v projections (D9).
        theta_max: θ_t = θ_max · σ(·) ∈ (0, θ_max). Default 0.1 (linear and residual-LN memory):
            keys are unit vectors and M₀ is scaled so that one token's loss has curvature ≈ 1,
            so θ ≈ 1 would nearly overwrite a key in one step; but a chunk sums up to b gradients
            taken at the same point and momentum multiplies the step by up to 1/(1 − η), hence a
            cap well below 1 (θ_max = 1 diverges on random data at b = 16). Plain MLP: the last
            layer's curvature is ≈ 0.4·hidden, so the default is 0.25/hidden.
        theta_init, eta_init, alpha_init: the gates' values at initialisation, set through the
            biases of their linear maps (weights start small). η ≈ 0.9: surprise persists over
            ~10 tokens (the paper's momentum). α ≈ 0.05: mild forgetting, memory half-life ≈ 14
            tokens at first — the model learns to lower it. θ = θ_max/4 by default: well below the
            cap, so the memory starts as a gentle learner, which keeps early training stable.
        per_layer_theta: one θ per memory layer (NeurIPS: deep memories need per-layer rates).
        chunk_gates: gates mean-pooled over each chunk (faster-to-learn, less expressive option;
            causal, since gates only affect the write at the chunk's end).
        max_grad_norm: optional per-token clipping of the inner gradient, ‖g_t‖ ≤ max_grad_norm,
            folded into the coefficients c_s, d_s (no per-token gradients needed).
        compile_chunks: run each full chunk's update through ``torch.compile`` (opt-in; for
            GPUs, where the chunk loop is bound by kernel launches). Same maths; results agree
            with the eager path up to float rounding (the compiler fuses and reorders
            element-wise work). The first call compiles (seconds to a minute); a partial chunk
            (:meth:`flush`) runs eagerly. Needs torch >= 2.11 (the versions checked by
            ``test_compiled_chunks_match_eager``); older versions get a ``ValueError``.
        checkpoint_chunks: 0 (default) keeps every chunk's activations and state for the
            backward. k ≥ 1: activation checkpointing over groups of k chunks
            (``torch.utils.checkpoint``): the backward keeps the state only at every k-th chunk
            boundary and recomputes the chunks in between — the (batch·heads × out × in) states
            of every chunk are what dominates the training memory. Same values and gradients
            (the recomputation repeats the same ops), about one extra forward of compute;
            k ≈ √(number of chunks) keeps the least.
    """

    def __init__(self, dim: int, heads: int = 1, depth: int = 2, expansion: int = 4,
                 chunk_size: int = 16, momentum: bool = True, forget: bool = True, *,
                 residual_norm: bool = True, conv: bool = True, conv_kernel: int = 4,
                 theta_max: float | None = None, theta_init: float | None = None,
                 eta_init: float = 0.9, alpha_init: float = 0.05,
                 per_layer_theta: bool = False, chunk_gates: bool = False,
                 max_grad_norm: float | None = None, compile_chunks: bool = False,
                 checkpoint_chunks: int = 0):
        super().__init__()
        for name, value, low in (("dim", dim, 1), ("heads", heads, 1), ("depth", depth, 1),
                                 ("expansion", expansion, 1), ("chunk_size", chunk_size, 1),
                                 ("conv_kernel", conv_kernel, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        kind = memory_kind(depth, residual_norm)
        if theta_max is None:
            # plain MLP: the last layer's curvature is ‖GELU(W_1 k)‖² ≈ 0.4·hidden, not ≈ 1
            theta_max = 0.1 if kind != "mlp" else 0.1 * 2.5 / (expansion * (dim // heads))
        if not theta_max > 0:
            raise ValueError(f"theta_max must be > 0, got {theta_max}")
        theta_init = theta_max / 4 if theta_init is None else theta_init
        for name, value, top in (("theta_init", theta_init, theta_max), ("eta_init", eta_init, 1),
                                 ("alpha_init", alpha_init, 1)):
            if not 0 < value < top:
                raise ValueError(f"{name} must be in (0, {top}), got {value}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")

        self.dim, self.heads, self.depth = dim, heads, depth
        self.d_head = dim // heads
        self.hidden = expansion * self.d_head
        self.chunk_size = chunk_size
        self.momentum, self.forget = momentum, forget
        self.kind = kind
        self.theta_max = float(theta_max)
        self.per_layer_theta = per_layer_theta
        self.chunk_gates = chunk_gates
        self.max_grad_norm = max_grad_norm
        self.compile_chunks = bool(compile_chunks)
        if self.compile_chunks and _torch_version() < MIN_TORCH_FOR_COMPILE:
            raise ValueError(
                f"compile_chunks=True needs torch >= {'.'.join(map(str, MIN_TORCH_FOR_COMPILE))} "
                f"(found {torch.__version__}): the compiled chunk update's gradients are only verified "
                "from that version on. Use compile_chunks=False (same results, slower on a GPU) "
                "or upgrade torch."
            )
        if not isinstance(checkpoint_chunks, int) or checkpoint_chunks < 0:
            raise ValueError(f"checkpoint_chunks must be an integer >= 0, got {checkpoint_chunks!r}")
        self.checkpoint_chunks = checkpoint_chunks
        self.conv_kernel = conv_kernel if conv else 1

        # q, k, v projections (one matmul) and the causal depthwise conv over their 3·dim channels
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        if conv:
            # starts as the identity (last tap = 1); learns to mix the previous kernel−1 tokens
            w = torch.zeros(3 * dim, self.conv_kernel)
            w[:, -1] = 1.0
            self.conv_weight = nn.Parameter(w)
        else:
            self.register_parameter("conv_weight", None)

        # gates: per head [θ (1 or depth logits), η logit (if momentum), α logit (if forget)]
        self.n_theta = depth if per_layer_theta else 1
        self.n_gates = self.n_theta + int(momentum) + int(forget)
        self.to_gates = nn.Linear(dim, heads * self.n_gates)
        nn.init.normal_(self.to_gates.weight, std=0.02)
        bias = [_logit(theta_init / theta_max)] * self.n_theta
        bias += [_logit(eta_init)] * int(momentum) + [_logit(alpha_init)] * int(forget)
        with torch.no_grad():
            self.to_gates.bias.copy_(torch.tensor(bias).repeat(heads))

        # learned initial memory M₀, per head (D3); S₀ = 0
        self.memory_init = nn.ParameterList(
            nn.Parameter(w) for w in self._init_memory_weights())

        # output (D10): W_O(RMSNorm(y) ⊙ SiLU(W_g x)); RMSNorm per head with a learned gain
        self.out_norm_gain = nn.Parameter(torch.ones(dim))
        self.to_out_gate = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    # -- memory network ---------------------------------------------------------------------

    def _layer_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of each memory layer."""
        d, h = self.d_head, self.hidden
        if self.depth == 1:
            return [(d, d)]
        return [(h, d)] + [(h, h)] * (self.depth - 2) + [(d, h)]

    def _init_memory_weights(self) -> list[Tensor]:
        """M₀ (per head). Depth 1: zeros (the linear memory starts empty; the delta rule's
        usual start). Depth ≥ 2 must not be zero — an all-zero MLP memory is a fixed point with
        zero inner gradients (reference §2.2, the "zero-M₀ trap"). Scales:

        * first layer std 1: its inputs are unit vectors, so pre-activations are ~N(0, 1) and
          GELU works in its non-linear range;
        * hidden layers std 1.5/√in (GELU outputs have second moment ≈ 0.43);
        * last layer: residual-LN: std 1. LN makes the output independent of this scale, but
          its gradient is scaled by 1/σ(W_L a) (pitfall 4): with std 1 one token's loss has
          curvature ≈ 1 in W_L, like the linear memory with unit keys. Plain MLP: std 1/√in.
        """
        H = self.heads
        shapes = self._layer_shapes()
        if self.depth == 1:
            return [torch.zeros(H, *shapes[0])]
        ws = []
        for i, (out, inp) in enumerate(shapes):
            if i == 0:
                std = 1.0
            elif i < len(shapes) - 1:
                std = 1.5 / math.sqrt(inp)
            else:
                std = 1.0 if self.kind == "residual_ln" else 1.0 / math.sqrt(inp)
            ws.append(torch.randn(H, out, inp) * std)
        return ws

    def memory_fn(self, weights, inputs: Tensor) -> Tensor:
        """M(inputs; weights), a pure function of explicit weights (no state, no write).

        weights: tuple of (..., out_l, in_l) tensors (e.g. ``state.weights``, (B, H, ·, ·));
        inputs: (..., n, d_head). Returns (..., n, d_head).
        """
        return memory_forward(tuple(weights), inputs, self.kind)

    def init_state(self, batch_size: int, device=None, dtype=None) -> MemoryState:
        """The state at the start of a document: Φ = M₀ (shared per head across the batch), S = 0,
        nothing pending, empty conv context."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        ref = self.memory_init[0]
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        weights = tuple(w.to(device=device, dtype=dtype).unsqueeze(0).expand(batch_size, *w.shape)
                        for w in self.memory_init)
        momentum = tuple(torch.zeros(batch_size, *w.shape, device=device, dtype=dtype)
                         for w in self.memory_init)
        H, d = self.heads, self.d_head
        empty = torch.zeros(batch_size, H, 0, d, device=device, dtype=dtype)
        gates = torch.zeros(batch_size, H, 0, self.n_gates, device=device, dtype=dtype)
        return MemoryState(weights, momentum, empty, empty.clone(), gates, None)

    # -- projections and gates --------------------------------------------------------------

    def _check_input(self, x) -> None:
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected x of shape (batch, time, dim={self.dim}), got {got}")
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point x, got dtype {x.dtype}")

    def _causal_conv(self, pre: Tensor, context: Tensor | None, weight: Tensor | None):
        """Causal depthwise conv over time: pre (B, T, C) with the previous kernel−1 inputs
        ``context`` (B, kernel−1, C) (zeros at a document start). Returns (out, new_context)."""
        if weight is None:
            return pre, None
        k = weight.shape[-1]
        B, T, C = pre.shape
        if T == 0:  # nothing new: the context is unchanged
            return pre, context
        if context is None:
            context = pre.new_zeros(B, k - 1, C)
        elif context.shape != (B, k - 1, C):
            raise ValueError(f"conv context must have shape {(B, k - 1, C)}, "
                             f"got {tuple(context.shape)}")
        full = torch.cat([context.to(pre.dtype), pre], 1)  # (B, k−1+T, C)
        out = F.conv1d(full.transpose(1, 2), weight.unsqueeze(1), groups=C).transpose(1, 2)
        return out, full[:, full.shape[1] - (k - 1):]

    def _split_heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.heads, self.d_head).transpose(1, 2)  # (B, H, T, d_head)

    def _project(self, x: Tensor, context: Tensor | None):
        """q, k, v (B, H, T, d_head) after proj → causal conv → SiLU → ℓ2 (q, k) (D9), and the
        new conv context."""
        pre = self.to_qkv(x)  # (B, T, 3·dim)
        qkv, new_context = self._causal_conv(pre, context, self.conv_weight)
        q, k, v = F.silu(qkv).chunk(3, dim=-1)
        q = l2_normalize(self._split_heads(q))
        k = l2_normalize(self._split_heads(k))
        return q, k, self._split_heads(v), new_context

    def project(self, x: Tensor, context: Tensor | None = None):
        """q, k, v, each (B, H, T, d_head), after projection, causal conv, SiLU and ℓ2 (q, k).

        ``context``: the conv context of a carried state (None = start of a document)."""
        self._check_input(x)
        q, k, v, _ = self._project(x, context)
        return q, k, v

    def _gate_logits(self, x: Tensor) -> Tensor:
        """Gate logits (B, H, T, G), G = n_theta [+ 1 for η] [+ 1 for α]."""
        B, T, _ = x.shape
        z = self.to_gates(x).view(B, T, self.heads, self.n_gates).transpose(1, 2)
        return z.to(_compute_dtype(z))

    def _gate_values(self, logits: Tensor):
        """θ, log η, log(1 − α), η, α from logits (..., G) (eq. 6; D2).

        θ = θ_max·σ(z_θ) (..., n_theta);  log η = logsigmoid(z_η);  log(1 − α) = logsigmoid(−z_α).
        Disabled momentum gives η = 0 (log η = −inf); disabled forgetting gives α = 0.
        """
        theta = self.theta_max * torch.sigmoid(logits[..., : self.n_theta])
        i = self.n_theta
        if self.momentum:
            log_eta = F.logsigmoid(logits[..., i])
            eta = torch.sigmoid(logits[..., i])
            i += 1
        else:
            eta = torch.zeros_like(logits[..., 0])
            log_eta = torch.full_like(eta, float("-inf"))
        if self.forget:
            log_keep = F.logsigmoid(-logits[..., i])
            alpha = torch.sigmoid(logits[..., i])
        else:
            alpha = torch.zeros_like(logits[..., 0])
            log_keep = torch.zeros_like(alpha)
        return theta, log_eta, log_keep, eta, alpha

    def _pool_gate_logits(self, logits: Tensor) -> Tensor:
        """Per-chunk gates: mean-pool the logits over each chunk of the aligned stream (B, H, N, G)
        (the logits are linear in x, so this equals the gates of the mean-pooled x). A trailing
        partial chunk is pooled over the tokens it has so far. No-op without ``chunk_gates``."""
        if not self.chunk_gates:
            return logits
        B, H, N, G = logits.shape
        b = self.chunk_size
        full = (N // b) * b
        parts = []
        if full:
            chunks = logits[:, :, :full].reshape(B, H, N // b, b, G)
            parts.append(chunks.mean(-2, keepdim=True).expand_as(chunks).reshape(B, H, full, G))
        if N > full:
            rest = logits[:, :, full:]
            parts.append(rest.mean(-2, keepdim=True).expand_as(rest))
        return torch.cat(parts, 2)

    def gates(self, x: Tensor):
        """θ, η, α per token and head, each (B, H, T) (θ: (B, H, T, depth) with per-layer θ).

        η ≡ 0 if ``momentum=False``; α ≡ 0 if ``forget=False``. With ``chunk_gates`` the values
        are pooled over chunks counted from the start of x."""
        self._check_input(x)
        theta, _, _, eta, alpha = self._gate_values(self._pool_gate_logits(self._gate_logits(x)))
        return (theta if self.per_layer_theta else theta[..., 0]), eta, alpha

    # -- state checks -----------------------------------------------------------------------

    def _checked_start(self, x: Tensor, state: MemoryState | None) -> MemoryState:
        """Validate x, then return the carried state (validated) or a fresh one (document start)."""
        self._check_input(x)
        if state is None:
            return self.init_state(x.shape[0], device=x.device)
        self._check_state(state, x.shape[0])
        return state

    def _check_state(self, state: MemoryState, batch: int) -> None:
        if not isinstance(state, MemoryState):
            raise ValueError(f"state must be a MemoryState, got {type(state).__name__}")
        H, d = self.heads, self.d_head
        shapes = [(batch, H, o, i) for o, i in self._layer_shapes()]
        for name in ("weights", "momentum"):
            got = getattr(state, name)
            if not isinstance(got, (tuple, list)) or len(got) != len(shapes):
                raise ValueError(f"state.{name} must be a tuple of {len(shapes)} tensors "
                                 f"shaped {shapes}")
            for t, shape in zip(got, shapes):
                if tuple(t.shape) != shape:
                    raise ValueError(f"state.{name} shapes must be {shapes} (batch {batch}, "
                                     f"heads {H}), got {[tuple(t.shape) for t in got]}")
        P = state.pending_keys.shape[-2] if state.pending_keys.ndim == 4 else -1
        for name, last in (("pending_keys", d), ("pending_values", d),
                           ("pending_gates", self.n_gates)):
            t = getattr(state, name)
            if t.ndim != 4 or tuple(t.shape) != (batch, H, P, last) or P >= self.chunk_size:
                raise ValueError(f"state.{name} must have shape (batch={batch}, heads={H}, P, "
                                 f"{last}) with P < chunk_size={self.chunk_size} the same for "
                                 f"all pending tensors, got {tuple(t.shape)}")
        tensors = list(state.weights) + list(state.momentum)
        tensors += [state.pending_keys, state.pending_values, state.pending_gates]
        if state.conv_context is not None:
            tensors.append(state.conv_context)
        for t in tensors:
            if not torch.isfinite(t).all():
                raise ValueError("the carried memory state contains NaN or inf values; "
                                 "start a new state with init_state() (and consider a smaller "
                                 "theta_max or max_grad_norm)")

    # -- the chunked forward (weighted-gradient route) ----------------------------------------

    def _chunk_step(self, W, S, keys, values, queries, coeffs, need_stats: bool,
                    inplace: bool = False):
        """One chunk: :func:`_chunk_update` with this layer's settings, compiled when the layer
        was built with ``compile_chunks=True`` and the chunk is a full one (``chunk_size`` keys;
        a flushed partial chunk runs eagerly, so the compiled code keeps one static shape)."""
        step = _chunk_update
        if self.compile_chunks and keys.shape[1] == self.chunk_size:
            step = _compiled_chunk_update()
        return step(W, S, keys, values, queries, coeffs, self.kind, self.max_grad_norm,
                    need_stats, inplace)

    def _coefficients(self, logits: Tensor):
        """Coefficients of every full chunk of an aligned, already pooled stream of logits
        (B, H, nc·b, G) -> c, d (B, H, nc, b, n_theta), A, B, E (B, H, nc)."""
        B_, H, N, G = logits.shape
        b = self.chunk_size
        theta, log_eta, log_keep, _, _ = self._gate_values(logits.reshape(B_, H, N // b, b, G))
        return chunk_coefficients(theta, log_eta, log_keep)

    def forward(self, x: Tensor, state: MemoryState | None = None, *, return_stats: bool = False):
        """Read and write a sequence. x (B, T, dim) -> y (B, T, dim), new state [, stats].

        Chunk boundaries are absolute: the carried state's P pending tokens open the first chunk,
        so ``mem(x)`` equals ``mem(x[:, :n])`` followed by ``mem(x[:, n:], state)`` for any n.
        """
        state = self._checked_start(x, state)
        q, k, v, conv_context = self._project(x, state.conv_context)
        logits = self._gate_logits(x)
        reads, new_state, inner = self._run(q, k, v, logits, state, return_stats)
        new_state.conv_context = conv_context
        y = self._output(reads, x)
        if not return_stats:
            return y, new_state
        P = state.pending
        theta, _, _, eta, alpha = self._gate_values(
            self._pool_gate_logits(torch.cat([state.pending_gates, logits], 2))[:, :, P:])
        stats = MemoryStats(reads=reads, surprise=inner[0], grad_norm=inner[1],
                            theta=theta if self.per_layer_theta else theta[..., 0],
                            eta=eta, alpha=alpha)
        return y, new_state, stats

    def _run(self, q, k, v, logits, state: MemoryState, need_stats: bool):
        """The chunk loop over the aligned stream [pending tokens of the state ‖ this call]."""
        B, H, T, d = q.shape
        b, P = self.chunk_size, state.pending
        wdtype = state.weights[0].dtype
        keys = torch.cat([state.pending_keys, k.to(state.pending_keys.dtype)], 2)  # (B, H, N, d)
        values = torch.cat([state.pending_values, v.to(state.pending_values.dtype)], 2)
        raw_logits = torch.cat([state.pending_gates.to(logits.dtype), logits], 2)  # (B, H, N, G)
        N = P + T
        n_chunks, full = N // b, (N // b) * b
        BH = B * H
        W = [w.reshape(BH, *w.shape[2:]) for w in state.weights]
        S = [s.reshape(BH, *s.shape[2:]) for s in state.momentum]
        # inference: update private copies in place (the caller's state is never modified)
        inplace = n_chunks > 0 and not torch.is_grad_enabled()
        if inplace:
            W = [w.clone(memory_format=torch.contiguous_format) for w in W]
            S = [s.clone(memory_format=torch.contiguous_format) for s in S]
        reads, surprise, grad_norm = [], [], []
        if n_chunks:
            c, dd, A, Bc, E = self._coefficients(self._pool_gate_logits(raw_logits[:, :, :full]))
            # split everything into chunks once (unbind: no per-chunk slicing in the backward)
            per_chunk = lambda t: t.reshape(BH, n_chunks, *t.shape[3:]).to(wdtype).unbind(1)
            # the coefficients in the form the update uses, for all chunks in one op each:
            # −c, −d and A, B, E as (N, 1, 1) (none of them depends on the state)
            c, dd = per_chunk(-c), per_chunk(-dd)
            A, Bc, E = (per_chunk(t[..., None, None]) for t in (A, Bc, E))
            k_chunks = per_chunk(keys[:, :, :full].reshape(B, H, n_chunks, b, d))
            v_chunks = per_chunk(values[:, :, :full].reshape(B, H, n_chunks, b, d))
            # queries aligned with the stream; the P pending positions were read by an earlier call
            q_al = q[:, :, : full - P] if P == 0 else torch.cat(
                [q.new_zeros(B, H, P, d), q[:, :, : max(full - P, 0)]], 2)
            q_chunks = q_al.reshape(BH, n_chunks, b, d).unbind(1)

            def run_chunks(lo, hi, W, S):
                outs = []
                for i in range(lo, hi):
                    W, S, r, sur, gn = self._chunk_step(
                        W, S, k_chunks[i], v_chunks[i], q_chunks[i],
                        (c[i], dd[i], A[i], Bc[i], E[i]), need_stats, inplace)
                    outs.append((r, sur, gn))
                return W, S, outs

            # activation checkpointing: autograd keeps the state only every `group` chunks and
            # recomputes the chunks in between during the backward
            group = self.checkpoint_chunks if torch.is_grad_enabled() else 0
            for lo in range(0, n_chunks, group or n_chunks):
                hi = min(lo + (group or n_chunks), n_chunks)
                if group:
                    W, S, outs = torch.utils.checkpoint.checkpoint(
                        run_chunks, lo, hi, W, S, use_reentrant=False)
                else:
                    W, S, outs = run_chunks(lo, hi, W, S)
                for i, (r, sur, gn) in enumerate(outs, lo):
                    skip = P if i == 0 else 0  # pending rows: read and reported by an earlier call
                    reads.append(r[:, skip:] if skip else r)
                    if need_stats:
                        surprise.append(sur[:, skip:])
                        grad_norm.append(gn[:, skip:])
        # the unfinished chunk: its new tokens read the current state; it is not written yet
        rest_q = q.reshape(BH, T, d)[:, max(full - P, 0):]
        if rest_q.shape[1]:
            if need_stats:
                kr = keys[:, :, full:].reshape(BH, N - full, d)
                vr = values[:, :, full:].reshape(BH, N - full, d)
                out, cache = memory_forward(W, kr, self.kind, keep=True)
                err = out - vr
                deltas = memory_backward(W, cache, err)
                gn = sum(dl.pow(2).sum(-1) * xl.pow(2).sum(-1)
                         for dl, xl in zip(deltas, cache["inputs"])).sqrt()
                skip = N - full - rest_q.shape[1]  # pending rows already reported earlier
                surprise.append(0.5 * err.pow(2).sum(-1)[:, skip:])
                grad_norm.append(gn[:, skip:])
            reads.append(memory_forward(W, rest_q, self.kind))
        reads = torch.cat(reads, 1).reshape(B, H, T, d) if reads else q.new_zeros(B, H, 0, d)
        new_state = MemoryState(
            weights=tuple(w.reshape(B, H, *w.shape[1:]) for w in W),
            momentum=tuple(s.reshape(B, H, *s.shape[1:]) for s in S),
            pending_keys=keys[:, :, full:], pending_values=values[:, :, full:],
            pending_gates=raw_logits[:, :, full:])
        inner = None
        if need_stats:
            cat = lambda xs: (torch.cat(xs, 1) if xs else q.new_zeros(BH, 0)).reshape(B, H, T)
            inner = (cat(surprise), cat(grad_norm))
        return reads, new_state, inner

    def _output(self, reads: Tensor, x: Tensor) -> Tensor:
        """o = W_O(RMSNorm(y) ⊙ SiLU(W_g x)) (D10); RMSNorm per head, reads (B, H, T, d_head)."""
        B, H, T, d = reads.shape
        r = reads.to(_compute_dtype(reads))
        r = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-6)
        r = r.transpose(1, 2).reshape(B, T, H * d) * self.out_norm_gain
        return self.to_out(r.to(x.dtype) * F.silu(self.to_out_gate(x)))

    def flush(self, state: MemoryState) -> MemoryState:
        """Write the pending tokens as a final, partial chunk (call at the end of a document).

        After a flush the chunk grid restarts, so only flush when the document ends."""
        P = state.pending
        if P == 0:
            return state
        B = state.pending_keys.shape[0]
        self._check_state(state, B)
        H, d = self.heads, self.d_head
        logits = self._pool_gate_logits(state.pending_gates)
        theta, log_eta, log_keep, _, _ = self._gate_values(logits)
        c, dd, A, Bc, E = chunk_coefficients(theta, log_eta, log_keep)
        wdtype = state.weights[0].dtype
        BH = B * H
        W = [w.reshape(BH, *w.shape[2:]) for w in state.weights]
        S = [s.reshape(BH, *s.shape[2:]) for s in state.momentum]
        W, S, _, _, _ = self._chunk_step(
            W, S, state.pending_keys.reshape(BH, P, d), state.pending_values.reshape(BH, P, d),
            None, (-c.reshape(BH, P, -1).to(wdtype), -dd.reshape(BH, P, -1).to(wdtype),
                   A.reshape(BH, 1, 1).to(wdtype), Bc.reshape(BH, 1, 1).to(wdtype),
                   E.reshape(BH, 1, 1).to(wdtype)),
            False)
        empty = state.pending_keys[:, :, :0]
        return replace(state, weights=tuple(w.reshape(B, H, *w.shape[1:]) for w in W),
                       momentum=tuple(s.reshape(B, H, *s.shape[1:]) for s in S),
                       pending_keys=empty, pending_values=empty,
                       pending_gates=state.pending_gates[:, :, :0])

    # -- read-only retrieval (for MAC) --------------------------------------------------------

    def retrieve(self, x: Tensor, state: MemoryState, context: Tensor | None = None):
        """Read-only retrieval h = W_O(RMSNorm(M*(q)) ⊙ SiLU(W_g x)) with NO write (MAC eq. 21).

        Every token of x reads the same weights, ``state.weights`` (the memory before the
        segment); nothing is chunked and the state is not changed. q comes from x through the q
        projection, the q part of the causal conv, SiLU and ℓ2. ``context`` (B, kernel−1, dim) is
        the previous call's last pre-conv q projections of *this* x-stream (None = start of a
        document); the function returns it updated for the next call.

        Returns (h (B, T, dim), new_context).
        """
        self._check_input(x)
        B = x.shape[0]
        if not isinstance(state, MemoryState):
            raise ValueError(f"state must be a MemoryState, got {type(state).__name__}")
        shapes = [(B, self.heads, o, i) for o, i in self._layer_shapes()]
        if [tuple(w.shape) for w in state.weights] != shapes:
            raise ValueError(f"state.weights shapes must be {shapes}, "
                             f"got {[tuple(w.shape) for w in state.weights]}")
        D = self.dim
        pre = F.linear(x, self.to_qkv.weight[:D])  # (B, T, dim): the q projection only
        wq = None if self.conv_weight is None else self.conv_weight[:D]
        qc, new_context = self._causal_conv(pre, context, wq)
        q = l2_normalize(self._split_heads(F.silu(qc)))  # (B, H, T, d_head)
        reads = self.memory_fn(state.weights, q.to(state.weights[0].dtype))
        return self._output(reads, x), new_context


# ----------------------------------------------------------------------------------------------
# The oracle: token by token
# ----------------------------------------------------------------------------------------------


def _token_gradient(mem: NeuralMemory, W: tuple[Tensor, ...], k: Tensor, v: Tensor,
                    create_graph: bool):
    """∇_Φ ℓ(Φ) at Φ = W for one token per (batch, head): k, v (B, H, d). Plain autograd.

    Returns (gradients: tuple like W, loss (B, H))."""
    with torch.enable_grad():
        # differentiate w.r.t. a fresh node: a graph-connected copy when the outer loop needs
        # second derivatives, else a detached leaf
        Wg = tuple(w * 1.0 if create_graph and w.requires_grad else w.detach().requires_grad_(True)
                   for w in W)
        pred = mem.memory_fn(Wg, k.unsqueeze(-2)).squeeze(-2)  # (B, H, d)
        loss = associative_loss(pred, v)  # (B, H): ½‖M(k) − v‖²
        # the (batch, head) memories are independent, so the gradient of the sum is per memory
        grads = torch.autograd.grad(loss.sum(), Wg, create_graph=create_graph)
    if not create_graph:
        grads, loss = tuple(g.detach() for g in grads), loss.detach()
    return grads, loss


def sequential_reference(mem: NeuralMemory, x: Tensor, state: MemoryState | None = None, *,
                         return_stats: bool = False, flush: bool = False):
    """The Titans memory, token by token — slow but obviously correct (the tests' oracle).

    Same inputs, outputs and semantics as ``mem(x, state)``: q, k, v and gates come from the
    layer's own projections; then, for every token t of the stream (the state's pending tokens
    first, then x):

        read:     y_t = M*(q_t; Φ_start)          Φ_start = state at the end of the last chunk
        gradient: g_t = ∇_Φ ½‖M(k_t; Φ_start) − v_t‖²      (autograd, eq. 7)
        when t closes a chunk, for s in the chunk, in order:
                  S ← η_s S − θ_s g_s;   Φ ← (1 − α_s) Φ + S        (eqs. 4–5)

    (The update of token s needs only g_s, taken at Φ_start, so applying the chunk's updates when
    it closes is the same as applying each right away; doing it at the close lets per-chunk
    pooled gates see the whole chunk.) ``flush=True`` also writes a final partial chunk.
    """
    state = mem._checked_start(x, state)
    B, T, _ = x.shape
    create_graph = torch.is_grad_enabled()
    q, k, v, conv_context = mem._project(x, state.conv_context)
    keys = torch.cat([state.pending_keys, k], 2)  # (B, H, N, d): pending tokens first
    values = torch.cat([state.pending_values, v], 2)
    logits = torch.cat([state.pending_gates, mem._gate_logits(x)], 2)
    P, N, b = state.pending, state.pending + T, mem.chunk_size

    W, S = tuple(state.weights), tuple(state.momentum)
    reads, surprise, grad_norm = [], [], []
    chunk_start, chunk_grads = 0, []

    def write(W, S, grads, chunk_logits):
        theta, _, _, eta, alpha = mem._gate_values(mem._pool_gate_logits(chunk_logits))
        for s, g in enumerate(grads):
            if mem.max_grad_norm is not None:
                norm = torch.sqrt(sum(gl.pow(2).sum((-1, -2)) for gl in g))
                f = clip_factor(norm, mem.max_grad_norm)[..., None, None]
                g = tuple(gl * f for gl in g)
            eta_s = eta[:, :, s, None, None]  # (B, H, 1, 1)
            keep_s = 1 - alpha[:, :, s, None, None]
            # θ of layer l (one shared θ unless per-layer θ): (B, H, 1, 1)
            theta_s = [theta[:, :, s, min(l, theta.shape[-1] - 1), None, None] for l in range(len(g))]
            S = tuple(eta_s * S_l - th_l * g_l for S_l, th_l, g_l in zip(S, theta_s, g))
            W = tuple(keep_s * W_l + S_l for W_l, S_l in zip(W, S))
        return W, S

    for t in range(N):
        if t >= P:  # a new token: read at the chunk-start state
            reads.append(mem.memory_fn(W, q[:, :, t - P].unsqueeze(-2)).squeeze(-2))
        g, loss = _token_gradient(mem, W, keys[:, :, t], values[:, :, t], create_graph)
        if t >= P:
            surprise.append(loss)
            grad_norm.append(torch.sqrt(sum(gl.pow(2).sum((-1, -2)) for gl in g)))
        chunk_grads.append(g)
        if t + 1 - chunk_start == b:  # the chunk is complete: write it
            W, S = write(W, S, chunk_grads, logits[:, :, chunk_start: t + 1])
            chunk_start, chunk_grads = t + 1, []
    if flush and chunk_grads:
        W, S = write(W, S, chunk_grads, logits[:, :, chunk_start:])
        chunk_start = N
    new_state = MemoryState(tuple(W), tuple(S), keys[:, :, chunk_start:],
                            values[:, :, chunk_start:], logits[:, :, chunk_start:], conv_context)
    reads = torch.stack(reads, 2) if reads else q.new_zeros(B, mem.heads, 0, mem.d_head)
    y = mem._output(reads, x)
    if not return_stats:
        return y, new_state
    theta, _, _, eta, alpha = mem._gate_values(mem._pool_gate_logits(logits)[:, :, P:])
    stats = MemoryStats(reads=reads, surprise=torch.stack(surprise, 2),
                        grad_norm=torch.stack(grad_norm, 2),
                        theta=theta if mem.per_layer_theta else theta[..., 0], eta=eta, alpha=alpha)
    return y, new_state, stats
