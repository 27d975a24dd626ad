"""Titans language models (MAC, MAG, MAL, LMM) and the Transformer++ / SWA baselines.

Lessons: 08 adds persistent tokens to the SWA baseline; 09 builds MAC, MAG and MAL by hand and
compares the variants; 10–12 (coming) use them; lessons 02–07 build the memory they use.

Every model is a stack of Llama-style pre-norm residual blocks [paper v1 §4.4]::

    h   = x + Mixer(RMSNorm(x))            (MAL: two mixers, memory then SWA, each pre-norm)
    out = h + SwiGLU(RMSNorm(h))

and the variants differ only in the token mixer (paper v1 §4; our
readings of the paper's ambiguities: paper-map §D6–§D8):

=============  ===================================================================================
variant        token mixer
=============  ===================================================================================
transformer    Transformer++: full causal attention with RoPE
swa            sliding-window attention (window w)
lmm            the neural memory alone: y = Mem(P ‖ u)                          (NeurIPS LMM)
mag            o = RMSNorm_a(SWA*(P ‖ u)) ⊙ σ(RMSNorm_b(Mem(P ‖ u)))           (paper eqs. 26–28, §D7)
mal            h = x + Mem(P ‖ RMSNorm(x));  h = h + SWA(RMSNorm(h))            (paper eqs. 29–31, §D8)
mac            per segment: h = M*(q) at the pre-segment memory; y = Attn(P ‖ h ‖ S);
               (m, Φ_new) = Mem(y; Φ_old);  o = RMSNorm_a(y) ⊙ σ(RMSNorm_b(m))  (paper eqs. 21–25, §D6)
=============  ===================================================================================

P are the persistent tokens (``n_persistent`` per layer, Titans variants only). In MAG the same P
are the always-visible attention prefix and the first rows the memory sees; in LMM and MAL they
are written into the memory at the start of every sequence (their output rows are dropped).
In MAC they are the attention prefix only (only segment rows are written, paper-map §D6).

``TitansLM(cfg)``: ``logits, state = model(tokens, state)``; the state carries every layer's
memory state and attention cache, so streaming in pieces equals one call, and ``generate`` never
re-runs the prefix. ``TitansConfig.preset(name, **overrides)`` holds the named sizes (``PRESETS``).

Fair comparisons: within a configuration every variant gets (about) the same parameter count.
The reference is a Transformer++ block, 4d² (attention) + 3·d·(mlp_ratio·d) (SwiGLU). Unless
``mlp_hidden`` is given, each variant's SwiGLU hidden width is chosen so that its whole block
matches that reference (memory variants therefore get a narrower MLP); see ``Block``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans_mini.attention import (
    Attention,
    KVCache,
    PersistentMemory,
    persistent_prefix,
    persistent_tokens,
)
from titans_mini.memory import NeuralMemory

__all__ = [
    "VARIANTS",
    "PRESETS",
    "TitansConfig",
    "TitansLM",
    "TitansState",
    "RMSNorm",
    "SwiGLU",
    "Block",
    "memory_writes_off",
    "memory_stats",
]

VARIANTS = ("mac", "mag", "mal", "lmm", "transformer", "swa")
MEMORY_VARIANTS = ("mac", "mag", "mal", "lmm")

# ----------------------------------------------------------------------------------------------
# Configuration and presets (the ONE place where named sizes live)
# ----------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # unit tests on a CPU: every variant runs forward+backward in milliseconds
    "tiny": dict(
        vocab_size=256, dim=32, n_layers=2, n_heads=2, memory_heads=2,
        segment_len=16, window=16, chunk_size=4, n_persistent=4, seq_len=64,
    ),
    # lessons on a laptop CPU: ~1M parameters, trains in a few minutes
    "cpu-demo": dict(
        vocab_size=256, dim=128, n_layers=4, n_heads=4, memory_heads=4,
        segment_len=32, window=32, chunk_size=8, n_persistent=8, seq_len=128,
    ),
    # lesson 11 on a free Colab T4: ~14M parameters, byte vocabulary, context 512
    "colab-t4": dict(
        vocab_size=256, dim=384, n_layers=6, n_heads=6, memory_heads=6,
        segment_len=128, window=128, chunk_size=16, n_persistent=16, seq_len=512,
    ),
    # lesson 11 on a CPU: ~0.56M parameters; two layers of window 32 see at most ~62 tokens back,
    # so a fact 120+ tokens back reaches the answer only through the memory
    "cpu-lm": dict(
        vocab_size=256, dim=128, n_layers=2, n_heads=4, memory_heads=4,
        segment_len=32, window=32, chunk_size=8, n_persistent=4, seq_len=256,
    ),
    # lesson 11 on a GPU (free Colab T4): ~4.3M parameters; four layers of window 32 reach ~124
    # tokens back, the facts of a 512-token row lie 200-450 tokens back
    "t4-lm": dict(
        vocab_size=256, dim=256, n_layers=4, n_heads=4, memory_heads=4,
        segment_len=32, window=32, chunk_size=16, n_persistent=8, seq_len=512,
    ),
}


@dataclass
class TitansConfig:
    """All hyper-parameters of a ``TitansLM``. Use ``TitansConfig.preset(name, **overrides)``.

    variant:          one of ``VARIANTS``
    vocab_size:       token ids are 0 .. vocab_size − 1 (256 = bytes)
    dim, n_layers:    model width d and number of blocks
    n_heads:          attention heads (d % n_heads == 0, head width even for RoPE)
    segment_len:      MAC segment (attention block) length C, a multiple of chunk_size
    window:           sliding window w of swa / mag / mal
    n_persistent:     persistent tokens N_p per layer (Titans variants; baselines have none)
    memory_depth:     L_M, layers of the memory MLP (1 = linear memory)
    memory_heads:     memory heads H (None = n_heads)
    memory_expansion: hidden width factor of the memory MLP
    chunk_size:       b, the memory's inner mini-batch (semantic, §3.1)
    momentum, forget: switch the memory's η (momentum) and α (weight decay) on/off
    mac_causal:       True = causal MAC (paper-map §D6); False = MAC exactly as the paper writes it (leaks!)
    mlp_ratio:        SwiGLU hidden = mlp_ratio·d in the Transformer++ reference block
    mlp_hidden:       fix every variant's SwiGLU width (None = match parameter counts)
    rope_base:        RoPE base frequency
    tie_embeddings:   share the input embedding and the output projection
    seq_len:          suggested training context length (not a limit of the model)
    alpha_init:       initial forgetting rate α of every memory (the gate bias; α stays
                      data-dependent and learned). 0.005 keeps about 1/α = 200 tokens, longer than
                      every preset's attention window; 0.05 (``NeuralMemory``'s default, a
                      common choice) forgets within ~20 tokens, and with the state carried
                      across segments every Titans variant then trained far worse than SWA
                      (bench/RESULTS.md, "Forgetting rate")
    memory_kwargs:    extra keyword arguments for ``NeuralMemory`` (they win over the fields above)
    compile_chunks:   ``torch.compile`` each memory chunk update (``NeuralMemory(compile_chunks=True)``):
                      opt-in, for GPUs, where the chunk loop is bound by kernel launches
    checkpoint_chunks: k ≥ 1 recomputes the memory's chunks in groups of k during the backward
                      (``NeuralMemory(checkpoint_chunks=k)``): less training memory, same values
    """

    variant: str = "mac"
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    segment_len: int = 32
    window: int = 32
    n_persistent: int = 4
    memory_depth: int = 2
    memory_heads: int | None = None
    memory_expansion: int = 4
    chunk_size: int = 8
    momentum: bool = True
    forget: bool = True
    mac_causal: bool = True
    mlp_ratio: float = 4.0
    mlp_hidden: int | None = None
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    seq_len: int = 256
    alpha_init: float = 0.005
    memory_kwargs: dict[str, Any] = field(default_factory=dict)
    compile_chunks: bool = False
    checkpoint_chunks: int = 0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; valid variants: {', '.join(VARIANTS)}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "segment_len", "window",
                     "memory_depth", "memory_expansion", "chunk_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.alpha_init < 1:
            raise ValueError(f"alpha_init must be in (0, 1), got {self.alpha_init}")
        if self.n_persistent < 0:
            raise ValueError(f"n_persistent must be >= 0, got {self.n_persistent}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head width dim/n_heads = {self.dim // self.n_heads} must be even (RoPE)")
        if self.dim % (self.memory_heads or self.n_heads):
            raise ValueError(f"dim ({self.dim}) must be divisible by memory_heads "
                             f"({self.memory_heads or self.n_heads})")
        if self.segment_len % self.chunk_size:
            raise ValueError(
                f"segment_len ({self.segment_len}) must be a multiple of chunk_size ({self.chunk_size})"
            )

    @classmethod
    def preset(cls, name: str, **overrides) -> TitansConfig:
        """Named sizes from ``PRESETS`` ("tiny", "cpu-demo", "colab-t4", "cpu-lm", "t4-lm"), with
        overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; valid fields: {', '.join(sorted(fields))}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes) -> TitansConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm(x) = x / sqrt(mean(x²) + ε) · g, with a learnable gain vector g (init 1)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer 2020, Llama): W₂ (SiLU(W₁ x) ⊙ W₃ x), hidden width ``hidden``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _new_memory(cfg: TitansConfig) -> nn.Module:
    settings = dict(heads=cfg.memory_heads or cfg.n_heads, depth=cfg.memory_depth,
                    expansion=cfg.memory_expansion, chunk_size=cfg.chunk_size,
                    momentum=cfg.momentum, forget=cfg.forget, alpha_init=cfg.alpha_init,
                    compile_chunks=cfg.compile_chunks, checkpoint_chunks=cfg.checkpoint_chunks)
    return NeuralMemory(cfg.dim, **(settings | cfg.memory_kwargs))  # memory_kwargs win


def _memory_with_prefix(memory: nn.Module, persistent: PersistentMemory | None, u: Tensor, state):
    """y, state = Mem(P ‖ u) at a sequence start (state None), else Mem(u; state).

    P is written into the memory at the start of every sequence (paper eq. 19); its output rows are
    dropped. The memory's chunk boundaries are counted on P ‖ x, which streaming preserves.
    """
    if state is None and persistent is not None:
        n_p = persistent.n_tokens
        y, state = memory(torch.cat([persistent_prefix(persistent, u), u], dim=1), None)
        return y[:, n_p:], state
    return memory(u, state)


# ----------------------------------------------------------------------------------------------
# Token mixers: forward(u, state) -> (o, state) with u = RMSNorm(x) (B, T, d)
# ----------------------------------------------------------------------------------------------


class AttentionMixer(nn.Module):
    """Transformer++ (``window=None``) or sliding-window attention, optionally with P."""

    def __init__(self, cfg: TitansConfig, window: int | None, n_persistent: int = 0):
        super().__init__()
        self.attn = Attention(cfg.dim, cfg.n_heads, window=window, rope_base=cfg.rope_base)
        self.persistent = persistent_tokens(n_persistent, cfg.dim)

    def forward(self, u: Tensor, state: KVCache | None) -> tuple[Tensor, KVCache]:
        prefix = persistent_prefix(self.persistent, u)
        return self.attn(u, state, prefix=prefix)


class MemoryMixer(nn.Module):
    """The neural long-term memory as a token mixer (LMM; first sublayer of MAL): Mem(P ‖ u)."""

    def __init__(self, cfg: TitansConfig):
        super().__init__()
        self.memory = _new_memory(cfg)
        self.persistent = persistent_tokens(cfg.n_persistent, cfg.dim)

    def forward(self, u: Tensor, state):
        return _memory_with_prefix(self.memory, self.persistent, u, state)


@dataclass
class MAGState:
    cache: KVCache
    memory: Any  # MemoryState


class MAGMixer(nn.Module):
    """Memory as a Gate [paper v1 eqs. 26–28, paper-map §D7].

    x̃ = P ‖ u;  y = SWA*(x̃) (P always visible);  m = Mem(x̃);  o = RMSNorm_a(y) ⊙ σ(RMSNorm_b(m)).
    The P rows of both branches are dropped. Two parallel branches: a precise short-term one
    (attention over the window) and a fading long-term one (the memory), mixed by a gate.
    """

    def __init__(self, cfg: TitansConfig):
        super().__init__()
        self.attn = Attention(cfg.dim, cfg.n_heads, window=cfg.window, rope_base=cfg.rope_base)
        self.memory = _new_memory(cfg)
        self.persistent = persistent_tokens(cfg.n_persistent, cfg.dim)
        self.norm_a = RMSNorm(cfg.dim)
        self.norm_b = RMSNorm(cfg.dim)

    def forward(self, u: Tensor, state: MAGState | None) -> tuple[Tensor, MAGState]:
        prefix = persistent_prefix(self.persistent, u)
        y, cache = self.attn(u, None if state is None else state.cache, prefix=prefix)
        m, mem_state = _memory_with_prefix(
            self.memory, self.persistent, u, None if state is None else state.memory
        )
        o = self.norm_a(y) * torch.sigmoid(self.norm_b(m))
        return o, MAGState(cache=cache, memory=mem_state)


@dataclass
class MACState:
    """Streaming state of one MAC layer.

    segment_memory: memory state at the start of the current segment, Φ^{(i−1)} (retrieval reads
                    its weights).
    memory:         running memory state while the segment's y rows are written chunk-wise
                    (equals segment_memory at a segment start).
    retrieve_context: the memory's q-conv inputs of the retrieval stream (x), across calls.
    read_context:   the same for the post-segment read of MAC-as-written (y stream).
    cache:          attention keys/values of the current segment only (P ‖ h ‖ S is per segment).
    pos:            tokens consumed so far.
    """

    segment_memory: Any
    memory: Any
    retrieve_context: Any
    read_context: Any
    cache: KVCache
    pos: int


class MACMixer(nn.Module):
    """Memory as a Context [paper v1 eqs. 21–25], causal by default (paper-map §D6).

    For each segment S of C = ``segment_len`` tokens, with Φ the memory before the segment:

        h = M*_Φ(q(S))                      retrieval at the pre-segment state      (21)
        y = Attn(P ‖ h ‖ S)                 token i sees P, h_j (j ≤ i), S_j (j ≤ i) (22)
        (m, Φ') = Mem(y; Φ)                 write y chunk-wise; read with the running state (23)
        o = RMSNorm_a(y) ⊙ σ(RMSNorm_b(m))                                          (paper eq. 25, §D7)

    The final read m_i uses the chunk-wise running state (chunks before i's chunk), so o is causal
    and (m, Φ') is exactly one forward of the memory over y. h_j sits at position j for RoPE.

    ``causal=False`` is MAC exactly as written in the paper: every token sees all of h (H1) and
    m = M*_{Φ'}(y) reads the state after the whole segment was written (H2). It leaks the future.
    It is meant for whole-sequence forward passes (lesson 09): fed in pieces (streaming,
    ``generate``), a token can only see what has arrived, so the results differ from one call.
    """

    def __init__(self, cfg: TitansConfig):
        super().__init__()
        self.segment_len = cfg.segment_len
        self.causal = cfg.mac_causal
        self.attn = Attention(cfg.dim, cfg.n_heads, window=None, rope_base=cfg.rope_base)
        self.memory = _new_memory(cfg)
        self.persistent = persistent_tokens(cfg.n_persistent, cfg.dim)
        self.norm_a = RMSNorm(cfg.dim)
        self.norm_b = RMSNorm(cfg.dim)

    def init_state(self, u: Tensor) -> MACState:
        mem0 = self.memory.init_state(u.shape[0])
        cache = self.attn.empty_cache(u.shape[0], 0, device=u.device, dtype=u.dtype)
        return MACState(mem0, mem0, None, None, cache, 0)

    def forward(self, u: Tensor, state: MACState | None) -> tuple[Tensor, MACState]:
        B, T, _ = u.shape
        C = self.segment_len
        st = self.init_state(u) if state is None else state
        seg_mem, run_mem, r_ctx, read_ctx, cache, pos = (
            st.segment_memory, st.memory, st.retrieve_context, st.read_context, st.cache, st.pos,
        )
        prefix = persistent_prefix(self.persistent, u)
        outs = []
        t = 0
        while t < T:  # one piece per (part of a) segment
            n = min(C - pos % C, T - t)
            s = u[:, t : t + n]  # (B, n, d) segment tokens
            h, r_ctx = self.memory.retrieve(s, seg_mem, context=r_ctx)  # (21) at Φ^{(i−1)}
            y, cache = self.attn(s, cache, prefix=prefix, context=h, context_always=not self.causal)
            if self.causal:
                m, run_mem = self.memory(y, run_mem)  # (23)+(24): running chunk-wise state
            else:
                _, run_mem = self.memory(y, run_mem)  # (23) write ...
                m, read_ctx = self.memory.retrieve(y, run_mem, context=read_ctx)  # (24) ... then read Φ^{(i)}
            outs.append(self.norm_a(y) * torch.sigmoid(self.norm_b(m)))
            pos += n
            t += n
            if pos % C == 0:  # segment complete: its memory becomes Φ^{(i)}, attention restarts
                seg_mem = run_mem
                cache = self.attn.empty_cache(B, pos, device=u.device, dtype=u.dtype)
        return torch.cat(outs, dim=1), MACState(seg_mem, run_mem, r_ctx, read_ctx, cache, pos)


# ----------------------------------------------------------------------------------------------
# Block and model
# ----------------------------------------------------------------------------------------------


def _reference_block_params(cfg: TitansConfig) -> int:
    """Parameters of one Transformer++ block: attention 4d², SwiGLU 3·d·(mlp_ratio·d), 2 norms."""
    d = cfg.dim
    return 4 * d * d + 3 * d * round(cfg.mlp_ratio * d) + 2 * d


class Block(nn.Module):
    """Pre-norm residual block: x = x + mixer(RMSNorm(x)) per mixer, then x + SwiGLU(RMSNorm(x)).

    Mixers: transformer [attn], swa [swa], lmm [memory], mag [mag], mac [mac],
    mal [memory, swa] (paper-map §D8). The SwiGLU hidden width is ``cfg.mlp_hidden`` if set, otherwise
    chosen (multiple of 8, at least 8) so that this block has as many parameters as the
    Transformer++ reference block, 4d² + 3·d·(mlp_ratio·d): fair comparisons at equal size.
    """

    def __init__(self, cfg: TitansConfig):
        super().__init__()
        v = cfg.variant
        if v == "transformer":
            mixers = [AttentionMixer(cfg, window=None)]
        elif v == "swa":
            mixers = [AttentionMixer(cfg, window=cfg.window)]
        elif v == "lmm":
            mixers = [MemoryMixer(cfg)]
        elif v == "mag":
            mixers = [MAGMixer(cfg)]
        elif v == "mal":
            mixers = [MemoryMixer(cfg), AttentionMixer(cfg, window=cfg.window)]
        elif v == "mac":
            mixers = [MACMixer(cfg)]
        else:  # pragma: no cover - TitansConfig validates
            raise ValueError(v)
        self.mixers = nn.ModuleList(mixers)
        self.norms = nn.ModuleList(RMSNorm(cfg.dim) for _ in mixers)
        self.mlp_norm = RMSNorm(cfg.dim)
        if cfg.mlp_hidden is not None:
            hidden = cfg.mlp_hidden
        else:
            used = sum(p.numel() for p in self.parameters())
            hidden = (_reference_block_params(cfg) - used) / (3 * cfg.dim)
            hidden = max(8, 8 * round(hidden / 8))
        self.mlp = SwiGLU(cfg.dim, hidden)

    def forward(self, x: Tensor, state: list | None) -> tuple[Tensor, list]:
        states = [None] * len(self.mixers) if state is None else state
        new_states = []
        for norm, mixer, s in zip(self.norms, self.mixers, states):
            o, s = mixer(norm(x), s)
            x = x + o
            new_states.append(s)
        x = x + self.mlp(self.mlp_norm(x))
        return x, new_states


@dataclass
class TitansState:
    """Everything a ``TitansLM`` carries between calls: per-layer mixer states and the position."""

    layers: list
    pos: int

    def detach(self) -> TitansState:
        """A copy cut from the autograd graph (truncated back-propagation through time)."""

        def cut(obj):
            if isinstance(obj, Tensor):
                return obj.detach()
            if isinstance(obj, (list, tuple)):
                return type(obj)(cut(o) for o in obj)
            if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
                return dataclasses.replace(
                    obj, **{f.name: cut(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
                )
            return obj

        return cut(self)


class TitansLM(nn.Module):
    """A byte/token language model: embedding → blocks → RMSNorm → logits.

    ``logits, state = model(tokens, state=None)``: tokens (B, T) integer ids → logits
    (B, T, vocab). Pass the returned state to continue the same sequences: the result equals one
    call on the concatenation. ``state=None`` starts new sequences (memory reset to M₀, P written).
    """

    def __init__(self, cfg: TitansConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02) for embeddings and linears, output projections of residual
        branches scaled by 1/√(2·n_layers). The neural memory keeps its own initialisation."""
        memory_prefixes = tuple(
            name + "." for name, m in self.named_modules() if isinstance(m, NeuralMemory)
        )
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if memory_prefixes and name.startswith(memory_prefixes):
                continue
            if isinstance(module, nn.Linear):
                is_out = name.endswith(("attn.wo", "mlp.w2"))
                nn.init.normal_(module.weight, std=residual_std if is_out else 0.02)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def num_params(self) -> int:
        """Number of parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def _check_tokens(self, tokens) -> None:
        if not isinstance(tokens, Tensor):
            raise ValueError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
            raise ValueError(f"tokens must have an integer dtype (e.g. torch.long), got {tokens.dtype}")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, time), got {tuple(tokens.shape)}")
        if tokens.shape[1] == 0:
            raise ValueError("tokens must contain at least one position")
        lo, hi = torch.stack(torch.aminmax(tokens)).tolist()  # one host sync per call
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(
                f"token ids must be in [0, {self.cfg.vocab_size - 1}], got values in [{lo}, {hi}]"
            )

    def forward(self, tokens: Tensor, state: TitansState | None = None) -> tuple[Tensor, TitansState]:
        """tokens (B, T) ids -> logits (B, T, vocab) and the state after the last token."""
        self._check_tokens(tokens)
        return self._forward(tokens, state)

    def _forward(self, tokens: Tensor, state: TitansState | None) -> tuple[Tensor, TitansState]:
        x = self.embed(tokens.long())  # (B, T, d)
        layer_states = [None] * len(self.blocks) if state is None else state.layers
        new_states = []
        for block, s in zip(self.blocks, layer_states):
            x, s = block(x, s)
            new_states.append(s)
        logits = self.lm_head(self.norm(x))  # (B, T, vocab)
        pos = (0 if state is None else state.pos) + tokens.shape[1]
        return logits, TitansState(layers=new_states, pos=pos)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue ``prompt`` (B, T) (or (T,)) by ``max_new_tokens`` tokens; returns (B, T + new).

        The prompt runs once; each new token is one call of length 1 with the carried state
        (attention KV caches; the memory buffers the token and writes once per completed chunk).
        ``temperature=0`` is greedy decoding; ``top_k`` keeps the k most likely tokens.
        """
        if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0 (how many tokens to add), "
                             f"got {max_new_tokens!r}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy, 1 = the "
                             f"model's own distribution), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        squeeze = isinstance(prompt, Tensor) and prompt.ndim == 1
        tokens = prompt[None] if squeeze else prompt
        self._check_tokens(tokens)
        out = [tokens]
        if max_new_tokens > 0:
            logits, state = self._forward(tokens, None)  # the prompt was checked above
            for i in range(max_new_tokens):
                nxt = self._sample(logits[:, -1].float(), temperature, top_k, generator)  # (B, 1)
                out.append(nxt.to(tokens.dtype))
                if i + 1 < max_new_tokens:  # sampled ids are valid: no check, no host sync
                    logits, state = self._forward(nxt, state)
        result = torch.cat(out, dim=1)
        return result[0] if squeeze else result

    @staticmethod
    def _sample(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
        """logits (B, V) -> next ids (B, 1)."""
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)


# ----------------------------------------------------------------------------------------------
# Ablation: the memory without its writes
# ----------------------------------------------------------------------------------------------


@contextmanager
def memory_writes_off(model: nn.Module) -> Iterator[nn.Module]:
    """Switch off the writes of every ``NeuralMemory`` in ``model`` inside a ``with`` block.

    Inside, each memory reads the state it was given — M₀ at the start of a sequence — for every
    token and never updates it (``NeuralMemory.writes = False``); the persistent tokens are not
    written either. What the model still recalls then comes from attention (its window or
    segment) and the learned M₀, so comparing accuracy with and without writes measures what
    the test-time memory itself contributes. The switches are restored on leaving the block,
    also after an error::

        with memory_writes_off(model):
            logits, _ = model(tokens)
    """
    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    if not memories:
        raise ValueError(f"{type(model).__name__} has no NeuralMemory to switch off (the "
                         "transformer and swa variants have none); use a mac, mag, mal or lmm model")
    before = [m.writes for m in memories]
    try:
        for m in memories:
            m.writes = False
        yield model
    finally:
        for m, w in zip(memories, before):
            m.writes = w


@torch.no_grad()
def memory_stats(model: nn.Module, tokens: Tensor, state=None) -> list:
    """Each ``NeuralMemory``'s statistics (``MemoryStats``: reads, per-token surprise, gradient
    norm, θ, η, α per head) while ``model`` reads ``tokens`` — e.g. the surprise of a trained
    language model's memory over a passage (lesson 11). One entry per memory call, in call order
    (one per layer for lmm / mag / mal). A memory that reads ``P ‖ x`` at a sequence start
    reports the ``N_p`` persistent tokens first."""
    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    if not memories:
        raise ValueError(f"{type(model).__name__} has no NeuralMemory (the transformer and swa "
                         "variants have none); use a mac, mag, mal or lmm model")
    calls = []
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((mod, args, kwargs)), with_kwargs=True)
        for m in memories]
    try:
        model(tokens) if state is None else model(tokens, state)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for mod, args, kwargs in calls:  # the same inputs again, now asking for the statistics
        out.append(mod(*args, **{**kwargs, "return_stats": True})[2])
    return out
