"""Checks for lesson 04 (momentum and forgetting): one step of the Titans update and the gated
delta rule in Titans' form.

Linear memory ``M(k) = M @ k`` with ``M`` of shape ``(d_v, d_k)``. ``gated_delta_step`` is graded
with the reference ``titans_memory_step`` if the learner's code calls it.
"""

from __future__ import annotations

import torch

from titans_mini.checks.framework import Case, Check, Mistake

__all__ = ["gated_delta_step", "titans_memory_step"]


# --------------------------------------------------------------------------- exercise 1


def _titans_memory_step(M, S, k, v, theta, eta, alpha):
    grad = torch.outer(M @ k - v, k)
    S_new = eta * S - theta * grad
    return (1 - alpha) * M + S_new, S_new


def _step_cases(gen: torch.Generator) -> list[Case]:
    def make(d_v, d_k, theta, eta, alpha):
        return (torch.randn(d_v, d_k, generator=gen), torch.randn(d_v, d_k, generator=gen),
                torch.randn(d_k, generator=gen), torch.randn(d_v, generator=gen),
                theta, eta, alpha)

    return [
        Case("θ=0.3, η=0.9, α=0.1", make(3, 5, 0.3, 0.9, 0.1)),
        Case("θ=0.8, η=0.5, α=0.4", make(6, 4, 0.8, 0.5, 0.4)),
        Case("η=0, α=0 (the delta rule)", make(4, 4, 0.5, 0.0, 0.0)),
        Case("θ=0 (no new surprise: momentum and decay only)", make(3, 2, 0.0, 0.7, 0.2)),
    ]


def _decay_after_write(M, S, k, v, theta, eta, alpha):
    S_new = eta * S - theta * torch.outer(M @ k - v, k)
    return (1 - alpha) * (M + S_new), S_new


def _ema_step(M, S, k, v, theta, eta, alpha):
    S_new = eta * S - (1 - eta) * theta * torch.outer(M @ k - v, k)
    return (1 - alpha) * M + S_new, S_new


titans_memory_step = Check(
    "titans_memory_step",
    reference=_titans_memory_step,
    make_cases=_step_cases,
    idea="two updates in order, both from the gradient at the OLD M: the momentum S keeps a "
         "decayed share of the past surprise and adds the new gradient step; then M forgets a "
         "share alpha of itself and moves by the new S",
    formula="grad = torch.outer(M @ k - v, k); S_new = eta * S - theta * grad; "
            "M_new = (1 - alpha) * M + S_new; return (M_new, S_new)",
    mistakes=[
        Mistake("you decayed the fresh write too: (1 - alpha) multiplies only the old M, then "
                "S_new is added",
                _decay_after_write),
        Mistake("you averaged the gradients (eta S - (1 - eta) theta grad): Titans' momentum adds "
                "the full step, S_new = eta S - theta grad",
                _ema_step),
        Mistake("you returned (S_new, M_new): return (M_new, S_new)",
                lambda M, S, k, v, th, eta, al: _titans_memory_step(M, S, k, v, th, eta, al)[::-1]),
    ],
)


# --------------------------------------------------------------------------- exercise 2


def _gated_delta_step(W, k, v, theta, alpha):
    return (1 - alpha) * W - theta * torch.outer(W @ k - v, k)


def _gated_cases(gen: torch.Generator) -> list[Case]:
    def make(d_v, d_k, theta, alpha):
        return (torch.randn(d_v, d_k, generator=gen), torch.randn(d_k, generator=gen),
                torch.randn(d_v, generator=gen), theta, alpha)

    return [
        Case("θ=0.5, α=0.3", make(3, 5, 0.5, 0.3)),
        Case("θ=0.2, α=0.05", make(5, 4, 0.2, 0.05)),
        Case("α=1 (erase, then write)", make(4, 3, 0.4, 1.0)),
        Case("α=0 (plain delta rule)", make(3, 3, 0.6, 0.0)),
    ]


gated_delta_step = Check(
    "gated_delta_step",
    reference=_gated_delta_step,
    make_cases=_gated_cases,
    idea="the Titans update without momentum: decay the old memory, and subtract a gradient "
         "step whose error is taken at the old, undecayed W",
    formula="(1 - alpha) * W - theta * torch.outer(W @ k - v, k)",
    mistakes=[
        Mistake("you took the error at the decayed W — that is the Gated DeltaNet form, not "
                "Titans': take it at the old W, W @ k - v",
                lambda W, k, v, th, al: (1 - al) * W - th * torch.outer((1 - al) * W @ k - v, k)),
        Mistake("you decayed the fresh write too: (1 - alpha) multiplies only the old W",
                lambda W, k, v, th, al: (1 - al) * (W - th * torch.outer(W @ k - v, k))),
    ],
    uses={"titans_memory_step": _titans_memory_step},
)
