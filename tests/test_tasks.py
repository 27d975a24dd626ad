"""Properties of the synthetic tasks: MQAR (Zoology), S-NIAH-lite, selective copy, surprise streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from titans_mini import tasks
from titans_mini.tasks import IGNORE_INDEX


# ---------------------------------------------------------------- MQAR
@pytest.mark.parametrize("random_non_queries", [False, True])
def test_mqar_layout_each_key_queried_once_with_its_value(random_non_queries):
    V, N, T, B = 64, 6, 48, 200
    batch = tasks.mqar(B, V, N, T, seed=1, random_non_queries=random_non_queries)
    assert batch.inputs.shape == batch.targets.shape == (B, T)
    assert batch.inputs.dtype == torch.long
    for b in range(B):
        x, y = batch.inputs[b], batch.targets[b]
        keys, vals = x[0 : 2 * N : 2], x[1 : 2 * N : 2]
        # keys from the first half (0 is filler), values from the second, distinct
        assert ((keys >= 1) & (keys < V // 2)).all()
        assert ((vals >= V // 2) & (vals < V)).all()
        assert len(set(keys.tolist())) == N and len(set(vals.tolist())) == N
        kv = dict(zip(keys.tolist(), vals.tolist()))
        scored = torch.nonzero(batch.score_mask[b]).flatten()
        # exactly N scored positions, each in the query region, on an even offset
        assert len(scored) == N
        assert (scored >= 2 * N).all() and ((scored - 2 * N) % 2 == 0).all()
        queried = x[scored].tolist()
        assert sorted(queried) == sorted(keys.tolist())  # each key queried exactly once
        for p in scored.tolist():
            assert y[p].item() == kv[x[p].item()]  # target is the key's value
        assert (y[~batch.score_mask[b]] == IGNORE_INDEX).all()
        if not random_non_queries:
            filler = torch.ones(T, dtype=torch.bool)
            filler[: 2 * N] = False
            filler[scored] = False
            assert (x[filler] == 0).all()


def test_mqar_gap_distribution_follows_power_law():
    """With one pair the slot is a single draw from p(i) ∝ a·i^(a−1); many pairs still favour
    early slots (sampling without replacement)."""
    T, B = 64, 20000
    space = (T - 2) // 2
    batch = tasks.mqar(B, 256, 1, T, seed=0)
    gaps = (batch.info["query_positions"][:, 0] - 2) // 2
    freq = np.bincount(gaps.numpy(), minlength=space) / B
    p = tasks.mqar_gap_distribution(space, 0.01)
    assert 0.5 * np.abs(freq - p).sum() < 0.03  # total variation distance
    # uniform would put 1/space on the first slot; the power law puts about 4x that
    assert freq[0] > 3.0 / space

    batch = tasks.mqar(4000, 256, 8, 128, seed=3)
    gaps = ((batch.info["query_positions"] - 16) // 2).flatten().numpy()
    space = (128 - 16) // 2
    counts = np.bincount(gaps, minlength=space)
    thirds = [
        counts[: space // 3].sum(),
        counts[space // 3 : 2 * space // 3].sum(),
        counts[2 * space // 3 :].sum(),
    ]
    assert thirds[0] > thirds[1] > thirds[2]
    # power_a = 1 gives a uniform distribution: no such skew
    flat = tasks.mqar(4000, 256, 8, 128, seed=3, power_a=1.0)
    fgaps = ((flat.info["query_positions"] - 16) // 2).flatten().numpy()
    assert abs(np.mean(fgaps) - (space - 1) / 2) < 1.0
    assert np.mean(gaps) < np.mean(fgaps) - 3


def test_mqar_deterministic_and_seed_dependent():
    a = tasks.mqar(8, 128, 4, 64, seed=7)
    b = tasks.mqar(8, 128, 4, 64, seed=7)
    c = tasks.mqar(8, 128, 4, 64, seed=8)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


def test_mqar_accuracy_helper():
    batch = tasks.mqar(16, 64, 4, 32, seed=0)
    V = 64
    perfect = F.one_hot(batch.targets.clamp(min=0), V).float()
    assert batch.accuracy(perfect) == 1.0
    wrong = F.one_hot((batch.targets.clamp(min=0) + 1) % V, V).float()
    assert batch.accuracy(wrong) == 0.0
    # half of the scored positions right -> 0.5
    preds = batch.targets.clamp(min=0).clone()
    pos = batch.positions
    half = pos[: len(pos) // 2]
    preds[half[:, 0], half[:, 1]] += 1
    assert batch.accuracy(preds) == pytest.approx(0.5)
    # the targets work with cross-entropy directly
    loss = F.cross_entropy(
        perfect.flatten(0, 1) * 50, batch.targets.flatten(), ignore_index=IGNORE_INDEX
    )
    assert loss.item() < 1e-6


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(length=63),  # odd
        dict(length=12, num_pairs=4),  # too short
        dict(vocab_size=8, num_pairs=4),  # too few keys
        dict(num_pairs=0),
        dict(power_a=0.0),
    ],
)
def test_mqar_bad_arguments(kwargs):
    args = dict(batch_size=2, vocab_size=64, num_pairs=4, length=64) | kwargs
    with pytest.raises(ValueError):
        tasks.mqar(**args)


# ---------------------------------------------------------------- S-NIAH-lite
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_sniah_needle_at_requested_depth(depth):
    T = 320
    batch = tasks.sniah_lite(4, T, depth, seed=2)
    assert batch.inputs.shape == (4, T)
    for b in range(4):
        text = bytes(batch.inputs[b].tolist()).decode()
        key, ans = batch.info["keys"][b], batch.info["answers"][b]
        needle = f" One of the special magic numbers for {key} is: {ans}. "
        at = text.find(needle)
        assert at == batch.info["needle_start"][b].item()
        question = f" What is the special magic number for {key}? Answer: "
        q_at = text.find(question)
        assert q_at > at
        # haystack tokens = everything except needle, question and answer
        n_hay = T + 1 - len(needle) - len(question) - len(ans)
        assert at == round(depth * n_hay)
        # the text before the question minus the needle is the haystack
        assert abs(at / n_hay - depth) <= 1 / n_hay
        assert len(ans) == 7 and ans.isdigit()


def test_sniah_answer_only_scoring_and_exact_match():
    T = 200
    batch = tasks.sniah_lite(6, T, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], seed=0)
    for b in range(6):
        scored = torch.nonzero(batch.score_mask[b]).flatten().tolist()
        assert scored == list(range(T - 7, T))
        ans = bytes(batch.targets[b, scored].tolist()).decode()
        assert ans == batch.info["answers"][b]
        # targets are next-token: the input at t+1 equals the target at t (inside the answer)
        assert batch.targets[b, T - 7 : T - 1].tolist() == batch.inputs[b, T - 6 :].tolist()
    preds = batch.targets.clamp(min=0).clone()
    assert batch.accuracy(preds) == 1.0
    preds[0, T - 1] += 1  # one wrong digit spoils row 0 only
    assert batch.accuracy(preds) == pytest.approx(5 / 6)


def test_sniah_corpus_haystack_and_determinism():
    corpus = "To be, or not to be, that is the question. " * 3
    a = tasks.sniah_lite(3, 256, 0.3, seed=5, haystack=corpus)
    b = tasks.sniah_lite(3, 256, 0.3, seed=5, haystack=corpus)
    assert torch.equal(a.inputs, b.inputs)
    text = bytes(a.inputs[0].tolist()).decode()
    assert "question" in text or "not to be" in text
    c = tasks.sniah_lite(3, 256, 0.3, seed=6, haystack=corpus)
    assert not torch.equal(a.inputs, c.inputs)


def test_sniah_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        tasks.sniah_lite(2, 256, 1.5)
    with pytest.raises(ValueError, match="too short"):
        tasks.sniah_lite(2, 40, 0.5)
    with pytest.raises(ValueError, match="depths"):
        tasks.sniah_lite(2, 256, [0.1, 0.2, 0.3])


def test_ruler_depths():
    assert len(tasks.RULER_DEPTHS) == 40
    assert tasks.RULER_DEPTHS[0] == 0.0 and tasks.RULER_DEPTHS[-1] == 1.0


# ---------------------------------------------------------------- selective copy
def test_selective_copy_layout():
    B, T, M, V = 32, 40, 6, 12
    batch = tasks.selective_copy(B, T, M, V, seed=4)
    for b in range(B):
        x = batch.inputs[b]
        data = x[: T - M][x[: T - M] != 0]
        assert len(data) == M and ((data >= 2) & (data < V)).all()
        assert (x[T - M :] == 1).all()
        assert batch.targets[b, T - M :].tolist() == data.tolist()
        assert (batch.targets[b, : T - M] == IGNORE_INDEX).all()
    assert batch.accuracy(batch.targets.clamp(min=0)) == 1.0
    with pytest.raises(ValueError):
        tasks.selective_copy(2, 10, 6, 12)
    with pytest.raises(ValueError):
        tasks.selective_copy(2, 40, 6, 2)


# ---------------------------------------------------------------- surprise streams
def test_surprise_stream_ground_truth():
    s = tasks.surprise_stream(
        400, 8, n_keys=6, novelty_rate=0.03, regime_changes=2, batch_size=3, seed=1
    )
    assert s.inputs.shape == s.targets.shape == (3, 400, 8)
    assert s.regime_positions.tolist() == [133, 267]
    assert len(s.novel_positions) > 3
    torch.testing.assert_close(s.inputs.norm(dim=-1), torch.ones(3, 400))
    for b in range(3):
        for t in range(400):
            k = s.key_ids[b, t].item()
            if t in s.novel_positions.tolist():
                assert k == -1
                # a novel key is none of the recurring ones
                assert (s.key_bank[b] @ s.inputs[b, t]).abs().max() < 0.999
            else:
                assert k >= 0
                torch.testing.assert_close(s.inputs[b, t], s.key_bank[b, k])
                torch.testing.assert_close(s.targets[b, t], s.value_banks[b, s.regime[t], k])
    # the mapping really changes at a regime change
    assert (s.value_banks[:, 0] - s.value_banks[:, 1]).norm(dim=-1).min() > 0.1
    assert s.regime[132] == 0 and s.regime[133] == 1 and s.regime[-1] == 2
    # explicit positions and determinism
    s2 = tasks.surprise_stream(
        400, 8, n_keys=6, novelty_rate=0.03, regime_changes=2, batch_size=3, seed=1
    )
    assert torch.equal(s.inputs, s2.inputs) and torch.equal(s.novel_positions, s2.novel_positions)
    s3 = tasks.surprise_stream(100, 4, regime_changes=[10, 50], novelty_rate=0.0)
    assert s3.regime_positions.tolist() == [10, 50] and len(s3.novel_positions) == 0


def test_surprise_stream_helpers_can_fail():
    s = tasks.surprise_stream(300, 8, n_keys=4, novelty_rate=0.05, regime_changes=1, seed=0)
    assert s.accuracy(s.targets) == 1.0
    assert s.accuracy(-s.targets) < 0.5
    # an oracle surprise trace (1 at events) finds all events; a flat random one does not
    oracle = torch.zeros(300)
    oracle[s.event_positions] = 1.0
    assert tasks.event_detection(oracle, s) == {"precision": 1.0, "recall": 1.0}
    rand = torch.rand(300, generator=torch.Generator().manual_seed(0))
    assert tasks.event_detection(rand, s)["recall"] < 0.5


def test_surprise_stream_bad_arguments():
    with pytest.raises(ValueError):
        tasks.surprise_stream(100, 4, novelty_rate=1.5)
    with pytest.raises(ValueError):
        tasks.surprise_stream(100, 4, regime_changes=[0])
    with pytest.raises(ValueError):
        tasks.surprise_stream(100, 4, regime_changes=[50, 50])
    with pytest.raises(ValueError):
        tasks.surprise_stream(0, 4)


def test_linear_delta_rule_surprise_spikes_at_events():
    """End-to-end sanity of the ground truth: an online linear memory's surprise
    ½‖W k − v‖² is far higher at events than at recurring steps."""
    s = tasks.surprise_stream(600, 16, n_keys=8, novelty_rate=0.02, regime_changes=2, seed=3)
    k, v = s.inputs[0], s.targets[0]
    W = torch.zeros(16, 16)
    surprise = torch.zeros(600)
    for t in range(600):
        err = W @ k[t] - v[t]
        surprise[t] = 0.5 * err.pow(2).sum()
        W = W - 0.5 * torch.outer(err, k[t])
    steady = s.score_mask[0].clone()
    steady[:100] = False
    for c in s.regime_positions.tolist():
        steady[c : c + 100] = False
    base = surprise[steady].mean()
    assert surprise[s.novel_positions].mean() > 5 * base
    assert surprise[s.regime_positions].mean() > 5 * base
    after_change = s.first_seen[0] & (s.regime > 0)
    assert surprise[after_change].mean() > 5 * base
    # the trace finds the scheduled events far better than chance
    rand = torch.rand(600, generator=torch.Generator().manual_seed(1))
    hit = tasks.event_detection(surprise, s, tolerance=2)["recall"]
    assert hit > 0.5 and hit > tasks.event_detection(rand, s, tolerance=2)["recall"] + 0.2


def test_sniah_min_length_fits_every_row():
    """The length check covers the longest key of all: a length one shorter fails for some row,
    the minimum itself for none (many seeds)."""
    need = tasks.sniah_lite_min_length()
    for seed in range(200):
        tasks.sniah_lite(8, need, 0.5, seed=seed)
    with pytest.raises(ValueError, match="too short"):
        for seed in range(2000):
            tasks.sniah_lite(8, need - 1, 0.5, seed=seed)


def test_sniah_training_stream_checks_every_row_before_training():
    """122 tokens fit the first row of seed 0 but not every row: refused when the stream is
    built (before training starts), not at some later step."""
    from titans_mini.task_stream import TaskData

    need = tasks.sniah_lite_min_length()
    assert need > 122
    with pytest.raises(ValueError, match=rf"seq_len 122 is too short .* use --seq-len {need}"):
        TaskData("sniah_lite", 256, 122, 8)
    stream = TaskData("sniah_lite", 256, need, 8)
    for step in range(50):
        stream.batch(step)


# ---------------------------------------------------------------- distance-controlled recall (lesson 10)
@pytest.mark.parametrize("distance", [1, 2, 7, 30])
def test_mqar_at_distance_every_query_exactly_distance_after_its_value(distance):
    V, N, T, B = 64, 4, 40, 50
    batch = tasks.mqar_at_distance(B, V, N, T, distance=distance, seed=3)
    kpos, qpos = batch.info["key_positions"], batch.info["query_positions"]
    assert (qpos - (kpos + 1) == distance).all() and (batch.info["distance"] == distance).all()
    for b in range(B):
        x, y = batch.inputs[b], batch.targets[b]
        used = torch.cat([kpos[b], kpos[b] + 1, qpos[b]])
        assert len(set(used.tolist())) == 3 * N, "facts and queries never overlap"
        keys, vals = x[kpos[b]], x[kpos[b] + 1]
        assert ((keys >= 1) & (keys < V // 2)).all() and ((vals >= V // 2) & (vals < V)).all()
        assert len(set(keys.tolist())) == N and len(set(vals.tolist())) == N
        assert torch.equal(x[qpos[b]], keys) and torch.equal(y[qpos[b]], vals)
        assert torch.nonzero(batch.score_mask[b]).flatten().tolist() == sorted(qpos[b].tolist())
        filler = torch.ones(T, dtype=torch.bool)
        filler[used] = False
        assert (x[filler] == 0).all()


def test_mqar_at_distance_per_row_distances_random_phase_and_errors():
    batch = tasks.mqar_at_distance(4, 64, 2, 48, distance=[3, 8, 20, 40], seed=0)
    assert batch.info["distance"].tolist() == [3, 8, 20, 40]
    gaps = batch.info["query_positions"] - batch.info["key_positions"] - 1
    assert gaps.tolist() == [[3, 3], [8, 8], [20, 20], [40, 40]]
    again = tasks.mqar_at_distance(4, 64, 2, 48, distance=[3, 8, 20, 40], seed=0)
    assert torch.equal(batch.inputs, again.inputs)
    many = tasks.mqar_at_distance(400, 64, 1, 64, distance=8, seed=1)
    phases = set((many.info["key_positions"][:, 0] % 8).tolist())
    assert phases == set(range(8)), "a fact's position relative to a chunk boundary is random"
    with pytest.raises(ValueError, match="too short"):
        tasks.mqar_at_distance(2, 64, 4, 20, distance=19)
    with pytest.raises(ValueError, match="distances"):
        tasks.mqar_at_distance(2, 64, 4, 40, distance=[4, 5, 6])
    with pytest.raises(ValueError, match=">= 1"):
        tasks.mqar_at_distance(2, 64, 4, 40, distance=0)


def test_sniah_distance_places_the_needle_and_is_reported_for_depth_too():
    tok = tasks.PhraseTokenizer()
    T, digits = 60, 4
    batch = tasks.sniah_lite(3, T, tokenizer=tok, num_digits=digits, distance=[12, 20, 40], seed=1)
    assert batch.info["distance"].tolist() == [12, 20, 40]
    for b in range(3):
        answer = tok.encode(batch.info["answers"][b])
        first = T - digits  # the input position that predicts the answer's first digit
        assert batch.targets[b, first].item() == answer[0]
        x = batch.inputs[b].tolist()
        at = first - batch.info["distance"][b].item()  # the needle's copy of that digit
        assert x[at : at + digits] == answer
    by_depth = tasks.sniah_lite(2, 300, 0.5, seed=0)  # bytes: the same measure from a depth
    for b in range(2):
        text = bytes(by_depth.inputs[b].tolist()).decode()
        ans = by_depth.info["answers"][b]
        at = text.find(f"is: {ans}.") + 4
        assert by_depth.info["distance"][b].item() == 300 - 7 - at
    with pytest.raises(ValueError, match="possible distances"):
        tasks.sniah_lite(1, T, tokenizer=tok, num_digits=digits, distance=3)
    with pytest.raises(ValueError, match="distances for batch_size"):
        tasks.sniah_lite(2, T, tokenizer=tok, num_digits=digits, distance=[12])


def test_phrase_tokenizer_round_trip_and_lengths():
    tok = tasks.PhraseTokenizer()
    needle = tok.encode(" " + tasks.NEEDLE.format(key="brave-otter", value="4071") + " ")
    assert len(needle) == 10 and tok.decode(needle[-5:]) == "4 0 7 1 ."
    question = tok.encode(tasks.QUESTION.format(key="brave-otter"))
    assert tok.decode(question) == "What is the special magic number for brave - otter ? Answer:"
    assert len(question) == 5
    assert max(tok.encode(tasks.RULER_NOISE)) < tok.vocab_size
    assert tasks.sniah_lite_min_length(4, tok) == 18
    with pytest.raises(ValueError, match="does not know"):
        tok.encode("zyzzyva")
