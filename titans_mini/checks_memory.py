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


# ============================================================================ lesson 06: parallel training

from titans_mini import scan  # noqa: E402

# --- 06.1 the chunk coefficients from the gates


def _coefficients_ref(theta, eta, alpha):
    return functional.chunk_coefficients(theta, torch.log(eta), torch.log1p(-alpha))


def _gates(gen, n, theta_scale=0.5, alpha_scale=0.3):
    return (theta_scale * torch.rand(n, generator=gen, dtype=torch.float64),
            torch.rand(n, generator=gen, dtype=torch.float64),
            alpha_scale * torch.rand(n, generator=gen, dtype=torch.float64))


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


def _wrong_coefficients_inclusive(theta, eta, alpha):
    # products over j >= s instead of j > s (an off-by-one)
    c, d, A, B, E = _coefficients_ref(theta, eta, alpha)
    return c * (1 - alpha), d * eta, A, B, E


def _wrong_coefficients_no_forget_in_c(theta, eta, alpha):
    # forgot the forgetting that follows token s in c_s
    c, d, A, B, E = _coefficients_ref(theta, eta, torch.zeros_like(alpha))
    return c, d, _coefficients_ref(theta, eta, alpha)[2], _coefficients_ref(theta, eta, alpha)[3], E


def _wrong_coefficients_B(theta, eta, alpha):
    # B = G_1 instead of eta_1 * G_1 (the chunk-start momentum is decayed by eta_1 first)
    c, d, A, B, E = _coefficients_ref(theta, eta, alpha)
    return c, d, A, B / eta[0], E


register(
    "chunk_coefficients",
    reference=_coefficients_ref,
    make_cases=_coefficients_cases,
    hint="go backwards from the chunk's end: a_n = e_n = G_n = 1; a_s = a_{s+1}(1 - alpha_{s+1}), "
         "e_s = e_{s+1} eta_{s+1}, G_s = a_s + eta_{s+1} G_{s+1}; c = theta G, d = theta e, "
         "A = (1 - alpha_1) a_1, B = eta_1 G_1, E = eta_1 e_1 (s counted from 1)",
    wrong=[_wrong_coefficients_inclusive, _wrong_coefficients_no_forget_in_c, _wrong_coefficients_B],
    atol=1e-8,
    rtol=1e-6,
)


# --- 06.2 a parallel scan


def _scan_ref(a, b):
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


def _wrong_scan_prod_sum(a, b):
    return torch.cumprod(a, -1) * torch.cumsum(b, -1)  # treats a and b as if they were separable


def _wrong_scan_shift(a, b):
    # composed each a_t with itself (a_t * a_t) instead of with the neighbour's A
    return scan.linear_scan(a * a, b)


register(
    "parallel_scan",
    reference=_scan_ref,
    make_cases=_scan_cases,
    hint="keep pairs (A, B) = (a, b); for step = 1, 2, 4, ... < n: for t >= step, "
         "(A_t, B_t) <- (A_t * A_{t-step}, A_t * B_{t-step} + B_t), computed from the OLD values "
         "(build new tensors with torch.cat); the answer is B",
    wrong=[lambda a, b: torch.cumsum(b, -1), _wrong_scan_prod_sum, _wrong_scan_shift],
    atol=1e-8,
    rtol=1e-6,
)


# --- 06.3 one chunk of a linear memory by the weighted-gradient route


def _linear_chunk_ref(W, S, K, V, theta, eta, alpha):
    W_end, S_end, _ = functional.linear_memory_chunk(W, S, K, V, K, theta, eta, alpha)
    return W_end, S_end


def _linear_chunk_cases(gen):
    def case(n, d, momentum=True):
        W = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
        S = 0.1 * torch.randn(d, d, generator=gen, dtype=torch.float64) if momentum else torch.zeros(d, d, dtype=torch.float64)
        K = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
        V = torch.randn(n, d, generator=gen, dtype=torch.float64)
        th, et, al = _gates(gen, n)
        return (W, S, K, V, th, et, al)
    return [
        Case("8 tokens, d = 6", case(8, 6)),
        Case("16 tokens, d = 4", case(16, 4)),
        Case("one token", case(1, 5)),
        Case("zero start momentum", case(6, 5, momentum=False)),
    ]


def _wrong_linear_chunk_sequential(W, S, K, V, theta, eta, alpha):
    # the exact token-by-token rule: each gradient at the running W (not at the chunk start)
    for s in range(K.shape[0]):
        g = torch.outer(W @ K[s] - V[s], K[s])
        S = eta[s] * S - theta[s] * g
        W = (1 - alpha[s]) * W + S
    return W, S


def _wrong_linear_chunk_no_B(W, S, K, V, theta, eta, alpha):
    c, d, A, B, E = _coefficients_ref(theta, eta, alpha)
    R = K @ W.T - V
    return A * W - (c[:, None] * R).T @ K, E * S - (d[:, None] * R).T @ K  # forgot B * S


def _wrong_linear_chunk_transposed(W, S, K, V, theta, eta, alpha):
    c, d, A, B, E = _coefficients_ref(theta, eta, alpha)
    R = K @ W.T - V
    return (A * W + B * S - (c[:, None] * K).T @ R,  # k r^T instead of r k^T
            E * S - (d[:, None] * K).T @ R)


register(
    "linear_chunk_update",
    reference=_linear_chunk_ref,
    make_cases=_linear_chunk_cases,
    hint="the residual rows R = K @ W.T - V are the deltas (g_s = r_s k_s^T); with c, d, A, B, E "
         "from the gates: W_end = A W + B S - (c[:, None] * R).T @ K, "
         "S_end = E S - (d[:, None] * R).T @ K",
    wrong=[_wrong_linear_chunk_sequential, _wrong_linear_chunk_no_B, _wrong_linear_chunk_transposed],
    atol=1e-8,
    rtol=1e-6,
)
