"""Checks for lesson 01 (the memory problem): the vanilla RNN, one step of its chain rule, and
linear attention as a recurrent matrix memory.

One sequence, no batch dimension. A memory matrix ``M`` has shape ``(d_v, d_k)``; the cases use
``d_k != d_v`` so that a transposed outer product shows up as a shape error.
"""

from __future__ import annotations

import torch

from titans_mini.checks.framework import Case, Check, Mistake

__all__ = ["linear_attention_recurrent", "rnn_forward", "rnn_step_jacobian"]


# --------------------------------------------------------------------------- exercise 1


def _rnn_forward(x, W_h, W_x, h0):
    h, states = h0, []
    for t in range(x.shape[0]):
        h = torch.tanh(W_h @ h + W_x @ x[t])
        states.append(h)
    return torch.stack(states)


def _rnn_cases(gen: torch.Generator) -> list[Case]:
    def make(T, d, d_in, scale):
        return (torch.randn(T, d_in, generator=gen),
                scale * torch.randn(d, d, generator=gen) / d**0.5,
                torch.randn(d, d_in, generator=gen) / d_in**0.5,
                0.5 * torch.randn(d, generator=gen))

    return [
        Case("T=6, d=5, d_in=3", make(6, 5, 3, 0.9)),
        Case("T=10, d=8, d_in=4, large weights (saturating tanh)", make(10, 8, 4, 3.0)),
        Case("T=1 (a single step)", make(1, 4, 2, 1.0)),
    ]


def _linear_rnn(x, W_h, W_x, h0):
    h, states = h0, []
    for t in range(x.shape[0]):
        h = W_h @ h + W_x @ x[t]
        states.append(h)
    return torch.stack(states)


rnn_forward = Check(
    "rnn_forward",
    reference=_rnn_forward,
    make_cases=_rnn_cases,
    idea="one new hidden state per time step: mix the previous state with the current input, "
         "squash with tanh, and return only the T new states",
    formula="h = h0; for t in range(T): h = torch.tanh(W_h @ h + W_x @ x[t]); return the T states "
            "stacked into a (T, d) tensor (h0 itself not included)",
    mistakes=[
        Mistake("you left out the tanh: the RNN is non-linear, h_t = tanh(W_h h_{t-1} + W_x x_t)",
                _linear_rnn),
        Mistake("you included the initial state h0: return only the T new states, shape (T, d)",
                lambda x, W_h, W_x, h0: torch.cat([h0[None], _rnn_forward(x, W_h, W_x, h0)])),
        Mistake("you multiplied by W_h transposed: the recurrence is W_h @ h",
                lambda x, W_h, W_x, h0: _rnn_forward(x, W_h.T, W_x, h0)),
    ],
)


# --------------------------------------------------------------------------- exercise 2


def _rnn_step_jacobian(h_t, W_h):
    return (1 - h_t**2)[:, None] * W_h


def _jac_cases(gen: torch.Generator) -> list[Case]:
    def make(d):
        return (torch.tanh(2 * torch.randn(d, generator=gen)), torch.randn(d, d, generator=gen))

    return [
        Case("d=5", make(5)),
        Case("d=8", make(8)),
        Case("h_t = 0 (the linear regime)", (torch.zeros(4), torch.randn(4, 4, generator=gen))),
    ]


rnn_step_jacobian = Check(
    "rnn_step_jacobian",
    reference=_rnn_step_jacobian,
    make_cases=_jac_cases,
    idea="chain rule through h_t = tanh(z_t): the derivative of tanh, written with h_t itself, "
         "scales each ROW of W_h",
    formula="(1 - h_t**2)[:, None] * W_h, i.e. diag(1 - h_t^2) @ W_h",
    mistakes=[
        Mistake("you scaled the columns of W_h (W_h @ diag): the tanh derivative multiplies from "
                "the left, diag(1 - h_t^2) @ W_h scales the rows",
                lambda h_t, W_h: W_h * (1 - h_t**2)[None, :]),
        Mistake("you applied tanh to h_t again: h_t is already tanh(z_t), so tanh'(z_t) = 1 - h_t^2",
                lambda h_t, W_h: (1 - torch.tanh(h_t) ** 2)[:, None] * W_h),
        Mistake("you left out the tanh derivative: W_h must be scaled by 1 - h_t^2",
                lambda h_t, W_h: W_h),
    ],
)


# --------------------------------------------------------------------------- exercise 3


def _linear_attention_recurrent(q, k, v):
    M = torch.zeros(v.shape[1], k.shape[1], dtype=v.dtype)
    out = []
    for t in range(q.shape[0]):
        M = M + torch.outer(v[t], k[t])
        out.append(M @ q[t])
    return torch.stack(out)


def _linattn_cases(gen: torch.Generator) -> list[Case]:
    def make(T, d_k, d_v):
        return (torch.randn(T, d_k, generator=gen), torch.randn(T, d_k, generator=gen),
                torch.randn(T, d_v, generator=gen))

    return [
        Case("T=7, d_k=4, d_v=3", make(7, 4, 3)),
        Case("T=12, d_k=6, d_v=5", make(12, 6, 5)),
        Case("T=1", make(1, 3, 2)),
    ]


def _linattn_read_before_write(q, k, v):
    M = torch.zeros(v.shape[1], k.shape[1])
    out = []
    for t in range(q.shape[0]):
        out.append(M @ q[t])
        M = M + torch.outer(v[t], k[t])
    return torch.stack(out)


def _softmax_attention(q, k, v):
    T = q.shape[0]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.softmax((q @ k.T).masked_fill(~mask, float("-inf")), dim=-1) @ v


linear_attention_recurrent = Check(
    "linear_attention_recurrent",
    reference=_linear_attention_recurrent,
    make_cases=_linattn_cases,
    idea="a (d_v, d_k) matrix that starts at zero: at every step first add the new pair "
         "v_t k_t^T, then read the matrix with q_t (token t sees itself, like causal attention)",
    formula="M = torch.zeros(d_v, d_k); for t: M = M + torch.outer(v[t], k[t]); y_t = M @ q[t]; "
            "return the T reads stacked into (T, d_v)",
    mistakes=[
        Mistake("you read before writing: token t must see its own pair, so write v_t k_t^T "
                "first, then read with q_t",
                _linattn_read_before_write),
        Mistake("you computed softmax attention: linear attention has no softmax, its memory is "
                "a plain sum of outer products",
                _softmax_attention),
        Mistake("every output sees the whole sequence: at step t the memory holds only tokens "
                "1..t (causal)",
                lambda q, k, v: (q @ k.T) @ v),
    ],
)
