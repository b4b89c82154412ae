"""
Mistakes a learner plausibly makes in each exercise, each a change of one piece of grpo.py's code
(`right` -> `wrong`), and `says`: words of the failure message that must point at it. CI runs the
exercise's tests with each mistake in place (`python exercises/check.py --mistakes`): each must
fail a test whose message holds `says`. `python exercises/train.py --mistake NAME` trains with one.
"""

from dataclasses import dataclass


@dataclass
class Mistake:
    name: str
    exercise: str  # and the function of grpo.py it changes
    what: str  # the mistake, as a learner would describe what they wrote
    right: str  # a piece of grpo.py's function...
    wrong: str  # ...and what the learner wrote instead
    says: str  # words of the failure message that must point at it


MISTAKES = [
    Mistake(
        "no_temperature",
        "sample_tokens",
        "softmax(logits): the temperature forgotten",
        "torch.softmax(logits / temperature, dim=-1)",
        "torch.softmax(logits, dim=-1)",
        says="softmax(logits / temperature)",
    ),
    Mistake(
        "temperature_multiplies",
        "sample_tokens",
        "softmax(logits * temperature)",
        "torch.softmax(logits / temperature, dim=-1)",
        "torch.softmax(logits * temperature, dim=-1)",
        says="softmax(logits / temperature)",
    ),
    Mistake(
        "float32_uniform",
        "sample_tokens",
        "the uniform number in torch.rand's float32",
        "device=cdf.device, dtype=cdf.dtype)",
        "device=cdf.device)",
        says="float64",
    ),
    Mistake(
        "first_cdf_at_or_above_u",
        "sample_tokens",
        "the first token whose CDF is >= u",
        "torch.searchsorted(cdf, u, right=True)",
        "torch.searchsorted(cdf, u)",
        says="probability 0",
    ),
    Mistake(
        "eos_left_out",
        "completion_mask",
        "the mask stops before the first EOS",
        "<= first_eos[:, None]",
        "< first_eos[:, None]",
        says="the EOS itself",
    ),
    Mistake(
        "first_eos_id_only",
        "completion_mask",
        "only the first of several end-of-reply ids",
        "torch.tensor(eos_token_ids, device",
        "torch.tensor(eos_token_ids[:1], device",
        says="any of the end-of-reply ids",
    ),
    Mistake(
        "last_eos",
        "completion_mask",
        "up to the last EOS, not the first",
        "is_eos.int().argmax(dim=1)",
        "ids.shape[1] - 1 - is_eos.int().flip(1).argmax(dim=1)",
        says="the first EOS",
    ),
    Mistake(
        "population_std",
        "group_advantages",
        "the population std (divided by G, not G - 1)",
        "grouped.std(dim=1, keepdim=True)",
        "grouped.std(dim=1, keepdim=True, correction=0)",
        says="sample std",
    ),
    Mistake(
        "batch_mean",
        "group_advantages",
        "the batch's mean as the baseline, not the group's",
        "grouped - grouped.mean(dim=1, keepdim=True)",
        "grouped - rewards.mean()",
        says="its own baseline",
    ),
    Mistake(
        "rounding_left_in",
        "group_advantages",
        "equal rewards not set to exactly 0",
        "advantages.masked_fill(all_equal, 0.0).view(-1)",
        "advantages.view(-1)",
        says="exactly 0",
    ),
    Mistake(
        "sum_up_to_t",
        "reward_to_go",
        "the rewards up to t (a plain cumsum)",
        "rewards.flip(1).cumsum(dim=1).flip(1)",
        "rewards.cumsum(dim=1)",
        says="at t and after",
    ),
    Mistake(
        "not_flipped_back",
        "reward_to_go",
        "flipped, summed, not flipped back",
        "rewards.flip(1).cumsum(dim=1).flip(1)",
        "rewards.flip(1).cumsum(dim=1)",
        says="at t and after",
    ),
    Mistake(
        "no_reward_to_go",
        "process_advantages",
        "each r̃ on its step's last token only",
        "return reward_to_go(normalized)",
        "return normalized",
        says="ending at t or after",
    ),
    Mistake(
        "process_population_std",
        "process_advantages",
        "the population std of the steps",
        "R.std() + eps if std",
        "R.std(correction=0) + eps if std",
        says="sample std",
    ),
    Mistake(
        "min_of_the_whole_reply",
        "process_advantages",
        "the min form over all of a reply's steps, not those still to come",
        "return min_to_go(normalized).nan_to_num(posinf=0.0)",
        "return normalized.amin(dim=1, keepdim=True).expand_as(normalized).nan_to_num(posinf=0.0)",
        says="ending at t or after",
    ),
    Mistake(
        "equal_steps_normalized",
        "process_advantages",
        "no check for a group of equal steps",
        "if R.unique().numel() > 1:",
        "if len(R):",
        says="exactly 0",
    ),
    Mistake(
        "scores_the_token_itself",
        "per_token_logps",
        "the logits at t score token t",
        "hidden[:, -T - 1 : -1]",
        "hidden[:, -T:]",
        says="predict the next token",
    ),
    Mistake(
        "logps_at_temperature_1",
        "per_token_logps",
        "log-probs without the temperature",
        "lm_head(h).float() / temperature",
        "lm_head(h).float()",
        says="sampling temperature",
    ),
    Mistake(
        "logits_kept_for_backward",
        "per_token_logps",
        "each chunk's logits kept for backward",
        "checkpoint(chunk_logps, *args, use_reentrant=False)",
        "chunk_logps(*args)",
        says="vocabulary-sized",
    ),
    Mistake(
        "kl_of_the_other_direction",
        "kl_estimate",
        "log_r = log π_θ - log π_ref",
        "log_r = ref_logp - logp",
        "log_r = logp - ref_logp",
        says="log π_ref - log π_θ",
    ),
    Mistake(
        "ratio_detached",
        "kl_estimate",
        "k3_ratio's ratio detached from the graph",
        "return torch.exp(logp - old_logp) *",
        "return torch.exp(logp - old_logp).detach() *",
        says="must give the gradient of",
    ),
    Mistake(
        "k2_without_half",
        "kl_estimate",
        "k2 = log_r² without the 1/2",
        '"k2": 0.5 * log_r**2',
        '"k2": log_r**2',
        says="k2 = log_r² / 2",
    ),
    Mistake(
        "clip_bounds_swapped",
        "grpo_loss",
        "clip(ρ, 1 + ε_high, 1 - ε_low): bounds swapped",
        "ratio.clamp(1 - epsilon_low, 1 + epsilon_high)",
        "ratio.clamp(1 + epsilon_high, 1 - epsilon_low)",
        says="the clip must not act",
    ),
    Mistake(
        "max_not_min",
        "grpo_loss",
        "max(ρÂ, clip(ρ)Â): the optimistic bound",
        "-torch.minimum(ratio * A, clipped * A)",
        "-torch.maximum(ratio * A, clipped * A)",
        says="pessimistic",
    ),
    Mistake(
        "kl_sign",
        "grpo_loss",
        "the KL term subtracted from the loss",
        "per_token = per_token + beta * kl",
        "per_token = per_token - beta * kl",
        says="towards the reference",
    ),
    Mistake(
        "ratio_inverted",
        "grpo_loss",
        "ρ = π_old / π_θ",
        "ratio = torch.exp(logp - old_logp)",
        "ratio = torch.exp(old_logp - logp)",
        says="-Â_i / (|o_i| B)",
    ),
    Mistake(
        "micro_batch_mean",
        "grpo_loss",
        "the mean over the micro-batch, not the whole batch",
        "num_sequences = num_sequences or logp.shape[0]\n    num_tokens = num_tokens or mask.sum()",
        "num_sequences = logp.shape[0]\n    num_tokens = mask.sum()",
        says="the whole batch",
    ),
]
