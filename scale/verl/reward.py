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

FORMAT_WEIGHT, ANSWER_WEIGHT = 0.5, 1.0  # grpo.Config's format_weight and answer_weight


def compute_score(data_source, solution_str, ground_truth, extra_info=None,
                  format_weight: float = FORMAT_WEIGHT, answer_weight: float = ANSWER_WEIGHT,
                  **kwargs) -> float:
    """format_weight * format reward + answer_weight * answer reward, as grpo.score_completions."""
    weights = {"format": format_weight, "answer": answer_weight}
    return float(sum(weight * rewards.REWARD_FUNCTIONS[name]([solution_str], [ground_truth])[0]
                     for name, weight in weights.items()))
