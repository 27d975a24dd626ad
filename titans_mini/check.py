"""The exercise checks, as the notebooks use them::

    from titans_mini import check
    check.l2_normalize(my_l2_normalize)   # prints one line; true when the check passed
    check.hint("l2_normalize", 2)         # prints the formula (level 1: the idea)

The checks live in :mod:`titans_mini.checks`, one module per lesson; this module only gives them
the short name the notebooks import.
"""

from __future__ import annotations

from titans_mini.checks import (
    CHECKS,
    accuracy_by_distance,
    attention_with_persistent,
    attentional_bias_grad,
    bits_per_byte,
    causal_depthwise_conv,
    chunk_coefficients,
    deep_memory_forward,
    deep_memory_grads,
    delta_rule_write,
    gated_delta_step,
    hint,
    l2_normalize,
    layer_norm_backward,
    linear_attention_recurrent,
    linear_chunk_update,
    linear_memory_write,
    mac_attention_mask,
    mac_final_read,
    memorization_gain,
    memory_gate,
    memory_gates,
    memory_output,
    memory_sees_fact,
    mqar_row,
    parallel_scan,
    persistent_attention_mask,
    recall_accuracy,
    rnn_forward,
    rnn_step_jacobian,
    surprise_trace,
    titans_memory_step,
    token_surprise,
    top_k_sample,
)

__all__ = [
    "CHECKS",
    "accuracy_by_distance",
    "attention_with_persistent",
    "attentional_bias_grad",
    "bits_per_byte",
    "causal_depthwise_conv",
    "chunk_coefficients",
    "deep_memory_forward",
    "deep_memory_grads",
    "delta_rule_write",
    "gated_delta_step",
    "hint",
    "l2_normalize",
    "layer_norm_backward",
    "linear_attention_recurrent",
    "linear_chunk_update",
    "linear_memory_write",
    "mac_attention_mask",
    "mac_final_read",
    "memorization_gain",
    "memory_gate",
    "memory_gates",
    "memory_output",
    "memory_sees_fact",
    "mqar_row",
    "parallel_scan",
    "persistent_attention_mask",
    "recall_accuracy",
    "rnn_forward",
    "rnn_step_jacobian",
    "surprise_trace",
    "titans_memory_step",
    "token_surprise",
    "top_k_sample",
]
