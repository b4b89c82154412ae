"""
GRPO (Group Relative Policy Optimization) in one file, for reading beside the paper.

Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
Models", 2024, arXiv:2402.03300, section 4.1 and Algorithm 1.

One step of GRPO, in the order this file is written:
  1. take P questions and sample G completions for each from the current policy
  2. score every completion with rule-based rewards (rewards.py): no reward model
  3. advantage = reward normalized within its question's group: no critic
  4. per-token log-probs of the completions under the policy, the old policy, the reference
  5. minimize the clipped surrogate loss plus beta * KL(policy || reference), then step AdamW

The objective (the paper's eq. 3), for the G completions o_i of a question q:

  J(θ) = E[ 1/G Σ_i 1/|o_i| Σ_t ( min(ρ_it Â_it, clip(ρ_it, 1-ε, 1+ε) Â_it) - β D_KL[π_θ || π_ref] ) ]
  ρ_it = π_θ(o_it | q, o_i,<t) / π_θ_old(o_it | q, o_i,<t)      Â_it = (r_i - mean(r)) / std(r)

Choices this file makes where the paper leaves room, each a flag:
  - `loss_type`: `grpo` is the paper's 1/G Σ_i 1/|o_i| Σ_t; `bnpo` averages over all tokens
    (DAPO); `dr_grpo` divides by a constant and drops the std from Â (Dr. GRPO).
  - the clip range may be asymmetric, [1 - epsilon_low, 1 + epsilon_high] (DAPO).
  - the KL estimator is k3 (the paper's); k1 and k2 are there to compare.
  - `mu` optimizer steps per generated batch (the paper's μ); with mu = 1 the ratio is 1.
  - the reference model can be reset to the policy every N steps (the paper's iterative GRPO).
  - LoRA (`--lora-r`): the reference is then the policy with its adapter switched off.
  - outcome rewards only (one reward per completion; the paper also tries per-step rewards),
    and a completion without an <answer> block is read by its last number (rewards.py).

Run `python grpo.py --help` for every flag; the defaults train Qwen2.5-0.5B-Instruct on GSM8K.
"""

import argparse
import ast
import inspect
import json
import random
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from rewards import (ANSWER_END, ANSWER_START, REASONING_END, REASONING_START, REWARD_FUNCTIONS,
                     extract_gold_answer, format_reward)

# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # model and data
    model: str = "Qwen/Qwen2.5-0.5B-Instruct"
    """Hub id or local folder of a chat model (it must have a chat template)"""
    dataset: str = "openai/gsm8k"
    """Hub id; a JSON-lines file or a folder with train.jsonl/test.jsonl (question, answer); or `arithmetic`"""
    dataset_config: str = "main"
    """configuration name of a Hub dataset"""
    arithmetic_digits: int = 1
    """difficulty of the built-in `arithmetic` task: digits in each operand of a + b"""
    output_dir: str = "outputs/grpo"
    """where metrics.jsonl, samples.jsonl, curves.png, results.json and checkpoints go"""
    trust_remote_code: bool = False
    """let a Hub model run Python code of its own (only for models you trust)"""

    # sampling: P questions x G completions per step
    max_steps: int = 200
    """number of GRPO steps (each: one generation, then mu optimizer steps)"""
    prompts_per_step: int = 8
    """P: questions per step"""
    num_generations: int = 8
    """G: completions sampled per question (the group)"""
    max_completion_length: int = 512
    """new tokens per completion; a completion cut here is counted as truncated"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed at the same temperature"""

    # rewards (rewards.py): total = format_weight * format + answer_weight * answer
    format_weight: float = 0.5
    """weight of the format reward (<reasoning>...</reasoning><answer>...</answer>)"""
    answer_weight: float = 1.0
    """weight of the answer reward (final number equals the gold one)"""

    # loss
    loss_type: str = "grpo"
    """aggregation over tokens: grpo (paper, per-sequence mean), bnpo (token mean), dr_grpo"""
    beta: float = 0.04
    """KL coefficient; 0 loads no reference model at all"""
    kl_estimator: str = "k3"
    """KL estimator: k1, k2 or k3 (Schulman; the paper uses k3)"""
    epsilon_low: float = 0.2
    """ratio clip below: 1 - epsilon_low"""
    epsilon_high: float = 0.2
    """ratio clip above: 1 + epsilon_high"""
    mu: int = 1
    """optimizer steps per generated batch (the paper's mu)"""
    ref_sync_every: int = 0
    """copy the policy into the reference model every N steps (iterative GRPO); 0 = never"""

    # optimization
    learning_rate: float = 1e-6
    """AdamW learning rate (constant)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    micro_batch_size: int = 8
    """completions per forward/backward pass; changes memory, not the gradient"""
    gradient_checkpointing: bool = False
    """recompute activations in backward: less memory, one more forward pass of time"""
    precision: str = "auto"
    """fp32 or bf16 (autocast over fp32 weights); auto = bf16 on CUDA, fp32 elsewhere"""
    logp_chunk_size: int = 1024
    """tokens per chunk of the vocabulary projection in per_token_logps"""
    device: str = "auto"
    """cuda, mps or cpu; auto picks the first available"""
    seed: int = 0
    """seed for data order, sampling and the arithmetic task"""

    # LoRA (needs `pip install peft`)
    lora_r: int = 0
    """LoRA rank; 0 = full fine-tuning"""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)"""
    lora_dropout: float = 0.0
    """LoRA dropout (0: the sampler and the learner then see the same policy)"""
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """comma-separated module names that get adapters (these fit Qwen2.5 and Llama)"""
    merge_lora: bool = False
    """also save the adapter merged into the base weights, in <output_dir>/merged"""

    # evaluation, logging, checkpoints
    eval_size: int = 200
    """held-out questions scored greedily before and after training; 0 skips"""
    eval_batch_size: int = 32
    """questions per generate call during evaluation"""
    log_samples_every: int = 10
    """write sample completions to samples.jsonl every N steps"""
    save_every: int = 50
    """save a checkpoint every N steps (only the latest is kept); 0 = only at the end"""
    resume: bool = False
    """continue the run in output_dir from its latest checkpoint, up to max_steps (same settings)"""


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cuda", "mps", "cpu")
# What --resume may change: the length, the step size, the machine and memory, and the logging.
# Every other field must be the run's own (a different --dataset or --lora-r would be another run).
CHANGEABLE_ON_RESUME = ("max_steps", "resume", "output_dir", "learning_rate", "weight_decay", "max_grad_norm",
                        "micro_batch_size", "gradient_checkpointing", "precision", "logp_chunk_size", "device",
                        "trust_remote_code", "eval_batch_size", "log_samples_every", "save_every", "merge_lora")


class ConfigError(ValueError):
    """Bad input, found before any long work starts."""


def field_docs(cls) -> dict[str, str]:
    """The one-line docstring under each dataclass field (for --help)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {
        node.target.id: after.value.value
        for node, after in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
    }


def parse_args(argv: list[str] | None = None) -> Config:
    """Every Config field is a flag: `learning_rate` -> `--learning-rate`."""
    parser = argparse.ArgumentParser(
        description="GRPO on GSM8K in one file.", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    docs = {name: doc.replace("%", "%%") for name, doc in field_docs(Config).items()}  # argparse formats %
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=docs[f.name])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=docs[f.name])
    return Config(**vars(parser.parse_args(argv)))


def check_config(cfg: Config) -> None:
    """Fail at once, with the fix, on settings that would otherwise fail late or silently."""
    def require(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    G, P, B = cfg.num_generations, cfg.prompts_per_step, cfg.num_generations * cfg.prompts_per_step
    require(G >= 2, f"--num-generations is {G}; GRPO compares completions within a group, so use 2 or more (8 is usual).")
    require(P >= 1, f"--prompts-per-step is {P}; use 1 or more.")
    require(cfg.micro_batch_size >= 1 and B % cfg.micro_batch_size == 0,
            f"--micro-batch-size {cfg.micro_batch_size} must divide prompts-per-step x num-generations = {B}; "
            f"pick a divisor of {B}.")
    for name in ("max_completion_length", "max_steps", "mu", "logp_chunk_size", "eval_batch_size"):
        value = getattr(cfg, name)
        require(value > 0, f"--{name.replace('_', '-')} is {value}; it must be positive.")
    for name in ("eval_size", "save_every", "log_samples_every", "ref_sync_every", "lora_r", "beta", "weight_decay"):
        value = getattr(cfg, name)
        require(value >= 0, f"--{name.replace('_', '-')} is {value}; it must be 0 or more.")
    require(cfg.temperature > 0, f"--temperature is {cfg.temperature}; sampling needs a positive temperature.")
    require(cfg.learning_rate > 0, f"--learning-rate is {cfg.learning_rate}; it must be positive.")
    require(0 <= cfg.epsilon_low < 1 and cfg.epsilon_high >= 0,
            f"clip range [1 - {cfg.epsilon_low}, 1 + {cfg.epsilon_high}] is invalid; use 0 <= epsilon-low < 1, epsilon-high >= 0.")
    require(cfg.loss_type in LOSS_TYPES, f"--loss-type {cfg.loss_type!r} is unknown; choose one of {', '.join(LOSS_TYPES)}.")
    require(cfg.kl_estimator in KL_ESTIMATORS, f"--kl-estimator {cfg.kl_estimator!r} is unknown; choose one of {', '.join(KL_ESTIMATORS)}.")
    require(cfg.precision in PRECISIONS, f"--precision {cfg.precision!r} is unknown; choose one of {', '.join(PRECISIONS)}.")
    require(cfg.device in DEVICES, f"--device {cfg.device!r} is unknown; choose one of {', '.join(DEVICES)}.")
    require(cfg.device != "cuda" or torch.cuda.is_available(),
            "--device cuda: torch finds no CUDA GPU here (none, or a CPU-only torch build). Use --device auto.")
    require(cfg.device != "mps" or torch.backends.mps.is_available(),
            "--device mps: this machine or torch build has no MPS (Apple GPU). Use --device auto.")
    require(cfg.arithmetic_digits >= 1, f"--arithmetic-digits is {cfg.arithmetic_digits}; use 1 or more.")
    require(not (cfg.lora_r and cfg.ref_sync_every),
            "--ref-sync-every needs full fine-tuning: with LoRA the reference is the base model itself. Set one of them to 0.")
    for name, what in (("model", "model folder"), ("dataset", "data file or folder")):
        source = getattr(cfg, name)
        looks_local = source.startswith((".", "/", "~")) or source.endswith((".json", ".jsonl"))
        require(Path(source).expanduser().exists() or not looks_local,
                f"--{name} {source!r}: no such {what}. Check the path, or pass a Hub id.")
    output_dir = Path(cfg.output_dir)
    if cfg.resume:
        latest = latest_checkpoint(output_dir)
        require(latest is not None, f"--resume: no checkpoint-* folder in {output_dir}. Drop --resume to start a new run there.")
        state = json.loads((latest / "trainer_state.json").read_text())
        require(cfg.max_steps > state["step"],
                f"--resume: the run in {output_dir} is already at step {state['step']}; pass a larger --max-steps.")
        differ = [f"--{name.replace('_', '-')} {value!r} (now {getattr(cfg, name)!r})" for name, value in state["config"].items()
                  if name not in CHANGEABLE_ON_RESUME and value != getattr(cfg, name, value)]
        require(not differ, f"--resume: the run in {output_dir} has {', '.join(differ)}. "
                            "Pass the run's own values, or choose another --output-dir for a new run.")
    else:
        require(latest_checkpoint(output_dir) is None and not (output_dir / "metrics.jsonl").exists(),
                f"{output_dir} already holds a run. Pass --resume to continue it, or choose another --output-dir.")


# ---------------------------------------------------------------------------------------------
# Data and prompts

SYSTEM_PROMPT = (
    "Solve the math problem. First think step by step, then give only the final number. "
    f"Reply in exactly this format:\n{REASONING_START}\n...\n{REASONING_END}\n{ANSWER_START}\n...\n{ANSWER_END}"
)
ARITHMETIC_SPLIT_SIZES = {"train": 10_000, "test": 1_000}


def make_prompt(question: str) -> list[dict]:
    """Chat messages for one question; the tokenizer's chat template turns them into text."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def arithmetic_problems(n: int, digits: int, seed: int, held_out: bool = False) -> list[dict]:
    """`n` synthetic problems "What is a + b?" with operands of up to `digits` digits.

    Pairs with (a + 2b) % 5 == 0 are held out (for the test split); the others are for
    training, so no test problem is ever trained on.
    """
    rng = random.Random(seed)
    largest = 10**digits - 1
    problems = []
    while len(problems) < n:
        a, b = rng.randint(0, largest), rng.randint(0, largest)
        if ((a + 2 * b) % 5 == 0) == held_out:
            problems.append({"question": f"What is {a} + {b}?", "answer": str(a + b)})
    return problems


def load_dataset_rows(source: str, split: str, dataset_config: str = "main", arithmetic_digits: int = 1,
                      seed: int = 0) -> list[dict]:
    """Rows {"question", "prompt" (chat messages), "answer" (gold final answer)} of one split.

    `source` is "arithmetic" (built in, no download), a JSON-lines file (used for every
    split), a folder with `<split>.jsonl`, or a Hub dataset id. Files hold GSM8K's keys:
    "question", and "answer" whose final answer follows '####'.
    """
    path = Path(source).expanduser()
    if source == "arithmetic":
        raw = arithmetic_problems(ARITHMETIC_SPLIT_SIZES[split], arithmetic_digits, seed, held_out=split != "train")
    else:
        from datasets import load_dataset
        from datasets.exceptions import DatasetsError

        if path.is_dir():
            path = path / f"{split}.jsonl"
            if not path.exists():
                raise ConfigError(f"--dataset folder {source!r} has no {split}.jsonl; it needs train.jsonl and test.jsonl.")
        local = path.is_file()
        if local and path.stat().st_size == 0:
            raise ConfigError(f"--dataset file {str(path)!r} is empty; it needs rows with 'question' and 'answer'.")
        try:
            if local:
                raw = load_dataset("json", data_files=str(path), split="train")
            else:
                raw = load_dataset(source, dataset_config, split=split)
        except (OSError, ValueError, DatasetsError) as error:
            if local:  # datasets keeps the parse error itself in __cause__
                raise ConfigError(f"--dataset file {str(path)!r} is not JSON lines ({error.__cause__ or error}); "
                                  "write one JSON object per line, with 'question' and 'answer'.") from None
            raise ConfigError(f"--dataset {source!r} cannot be loaded ({error}). Check the id, --dataset-config and "
                              "the network; or pass a local JSON-lines file or folder, or `arithmetic`.") from None
        missing = {"question", "answer"} - set(raw.column_names)
        if missing:
            raise ConfigError(f"--dataset {source!r} lacks the key(s) {sorted(missing)}; each row needs "
                              f"'question' and 'answer' (GSM8K style: the final answer after '####').")
    return [{"question": r["question"], "prompt": make_prompt(r["question"]), "answer": extract_gold_answer(r["answer"])}
            for r in raw]


def rows_for_step(rows: list[dict], step: int, prompts_per_step: int, seed: int) -> list[dict]:
    """The P rows of one step: epoch after epoch of a seeded shuffle, so a resumed run sees the same order."""
    picked = []
    for k in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, i = divmod(k, len(rows))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + epoch))
        picked.append(rows[order[i]])
    return picked


# ---------------------------------------------------------------------------------------------
# Sampling: one batched generate call for all P x G completions


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, Tp] left-padded, B = P*G
    prompt_mask: torch.Tensor  # [B, Tp]
    completion_ids: torch.Tensor  # [B, Tc]
    completion_mask: torch.Tensor  # [B, Tc] 1 up to and including the first EOS
    truncated: torch.Tensor  # [B] bool: no EOS within max_completion_length
    texts: list[str]  # B decoded completions


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: a chat model may have several (Qwen2.5: <|im_end|>, <|endoftext|>)."""
    ids = model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    return sorted({i for i in ids + [tokenizer.eos_token_id] if i is not None})


def completion_mask(ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """1 for each token up to and including the first EOS, 0 after it.    # [B, T]

    Built from positions, never from pad_token_id: many tokenizers pad with the EOS token.
    A row with no EOS (truncated) is all ones.
    """
    is_eos = torch.isin(ids, torch.tensor(eos_token_ids, device=ids.device))  # [B, T]
    length = ids.shape[1]
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), length)  # [B]
    positions = torch.arange(length, device=ids.device)  # [T]
    return (positions[None, :] <= first_eos[:, None]).long()  # [B, T]


def prompt_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, repeats: int):
    """The KV cache of each prompt but its last token, computed once, then repeated `repeats` times.

    The G completions of a question share its prompt, so sampling and scoring them need the
    prompt's keys and values once, not G times (with prompts as long as the completions, that
    halves a forward pass). The prompt's last token stays out of the cache: the pass that gets
    the cache feeds it, and its hidden state predicts the first completion token.
    """
    position_ids = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: count real tokens only
    cache = model.get_decoder()(input_ids=prompt_ids[:, :-1], attention_mask=prompt_mask[:, :-1],
                                position_ids=position_ids[:, :-1], use_cache=True).past_key_values
    cache.batch_repeat_interleave(repeats)  # row i of the cache is prompt i // repeats
    return cache


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[list[dict]], num_generations: int,
                         max_completion_length: int, temperature: float, autocast=nullcontext()) -> Rollout:
    """Sample `num_generations` completions for each prompt, in one generate call.

    temperature 0 means greedy decoding (for evaluation). Sampling is pure: top_k, top_p and
    repetition penalty are switched off, overriding the model's generation_config, so tokens
    come from exactly softmax(logits / T), the distribution per_token_logps scores.
    """
    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    encoded = encoded.to(device)
    prompt_ids = encoded.input_ids.repeat_interleave(num_generations, dim=0)  # [B, Tp]
    prompt_mask = encoded.attention_mask.repeat_interleave(num_generations, dim=0)  # [B, Tp]
    eos_ids = eos_token_ids(model, tokenizer)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    was_training = model.training
    model.eval()
    with autocast:
        cache = prompt_cache(model, encoded.input_ids, encoded.attention_mask, num_generations)  # P prompts, G rows each
        output = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, past_key_values=cache,
                                max_new_tokens=max_completion_length, eos_token_id=eos_ids,
                                pad_token_id=tokenizer.pad_token_id, repetition_penalty=1.0, use_cache=True, **sampling)
    model.train(was_training)
    completion_ids = output[:, prompt_ids.shape[1]:]  # [B, Tc]
    mask = completion_mask(completion_ids, eos_ids)  # [B, Tc]
    truncated = ~torch.isin(completion_ids, torch.tensor(eos_ids, device=device)).any(dim=1)  # [B]
    texts = [tokenizer.decode(ids[:n], skip_special_tokens=True) for ids, n in zip(completion_ids, mask.sum(dim=1))]
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, truncated, texts)


# ---------------------------------------------------------------------------------------------
# Rewards (the rules are in rewards.py)


def score_completions(completions: list[str], answers: list[str], weights: dict[str, float]):
    """Total reward = Σ_k weight_k * reward_k, with each component kept for logging.

    Returns (total [B], {name: [B]}).
    """
    components = {name: torch.tensor(fn(completions, answers), dtype=torch.float32)
                  for name, fn in REWARD_FUNCTIONS.items()}
    total = sum(weights[name] * reward for name, reward in components.items())
    return total, components


# ---------------------------------------------------------------------------------------------
# Advantages: the group is the baseline (no critic)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """Â_i = (r_i - mean(r)) / (std(r) + eps) within each group of `group_size`.    # [B]

    `rewards` is [B] with each group's G completions next to each other. The std is the
    sample std (N - 1). A group whose rewards are all equal gets Â = 0 exactly: it teaches
    nothing but the KL term. Dr. GRPO sets scale_by_std=False.
    """
    grouped = rewards.view(-1, group_size)  # [P, G]
    advantages = grouped - grouped.mean(dim=1, keepdim=True)  # [P, G]
    if scale_by_std:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    all_equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # [P, 1]
    return advantages.masked_fill(all_equal, 0.0).view(-1)  # [B]


# ---------------------------------------------------------------------------------------------
# Log-probs of the completion tokens


def per_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                    temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """log π(o_t | q, o_<t) for the last `logits_to_keep` tokens of each row.    # [B, K]

    log π(y) = logit[y] - logsumexp(logits), with logits = lm_head(h) / T. The sampler drew
    tokens from softmax(logits / T), so the log-probs divide by the same T: otherwise the
    ratio and the KL would be those of a different policy than the one that sampled.

    Time: when every row has the same prompt (a micro-batch that is one group, the default),
    the prompt runs once and its KV cache serves all rows; gradients flow back through it.
    Memory: the vocabulary projection runs over chunks of `chunk_size` tokens, only at
    completion positions. No [B, K, vocab] tensor exists at once; with grad on, each chunk
    is recomputed in backward instead of being kept.
    """
    # Columns that are padding in every row change nothing: drop them. (A micro-batch that is
    # one group, G copies of one prompt, then has no left padding left at all.)
    first = int(attention_mask.any(dim=0).int().argmax())
    input_ids, attention_mask = input_ids[:, first:], attention_mask[:, first:]  # [B, T]
    # Left padding: number the positions of real tokens only, as generate() did.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, T]
    # One prompt for all rows: its cache serves them, and the pass below starts at its last token.
    # (Not under gradient checkpointing in training, where transformers drops any cache.)
    end = input_ids.shape[1] - logits_to_keep  # prompt length
    one_prompt = (len(input_ids) > 1 and end > 1 and bool((input_ids[:, :end] == input_ids[:1, :end]).all())
                  and bool((attention_mask[:, :end] == attention_mask[:1, :end]).all()))
    checkpointing = model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    start, cache = 0, None
    if one_prompt and not checkpointing:
        start, cache = end - 1, prompt_cache(model, input_ids[:1, :end], attention_mask[:1, :end], len(input_ids))
    hidden = model.get_decoder()(input_ids=input_ids[:, start:], attention_mask=attention_mask,
                                 position_ids=position_ids[:, start:], past_key_values=cache,
                                 use_cache=cache is not None).last_hidden_state  # [B, T - start, H]
    hidden = hidden[:, -logits_to_keep - 1:-1]  # [B, K, H]: the state at t predicts token t+1
    targets = input_ids[:, -logits_to_keep:]  # [B, K]
    lm_head = model.get_output_embeddings()

    def chunk_logps(h, y):  # [N, H], [N] -> [N]
        logits = lm_head(h).float() / temperature  # [N, V]
        return logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)

    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # [B*K, H], [B*K]
    chunks = []
    for i in range(0, len(y), chunk_size):
        args = (h[i:i + chunk_size], y[i:i + chunk_size])
        chunks.append(checkpoint(chunk_logps, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk_logps(*args))
    return torch.cat(chunks).view_as(targets)  # [B, K]


# ---------------------------------------------------------------------------------------------
# Loss


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ || π_ref) from samples of π_θ, with log_r = log π_ref - log π_θ.

    k1 = -log_r (unbiased, can be negative); k2 = log_r² / 2; k3 = e^log_r - log_r - 1 (unbiased,
    always >= 0; the paper's eq. 4). Schulman, "Approximating KL Divergence", 2020.
    """
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.exp(log_r) - log_r - 1
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, beta: float, epsilon_low: float, epsilon_high: float,
              loss_type: str, max_completion_length: int, kl_estimator: str = "k3",
              num_sequences: int | None = None, num_tokens: int | None = None):
    """The negated GRPO objective and its diagnostics.

    per token:  X_it = -min(ρ_it Â_i, clip(ρ_it, 1 - ε_low, 1 + ε_high) Â_i) + β KL_it
    grpo:    1/B Σ_i 1/|o_i| Σ_t X_it        (the paper; each sequence weighs the same)
    bnpo:    Σ_it X_it / Σ_i |o_i|           (token mean)
    dr_grpo: Σ_it X_it / (B * max_completion_length)

    logp, old_logp, ref_logp, mask: [B, T]; advantages: [B]; ref_logp may be None when beta = 0.
    With micro-batches, pass the whole batch's `num_sequences` (B) and `num_tokens` (Σ|o_i|):
    the micro-batch losses then sum to the full-batch loss, and so do their gradients.
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)  # [B, T]
    A = advantages[:, None]  # [B, 1]
    pg_loss1 = -A * ratio
    pg_loss2 = -A * ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    per_token = torch.maximum(pg_loss1, pg_loss2)  # [B, T] = -min(ρA, clip(ρ)A)
    kl = kl_estimate(logp, ref_logp, kl_estimator) if ref_logp is not None else None
    if kl is not None and beta != 0:
        per_token = per_token + beta * kl  # plus: the KL is a penalty on the objective we maximize

    num_sequences = num_sequences or logp.shape[0]
    num_tokens = num_tokens or mask.sum()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / num_sequences
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / num_tokens
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (num_sequences * max_completion_length)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")

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


# ---------------------------------------------------------------------------------------------
# Training loop


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" is bf16 on CUDA and fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast over fp32 weights, or nothing. (bf16 weights would lose AdamW's small updates.)"""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--model {name!r} cannot be loaded ({error}). Pass a Hub id such as "
                          "Qwen/Qwen2.5-0.5B-Instruct, or a local folder with config.json, weights and tokenizer.") from None
    if not tokenizer.chat_template:
        raise ConfigError(f"--model {name!r} has no chat template; use an instruct/chat model.")
    try:  # some templates refuse a system message (e.g. Gemma's): find out now, not mid-run
        tokenizer.apply_chat_template(make_prompt("What is 1 + 1?"), tokenize=False, add_generation_prompt=True)
    except Exception as error:
        raise ConfigError(f"--model {name!r}: its chat template cannot format a system prompt plus a question "
                          f"({error}). Use a chat model whose template accepts a system message.") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, device: torch.device, dtype=torch.float32, trust_remote_code: bool = False):
    """A causal LM from safetensors weights, in `dtype`, on `device`."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--model {name!r} cannot be loaded ({error}). It must be a causal LM with "
                          "safetensors weights: a Hub id or a local folder.") from None
    # per_token_logps applies the output embedding to the last hidden state itself. A model that
    # changes its logits after that (soft-capping, a logit scale) would be scored as another policy.
    ids = torch.arange(4)[None]  # [1, 4] any few tokens
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()  # [1, 3, V]
        expected = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [1, 3]
        try:
            ours = per_token_logps(model, ids, torch.ones_like(ids), logits_to_keep=3)  # [1, 3]
        except AttributeError as error:
            raise ConfigError(f"--model {name!r}: its decoder or output layer cannot be reached ({error}). "
                              "Upgrade transformers, or use a Llama- or Qwen-like model.") from None
    if not torch.allclose(ours, expected, atol=1e-4):  # the same products, so equal up to rounding
        raise ConfigError(f"--model {name!r} transforms its logits after the output layer (soft-capping or "
                          "scaling), which per_token_logps does not reproduce. Use another model.")
    return model.to(device)


def add_lora(model, cfg: Config, adapter_dir: Path | None = None):
    """Wrap `model` with LoRA adapters (new ones, or those saved in `adapter_dir`); the base stays frozen."""
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        raise ConfigError("--lora-r needs the peft library: pip install peft") from None
    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules.split(","), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as error:  # no module of the model has one of these names
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"--lora-target-modules {cfg.lora_target_modules!r}: {error} "
                          f"This model's linear layers are named: {','.join(linear)}.") from None


def load_policy_and_reference(cfg: Config, device: torch.device, checkpoint_dir: Path | None = None):
    """The trainable policy (fp32) and the frozen reference model, or None for the reference when
    beta = 0 (no KL term) or with LoRA (the reference is the policy with its adapter disabled)."""
    # The reference is frozen, so under bf16 autocast its weights can be bf16 too: no update is lost.
    ref_dtype = torch.bfloat16 if resolve_precision(cfg.precision, device) == "bf16" else torch.float32
    if cfg.lora_r:
        policy = add_lora(load_model(cfg.model, device, trust_remote_code=cfg.trust_remote_code), cfg, checkpoint_dir)
        reference = None
    else:
        policy = load_model(str(checkpoint_dir or cfg.model), device, trust_remote_code=cfg.trust_remote_code)
        reference = None
        if cfg.beta > 0:
            ref_source = checkpoint_dir / "reference" if checkpoint_dir and cfg.ref_sync_every else cfg.model
            reference = load_model(str(ref_source), device, ref_dtype, cfg.trust_remote_code).eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        if hasattr(policy, "activation_checkpointing_enable"):  # the name since transformers 5.23
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora_r:
            policy.enable_input_require_grads()  # frozen embeddings: give checkpointed layers an input with grad
    return policy, reference


def no_grad_logps(model, input_ids, attention_mask, logits_to_keep, cfg: Config, autocast) -> torch.Tensor:
    """per_token_logps without grad, in micro-batches (old-policy and reference log-probs)."""
    with torch.no_grad(), autocast:
        return torch.cat([
            per_token_logps(model, input_ids[i:i + cfg.micro_batch_size], attention_mask[i:i + cfg.micro_batch_size],
                            logits_to_keep, cfg.temperature, cfg.logp_chunk_size)
            for i in range(0, len(input_ids), cfg.micro_batch_size)
        ])


@contextmanager
def timed(metrics: dict, key: str, device: torch.device):
    """Add the seconds spent inside the block to metrics[key] (waiting for the GPU to finish)."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    yield
    synchronize()
    metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - start


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; elsewhere the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def grpo_step(policy, reference, tokenizer, optimizer, rows: list[dict], cfg: Config, autocast=nullcontext()):
    """One GRPO step on `rows` (P questions). Returns (metrics, rollout, rewards, advantages)."""
    device = next(policy.parameters()).device
    metrics = {}
    G = cfg.num_generations

    # 1. Sample G completions per question: one generate call for all P*G.
    with timed(metrics, "time/generate", device):
        rollout = generate_completions(policy, tokenizer, [r["prompt"] for r in rows], G,
                                       cfg.max_completion_length, cfg.temperature, autocast)

    # 2. Score them, 3. and turn the rewards into group-relative advantages.
    with timed(metrics, "time/score", device):
        answers = [r["answer"] for r in rows for _ in range(G)]
        weights = {name: getattr(cfg, f"{name}_weight") for name in REWARD_FUNCTIONS}
        rewards, components = score_completions(rollout.texts, answers, weights)  # [B], {name: [B]}
        advantages = group_advantages(rewards, G, scale_by_std=cfg.loss_type != "dr_grpo").to(device)  # [B]

    # 4. Log-probs that do not change during the update: old policy (only if mu > 1), reference (if beta > 0).
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)  # [B, Tp+Tc]
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)  # [B, Tp+Tc]
    mask = rollout.completion_mask  # [B, Tc]
    K = mask.shape[1]
    with timed(metrics, "time/logps", device):
        old_logp = no_grad_logps(policy, input_ids, attention_mask, K, cfg, autocast) if cfg.mu > 1 else None
        ref_logp = None
        if cfg.beta > 0 and reference is not None:
            ref_logp = no_grad_logps(reference, input_ids, attention_mask, K, cfg, autocast)
        elif cfg.beta > 0:  # LoRA: the reference is the base model, i.e. the policy without its adapter
            with policy.disable_adapter():
                ref_logp = no_grad_logps(policy, input_ids, attention_mask, K, cfg, autocast)

    # 5. mu optimizer steps on this batch, each accumulating the gradient over micro-batches.
    B, num_tokens = len(input_ids), int(mask.sum())
    diagnostics = []
    with timed(metrics, "time/update", device):
        policy.train()
        for _ in range(cfg.mu):
            optimizer.zero_grad(set_to_none=True)
            total_loss = 0.0
            for i in range(0, B, cfg.micro_batch_size):
                mb = slice(i, i + cfg.micro_batch_size)
                with autocast:
                    logp = per_token_logps(policy, input_ids[mb], attention_mask[mb], K,
                                           cfg.temperature, cfg.logp_chunk_size)  # [b, K]
                # mu = 1: the sampler is the current policy, so old = logp.detach() and the ratio is 1.
                old = old_logp[mb] if old_logp is not None else logp.detach()
                loss, diag = grpo_loss(logp, old, ref_logp[mb] if ref_logp is not None else None, advantages[mb],
                                       mask[mb], beta=cfg.beta, epsilon_low=cfg.epsilon_low,
                                       epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                                       max_completion_length=cfg.max_completion_length,
                                       kl_estimator=cfg.kl_estimator, num_sequences=B, num_tokens=num_tokens)
                if not torch.isfinite(loss):
                    raise FloatingPointError("the loss is not finite. Lower --learning-rate, or try --precision fp32.")
                loss.backward()
                total_loss += loss.item()
                diagnostics.append((int(mask[mb].sum()), diag))
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in policy.parameters() if p.requires_grad], cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise FloatingPointError("the gradient is not finite. Lower --learning-rate, or try --precision fp32.")
            optimizer.step()
    policy.eval()

    lengths = mask.sum(dim=1).float()
    grouped = rewards.view(-1, G)
    metrics.update({
        "reward/total": rewards.mean().item(),
        "reward/total_std": rewards.std().item(),
        **{f"reward/{name}": r.mean().item() for name, r in components.items()},
        **{f"reward/{name}_std": r.std().item() for name, r in components.items()},
        "accuracy": (components["answer"] == 1).float().mean().item(),
        "groups/zero_std_frac": (grouped == grouped[:, :1]).all(dim=1).float().mean().item(),
        "completion/len_mean": lengths.mean().item(),
        "completion/len_max": lengths.max().item(),
        "completion/truncated_frac": rollout.truncated.float().mean().item(),
        "loss": total_loss / cfg.mu,
        "grad_norm": grad_norm.item(),
        "lr": optimizer.param_groups[0]["lr"],
        # token-weighted means over the micro-batches (and the mu passes)
        **{key: sum(n * d[key] for n, d in diagnostics) / sum(n for n, _ in diagnostics) for key in diagnostics[0][1]},
        "memory/peak_mb": peak_memory_mb(device),
    })
    return metrics, rollout, rewards, advantages


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], batch_size: int = 32, max_completion_length: int = 512,
             autocast=nullcontext()) -> dict:
    """Greedy accuracy (answer reward = 1) and format rate (strict format) on `rows`."""
    correct, formatted = 0, 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        rollout = generate_completions(model, tokenizer, [r["prompt"] for r in batch], 1, max_completion_length, 0.0, autocast)
        answers = [r["answer"] for r in batch]
        correct += sum(REWARD_FUNCTIONS["answer"](rollout.texts, answers))
        formatted += sum(r == 1.0 for r in format_reward(rollout.texts))
    return {"accuracy": correct / max(len(rows), 1), "format_rate": formatted / max(len(rows), 1), "n": len(rows)}


# ---------------------------------------------------------------------------------------------
# Checkpoints, logs and plots


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted(output_dir.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(output_dir: Path, step: int, policy, reference, tokenizer, optimizer, cfg: Config) -> Path:
    """Write checkpoint-<step> (weights or LoRA adapter, tokenizer, optimizer, RNG), then drop the older one.

    Written to a temporary folder first, so an interrupted save never replaces a good checkpoint.
    """
    path = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)  # safetensors; only the adapter with LoRA
    tokenizer.save_pretrained(tmp)
    if reference is not None and cfg.ref_sync_every:
        reference.save_pretrained(tmp / "reference")
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / "trainer_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config": asdict(cfg)}, indent=2))
    old = latest_checkpoint(output_dir)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    if old is not None and old != path:
        shutil.rmtree(old)
    return path


def load_checkpoint(path: Path, optimizer) -> int:
    """Restore optimizer and RNG state from `path` (weights are loaded with the model); return the step."""
    # map_location: a checkpoint saved on a GPU also resumes without one; load_state_dict moves
    # the AdamW state to each parameter's device.
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return json.loads((path / "trainer_state.json").read_text())["step"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_curves(metrics_path: Path, out_path: Path) -> None:
    """Reward, accuracy, KL and completion length per step, from metrics.jsonl, as one PNG."""
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's plotting backend alone

    records = read_jsonl(metrics_path)
    if not records:
        return
    steps = [r["step"] for r in records]
    panels = [("reward/total", "mean reward"), ("accuracy", "accuracy (answer reward = 1)"),
              ("kl", "KL(policy || reference)"), ("completion/len_mean", "mean completion length (tokens)")]
    fig = Figure(figsize=(9, 6), dpi=80)
    for ax, (key, title) in zip(fig.subplots(2, 2).flat, panels):
        ax.plot(steps, [r[key] for r in records], marker="." if len(steps) < 50 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path)


# ---------------------------------------------------------------------------------------------
# main: set up, then the loop


def quiet_libraries() -> None:
    """One progress bar (ours): no per-file bars from transformers and datasets."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def train(cfg: Config) -> dict:
    """Run GRPO as configured; return results.json's content."""
    check_config(cfg)
    output_dir = Path(cfg.output_dir)
    resume_from = latest_checkpoint(output_dir) if cfg.resume else None
    device = pick_device(cfg.device)
    autocast = autocast_for(device, cfg.precision)
    torch.manual_seed(cfg.seed)
    quiet_libraries()

    # Data first: a bad data file fails before the model loads.
    train_rows = load_dataset_rows(cfg.dataset, "train", cfg.dataset_config, cfg.arithmetic_digits, cfg.seed)
    eval_rows = load_dataset_rows(cfg.dataset, "test", cfg.dataset_config, cfg.arithmetic_digits, cfg.seed)[:cfg.eval_size]
    if Path(cfg.dataset).is_file() and cfg.eval_size:
        print("note: --dataset is a single file, so evaluation uses questions it also trains on.")

    tokenizer = load_tokenizer(str(resume_from or cfg.model), cfg.trust_remote_code)
    policy, reference = load_policy_and_reference(cfg, device, resume_from)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path, results_path = output_dir / "metrics.jsonl", output_dir / "results.json"
    results = json.loads(results_path.read_text()) if resume_from else {}

    start_step = 0
    if resume_from:
        start_step = load_checkpoint(resume_from, optimizer)
        for group in optimizer.param_groups:  # the saved state holds the old values; the flags win
            group.update(lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        kept = [r for r in read_jsonl(metrics_path) if r["step"] <= start_step]  # drop steps after the checkpoint
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        print(f"resuming from {resume_from} at step {start_step}")
    elif cfg.eval_size:
        results["before"] = evaluate(policy, tokenizer, eval_rows, cfg.eval_batch_size, cfg.max_completion_length, autocast)
        print(f"before training: {results['before']}")
    results["config"] = asdict(cfg)
    results_path.write_text(json.dumps(results, indent=2))

    completed = start_step
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="GRPO")
    try:
        for step in bar:
            rows = rows_for_step(train_rows, step, cfg.prompts_per_step, cfg.seed)
            try:
                metrics, rollout, rewards, _ = grpo_step(policy, reference, tokenizer, optimizer, rows, cfg, autocast)
            except FloatingPointError as error:
                last = latest_checkpoint(output_dir)
                sys.exit(f"step {step + 1}: {error} " + (f"The last good checkpoint is {last}: continue from it with --resume."
                                                         if last else "No checkpoint was saved yet: start a new --output-dir."))
            metrics = {"step": step + 1, **metrics}
            with metrics_path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            completed = step + 1  # the weights now hold this step's update: an interrupt from here saves it
            bar.set_postfix(reward=f"{metrics['reward/total']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                            kl=f"{metrics['kl']:.4f}")
            if cfg.log_samples_every and (step + 1) % cfg.log_samples_every == 0:
                with (output_dir / "samples.jsonl").open("a") as f:
                    for i in range(min(2, len(rollout.texts))):  # two completions of the first question
                        f.write(json.dumps({"step": step + 1, "question": rows[0]["question"], "gold": rows[0]["answer"],
                                            "completion": rollout.texts[i], "reward": rewards[i].item()}) + "\n")
            if cfg.ref_sync_every and reference is not None and (step + 1) % cfg.ref_sync_every == 0:
                reference.load_state_dict(policy.state_dict())  # iterative GRPO: the reference catches up
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                save_checkpoint(output_dir, step + 1, policy, reference, tokenizer, optimizer, cfg)
    except KeyboardInterrupt:
        # With mu > 1, an interrupt between two of a step's optimizer steps keeps the first one's update.
        path = save_checkpoint(output_dir, completed, policy, reference, tokenizer, optimizer, cfg)
        plot_curves(metrics_path, output_dir / "curves.png")
        sys.exit(f"\ninterrupted: saved {path}; continue with --resume --output-dir {output_dir}")
    bar.close()

    results["final_checkpoint"] = str(save_checkpoint(output_dir, cfg.max_steps, policy, reference, tokenizer, optimizer, cfg))
    if cfg.lora_r and cfg.merge_lora:
        policy.merge_and_unload().save_pretrained(output_dir / "merged")
        tokenizer.save_pretrained(output_dir / "merged")
    plot_curves(metrics_path, output_dir / "curves.png")
    if cfg.eval_size:
        results["after"] = evaluate(policy, tokenizer, eval_rows, cfg.eval_batch_size, cfg.max_completion_length, autocast)
        print(f"after training: {results['after']}")
    results["steps"] = cfg.max_steps
    results_path.write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except ConfigError as error:
        sys.exit(f"grpo.py: error: {error}")


if __name__ == "__main__":
    main()
