"""A CPU proxy for GPU launch overhead: operator counts and host synchronisations per training step.

    python bench/op_count.py                          # colab-t4 size, every variant, fp32
    python bench/op_count.py --amp                    # under autocast (bf16 on the CPU)
    python bench/op_count.py --variants transformer mag --batch 1

On a GPU every ATen operator that does work launches (at least) one kernel, and at the
``colab-t4`` size the memory variants are bound by those launches, not by arithmetic. The CPU
profiler sees the same operators, so counting them on any machine tells how many launches a
step issues, and how many of them come from the memory's chunk loop:

* **ops / step** -- ATen operators that do work (not views, allocations or shape queries, and
  not composites that only call others): the ones that launch kernels, in one training step
  (forward, cross-entropy, backward; the AdamW step separately);
* **casts / step** -- of those, dtype conversions (``aten::_to_copy``, ``aten::copy_`` between
  dtypes are counted as ``_to_copy``; under ``--amp`` autocast inserts them);
* **host syncs** -- calls that need a tensor's value on the host (``.item()``, ``.tolist()``,
  ``bool(tensor)``, ``.cpu()``, ...; counted with a ``TorchFunctionMode``); on a GPU each one
  stalls the pipeline until the queued kernels finish;
* **ops / chunk step** -- one memory layer at the preset's size: operators of a forward +
  backward on 8 chunks minus those on 4 chunks, divided by 4 (the cost of one more sequential
  chunk step; the first chunks cost more, so 2 minus 1 would overstate it).

CPU autocast (bf16) inserts casts by its own op lists, close to but not identical with CUDA's;
the counts are a proxy, to compare code versions on the same machine. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from titans_mini.memory import NeuralMemory
from titans_mini.models import VARIANTS, TitansConfig, TitansLM

CAST_OPS = ("aten::_to_copy",)
# Tensor methods that copy a device value to the host (a GPU synchronisation)
SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                "cpu", "numpy")


class SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts calls of tensor methods that need a tensor's value on the host."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


# operators that only make views, allocate or inspect: no kernel on a GPU
METADATA_OPS = frozenset(
    "aten::" + n for n in (
        "view as_strided _reshape_alias _unsafe_view reshape resolve_conj resolve_neg empty "
        "empty_strided empty_like result_type expand expand_as t transpose permute unsqueeze "
        "squeeze slice select narrow split split_with_sizes chunk unbind detach alias "
        "lift_fresh to contiguous broadcast_tensors view_as numpy_T unflatten flatten "
        "_has_compatible_shallow_copy_type is_same_size size stride item"
    ).split())


def kernel_ops(prof) -> Counter:
    """Names of the ATen operators that do work themselves: not a view/allocation/inspection
    and calling no other such operator (a composite like ``aten::linear`` counts through its
    ``aten::addmm``). On a GPU each launches (at least) one kernel."""
    def computes(ev) -> bool:
        return ev.name.startswith("aten::") and ev.name not in METADATA_OPS

    def has_compute_below(ev) -> bool:
        return any(computes(c) or has_compute_below(c) for c in ev.cpu_children)

    names = Counter()
    for ev in prof.events():
        if computes(ev) and not has_compute_below(ev):
            names[ev.name] += 1
    return names


def all_ops(prof) -> Counter:
    return Counter(ev.name for ev in prof.events() if ev.name.startswith("aten::"))


def summarise(prof, syncs: SyncCounter) -> dict:
    every = all_ops(prof)
    return {"ops": sum(kernel_ops(prof).values()),
            "casts": sum(every[n] for n in CAST_OPS),
            "syncs": sum(syncs.calls.values())}


def profile_step(model, tokens, opt, amp: bool) -> tuple[dict, dict]:
    """(forward + loss + backward, AdamW step) counts of one training step."""
    def forward_backward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits, _ = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()

    forward_backward()  # warm-up (AdamW creates its state here)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof, SyncCounter() as syncs:
        forward_backward()
    fwd_bwd = summarise(prof, syncs)
    with profile(activities=[ProfilerActivity.CPU]) as prof, SyncCounter() as syncs:
        opt.step()
    return fwd_bwd, summarise(prof, syncs)


def chunk_step_ops(cfg: TitansConfig, amp: bool) -> dict:
    """Ops (and casts, syncs) of one more chunk of one memory layer, forward + backward."""
    mem = NeuralMemory(cfg.dim, heads=cfg.memory_heads or cfg.n_heads, depth=cfg.memory_depth,
                       expansion=cfg.memory_expansion, chunk_size=cfg.chunk_size)
    mem.check_state_values = False  # as on a GPU (the default checks only CPU states)
    out = {}
    for n in (4, 8):
        x = torch.randn(1, n * cfg.chunk_size, cfg.dim, requires_grad=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof, SyncCounter() as syncs:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                y, _ = mem(x)
            y.float().sum().backward()
        out[n] = summarise(prof, syncs)
    return {k: (out[8][k] - out[4][k]) / 4 for k in out[4]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="colab-t4")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (preset's seq_len)")
    p.add_argument("--amp", action="store_true", help="autocast (bf16 on the CPU)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    rows = []
    for variant in args.variants:
        cfg = TitansConfig.preset(args.preset, variant=variant)
        model = TitansLM(cfg)
        for m in model.modules():
            if isinstance(m, NeuralMemory):
                m.check_state_values = False  # what a GPU run does by default
        T = args.seq or cfg.seq_len
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, T + 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step, adamw = profile_step(model, tokens, opt, args.amp)
        memory = variant in ("mac", "mag", "mal", "lmm")
        chunk = chunk_step_ops(cfg, args.amp) if memory else None
        n_chunk_steps = cfg.n_layers * (T // cfg.chunk_size) if memory else 0
        rows.append((variant, step, adamw, chunk, n_chunk_steps))
        print(f"  {variant}: forward+backward {step}, AdamW {adamw}, chunk step {chunk}", flush=True)

    amp = "autocast bf16" if args.amp else "fp32"
    print(f"\nPreset {args.preset}, batch {args.batch}, seq_len {T}, {amp}, torch "
          f"{torch.__version__}; forward + loss + backward of one training step, AdamW apart\n")
    print("| variant | ops fwd+bwd | casts | host syncs | AdamW ops | chunk steps / fwd "
          "| ops / chunk step (fwd+bwd) | casts / chunk step | × transformer ops |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = next((r[1]["ops"] for r in rows if r[0] == "transformer"), None)
    for variant, step, adamw, chunk, n in rows:
        ratio = f"{step['ops'] / base:.1f}×" if base else "—"
        c_ops, c_casts = ("—", "—") if chunk is None else (f"{chunk['ops']:g}", f"{chunk['casts']:g}")
        print(f"| {variant} | {step['ops']} | {step['casts']} | {step['syncs']} | {adamw['ops']} "
              f"| {n or '—'} | {c_ops} | {c_casts} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
