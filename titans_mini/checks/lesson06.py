"""Checks for lesson 06 (parallel training; both of its notebooks, 06a and 06b, use this module):
the chunk coefficients, a parallel scan, and one chunk of a linear memory by the weighted-gradient
route.

The references are built from :mod:`titans_mini.functional` and :mod:`titans_mini.scan`.
``linear_chunk_update`` is graded with the reference ``chunk_coefficients`` if the learner's code
calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from titans_mini import functional, scan
from titans_mini.checks.framework import Case, Check, Mistake

__all__ = ["chunk_coefficients", "linear_chunk_update", "parallel_scan"]


def _gates(gen, n, theta_scale=0.5, alpha_scale=0.3):
    return (theta_scale * torch.rand(n, generator=gen, dtype=torch.float64),
            torch.rand(n, generator=gen, dtype=torch.float64),
            alpha_scale * torch.rand(n, generator=gen, dtype=torch.float64))


# --------------------------------------------------------------------------- exercise 1


def _chunk_coefficients(theta, eta, alpha):
    return functional.chunk_coefficients(theta, torch.log(eta), torch.log1p(-alpha))


def _coefficients_cases(gen):
    th, et, al = _gates(gen, 16)
    th5, et5, al5 = _gates(gen, 5)
    th1, et1, al1 = _gates(gen, 1)
    return [
        Case("16 tokens, random gates", (th, et, al)),
        Case("5 tokens", (th5, et5, al5)),
        Case("a single token (n = 1)", (th1, et1, al1)),
        Case("no momentum (eta = 0)", (th5, torch.zeros(5, dtype=torch.float64), al5)),
        Case("no forgetting (alpha = 0)", (th5, et5, torch.zeros(5, dtype=torch.float64))),
        Case("constant gates", (torch.full((8,), 0.1, dtype=torch.float64),
                                torch.full((8,), 0.9, dtype=torch.float64),
                                torch.full((8,), 0.05, dtype=torch.float64))),
    ]


def _coefficients_inclusive(theta, eta, alpha):
    c, d, A, B, E = _chunk_coefficients(theta, eta, alpha)
    return c * (1 - alpha), d * eta, A, B, E


def _coefficients_no_forget_in_c(theta, eta, alpha):
    c, d, _, _, E = _chunk_coefficients(theta, eta, torch.zeros_like(alpha))
    _, _, A, B, _ = _chunk_coefficients(theta, eta, alpha)
    return c, d, A, B, E


def _coefficients_B_without_eta(theta, eta, alpha):
    c, d, A, B, E = _chunk_coefficients(theta, eta, alpha)
    return c, d, A, B / eta[0], E


chunk_coefficients = Check(
    "chunk_coefficients",
    reference=_chunk_coefficients,
    make_cases=_coefficients_cases,
    idea="each coefficient multiplies the gates that act AFTER token s in the chunk: go "
         "backwards from the chunk's end, accumulating the forgetting (1 - alpha) and the "
         "momentum decay eta",
    formula="backwards from the end: a_n = e_n = G_n = 1; a_s = a_{s+1} (1 - alpha_{s+1}), "
            "e_s = e_{s+1} eta_{s+1}, G_s = a_s + eta_{s+1} G_{s+1}; c = theta G, d = theta e, "
            "A = (1 - alpha_1) a_1, B = eta_1 G_1, E = eta_1 e_1 (s counted from 1)",
    mistakes=[
        Mistake("your products include token s's own gates (j >= s): only the gates after s "
                "(j > s) act on its gradient",
                _coefficients_inclusive),
        Mistake("you left the forgetting out of c: c_s = theta_s G_s, and G_s carries the "
                "products of (1 - alpha_j) after s",
                _coefficients_no_forget_in_c),
        Mistake("B is missing eta_1: the momentum at the chunk start is decayed by eta_1 before "
                "token 1 adds to it, B = eta_1 G_1",
                _coefficients_B_without_eta),
    ],
    atol=1e-8,
    rtol=1e-6,
)


# --------------------------------------------------------------------------- exercise 2


def _parallel_scan(a, b):
    return scan.linear_scan(a, b)


def _scan_cases(gen):
    def ab(*shape):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64),
                torch.randn(*shape, generator=gen, dtype=torch.float64))

    a0, b0 = ab(9)
    a0[3] = 0.0
    return [
        Case("8 steps", ab(8)),
        Case("7 steps (not a power of 2)", ab(7)),
        Case("a single step", ab(1)),
        Case("100 steps", ab(100)),
        Case("a_t = 0 at t = 3 (the recurrence restarts)", (a0, b0)),
        Case("negative a", (-torch.rand(6, generator=gen, dtype=torch.float64),
                            torch.randn(6, generator=gen, dtype=torch.float64))),
        Case("3 independent sequences (scan along the last dim)", ab(3, 10)),
    ]


parallel_scan = Check(
    "parallel_scan",
    reference=_parallel_scan,
    make_cases=_scan_cases,
    idea="two steps of h = a h + b compose into one step of the same form, so combine each "
         "position with the one 1, 2, 4, ... places before it: log2(n) rounds cover the sequence",
    formula="A, B = a, b; for step = 1, 2, 4, ... < n: for t >= step, (A_t, B_t) <- "
            "(A_t * A_{t-step}, A_t * B_{t-step} + B_t), from the OLD values (build new tensors "
            "with torch.cat); return B",
    mistakes=[
        Mistake("you summed the b's (cumsum): the a's decay what came before, "
                "h_t = a_t h_{t-1} + b_t",
                lambda a, b: torch.cumsum(b, -1)),
        Mistake("you multiplied cumprod(a) by cumsum(b): each b_s is decayed only by the a's "
                "after it, so a and b do not separate",
                lambda a, b: torch.cumprod(a, -1) * torch.cumsum(b, -1)),
        Mistake("you composed A_t with itself: combine it with the OLD A of the position step "
                "places before (A_t * A_{t-step})",
                lambda a, b: scan.linear_scan(a * a, b)),
    ],
    atol=1e-8,
    rtol=1e-6,
)


# --------------------------------------------------------------------------- exercise 3


def _linear_chunk_update(W, S, K, V, theta, eta, alpha):
    W_end, S_end, _ = functional.linear_memory_chunk(W, S, K, V, K, theta, eta, alpha)
    return W_end, S_end


def _linear_chunk_cases(gen):
    def case(n, d, momentum=True):
        W = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
        S = (0.1 * torch.randn(d, d, generator=gen, dtype=torch.float64) if momentum
             else torch.zeros(d, d, dtype=torch.float64))
        K = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
        V = torch.randn(n, d, generator=gen, dtype=torch.float64)
        return (W, S, K, V, *_gates(gen, n))

    return [
        Case("8 tokens, d = 6", case(8, 6)),
        Case("16 tokens, d = 4", case(16, 4)),
        Case("one token", case(1, 5)),
        Case("zero start momentum", case(6, 5, momentum=False)),
    ]


def _chunk_token_by_token(W, S, K, V, theta, eta, alpha):
    for s in range(K.shape[0]):  # each gradient at the running W, not at the chunk start
        S = eta[s] * S - theta[s] * torch.outer(W @ K[s] - V[s], K[s])
        W = (1 - alpha[s]) * W + S
    return W, S


def _chunk_without_B(W, S, K, V, theta, eta, alpha):
    c, d, A, _, E = _chunk_coefficients(theta, eta, alpha)
    R = K @ W.T - V
    return A * W - (c[:, None] * R).T @ K, E * S - (d[:, None] * R).T @ K


def _chunk_transposed(W, S, K, V, theta, eta, alpha):
    c, d, A, B, E = _chunk_coefficients(theta, eta, alpha)
    R = K @ W.T - V
    return A * W + B * S - (c[:, None] * K).T @ R, E * S - (d[:, None] * K).T @ R


linear_chunk_update = Check(
    "linear_chunk_update",
    reference=_linear_chunk_update,
    make_cases=_linear_chunk_cases,
    idea="every gradient of the chunk is taken at the chunk-start W, so the chunk's end is the "
         "start state (W, S) scaled by the coefficients minus a weighted sum of the gradients "
         "r_s k_s^T",
    formula="c, d, A, B, E = chunk_coefficients(theta, eta, alpha); R = K @ W.T - V; "
            "W_end = A * W + B * S - (c[:, None] * R).T @ K; S_end = E * S - (d[:, None] * R).T @ K",
    mistakes=[
        Mistake("you took each gradient at the running W (the token-by-token rule): in a chunk "
                "every gradient is taken at the chunk-start W",
                _chunk_token_by_token),
        Mistake("you left out the start momentum's share of W_end: W_end = A W + B S - ...",
                _chunk_without_B),
        Mistake("you summed k_s r_s^T: each gradient is r_s k_s^T, so the sum is "
                "(c[:, None] * R).T @ K",
                _chunk_transposed),
    ],
    uses={"chunk_coefficients": _chunk_coefficients},
    atol=1e-8,
    rtol=1e-6,
)
