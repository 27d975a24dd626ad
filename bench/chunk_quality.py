"""What a larger memory chunk costs in quality, measured on a CPU (lever 1 of the GPU speed work).

    python bench/chunk_quality.py                       # mag, chunk 16 / 32 / 64, 200 steps
    python bench/chunk_quality.py --variant mac --steps 300 --chunks 16 64

The chunk size b is the memory's speed/quality knob: every token of a chunk reads, and takes its
gradient at, the state at the chunk's start (paper v1 eq. 16), so a larger b means fewer
sequential steps (faster on a GPU) but a memory that is up to b − 1 tokens out of date. This
script trains the same ``cpu-demo``-size model with only the chunk size changed, same steps,
seed and data, on

* the bundled Shakespeare corpus (validation loss, nats per byte), and
* MQAR (key-value recall; validation accuracy on held-out batches),

at a sequence length of 256 (with the preset's attention window of 32, most of a sequence lies
beyond the window). ``segment_len`` is set to the largest chunk so that every chunk size divides
it. Each run is ``python -m titans_mini.train`` in a subprocess; the script prints a Markdown
table (paste it into bench/RESULTS.md with the machine it came from).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def last_eval(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if "val_loss" in r][-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="mag")
    p.add_argument("--chunks", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", nargs="+", default=["shakespeare", "mqar"])
    args = p.parse_args(argv)

    segment = max(args.chunks)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data:
            for b in args.chunks:
                out = Path(tmp) / f"{data}-{b}"
                cmd = [sys.executable, "-m", "titans_mini.train", "--preset", "cpu-demo",
                       "--variant", args.variant, "--steps", str(args.steps), "--out", str(out),
                       "--data", data, "--seq-len", str(args.seq_len),
                       "--batch-size", str(args.batch_size), "--seed", str(args.seed),
                       "--eval-every", str(args.steps), "--log-every", str(args.steps),
                       "--no-progress", "--set", f"chunk_size={b}",
                       "--set", f"segment_len={segment}"]
                start = time.perf_counter()
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                seconds = time.perf_counter() - start
                results[data, b] = last_eval(out) | {"seconds": seconds}
                print(f"  {data} chunk {b}: {results[data, b]}", flush=True)

    print(f"\n{args.variant}, cpu-demo size, seq_len {args.seq_len}, batch {args.batch_size}, "
          f"{args.steps} steps, seed {args.seed}, segment_len {segment}\n")
    head = "| chunk b | chunk steps per sequence |"
    line = "|---|---|"
    for data in args.data:
        head += f" {data} val loss | {data} val acc | {data} wall s |" if data != "shakespeare" \
            else f" {data} val loss (nats/byte) | {data} wall s |"
        line += "---|---|---|" if data != "shakespeare" else "---|---|"
    print(head)
    print(line)
    for b in args.chunks:
        row = f"| {b} | {args.seq_len // b} |"
        for data in args.data:
            r = results[data, b]
            if data == "shakespeare":
                row += f" {r['val_loss']:.3f} | {r['seconds']:.0f} |"
            else:
                row += f" {r['val_loss']:.3f} | {r.get('val_acc', float('nan')):.3f} | {r['seconds']:.0f} |"
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
