"""The memory's fast path — the same maths as the plain chunk update, proven equal by tests.

:class:`titans_mini.memory.NeuralMemory` reads like the paper: projections → conv → gates →
chunk loop → read. Each chunk's read-and-write is, mathematically,
:func:`titans_mini.functional.chunk_update` (the chunked form of paper eqs. 13–14). What makes it
fast lives here, beside that plain version, the way flash-linear-attention keeps its naive
reference next to its kernels:

* :func:`fast_chunk_update` — one memory forward on [keys; queries] instead of two, the
  coefficients of all chunks prepared (negated and shaped) once per call, and
* :class:`StateUpdate` — a hand-written backward for Φ_end = AΦ + BS − (c ⊙ Δ)ᵀX that saves passes
  over the large (out × in) weight tensors;
* the in-place inference branch (no new weight tensors per chunk when no gradient is needed);
* :func:`compiled_chunk_update` — the chunk update through ``torch.compile`` (opt-in, for GPUs,
  where the chunk loop is bound by kernel launches), on torch versions where its gradients are
  verified (:func:`titans_mini.device.compile_supported`);
* :func:`checkpointed_chunks` — activation checkpointing over groups of chunks (less memory,
  one extra forward).

Proven equal (tests/test_memory.py): fast == plain ``chunk_update`` (values and gradients),
``NeuralMemory`` == ``sequential_reference`` (the token loop), compiled == eager, checkpointed ==
plain. Benchmarks: ``bench/memory_bench.py``; figures in ``bench/RESULTS.md``.
Built in lesson 06b (the weighted-gradient route and its speed).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.utils.checkpoint
from torch import Tensor

from .functional import (
    ChunkCoefficients,
    attentional_bias_grad,
    attentional_bias_loss,
    clip_factor,
    memory_backward,
    memory_forward,
    token_grad_norm,
)

__all__ = [
    "UpdateFactors",
    "StateUpdate",
    "fast_chunk_update",
    "compiled_chunk_update",
    "per_chunk_factors",
    "checkpointed_chunks",
]


class UpdateFactors(NamedTuple):
    """A chunk's coefficients in the form the fast update uses: −c, −d (N, n, L) with the minus
    sign already applied, and A, B, E shaped (N, 1, 1) to broadcast over (N, out, in) weights."""

    neg_c: Tensor
    neg_d: Tensor
    A: Tensor
    B: Tensor
    E: Tensor


def per_chunk_factors(coeffs: ChunkCoefficients, rows: int, n_chunks: int,
                      dtype: torch.dtype) -> list[UpdateFactors]:
    """Split the coefficients of every chunk of a call — c, d (batch, H, n_chunks, b, L),
    A, B, E (batch, H, n_chunks) — into one :class:`UpdateFactors` per chunk, with rows =
    batch·H. None of them depends on the memory state, so this is a handful of ops per call
    instead of per chunk (in the forward and in autograd's backward)."""
    split = lambda t: t.reshape(rows, n_chunks, *t.shape[3:]).to(dtype).unbind(1)
    parts = [split(-coeffs.c), split(-coeffs.d)]
    parts += [split(t[..., None, None]) for t in (coeffs.A, coeffs.B, coeffs.E)]
    return [UpdateFactors(*chunk) for chunk in zip(*parts)]


class StateUpdate(torch.autograd.Function):
    """Φ_end = AΦ + BS + PᵀX,  S_end = E·S + QᵀX  with P = −c ⊙ Δ, Q = −d ⊙ Δ (one layer).

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


def fast_chunk_update(W, S, keys, values, queries, factors: UpdateFactors, kind: str,
                      max_grad_norm: float | None, need_stats: bool, inplace: bool,
                      bias: str = "l2", bias_param: float | None = None):
    """:func:`titans_mini.functional.chunk_update` for N = batch·heads rows, fast.

    W, S: lists of (N, out, in); keys, values: (N, n, d); queries: (N, m, d) or None;
    factors: this chunk's :class:`UpdateFactors`. ``inplace``: update W and S in place (inference
    on private copies only). Returns (W_end, S_end, reads (N, m, d) or None, surprise (N, n) or
    None, grad_norm (N, n) or None).

    A plain function of explicit tensors and constants (no module state), so ``torch.compile``
    can trace it once and every layer with the same shapes reuses the compiled code. The
    compiled path keeps the hand-written :class:`StateUpdate` backward, which measured faster
    than letting the compiler derive that backward (figures in bench/RESULTS.md).
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
    err = out - values  # prediction error, (N, n, d)
    grad_out = attentional_bias_grad(err, bias, bias_param)  # ∂ℓ_s/∂M(k_s) (= err for ℓ2)
    deltas = memory_backward(W, cache, grad_out)  # δ^{(l)}: (N, n, out_l)
    xs = cache["inputs"]  # X^{(l)}: (N, n, in_l)
    neg_c, neg_d, A, B, E = factors
    surprise = grad_norm = None
    if need_stats or max_grad_norm is not None:
        grad_norm = token_grad_norm(deltas, xs)
        surprise = attentional_bias_loss(out, values, bias, bias_param)
        f = clip_factor(grad_norm, max_grad_norm)
        if f is not None:
            neg_c, neg_d = neg_c * f.unsqueeze(-1), neg_d * f.unsqueeze(-1)
    per_layer = neg_c.shape[-1] > 1
    W_new, S_new = [], []
    for layer, (w, s, delta, x) in enumerate(zip(W, S, deltas, xs)):
        # the minus signs of −(c ⊙ Δ)ᵀX, −(d ⊙ Δ)ᵀX sit on the small n × out factors; one shared
        # θ broadcasts its (N, n, 1) coefficient as is (no per-layer select in the graph)
        c_l = neg_c[..., layer: layer + 1] if per_layer else neg_c
        d_l = neg_d[..., layer: layer + 1] if per_layer else neg_d
        P, Q = delta * c_l, delta * d_l
        if inplace:  # inference on buffers this call owns: no new (out × in) tensors
            w.mul_(A).addcmul_(B, s).baddbmm_(P.transpose(-1, -2).to(w.dtype), x.to(w.dtype))
            s.mul_(E).baddbmm_(Q.transpose(-1, -2).to(s.dtype), x.to(s.dtype))
            w_end, s_end = w, s
        else:
            w_end, s_end = StateUpdate.apply(w, s, A, B, E, P, Q, x)
        W_new.append(w_end)
        S_new.append(s_end)
    return W_new, S_new, reads, surprise, grad_norm


_COMPILED = None


def compiled_chunk_update():
    """:func:`fast_chunk_update` wrapped in ``torch.compile`` (built on first use, shared by all
    layers). ``dynamic=False``: every full chunk has the same shapes, so one specialised graph
    per configuration serves the whole loop (a new batch size or layer shape compiles once more).
    Callers check :func:`titans_mini.device.compile_supported` first."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(fast_chunk_update, dynamic=False)
    return _COMPILED


def checkpointed_chunks(one_chunk, n_chunks: int, W, S, group: int):
    """Run ``W, S, out = one_chunk(i, W, S)`` for i < n_chunks with activation checkpointing over
    groups of ``group`` chunks: autograd keeps the state only at every group boundary and
    recomputes the chunks in between during the backward (same values and gradients).
    Returns (W, S, [out of every chunk])."""

    def run_group(lo, hi, W, S):
        outs = []
        for i in range(lo, hi):
            W, S, out = one_chunk(i, W, S)
            outs.append(out)
        return W, S, outs

    outs = []
    for lo in range(0, n_chunks, group):
        W, S, group_outs = torch.utils.checkpoint.checkpoint(
            run_group, lo, min(lo + group, n_chunks), W, S, use_reentrant=False)
        outs += group_outs
    return W, S, outs
