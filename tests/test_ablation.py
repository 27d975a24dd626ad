"""The ablation study (titans_mini.ablation, bench/ablations.py): each row really changes the
model it says it changes, the table is computed from the runs, and the script runs end to end."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from titans_mini import ablation
from titans_mini.ablation import ROWS, Row
from titans_mini.memory import NeuralMemory
from titans_mini.models import TitansConfig, TitansLM

ROOT = Path(__file__).resolve().parents[1]


def memories(model):
    return [m for m in model.modules() if isinstance(m, NeuralMemory)]


def build(row: Row, preset="cpu-demo"):
    return TitansLM(ablation._with(TitansConfig.preset(preset, variant="lmm"), row.overrides))


def test_every_row_changes_what_it_names():
    by_name = {r.name: r for r in ROWS}
    full = memories(build(by_name["full"]))[0]
    assert (full.depth, full.momentum, full.forget, full.chunk_size) == (2, True, True, 8)
    assert full.conv_kernel > 1 and full.attentional_bias == "l2"
    expect = {
        "linear memory": lambda m: m.depth == 1,
        "no convolution": lambda m: m.conv_kernel == 1,
        "no momentum": lambda m: not m.momentum,
        "no forgetting": lambda m: not m.forget,
        "chunk 16": lambda m: m.chunk_size == 16,
        "chunk 32": lambda m: m.chunk_size == 32,
        "Huber bias (Yaad)": lambda m: m.attentional_bias == "huber",
    }
    for name, ok in expect.items():
        mems = memories(build(by_name[name]))
        assert mems and all(ok(m) for m in mems), name
    assert build(by_name["no persistent memory"]).cfg.n_persistent == 0
    assert build(by_name["full"]).cfg.n_persistent > 0
    assert build(by_name["+ attention (MAG)"]).cfg.variant == "mag"
    # a chunk larger than the segment grows the segment to whole chunks (tiny: segment 16)
    cfg = ablation._with(TitansConfig.preset("tiny", variant="mac"), {"chunk_size": 32})
    assert cfg.segment_len == 32
    # memory_kwargs of a row are merged with the preset's, not replacing them
    base = TitansConfig.preset("tiny", memory_kwargs={"theta_max": 0.5})
    merged = ablation._with(base, {"memory_kwargs": {"conv": False}})
    assert merged.memory_kwargs == {"theta_max": 0.5, "conv": False}


def test_every_paper_row_exists():
    for row in ROWS:
        assert row.paper is None or row.paper in ablation.PAPER_TABLE5


def fake_run(row, seed, bpb, recall):
    return {"row": row, "seed": seed, "val_bpb": bpb, "params": 100, "recall": recall,
            "recall_writes_off": 0.0}


def test_summary_and_table_follow_the_runs():
    runs = [fake_run("full", 0, 2.0, 1.0), fake_run("full", 1, 2.2, 0.5),
            fake_run("no momentum", 0, 2.5, 0.25)]
    summary = ablation.summarise(runs)
    assert [s["row"] for s in summary] == ["full", "no momentum"]
    assert summary[0]["val_bpb"] == pytest.approx({"mean": 2.1, "min": 2.0, "max": 2.2})
    assert summary[0]["recall"]["mean"] == pytest.approx(0.75)
    table = ablation.markdown_table(runs)
    assert "| full | 100 | 2.100 (2.000-2.200) |  | 75.0% (50.0%-100.0%)" in table
    assert "| no momentum | 100 | 2.500 (2.500-2.500) | +0.400 |" in table
    assert "28.98" in table  # the paper's w/o momentum perplexity beside ours


def test_probe_reports_recall_with_writes_on_and_off():
    """The probe measures the same trained model twice: writes on, and writes switched off."""
    out = ablation.probe_score(ROWS[0], 0, ablation.ProbeConfig(steps=1, batch_size=2, eval_rows=4))
    assert set(out) == {"recall", "recall_writes_off"}
    assert all(0.0 <= v <= 1.0 for v in out.values())


def load_bench():
    spec = importlib.util.spec_from_file_location("ablations_bench", ROOT / "bench/ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_quick_runs_resumes_and_prints_the_table(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "runs.jsonl"
    args = ["--quick", "--rows", "full", "no momentum", "--seeds", "0", "--jobs", "1",
            "--out", str(out)]
    threads = torch.get_num_threads()
    table = bench.main(args)
    assert torch.get_num_threads() == threads  # the in-process run leaves the thread count as it was
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["row"] for r in runs) == ["full", "no momentum"]
    assert all(torch.isfinite(torch.tensor(r["val_bpb"])) for r in runs)
    assert "| full |" in table and "| no momentum |" in table
    # a second call finds both runs and trains nothing
    capsys.readouterr()
    assert bench.main(args) == table
    assert "2 run(s) already in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--rows", "no such row"])


def test_stored_table_is_complete():
    stored = ablation.load_results()
    seeds = {(r["row"], r["seed"]) for r in stored["results"]}
    for row in ROWS:
        assert sum(1 for name, _ in seeds if name == row.name) >= 3, row.name
    assert stored["machine"] and stored["date"]
