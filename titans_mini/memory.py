"""The Titans neural long-term memory (LMM): a memory that learns key → value at test time.

Paper: Behrouz, Zhong, Mirrokni, *Titans: Learning to Memorize at Test Time* (arXiv 2501.00663),
§3.1–3.2. "paper eq. N" is the v1 numbering; "paper-map §…" is a section of ``docs/paper-map.md``.
Built in lessons 04 (momentum and forgetting), 06a/06b (chunks and the parallel route) and 07
(the full layer).

Per head, with fast weights Φ (the memory MLP's weights) and momentum S:

    q_t, k_t, v_t = SiLU(conv(W_Q x_t)), SiLU(conv(W_K x_t)), SiLU(conv(W_V x_t))
    q_t, k_t ← q_t / ‖q_t‖, k_t / ‖k_t‖                      paper eqs. 11, 15; paper-map §D9
    ℓ_t(Φ) = ½ ‖M(k_t; Φ) − v_t‖²                             paper eq. 12; §D1
    S_t = η_t S_{t−1} − θ_t ∇ℓ_t(Φ_{t'})   surprise with momentum      paper eq. 14
    Φ_t = (1 − α_t) Φ_{t−1} + S_t          forgetting (weight decay)   paper eq. 13
    y_t = M*(q_t; Φ_{t'})                  read, no write              paper eq. 15
    o_t = W_O(RMSNorm(y_t) ⊙ SiLU(W_g x_t))                             paper-map §D10

where t' is the end of the previous chunk of ``chunk_size`` tokens (paper eq. 16; paper-map §C1,
§D5; chunk boundaries at absolute positions 0, b, 2b, …): every token of a chunk takes its
gradient at — and reads — the state at the start of its chunk. ``chunk_size=1`` is exact online
gradient descent. Gates θ, η, α: paper-map §D2; several heads: §D11.

What lives here, in reading order:

* :class:`MemoryState` — what the memory carries from one call to the next (paper-map §C5);
* :class:`NeuralMemory` — the layer: projections → causal conv → gates → chunk loop → read →
  output;
* :func:`run_chunks` — the chunk loop it runs (and :func:`write_pending` for ``flush``,
  :func:`read_only` for the writes-off ablation). Each chunk is
  :func:`titans_mini.functional.chunk_update` (paper-map §C2–§C3: one backward for all of a
  chunk's gradients, then Φ_end = AΦ + BS − (c ⊙ Δ)ᵀX), run by its fast equivalent in
  :mod:`titans_mini.memory_fast` — the same maths, proven equal by tests;
* :func:`sequential_reference` — the slow, obviously correct loop: per token, autograd of that
  token's loss, then literally S ← ηS − θg, Φ ← (1 − α)Φ + S. The oracle of the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from . import device
from .functional import (
    attentional_bias_grad,
    attentional_bias_loss,
    causal_conv,
    check_attentional_bias,
    chunk_coefficients,
    clip_factor,
    gate_values,
    init_memory_weights,
    l2_normalize,
    memory_backward,
    memory_forward,
    memory_kind,
    memory_layer_shapes,
    pool_over_chunks,
    token_grad_norm,
)
from .memory_fast import (
    checkpointed_chunks,
    compiled_chunk_update,
    fast_chunk_update,
    per_chunk_factors,
)

__all__ = ["MemoryState", "MemoryStats", "NeuralMemory", "clip_factor", "sequential_reference"]


# ----------------------------------------------------------------------------------------------
# State and statistics
# ----------------------------------------------------------------------------------------------


@dataclass
class MemoryState:
    """Everything the memory carries from one call to the next (paper-map §C5).

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

    def validate(self, mem, batch: int) -> None:
        """Raise a clear ``ValueError`` unless this state fits memory layer ``mem`` at batch size
        ``batch`` (shapes always; NaN/inf values as ``mem.check_state_values`` says)."""
        H, d = mem.heads, mem.d_head
        shapes = [(batch, H, o, i) for o, i in mem.layer_shapes]
        for name in ("weights", "momentum"):
            got = getattr(self, name)
            if not isinstance(got, (tuple, list)) or len(got) != len(shapes):
                raise ValueError(f"state.{name} must be a tuple of {len(shapes)} tensors "
                                 f"shaped {shapes}")
            for t, shape in zip(got, shapes):
                if tuple(t.shape) != shape:
                    raise ValueError(f"state.{name} shapes must be {shapes} (batch {batch}, "
                                     f"heads {H}), got {[tuple(t.shape) for t in got]}")
        P = self.pending_keys.shape[-2] if self.pending_keys.ndim == 4 else -1
        for name, last in (("pending_keys", d), ("pending_values", d),
                           ("pending_gates", mem.n_gates)):
            t = getattr(self, name)
            if t.ndim != 4 or tuple(t.shape) != (batch, H, P, last) or P >= mem.chunk_size:
                raise ValueError(f"state.{name} must have shape (batch={batch}, heads={H}, P, "
                                 f"{last}) with P < chunk_size={mem.chunk_size} the same for "
                                 f"all pending tensors, got {tuple(t.shape)}")
        tensors = list(self.weights) + list(self.momentum)
        tensors += [self.pending_keys, self.pending_values, self.pending_gates]
        if self.conv_context is not None:
            tensors.append(self.conv_context)
        check = mem.check_state_values
        if check is None:  # auto: free on the CPU; on an accelerator it would cost a host sync
            check = tensors[0].device.type == "cpu"
        if check:
            # one reduction over all tensors (a NaN or inf anywhere makes the total non-finite)
            if not torch.isfinite(sum(t.sum(dtype=torch.float32) for t in tensors)):
                raise ValueError("the carried memory state contains NaN or inf values; "
                                 "start a new state with init_state() (and consider a smaller "
                                 "theta_max or max_grad_norm)")


@dataclass
class MemoryStats:
    """Per-token diagnostics of one call (for lessons and plots).

    reads      (B, H, T, d_head)  raw retrievals M*(q_t) before output norm, gate and projection
    surprise   (B, H, T)  ℓ_t = ½‖M(k_t) − v_t‖² (or the layer's attentional bias) at the state
               where token t's gradient is taken
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


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _compute_dtype(t: Tensor) -> torch.dtype:
    """fp32 for low-precision tensors (gates, norms); otherwise the tensor's own dtype."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _checked_arguments(*, dim, heads, depth, expansion, chunk_size, conv_kernel, residual_norm,
                       theta_max, theta_init, eta_init, alpha_init, max_grad_norm, compile_chunks,
                       checkpoint_chunks) -> tuple[str, float, float]:
    """Check ``NeuralMemory``'s arguments (a clear ``ValueError`` for each bad one) and fill in
    the step-size defaults. Returns (memory kind, theta_max, theta_init)."""
    for name, value, low in (("dim", dim, 1), ("heads", heads, 1), ("depth", depth, 1),
                             ("expansion", expansion, 1), ("chunk_size", chunk_size, 1),
                             ("conv_kernel", conv_kernel, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if dim % heads != 0:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
    kind = memory_kind(depth, residual_norm)
    if theta_max is None:
        # Linear and residual-LN memory: keys are unit vectors and M₀ is scaled so that one
        # token's loss has curvature ≈ 1, so θ ≈ 1 would nearly overwrite a key in one step; but
        # a chunk sums up to b gradients taken at the same point and momentum multiplies the
        # step by up to 1/(1 − η), hence a cap well below 1 (θ_max = 1 diverges on random data
        # at b = 16). Plain MLP: the last layer's curvature is ‖GELU(W_1 k)‖² ≈ 0.4·hidden.
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
    if compile_chunks and not device.compile_supported():
        need = ".".join(map(str, device.MIN_TORCH_FOR_COMPILE))
        raise ValueError(
            f"compile_chunks=True needs torch >= {need} "
            f"(found {torch.__version__}): the compiled chunk update's gradients are only verified "
            "from that version on. Use compile_chunks=False (same results, slower on a GPU) "
            "or upgrade torch."
        )
    if not isinstance(checkpoint_chunks, int) or checkpoint_chunks < 0:
        raise ValueError(f"checkpoint_chunks must be an integer >= 0, got {checkpoint_chunks!r}")
    return kind, float(theta_max), float(theta_init)


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
        heads: H memory heads; d_head = dim / heads. Each head has its own memory,
            M₀ and gates (paper-map §D11).
        depth: memory layers L. 1 = linear memory M(k) = W k; ≥ 2 = MLP (paper-map §D4).
        expansion: hidden width of the MLP memory = expansion · d_head.
        chunk_size: b, the inner mini-batch (paper-map §D5). Semantic, not just speed: 1 = exact online GD.
        momentum: False makes η ≡ 0 (S_t = −θ_t g_t).
        forget: False makes α ≡ 0 (no weight decay).
        residual_norm: depth ≥ 2 only: M(x) = x + LN(MLP(x)) (default, non-affine LN) or the plain
            MLP M(x) = MLP(x). Note that a non-affine LN fixes ‖M(k) − k‖ = √d_head, so values
            are only matched once v − k has that scale; the outer loop learns W_V accordingly.
        conv: causal depthwise conv (kernel ``conv_kernel``) after the q/k/v projections (§D9).
        theta_max: θ_t = θ_max · σ(·) ∈ (0, θ_max). Default 0.1 (0.25/hidden for the plain
            MLP); why, in :func:`_checked_arguments`.
        theta_init, eta_init, alpha_init: the gates' values at initialisation (through the
            biases of their linear maps): θ_max/4 (a gentle learner at first), η = 0.9 (surprise
            persists over ~10 tokens), α = 0.05 (half-life ≈ 14 tokens; the model learns it).
        per_layer_theta: one θ per memory layer (NeurIPS: deep memories need per-layer rates).
        chunk_gates: gates mean-pooled over each chunk (faster-to-learn, less expressive option;
            causal, since gates only affect the write at the chunk's end).
        max_grad_norm: optional per-token clipping of the inner gradient, ‖g_t‖ ≤ max_grad_norm,
            folded into the coefficients c_s, d_s (no per-token gradients needed).
        compile_chunks: run each full chunk's update through ``torch.compile`` (opt-in, for
            GPUs, where the chunk loop is bound by kernel launches; equal to eager up to float
            rounding; the first call compiles). Needs torch >= 2.11, else ``ValueError``.
        checkpoint_chunks: k ≥ 1 recomputes the chunks in groups of k during the backward
            (activation checkpointing: same values and gradients, much less memory, about one
            extra forward; k ≈ √(number of chunks) keeps the least). 0 (default) keeps all.
        attentional_bias, bias_param: the inner loss, after Miras (arXiv 2504.13173): "l2"
            (½‖M(k) − v‖², Titans, the default), "huber" (δ = bias_param, default 1) or "lp"
            ((1/p)Σ|e_i|^p, p = bias_param, default 3); see
            :func:`titans_mini.functional.attentional_bias_loss`. Surprise statistics report
            this loss.
    """

    #: Check a carried state for NaN/inf at every call? None (default): only when the state is
    #: on the CPU, where it is free; True: on every device (one host synchronisation per call
    #: on a GPU); False: never.
    check_state_values: bool | None = None
    #: Write to the memory? False switches the writes off (an ablation: every token reads the
    #: carried state, Φ = M₀ at a document's start, and the state never changes); see
    #: :func:`titans_mini.models.memory_writes_off` for a whole model.
    writes: bool = True

    def __init__(self, dim: int, heads: int = 1, depth: int = 2, expansion: int = 4,
                 chunk_size: int = 16, momentum: bool = True, forget: bool = True, *,
                 residual_norm: bool = True, conv: bool = True, conv_kernel: int = 4,
                 theta_max: float | None = None, theta_init: float | None = None,
                 eta_init: float = 0.9, alpha_init: float = 0.05,
                 per_layer_theta: bool = False, chunk_gates: bool = False,
                 max_grad_norm: float | None = None, compile_chunks: bool = False,
                 checkpoint_chunks: int = 0, attentional_bias: str = "l2",
                 bias_param: float | None = None):
        super().__init__()
        kind, theta_max, theta_init = _checked_arguments(
            dim=dim, heads=heads, depth=depth, expansion=expansion, chunk_size=chunk_size,
            conv_kernel=conv_kernel, residual_norm=residual_norm, theta_max=theta_max, theta_init=theta_init,
            eta_init=eta_init, alpha_init=alpha_init, max_grad_norm=max_grad_norm,
            compile_chunks=compile_chunks, checkpoint_chunks=checkpoint_chunks)
        self.attentional_bias = attentional_bias
        self.bias_param = check_attentional_bias(attentional_bias, bias_param)

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

        # learned initial memory M₀, per head (paper-map §D3); S₀ = 0
        self.layer_shapes = memory_layer_shapes(depth, self.d_head, self.hidden)  # (out, in)
        self.memory_init = nn.ParameterList(
            nn.Parameter(w) for w in init_memory_weights(kind, heads, self.layer_shapes))

        # output (paper-map §D10): W_O(RMSNorm(y) ⊙ SiLU(W_g x)); RMSNorm per head with a learned gain
        self.out_norm_gain = nn.Parameter(torch.ones(dim))
        self.to_out_gate = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    # -- memory network ---------------------------------------------------------------------

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
        weight = self.to_qkv.weight.dtype  # metadata only: no host-device sync
        if x.dtype != weight and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"x is {x.dtype} but the layer's weights are {weight}: convert "
                             f"x (x.to({weight})) or the layer (mem.to({x.dtype})), or run "
                             "it under torch.autocast for mixed precision")

    def _split_heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.heads, self.d_head).transpose(1, 2)  # (B, H, T, d_head)

    def _project(self, x: Tensor, context: Tensor | None):
        """q, k, v (B, H, T, d_head) after proj → causal conv → SiLU → ℓ2 (q, k) (paper-map §D9), and the
        new conv context."""
        pre = self.to_qkv(x)  # (B, T, 3·dim)
        qkv, new_context = causal_conv(pre, self.conv_weight, context)
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
        """θ, log η, log(1 − α), η, α from gate logits (:func:`functional.gate_values`)."""
        return gate_values(logits, self.theta_max, self.n_theta, self.momentum, self.forget)

    def _pool_gate_logits(self, logits: Tensor) -> Tensor:
        """Per-chunk gates (``chunk_gates``): logits mean-pooled over each chunk; else as is."""
        return pool_over_chunks(logits, self.chunk_size) if self.chunk_gates else logits

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
        if not isinstance(state, MemoryState):
            raise ValueError(f"state must be a MemoryState, got {type(state).__name__}")
        state.validate(self, x.shape[0])
        return state

    # -- the chunked forward (weighted-gradient route) ----------------------------------------

    def forward(self, x: Tensor, state: MemoryState | None = None, *, return_stats: bool = False):
        """Read and write a sequence. x (B, T, dim) -> y (B, T, dim), new state [, stats].

        Chunk boundaries are absolute: the carried state's P pending tokens open the first chunk,
        so ``mem(x)`` equals ``mem(x[:, :n])`` followed by ``mem(x[:, n:], state)`` for any n.
        """
        state = self._checked_start(x, state)
        q, k, v, conv_context = self._project(x, state.conv_context)
        logits = self._gate_logits(x)
        # the memory's own loop runs in one dtype, the state's (fp32 unless the layer was
        # converted): under autocast no per-op casts inside the sequential chunk steps
        with torch.autocast(x.device.type, enabled=False):
            if self.writes:
                reads, new_state, inner = run_chunks(self, q, k, v, logits, state, return_stats)
            else:  # ablation: read the carried state, write nothing
                reads, new_state, inner = read_only(self, q, k, v, state, return_stats)
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

    def _output(self, reads: Tensor, x: Tensor) -> Tensor:
        """o = W_O(RMSNorm(y) ⊙ SiLU(W_g x)) (paper-map §D10); RMSNorm per head, reads (B, H, T, d_head)."""
        B, H, T, d = reads.shape
        r = reads.to(_compute_dtype(reads))
        r = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-6)
        r = r.transpose(1, 2).reshape(B, T, H * d) * self.out_norm_gain
        return self.to_out(r.to(x.dtype) * F.silu(self.to_out_gate(x)))

    def flush(self, state: MemoryState) -> MemoryState:
        """Write the pending tokens as a final, partial chunk (call at the end of a document).

        After a flush the chunk grid restarts, so only flush when the document ends."""
        return write_pending(self, state) if self.writes else state

    # -- read-only retrieval (for MAC) --------------------------------------------------------

    def retrieve(self, x: Tensor, state: MemoryState, context: Tensor | None = None):
        """Read-only retrieval h = W_O(RMSNorm(M*(q)) ⊙ SiLU(W_g x)) with NO write (MAC, paper eq. 21).

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
        state.validate(self, B)
        D = self.dim
        pre = F.linear(x, self.to_qkv.weight[:D])  # (B, T, dim): the q projection only
        wq = None if self.conv_weight is None else self.conv_weight[:D]
        qc, new_context = causal_conv(pre, wq, context)
        q = l2_normalize(self._split_heads(F.silu(qc)))  # (B, H, T, d_head)
        reads = self.memory_fn(state.weights, q.to(state.weights[0].dtype))
        return self._output(reads, x), new_context


# ----------------------------------------------------------------------------------------------
# The chunk loop (what ``NeuralMemory.forward`` and ``flush`` run)
# ----------------------------------------------------------------------------------------------


def run_chunks(mem: NeuralMemory, q: Tensor, k: Tensor, v: Tensor, logits: Tensor,
               state: MemoryState, need_stats: bool):
    """The chunk loop over the aligned stream [pending tokens of the state ‖ this call]:
    every full chunk reads at its start state and is then written; the tokens of an
    unfinished last chunk read the current state and stay pending (written later)."""
    batch, H, T, d = q.shape
    b, P = mem.chunk_size, state.pending
    wdtype = state.weights[0].dtype
    q = q.to(wdtype)
    keys = torch.cat([state.pending_keys, k.to(state.pending_keys.dtype)], 2)  # (batch, H, N, d)
    values = torch.cat([state.pending_values, v.to(state.pending_values.dtype)], 2)
    raw_logits = torch.cat([state.pending_gates.to(logits.dtype), logits], 2)  # (.., N, G)
    N = P + T
    n_chunks, full = N // b, (N // b) * b
    rows = batch * H  # every (batch, head) pair has its own memory
    W = [w.reshape(rows, *w.shape[2:]) for w in state.weights]
    S = [s.reshape(rows, *s.shape[2:]) for s in state.momentum]
    # inference: update private copies in place (the caller's state is never modified)
    inplace = n_chunks > 0 and not torch.is_grad_enabled()
    if inplace:
        W = [w.clone(memory_format=torch.contiguous_format) for w in W]
        S = [s.clone(memory_format=torch.contiguous_format) for s in S]
    reads, surprise, grad_norm = [], [], []
    if n_chunks:
        pooled = mem._pool_gate_logits(raw_logits[:, :, :full])  # (batch, H, nc·b, G)
        theta, log_eta, log_keep, _, _ = mem._gate_values(pooled.reshape(batch, H, n_chunks, b, -1))
        coeffs = chunk_coefficients(theta, log_eta, log_keep)  # c, d (.., nc, b, ·); A, B, E (.., nc)
        factors = per_chunk_factors(coeffs, rows, n_chunks, wdtype)
        # split the stream into chunks once (unbind: no per-chunk slicing in the backward)
        per_chunk = lambda t: t[:, :, :full].reshape(rows, n_chunks, b, d).to(wdtype).unbind(1)
        k_chunks, v_chunks = per_chunk(keys), per_chunk(values)
        # queries aligned with the stream; the P pending positions were read by an earlier call
        q_al = q[:, :, : full - P] if P == 0 else torch.cat(
            [q.new_zeros(batch, H, P, d), q[:, :, : max(full - P, 0)]], 2)
        q_chunks = q_al.reshape(rows, n_chunks, b, d).unbind(1)
        # each chunk: functional.chunk_update, run by its fast equivalent (memory_fast),
        # compiled on request (every full chunk has one static shape)
        step = compiled_chunk_update() if mem.compile_chunks else fast_chunk_update

        def one_chunk(i, W, S):  # read at the chunk-start state, then write the chunk
            W, S, *out = step(W, S, k_chunks[i], v_chunks[i], q_chunks[i], factors[i], mem.kind,
                              mem.max_grad_norm, need_stats, inplace, mem.attentional_bias,
                              mem.bias_param)
            return W, S, out

        group = mem.checkpoint_chunks if torch.is_grad_enabled() else 0
        if group:  # less memory: the backward recomputes chunks (same values, memory_fast)
            W, S, outs = checkpointed_chunks(one_chunk, n_chunks, W, S, group)
        else:
            outs = []
            for i in range(n_chunks):
                W, S, out = one_chunk(i, W, S)
                outs.append(out)
        for i, (r, sur, gn) in enumerate(outs):
            skip = P if i == 0 else 0  # pending rows: read and reported by an earlier call
            reads.append(r[:, skip:] if skip else r)
            if need_stats:
                surprise.append(sur[:, skip:])
                grad_norm.append(gn[:, skip:])
    # the unfinished chunk: its new tokens read the current state; it is not written yet
    rest_q = q.reshape(rows, T, d)[:, max(full - P, 0):]
    if rest_q.shape[1]:
        if need_stats:
            skip = N - full - rest_q.shape[1]  # pending rows already reported earlier
            sur, gn = _surprise_at(mem, W, keys[:, :, full:], values[:, :, full:])
            surprise.append(sur[:, skip:])
            grad_norm.append(gn[:, skip:])
        reads.append(memory_forward(W, rest_q, mem.kind))
    reads = torch.cat(reads, 1).reshape(batch, H, T, d) if reads else q.new_zeros(batch, H, 0, d)
    new_state = MemoryState(
        weights=tuple(w.reshape(batch, H, *w.shape[1:]) for w in W),
        momentum=tuple(s.reshape(batch, H, *s.shape[1:]) for s in S),
        pending_keys=keys[:, :, full:], pending_values=values[:, :, full:],
        pending_gates=raw_logits[:, :, full:])
    inner = None
    if need_stats:
        cat = lambda xs: (torch.cat(xs, 1) if xs else q.new_zeros(rows, 0)).reshape(batch, H, T)
        inner = (cat(surprise), cat(grad_norm))
    return reads, new_state, inner


def _surprise_at(mem: NeuralMemory, W, keys: Tensor, values: Tensor):
    """Surprise ℓ = ½‖M(k; W) − v‖² and ‖∇_W ℓ‖ of tokens that are not written (yet), at the
    weights W (rows, ·, ·): keys, values (batch, H, n, d) -> two (rows, n) tensors."""
    rows, n, d = W[0].shape[0], keys.shape[2], mem.d_head
    kr, vr = keys.reshape(rows, n, d), values.reshape(rows, n, d)
    out, cache = memory_forward(W, kr, mem.kind, keep=True)
    grad_out = attentional_bias_grad(out - vr, mem.attentional_bias, mem.bias_param)
    gn = token_grad_norm(memory_backward(W, cache, grad_out), cache["inputs"])
    return attentional_bias_loss(out, vr, mem.attentional_bias, mem.bias_param), gn


def read_only(mem: NeuralMemory, q: Tensor, k: Tensor, v: Tensor, state: MemoryState,
              need_stats: bool):
    """The memory with its writes switched off (``mem.writes = False``, an ablation): every token
    reads the carried state (Φ = M₀ at the start of a document) and the state is returned as it
    came, so whatever the model recalls comes from attention and the learned M₀ alone."""
    batch, H, T, d = q.shape
    W = [w.reshape(batch * H, *w.shape[2:]) for w in state.weights]
    reads = memory_forward(W, q.reshape(batch * H, T, d).to(W[0].dtype), mem.kind)
    inner = None
    if need_stats:
        sur, gn = _surprise_at(mem, W, k.to(W[0].dtype), v.to(W[0].dtype))
        inner = (sur.reshape(batch, H, T), gn.reshape(batch, H, T))
    return reads.reshape(batch, H, T, d), replace(state), inner


def write_pending(mem: NeuralMemory, state: MemoryState) -> MemoryState:
    """Write the state's pending tokens as one final, partial chunk (``NeuralMemory.flush``)."""
    P = state.pending
    if P == 0:
        return state
    batch = state.pending_keys.shape[0]
    state.validate(mem, batch)
    theta, log_eta, log_keep, _, _ = mem._gate_values(mem._pool_gate_logits(state.pending_gates))
    coeffs = chunk_coefficients(theta, log_eta, log_keep)  # one chunk of P tokens
    rows, wdtype = batch * mem.heads, state.weights[0].dtype
    factors = per_chunk_factors(type(coeffs)(*(t.unsqueeze(2) for t in coeffs)), rows, 1,
                                wdtype)[0]
    W = [w.reshape(rows, *w.shape[2:]) for w in state.weights]
    S = [s.reshape(rows, *s.shape[2:]) for s in state.momentum]
    pending = lambda t: t.reshape(rows, P, mem.d_head)
    W, S, _, _, _ = fast_chunk_update(W, S, pending(state.pending_keys),  # eager: a partial chunk
                                      pending(state.pending_values), None, factors, mem.kind,
                                      mem.max_grad_norm, False, False, mem.attentional_bias,
                                      mem.bias_param)
    empty = state.pending_keys[:, :, :0]
    H = mem.heads
    return replace(state, weights=tuple(w.reshape(batch, H, *w.shape[1:]) for w in W),
                   momentum=tuple(s.reshape(batch, H, *s.shape[1:]) for s in S),
                   pending_keys=empty, pending_values=empty,
                   pending_gates=state.pending_gates[:, :, :0])


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
        # (B, H): ½‖M(k) − v‖², or the layer's other attentional bias; autograd differentiates it
        loss = attentional_bias_loss(pred, v, mem.attentional_bias, mem.bias_param)
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
        gradient: g_t = ∇_Φ ½‖M(k_t; Φ_start) − v_t‖²      (autograd; paper eq. 16)
        when t closes a chunk, for s in the chunk, in order:
                  S ← η_s S − θ_s g_s;   Φ ← (1 − α_s) Φ + S        (paper eqs. 14, 13)

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
