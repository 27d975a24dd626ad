"""The trainer: learning, exact resume, atomic checkpoints, torchrun/DDP, and its errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from titans_mini import device as device_mod
from titans_mini import train as train_mod
from titans_mini.models import TitansConfig, TitansLM
from titans_mini.train import TaskData, TrainConfig, Trainer
from titans_mini.train_config import lr_lambda
from titans_mini.train_setup import memory_layers

# small and quick: the `tiny` preset, short rows, no progress bar, no sample
QUICK = dict(batch_size=8, seq_len=32, progress=False, sample_tokens=0, eval_batches=1)



def tiny(variant="transformer", **overrides):
    return TitansConfig.preset("tiny", variant=variant, **overrides)


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- learning
def test_loss_falls_on_tiny(tmp_path):
    trainer = Trainer(
        tiny(), "shakespeare", TrainConfig(steps=40, lr=3e-3, eval_every=40, log_every=5, **QUICK),
        out_dir=tmp_path,
    )  # fmt: skip
    history = trainer.fit()
    rows = read_metrics(tmp_path)
    assert rows == history
    assert {"step", "train_loss", "lr", "tokens_per_s"} <= set(rows[0])
    first, last = rows[0]["train_loss"], rows[-1]["train_loss"]
    assert first > 5.0  # ≈ ln 256 at the start
    assert last < first - 1.2, (first, last)
    assert rows[-1]["step"] == 40 and rows[-1]["val_loss"] < first - 1.0
    assert 0 < rows[-1]["val_bpb"] == pytest.approx(rows[-1]["val_loss"] / 0.6931471805599453)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["variant"] == "transformer" and config["train"]["steps"] == 40
    assert (tmp_path / "checkpoint.pt").is_file()


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_lambda(s, steps=100, warmup=10, min_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # rises during warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then only falls
    assert lr_lambda(100, steps=100, warmup=10, min_ratio=0.1) == pytest.approx(0.1)


def test_sample_at_the_end(tmp_path):
    trainer = Trainer(
        tiny(),
        "shakespeare",
        TrainConfig(steps=2, **(QUICK | {"sample_tokens": 20})),
        out_dir=tmp_path,
    )
    trainer.fit()
    text = (tmp_path / "sample.txt").read_text()
    assert trainer.sample_text == text and len(text.encode("utf-8", "replace")) >= 20


# ---------------------------------------------------------------- resume
@pytest.mark.parametrize("variant, segments", [("transformer", 1), ("transformer", 2), ("mag", 2)])
def test_resume_matches_uninterrupted(tmp_path, variant, segments):
    """Stop after k = 5 steps (mid-excerpt when segments = 2: the carried attention cache or
    memory state must be restored), resume, train to 2k = 10: the parameters and the logged
    losses equal an uninterrupted run's."""
    cfg = TrainConfig(steps=10, lr=3e-3, eval_every=4, log_every=1, segments=segments, **QUICK)
    full = Trainer(tiny(variant), "shakespeare", cfg, out_dir=tmp_path / "full")
    full.fit()

    part = Trainer(tiny(variant), "shakespeare", cfg, out_dir=tmp_path / "part")
    part.fit(stop_at=5)
    assert part.step == 5
    if segments == 2:
        assert part.state is not None  # the carried state is part of the checkpoint
    torch.manual_seed(1234)  # the resumed run must not depend on the global RNG at start
    resumed = Trainer(tiny(variant), "shakespeare", cfg, out_dir=tmp_path / "part", resume=True)
    assert resumed.step == 5
    resumed.fit()

    for (name, a), (_, b) in zip(
        full.raw_model.state_dict().items(), resumed.raw_model.state_dict().items()
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    a_rows, b_rows = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["step"] for r in a_rows] == [r["step"] for r in b_rows] == list(range(1, 11))
    for ra, rb in zip(a_rows, b_rows):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-6)
        assert ra.get("val_loss") == pytest.approx(rb.get("val_loss"), abs=1e-6)
    assert resumed.scheduler.get_last_lr() == full.scheduler.get_last_lr()


def test_resume_fails_clearly(tmp_path):
    cfg = TrainConfig(steps=3, **QUICK)
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        Trainer(tiny(), "shakespeare", cfg, out_dir=tmp_path, resume=True)
    Trainer(tiny(), "shakespeare", cfg, out_dir=tmp_path, resume="auto").fit(stop_at=1)
    again = Trainer(tiny(), "shakespeare", cfg, out_dir=tmp_path, resume="auto")
    assert again.step == 1
    with pytest.raises(ValueError, match="model config differs"):
        Trainer(tiny(dim=64, n_heads=4), "shakespeare", cfg, out_dir=tmp_path, resume=True)


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    trainer = Trainer(tiny(), "shakespeare", TrainConfig(steps=4, **QUICK), out_dir=tmp_path)
    trainer.fit(stop_at=2)
    path = tmp_path / "checkpoint.pt"
    before = train_mod.load_checkpoint(path)
    assert before["step"] == 2

    real_save = torch.save

    def crash_midway(obj, fh, *args, **kwargs):
        real_save(obj, fh, *args, **kwargs)
        fh.seek(0)
        fh.truncate(100)  # half-written file...
        raise KeyboardInterrupt("power cut")  # ...and the process stops

    monkeypatch.setattr(torch, "save", crash_midway)
    trainer.train_step()
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.setattr(torch, "save", real_save)

    after = train_mod.load_checkpoint(path)  # still the complete step-2 checkpoint
    assert after["step"] == 2
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    resumed = Trainer(
        tiny(), "shakespeare", TrainConfig(steps=4, **QUICK), out_dir=tmp_path, resume=True
    )
    assert resumed.step == 2


# ---------------------------------------------------------------- state carried across segments
class RecordingLM(nn.Module):
    """Wraps a TitansLM and records whether each call received a carried state."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.cfg, self.calls = inner, inner.cfg, []

    def forward(self, tokens, state=None):
        if self.training:
            self.calls.append(state is not None)
        return self.inner(tokens, state)

    def generate(self, *args, **kwargs):
        return self.inner.generate(*args, **kwargs)


def test_state_carried_within_an_excerpt_and_reset_at_the_next():
    torch.manual_seed(0)
    model = RecordingLM(TitansLM(tiny("swa")))
    trainer = Trainer(model, "shakespeare", TrainConfig(steps=6, segments=3, eval_every=0, **QUICK))
    trainer.fit()
    assert model.calls == [False, True, True, False, True, True]
    assert trainer.history[-1]["val_loss"] > 0


class BigramLM(nn.Module):
    """A stand-in model with no state: forward(tokens) returns only logits."""

    def __init__(self, vocab=256):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, tokens, state=None):
        return self.table(tokens)


def test_any_module_that_returns_logits():
    torch.manual_seed(0)
    trainer = Trainer(
        BigramLM(), "shakespeare", TrainConfig(steps=30, lr=0.1, log_every=10, **QUICK)
    )
    rows = trainer.fit()
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5
    with pytest.raises(ValueError, match="vocabulary"):
        Trainer(BigramLM(vocab=100), "shakespeare", TrainConfig(**QUICK))


# ---------------------------------------------------------------- tasks and other data
def test_trains_on_a_task():
    trainer = Trainer(
        tiny(), "mqar", TrainConfig(steps=30, lr=3e-3, eval_every=30, log_every=10, **QUICK)
    )
    rows = trainer.fit()
    assert trainer.task.name == "mqar" and trainer.task.kwargs["num_pairs"] == 2
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert 0.0 <= rows[-1]["val_acc"] <= 1.0 and "val_bpb" not in rows[-1]
    with pytest.raises(ValueError, match="too short"):
        Trainer(tiny(), "sniah_lite", TrainConfig(steps=1, **QUICK))


def test_task_stream_batch_is_a_pure_function_of_the_step():
    """Resuming needs only the step count: batch `step` does not depend on what came before;
    ranks read different rows; held-out batches are not training batches."""
    a, b = TaskData("mqar", 64, 64, 4, seed=3), TaskData("mqar", 64, 64, 4, seed=3)
    b.batch(6)
    assert torch.equal(a.batch(5).inputs, b.batch(5).inputs)
    assert not torch.equal(a.batch(5).inputs, a.batch(6).inputs)
    rank1 = TaskData("mqar", 64, 64, 4, seed=3, rank=1)
    assert not torch.equal(a.batch(5).inputs, rank1.batch(5).inputs)
    held_out = a.eval_batches(2)
    assert all(not torch.equal(h.inputs, a.batch(i).inputs) for i, h in enumerate(held_out))
    with pytest.raises(ValueError, match="unknown task"):
        TaskData("copy", 64, 64, 4)


def test_bpe_run_folder_keeps_its_tokenizer(tmp_path):
    corpus = tmp_path / "texts"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"part{i}.txt").write_text(
            f"Part {i}. " + "the quick brown fox jumps over the lazy dog. " * 300
        )
    run = tmp_path / "run"
    cfg = TrainConfig(steps=3, tokenizer="bpe", bpe_vocab=300, **QUICK)
    first = Trainer(tiny(), corpus, cfg, out_dir=run)
    assert 256 < first.tokenizer.vocab_size <= 300  # a small text may run out of merges
    assert first.raw_model.cfg.vocab_size == first.tokenizer.vocab_size  # model follows it
    first.fit(stop_at=2)
    assert (run / "tokenizer.json").is_file()
    resumed = Trainer(tiny(), corpus, cfg, out_dir=run, resume=True)
    text = "the lazy dog jumps"
    assert resumed.tokenizer.encode(text) == first.tokenizer.encode(text)
    resumed.fit()
    assert resumed.step == 3


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(steps=0), "steps"),
        (dict(batch_size=-1), "batch_size"),
        (dict(lr=0.0), "lr"),
        (dict(segments=0), "segments"),
        (dict(precision="fp8"), "precision"),
        (dict(tokenizer="wordpiece"), "tokenizer"),
        (dict(min_lr_ratio=2.0), "min_lr_ratio"),
        (dict(seq_len=1), "seq_len"),
    ],
)
def test_bad_train_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        Trainer(tiny(), "shakespeare", TrainConfig(**(QUICK | overrides)))


def test_bad_trainer_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown data"):
        Trainer(tiny(), "shakespear", TrainConfig(**QUICK))
    with pytest.raises(FileNotFoundError):
        Trainer(tiny(), tmp_path / "missing.txt", TrainConfig(**QUICK))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        Trainer(tiny(), "shakespeare", TrainConfig(**QUICK), out_dir=blocker / "run")
    with pytest.raises(ValueError, match="resume needs out_dir"):
        Trainer(tiny(), "shakespeare", TrainConfig(**QUICK), resume=True)
    with pytest.raises(TypeError):
        Trainer("tiny", "shakespeare", TrainConfig(**QUICK))


def _cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        train_mod.main(args)
    return exc.value.code, capsys.readouterr().err


BASE = ["--preset", "tiny", "--variant", "transformer", "--steps", "2"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "huge", "--variant", "mag", "--steps", "2"], "unknown preset 'huge'"),
        (["--preset", "tiny", "--variant", "rnn", "--steps", "2"], "unknown variant 'rnn'"),
        (BASE + ["--data", "wikipedia"], "unknown data 'wikipedia'"),
        (BASE + ["--data", "nowhere/book.txt"], "does not exist"),
        (BASE + ["--steps", "0"], "--steps must be >= 1"),
        (BASE + ["--set", "dim=33"], "dim"),
        (BASE + ["--set", "colour=3"], "unknown config field"),
        (BASE + ["--batch-size", "0"], "batch_size"),
    ],
)
def test_cli_errors_before_any_work(args, message, capsys, tmp_path):
    code, err = _cli(args + ["--out", str(tmp_path / "run")], capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_out_dir_resume_device_errors(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _cli(BASE + ["--out", str(blocker / "run")], capsys)
    assert code == 2 and "not writable" in err
    code, err = _cli(BASE + ["--out", str(tmp_path / "fresh"), "--resume"], capsys)
    assert code == 2 and "no checkpoint.pt" in err
    if not torch.cuda.is_available():
        code, err = _cli(BASE + ["--out", str(tmp_path / "gpu"), "--device", "cuda"], capsys)
        assert code == 2 and "cuda" in err
    code, err = _cli(BASE + ["--out", str(tmp_path / "hf"), "--data", "tinystories"], capsys)
    assert code == 2 and ("datasets" in err or "not reachable" in err)
    # resuming with another model shape: caught by the trainer, reported as a usage error
    run = tmp_path / "run"
    args = BASE + ["--out", str(run), "--seq-len", "32", "--no-progress", "--sample-tokens", "0"]
    assert train_mod.main(args + ["--stop-at", "1"]) == 0
    code, err = _cli(args + ["--resume", "--set", "dim=64"], capsys)
    assert code == 2 and "model config differs" in err


def test_cli_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = BASE[:-1] + [
        "4",
        "--out",
        str(out),
        "--seq-len",
        "32",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert train_mod.main(args + ["--stop-at", "2", "--sample-tokens", "0"]) == 0
    assert [r["step"] for r in read_metrics(out)][-1] == 2
    assert train_mod.main(args + ["--resume", "--sample-tokens", "0"]) == 0
    rows = read_metrics(out)
    assert rows[-1]["step"] == 4 and "val_loss" in rows[-1]
    assert "step 4" in capsys.readouterr().out


# ---------------------------------------------------------------- torchrun / DDP
@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    """`torchrun --nproc_per_node=2` on the CPU (gloo): a Titans variant with its state carried
    across segments (so some parameters get no gradient on some steps) trains, stops
    mid-excerpt, and resumes. Select with `pytest -m slow` or `-k torchrun`."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which(
        "torchrun"
    )
    if torchrun is None:
        pytest.skip("torchrun not found")
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        torchrun, "--standalone", "--nproc_per_node=2", "-m", "titans_mini.train",
        "--preset", "tiny", "--variant", "mac", "--steps", "4", "--out", str(out),
        "--device", "cpu", "--seq-len", "32", "--segments", "2", "--batch-size", "4",
        "--eval-every", "2", "--log-every", "1", "--no-progress", "--sample-tokens", "0",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd + ["--stop-at", "3"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    assert train_mod.load_checkpoint(out / "checkpoint.pt")["step"] == 3
    # step 3 is the middle of an excerpt: rank 1 kept its own carried state
    assert train_mod.load_checkpoint(out / "carried_state.rank1.pt")["step"] == 3
    proc = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer: rank 0
    assert "val_loss" in rows[1] and "val_loss" in rows[3]
    assert train_mod.load_checkpoint(out / "checkpoint.pt")["step"] == 4
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2


# ---------------------------------------------------------------- out of memory
def _fail_without_checkpointing(trainer, calls):
    """Make the training forward raise CUDA's out-of-memory error unless the memory layers
    recompute their chunks (as a GPU would when a batch's saved chunk states do not fit)."""
    forward = trainer._forward

    def guarded(model, inputs, state):
        calls.append([m.checkpoint_chunks for m in memory_layers(trainer.raw_model)])
        if torch.is_grad_enabled() and not all(calls[-1]):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(model, inputs, state)

    trainer._forward = guarded


def test_out_of_memory_switches_titans_memory_to_chunk_checkpointing(tmp_path):
    """A Titans variant that runs out of memory retries the same step with checkpointed
    memory chunks; the step's loss and the updated weights equal a run that never ran out."""
    cfg = TrainConfig(steps=3, lr=3e-3, eval_every=3, **QUICK)
    ref = Trainer(tiny("mag"), "shakespeare", cfg)
    want = [ref.train_step() for _ in range(2)]
    trainer = Trainer(tiny("mag"), "shakespeare", cfg, out_dir=tmp_path)
    calls = []
    _fail_without_checkpointing(trainer, calls)
    with pytest.warns(UserWarning, match="checkpoint_chunks=8"):
        got = [trainer.train_step()]
    got.append(trainer.train_step())
    n_layers = len(memory_layers(trainer.raw_model))
    assert n_layers == 2
    assert calls == [[0, 0], [8, 8], [8, 8]]  # failed once, repeated step 1, then step 2
    assert trainer.step == 2 and trainer.model_config.checkpoint_chunks == 8
    assert got == pytest.approx(want, rel=1e-6)
    for a, b in zip(trainer.raw_model.parameters(), ref.raw_model.parameters()):
        torch.testing.assert_close(a, b)
    trainer.fit()  # the run finishes; the recorded config is still the original one
    assert json.loads((tmp_path / "config.json").read_text())["model"]["checkpoint_chunks"] == 0


@pytest.mark.parametrize("variant", ["transformer", "mag"])
def test_out_of_memory_without_a_way_out_says_what_to_lower(variant):
    """Nothing left to switch on (a transformer; or Titans already checkpointed): the error
    names the batch shape and the settings to lower, and keeps the original error as cause."""
    cfg = TrainConfig(steps=2, **QUICK)
    model = tiny(variant, **({"checkpoint_chunks": 8} if variant == "mag" else {}))
    trainer = Trainer(model, "shakespeare", cfg)

    def always_oom(model, inputs, state):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer._forward = always_oom
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"batch \(8, 32\).*--batch-size") as e:
        trainer.train_step()
    assert "Tried to allocate" in str(e.value) and e.value.__cause__ is not None
    assert ("checkpoint_chunks group" in str(e.value)) == (variant == "mag")
    assert trainer.step == 0


def test_compile_with_memory_refused_on_unverified_torch(monkeypatch):
    """``--compile`` traces the memory's hand-written update; like ``compile_chunks`` it is
    refused on torch versions where its gradients are not verified (baselines are not)."""
    monkeypatch.setattr(device_mod, "torch_version", lambda: (2, 10))
    cfg = TrainConfig(steps=1, compile=True, **QUICK)
    with pytest.raises(ValueError, match=r"needs torch >= 2\.11.*without --compile"):
        Trainer(tiny("mag"), "shakespeare", cfg)
    Trainer(tiny("transformer"), "shakespeare", cfg)  # nothing of the memory to trace
