"""
GRPO (Group Relative Policy Optimization) in one file, to read beside the paper: Shao et al.,
"DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", 2024,
arXiv:2402.03300, section 4.1 and Algorithm 1.

Part 1, "GRPO", reads top to bottom in the order of one step, then the loop:
  1. sample G completions for each of P questions from the current policy
  2. score each completion with rules (rewards.py): a program checks the answer
  3. advantage = reward normalized within its question's group: no critic
  4. per-token log-probs of the completions under the policy, the old policy, the reference
  5. minimize the clipped surrogate loss plus β·KL(policy || reference), then step AdamW
Part 2, "Machinery", is looked up, not read. The task (prompt, data, rewards) is rewards.py's.

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
  - `advantage`, the gradient coefficient (the paper's section 5.2): `grpo`; `online_rft`, 1 for a
    right answer, else 0 (eq. 10); `grpo_batch_std`, the batch's std (TRL's scale_rewards="batch").
  - `supervision process`: the paper's process supervision (section 4.1.3), the steps checked by
    rules (rewards.py), not a learned reward model. `mini_batches`: verl's PPO mini-batches.
  - the reference can be reset to the policy every N steps (the paper's iterative GRPO); with
    LoRA (`--lora-r`) it is the policy with its adapter switched off.
  - rewards are rules, as DeepSeek-R1's (DeepSeekMath's RL used learned reward models); a reply
    without <answer> is read by its last number.

Shapes: B = P*G completions, Tp prompt and T completion tokens, H hidden size, V vocabulary.
"""

import argparse, functools, importlib.util, inspect, json, re, shutil, signal, sys, time  # noqa
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
from transformers import AutoModelForCausalLM, StaticCache

from rewards import (REWARD_FUNCTIONS, ConfigError, check_sources, format_reward, load_dataset_rows,
                     load_tokenizer, quiet_libraries, rows_for_step, step_statistics,
                     step_token_ends)

# ==== Part 1: GRPO ================================================================================
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
    kl_estimator: str = "k3_ratio"  # KL term: k3_ratio (ratio x k3), k3, k2; k1_to_go (in Â)
    epsilon_low: float = 0.2  # ratio clip below: 1 - epsilon_low
    epsilon_high: float = 0.2  # ratio clip above: 1 + epsilon_high
    mu: int = 1  # passes over each generated batch (the paper's μ)
    mini_batches: int = 1  # optimizer steps per pass, each on 1/N of the batch (verl's)
    advantage: str = "grpo"  # gradient coefficient (Table 10): grpo, grpo_batch_std, online_rft
    supervision: str = "outcome"  # outcome: one reward per reply; process: one per step too
    loss_type: str = "grpo"  # token aggregation: grpo (paper), dapo (token mean), dr_grpo
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
def generate_completions(model, tokenizer, prompts: list[list[dict]], num_generations: int,
                         max_completion_length: int, temperature: float,
                         autocast=nullcontext(), compiled: bool = False) -> Rollout:
    """Sample `num_generations` completions of each prompt, one token at a time, from
    softmax(logits / temperature) and nothing else; temperature 0 is greedy (for evaluation)."""
    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in prompts]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False).to(device)
    prompt_ids = encoded.input_ids.repeat_interleave(num_generations, dim=0)  # [B, Tp]
    prompt_mask = encoded.attention_mask.repeat_interleave(num_generations, dim=0)  # [B, Tp]
    eos_ids = model.generation_config.eos_token_id  # a chat model may have several (Qwen2.5: 2)
    eos_ids = [*(eos_ids if isinstance(eos_ids, list) else [eos_ids]), tokenizer.eos_token_id]
    eos_ids = torch.tensor(sorted({i for i in eos_ids if i is not None}), device=device)
    B, T = len(prompt_ids), max_completion_length
    completion_ids = prompt_ids.new_full((B, T), tokenizer.pad_token_id)  # [B, T]
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, T)], dim=1)  # [B, Tp + T]
    position = prompt_mask.sum(dim=1, keepdim=True) - 1  # [B, 1] of each prompt's last token
    token = prompt_ids[:, -1].contiguous()  # [B] the prompt's last token predicts the first new one
    done = torch.zeros(B, dtype=torch.bool, device=device)  # [B] has drawn an end-of-reply id
    model.eval()  # no dropout while sampling
    with autocast:
        cache = prompt_cache(model, encoded.input_ids, encoded.attention_mask, num_generations)
        decoder = model.get_decoder()
        if compiled:  # the same shapes at every step of every batch: compiled once (Part 2)
            cache, attention_mask, decoder = compiled_decoding(model, cache, attention_mask)
        for t in range(T):
            hidden = decoder(input_ids=token[:, None], cache=cache, attention_mask=attention_mask,
                             position_ids=position + t).last_hidden_state  # [B, 1, H]
            logits = model.get_output_embeddings()(hidden[:, -1]).float()  # [B, V]
            token = sample_tokens(logits, temperature).masked_fill(done, tokenizer.pad_token_id)
            completion_ids[:, t] = token
            done |= torch.isin(token, eos_ids)
            if done.all():  # every row has ended
                break
    completion_ids = completion_ids[:, :t + 1]  # [B, T]
    mask = completion_mask(completion_ids, eos_ids.tolist())  # [B, T]
    texts = [tokenizer.decode(ids[:n], skip_special_tokens=True)
             for ids, n in zip(completion_ids, mask.sum(dim=1))]
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, ~done, texts)

def sample_tokens(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) by inverse CDF: one uniform number
    per row, not one per vocabulary entry. Temperature 0: the most likely token."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # [B]
    probs = torch.softmax(logits / temperature, dim=-1)  # [B, V]
    if probs.device.type in NO_FLOAT64:  # MPS: torch's own draw in float32, redrawn where MPS
        tokens = torch.multinomial(probs, 1).squeeze(-1)  # [B]  drew a token of probability 0
        while (wrong := probs.gather(-1, tokens[:, None]).squeeze(-1) == 0).any():  # pytorch#192577
            tokens[wrong] = torch.multinomial(probs[wrong], 1).squeeze(-1)
        return tokens
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
    components = {name: torch.tensor(fn(completions, answers), dtype=torch.float32)
                  for name, fn in REWARD_FUNCTIONS.items()}
    total = sum(weights[name] * reward for name, reward in components.items())
    return total, components

def group_advantages(rewards: torch.Tensor, group_size: int, std: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
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

def process_advantages(steps: list[list[tuple[int, float]]], group_size: int, length: int,
                       eps: float = 1e-4) -> torch.Tensor:
    """Process supervision (the paper's section 4.1.3). steps[i]: (token index, reward) of each step
    of completion i. Each reward normalized over all steps of its group, r̃ = (r - mean(R)) /
    (std(R) + eps); Â_it = Σ r̃ of the steps of completion i ending at t or after. [B, length]"""
    normalized = torch.zeros(len(steps), length)  # [B, T]: r̃ at the token that ends its step
    for g in range(0, len(steps), group_size):
        R = torch.tensor([r for i in range(g, g + group_size) for _, r in steps[i]])  # the group's
        if R.unique().numel() > 1:  # one step, or equal rewards: Â = 0, as with outcomes
            for i in range(g, g + group_size):
                for t, r in steps[i]:
                    normalized[i, t] += (r - R.mean()) / (R.std() + eps)
    return reward_to_go(normalized)

def reward_to_go(rewards: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T]: at t, the sum of the rewards at t and after it."""
    return rewards.flip(1).cumsum(dim=1).flip(1)

# ---- 4. Log-probs of the completion tokens ------------------------------------------------------
def per_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    completion_length: int, temperature: float = 1.0, chunk_size: int = 1024):
    """log π(o_t | q, o_<t) = logit[o_t] - logsumexp(logits) of the last `completion_length` tokens
    of each row, logits = lm_head(h) / temperature (the sampler's, or another policy is scored),
    over chunks of tokens recomputed in backward: no [B, T, V] tensor ever exists."""
    T = completion_length
    first = int(attention_mask.any(dim=0).int().argmax())  # columns of padding only: drop them
    input_ids, attention_mask = input_ids[:, first:], attention_mask[:, first:]  # [B, Tp + T]
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # as generate() numbered them
    Tp = input_ids.shape[1] - T
    start, cache = shared_prompt(model, input_ids, attention_mask, Tp)  # one group: its prompt once
    hidden = model.get_decoder()(input_ids=input_ids[:, start:], attention_mask=attention_mask,
                                 position_ids=position_ids[:, start:], cache=cache,
                                 use_cache=cache is not None).last_hidden_state  # [B, *, H]
    hidden = hidden[:, -T - 1:-1].reshape(-1, hidden.shape[-1])  # [B*T, H]: t predicts t + 1
    targets = input_ids[:, -T:]  # [B, T]
    lm_head = model.get_output_embeddings()
    def chunk_logps(h, y):  # [N, H], [N] -> [N]
        logits = lm_head(h).float() / temperature  # [N, V]
        return logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)
    chunks = []
    for i in range(0, hidden.shape[0], chunk_size):
        args = (hidden[i:i + chunk_size], targets.reshape(-1)[i:i + chunk_size])
        chunks.append(checkpoint(chunk_logps, *args, use_reentrant=False)
                      if torch.is_grad_enabled() else chunk_logps(*args))
    return torch.cat(chunks).view_as(targets)  # [B, T]

# ---- 5. The loss --------------------------------------------------------------------------------
def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str,
                old_logp: torch.Tensor | None = None) -> torch.Tensor:
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

def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, beta: float, epsilon_low: float,
              epsilon_high: float, loss_type: str, max_completion_length: int,
              kl_estimator: str = "k3_ratio", num_sequences: int | None = None,
              num_tokens: int | None = None):
    """The negated GRPO objective, and its diagnostics. Per token, Â_it given per token ([B, T]) or
    per completion ([B]: the same on each of its tokens),
        X_it = -min(ρ_it Â_it, clip(ρ_it, 1 - ε_low, 1 + ε_high) Â_it) + β KL_it, then
    grpo: 1/B Σ_i 1/|o_i| Σ_t X_it (the paper); dapo: Σ_it X_it / Σ_i |o_i|; dr_grpo:
    Σ_it X_it / (B * max_completion_length). B, Σ|o_i|: the whole batch's (micro-batches sum).
    k1_to_go: no KL_it; Â_it - β Σ_{t' >= t} k1_it' instead (k1 of the sample: of π_θ_old)."""
    mask = mask.float()  # [B, T]
    ratio = torch.exp(logp - old_logp)  # [B, T]
    A = advantages.view(len(logp), -1)  # [B, 1] one per completion, or [B, T] one per token
    in_reward = kl_estimator == "k1_to_go" and ref_logp is not None
    if in_reward:  # the KL of the whole completion as a reward-to-go: through ρ, like a reward
        A = A - beta * reward_to_go((old_logp - ref_logp) * mask)  # [B, T]
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)  # [B, T]
    per_token = -torch.minimum(ratio * A, clipped * A)  # [B, T]
    kind = "k1" if in_reward else kl_estimator  # (k1: what the diagnostics report)
    kl = kl_estimate(logp, ref_logp, kind, old_logp) if ref_logp is not None else None
    if kl is not None and beta != 0 and not in_reward:
        per_token = per_token + beta * kl  # plus: the KL is a penalty on the objective
    num_sequences, num_tokens = num_sequences or logp.shape[0], num_tokens or mask.sum()
    if loss_type == "grpo":
        per_sequence = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B]
        loss = per_sequence.sum() / num_sequences
    elif loss_type in ("dapo", "bnpo"):  # bnpo: its former name (TRL's bnpo is per micro-batch)
        loss = (per_token * mask).sum() / num_tokens
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (num_sequences * max_completion_length)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    def token_mean(x):
        return ((x.float() * mask).sum() / mask.sum().clamp(min=1)).item()
    with torch.no_grad():
        diagnostics = {"kl": token_mean(kl) if kl is not None else 0.0,
                       "clip/low_frac": token_mean((ratio < 1 - epsilon_low) & (A < 0)),
                       "clip/high_frac": token_mean((ratio > 1 + epsilon_high) & (A > 0)),
                       "ratio_mean": token_mean(ratio)}
    return loss, diagnostics

# ---- One step, the loop ------------------------------------------------------------------------
def grpo_step(policy, reference, tokenizer, optimizer, rows: list[dict], cfg: Config,
              autocast=nullcontext()):
    """One GRPO step on `rows` (P questions). Returns (metrics, rollout, rewards, advantages)."""
    G, times, device = cfg.num_generations, {}, next(policy.parameters()).device
    with timed(times, "time/generate", device):  # 1. G completions per question
        rollout = generate_completions(policy, tokenizer, [r["prompt"] for r in rows], G,
                                       cfg.max_completion_length, cfg.temperature, autocast,
                                       cfg.compile)
    mask, (B, T) = rollout.completion_mask, rollout.completion_mask.shape  # [B, T]
    with timed(times, "time/score", device):  # 2. rewards, 3. advantages within each group
        answers = [r["answer"] for r in rows for _ in range(G)]
        weights = {name: getattr(cfg, f"{name}_weight") for name in REWARD_FUNCTIONS}
        rewards, components = score_completions(rollout.texts, answers, weights)  # [B]
        std = "batch" if cfg.advantage == "grpo_batch_std" else "group"
        advantages = group_advantages(rewards, G, "none" if cfg.loss_type == "dr_grpo" else std)
        if cfg.advantage == "online_rft":  # the paper's eq. 10: 1 for a right answer, else 0
            advantages = components["answer"]
        if cfg.supervision == "process":  # the reply's reward is its last step's: the answer's
            steps = [[*step_token_ends(tokenizer, ids[:n], text), (n - 1, reward)]
                     for ids, n, text, reward in zip(rollout.completion_ids.tolist(),
                     mask.sum(dim=1).tolist(), rollout.texts, rewards.tolist())]
            advantages = process_advantages(steps, G, T)  # [B, T]
        advantages = advantages.to(device)
    # 4. Log-probs fixed during the update: old policy (mu or mini-batches > 1), reference (beta).
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)  # [B, Tp + T]
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    with timed(times, "time/logps", device):
        old_logp, ref_logp = None, None
        if cfg.mu > 1 or cfg.mini_batches > 1:  # π_θ_old: the policy as it sampled
            old_logp = frozen_logps(policy, input_ids, attention_mask, T, cfg, autocast)
        if cfg.beta > 0:  # with LoRA the reference is the policy with its adapter switched off
            with policy.disable_adapter() if reference is None else nullcontext():
                ref_logp = frozen_logps(reference if reference is not None else policy,
                                        input_ids, attention_mask, T, cfg, autocast)
    # 5. mu passes over this batch, an optimizer step per mini-batch, over micro-batches each.
    loss_settings = {name: getattr(cfg, name) for name in ("beta", "epsilon_low", "epsilon_high",
                     "loss_type", "max_completion_length", "kl_estimator")}
    losses, diagnostics = [], []
    with timed(times, "time/update", device):
        policy.train()
        batches = [b for _ in range(cfg.mu) for b in torch.arange(B).chunk(cfg.mini_batches)]
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            loss_settings.update(num_sequences=len(batch), num_tokens=int(mask[batch].sum()))
            for mb in batch.split(cfg.micro_batch_size):
                with autocast:
                    logp = per_token_logps(policy, input_ids[mb], attention_mask[mb], T,
                                           cfg.temperature, cfg.logp_chunk_size)  # [b, T]
                old = old_logp[mb] if old_logp is not None else logp.detach()  # mu = 1: ratio 1
                ref = ref_logp[mb] if ref_logp is not None else None
                loss, diag = grpo_loss(logp, old, ref, advantages[mb], mask[mb], **loss_settings)
                require_finite(loss, "the loss")
                loss.backward()
                losses.append(loss.item())
                diagnostics.append((int(mask[mb].sum()), diag))
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            require_finite(grad_norm, "the gradient")
            optimizer.step()
    policy.eval()
    metrics = step_metrics(rollout, rewards, components, G, sum(losses) / len(batches), grad_norm,
                           optimizer, diagnostics, device)
    return {**times, **metrics}, rollout, rewards, advantages

def train(cfg: Config) -> dict:
    """Run GRPO as configured (the paper's Algorithm 1, one outer iteration); return results."""
    check_config(cfg)
    output_dir, device = Path(cfg.output_dir), pick_device(cfg.device)
    cfg = replace(cfg, compile=compiles_by_default(device) if cfg.compile is None else cfg.compile)
    check_output_dir(cfg)
    autocast = autocast_for(device, cfg.precision)
    torch.manual_seed(cfg.seed)
    quiet_libraries()
    settings = (cfg.dataset_config, cfg.arithmetic_max, cfg.seed, cfg.example_turn)  # data first:
    train_rows = load_dataset_rows(cfg.dataset, "train", *settings)  # bad data fails fast
    eval_rows = load_dataset_rows(cfg.dataset, "test", *settings)[:cfg.eval_size]
    resume_from = latest_checkpoint(output_dir) if cfg.resume else None
    tokenizer = load_tokenizer(str(resume_from or cfg.model), cfg.trust_remote_code)
    policy, reference = load_policy_and_reference(cfg, device, resume_from)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    start_step, results = resume_run(cfg, resume_from, optimizer)
    evaluation = (eval_rows, cfg.eval_batch_size, cfg.max_completion_length, autocast, cfg.compile)
    if resume_from is None and cfg.eval_size:
        results["before"] = evaluate(policy, tokenizer, *evaluation)
        print(f"before training: {results['before']}")
    write_results(cfg, results)
    completed = start_step  # steps whose update the weights hold
    bar = tqdm(range(start_step, cfg.max_steps), "GRPO", initial=start_step, total=cfg.max_steps)
    try:
        for step in until_ctrl_c(bar):  # Ctrl-C lets the step in progress finish
            rows = rows_for_step(train_rows, step, cfg.prompts_per_step, cfg.seed)
            metrics, rollout, rewards, _ = grpo_step(policy, reference, tokenizer, optimizer, rows,
                                                     cfg, autocast)
            log_step(output_dir, step + 1, metrics, bar)
            completed = step + 1  # the weights hold this update
            log_samples(cfg, completed, rows[0], rollout.texts, rewards)  # every N steps, the last
            if cfg.ref_sync_every and reference is not None and completed % cfg.ref_sync_every == 0:
                reference.load_state_dict(policy.state_dict())  # iterative GRPO: catch up
            if cfg.save_every and completed % cfg.save_every == 0:
                save_checkpoint(output_dir, completed, policy, reference, tokenizer, optimizer, cfg)
    except (FloatingPointError, KeyboardInterrupt) as stop:  # a NaN, or Ctrl-C
        stop_run(output_dir, completed, stop, policy, reference, tokenizer, optimizer, cfg)
    bar.close()
    final = save_checkpoint(output_dir, cfg.max_steps, policy, reference, tokenizer, optimizer, cfg)
    results["final_checkpoint"] = str(final)
    plot_curves(output_dir / "metrics.jsonl", output_dir / "curves.png")
    if cfg.eval_size:
        results["after"] = evaluate(policy, tokenizer, *evaluation)
        print(f"after training: {results['after']}")
    results["steps"] = cfg.max_steps
    compiled_decoder.cache_clear()  # the compiled decoding step and its caches: freed
    return write_results(cfg, results)

# ==== Part 2: Machinery (flags, devices, loading, checkpoints, logs, main) ========================
LOSS_TYPES, KL_ESTIMATORS = ("grpo", "dapo", "dr_grpo"), ("k1", "k2", "k3", "k3_ratio")
# What --resume may change (length, step size, machine, memory, logs); the rest is the run's own.
CHANGEABLE_ON_RESUME = ("resume", "max_steps", "output_dir", "learning_rate", "weight_decay",
    "max_grad_norm", "micro_batch_size", "gradient_checkpointing", "precision", "logp_chunk_size",
    "device", "compile", "trust_remote_code", "eval_batch_size", "log_samples_every", "save_every")

def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
def flag(name: str) -> str:
    return "--" + name.replace("_", "-")
CHOICES = {"loss_type": (*LOSS_TYPES, "bnpo"), "kl_estimator": (*KL_ESTIMATORS, "k1_to_go"),
           "advantage": ("grpo", "grpo_batch_std", "online_rft"),
           "supervision": ("outcome", "process"),
           "precision": ("auto", "fp32", "bf16"), "device": ("auto", "cuda", "mps", "cpu")}

def flag_parser(prog: str = "grpo.py") -> argparse.ArgumentParser:
    """Every Config field as a flag; one not typed stays out of the namespace (no default)."""
    docs = {name: text.replace("%", "%%") for name, text in  # argparse formats % in help
            re.findall(r"^    (\w+): .+?  # (.+)$", inspect.getsource(Config), re.MULTILINE)}
    parser = argparse.ArgumentParser(prog, description="GRPO in one file. Example, nothing from "
        "the Hub: python grpo.py --model ./chat-model --dataset arithmetic --max-steps 80",
        allow_abbrev=False, argument_default=argparse.SUPPRESS,
        formatter_class=lambda prog: argparse.HelpFormatter(prog, width=100))  # LORA_TARGETS whole
    parser._negative_number_matcher = re.compile(r"-\.?\d")  # "-1e-6" a value (as Python 3.13)
    for f in fields(Config):
        kind = (dict(action=argparse.BooleanOptionalAction) if "bool" in str(f.type)
                else dict(type=type(f.default), choices=CHOICES.get(f.name)))
        shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
        shown = "unset" if f.default is None else shown
        parser.add_argument(flag(f.name), help=f"{docs[f.name]} (default: {shown})", **kind)
    return parser

def parse_args(argv: list[str] | None = None, parser=None) -> Config:
    """The flags typed as a Config; on --resume, those not typed keep the run's (not --compile)."""
    typed = vars((parser or flag_parser()).parse_args(argv))  # only the flags typed: no defaults
    typed = {k: v for k, v in typed.items() if k in Config.__dataclass_fields__}  # no runner's own
    run = typed.get("resume") and run_config(Path(typed.get("output_dir", Config.output_dir))) or {}
    kept = set(Config.__dataclass_fields__) - set(typed) - {"resume", "compile"}  # compile: here
    return Config(**{k: v for k, v in run.items() if k in kept}, **typed)

def check_config(cfg: Config) -> None:
    """Fail at once, with the fix, on settings that would otherwise fail late or silently."""
    require(cfg.num_generations >= 2, f"--num-generations is {cfg.num_generations}; GRPO "
            "compares completions within a group, so use 2 or more (8 is usual).")
    for name in ("prompts_per_step max_completion_length max_steps mu mini_batches temperature "
                 "micro_batch_size logp_chunk_size eval_batch_size learning_rate arithmetic_max"
                 ).split():
        require(getattr(cfg, name) > 0, f"{flag(name)} is {getattr(cfg, name)}; it must be > 0.")
    for name in ("eval_size", "save_every", "log_samples_every", "ref_sync_every", "lora_r",
                 "beta", "weight_decay"):
        require(getattr(cfg, name) >= 0, f"{flag(name)} is {getattr(cfg, name)}; it must be >= 0.")
    require(cfg.kl_estimator != "k1", "--kl-estimator k1: as a loss its gradient is 0 in "
            "expectation on policy: it regularizes nothing. Use k3_ratio (the default), k3 or k2.")
    require(0 <= cfg.epsilon_low < 1 and cfg.epsilon_high >= 0, f"clip range [1 - "
            f"{cfg.epsilon_low}, 1 + {cfg.epsilon_high}]: use 0 <= epsilon-low < 1 <= 1 + high.")
    for name, choices in CHOICES.items():
        require(getattr(cfg, name) in choices, f"{flag(name)} {getattr(cfg, name)!r} is "
                                               f"unknown; choose one of {', '.join(choices)}.")
    require(cfg.prompts_per_step * cfg.num_generations % cfg.mini_batches == 0, f"--mini-batches "
            f"{cfg.mini_batches} must divide a step's completions, P*G.")
    require(cfg.supervision == "outcome" or cfg.advantage == "grpo", "--supervision process "
            "normalizes the steps' rewards over their group: use it with --advantage grpo.")
    require(not (cfg.lora_r and cfg.ref_sync_every), "--ref-sync-every needs full fine-tuning: "
            "with LoRA the reference is the base model itself. Set one of them to 0.")
    check_sources(cfg.model, cfg.dataset)  # paths that exist, or Hub ids: reachable, or cached

def run_config(output_dir: Path) -> dict:
    """The settings of the run in output_dir: its latest checkpoint's, else results.json's."""
    latest = latest_checkpoint(output_dir)
    path = latest / "trainer_state.json" if latest else output_dir / "results.json"
    return json.loads(path.read_text()).get("config") or {} if path.exists() else {}

def check_output_dir(cfg: Config) -> None:
    """A fresh output_dir; with --resume, a run there of the same settings but CHANGEABLE's."""
    out, latest = Path(cfg.output_dir), latest_checkpoint(Path(cfg.output_dir))
    started = latest is not None or (out / "metrics.jsonl").exists()
    require(cfg.resume or not started, f"{out} already holds a run. Pass --resume to go on"
            f"{' (no checkpoint yet: from step 0)' * (latest is None)}, or another --output-dir.")
    require(started or not cfg.resume, f"--resume: {out} holds no run (no checkpoint-*, no "
                                       "metrics.jsonl). Drop --resume to start a new run there.")
    run = run_config(out) if cfg.resume else {}
    step = json.loads((latest / "trainer_state.json").read_text())["step"] if latest else 0
    require(cfg.max_steps > step, f"--resume: the run in {out} is already at step {step}; pass a "
                                  "larger --max-steps.")
    differ = [f"{flag(name)} {value!r} (now {getattr(cfg, name)!r})" for name, value in run.items()
              if name not in CHANGEABLE_ON_RESUME and value != getattr(cfg, name, value)]
    require(not differ, f"--resume: the run in {out} has {', '.join(differ)}. Pass the run's "
                        "own values, or choose another --output-dir for a new run.")
    for name in CHANGEABLE_ON_RESUME[1:]:  # not "resume"
        if run.get(name, getattr(cfg, name)) != getattr(cfg, name):
            print(f"--resume: {flag(name)} {run[name]!r} -> {getattr(cfg, name)!r}")

# ---- Devices, precision, time and memory, the prompt's cache, the compiled decoding step --------
GPUS = {"cuda": torch.cuda, "mps": torch.mps}  # each with is_available and its random state
NO_FLOAT64 = {"mps"}  # devices without float64: sample_tokens draws there with torch.multinomial

def pick_device(name: str) -> torch.device:
    found = [kind for kind, gpu in GPUS.items() if gpu.is_available()] + ["cpu"]
    name = found[0] if name == "auto" else name
    require(name in found, f"--device {name}: torch finds none. Use --device auto.")
    return torch.device(name)
def autocast_for(device: torch.device, precision: str):
    """bf16 autocast over fp32 weights (bf16 weights lose AdamW's updates), or nothing. "auto": bf16
    on GPUs with native bf16 (A100, L4, RTX 30xx, H100), else fp32 (Qwen2 overflows in fp16)."""
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "bf16" or (precision == "auto" and native):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()

@contextmanager
def timed(metrics: dict, key: str, device: torch.device):
    """Add the seconds spent inside the block to metrics[key] (waiting for the GPU to finish)."""
    synchronize = getattr(torch, device.type).synchronize  # torch.cpu's waits for nothing
    synchronize()
    start = time.perf_counter()
    yield
    synchronize()
    metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - start

def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory: torch's on CUDA, none on MPS (no counter), else the process's resident."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if device.type == "mps" or sys.platform == "win32":  # no peak counter; no `resource`
        return None  # null in metrics.jsonl (NaN is no JSON)
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, else KiB

def frozen_logps(model, input_ids, attention_mask, completion_length: int, cfg: Config, autocast):
    """Log-probs that the update does not change (old policy, reference), in micro-batches."""
    mb = cfg.micro_batch_size
    with torch.no_grad(), autocast:
        return torch.cat([per_token_logps(model, input_ids[i:i + mb], attention_mask[i:i + mb],
                                          completion_length, cfg.temperature, cfg.logp_chunk_size)
                          for i in range(0, len(input_ids), mb)])  # [B, T]
def shared_prompt(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, Tp: int):
    """(Tp - 1, its cache) if all rows share a prompt of Tp > 1 tokens, else (0, None); (0, None)
    under checkpointing too, so that all passes compute alike."""
    prompts = torch.stack([input_ids[:, :Tp], attention_mask[:, :Tp]])  # [2, B, Tp]
    one_prompt = len(input_ids) > 1 and Tp > 1 and bool((prompts == prompts[:, :1]).all())
    if not one_prompt or any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        return 0, None
    return Tp - 1, prompt_cache(model, input_ids[:1, :Tp], attention_mask[:1, :Tp], len(input_ids))
def prompt_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, repeats: int):
    """Keys and values of each prompt but its last token, computed once and repeated for its G
    completions. The pass that takes the cache feeds the last token: it predicts the first one."""
    position_ids = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: real tokens only
    cache = model.get_decoder()(input_ids=prompt_ids[:, :-1], attention_mask=prompt_mask[:, :-1],
                                position_ids=position_ids[:, :-1], use_cache=True).cache
    cache.batch_repeat_interleave(repeats)  # row i of the cache is prompt i // repeats
    return cache
def compiled_decoding(model, cache, attention_mask: torch.Tensor, bucket: int = 256):
    """The prompts' cache copied into a static one of L >= Tp + T slots (a multiple of `bucket`),
    the mask padded to L, and the decoder compiled: each step of B rows has the same shapes."""
    if any(layer.is_sliding for layer in cache.layers):  # its cache keeps a window, not the prompt
        say_once("--compile: this model has sliding-window attention layers: decoding runs eager")
        return cache, attention_mask, model.get_decoder()
    B, L = len(attention_mask), -(-attention_mask.shape[1] // bucket) * bucket
    decoder, caches, shapes = compiled_decoder(model)  # a CUDA graph holds its cache's tensors
    for key in [key for key in caches if key[0] != B]:  # another batch size's (evaluation's, or
        del caches[key]  # training's): freed, and made again if it comes back
    shapes.add(key := (B, L, cache.layers[0].keys.dtype))
    static = caches.setdefault(key, StaticCache(model.config, L))
    if len(shapes) > torch._dynamo.config.cache_size_limit:  # past it, dynamo runs it eager
        say_once("--compile: more batch shapes than torch compiles for one function: decoding "
                 "runs uncompiled, slower than --no-compile. Use --no-compile.")
    static.reset()
    for i, layer in enumerate(cache.layers):
        static.update(layer.keys, layer.values, i)
    mask = torch.nn.functional.pad(attention_mask, (0, L - attention_mask.shape[1]))  # [B, L]
    return static, mask, decoder

@functools.cache  # once per model (train frees it): on CUDA as CUDA graphs (one launch per step)
def compiled_decoder(model):
    mode = "reduce-overhead" if next(model.parameters()).is_cuda else None
    return torch.compile(model.get_decoder(), mode=mode, dynamic=False), {}, set()
say_once = functools.cache(print)
def compiles_by_default(device: torch.device) -> bool:  # where it is faster: bench/README.md
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None and \
        torch.cuda.get_device_capability(device) >= (7, 0)  # Triton's GPUs: V100 and later

# ---- Models, LoRA -------------------------------------------------------------------------------
def load_model(name: str, device: torch.device, dtype=torch.float32, trust_remote_code=False):
    """A causal LM from safetensors weights, in `dtype`, on `device`."""
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--model {name!r} cannot be loaded ({error}). Pass a causal LM with "
                          "safetensors weights.") from None
    ids = torch.arange(4)[None]  # [1, 4] any few tokens
    with torch.no_grad():
        try:
            ours = model.get_output_embeddings()(model.get_decoder()(ids).last_hidden_state)
        except AttributeError as error:
            raise ConfigError(f"--model {name!r}: its decoder or output layer cannot be reached "
                              f"({error}). Use a Llama- or Qwen-like model.") from None
        expected = model(input_ids=ids).logits  # [1, 4, V]
    require(torch.allclose(ours, expected, atol=1e-4),  # the same products, up to rounding
            f"--model {name!r} transforms its logits after the output layer (soft-capping or "
            "scaling), which per_token_logps does not reproduce. Use another model.")
    for module in model.modules():  # no dropout: training scores the policy that sampled (eval)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "attention_dropout", None), float):  # Llama's, Qwen2's
            module.attention_dropout = 0.0
    return model.to(device)

def add_lora(model, cfg: Config, adapter_dir: Path | None = None):
    """Wrap `model` with LoRA adapters (new, or saved in `adapter_dir`); the base stays frozen."""
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        raise ConfigError("--lora-r needs the peft library: pip install peft") from None
    quiet_libraries()  # and no notice of peft's read of an attribute transformers 5 deprecates
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,  # one policy
                      target_modules=cfg.lora_target_modules.split(","), task_type="CAUSAL_LM")
    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    try:
        return get_peft_model(model, lora)
    except ValueError as error:  # no module of the model has one of these names
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"--lora-target-modules {cfg.lora_target_modules!r}: {error} "
                          f"This model's linear layers are named: {','.join(linear)}.") from None

def load_policy_and_reference(cfg: Config, device: torch.device, checkpoint_dir=None):
    """The trainable policy (fp32) and the frozen reference (None if beta = 0 or with LoRA)."""
    remote, reference = cfg.trust_remote_code, None
    weights = cfg.model if cfg.lora_r or checkpoint_dir is None else str(checkpoint_dir)
    low = cfg.lora_r and cfg.learning_rate == Config.learning_rate  # LoRA wants ~10x (README)
    print(f"loading the policy: {weights}" + f", LoRA rank {cfg.lora_r}" * (cfg.lora_r > 0) + (
          "; note: --learning-rate 1e-06 is full fine-tuning's, LoRA wants about 10x more" * low))
    policy = load_model(weights, device, trust_remote_code=remote)
    if cfg.lora_r:  # the base model, then its adapter: new, or the checkpoint's
        policy = add_lora(policy, cfg, checkpoint_dir)
    if cfg.beta > 0 and not cfg.lora_r:  # fp32: in bf16 the step-0 KL is 1.4e-3, not 0
        synced = checkpoint_dir is not None and cfg.ref_sync_every
        weights = str(checkpoint_dir / "reference" if synced else cfg.model)
        print(f"loading the reference: {weights}")
        reference = load_model(weights, device, torch.float32, remote).eval().requires_grad_(False)
    checkpointed = [m for m in (policy, reference) if m is not None and cfg.gradient_checkpointing]
    for model in checkpointed:  # the reference too: its passes then compute as the policy's
        model.activation_checkpointing_enable({"use_reentrant": False})  # torch recommends it
        if cfg.lora_r:  # frozen embeddings: give checkpointed layers an input with grad
            policy.enable_input_require_grads()
    return policy, reference

# ---- Checkpoints, resume, stops -----------------------------------------------------------------
def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted(output_dir.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None
def save_checkpoint(output_dir: Path, step: int, policy, reference, tokenizer, optimizer, cfg):
    """checkpoint-<step> (weights or adapter, tokenizer, optimizer, RNG), then the old one goes."""
    path, tmp = output_dir / f"checkpoint-{step}", output_dir / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)  # safetensors; only the adapter with LoRA
    tokenizer.save_pretrained(tmp)
    if reference is not None and cfg.ref_sync_every:
        reference.save_pretrained(tmp / "reference")
    rng = {"torch": torch.get_rng_state()}  # and each GPU's (the one in use)
    rng.update({kind: gpu.get_rng_state() for kind, gpu in GPUS.items() if gpu.is_available()})
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp / "trainer_state.pt")
    state = {"step": step, "config": asdict(cfg)}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    old = latest_checkpoint(output_dir)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    if old is not None and old != path:
        shutil.rmtree(old)
    return path

def resume_run(cfg: Config, checkpoint_dir: Path | None, optimizer) -> tuple[int, dict]:
    """(first step, results so far) from a checkpoint, or (0, {}); later logged steps go."""
    output_dir, step, results = Path(cfg.output_dir), 0, {}
    output_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint_dir is not None:  # map_location: a GPU's checkpoint resumes on a CPU too
        state = torch.load(checkpoint_dir / "trainer_state.pt", "cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # the saved state holds the old values; flags win
            group.update(lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        torch.set_rng_state(state["rng"]["torch"])
        for kind, gpu in GPUS.items():  # a GPU's, where the run goes on on the same kind of GPU
            if kind in state["rng"] and gpu.is_available():
                gpu.set_rng_state(state["rng"][kind])
        step = json.loads((checkpoint_dir / "trainer_state.json").read_text())["step"]
        results = json.loads((output_dir / "results.json").read_text())
    if cfg.resume:
        print(f"resuming from {checkpoint_dir or 'no checkpoint yet: the start'} at step {step}")
    for path in (output_dir / "metrics.jsonl", output_dir / "samples.jsonl"):  # to be run again
        if path.exists():  # (no checkpoint: all of it)
            append_jsonl(path, [r for r in read_jsonl(path) if r["step"] <= step], mode="w")
    return step, results

def until_ctrl_c(steps):
    """Yield `steps`; Ctrl-C only sets a flag, read between steps (twice: stop now, unsaved)."""
    pressed = []
    def on_ctrl_c(signum, frame):
        if pressed:
            raise SystemExit("\nstopped unsaved: --resume goes on from the last save, or step 0")
        pressed.append(signum)
        print("\nCtrl-C: saving when this step ends (Ctrl-C again: stop now, without saving)")
    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        for step in steps:
            yield step
            if pressed:  # the step is whole: the loop's Ctrl-C handling saves it
                raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, previous)

def stop_run(output_dir: Path, completed: int, reason: BaseException, *to_save) -> None:
    """Exit on a NaN (keeping the last good checkpoint) or on Ctrl-C (saving the steps done)."""
    if isinstance(reason, FloatingPointError):
        sys.exit(f"step {completed + 1}: {reason} --resume goes on from the last good checkpoint"
                 f" ({latest_checkpoint(output_dir) or 'none yet: step 0'}).")
    path = save_checkpoint(output_dir, completed, *to_save)
    plot_curves(output_dir / "metrics.jsonl", output_dir / "curves.png")
    sys.exit(f"\ninterrupted: saved {path}; continue with --resume --output-dir {output_dir}")

# ---- Evaluation, metrics, the silent failures, logs, plots, main --------------------------------
PATIENCE, MOST, KL_LIMIT = 3, 0.5, 0.5  # steps in a row; a fraction of the batch; KL per token
DIAGNOSTICS = {  # said once by log_step: name: (steps in a row, condition, what it means and to do)
    "truncated": (PATIENCE, lambda m: m["completion/truncated_frac"] > MOST, "most completions "
                  "end unfinished: raise --max-completion-length, or check the end-of-reply ids."),
    "equal_rewards": (PATIENCE, lambda m: m["groups/zero_std_frac"] > MOST, "most groups have "
                      "equal rewards: the task is too easy or too hard. Raise G, or change data."),
    "no_format": (PATIENCE, lambda m: m["reward/format"] == 0, "the format reward is 0: the "
                  "model never writes the tags. Keep --example-turn, or change the prompt."),
    "zero_gradient": (PATIENCE, lambda m: m["grad_norm"] == 0, "the gradient is 0: the weights "
                      "do not change. No group has an advantage, or nothing is trainable."),
    "kl": (1, lambda m: m["kl"] > KL_LIMIT, f"the KL passed {KL_LIMIT} per token: the policy "
           "drifts from the reference. Lower --learning-rate or raise --beta."),
}

def require_finite(value: torch.Tensor, what: str) -> None:
    if not torch.isfinite(value):
        raise FloatingPointError(f"{what} is not finite. Lower --learning-rate, or use fp32.")
def step_metrics(rollout: Rollout, rewards, components, group_size: int, loss: float, grad_norm,
                 optimizer, diagnostics: list[tuple[int, dict]], device) -> dict:
    """One line of metrics.jsonl (README: Reading the metrics)."""
    lengths = rollout.completion_mask.sum(dim=1).float()  # [B]
    grouped = rewards.view(-1, group_size)  # [P, G]
    tokens = sum(n for n, _ in diagnostics)  # token-weighted means below: micro-batches, mu passes
    parts = {"total": rewards, **components}
    return {
        **{f"reward/{name}": r.mean().item() for name, r in parts.items()},
        **{f"reward/{name}_std": r.std().item() for name, r in parts.items()},
        "accuracy": (components["answer"] == 1).float().mean().item(),
        "format_rate": (components["format"] == 1).float().mean().item(),  # strictly formatted
        "groups/zero_std_frac": (grouped == grouped[:, :1]).all(dim=1).float().mean().item(),
        "completion/len_mean": lengths.mean().item(), "completion/len_max": lengths.max().item(),
        "completion/truncated_frac": rollout.truncated.float().mean().item(),
        **step_statistics(rollout.texts),  # steps/: per reply, how many hold, how many repeat
        "loss": loss, "grad_norm": grad_norm.item(), "lr": optimizer.param_groups[0]["lr"],
        **{key: sum(n * d[key] for n, d in diagnostics) / tokens for key in diagnostics[0][1]},
        "memory/peak_mb": peak_memory_mb(device)}

def evaluate(model, tokenizer, rows: list[dict], batch_size: int = 32,
             max_completion_length: int = 512, autocast=nullcontext(), compiled=False) -> dict:
    """Greedy accuracy (answer reward = 1) and format rate (strict format) on `rows`."""
    texts, n = [], max(len(rows), 1)
    for i in tqdm(range(0, len(rows), batch_size), "evaluating", disable=None, leave=False):
        prompts = [r["prompt"] for r in rows[i:i + batch_size]]
        texts += generate_completions(model, tokenizer, prompts, 1, max_completion_length, 0.0,
                                      autocast, compiled).texts
    correct = REWARD_FUNCTIONS["answer"](texts, [r["answer"] for r in rows])
    formatted = [r == 1.0 for r in format_reward(texts)]  # the strict format only
    return {"accuracy": sum(correct) / n, "format_rate": sum(formatted) / n, "n": len(rows)}

def read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]
def append_jsonl(path: Path, records: list[dict], mode: str = "a") -> None:
    with path.open(mode) as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))

def log_step(output_dir: Path, step: int, metrics: dict, bar) -> None:
    history = [*read_jsonl(output_dir / "metrics.jsonl"), metrics]
    said = {name for m in history[:-1] for name in m.get("diagnostics", {})}
    for name, (steps, holds, message) in DIAGNOSTICS.items():
        if name not in said and len(history) >= steps and all(map(holds, history[-steps:])):
            metrics.setdefault("diagnostics", {})[name] = message
            bar.write(f"step {step}: {message}")
    append_jsonl(output_dir / "metrics.jsonl", [{"step": step, **metrics}])
    bar.set_postfix(reward=f"{metrics['reward/total']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                    kl=f"{metrics['kl']:.4f}", refresh=False)  # drawn at the bar's own pace

def log_samples(cfg: Config, step: int, row: dict, texts: list[str], rewards) -> None:
    if cfg.log_samples_every and (step % cfg.log_samples_every == 0 or step == cfg.max_steps):
        append_jsonl(Path(cfg.output_dir) / "samples.jsonl", [
            {"step": step, "question": row["question"], "gold": row["answer"], "completion": text,
             "reward": reward.item()} for text, reward in zip(texts[:2], rewards)])

def write_results(cfg: Config, results: dict) -> dict:
    results["diagnostics"] = {name: f"step {m['step']}: {text}" for m in read_jsonl(
        Path(cfg.output_dir) / "metrics.jsonl") for name, text in m.get("diagnostics", {}).items()}
    results["config"] = asdict(cfg)
    (Path(cfg.output_dir) / "results.json").write_text(json.dumps(results, indent=2))
    return results

def plot_curves(metrics_path: Path, out_path: Path):
    """Reward, accuracy and format rate, KL, completion length per step from metrics.jsonl."""
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's plotting backend alone
    records = read_jsonl(metrics_path)
    if not records:  # no step yet: no picture
        return None
    panels = {"reward/total": "mean reward", "accuracy format_rate":
              "accuracy (answer = 1), format rate (strict)", "kl": "KL(policy || reference)",
              "completion/len_mean": "mean completion length (tokens)"}
    fig = Figure(figsize=(9, 6), dpi=80, layout="tight")
    for ax, (keys, title) in zip(fig.subplots(2, 2).flat, panels.items()):
        for key in keys.split():
            ax.plot([r["step"] for r in records], [r.get(key) for r in records], label=key)
        ax.set(title=title, xlabel="step")
        ax.xaxis.get_major_locator().set_params(integer=True)  # no step 1.5
        ax.legend()
    fig.savefig(out_path)
    return fig

def main(argv: list[str] | None = None) -> None:
    try:
        train(parse_args(argv))
    except ConfigError as error:  # to stderr, exit code 2: as argparse's own errors
        argparse.ArgumentParser().exit(2, f"grpo.py: error: {error}\n")

if __name__ == "__main__":
    main()
