"""Checks for lesson 08 (persistent memory): the attention mask with a persistent prefix, and one
head of attention over [P ‖ x] with RoPE on the tokens only.

``attention_with_persistent`` calls the learner's ``persistent_attention_mask``; it is graded with
the reference mask (``uses``), so a wrong mask fails only its own exercise.
"""

from __future__ import annotations

import math

import torch

from titans_mini.attention import apply_rope, rope_cos_sin
from titans_mini.checks.framework import Case, Check, Mistake

__all__ = ["persistent_attention_mask", "attention_with_persistent"]


# --------------------------------------------------------------------------- exercise 1


def _window_mask(T, window):
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = s <= t
    if window is not None:
        visible = visible & (t - s < window)
    return visible  # (T, T)


def _persistent_attention_mask(T, n_persistent, window):
    # (T, N_p + T): every query sees all of P, then the causal (sliding-window) mask over x
    return torch.cat([torch.ones(T, n_persistent, dtype=torch.bool), _window_mask(T, window)], dim=1)


def _mask_cases(gen):
    return [
        Case("T=6, N_p=2, window 3", (6, 2, 3)),
        Case("T=10, N_p=4, window 4", (10, 4, 4)),
        Case("no window (full causal), T=5, N_p=3", (5, 3, None)),
        Case("no persistent tokens, T=6, window 2", (6, 0, 2)),
        Case("window 1 (each token sees only itself and P)", (4, 1, 1)),
    ]


def _mask_p_as_first_tokens(T, n_persistent, window):
    # P treated as ordinary tokens at positions -N_p .. -1: the window hides them from late queries
    full = _window_mask(n_persistent + T, window)
    return full[n_persistent:]


def _mask_window_off_by_one(T, n_persistent, window):
    return _persistent_attention_mask(T, n_persistent, None if window is None else window + 1)


def _mask_p_after_x(T, n_persistent, window):
    return torch.cat([_window_mask(T, window), torch.ones(T, n_persistent, dtype=torch.bool)], dim=1)


def _mask_not_causal(T, n_persistent, window):
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (t - s).abs() < (window if window is not None else T)
    return torch.cat([torch.ones(T, n_persistent, dtype=torch.bool), visible], dim=1)


persistent_attention_mask = Check(
    "persistent_attention_mask",
    reference=_persistent_attention_mask,
    make_cases=_mask_cases,
    idea="the columns are [P ‖ x]; every query sees all N_p persistent columns, whatever the "
         "window; query t sees token s only if s <= t and t - s < window",
    formula="t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]; visible = (s <= t) & "
            "(t - s < window) (no window: s <= t); return torch.cat([torch.ones(T, n_persistent, "
            "dtype=torch.bool), visible], dim=1)",
    mistakes=[
        Mistake("you treated P as the first tokens of the sequence, so the window hides them from "
                "later queries: persistent tokens are visible to every query",
                _mask_p_as_first_tokens),
        Mistake("your window is one token too wide: query t sees the w tokens t-w+1 .. t "
                "(t - s < window)",
                _mask_window_off_by_one),
        Mistake("the persistent columns come first: keys are ordered [P ‖ x]", _mask_p_after_x),
        Mistake("query t may not see later tokens (s > t): the mask is causal", _mask_not_causal),
    ],
)


# --------------------------------------------------------------------------- exercise 2


def _attention_with_persistent(x, P, Wq, Wk, Wv, Wo, window, mask_fn=_persistent_attention_mask):
    B, T, d = x.shape
    n_p = P.shape[0]
    cos, sin = rope_cos_sin(torch.arange(T), d)
    q = apply_rope(x @ Wq.T, cos, sin)  # (B, T, d) rotated at positions 0 .. T-1
    k = apply_rope(x @ Wk.T, cos, sin)
    v = x @ Wv.T
    keys = torch.cat([(P @ Wk.T).expand(B, -1, -1), k], dim=1)  # (B, N_p + T, d): P unrotated
    values = torch.cat([(P @ Wv.T).expand(B, -1, -1), v], dim=1)
    scores = q @ keys.transpose(1, 2) / math.sqrt(d)  # (B, T, N_p + T)
    scores = scores.masked_fill(~mask_fn(T, n_p, window), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ values) @ Wo.T


def _attention_cases(gen):
    def case(B, T, n_p, d, window):
        w = [torch.randn(d, d, generator=gen) / d**0.5 for _ in range(4)]
        return (torch.randn(B, T, d, generator=gen), torch.randn(n_p, d, generator=gen), *w, window)

    return [
        Case("B=2, T=10, N_p=3, d=8, window 4", case(2, 10, 3, 8, 4)),
        Case("B=1, T=7, N_p=2, d=16, no window", case(1, 7, 2, 16, None)),
        Case("B=2, T=12, N_p=4, d=8, window 2", case(2, 12, 4, 8, 2)),
    ]


def _attention_p_rotated_first(x, P, Wq, Wk, Wv, Wo, window):
    # P as the first N_p tokens: rotated at positions 0 .. N_p-1, the tokens shifted to N_p ..
    B, T, d = x.shape
    n_p = P.shape[0]
    cos, sin = rope_cos_sin(torch.arange(n_p + T), d)
    xt = torch.cat([P.expand(B, -1, -1), x], dim=1)  # (B, N_p + T, d)
    q = apply_rope(xt @ Wq.T, cos, sin)[:, n_p:]
    k, v = apply_rope(xt @ Wk.T, cos, sin), xt @ Wv.T
    scores = (q @ k.transpose(1, 2) / math.sqrt(d)).masked_fill(
        ~_persistent_attention_mask(T, n_p, window), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v) @ Wo.T


def _attention_p_rotated(x, P, Wq, Wk, Wv, Wo, window):
    B, T, d = x.shape
    n_p = P.shape[0]
    cos, sin = rope_cos_sin(torch.arange(T), d)
    cos_p, sin_p = rope_cos_sin(torch.arange(n_p), d)
    q, k, v = apply_rope(x @ Wq.T, cos, sin), apply_rope(x @ Wk.T, cos, sin), x @ Wv.T
    keys = torch.cat([apply_rope(P @ Wk.T, cos_p, sin_p).expand(B, -1, -1), k], dim=1)
    values = torch.cat([(P @ Wv.T).expand(B, -1, -1), v], dim=1)
    scores = (q @ keys.transpose(1, 2) / math.sqrt(d)).masked_fill(
        ~_persistent_attention_mask(T, n_p, window), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ values) @ Wo.T


def _attention_unscaled(x, P, Wq, Wk, Wv, Wo, window):
    d = x.shape[-1]
    return _attention_with_persistent(x * 1.0, P, Wq * math.sqrt(d), Wk, Wv, Wo, window)


def _attention_no_rope(x, P, Wq, Wk, Wv, Wo, window):
    B, T, d = x.shape
    n_p = P.shape[0]
    keys = torch.cat([(P @ Wk.T).expand(B, -1, -1), x @ Wk.T], dim=1)
    values = torch.cat([(P @ Wv.T).expand(B, -1, -1), x @ Wv.T], dim=1)
    scores = ((x @ Wq.T) @ keys.transpose(1, 2) / math.sqrt(d)).masked_fill(
        ~_persistent_attention_mask(T, n_p, window), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ values) @ Wo.T


attention_with_persistent = Check(
    "attention_with_persistent",
    reference=_attention_with_persistent,
    make_cases=_attention_cases,
    uses={"persistent_attention_mask": _persistent_attention_mask},
    idea="queries and token keys are rotated by RoPE at positions 0 .. T-1; the persistent keys "
         "and values (P through W_k, W_v) are NOT rotated and come first; one softmax over "
         "[P ‖ x] with the mask of exercise 1, scores divided by sqrt(d); then W_o",
    formula="cos, sin = rope_cos_sin(torch.arange(T), d); q = apply_rope(x @ Wq.T, cos, sin); "
            "k = apply_rope(x @ Wk.T, cos, sin); keys = cat([(P @ Wk.T).expand(B, -1, -1), k], 1) "
            "(values the same with Wv, no RoPE); scores = q @ keys.transpose(1, 2) / sqrt(d), "
            "masked_fill(~persistent_attention_mask(T, N_p, window), -inf); "
            "return (softmax(scores, -1) @ values) @ Wo.T",
    mistakes=[
        Mistake("you placed P at positions 0 .. N_p-1 and shifted the tokens by N_p: the tokens keep "
                "their positions 0 .. T-1, and P is not rotated at all",
                _attention_p_rotated_first),
        Mistake("you rotated the persistent keys (RoPE at positions 0 .. N_p-1): P carries no RoPE, "
                "only the queries and the token keys are rotated",
                _attention_p_rotated),
        Mistake("the scores are not scaled: divide q·k by sqrt(d)", _attention_unscaled),
        Mistake("you left out RoPE: rotate the queries and the token keys by their positions "
                "(rope_cos_sin, apply_rope)",
                _attention_no_rope),
    ],
)
