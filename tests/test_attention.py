"""Tests for titans_mini.attention: RoPE, masks, persistent tokens, KV cache streaming."""

import math

import pytest
import torch

from titans_mini.attention import (
    Attention,
    PersistentMemory,
    apply_rope,
    attention_mask,
    rope_cos_sin,
)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def naive_attention(attn: Attention, x, prefix=None, context=None, context_always=False):
    """Loop over queries; softmax over an explicit list of visible keys (the definition)."""
    B, T, d = x.shape
    H, dh = attn.n_heads, attn.head_dim
    pos = torch.arange(T)
    cos, sin = rope_cos_sin(pos, dh, attn.rope_base, x.dtype)
    q = apply_rope(attn._heads(attn.wq(x)), cos, sin)
    k = apply_rope(attn._heads(attn.wk(x)), cos, sin)
    v = attn._heads(attn.wv(x))
    out = torch.zeros(B, H, T, dh)
    for t in range(T):
        keys, vals = [], []
        if prefix is not None:
            keys.append(attn._heads(attn.wk(prefix)))
            vals.append(attn._heads(attn.wv(prefix)))
        if context is not None:
            kc = apply_rope(attn._heads(attn.wk(context)), cos, sin)
            vc = attn._heads(attn.wv(context))
            upto = T if context_always else t + 1
            keys.append(kc[:, :, :upto])
            vals.append(vc[:, :, :upto])
        lo = 0 if attn.window is None else max(0, t - attn.window + 1)
        keys.append(k[:, :, lo : t + 1])
        vals.append(v[:, :, lo : t + 1])
        K, V = torch.cat(keys, 2), torch.cat(vals, 2)
        w = torch.softmax(q[:, :, t : t + 1] @ K.transpose(-1, -2) / math.sqrt(dh), -1)
        out[:, :, t] = (w @ V)[:, :, 0]
    return attn.wo(out.transpose(1, 2).reshape(B, T, d))


def test_rope_relative_and_norm_preserving():
    # float64: in float32 the rotated dot products agree only to ~2e-7, near assert_close's
    # default tolerance, so the check would depend on the platform's rounding.
    q, k = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)

    def score(i, j):
        ci, si = rope_cos_sin(torch.tensor([i]), 8, dtype=torch.float64)
        cj, sj = rope_cos_sin(torch.tensor([j]), 8, dtype=torch.float64)
        return (apply_rope(q, ci, si) * apply_rope(k, cj, sj)).sum(-1)

    torch.testing.assert_close(score(3, 5), score(10, 12))
    assert not torch.allclose(score(3, 5), score(3, 9))
    c, s = rope_cos_sin(torch.arange(7), 8, dtype=torch.float64)
    x = torch.randn(7, 8, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, c, s).norm(dim=-1), x.norm(dim=-1))
    with pytest.raises(ValueError):
        rope_cos_sin(torch.arange(3), 7)


def test_mask_definition():
    m = attention_mask(torch.arange(4), torch.arange(4), torch.zeros(4, dtype=torch.bool), 2, 1)
    expected = torch.tensor(
        [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(m, expected)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("n_p", [0, 2])
def test_matches_naive(window, n_p):
    torch.manual_seed(0)
    attn = Attention(16, 2, window=window)
    x = torch.randn(2, 9, 16)
    prefix = PersistentMemory(n_p, 16)(2) if n_p else None
    y, _ = attn(x, prefix=prefix)
    torch.testing.assert_close(y, naive_attention(attn, x, prefix))


@pytest.mark.parametrize("always", [False, True])
def test_context_tokens_match_naive(always):
    torch.manual_seed(1)
    attn = Attention(16, 2)
    x, h = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    prefix = PersistentMemory(3, 16)(2)
    y, _ = attn(x, prefix=prefix, context=h, context_always=always)
    torch.testing.assert_close(y, naive_attention(attn, x, prefix, h, always))


def test_causal_and_window_probe():
    torch.manual_seed(2)
    attn = Attention(16, 4, window=4)
    x = torch.randn(1, 12, 16)
    y, _ = attn(x)
    x2 = x.clone()
    x2[:, 7] += 1.0
    y2, _ = attn(x2)
    assert torch.equal(y[:, :7], y2[:, :7])  # past untouched
    assert (y[:, 7:11] - y2[:, 7:11]).abs().amax(-1).min() > 0  # inside the window: changes
    assert torch.equal(y[:, 11:], y2[:, 11:])  # 11 − 7 = 4 ≥ window: out of sight


@pytest.mark.parametrize("window", [None, 5])
def test_streaming_cache_equals_full(window):
    torch.manual_seed(3)
    attn = Attention(16, 2, window=window)
    prefix = PersistentMemory(2, 16)(2)
    x = torch.randn(2, 23, 16)
    y, _ = attn(x, prefix=prefix)
    for cuts in ([1], [5, 6], [11], list(range(1, 23))):
        pieces, cache, start = [], None, 0
        for end in cuts + [23]:
            yp, cache = attn(x[:, start:end], cache, prefix=prefix)
            pieces.append(yp)
            start = end
        torch.testing.assert_close(torch.cat(pieces, 1), y)
        if window is not None:
            assert cache.length == window - 1  # trimmed to what a later query can see
        assert cache.pos == 23


def test_persistent_identical_across_batch_and_unchanged():
    torch.manual_seed(4)
    pm = PersistentMemory(3, 8)
    before = pm.tokens.detach().clone()
    p = pm(4)
    assert p.shape == (4, 3, 8)
    assert all(torch.equal(p[0], p[b]) for b in range(4))
    attn = Attention(8, 2, window=2)
    attn(torch.randn(4, 5, 8), prefix=p)[0].sum().backward()
    assert torch.equal(pm.tokens.detach(), before)
    assert pm.tokens.grad is not None and pm.tokens.grad.abs().sum() > 0


def test_bad_construction():
    with pytest.raises(ValueError):
        Attention(10, 3)
    with pytest.raises(ValueError):
        Attention(8, 2, window=0)


def test_recorded_weights():
    torch.manual_seed(5)
    attn = Attention(16, 2, window=3)
    x, prefix = torch.randn(1, 6, 16), PersistentMemory(2, 16)(1)
    y, _ = attn(x, prefix=prefix)
    attn.record_weights = True
    y2, _ = attn(x, prefix=prefix)
    torch.testing.assert_close(y2, y)
    w = attn.last_weights  # (B, H, T, N_p + T)
    assert w.shape == (1, 2, 6, 8)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 6))
    assert (w[..., :2] > 0).all()  # persistent tokens always visible
    assert (w[:, :, 5, 2:5] == 0).all()  # token 5 sees only tokens 3, 4, 5 (window 3)
