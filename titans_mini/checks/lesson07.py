"""Checks for lesson 07 (the neural memory layer): the causal depthwise convolution, the gates
module and the gated output.

The exercises of this lesson do not call each other. ``memory_gates`` checks a class: the check
builds the learner's module, loads known weights into it and compares the three gates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from titans_mini.checks.framework import Case, Check, Mistake

__all__ = ["causal_depthwise_conv", "memory_gates", "memory_output"]


# --------------------------------------------------------------------------- exercise 1


def _causal_depthwise_conv(x, weight):
    # x (B, T, C), weight (C, K): y_t = sum_j weight[:, j] * x_{t-K+1+j}, zeros before the start
    K = weight.shape[-1]
    padded = F.pad(x.transpose(1, 2), (K - 1, 0))  # (B, C, K-1+T)
    return F.conv1d(padded, weight.unsqueeze(1), groups=x.shape[-1]).transpose(1, 2)


def _conv_cases(gen):
    return [
        Case("B=2, T=10, C=6, kernel 4", (torch.randn(2, 10, 6, generator=gen), torch.randn(6, 4, generator=gen))),
        Case("sequence shorter than the kernel (T=2)",
             (torch.randn(1, 2, 3, generator=gen), torch.randn(3, 4, generator=gen))),
        Case("kernel 1 (a per-channel scale)", (torch.randn(2, 5, 4, generator=gen), torch.randn(4, 1, generator=gen))),
        Case("the identity kernel [0, 0, 0, 1]",
             (torch.randn(1, 7, 3, generator=gen), torch.tensor([[0.0, 0.0, 0.0, 1.0]]).repeat(3, 1))),
    ]


def _conv_same_padding(x, weight):
    K = weight.shape[-1]
    padded = F.pad(x.transpose(1, 2), ((K - 1) // 2, K // 2))
    return F.conv1d(padded, weight.unsqueeze(1), groups=x.shape[-1]).transpose(1, 2)


causal_depthwise_conv = Check(
    "causal_depthwise_conv",
    reference=_causal_depthwise_conv,
    make_cases=_conv_cases,
    idea="each channel has its own K-tap filter over the current token and the K-1 tokens "
         "before it; zeros stand in for the tokens before the start, so no output sees the future",
    formula="pad K-1 zero tokens BEFORE the first one (F.pad(x, (0, 0, K - 1, 0))), then "
            "y[:, t] = sum_j weight[:, j] * padded[:, t + j] (the last tap, j = K-1, multiplies "
            "the current token)",
    mistakes=[
        Mistake("you padded on both sides ('same' padding): output t then sees future tokens; "
                "put all K-1 zeros before the first token",
                _conv_same_padding),
        Mistake("your kernel is reversed: the LAST tap, weight[:, K-1], multiplies the current "
                "token",
                lambda x, w: _causal_depthwise_conv(x, w.flip(-1))),
        Mistake("you mixed the channels' kernels into one: channel c uses its own kernel weight[c]",
                lambda x, w: _causal_depthwise_conv(x, w.mean(0, keepdim=True).expand_as(w))),
    ],
)


# --------------------------------------------------------------------------- exercise 2


def _logit(p):
    return math.log(p / (1 - p))


class _MemoryGates(nn.Module):
    def __init__(self, dim, heads, theta_max=0.1):
        super().__init__()
        self.heads, self.theta_max = heads, theta_max
        self.proj = nn.Linear(dim, 3 * heads)
        with torch.no_grad():
            self.proj.bias.copy_(torch.tensor([_logit(0.25), _logit(0.9), _logit(0.05)]).repeat(heads))

    def forward(self, x):
        B, T, _ = x.shape
        z = self.proj(x).view(B, T, self.heads, 3).transpose(1, 2)  # (B, H, T, 3)
        return self.theta_max * torch.sigmoid(z[..., 0]), torch.sigmoid(z[..., 1]), torch.sigmoid(z[..., 2])


def _build_and_run_gates(cls, case):
    """Build the module from a fixed seed (leaving the notebook's random state alone), load the
    case's weights (or zero the weights and keep the module's own bias), return its three gates."""
    dim, heads, theta_max, x, state = case.args
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = cls(dim, heads, theta_max)
    with torch.no_grad():
        if state is None:
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


class _GatesWithoutThetaMax(_MemoryGates):
    def forward(self, x):
        theta, eta, alpha = super().forward(x)
        return theta / self.theta_max, eta, alpha


class _GatesGateMajor(_MemoryGates):
    def forward(self, x):
        B, T, _ = x.shape
        z = self.proj(x).view(B, T, 3, self.heads).permute(0, 3, 1, 2)  # (B, H, T, 3)
        return self.theta_max * torch.sigmoid(z[..., 0]), torch.sigmoid(z[..., 1]), torch.sigmoid(z[..., 2])


class _GatesDefaultBias(_MemoryGates):
    def __init__(self, dim, heads, theta_max=0.1):
        nn.Module.__init__(self)
        self.heads, self.theta_max = heads, theta_max
        self.proj = nn.Linear(dim, 3 * heads)  # keeps PyTorch's default (random) bias


memory_gates = Check(
    "memory_gates",
    reference=_MemoryGates,
    make_cases=_gates_cases,
    call=_build_and_run_gates,
    idea="one linear layer gives every head three logits per token; sigmoids turn them into "
         "theta (scaled by theta_max), eta and alpha, and the layer's bias sets their start values",
    formula="self.proj = nn.Linear(dim, 3 * heads); bias = the logits (log(p / (1 - p))) of "
            "(1/4, 0.9, 0.05) repeated per head; forward: self.proj(x).view(B, T, heads, 3)"
            ".transpose(1, 2) -> theta = theta_max * sigmoid(z[..., 0]), eta = sigmoid(z[..., 1]), "
            "alpha = sigmoid(z[..., 2])",
    mistakes=[
        Mistake("theta is not scaled: theta = theta_max * sigmoid(its logit)", _GatesWithoutThetaMax),
        Mistake("you split the projection gate-major, (3, heads): it holds [theta, eta, alpha] "
                "per head, so reshape to (B, T, heads, 3)",
                _GatesGateMajor),
        Mistake("you kept PyTorch's default (random) bias, so the gates do not start at "
                "theta = theta_max/4, eta = 0.9, alpha = 0.05: copy the logits of (1/4, 0.9, 0.05) "
                "into the bias",
                _GatesDefaultBias),
    ],
)


# --------------------------------------------------------------------------- exercise 3


def _rms_norm(y):
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)


def _memory_output(reads, x, gain, W_gate, W_out):
    B, H, T, d = reads.shape
    r = _rms_norm(reads).transpose(1, 2).reshape(B, T, H * d) * gain  # RMSNorm per head, then merge
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


def _output_one_norm(reads, x, gain, W_gate, W_out):
    B, H, T, d = reads.shape
    r = _rms_norm(reads.transpose(1, 2).reshape(B, T, H * d)) * gain
    return (r * F.silu(x @ W_gate.T)) @ W_out.T


def _output_sigmoid_gate(reads, x, gain, W_gate, W_out):
    B, H, T, d = reads.shape
    r = _rms_norm(reads).transpose(1, 2).reshape(B, T, H * d) * gain
    return (r * torch.sigmoid(x @ W_gate.T)) @ W_out.T


def _output_no_norm(reads, x, gain, W_gate, W_out):
    B, H, T, d = reads.shape
    return (reads.transpose(1, 2).reshape(B, T, H * d) * gain * F.silu(x @ W_gate.T)) @ W_out.T


memory_output = Check(
    "memory_output",
    reference=_memory_output,
    make_cases=_output_cases,
    idea="normalise each head's read on its own (RMSNorm), put the heads side by side, scale by "
         "the gain, gate with SiLU of a projection of x, then project out",
    formula="o = W_out(RMSNorm(y) * gain * SiLU(W_gate x)): reads * torch.rsqrt(reads.pow(2)"
            ".mean(-1, keepdim=True) + 1e-6), merge (B, H, T, d) -> (B, T, H*d) with "
            "transpose(1, 2).reshape, * gain, * F.silu(x @ W_gate.T), then @ W_out.T",
    mistakes=[
        Mistake("you applied one RMSNorm over all heads together: normalise each head's read over "
                "its own d_head features, before merging",
                _output_one_norm),
        Mistake("you gated with a sigmoid: the gate is SiLU, F.silu(x @ W_gate.T)",
                _output_sigmoid_gate),
        Mistake("you left out the RMSNorm of the reads", _output_no_norm),
    ],
)
