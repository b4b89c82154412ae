"""
rewards.py's rewards as a verl custom reward function: the weighted sum that grpo.py trains on.

In verl's config (see run_grpo.sh):
    custom_reward_function.path=scale/verl/reward.py custom_reward_function.name=compute_score

verl calls `compute_score(data_source, solution_str, ground_truth, extra_info)` once per
completion, with the decoded completion and the row's `reward_model.ground_truth`. The weights
are grpo.py's defaults; pass others through `custom_reward_function.reward_kwargs`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import rewards  # noqa: E402

FORMAT_WEIGHT, ANSWER_WEIGHT, STEP_WEIGHT = 0.5, 1.0, 0.0  # grpo.Config's *_weight fields


def compute_score(
    data_source,
    solution_str,
    ground_truth,
    extra_info=None,
    format_weight: float = FORMAT_WEIGHT,
    answer_weight: float = ANSWER_WEIGHT,
    step_weight: float = STEP_WEIGHT,
    **kwargs,
) -> float:
    """Σ weight x reward over format, answer and step, as grpo.score_completions."""
    weights = {"format": format_weight, "answer": answer_weight, "step": step_weight}
    return float(
        sum(
            weight * rewards.REWARD_FUNCTIONS[name]([solution_str], [ground_truth])[0]
            for name, weight in weights.items()
        )
    )
