"""Synthetic tasks that probe memory: MQAR, S-NIAH-lite, selective copying and surprise streams.

Lessons: 03 uses the surprise stream; 07 trains on MQAR; 09 compares the variants on MQAR; 10 (coming) uses MQAR and
S-NIAH-lite for recall beyond the attention window.

Every generator is a plain function of its parameters and a ``seed``; the same arguments give the
same tensors on any machine (the randomness comes from ``numpy.random.default_rng(seed)``).

Token tasks return a :class:`TaskBatch`::

    batch = mqar(batch_size=32, vocab_size=256, num_pairs=4, length=64, seed=0)
    logits, _ = model(batch.inputs)                       # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(),
                           ignore_index=IGNORE_INDEX)       # only scored positions count
    batch.accuracy(logits)                                 # float in [0, 1]

``inputs`` and ``targets`` are aligned: the model reads ``inputs[:, t]`` and is scored against
``targets[:, t]`` only where ``score_mask[:, t]`` is True (elsewhere ``targets`` holds
``IGNORE_INDEX = -100``, which ``F.cross_entropy`` skips).

The surprise stream for lessons 03-04 is a stream of (key, value) *vectors*; it returns a
:class:`SurpriseStream` whose ``novel_positions`` and ``regime_positions`` are the ground truth
that surprise plots are checked against.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "IGNORE_INDEX",
    "TaskBatch",
    "SurpriseStream",
    "mqar",
    "mqar_gap_distribution",
    "mqar_at_distance",
    "sniah_lite",
    "sniah_lite_min_length",
    "PhraseTokenizer",
    "selective_copy",
    "surprise_stream",
    "token_accuracy",
    "exact_match",
    "event_detection",
    "RULER_NOISE",
    "RULER_DEPTHS",
    "TASKS",
]

IGNORE_INDEX = -100
"""Target value at positions that are not scored (the default ``ignore_index`` of PyTorch)."""


# --------------------------------------------------------------------------------------------
# Accuracy helpers
# --------------------------------------------------------------------------------------------


def _predictions(logits_or_preds: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits -> (B, T) argmax; (B, T) integer predictions pass through."""
    if logits_or_preds.dim() == 3:
        return logits_or_preds.argmax(dim=-1)
    if logits_or_preds.dim() == 2 and not logits_or_preds.is_floating_point():
        return logits_or_preds
    raise ValueError(
        "expected logits of shape (B, T, V) or integer predictions of shape (B, T), "
        f"got {tuple(logits_or_preds.shape)} {logits_or_preds.dtype}"
    )


def token_accuracy(logits_or_preds: torch.Tensor, batch: TaskBatch) -> float:
    """Fraction of scored positions whose argmax equals the target (MQAR, selective copy)."""
    preds = _predictions(logits_or_preds).to(batch.targets.device)
    mask = batch.score_mask
    if preds.shape != batch.targets.shape:
        raise ValueError(
            f"predictions {tuple(preds.shape)} vs targets {tuple(batch.targets.shape)}"
        )
    correct = (preds == batch.targets) & mask
    return float(correct.sum()) / max(int(mask.sum()), 1)


def exact_match(logits_or_preds: torch.Tensor, batch: TaskBatch) -> float:
    """Fraction of sequences whose scored positions are *all* right (S-NIAH-lite).

    With teacher forcing, every answer token being the argmax is exactly the condition under
    which greedy decoding after the question reproduces the whole answer.
    """
    preds = _predictions(logits_or_preds).to(batch.targets.device)
    if preds.shape != batch.targets.shape:
        raise ValueError(
            f"predictions {tuple(preds.shape)} vs targets {tuple(batch.targets.shape)}"
        )
    wrong = (preds != batch.targets) & batch.score_mask
    return float((~wrong.any(dim=1)).float().mean())


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


@dataclass
class TaskBatch:
    """One batch of a token task.

    Attributes:
        inputs: ``(B, T)`` int64 token ids the model reads.
        targets: ``(B, T)`` int64; the wanted prediction at scored positions, ``IGNORE_INDEX``
            elsewhere.
        score_mask: ``(B, T)`` bool, True where the position is scored.
        task: the task's name (``"mqar"``, ``"sniah_lite"``, ``"selective_copy"``).
        info: task-specific extras (e.g. MQAR keys/values/query positions, the needle depth).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    score_mask: torch.Tensor
    task: str
    info: dict = field(default_factory=dict)
    metric: Callable[[torch.Tensor, TaskBatch], float] = field(default=token_accuracy, repr=False)

    @property
    def positions(self) -> torch.Tensor:
        """``(n, 2)`` (batch index, time index) of every scored position."""
        return self.score_mask.nonzero()

    def accuracy(self, logits_or_preds: torch.Tensor) -> float:
        """The task's own metric: token accuracy, or exact match for S-NIAH-lite."""
        return self.metric(logits_or_preds, self)

    def to(self, device: torch.device | str) -> TaskBatch:
        """A copy with the tensors on ``device``."""
        return TaskBatch(
            self.inputs.to(device),
            self.targets.to(device),
            self.score_mask.to(device),
            self.task,
            self.info,
            self.metric,
        )

    def __len__(self) -> int:
        return self.inputs.shape[0]


def _finish(inputs, targets, task, info, metric=token_accuracy) -> TaskBatch:
    inputs = torch.as_tensor(inputs, dtype=torch.long)
    targets = torch.as_tensor(targets, dtype=torch.long)
    return TaskBatch(inputs, targets, targets != IGNORE_INDEX, task, info, metric)


# --------------------------------------------------------------------------------------------
# MQAR (Zoology)
# --------------------------------------------------------------------------------------------


def mqar_gap_distribution(space: int, power_a: float = 0.01) -> np.ndarray:
    """Zoology's query-slot distribution p(i) ∝ a·i^(a−1) for slots i = 1..space (returned as
    an array indexed 0..space−1). With a = 0.01 the early slots (short gaps) dominate."""
    i = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * i ** (power_a - 1.0)
    return p / p.sum()


def mqar(
    batch_size: int,
    vocab_size: int = 256,
    num_pairs: int = 4,
    length: int = 64,
    *,
    seed: int = 0,
    power_a: float = 0.01,
    random_non_queries: bool = False,
) -> TaskBatch:
    """Multi-query associative recall, as Zoology's ``multiquery_ar`` (arXiv 2312.04927).

    Layout of one sequence of ``length`` tokens (``N = num_pairs``)::

        k1 v1 k2 v2 ... kN vN | 0 0 k3 0 0 0 k1 0 ...     (query region)
                                      ^ target v3   ^ target v1

    * keys are drawn from the first vocab half ``1 .. V//2 − 1`` (0 is the filler token), values
      from the second half ``V//2 .. V−1``; both distinct within a sequence, fresh per sequence;
    * each key is queried exactly once, by repeating it; the query slots are the even offsets
      ``2·g`` of the query region, with ``g`` drawn *without replacement* from
      ``p(g) ∝ a·(g+1)^(a−1)`` (``a = power_a`` = 0.01: early slots favoured);
    * only query positions are scored, against the key's value (the value is *not* in the input
      after the query; the model must produce it);
    * ``random_non_queries=True`` replaces the 0 filler by uniform random tokens, as Zoology's
      flag of that name (its config turns it on; the docstring example and our default keep 0).

    Weighted sampling without replacement uses the Gumbel-top-k trick, which has the same
    distribution as numpy's successive ``choice(..., replace=False, p=p)``.

    Args:
        batch_size: number of sequences B.
        vocab_size: V (even or odd; keys need ``N ≤ V//2 − 1``, values ``N ≤ V − V//2``).
        num_pairs: N key-value pairs per sequence.
        length: T, even, with ``4·N ≤ T``.
        seed: the generator seed.
        power_a: the power-law exponent a.
        random_non_queries: random instead of 0 filler.

    Returns:
        :class:`TaskBatch` with ``info`` = ``{"keys": (B, N), "values": (B, N),
        "query_positions": (B, N)}`` (query position j holds key j) and metric token accuracy.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    if length % 2 != 0:
        raise ValueError(f"length must be even (Zoology's layout), got {length}")
    if 4 * num_pairs > length:
        raise ValueError(
            f"length {length} is too short for {num_pairs} pairs: need 4·num_pairs <= length "
            "(the pairs plus one query slot per key)"
        )
    key_hi = vocab_size // 2
    if num_pairs > key_hi - 1 or num_pairs > vocab_size - key_hi:
        raise ValueError(
            f"vocab_size {vocab_size} cannot hold {num_pairs} distinct keys (1..{key_hi - 1}) "
            f"and values ({key_hi}..{vocab_size - 1})"
        )
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0, got {power_a}")

    rng = np.random.default_rng(seed)
    B, N, T = batch_size, num_pairs, length
    context = 2 * N

    # distinct keys / values per row: the first N of a random permutation of each half
    keys = np.argsort(rng.random((B, key_hi - 1)), axis=1)[:, :N] + 1
    values = np.argsort(rng.random((B, vocab_size - key_hi)), axis=1)[:, :N] + key_hi

    # query slots: weighted sampling without replacement (Gumbel top-k)
    space = (T - context) // 2
    logp = np.log(mqar_gap_distribution(space, power_a))
    gumbel = -np.log(-np.log(rng.random((B, space)) + 1e-300) + 1e-300)
    gaps = np.argsort(-(logp + gumbel), axis=1)[:, :N]  # (B, N) distinct slot indices
    query_pos = context + 2 * gaps

    inputs = np.zeros((B, T), dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    rows = np.arange(B)[:, None]
    inputs[rows, query_pos] = keys
    if random_non_queries:
        filler = np.zeros((B, T), dtype=bool)
        filler[:, context:] = True
        filler[rows, query_pos] = False
        inputs[filler] = rng.integers(0, vocab_size, size=int(filler.sum()))

    targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    targets[rows, query_pos] = values

    info = {
        "keys": torch.as_tensor(keys),
        "values": torch.as_tensor(values),
        "query_positions": torch.as_tensor(query_pos),
        "vocab_size": vocab_size,
        "num_pairs": N,
        "power_a": power_a,
    }
    return _finish(inputs, targets, "mqar", info)


def mqar_at_distance(
    batch_size: int,
    vocab_size: int = 64,
    num_pairs: int = 4,
    length: int = 64,
    *,
    distance: int | Sequence[int],
    seed: int = 0,
) -> TaskBatch:
    """MQAR with the distance between each fact and its query fixed (lesson 10).

    Every query sits exactly ``distance`` tokens after the value it asks for::

        0 k1 v1 0 k2 v2 0 0 ... k1 0 0 k2 ...      (distance 8: k1's query is 8 tokens after v1)
                                ^ target v1

    * keys from ``1 .. V//2 − 1``, values from ``V//2 .. V−1``, distinct within a sequence and
      fresh per sequence, 0 elsewhere (as :func:`mqar`); each key is queried once, by repeating it;
    * the N facts (key at p, value at p + 1, query at p + 1 + distance) are placed one after
      the other at random free positions, so pairs, queries and other facts may interleave and
      a fact's position relative to chunk or segment boundaries is random;
    * ``distance`` is one int for all rows or one per row (a training batch can mix distances);
    * only the queries are scored, against their value (metric: token accuracy).

    Unlike :func:`mqar`, whose query slots follow a power law, here the distance is the
    experiment's variable: accuracy against distance shows how far back a model can recall.

    Returns:
        :class:`TaskBatch` with ``info`` = ``{"keys": (B, N), "values": (B, N),
        "key_positions": (B, N), "query_positions": (B, N), "distance": (B,)}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    key_hi = vocab_size // 2
    if num_pairs > key_hi - 1 or num_pairs > vocab_size - key_hi:
        raise ValueError(
            f"vocab_size {vocab_size} cannot hold {num_pairs} distinct keys (1..{key_hi - 1}) "
            f"and values ({key_hi}..{vocab_size - 1})"
        )
    if np.ndim(distance) == 0:
        dists = np.full(batch_size, int(distance), dtype=np.int64)
    else:
        dists = np.asarray(distance, dtype=np.int64)
        if dists.shape != (batch_size,):
            raise ValueError(f"got {dists.size} distances for batch_size {batch_size}")
    for d in dists:
        if d < 1:
            raise ValueError(f"distance must be >= 1, got {d}")
        if 3 * num_pairs > length or d + 2 > length:
            raise ValueError(
                f"length {length} is too short for {num_pairs} facts at distance {d}: need "
                "3·num_pairs <= length and distance + 2 <= length"
            )

    rng = np.random.default_rng(seed)
    B, N, T = batch_size, num_pairs, length
    keys = np.argsort(rng.random((B, key_hi - 1)), axis=1)[:, :N] + 1
    values = np.argsort(rng.random((B, vocab_size - key_hi)), axis=1)[:, :N] + key_hi
    key_pos = np.zeros((B, N), dtype=np.int64)
    for b in range(B):
        d = int(dists[b])
        starts = np.arange(T - d - 1)  # a fact starting at p uses p, p + 1 and p + 1 + d
        for _attempt in range(100):  # random packing can get stuck: start the row again
            used = np.zeros(T, dtype=bool)
            for j in range(N):
                free = starts[~used[starts] & ~used[starts + 1] & ~used[starts + 1 + d]]
                if len(free) == 0:
                    break
                p = int(rng.choice(free))
                used[[p, p + 1, p + 1 + d]] = True
                key_pos[b, j] = p
            else:
                break
        else:
            raise ValueError(
                f"could not place {N} facts at distance {d} in length {T}: make length longer"
            )
    query_pos = key_pos + 1 + dists[:, None]

    rows = np.arange(B)[:, None]
    inputs = np.zeros((B, T), dtype=np.int64)
    inputs[rows, key_pos] = keys
    inputs[rows, key_pos + 1] = values
    inputs[rows, query_pos] = keys
    targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    targets[rows, query_pos] = values
    info = {
        "keys": torch.as_tensor(keys),
        "values": torch.as_tensor(values),
        "key_positions": torch.as_tensor(key_pos),
        "query_positions": torch.as_tensor(query_pos),
        "distance": torch.as_tensor(dists),
        "vocab_size": vocab_size,
        "num_pairs": N,
    }
    return _finish(inputs, targets, "mqar", info)


# --------------------------------------------------------------------------------------------
# S-NIAH-lite (RULER single needle, trained)
# --------------------------------------------------------------------------------------------

RULER_NOISE = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
"""RULER's 'noise' haystack sentence block (``niah.py``, ``type_haystack='repeat'``)."""

RULER_DEPTHS = [float(d) / 100 for d in np.round(np.linspace(0, 100, num=40)).astype(int)]
"""RULER's 40 needle depths, as fractions in [0, 1]."""

NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = " What is the special magic number for {key}? Answer: "

# Small word lists for adjective-noun keys (RULER uses wonderwords' lists; these are ours).
_ADJECTIVES = (
    "able angry brave bright calm clever cold curious damp dark eager early empty fancy fierce "
    "gentle giant glad golden grumpy happy hollow honest humble hungry icy jolly kind lazy little "
    "lively lonely loud lucky mellow merry mighty misty modern narrow noble odd orange patient "
    "plain polite proud quick quiet rapid rare rich rough round royal rusty sandy shiny silent "
    "silver sleepy slow small smooth soft solid spicy steady sticky strange sunny sweet swift "
    "tall tame tender tidy tiny vast velvet warm wary wild windy wise witty young zesty"
).split()
_NOUNS = (
    "acorn anchor apple arrow badger banjo barn basket beacon bell bison blanket boat bridge "
    "bucket button cabin camel candle canyon castle cellar cherry cloud comet copper crane "
    "crown desk dragon drum eagle engine falcon feather fern fiddle flute forest fountain fox "
    "garden giraffe glacier goose harbor hammer hat helmet heron island jacket kettle kite "
    "ladder lantern lemon lily lizard magnet maple meadow mirror mitten moon needle oak otter "
    "owl paddle parrot pebble pepper piano pillow pine planet pocket pony quilt rabbit radio "
    "river robin rocket saddle sail shovel sparrow spoon squirrel stone teapot thimble tiger "
    "tower trumpet tulip turtle valley violin wagon walnut whistle willow window wolf zebra"
).split()


class _ByteCodec:
    """Minimal UTF-8 byte tokenizer (vocab 256) used when no tokenizer is given."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _haystack_tokens(
    n: int, haystack: str | Sequence[int], tokenizer, rng: np.random.Generator
) -> list[int]:
    """``n`` filler tokens: the haystack text (or token ids) repeated, from a random offset."""
    if n <= 0:
        return []
    ids = list(haystack) if not isinstance(haystack, str) else tokenizer.encode(haystack)
    if not ids:
        raise ValueError("the haystack is empty")
    start = int(rng.integers(0, len(ids)))
    reps = (start + n) // len(ids) + 1
    return (ids * reps)[start : start + n]


def sniah_lite(
    batch_size: int,
    length: int = 256,
    depth: float | Sequence[float] = 0.5,
    *,
    seed: int = 0,
    haystack: str | Sequence[int] | None = None,
    tokenizer=None,
    num_digits: int = 7,
    distance: int | Sequence[int] | None = None,
) -> TaskBatch:
    """S-NIAH-lite: RULER's single needle in a haystack, small enough to *train* on.

    One sequence (``length`` input tokens, then shifted by one for next-token targets)::

        [haystack ...] One of the special magic numbers for {adjective-noun} is: {7 digits}.
        [haystack ...] What is the special magic number for {adjective-noun}? Answer: {7 digits}

    * the needle keeps RULER's format (``scripts/data/synthetic/niah.py``); the question is
      shortened so that small windows are mostly haystack (label it "RULER-format, trained");
    * the needle starts at haystack token ``round(depth · H)`` where ``H`` is the number of
      haystack tokens; ``depth = 0`` puts it first, ``depth = 1`` right before the question.
      Give one depth for all rows or one per row (``RULER_DEPTHS`` are RULER's 40 depths);
    * ``distance`` (lesson 10) places the needle by distance instead of depth: the answer's
      first token is then predicted exactly ``distance`` tokens after the needle's copy of it
      (``info["distance"]``, measured the same way whichever argument placed the needle). It
      needs a tokenizer that encodes the number the same inside the needle (bytes and
      :class:`PhraseTokenizer` do); an impossible distance raises, naming the possible ones;
    * ``haystack``: ``None`` for RULER's noise sentences, or any text / token ids (e.g. a
      validation split of the corpus), read from a random offset and repeated as needed;
    * loss and accuracy only on the answer digits: ``targets`` holds the answer tokens at the
      positions that predict them (the last ``len(answer)`` positions) and ``IGNORE_INDEX``
      elsewhere; the metric is exact match of the whole number.

    Args:
        batch_size: number of sequences B.
        length: T input tokens per sequence (the needle, question and answer must fit).
        depth: needle depth in [0, 1], a float or a sequence of B floats.
        seed: the generator seed.
        haystack: filler text or token ids (default RULER's noise).
        tokenizer: anything with ``encode(str) -> list[int]`` (and ``decode``); default the
            UTF-8 byte tokenizer (vocab 256).
        num_digits: digits of the magic number (RULER: 7).
        distance: if given (one int, or one per row), overrides ``depth``: tokens from the
            number in the needle to the position that predicts the answer's first token.

    Returns:
        :class:`TaskBatch` with metric :func:`exact_match` and ``info`` = ``{"depth": (B,),
        "needle_start": (B,) input index of the needle's first token, "needle_len": (B,),
        "distance": (B,) as above (−1 where the number is not found in the needle's tokens),
        "keys": [str], "answers": [str]}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    depths = [float(depth)] * batch_size if np.isscalar(depth) else [float(d) for d in depth]
    if len(depths) != batch_size:
        raise ValueError(f"got {len(depths)} depths for batch_size {batch_size}")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depth must lie in [0, 1], got {d}")
    if num_digits < 1:
        raise ValueError(f"num_digits must be >= 1, got {num_digits}")
    if distance is not None:
        distances = [int(distance)] * batch_size if np.ndim(distance) == 0 else [int(d) for d in distance]
        if len(distances) != batch_size:
            raise ValueError(f"got {len(distances)} distances for batch_size {batch_size}")
    tok = tokenizer if tokenizer is not None else _ByteCodec()
    hay = RULER_NOISE if haystack is None else haystack
    rng = np.random.default_rng(seed)

    inputs = np.zeros((batch_size, length), dtype=np.int64)
    targets = np.full((batch_size, length), IGNORE_INDEX, dtype=np.int64)
    needle_start, needle_len, row_distance, keys, answers = [], [], [], [], []
    for b in range(batch_size):
        key = f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]}-{_NOUNS[rng.integers(len(_NOUNS))]}"
        number = str(int(rng.integers(10 ** (num_digits - 1), 10**num_digits)))
        needle = tok.encode(" " + NEEDLE.format(key=key, value=number) + " ")
        question = tok.encode(QUESTION.format(key=key))
        answer = tok.encode(number)
        # full sequence has length + 1 tokens; inputs = full[:-1], targets = full[1:]
        n_hay = length + 1 - len(needle) - len(question) - len(answer)
        if n_hay < 0:
            raise ValueError(
                f"length {length} is too short: needle, question and answer need "
                f"{len(needle) + len(question) + len(answer) - 1} tokens"
            )
        filler = _haystack_tokens(n_hay, hay, tok, rng)
        # where the number starts inside the needle (its last occurrence), for the distance
        offset = next((i for i in range(len(needle) - len(answer), -1, -1)
                       if needle[i : i + len(answer)] == answer), None)
        scored = length - len(answer)  # the input position that predicts the answer's first token
        if distance is None:
            at = int(round(depths[b] * n_hay))
        else:
            if offset is None:
                raise ValueError("distance needs a tokenizer that encodes the number the same "
                                 "inside the needle (bytes and PhraseTokenizer do)")
            at = scored - offset - distances[b]
            if not 0 <= at <= n_hay:
                raise ValueError(
                    f"distance {distances[b]} does not fit length {length} in row {b}: possible "
                    f"distances are {scored - offset - n_hay}..{scored - offset}"
                )
        full = filler[:at] + needle + filler[at:] + question + answer
        inputs[b] = full[:-1]
        targets[b, length - len(answer) :] = answer
        needle_start.append(at)
        row_distance.append(-1 if offset is None else scored - offset - at)
        needle_len.append(len(needle))
        keys.append(key)
        answers.append(number)

    info = {
        "depth": torch.tensor(depths),
        "needle_start": torch.tensor(needle_start),
        "needle_len": torch.tensor(needle_len),
        "distance": torch.tensor(row_distance),
        "keys": keys,
        "answers": answers,
    }
    return _finish(inputs, targets, "sniah_lite", info, metric=exact_match)


class PhraseTokenizer:
    """A compact tokenizer for S-NIAH-lite (lesson 10): the needle in ~10 tokens instead of ~60 bytes.

    The fixed phrases of the needle and the question ("One of the special magic numbers for",
    "What is the special magic number for", "is:", "? Answer:") are one token each; every other
    word (the haystack's words, the key's adjective and noun) is one token, and so is each digit
    and punctuation mark::

        One of the special magic numbers for | brave | - | otter | is: | 4 | 0 | 7 | 1 | .

    With bytes, the question alone is ~50 tokens, so only an attention window longer than that
    could ever hold both the needle and its question; with this tokenizer the question is 5 tokens
    and a window of 16 can. The vocabulary is fixed: the haystack's words (RULER's noise by
    default; pass other ``text`` to add its words), the key words, digits and punctuation.
    ``decode`` joins the pieces with spaces (the original spacing is not kept).
    """

    PHRASES = ("One of the special magic numbers for", "What is the special magic number for",
               "is:", "? Answer:")

    def __init__(self, text: str = RULER_NOISE):
        words = re.findall(r"[A-Za-z]+|[^\sA-Za-z\d]", text)
        pieces = ["<pad>", *self.PHRASES, *words, *"0123456789", "-", "?", ":", ".",
                  *_ADJECTIVES, *_NOUNS]
        self.pieces = list(dict.fromkeys(pieces))  # unique, in order
        self.ids = {piece: i for i, piece in enumerate(self.pieces)}
        self.vocab_size = len(self.pieces)
        phrases = "|".join(re.escape(p) for p in sorted(self.PHRASES, key=len, reverse=True))
        self._pattern = re.compile(rf"{phrases}|\d|[A-Za-z]+|[^\sA-Za-z\d]")

    def encode(self, text: str) -> list[int]:
        pieces = self._pattern.findall(text)
        unknown = sorted({p for p in pieces if p not in self.ids})
        if unknown:
            raise ValueError(f"PhraseTokenizer does not know {unknown[:5]}: build it with "
                             "PhraseTokenizer(text) from a text that contains them")
        return [self.ids[p] for p in pieces]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.pieces[int(i)] for i in ids)

    def __repr__(self) -> str:
        return f"PhraseTokenizer(vocab_size={self.vocab_size})"


def sniah_lite_min_length(num_digits: int = 7, tokenizer=None) -> int:
    """The shortest ``length`` that fits :func:`sniah_lite`'s needle, question and answer in
    *every* row, whichever key and number a row draws (the longest adjective-noun key).

    Exact for the default byte tokenizer; with another ``tokenizer`` the number is measured as
    ``num_digits`` nines. Check it once before training: ``sniah_lite`` checks only the rows it
    draws."""
    tok = tokenizer if tokenizer is not None else _ByteCodec()
    number = "9" * num_digits
    need = 0
    for adjective in _ADJECTIVES:
        for noun in _NOUNS:
            key = f"{adjective}-{noun}"
            needle = tok.encode(" " + NEEDLE.format(key=key, value=number) + " ")
            question = tok.encode(QUESTION.format(key=key))
            need = max(need, len(needle) + len(question) + len(tok.encode(number)) - 1)
    return need


# --------------------------------------------------------------------------------------------
# Selective copying (Mamba, Gu & Dao 2023)
# --------------------------------------------------------------------------------------------


def selective_copy(
    batch_size: int,
    length: int = 64,
    num_tokens: int = 8,
    vocab_size: int = 16,
    *,
    seed: int = 0,
) -> TaskBatch:
    """Selective copying: remember the data tokens scattered among blanks, then replay them.

    Layout (``M = num_tokens``)::

        0 5 0 0 9 0 3 0 ... 0 | 1 1 1        token 0 = blank, 1 = "copy" marker, 2.. = data
                                ^ ^ ^ targets 5 9 3 (the data tokens in order)

    The first ``length − M`` positions hold M data tokens (uniform from ``2 .. V−1``) at random
    distinct positions; the last M positions are markers, and marker j is scored against the
    j-th data token. Unlike plain copying, the spacing varies, so a fixed shift cannot solve it.

    Returns:
        :class:`TaskBatch` with ``info = {"data_positions": (B, M), "data": (B, M)}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be >= 3 (blank, marker, data), got {vocab_size}")
    if 2 * num_tokens > length:
        raise ValueError(f"length {length} must be at least 2·num_tokens = {2 * num_tokens}")
    rng = np.random.default_rng(seed)
    B, M, T = batch_size, num_tokens, length
    region = T - M
    positions = np.sort(np.argsort(rng.random((B, region)), axis=1)[:, :M], axis=1)
    data = rng.integers(2, vocab_size, size=(B, M))
    inputs = np.zeros((B, T), dtype=np.int64)
    rows = np.arange(B)[:, None]
    inputs[rows, positions] = data
    inputs[:, region:] = 1
    targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    targets[:, region:] = data
    info = {"data_positions": torch.as_tensor(positions), "data": torch.as_tensor(data)}
    return _finish(inputs, targets, "selective_copy", info)


# --------------------------------------------------------------------------------------------
# Surprise streams (lessons 03-04)
# --------------------------------------------------------------------------------------------


@dataclass
class SurpriseStream:
    """A stream of (key, value) vectors with known surprising events.

    Attributes:
        inputs: ``(B, T, dim)`` keys k_t (unit norm).
        targets: ``(B, T, dim)`` values v_t (unit norm).
        score_mask: ``(B, T)`` bool: positions whose value follows the current mapping and whose
            key was already seen under it (a memory *could* recall them).
        novel_positions: ``(n_novel,)`` sorted time steps of novel events (a never-seen key with
            a random value), shared by all rows.
        regime_positions: ``(n_regimes,)`` sorted time steps where the key→value mapping was
            replaced (the first step of each new regime), shared by all rows.
        first_seen: ``(B, T)`` bool: a recurring key shown for the first time in the current
            regime. Right after a regime change these steps carry the surprise (the memory
            still predicts the old value), so a surprise trace spikes at the change and at
            each key's first reappearance; ``score_mask`` is recurring & not ``first_seen``.
        key_ids: ``(B, T)`` int64 index of the recurring key used at t, −1 at novel events.
        regime: ``(T,)`` int64 regime number at each step (0, 1, ...).
        key_bank: ``(B, n_keys, dim)`` the recurring keys.
        value_banks: ``(B, n_regimes + 1, n_keys, dim)`` each regime's values for those keys.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    score_mask: torch.Tensor
    novel_positions: torch.Tensor
    regime_positions: torch.Tensor
    first_seen: torch.Tensor
    key_ids: torch.Tensor
    regime: torch.Tensor
    key_bank: torch.Tensor
    value_banks: torch.Tensor
    task: str = "surprise_stream"

    @property
    def keys(self) -> torch.Tensor:
        """Alias of ``inputs``."""
        return self.inputs

    @property
    def values(self) -> torch.Tensor:
        """Alias of ``targets``."""
        return self.targets

    @property
    def event_positions(self) -> torch.Tensor:
        """All surprising steps (novel events and regime changes), sorted."""
        return torch.unique(torch.cat([self.novel_positions, self.regime_positions]))

    def accuracy(self, predicted_values: torch.Tensor) -> float:
        """Fraction of scored steps where ``predicted_values`` ``(B, T, dim)`` is closest (cosine)
        to the right value among the current regime's values for all recurring keys."""
        pred = predicted_values.detach().to(torch.float32).cpu()
        if pred.shape != self.targets.shape:
            raise ValueError(f"predictions {tuple(pred.shape)} vs values {tuple(self.targets.shape)}: "
                             "predict one value vector per step of the stream")
        bank = self.value_banks[:, self.regime]  # (B, T, n_keys, dim)
        sims = torch.einsum("btd,btkd->btk", torch.nn.functional.normalize(pred, dim=-1), bank)
        right = sims.argmax(dim=-1) == self.key_ids
        return float((right & self.score_mask).sum()) / max(int(self.score_mask.sum()), 1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def surprise_stream(
    length: int = 512,
    dim: int = 16,
    *,
    n_keys: int = 8,
    novelty_rate: float = 0.02,
    regime_changes: int | Sequence[int] = 1,
    batch_size: int = 1,
    noise: float = 0.0,
    seed: int = 0,
) -> SurpriseStream:
    """A stream of (key, value) pairs from a fixed key→value mapping, with surprises.

    At each step t the stream shows a key k_t and its value v_t:

    * usually k_t is one of ``n_keys`` recurring random unit keys (uniformly chosen) and v_t is
      that key's value under the *current* mapping -- after a short while a memory predicts it;
    * at **novel events** (each step independently with probability ``novelty_rate``) k_t is a
      brand-new random key and v_t a random value: the memory cannot predict it;
    * at **regime changes** the mapping is replaced: the same keys now have new random values,
      so the first recalls after a change are surprising until the memory re-learns.

    Values are random unit vectors per key (with ``n_keys <= dim`` a linear memory can store a
    regime exactly). ``noise`` adds Gaussian noise of that standard deviation to the values.
    Event positions are shared across the batch; keys, values and noise differ per row.

    Args:
        length: T steps.
        dim: vector dimension.
        n_keys: number of recurring keys.
        novelty_rate: probability that a step is a novel event (0 disables them).
        regime_changes: the number of changes (placed evenly: at T·j/(n+1)) or explicit steps.
        batch_size: B independent streams with the same event schedule.
        noise: value noise standard deviation.
        seed: the generator seed.

    Returns:
        :class:`SurpriseStream` (``inputs``/``targets`` are ``(B, T, dim)`` float32).
    """
    if length < 1 or dim < 1 or n_keys < 1 or batch_size < 1:
        raise ValueError("length, dim, n_keys and batch_size must all be >= 1")
    if not 0.0 <= novelty_rate <= 1.0:
        raise ValueError(f"novelty_rate must lie in [0, 1], got {novelty_rate}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if isinstance(regime_changes, (int, np.integer)):
        if regime_changes < 0:
            raise ValueError(f"regime_changes must be >= 0, got {regime_changes}")
        n = int(regime_changes)
        changes = [int(round(length * (j + 1) / (n + 1))) for j in range(n)]
    else:
        changes = sorted(int(c) for c in regime_changes)
    if any(c <= 0 or c >= length for c in changes) or len(set(changes)) != len(changes):
        raise ValueError(
            f"regime change positions must be distinct and in 1..{length - 1}: {changes}"
        )

    rng = np.random.default_rng(seed)
    B, T = batch_size, length
    n_reg = len(changes) + 1
    key_bank = _unit(rng.standard_normal((B, n_keys, dim)))
    value_banks = _unit(rng.standard_normal((B, n_reg, n_keys, dim)))

    regime = np.zeros(T, dtype=np.int64)
    for c in changes:
        regime[c:] += 1
    novel = rng.random(T) < novelty_rate
    novel[changes] = False  # keep the two kinds of event apart
    key_ids = rng.integers(0, n_keys, size=(B, T))
    key_ids[:, novel] = -1

    rows = np.arange(B)[:, None]
    keys = key_bank[rows, np.maximum(key_ids, 0)]  # (B, T, dim)
    values = value_banks[rows, regime[None, :], np.maximum(key_ids, 0)]
    n_novel = int(novel.sum())
    if n_novel:
        keys[:, novel] = _unit(rng.standard_normal((B, n_novel, dim)))
        values[:, novel] = _unit(rng.standard_normal((B, n_novel, dim)))
    if noise > 0:
        values = values + noise * rng.standard_normal(values.shape)

    # scored: recurring key already shown earlier in the same regime
    score = np.zeros((B, T), dtype=bool)
    first = np.zeros((B, T), dtype=bool)
    for b in range(B):
        seen: set[tuple[int, int]] = set()
        for t in range(T):
            k = int(key_ids[b, t])
            if k < 0:
                continue
            tag = (int(regime[t]), k)
            score[b, t] = tag in seen
            first[b, t] = tag not in seen
            seen.add(tag)

    f32 = torch.float32
    return SurpriseStream(
        inputs=torch.as_tensor(keys, dtype=f32),
        targets=torch.as_tensor(values, dtype=f32),
        score_mask=torch.as_tensor(score),
        first_seen=torch.as_tensor(first),
        novel_positions=torch.as_tensor(np.flatnonzero(novel), dtype=torch.long),
        regime_positions=torch.as_tensor(changes, dtype=torch.long),
        key_ids=torch.as_tensor(key_ids),
        regime=torch.as_tensor(regime),
        key_bank=torch.as_tensor(key_bank, dtype=f32),
        value_banks=torch.as_tensor(value_banks, dtype=f32),
    )


def event_detection(
    surprise: torch.Tensor, stream: SurpriseStream, *, tolerance: int = 0
) -> dict[str, float]:
    """How well a surprise trace finds the ground-truth events.

    Takes the top-k steps of ``surprise`` (``(T,)``, or ``(B, T)`` averaged over rows), with k the
    number of true events, and counts a hit when a true event lies within ``tolerance`` steps.
    Returns ``{"precision": ..., "recall": ...}`` (equal when every pick is distinct).
    """
    s = surprise.detach().to(torch.float32).cpu()
    if s.dim() == 2:
        s = s.mean(dim=0)
    if s.dim() != 1 or s.shape[0] != stream.inputs.shape[1]:
        raise ValueError(f"surprise must be (T,) or (B, T) with T = {stream.inputs.shape[1]}")
    events = stream.event_positions
    k = int(events.numel())
    if k == 0:
        return {"precision": 1.0, "recall": 1.0}
    picks = torch.topk(s, k).indices
    dist = (picks[:, None] - events[None, :]).abs()
    near = dist <= tolerance
    return {
        "precision": float(near.any(dim=1).float().mean()),
        "recall": float(near.any(dim=0).float().mean()),
    }


TASKS = {
    "mqar": mqar,
    "sniah_lite": sniah_lite,
    "selective_copy": selective_copy,
}
"""Token tasks by name (the trainer's ``--data task:NAME``)."""
