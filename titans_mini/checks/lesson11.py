"""Checks for lesson 11 (train a small language model): bits per byte from a mean loss, the
memorization gain of a passage read twice, and one top-k sampling step of generation.

The exercises do not call each other. ``bits_per_byte`` is graded against the library's
:func:`titans_mini.data.bits_per_byte`, ``top_k_sample`` against ``TitansLM._sample``: the same
logits and the same generator seed must give the same ids. Each sampling case builds a fresh
``torch.Generator`` from its seed for every function it runs (the learner's, the reference, each
wrong answer), and fixes the global random generator too (then restores it), so an answer that
forgets the generator gives the same wrong ids every time and can be named.
"""

from __future__ import annotations

import math

import torch

from titans_mini.checks.framework import Case, Check, Mistake
from titans_mini.data import bits_per_byte as _library_bits_per_byte
from titans_mini.models import TitansLM

__all__ = ["bits_per_byte", "memorization_gain", "top_k_sample"]


# --------------------------------------------------------------------------- exercise 1


def _bits_per_byte(loss, bytes_per_token):
    # mean nats per token / ln 2 = bits per token; / bytes per token = bits per byte. The library
    # takes totals: N tokens cancel in (N * loss) / (ln 2 * N * bytes_per_token)
    return _library_bits_per_byte(loss, bytes_per_token)


def _bpb_cases(gen):
    return [
        Case("byte tokens (1 byte per token), loss 1.47", (1.47, 1.0)),
        Case("BPE-like tokens, 3.7 bytes per token", (3.2, 3.7)),
        Case("loss 0 (a perfect model)", (0.0, 2.5)),
        Case("a tensor of losses, 4.2 bytes per token", (2 * torch.rand(5, generator=gen) + 1, 4.2)),
        Case("a 0-d tensor loss, byte tokens", (torch.tensor(0.9), 1.0)),
    ]


def _as_tensor(loss):
    return torch.as_tensor(loss, dtype=torch.float64)


def _bpb_log2(loss, bytes_per_token):
    return torch.log2(_as_tensor(loss)) / bytes_per_token


def _bpb_nats(loss, bytes_per_token):
    return loss / bytes_per_token


def _bpb_times_bytes(loss, bytes_per_token):
    return loss / math.log(2) * bytes_per_token


def _bpb_log10(loss, bytes_per_token):
    return loss / math.log(10) / bytes_per_token


bits_per_byte = Check(
    "bits_per_byte",
    reference=_bits_per_byte,
    make_cases=_bpb_cases,
    idea="the loss is in nats per token: divide by ln 2 to get bits per token, then by the number "
         "of bytes one token stands for to get bits per byte",
    formula="return loss / math.log(2) / bytes_per_token   (the library: "
            "titans_mini.data.bits_per_byte(total_nats, total_bytes) = total_nats / (ln 2 * "
            "total_bytes))",
    mistakes=[
        Mistake("you took log2 of the loss: the loss is already a logarithm (in nats); change its "
                "unit by dividing by ln 2, do not take another log",
                _bpb_log2),
        Mistake("you forgot the ln 2: loss / bytes_per_token is nats per byte; bits = nats / ln 2",
                _bpb_nats),
        Mistake("you multiplied by bytes_per_token: a token carries bytes_per_token bytes, so the "
                "bits per token are shared among them — divide",
                _bpb_times_bytes),
        Mistake("you divided by ln 10 (decimal digits, not bits): one bit is ln 2 nats",
                _bpb_log10),
    ],
)


# --------------------------------------------------------------------------- exercise 2


def _memorization_gain(loss_repeat, loss_control, mask=None):
    # every included token weighs the same: mean over the selected positions of both runs
    if mask is None:
        mask = torch.ones_like(loss_repeat, dtype=torch.bool)
    return (loss_control[mask].mean() - loss_repeat[mask].mean()).item()


def _gain_cases(gen):
    def losses(B, P, drop=0.0):
        control = 3 * torch.rand(B, P, generator=gen) + 0.5  # nats per token
        repeat = (control - drop * torch.rand(B, P, generator=gen)).clamp(min=0.01)
        return repeat, control

    def ragged_mask(B, P):
        mask = torch.zeros(B, P, dtype=torch.bool)
        for b in range(B):  # rows with very different numbers of included tokens
            n = [2, P, P // 2, 5][b % 4]
            mask[b, torch.randperm(P, generator=gen)[:n]] = True
        return mask

    r1, c1 = losses(4, 24, drop=1.5)
    r2, c2 = losses(6, 16, drop=2.0)
    r3, c3 = losses(3, 12, drop=1.0)
    r4, c4 = losses(1, 20, drop=2.5)
    same = 2 * torch.rand(2, 8, generator=gen) + 0.5
    return [
        Case("B=4, P=24, no mask", (r1, c1)),
        Case("a mask with rows of different lengths", (r2, c2), {"mask": ragged_mask(6, 16)}),
        Case("an all-True mask (= no mask)", (r3, c3), {"mask": torch.ones(3, 12, dtype=torch.bool)}),
        Case("one passage, B=1", (r4, c4)),
        Case("the same losses in both runs: gain 0", (same, same.clone())),
    ]


def _gain_sign(loss_repeat, loss_control, mask=None):
    return -_memorization_gain(loss_repeat, loss_control, mask)


def _gain_row_means(loss_repeat, loss_control, mask=None):
    if mask is None:
        mask = torch.ones_like(loss_repeat, dtype=torch.bool)
    m = mask.float()
    n = m.sum(1)
    return ((loss_control * m).sum(1) / n - (loss_repeat * m).sum(1) / n).mean().item()


def _gain_ratio(loss_repeat, loss_control, mask=None):
    if mask is None:
        mask = torch.ones_like(loss_repeat, dtype=torch.bool)
    return (loss_control[mask].mean() / loss_repeat[mask].mean()).item()


def _gain_no_mask(loss_repeat, loss_control, mask=None):
    return _memorization_gain(loss_repeat, loss_control)


memorization_gain = Check(
    "memorization_gain",
    reference=_memorization_gain,
    make_cases=_gain_cases,
    idea="the gain is how much lower the loss is on the repeat than on the control: the mean "
         "control loss minus the mean repeat loss, over the included positions (all of them when "
         "mask is None), every token weighing the same; return a Python float",
    formula="if mask is None: mask = torch.ones_like(loss_repeat, dtype=torch.bool); return "
            "(loss_control[mask].mean() - loss_repeat[mask].mean()).item()",
    mistakes=[
        Mistake("your sign is flipped: the gain is control − repeat, positive when the model "
                "predicts the passage better the second time",
                _gain_sign),
        Mistake("you averaged each row's mean: with a mask the rows include different numbers of "
                "tokens; weight every token equally (one mean over all included positions)",
                _gain_row_means),
        Mistake("you returned a ratio: the gain is a difference of mean losses, in nats per token",
                _gain_ratio),
        Mistake("you ignored the mask: only the positions where mask is True count",
                _gain_no_mask),
    ],
)


# --------------------------------------------------------------------------- exercise 3


def _top_k_sample(logits, k, temperature, generator):
    # the library's sampling step: temperature, top-k mask (ties kept), softmax, multinomial
    return TitansLM._sample(logits, temperature, k, generator)


def _run_seeded(fn, case):
    """Call ``fn(logits, k, temperature, generator)`` with a fresh generator from the case's seed;
    the global random generator is seeded too and restored afterwards."""
    logits, k, temperature, seed = case.args
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1000)
        return fn(logits, k, temperature, torch.Generator().manual_seed(seed))


def _sample_cases(gen):
    def logits(B, V, scale=2.0):
        return scale * torch.randn(B, V, generator=gen)

    ties = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, -1.0, 0.0, 1.0]]).repeat(64, 1)
    one_row = logits(1, 8).repeat(4000, 1)
    return [
        Case("k=1 is the argmax, B=6, V=10", (logits(6, 10), 1, 1.0, 11)),
        Case("k=3, temperature 1, B=64, V=12", (logits(64, 12), 3, 1.0, 12)),
        Case("k=4, temperature 0.5, B=64, V=12", (logits(64, 12), 4, 0.5, 13)),
        Case("k >= V: plain sampling, B=64, V=8", (logits(64, 8, 1.0), 20, 1.0, 14)),
        Case("temperature 0: greedy, B=5, V=10", (logits(5, 10), 3, 0.0, 15)),
        Case("ties at the k-th largest logit are all kept (k=2)", (ties, 2, 1.0, 16)),
        Case("4000 draws from one row, k=3: no mass outside the top 3", (one_row, 3, 1.0, 17)),
    ]


def _mask_top_k(logits, k):
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _sample_no_top_k(logits, k, temperature, generator):
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def _sample_k_smallest(logits, k, temperature, generator):
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1, largest=False).values[:, -1:]
    logits = logits.masked_fill(logits > kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


def _sample_temperature_after_softmax(logits, k, temperature, generator):
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(_mask_top_k(logits, k), dim=-1) / temperature
    return torch.multinomial(probs, 1, generator=generator)


def _sample_argmax(logits, k, temperature, generator):
    return logits.argmax(dim=-1, keepdim=True)


def _sample_exactly_k(logits, k, temperature, generator):
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    top = torch.topk(logits / temperature, min(k, logits.shape[-1]), dim=-1)
    logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


def _sample_global_rng(logits, k, temperature, generator):
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(_mask_top_k(logits / temperature, k), dim=-1)
    return torch.multinomial(probs, 1)


top_k_sample = Check(
    "top_k_sample",
    reference=_top_k_sample,
    make_cases=_sample_cases,
    call=_run_seeded,
    idea="divide the logits by the temperature, set every logit below the k-th largest of its row "
         "to -inf (ties stay), softmax, and draw one id per row with torch.multinomial and the "
         "generator you were given; temperature 0 is the argmax",
    formula="if temperature == 0: return logits.argmax(dim=-1, keepdim=True); logits = logits / "
            "temperature; kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[:, -1:]; "
            "logits = logits.masked_fill(logits < kth, float('-inf')); return torch.multinomial("
            "torch.softmax(logits, dim=-1), 1, generator=generator)",
    mistakes=[
        Mistake("you sampled from all V tokens: set the logits below the k-th largest to -inf "
                "BEFORE the softmax, so that only the top k can be drawn",
                _sample_no_top_k),
        Mistake("you kept the k SMALLEST logits: keep the k largest (torch.topk's default, "
                "largest=True) and mask the rest",
                _sample_k_smallest),
        Mistake("you kept exactly k ids (torch.topk's indices), dropping logits tied with the k-th "
                "largest: keep every logit >= the k-th largest (mask only those below it)",
                _sample_exactly_k),
        Mistake("you divided the probabilities by the temperature: torch.multinomial renormalises, "
                "so that does nothing; divide the LOGITS by the temperature before the softmax",
                _sample_temperature_after_softmax),
        Mistake("you always took the argmax: that is greedy decoding, only for temperature 0; "
                "otherwise draw with torch.multinomial",
                _sample_argmax),
        Mistake("you did not pass the generator: torch.multinomial(probs, 1, generator=generator) "
                "— with the global random generator the draws cannot be reproduced from a seed",
                _sample_global_rng),
    ],
)
