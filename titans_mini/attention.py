"""Attention for titans_mini: causal / sliding-window attention, RoPE, persistent memory, KV cache.

Lessons: 01 measures what full attention costs (written by hand there); 08 builds the persistent
prefix by hand, 09 the MAC attention input over [P ‖ h ‖ segment]; 10 uses the sliding-window
baselines.

This is the *short-term memory* ("core") of Titans [paper v1 §4]. One module covers every use in
the library:

* **Causal attention** (Transformer++ baseline): query t sees keys s ≤ t.
* **Sliding-window attention** (SWA, MAG, MAL): query t sees keys t − w < s ≤ t.
* **Persistent memory** [paper v1 §3.3, eq. 19]: N_p learned, input-independent vectors
  P = [p_1 … p_{N_p}] are prepended to the attention input, x̃ = P ‖ x. They are keys and values
  only: every query sees all of them (also in a sliding window, like attention sinks), they carry
  no RoPE (they have no position), and their output rows are dropped (so we never compute their
  queries). They are ``nn.Parameter``s: frozen at test time, identical for every batch element.
* **Context tokens** (MAC): extra key/value rows h_j placed at the positions j of the tokens they
  were retrieved for. Query i sees h_j for j ≤ i (causal MAC, paper-map §D6), or all of them
  (``context_always=True``: MAC exactly as the paper writes it, which leaks the future).
* **KV cache**: keys (after RoPE) and values of earlier calls, with their absolute positions, so
  ``attn(x)`` equals ``attn(x[:, :n])`` followed by ``attn(x[:, n:], cache)`` for any n. With a
  window the cache is trimmed to the keys a later query can still see (the last w − 1 tokens).

All attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (SDPA) with a
boolean mask built from positions (``True`` = may attend)::

    visible(t, s) = always(s)  or  (pos(s) ≤ t  and  t − pos(s) < w)

which is plain causal attention when w = ∞ and nothing is "always" visible. Without persistent
tokens, cache, context or window we call SDPA with ``is_causal=True`` (FlashAttention on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "rope_cos_sin",
    "apply_rope",
    "KVCache",
    "PersistentMemory",
    "persistent_tokens",
    "persistent_prefix",
    "Attention",
    "attention_mask",
]


# ----------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE, Su et al. 2021)
# ----------------------------------------------------------------------------------------------


def rope_cos_sin(
    positions: Tensor, head_dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos and sin tables for absolute ``positions`` (T,) -> each (T, head_dim).

    Channel pair (i, i + head_dim/2) rotates by the angle pos · base^(−2i/head_dim).
    Computed in float64 and cast, so the angles are exact enough at long positions.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (..., T, head_dim) by the RoPE angles: x·cos + rotate_half(x)·sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------------
# KV cache and masks
# ----------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Keys and values of earlier tokens, for streaming and generation.

    k, v:     (B, H, L, d_head); keys already rotated by RoPE at their own positions.
    key_pos:  (L,) absolute position of each cached key (shared by the batch).
    always:   (L,) bool, key visible to every later query (MAC-as-written context rows).
    pos:      number of tokens consumed so far = absolute position of the next token.
    has_context: whether context rows were ever added (then positions repeat).
    """

    k: Tensor
    v: Tensor
    key_pos: Tensor
    always: Tensor
    pos: int
    has_context: bool = False

    @property
    def length(self) -> int:
        return self.k.shape[2]


def attention_mask(
    query_pos: Tensor, key_pos: Tensor, always: Tensor, window: int | None, n_persistent: int = 0
) -> Tensor:
    """Boolean mask (T, N_p + L), ``True`` where query t may attend to key s.

    visible(t, s) = always(s) or (pos(s) ≤ t and t − pos(s) < window); persistent columns
    (the first ``n_persistent``) are always visible.
    """
    diff = query_pos[:, None] - key_pos[None, :]  # (T, L): t − pos(s)
    visible = diff >= 0
    if window is not None:
        visible = visible & (diff < window)
    visible = visible | always[None, :]
    if n_persistent:
        visible = torch.cat([visible.new_ones(len(query_pos), n_persistent), visible], dim=1)
    return visible


# ----------------------------------------------------------------------------------------------
# Persistent memory
# ----------------------------------------------------------------------------------------------


class PersistentMemory(nn.Module):
    """N_p learnable, input-independent tokens P ∈ R^{N_p × d} [paper v1 eq. 19]: x̃ = P ‖ x.

    ``forward(batch_size)`` returns P expanded (not copied) to (B, N_p, d): the very same vectors
    for every batch element. They are outer-loop parameters, never changed by a forward pass.
    Initialised like RMS-normalised inputs (unit scale), since they sit beside RMSNorm(x).
    """

    def __init__(self, n_tokens: int, dim: int):
        super().__init__()
        self.n_tokens = n_tokens
        self.tokens = nn.Parameter(torch.randn(n_tokens, dim))

    def forward(self, batch_size: int) -> Tensor:
        return self.tokens.unsqueeze(0).expand(batch_size, -1, -1)  # (B, N_p, d)


def persistent_tokens(n_tokens: int, dim: int) -> PersistentMemory | None:
    """``PersistentMemory(n_tokens, dim)``, or None when ``n_tokens`` is 0 (no persistent memory)."""
    return PersistentMemory(n_tokens, dim) if n_tokens else None


def persistent_prefix(persistent: PersistentMemory | None, x: Tensor) -> Tensor | None:
    """P expanded to x's batch size and cast to x's dtype, (B, N_p, d); None without P."""
    return None if persistent is None else persistent(x.shape[0]).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with RoPE, an optional sliding window and a KV cache.

    softmax(q_t·k_s / √d_h) over the visible keys s (see the module docstring), per head, then
    the output projection W_O. ``window=None`` is full causal attention.

    ``forward(x, cache=None, prefix=None, context=None, context_always=False)``:

    * x (B, T, d): the tokens; each produces a query and a key/value row at its position.
    * cache: the ``KVCache`` of earlier calls (``None`` = start of the sequence).
    * prefix (B, N_p, d): persistent tokens (keys/values only, always visible, no RoPE).
    * context (B, T, d): MAC retrieved tokens h, one per token of x, at the same positions;
      keys/values only. Visible causally, or to every query if ``context_always``.

    Returns ``(y, cache)``: y (B, T, d) and the cache including this call's keys (trimmed to the
    window). The prefix is never cached: it is recomputed from the parameters on each call.
    """

    def __init__(self, dim: int, n_heads: int, window: int | None = None, rope_base: float = 10000.0):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads})")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.dim, self.n_heads, self.head_dim = dim, n_heads, dim // n_heads
        if self.head_dim % 2:
            raise ValueError(f"head dim dim/n_heads = {self.head_dim} must be even for RoPE")
        self.window = window
        self.rope_base = rope_base
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        # lessons: set record_weights = True to keep the attention probabilities of the last call
        # in last_weights (B, H, T, N_p + L), keys ordered [P ‖ cached ‖ context rows ‖ tokens]
        self.record_weights = False
        self.last_weights: Tensor | None = None

    def _heads(self, x: Tensor) -> Tensor:
        """(B, T, d) -> (B, H, T, d_h)."""
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def empty_cache(self, batch_size: int, pos: int = 0, device=None, dtype=None) -> KVCache:
        """An empty cache whose next token sits at absolute position ``pos``."""
        device = device if device is not None else self.wq.weight.device
        dtype = dtype if dtype is not None else self.wq.weight.dtype
        kv = torch.zeros(batch_size, self.n_heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(
            k=kv,
            v=kv,
            key_pos=torch.zeros(0, dtype=torch.long, device=device),
            always=torch.zeros(0, dtype=torch.bool, device=device),
            pos=pos,
        )

    def forward(
        self,
        x: Tensor,
        cache: KVCache | None = None,
        prefix: Tensor | None = None,
        context: Tensor | None = None,
        context_always: bool = False,
    ) -> tuple[Tensor, KVCache]:
        B, T, _ = x.shape
        start = 0 if cache is None else cache.pos
        positions = torch.arange(start, start + T, device=x.device)  # (T,) absolute
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_base, x.dtype)

        q = apply_rope(self._heads(self.wq(x)), cos, sin)  # (B, H, T, d_h)
        k = apply_rope(self._heads(self.wk(x)), cos, sin)
        v = self._heads(self.wv(x))
        new_pos = positions
        new_always = torch.zeros(T, dtype=torch.bool, device=x.device)
        if context is not None:  # MAC: h_j rows at the positions j of their tokens
            kc = apply_rope(self._heads(self.wk(context)), cos, sin)
            vc = self._heads(self.wv(context))
            k, v = torch.cat([kc, k], dim=2), torch.cat([vc, v], dim=2)  # (B, H, 2T, d_h)
            new_pos = torch.cat([positions, positions])
            new_always = torch.cat([torch.full_like(new_always, context_always), new_always])

        if cache is not None and cache.length:
            k = torch.cat([cache.k, k], dim=2)  # (B, H, L, d_h)
            v = torch.cat([cache.v, v], dim=2)
            key_pos = torch.cat([cache.key_pos, new_pos])
            always = torch.cat([cache.always, new_always])
        else:
            key_pos, always = new_pos, new_always

        has_context = context is not None or (cache is not None and cache.has_context)
        n_p = 0 if prefix is None else prefix.shape[1]
        plain_causal = n_p == 0 and context is None and k.shape[2] == T and self.window is None
        if plain_causal and not self.record_weights:  # fast path: FlashAttention-able
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            kk, vv = k, v
            if n_p:  # persistent tokens: keys/values only, no RoPE, always visible
                kp, vp = self._heads(self.wk(prefix)), self._heads(self.wv(prefix))
                kk, vv = torch.cat([kp, k], dim=2), torch.cat([vp, v], dim=2)
            mask = attention_mask(positions, key_pos, always, self.window, n_p)  # (T, N_p + L)
            if self.record_weights:  # explicit softmax(q kᵀ/√d_h) so the weights can be kept
                scores = (q @ kk.transpose(-1, -2)) / self.head_dim**0.5
                weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
                self.last_weights = weights.detach()
                y = weights @ vv
            else:
                y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        y = self.wo(y.transpose(1, 2).reshape(B, T, self.dim))  # (B, T, d)

        # keep only the keys a later query (position >= start + T) can still see: the last w − 1
        if self.window is not None and k.shape[2] > self.window - 1:
            if not has_context:
                # plain tokens only: the keys are the consecutive positions up to start + T − 1
                drop = k.shape[2] - (self.window - 1)
                k, v, key_pos, always = k[:, :, drop:], v[:, :, drop:], key_pos[drop:], always[drop:]
            else:
                keep = always | (key_pos > start + T - self.window)
                k, v, key_pos, always = k[:, :, keep], v[:, :, keep], key_pos[keep], always[keep]
        return y, KVCache(k, v, key_pos, always, pos=start + T, has_context=has_context)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_heads={self.n_heads}, window={self.window}"

