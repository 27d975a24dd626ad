"""The mini ablation study of lesson 12: one part of the Titans memory removed at a time.

    python bench/ablations.py                      # cpu-demo LMM, 3 seeds, every row (~1 h, 2 cores)
    python bench/ablations.py --rows full "no momentum" --seeds 0
    python bench/ablations.py --preset colab-t4 --device cuda --steps 1000 --jobs 1
    python bench/ablations.py --quick              # tiny sizes, a few steps: tests the script

Each (row, seed) trains the model twice (``titans_mini.ablation``): on Shakespeare (validation
bits per byte) and on lesson 10's S-NIAH-lite probe (exact match with the needle 4 windows back,
memory writes on and off). Every finished run is appended to ``--out`` (JSON lines) at once, so an
interrupted study resumes where it stopped: rows already there are skipped. ``--jobs`` runs that
many (row, seed) pairs side by side, one torch thread each. At the end the script prints the
Markdown table with the paper's Table 5 beside it; ``--store`` also writes it to the package's
``titans_mini/data/ablations_cpu.json``, which lesson 12 reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm.auto import tqdm

from titans_mini import ablation
from titans_mini.ablation import ROWS, ProbeConfig

QUICK = dict(preset="tiny", steps=3, batch_size=4, eval_batches=1)
QUICK_PROBE = ProbeConfig(steps=2, batch_size=4, eval_rows=8)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", default=[r.name for r in ROWS],
                   help="row names (default: all): " + ", ".join(r.name for r in ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variant", default="lmm", help="the base model (the paper ablates the LMM)")
    p.add_argument("--preset", default="cpu-demo", help="model size for the text runs")
    p.add_argument("--steps", type=int, default=200, help="text training steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--probe-steps", type=int, default=ProbeConfig.steps)
    p.add_argument("--device", default=None, help="for the text runs (the probe runs on the CPU)")
    p.add_argument("--jobs", type=int, default=2, help="(row, seed) runs side by side")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--out", default="bench/ablations_runs.jsonl",
                   help="finished runs, one JSON per line (resumes from it)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and a few steps (tests)")
    p.add_argument("--store", action="store_true",
                   help="write the table to titans_mini/data/ablations_cpu.json for lesson 12")
    args = p.parse_args(argv)
    unknown = [r for r in args.rows if r not in {row.name for row in ROWS}]
    if unknown:
        p.error(f"unknown row(s) {unknown}; rows: {', '.join(r.name for r in ROWS)}")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    text = dict(preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                eval_batches=args.eval_batches, device=args.device)
    probe = dataclasses.replace(ProbeConfig(), steps=args.probe_steps)
    if args.quick:
        text.update(QUICK)
        probe = QUICK_PROBE
    settings = {"variant": args.variant, "text": text, "probe": dataclasses.asdict(probe)}

    out = Path(args.out)
    done = []
    if out.is_file():
        for line in out.read_text().splitlines():
            run = json.loads(line)
            if run.get("settings") == settings:
                done.append(run)
    have = {(r["row"], r["seed"]) for r in done}
    todo = [(name, seed) for name in args.rows for seed in args.seeds if (name, seed) not in have]
    print(f"{len(have)} run(s) already in {out}; {len(todo)} to do", file=sys.stderr)

    out.parent.mkdir(parents=True, exist_ok=True)
    rows = {r.name: r for r in ROWS}
    kwargs = dict(text=text, probe=probe, variant=args.variant)
    threads_before = torch.get_num_threads()
    if args.jobs == 1:  # in this process (its thread count is restored at the end)
        _worker_init(args.threads)
        runs = (ablation.run_row(rows[name], seed, **kwargs) for name, seed in todo)
    else:
        pool = ProcessPoolExecutor(args.jobs, initializer=_worker_init, initargs=(args.threads,))
        futures = [pool.submit(ablation.run_row, rows[name], seed, **kwargs) for name, seed in todo]
        runs = (future.result() for future in as_completed(futures))
    with tqdm(total=len(todo), desc="ablation runs", file=sys.stderr) as bar:
        for result in runs:
            run = {**result, "settings": settings}
            with out.open("a") as f:
                f.write(json.dumps(run) + "\n")
            done.append(run)
            bar.set_postfix_str(f"{run['row']} seed {run['seed']}: {run['val_bpb']:.3f} bpb, "
                                f"recall {run['recall']:.0%}")
            bar.update(1)
    if args.jobs > 1:
        pool.shutdown()
    torch.set_num_threads(threads_before)

    results = [r for r in done if r["row"] in args.rows and r["seed"] in args.seeds]
    table = ablation.markdown_table(results)
    where = (f"{ablation.machine()} ({args.jobs} job(s) × {args.threads} thread(s)); "
             f"{datetime.date.today()}")
    print(f"\nAblation of the {args.variant.upper()} at `{text['preset']}` size, {text['steps']} "
          f"steps × {text['batch_size']} rows; probe: {probe.steps} steps; seeds {args.seeds}; "
          f"{where}\n")
    print(table)
    if args.store:
        path = Path(ablation.__file__).parent / "data" / ablation.RESULTS_FILE
        stored = {"settings": settings, "machine": where, "date": str(datetime.date.today()),
                  "results": [{k: v for k, v in r.items() if k != "settings"} for r in results]}
        path.write_text(json.dumps(stored, indent=1) + "\n")
        print(f"\nstored in {path}", file=sys.stderr)
    return table


if __name__ == "__main__":
    main()
