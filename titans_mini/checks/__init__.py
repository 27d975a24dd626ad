"""The exercise checks, one module per lesson.

============================  =================================================================
module                        checks
============================  =================================================================
``framework``                 the machinery: :class:`Case`, :class:`Check`, :class:`Mistake`,
                              :class:`CheckResult`, ``compare``, ``run_check``
``lesson00``                  00 welcome: ``l2_normalize`` (the example in the welcome lesson)
``lesson01``                  01 the memory problem: ``rnn_forward``, ``rnn_step_jacobian``,
                              ``linear_attention_recurrent``
``lesson02``                  02 associative memory: ``delta_rule_write``, ``recall_accuracy``
``lesson03``                  03 surprise: ``token_surprise``, ``surprise_trace``
``lesson04``                  04 momentum and forgetting: ``titans_memory_step``,
                              ``gated_delta_step``
``lesson05``                  05 deep memory: ``deep_memory_forward``, ``layer_norm_backward``,
                              ``deep_memory_grads``
``lesson06``                  06 parallel training (both notebooks, 06a and 06b):
                              ``chunk_coefficients``, ``parallel_scan``, ``linear_chunk_update``
``lesson07``                  07 the memory layer: ``causal_depthwise_conv``, ``memory_gates``,
                              ``memory_output``
``lesson08``                  08 persistent memory: ``persistent_attention_mask``,
                              ``attention_with_persistent``
``lesson09``                  09 MAC, MAG and MAL: ``mac_attention_mask``, ``mac_final_read``,
                              ``memory_gate``
``lesson10``                  10 recall beyond the window: ``mqar_row``, ``accuracy_by_distance``,
                              ``memory_sees_fact``
``lesson11``                  11 train a small language model: ``bits_per_byte``,
                              ``memorization_gain``, ``top_k_sample``
``lesson12``                  12 ablations and beyond: ``attentional_bias_grad``,
                              ``linear_memory_write``
============================  =================================================================

Learners use them as ``from titans_mini import check; check.<name>(my_function)`` (the module
:mod:`titans_mini.check` re-exports every name below) and ask for the formula behind a failure with
``check.hint("<name>", 2)``.

How to add a check:

1. In the lesson's module, write the reference (a private function), ``make_cases(generator)``
   returning :class:`~titans_mini.checks.framework.Case` inputs (random ones and edge cases), and
   the plausible wrong answers, each a :class:`~titans_mini.checks.framework.Mistake` with the
   message that names it. If the exercise calls an earlier exercise of its notebook, map that
   function's notebook name to its reference in ``uses``.
2. Create it at module level, ``my_name = Check("my_name", reference=..., make_cases=...,
   idea="<hint level 1: what to compute, in words>", formula="<hint level 2: the code>",
   mistakes=[...])``, and add ``"my_name"`` to the module's ``__all__``.
3. Import the name below and in :mod:`titans_mini.check`. ``tests/test_checks.py`` then runs it on
   its reference, on a stub and on every mistake, and fails if you forget one of the imports.
"""

from __future__ import annotations

from titans_mini.checks import (
    lesson00,
    lesson01,
    lesson02,
    lesson03,
    lesson04,
    lesson05,
    lesson06,
    lesson07,
    lesson08,
    lesson09,
    lesson10,
    lesson11,
    lesson12,
)
from titans_mini.checks.framework import Check
from titans_mini.checks.lesson00 import l2_normalize
from titans_mini.checks.lesson01 import linear_attention_recurrent, rnn_forward, rnn_step_jacobian
from titans_mini.checks.lesson02 import delta_rule_write, recall_accuracy
from titans_mini.checks.lesson03 import surprise_trace, token_surprise
from titans_mini.checks.lesson04 import gated_delta_step, titans_memory_step
from titans_mini.checks.lesson05 import deep_memory_forward, deep_memory_grads, layer_norm_backward
from titans_mini.checks.lesson06 import chunk_coefficients, linear_chunk_update, parallel_scan
from titans_mini.checks.lesson07 import causal_depthwise_conv, memory_gates, memory_output
from titans_mini.checks.lesson08 import attention_with_persistent, persistent_attention_mask
from titans_mini.checks.lesson09 import mac_attention_mask, mac_final_read, memory_gate
from titans_mini.checks.lesson10 import accuracy_by_distance, memory_sees_fact, mqar_row
from titans_mini.checks.lesson11 import bits_per_byte, memorization_gain, top_k_sample
from titans_mini.checks.lesson12 import attentional_bias_grad, linear_memory_write

__all__ = [
    "CHECKS",
    "hint",
    "l2_normalize",
    "rnn_forward", "rnn_step_jacobian", "linear_attention_recurrent",
    "delta_rule_write", "recall_accuracy",
    "token_surprise", "surprise_trace",
    "titans_memory_step", "gated_delta_step",
    "deep_memory_forward", "layer_norm_backward", "deep_memory_grads",
    "chunk_coefficients", "parallel_scan", "linear_chunk_update",
    "causal_depthwise_conv", "memory_gates", "memory_output",
    "persistent_attention_mask", "attention_with_persistent",
    "mac_attention_mask", "mac_final_read", "memory_gate",
    "mqar_row", "accuracy_by_distance", "memory_sees_fact",
    "bits_per_byte", "memorization_gain", "top_k_sample",
    "attentional_bias_grad", "linear_memory_write",
]

LESSONS = (lesson00, lesson01, lesson02, lesson03, lesson04, lesson05, lesson06, lesson07, lesson08,
           lesson09, lesson10, lesson11, lesson12)

# every check by name, in lesson order
CHECKS: dict[str, Check] = {name: getattr(module, name) for module in LESSONS for name in module.__all__}


def hint(name: str, level: int = 1) -> None:
    """Print a check's hint: level 1 is the idea, level 2 the formula."""
    if name not in CHECKS:
        raise ValueError(f"there is no check named {name!r}; the checks are: {', '.join(CHECKS)}")
    label = "the idea" if level == 1 else "the formula"
    print(f"{name}, hint {level} ({label}): {CHECKS[name].hint_text(level)}")
