"""NeuralMemory: the chunked layer against independent token-by-token code.

Oracles (titans-reference §9): T1 chunk 1 ≡ online GD, T2 fast ≡ loop, T5 reductions, T8 outer
gradients, T9 causality, T10 streaming, T12 zero-M₀ trap, T13 stability; plus input validation.
Exactness tests run in float64.
"""

import math

import pytest
import torch

from titans_mini import MemoryState, NeuralMemory
from titans_mini.functional import associative_loss
from titans_mini.memory import MemoryStats, sequential_reference

DT = torch.float64
STAT_NAMES = ("reads", "surprise", "grad_norm", "theta", "eta", "alpha")


def make(dim=8, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("expansion", 2)
    kw.setdefault("theta_max", 0.5)  # aggressive: makes every term of the update matter
    mem = NeuralMemory(dim, **kw).to(DT)
    with torch.no_grad():  # gates away from their init so θ, η, α vary a lot per token
        mem.to_gates.weight.normal_(0, 0.5)
    return mem


def rand_x(B=2, T=37, dim=8, seed=1):
    return torch.randn(B, T, dim, dtype=DT, generator=torch.Generator().manual_seed(seed))


def assert_states_close(a: MemoryState, b: MemoryState, **tol):
    for name in ("weights", "momentum"):
        for u, v in zip(getattr(a, name), getattr(b, name)):
            torch.testing.assert_close(u, v, **tol)
    for name in ("pending_keys", "pending_values", "pending_gates"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), **tol)


def assert_stats_close(a: MemoryStats, b: MemoryStats, names=STAT_NAMES, **tol):
    for name in names:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), **tol)


# ---------------------------------------------------------------------------------------------
# T1: chunk size 1 is exact online gradient descent (independent loop, written here)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth,residual_norm", [(1, True), (2, True), (2, False)])
def test_chunk_one_is_online_gradient_descent(depth, residual_norm):
    mem = make(depth=depth, residual_norm=residual_norm, chunk_size=1)
    x = rand_x(T=12)
    y, state, stats = mem(x, return_stats=True)
    q, k, v = mem.project(x)
    theta, eta, alpha = mem.gates(x)
    W = [w.unsqueeze(0).expand(2, *w.shape).clone() for w in mem.memory_init]
    S = [torch.zeros_like(w) for w in W]
    for t in range(12):
        # read before the token's own write
        torch.testing.assert_close(stats.reads[:, :, t], mem.memory_fn(W, q[:, :, t:t + 1])[:, :, 0])
        Wg = [w.detach().requires_grad_(True) for w in W]
        loss = associative_loss(mem.memory_fn(Wg, k[:, :, t:t + 1].detach()),
                                v[:, :, t:t + 1].detach()).sum()
        grads = torch.autograd.grad(loss, Wg)  # gradient at the current (previous-token) state
        with torch.no_grad():
            for i in range(len(W)):
                S[i] = eta[:, :, t, None, None] * S[i] - theta[:, :, t, None, None] * grads[i]
                W[i] = (1 - alpha[:, :, t, None, None]) * W[i] + S[i]
    for a, b in zip(state.weights, W):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12)
    for a, b in zip(state.momentum, S):
        torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# T2: the weighted-gradient route equals the token loop (sequential_reference)
# ---------------------------------------------------------------------------------------------

CONFIGS = [
    dict(depth=1),
    dict(depth=2),
    dict(depth=3),
    dict(depth=2, residual_norm=False),
    dict(depth=3, residual_norm=False, theta_max=0.05),
    dict(depth=2, heads=2, per_layer_theta=True),
    dict(depth=2, momentum=False),
    dict(depth=2, forget=False),
    dict(depth=2, heads=2, chunk_gates=True, max_grad_norm=0.3),
    dict(depth=1, momentum=False, forget=False, conv=False),
]


def assert_matches_reference(mem, x, rtol=1e-9, atol=1e-10):
    """mem(x) equals sequential_reference(mem, x): outputs, end state and per-token stats.
    Returns the chunked path's end state."""
    with torch.no_grad():
        y, state, stats = mem(x, return_stats=True)
        y_ref, state_ref, stats_ref = sequential_reference(mem, x, return_stats=True)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    assert_states_close(state, state_ref, rtol=rtol, atol=atol)
    assert_stats_close(stats, stats_ref, rtol=rtol, atol=atol)
    return state


@pytest.mark.parametrize("chunk_size", [1, 3, 16])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_fast_path_matches_sequential_reference(cfg, chunk_size):
    mem = make(chunk_size=chunk_size, **cfg)
    state = assert_matches_reference(mem, rand_x(T=37))  # 37: a partial last chunk
    assert state.pending == 37 % chunk_size


def test_small_eta_and_aggressive_gates_match_reference():
    mem = make(depth=2, chunk_size=8)
    with torch.no_grad():
        mem.to_gates.bias[1] = -30.0  # η ≈ 1e-13: products of η underflow in a naive cumprod
    x = rand_x(T=24)
    with torch.no_grad():
        y, state = mem(x)
        y_ref, state_ref = sequential_reference(mem, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    assert_states_close(state, state_ref, rtol=1e-9, atol=1e-10)


def test_outer_gradients_match_reference():
    mem = make(depth=2, heads=2, chunk_size=4)
    x = rand_x(T=11).requires_grad_(True)
    y, state = mem(x)
    loss = y.sin().sum() + sum(w.square().sum() for w in state.weights)
    grads = torch.autograd.grad(loss, [x, *mem.parameters()])
    y_ref, state_ref = sequential_reference(mem, x)
    loss_ref = y_ref.sin().sum() + sum(w.square().sum() for w in state_ref.weights)
    grads_ref = torch.autograd.grad(loss_ref, [x, *mem.parameters()])
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-8, atol=1e-10)


def test_flush_writes_the_partial_chunk_like_the_reference():
    mem = make(depth=2, chunk_size=8)
    x = rand_x(T=13)
    with torch.no_grad():
        _, state = mem(x)
        flushed = mem.flush(state)
        _, ref = sequential_reference(mem, x, flush=True)
    assert state.pending == 5 and flushed.pending == 0
    assert not torch.equal(flushed.weights[0], state.weights[0])
    assert_states_close(flushed, ref, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# T5: reductions of the linear memory (chunk 1), written out independently
# ---------------------------------------------------------------------------------------------


def _linear_setup(**kw):
    mem = make(depth=1, chunk_size=1, **kw)
    with torch.no_grad():
        mem.memory_init[0].normal_()  # a non-zero M₀ makes the decay visible
    x = rand_x(T=10)
    q, k, v = mem.project(x)
    theta, eta, alpha = mem.gates(x)
    W = mem.memory_init[0].unsqueeze(0).expand(2, -1, -1, -1)
    return mem, x, k.detach(), v.detach(), theta.detach(), eta, alpha.detach(), W.detach()


def test_reduction_gated_delta_rule_titans_form():
    """η ≡ 0: W_t = (1 − α_t) W_{t−1} − θ_t (W_{t−1} k_t − v_t) k_tᵀ."""
    mem, x, k, v, theta, eta, alpha, W = _linear_setup(momentum=False)
    assert torch.equal(eta, torch.zeros_like(eta))
    for t in range(10):
        err = W @ k[:, :, t, :, None] - v[:, :, t, :, None]
        W = (1 - alpha[:, :, t, None, None]) * W - theta[:, :, t, None, None] * err @ k[:, :, t,
                                                                                        None, :]
    with torch.no_grad():
        _, state = mem(x)
    torch.testing.assert_close(state.weights[0], W, rtol=1e-10, atol=1e-12)


def test_reduction_delta_rule():
    """η ≡ α ≡ 0: W_t = W_{t−1} − θ_t (W_{t−1} k_t − v_t) k_tᵀ."""
    mem, x, k, v, theta, eta, alpha, W = _linear_setup(momentum=False, forget=False)
    assert torch.equal(alpha, torch.zeros_like(alpha))
    for t in range(10):
        err = W @ k[:, :, t, :, None] - v[:, :, t, :, None]
        W = W - theta[:, :, t, None, None] * err @ k[:, :, t, None, :]
    with torch.no_grad():
        _, state = mem(x)
    torch.testing.assert_close(state.weights[0], W, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("depth", [1, 2])
def test_reduction_theta_zero_is_pure_decay(depth):
    """θ ≡ 0, S₀ = 0: Φ_t = Π_{j ≤ t}(1 − α_j) Φ₀, momentum stays 0."""
    mem = make(depth=depth, chunk_size=3)
    with torch.no_grad():
        mem.memory_init[0].normal_()
        mem.to_gates.bias[0] = -1e4  # θ = θ_max·σ(−1e4) = 0 exactly
        mem.to_gates.weight[0] = 0.0
    x = rand_x(T=12)
    _, _, alpha = mem.gates(x)
    with torch.no_grad():
        _, state = mem(x)
    decay = torch.prod(1 - alpha, -1)[..., None, None]  # (B, H, 1, 1)
    for w, w0, s in zip(state.weights, mem.memory_init, state.momentum):
        torch.testing.assert_close(w, decay * w0.detach(), rtol=1e-10, atol=1e-12)
        assert torch.equal(s, torch.zeros_like(s))


# ---------------------------------------------------------------------------------------------
# T9: causality and batch isolation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [dict(depth=2, chunk_size=4), dict(depth=1, heads=2, chunk_size=5),
                                 dict(depth=2, chunk_size=4, chunk_gates=True)])
def test_causality_perturbing_a_token_changes_no_earlier_output(cfg):
    mem = make(**cfg)
    x = rand_x(T=21)
    with torch.no_grad():
        y, _ = mem(x)
        for p in (0, 3, 4, 9, 20):
            x2 = x.clone()
            x2[:, p] += torch.randn(8, dtype=DT)
            y2, _ = mem(x2)
            assert torch.equal(y2[:, :p], y[:, :p]), f"output before {p} changed"
            assert not torch.equal(y2[:, p:], y[:, p:])


def test_batch_elements_are_isolated():
    mem = make(depth=2, chunk_size=4)
    x = rand_x(B=3, T=13)
    with torch.no_grad():
        y, s = mem(x)
        x2 = x.clone()
        x2[1] += 1.0
        y2, s2 = mem(x2)
    assert torch.equal(y2[0], y[0]) and torch.equal(y2[2], y[2])
    assert not torch.equal(y2[1], y[1])
    assert torch.equal(s2.weights[0][0], s.weights[0][0])


# ---------------------------------------------------------------------------------------------
# T10: streaming with a carried state
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [[8, 16], [5, 19], [1, 1, 1, 2, 7, 12], [3, 3, 3, 3, 12],
                                    [24], [7, 0, 17]])
@pytest.mark.parametrize("chunk_gates", [False, True])
def test_streaming_split_calls_equal_one_call(splits, chunk_gates):
    mem = make(depth=2, heads=2, chunk_size=4, chunk_gates=chunk_gates)
    x = rand_x(T=24)
    with torch.no_grad():
        y, state, stats = mem(x, return_stats=True)
        ys, parts, s, i = [], [], None, 0
        for n in splits:
            yy, s, st = mem(x[:, i:i + n], s, return_stats=True)
            ys.append(yy)
            parts.append(st)
            i += n
    torch.testing.assert_close(torch.cat(ys, 1), y, rtol=1e-12, atol=1e-12)
    assert_states_close(s, state, rtol=1e-12, atol=1e-12)
    # per-chunk pooled gate *statistics* of a partial chunk are provisional; the rest must match
    names = ("reads", "surprise", "grad_norm") if chunk_gates else STAT_NAMES
    for name in names:
        torch.testing.assert_close(torch.cat([getattr(p, name) for p in parts], 2),
                                   getattr(stats, name), rtol=1e-12, atol=1e-12)


def test_reference_streams_like_the_fast_path():
    mem = make(depth=2, chunk_size=4)
    x = rand_x(T=15)
    with torch.no_grad():
        y, state = mem(x)
        y1, s = sequential_reference(mem, x[:, :6])
        y2, s = sequential_reference(mem, x[:, 6:], s)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-12)
    assert_states_close(s, state, rtol=1e-10, atol=1e-12)


def test_short_call_is_buffered_then_written_when_its_chunk_completes():
    mem = make(depth=2, chunk_size=4)
    x = rand_x(T=4)
    with torch.no_grad():
        init = mem.init_state(2)
        _, s = mem(x[:, :3], init)  # shorter than a chunk: buffered, not dropped
        assert s.pending == 3
        assert all(torch.equal(a, b) for a, b in zip(s.weights, init.weights))
        _, s = mem(x[:, 3:], s)  # the chunk completes: all four tokens are written
        assert s.pending == 0
        _, full = mem(x)
    assert not torch.equal(s.weights[0], init.weights[0])
    assert_states_close(s, full, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# T8: outer gradients, gradcheck
# ---------------------------------------------------------------------------------------------


def test_outer_gradients_reach_every_parameter():
    mem = make(depth=2, heads=2, chunk_size=4, dim=8)
    x = rand_x(T=14)
    y, _ = mem(x)
    y.square().mean().backward()
    for name, p in mem.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradcheck_tiny_layer():
    mem = make(dim=4, depth=2, chunk_size=2, expansion=2, heads=2)
    x = rand_x(B=1, T=5, dim=4).requires_grad_(True)
    w_k = mem.to_qkv.weight

    def fn(x, w_qkv, m0):
        # route the parameters through functional_call so gradcheck perturbs them
        params = {"to_qkv.weight": w_qkv, "memory_init.0": m0}
        y, state = torch.func.functional_call(mem, params, (x,))
        return y, state.weights[1]

    assert torch.autograd.gradcheck(
        fn, (x, w_k.detach().clone().requires_grad_(True),
             mem.memory_init[0].detach().clone().requires_grad_(True)))


# ---------------------------------------------------------------------------------------------
# T12: the zero-M₀ trap; T13: stability
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("residual_norm", [True, False])
def test_zero_mlp_memory_is_a_fixed_point(residual_norm):
    mem = make(depth=2, chunk_size=4, residual_norm=residual_norm)
    with torch.no_grad():
        for w in mem.memory_init:
            w.zero_()
        _, state, stats = mem(rand_x(T=12), return_stats=True)
    assert torch.equal(stats.grad_norm, torch.zeros_like(stats.grad_norm))
    for w in state.weights:
        assert torch.equal(w, torch.zeros_like(w))


def test_zero_linear_memory_still_learns():
    mem = make(depth=1, chunk_size=4)
    with torch.no_grad():
        mem.memory_init[0].zero_()
        _, state, stats = mem(rand_x(T=12), return_stats=True)
    assert (stats.grad_norm > 0).all()
    assert state.weights[0].abs().sum() > 0


def test_default_memory_is_not_in_the_trap():
    mem = NeuralMemory(16)
    with torch.no_grad():
        _, _, stats = mem(torch.randn(1, 32, 16), return_stats=True)
    assert (stats.grad_norm > 0).all()


@pytest.mark.parametrize("autocast", [False, True])
def test_long_sequence_is_finite_with_defaults(autocast):
    torch.manual_seed(0)
    mem = NeuralMemory(32, heads=2)  # defaults: depth 2, chunk 16, momentum, forgetting
    x = torch.randn(2, 4096, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, state, stats = mem(x, return_stats=True)
        loss = y.float().square().mean()
    loss.backward()
    assert torch.isfinite(y).all() and torch.isfinite(loss)
    assert all(torch.isfinite(w).all() for w in state.weights + state.momentum)
    assert torch.isfinite(stats.surprise).all()
    for name, p in mem.named_parameters():
        assert torch.isfinite(p.grad).all(), name


# ---------------------------------------------------------------------------------------------
# contract details: shapes, gates, retrieve
# ---------------------------------------------------------------------------------------------


def test_public_shapes_and_gate_ranges():
    mem = NeuralMemory(12, heads=3, depth=2, expansion=4, chunk_size=5)
    x = torch.randn(2, 7, 12)
    q, k, v = mem.project(x)
    assert q.shape == k.shape == v.shape == (2, 3, 7, 4)
    torch.testing.assert_close(k.norm(dim=-1), torch.ones(2, 3, 7), rtol=1e-4, atol=1e-4)
    theta, eta, alpha = mem.gates(x)
    assert theta.shape == eta.shape == alpha.shape == (2, 3, 7)
    assert (theta > 0).all() and (theta < mem.theta_max).all()
    assert ((eta > 0) & (eta < 1)).all() and ((alpha > 0) & (alpha < 1)).all()
    # initial gates near the documented values (small gate weights at init)
    assert abs(eta.mean().item() - 0.9) < 0.05 and abs(alpha.mean().item() - 0.05) < 0.03
    y, state, stats = mem(x, return_stats=True)
    assert y.shape == x.shape
    assert [tuple(w.shape) for w in state.weights] == [(2, 3, 16, 4), (2, 3, 4, 16)]
    assert [tuple(w.shape) for w in state.momentum] == [(2, 3, 16, 4), (2, 3, 4, 16)]
    assert stats.reads.shape == (2, 3, 7, 4) and stats.surprise.shape == (2, 3, 7)
    assert stats.grad_norm.shape == (2, 3, 7)
    lin = NeuralMemory(12, heads=3, depth=1)
    assert [tuple(w.shape) for w in lin.init_state(2).weights] == [(2, 3, 4, 4)]
    out = lin.memory_fn(lin.init_state(2).weights, torch.randn(2, 3, 5, 4))
    assert out.shape == (2, 3, 5, 4)


def test_disabled_gates_are_exactly_zero():
    mem = NeuralMemory(8, momentum=False, forget=False)
    _, eta, alpha = mem.gates(torch.randn(1, 5, 8))
    assert torch.equal(eta, torch.zeros_like(eta)) and torch.equal(alpha, torch.zeros_like(alpha))


def test_per_layer_theta_shape():
    mem = NeuralMemory(8, depth=3, per_layer_theta=True)
    theta, _, _ = mem.gates(torch.randn(1, 5, 8))
    assert theta.shape == (1, 1, 5, 3)


def test_stats_surprise_is_the_loss_at_the_chunk_start_state():
    mem = make(depth=2, chunk_size=4)
    x = rand_x(T=10)
    with torch.no_grad():
        _, s4 = mem(x[:, :8])  # state at the boundary before tokens 8, 9
        _, _, stats = mem(x, return_stats=True)
        _, k, v = mem.project(x)
        pred = mem.memory_fn(s4.weights, k[:, :, 8:])
    torch.testing.assert_close(stats.surprise[:, :, 8:], 0.5 * (pred - v[:, :, 8:]).pow(2).sum(-1))


def test_retrieve_reads_the_given_state_without_writing():
    mem = make(depth=2, chunk_size=4)
    x = rand_x(T=12)
    with torch.no_grad():
        # with the initial state, the first chunk's outputs of forward read M₀ as well
        init = mem.init_state(2)
        h, ctx = mem.retrieve(x, init)
        y, _ = mem(x)
        torch.testing.assert_close(h[:, :4], y[:, :4])
        # against an explicit computation on an arbitrary state
        _, state = mem(rand_x(T=9, seed=5))
        h, _ = mem.retrieve(x, state)
        q, _, _ = mem.project(x)
        torch.testing.assert_close(h, mem._output(mem.memory_fn(state.weights, q), x))
        # streaming the query stream with the returned context equals one call
        h1, c1 = mem.retrieve(x[:, :5], state)
        h2, _ = mem.retrieve(x[:, 5:], state, context=c1)
        torch.testing.assert_close(torch.cat([h1, h2], 1), h)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divisible by heads"):
        NeuralMemory(10, heads=3)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        NeuralMemory(8, chunk_size=0)
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        NeuralMemory(8, depth=0)


def test_bad_inputs_raise_value_errors():
    mem = NeuralMemory(8, heads=2, chunk_size=4)
    with pytest.raises(ValueError, match=r"expected x of shape \(batch, time, dim=8\), got \(5, 8\)"):
        mem(torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"dim=8\), got \(1, 5, 6\)"):
        mem(torch.randn(1, 5, 6))
    with pytest.raises(ValueError, match="floating-point"):
        mem(torch.ones(1, 5, 8, dtype=torch.long))
    _, state = mem(torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match="state.weights shapes must be"):
        mem(torch.randn(3, 6, 8), state)  # batch mismatch
    other = NeuralMemory(8, heads=1, chunk_size=4)
    with pytest.raises(ValueError, match="state.weights shapes must be"):
        other(torch.randn(2, 6, 8), state)  # heads mismatch
    bad = MemoryState(state.weights, state.momentum[:1], state.pending_keys,
                      state.pending_values, state.pending_gates, state.conv_context)
    with pytest.raises(ValueError, match="state.momentum must be a tuple of 2 tensors"):
        mem(torch.randn(2, 6, 8), bad)
    with pytest.raises(ValueError, match="state must be a MemoryState"):
        mem(torch.randn(2, 6, 8), {"weights": state.weights})


def test_nan_in_carried_state_raises():
    mem = NeuralMemory(8, chunk_size=4)
    _, state = mem(torch.randn(1, 6, 8))
    w = state.weights[0].detach().clone()
    w[0, 0, 0, 0] = math.nan
    state.weights = (w, *state.weights[1:])
    with pytest.raises(ValueError, match="contains NaN or inf"):
        mem(torch.randn(1, 3, 8), state)


def test_nan_check_policy(monkeypatch):
    """The carried-state value check runs once per call on the CPU by default, can be switched
    off, and never reads tensors twice: a +inf in one tensor and a −inf in another still fire."""
    mem = NeuralMemory(8, chunk_size=4)
    _, state = mem(torch.randn(1, 6, 8))
    state.weights = (torch.full_like(state.weights[0], math.inf), *state.weights[1:])
    state.momentum = (torch.full_like(state.momentum[0], -math.inf), *state.momentum[1:])
    with pytest.raises(ValueError, match="contains NaN or inf"):
        mem(torch.randn(1, 3, 8), state)
    mem.check_state_values = False  # opt-out: no check, no error
    y, _ = mem(torch.randn(1, 3, 8), state)
    assert not torch.isfinite(y).all()
    mem.check_state_values = None
    # on an accelerator the default skips the check (it would be a host sync); True forces it
    calls = []
    real_isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(1) or real_isfinite(t))
    _, fresh = mem(torch.randn(1, 6, 8))
    mem(torch.randn(1, 3, 8), fresh)
    assert len(calls) == 1, "one finite check per call, not one per state tensor"


@pytest.mark.parametrize("depth,residual_norm", [(1, True), (2, True), (2, False), (3, True)])
@pytest.mark.parametrize("per_layer_theta,max_grad_norm", [(False, None), (True, 0.5)])
def test_plain_chunk_update_equals_fast_path(depth, residual_norm, per_layer_theta,
                                             max_grad_norm):
    """``functional.chunk_update`` (the readable form) and ``memory_fast.fast_chunk_update`` (what
    the layer runs) give the same end state, reads and statistics, and the same gradients for
    every input (the outer loop differentiates through both)."""
    from titans_mini import functional
    from titans_mini.memory_fast import fast_chunk_update, per_chunk_factors

    torch.manual_seed(0)
    mem = NeuralMemory(8, heads=2, depth=depth, residual_norm=residual_norm,
                       per_layer_theta=per_layer_theta).double()
    rows, n, m, d = 2 * 2, 5, 3, mem.d_head
    W = [w.detach().repeat(2, 1, 1).requires_grad_() for w in mem.memory_init]
    S = [(0.1 * torch.randn_like(w)).requires_grad_() for w in W]
    keys = functional.l2_normalize(torch.randn(rows, n, d, dtype=torch.double)).requires_grad_()
    values = torch.randn(rows, n, d, dtype=torch.double, requires_grad=True)
    queries = functional.l2_normalize(torch.randn(rows, m, d, dtype=torch.double))
    logits = torch.randn(2, 2, n, mem.n_gates, dtype=torch.double, requires_grad=True)
    theta, log_eta, log_keep, _, _ = mem._gate_values(logits)
    coeffs = functional.chunk_coefficients(theta, log_eta, log_keep)  # c (2, 2, n, L), A (2, 2)
    plain_coeffs = functional.ChunkCoefficients(
        *(t.reshape(rows, *t.shape[2:]) for t in coeffs))
    factors = per_chunk_factors(type(coeffs)(*(t.unsqueeze(2) for t in coeffs)), rows, 1,
                                torch.double)[0]
    plain = functional.chunk_update(W, S, keys, values, queries, plain_coeffs, mem.kind,
                                    max_grad_norm)
    fast = fast_chunk_update(W, S, keys, values, queries, factors, mem.kind, max_grad_norm,
                             True, False)
    flat = lambda out: [*out[0], *out[1], *out[2:]]
    for a, b in zip(flat(plain), flat(fast)):
        torch.testing.assert_close(a, b)
    inputs = [*W, *S, keys, values, logits]
    weights = [torch.randn_like(t) for t in flat(plain)]
    loss = lambda out: sum((t * w).sum() for t, w in zip(flat(out), weights))
    for a, b in zip(torch.autograd.grad(loss(plain), inputs, retain_graph=True),
                    torch.autograd.grad(loss(fast), inputs)):
        torch.testing.assert_close(a, b)


def test_causal_conv_streams():
    """``functional.causal_conv`` over x equals two calls with the carried context, and the
    output at t never depends on inputs after t."""
    from titans_mini.functional import causal_conv

    torch.manual_seed(0)
    x, w = torch.randn(2, 9, 6), torch.randn(6, 4)
    full, ctx = causal_conv(x, w)
    a, ctx_a = causal_conv(x[:, :4], w)
    b, ctx_b = causal_conv(x[:, 4:], w, ctx_a)
    torch.testing.assert_close(torch.cat([a, b], 1), full)
    torch.testing.assert_close(ctx_b, ctx)
    x2 = x.clone()
    x2[:, 5] += 1.0
    torch.testing.assert_close(causal_conv(x2, w)[0][:, :5], full[:, :5])
    with pytest.raises(ValueError, match="conv context must have shape"):
        causal_conv(x, w, torch.zeros(2, 2, 6))


def test_inference_and_training_paths_agree():
    """Under no_grad the layer fuses the key and query forwards; with grad it does not."""
    mem = make(depth=2, chunk_size=4)
    x = rand_x(T=13)
    with torch.no_grad():
        y0, s0, st0 = mem(x, return_stats=True)
    y1, s1, st1 = mem(x, return_stats=True)
    torch.testing.assert_close(y1.detach(), y0, rtol=1e-12, atol=1e-12)
    assert_states_close(s1.detach(), s0, rtol=1e-12, atol=1e-12)
    assert_stats_close(MemoryStats(*(getattr(st1, n).detach() for n in STAT_NAMES)), st0,
                       rtol=1e-12, atol=1e-12)


def test_forward_never_modifies_the_given_state_or_m0():
    mem = make(depth=2, chunk_size=4)
    m0 = [w.detach().clone() for w in mem.memory_init]
    with torch.no_grad():
        _, s = mem(rand_x(T=6))
        before = [t.clone() for t in s.weights + s.momentum]
        mem(rand_x(T=9, seed=3), s)
        mem(rand_x(T=9, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(before, s.weights + s.momentum))
    assert all(torch.equal(a, b) for a, b in zip(m0, mem.memory_init))


def test_state_detach_cuts_the_graph_and_keeps_values():
    mem = make(depth=2, chunk_size=4)
    _, s = mem(rand_x(T=7))
    assert s.weights[0].requires_grad
    d = s.detach()
    assert not any(t.requires_grad for t in d.weights + d.momentum)
    assert d.pending == s.pending == 3
    assert all(torch.equal(a, b) for a, b in zip(d.weights, s.weights))
    y1, _ = mem(rand_x(T=5, seed=4), d)
    y2, _ = mem(rand_x(T=5, seed=4), s)
    torch.testing.assert_close(y1, y2)


def _have_cxx() -> bool:
    import os
    import shutil

    cxx = os.environ.get("CXX")
    return any(shutil.which(c) for c in ([cxx] if cxx else []) + ["g++", "c++", "clang++"])


def test_compile_chunks_refused_on_old_torch(monkeypatch):
    """Compiled gradients are only verified from torch 2.11 on: older versions are refused, not
    trusted."""
    import titans_mini.device as device_mod

    monkeypatch.setattr(device_mod, "torch_version", lambda: (2, 10))
    with pytest.raises(ValueError, match="needs torch >= 2.11"):
        NeuralMemory(16, compile_chunks=True)


@pytest.mark.slow
@pytest.mark.skipif(not _have_cxx(), reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.skipif(
    not __import__("titans_mini.device").device.compile_supported(),
    reason="compile_chunks is refused before torch 2.11",
)
def test_compiled_chunks_match_eager():
    """``compile_chunks=True`` (torch.compile of the chunk update) gives the eager outputs, state
    and gradients (float32 rounding only), also across a split call and a flushed partial chunk.
    One small compile (~30 s on a 2-core CPU)."""
    torch.manual_seed(0)
    eager = NeuralMemory(16, heads=2, depth=2, expansion=2, chunk_size=4)
    compiled = NeuralMemory(16, heads=2, depth=2, expansion=2, chunk_size=4, compile_chunks=True)
    compiled.load_state_dict(eager.state_dict())
    with torch.no_grad():
        eager.to_gates.weight.normal_(0, 0.5)
        compiled.to_gates.weight.copy_(eager.to_gates.weight)
    x = torch.randn(2, 18, 16)

    def run(mem):
        xx = x.clone().requires_grad_(True)
        y1, state = mem(xx[:, :7])
        y2, state = mem(xx[:, 7:], state)  # pending tokens open the first chunk
        state = mem.flush(state)  # a partial chunk: the eager path
        y = torch.cat([y1, y2], 1)
        loss = y.square().sum() + sum(w.square().sum() for w in state.weights + state.momentum)
        grads = torch.autograd.grad(loss, [xx, *mem.parameters()])
        return y, state, grads

    y_e, s_e, g_e = run(eager)
    y_c, s_c, g_c = run(compiled)
    # Fused kernels round differently: agreement to ~1e-5 is float32 noise after 18 tokens of
    # inner updates (torch 2.11 differed by 1.1e-5); a wrong compiled update is off by orders more.
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y_c, y_e, **tol)
    for a, b in zip(s_c.weights + s_c.momentum, s_e.weights + s_e.momentum):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("group", [1, 3])
def test_checkpoint_chunks_gives_the_same_values_and_gradients(group):
    """``checkpoint_chunks=k`` recomputes groups of k chunks in the backward: outputs, state,
    stats and every gradient are those of the default path (same ops, recomputed)."""
    ref = make(heads=2, chunk_size=4)
    ckpt = make(heads=2, chunk_size=4, checkpoint_chunks=group)
    x = rand_x(T=37)

    def run(mem):
        xx = x.clone().requires_grad_(True)
        y1, state, stats = mem(xx[:, :6], return_stats=True)
        y2, state = mem(xx[:, 6:], state)
        y = torch.cat([y1, y2], 1)
        loss = (y.square().sum() + stats.surprise.sum()
                + sum(w.square().sum() for w in state.weights + state.momentum))
        return y, state, torch.autograd.grad(loss, [xx, *mem.parameters()])

    y_r, s_r, g_r = run(ref)
    y_c, s_c, g_c = run(ckpt)
    torch.testing.assert_close(y_c, y_r)
    for a, b in zip(s_c.weights + s_c.momentum, s_r.weights + s_r.momentum):
        torch.testing.assert_close(a, b)
    for a, b in zip(g_c, g_r):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError):
        make(checkpoint_chunks=-1)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_state_update_gradients_survive_torch_compile_tracing(backend):
    """The hand-written state update (eqs. 14–15) traced by ``torch.compile`` (Dynamo, and
    Dynamo + AOTAutograd; no C++ compiler needed) gives the eager gradients. torch 2.11 routed
    the gradients of an autograd.Function that mutates its own result in its forward to the
    wrong outputs (pytorch/pytorch#180642); the traced forward is out of place for that reason.
    This is what ``compile_chunks`` and the trainer's ``--compile`` rely on."""
    from titans_mini.memory_fast import StateUpdate

    torch.manual_seed(0)
    N, n, o, i = 3, 4, 5, 6
    args = [torch.randn(N, o, i), torch.randn(N, o, i), torch.rand(N, 1, 1), torch.rand(N, 1, 1),
            torch.rand(N, 1, 1), torch.randn(N, n, o), torch.randn(N, n, o), torch.randn(N, n, i)]
    args = [a.requires_grad_() for a in args]
    weight = torch.randn(N, o, i)  # an uneven upstream gradient for Φ_end

    def grads(fn):
        W_end, S_end = fn(*args)
        loss = (W_end * weight).sum() + S_end.square().sum()
        return W_end, S_end, torch.autograd.grad(loss, args)

    torch._dynamo.reset()
    W_e, S_e, g_e = grads(StateUpdate.apply)
    W_c, S_c, g_c = grads(torch.compile(lambda *a: StateUpdate.apply(*a), backend=backend))
    torch.testing.assert_close(W_c, W_e)
    torch.testing.assert_close(S_c, S_e)
    for name, a, b in zip("W S A B E P Q X".split(), g_c, g_e):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"∂{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_input_dtype_other_than_the_weights_says_what_to_do(dtype):
    mem = NeuralMemory(8, heads=2, chunk_size=4)  # fp32 weights
    with pytest.raises(ValueError, match=rf"x is {dtype} but the layer's weights are torch.float32"):
        mem(torch.randn(2, 6, 8, dtype=dtype))
    with pytest.raises(ValueError, match="torch.autocast"):
        mem.gates(torch.randn(2, 6, 8, dtype=dtype))
    if dtype is torch.bfloat16:  # under autocast low-precision inputs are expected
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = mem(torch.randn(2, 6, 8, dtype=dtype))
        assert y.shape == (2, 6, 8)


@pytest.mark.parametrize("chunk_gates", [False, True])
def test_zero_length_call_is_a_no_op(chunk_gates):
    """T = 0 (e.g. an empty piece of a stream) returns an empty output and the state as it was,
    with every option (per-chunk gates used to fail in pooling)."""
    mem = make(heads=2, chunk_size=4, chunk_gates=chunk_gates)
    with torch.no_grad():
        _, state = mem(rand_x(T=6))
        y, after, stats = mem(rand_x(T=0), state, return_stats=True)
        theta, eta, alpha = mem.gates(rand_x(T=0))
    assert y.shape == (2, 0, 8) and stats.surprise.shape == (2, 2, 0) and theta.shape[2] == 0
    assert_states_close(after, state, rtol=0, atol=0)


def test_chunk_loop_runs_in_the_state_dtype_without_autocast(monkeypatch):
    """Under autocast the projections may run in bf16, but the sequential chunk steps run in the
    state's dtype (fp32) with autocast off: no per-op casts inside the loop (GPU speed issue,
    lever 3), and the inner update is not rounded to bf16."""
    from titans_mini import memory as memory_mod

    seen = []
    real = memory_mod.fast_chunk_update

    def spy(W, S, keys, values, queries, *rest):
        seen.append((torch.is_autocast_enabled("cpu"), W[0].dtype, keys.dtype,
                     None if queries is None else queries.dtype))
        return real(W, S, keys, values, queries, *rest)

    monkeypatch.setattr(memory_mod, "fast_chunk_update", spy)
    torch.manual_seed(0)
    mem = NeuralMemory(32, heads=2, chunk_size=4)
    x = torch.randn(2, 10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = mem(x)
        assert torch.is_autocast_enabled("cpu")  # restored after the loop
    assert len(seen) == 2
    assert all(s == (False, torch.float32, torch.float32, torch.float32) for s in seen), seen
    assert state.weights[0].dtype == torch.float32 and torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------
# Miras attentional biases (Huber, ℓp): a switch; the chunked route still equals the token loop
# ---------------------------------------------------------------------------------------------

BIASES = [("huber", 0.1), ("lp", 3.0), ("lp", 1.5)]


@pytest.mark.parametrize("bias,param", [("l2", None), *BIASES])
def test_attentional_bias_grad_is_the_gradient_of_its_loss(bias, param):
    from titans_mini.functional import attentional_bias_grad, attentional_bias_loss

    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 5, 7, dtype=torch.float64, generator=g).requires_grad_(True)
    target = torch.randn(3, 5, 7, dtype=torch.float64, generator=g)
    loss = attentional_bias_loss(pred, target, bias, param)
    assert loss.shape == (3, 5)
    (auto,) = torch.autograd.grad(loss.sum(), pred)
    torch.testing.assert_close(attentional_bias_grad(pred - target, bias, param), auto)


def test_attentional_bias_special_cases_reduce_to_l2():
    from titans_mini.functional import associative_loss, attentional_bias_loss

    p, t = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    l2 = associative_loss(p, t)
    torch.testing.assert_close(attentional_bias_loss(p, t, "lp", 2.0), l2)
    torch.testing.assert_close(attentional_bias_loss(p, t, "huber", 100.0), l2)  # δ above every |e|
    assert (attentional_bias_loss(p, t, "huber", 0.1) < l2).all()  # linear tails beyond δ


@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("depth,residual_norm", [(1, True), (2, True), (2, False)])
@pytest.mark.parametrize("bias,param", BIASES)
def test_attentional_bias_fast_path_matches_sequential_reference(bias, param, depth, residual_norm,
                                                                 chunk_size):
    mem = make(chunk_size=chunk_size, depth=depth, residual_norm=residual_norm, heads=2,
               attentional_bias=bias, bias_param=param)
    x = rand_x(T=13)
    state = assert_matches_reference(mem, x)
    # and the switch does something: the same layer with the ℓ2 loss ends elsewhere
    mem.attentional_bias, mem.bias_param = "l2", None
    with torch.no_grad():
        _, state_l2 = mem(x)
    assert max((a - b).abs().max().item() for a, b in zip(state.weights, state_l2.weights)) > 1e-6


@pytest.mark.parametrize("bias,param", BIASES[:2])
def test_attentional_bias_outer_gradients_and_flush_match_reference(bias, param):
    mem = make(depth=2, heads=2, chunk_size=4, attentional_bias=bias, bias_param=param)
    x = rand_x(T=11).requires_grad_(True)
    y, state = mem(x)
    state = mem.flush(state)
    loss = y.sin().sum() + sum(w.square().sum() for w in state.weights)
    grads = torch.autograd.grad(loss, [x, *mem.parameters()])
    y_ref, state_ref = sequential_reference(mem, x, flush=True)
    loss_ref = y_ref.sin().sum() + sum(w.square().sum() for w in state_ref.weights)
    grads_ref = torch.autograd.grad(loss_ref, [x, *mem.parameters()])
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kwargs,match", [
    (dict(attentional_bias="l1"), "attentional_bias must be one of"),
    (dict(attentional_bias="l2", bias_param=2.0), "no parameter"),
    (dict(attentional_bias="huber", bias_param=0.0), "Huber"),
    (dict(attentional_bias="lp", bias_param=0.5), "ℓp"),
])
def test_attentional_bias_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuralMemory(16, **kwargs)
