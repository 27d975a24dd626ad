"""The trainer never loses a run: a used run folder, a diverging run, a resume with other
settings, files left by a kill, damaged checkpoints and metrics, a full disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from titans_mini import run_io
from titans_mini import train as train_mod
from titans_mini.models import TitansConfig
from titans_mini.train_config import lr_lambda
from titans_mini.trainer import TrainConfig, Trainer, TrainingDiverged

QUICK = dict(batch_size=8, seq_len=32, progress=False, sample_tokens=0, eval_batches=1)
CLI = ["--preset", "tiny", "--variant", "transformer", "--seq-len", "32", "--no-progress",
       "--sample-tokens", "0"]  # fmt: skip


def tiny(variant="transformer"):
    return TitansConfig.preset("tiny", variant=variant)


def strict_rows(path: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: NaN / Infinity are errors."""

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    lines = path.read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines if line.strip()]


def short_run(folder: Path, steps=4, stop_at=2, **cfg) -> Trainer:
    trainer = Trainer(tiny(), "shakespeare", TrainConfig(steps=steps, **(QUICK | cfg)), folder)
    trainer.fit(stop_at=stop_at)
    return trainer


# ---------------------------------------------------------------- a used run folder
def test_new_run_in_a_used_folder_is_refused_unless_overwrite(tmp_path, capsys):
    short_run(tmp_path, log_every=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="--resume.*--overwrite") as err:
        Trainer(tiny(), "shakespeare", TrainConfig(steps=4, **QUICK), out_dir=tmp_path)
    assert "checkpoint.pt" in str(err.value) and "2 rows up to step 2" in str(err.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched
    with pytest.raises(SystemExit) as exc:  # the command line says the same, before any work
        train_mod.main(CLI + ["--steps", "4", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(ValueError, match="choose one"):
        Trainer(tiny(), "shakespeare", TrainConfig(**QUICK), tmp_path, resume=True, overwrite=True)

    fresh = Trainer(tiny(), "shakespeare", TrainConfig(steps=4, **QUICK), tmp_path, overwrite=True)
    assert fresh.step == 0 and not (tmp_path / "checkpoint.pt").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_a_folder_with_only_config_json_is_free(tmp_path):
    """Building a Trainer twice (a notebook cell run again) before training is no conflict."""
    Trainer(tiny(), "shakespeare", TrainConfig(steps=4, **QUICK), out_dir=tmp_path)
    again = Trainer(tiny(), "shakespeare", TrainConfig(steps=4, **QUICK), out_dir=tmp_path)
    assert again.step == 0


# ---------------------------------------------------------------- a diverging run
def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """lr = 1e4 on a Titans variant: step 1 is fine (checkpointed), step 2's loss is NaN. The
    run stops there, naming the step and what to lower; checkpoint and metrics stay good."""
    cfg = TrainConfig(steps=10, lr=1e4, warmup_steps=0, log_every=1, ckpt_every=1, **QUICK)
    trainer = Trainer(tiny("mag"), "shakespeare", cfg, out_dir=tmp_path)
    with pytest.raises(TrainingDiverged, match=r"step 2: loss nan.*lower the learning rate"):
        trainer.fit()
    ckpt = run_io.load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 1 and trainer.step == 1
    for name, value in ckpt["model"].items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, trainer.raw_model.state_dict()[name], rtol=0, atol=0)
    rows = strict_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1]
    # the command line: one line that says so, exit code 1, no traceback
    code = train_mod.main(
        CLI[:3] + ["mag"] + CLI[4:]
        + ["--steps", "10", "--lr", "1e4", "--warmup", "0", "--log-every", "1",
           "--out", str(tmp_path / "cli")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: training diverged at step 2")
    strict_rows(tmp_path / "cli" / "metrics.jsonl")


class NaNGradientLM(nn.Module):
    """A bigram model whose loss is finite but whose gradient turns NaN at the 3rd backward."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(256, 256)
        self.calls = 0

    def forward(self, tokens, state=None):
        out = self.table(tokens)
        if self.training:
            self.calls += 1
            if self.calls == 3:
                out.register_hook(lambda g: g * float("nan"))
        return out


def test_a_nan_gradient_with_a_finite_loss_stops_the_run():
    torch.manual_seed(0)
    model = NaNGradientLM()
    trainer = Trainer(model, "shakespeare", TrainConfig(steps=5, grad_clip=0.0, **QUICK))
    trainer.fit(stop_at=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match="step 3: loss [0-9.]+, gradient norm nan"):
        trainer.train_step()
    assert trainer.step == 2
    for k, v in model.state_dict().items():  # the bad step changed nothing
        assert torch.equal(v, before[k]), k


def test_metrics_rows_stay_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    run_io.append_metrics(path, {"step": 1, "val_loss": float("nan"), "lr": float("inf")})
    assert strict_rows(path) == [{"step": 1, "val_loss": None, "lr": None}]


# ---------------------------------------------------------------- resume with other settings
def test_resume_with_other_settings_is_refused_with_the_list(tmp_path):
    short_run(tmp_path, steps=6, stop_at=2)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    book = tmp_path / "book.txt"
    book.write_text("To be, or not to be, that is the question.\n" * 200)
    with pytest.raises(ValueError, match="other settings") as err:
        Trainer(
            tiny(), book, TrainConfig(steps=6, **(QUICK | dict(batch_size=4, seq_len=16))),
            tmp_path, resume=True,
        )  # fmt: skip
    message = str(err.value)
    for field in ("batch_size: 8 in the run, 4 now", "seq_len: 32 in the run, 16 now", "data"):
        assert field in message
    assert "may change on resume: steps, lr" in message
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_resume_with_a_new_learning_rate_applies_and_records_it(tmp_path):
    short_run(tmp_path, steps=6, stop_at=2, lr=3e-3, log_every=1)
    with pytest.warns(UserWarning, match=r"changed settings: lr 0.003 -> 0.001"):
        resumed = Trainer(
            tiny(), "shakespeare", TrainConfig(steps=6, **(QUICK | dict(lr=1e-3, log_every=1))),
            tmp_path, resume=True,
        )  # fmt: skip
    resumed.fit()
    warmup = TrainConfig(steps=6).warmup
    for row in resumed.history[2:]:  # steps 3..6 follow the schedule with the new peak
        expected = 1e-3 * lr_lambda(row["step"], steps=6, warmup=warmup, min_ratio=0.1)
        assert row["lr"] == pytest.approx(expected)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"]["lr"] == 1e-3
    assert config["resumes"] == [{"step": 2, "changed": {"lr": {"was": 3e-3, "now": 1e-3}}}]
    assert run_io.load_checkpoint(tmp_path / "checkpoint.pt")["train_config"]["lr"] == 1e-3


# ---------------------------------------------------------------- files left by a kill
def test_stale_temporary_checkpoint_is_removed_when_the_next_run_starts(tmp_path):
    short_run(tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f".checkpoint.pt.tmp-{int(gone.stdout)}"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".checkpoint.pt.tmp-{run_io.os.getppid()}"  # its writer still runs
    live.write_bytes(b"being written")
    resumed = Trainer(tiny(), "shakespeare", TrainConfig(steps=4, **QUICK), tmp_path, resume=True)
    assert resumed.step == 2
    assert not stale.exists() and live.exists()


# ---------------------------------------------------------------- damaged files
@pytest.mark.parametrize("damage", ["truncated", "empty", "random bytes", "not a checkpoint"])
def test_damaged_checkpoint_says_what_to_do(tmp_path, damage, capsys):
    short_run(tmp_path)
    path = tmp_path / "checkpoint.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "random bytes":
        path.write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes())
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(run_io.CheckpointError, match="is damaged.*--overwrite"):
        Trainer(tiny(), "shakespeare", TrainConfig(steps=4, **QUICK), tmp_path, resume=True)
    with pytest.raises(SystemExit) as exc:
        train_mod.main(CLI + ["--steps", "4", "--out", str(tmp_path), "--resume"])
    assert exc.value.code == 2 and f"checkpoint {path} is damaged" in capsys.readouterr().err


def test_truncated_last_metrics_line_is_tolerated(tmp_path):
    short_run(tmp_path, log_every=1)
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as fh:
        fh.write('{"step": 3, "train_l')  # the kill came mid-write
    with pytest.warns(UserWarning, match="damaged last line 3"):
        resumed = Trainer(tiny(), "shakespeare", TrainConfig(steps=4, log_every=1, **QUICK),
                          tmp_path, resume=True)  # fmt: skip
    resumed.fit()
    assert [r["step"] for r in strict_rows(metrics)] == [1, 2, 3, 4]


def test_damaged_metrics_line_before_the_last_is_named(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2, "tr\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2 is not a JSON object"):
        run_io.read_metrics(metrics)


def test_disk_full_is_said_first_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = short_run(tmp_path)
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()
    trainer.train_step()
    # not enough free space for the tensors: refused before writing
    monkeypatch.setattr(run_io, "_free_bytes", lambda folder: 1000)
    with pytest.raises(run_io.DiskFullError, match=r"disk full: writing checkpoint.pt needs about"):
        trainer.save()
    assert path.read_bytes() == good
    # the disk fills up during the write: torch's own error comes as the cause, not the message
    free = iter([10**12, 1000, 1000])
    monkeypatch.setattr(run_io, "_free_bytes", lambda folder: next(free))

    def fails_midway(obj, fh, *args, **kwargs):
        fh.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", fails_midway)
    with pytest.raises(run_io.DiskFullError, match="previous checkpoint.pt is intact") as err:
        trainer.save()
    assert isinstance(err.value.__cause__, RuntimeError)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
