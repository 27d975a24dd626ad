"""Checks for lesson 03 (surprise): the surprise of one token and the surprise trace of a stream.

A memory matrix ``W`` has shape ``(d_v, d_k)`` and reads a key by ``W @ k``. ``surprise_trace``
is graded with the reference ``token_surprise`` if the learner's code calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from titans_mini.checks.framework import Case, Check, Mistake

__all__ = ["surprise_trace", "token_surprise"]


# --------------------------------------------------------------------------- exercise 1


def _token_surprise(W, k, v):
    err = W @ k - v
    return 0.5 * (err @ err), torch.outer(err, k)


def _surprise_cases(gen: torch.Generator) -> list[Case]:
    def make(d_v, d_k):
        return (torch.randn(d_v, d_k, generator=gen), torch.randn(d_k, generator=gen),
                torch.randn(d_v, generator=gen))

    k = torch.randn(4, generator=gen)
    W = torch.randn(3, 4, generator=gen)
    return [
        Case("d_v=3, d_k=5", make(3, 5)),
        Case("d_v=7, d_k=4", make(7, 4)),
        Case("a pair the memory already knows (no surprise)", (W, k, W @ k)),
    ]


token_surprise = Check(
    "token_surprise",
    reference=_token_surprise,
    make_cases=_surprise_cases,
    idea="the loss is half the squared error of the memory's prediction W k against v; its "
         "gradient with respect to W is the outer product of that error with k",
    formula="err = W @ k - v; return 0.5 * (err @ err), torch.outer(err, k)",
    mistakes=[
        Mistake("your loss is missing the 1/2: l = 1/2 ||W k - v||^2",
                lambda W, k, v: ((W @ k - v) @ (W @ k - v), torch.outer(W @ k - v, k))),
        Mistake("you returned (gradient, loss): return (loss, gradient)",
                lambda W, k, v: _token_surprise(W, k, v)[::-1]),
        Mistake("your gradient has the wrong sign: it is (W k - v) k^T, the prediction minus the "
                "target",
                lambda W, k, v: (_token_surprise(W, k, v)[0], torch.outer(v - W @ k, k))),
    ],
)


# --------------------------------------------------------------------------- exercise 2


def _surprise_trace(keys, values, lr):
    W = torch.zeros(values.shape[1], keys.shape[1], dtype=values.dtype)
    out = []
    for t in range(keys.shape[0]):
        grad = torch.outer(W @ keys[t] - values[t], keys[t])
        out.append(grad.norm())
        W = W - lr * grad
    return torch.stack(out)


def _trace_cases(gen: torch.Generator) -> list[Case]:
    def stream(T, d_k, d_v, n_keys):
        bank_k = F.normalize(torch.randn(n_keys, d_k, generator=gen), dim=-1)
        bank_v = F.normalize(torch.randn(n_keys, d_v, generator=gen), dim=-1)
        ids = torch.randint(0, n_keys, (T,), generator=gen)
        return bank_k[ids], bank_v[ids]

    return [
        Case("T=30, 4 recurring keys, lr=0.5", (*stream(30, 6, 5, 4), 0.5)),
        Case("T=50, 8 recurring keys, lr=0.9", (*stream(50, 8, 8, 8), 0.9)),
        Case("random unnormalised pairs, lr=0.1", (torch.randn(20, 5, generator=gen),
                                                   torch.randn(20, 3, generator=gen), 0.1)),
    ]


def _trace_after_write(keys, values, lr):
    W = torch.zeros(values.shape[1], keys.shape[1])
    out = []
    for t in range(keys.shape[0]):
        W = W - lr * torch.outer(W @ keys[t] - values[t], keys[t])
        out.append(torch.outer(W @ keys[t] - values[t], keys[t]).norm())
    return torch.stack(out)


def _trace_no_write(keys, values, lr):
    W = torch.zeros(values.shape[1], keys.shape[1])
    return torch.stack([torch.outer(W @ keys[t] - values[t], keys[t]).norm()
                        for t in range(keys.shape[0])])


surprise_trace = Check(
    "surprise_trace",
    reference=_surprise_trace,
    make_cases=_trace_cases,
    idea="read the stream with the delta rule from an empty memory; a token's surprise is the "
         "size of its gradient, measured BEFORE the memory learns the token",
    formula="W = torch.zeros(d_v, d_k); for each t: grad = torch.outer(W @ k_t - v_t, k_t); "
            "record grad.norm() first, then write W = W - lr * grad; return the stacked norms (T,)",
    mistakes=[
        Mistake("you measured the surprise after writing the token: record the gradient norm "
                "first, then write",
                _trace_after_write),
        Mistake("your memory never learns: after recording the surprise, take the delta-rule "
                "step W = W - lr * grad",
                _trace_no_write),
        Mistake("you recorded the loss, not the gradient: the surprise here is the gradient's "
                "norm ||(W k - v) k^T||",
                lambda keys, values, lr: 0.5 * (_surprise_trace(keys, values, lr)
                                                / keys.norm(dim=-1)) ** 2),
    ],
    uses={"token_surprise": _token_surprise},
)
