"""Exercise checks for lessons 05-07 (registered into :mod:`titans_mini.check`).

Every reference below is built from the library itself (:mod:`titans_mini.functional`,
:mod:`titans_mini.scan`, ...), so an exercise that passes its check agrees with the code the
course uses. Each check also lists plausible wrong answers (``wrong=[...]``); the tests make sure
every one of them fails.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from titans_mini import functional
from titans_mini.check import Case, register

# ============================================================================ lesson 05: deep memory


def _deep_weights(gen, d, expansion=4, scale=1.0, dtype=torch.float32):
    W1 = torch.randn(expansion * d, d, generator=gen, dtype=dtype) / math.sqrt(d)
    W2 = scale * torch.randn(d, expansion * d, generator=gen, dtype=dtype) / math.sqrt(expansion * d)
    return W1, W2


# --- 05.1 the deep memory's forward pass


def _deep_memory_forward_ref(W1, W2, x):
    return functional.memory_forward((W1, W2), x, "residual_ln")


def _deep_memory_forward_cases(gen):
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


def _ln(z):
    return F.layer_norm(z, (z.shape[-1],), eps=1e-5)


register(
    "deep_memory_forward",
    reference=_deep_memory_forward_ref,
    make_cases=_deep_memory_forward_cases,
    hint="M(x) = x + LN(W2 GELU(W1 x)) with tokens as rows: x @ W1.T, F.gelu, @ W2.T, then "
         "F.layer_norm over the last dim (no weight/bias, eps 1e-5), then add x",
    wrong=[
        lambda W1, W2, x: _ln(F.gelu(x @ W1.T) @ W2.T),  # forgot the residual
        lambda W1, W2, x: x + F.gelu(x @ W1.T) @ W2.T,  # forgot the LayerNorm
        lambda W1, W2, x: x + _ln(F.relu(x @ W1.T) @ W2.T),  # ReLU instead of GELU
        lambda W1, W2, x: x + F.gelu(_ln(x) @ W1.T) @ W2.T,  # LayerNorm on the input (pre-norm)
    ],
)


# --- 05.2 the LayerNorm backward


def _ln_backward_ref(z, grad_u):
    mean = z.mean(-1, keepdim=True)
    rstd = torch.rsqrt((z - mean).pow(2).mean(-1, keepdim=True) + functional.LN_EPS)
    return functional.layer_norm_backward(grad_u, (z - mean) * rstd, rstd)


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


def _ln_parts(z):
    mean = z.mean(-1, keepdim=True)
    rstd = torch.rsqrt((z - mean).pow(2).mean(-1, keepdim=True) + 1e-5)
    return (z - mean) * rstd, rstd


register(
    "layer_norm_backward",
    reference=_ln_backward_ref,
    make_cases=_ln_backward_cases,
    hint="with u = (z - mean z)/sigma and g = dl/du: dl/dz = (g - mean(g) - u * mean(g * u)) / sigma, "
         "means over the last dim, sigma = sqrt(var(z) + 1e-5) with the biased variance",
    wrong=[
        # forgot the term through the variance
        lambda z, g: _ln_parts(z)[1] * (g - g.mean(-1, keepdim=True)),
        # treated LN as a plain division by sigma
        lambda z, g: _ln_parts(z)[1] * g,
        # forgot the 1/sigma factor
        lambda z, g: (g - g.mean(-1, keepdim=True)
                      - _ln_parts(z)[0] * (g * _ln_parts(z)[0]).mean(-1, keepdim=True)),
    ],
)


# --- 05.3 the deep memory's inner gradient by hand


def _deep_grads_ref(W1, W2, K, V):
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
             (W1, W2, K, _deep_memory_forward_ref(W1, W2, K))),
    ]


def _wrong_grads_no_ln_backward(W1, W2, K, V):
    Z = K @ W1.T
    H = F.gelu(Z)
    E = K + _ln(H @ W2.T) - V
    delta_1 = (E @ W2) * functional.gelu_derivative(Z)
    return delta_1.T @ K, E.T @ H  # used the error itself as delta_2


def _wrong_grads_mean(W1, W2, K, V):
    g1, g2 = _deep_grads_ref(W1, W2, K, V)
    return g1 / K.shape[0], g2 / K.shape[0]  # averaged over tokens instead of summing


def _wrong_grads_gelu(W1, W2, K, V):
    out, cache = functional.memory_forward((W1, W2), K, "residual_ln", keep=True)
    normalized, rstd = cache["ln"]
    delta_2 = functional.layer_norm_backward(out - V, normalized, rstd)
    delta_1 = (delta_2 @ W2) * F.gelu(cache["pre"][0])  # GELU instead of its derivative
    return delta_1.T @ K, delta_2.T @ cache["inputs"][1]


register(
    "deep_memory_grads",
    reference=_deep_grads_ref,
    make_cases=_deep_grads_cases,
    hint="forward keeping Z1 = K W1^T, H = GELU(Z1), Z2 = H W2^T; E = M(K) - V; "
         "delta_2 = LayerNorm backward of E; grad_W2 = delta_2^T H; "
         "delta_1 = (delta_2 W2) * GELU'(Z1); grad_W1 = delta_1^T K (sums over tokens)",
    wrong=[_wrong_grads_no_ln_backward, _wrong_grads_mean, _wrong_grads_gelu],
)
