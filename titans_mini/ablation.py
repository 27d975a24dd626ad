"""A mini ablation study of the Titans memory (lesson 12; paper v1 Table 5).

Each row removes or changes one part of the memory of a Titans model and is measured twice:

* **language modelling**: the model trained on the bundled Shakespeare with ``Trainer`` (one
  preset, the same data order and step count for every row), scored by validation bits per byte;
* **a memory probe**: the same change made to lesson 10's small S-NIAH-lite model (window 8, a
  two-digit number asked 4 windows after it was read), trained on the task and scored by exact
  match. Validation loss alone can hide what the memory does: a model can predict text well from
  its attention window and never use its long-term memory.

``ROWS`` lists the rows with their ``TitansConfig`` overrides and, where the paper has the same
row, its Table 5 numbers (``PAPER_TABLE5``). ``run_row`` measures one (row, seed);
``summarise`` turns the results into mean and spread per row; ``markdown_table`` prints them.
The command line is ``bench/ablations.py``; lesson 12 runs one row live and reads the stored
table (``load_results``).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from titans_mini.models import TitansConfig, TitansLM
from titans_mini.tasks import IGNORE_INDEX, PhraseTokenizer, sniah_lite

__all__ = [
    "Row",
    "ROWS",
    "PAPER_TABLE5",
    "ProbeConfig",
    "row_config",
    "text_score",
    "probe_score",
    "run_row",
    "summarise",
    "markdown_table",
    "load_results",
    "RESULTS_FILE",
]


@dataclass(frozen=True)
class Row:
    """One ablation: a name, what it changes, and the ``TitansConfig`` overrides that do it."""

    name: str
    change: str
    overrides: dict[str, Any] = field(default_factory=dict)
    paper: str | None = None  # the row of the paper's Table 5 it corresponds to


ROWS: list[Row] = [
    Row("full", "the model as built in lessons 07-09", {}, "LMM"),
    Row("+ attention (MAG)", "sliding-window attention gated with the memory", {"variant": "mag"},
        "+ Attn (MAG)"),
    Row("linear memory", "memory depth L_M = 1: M(k) = W k", {"memory_depth": 1}, "Linear memory"),
    Row("no convolution", "no causal depthwise convolution after the q/k/v projections",
        {"memory_kwargs": {"conv": False}}, "w/o convolution"),
    Row("no momentum", "eta = 0: each chunk's step is its own surprise (paper v1 eq. 10)",
        {"momentum": False}, "w/o momentum"),
    Row("no forgetting", "alpha = 0: the memory never decays (paper v1 eq. 13)",
        {"forget": False}, "w/o weight decay"),
    Row("no persistent memory", "N_p = 0 learned tokens in front of the sequence",
        {"n_persistent": 0}, "w/o persistent memory"),
    Row("chunk 16", "memory chunk b = 16 instead of 8 (fewer, larger steps; paper §3.2)",
        {"chunk_size": 16}),
    Row("chunk 32", "memory chunk b = 32", {"chunk_size": 32}),
    Row("Huber bias (Yaad)", "Miras: Huber attentional bias instead of 1/2 ||M(k) - v||^2",
        {"memory_kwargs": {"attentional_bias": "huber"}}),
]
"""The rows, in the order of the table. The base model is the LMM (the memory alone, as in the
paper's Table 5); ``+ attention (MAG)`` is the one row that changes the variant."""

PAPER_TABLE5: dict[str, dict[str, float]] = {
    "LMM": {"ppl": 27.01, "reasoning": 47.83, "long_context": 92.68},
    "+ Attn (MAC)": {"ppl": 26.67, "reasoning": 48.65, "long_context": 97.95},
    "+ Attn (MAG)": {"ppl": 25.70, "reasoning": 48.60, "long_context": 96.70},
    "+ Attn (MAL)": {"ppl": 25.91, "reasoning": 47.87, "long_context": 96.91},
    "Linear memory": {"ppl": 28.49, "reasoning": 46.97, "long_context": 85.34},
    "w/o convolution": {"ppl": 28.73, "reasoning": 45.82, "long_context": 90.28},
    "w/o momentum": {"ppl": 28.98, "reasoning": 45.49, "long_context": 87.12},
    "w/o weight decay": {"ppl": 29.04, "reasoning": 45.11, "long_context": 85.60},
    "w/o persistent memory": {"ppl": 27.63, "reasoning": 46.35, "long_context": 92.49},
}
"""The paper's Table 5 (v1; NeurIPS Table 4): a 400M-parameter LMM trained on 15B tokens of
FineWeb-Edu, one change per row. ``ppl``: mean of WikiText and LAMBADA perplexity (lower is
better); ``reasoning``: mean accuracy over 8 common-sense tasks, %; ``long_context``: mean
S-NIAH accuracy, % (the paper labels the column "BABILong")."""

RESULTS_FILE = "ablations_cpu.json"
"""The stored CPU table (``titans_mini/data``), written by ``bench/ablations.py --store``."""


def _with(cfg: TitansConfig, overrides: dict[str, Any]) -> TitansConfig:
    """``cfg`` with a row's overrides; ``memory_kwargs`` are merged, and ``segment_len`` grows to
    a multiple of a larger chunk (MAC's segment must hold whole chunks; LMM and MAG ignore it)."""
    changes = dict(overrides)
    if "memory_kwargs" in changes:
        changes["memory_kwargs"] = {**cfg.memory_kwargs, **changes["memory_kwargs"]}
    chunk = changes.get("chunk_size", cfg.chunk_size)
    if cfg.segment_len % chunk:
        changes["segment_len"] = chunk * -(-cfg.segment_len // chunk)
    return cfg.replace(**changes)


def row_config(row: Row, preset: str = "cpu-demo", variant: str = "lmm") -> TitansConfig:
    """The ``TitansConfig`` that ``text_score`` trains for ``row``: the preset's model with the
    row's change (lesson 12 builds the models of every row from it)."""
    return _with(TitansConfig.preset(preset, variant=variant), row.overrides)


# ------------------------------------------------------------------------------------------
# Language modelling: validation bits per byte
# ------------------------------------------------------------------------------------------
def text_score(row: Row, seed: int, *, preset: str = "cpu-demo", variant: str = "lmm",
               steps: int = 200, batch_size: int = 16, lr: float = 2e-3,
               eval_batches: int = 16, device: str | None = None) -> dict[str, float]:
    """Train ``variant`` at ``preset`` size with the row's change on Shakespeare; return the
    validation loss in bits per byte and the parameter count (same data order for every row:
    the data depend only on ``seed``)."""
    from titans_mini.trainer import Trainer  # the trainer imports the data module (slower)

    cfg = _with(TitansConfig.preset(preset, variant=variant), row.overrides)
    trainer = Trainer(cfg, "shakespeare", steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                      eval_every=0, eval_batches=eval_batches, sample_tokens=0, progress=False,
                      device=device)
    trainer.fit()
    metrics = trainer.evaluate()
    return {"val_bpb": metrics["val_bpb"], "params": trainer.raw_model.num_params()}


# ------------------------------------------------------------------------------------------
# The memory probe: S-NIAH-lite beyond the attention window (lesson 10's setting)
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeConfig:
    """Lesson 10's S-NIAH-lite setting: a window of ``window`` tokens, sequences of ``length``
    phrase tokens, a ``digits``-digit number asked ``test_distance`` tokens after the needle
    (training draws the distance uniformly from 7 to 8 windows)."""

    window: int = 8
    length: int = 80
    digits: int = 2
    chunk_size: int = 8
    n_persistent: int = 4
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    eval_rows: int = 128

    @property
    def test_distance(self) -> int:
        return 4 * self.window


def probe_score(row: Row, seed: int, probe: ProbeConfig = ProbeConfig(), *,
                variant: str = "lmm") -> dict[str, float]:
    """Train the tiny model with the row's change on S-NIAH-lite and return its exact match at
    4 windows (the needle far beyond what attention sees), with writes on and switched off."""
    from titans_mini.models import memory_writes_off

    tokenizer = PhraseTokenizer()
    base = TitansConfig.preset("tiny", variant=variant, vocab_size=tokenizer.vocab_size,
                               window=probe.window, segment_len=probe.window,
                               chunk_size=probe.chunk_size, n_persistent=probe.n_persistent)
    torch.manual_seed(seed)
    model = TitansLM(_with(base, row.overrides))
    opt = torch.optim.AdamW(model.parameters(), lr=probe.lr)
    rng = np.random.default_rng(seed)

    def batch(n, distance, batch_seed):
        return sniah_lite(n, probe.length, tokenizer=tokenizer, num_digits=probe.digits,
                          distance=distance, seed=batch_seed)

    for step in range(probe.steps):
        b = batch(probe.batch_size, rng.integers(7, 8 * probe.window + 1, size=probe.batch_size),
                  10**6 * seed + step)
        logits, _ = model(b.inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    test = batch(probe.eval_rows, probe.test_distance, 10**9 + probe.test_distance)
    with torch.no_grad():
        on = test.accuracy(model(test.inputs)[0])
        with memory_writes_off(model):
            off = test.accuracy(model(test.inputs)[0])
    return {"recall": on, "recall_writes_off": off}


def run_row(row: Row, seed: int, *, text: dict | None = None,
            probe: ProbeConfig = ProbeConfig(), variant: str = "lmm") -> dict[str, Any]:
    """Both measurements of one (row, seed), with the seconds each took."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"row": row.name, "seed": seed}
    out.update(text_score(row, seed, variant=variant, **(text or {})))
    t1 = time.perf_counter()
    out.update(probe_score(row, seed, probe, variant=variant))
    out["seconds_text"], out["seconds_probe"] = t1 - t0, time.perf_counter() - t1
    return out


# ------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------
def summarise(results: list[dict]) -> list[dict]:
    """Per row (in ``ROWS`` order): seeds, mean / min / max of val bpb and recall, params."""
    rows = []
    for row in ROWS:
        runs = [r for r in results if r["row"] == row.name]
        if not runs:
            continue
        s: dict[str, Any] = {"row": row.name, "change": row.change, "paper": row.paper,
                             "seeds": sorted(r["seed"] for r in runs),
                             "params": runs[0]["params"]}
        for key in ("val_bpb", "recall", "recall_writes_off"):
            v = np.array([r[key] for r in runs], dtype=float)
            s[key] = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}
        rows.append(s)
    return rows


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def markdown_table(results: list[dict]) -> str:
    """The ablation table in Markdown, with the paper's Table 5 numbers beside ours."""
    summary = summarise(results)
    full = next((s for s in summary if s["row"] == "full"), None)
    lines = [
        "| row | params | val bits/byte, mean (min-max) | Δ vs full | S-NIAH-lite recall at 4w, "
        "mean (min-max) | writes off | paper ppl | paper long-context % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        b, r, off = s["val_bpb"], s["recall"], s["recall_writes_off"]
        delta = "" if full is None or s is full else f"{b['mean'] - full['val_bpb']['mean']:+.3f}"
        paper = PAPER_TABLE5.get(s["paper"] or "", {})
        lines.append(
            f"| {s['row']} | {s['params']:,} | {b['mean']:.3f} ({b['min']:.3f}-{b['max']:.3f}) "
            f"| {delta} | {r['mean']:.1%} ({r['min']:.1%}-{r['max']:.1%}) | {off['mean']:.1%} "
            f"| {_num(paper.get('ppl'))} | {_num(paper.get('long_context'))} |"
        )
    return "\n".join(lines)


def machine() -> str:
    """The machine a table was measured on, in words."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}"


def load_results(path=None) -> dict:
    """The stored table (``{"settings": ..., "machine": ..., "date": ..., "results": [...]}``)
    from ``path`` or the package's ``data/ablations_cpu.json``."""
    if path is None:
        text = resources.files("titans_mini").joinpath("data", RESULTS_FILE).read_text()
    else:
        with open(path) as f:
            text = f.read()
    return json.loads(text)
