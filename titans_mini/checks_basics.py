"""Exercise checks for lessons 01-04 (registered into :mod:`titans_mini.check`).

Conventions used by every check here (the exercise notebooks say the same):

* one sequence or one token, no batch dimension; vectors are 1-D tensors;
* a memory matrix ``W`` (or ``M``) has shape ``(d_v, d_k)``: it maps a key ``k`` of size ``d_k``
  to a value of size ``d_v`` by ``W @ k``. The cases use ``d_k != d_v`` on purpose, so a transposed
  outer product shows up as a shape error instead of passing by luck.

Each ``register`` call lists plausible wrong answers (``wrong=[...]``); the tests make sure every
check fails on them.
"""

from __future__ import annotations

import torch

from titans_mini.check import Case, register

# --------------------------------------------------------------------------- lesson 01


def rnn_forward(x: torch.Tensor, W_h: torch.Tensor, W_x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """Vanilla RNN: h_t = tanh(W_h h_{t-1} + W_x x_t).  x (T, d_in) -> hidden states (T, d)."""
    h = h0
    states = []
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


register(
    "rnn_forward",
    reference=rnn_forward,
    make_cases=_rnn_cases,
    hint="loop over t: h = tanh(W_h @ h + W_x @ x[t]), starting from h0; return the T states "
         "stacked into a (T, d) tensor (h0 itself is not included)",
    wrong=[
        # forgets the non-linearity
        _linear_rnn,
        # includes the initial state: T+1 rows
        lambda x, W_h, W_x, h0: torch.cat([h0[None], rnn_forward(x, W_h, W_x, h0)]),
        # multiplies by W_h transposed
        lambda x, W_h, W_x, h0: rnn_forward(x, W_h.T, W_x, h0),
    ],
)


def rnn_step_jacobian(h_t: torch.Tensor, W_h: torch.Tensor) -> torch.Tensor:
    """∂h_t/∂h_{t-1} for h_t = tanh(W_h h_{t-1} + W_x x_t): diag(1 - h_t²) W_h, shape (d, d)."""
    return (1 - h_t**2)[:, None] * W_h


def _jac_cases(gen: torch.Generator) -> list[Case]:
    def make(d):
        return (torch.tanh(2 * torch.randn(d, generator=gen)), torch.randn(d, d, generator=gen))

    return [
        Case("d=5", make(5)),
        Case("d=8", make(8)),
        Case("h_t = 0 (the linear regime)", (torch.zeros(4), torch.randn(4, 4, generator=gen))),
    ]


register(
    "rnn_step_jacobian",
    reference=rnn_step_jacobian,
    make_cases=_jac_cases,
    hint="tanh'(z) = 1 - tanh(z)^2 = 1 - h_t^2; the chain rule gives diag(1 - h_t^2) @ W_h "
         "(row i of W_h scaled by 1 - h_t[i]^2)",
    wrong=[
        lambda h_t, W_h: W_h * (1 - h_t**2)[None, :],  # scales columns: W_h @ diag(...)
        lambda h_t, W_h: (1 - torch.tanh(h_t) ** 2)[:, None] * W_h,  # applies tanh twice
        lambda h_t, W_h: W_h,  # forgets the tanh derivative
    ],
)


def linear_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal linear attention as a matrix memory: M_t = M_{t-1} + v_t k_tᵀ, y_t = M_t q_t.

    q, k (T, d_k), v (T, d_v) -> y (T, d_v)."""
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
    scores = q @ k.T
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


register(
    "linear_attention_recurrent",
    reference=linear_attention_recurrent,
    make_cases=_linattn_cases,
    hint="start from M = zeros(d_v, d_k); for each t first write M = M + outer(v[t], k[t]), then "
         "read y_t = M @ q[t] (token t sees itself, like causal attention)",
    wrong=[
        _linattn_read_before_write,  # reads before writing: misses the diagonal
        _softmax_attention,  # softmax attention is not a fixed-size matrix memory
        lambda q, k, v: (q @ k.T) @ v,  # no causal mask: sees the future
    ],
)


# --------------------------------------------------------------------------- lesson 02


def delta_rule_write(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: float) -> torch.Tensor:
    """One gradient step on ½‖W k − v‖²:  W ← W − lr · (W k − v) kᵀ."""
    err = W @ k - v
    return W - lr * torch.outer(err, k)


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


register(
    "delta_rule_write",
    reference=delta_rule_write,
    make_cases=_delta_cases,
    hint="the gradient of 1/2 ||W k - v||^2 with respect to W is (W k - v) k^T = "
         "torch.outer(W @ k - v, k); step against it: W - lr * gradient",
    wrong=[
        lambda W, k, v, lr: W + lr * torch.outer(v, k),  # Hebbian (linear-attention) write
        lambda W, k, v, lr: W + lr * torch.outer(W @ k - v, k),  # gradient ascent
        lambda W, k, v, lr: W - lr * torch.outer(W @ k - v, k) / (k @ k),  # normalised step
    ],
)


def recall_accuracy(W: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> float:
    """Fraction of stored pairs recalled: read r_i = W k_i and count i when the stored value most
    similar to r_i (cosine similarity) is v_i.  keys (N, d_k), values (N, d_v)."""
    reads = keys @ W.T  # (N, d_v): row i is W k_i
    sims = torch.nn.functional.normalize(reads, dim=-1) @ torch.nn.functional.normalize(values, dim=-1).T
    hits = sims.argmax(dim=1) == torch.arange(keys.shape[0])
    return hits.float().mean().item()


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
    reads = keys @ W.T
    sims = torch.nn.functional.normalize(reads, dim=-1) @ torch.nn.functional.normalize(values, dim=-1).T
    return (sims.argmax(dim=0) == torch.arange(keys.shape[0])).float().mean().item()


register(
    "recall_accuracy",
    reference=recall_accuracy,
    make_cases=_recall_cases,
    hint="reads = keys @ W.T (row i is W k_i); compare every read with every stored value by "
         "cosine similarity (normalise both), take the argmax over values for each read, and "
         "return the fraction of rows i whose argmax is i",
    wrong=[
        _recall_dot,  # dot product favours values with a large norm
        _recall_wrong_axis,  # argmax over reads instead of over values
    ],
)


# --------------------------------------------------------------------------- lesson 03


def token_surprise(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The associative loss of one token and its gradient (the momentary surprise):
    ℓ = ½‖W k − v‖²,  ∇_W ℓ = (W k − v) kᵀ.  Returns (loss as a 0-d tensor, gradient (d_v, d_k))."""
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


register(
    "token_surprise",
    reference=token_surprise,
    make_cases=_surprise_cases,
    hint="err = W @ k - v; loss = 0.5 * (err @ err); gradient = torch.outer(err, k); return both",
    wrong=[
        lambda W, k, v: ((W @ k - v) @ (W @ k - v), torch.outer(W @ k - v, k)),  # loss without ½
        lambda W, k, v: token_surprise(W, k, v)[::-1],  # (gradient, loss): wrong order
        lambda W, k, v: (token_surprise(W, k, v)[0], torch.outer(v - W @ k, k)),  # sign flipped
    ],
)


def surprise_trace(keys: torch.Tensor, values: torch.Tensor, lr: float) -> torch.Tensor:
    """Online delta rule from W₀ = 0 along a stream; the surprise of token t is the norm of its
    gradient at the state *before* it is written, ‖(W_{t−1} k_t − v_t) k_tᵀ‖.
    keys (T, d_k), values (T, d_v) -> (T,)."""
    W = torch.zeros(values.shape[1], keys.shape[1], dtype=values.dtype)
    out = []
    for t in range(keys.shape[0]):
        grad = torch.outer(W @ keys[t] - values[t], keys[t])
        out.append(grad.norm())
        W = W - lr * grad
    return torch.stack(out)


def _trace_cases(gen: torch.Generator) -> list[Case]:
    def stream(T, d_k, d_v, n_keys):
        bank_k = torch.nn.functional.normalize(torch.randn(n_keys, d_k, generator=gen), dim=-1)
        bank_v = torch.nn.functional.normalize(torch.randn(n_keys, d_v, generator=gen), dim=-1)
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


register(
    "surprise_trace",
    reference=surprise_trace,
    make_cases=_trace_cases,
    hint="start from W = zeros(d_v, d_k); for each t: grad = torch.outer(W @ k_t - v_t, k_t), "
         "record grad.norm() FIRST, then write W = W - lr * grad",
    wrong=[
        _trace_after_write,  # measures after writing: the surprise is already half gone
        _trace_no_write,  # never writes: every recurring token stays surprising
        lambda keys, values, lr: 0.5 * ((surprise_trace(keys, values, lr) /
                                         keys.norm(dim=-1)) ** 2),  # the loss, not the gradient norm
    ],
)


# --------------------------------------------------------------------------- lesson 04


def titans_memory_step(M, S, k, v, theta, eta, alpha):
    """One token of the Titans update (linear memory M(k) = M k):

        S_t = η S_{t−1} − θ ∇ℓ(M_{t−1}),   ∇ℓ = (M_{t−1} k − v) kᵀ
        M_t = (1 − α) M_{t−1} + S_t

    Returns (M_t, S_t)."""
    grad = torch.outer(M @ k - v, k)
    S_new = eta * S - theta * grad
    M_new = (1 - alpha) * M + S_new
    return M_new, S_new


def _step_cases(gen: torch.Generator) -> list[Case]:
    def make(d_v, d_k, theta, eta, alpha):
        return (torch.randn(d_v, d_k, generator=gen), torch.randn(d_v, d_k, generator=gen),
                torch.randn(d_k, generator=gen), torch.randn(d_v, generator=gen),
                theta, eta, alpha)

    return [
        Case("θ=0.3, η=0.9, α=0.1", make(3, 5, 0.3, 0.9, 0.1)),
        Case("θ=0.8, η=0.5, α=0.4", make(6, 4, 0.8, 0.5, 0.4)),
        Case("η=0, α=0 (the delta rule)", make(4, 4, 0.5, 0.0, 0.0)),
        Case("θ=0 (no new surprise: momentum and decay only)", make(3, 2, 0.0, 0.7, 0.2)),
    ]


def _ema_step(M, S, k, v, theta, eta, alpha):
    grad = torch.outer(M @ k - v, k)
    S_new = eta * S - (1 - eta) * theta * grad
    return (1 - alpha) * M + S_new, S_new


register(
    "titans_memory_step",
    reference=titans_memory_step,
    make_cases=_step_cases,
    hint="grad = torch.outer(M @ k - v, k) at the OLD M; S_new = eta * S - theta * grad; "
         "M_new = (1 - alpha) * M + S_new; return (M_new, S_new)",
    wrong=[
        # forgets after adding the surprise: (1 − α)(M + S)
        lambda M, S, k, v, th, eta, al: ((1 - al) * (M + (eta * S - th * torch.outer(M @ k - v, k))),
                                         eta * S - th * torch.outer(M @ k - v, k)),
        # exponential moving average of gradients instead of momentum
        _ema_step,
        # returns (S, M)
        lambda M, S, k, v, th, eta, al: titans_memory_step(M, S, k, v, th, eta, al)[::-1],
    ],
)


def gated_delta_step(W, k, v, theta, alpha):
    """The Titans update with η = 0 (the gated delta rule in Titans form, reference §2.2):
    W_t = (1 − α) W_{t−1} − θ (W_{t−1} k − v) kᵀ  (error at the undecayed state)."""
    return (1 - alpha) * W - theta * torch.outer(W @ k - v, k)


def _gated_cases(gen: torch.Generator) -> list[Case]:
    def make(d_v, d_k, theta, alpha):
        return (torch.randn(d_v, d_k, generator=gen), torch.randn(d_k, generator=gen),
                torch.randn(d_v, generator=gen), theta, alpha)

    return [
        Case("θ=0.5, α=0.3", make(3, 5, 0.5, 0.3)),
        Case("θ=0.2, α=0.05", make(5, 4, 0.2, 0.05)),
        Case("α=1 (erase, then write)", make(4, 3, 0.4, 1.0)),
        Case("α=0 (plain delta rule)", make(3, 3, 0.6, 0.0)),
    ]


register(
    "gated_delta_step",
    reference=gated_delta_step,
    make_cases=_gated_cases,
    hint="Titans form: take the error at the OLD (undecayed) W: "
         "(1 - alpha) * W - theta * torch.outer(W @ k - v, k)",
    wrong=[
        # Gated DeltaNet's form: error taken at the decayed state (differs at order αθ)
        lambda W, k, v, th, al: (1 - al) * W - th * torch.outer((1 - al) * W @ k - v, k),
        # decays the fresh write too
        lambda W, k, v, th, al: (1 - al) * (W - th * torch.outer(W @ k - v, k)),
    ],
)
