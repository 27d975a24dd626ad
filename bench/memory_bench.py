"""Benchmark of the neural memory layer (titans_mini.NeuralMemory) against the best public peer.

    python bench/memory_bench.py                  # full run on CPU (several minutes)
    python bench/memory_bench.py --quick          # 1 round, shorter sequential-reference timing
    python bench/memory_bench.py --device cuda

What it measures (the course's performance targets):

* forward and forward+backward tokens/s and peak memory on (4, 1024, 256) fp32, one head,
  depth 2, expansion 4, chunk 64 — ours vs lucidrains' titans-pytorch 0.5.5
  ``NeuralMemory(dim=256, chunk_size=64)`` when it is installed (``pip install .[bench]``);
* every measurement runs in a fresh subprocess (so peak memory and allocator state are not
  shared), alternating ours / peer over several rounds; the table shows medians (each
  measurement: the best of ``--reps`` timed calls after one warm-up call). Alternation keeps the
  *ratios* fair on a shared or noisy machine;
* on CPU both wall-clock and process CPU time are reported. With ``--threads 1`` the CPU-time
  throughput is what one otherwise idle core would do, which is the robust number when other
  jobs share the machine (wall-clock then depends on what else runs);
* peak memory: CPU — peak resident set size (``ru_maxrss``) during the timed call minus the
  resident set size just before it (model and input already built); CUDA —
  ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call;
* the machine's measured fp32 matmul rate (a 2048³ matmul; 8192³ on CUDA), the matmul FLOPs per token of our
  layer (counted with ``torch.utils.flop_counter.FlopCounterMode``, which counts mm/bmm/baddbmm
  and convolutions) and the fraction of the matmul rate our layer reaches;
* the speed-up of the chunked layer over ``sequential_reference`` at T = 1024, chunk 16.

Never used by the tests (no timed asserts anywhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

SHAPE = (4, 1024, 256)
CHUNK = 64


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _make(impl: str, dim: int, chunk: int, device: str):
    import torch

    torch.manual_seed(0)
    if impl == "ours":
        from titans_mini import NeuralMemory

        mem = NeuralMemory(dim, heads=1, depth=2, expansion=4, chunk_size=chunk)
        return mem.to(device), lambda m, x: m(x)[0]
    if impl == "peer":
        from titans_pytorch import NeuralMemory as PeerMemory

        mem = PeerMemory(dim=dim, chunk_size=chunk)
        return mem.to(device), lambda m, x: m(x)[0]
    if impl == "reference":
        from titans_mini import NeuralMemory
        from titans_mini.memory import sequential_reference

        mem = NeuralMemory(dim, heads=1, depth=2, expansion=4, chunk_size=chunk)
        return mem.to(device), lambda m, x: sequential_reference(m, x)[0]
    raise ValueError(impl)


def worker(args) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    B, T, D = args.batch, args.time, args.dim
    mem, call = _make(args.impl, D, args.chunk, args.device)
    x = torch.randn(B, T, D, device=args.device)
    cuda = args.device.startswith("cuda")

    def run():
        if args.mode == "fwd":
            with torch.no_grad():
                call(mem, x)
        else:
            mem.zero_grad(set_to_none=True)
            call(mem, x).square().mean().backward()
        if cuda:
            torch.cuda.synchronize()

    # the first call measures peak memory (it also warms up); then the timed repetitions
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    run()
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times, cpu_times = [], []
    for _ in range(args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    best, best_cpu = min(times), min(cpu_times)
    if cuda:  # process time means nothing for GPU work
        best_cpu = best
    return {"impl": args.impl, "mode": args.mode, "tok_s": B * T / best, "seconds": best,
            "cpu_tok_s": B * T / best_cpu, "peak_bytes": peak}


def matmul_rate(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = not args.device.startswith("cuda")
    n = 2048 if cpu else 8192  # big enough to saturate the device
    a = torch.randn(n, n, device=args.device)
    b = torch.randn(n, n, device=args.device)
    best = float("inf")
    for _ in range(5):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        # CPU time is one core's time only with one thread; else (and on CUDA) wall-clock
        clock = time.process_time if args.threads == 1 and cpu else time.perf_counter
        t0 = clock()
        a @ b
        if not cpu:
            torch.cuda.synchronize()
        best = min(best, clock() - t0)
    return {"gflops": 2 * n ** 3 / best / 1e9}


def count_flops(args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mem, call = _make("ours", args.dim, args.chunk, "cpu")
    B, T = 1, 256
    x = torch.randn(B, T, args.dim)
    # forward FLOPs counted with autograd on (same maths; the no-grad path updates the state
    # with in-place baddbmm_, which the counter does not see)
    with FlopCounterMode(display=False) as fc:
        call(mem, x)
    fwd = fc.get_total_flops() / (B * T)
    with FlopCounterMode(display=False) as fc:
        call(mem, x).square().mean().backward()
    return {"fwd_flops_per_token": fwd, "fwdbwd_flops_per_token": fc.get_total_flops() / (B * T)}


def _spawn(args, **over) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    for key, value in over.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peer_available() -> bool:
    try:
        import titans_pytorch  # noqa: F401
    except Exception:
        return False
    return True


def machine() -> str:
    import torch

    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    desc = f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    desc += f", {torch.get_num_threads()} intra-op threads by default"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name()}"
    return desc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="1 round, shorter reference timing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    # worker-only options
    p.add_argument("--worker", choices=["measure", "matmul", "flops"])
    p.add_argument("--impl", default="ours")
    p.add_argument("--mode", default="fwdbwd")
    p.add_argument("--batch", type=int, default=SHAPE[0])
    p.add_argument("--time", type=int, default=SHAPE[1])
    p.add_argument("--dim", type=int, default=SHAPE[2])
    p.add_argument("--chunk", type=int, default=CHUNK)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()

    if args.worker:
        fn = {"measure": worker, "matmul": matmul_rate, "flops": count_flops}[args.worker]
        print(json.dumps(fn(args)))
        return

    rounds = 1 if args.quick else args.rounds
    impls = ["ours"] + (["peer"] if _peer_available() else [])
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for mode in ("fwd", "fwdbwd"):
            order = impls if r % 2 == 0 else impls[::-1]  # alternate who goes first
            for impl in order:
                res = _spawn(args, worker="measure", impl=impl, mode=mode)
                results.setdefault((impl, mode), []).append(res)
                print(f"  round {r + 1}: {impl:5s} {mode:7s} {res['tok_s']:9.0f} tok/s wall "
                      f"{res['cpu_tok_s']:9.0f} tok/s CPU time  "
                      f"peak {res['peak_bytes'] / 2**20:7.0f} MiB", file=sys.stderr)

    def med(impl, mode, key):
        return statistics.median(x[key] for x in results[(impl, mode)])

    mm = _spawn(args, worker="matmul")["gflops"]  # best of 5 in one process
    fl = _spawn(args, worker="flops")
    # sequential reference vs chunked, T = 1024 (reference on a shorter T with --quick)
    ref_T = 256 if args.quick else 1024
    ref = {mode: _spawn(args, worker="measure", impl="reference", mode=mode, batch=1,
                        time=ref_T, chunk=16, reps=1) for mode in ("fwd", "fwdbwd")}
    fast = {mode: _spawn(args, worker="measure", impl="ours", mode=mode, batch=1, time=1024,
                         chunk=16, reps=3) for mode in ("fwd", "fwdbwd")}

    B, T, D = SHAPE
    print(f"\nMachine: {machine()}; threads per process: {args.threads or 'default'}")
    print(f"Shape (B, T, dim) = {SHAPE} fp32, heads 1, depth 2, expansion 4, chunk {CHUNK}; "
          f"{rounds} round(s), medians; device {args.device}\n")
    print("| layer | fwd tok/s (wall) | fwd+bwd tok/s (wall) | fwd tok/s (CPU time) "
          "| fwd+bwd tok/s (CPU time) | fwd peak MiB | fwd+bwd peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for impl in impls:
        name = "titans_mini (ours)" if impl == "ours" else "titans-pytorch 0.5.5 (peer)"
        print(f"| {name} | {med(impl, 'fwd', 'tok_s'):.0f} | {med(impl, 'fwdbwd', 'tok_s'):.0f} "
              f"| {med(impl, 'fwd', 'cpu_tok_s'):.0f} | {med(impl, 'fwdbwd', 'cpu_tok_s'):.0f} "
              f"| {med(impl, 'fwd', 'peak_bytes') / 2**20:.0f} "
              f"| {med(impl, 'fwdbwd', 'peak_bytes') / 2**20:.0f} |")
    if "peer" in impls:
        ratio = lambda mode, key: med("ours", mode, key) / med("peer", mode, key)
        print(f"| ratio ours/peer | {ratio('fwd', 'tok_s'):.2f}x "
              f"| {ratio('fwdbwd', 'tok_s'):.2f}x (target >= 3.5x) "
              f"| {ratio('fwd', 'cpu_tok_s'):.2f}x | {ratio('fwdbwd', 'cpu_tok_s'):.2f}x "
              f"| {ratio('fwd', 'peak_bytes'):.2f}x "
              f"| {ratio('fwdbwd', 'peak_bytes'):.2f}x (target <= 0.4x) |")
    # process CPU time is one core's time only with one thread; otherwise use wall-clock
    key = "cpu_tok_s" if args.threads == 1 or args.device.startswith("cuda") else "tok_s"
    f_tok, b_tok = fl["fwd_flops_per_token"], fl["fwdbwd_flops_per_token"]
    ach_f = f_tok * med("ours", "fwd", key) / 1e9
    ach_b = b_tok * med("ours", "fwdbwd", key) / 1e9
    size = 8192 if args.device.startswith("cuda") else 2048
    clock = "CPU time" if key == "cpu_tok_s" and not args.device.startswith("cuda") else "wall"
    print(f"\nMatmul rate ({size}^3 fp32, {clock}): {mm:.1f} GFLOP/s")
    print(f"Counted matmul FLOPs per token (ours): forward {f_tok / 1e6:.2f} M, "
          f"forward+backward {b_tok / 1e6:.2f} M")
    print(f"Achieved (CPU-time throughput): forward {ach_f:.1f} GFLOP/s ({ach_f / mm:.0%} of the matmul rate), "
          f"forward+backward {ach_b:.1f} GFLOP/s ({ach_b / mm:.0%})")
    print(f"\nSequential reference vs chunked, batch 1, dim {D}, chunk 16 ({clock} tok/s; "
          f"reference on T = {ref_T}, chunked on T = 1024):")
    for mode in ("fwd", "fwdbwd"):
        r, f = ref[mode][key], fast[mode][key]
        print(f"  {mode:7s} reference {r:7.0f}  chunked {f:7.0f}  speed-up {f / r:5.0f}x "
              f"(target >= 20x)")

if __name__ == "__main__":
    main()
