"""Checks for lesson 05 (deep memory): the deep memory's forward pass, the LayerNorm backward and
the deep memory's inner gradient by hand.

The references are built from :mod:`titans_mini.functional`, so an exercise that passes agrees with
the library. ``deep_memory_grads`` is graded with the references of the lesson's earlier exercises
(``deep_memory``, ``layer_norm_backward``) if the learner's code calls them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from titans_mini import functional
from titans_mini.checks.framework import Case, Check, Mistake

__all__ = ["deep_memory_forward", "deep_memory_grads", "layer_norm_backward"]


def _deep_weights(gen, d, expansion=4, scale=1.0):
    W1 = torch.randn(expansion * d, d, generator=gen) / math.sqrt(d)
    W2 = scale * torch.randn(d, expansion * d, generator=gen) / math.sqrt(expansion * d)
    return W1, W2


def _ln(z):
    return F.layer_norm(z, (z.shape[-1],), eps=1e-5)


# --------------------------------------------------------------------------- exercise 1


def _deep_memory(W1, W2, x):
    return functional.memory_forward((W1, W2), x, "residual_ln")


def _deep_memory_cases(gen):
    W1, W2 = _deep_weights(gen, 8)
    W1b, W2b = _deep_weights(gen, 16, expansion=1)
    W1c, W2c = _deep_weights(gen, 6, scale=100.0)
    return [
        Case("5 tokens, d = 8, expansion 4", (W1, W2, torch.randn(5, 8, generator=gen))),
        Case("one token", (W1, W2, torch.randn(1, 8, generator=gen))),
        Case("d = 16, expansion 1", (W1b, W2b, torch.randn(7, 16, generator=gen))),
        Case("large W2 (the LayerNorm removes its scale)", (W1c, W2c, torch.randn(4, 6, generator=gen))),
        Case("extra leading dims (2, 3, d)", (W1, W2, torch.randn(2, 3, 8, generator=gen))),
    ]


deep_memory_forward = Check(
    "deep_memory_forward",
    reference=_deep_memory,
    make_cases=_deep_memory_cases,
    idea="a two-layer MLP applied to every row, a LayerNorm of its output, and a residual "
         "connection around both",
    formula="x + F.layer_norm(F.gelu(x @ W1.T) @ W2.T, (d,), eps=1e-5) (no LayerNorm weight or "
            "bias, normalised over the last dim)",
    mistakes=[
        Mistake("you left out the residual: add x to the normalised MLP output",
                lambda W1, W2, x: _ln(F.gelu(x @ W1.T) @ W2.T)),
        Mistake("you left out the LayerNorm: normalise the MLP output over the last dim before "
                "adding x",
                lambda W1, W2, x: x + F.gelu(x @ W1.T) @ W2.T),
        Mistake("you used ReLU: the memory's activation is GELU (F.gelu)",
                lambda W1, W2, x: x + _ln(F.relu(x @ W1.T) @ W2.T)),
        Mistake("you normalised the input (pre-norm): the LayerNorm goes on the MLP's output, "
                "x + LN(W2 GELU(W1 x))",
                lambda W1, W2, x: x + F.gelu(_ln(x) @ W1.T) @ W2.T),
    ],
)


# --------------------------------------------------------------------------- exercise 2


def _ln_parts(z):
    mean = z.mean(-1, keepdim=True)
    rstd = torch.rsqrt((z - mean).pow(2).mean(-1, keepdim=True) + functional.LN_EPS)
    return (z - mean) * rstd, rstd


def _layer_norm_backward(z, grad_u):
    u, rstd = _ln_parts(z)
    return functional.layer_norm_backward(grad_u, u, rstd)


def _ln_backward_cases(gen):
    return [
        Case("4 rows of 8 features", (torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen))),
        Case("one row of 16", (torch.randn(1, 16, generator=gen), torch.randn(1, 16, generator=gen))),
        Case("inputs of large scale (the gradient shrinks by 1/sigma)",
             (30.0 * torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen))),
        Case("inputs of small scale (the gradient grows by 1/sigma)",
             (0.05 * torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen))),
        Case("an upstream gradient that is constant over the features",
             (torch.randn(2, 5, generator=gen), torch.ones(2, 5))),
    ]


def _ln_backward_no_sigma(z, g):
    u, _ = _ln_parts(z)
    return g - g.mean(-1, keepdim=True) - u * (g * u).mean(-1, keepdim=True)


layer_norm_backward = Check(
    "layer_norm_backward",
    reference=_layer_norm_backward,
    make_cases=_ln_backward_cases,
    idea="LayerNorm subtracts the mean and divides by sigma, and both depend on z: the gradient "
         "is g with its mean removed and its component along u removed, divided by sigma",
    formula="(g - g.mean(-1, keepdim=True) - u * (g * u).mean(-1, keepdim=True)) / sigma, with "
            "u = (z - mu) / sigma, sigma = sqrt(mean((z - mu)**2) + 1e-5) (biased variance), "
            "means over the last dim",
    mistakes=[
        Mistake("you left out the path through the variance: subtract u * mean(g * u) too",
                lambda z, g: _ln_parts(z)[1] * (g - g.mean(-1, keepdim=True))),
        Mistake("you treated LayerNorm as a division by a constant sigma: its mean and variance "
                "depend on z too",
                lambda z, g: _ln_parts(z)[1] * g),
        Mistake("you forgot to divide by sigma at the end", _ln_backward_no_sigma),
    ],
)


# --------------------------------------------------------------------------- exercise 3


def _deep_memory_grads(W1, W2, K, V):
    out, cache = functional.memory_forward((W1, W2), K, "residual_ln", keep=True)
    deltas = functional.memory_backward((W1, W2), cache, out - V)
    grad_W1 = deltas[0].transpose(-1, -2) @ cache["inputs"][0]
    grad_W2 = deltas[1].transpose(-1, -2) @ cache["inputs"][1]
    return grad_W1, grad_W2


def _deep_grads_cases(gen):
    W1, W2 = _deep_weights(gen, 8)
    W1b, W2b = _deep_weights(gen, 12, expansion=2)
    K = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    return [
        Case("6 tokens, d = 8", (W1, W2, K, torch.randn(6, 8, generator=gen))),
        Case("one token", (W1, W2, K[:1], torch.randn(1, 8, generator=gen))),
        Case("d = 12, expansion 2, 10 tokens",
             (W1b, W2b, torch.randn(10, 12, generator=gen), torch.randn(10, 12, generator=gen))),
        Case("values already stored (M(k) = v: zero gradient)",
             (W1, W2, K, _deep_memory(W1, W2, K))),
    ]


def _grads_no_ln_backward(W1, W2, K, V):
    Z = K @ W1.T
    H = F.gelu(Z)
    E = K + _ln(H @ W2.T) - V
    delta_1 = (E @ W2) * functional.gelu_derivative(Z)
    return delta_1.T @ K, E.T @ H  # the error itself used as delta_2


def _grads_mean(W1, W2, K, V):
    g1, g2 = _deep_memory_grads(W1, W2, K, V)
    return g1 / K.shape[0], g2 / K.shape[0]


def _grads_gelu_not_derivative(W1, W2, K, V):
    Z1 = K @ W1.T
    H = F.gelu(Z1)
    Z2 = H @ W2.T
    delta_2 = _layer_norm_backward(Z2, K + _ln(Z2) - V)
    delta_1 = (delta_2 @ W2) * F.gelu(Z1)  # GELU itself instead of its derivative
    return delta_1.T @ K, delta_2.T @ H


deep_memory_grads = Check(
    "deep_memory_grads",
    reference=_deep_memory_grads,
    make_cases=_deep_grads_cases,
    idea="backpropagate the error E = M(K) - V through the LayerNorm, W2, the GELU and W1; each "
         "weight's gradient is a sum over tokens of outer products delta x^T, one matmul per layer",
    formula="forward keeping Z1 = K @ W1.T, H = F.gelu(Z1), Z2 = H @ W2.T; E = M(K) - V; "
            "delta_2 = layer_norm_backward(Z2, E); grad_W2 = delta_2.T @ H; "
            "delta_1 = (delta_2 @ W2) * gelu_derivative(Z1); grad_W1 = delta_1.T @ K",
    mistakes=[
        Mistake("you skipped the LayerNorm backward: delta_2 is layer_norm_backward(Z2, E), not "
                "E itself",
                _grads_no_ln_backward),
        Mistake("you averaged over the tokens: the loss is a SUM over tokens, so are its gradients",
                _grads_mean),
        Mistake("you multiplied by GELU(Z1): the chain rule needs its derivative, "
                "gelu_derivative(Z1)",
                _grads_gelu_not_derivative),
    ],
    uses={"deep_memory": _deep_memory, "layer_norm_backward": _layer_norm_backward},
)
