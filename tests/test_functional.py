"""Pure pieces of the memory: forward, hand-written backward, coefficients, closed forms.

Oracles from titans-reference §9: T3 (two scans ≡ loop), T4 (linear closed forms), T6 (constant
gates), T7 (inner gradient δxᵀ ≡ autograd).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from titans_mini.functional import (
    associative_loss,
    chunk_coefficients,
    chunk_coefficients_recurrence,
    gelu_derivative,
    layer_norm_backward,
    linear_memory_chunk,
    memory_backward,
    memory_forward,
)
from titans_mini.scan import linear_scan

DT = torch.float64



def _weights(kind, d=5, h=7, depth=2, gen=None, batch=()):
    if kind == "linear":
        return (torch.randn(*batch, d, d, generator=gen, dtype=DT),)
    shapes = [(h, d)] + [(h, h)] * (depth - 2) + [(d, h)]
    return tuple(torch.randn(*batch, o, i, generator=gen, dtype=DT) / math.sqrt(i) * 2
                 for o, i in shapes)


def _explicit_memory(weights, x, kind):
    """M(x) written independently with nn.functional (no shared code)."""
    if kind == "linear":
        return x @ weights[0].transpose(-1, -2)
    h = x
    for w in weights[:-1]:
        h = F.gelu(h @ w.transpose(-1, -2))
    z = h @ weights[-1].transpose(-1, -2)
    if kind == "mlp":
        return z
    return x + F.layer_norm(z, z.shape[-1:], eps=1e-5)


@pytest.mark.parametrize("kind,depth", [("linear", 1), ("mlp", 2), ("residual_ln", 2),
                                        ("residual_ln", 3), ("mlp", 3)])
def test_memory_forward_matches_explicit(kind, depth):
    g = torch.Generator().manual_seed(0)
    W = _weights(kind, depth=depth, gen=g, batch=(2, 3))
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=DT)
    torch.testing.assert_close(memory_forward(W, x, kind), _explicit_memory(W, x, kind))


@pytest.mark.parametrize("kind,depth", [("linear", 1), ("mlp", 2), ("residual_ln", 2),
                                        ("residual_ln", 3)])
def test_inner_gradient_outer_product_matches_autograd(kind, depth):
    """T7: for every token s, δ_s^{(l)} x_s^{(l)ᵀ} (from ONE backward of the summed loss) equals
    autograd of that token's own loss ℓ_s alone."""
    g = torch.Generator().manual_seed(1)
    W = _weights(kind, depth=depth, gen=g)
    k = torch.randn(6, 5, generator=g, dtype=DT)
    v = torch.randn(6, 5, generator=g, dtype=DT)
    out, cache = memory_forward(W, k, kind, keep=True)
    deltas = memory_backward(W, cache, out - v)
    for s in range(6):
        Wr = tuple(w.clone().requires_grad_(True) for w in W)
        loss = associative_loss(_explicit_memory(Wr, k[s: s + 1], kind), v[s: s + 1]).sum()
        grads = torch.autograd.grad(loss, Wr)
        for layer, gl in enumerate(grads):
            mine = torch.outer(deltas[layer][s], cache["inputs"][layer][s])
            torch.testing.assert_close(mine, gl, rtol=1e-10, atol=1e-12)


def test_hand_written_backward_passes_gradcheck():
    """The hand-written backward is itself differentiable (the outer loop goes through it)."""
    g = torch.Generator().manual_seed(2)
    W = tuple(w.requires_grad_(True) for w in _weights("residual_ln", d=3, h=4, gen=g))
    k = torch.randn(2, 3, generator=g, dtype=DT, requires_grad=True)
    v = torch.randn(2, 3, generator=g, dtype=DT, requires_grad=True)

    def fn(w1, w2, k, v):
        out, cache = memory_forward((w1, w2), k, "residual_ln", keep=True)
        return tuple(memory_backward((w1, w2), cache, out - v))

    assert torch.autograd.gradcheck(fn, (*W, k, v))


def _random_gates(gen, shape, small_eta=False):
    theta = torch.rand(shape, generator=gen, dtype=DT) * 0.5
    eta = torch.rand(shape, generator=gen, dtype=DT)
    if small_eta:
        eta = eta * 1e-12
    alpha = torch.rand(shape, generator=gen, dtype=DT)
    return theta, eta, alpha


@pytest.mark.parametrize("small_eta", [False, True])
def test_log_space_coefficients_match_recurrence(small_eta):
    g = torch.Generator().manual_seed(3)
    theta, eta, alpha = _random_gates(g, (4, 16), small_eta)
    fast = chunk_coefficients(theta, eta.log(), torch.log1p(-alpha))
    slow = chunk_coefficients_recurrence(theta, eta, alpha)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-300)


def test_coefficients_without_momentum_reduce_to_eq8():
    """η ≡ 0: c_s = θ_s β_n/β_s, d_s = θ_s·1[s = n], B = 0 (reference §3.2)."""
    g = torch.Generator().manual_seed(4)
    theta, _, alpha = _random_gates(g, (3, 9))
    log_eta = torch.full_like(theta, float("-inf"))
    c, d, A, B, E = chunk_coefficients(theta, log_eta, torch.log1p(-alpha))
    beta = torch.cumprod(1 - alpha, -1)
    torch.testing.assert_close(c, theta * beta[:, -1:] / beta)
    expected_d = torch.zeros_like(theta)
    expected_d[:, -1] = theta[:, -1]
    torch.testing.assert_close(d, expected_d)
    torch.testing.assert_close(B, torch.zeros_like(B))
    torch.testing.assert_close(E, torch.zeros_like(E))
    torch.testing.assert_close(A, beta[:, -1])


def test_constant_gates_give_geometric_kernel():
    """T6: gates constant within a chunk make the chunk time-invariant: G_s is a fixed kernel,
    G_s = Σ_{r=s}^{n} (1−α)^{n−r} η^{r−s}."""
    n, eta, alpha, theta = 8, 0.7, 0.2, 0.3
    ones = torch.ones(1, n, dtype=DT)
    c, d, A, B, E = chunk_coefficients(theta * ones, math.log(eta) * ones,
                                       math.log(1 - alpha) * ones)
    for s in range(n):
        G = sum((1 - alpha) ** (n - 1 - r) * eta ** (r - s) for r in range(s, n))
        assert c[0, s].item() == pytest.approx(theta * G, rel=1e-12)
        assert d[0, s].item() == pytest.approx(theta * eta ** (n - 1 - s), rel=1e-12)
    assert A.item() == pytest.approx((1 - alpha) ** n, rel=1e-12)
    assert E.item() == pytest.approx(eta ** n, rel=1e-12)


def test_per_layer_theta_coefficients():
    g = torch.Generator().manual_seed(5)
    theta, eta, alpha = _random_gates(g, (2, 6))
    theta_l = torch.stack([theta, 2 * theta, 0.5 * theta], -1)
    c, d, *_ = chunk_coefficients(theta_l, eta.log(), torch.log1p(-alpha))
    c1, d1, *_ = chunk_coefficients(theta, eta.log(), torch.log1p(-alpha))
    torch.testing.assert_close(c, torch.stack([c1, 2 * c1, 0.5 * c1], -1))
    torch.testing.assert_close(d, torch.stack([d1, 2 * d1, 0.5 * d1], -1))


@pytest.mark.parametrize("small_eta", [False, True])
def test_two_scans_and_weighted_sum_match_loop(small_eta):
    """T3 + eqs. 14–15: with fixed g_s, the momentum and forgetting recurrences as two parallel
    scans, and the end-of-chunk weighted sums, all equal the plain loop."""
    g = torch.Generator().manual_seed(6)
    n = 13
    theta, eta, alpha = _random_gates(g, (n,), small_eta)
    grads = torch.randn(n, 3, 4, generator=g, dtype=DT)
    phi0 = torch.randn(3, 4, generator=g, dtype=DT)
    s0 = torch.randn(3, 4, generator=g, dtype=DT)
    # loop (eqs. 4–5)
    S, Phi, Ss, Phis = s0, phi0, [], []
    for s in range(n):
        S = eta[s] * S - theta[s] * grads[s]
        Phi = (1 - alpha[s]) * Phi + S
        Ss.append(S)
        Phis.append(Phi)
    # two scans
    S_scan = linear_scan(eta, -theta[:, None, None] * grads, s0, dim=0)
    Phi_scan = linear_scan(1 - alpha, S_scan, phi0, dim=0)
    torch.testing.assert_close(S_scan, torch.stack(Ss))
    torch.testing.assert_close(Phi_scan, torch.stack(Phis))
    # closed form at the end of the chunk
    c, d, A, B, E = chunk_coefficients(theta, eta.log(), torch.log1p(-alpha))
    Phi_end = A * phi0 + B * s0 - (c[:, None, None] * grads).sum(0)
    S_end = E * s0 - (d[:, None, None] * grads).sum(0)
    torch.testing.assert_close(Phi_end, Phis[-1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S_end, Ss[-1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("no_momentum", [False, True])
def test_linear_closed_forms_match_loop(no_momentum):
    """T4: eqs. (9), (10), (13): end-of-chunk W, S and reads after each token's own write."""
    g = torch.Generator().manual_seed(7)
    n, dh = 11, 4
    theta, eta, alpha = _random_gates(g, (2, n))
    if no_momentum:
        eta = torch.full_like(eta, 1e-300) * 0  # η ≡ 0 exactly
    W0 = torch.randn(2, dh, dh, generator=g, dtype=DT)
    S0 = torch.zeros(2, dh, dh, dtype=DT) if no_momentum else torch.randn(2, dh, dh, generator=g,
                                                                          dtype=DT)
    K = F.normalize(torch.randn(2, n, dh, generator=g, dtype=DT), dim=-1)
    V = torch.randn(2, n, dh, generator=g, dtype=DT)
    Q = torch.randn(2, n, dh, generator=g, dtype=DT)
    # loop: gradients at the chunk start W0 (D5)
    W, S, reads = W0, S0, []
    for s in range(n):
        grad = (W0 @ K[:, s, :, None] - V[:, s, :, None]) @ K[:, s, None, :]
        S = eta[:, s, None, None] * S - theta[:, s, None, None] * grad
        W = (1 - alpha[:, s, None, None]) * W + S
        reads.append((W @ Q[:, s, :, None])[..., 0])
    W_end, S_end, Y = linear_memory_chunk(W0, S0, K, V, Q, theta, eta, alpha)
    torch.testing.assert_close(W_end, W, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S_end, S, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Y, torch.stack(reads, 1), rtol=1e-12, atol=1e-12)
    if no_momentum:  # (13) reduces to (10): D[s,t] = θ_s β_t/β_s 1[s ≤ t]
        beta = torch.cumprod(1 - alpha, -1)
        D = (theta[:, :, None] * beta[:, None, :] / beta[:, :, None]).triu()
        R = K @ W0.transpose(-1, -2) - V
        Y10 = (Q @ W0.transpose(-1, -2)) * beta[..., None] - (D * (K @ Q.transpose(-1, -2))
                                                              ).transpose(-1, -2) @ R
        torch.testing.assert_close(Y, Y10, rtol=1e-12, atol=1e-12)


def test_explicit_gelu_and_layer_norm_backward_match_fused_kernels():
    """The spelled-out formulas (used in the lessons) equal the fused kernels the layer uses."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(4, 6, generator=g, dtype=DT)
    up = torch.randn(4, 6, generator=g, dtype=DT)
    torch.testing.assert_close(up * gelu_derivative(z), torch.ops.aten.gelu_backward(up, z))
    zr = z.clone().requires_grad_(True)
    (F.layer_norm(zr, (6,), eps=1e-5) * up).sum().backward()
    mean, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + 1e-5)
    torch.testing.assert_close(layer_norm_backward(up, (z - mean) * rstd, rstd), zr.grad)
