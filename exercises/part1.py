"""
grpo.py's GRPO functions, for you to write: those of one GRPO step, in its order. Each docstring
opens with grpo.py's own (the formula), then says what the tests hold you to. Replace each
`raise NotImplementedError` and check one exercise at a time (exercises/README.md):

  python exercises/check.py sample_tokens

grpo.py's loop calls your functions in place of its own when you train with them:

  python exercises/train.py --model SMOLLM2_FOLDER --dataset arithmetic ...
"""

import torch
from torch.utils.checkpoint import checkpoint  # noqa: F401  (per_token_logps's chunks)

from grpo import KL_ESTIMATORS, LOSS_TYPES, min_to_go  # noqa: F401  (the kinds kl_estimate and grpo_loss take)


# ---- 1. Sampling ---------------------------------------------------------------------------------
def sample_tokens(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) by inverse CDF: one uniform number
    per row, not one per vocabulary entry. Temperature 0: the most likely token.

    logits [B, V] (float32, or float64) -> token ids [B]. Inverse CDF: the first token whose
    cumulative probability exceeds u ~ U(0, total), with torch.rand. Keep the CDF and u in float64:
    a float32 sum of 150k probabilities drifts, and a token below 2^-24 could never be drawn. Make
    every tensor on logits' device."""
    raise NotImplementedError("sample_tokens")


def completion_mask(ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it; all 1 without one (truncated). From
    positions, never from pad_token_id: many tokenizers pad with the EOS token.

    ids [B, T] completion token ids; eos_token_ids: every id that ends a reply -> [B, T] of 0/1
    (int64). The first of any of the ids ends the reply; each row on its own."""
    raise NotImplementedError("completion_mask")


# ---- 3. Advantages -------------------------------------------------------------------------------
def group_advantages(
    rewards: torch.Tensor, group_size: int, std: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Â_i = (r_i - mean(r)) / (std(r) + eps), the mean over each group of `group_size` neighbours,
    the sample std (N - 1) over the group, or the whole batch (std="batch"); "none": Dr. GRPO's
    r_i - mean(r). Equal rewards in a group give Â = 0 exactly.

    rewards [B], B = P * G, the G completions of a question side by side -> [B]. "Exactly": the
    float32 mean of equal numbers can be a rounding off them, and (r - mean) / eps turns that
    into a signal; set such groups to 0."""
    raise NotImplementedError("group_advantages")


def reward_to_go(rewards: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T]: at t, the sum of the rewards at t and after it.

    One line of torch, no loop (torch.flip and torch.cumsum)."""
    raise NotImplementedError("reward_to_go")


def process_advantages(
    steps: list[list[tuple[int, float]]],
    group_size: int,
    length: int,
    eps: float = 1e-4,
    credit: str = "min",
    std: bool = True,
) -> torch.Tensor:
    """Process supervision (the paper's section 4.1.3). steps[i]: (token index, reward) of each step
    of completion i. Each reward normalized over all steps of its group, r̃ = (r - mean(R)) /
    (std(R) + eps); Â_it = min of the r̃ of the steps of completion i ending at t or after (PURE's
    min form), or their sum (credit="sum": the paper's); 0 after its last step. [B, length]

    R: every step reward of the group's G completions together, the sample std; std=False: no
    division (Dr. GRPO). A group of one step, of none, or whose step rewards are all equal gives
    Â = 0 exactly. Two steps may end at the same token: both count (their sum; for min, the
    lesser). Use your reward_to_go for the sum and grpo's min_to_go for the min."""
    raise NotImplementedError("process_advantages")


# ---- 4. Log-probs --------------------------------------------------------------------------------
def per_token_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    entropy: bool = False,
):
    """log π(o_t | q, o_<t) = logit[o_t] - logsumexp(logits) of the last `completion_length` tokens
    of each row, logits = lm_head(h) / temperature (the sampler's, or another policy is scored),
    over chunks of tokens recomputed in backward: no [B, T, V] tensor ever exists. entropy=True:
    also each position's H = logsumexp(z) - Σ_v softmax(z)_v z_v, z the logits (no gradient).

    input_ids, attention_mask [B, Tp + T], prompts left-padded -> [B, T]. The hidden states:
    model.get_decoder()(input_ids=..., attention_mask=..., position_ids=...).last_hidden_state,
    positions counted from the mask (cumsum - 1); lm_head: model.get_output_embeddings(). The
    hidden state at position j predicts token j + 1. Chunks of `chunk_size` tokens, each through
    checkpoint(fn, h, y, use_reentrant=False) when torch.is_grad_enabled(). entropy=True returns
    (log-probs, entropies), both [B, T] float32, the entropies computed in the same chunks from the
    same logits (at the temperature), under torch.no_grad()."""
    raise NotImplementedError("per_token_logps")


# ---- 5. The loss ---------------------------------------------------------------------------------
def kl_estimate(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: str, old_logp: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token estimate of KL(π_θ || π_ref), log_r = log π_ref - log π_θ (Schulman's k1-3):
    k1 = -log_r; k2 = log_r² / 2; k3 = e^log_r - log_r - 1 (paper's eq. 4); k3_ratio = ρ k3.
    As a loss on samples of π_old only k3_ratio's gradient is ∇KL(π_θ || π_ref) on and off
    policy; on policy, k1's is 0, k2's ∇KL(π_θ || π_ref), k3's ∇KL(π_ref || π_θ).

    All [B, T] -> [B, T]; ρ = e^(logp - old_logp). The gradient must flow through ρ as well.
    An unknown kind: ValueError naming KL_ESTIMATORS."""
    raise NotImplementedError("kl_estimate")


def importance_ratio(logp, old_logp, mask, level: str = "token") -> torch.Tensor:
    """ρ_it = π_θ(o_it | q, o_i,<t) / π_θ_old(o_it | q, o_i,<t), one per token (the paper's), or
    GSPO's one per completion (level="sequence"), the geometric mean of its tokens' ratios,
    s_i = (π_θ(o_i | q) / π_θ_old(o_i | q))^(1/|o_i|) = exp(1/|o_i| Σ_t log ρ_it): [B, T], [B, 1]

    logp (with gradient), old_logp, mask [B, T] -> [B, T] ("token") or [B, 1] ("sequence"). The
    mean is over each reply's own tokens (the mask), never its padding; the gradient flows through
    the sequence ratio too. An unknown level: ValueError naming it and the choices."""
    raise NotImplementedError("importance_ratio")


def grpo_loss(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    *,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: str,
    max_completion_length: int,
    kl_estimator: str = "k3_ratio",
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    importance_sampling_level: str = "token",
):
    """The negated GRPO objective, and its diagnostics. Per token, Â_it given per token ([B, T]) or
    per completion ([B]: the same on each of its tokens),
        X_it = -min(ρ_it Â_it, clip(ρ_it, 1 - ε_low, 1 + ε_high) Â_it) + β KL_it, then
    grpo: 1/B Σ_i 1/|o_i| Σ_t X_it (the paper); dapo: Σ_it X_it / Σ_i |o_i|; dr_grpo:
    Σ_it X_it / (B * max_completion_length). B, Σ|o_i|: the whole batch's (micro-batches sum).
    The KL of whole completions, β weighing each completion's (1/B Σ_i KL_i, whatever loss_type):
    k1_to_go: no KL_it; Â_it - β w_i Σ_{t' >= t} k1_it' instead (k1 of the sample: of π_θ_old; w_i
    undoes loss_type's division of o_i's tokens: |o_i|, Σ|o|/B or max_completion_length); k1_is:
    plus β/B Σ_it Π_{s <= t} ρ_is k1_it, its prefixes importance-weighted: exact off policy too.
    GSPO: s_i for ρ_it (importance_sampling_level="sequence"). cispo (MiniMax-M1): X_it =
    -sg(min(ρ_it, 1 + ε_high)) Â_it log π_θ(o_it) + β KL_it, dapo's mean: no token loses ∇.

    logp [b, T] (with gradient), old_logp and ref_logp [b, T] (ref_logp None: no KL term), mask
    [b, T]; this call may hold a micro-batch of b rows: num_sequences and num_tokens, when given,
    are the whole batch's B and Σ|o_i| (None: this call's). Returns (loss, diagnostics), the
    diagnostics floats over the mask's tokens: "kl" (the KL term's mean; 0.0 without ref_logp;
    k1's for k1_to_go and k1_is), "clip/low_frac" (ρ < 1 - ε_low with Â < 0), "clip/high_frac" (ρ > 1 +
    ε_high with Â > 0), "ratio_mean". Use your kl_estimate and importance_ratio, and reward_to_go
    for k1_to_go."""
    raise NotImplementedError("grpo_loss")
