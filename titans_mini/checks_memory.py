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


# ============================================================================ lesson 07: the memory layer

from torch import nn  # noqa: E402

# --- 07.1 the causal depthwise convolution


def _causal_conv_ref(x, weight):
    # x (B, T, C), weight (C, K): y_t = sum_j weight[:, j] * x_{t-K+1+j}, zeros before the start
    K = weight.shape[-1]
    padded = F.pad(x.transpose(1, 2), (K - 1, 0))  # (B, C, K-1+T)
    return F.conv1d(padded, weight.unsqueeze(1), groups=x.shape[-1]).transpose(1, 2)


def _causal_conv_cases(gen):
    return [
        Case("B=2, T=10, C=6, kernel 4", (torch.randn(2, 10, 6, generator=gen), torch.randn(6, 4, generator=gen))),
        Case("sequence shorter than the kernel (T=2)",
             (torch.randn(1, 2, 3, generator=gen), torch.randn(3, 4, generator=gen))),
        Case("kernel 1 (a per-channel scale)", (torch.randn(2, 5, 4, generator=gen), torch.randn(4, 1, generator=gen))),
        Case("the identity kernel [0, 0, 0, 1]",
             (torch.randn(1, 7, 3, generator=gen), torch.tensor([[0.0, 0.0, 0.0, 1.0]]).repeat(3, 1))),
    ]


def _wrong_conv_same(x, weight):
    # centred ('same') padding: output t sees future tokens
    K = weight.shape[-1]
    padded = F.pad(x.transpose(1, 2), ((K - 1) // 2, K // 2))
    return F.conv1d(padded, weight.unsqueeze(1), groups=x.shape[-1]).transpose(1, 2)


register(
    "causal_depthwise_conv",
    reference=_causal_conv_ref,
    make_cases=_causal_conv_cases,
    hint="pad K-1 zeros BEFORE the first token, then y[:, t] = sum_j weight[:, j] * padded[:, t + j] "
         "(the last tap, j = K-1, multiplies the current token); every channel has its own kernel",
    wrong=[
        _wrong_conv_same,
        lambda x, w: _causal_conv_ref(x, w.flip(-1)),  # kernel flipped: the first tap on the current token
        lambda x, w: _causal_conv_ref(x, w.sum(0, keepdim=True).expand_as(w) / w.shape[0]),  # one shared kernel
    ],
)


# --- 07.2 the gates module


class _MemoryGatesRef(nn.Module):
    def __init__(self, dim, heads, theta_max=0.1):
        super().__init__()
        self.heads, self.theta_max = heads, theta_max
        self.proj = nn.Linear(dim, 3 * heads)
        nn.init.normal_(self.proj.weight, std=0.02)
        init = torch.tensor([math.log(1 / 3), math.log(0.9 / 0.1), math.log(0.05 / 0.95)])
        with torch.no_grad():
            self.proj.bias.copy_(init.repeat(heads))

    def forward(self, x):
        B, T, _ = x.shape
        z = self.proj(x).view(B, T, self.heads, 3).permute(0, 2, 1, 3)  # (B, H, T, 3)
        theta = self.theta_max * torch.sigmoid(z[..., 0])
        return theta, torch.sigmoid(z[..., 1]), torch.sigmoid(z[..., 2])


def _gates_call(cls, case):
    dim, heads, theta_max, x, state = case.args
    torch.manual_seed(0)
    module = cls(dim, heads, theta_max)
    with torch.no_grad():
        if state is None:  # the initial gates: zero the weights, keep the module's own biases
            module.proj.weight.zero_()
        else:
            module.load_state_dict(state)
        return tuple(module(x))


def _gates_cases(gen):
    def state(dim, heads):
        return {"proj.weight": torch.randn(3 * heads, dim, generator=gen),
                "proj.bias": torch.randn(3 * heads, generator=gen)}
    return [
        Case("dim 8, 2 heads, random weights", (8, 2, 0.1, torch.randn(2, 5, 8, generator=gen), state(8, 2))),
        Case("dim 6, 1 head, theta_max 0.5", (6, 1, 0.5, torch.randn(1, 4, 6, generator=gen), state(6, 1))),
        Case("dim 8, 4 heads", (8, 4, 0.2, torch.randn(3, 3, 8, generator=gen), state(8, 4))),
        Case("initial values (weights zeroed): theta = theta_max/4, eta = 0.9, alpha = 0.05",
             (8, 2, 0.1, torch.randn(1, 3, 8, generator=gen), None)),
    ]


class _WrongGatesNoThetaMax(_MemoryGatesRef):
    def forward(self, x):
        theta, eta, alpha = super().forward(x)
        return theta / self.theta_max, eta, alpha  # forgot theta_max


class _WrongGatesLayout(_MemoryGatesRef):
    def forward(self, x):
        B, T, _ = x.shape
        z = self.proj(x).view(B, T, 3, self.heads).permute(0, 3, 1, 2)  # gate-major instead of head-major
        return self.theta_max * torch.sigmoid(z[..., 0]), torch.sigmoid(z[..., 1]), torch.sigmoid(z[..., 2])


class _WrongGatesZeroBias(_MemoryGatesRef):
    def __init__(self, dim, heads, theta_max=0.1):
        super().__init__(dim, heads, theta_max)
        with torch.no_grad():
            self.proj.bias.zero_()  # left PyTorch's default bias: gates start near 0.5


register(
    "memory_gates",
    reference=_MemoryGatesRef,
    make_cases=_gates_cases,
    call=_gates_call,
    hint="one nn.Linear named self.proj from dim to 3*heads (with bias); reshape its output to "
         "(B, T, heads, 3) -> (B, heads, T, 3): per head [theta, eta, alpha] logits; "
         "theta = theta_max*sigmoid, eta = sigmoid, alpha = sigmoid; bias = logit of the start "
         "values (logit(p) = log(p/(1-p)): logit(1/4), logit(0.9), logit(0.05))",
    wrong=[_WrongGatesNoThetaMax, _WrongGatesLayout, _WrongGatesZeroBias],
)


# --- 07.3 the output: norm, gate, projection


def _output_ref(reads, x, gain, W_gate, W_out):
    B, H, T, d = reads.shape
    r = reads * torch.rsqrt(reads.pow(2).mean(-1, keepdim=True) + 1e-6)  # RMSNorm per head
    r = r.transpose(1, 2).reshape(B, T, H * d) * gain
    return (r * F.silu(x @ W_gate.T)) @ W_out.T


def _output_cases(gen):
    def case(B, H, T, d):
        dim = H * d
        return (torch.randn(B, H, T, d, generator=gen), torch.randn(B, T, dim, generator=gen),
                1 + 0.1 * torch.randn(dim, generator=gen), torch.randn(dim, dim, generator=gen) / dim**0.5,
                torch.randn(dim, dim, generator=gen) / dim**0.5)
    return [
        Case("2 heads of 4, T = 5", case(2, 2, 5, 4)),
        Case("1 head of 8", case(1, 1, 3, 8)),
        Case("4 heads of 2", case(1, 4, 6, 2)),
    ]


def _wrong_output_norm_all(reads, x, gain, W_gate, W_out):
    B, H, T, d = reads.shape
    r = reads.transpose(1, 2).reshape(B, T, H * d)
    r = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-6) * gain  # one norm over all heads
    return (r * F.silu(x @ W_gate.T)) @ W_out.T


register(
    "memory_output",
    reference=_output_ref,
    make_cases=_output_cases,
    hint="o = W_out(RMSNorm(y) * SiLU(W_gate x)): RMSNorm each head's read over its d_head features "
         "(y / sqrt(mean(y^2) + 1e-6)), merge heads (B, H, T, d) -> (B, T, H*d), multiply by gain, "
         "by F.silu(x @ W_gate.T), then @ W_out.T",
    wrong=[
        _wrong_output_norm_all,
        lambda y, x, g, Wg, Wo: _output_ref(y, x, g, Wg, Wo) / F.silu(x @ Wg.T) * torch.sigmoid(x @ Wg.T),  # sigmoid gate
        lambda y, x, g, Wg, Wo: (y.transpose(1, 2).reshape(x.shape) * g * F.silu(x @ Wg.T)) @ Wo.T,  # no norm
    ],
)
