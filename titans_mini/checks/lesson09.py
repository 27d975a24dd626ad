"""Checks for lesson 09 (MAC, MAG and MAL): MAC's attention mask over [P ‖ h ‖ S], MAC's causal
final read, and the gate y ⊗ m of MAG and MAC.

The exercises of this lesson do not call each other. ``mac_final_read`` receives a
``NeuralMemory``: the check builds one from a fixed seed (leaving the notebook's random state
alone), writes a first segment into it, and hands the learner the memory, the next segment's
attention output y and the state before that segment.
"""

from __future__ import annotations

import torch

from titans_mini.checks.framework import Case, Check, Mistake
from titans_mini.memory import NeuralMemory

__all__ = ["mac_attention_mask", "mac_final_read", "memory_gate"]


# --------------------------------------------------------------------------- exercise 1


def _mac_attention_mask(n, n_persistent, causal=True):
    # rows: the n segment tokens; columns: [P (N_p) ‖ h (n) ‖ S (n)]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    tokens = j <= i  # (n, n): token i sees S_j for j <= i
    retrieved = tokens if causal else torch.ones(n, n, dtype=torch.bool)
    return torch.cat([torch.ones(n, n_persistent, dtype=torch.bool), retrieved, tokens], dim=1)


def _mac_mask_cases(gen):
    return [
        Case("causal, segment of 5, N_p = 2", (5, 2, True)),
        Case("as written (causal=False), segment of 4, N_p = 3", (4, 3, False)),
        Case("causal, segment of 8, N_p = 0", (8, 0, True)),
        Case("causal, segment of 1, N_p = 1", (1, 1, True)),
    ]


def _mask_h_always(n, n_persistent, causal=True):
    return _mac_attention_mask(n, n_persistent, causal=False)


def _mask_h_strict(n, n_persistent, causal=True):
    mask = _mac_attention_mask(n, n_persistent, causal)
    if causal:
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        mask[:, n_persistent:n_persistent + n] = j < i
    return mask


def _mask_s_before_h(n, n_persistent, causal=True):
    mask = _mac_attention_mask(n, n_persistent, causal)
    return torch.cat([mask[:, :n_persistent], mask[:, n_persistent + n:], mask[:, n_persistent:n_persistent + n]],
                     dim=1)


def _mask_tokens_always(n, n_persistent, causal=True):
    mask = _mac_attention_mask(n, n_persistent, causal)
    if not causal:
        mask[:, n_persistent + n:] = True
    return mask


mac_attention_mask = Check(
    "mac_attention_mask",
    reference=_mac_attention_mask,
    make_cases=_mac_mask_cases,
    idea="columns [P ‖ h ‖ S]: every token sees all of P; token i sees S_j only for j <= i; the "
         "retrieved h_j is computed from token j, so the causal MAC shows it only for j <= i, and "
         "MAC as written (causal=False) shows the whole h block",
    formula="i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]; tokens = j <= i; "
            "retrieved = tokens if causal else torch.ones(n, n, dtype=torch.bool); "
            "torch.cat([torch.ones(n, n_persistent, dtype=torch.bool), retrieved, tokens], dim=1)",
    mistakes=[
        Mistake("you showed the whole h block to every token: h_j is read from token j, so with "
                "causal=True token i may see h_j only for j <= i",
                _mask_h_always),
        Mistake("token i may also see its own retrieval h_i (j <= i, not j < i)", _mask_h_strict),
        Mistake("the columns are ordered [P ‖ h ‖ S]: the retrieved tokens come before the segment",
                _mask_s_before_h),
        Mistake("even MAC as written keeps the segment's own tokens causal: only the h block is fully "
                "visible when causal=False",
                _mask_tokens_always),
    ],
)


# --------------------------------------------------------------------------- exercise 2


def _mac_final_read(memory, y, state):
    m, _ = memory(y, state)  # one pass over y: each chunk reads the state before it, then is written
    return m


def _run_final_read(fn, case):
    """Build the memory from a fixed seed, write a first segment, call fn(memory, y, state)."""
    dim, heads, chunk, first, y = case.args
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        memory = NeuralMemory(dim, heads=heads, depth=2, chunk_size=chunk)
    with torch.no_grad():
        _, state = memory(first)  # the memory after a first segment: not M0
        return fn(memory, y, state)


def _final_read_cases(gen):
    def case(B, dim, heads, chunk, n):
        return (dim, heads, chunk, torch.randn(B, n, dim, generator=gen), torch.randn(B, n, dim, generator=gen))

    return [
        Case("dim 16, 2 heads, chunks of 4, segment of 8", case(2, 16, 2, 4, 8)),
        Case("dim 8, 1 head, chunks of 2, segment of 6", case(1, 8, 1, 2, 6)),
        Case("dim 16, 4 heads, chunks of 4, segment of 12", case(2, 16, 4, 4, 12)),
    ]


def _read_after_write(memory, y, state):
    _, written = memory(y, state)
    return memory.retrieve(y, written)[0]


def _read_before_write(memory, y, state):
    return memory.retrieve(y, state)[0]


def _read_initial_memory(memory, y, state):
    return memory(y, memory.init_state(y.shape[0]))[0]


mac_final_read = Check(
    "mac_final_read",
    reference=_mac_final_read,
    make_cases=_final_read_cases,
    call=_run_final_read,
    idea="write y into the memory from the pre-segment state and read it back in ONE ordinary pass: "
         "each chunk of y reads the state left by the chunks before it, then is written",
    formula="m, new_state = memory(y, state); return m",
    mistakes=[
        Mistake("you read the memory after the whole segment was written (MAC as written, paper eq. 25 "
                "literally): token i then sees the later tokens of its segment; read with the running "
                "state, memory(y, state)",
                _read_after_write),
        Mistake("you read the pre-segment state for every token (memory.retrieve(y, state)): the final "
                "read must also use the segment's earlier chunks, memory(y, state)",
                _read_before_write),
        Mistake("you started from a fresh memory: continue from the state before the segment, "
                "memory(y, state)",
                _read_initial_memory),
    ],
)


# --------------------------------------------------------------------------- exercise 3


def _rms(z, gain):
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * gain


def _memory_gate(y, m, gain_a, gain_b):
    return _rms(y, gain_a) * torch.sigmoid(_rms(m, gain_b))


def _gate_cases(gen):
    def case(B, T, d):
        return (torch.randn(B, T, d, generator=gen), 3 * torch.randn(B, T, d, generator=gen),
                1 + 0.2 * torch.randn(d, generator=gen), 1 + 0.2 * torch.randn(d, generator=gen))

    return [
        Case("B=2, T=5, d=8", case(2, 5, 8)),
        Case("B=1, T=3, d=16", case(1, 3, 16)),
    ]


memory_gate = Check(
    "memory_gate",
    reference=_memory_gate,
    make_cases=_gate_cases,
    idea="normalise both branches with RMSNorm (each with its own gain), then let the memory branch "
         "gate the attention branch through a sigmoid",
    formula="rms(z, g) = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * g; "
            "return rms(y, gain_a) * torch.sigmoid(rms(m, gain_b))",
    mistakes=[
        Mistake("the roles are swapped: the attention branch y is the signal, the memory branch m "
                "the gate, RMSNorm_a(y) * sigmoid(RMSNorm_b(m))",
                lambda y, m, ga, gb: _rms(m, gb) * torch.sigmoid(_rms(y, ga))),
        Mistake("the gate is a sigmoid, not SiLU", lambda y, m, ga, gb: _rms(y, ga) * torch.nn.functional.silu(_rms(m, gb))),
        Mistake("you left out the RMSNorm of the memory branch before the sigmoid",
                lambda y, m, ga, gb: _rms(y, ga) * torch.sigmoid(m * gb)),
        Mistake("the two gains are swapped: gain_a belongs to y, gain_b to m",
                lambda y, m, ga, gb: _rms(y, gb) * torch.sigmoid(_rms(m, ga))),
    ],
)
