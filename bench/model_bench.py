"""Training throughput and peak memory of every TitansLM variant, as ratios to Transformer++.

    python bench/model_bench.py                      # CPU: tiny and colab-t4 (short sequences)
    python bench/model_bench.py --device cuda        # GPU: colab-t4 at its full context
    python bench/model_bench.py --presets tiny --variants transformer mag --steps 5
    python bench/model_bench.py --device cuda --amp --presets colab-t4 \
        --paths eager compiled       # every memory variant eager and with the compiled chunk step
    python bench/model_bench.py --device cuda --amp --presets colab-t4 --checkpoint-chunks 6

One training step = forward, cross-entropy, backward, AdamW step. Every (preset, variant) runs
in its own subprocess, so peak memory is not polluted by earlier runs:

* tokens/s: batch · seq_len / the median wall time of the timed steps (after ``--warmup``
  steps; the median keeps a busy shared machine from skewing the result).
* peak MiB: the memory a training step needs on top of the weights -- CUDA:
  ``max_memory_allocated`` minus the memory allocated before the first step; CPU: the peak
  resident set size (Linux VmHWM, reset through /proc/self/clear_refs) minus the resident size
  before the first step. Includes activations, gradients and AdamW's state.

``--paths eager compiled`` measures every memory variant on each path in the same run: ``eager``
(the default) and ``compiled`` (``TitansConfig(compile_chunks=True)``: each chunk update through
``torch.compile``; the compile happens in the warm-up steps, so keep ``--warmup`` >= 1, the
default). The baselines have no memory and run once. ``--checkpoint-chunks K`` recomputes the memory's chunks
in groups of K in the backward (``TitansConfig(checkpoint_chunks=K)``): less memory, more time.

Ratios are to ``transformer`` in the same run on the same device. The script prints a Markdown
table (paste it into bench/RESULTS.md with the device it came from).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

# (batch, seq_len, steps) per preset and device kind; CPU sizes keep a full run to a few minutes
DEFAULTS = {
    ("tiny", "cpu"): (8, 64, 7),
    ("tiny", "cuda"): (32, 256, 20),
    ("cpu-demo", "cpu"): (4, 128, 3),
    ("cpu-demo", "cuda"): (32, 256, 20),
    ("colab-t4", "cpu"): (1, 128, 3),
    ("colab-t4", "cuda"): (16, 512, 10),
}
VARIANT_ORDER = ["transformer", "swa", "lmm", "mag", "mal", "mac"]


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_one(preset: str, variant: str, device: str, batch: int, seq_len: int, steps: int,
            warmup: int, amp: bool, compile_chunks: bool = False,
            checkpoint_chunks: int = 0) -> dict:
    """Benchmark one (preset, variant) in this process; returns a dict of results."""
    import torch
    import torch.nn.functional as F

    from titans_mini.models import TitansConfig, TitansLM

    torch.manual_seed(0)
    dev = torch.device(device)
    model = TitansLM(TitansConfig.preset(preset, variant=variant,
                                         compile_chunks=compile_chunks,
                                         checkpoint_chunks=checkpoint_chunks)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model.cfg.vocab_size, (batch, seq_len + 1), device=dev)
    amp_dtype = None
    if amp and dev.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.get_device_capability(dev)[0] >= 8 else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def step():
        with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits, _ = model(x[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # memory baseline: weights only (no gradients, no optimizer state yet)
    if dev.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = (_rss_kib("VmRSS") or 0) * 1024
        have_hwm = _reset_peak_rss()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    step_time = sorted(times)[len(times) // 2]  # median: robust to a busy shared machine
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = (_rss_kib("VmHWM") or 0) * 1024 - base if have_hwm else float("nan")
    return {
        "preset": preset,
        "variant": variant,
        "params": model.num_params(),
        "batch": batch,
        "seq_len": seq_len,
        "steps": steps,
        "tok_s": batch * seq_len / step_time,
        "peak_mib": peak / 2**20,
        "loss": float(loss),
        "compile_chunks": compile_chunks,
        "checkpoint_chunks": checkpoint_chunks,
    }


def describe_device(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--presets", nargs="+", default=["tiny", "colab-t4"])
    p.add_argument("--variants", nargs="+", default=VARIANT_ORDER)
    p.add_argument("--batch", type=int, help="override the per-preset batch size")
    p.add_argument("--seq-len", type=int, help="override the per-preset sequence length")
    p.add_argument("--steps", type=int, help="override the number of timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--amp", action="store_true", help="CUDA autocast (bf16 on >= sm80, else fp16)")
    p.add_argument("--paths", nargs="+", default=["eager"], choices=["eager", "compiled"],
                   help="memory paths to measure: eager and/or compiled (TitansConfig.compile_chunks)")
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)  # internal: child
    p.add_argument("--checkpoint-chunks", type=int, default=0, metavar="K",
                   help="recompute memory chunks in groups of K in the backward (0 = off)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the CPU (default: torch's)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: child process
    args = p.parse_args(argv)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.one:  # child: exactly one preset and variant, JSON on stdout
        preset, variant = args.presets[0], args.variants[0]
        batch, seq_len, steps = DEFAULTS.get((preset, kind), (4, 128, 3))
        res = run_one(preset, variant, args.device, args.batch or batch, args.seq_len or seq_len,
                      args.steps or steps, args.warmup, args.amp, args.compiled,
                      args.checkpoint_chunks)
        print("RESULT " + json.dumps(res))
        return

    variants = list(args.variants)
    if "transformer" not in variants:
        variants.insert(0, "transformer")  # ratios need the reference
    print(f"device: {describe_device(args.device)}"
          + (f", memory chunks checkpointed in groups of {args.checkpoint_chunks}"
             if args.checkpoint_chunks else ""))
    rows = []
    runs = [(preset, variant, path) for preset in args.presets for variant in variants
            for path in (args.paths if variant in ("lmm", "mag", "mal", "mac") else ["eager"])]
    for preset, variant, path in runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", "--device", args.device,
               "--presets", preset, "--variants", variant, "--warmup", str(args.warmup)]
        for flag, value in (("--batch", args.batch), ("--seq-len", args.seq_len),
                            ("--steps", args.steps)):
            if value is not None:
                cmd += [flag, str(value)]
        if args.amp:
            cmd.append("--amp")
        if path == "compiled":
            cmd.append("--compiled")
        if args.checkpoint_chunks:
            cmd += ["--checkpoint-chunks", str(args.checkpoint_chunks)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{preset}/{variant} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        res = json.loads(lines[-1][len("RESULT "):]) | {"path": path}
        rows.append(res)
        print(f"  {preset:9s} {variant:12s} {path:8s} {res['tok_s']:10.0f} tok/s  "
              f"{res['peak_mib']:8.1f} MiB", file=sys.stderr)

    print()
    print("| preset | variant | path | params | batch×seq | tokens/s | × transformer | peak MiB "
          "| × transformer |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        ref = next((r for r in rows if r["preset"] == preset and r["variant"] == "transformer"), None)
        for r in (r for r in rows if r["preset"] == preset):
            speed = r["tok_s"] / ref["tok_s"] if ref else float("nan")
            mem = r["peak_mib"] / ref["peak_mib"] if ref and ref["peak_mib"] > 0 else float("nan")
            print(f"| {preset} | {r['variant']} | {r['path']} | {r['params'] / 1e6:.2f}M "
                  f"| {r['batch']}×{r['seq_len']} "
                  f"| {r['tok_s']:.0f} | {speed:.2f} | {r['peak_mib']:.1f} | {mem:.2f} |")


if __name__ == "__main__":
    main()
