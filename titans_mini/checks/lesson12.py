"""Checks for lesson 12 (ablations and beyond): the gradient of a Miras attentional bias, and one
write of a linear memory with that bias.

``err = prediction − target`` (any shape; the bias acts element by element). ``param`` is Huber's
δ or the p of ℓp (``None`` for ℓ2). The linear memory is ``M(k) = W k`` with ``W`` of shape
``(d_v, d_k)``; ``linear_memory_write`` takes the gradients of ``n`` tokens at the same ``W`` (one
chunk, no momentum, no forgetting) and is graded with the reference ``attentional_bias_grad`` if
the learner's code calls it.
"""

from __future__ import annotations

import torch

from titans_mini.checks.framework import Case, Check, Mistake
from titans_mini.functional import attentional_bias_grad as _library_bias_grad

__all__ = ["attentional_bias_grad", "linear_memory_write"]


# --------------------------------------------------------------------------- exercise 1


def _attentional_bias_grad(err, bias, param):
    return _library_bias_grad(err, bias, param)


def _grad_cases(gen: torch.Generator) -> list[Case]:
    def rand(*shape, scale=2.0):
        return scale * torch.randn(*shape, generator=gen)

    with_zeros = rand(3, 6)
    with_zeros[0, :3] = 0.0
    at_delta = torch.tensor([[-0.5, 0.5, -0.2, 0.2, 1.5, -3.0]])  # |e| = δ = 0.5 exactly
    return [
        Case("ℓ2, random (4, 8)", (rand(4, 8), "l2", None)),
        Case("Huber δ=1, random (4, 8)", (rand(4, 8), "huber", 1.0)),
        Case("Huber δ=0.5, with |e| = δ exactly", (at_delta, "huber", 0.5)),
        Case("Huber δ=2.5, random (2, 3, 5)", (rand(2, 3, 5, scale=3.0), "huber", 2.5)),
        Case("ℓp p=3, random (4, 8)", (rand(4, 8), "lp", 3.0)),
        Case("ℓp p=1.5, with e = 0 exactly", (with_zeros, "lp", 1.5)),
        Case("ℓp p=2 (equals ℓ2)", (rand(5, 4), "lp", 2.0)),
        Case("ℓp p=1 (sign(e))", (with_zeros.clone(), "lp", 1.0)),
        Case("Huber δ=0.3, with e = 0 exactly", (with_zeros.clone(), "huber", 0.3)),
        Case("ℓ2, e = 0 exactly", (with_zeros.clone(), "l2", None)),
    ]


def _only(bias_name, wrong):
    """A wrong answer for one bias; the reference for the others (so each mistake is its own)."""
    def answer(err, bias, param):
        return wrong(err, param) if bias == bias_name else _attentional_bias_grad(err, bias, param)
    return answer


attentional_bias_grad = Check(
    "attentional_bias_grad",
    reference=_attentional_bias_grad,
    make_cases=_grad_cases,
    idea="the derivative of each loss with respect to the prediction, element by element, from "
         "the error e: ℓ2 (½e²) gives e; Huber gives e inside [-δ, δ] and ±δ beyond (the slope of "
         "its linear tails); ℓp ((1/p)|e|^p) gives |e|^(p-1) with the sign of e",
    formula='if bias == "l2": return err; if bias == "huber": return err.clamp(-param, param); '
            'return err.abs().pow(param - 1) * err.sign()  # "lp"',
    mistakes=[
        Mistake("for ℓp you dropped the sign: the derivative of (1/p)|e|^p is |e|^(p-1)·sign(e), "
                "negative where e is negative",
                _only("lp", lambda e, p: e.abs().pow(p - 1))),
        Mistake("for ℓp you used the power p: the derivative of (1/p)|e|^p is |e|^(p-1)·sign(e)",
                _only("lp", lambda e, p: e.abs().pow(p) * e.sign())),
        Mistake("you clamped Huber's gradient to ±1: its linear tails have slope δ, so clamp to "
                "[-δ, δ] (param)",
                _only("huber", lambda e, d: e.clamp(-1.0, 1.0))),
        Mistake("Huber's gradient is δ·sign(e) only beyond δ: inside [-δ, δ] the loss is ½e² and "
                "its gradient is e",
                _only("huber", lambda e, d: d * e.sign())),
        Mistake("for ℓ2 you doubled the gradient: the loss is ½‖e‖², so its gradient is e, not 2e",
                _only("l2", lambda e, _: 2 * e)),
    ],
)


# --------------------------------------------------------------------------- exercise 2


def _linear_memory_write(W, k, v, theta, bias, param):
    err = k @ W.T - v  # (n, d_v): W k_i − v_i for every token
    g = _attentional_bias_grad(err, bias, param)  # ∂ℓ_i/∂M(k_i)
    return W - theta * g.T @ k  # Σ_i g_i k_iᵀ: (d_v, d_k)


def _write_cases(gen: torch.Generator) -> list[Case]:
    def make(n, d_v, d_k, theta, bias, param, v_scale=1.0):
        W = 0.3 * torch.randn(d_v, d_k, generator=gen)
        k = torch.randn(n, d_k, generator=gen) / d_k**0.5
        v = v_scale * torch.randn(n, d_v, generator=gen)
        return (W, k, v, theta, bias, param)

    return [
        Case("ℓ2, one token, d_v=3, d_k=5", make(1, 3, 5, 0.5, "l2", None)),
        Case("ℓ2, 6 tokens, d_v=4, d_k=6", make(6, 4, 6, 0.3, "l2", None)),
        Case("Huber δ=0.5, 5 tokens, d_v=6, d_k=4", make(5, 6, 4, 0.4, "huber", 0.5, v_scale=2.0)),
        Case("Huber δ=2, one outlier-sized token", make(1, 5, 5, 1.0, "huber", 2.0, v_scale=10.0)),
        Case("ℓp p=3, 4 tokens, d_v=5, d_k=3", make(4, 5, 3, 0.2, "lp", 3.0, v_scale=1.5)),
        Case("ℓp p=1.5, 3 tokens", make(3, 4, 4, 0.6, "lp", 1.5)),
        Case("θ=0: no write", make(3, 4, 5, 0.0, "huber", 1.0)),
    ]


def _write_ascent(W, k, v, theta, bias, param):
    return W + theta * _attentional_bias_grad(k @ W.T - v, bias, param).T @ k


def _write_ignores_bias(W, k, v, theta, bias, param):
    return W - theta * (k @ W.T - v).T @ k


def _write_mean(W, k, v, theta, bias, param):
    return W - theta * _attentional_bias_grad(k @ W.T - v, bias, param).T @ k / k.shape[0]


def _write_bias_on_weight_grad(W, k, v, theta, bias, param):
    # the bias applied to the weight gradient Σ_i e_i k_iᵀ instead of to the errors
    return W - theta * _attentional_bias_grad((k @ W.T - v).T @ k, bias, param)


linear_memory_write = Check(
    "linear_memory_write",
    reference=_linear_memory_write,
    make_cases=_write_cases,
    uses={"attentional_bias_grad": _attentional_bias_grad},
    idea="every token's error e_i = W k_i - v_i is taken at the same W; the bias turns it into "
         "g_i = attentional_bias_grad(e_i); by the chain rule token i's weight gradient is the outer "
         "product g_i k_iᵀ; sum over the tokens and step against it by θ",
    formula="err = k @ W.T - v  # (n, d_v); g = attentional_bias_grad(err, bias, param); "
            "return W - theta * g.T @ k",
    mistakes=[
        Mistake("you stepped up the gradient: a write lowers the loss, W - θ·Σ g_i k_iᵀ (and "
                "e = W k - v, prediction minus target)",
                _write_ascent),
        Mistake("you used the ℓ2 gradient (W k - v) whatever the bias: pass the error through "
                "attentional_bias_grad(err, bias, param) first",
                _write_ignores_bias),
        Mistake("you averaged over the tokens: the chunk's loss is the SUM of the tokens' losses, "
                "so their gradients add up",
                _write_mean),
        Mistake("you applied the bias to the weight gradient Σ e_i k_iᵀ: the bias acts on each "
                "token's error e_i = W k_i - v_i, before the outer product with k_i",
                _write_bias_on_weight_grad),
    ],
)
