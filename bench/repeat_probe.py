"""Test-time memorisation probe: does a trained model predict a passage better the second time?

    python bench/repeat_probe.py                                   # cpu-demo, swa / mag / lmm
    python bench/repeat_probe.py --variants mag --steps 600 --device cuda --preset colab-t4

Each variant is trained with ``titans_mini.trainer.Trainer`` on the bundled Shakespeare (documents
streamed in ``--segments`` consecutive segments, state carried). Then, on held-out plays, each
probe sequence is::

    repeat:   P | F | P        control:   Q | F | P

with P and Q two passages (--passage bytes) of the same held-out play and F filler from another
play (--gaps bytes). The loss is measured on the last P in both: same text, same position, same
context length; the only difference is whether that text was seen before the gap. The gap is
longer than the attention window of swa / mag / lmm, so attention cannot see the first P; only
the memory state can carry it. The table gives the mean loss (nats/byte) on the first P, on the
last P of the control and of the repeat, and the memorisation gain = control − repeat (> 0: the
repeat is predicted better). A sliding-window transformer (swa) is the control model: its gain
should be about 0.

Prints a Markdown table with the machine it ran on (paste it into bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from titans_mini.models import TitansConfig
from titans_mini.trainer import TrainConfig, Trainer


def per_token_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token losses (B, T − 1) of one forward over ids (B, T)."""
    out = model(ids)
    logits = out[0] if isinstance(out, tuple) else out
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")


def probe_sequences(trainer: Trainer, n: int, passage: int, gap: int, seed: int = 0):
    """(repeat, control) token batches (n, 2·passage + gap) from the validation plays:
    P | F | P and Q | F | P."""
    enc = trainer.tokenizer.encode
    docs = [enc(d.text) for d in trainer.text.corpus.val]
    g = torch.Generator().manual_seed(seed)
    rep, ctl = [], []
    for i in range(n):
        a, b = docs[i % len(docs)], docs[(i + 1) % len(docs)]
        need = 2 * passage
        s = int(torch.randint(0, len(a) - need, (1,), generator=g))
        f = int(torch.randint(0, len(b) - gap, (1,), generator=g))
        P, Q, filler = a[s: s + passage], a[s + passage: s + need], b[f: f + gap]
        rep.append(P + filler + P)
        ctl.append(Q + filler + P)
    return torch.tensor(rep), torch.tensor(ctl)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu-demo")
    p.add_argument("--variants", nargs="+", default=["swa", "mag", "lmm"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--segments", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--passage", type=int, default=256)
    p.add_argument("--gaps", type=int, nargs="+", default=[64, 512],
                   help="filler lengths between P and X (each > the attention window)")
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for variant in args.variants:
        cfg = TitansConfig.preset(args.preset, variant=variant)
        tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, segments=args.segments,
                           lr=args.lr, eval_every=0, eval_batches=2, log_every=50,
                           device=args.device, progress=False, sample_tokens=0)
        trainer = Trainer(cfg, "shakespeare", tcfg)
        t0 = time.perf_counter()
        trainer.fit()
        minutes = (time.perf_counter() - t0) / 60
        model = trainer.raw_model.eval()
        val = trainer.history[-1].get("val_loss", float("nan"))
        for gap in args.gaps:
            rep, ctl = probe_sequences(trainer, args.probes, args.passage, gap)
            n, L = args.passage, rep.shape[1]
            with torch.no_grad(), trainer.precision.autocast(trainer.device):
                lr_ = per_token_loss(model, rep.to(trainer.device)).cpu()
                lc = per_token_loss(model, ctl.to(trainer.device)).cpu()
            # losses predicting tokens 1..n−1 of the first P and of the last P (whose first token
            # follows the filler and is excluded in both)
            first = lr_[:, : n - 1].mean().item()
            x_rep = lr_[:, L - n:].mean().item()
            x_ctl = lc[:, L - n:].mean().item()
            rows.append((variant, gap, trainer.history[-1]["train_loss"], val, minutes, first,
                         x_ctl, x_rep))
        print(f"{variant}: done in {minutes:.1f} min", flush=True)

    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"device {trainer.device}, preset {args.preset}, {args.steps} steps of "
          f"{args.batch_size} × {args.segments} × {trainer.seq_len} bytes; probes: {args.probes} "
          f"× (P or Q | gap | P), passages of {args.passage} bytes, held-out plays\n")
    print("| variant | gap | train loss | val loss | train min | loss on P (first) | "
          "loss on last P after Q (control) | loss on last P after P (repeat) | memorisation gain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v, gap, tl, vl, m, first, xc, xr in rows:
        print(f"| {v} | {gap} | {tl:.3f} | {vl:.3f} | {m:.1f} | {first:.3f} | {xc:.3f} | "
              f"{xr:.3f} | **{xc - xr:+.3f}** |")


if __name__ == "__main__":
    main()
