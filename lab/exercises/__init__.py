"""Exercises that check themselves: call a checker right after writing the code.

    from lab.exercises import check_causal_attention
    check_causal_attention(my_attention)   # prints ✔ ... or says what is wrong

Each topic has its module; a wrong answer raises ``ExerciseFailed`` (a ``LabError``,
shown in a notebook as one line), a right one prints a success line. The exercise
notebooks are in ``notebooks/exercises``; ``python -m lab student-version`` writes the
copies without solutions.
"""

from lab.exercises.attention import (
    check_causal_attention,
    check_decode_step,
    check_grouped_query_attention,
)
from lab.exercises.core import ExerciseFailed
from lab.exercises.finetune import check_adapter_gate, check_lora
from lab.exercises.investigations import (
    check_induction_scores,
    check_memory_prediction,
    check_mqar,
    train_mqar,
)
from lab.exercises.layers import check_rms_norm, check_swiglu
from lab.exercises.rope import check_rope
from lab.exercises.routing import check_router
from lab.exercises.sampling import check_top_p

__all__ = [
    "ExerciseFailed",
    "check_adapter_gate",
    "check_causal_attention",
    "check_decode_step",
    "check_grouped_query_attention",
    "check_induction_scores",
    "check_lora",
    "check_memory_prediction",
    "check_mqar",
    "check_rms_norm",
    "check_rope",
    "check_router",
    "check_swiglu",
    "check_top_p",
    "train_mqar",
]
