"""Lesson 12's check references against autograd: the bias gradient is the derivative of the
library's loss, and the linear-memory write is one gradient step on the summed loss."""

from __future__ import annotations

import pytest
import torch

from titans_mini.checks import lesson12
from titans_mini.functional import attentional_bias_loss

BIASES = [("l2", None), ("huber", 0.5), ("huber", 2.0), ("lp", 3.0), ("lp", 1.5), ("lp", 2.0)]


@pytest.mark.parametrize("bias,param", BIASES)
def test_bias_grad_reference_is_the_derivative_of_the_loss(bias, param):
    g = torch.Generator().manual_seed(0)
    pred = (2 * torch.randn(4, 7, dtype=torch.float64, generator=g)).requires_grad_(True)
    target = torch.randn(4, 7, dtype=torch.float64, generator=g)
    (auto,) = torch.autograd.grad(attentional_bias_loss(pred, target, bias, param).sum(), pred)
    torch.testing.assert_close(lesson12.attentional_bias_grad.reference(pred - target, bias, param),
                               auto)


@pytest.mark.parametrize("bias,param", BIASES)
def test_linear_memory_write_reference_is_one_gradient_step(bias, param):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 3, dtype=torch.float64, generator=g)
    k = torch.randn(6, 3, dtype=torch.float64, generator=g)
    v = 3 * torch.randn(6, 5, dtype=torch.float64, generator=g)
    Wg = W.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(attentional_bias_loss(k @ Wg.T, v, bias, param).sum(), Wg)
    torch.testing.assert_close(lesson12.linear_memory_write.reference(W, k, v, 0.1, bias, param),
                               W - 0.1 * grad)


def test_check_cases_cover_every_bias():
    for chk in (lesson12.attentional_bias_grad, lesson12.linear_memory_write):
        cases = chk.make_cases(torch.Generator().manual_seed(0))
        assert {c.args[-2] for c in cases} == {"l2", "huber", "lp"}
