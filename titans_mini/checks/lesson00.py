"""Check for lesson 00 (welcome): the example exercise that shows how checks work."""

from __future__ import annotations

import torch

from titans_mini.checks.framework import Case, Check, Mistake

__all__ = ["l2_normalize"]


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _l2_cases(gen: torch.Generator) -> list[Case]:
    return [
        Case("random (4, 8)", (torch.randn(4, 8, generator=gen),)),
        Case("random (2, 3, 5)", (torch.randn(2, 3, 5, generator=gen),)),
        Case("large values", (1e3 * torch.randn(3, 4, generator=gen),)),
        Case("a zero row (must stay finite)", (torch.zeros(2, 4),)),
    ]


l2_normalize = Check(
    "l2_normalize",
    reference=_l2_normalize,
    make_cases=_l2_cases,
    idea="divide every vector (along the last dimension) by its own length, and keep a zero "
         "vector finite",
    formula="x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)",
    mistakes=[
        Mistake("you divided by the norm of the whole tensor: normalise each vector on its own "
                "(dim=-1, keepdim=True)",
                lambda x: x / x.norm()),
        Mistake("a zero vector gives 0/0 = nan: clamp the norm from below (clamp_min(1e-6))",
                lambda x: x / x.norm(dim=-1, keepdim=True)),
        Mistake("you divided by the sum of absolute values (the L1 norm): a vector's length is "
                "its Euclidean (L2) norm",
                lambda x: x / x.abs().sum(dim=-1, keepdim=True).clamp_min(1e-6)),
    ],
)
