"""Checks for lesson 02 (associative memory): the delta-rule write and recall accuracy.

A memory matrix ``W`` has shape ``(d_v, d_k)`` and reads a key by ``W @ k``; the cases use
``d_k != d_v`` so that a transposed outer product shows up as a shape error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from titans_mini.checks.framework import Case, Check, Mistake

__all__ = ["delta_rule_write", "recall_accuracy"]


# --------------------------------------------------------------------------- exercise 1


def _delta_rule_write(W, k, v, lr):
    return W - lr * torch.outer(W @ k - v, k)


def _delta_cases(gen: torch.Generator) -> list[Case]:
    def make(d_v, d_k, lr):
        return (torch.randn(d_v, d_k, generator=gen), torch.randn(d_k, generator=gen),
                torch.randn(d_v, generator=gen), lr)

    return [
        Case("d_v=3, d_k=5, lr=0.1", make(3, 5, 0.1)),
        Case("d_v=6, d_k=4, lr=0.7", make(6, 4, 0.7)),
        Case("W = 0 (an empty memory)", (torch.zeros(4, 3), torch.randn(3, generator=gen),
                                         torch.randn(4, generator=gen), 0.5)),
        Case("lr = 0 (no write)", make(3, 3, 0.0)),
    ]


delta_rule_write = Check(
    "delta_rule_write",
    reference=_delta_rule_write,
    make_cases=_delta_cases,
    idea="one gradient-descent step on the associative loss 1/2 ||W k - v||^2; its gradient "
         "with respect to W is the outer product of the error W k - v with the key",
    formula="W - lr * torch.outer(W @ k - v, k)",
    mistakes=[
        Mistake("you added lr * v k^T (the Hebbian, linear-attention write): the delta rule "
                "writes the error W k - v, not the value",
                lambda W, k, v, lr: W + lr * torch.outer(v, k)),
        Mistake("you stepped up the gradient: subtract lr times the gradient",
                lambda W, k, v, lr: W + lr * torch.outer(W @ k - v, k)),
        Mistake("you divided the step by ||k||^2 (the normalised delta rule): the plain gradient "
                "step has no normalisation",
                lambda W, k, v, lr: W - lr * torch.outer(W @ k - v, k) / (k @ k)),
    ],
)


# --------------------------------------------------------------------------- exercise 2


def _recall_accuracy(W, keys, values):
    reads = keys @ W.T  # (N, d_v): row i is W k_i
    sims = F.normalize(reads, dim=-1) @ F.normalize(values, dim=-1).T
    return (sims.argmax(dim=1) == torch.arange(keys.shape[0])).float().mean().item()


def _recall_cases(gen: torch.Generator) -> list[Case]:
    def make(N, d_k, d_v, noise):
        keys = torch.randn(N, d_k, generator=gen)
        # values of very different norms: only cosine similarity treats them fairly
        values = torch.randn(N, d_v, generator=gen) * torch.rand(N, 1, generator=gen).mul(4).add(0.2)
        W = torch.linalg.lstsq(keys, values).solution.T  # (d_v, d_k) best linear fit
        return (W + noise * torch.randn(d_v, d_k, generator=gen), keys, values)

    return [
        Case("N=24 pairs, d_k=8, d_v=6 (over capacity)", make(24, 8, 6, 0.0)),
        Case("N=40 pairs, d_k=16, d_v=12, noisy W", make(40, 16, 12, 0.3)),
        Case("N=5 pairs, d_k=10, d_v=7 (under capacity: all recalled)", make(5, 10, 7, 0.0)),
    ]


def _recall_dot(W, keys, values):
    reads = keys @ W.T
    return ((reads @ values.T).argmax(dim=1) == torch.arange(keys.shape[0])).float().mean().item()


def _recall_wrong_axis(W, keys, values):
    sims = F.normalize(keys @ W.T, dim=-1) @ F.normalize(values, dim=-1).T
    return (sims.argmax(dim=0) == torch.arange(keys.shape[0])).float().mean().item()


recall_accuracy = Check(
    "recall_accuracy",
    reference=_recall_accuracy,
    make_cases=_recall_cases,
    idea="read every key, find for each read the stored value it is most similar to (cosine "
         "similarity), and return the fraction of reads whose best match is their own value",
    formula="reads = keys @ W.T; sims = F.normalize(reads, dim=-1) @ F.normalize(values, dim=-1).T; "
            "(sims.argmax(dim=1) == torch.arange(N)).float().mean().item()",
    mistakes=[
        Mistake("you compared by dot product: values with a large norm win every comparison; "
                "normalise reads and values (cosine similarity)",
                _recall_dot),
        Mistake("you took the argmax over the reads (dim=0): for each read, pick the best value "
                "(dim=1)",
                _recall_wrong_axis),
    ],
)
