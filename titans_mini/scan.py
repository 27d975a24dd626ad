"""First-order linear recurrences  h_t = a_t · h_{t-1} + b_t  (paper eq. 18).

Lessons: 06b builds the scan (exercise 2) and checks it against :func:`linear_scan_loop`.

With the per-token gradients g_t held fixed, both Titans updates are such recurrences:

    S_t = η_t · S_{t-1} − θ_t · g_t            (momentum,   paper eq. 14: a = η,     b = −θ g)
    M_t = (1 − α_t) · M_{t-1} + S_t            (forgetting, paper eq. 13: a = 1 − α, b = S)

Composing two steps gives another step of the same form, (a, b) ∘ (a', b') = (a·a', a'·b + b'),
and this composition is associative. That is what makes the recurrence *parallel*: instead of T
dependent steps we can combine neighbours in ⌈log2 T⌉ rounds (Hillis & Steele), each round a few
element-wise tensor operations over the whole sequence.

This module holds

* :func:`linear_scan_loop` — the obvious loop (the reference),
* :func:`linear_scan` — the parallel Hillis–Steele scan (any real ``a``, including 0 and < 0),
* :func:`segsum` — stable log-space segment sums, the building block of the within-chunk
  coefficients in :mod:`titans_mini.functional` (suffix products of gates without dividing
  cumulative products, which underflow).

All functions scan along ``dim`` (default: the last dimension). ``a`` may have fewer trailing
dimensions than ``b`` as long as it broadcasts after ``unsqueeze``-ing on the right; the simplest
is to give both the same shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_scan", "linear_scan_loop", "segsum"]


def _broadcast(a: Tensor, b: Tensor, dim: int) -> tuple[Tensor, Tensor, int]:
    """Move the scan dimension to position 0 and give ``a`` the trailing singleton dims of ``b``."""
    dim = dim % b.ndim if dim < 0 else dim
    # a is given with the leading dims of b (up to and including dim); pad it on the right.
    while a.ndim < b.ndim:
        a = a.unsqueeze(-1)
    a, b = torch.broadcast_tensors(a, b)
    return a.movedim(dim, 0), b.movedim(dim, 0), dim


def linear_scan_loop(a: Tensor, b: Tensor, h0: Tensor | None = None, dim: int = -1) -> Tensor:
    """Reference: h_t = a_t · h_{t-1} + b_t for t = 0..T-1, with h_{-1} = h0 (default 0).

    Returns every h_t, shaped like ``b``.
    """
    a_, b_, d = _broadcast(a, b, dim if dim >= 0 else b.ndim + dim)
    h = torch.zeros_like(b_[0]) if h0 is None else h0.expand_as(b_[0])
    out = []
    for t in range(b_.shape[0]):
        h = a_[t] * h + b_[t]
        out.append(h)
    return torch.stack(out, 0).movedim(0, d)


def linear_scan(a: Tensor, b: Tensor, h0: Tensor | None = None, dim: int = -1) -> Tensor:
    """Parallel (Hillis–Steele) scan of h_t = a_t · h_{t-1} + b_t; same result as the loop.

    Round r combines every position t with position t − 2^r:

        (A_t, B_t) ← (A_t · A_{t−2^r},  A_t · B_{t−2^r} + B_t)

    After ⌈log2 T⌉ rounds, (A_t, B_t) describes the map from h_{-1} to h_t, so
    h_t = A_t · h0 + B_t. O(T log T) work, O(log T) depth — on a GPU the depth is what counts.
    """
    a_, b_, d = _broadcast(a, b, dim if dim >= 0 else b.ndim + dim)
    T = b_.shape[0]
    A, Bv = a_, b_
    step = 1
    while step < T:
        # positions t >= step combine with t - step; the first `step` positions are final
        A_prev, B_prev = A[:-step], Bv[:-step]
        A_new = A[step:] * A_prev
        B_new = A[step:] * B_prev + Bv[step:]
        A = torch.cat([A[:step], A_new], 0)
        Bv = torch.cat([Bv[:step], B_new], 0)
        step *= 2
    h = Bv if h0 is None else A * h0.unsqueeze(0) + Bv
    return h.movedim(0, d)


def segsum(x: Tensor) -> Tensor:
    """Segment sums  out[..., i, j] = Σ_{k=j+1}^{i} x[..., k]  for i ≥ j, and −inf for i < j.

    ``exp(segsum(log a))[i, j] = Π_{k=j+1}^{i} a_k`` is the product of the gates strictly after j
    up to i — the decay from position j to position i. Computed by masking and a cumulative sum
    *per column*, never as a difference of two long cumulative sums, so that no precision is lost
    and no 0/0 appears when some a_k is tiny (the entries are sums of non-positive numbers when
    the x are log-gates, hence exp of them is in [0, 1]).

    x: (..., n)  ->  (..., n, n)
    """
    n = x.shape[-1]
    xx = x.unsqueeze(-1).expand(*x.shape, n)  # xx[..., k, j] = x_k
    strict = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)  # k > j
    xx = xx.masked_fill(~strict, 0.0)
    out = torch.cumsum(xx, dim=-2)  # out[..., i, j] = Σ_{k ≤ i, k > j} x_k
    lower = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(0)  # i ≥ j
    return out.masked_fill(~lower, float("-inf"))
