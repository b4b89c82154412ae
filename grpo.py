"""
GRPO (Group Relative Policy Optimization) in one file, to read beside the paper: Shao et al.,
"DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", 2024,
arXiv:2402.03300, section 4.1 and Algorithm 1.

It reads top to bottom in the order of one step, then the loop:
  1. sample G completions for each of P questions from the current policy
  2. score each completion with rules (rewards.py): a program checks the answer
  3. advantage = reward normalized within its question's group: no critic
  4. per-token log-probs of the completions under the policy, the old policy, the reference
  5. minimize the clipped surrogate loss plus β·KL(policy || reference), then step AdamW
The machinery (flags, devices, caches, loading, checkpoints, logs) is in machinery/, looked up,
not read. The task (prompt, data, rewards) is rewards.py's.

The objective (the paper's eq. 3), for the G completions o_i of a question q:
  J(θ) = E[ 1/G Σ_i 1/|o_i| Σ_t ( min(ρ_it Â_it, clip(ρ_it, 1-ε, 1+ε) Â_it) - β D_KL ) ]
  ρ_it = π_θ(o_it | q, o_i,<t) / π_θ_old(o_it | q, o_i,<t)
  Â_it = (r_i - mean(r)) / std(r)

Where this file picks among variants or departs from the paper (each a flag):
  - `loss_type`: `grpo` is the paper's 1/G Σ_i 1/|o_i| Σ_t; `dapo` averages over all tokens
    of the batch (DAPO); `dr_grpo` divides by a constant and drops the std from Â (Dr. GRPO).
  - the clip range may be asymmetric, [1 - epsilon_low, 1 + epsilon_high] (DAPO).
  - the KL term is k3 weighted by the ratio ρ (`k3_ratio`, as DeepSeek-V3.2): its gradient is
    that of KL(π_θ || π_ref) per token, on and off policy; the paper's k3, on policy, that of
    KL(π_ref || π_θ). Of the KL of whole completions only `k1_to_go`, on policy: the KL summed
    to go in Â, not in the loss (Tang and Munos, arXiv 2506.09477; verl's use_kl_in_reward).
  - what GRPO became (each a flag, off by default): `importance_sampling_level sequence`, GSPO's
    one ratio per completion (Zheng et al., arXiv 2507.18071); `loss_type cispo`, the ratio capped
    and its gradient stopped, every token keeping one (MiniMax-M1, arXiv 2506.13585);
    `mask_truncated_completions`, DAPO's overlong filtering (arXiv 2503.14476). The policy's
    entropy is logged each step: its collapse is GRPO's most reported failure.
  - `advantage`, the gradient coefficient (the paper's section 5.2): `grpo`; `online_rft`, 1 for a
    right answer, else 0 (eq. 10; it keeps the clip and the KL term, which eq. 10 has not: `--beta
    0 --mu 1` is its plain form); `grpo_batch_std`, the batch's std (TRL's scale_rewards="batch").
  - `supervision process`: the paper's process supervision (section 4.1.3), the steps checked by
    rules (rewards.py), not a learned reward model; Â = the outcome's, plus a token's step credit:
    the least r̃ of the steps to come (`step_credit min`: PURE, arXiv 2504.15275; farming steps
    pays nothing), or the paper's sum. `mini_batches`: verl's PPO mini-batches.
  - the reference can be reset to the policy every N steps (the paper's iterative GRPO); with
    LoRA (`--lora-r`) it is the policy with its adapter switched off.
  - rewards are rules, as DeepSeek-R1's (DeepSeekMath's RL used learned reward models); a reply
    without <answer> is read by its last number.

Shapes: B = P*G completions, Tp prompt and T completion tokens, H hidden size, V vocabulary.
"""

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import rewards
from machinery.checkpoints import (
    latest_checkpoint,
    resume_run,
    save_checkpoint,
    stop_run,
    until_ctrl_c,
)
from machinery.cli import check_run, run_main
from machinery.decoding import (
    compiled_decoder,
    decode_replies,
    decoder_for,
    encode_prompts,
    end_of_reply_ids,
    prompt_cache,
    shared_prompt,
)
from machinery.devices import NO_FLOAT64, autocast_for, draw_without_float64, timed
from machinery.flags import KL_ESTIMATORS, LOSS_TYPES
from machinery.hub import quiet_libraries
from machinery.loading import load_policy_and_reference, load_tokenizer
from machinery.logs import log_samples, plot_curves, write_results
from machinery.metrics import log_step, require_finite, step_metrics

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # Qwen2.5's, Llama's


@dataclass
class Config:
    """Every field is a flag (`learning_rate` -> `--learning-rate`); its comment is its --help."""

    # The paper's knobs: G completions for each of P questions, the clipped objective, the KL
    num_generations: int = 8  # G: completions sampled per question (the group)
    prompts_per_step: int = 8  # P: questions per step
    max_completion_length: int = 512  # new tokens per completion; one cut here is truncated
    temperature: float = 1.0  # sampling temperature; log-probs are computed at the same one
    beta: float = 0.04  # KL coefficient; 0 loads no reference model at all
    kl_estimator: str = "k3_ratio"  # KL term: k3_ratio (ratio x k3), k3, k2; whole: k1_to_go, k1_is
    epsilon_low: float = 0.2  # ratio clip below: 1 - epsilon_low
    epsilon_high: float = 0.2  # ratio clip above: 1 + epsilon_high (cispo: the ratio's cap)
    importance_sampling_level: str = "token"  # ratio per token, or sequence: one per reply (GSPO)
    mu: int = 1  # passes over each generated batch (the paper's μ)
    mini_batches: int = 1  # optimizer steps per pass, each on 1/N of the batch (verl's)
    advantage: str = "grpo"  # gradient coefficient (Table 10): grpo, grpo_batch_std, online_rft
    supervision: str = "outcome"  # outcome: one reward per reply; process: one per step too
    step_credit: str = "min"  # process: a token's credit, min (PURE) or sum (paper) of steps to go
    loss_type: str = "grpo"  # token aggregation: grpo (paper), dapo (token mean), dr_grpo; cispo
    mask_truncated_completions: bool = False  # leave cut-off replies out of the loss (DAPO)
    ref_sync_every: int = 0  # copy the policy into the reference every N steps; 0 = never
    learning_rate: float = 1e-6  # AdamW learning rate (constant)
    max_steps: int = 200  # GRPO steps (each: one generation, then mu x mini_batches updates)
    # Rewards (rewards.py): total = Σ name_weight * name, over format, answer and step
    format_weight: float = 0.5  # weight of the format reward (<reasoning>, then <answer>)
    answer_weight: float = 1.0  # weight of the answer reward (final number equals the gold one)
    step_weight: float = 0.0  # weight of the step reward (0.2 per distinct true equation, to 1)
    # Model and data
    model: str = "Qwen/Qwen2.5-0.5B-Instruct"  # Hub id or local folder of a chat model
    dataset: str = "openai/gsm8k"  # Hub id, JSON-lines file or folder; arithmetic(3): built in
    dataset_config: str = "main"  # configuration name of a Hub dataset
    arithmetic_max: int = 49  # built-in tasks: a + b (arithmetic), a + b - c; numbers 0 to N
    example_turn: bool = True  # show rewards.py's worked example before each question
    trust_remote_code: bool = False  # let a Hub model run its own Python code (trusted ones only)
    # Optimization, memory, device
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping by global norm
    micro_batch_size: int = 8  # completions per forward/backward pass: memory, not the gradient
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory
    precision: str = "auto"  # fp32, or bf16 autocast over fp32 weights; auto: bf16 on GPUs with it
    logp_chunk_size: int = 1024  # tokens per chunk of the vocabulary projection (log-probs)
    compile: bool | None = None  # compile the decoding step; unset: on CUDA GPUs with Triton
    device: str = "auto"  # cuda, mps or cpu; auto picks the first available
    seed: int = 0  # seed for data order, sampling and the arithmetic task
    lora_r: int = 0  # LoRA rank (pip install peft); 0 = full fine-tuning
    lora_alpha: int = 32  # LoRA scaling numerator (scale = alpha / r)
    lora_target_modules: str = LORA_TARGETS  # comma-separated names of the layers to adapt
    # Evaluation, logs, checkpoints
    eval_size: int = 200  # held-out questions scored greedily before and after training; 0 skips
    eval_batch_size: int = 32  # questions per batch during evaluation
    output_dir: str = "outputs/grpo"  # metrics.jsonl, samples.jsonl, curves.png, checkpoints
    log_samples_every: int = 10  # write two completions to samples.jsonl every N steps
    save_every: int = 50  # save a checkpoint every N steps (the latest is kept); 0 = at the end
    resume: bool = False  # continue the run in output_dir from its latest checkpoint


# ---- 1. Sampling: G completions of each of P prompts, in one batch of B = P*G -------------------
@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, Tp] left-padded
    prompt_mask: torch.Tensor  # [B, Tp]
    completion_ids: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T] 1 up to and including the first end-of-reply id
    truncated: torch.Tensor  # [B] bool: no end-of-reply id within max_completion_length
    texts: list[str]  # B decoded completions


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: list[list[dict]],
    num_generations: int,
    max_completion_length: int,
    temperature: float,
    autocast=nullcontext(),
    compiled: bool = False,
) -> Rollout:
    """Sample `num_generations` completions of each prompt, one token at a time, from
    softmax(logits / temperature) and nothing else; temperature 0 is greedy (for evaluation)."""
    device = next(model.parameters()).device
    question_ids, question_mask = encode_prompts(tokenizer, prompts, device)  # [P, Tp] templated
    prompt_ids = question_ids.repeat_interleave(num_generations, dim=0)  # [B, Tp]
    prompt_mask = question_mask.repeat_interleave(num_generations, dim=0)  # [B, Tp]
    eos_ids = end_of_reply_ids(model, tokenizer)  # [E]
    B = len(prompt_ids)
    T = max_completion_length
    completion_ids = prompt_ids.new_full((B, T), tokenizer.pad_token_id)  # [B, T]
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, T)], dim=1)  # [B, Tp + T]
    position = prompt_mask.sum(dim=1, keepdim=True) - 1  # [B, 1] of each prompt's last token
    token = prompt_ids[:, -1].contiguous()  # [B] the prompt's last token predicts the first new one
    done = torch.zeros(B, dtype=torch.bool, device=device)  # [B] has drawn an end-of-reply id
    model.eval()  # no dropout while sampling
    with autocast:
        cache = prompt_cache(model, question_ids, question_mask, num_generations)
        decoder, cache, attention_mask = decoder_for(model, cache, attention_mask, compiled)
        for t in range(T):
            hidden = decoder(
                input_ids=token[:, None],
                cache=cache,
                attention_mask=attention_mask,
                position_ids=position + t,
            ).last_hidden_state  # [B, 1, H]
            logits = model.get_output_embeddings()(hidden[:, -1]).float()  # [B, V]
            token = sample_tokens(logits, temperature).masked_fill(done, tokenizer.pad_token_id)
            completion_ids[:, t] = token
            done |= torch.isin(token, eos_ids)
            if done.all():  # every row has ended
                break
    completion_ids = completion_ids[:, : t + 1]  # [B, T]
    mask = completion_mask(completion_ids, eos_ids.tolist())  # [B, T]
    texts = decode_replies(tokenizer, completion_ids, mask)  # B strings
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, ~done, texts)


def sample_tokens(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) by inverse CDF: one uniform number
    per row, not one per vocabulary entry. Temperature 0: the most likely token."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # [B]
    probs = torch.softmax(logits / temperature, dim=-1)  # [B, V]
    if probs.device.type in NO_FLOAT64:  # MPS: torch's own draw (machinery/devices.py)
        return draw_without_float64(probs)
    cdf = probs.double().cumsum(dim=-1)  # [B, V]; in float32 a sum of 150k would drift too far
    u = torch.rand(len(cdf), 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]  # [B, 1]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)  # [B] first index with cdf > u


def completion_mask(ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it; all 1 without one (truncated). From
    positions, never from pad_token_id: many tokenizers pad with the EOS token."""
    is_eos = torch.isin(ids, torch.tensor(eos_token_ids, device=ids.device))  # [B, T]
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), ids.shape[1])  # [B]
    return (torch.arange(ids.shape[1], device=ids.device) <= first_eos[:, None]).long()  # [B, T]


# ---- 2. Rewards (rules in rewards.py); 3. advantages: the group is the baseline, no critic ---
def score_completions(completions: list[str], answers: list[str], weights: dict[str, float]):
    """Total reward = Σ_k weight_k * reward_k; returns (total [B], {name: reward_k [B]})."""
    components = {
        name: torch.tensor(fn(completions, answers), dtype=torch.float32)
        for name, fn in rewards.REWARD_FUNCTIONS.items()
    }
    total = sum(weights[name] * reward for name, reward in components.items())
    return total, components


def group_advantages(
    rewards: torch.Tensor, group_size: int, std: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Â_i = (r_i - mean(r)) / (std(r) + eps), the mean over each group of `group_size` neighbours,
    the sample std (N - 1) over the group, or the whole batch (std="batch"); "none": Dr. GRPO's
    r_i - mean(r). Equal rewards in a group give Â = 0 exactly."""
    grouped = rewards.view(-1, group_size)  # [P, G]
    advantages = grouped - grouped.mean(dim=1, keepdim=True)  # [P, G]
    if std != "none":
        scale = {"group": grouped.std(dim=1, keepdim=True), "batch": rewards.std()}[std]
        advantages = advantages / (scale + eps)
    all_equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # [P, 1]: teaches nothing
    return advantages.masked_fill(all_equal, 0.0).view(-1)  # [B]


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
    min form), or their sum (credit="sum": the paper's); 0 after its last step. [B, length]"""
    empty = torch.inf if credit == "min" else 0.0  # no step ends at this token
    normalized = torch.full((len(steps), length), empty)  # [B, T]: r̃ at the token ending a step
    for g in range(0, len(steps), group_size):
        group = range(g, g + group_size)
        R = torch.tensor([r for i in group for _, r in steps[i]])  # the group's step rewards
        if R.unique().numel() > 1:  # one step, or equal rewards: Â = 0, as with outcomes
            scale = R.std() + eps if std else 1.0  # Dr. GRPO: no std
            for i in group:
                for t, r in steps[i]:
                    step = (r - R.mean()) / scale
                    if credit == "sum":
                        normalized[i, t] += step
                    else:
                        normalized[i, t] = torch.minimum(normalized[i, t], step)
    if credit == "sum":
        return reward_to_go(normalized)
    return min_to_go(normalized).nan_to_num(posinf=0.0)  # no step to go: 0


def reward_to_go(rewards: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T]: at t, the sum of the rewards at t and after it."""
    return rewards.flip(1).cumsum(dim=1).flip(1)


def min_to_go(rewards: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T]: at t, the least of the rewards at t and after it."""
    return rewards.flip(1).cummin(dim=1).values.flip(1)


def compute_advantages(rollout: Rollout, rows: list[dict], cfg: Config, tokenizer):
    """Steps 2 and 3: (rewards [B], {name: reward [B]}, Â [B]; [B, T] for process supervision)."""
    G = cfg.num_generations
    answers = [r["answer"] for r in rows for _ in range(G)]  # completion i answers row i // G
    weights = {name: getattr(cfg, f"{name}_weight") for name in rewards.REWARD_FUNCTIONS}
    total, components = score_completions(rollout.texts, answers, weights)  # [B]
    std = "batch" if cfg.advantage == "grpo_batch_std" else "group"
    std = "none" if cfg.loss_type == "dr_grpo" else std  # Dr. GRPO: no std, of outcomes or steps
    advantages = group_advantages(total, G, std)
    if cfg.advantage == "online_rft":  # the paper's eq. 10: 1 for a right answer, else 0
        advantages = components["answer"]
    if cfg.supervision == "process":  # the outcome's Â on every token, plus the steps' to go
        ids, lengths = rollout.completion_ids.tolist(), rollout.completion_mask.sum(dim=1).tolist()
        values = [r.get("values") for r in rows for _ in range(G)]  # a step must reach one of them
        steps = [
            rewards.step_token_ends(tokenizer, i[:n], text, cut, v)  # a cut-off last line: no step
            for i, n, text, cut, v in zip(
                ids, lengths, rollout.texts, rollout.truncated.tolist(), values
            )
        ]
        T = rollout.completion_ids.shape[1]
        step_part = process_advantages(steps, G, T, credit=cfg.step_credit, std=std != "none")
        advantages = advantages[:, None] + step_part  # [B, T]
    return total, components, advantages


# ---- 4. Log-probs of the completion tokens ------------------------------------------------------
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
    also each position's H = logsumexp(z) - Σ_v softmax(z)_v z_v, z the logits (no gradient)."""
    T = completion_length
    first = int(attention_mask.any(dim=0).int().argmax())  # columns of padding only: drop them
    input_ids = input_ids[:, first:]  # [B, Tp + T]
    attention_mask = attention_mask[:, first:]  # [B, Tp + T]
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # as generate() numbered them
    Tp = input_ids.shape[1] - T
    start, cache = shared_prompt(model, input_ids, attention_mask, Tp)  # one group: its prompt once
    hidden = model.get_decoder()(
        input_ids=input_ids[:, start:],
        attention_mask=attention_mask,
        position_ids=position_ids[:, start:],
        cache=cache,
        use_cache=cache is not None,
    ).last_hidden_state  # [B, *, H]
    hidden = hidden[:, -T - 1 : -1].reshape(-1, hidden.shape[-1])  # [B*T, H]: t predicts t + 1
    targets = input_ids[:, -T:].reshape(-1)  # [B*T]
    lm_head = model.get_output_embeddings()

    def chunk_logps(h, y):  # [N, H], [N] -> [N] log-probs, [N] entropies (or None)
        logits = lm_head(h).float() / temperature  # [N, V]
        normalizer = logits.logsumexp(dim=-1)  # [N]
        logps = logits.gather(-1, y[:, None]).squeeze(-1) - normalizer
        if not entropy:
            return logps, None
        with torch.no_grad():  # the entropy of softmax(logits), the sampler's distribution
            return logps, normalizer - (logits.softmax(dim=-1) * logits).sum(dim=-1)

    chunks = []
    for i in range(0, len(targets), chunk_size):
        args = (hidden[i : i + chunk_size], targets[i : i + chunk_size])
        if torch.is_grad_enabled():
            chunks.append(checkpoint(chunk_logps, *args, use_reentrant=False))
        else:
            chunks.append(chunk_logps(*args))
    logps = torch.cat([logps for logps, _ in chunks]).view(-1, T)  # [B, T]
    if not entropy:
        return logps
    return logps, torch.cat([entropies for _, entropies in chunks]).view(-1, T)  # [B, T] twice


def frozen_logps(model, input_ids, attention_mask, completion_length: int, cfg: Config, autocast):
    """Log-probs that the update does not change (old policy, reference), in micro-batches."""
    settings = (completion_length, cfg.temperature, cfg.logp_chunk_size)
    parts = zip(input_ids.split(cfg.micro_batch_size), attention_mask.split(cfg.micro_batch_size))
    with torch.no_grad(), autocast:
        logps = [per_token_logps(model, ids, mask, *settings) for ids, mask in parts]
    return torch.cat(logps)  # [B, T]


# ---- 5. The loss --------------------------------------------------------------------------------
def kl_estimate(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: str, old_logp: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token estimate of KL(π_θ || π_ref), log_r = log π_ref - log π_θ (Schulman's k1-3):
    k1 = -log_r; k2 = log_r² / 2; k3 = e^log_r - log_r - 1 (paper's eq. 4); k3_ratio = ρ k3.
    As a loss on samples of π_old only k3_ratio's gradient is ∇KL(π_θ || π_ref) on and off
    policy; on policy, k1's is 0, k2's ∇KL(π_θ || π_ref), k3's ∇KL(π_ref || π_θ)."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    log_r = ref_logp - logp  # [B, T]
    if kind == "k3_ratio":  # the gradient flows through ρ too: E_old[ρ k3] = E_θ[k3] = KL
        return torch.exp(logp - old_logp) * (torch.exp(log_r) - log_r - 1)
    return {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": torch.exp(log_r) - log_r - 1}[kind]


def importance_ratio(logp, old_logp, mask, level: str = "token") -> torch.Tensor:
    """ρ_it = π_θ(o_it | q, o_i,<t) / π_θ_old(o_it | q, o_i,<t), one per token (the paper's), or
    GSPO's one per completion (level="sequence"), the geometric mean of its tokens' ratios,
    s_i = (π_θ(o_i | q) / π_θ_old(o_i | q))^(1/|o_i|) = exp(1/|o_i| Σ_t log ρ_it): [B, T], [B, 1]"""
    log_ratio = logp - old_logp  # [B, T]
    if level == "token":
        return torch.exp(log_ratio)
    if level != "sequence":
        raise ValueError(f"unknown importance_sampling_level {level!r}; choose token or sequence")
    mask = mask.float()  # [B, T]
    mean = (log_ratio * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.exp(mean)  # [B, 1]: one ratio, on each of the completion's tokens


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
    -sg(min(ρ_it, 1 + ε_high)) Â_it log π_θ(o_it) + β KL_it, dapo's mean: no token loses ∇."""
    mask = mask.float()  # [B, T]
    ratio = importance_ratio(logp, old_logp, mask, importance_sampling_level)  # [B, T] or [B, 1]
    A = advantages.view(len(logp), -1)  # [B, 1] one per completion, or [B, T] one per token
    num_sequences = num_sequences or logp.shape[0]
    num_tokens = num_tokens or mask.sum().clamp(min=1)  # (every reply masked: a loss of 0)
    whole = kl_estimator in ("k1_to_go", "k1_is") and ref_logp is not None  # whole completions'
    if whole and kl_estimator == "k1_to_go":  # the KL to go as a reward: through ρ, clipped too
        lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)  # [B, 1]
        weights = {"grpo": lengths, "dr_grpo": max_completion_length}  # w_i: one KL per completion
        w = weights.get(loss_type, num_tokens / num_sequences)  # dapo: Σ|o| / B
        A = A - beta * w * reward_to_go((old_logp - ref_logp) * mask)  # [B, T]
    if loss_type == "cispo":  # the weight capped, not the token: its gradient stopped, ∇log π kept
        per_token = -ratio.clamp(max=1 + epsilon_high).detach() * A * logp  # [B, T]
    else:
        clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)  # [B, T] (GSPO: [B, 1])
        per_token = -torch.minimum(ratio * A, clipped * A)  # [B, T]
    kind = "k1" if whole else kl_estimator  # (k1: what the diagnostics report)
    kl = kl_estimate(logp, ref_logp, kind, old_logp) if ref_logp is not None else None
    if kl is not None and beta != 0 and not whole:
        per_token = per_token + beta * kl  # plus: the KL is a penalty on the objective
    if loss_type == "grpo":
        per_sequence = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B]
        loss = per_sequence.sum() / num_sequences
    elif loss_type in ("dapo", "bnpo", "cispo"):  # bnpo: dapo's old name (TRL's is per micro-batch)
        loss = (per_token * mask).sum() / num_tokens
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (num_sequences * max_completion_length)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if whole and kl_estimator == "k1_is":  # E_old[Π ρ k1] = E_θ[k1] at each prefix: exact
        prefix_ratio = torch.exp(((logp - old_logp) * mask).cumsum(dim=1))  # [B, T] Π_{s<=t} ρ_s
        loss = loss + beta * (prefix_ratio * (logp - ref_logp) * mask).sum() / num_sequences

    def token_mean(x):
        return ((x.float() * mask).sum() / mask.sum().clamp(min=1)).item()

    with torch.no_grad():
        diagnostics = {
            "kl": token_mean(kl) if kl is not None else 0.0,
            "clip/low_frac": token_mean((ratio < 1 - epsilon_low) & (A < 0)),
            "clip/high_frac": token_mean((ratio > 1 + epsilon_high) & (A > 0)),
            "ratio_mean": token_mean(ratio),
        }
    return loss, diagnostics


def update_policy(policy, optimizer, batch: dict, cfg: Config, autocast):
    """Step 5: mu passes over the batch, an optimizer step per mini-batch, each over micro-batches
    (the gradient is the same for any micro-batch size). Returns (mean loss, mean grad norm over
    the optimizer steps, [(tokens, diagnostics)] per micro-batch)."""
    mask = batch["completion_mask"]  # [B, T]
    T = mask.shape[1]
    names = """beta epsilon_low epsilon_high loss_type max_completion_length kl_estimator
        importance_sampling_level""".split()
    loss_settings = {name: getattr(cfg, name) for name in names}
    logp_settings = (T, cfg.temperature, cfg.logp_chunk_size)
    losses = []
    grad_norms = []  # one per optimizer step: mu x mini_batches of them
    diagnostics = []
    policy.train()
    parts = [
        part for _ in range(cfg.mu) for part in torch.arange(len(mask)).chunk(cfg.mini_batches)
    ]
    for part in parts:
        optimizer.zero_grad(set_to_none=True)
        loss_settings.update(num_sequences=len(part), num_tokens=int(mask[part].sum()))
        for mb in part.split(cfg.micro_batch_size):
            inputs = (batch["input_ids"][mb], batch["attention_mask"][mb])
            with autocast:  # [b, T] each; the entropy for the log (no gradient)
                logp, entropy = per_token_logps(policy, *inputs, *logp_settings, entropy=True)
            # mu = 1 and one mini-batch: π_θ_old is π_θ itself, as the sampler left it
            old = logp.detach() if batch["old_logp"] is None else batch["old_logp"][mb]
            ref = batch["ref_logp"][mb] if batch["ref_logp"] is not None else None
            loss, diag = grpo_loss(
                logp, old, ref, batch["advantages"][mb], mask[mb], **loss_settings
            )
            require_finite(loss, "the loss")
            loss.backward()
            losses.append(loss.item())
            tokens = int(mask[mb].sum())
            diag["entropy"] = (entropy * mask[mb]).sum().item() / max(tokens, 1)
            diagnostics.append((tokens, diag))
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        require_finite(grad_norm, "the gradient")
        grad_norms.append(grad_norm.item())
        optimizer.step()
    policy.eval()
    return sum(losses) / len(parts), sum(grad_norms) / len(grad_norms), diagnostics


# ---- One step, the loop ------------------------------------------------------------------------
def grpo_step(
    policy, reference, tokenizer, optimizer, rows: list[dict], cfg: Config, autocast=nullcontext()
):
    """One GRPO step on `rows` (P questions). Returns (metrics, rollout, rewards, advantages)."""
    times = {}
    device = next(policy.parameters()).device
    with timed(times, "time/generate", device):  # 1. G completions per question
        prompts = [r["prompt"] for r in rows]
        sampling = (cfg.num_generations, cfg.max_completion_length, cfg.temperature, autocast)
        rollout = generate_completions(policy, tokenizer, prompts, *sampling, cfg.compile)
    with timed(times, "time/score", device):  # 2. rewards, 3. advantages within each group
        total, components, advantages = compute_advantages(rollout, rows, cfg, tokenizer)
    # 4. Log-probs fixed during the update: old policy (mu or mini-batches > 1), reference (beta).
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)  # [B, Tp + T]
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    T = rollout.completion_ids.shape[1]
    loss_mask = rollout.completion_mask  # [B, T]
    if cfg.mask_truncated_completions:  # DAPO's overlong filtering: a reply cut off is left out
        loss_mask = loss_mask * ~rollout.truncated[:, None]  # [B, T]
    old_logp = None
    ref_logp = None
    with timed(times, "time/logps", device):
        if cfg.mu > 1 or cfg.mini_batches > 1:  # π_θ_old: the policy as it sampled
            old_logp = frozen_logps(policy, input_ids, attention_mask, T, cfg, autocast)
        if cfg.beta > 0:  # with LoRA the reference is the policy with its adapter switched off
            with policy.disable_adapter() if reference is None else nullcontext():
                scorer = policy if reference is None else reference
                ref_logp = frozen_logps(scorer, input_ids, attention_mask, T, cfg, autocast)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": loss_mask,
        "advantages": advantages.to(device),
        "old_logp": old_logp,
        "ref_logp": ref_logp,
    }
    with timed(times, "time/update", device):  # 5. the clipped surrogate, then AdamW
        update = update_policy(policy, optimizer, batch, cfg, autocast)  # loss, grad norm, diag.
    task = rewards.step_statistics(rollout.texts)  # the task's steps/: per reply, holding, repeated
    metrics = step_metrics(rollout, total, components, cfg.num_generations, update, task, optimizer)
    return {**times, **metrics}, rollout, total, batch["advantages"]


def evaluate(
    model,
    tokenizer,
    rows: list[dict],
    batch_size: int = 32,
    max_completion_length: int = 512,
    autocast=nullcontext(),
    compiled=False,
) -> dict:
    """Greedy accuracy (answer reward = 1) and format rate (strict format) on `rows`."""
    texts = []
    for i in tqdm(range(0, len(rows), batch_size), "evaluating", disable=None, leave=False):
        prompts = [r["prompt"] for r in rows[i : i + batch_size]]
        rollout = generate_completions(
            model, tokenizer, prompts, 1, max_completion_length, 0.0, autocast, compiled
        )
        texts += rollout.texts
    correct = rewards.answer_reward(texts, [r["answer"] for r in rows])
    formatted = [r == 1.0 for r in rewards.format_reward(texts)]  # the strict format only
    n = max(len(rows), 1)
    return {"accuracy": sum(correct) / n, "format_rate": sum(formatted) / n, "n": len(rows)}


def train(cfg: Config) -> dict:
    """Run GRPO as configured (the paper's Algorithm 1, one outer iteration); return results."""
    cfg, device = check_run(cfg, rewards.BUILT_IN_TASKS)  # every check before any loading
    output_dir = Path(cfg.output_dir)
    autocast = autocast_for(device, cfg.precision)
    torch.manual_seed(cfg.seed)
    quiet_libraries()
    data = (cfg.dataset_config, cfg.arithmetic_max, cfg.seed, cfg.example_turn)  # bad data first
    train_rows = rewards.load_dataset_rows(cfg.dataset, "train", *data)
    eval_rows = rewards.load_dataset_rows(cfg.dataset, "test", *data, size=cfg.eval_size)
    resume_from = latest_checkpoint(output_dir) if cfg.resume else None
    example = rewards.make_prompt("What is 1 + 1?")  # the model's chat template must format it
    tokenizer = load_tokenizer(str(resume_from or cfg.model), cfg.trust_remote_code, example)
    policy, reference = load_policy_and_reference(cfg, device, resume_from)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    start_step, results = resume_run(cfg, resume_from, optimizer)
    evaluation = (eval_rows, cfg.eval_batch_size, cfg.max_completion_length, autocast, cfg.compile)
    if resume_from is None and cfg.eval_size:
        results["before"] = evaluate(policy, tokenizer, *evaluation)
        print(f"before training: {results['before']}")
    write_results(cfg, results)
    completed = start_step  # steps whose update the weights hold
    to_save = (policy, reference, tokenizer, optimizer, cfg)
    bar = tqdm(range(start_step, cfg.max_steps), "GRPO", initial=start_step, total=cfg.max_steps)
    try:
        for step in until_ctrl_c(bar):  # Ctrl-C lets the step in progress finish
            rows = rewards.rows_for_step(train_rows, step, cfg.prompts_per_step, cfg.seed)
            metrics, rollout, total, _ = grpo_step(
                policy, reference, tokenizer, optimizer, rows, cfg, autocast
            )
            log_step(output_dir, step + 1, metrics, bar)
            completed = step + 1  # the weights hold this update
            log_samples(cfg, completed, rows[0], rollout.texts, total)  # every N steps, the last
            if cfg.ref_sync_every and reference is not None and completed % cfg.ref_sync_every == 0:
                reference.load_state_dict(policy.state_dict())  # iterative GRPO: catch up
            if cfg.save_every and completed % cfg.save_every == 0:
                save_checkpoint(output_dir, completed, *to_save)
    except (FloatingPointError, KeyboardInterrupt) as stop:  # a NaN, or Ctrl-C
        bar.close()
        stop_run(output_dir, completed, stop, *to_save)
    bar.close()
    results["final_checkpoint"] = str(save_checkpoint(output_dir, cfg.max_steps, *to_save))
    plot_curves(output_dir / "metrics.jsonl", output_dir / "curves.png")
    if cfg.eval_size:
        results["after"] = evaluate(policy, tokenizer, *evaluation)
        print(f"after training: {results['after']}")
    results["steps"] = cfg.max_steps
    compiled_decoder.cache_clear()  # the compiled decoding step and its caches: freed
    return write_results(cfg, results)


def main(argv: list[str] | None = None) -> None:
    run_main(Config, train, argv)  # a bad flag or file: one line that says what to do


if __name__ == "__main__":
    main()
