"""Diagnostic: can a small MAC learn S-NIAH-lite recall that SWA, Transformer++ and MAG learn?

    python bench/mac_recall_probe.py mac --segment 32 --steps 600
    python bench/mac_recall_probe.py mac --segment 32 --steps 600 --writes-off
    python bench/mac_recall_probe.py swa --segment 32 --steps 600     # SWA with window 32
    python bench/mac_recall_probe.py transformer --steps 600

Lesson 10's setting (``tiny`` preset, window 8, chunk 8, 4 persistent tokens, sequences of 80
tokens, the needle 7..64 tokens before its question, phrase tokenizer, 2-digit answers, batch 32,
AdamW 3e-3), one seed. Prints the final training loss and the exact match on held-out
sequences with the needle 7 and 32 tokens before the question. ``--segment`` sets MAC's segment
length (and SWA's window, so the two see the same span); ``--writes-off`` trains and tests with
the memory's writes switched off (``memory_writes_off``). Results: bench/RESULTS.md, "MAC does
not learn S-NIAH-lite".
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from titans_mini.models import TitansConfig, TitansLM, memory_writes_off
from titans_mini.tasks import IGNORE_INDEX, PhraseTokenizer, sniah_lite

WINDOW, LENGTH, DIGITS, BATCH = 8, 80, 2, 32


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variant")
    p.add_argument("--segment", type=int, default=WINDOW, help="MAC segment (and SWA window)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--writes-off", action="store_true")
    p.add_argument("--leaky", action="store_true", help="MAC as written (mac_causal=False)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    tok = PhraseTokenizer()
    window = args.segment if args.variant == "swa" else WINDOW
    cfg = TitansConfig.preset("tiny", variant=args.variant, vocab_size=tok.vocab_size, window=window,
                              segment_len=args.segment, chunk_size=8, n_persistent=4,
                              mac_causal=not args.leaky)
    torch.manual_seed(args.seed)
    model = TitansLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(args.seed)
    ablation = memory_writes_off(model) if args.writes_off else contextlib.nullcontext()
    start = time.perf_counter()
    with ablation:
        for step in range(args.steps):
            distance = rng.integers(7, 8 * WINDOW + 1, size=BATCH)
            batch = sniah_lite(BATCH, LENGTH, tokenizer=tok, num_digits=DIGITS, distance=distance,
                               seed=10**6 * args.seed + step)
            logits, _ = model(batch.inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(),
                                   ignore_index=IGNORE_INDEX)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        model.eval()
        accs = []
        with torch.no_grad():
            for d in (7, 4 * WINDOW):
                test = sniah_lite(128, LENGTH, tokenizer=tok, num_digits=DIGITS, distance=d,
                                  seed=10**9 + d)
                accs.append(test.accuracy(model(test.inputs)[0]))
    print(f"{args.variant} segment {args.segment}{' writes-off' if args.writes_off else ''}"
          f"{' leaky' if args.leaky else ''}, {args.steps} steps: final loss {loss.item():.3f}, "
          f"exact match at D=7 {accs[0]:.1%}, at D=32 {accs[1]:.1%} "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
