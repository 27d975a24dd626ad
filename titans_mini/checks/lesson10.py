"""Checks for lesson 10 (recall beyond the attention window): the layout of one MQAR row with its
facts at a fixed distance, accuracy against distance from a task batch, and which queries the
memory can answer under the chunk rule.

The exercises do not call each other. ``accuracy_by_distance`` takes a
:class:`~titans_mini.tasks.TaskBatch`; the cases build small batches by hand.
"""

from __future__ import annotations

import torch

from titans_mini.checks.framework import Case, Check, Mistake
from titans_mini.tasks import IGNORE_INDEX, TaskBatch, token_accuracy

__all__ = ["mqar_row", "accuracy_by_distance", "memory_sees_fact"]


# --------------------------------------------------------------------------- exercise 1


def _mqar_row(keys, values, key_positions, distance, length):
    # fact j: key at p_j, value at p_j + 1, query (the key again) at p_j + 1 + distance
    inputs = torch.zeros(length, dtype=torch.long)
    targets = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
    queries = key_positions + 1 + distance
    inputs[key_positions] = keys
    inputs[key_positions + 1] = values
    inputs[queries] = keys
    targets[queries] = values
    return inputs, targets


def _row_cases(gen):
    def case(n, distance, length):
        perm = torch.randperm(length - distance - 1, generator=gen)
        starts = []
        used = set()
        for p in perm.tolist():  # facts that do not overlap
            spots = {p, p + 1, p + 1 + distance}
            if not spots & used:
                starts.append(p)
                used |= spots
            if len(starts) == n:
                break
        n = len(starts)
        keys = torch.randperm(15, generator=gen)[:n] + 1
        values = torch.randperm(16, generator=gen)[:n] + 16
        return (keys, values, torch.tensor(starts), distance, length)

    return [
        Case("3 facts at distance 5, length 24", case(3, 5, 24)),
        Case("1 fact at distance 1 (the query right after its value)", case(1, 1, 6)),
        Case("4 facts at distance 12, length 32", case(4, 12, 32)),
        Case("2 facts at distance 20, length 24", case(2, 20, 24)),
    ]


def _row_distance_from_key(keys, values, key_positions, distance, length):
    inputs = torch.zeros(length, dtype=torch.long)
    targets = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
    queries = key_positions + distance  # counted from the key
    inputs[key_positions] = keys
    inputs[key_positions + 1] = values
    inputs[queries] = keys
    targets[queries] = values
    return inputs, targets


def _row_target_at_value(keys, values, key_positions, distance, length):
    inputs, _ = _mqar_row(keys, values, key_positions, distance, length)
    targets = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
    targets[key_positions + 1] = values
    return inputs, targets


def _row_query_is_value(keys, values, key_positions, distance, length):
    inputs, targets = _mqar_row(keys, values, key_positions, distance, length)
    inputs[key_positions + 1 + distance] = values
    return inputs, targets


def _row_zero_targets(keys, values, key_positions, distance, length):
    inputs, targets = _mqar_row(keys, values, key_positions, distance, length)
    return inputs, torch.where(targets == IGNORE_INDEX, torch.zeros_like(targets), targets)


mqar_row = Check(
    "mqar_row",
    reference=_mqar_row,
    make_cases=_row_cases,
    idea="each fact puts its key and then its value in the sequence; the key comes back exactly "
         "`distance` tokens after the value, and only there is the model scored, against the value",
    formula="inputs = zeros(length); targets = full(length, IGNORE_INDEX); q = key_positions + 1 + "
            "distance; inputs[key_positions] = keys; inputs[key_positions + 1] = values; "
            "inputs[q] = keys; targets[q] = values",
    mistakes=[
        Mistake("your query sits `distance` tokens after the KEY; the distance is counted from "
                "the value: query position = key position + 1 + distance",
                _row_distance_from_key),
        Mistake("you scored the value's own position: the target belongs at the query (the key's "
                "second appearance), where the model must produce the value",
                _row_target_at_value),
        Mistake("your query shows the value: the query repeats the KEY, and the value is what the "
                "model must recall there",
                _row_query_is_value),
        Mistake("your unscored positions hold 0: they must hold IGNORE_INDEX (-100), which the loss "
                "and the accuracy skip",
                _row_zero_targets),
    ],
)


# --------------------------------------------------------------------------- exercise 2


def _accuracy_by_distance(preds, batch, distances):
    # for each distance d: correct scored positions / scored positions, over the rows at distance d
    right = (preds == batch.targets) & batch.score_mask  # (B, T)
    out = []
    for d in distances:
        rows = batch.info["distance"] == d  # (B,)
        n = batch.score_mask[rows].sum()
        out.append(right[rows].sum() / n if n > 0 else torch.tensor(float("nan")))
    return torch.stack(out).float()


def _accuracy_cases(gen):
    def case(B, T, distances, row_distances, p_right=0.6, ragged=False):
        targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b in range(B):
            n = int(torch.randint(1, 5, (1,), generator=gen)) if ragged else 3
            where = torch.randperm(T, generator=gen)[:n]
            mask[b, where] = True
            targets[b, where] = torch.randint(16, 32, (n,), generator=gen)
        preds = torch.randint(0, 32, (B, T), generator=gen)
        keep = torch.rand(B, T, generator=gen) < p_right
        preds = torch.where(mask & keep, targets, preds)  # some scored positions right
        batch = TaskBatch(preds.clone(), targets, mask, "mqar",
                          {"distance": torch.tensor(row_distances)}, token_accuracy)
        return (preds, batch, distances)

    return [
        Case("4 rows, two distances", case(4, 12, [4, 16], [4, 16, 4, 16])),
        Case("rows with different numbers of queries",
             case(6, 16, [2, 8, 32], [2, 8, 32, 2, 8, 32], ragged=True)),
        Case("a distance with no row gives NaN", case(3, 10, [4, 8, 64], [4, 8, 8])),
        Case("one row per distance", case(3, 20, [1, 5, 9], [1, 5, 9], p_right=0.3)),
    ]


def _accuracy_all_positions(preds, batch, distances):
    right = preds == batch.targets
    out = []
    for d in distances:
        rows = batch.info["distance"] == d
        out.append(right[rows].float().mean() if rows.any() else torch.tensor(float("nan")))
    return torch.stack(out).float()


def _accuracy_mean_of_rows(preds, batch, distances):
    right = ((preds == batch.targets) & batch.score_mask).sum(1) / batch.score_mask.sum(1).clamp(min=1)
    out = []
    for d in distances:
        rows = batch.info["distance"] == d
        out.append(right[rows].mean() if rows.any() else torch.tensor(float("nan")))
    return torch.stack(out).float()


def _accuracy_whole_batch(preds, batch, distances):
    right = ((preds == batch.targets) & batch.score_mask).sum() / batch.score_mask.sum()
    return torch.stack([right if (batch.info["distance"] == d).any() else torch.tensor(float("nan"))
                        for d in distances]).float()


accuracy_by_distance = Check(
    "accuracy_by_distance",
    reference=_accuracy_by_distance,
    make_cases=_accuracy_cases,
    idea="for each distance, take the rows of the batch at that distance and count the scored "
         "positions whose prediction equals the target, over all scored positions of those rows; "
         "a distance that no row has gives NaN",
    formula="right = (preds == batch.targets) & batch.score_mask; for each d: rows = "
            "batch.info['distance'] == d; acc = right[rows].sum() / batch.score_mask[rows].sum() "
            "(NaN when that sum is 0); return torch.stack of the accuracies as float",
    mistakes=[
        Mistake("you counted every position, not only the scored ones: use batch.score_mask "
                "(the filler positions hold IGNORE_INDEX and are never right)",
                _accuracy_all_positions),
        Mistake("you averaged the rows' own accuracies: rows with more queries must weigh more; "
                "count right queries over all queries of the rows at that distance",
                _accuracy_mean_of_rows),
        Mistake("every distance got the accuracy of the whole batch: select the rows whose "
                "batch.info['distance'] equals d",
                _accuracy_whole_batch),
    ],
)


# --------------------------------------------------------------------------- exercise 3


def _memory_sees_fact(value_positions, query_positions, chunk_size, n_persistent):
    # the memory stream is P ‖ x: token t is at t + N_p; a fact is written at the end of its
    # chunk, and a query reads the state at the start of its own chunk
    fact_chunk = torch.div(value_positions + n_persistent, chunk_size, rounding_mode="floor")
    query_chunk = torch.div(query_positions + n_persistent, chunk_size, rounding_mode="floor")
    return fact_chunk < query_chunk


def _sees_cases(gen):
    def case(n, T, chunk_size, n_persistent):
        v = torch.randint(0, T - 1, (n,), generator=gen)
        q = v + torch.randint(1, 2 * chunk_size, (n,), generator=gen)
        return (v, q, chunk_size, n_persistent)

    return [
        Case("chunk 8, 4 persistent tokens", case(20, 60, 8, 4)),
        Case("chunk 4, no persistent tokens", case(20, 40, 4, 0)),
        Case("a query right after its value, across a boundary and not",
             (torch.tensor([3, 4, 7, 0]), torch.tensor([4, 5, 8, 7]), 8, 0)),
        Case("persistent tokens move the boundaries",
             (torch.tensor([2, 3, 10]), torch.tensor([5, 6, 13]), 8, 4)),
    ]


def _sees_no_prefix(v, q, c, n_p):
    return _memory_sees_fact(v, q, c, 0)


def _sees_same_chunk(v, q, c, n_p):
    return _memory_sees_fact(v, q, c, n_p) | (
        torch.div(v + n_p, c, rounding_mode="floor") == torch.div(q + n_p, c, rounding_mode="floor"))


def _sees_by_distance(v, q, c, n_p):
    return (q - v) >= c


memory_sees_fact = Check(
    "memory_sees_fact",
    reference=_memory_sees_fact,
    make_cases=_sees_cases,
    idea="a query reads the memory's state at the start of its own chunk, and a fact is in the "
         "memory only after the chunk holding it has been written: the query sees the fact when "
         "the fact's chunk comes strictly before the query's; count chunks on P ‖ x",
    formula="fact_chunk = (value_positions + n_persistent) // chunk_size; query_chunk = "
            "(query_positions + n_persistent) // chunk_size; return fact_chunk < query_chunk",
    mistakes=[
        Mistake("you forgot the persistent tokens: the memory reads P ‖ x, so token t sits at "
                "t + n_persistent in the memory's stream and the chunk boundaries move",
                _sees_no_prefix),
        Mistake("a query in the SAME chunk as its fact reads the chunk-start state, written before "
                "the fact: use fact_chunk < query_chunk, not <=",
                _sees_same_chunk),
        Mistake("you decided by distance (at least one chunk apart); what matters is whether a chunk "
                "boundary lies between the fact and the query",
                _sees_by_distance),
    ],
)
