"""Lesson 11's training stream: corpus text with S-NIAH-lite facts mixed in (RecallMix), the
weighted training loss, and memory_stats (a trained model's per-token surprise)."""

import math

import pytest
import torch
import torch.nn.functional as F

from titans_mini.data import TextData, load_corpus
from titans_mini.memory import NeuralMemory
from titans_mini.models import PRESETS, TitansConfig, TitansLM, memory_stats
from titans_mini.task_stream import RecallMix, sniah_in_text
from titans_mini.trainer import Trainer, _training_loss


@pytest.fixture(scope="module")
def text():
    return TextData(load_corpus("shakespeare"))


def mix(text, rows=3, batch=6, seq=192, seed=0):
    return RecallMix(text, text.batcher("train", batch, seq, seed=seed), rows, seed=seed)


def test_recall_rows_hold_a_fact_and_its_question_in_corpus_text(text):
    m = mix(text)
    b = m.batch(5)
    plain = text.batcher("train", 6, 192, seed=0).batch(5)
    assert torch.equal(b.inputs[:3], plain.inputs[:3])  # the text rows are untouched
    assert torch.equal(b.targets[:3], plain.targets[:3])
    for row in range(3, 6):
        s = text.tokenizer.decode(b.inputs[row].tolist() + [int(b.targets[row, -1])])
        key = s.split("magic numbers for ")[1].split(" is: ")[0]
        number = s.split(" is: ")[1][:4]
        assert s.endswith(f"What is the special magic number for {key}? Answer: {number}")
        # next-token targets everywhere on the recall row (the haystack is text too)
        assert torch.equal(b.targets[row, :-1], b.inputs[row, 1:])
    # the same step gives the same batch; another step another one
    assert torch.equal(m.batch(5).inputs, b.inputs)
    assert not torch.equal(m.batch(6).inputs[3:], b.inputs[3:])


def test_needles_lie_beyond_the_attention_reach_of_cpu_lm(text):
    cfg = PRESETS["cpu-lm"]
    m = RecallMix(text, text.batcher("train", 16, cfg["seq_len"], seed=1), 8, seed=1)
    reach = cfg["n_layers"] * (cfg["window"] - 1)
    distances = torch.cat([m.recall_batch(s).info["distance"] for s in range(5)])
    assert distances.min() > reach, (distances.min(), reach)


def test_weights_split_text_and_answers_evenly(text):
    b = mix(text).batch(0)
    w = b.weights
    assert torch.all(w[:3] == 1.0)
    answer = w > 1.0  # the 4 answer digits of each recall row
    assert answer.sum() == 3 * 4 and answer[3:, -4:].all()
    assert torch.allclose(w[answer].sum(), w[~answer].sum())
    assert torch.all(w[3:][~answer[3:]] == 0.5)


def test_weighted_loss_is_the_weighted_mean():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    weights = torch.rand(2, 5)
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    want = (per_token * weights.flatten()).sum() / weights.sum()
    torch.testing.assert_close(_training_loss(logits, targets, weights), want)
    torch.testing.assert_close(_training_loss(logits, targets), per_token.mean())


def test_trainer_trains_on_the_mix_and_rejects_bad_settings(text):
    cfg = TitansConfig.preset("tiny", variant="mag", seq_len=160)
    t = Trainer(cfg, text, steps=2, batch_size=4, recall_rows=2, progress=False,
                sample_tokens=0, eval_every=0, eval_batches=1)
    t.fit()
    assert isinstance(t.train_batches, RecallMix)
    assert math.isfinite(t.history[-1]["val_bpb"])
    with pytest.raises(ValueError, match="recall_rows must be below batch_size"):
        Trainer(cfg, text, steps=2, batch_size=4, recall_rows=4, progress=False)
    with pytest.raises(ValueError, match="segments=1"):
        Trainer(cfg, text, steps=2, batch_size=4, recall_rows=2, segments=2, progress=False)
    with pytest.raises(ValueError, match="too short for a recall row"):
        RecallMix(text, text.batcher("train", 4, 64), 2)


def test_memory_stats_reports_the_surprise_the_memory_computes():
    torch.manual_seed(0)
    model = TitansLM(TitansConfig.preset("tiny", variant="mag")).eval()
    tokens = torch.randint(0, 256, (2, 24))
    stats = memory_stats(model, tokens)
    assert len(stats) == model.cfg.n_layers
    n_p = model.cfg.n_persistent
    assert stats[0].surprise.shape == (2, 2, n_p + 24)
    # the first layer's memory reads P ‖ RMSNorm(embedding): recompute its surprise directly
    mem = next(m for m in model.modules() if isinstance(m, NeuralMemory))
    seen = []
    handle = mem.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        model(tokens)
        handle.remove()
        want = mem(seen[0], return_stats=True)[2].surprise
    torch.testing.assert_close(stats[0].surprise, want)
    with pytest.raises(ValueError, match="has no NeuralMemory"):
        memory_stats(TitansLM(TitansConfig.preset("tiny", variant="swa")), tokens)


def test_sniah_in_text_asks_at_the_given_distance_in_held_out_text(text):
    for distance in (70, 300):
        b = sniah_in_text(text, 3, distance, seed=2)
        assert b.info["distance"].tolist() == [distance] * 3
        row = text.tokenizer.decode(b.inputs[0].tolist())
        assert row.count("magic number") == 2
        # the haystack is held-out text: a stretch before the needle occurs in the val plays
        before = row.split(" One of the special")[0][-20:]
        assert len(before) == 20
        assert any(before.encode() in bytes(d.astype("uint8").tolist()) for d in text.val_docs)
    with pytest.raises(ValueError, match="does not fit"):
        sniah_in_text(text, 1, 10)
