"""
Tests for grpo.py and rewards.py: offline, on CPU, with tiny models built here.

Run: python -m pytest -q test_grpo.py
"""

import contextlib
import importlib
import inspect
import io
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import fields, replace
from fractions import Fraction
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub reads it (at import): the tests never touch the Hub
import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import grpo
import rewards
from grpo import (Config, ConfigError, completion_mask, generate_completions, group_advantages, grpo_loss,
                  kl_estimate, per_token_logps, prompt_cache, sample_tokens)
from rewards import (TAGS, answer_reward, extract_answer, extract_gold_answer, format_reward, parse_number)

HERE = Path(__file__).parent

# ---------------------------------------------------------------------------------------------
# A tiny chat model, built locally: word-level tokenizer + 2-layer Llama with random weights.

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_chat_model(path: Path, seed: int = 0) -> Path:
    """Save a tokenizer (the system prompt's words, digits one per token, the four tags as
    single tokens, EOS used as pad) and a random 2-layer Llama to `path`."""
    pre = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    text = " ".join([rewards.SYSTEM_PROMPT, *(m["content"] for m in rewards.EXAMPLE_TURN),
                     "What is + ? system user assistant"])
    for tag in TAGS:
        text = text.replace(tag, " ")
    words = sorted({w for w, _ in pre.pre_tokenize_str(text)} | set("0123456789"))
    vocab = {w: i for i, w in enumerate(["[UNK]", "<|im_start|>", "<|im_end|>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.Fuse()  # "1", "5" -> "15"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.add_tokens(list(TAGS))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    tokenizer = grpo.load_tokenizer(str(tiny_model_dir))
    model = grpo.load_model(str(tiny_model_dir), torch.device("cpu")).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def lively(tiny):
    """The tiny model's architecture with 10x larger random weights: its greedy tokens depend on
    the prompt (the tiny model's weights are so small that every prompt gets the same reply)."""
    model, tokenizer = tiny
    torch.manual_seed(0)
    config = model.config.__class__(**{**model.config.to_dict(), "initializer_range": 0.2})
    return LlamaForCausalLM(config).eval(), tokenizer


DRAW_CURVES = grpo.plot_curves


@pytest.fixture(autouse=True)
def no_png(monkeypatch):
    """train() draws curves.png at the end; in-process runs skip the drawing (about 0.3 s each). The subprocess
    run of test_end_to_end_then_resume and test_plot_curves_draws_a_png_from_the_metrics draw it."""
    monkeypatch.setattr(grpo, "plot_curves", lambda *args: None)


def need(module: str):
    """pytest.importorskip, except where GRPO_TESTS_NO_SKIP is set (.ci/run): there a missing install fails the
    test instead of passing as a skip."""
    if os.environ.get("GRPO_TESTS_NO_SKIP"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(tiny_model_dir, tmp_path, **overrides) -> Config:
    """Settings for a run of a few seconds on the tiny model."""
    settings = dict(model=str(tiny_model_dir), dataset="arithmetic", output_dir=str(tmp_path / "run"), max_steps=2,
                    prompts_per_step=2, num_generations=4, max_completion_length=8, micro_batch_size=4,
                    eval_size=4, eval_batch_size=4, save_every=1, log_samples_every=1, device="cpu")
    return Config(**{**settings, **overrides})


# ---------------------------------------------------------------------------------------------
# Reference values, computed from the formulas by hand (see grpo_loss's docstring) and copied here as literals.
# Tolerance 1e-5: the literals have 6 decimals; float32 arithmetic is exact to about 1e-7 here.
# The tests of Part 1's functions say what was expected and why (exercises/ runs them on a learner's code).


def close(actual, expected, why: str, **tolerances):
    """torch.testing.assert_close whose failure says first what was expected and why."""
    torch.testing.assert_close(actual, expected, msg=lambda numbers: f"{why}\n{numbers}", **tolerances)


@pytest.mark.parametrize("rewards, expected", [
    ([1, 0, 0, 1], [0.865875, -0.865875, -0.865875, 0.865875]),
    ([0.2, 0.5, 0.9], [-0.948888, -0.094889, 1.043777]),
    ([1, 1, 1, 1], [0, 0, 0, 0]),
])
def test_group_advantages_reference_values(rewards, expected):
    advantages = group_advantages(torch.tensor(rewards, dtype=torch.float32), len(rewards))
    close(advantages, torch.tensor(expected, dtype=torch.float32), "Â_i = (r_i - mean(r)) / (std(r) + 1e-4) "
          "over the group, with the sample std (N - 1: torch.std's default, as TRL's); equal rewards "
          "give exactly 0", atol=1e-5, rtol=0)


def test_group_advantages_are_exactly_zero_for_equal_rewards_and_per_group():
    # Three float32 0.45s have a mean 3e-8 off 0.45: over (std + eps) that residue alone would be an advantage of
    # ~3e-4, a signal made of rounding. (Other groups differ, so a check over the whole batch would not catch it.)
    rewards = torch.tensor([0.45, 0.45, 0.45, 1.0, 0.0, 0.0])
    advantages = group_advantages(rewards, 3)
    assert advantages[:3].eq(0).all(), ("equal rewards must give advantage exactly 0: such a group teaches nothing "
                                        f"(a float32 mean's rounding over std + eps gave {advantages[:3].tolist()})")
    close(advantages[3:], group_advantages(torch.tensor([1.0, 0.0, 0.0]), 3), "each group is its own baseline: "
          "its rewards minus its own mean, over its own std; another group's rewards must not change it")
    no_std = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, std="none")
    close(no_std, torch.tensor([0.5, -0.5, -0.5, 0.5]), 'std="none" (Dr. GRPO): r_i - mean(r), divided by nothing')


def test_kl_estimators_reference_values():
    log_r = torch.tensor([-1.0, 0.5, 2.0])  # log_r = ref_logp - logp
    logp = torch.zeros(3)
    why = "Schulman's estimators of KL(π_θ || π_ref) with log_r = log π_ref - log π_θ: "
    close(kl_estimate(logp, log_r, "k3"), torch.tensor([0.367879, 0.148721, 4.389056]),
          why + "k3 = e^log_r - log_r - 1", atol=1e-5, rtol=0)
    close(kl_estimate(logp, log_r, "k1"), -log_r, why + "k1 = -log_r")
    close(kl_estimate(logp, log_r, "k2"), 0.5 * log_r**2, why + "k2 = log_r² / 2")


def test_an_unknown_kl_estimator_is_refused():
    logp = torch.zeros(3)
    with pytest.raises(ValueError, match=re.escape("unknown KL estimator 'k4'; choose one of k1, k2, k3, k3_ratio")):
        kl_estimate(logp, logp, "k4")


# The KL term as a loss, by exact enumeration: one token from a categorical policy over V choices, its
# expected gradient Σ_x π_old(x) ∇ grpo_loss(x) summed over every x (no sampling noise), against
# autograd of the two KLs. float64, so "equal" is to rounding (1e-9) and "neither" is far (> 5%).
KL_GRADIENT_TABLE = [  # (estimator, θ_old = θ?, whose gradient it is)
    ("k1", True, "zero"), ("k1", False, "neither"),
    ("k2", True, "KL(π_θ || π_ref)"), ("k2", False, "neither"),
    ("k3", True, "KL(π_ref || π_θ)"), ("k3", False, "neither"),
    ("k3_ratio", True, "KL(π_θ || π_ref)"), ("k3_ratio", False, "KL(π_θ || π_ref)"),
    ("k1_to_go", True, "KL(π_θ || π_ref)"), ("k1_to_go", False, "neither"),  # one token: its own k1 to go
]


def expected_kl_term_gradient(kind, theta, old_logits, ref_logits):
    """∇_θ of E_{x ~ π_old}[β KL_x] as grpo_loss computes it (β = 1, Â = 0), summed over every x."""
    theta = theta.clone().requires_grad_(True)
    logp, ref_logp = theta.log_softmax(-1), ref_logits.log_softmax(-1)  # [V]
    old_logp = logp.detach() if old_logits is None else old_logits.log_softmax(-1)  # None: on policy
    expected = 0
    for x in range(len(theta)):
        one = lambda t: t[x].view(1, 1)  # noqa: E731  a completion of one token, x
        loss, _ = grpo_loss(one(logp), one(old_logp), one(ref_logp), torch.zeros(1, dtype=theta.dtype),
                            torch.ones(1, 1), beta=1.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo",
                            max_completion_length=1, kl_estimator=kind)
        expected = expected + old_logp[x].exp() * loss
    return torch.autograd.grad(expected, theta)[0]


def kl_gradients(theta, ref_logits):
    """Autograd of KL(π_θ || π_ref) and of KL(π_ref || π_θ) with respect to the logits θ."""
    theta = theta.clone().requires_grad_(True)
    logp, ref_logp = theta.log_softmax(-1), ref_logits.log_softmax(-1)
    reverse = (logp.exp() * (logp - ref_logp)).sum()
    forward = (ref_logp.exp() * (ref_logp - logp)).sum()
    return {"KL(π_θ || π_ref)": torch.autograd.grad(reverse, theta, retain_graph=True)[0],
            "KL(π_ref || π_θ)": torch.autograd.grad(forward, theta)[0]}


@pytest.mark.parametrize("kind, on_policy, whose", KL_GRADIENT_TABLE)
def test_which_kl_gradient_each_estimator_gives_as_a_loss(kind, on_policy, whose):
    generator = torch.Generator().manual_seed(0)
    theta, ref_logits, old_logits = torch.randn(3, 6, generator=generator, dtype=torch.float64)  # V = 6
    gradient = expected_kl_term_gradient(kind, theta, None if on_policy else old_logits, ref_logits)
    truths = kl_gradients(theta, ref_logits)
    why = f"{kind} as a loss, {'on' if on_policy else 'off'} policy, must give the gradient of {whose} (README's table)"
    if whose == "zero":
        close(gradient, torch.zeros_like(gradient), why, atol=1e-9, rtol=0)
    elif whose == "neither":
        for truth in truths.values():
            assert (gradient - truth).norm() > 0.05 * truth.norm(), why
    else:
        close(gradient, truths[whose], why, atol=1e-9, rtol=0)
        other = next(t for name, t in truths.items() if name != whose)
        assert (gradient - other).norm() > 0.05 * other.norm()  # the two KLs differ here


@pytest.mark.parametrize("kind", ["k3_ratio", "k3", "k2"])
def test_the_kl_term_pulls_the_policy_towards_the_reference(kind):
    """Â = 0: only the KL term acts. A small step down its expected gradient (by enumeration, as above) must
    lower KL(π_θ || π_ref), with each estimator that regularizes on policy."""
    generator = torch.Generator().manual_seed(0)
    theta, ref_logits = torch.randn(2, 6, generator=generator, dtype=torch.float64)

    def kl(logits):
        logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)
        return (logp.exp() * (logp - ref_logp)).sum().item()
    stepped = theta - 0.1 * expected_kl_term_gradient(kind, theta, None, ref_logits)
    assert kl(stepped) < kl(theta), (f"with Â = 0 only the KL term acts: a step down the loss's gradient must move "
                                     f"π_θ towards the reference (+ β KL: a penalty), yet the KL went "
                                     f"{kl(theta):.4f} -> {kl(stepped):.4f}")


def sequence_logps(first, second):
    """A tabular policy over completions of two tokens (a, b) from V = 3: logits of the first token [3] and of
    the second given the first [3, 3]. Returns log π(a) [3] and log π(b | a) [3, 3]."""
    return first.log_softmax(-1), second.log_softmax(-1)


def expected_sequence_kl_term_gradient(kind, theta, ref, old=None):
    """∇_θ of E_{(a, b) ~ π_old}[Σ_t KL_t] over every completion, each completion's term as grpo_loss gives it (β = 1,
    Â = 0, a sum over its tokens; old None: on policy). k1_to_go: -Σ_t ρ_t Â_t with Â_t = -Σ_{t' >= t} k1_t', the
    KL as a reward-to-go, whose gradient on policy is Σ_t ∇log π(o_t) · Σ_{t' >= t} log(π/π_ref)(o_t')."""
    first, second = (p.clone().requires_grad_(True) for p in theta)
    (logp1, logp2), (ref1, ref2) = sequence_logps(first, second), sequence_logps(*ref)
    old1, old2 = (logp1.detach(), logp2.detach()) if old is None else sequence_logps(*old)
    expected = 0
    for a in range(3):
        for b in range(3):
            logp, ref_logp = torch.stack([logp1[a], logp2[a, b]]), torch.stack([ref1[a], ref2[a, b]])
            old_logp = torch.stack([old1[a], old2[a, b]])
            term, _ = grpo_loss(logp[None], old_logp[None], ref_logp[None], torch.zeros(1, dtype=logp.dtype),
                                torch.ones(1, 2), beta=1.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="dr_grpo",
                                max_completion_length=1, kl_estimator=kind)  # dr_grpo over 1 x 1: the plain sum
            expected = expected + (old_logp.sum()).exp() * term
    return torch.autograd.grad(expected, (first, second))


def sequence_kl_gradients(theta, ref):
    """Autograd of the KL of whole completions, KL(π_θ || π_ref) = Σ_(a,b) π(a, b) log(π(a, b) / π_ref(a, b))."""
    first, second = (p.clone().requires_grad_(True) for p in theta)
    (logp1, logp2), (ref1, ref2) = sequence_logps(first, second), sequence_logps(*ref)
    logp, ref_logp = logp1[:, None] + logp2, ref1[:, None] + ref2  # [3, 3] log-probs of whole completions
    return torch.autograd.grad((logp.exp() * (logp - ref_logp)).sum(), (first, second))


WHOLE_COMPLETION_TABLE = [  # (estimator, its expected gradient on policy, summed over a completion's tokens)
    ("k1", "zero"), ("k2", "last token only"), ("k3", "neither"), ("k3_ratio", "last token only"),
    ("k1_to_go", "exact"),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind, whose", WHOLE_COMPLETION_TABLE)
def test_which_gradient_of_the_whole_completions_kl_each_estimator_gives(kind, whose, seed):
    """README's column "whole completion", by exact enumeration of the 9 completions of two tokens (float64).
    A per-token KL term holds each token's prefix fixed: its gradient misses the terms through which the first
    token changes the context of the second. Exact for the second token's logits (k2, k3_ratio), off for the
    first's; the KL as a reward-to-go (Tang and Munos, arXiv 2506.09477) is exact for both."""
    generator = torch.Generator().manual_seed(seed)
    theta, ref = [(torch.randn(3, generator=generator, dtype=torch.float64),
                   torch.randn(3, 3, generator=generator, dtype=torch.float64)) for _ in range(2)]
    got, truth = expected_sequence_kl_term_gradient(kind, theta, ref), sequence_kl_gradients(theta, ref)
    if whose == "zero":
        assert all(g.abs().max() < 1e-12 for g in got)
    elif whose == "exact":
        for g, t in zip(got, truth):
            torch.testing.assert_close(g, t, atol=1e-12, rtol=0)
    else:
        last_exact = whose == "last token only"
        assert ((got[1] - truth[1]).norm() < 1e-12) == last_exact
        assert (got[0] - truth[0]).norm() > 0.05 * truth[0].norm()  # the first token's: 10% and more, seen


def test_off_policy_no_estimator_gives_the_whole_completions_kl_gradient():
    """mu > 1, samples from π_old: none of the per-token estimators, nor the reward-to-go without importance
    weights over prefixes, gives the gradient of the whole completions' KL (Shah et al., arXiv 2512.21852)."""
    generator = torch.Generator().manual_seed(0)
    theta, ref, old = [(torch.randn(3, generator=generator, dtype=torch.float64),
                        torch.randn(3, 3, generator=generator, dtype=torch.float64)) for _ in range(3)]
    truth = torch.cat([t.flatten() for t in sequence_kl_gradients(theta, ref)])
    for kind in ("k2", "k3", "k3_ratio", "k1_to_go"):
        got = torch.cat([g.flatten() for g in expected_sequence_kl_term_gradient(kind, theta, ref, old)])
        assert (got - truth).norm() > 0.05 * truth.norm(), kind


def test_k3_ratio_is_k3_times_the_ratio_and_k1_is_refused(tiny_model_dir, tmp_path):
    logp, old_logp, ref_logp = torch.tensor([-1.0, -0.5]), torch.tensor([-1.2, -0.1]), torch.tensor([-0.7, -0.9])
    close(kl_estimate(logp, ref_logp, "k3_ratio", old_logp), torch.exp(logp - old_logp) * (
          torch.exp(ref_logp - logp) - (ref_logp - logp) - 1), "k3_ratio = ρ k3, ρ = π_θ / π_θ_old = e^(logp - old_logp)")
    with pytest.raises(ConfigError, match="k1: as a loss its gradient is 0 in expectation on policy"):
        grpo.check_config(tiny_config(tiny_model_dir, tmp_path, kl_estimator="k1"))


TWO_COMPLETIONS = dict(
    logp=torch.tensor([[-1.0, -0.5, -2.0, 0.0], [-0.3, -1.3, 0.0, 0.0]]),
    old_logp=torch.tensor([[-1.1, -0.8, -1.9, 0.0], [-0.5, -1.0, 0.0, 0.0]]),
    ref_logp=torch.tensor([[-1.2, -0.4, -2.1, 0.0], [-0.4, -1.5, 0.0, 0.0]]),
    advantages=torch.tensor([0.8, -0.5]),
    mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
)


@pytest.mark.parametrize("loss_type, expected", [("grpo", -0.174898), ("dapo", -0.311043), ("dr_grpo", -0.194402)])
def test_grpo_loss_reference_values(loss_type, expected):
    loss, diagnostics = grpo_loss(**TWO_COMPLETIONS, beta=0.04, epsilon_low=0.2, epsilon_high=0.2,
                                  loss_type=loss_type, max_completion_length=4, kl_estimator="k3")
    mean = {"grpo": "1/B Σ_i 1/|o_i| Σ_t", "dapo": "Σ_it / Σ_i |o_i|", "dr_grpo": "Σ_it / (B max_completion_length)"}
    assert loss.item() == pytest.approx(expected, abs=1e-5), (
        f"the loss by hand: per token -min(ρÂ, clip(ρ, 1 - ε_low, 1 + ε_high) Â) + β k3 (the min: the pessimistic of "
        f"the two, PPO's bound), then {loss_type}'s mean, {mean[loss_type]}")
    # token 2 of completion 1: ratio e^0.3 = 1.35 > 1.2 with A > 0; token 2 of completion 2: e^-0.3 = 0.74 < 0.8 with A < 0
    why = "clip/high_frac, clip/low_frac: the share of the batch's tokens whose gradient the clip stops"
    assert diagnostics["clip/high_frac"] == pytest.approx(1 / 5), why
    assert diagnostics["clip/low_frac"] == pytest.approx(1 / 5), why


def test_unknown_loss_type_raises():
    with pytest.raises(ValueError, match=re.escape("unknown loss_type 'ppo'; choose one of grpo, dapo, dr_grpo")):
        grpo_loss(**TWO_COMPLETIONS, beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="ppo",
                  max_completion_length=4)


def test_without_reference_log_probs_the_loss_has_no_kl_term():
    args = dict(TWO_COMPLETIONS, loss_type="grpo", max_completion_length=4, epsilon_low=0.2, epsilon_high=0.2)
    loss, diagnostics = grpo_loss(**{**args, "ref_logp": None}, beta=0.04)
    assert loss.item() == grpo_loss(**args, beta=0.0)[0].item() and diagnostics["kl"] == 0.0, (
        "ref_logp None (beta 0: no reference is loaded): no KL term, and a KL of 0 in the diagnostics")


def test_clip_fractions_count_the_tokens_whose_gradient_the_clip_stops():
    """One token per row. Low: ratio below 1 - eps_low with A < 0; high: above 1 + eps_high with A > 0. Beyond the
    range on the other side of A, or with A = 0, the clip changes nothing. At the edge itself (eps = 0, ratio 1
    exactly) nothing is cut. A one-token batch averages over its one token."""
    ratio = torch.tensor([0.7, 0.7, 0.7, 1.1, 1.3, 1.3, 1.3, 1.0])
    advantages = torch.tensor([-1.0, 0.0, 0.5, -1.0, 1.0, 0.0, -1.0, 1.0])
    logp, mask = ratio.log()[:, None], torch.ones(8, 1)
    args = dict(ref_logp=None, beta=0.0, loss_type="grpo", max_completion_length=1)
    _, diagnostics = grpo_loss(logp, torch.zeros(8, 1), advantages=advantages, mask=mask, epsilon_low=0.2,
                               epsilon_high=0.28, **args)
    assert (diagnostics["clip/low_frac"], diagnostics["clip/high_frac"]) == (1 / 8, 1 / 8), (
        "clipped: ρ < 1 - ε_low with Â < 0, or ρ > 1 + ε_high with Â > 0 (there min() takes the clipped term, "
        "constant in θ); beyond the range on the other side of Â, or with Â = 0, the clip changes nothing")
    _, edge = grpo_loss(torch.zeros(2, 1), torch.zeros(2, 1), advantages=torch.tensor([-1.0, 1.0]), mask=torch.ones(2, 1),
                        epsilon_low=0.0, epsilon_high=0.0, **args)
    assert (edge["clip/low_frac"], edge["clip/high_frac"]) == (0.0, 0.0), "at the edge (ρ = 1 exactly) nothing is cut"
    _, one = grpo_loss(logp[:1], torch.zeros(1, 1), advantages=advantages[:1], mask=mask[:1], epsilon_low=0.2,
                       epsilon_high=0.28, **args)
    assert one["ratio_mean"] == pytest.approx(0.7) and one["clip/low_frac"] == 1.0, (  # 0.7 up to float32 rounding
        "the diagnostics are means over the batch's tokens: here its one token")


def test_asymmetric_clip_range():
    # ratio e^0.3 = 1.35 on a token with A > 0: clipped by 1 + 0.2, not by 1 + 0.4
    args = dict(TWO_COMPLETIONS, ref_logp=None)
    _, tight = grpo_loss(**args, beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo", max_completion_length=4)
    _, wide = grpo_loss(**args, beta=0.0, epsilon_low=0.2, epsilon_high=0.4, loss_type="grpo", max_completion_length=4)
    assert tight["clip/high_frac"] > 0 and wide["clip/high_frac"] == 0


# ---------------------------------------------------------------------------------------------
# Gradients, not just losses


def test_grpo_gradient_with_ratio_one_is_minus_advantage_over_length():
    """At ratio 1 and beta 0 the loss is ~0 but d loss / d logp_it = -A_i / (|o_i| B)."""
    logp = TWO_COMPLETIONS["logp"].clone().requires_grad_(True)
    mask, advantages = TWO_COMPLETIONS["mask"], TWO_COMPLETIONS["advantages"]
    loss, _ = grpo_loss(logp, logp.detach(), None, advantages, mask, beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
                        loss_type="grpo", max_completion_length=4)
    loss.backward()
    B, lengths = 2, mask.sum(dim=1, keepdim=True)
    expected = -advantages[:, None] / lengths / B * mask
    close(logp.grad, expected, "at ratio 1 (mu = 1) the gradient is the policy gradient, d loss / d logp_it = "
          "-Â_i / (|o_i| B) on each token of completion i, 0 on padding; the clip must not act at ratio 1")
    assert loss.item() == pytest.approx(-advantages.mean().item()), (  # ratio 1: each sequence's term is -A_i
        "at ratio 1 each completion's term is -Â_i: the loss is -mean(Â), about 0 when Â sums to 0 over a group")


def random_batch(model, tokenizer, seed=0, batch=6, prompt_len=5, completion_len=7, one_prompt=False):
    """Token ids with left-padded prompts and completions that end early (after an EOS).
    one_prompt: every row has the same prompt (a group), with the same left padding."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (batch, prompt_len), generator=g)
    if one_prompt:
        prompt_ids[:] = prompt_ids[0]
    prompt_mask = torch.ones_like(prompt_ids)
    for i in range(batch):
        pad = 2 if one_prompt else i % 3
        prompt_ids[i, :pad] = tokenizer.pad_token_id
        prompt_mask[i, :pad] = 0
    completion_ids = torch.randint(3, vocab, (batch, completion_len), generator=g)
    for i in range(batch):
        end = 2 + i % (completion_len - 2)
        completion_ids[i, end] = tokenizer.eos_token_id
        completion_ids[i, end + 1:] = tokenizer.pad_token_id
    mask = completion_mask(completion_ids, [tokenizer.eos_token_id])
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, mask], dim=1)
    return input_ids, attention_mask, mask


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_gradient_does_not_depend_on_micro_batch_size(tiny, loss_type):
    model, tokenizer = tiny
    input_ids, attention_mask, mask = random_batch(model, tokenizer)
    K, B = mask.shape[1], len(input_ids)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        logp0 = per_token_logps(model, input_ids, attention_mask, K)
    # An old policy and a reference that differ from the policy, so clipping and KL both act.
    old_logp = logp0 + 0.3 * torch.randn(logp0.shape, generator=g)
    ref_logp = logp0 + 0.3 * torch.randn(logp0.shape, generator=g)
    advantages = torch.randn(B, generator=g)
    settings = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=K,
                    num_sequences=B, num_tokens=int(mask.sum()))

    def gradient(micro_batch_size):
        model.zero_grad()
        for i in range(0, B, micro_batch_size):
            mb = slice(i, i + micro_batch_size)
            logp = per_token_logps(model, input_ids[mb], attention_mask[mb], K)
            loss, _ = grpo_loss(logp, old_logp[mb], ref_logp[mb], advantages[mb], mask[mb], **settings)
            loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    full = gradient(B)
    assert full.abs().max() > 0, "the loss must have a gradient with respect to the policy's weights"
    for micro_batch_size in (1, 4):  # 4 does not divide B = 6: micro-batches of 4 and 2
        # float32, summed in a different order: seen within 2.1e-7 of the largest component; 1e-6 of it leaves
        # room for other CPUs' kernels. A per-micro-batch denominator is off by a factor (4/6, 2/6, ...).
        close(gradient(micro_batch_size), full, "the loss's mean is over the whole batch (num_sequences, num_tokens), "
              "not each micro-batch: the gradient must not depend on the micro-batch size",
              rtol=0, atol=1e-6 * full.abs().max().item())
    model.zero_grad()


# ---------------------------------------------------------------------------------------------
# Log-probs


def naive_logps(model, input_ids, attention_mask, completion_length, temperature=1.0):
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, -completion_length - 1:-1] / temperature
    return logits.log_softmax(-1).gather(-1, input_ids[:, -completion_length:, None]).squeeze(-1)


def test_log_probs_keep_no_vocabulary_sized_tensor_for_the_backward_pass(tiny):
    """The vocabulary projection runs in chunks recomputed in backward: the autograd graph holds no [tokens, V]
    logits, only each chunk's hidden states (a naive log_softmax would keep all B x T x V of them)."""
    model, tokenizer = tiny
    V = model.config.vocab_size
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(0))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        per_token_logps(model, ids, torch.ones_like(ids), 6, chunk_size=4)
    assert saved and not [shape for shape in saved if shape[-1] == V and len(shape) >= 2 and shape[0] != V], (
        "no vocabulary-sized [tokens, V] tensor may stay saved for backward (B x T x V float32 logits: 10 GB at "
        "64 x 256 x 152k): project a chunk of tokens at a time, recomputed in backward (torch.utils.checkpoint). "
        f"Saved: {saved}")


@pytest.mark.parametrize("chunk_size, temperature, one_prompt", [(1024, 1.0, False), (5, 0.7, False), (5, 0.7, True)])
def test_per_token_logps_equals_plain_log_softmax(tiny, monkeypatch, chunk_size, temperature, one_prompt):
    model, tokenizer = tiny
    input_ids, attention_mask, mask = random_batch(model, tokenizer, one_prompt=one_prompt)
    K = mask.shape[1]
    calls = []  # one group: the prompt runs once and all rows get its cache; otherwise no cache
    monkeypatch.setattr(grpo, "prompt_cache", lambda *args: calls.append(args) or prompt_cache(*args))
    model.train()  # as in the update (the tiny model has no dropout: same numbers as eval)
    logp = per_token_logps(model, input_ids, attention_mask, K, temperature, chunk_size)
    model.eval()
    assert len(calls) == one_prompt and (not calls or len(calls[0][1]) == 1)
    expected = naive_logps(model, input_ids, attention_mask, K, temperature)
    assert logp.shape == expected.shape == mask.shape, f"one log-prob per completion token, [B, T]: {logp.shape}"
    # Same float32 numbers through different kernels (chunked matmul, logsumexp vs log_softmax).
    close(logp, expected, "log π(o_t | q, o_<t): the logits at t - 1 predict the next token, o_t, at the sampling "
          f"temperature ({temperature}), the distribution o_t was drawn from", rtol=1e-5, atol=1e-5)
    # The chunks are recomputed in backward (checkpoint); the gradient must be the plain one.
    (logp * mask).sum().backward()
    chunked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (naive_logps(model, input_ids, attention_mask, K, temperature) * mask).sum().backward()
    for a, b in zip(chunked, [p.grad for p in model.parameters()]):
        close(a, b, "the gradient must be the plain log_softmax's", rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_left_padding_does_not_change_logps(tiny):
    """Padding a prompt on the left must not shift the positions of its real tokens."""
    model, tokenizer = tiny
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    pad = torch.full((1, 4), tokenizer.pad_token_id)
    alone = per_token_logps(model, ids, torch.ones_like(ids), 5)
    padded = per_token_logps(model, torch.cat([pad, ids], 1), torch.cat([torch.zeros_like(pad), torch.ones_like(ids)], 1), 5)
    close(padded, alone, "left padding must not change the log-probs: positions counted from the attention mask, "
          "the padding masked out", rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Completion mask and sampling

EOS, PAD, X = 2, 0, 7


@pytest.mark.parametrize("ids, eos_ids, expected, why", [
    ([[X, X, EOS, EOS, EOS]], [EOS], [[1, 1, 1, 0, 0]], "the padding is the EOS token here: only the first EOS counts"),
    ([[EOS, X, X, PAD, PAD]], [EOS], [[1, 0, 0, 0, 0]], "a reply that ends at once is the EOS itself, one token"),
    ([[X, X, X, X, X]], [EOS], [[1, 1, 1, 1, 1]], "no EOS: the reply was cut off (truncated), every token counts"),
    ([[X, 9, X, EOS, X]], [EOS, 9], [[1, 1, 0, 0, 0]], "any of the end-of-reply ids ends it (Qwen2.5 has two)"),
    ([[X, EOS, PAD], [X, X, 9]], [9, EOS], [[1, 1, 0], [1, 1, 1]], "each row ends at its own first EOS"),
])
def test_completion_mask(ids, eos_ids, expected, why):
    assert completion_mask(torch.tensor(ids), eos_ids).tolist() == expected, (
        f"1 up to and including the first EOS (the policy sampled it: it learns to stop), 0 after it: {why}")


def test_generate_completions_one_batch(tiny):
    model, tokenizer = tiny
    prompts = [rewards.make_prompt("What is 1 + 2?"), rewards.make_prompt("What is 33 + 4?")]
    model.generation_config.top_k = 1  # a model's own config must not turn sampling into greedy
    try:
        torch.manual_seed(0)
        rollout = generate_completions(model, tokenizer, prompts, 4, 6, temperature=1.0)
    finally:
        model.generation_config.top_k = None
    B = 8
    assert rollout.prompt_ids.shape[0] == rollout.completion_ids.shape[0] == B and len(rollout.texts) == B
    assert rollout.completion_ids.shape[1] <= 6
    assert (rollout.prompt_ids[:4] == rollout.prompt_ids[0]).all()  # each prompt repeated G times, in a block
    assert rollout.prompt_mask[:, -1].eq(1).all()  # left padding: every prompt ends at the same column
    assert len(set(rollout.texts[:4])) > 1  # sampled, not greedy
    eos = tokenizer.eos_token_id
    has_eos = (rollout.completion_ids == eos).any(dim=1)
    assert torch.equal(rollout.truncated, ~has_eos)
    for ids, mask in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist()):  # counted by hand
        length = ids.index(eos) + 1 if eos in ids else len(ids)  # up to and including the first end-of-reply id
        assert mask == [1] * length + [0] * (len(ids) - length)
    greedy = [generate_completions(model, tokenizer, prompts[:1], 2, 6, temperature=0.0).texts for _ in range(2)]
    assert greedy[0][0] == greedy[0][1] == greedy[1][0]


def test_prompt_cache_gives_the_plain_forward_pass(lively):
    """Each prompt run once, its cache repeated G times, then its last token fed: the logits must
    be those of a full forward pass over the G copies, with left padding on the shorter prompt."""
    model, tokenizer = lively
    texts = [tokenizer.apply_chat_template(rewards.make_prompt(q), tokenize=False, add_generation_prompt=True)
             for q in ("What is 1 + 2?", "What is 33 + 4 + 5 + 6?")]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids, mask = encoded.input_ids.repeat_interleave(3, dim=0), encoded.attention_mask.repeat_interleave(3, dim=0)
    assert mask[:3].eq(0).any()  # the first prompt is padded
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]  # [6, V]
        cache = prompt_cache(model, encoded.input_ids, encoded.attention_mask, 3)
        cached = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=position_ids[:, -1:],
                       cache=cache).logits[:, -1]  # [6, V]
    assert (plain[0] - plain[3]).abs().max() > 0.1  # the two prompts give different logits
    # float32, the same products split differently (the cache, then one token): ~1e-6 of logits ~1
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)


def test_greedy_decoding_over_the_shared_prompt_cache_equals_plain_generate(lively):
    """The decoding loop over the repeated prompt cache: greedy tokens as generate() over G copies."""
    model, tokenizer = lively
    prompts = [rewards.make_prompt("What is 1 + 2?"), rewards.make_prompt("What is 33 + 4 + 5 + 6?")]
    rollout = generate_completions(model, tokenizer, prompts, 3, 8, temperature=0.0)
    assert rollout.texts[0] != rollout.texts[3]  # the replies depend on the prompt
    with torch.no_grad():
        plain = model.generate(input_ids=rollout.prompt_ids, attention_mask=rollout.prompt_mask, max_new_tokens=8,
                               do_sample=False, eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    completions = plain[:, rollout.prompt_ids.shape[1]:]
    assert completions.shape == rollout.completion_ids.shape
    # up to each row's first EOS (after it both pad, and nothing is scored)
    assert torch.equal(completions * rollout.completion_mask, rollout.completion_ids * rollout.completion_mask), (
        "temperature 0 must draw the most likely token (argmax), as generate(do_sample=False) does")


def test_greedy_decoding_stops_at_any_end_of_reply_id_as_generate_does(lively):
    """Several end-of-reply ids (Qwen2.5 has two) and left padding: the same tokens as generate(),
    each row padded after its first end-of-reply id, the mask and `truncated` from those ids."""
    model, tokenizer = lively
    prompts = [rewards.make_prompt("What is 1 + 2?"), rewards.make_prompt("What is 33 + 4 + 5 + 6?")]
    stop = int(generate_completions(model, tokenizer, prompts, 1, 8, 0.0).completion_ids[0, 2])
    eos_ids = [tokenizer.eos_token_id, stop]  # a token that greedy decoding draws early now ends a reply
    model.generation_config.eos_token_id = eos_ids
    try:
        rollout = generate_completions(model, tokenizer, prompts, 2, 8, temperature=0.0)
        with torch.no_grad():
            plain = model.generate(input_ids=rollout.prompt_ids, attention_mask=rollout.prompt_mask, max_new_tokens=8,
                                   do_sample=False, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert rollout.prompt_mask[2:].eq(0).any() or rollout.prompt_mask[:2].eq(0).any()  # one prompt is padded
    assert torch.equal(rollout.completion_ids, plain[:, rollout.prompt_ids.shape[1]:])
    assert rollout.completion_mask[0].sum() <= 3 and not rollout.truncated[0]  # row 0 ended at `stop`
    assert torch.equal(rollout.completion_mask, completion_mask(rollout.completion_ids, eos_ids))
    assert torch.equal(rollout.truncated, ~torch.isin(rollout.completion_ids, torch.tensor(eos_ids)).any(dim=1))


# torch.compile's own tracing touches torch.jit, which torch 2.13 marks deprecated: torch's notice, not a call of ours.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_the_compiled_decoding_step_draws_the_eager_loops_tokens_and_compiles_once_per_shape(lively):
    """--compile: a static cache padded to a multiple of 256 slots and a compiled step. Greedy and
    sampled tokens as the eager loop's (itself equal to generate(), above), for prompts of several
    lengths, two end-of-reply ids, B = 3 x 5, before and after an AdamW step (the weights change in
    place: the compiled step must read them anew); it really compiles (else equality were trivial);
    a new batch of the same B compiles nothing more; another B frees the first B's caches."""
    model, tokenizer = lively
    questions = ["What is 1 + 2?", "What is 33 + 4 + 5 + 6?", "What is 7 + 8 + 9?", "What is 4?"]
    prompts = [rewards.make_prompt(q) for q in questions]
    stop = int(generate_completions(model, tokenizer, prompts[:1], 1, 8, 0.0).completion_ids[0, 3])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    graphs = torch._dynamo.utils.counters["stats"]
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    try:
        compiled_before = graphs["unique_graphs"]
        for stepped in (False, True):
            if stepped:  # one AdamW step of a real loss: every weight moves
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
                model.train()
                ids = torch.randint(0, len(tokenizer), (3, 6))
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                model.eval()
            for temperature in (0.0, 1.0):
                runs = []
                for compiled in (False, True):
                    torch.manual_seed(0)
                    runs.append(generate_completions(model, tokenizer, prompts[:3], 5, 12, temperature,
                                                     compiled=compiled))
                eager, fast = runs
                # Sampled draws could part only where u falls within ~1e-6 (the compiled kernels' rounding
                # of the logits) of a CDF boundary: about B * T * 1e-6 = 2e-4 of a chance in this test.
                assert torch.equal(eager.completion_ids, fast.completion_ids), (stepped, temperature)
                assert torch.equal(eager.completion_mask, fast.completion_mask)
                assert eager.texts == fast.texts and torch.equal(eager.truncated, fast.truncated)
            if not stepped:
                assert graphs["unique_graphs"] > compiled_before  # dynamo compiled the step, not fell back
                first_texts = eager.texts
        assert eager.texts != first_texts  # the step changed what the model says
        assert eager.prompt_mask.eq(0).any() and eager.completion_mask.eq(0).any()  # padding; an end
        before = graphs["unique_graphs"]
        other = generate_completions(model, tokenizer, [prompts[0], *prompts[2:]], 5, 12, 0.0, compiled=True)
        assert other.prompt_ids.shape[1] != eager.prompt_ids.shape[1]  # another prompt length, same B
        assert graphs["unique_graphs"] == before  # no compilation
        _, caches, shapes = grpo.compiled_decoder(model)
        assert {key[0] for key in caches} == {15}
        generate_completions(model, tokenizer, prompts[:1], 2, 12, 0.0, compiled=True)  # B = 2: say, evaluation
        assert {key[0] for key in caches} == {2} and {key[0] for key in shapes} == {2, 15}  # B = 15's freed
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.load_state_dict(weights)
        grpo.compiled_decoder.cache_clear()


def test_compiled_decoding_says_when_it_passes_the_recompile_limit(lively, monkeypatch, capsys):
    """Past dynamo's limit of compilations, the step runs uncompiled, slower than the plain loop: said, once."""
    model, tokenizer = lively
    seen = set()
    monkeypatch.setattr(grpo, "compiled_decoder", lambda m: (m.get_decoder(), {}, seen))  # no compiling here
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 2)
    prompt = [rewards.make_prompt("What is 1 + 2?")]
    for batch in (1, 2, 1, 2):
        generate_completions(model, tokenizer, prompt, batch, 2, 0.0, compiled=True)
    assert "--compile" not in capsys.readouterr().out  # two shapes, each compiled once: within the limit
    for batch in (3, 4):
        generate_completions(model, tokenizer, prompt, batch, 2, 0.0, compiled=True)
    grpo.say_once.cache_clear()
    assert capsys.readouterr().out.count("--compile: more batch shapes than torch compiles for one function") == 1


def test_a_sliding_window_model_decodes_eager_with_compile(tmp_path, capsys):
    """A sliding-window layer's cache keeps the last W - 1 of a longer prompt: copied into a static cache it would
    start at the wrong place. With --compile such a model decodes eager (the tokens of generate()), and says so."""
    from transformers import MistralConfig, MistralForCausalLM
    _, tokenizer = build_tiny_chat_model(tmp_path / "tok"), PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16, initializer_range=0.2, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()
    prompts = [rewards.make_prompt(q) for q in ("What is 33 + 4 + 5 + 6?", "What is 1 + 2?")]  # > the window; padded
    # (without the guard, seen: the 2 rows of the padded prompt differ from generate(); every step compiled anew)
    compiled = generate_completions(model, tokenizer, prompts, 2, 8, 0.0, compiled=True)
    assert compiled.prompt_ids.shape[1] > 4 * 16
    with torch.no_grad():
        plain = model.generate(input_ids=compiled.prompt_ids, attention_mask=compiled.prompt_mask, max_new_tokens=8,
                               do_sample=False, eos_token_id=[tokenizer.eos_token_id],
                               pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(compiled.completion_ids, plain[:, compiled.prompt_ids.shape[1]:][:, :compiled.completion_ids.shape[1]])
    assert "sliding-window attention layers: decoding runs eager" in capsys.readouterr().out
    grpo.say_once.cache_clear()


@pytest.mark.parametrize("triton, capability, expected", [
    (True, (9, 0), True),  # H100: decoding 5x faster compiled (bench/README.md)
    (True, (7, 0), True),  # V100, Triton's oldest
    (True, (6, 0), False),  # P100: Triton cannot compile for it
    (False, (9, 0), False),  # no Triton (torch's CUDA wheels on Windows): torch.compile fails
])
def test_compile_unset_is_on_for_cuda_gpus_that_triton_compiles_for(monkeypatch, triton, capability, expected):
    real_find_spec = grpo.importlib.util.find_spec
    monkeypatch.setattr(grpo.importlib.util, "find_spec", lambda name: (
        (object() if triton else None) if name == "triton" else real_find_spec(name)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert grpo.compiles_by_default(torch.device("cuda")) is expected
    assert not grpo.compiles_by_default(torch.device("cpu"))  # slower on CPUs; MPS untried
    assert not grpo.compiles_by_default(torch.device("mps"))


def test_compile_unset_is_settled_by_train_before_anything_uses_it(tiny_model_dir, tmp_path):
    assert [grpo.parse_args(flags).compile for flags in ([], ["--compile"], ["--no-compile"])] == [None, True, False]
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=1, eval_size=0)
    assert cfg.compile is None and grpo.train(cfg)["config"]["compile"] is False  # on a CPU: off


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom, the cells expected under 5 times pooled."""
    expected = counts.sum() * probs
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    return float(((observed - expected)[keep] ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("temperature, other, device", [(1.0, 0.5, "cpu"), (0.5, 1.0, "cpu"), (1.0, 0.5, "mps")])
def test_sampling_draws_from_softmax_of_the_logits_over_the_temperature(lively, temperature, other, device,
                                                                         monkeypatch):
    """device "mps": the draw on a device without float64 (torch.multinomial), run here on the CPU."""
    model, tokenizer = lively
    if device == "mps":
        monkeypatch.setattr(grpo, "NO_FLOAT64", {"cpu"})
        monkeypatch.setattr(torch, "rand", None)  # the float64 inverse CDF is not the one drawing
    torch.manual_seed(0)
    rollout = generate_completions(model, tokenizer, [rewards.make_prompt("What is 1 + 2?")], 4000, 1, temperature)
    counts = torch.bincount(rollout.completion_ids[:, 0], minlength=model.config.vocab_size).double()
    with torch.no_grad():
        logits = model(input_ids=rollout.prompt_ids[:1]).logits[0, -1].double()  # [V]
    # The statistic is about chi-square(df): mean df, sd sqrt(2 df). Mean + 6 sd fails a correct
    # sampler with probability well under 1e-5, and the other temperature's probabilities exceed it.
    statistic, df = chi_square(counts, torch.softmax(logits / temperature, dim=-1))
    why = (f"4,000 draws must follow softmax(logits / temperature) at temperature {temperature}, the distribution "
           "whose log-probs the loss uses")
    assert statistic < df + 6 * (2 * df) ** 0.5, f"{why} (chi-square {statistic:.0f}, {df} degrees of freedom)"
    statistic, df = chi_square(counts, torch.softmax(logits / other, dim=-1))
    assert statistic > df + 6 * (2 * df) ** 0.5, f"{why}, not at temperature {other}"


def test_sampling_and_the_mask_make_their_tensors_on_their_inputs_device():
    """On torch's meta device (shapes, no data): a tensor made on the CPU beside a GPU's would fail there, and here."""
    ids = torch.zeros(3, 5, dtype=torch.long, device="meta")
    why = "a tensor made without device= lands on the CPU: beside a GPU's tensors that fails"
    assert completion_mask(ids, [1, 2]).device.type == "meta", why
    for temperature in (1.0, 0.0):
        assert sample_tokens(torch.zeros(3, 7, device="meta"), temperature).device.type == "meta", why


def test_the_uniform_number_keeps_float64_resolution(monkeypatch):
    """Token 0 has probability 1/2 + 2^-31 (float64 logits): a uniform number of 1/2 + 2^-30 lies past it, so the draw
    is token 1; the same number in float32 rounds to 1/2 and would draw token 0. A token below float32's resolution
    (2^-24) could otherwise never be drawn."""
    monkeypatch.setattr(torch, "rand", lambda *shape, dtype=None, **kwargs: torch.full(shape, 0.5 + 2**-30, dtype=dtype))
    p = 0.5 + 2**-31
    logits = torch.tensor([[math.log(p), math.log(1 - p)]], dtype=torch.float64)
    assert sample_tokens(logits, temperature=1.0).tolist() == [1], (
        "the CDF and the uniform number must stay float64: in float32 a token of probability below 2^-24 is never drawn")


def test_a_uniform_number_of_zero_never_draws_a_token_of_probability_zero(monkeypatch):
    """torch.rand can return exactly 0. The draw is the first token whose CDF exceeds u (searchsorted's
    right=True), so u = 0 gives the first token of positive probability, never token 0 when its probability is 0."""
    monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: torch.zeros(*shape, dtype=torch.float64))
    assert sample_tokens(torch.tensor([[-math.inf, 0.0, 0.0]]), temperature=1.0).tolist() == [1], (
        "u = 0 drew a token of probability 0: draw the first token whose CDF exceeds u (searchsorted's right=True)")


def test_on_mps_a_drawn_token_of_probability_zero_is_drawn_again(monkeypatch):
    """torch.multinomial on MPS has returned tokens of probability 0 (pytorch#192577): such a row is drawn again,
    the others keep their draw. Here a stand-in multinomial errs on its first call, as MPS would."""
    real, calls = torch.multinomial, []
    def erring(probs, n):
        calls.append(len(probs))
        return torch.zeros(len(probs), n, dtype=torch.long) if len(calls) == 1 else real(probs, n)
    monkeypatch.setattr(torch, "multinomial", erring)
    monkeypatch.setattr(grpo, "NO_FLOAT64", {"cpu"})  # the CPU takes MPS's branch
    logits = torch.tensor([[-math.inf, 0.0, 0.0], [0.0, -math.inf, -math.inf], [-math.inf, -math.inf, 0.0]])
    tokens = sample_tokens(logits, 1.0)
    assert calls == [3, 2] and tokens[1] == 0 and tokens[2] == 2 and tokens[0] in (1, 2)  # rows 0, 2 drawn again


def test_a_models_generation_config_does_not_reach_sampling(lively):
    """min_p, no_repeat_ngram_size, typical_p, bad_words_ids (and top-k, top-p, the repetition
    penalty, a temperature) in a model's generation_config: the same tokens at the same seed."""
    model, tokenizer = lively
    prompts = [rewards.make_prompt("What is 1 + 2?"), rewards.make_prompt("What is 33 + 4?")]
    torch.manual_seed(0)
    plain = generate_completions(model, tokenizer, prompts, 4, 8, temperature=1.0)
    config, saved = model.generation_config, model.generation_config.to_dict()
    settings = dict(min_p=0.5, no_repeat_ngram_size=1, typical_p=0.2, top_k=1, top_p=0.1, repetition_penalty=5.0,
                    temperature=0.1, bad_words_ids=[[int(plain.completion_ids[0, 0])]])
    for name, value in settings.items():
        setattr(config, name, value)
    try:
        torch.manual_seed(0)
        again = generate_completions(model, tokenizer, prompts, 4, 8, temperature=1.0)
    finally:
        for name in settings:
            setattr(config, name, saved.get(name))
    assert len(set(plain.texts)) > 2  # sampled: the settings above would have narrowed it
    assert torch.equal(again.completion_ids, plain.completion_ids)


# ---------------------------------------------------------------------------------------------
# Rewards and answer parsing


@pytest.mark.parametrize("text, expected", [
    ("1,000", 1000.0), ("$18", 18.0), ("18.00", 18.0), ("18", 18.0), ("-3", -3.0), (".5", 0.5),
    ("it costs $1,234.50 total", 1234.5), ("first 3 then 4", 4.0), ("no number", None), ("", None),
    ("The answer is 18.", 18.0), ("18, then 20", 20.0), ("= -3", -3.0), ("(-2.5)", -2.5),
    # a fraction is its value; scientific notation; the Unicode minus; a range is not negative
    ("3/4", 0.75), ("-3/4", -0.75), ("1.5e3", 1500.0), ("2e-3", 0.002), ("4E2", 400.0),
    ("\u22127", -7.0), ("\u22121.5e\u22122", -0.015), ("pages 5-10", 10.0), ("x-3", 3.0),
    # unreadable: commas not in groups of three, a zero denominator, a number of 101+ characters
    ("1,0000", None), ("1,2,3", None), ("1/0", None), ("1" * 101, None), ("5.5.5", None),
    # letters after the last digit are not part of it; a grouped number with an exponent
    ("7 Xmas trees", 7.0), ("1,000e3", 1e6), ("1,000E3", 1e6),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("gold, right, wrong", [
    ("3/4", "0.75", "4"), ("0.75", "3/4", "3"), ("1.5e3", "1,500", "3"), ("2e-3", "0.002", "-3"),
    ("\u22127", "-7", "7"), ("-7", "\u22127", "7"), ("10", "pages 5-10", "-10"), ("1,0000", "10000", "0"),
])
def test_answer_reward_reads_gold_answers_in_the_same_forms(gold, right, wrong):
    completions = [f"<reasoning>r</reasoning><answer>{right}</answer>",
                   f"<reasoning>r</reasoning><answer>{wrong}</answer>"]
    assert answer_reward(completions, [extract_gold_answer(gold)] * 2) == [1.0, 0.0]


@pytest.mark.parametrize("gold, near_miss", [
    # rounded or close: a reward comparing rounded numbers, or with a tolerance, would take these
    ("18", "18.4"), ("18", "17.6"), ("18", "18.5"), ("18", "18.001"), ("18", "17.9999"), ("2.5", "2"), ("2.5", "3"),
    # a sign dropped or added, a factor of 10, a fraction read as its numerator or its denominator
    ("-3", "3"), ("3", "-3"), ("3", "−3"), ("18", "180"), ("18", "1.8"), ("18", "1,800"),
    ("18", "18/4"), ("0.75", "3/5"), ("3", "3/4"), ("4", "3/4"), ("18", "36/3"),
])
def test_a_near_miss_scores_zero(gold, near_miss):
    """Exactly the gold number or nothing: no partial credit for nearly right (GRPO would learn "close enough")."""
    assert answer_reward([f"<reasoning>r</reasoning><answer>{near_miss}</answer>"], [extract_gold_answer(gold)]) == [0.0]
    assert answer_reward([f"<reasoning>r</reasoning><answer>{gold}</answer>"], [extract_gold_answer(gold)]) == [1.0]


def test_extract_gold_answer():
    assert extract_gold_answer("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert extract_gold_answer("#### 1,000") == "1000"
    assert extract_gold_answer("a #### b #### 42 ") == "42"
    assert extract_gold_answer("7") == "7"
    assert extract_gold_answer("2 + 10 = 12####12") == "12"  # no space around the marks


def test_the_answer_block_is_the_last_one_that_closes():
    assert extract_answer("<answer>5</answer> then <answer>7") == "5"  # the unclosed one after it is not read
    assert extract_answer("<answer>5</answer><answer>6</answer>") == "6"
    assert answer_reward([None, "<answer>3</answer>"], ["3", "3"]) == [0.0, 1.0]  # a non-text completion scores 0


def test_answer_reward():
    completions = [
        "<reasoning>9*2</reasoning>\n<answer>18</answer>",
        "<reasoning>x</reasoning><answer>$18.00</answer>",
        "<reasoning>18 eggs</reasoning><answer>17</answer>",  # the answer block decides, not the reasoning
        "I think it is 16, no, 18",  # no tags: the last number counts
        "<answer>18</answer> but also <answer>19</answer>",  # the last block counts
        "<answer></answer>", "", "<answer>eighteen</answer>", "\x00\uffff<answer>",
    ]
    assert answer_reward(completions, ["18"] * len(completions)) == [1, 1, 0, 1, 0, 0, 0, 0, 0]
    assert answer_reward(["<answer>1,000</answer>"], ["1000"]) == [1.0]
    assert answer_reward([None], ["1"]) == [0.0]
    with pytest.raises(ValueError):
        answer_reward(["1", "2"], ["1"])  # a length mismatch is a bug in the caller, not odd text


def test_format_reward():
    completions = [
        "<reasoning>\nstep\n</reasoning>\n<answer>\n18\n</answer>",
        "  <reasoning>a</reasoning><answer>1</answer>\n",
        "<reasoning>a</reasoning><answer>1</answer> trailing text",  # not strict: 4 tags once -> 0.5
        "<answer>1</answer>",
        "<reasoning><reasoning></reasoning>",  # repeated tag earns nothing
        "plain text", "", None,
        # strict is each tag exactly once, in order: not two answer blocks, nor tags nested or swapped
        "<reasoning>a</reasoning><answer>1</answer><answer>2</answer>",
        "<reasoning>a <answer>1</answer></reasoning><answer>1</answer>",
        "<answer>1</answer><reasoning>a</reasoning>",
        "<reasoning>a</reasoning>so<answer>1</answer>",
    ]
    assert format_reward(completions) == [1.0, 1.0, 0.5, 0.25, 0.125, 0.0, 0.0, 0.0, 0.25, 0.25, 0.5, 0.5]
    assert extract_answer("<answer> 5 </answer>") == " 5 "
    assert extract_answer("<answer>a<answer>b</answer>") == "b"  # the block that closes last


# Texts that made backtracking patterns take seconds: tags without their closing partner, long
# runs of the characters numbers are made of. 1 MB each.
ADVERSARIAL = {
    "open answer tags": "<answer>" * 125_000, "open reasoning then answer": "<reasoning>1<answer>" * 52_000,
    "digits": "1" * 1_000_000, "digit-comma": "1," * 500_000, "digit-dot": "1." * 500_000,
    "digit-e": "1e" * 500_000, "digit-slash": "1/" * 500_000, "dashes": "-" * 1_000_000,
    "unicode minus": "\u2212" * 1_000_000, "letters": "a" * 1_000_000,
    "tags and spaces": "<reasoning> </reasoning> <answer> </answer> " * 23_000,
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_rewards_take_linear_time_on_adversarial_text(name):
    """Linear scans of these 1 MB texts take at most 17 ms here (2 cores, busy with two training runs); the
    backtracking they once caused took seconds. The bound, 0.5 s, is 30x the first: only a machine 30 times
    slower, or a return of the backtracking, fails it. (A ratio of two text sizes is no sounder: timer noise
    on a few milliseconds, under mutmut's tracing, reached 8x where linear time means 4x.)"""
    import time
    text = ADVERSARIAL[name]
    best = float("inf")  # the best of 3: a busy machine slows a run, it never speeds one up
    for _ in range(3):
        start = time.perf_counter()
        format_reward([text]), answer_reward([text], ["1"])
        best = min(best, time.perf_counter() - start)
    assert best < 0.5, f"{name}: {best * 1000:.0f} ms on 1 MB"


def test_rewards_never_raise_and_stay_in_range_on_any_text():
    hypothesis = need("hypothesis")
    strategies = hypothesis.strategies
    pieces = strategies.sampled_from([*TAGS, "-", "\u2212", ",", ".", "/", "e", "E", " ", "\n", "1", "0", "9"])
    texts = strategies.one_of(strategies.text(), strategies.lists(pieces).map("".join))

    @hypothesis.settings(max_examples=400, deadline=None)
    @hypothesis.given(texts, texts)
    def check(completion, gold):
        assert format_reward([completion])[0] in {0.0, 0.125, 0.25, 0.375, 0.5, 1.0}
        assert answer_reward([completion], [gold]) in ([0.0], [1.0])
        parse_number(completion)
    check()


# ---------------------------------------------------------------------------------------------
# The steps of the reasoning (process supervision): a program checks each equation, exactly


@pytest.mark.parametrize("text, expected", [
    ("14 + 7", 21), ("1/3 + 1/6", Fraction(1, 2)), ("0.1 + 0.2", Fraction(3, 10)), ("\u22123 × \u22122", 6),
    ("1,000 + 5", 1005), ("12 ÷ 4 × 3", 9), ("2 * (3 + 4)", 14), ("((((1))))", 1), ("-(2 - 5)", 3), ("+1", 1),
    ("--1", 1), ("7 - 2 - 1", 4), ("8 / 4 / 2", 1), ("2 + 3 * 4", 14), ("1\t+\t1", 2),
    # the bounds, at and just past them: a number of 100 characters, 20 parentheses deep, 20 signs
    ("9" * 100, int("9" * 100)), ("(" * 20 + "1" + ")" * 20, 1), ("-" * 15 + "1", -1), ("-" * 20 + "2", 2),
    ("(" * 21 + "1" + ")" * 21, None), ("-" * 25 + "1", None),
    # not plain arithmetic, or not readable: None, never an exception
    ("1/0", None), ("2^10", None), ("2**3", None), ("2(3)", None), ("1 +", None), ("", None), ("x + 1", None),
    ("(1", None), ("1)", None), ("1,0000", None), ("9" * 101, None), ("(" * 25 + "1" + ")" * 25, None),
])
def test_evaluate_arithmetic_exactly(text, expected):
    assert rewards.evaluate_arithmetic(text) == expected


@pytest.mark.parametrize("line, holds", [
    ("14 + 7 = 21", True), ("14 + 7 = 22", False), ("3 × (4 + 2) = 18 = 9 × 2", True), ("1 = 1 = 2", False),
    ("She makes 9 * 2 = $18.", True), ("Total: 3 + 4 = 7, and 7 - 2 = 5", True), ("3 + 4 = 7, and 7 - 2 = 6", False),
    ("0.1 + 0.2 = 0.3", True), ("1/3 = 0.333", False), ("x = 5", None), ("so the answer is 21", None),
    ("5 / 0 = 1", None), ("= 5", None), ("a + b = c", None), ("$1 + $2 = $3", True),
])
def test_an_equation_holds_or_not_or_is_none(line, holds):
    assert rewards.equation_holds(line) is holds


def test_reasoning_steps_are_the_equations_of_the_reasoning_block_with_where_they_end():
    completion = ("intro 1 + 1 = 2\n<reasoning>\n14 + 7 = 21\n3 × 4 = 13\nso we add\n(2+3)*4 = 20 = 4 × 5\n"
                  "</reasoning>\n<answer>\n21 = 21\n</answer>")
    steps = rewards.reasoning_steps(completion)
    assert [reward for _, _, reward in steps] == [1.0, 0.0, 1.0]  # the line before the block, the answer: no steps
    assert [completion[start:end] for start, end, _ in steps] == ["14 + 7 = 21", "3 × 4 = 13", "(2+3)*4 = 20 = 4 × 5"]
    assert all(completion[start - 1] == completion[end] == "\n" for start, end, _ in steps)
    assert rewards.reasoning_steps("<reasoning>2 + 2 = 4") == [(11, 20, 1.0)]  # unclosed: to the end of the text
    assert rewards.reasoning_steps("2 + 2 = 4") == [] and rewards.reasoning_steps(None) == []

    def rewards_of(text):
        return [reward for _, _, reward in rewards.reasoning_steps(text)]
    # the first block only, and its own end; a stray end tag before it ends nothing
    assert rewards_of("<reasoning>\n1 + 1 = 2\n</reasoning>\n3 + 3 = 7\n</reasoning>") == [1.0]
    assert rewards_of("<reasoning>\n1 + 1 = 2\n</reasoning><reasoning>\n3 + 3 = 7\n</reasoning>") == [1.0]
    assert rewards_of("</reasoning> <reasoning>\n1 + 1 = 3\n</reasoning>") == [0.0]
    # a line is read from its own start (or the tag's end): a long line before it does not make it too long
    assert rewards_of("<reasoning>\n" + "x" * 300 + "\n1 + 1 = 2\n</reasoning>") == [1.0]
    assert rewards_of("x" * 300 + "<reasoning>1 + 1 = 2") == rewards_of("\n9 = 8 <reasoning>1 + 1 = 2") == [1.0]
    # a line of MAX_STEP_LENGTH characters is a step, one longer is not
    line = "1 + 1 = " + " " * (rewards.MAX_STEP_LENGTH - 9) + "2"
    assert len(line) == rewards.MAX_STEP_LENGTH and rewards_of(f"<reasoning>\n{line}\n") == [1.0]
    assert rewards_of(f"<reasoning>\n {line}\n") == []
    # a line that ends in "=", or starts with it (no step), does not hide the next one
    assert rewards_of("<reasoning>\n1 + 1 =\n2 + 2 = 4\n</reasoning>") == [1.0]
    assert rewards_of("<reasoning>= 1\n1 + 1 = 2") == [1.0]
    # the first MAX_STEPS lines with "=", no more
    assert len(rewards.reasoning_steps("<reasoning>" + "1 = 1\n" * 300)) == rewards.MAX_STEPS


def test_the_step_reward_counts_distinct_correct_equations_and_is_bounded():
    """The scalar form (\"each correct step adds 0.2\"), bounded against farming: a repeated equation earns nothing
    more, and six correct ones no more than five (Gao et al., arXiv 2410.15115)."""
    def reply(*lines):
        return "<reasoning>\n" + "\n".join(lines) + "\n</reasoning><answer>1</answer>"
    assert rewards.step_reward([reply("1 + 1 = 2"), reply("1 + 1 = 3"), reply("no equation"), None]) == \
        [0.2, 0.0, 0.0, 0.0]
    assert rewards.step_reward([reply(*["1 + 1 = 2"] * 9)]) == [0.2]  # repeated: once
    assert rewards.step_reward([reply(*[f"{k} + 1 = {k + 1}" for k in range(6)])]) == [1.0]  # capped
    assert rewards.step_reward([reply("1 + 1 = 2", "2 + 2 = 4", "2 + 2 = 5")]) == [pytest.approx(0.4)]
    assert rewards.step_reward([reply("1 * 0 = 0", "2 * 0 = 0")]) == [pytest.approx(0.4)]  # distinct, whole lines


STEP_ADVERSARIAL = {
    "equal signs": "=" * 1_000_000, "lines of equations": "1=1\n" * 250_000, "lines of non-equations": "x=y\n" * 250_000,
    "one long equation": "9" * 999_990 + "=9", "open parentheses": "(" * 999_990 + "1=1", "long product":
    ("9*" * 95 + "9=1\n") * 5_000, "deep but short": ("(" * 60 + "1" + ")" * 60 + "=1\n") * 8_000,
    "newlines": "\n" * 1_000_000, "division by zero": "1/0=1\n" * 166_000,
}


@pytest.mark.parametrize("name", STEP_ADVERSARIAL)
def test_steps_take_linear_time_on_adversarial_text(name):
    """As the other rewards (0.5 s on 1 MB, the same margin): "=" is found by str.find, each line read once,
    bounded lines, depth and count of steps."""
    text = "<reasoning>" + STEP_ADVERSARIAL[name]
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        rewards.reasoning_steps(text), rewards.step_reward([text])
        best = min(best, time.perf_counter() - start)
    assert best < 0.5, f"{name}: {best * 1000:.0f} ms on 1 MB"


def test_steps_never_raise_on_any_text():
    hypothesis = need("hypothesis")
    strategies = hypothesis.strategies
    pieces = strategies.sampled_from(["<reasoning>", "</reasoning>", "=", "+", "-", "\u2212", "*", "×", "/", "÷",
                                      "(", ")", ",", ".", "$", " ", "\n", "0", "1", "9", "x"])
    texts = strategies.one_of(strategies.text(), strategies.lists(pieces, max_size=60).map("".join))

    @hypothesis.settings(max_examples=400, deadline=None)
    @hypothesis.given(texts)
    def check(text):
        steps = rewards.reasoning_steps("<reasoning>" + text)
        assert all(reward in (0.0, 1.0) and 11 <= start < end <= len(text) + 11 for start, end, reward in steps)
        assert 0 <= rewards.step_reward(["<reasoning>" + text])[0] <= 1
    check()


def test_score_completions_weights_and_components():
    # format and answer differ in each row, so swapped weights would give other totals
    total, parts = grpo.score_completions(["<reasoning>a</reasoning><answer>3</answer>", "4", ""], ["4", "4", "4"],
                                          {"format": 0.5, "answer": 2.0, "step": 0.0})
    torch.testing.assert_close(parts["format"], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(parts["answer"], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(total, torch.tensor([0.5, 2.0, 0.0]))


# ---------------------------------------------------------------------------------------------
# Data


def test_data_from_jsonl_file_and_folder(tmp_path):
    rows = [{"question": "Q1?", "answer": "because\n#### 1,200"}, {"question": "Q2?", "answer": "#### 7"}]
    file = write_jsonl(tmp_path / "data.jsonl", rows)
    loaded = rewards.load_dataset_rows(str(file), "train")
    assert [r["answer"] for r in loaded] == ["1200", "7"]
    assert loaded[0]["prompt"][0]["role"] == "system" and loaded[0]["prompt"][-1] == {"role": "user", "content": "Q1?"}
    folder = tmp_path / "gsm"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", rows[:1])
    assert len(rewards.load_dataset_rows(str(folder), "train")) == 2
    assert len(rewards.load_dataset_rows(str(folder), "test")) == 1


def test_bad_data_is_a_clear_error(tmp_path, capsys, caplog):
    """Each message whole: what is wrong, with which file and line (numbered from 1, as an editor shows it), and
    what to do (the parts that come from elsewhere, the parse error and the Hub's, between a fixed beginning and
    end); said once, with nothing else printed or logged before it."""
    def message(source, split="train"):
        with pytest.raises(ConfigError) as error:
            rewards.load_dataset_rows(str(source), split)
        return str(error.value)
    good = {"question": "Q?", "answer": "#### 3"}
    file = write_jsonl(tmp_path / "bad.jsonl", [good, {"question": "Q?", "solution": "3"}])
    assert message(file) == (f"--dataset file {str(file)!r}, line 2, lacks the key(s) ['answer']; each row needs "
                             "'question' and 'answer'.")
    (tmp_path / "empty_dir").mkdir()
    assert message(tmp_path / "empty_dir", "test") == (f"--dataset folder {str(tmp_path / 'empty_dir')!r} has no "
                                                       "test.jsonl; it needs train.jsonl and test.jsonl.")
    (tmp_path / "empty.jsonl").write_text("\n")
    assert message(tmp_path / "empty.jsonl") == (f"--dataset file {str(tmp_path / 'empty.jsonl')!r} is empty; it needs "
                                                 "rows with 'question' and 'answer'.")
    (tmp_path / "list.jsonl").write_text('["question", "answer"]\n')  # the keys' names, but no object
    assert ", line 1, lacks the key(s) ['answer', 'question']" in message(tmp_path / "list.jsonl")
    write_jsonl(tmp_path / "gap.jsonl", [good]).write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    assert len(rewards.load_dataset_rows(str(tmp_path / "gap.jsonl"), "train")) == 2  # a blank line ends nothing
    (tmp_path / "broken.jsonl").write_text((json.dumps(good) + "\n") * 6 + "not json\n" + json.dumps(good) + "\n")
    capsys.readouterr()
    text = message(tmp_path / "broken.jsonl")
    assert text.startswith(f"--dataset file {str(tmp_path / 'broken.jsonl')!r}, line 7, is not JSON (Expecting value")
    assert text.endswith("); write one JSON object per line, with 'question' and 'answer'.")
    assert capsys.readouterr() == ("", "") and not caplog.records  # no second, raw report of the same error
    # Offline (as here) the Hub cannot be reached; online this id does not exist: a clear error either way.
    text = message("nobody/no-such-dataset")
    assert text.startswith("--dataset 'nobody/no-such-dataset' cannot be loaded (")
    assert text.endswith("). Check the id, --dataset-config and the network; without the Hub: --dataset arithmetic "
                         "or a local JSON-lines file.")


def test_a_hub_dataset_is_asked_for_by_id_configuration_and_split(monkeypatch, tmp_path, capsys):
    """GSM8K's Hub id needs its configuration ("main" unless --dataset-config says otherwise); a single local file
    serves both splits, and says so when it is read for evaluation."""
    import datasets
    asked = []
    rows = datasets.Dataset.from_list([{"question": "Q?", "answer": "#### 3"}])
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: asked.append((args, kwargs)) or rows)
    assert rewards.load_dataset_rows("openai/gsm8k", "test")[0]["answer"] == "3"
    rewards.load_dataset_rows("someone/data", "train", "other")
    rewards.load_question_answer_rows("openai/gsm8k", "train")  # its own default configuration too
    assert asked == [(("openai/gsm8k", "main"), {"split": "test"}), (("someone/data", "other"), {"split": "train"}),
                     (("openai/gsm8k", "main"), {"split": "train"})]
    file = write_jsonl(tmp_path / "one.jsonl", [{"question": "Q?", "answer": "#### 3"}])
    monkeypatch.undo()
    rewards.load_dataset_rows(str(file), "train")
    assert capsys.readouterr().out == ""
    rewards.load_dataset_rows(str(file), "test")
    assert capsys.readouterr().out == (f"note: --dataset {str(file)!r} is one file: evaluation uses questions it "
                                       "trains on.\n")


def test_the_default_prompt_and_task_are_the_ones_documented():
    """A prompt is the system prompt, the worked example, then the question; the default task is a + b up to 49
    in seed 0's order, and arithmetic_problems gives the training problems unless asked for the held-out ones."""
    prompt = rewards.make_prompt("Q?")
    assert prompt == [{"role": "system", "content": rewards.SYSTEM_PROMPT}, *rewards.EXAMPLE_TURN,
                      {"role": "user", "content": "Q?"}]
    rows = rewards.load_dataset_rows("arithmetic", "train")
    assert rows == rewards.load_dataset_rows("arithmetic", "train", "main", 49, 0, True)
    assert rows[0]["prompt"] == rewards.make_prompt(rows[0]["question"])  # with the worked example
    assert rewards.arithmetic_problems(9, 0) == rewards.arithmetic_problems(9, 0, held_out=False)


def test_arithmetic_task_holds_out_distinct_problems_never_trained_on():
    train = rewards.load_dataset_rows("arithmetic", "train", arithmetic_max=12, seed=5)
    assert train == rewards.load_dataset_rows("arithmetic", "train", arithmetic_max=12, seed=5)
    test = rewards.load_dataset_rows("arithmetic", "test", arithmetic_max=12, seed=5)
    pairs = []
    for row in train + test:
        a, b = map(int, row["question"].removeprefix("What is ").removesuffix("?").split(" + "))
        assert 0 <= a <= 12 and 0 <= b <= 12 and int(row["answer"]) == a + b
        pairs.append((a, b))
    assert sorted(pairs) == [(a, b) for a in range(13) for b in range(13)]  # each pair once
    assert all((a + 2 * b) % 5 == 0 for a, b in pairs[len(train):])  # the held-out rule
    # The default task: at least 1,000 distinct problems to train on and 200 held out.
    default_train, default_test = (rewards.load_dataset_rows("arithmetic", split) for split in ("train", "test"))
    assert len(default_train) >= 1000 and len(default_test) >= 200


def test_the_task_of_three_terms_holds_out_distinct_problems_and_shows_two_checked_steps():
    """`arithmetic3`: every a + b - c with c <= a + b, each once, a fifth held out; its worked example shows one
    equation per step, each of which the step checker reads and finds true."""
    train = rewards.load_dataset_rows("arithmetic3", "train", arithmetic_max=6, seed=5)
    test = rewards.load_dataset_rows("arithmetic3", "test", arithmetic_max=6, seed=5)
    triples = []
    for row in train + test:
        a, rest = row["question"].removeprefix("What is ").removesuffix("?").split(" + ")
        b, c = rest.split(" - ")
        a, b, c = int(a), int(b), int(c)
        assert 0 <= c <= a + b and max(a, b, c) <= 6 and int(row["answer"]) == a + b - c
        triples.append((a, b, c))
    assert sorted(triples) == [(a, b, c) for a in range(7) for b in range(7) for c in range(7) if c <= a + b]
    assert set(triples[len(train):]) == {t for t in triples if (t[0] + 2 * t[1] + 3 * t[2]) % 5 == 0}  # held out
    assert train == rewards.load_dataset_rows("arithmetic3", "train", arithmetic_max=6, seed=5)  # seeded
    assert train != rewards.load_dataset_rows("arithmetic3", "train", arithmetic_max=6, seed=6)
    assert " - " not in rewards.arithmetic_problems(3, 0)[0]["question"]  # two terms unless asked
    assert train[0]["prompt"][1:3] == rewards.EXAMPLE_TURN_STEPS  # the example of two steps
    example = rewards.EXAMPLE_TURN_STEPS[1]["content"]
    assert [reward for _, _, reward in rewards.reasoning_steps(example)] == [1.0, 1.0] and rewards.is_strict_format(example)
    assert rewards.answer_reward([example], ["16"]) == [1.0]
    assert rewards.load_dataset_rows("arithmetic", "test")[0]["prompt"][1:3] == rewards.EXAMPLE_TURN  # unchanged


def test_the_prompt_shows_the_worked_example_as_an_earlier_turn_unless_switched_off():
    with_example, without = rewards.make_prompt("What is 2 + 3?"), rewards.make_prompt("What is 2 + 3?", False)
    assert [m["role"] for m in with_example] == ["system", "user", "assistant", "user"]
    assert with_example[1:3] == rewards.EXAMPLE_TURN and with_example[-1] == without[-1]
    assert [m["role"] for m in without] == ["system", "user"]
    assert rewards.is_strict_format(rewards.EXAMPLE_TURN[1]["content"])  # the example is what earns 1.0
    rows = rewards.load_dataset_rows("arithmetic", "test", arithmetic_max=4, example_turn=False)
    assert all(r["prompt"] == rewards.make_prompt(r["question"], False) for r in rows)


def test_data_order_is_a_seeded_shuffle_per_epoch():
    rows = [{"i": i} for i in range(10)]
    steps = [[r["i"] for r in grpo.rows_for_step(rows, s, 4, seed=0)] for s in range(5)]
    first_epoch = steps[0] + steps[1] + steps[2][:2]
    assert sorted(first_epoch) == list(range(10))  # every row once per epoch
    assert steps == [[r["i"] for r in grpo.rows_for_step(rows, s, 4, seed=0)] for s in range(5)]


# ---------------------------------------------------------------------------------------------
# Command line, end to end


def run_cli(*args, cwd=HERE, timeout=300):
    """`python grpo.py ARGS` in a fresh process: the real command line, as a user runs it (a few seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(HERE / "grpo.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_main(*args):
    """grpo.main(ARGS) in this process, as run_cli reports it: what `python grpo.py ARGS` does past its imports
    (sys.exit(message) prints the message to stderr and exits with 1)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            grpo.main(list(args))
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (print(stop.code, file=sys.stderr) or 1)
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def test_help_lists_every_config_field():
    result = run_main("--help")
    assert result.returncode == 0
    for f in fields(Config):
        assert "--" + f.name.replace("_", "-") in result.stdout


def test_end_to_end_then_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--model", str(tiny_model_dir), "--dataset", "arithmetic", "--output-dir", str(out),
              "--prompts-per-step", "2", "--num-generations", "4", "--max-completion-length", "8",
              "--micro-batch-size", "4", "--eval-size", "4", "--save-every", "1", "--log-samples-every", "1",
              "--device", "cpu"]
    first = run_cli(*common, "--max-steps", "2")
    assert first.returncode == 0, first.stderr
    metrics = grpo.read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("reward/total", "reward/format", "reward/answer", "accuracy", "groups/zero_std_frac",
                "completion/len_mean", "completion/truncated_frac", "kl", "clip/low_frac", "clip/high_frac",
                "loss", "grad_norm", "lr", "time/generate", "time/score", "time/logps", "time/update",
                "memory/peak_mb"):
        assert key in metrics[0], key
    assert (out / "checkpoint-2" / "model.safetensors").exists() and not (out / "checkpoint-1").exists()
    assert (out / "curves.png").stat().st_size > 1000
    assert len(grpo.read_jsonl(out / "samples.jsonl")) == 4
    results = json.loads((out / "results.json").read_text())
    assert set(results["before"]) == {"accuracy", "format_rate", "n"} and results["after"]["n"] == 4

    again = run_main(*common, "--max-steps", "2")  # a second run into the same folder would mix two runs
    assert again.returncode != 0 and "already holds a run" in again.stderr

    resumed = run_main(*common, "--max-steps", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert [m["step"] for m in grpo.read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert (out / "checkpoint-3").exists() and not (out / "checkpoint-2").exists()
    assert json.loads((out / "results.json").read_text())["before"] == results["before"]
    done = run_main(*common, "--max-steps", "3", "--resume")
    assert done.returncode != 0 and "already at step 3; pass a larger --max-steps" in done.stderr


def test_help_shows_choices_defaults_and_examples_whole():
    result = run_main("--help")
    help_text = result.stdout
    for choices in ("{k1,k2,k3,k3_ratio,k1_to_go}", "{grpo,dapo,dr_grpo,bnpo}", "{auto,fp32,bf16}", "{auto,cuda,mps,cpu}"):
        assert choices in help_text
    assert grpo.LORA_TARGETS in help_text  # a long default, not broken across lines
    assert "(default: unset)" in help_text and "(default: None)" not in help_text
    assert "(default: on)" in help_text and "(default: True)" not in help_text
    assert "Example, nothing from the Hub: python grpo.py --model ./chat-model --dataset arithmetic" in " ".join(
        help_text.split())


def test_command_line_mistakes_exit_2_with_one_clear_line(tiny_model_dir, tmp_path):
    """A negative number is a value, not a flag (and check_config says why it is wrong); a prefix of a flag is no
    flag; argparse's errors and ours exit alike, with 2."""
    negative = run_main("--learning-rate", "-1e-6", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path))
    assert negative.returncode == 2 and "--learning-rate is -1e-06; it must be > 0." in negative.stderr
    assert run_main("--beta", "-.5", "--model", str(tiny_model_dir)).stderr.startswith("grpo.py: error: --beta is -0.5")
    prefix = run_main("--num-generation", "4")
    assert prefix.returncode == 2 and "unrecognized arguments: --num-generation 4" in prefix.stderr
    assert run_main("--loss-type", "ppo").returncode == 2
    assert grpo.parse_args(["--lora-target-modules", "q_proj", "--seed", "-3"]).seed == -3


def test_a_local_folder_is_a_folder_and_a_path_is_never_a_hub_id(tiny_model_dir, tmp_path, monkeypatch):
    """A relative folder without ./ loads as a folder; a missing one that no Hub id could be (two slashes) is "no
    such folder" at once, before any loading."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    grpo.check_config(Config(model="models/tiny", dataset="arithmetic"))
    assert grpo.load_tokenizer("models/tiny") is not None
    for missing in ("offline-models/SmolLM2/x", "models\\tiny2"):
        with pytest.raises(ConfigError, match=re.escape(f"--model {missing!r}: no such model folder")):
            grpo.check_config(Config(model=missing, dataset="arithmetic"))
    with pytest.raises(ConfigError) as refused:
        grpo.check_config(Config(model="models/tiny", dataset="data/train.jsonl"))
    assert str(refused.value) == ("--dataset 'data/train.jsonl': no such data file or folder. Check the path, or "
                                  "pass a Hub id.")


def test_without_the_hub_hub_ids_load_from_the_cache_at_once_and_say_what_to_do(tmp_path, monkeypatch, capsys):
    """The libraries retry an unreachable Hub for about a minute; one quick look instead (seen here: 48 s before
    the error, now a second), then the cache only, and a missing model names the ways to go on without the Hub."""
    import datasets
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    looked = []
    def unreachable(address, timeout):
        looked.append((address, timeout))
        raise OSError("no route to host")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    grpo.check_config(Config(model="nobody/no-such-model", dataset="arithmetic3"))  # a built-in task: no Hub id
    assert looked == [(("huggingface.co", 443), 3)]
    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert capsys.readouterr().out == ("note: huggingface.co cannot be reached: --model nobody/no-such-model from the "
                                       "cache only. Without the Hub: --model ./folder, --dataset arithmetic or a "
                                       "JSON-lines file.\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    grpo.check_config(Config(model="nobody/no-such-model", dataset="nobody/data"))  # both named, once each
    assert "--model nobody/no-such-model, --dataset nobody/data from the cache only" in capsys.readouterr().out
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="--model 'nobody/no-such-model' cannot be loaded"):
        grpo.load_tokenizer("nobody/no-such-model")
    assert time.perf_counter() - start < 5  # no retries (seen: 0.01 s)
    looked.clear()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    grpo.check_config(Config(model=str(tmp_path), dataset="arithmetic"))  # nothing from the Hub: no look
    assert looked == [] and not huggingface_hub.constants.HF_HUB_OFFLINE and capsys.readouterr().out == ""


def test_a_run_without_a_checkpoint_starts_again_with_resume(tiny_model_dir, tmp_path, capsys):
    """A run stopped before its first checkpoint (a kill, a crash, Ctrl-C twice) left metrics.jsonl and no
    checkpoint: a new run there is refused with --resume as the way on, and --resume starts it again from step 0,
    each log holding each step once."""
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=2, eval_size=0, save_every=0)
    grpo.train(cfg)
    shutil.rmtree(Path(cfg.output_dir) / "checkpoint-2")  # as if killed before the end
    with pytest.raises(ConfigError, match=r"Pass --resume to go on \(no checkpoint yet: from step 0\), or another --output-dir\."):
        grpo.train(cfg)
    capsys.readouterr()
    grpo.train(replace(cfg, resume=True))
    assert "resuming from no checkpoint yet: the start at step 0" in capsys.readouterr().out
    assert [m["step"] for m in grpo.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in grpo.read_jsonl(Path(cfg.output_dir) / "samples.jsonl")] == [1, 1, 2, 2]
    with pytest.raises(ConfigError, match="holds no run"):
        grpo.train(replace(cfg, output_dir=str(tmp_path / "nothing"), resume=True))


def test_resume_keeps_the_runs_own_flags_and_prints_a_change(tiny_model_dir, tmp_path):
    """`--resume --output-dir X` (as the interrupt message prints it) continues the run as it was: a flag not typed
    keeps the run's value (the learning rate among them); a typed change is printed."""
    out = tmp_path / "run"
    first = run_main("--model", str(tiny_model_dir), "--dataset", "arithmetic", "--output-dir", str(out),
                     "--prompts-per-step", "2", "--num-generations", "4", "--max-completion-length", "8",
                     "--micro-batch-size", "4", "--eval-size", "0", "--learning-rate", "5e-6", "--max-steps", "1",
                     "--log-samples-every", "0", "--device", "cpu")
    assert first.returncode == 0, first.stderr
    state_file = out / "checkpoint-1" / "trainer_state.json"  # a flag of an older grpo.py, since retired
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "config": {**state["config"], "retired_flag": 1}}))
    again = run_main("--resume", "--output-dir", str(out), "--max-steps", "2")
    assert again.returncode == 0, again.stderr
    assert "--resume: --learning-rate" not in again.stdout and "--resume: --max-steps 1 -> 2" in again.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["learning_rate"] == 5e-6 and results["config"]["model"] == str(tiny_model_dir)
    changed = run_main("--resume", "--output-dir", str(out), "--max-steps", "3", "--learning-rate", "1e-5")
    assert changed.returncode == 0, changed.stderr
    assert "--resume: --learning-rate 5e-06 -> 1e-05" in changed.stdout
    assert [m["lr"] for m in grpo.read_jsonl(out / "metrics.jsonl")] == [5e-6, 5e-6, 1e-5]
    assert not (out / "samples.jsonl").exists()  # --log-samples-every 0: none, and no empty file from a resume


def test_every_run_writes_samples_at_its_last_step(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=3, eval_size=0, save_every=0, log_samples_every=2)
    grpo.train(cfg)
    assert [r["step"] for r in grpo.read_jsonl(Path(cfg.output_dir) / "samples.jsonl")] == [2, 2, 3, 3]


def test_plot_curves_draws_a_png_from_the_metrics(tmp_path):
    records = [{"step": i, "reward/total": 0.1 * i, "accuracy": 0.05 * i, "format_rate": 0.1 * i, "kl": 0.01 * i,
                "completion/len_mean": 10 + i} for i in range(1, 6)]
    write_jsonl(tmp_path / "metrics.jsonl", records)
    DRAW_CURVES(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_jsonl(tmp_path / "two.jsonl", records[:2])
    figure = DRAW_CURVES(tmp_path / "two.jsonl", tmp_path / "two.png")
    for ax in figure.axes:  # two steps: ticks at whole steps only, not at 1.25, 1.5, ...
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 2]
        assert ticks and all(t == int(t) for t in ax.get_xticks()), ax.get_xticks()
    assert [ax.get_title() for ax in figure.axes] == ["mean reward", "accuracy (answer = 1), format rate (strict)",
                                                      "KL(policy || reference)", "mean completion length (tokens)"]
    (tmp_path / "empty.jsonl").write_text("")
    DRAW_CURVES(tmp_path / "empty.jsonl", tmp_path / "nothing.png")  # no steps yet: no picture
    assert not (tmp_path / "nothing.png").exists()


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_a_micro_batch_size_that_does_not_divide_the_batch_gives_the_same_step(tiny_model_dir, tmp_path,
                                                                              loss_type):
    """P x G = 8 completions in micro-batches of 3 (3 + 3 + 2) or all at once: the loss divides by
    whole-batch totals, so the first step's loss and gradient norm are the same."""
    runs = []
    for micro_batch_size in (8, 3):
        cfg = tiny_config(tiny_model_dir, tmp_path, output_dir=str(tmp_path / str(micro_batch_size)),
                          micro_batch_size=micro_batch_size, loss_type=loss_type, max_steps=1, mu=2,
                          learning_rate=1e-2, eval_size=0, save_every=0)
        grpo.train(cfg)
        runs.append(grpo.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")[0])
    whole, split = runs
    assert whole["grad_norm"] > 0 and whole["reward/total"] == split["reward/total"]  # same samples
    # float32 sums in another order, and mu = 2: the second pass sees a policy moved by the first. Seen: relative
    # differences up to 6e-6 (the KL); rel 1e-4 leaves room, while a per-micro-batch total is off by 3/8 or more.
    for key in ("grad_norm", "loss", "kl", "ratio_mean"):
        assert split[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key


def test_the_logged_loss_is_the_mean_over_the_mu_passes(tiny_model_dir, tmp_path, monkeypatch):
    real_loss, losses = grpo.grpo_loss, []

    def recording_loss(*args, **kwargs):
        loss, diagnostics = real_loss(*args, **kwargs)
        losses.append(loss.item())
        return loss, diagnostics

    monkeypatch.setattr(grpo, "grpo_loss", recording_loss)
    cfg = tiny_config(tiny_model_dir, tmp_path, mu=3, max_steps=1, learning_rate=1e-2, eval_size=0, save_every=0)
    grpo.train(cfg)
    logged = grpo.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")[0]["loss"]
    assert len(losses) == 3 * 2  # P x G = 8 completions in micro-batches of 4, three passes
    passes = [losses[0] + losses[1], losses[2] + losses[3], losses[4] + losses[5]]  # each pass's loss
    assert passes[0] != pytest.approx(passes[2])  # the passes see a moved policy: a mean is not the last one
    assert logged == pytest.approx(sum(passes) / 3, rel=1e-6)


def test_resume_continues_the_same_run(tiny_model_dir, tmp_path):
    """Stopping after step 2 and resuming gives the same step 3 as running 3 steps straight."""
    straight = tiny_config(tiny_model_dir, tmp_path, output_dir=str(tmp_path / "straight"), max_steps=3, eval_size=0)
    stopped = replace(straight, output_dir=str(tmp_path / "stopped"), max_steps=2)
    grpo.train(straight)
    grpo.train(stopped)
    grpo.train(replace(stopped, max_steps=3, resume=True))
    a, b = (grpo.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl") for cfg in (straight, stopped))
    # Same data, sampling (RNG restored), weights and optimizer state, the same float32 operations on the same CPU
    # kernels in one process: equal, not only close (as the Ctrl-C grid checks). Times and memory vary.
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))}  # noqa: E731
    assert drop(a[2]) == drop(b[2])


def test_resume_refuses_other_settings_but_takes_a_new_learning_rate(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=1, eval_size=0)
    grpo.train(cfg)
    with pytest.raises(ConfigError, match=r"has --seed 0 \(now 1\), --lora-r 0 \(now 4\)\. Pass the run's own values"):
        grpo.train(replace(cfg, max_steps=2, resume=True, seed=1, lora_r=4))
    grpo.train(replace(cfg, max_steps=2, resume=True, learning_rate=0.125, gradient_checkpointing=True))
    # The optimizer's saved state holds lr 1e-6; the flag must win (as after a NaN: "Lower --learning-rate").
    assert [m["lr"] for m in grpo.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")] == [cfg.learning_rate, 0.125]


def test_a_checkpoint_saved_on_a_gpu_resumes_without_one(tiny_model_dir, tmp_path, monkeypatch):
    """A GPU run saves AdamW's state as CUDA tensors. Write the checkpoint as such a run would (every
    storage tagged cuda:0), then resume it here."""
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=1, eval_size=0)
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        grpo.train(cfg)
    if not torch.cuda.is_available():  # the file really asks for a GPU: a plain torch.load fails here
        with pytest.raises(RuntimeError, match="CUDA device"):
            torch.load(Path(cfg.output_dir) / "checkpoint-1" / "trainer_state.pt", weights_only=True)
    grpo.train(replace(cfg, max_steps=2, resume=True))
    assert [m["step"] for m in grpo.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")] == [1, 2]


def test_on_mps_the_random_state_is_checkpointed_the_clock_waits_and_no_peak_is_made_up(tiny_model_dir, tmp_path,
                                                                                         monkeypatch):
    """No Mac here: torch's MPS functions replaced by stand-ins that record their calls. A run saves the
    MPS generator's state and a resume restores it (as CUDA's); `timed` waits for MPS before reading the
    clock; peak memory on MPS is null (torch keeps no peak there), not the CPU's resident memory, nor NaN."""
    real_peak = grpo.peak_memory_mb
    state, restored, waits = torch.arange(8, dtype=torch.uint8), [], []
    monkeypatch.setattr(torch.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: state.clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waits.append(1))
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=1, eval_size=0, device="cpu")
    grpo.train(cfg)
    saved = torch.load(Path(cfg.output_dir) / "checkpoint-1" / "trainer_state.pt", weights_only=True)
    assert torch.equal(saved["rng"]["mps"], state)
    grpo.train(replace(cfg, max_steps=2, resume=True))
    assert len(restored) == 1 and torch.equal(restored[0], state)
    times = {}
    with grpo.timed(times, "t", torch.device("mps")):
        pass
    assert waits == [1, 1] and times["t"] >= 0  # before the start and before the end
    assert grpo.peak_memory_mb(torch.device("mps")) is None  # no peak: none, not NaN (which JSON lacks)
    monkeypatch.setattr(grpo, "peak_memory_mb", lambda device: real_peak(torch.device("mps")))
    grpo.train(replace(cfg, max_steps=3, resume=True))
    line = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is no JSON"))["memory/peak_mb"] is None


def test_a_run_says_nothing_deprecated(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """transformers renamed `past_key_values` to `cache` (the old name goes in 5.40): a run, LoRA and
    gradient checkpointing included, uses no deprecated name. Its notices go through warnings (the
    kwarg) and through its logger's warning_once (the output attribute), both recorded here."""
    said = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, message, *a, **k: said.append(message))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=1, lora_r=4, gradient_checkpointing=True)
        grpo.train(cfg)
        grpo.train(replace(cfg, max_steps=2, resume=True))  # the adapter loaded back
    said += [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    # peft (0.15-0.21) reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model:
    # grpo.py's call, so grpo.py silences it, and nothing deprecated is said at all.
    assert not [message for message in said if "deprecat" in message.lower()], said
    # and LoRA at full fine-tuning's learning rate is said to be so, once per start
    assert capsys.readouterr().out.count("note: --learning-rate 1e-06 is full fine-tuning's, LoRA wants about 10x") == 2


# ---------------------------------------------------------------------------------------------
# Learning: the signs and the plumbing, end to end


def test_a_tiny_model_learns_a_toy_task(tiny_model_dir, tmp_path):
    """Toy verifiable task: whatever the question, the answer is 7. A random 2-layer model
    starts near chance (its last number is rarely exactly 7); GRPO must push it up."""
    rng = random.Random(0)
    data = write_jsonl(tmp_path / "sevens.jsonl", [
        {"question": f"What is {rng.randint(0, 9)} + {rng.randint(0, 9)}?", "answer": "#### 7"} for _ in range(200)])
    cfg = tiny_config(tiny_model_dir, tmp_path, dataset=str(data), max_steps=60, prompts_per_step=8,
                      num_generations=8, max_completion_length=8, micro_batch_size=32, learning_rate=1e-2,
                      beta=0.04, format_weight=0.0, eval_size=0, save_every=0, log_samples_every=0)
    grpo.train(cfg)
    accuracy = [m["accuracy"] for m in grpo.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")]
    # Steps 1-2 sample from (nearly) the untrained model: chance, a few percent. A working loop
    # is above 0.9 over the last 10 steps here; wrong signs or a broken advantage or mask leave
    # it near chance or push it to 0. The margins leave room for other seeds and torch versions.
    chance, last = sum(accuracy[:2]) / 2, sum(accuracy[-10:]) / 10
    assert chance < 0.25 and last > chance + 0.5, (chance, last)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error before any long work


@pytest.mark.parametrize("overrides, message", [
    (dict(num_generations=1), "--num-generations is 1"),
    (dict(micro_batch_size=0), "--micro-batch-size is 0"),
    (dict(max_completion_length=0), "--max-completion-length is 0"),
    (dict(max_steps=-1), "--max-steps is -1"),
    (dict(loss_type="ppo"), "--loss-type 'ppo' is unknown"),
    (dict(kl_estimator="k9"), "--kl-estimator 'k9' is unknown"),
    (dict(temperature=0.0), "--temperature is 0.0"),
    (dict(model="./no/such/model"), "no such model folder"),
    (dict(dataset="missing.jsonl"), "no such data file or folder"),
    (dict(resume=True), "holds no run \\(no checkpoint-\\*, no metrics.jsonl\\)\\. Drop --resume"),
    (dict(lora_r=8, ref_sync_every=10), "--ref-sync-every needs full fine-tuning"),
])
def test_bad_config_is_rejected_at_once(tiny_model_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        grpo.train(tiny_config(tiny_model_dir, tmp_path, **overrides))
    assert not (tmp_path / "run").exists()  # nothing was started


def test_a_device_this_machine_lacks_is_rejected_at_once(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without them
    monkeypatch.setattr(torch.mps, "is_available", lambda: False)
    for device in ("cuda", "mps"):
        with pytest.raises(ConfigError, match=f"--device {device}: .*Use --device auto"):
            grpo.train(tiny_config(tiny_model_dir, tmp_path, device=device))
    assert not (tmp_path / "run").exists()


def test_unloadable_model_and_bad_data_fail_with_a_clear_message(tmp_path):
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    result = run_main("--model", str(not_a_model), "--dataset", "arithmetic", "--output-dir", str(tmp_path / "o"))
    assert result.returncode != 0 and "cannot be loaded" in result.stderr and "Traceback" not in result.stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"q": "?", "a": "1"}])
    result = run_main("--model", str(not_a_model), "--dataset", str(bad), "--output-dir", str(tmp_path / "o"))
    assert "lacks the key(s) ['answer', 'question']" in result.stderr  # data is checked before the model loads
    result = run_main("--num-generations", "1")
    assert result.returncode != 0 and "--num-generations is 1" in result.stderr


def test_a_chat_template_without_a_system_role_is_a_clear_error(tiny_model_dir, tmp_path):
    no_system = tmp_path / "no-system"
    tokenizer = grpo.load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                               "{% endif %}" + CHAT_TEMPLATE)
    tokenizer.save_pretrained(no_system)
    with pytest.raises(ConfigError) as error:
        grpo.load_tokenizer(str(no_system))
    assert str(error.value) == (f"--model {str(no_system)!r}: its chat template cannot format a system prompt and a "
                                "question (System role not supported). Use another chat model.")
    # The check formats as sampling does, with the assistant's turn opened: a template failing only there is caught.
    tokenizer.chat_template = "{% if add_generation_prompt %}{{ raise_exception('no reply turn') }}{% endif %}"
    tokenizer.save_pretrained(no_system)
    with pytest.raises(ConfigError, match=r"\(no reply turn\)"):
        grpo.load_tokenizer(str(no_system))


@pytest.mark.parametrize("family, plain, transformed", [
    ("granite", dict(logits_scaling=1.0), dict(logits_scaling=4.0)),  # Granite divides its logits by a scale
    # Gemma 2 soft-caps them: cap * tanh(logits / cap), with a cap far below this random model's logits so that it bites
    ("gemma2", dict(final_logit_softcapping=None, head_dim=8), dict(final_logit_softcapping=0.01, head_dim=8)),
])
def test_a_model_that_transforms_its_logits_is_refused(tmp_path, family, plain, transformed):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2)
    for settings, refused in ((plain, False), (transformed, True)):
        torch.manual_seed(0)
        path = tmp_path / f"{family}-{refused}"
        AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **sizes, **settings)).save_pretrained(path)
        if refused:
            with pytest.raises(ConfigError, match="transforms its logits after the output layer"):
                grpo.load_model(str(path), torch.device("cpu"))
        else:
            grpo.load_model(str(path), torch.device("cpu"))  # the same family without the transform loads


def test_a_model_whose_decoder_cannot_be_reached_is_refused(tiny_model_dir, monkeypatch):
    # As GPT-2 under older transformers: get_decoder() returns the whole model, whose output has no hidden state.
    monkeypatch.setattr(LlamaForCausalLM, "get_decoder", lambda self: self)
    with pytest.raises(ConfigError, match="its decoder or output layer cannot be reached"):
        grpo.load_model(str(tiny_model_dir), torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# Diagnostics: the silent failures, each said once


def said_in(output_dir: Path) -> dict[str, int]:
    """{diagnostic: the step whose line of metrics.jsonl carries it}."""
    return {name: m["step"] for m in grpo.read_jsonl(output_dir / "metrics.jsonl") for name in m.get("diagnostics", {})}


def fixed_rewards(monkeypatch, reward):
    for name in grpo.REWARD_FUNCTIONS:
        monkeypatch.setitem(grpo.REWARD_FUNCTIONS, name, lambda completions, answers: [reward() for _ in completions])


@pytest.fixture(scope="session")
def ends_early_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model, made to end about a third of its tokens: one dimension of every embedding
    is large, so after the final norm it is about 5.7 in every position, and only the end-of-reply
    row of the output layer reads it (logit ~ 3.4 against ~0 for the ~60 others)."""
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[model.config.eos_token_id, 0] = 0.6
    path = tmp_path_factory.mktemp("ends-early")
    model.save_pretrained(path)
    PreTrainedTokenizerFast.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def test_a_failing_run_says_what_is_wrong_once_each(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # The tiny model ends almost no reply within 8 tokens; with every reward 0, every group's rewards
    # are equal, the format reward is 0, and (advantages 0, policy = reference) the gradient is 0.
    fixed_rewards(monkeypatch, lambda: 0.0)
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=grpo.PATIENCE + 2, eval_size=0, save_every=0)
    results = grpo.train(cfg)
    P = grpo.PATIENCE
    assert said_in(Path(cfg.output_dir)) == {"truncated": P, "equal_rewards": P, "no_format": P, "zero_gradient": P}
    console = capsys.readouterr().out
    for name in said_in(Path(cfg.output_dir)):  # on the console, once each, with its step
        assert console.count(grpo.DIAGNOSTICS[name][2]) == 1
    assert set(results["diagnostics"]) == set(said_in(Path(cfg.output_dir)))
    assert results["diagnostics"]["truncated"] == f"step {P}: {grpo.DIAGNOSTICS['truncated'][2]}"


def test_a_kl_past_the_limit_is_said(tiny_model_dir, tmp_path, monkeypatch):
    rng = random.Random(0)
    fixed_rewards(monkeypatch, rng.random)  # rewards that differ: a real gradient
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=5, eval_size=0, save_every=0, learning_rate=0.1)
    grpo.train(cfg)  # steps of 0.1 on weights of about 0.02: the policy runs away from the reference
    kl = [m["kl"] for m in grpo.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")]
    first = next(step for step, value in enumerate(kl, 1) if value > grpo.KL_LIMIT)
    assert kl[0] == 0 and said_in(Path(cfg.output_dir))["kl"] == first


def test_a_healthy_run_says_nothing(ends_early_model_dir, tmp_path, monkeypatch, capsys):
    """Diagnostics are failures: a healthy run has none (the note on the loss lives in README and the notebook)."""
    rng = random.Random(0)
    fixed_rewards(monkeypatch, rng.random)  # every group's rewards differ; the format reward is not 0
    cfg = tiny_config(ends_early_model_dir, tmp_path, max_steps=grpo.PATIENCE + 2, eval_size=0, save_every=0,
                      max_completion_length=16)
    results = grpo.train(cfg)
    lines = grpo.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")
    assert max(m["completion/truncated_frac"] for m in lines) <= 0.25 and min(m["grad_norm"] for m in lines) > 0
    assert said_in(Path(cfg.output_dir)) == {} and results["diagnostics"] == {}
    console = capsys.readouterr().out
    assert "step " not in console and "note" not in console and "loss" not in console


def test_resume_does_not_say_again_what_was_said(tiny_model_dir, tmp_path, monkeypatch, capsys):
    fixed_rewards(monkeypatch, lambda: 0.0)
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=grpo.PATIENCE, eval_size=0, save_every=1)
    grpo.train(cfg)
    capsys.readouterr()
    grpo.train(replace(cfg, max_steps=grpo.PATIENCE + 2, resume=True))
    console = capsys.readouterr().out
    assert not [message for _, _, message in grpo.DIAGNOSTICS.values() if message in console]  # none again
    assert said_in(Path(cfg.output_dir))["truncated"] == grpo.PATIENCE


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    real_loss, calls = grpo.grpo_loss, []

    def nan_on_second_step(*args, **kwargs):
        loss, diagnostics = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 1 else loss), diagnostics

    monkeypatch.setattr(grpo, "grpo_loss", nan_on_second_step)
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=3, micro_batch_size=8, eval_size=0)
    with pytest.raises(SystemExit, match=r"step 2: the loss is not finite.*--resume goes on from the last good checkpoint \(.*checkpoint-1\)"):
        grpo.train(cfg)
    assert grpo.latest_checkpoint(Path(cfg.output_dir)).name == "checkpoint-1"
    monkeypatch.setattr(grpo, "grpo_loss", real_loss)  # the advice works: resume with a lower learning rate
    grpo.train(replace(cfg, resume=True, learning_rate=cfg.learning_rate / 10))
    assert [m["step"] for m in grpo.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")] == [1, 2, 3]


def test_ctrl_c_saves_a_checkpoint_to_resume_from(tiny_model_dir, tmp_path, monkeypatch):
    real_step, calls = grpo.grpo_step, []

    def interrupt_on_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_step", interrupt_on_third_step)
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=5, save_every=0, eval_size=0)
    with pytest.raises(SystemExit, match="interrupted: saved .*checkpoint-2"):
        grpo.train(cfg)
    monkeypatch.setattr(grpo, "grpo_step", real_step)
    grpo.train(replace(cfg, resume=True))
    assert [m["step"] for m in grpo.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_ctrl_c_after_a_step_keeps_that_step(tiny_model_dir, tmp_path, monkeypatch):
    real_save = grpo.save_checkpoint

    def interrupt_the_first_save(output_dir, step, *args):  # Ctrl-C while step 2's checkpoint is written
        monkeypatch.setattr(grpo, "save_checkpoint", real_save)
        raise KeyboardInterrupt

    monkeypatch.setattr(grpo, "save_checkpoint", interrupt_the_first_save)
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=4, save_every=2, eval_size=0)
    with pytest.raises(SystemExit, match="interrupted: saved .*checkpoint-2"):  # not checkpoint-1: step 2 is done
        grpo.train(cfg)
    grpo.train(replace(cfg, resume=True))
    assert [m["step"] for m in grpo.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")] == [1, 2, 3, 4]


# Where a Ctrl-C lands inside step 2: in a call of these functions that each step makes
CTRL_C_POINTS = {"sampling": "generate_completions", "scoring": "score_completions", "log-probs": "frozen_logps",
                 "right after the update": "step_metrics", "logging": "log_step"}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """The runs of 2 and 3 steps that the Ctrl-C grid compares with, each trained once per mu."""
    done = {}

    def runs(cfg):
        if cfg.mu not in done:
            base = tmp_path_factory.mktemp(f"uninterrupted-mu{cfg.mu}")
            done[cfg.mu] = [replace(cfg, output_dir=str(base / f"straight-{n}"), max_steps=n) for n in (2, 3)]
            for run in done[cfg.mu]:
                grpo.train(run)
        return done[cfg.mu]
    return runs


@pytest.mark.parametrize("mu", [1, 2])
@pytest.mark.parametrize("point", CTRL_C_POINTS)
def test_ctrl_c_anywhere_in_a_step_saves_whole_steps_and_resumes_the_same_run(tiny_model_dir, tmp_path, monkeypatch,
                                                                              uninterrupted, point, mu):
    import signal
    from safetensors.torch import load_file
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=3, save_every=0, eval_size=0, mu=mu)
    straight = uninterrupted(cfg)
    name = CTRL_C_POINTS[point]
    calls_per_step = 2 if name == "frozen_logps" and mu > 1 else 1  # old policy and reference
    real, calls, call = getattr(grpo, name), [], calls_per_step + 1  # the first call of step 2

    def ctrl_c_then_go_on(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            signal.raise_signal(signal.SIGINT)  # as a terminal's Ctrl-C: the handler runs now
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, name, ctrl_c_then_go_on)
    before = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN in a background job
    with pytest.raises(SystemExit, match="interrupted: saved .*checkpoint-2"):
        grpo.train(cfg)
    assert signal.getsignal(signal.SIGINT) == before  # the loop's handler is gone
    monkeypatch.setattr(grpo, name, real)
    saved, expected = (load_file(Path(d) / "checkpoint-2" / "model.safetensors")
                       for d in (cfg.output_dir, straight[0].output_dir))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    grpo.train(replace(cfg, resume=True))
    # The resumed process repeats the same float32 operations on the same weights, optimizer state, data
    # and RNG state as the straight run, on the same CPU kernels: equal, not only close. Times and memory vary.
    ours, theirs = (grpo.read_jsonl(Path(d) / "metrics.jsonl") for d in (cfg.output_dir, straight[1].output_dir))
    assert [{k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))} for m in ours] == \
           [{k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))} for m in theirs]


def test_a_second_ctrl_c_stops_at_once_without_saving(tiny_model_dir, tmp_path, monkeypatch):
    import signal
    real = grpo.score_completions

    def two_ctrl_c(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, "score_completions", two_ctrl_c)
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=3, save_every=0, eval_size=0)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit, match="stopped unsaved: --resume goes on from the last save, or step 0"):
        grpo.train(cfg)
    assert grpo.latest_checkpoint(Path(cfg.output_dir)) is None
    assert signal.getsignal(signal.SIGINT) == before


def test_resume_after_a_crash_finds_each_step_once_in_each_log(tiny_model_dir, tmp_path, monkeypatch):
    real, calls = grpo.grpo_step, []

    def crash_in_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("the machine went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_step", crash_in_step_4)
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=5, save_every=2, log_samples_every=1, eval_size=0)
    with pytest.raises(RuntimeError):
        grpo.train(cfg)  # logs hold steps 1-3, the checkpoint step 2
    monkeypatch.setattr(grpo, "grpo_step", real)
    grpo.train(replace(cfg, resume=True))  # runs step 3 again, then 4 and 5
    for name, per_step in (("metrics.jsonl", 1), ("samples.jsonl", 2)):  # two completions per logged step
        steps = [r["step"] for r in grpo.read_jsonl(Path(cfg.output_dir) / name)]
        assert steps == [step for step in range(1, 6) for _ in range(per_step)], name


def test_bnpo_is_dapos_former_name_and_still_works(tmp_path):
    grpo.check_config(Config(loss_type="bnpo", output_dir=str(tmp_path / "run")))  # accepted
    settings = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.2, max_completion_length=4)
    bnpo, _ = grpo_loss(**TWO_COMPLETIONS, loss_type="bnpo", **settings)
    dapo, _ = grpo_loss(**TWO_COMPLETIONS, loss_type="dapo", **settings)
    assert bnpo.item() == dapo.item() == pytest.approx(-0.311043, abs=1e-5)  # the token-mean reference value above


@pytest.mark.filterwarnings("ignore:.*CUDA is not available")  # torch.autocast("cuda") without one (2.7: "User provided...")
@pytest.mark.parametrize("native_bf16, emulated_bf16, expected", [
    (True, True, torch.bfloat16),  # compute capability 8.0 and later: A100, L4, RTX 30xx, H100
    (False, True, None),  # T4, V100: torch emulates bf16, but auto picks fp32
    (False, False, None),
])
def test_precision_auto_is_bf16_only_on_gpus_that_compute_in_bf16(monkeypatch, native_bf16, emulated_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or (including_emulation and emulated_bf16))
    autocast = grpo.autocast_for(torch.device("cuda"), "auto")
    assert getattr(autocast, "fast_dtype", None) == expected
    if native_bf16 or emulated_bf16:  # asked for; on a real GPU with no bf16 at all torch refuses it
        assert getattr(grpo.autocast_for(torch.device("cuda"), "bf16"), "fast_dtype", None) == torch.bfloat16
    assert getattr(grpo.autocast_for(torch.device("cpu"), "auto"), "fast_dtype", None) is None


def test_beta_zero_loads_no_reference_model(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, beta=0.0)
    policy, reference = grpo.load_policy_and_reference(cfg, torch.device("cpu"))
    assert reference is None
    policy, reference = grpo.load_policy_and_reference(replace(cfg, beta=0.04), torch.device("cpu"))
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())


def test_mu_greater_than_one_uses_old_logps_and_clips(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, mu=3, learning_rate=1e-2, max_steps=2, eval_size=0)
    grpo.train(cfg)
    metrics = grpo.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")
    # passes 2 and 3 see a moved policy: the ratio leaves 1 (with mu = 1 it is exactly 1)
    assert any(m["ratio_mean"] != 1.0 for m in metrics)


# ---------------------------------------------------------------------------------------------
# LoRA: the reference model for free



def lora_policy(tiny_model_dir, tmp_path, **overrides):
    lora = dict(lora_r=4, lora_alpha=8, lora_target_modules="q_proj,v_proj,down_proj")
    cfg = tiny_config(tiny_model_dir, tmp_path, **{**lora, **overrides})
    policy, reference = grpo.load_policy_and_reference(cfg, torch.device("cpu"))
    return cfg, policy, reference


def test_lora_trains_only_the_adapter_and_its_reference_is_the_base_model(tiny_model_dir, tmp_path):
    cfg, policy, reference = lora_policy(tiny_model_dir, tmp_path, learning_rate=1e-2)
    assert reference is None  # no second copy of the model
    base = grpo.load_model(str(tiny_model_dir), torch.device("cpu")).eval()
    tokenizer = grpo.load_tokenizer(str(tiny_model_dir))
    input_ids, attention_mask, mask = random_batch(base, tokenizer)
    K = mask.shape[1]
    with torch.no_grad():
        base_logp = per_token_logps(base, input_ids, attention_mask, K)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate)
    rows = rewards.load_dataset_rows("arithmetic", "train")[:cfg.prompts_per_step]
    torch.manual_seed(0)
    for _ in range(3):
        grpo.grpo_step(policy, None, tokenizer, optimizer, rows, cfg)
    changed = {name for name, p in policy.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert all("lora_" in name for name, p in policy.named_parameters() if p.requires_grad)
    with torch.no_grad():
        policy_logp = per_token_logps(policy, input_ids, attention_mask, K)
        with policy.disable_adapter():
            ref_logp = per_token_logps(policy, input_ids, attention_mask, K)
    assert not torch.allclose(policy_logp, base_logp, atol=1e-4)  # the adapter moved the policy
    torch.testing.assert_close(ref_logp, base_logp, rtol=1e-5, atol=1e-5)  # adapter off = the base model


def test_lora_run_saves_an_adapter_that_loads_back_and_resumes(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, lora_r=4, lora_alpha=8, learning_rate=1e-2, eval_size=0)
    grpo.train(cfg)
    out = Path(cfg.output_dir)
    adapter = out / "checkpoint-2"
    assert (adapter / "adapter_model.safetensors").exists() and not (adapter / "model.safetensors").exists()
    tokenizer = grpo.load_tokenizer(str(adapter))
    input_ids, attention_mask, mask = random_batch(grpo.load_model(str(tiny_model_dir), torch.device("cpu")), tokenizer)
    K = mask.shape[1]
    loaded = grpo.add_lora(grpo.load_model(str(tiny_model_dir), torch.device("cpu")), cfg, adapter).eval()
    # merged into the weights as the README shows, then saved and loaded as a plain model
    grpo.add_lora(grpo.load_model(str(tiny_model_dir), torch.device("cpu")), cfg, adapter).merge_and_unload(
        ).save_pretrained(out / "merged")
    merged = grpo.load_model(str(out / "merged"), torch.device("cpu")).eval()
    with torch.no_grad():
        from_adapter = per_token_logps(loaded, input_ids, attention_mask, K)
        from_merged = per_token_logps(merged, input_ids, attention_mask, K)
        with loaded.disable_adapter():
            base = per_token_logps(loaded, input_ids, attention_mask, K)
    assert not torch.allclose(from_adapter, base, atol=1e-4)  # the saved adapter is a trained one
    torch.testing.assert_close(from_merged, from_adapter, rtol=1e-4, atol=1e-4)  # merging adds W + BA in float32
    grpo.train(replace(cfg, max_steps=3, resume=True))
    assert [m["step"] for m in grpo.read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert (out / "checkpoint-3" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, tmp_path, lora):
    overrides = dict(lora_r=4, lora_alpha=8) if lora else {}
    grads = []
    for checkpointing in (False, True):
        cfg = tiny_config(tiny_model_dir, tmp_path, gradient_checkpointing=checkpointing, **overrides)
        torch.manual_seed(0)  # the same random LoRA A matrices both times
        policy, _ = grpo.load_policy_and_reference(cfg, torch.device("cpu"))
        assert any(getattr(m, "gradient_checkpointing", False) for m in policy.modules()) == checkpointing
        tokenizer = grpo.load_tokenizer(str(tiny_model_dir))
        input_ids, attention_mask, mask = random_batch(policy, tokenizer)
        policy.train()
        logp = per_token_logps(policy, input_ids, attention_mask, mask.shape[1])
        loss, _ = grpo_loss(logp, logp.detach(), None, torch.linspace(-1, 1, len(logp)), mask, beta=0.0,
                            epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo", max_completion_length=mask.shape[1])
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad})
    off, on = grads
    assert off.keys() == on.keys()
    # Gradient reaches every trainable tensor, except LoRA's A matrices: B starts at 0, so A's gradient is 0 at first.
    assert all(g.abs().sum() > 0 for name, g in on.items() if "lora_A" not in name)
    for name in off:  # the same float32 ops recomputed: equal up to kernel-level reordering
        torch.testing.assert_close(on[name], off[name], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="session")
def dropout_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with attention dropout 0.5 in its config (Llama's only dropout)."""
    path = tmp_path_factory.mktemp("dropout")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    return path


def test_a_model_with_dropout_is_scored_as_it_sampled(tiny_model_dir, dropout_model_dir, tmp_path):
    """At step 1 the policy is the reference, so the KL is exactly 0 unless the training pass (train mode)
    scores another policy than the reference's pass (eval mode): dropout left on in training does."""
    cfg = tiny_config(tiny_model_dir, tmp_path, model=str(dropout_model_dir), max_steps=1, eval_size=0, beta=0.04)
    grpo.train(cfg)
    assert grpo.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")[0]["kl"] == 0.0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_old_reference_and_training_passes_compute_alike(tiny_model_dir, tmp_path, monkeypatch, checkpointing):
    """The shared prompt cache serves all three log-prob passes of a step, or none of them (under gradient
    checkpointing transformers keeps no cache): computed in two ways, the step-0 KL and the first ratio are not
    exactly 0 and 1 under bf16 on a real model (on this tiny one both ways round alike, hence the count)."""
    calls = []
    monkeypatch.setattr(grpo, "prompt_cache", lambda *args: calls.append(1) or prompt_cache(*args))
    cfg = tiny_config(tiny_model_dir, tmp_path, prompts_per_step=1, max_steps=1, eval_size=0, beta=0.04, mu=2,
                      gradient_checkpointing=checkpointing)  # P = 1: a micro-batch is one group
    grpo.train(cfg)
    passes = 1 + 1 + 2  # old policy, reference, mu = 2 training passes (one micro-batch each)
    assert len(calls) == 1 + (0 if checkpointing else passes)  # 1: sampling


def test_lora_without_peft_says_how_to_install_it(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(ConfigError, match="pip install peft"):
        lora_policy(tiny_model_dir, tmp_path)


def test_lora_target_modules_the_model_lacks_name_the_ones_it_has(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="'qkv_proj,fc1'.* linear layers are named: down_proj,gate_proj,k_proj"):
        lora_policy(tiny_model_dir, tmp_path, lora_target_modules="qkv_proj,fc1")


# ---------------------------------------------------------------------------------------------
# The notebook runs top to bottom (on the tiny model, with tiny sizes)


def test_notebook_runs_top_to_bottom(tiny_model_dir, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"question": f"What is {a} + {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"} for a in range(6)]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "test.jsonl", rows)
    for name, value in (("MODEL", str(tiny_model_dir)), ("DATA", str(data)), ("TINY", "1"),
                        ("OUTPUT", str(tmp_path / "notebook-run"))):
        monkeypatch.setenv(f"GRPO_NOTEBOOK_{name}", value)  # the kernel inherits this environment
    notebook = nbformat.read(HERE / "notebook.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    assert (tmp_path / "notebook-run" / "metrics.jsonl").exists()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4  # mask, surrogate, KL, curves
    assert not [o["text"] for o in outputs if "deprecated" in o.get("text", "")]  # no notice of a renamed API
    assert not [o["text"] for o in outputs if "Warning" in o.get("text", "")]  # nor any other warning


def test_the_saved_notebook_shows_no_path_of_its_machine_and_no_warning():
    """Its outputs are read by everyone: no folder of the machine that ran it (a library's warning names its
    site-packages), no warning, and no diagnostic on a healthy run (the note on the loss is markdown)."""
    import nbformat
    notebook = nbformat.read(HERE / "notebook.ipynb", as_version=4)
    texts = [o.get("text", "") + json.dumps(o.get("data", {}).get("text/plain", "")) for cell in notebook.cells
             if cell.cell_type == "code" for o in cell.outputs]
    assert len(texts) >= 20
    for text in texts:
        assert not re.search(r"/root/|/home/|/work/|/tmp/|/Users/|site-packages|[A-Z]:\\\\", text), text[:300]
        assert "Warning" not in text and "loss is no score" not in text, text[:300]


def test_notebook_links_point_at_the_definitions():
    # The markdown links to lines like [`grpo_loss`](grpo.py#L461); an edit that moves a function breaks them.
    import nbformat

    markdown = "".join(c.source for c in nbformat.read(HERE / "notebook.ipynb", as_version=4).cells
                       if c.cell_type == "markdown")
    links = re.findall(r"\[`(?:rewards\.)?(\w+)`\]\((grpo\.py|rewards\.py)#L(\d+)\)", markdown)
    assert len(links) >= 10
    for name, file, line in links:
        source_line = (HERE / file).read_text().splitlines()[int(line) - 1]
        assert re.match(rf"(def|class) {name}\b", source_line), f"{file}#L{line} is not where {name} is defined"


def test_reference_sync_copies_the_policy_and_is_checkpointed(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_config(tiny_model_dir, tmp_path, ref_sync_every=2, learning_rate=1e-2, max_steps=3, eval_size=0,
                      save_every=2)
    grpo.train(replace(cfg, max_steps=2))
    saved = Path(cfg.output_dir) / "checkpoint-2"
    policy, reference = load_file(saved / "model.safetensors"), load_file(saved / "reference" / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(policy[k], initial[k]) for k in policy)  # the policy moved...
    assert all(torch.equal(policy[k], reference[k]) for k in policy)  # ...and the reference followed at step 2
    grpo.train(replace(cfg, resume=True))  # resuming loads that reference back
    # Step 3 starts from the policy that the reference copied at step 2: its KL is exactly 0. A resume that
    # loaded the initial model as the reference instead would see the policy's two steps of drift.
    assert grpo.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")[2]["kl"] == 0.0


# ---------------------------------------------------------------------------------------------
# scale/: the same run on TRL (scale/trl_grpo.py) and verl (scale/verl/). TRL comes from
# scale/requirements.txt, which CI installs; verl is too heavy for CI, so its files are tested
# without it.

def load_scale_module(path: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(Path(path).stem, HERE / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# (our flags, GRPOConfig field, its value): every flag that TRL has a field for
TRL_FIELDS = [
    ("--num-generations 4", "num_generations", 4),
    ("--micro-batch-size 4", "per_device_train_batch_size", 4),
    ("--prompts-per-step 4 --num-generations 8 --micro-batch-size 4", "gradient_accumulation_steps", 8),
    ("--max-completion-length 64", "max_completion_length", 64),
    ("--temperature 0.7", "temperature", 0.7),
    ("--beta 0.1", "beta", 0.1),
    ("--epsilon-low 0.1", "epsilon", 0.1),
    ("--epsilon-high 0.28", "epsilon_high", 0.28),
    ("--loss-type grpo", "loss_type", "grpo"),
    ("--loss-type dapo", "loss_type", "dapo"),
    ("--loss-type bnpo", "loss_type", "dapo"),  # ours is TRL's dapo (whole-batch token mean)
    ("--loss-type dr_grpo", "loss_type", "dr_grpo"),
    ("--loss-type dr_grpo", "scale_rewards", "none"),
    ("--loss-type grpo", "scale_rewards", "group"),
    ("--mu 2", "num_iterations", 2),
    ("--kl-estimator k3_ratio", "use_bias_correction_kl", True),  # k3 x the ratio
    ("--kl-estimator k3", "use_bias_correction_kl", False),  # the paper's plain k3
    ("--ref-sync-every 5", "sync_ref_model", True),
    ("--ref-sync-every 5", "ref_model_sync_steps", 5),
    # TRL counts optimizer steps: a step of ours is one generated batch and mu optimizer steps
    ("--mu 2 --max-steps 200", "max_steps", 400),
    ("--mu 2 --save-every 5", "save_steps", 10),
    ("--mu 2 --ref-sync-every 5", "ref_model_sync_steps", 10),
    ("--ref-sync-every 5", "ref_model_mixup_alpha", 1.0),
    ("--learning-rate 3e-6", "learning_rate", 3e-6),
    ("--learning-rate 3e-6", "lr_scheduler_type", "constant"),
    ("--weight-decay 0.1", "weight_decay", 0.1),
    ("--max-grad-norm 0.5", "max_grad_norm", 0.5),
    ("--gradient-checkpointing", "activation_checkpointing", True),
    ("--no-gradient-checkpointing", "activation_checkpointing", False),
    ("--seed 7", "seed", 7),
    ("--max-steps 3", "max_steps", 3),
    ("--format-weight 0.25 --answer-weight 2", "reward_weights", [0.25, 2.0, 0.0]),
    ("--precision fp32", "bf16", False),
    ("--precision bf16 --device cpu", "bf16", True),
    ("--device cpu", "use_cpu", True),
    ("--save-every 5", "save_steps", 5),
    ("--save-every 0", "save_strategy", "steps"),  # a checkpoint at the end only, as ours
    ("--save-every 0 --max-steps 7", "save_steps", 7),
    ("--num-generations 4", "disable_dropout", True),  # the learner scores the sampler's policy
    ("--log-samples-every 0", "log_completions", False),
    ("--trust-remote-code", "model_init_kwargs", {"dtype": torch.float32, "trust_remote_code": True}),
    ("--trust-remote-code", "trust_remote_code", True),  # the tokenizer TRL loads itself
    ("--no-trust-remote-code", "trust_remote_code", False),
    ("--advantage grpo_batch_std", "scale_rewards", "batch"),  # TRL's group mean, then the batch's std
    ("--advantage grpo", "scale_rewards", "group"),
    # mini-batches: P x G = 64 in 2 updates of 32 = 4 micro-batches of 8; TRL counts micro-batches per generation
    ("--mini-batches 2", "gradient_accumulation_steps", 4),
    ("--mini-batches 2", "steps_per_generation", 8),
    ("--mini-batches 2 --mu 2 --max-steps 10", "max_steps", 40),  # optimizer steps: 2 passes x 2 updates each
    ("--mini-batches 2 --save-every 5", "save_steps", 10),
]


@pytest.mark.parametrize("flags, field, value", TRL_FIELDS)
def test_trl_runner_maps_each_flag_to_its_grpo_config_field(tmp_path, flags, field, value):
    need("trl")
    trl_grpo = load_scale_module("scale/trl_grpo.py")
    cfg = grpo.parse_args([*flags.split(), "--output-dir", str(tmp_path / "run")])
    config = trl_grpo.trl_config(cfg)
    assert getattr(config, field) == value
    assert config.output_dir == str(tmp_path / "run")


def test_trl_runner_maps_lora_and_splits_the_batch_over_processes(tmp_path):
    need("trl")
    trl_grpo = load_scale_module("scale/trl_grpo.py")
    cfg = grpo.parse_args(["--lora-r", "8", "--lora-alpha", "16", "--lora-target-modules", "q_proj,v_proj"])
    lora = trl_grpo.peft_config(cfg)
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (8, 16, {"q_proj", "v_proj"})
    assert trl_grpo.peft_config(grpo.parse_args([])) is None
    cfg = grpo.parse_args(["--prompts-per-step", "8", "--num-generations", "8", "--micro-batch-size", "4"])
    assert trl_grpo.trl_config(cfg, num_processes=4).gradient_accumulation_steps == 4  # 4 x 4 x 4 = 64 = P x G


@pytest.mark.parametrize("flags, message", [
    ("--kl-estimator k2", "--kl-estimator 'k2': TRL estimates the KL with k3 only"),
    ("--weight-decay 0.1", "--weight-decay 0.1: TRL's Trainer does not decay biases and norm weights"),
    ("--use-vllm", "--use-vllm: vllm is not installed. pip install vllm"),
    ("--logp-chunk-size 256", "--logp-chunk-size 256: TRL computes log-probs its own way"),
    ("--compile", "--compile True: TRL samples with its own generate()"),
    ("--prompts-per-step 2 --num-generations 4 --micro-batch-size 3", "--micro-batch-size 3: TRL splits"),
    ("--advantage online_rft", "--advantage 'online_rft': TRL's advantage is always the group's reward minus"),
    ("--supervision process", "--supervision 'process': TRL's GRPOTrainer has no process supervision"),
    ("--kl-estimator k1_to_go", "--kl-estimator 'k1_to_go': TRL estimates the KL with k3 only"),
])
def test_trl_runner_refuses_what_trl_cannot_do_before_loading_a_model(tmp_path, monkeypatch, capsys, flags,
                                                                        message):
    need("trl")
    trl_grpo = load_scale_module("scale/trl_grpo.py")
    monkeypatch.setattr(grpo, "load_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as stop:
        trl_grpo.main([*flags.split(), "--dataset", "arithmetic", "--output-dir", str(tmp_path / "run")])
    assert stop.value.code == 2 and message in capsys.readouterr().err  # as grpo.py's (and argparse's) errors


def test_trl_runner_takes_no_compile_which_asks_nothing_of_trl(tmp_path):
    trl_grpo = load_scale_module("scale/trl_grpo.py")
    assert trl_grpo.refusals(grpo.parse_args(["--no-compile", "--output-dir", str(tmp_path / "run")])) == []


def test_trl_runner_maps_use_vllm_to_colocated_vllm(tmp_path):
    need("trl")
    trl_grpo = load_scale_module("scale/trl_grpo.py")
    cfg = grpo.parse_args(["--output-dir", str(tmp_path / "run")])
    config = trl_grpo.trl_config(cfg, use_vllm=True)
    assert (config.use_vllm, config.vllm_mode) == (True, "colocate")
    assert trl_grpo.trl_config(cfg).use_vllm is False


def test_trl_runner_scores_with_our_rewards_on_the_answer_column():
    trl_grpo = load_scale_module("scale/trl_grpo.py")
    texts = ["<reasoning>2 + 2</reasoning>\n<answer>4</answer>", "<answer>5</answer>", "it is 4", "7"]
    answers = ["4", "4", "4", "7"]
    completions = [[{"role": "assistant", "content": t}] for t in texts]  # TRL passes chat messages
    functions = trl_grpo.trl_reward_functions()
    assert [f.__name__ for f in functions] == list(rewards.REWARD_FUNCTIONS)  # TRL logs them by name
    for function, ours in zip(functions, rewards.REWARD_FUNCTIONS.values()):
        scores = function(completions, answer=answers, prompt=["?"] * 4, question=["?"] * 4)
        assert scores == ours(texts, answers)
    assert functions[1](completions, answer=answers) == [1.0, 0.0, 1.0, 1.0]  # not all alike: the column matters


def test_trl_runner_trains_a_step_on_the_tiny_model_with_our_rewards(tiny_model_dir, tmp_path, monkeypatch):
    need("trl")
    trl_grpo = load_scale_module("scale/trl_grpo.py")

    class GrpoPrecision(contextlib.nullcontext):  # what grpo.autocast_for returns, recognisable
        pass
    monkeypatch.setattr(grpo, "autocast_for", lambda device, precision: GrpoPrecision())
    evaluated_under = []
    evaluate = grpo.evaluate
    monkeypatch.setattr(grpo, "evaluate", lambda *args: evaluated_under.append(args[-1]) or evaluate(*args))
    drawn = []
    monkeypatch.setattr(grpo, "plot_curves", lambda *args: drawn.append(args))
    results = trl_grpo.main(["--model", str(tiny_model_dir), "--dataset", "arithmetic", "--max-steps", "2",
                             "--prompts-per-step", "2", "--num-generations", "4", "--micro-batch-size", "4",
                             "--max-completion-length", "8", "--eval-size", "4", "--eval-batch-size", "4",
                             "--save-every", "0", "--device", "cpu", "--output-dir", str(tmp_path / "run")])
    steps = [log for log in results["log_history"] if "rewards/format/mean" in log]
    assert len(steps) == 2 and all("rewards/answer/mean" in log and "kl" in log for log in steps)
    assert set(results["before"]) == set(results["after"]) == {"accuracy", "format_rate", "n"}
    assert len(evaluated_under) == 2 and all(isinstance(a, GrpoPrecision) for a in evaluated_under)  # as grpo.py
    assert list((tmp_path / "run").glob("checkpoint-*"))  # --save-every 0: one checkpoint at the end, to resume
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["engine"] == "trl"
    # grpo.py's logs too: metrics.jsonl with grpo.py's keys (the figures TRL logged), samples.jsonl, curves.png
    metrics = grpo.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for ours, theirs in trl_grpo.TRL_METRICS.items():
        assert [m[ours] for m in metrics] == [log[theirs] for log in steps], ours
    assert all(0 <= m["format_rate"] <= 1 for m in metrics)
    samples = grpo.read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert [s["step"] for s in samples] == [2, 2] and samples[0]["question"].startswith("What is ")
    assert drawn == [(tmp_path / "run" / "metrics.jsonl", tmp_path / "run" / "curves.png")]  # at the end, as grpo.py
    assert not (tmp_path / "run" / "completions").exists()  # no parquet files; no table on the console


def test_trl_runner_help_is_grpo_pys_flags_and_its_own(capsys):
    trl_grpo = load_scale_module("scale/trl_grpo.py")
    with pytest.raises(SystemExit) as stop:
        trl_grpo.main(["--help"])
    text = capsys.readouterr().out
    assert stop.value.code == 0 and text.startswith("usage: trl_grpo.py") and "--use-vllm" in text
    assert all(grpo.flag(f.name) in text for f in fields(Config))


def test_verl_reward_is_the_weighted_sum_that_grpo_trains_on():
    reward = load_scale_module("scale/verl/reward.py")
    completions = ["<reasoning>2+2</reasoning><answer>4</answer>", "<answer>5</answer>", "it is 4", "",
                   "<reasoning>x</reasoning>\n<answer>4</answer> more"]
    completions.append("<reasoning>\n1 + 2 = 3\n</reasoning><answer>4</answer>")  # one step that holds
    weights = {"format": 0.5, "answer": 1.0, "step": 0.0}
    total, _ = grpo.score_completions(completions, ["4"] * len(completions), weights)
    assert [reward.compute_score("openai/gsm8k", c, "4") for c in completions] == total.tolist()
    assert reward.compute_score("x", completions[0], "4", None, format_weight=0.0, answer_weight=3.0) == 3.0
    assert reward.compute_score("x", completions[-1], "4", None, format_weight=0, step_weight=2.0) == 1.4
    assert (reward.FORMAT_WEIGHT, reward.ANSWER_WEIGHT, reward.STEP_WEIGHT) == (
        Config.format_weight, Config.answer_weight, Config.step_weight)


def test_verl_parquet_rows_have_verls_schema_and_our_prompt(tmp_path):
    from datasets import Dataset
    prepare = load_scale_module("scale/verl/prepare_data.py")
    paths = prepare.write_parquet("arithmetic", tmp_path / "verl", arithmetic_max=20)
    for split, path in paths.items():
        rows = Dataset.from_parquet(str(path)).to_list()
        ours = rewards.load_dataset_rows("arithmetic", split, arithmetic_max=20)
        assert len(rows) == len(ours)
        assert set(rows[0]) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
        assert rows[0]["prompt"] == rewards.make_prompt(ours[0]["question"])  # system prompt, worked example, question
        assert rows[0]["reward_model"] == {"style": "rule", "ground_truth": ours[0]["answer"]}
        assert rows[0]["data_source"] == "arithmetic" and rows[0]["extra_info"]["split"] == split


# TRL's GRPOTrainer and grpo.py on one batch: per-token log-probs, loss and gradient. The batch: two groups of
# two completions, prompts of different lengths (left padding), completions that end early (masked), T = 0.7, a
# reference 0.1-0.3 nats away so that the KL acts, and for mu > 1 old log-probs 0.1-0.4 nats away so that the
# ratio is not 1 and the clip acts. Both sides run float32 (TRL's bf16 off) over the same weights and differ only
# in the order of float32 sums (TRL's fused output layer, our chunked logsumexp): seen, log-probs within 5e-7,
# losses equal, gradients within 1.3e-7 relative. Tolerances: 1e-5 for log-probs, 1e-6 for the loss, 1e-5 for
# the gradient (float32 rounding, with room). Swapping only the KL option (beta 0.04) moves the gradient by
# 9e-4 to 1.7e-3 relative: the last assertion requires > 1e-4, so the comparison sees a change that small.

@pytest.fixture(scope="module")
def trl_trainer(tiny_model_dir, tmp_path_factory):
    trl = need("trl")
    from datasets import Dataset
    args = trl.GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), use_cpu=True, bf16=False, report_to="none",
                          per_device_train_batch_size=4, num_generations=2, max_completion_length=5,
                          temperature=0.7, beta=0.04, epsilon=0.2, epsilon_high=0.28, disable_dropout=True,
                          activation_checkpointing=True, model_init_kwargs={"dtype": torch.float32})
    trainer = trl.GRPOTrainer(model=str(tiny_model_dir), reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                              args=args, train_dataset=Dataset.from_list([{"prompt": "a b"}] * 4))
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train; one micro-batch here
    return trainer


@pytest.mark.parametrize("mu", [1, 2])
@pytest.mark.parametrize("kl_estimator", ["k3", "k3_ratio"])
@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_logps_loss_and_gradient_agree_with_trl(trl_trainer, tiny_model_dir, loss_type, kl_estimator, mu):
    """Log-probs, loss and gradient equal TRL's on one batch, with the reference above and below the policy and
    (mu = 2) ratios cut at both clip edges and inside them."""
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(5, 30, (4, 4), generator=generator)
    prompt_mask = torch.tensor([[0, 1, 1, 1]] * 2 + [[1, 1, 1, 1]] * 2)  # group 1's prompt is one token shorter
    completion_ids = torch.randint(5, 30, (4, 5), generator=generator)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    input_ids, attention_mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    advantages = torch.tensor([0.7, -0.7, -1.1, 1.1])
    ours = grpo.load_model(str(tiny_model_dir), torch.device("cpu")).train()
    with torch.no_grad():
        logp = per_token_logps(ours, input_ids, attention_mask, 5, temperature=0.7)
    ref_logp = logp - 0.3 + 0.6 * torch.rand(logp.shape, generator=generator)  # the reference above and below
    old_logp = logp - 0.5 + torch.rand(logp.shape, generator=generator) if mu > 1 else None  # ratio 0.61-1.65
    kept = completion_mask.bool()  # TRL leaves 0 where the mask is 0
    assert (ref_logp > logp)[kept].any() and (ref_logp < logp)[kept].any()  # both signs of the KL's log-ratio
    if mu > 1:  # every branch of the clipped surrogate meets TRL's: cut below (Â < 0), cut above (Â > 0), inside
        ratio, A = torch.exp(logp - old_logp)[kept], advantages[:, None].expand_as(logp)[kept]
        assert ((ratio < 0.8) & (A < 0)).any() and ((ratio > 1.28) & (A > 0)).any()
        assert ((ratio > 0.8) & (ratio < 1.28)).any() and ((ratio < 0.8) & (A > 0)).any()

    trainer, theirs = trl_trainer, trl_trainer.model
    trainer.loss_type, trainer.args.use_bias_correction_kl = loss_type, kl_estimator == "k3_ratio"
    theirs.train().zero_grad()
    their_logp = trainer._get_per_token_logps_and_entropies(theirs, input_ids, attention_mask, 5)[0]
    torch.testing.assert_close(their_logp.detach()[kept], logp[kept], atol=1e-5, rtol=0)
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=advantages, ref_per_token_logps=ref_logp,
                  old_per_token_logps=old_logp, num_items_in_batch=completion_mask.sum())
    their_loss = trainer._compute_loss(theirs, inputs)
    their_loss.backward()

    def our_loss_and_gradient(estimator):
        ours.zero_grad()
        logp = per_token_logps(ours, input_ids, attention_mask, 5, temperature=0.7)
        loss, _ = grpo_loss(logp, old_logp if mu > 1 else logp.detach(), ref_logp, advantages, completion_mask,
                            beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                            max_completion_length=5, kl_estimator=estimator)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in ours.parameters()])
    our_loss, our_gradient = our_loss_and_gradient(kl_estimator)
    their_gradient = torch.cat([p.grad.flatten() for p in theirs.parameters()])
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=1e-6)
    assert (our_gradient - their_gradient).norm() < 1e-5 * their_gradient.norm()
    _, other_gradient = our_loss_and_gradient("k3" if kl_estimator == "k3_ratio" else "k3_ratio")
    assert (other_gradient - their_gradient).norm() > 1e-4 * their_gradient.norm()  # 10x the tolerance


# ---------------------------------------------------------------------------------------------
# grpo_step wires each piece to the right data: each test below fails on one wiring bug named in its docstring.

def one_step(cfg, rows, monkeypatch, steps=1):
    """Run `steps` grpo_steps on the same rows; return every grpo_loss call's arguments and the last step's output."""
    calls = []

    def spy(logp, old_logp, ref_logp, advantages, mask, **settings):
        calls.append(dict(logp=logp.detach().clone(), old_logp=old_logp.clone(), advantages=advantages.clone(),
                          ref_logp=None if ref_logp is None else ref_logp.clone(), settings=settings))
        return grpo_loss(logp, old_logp, ref_logp, advantages, mask, **settings)
    monkeypatch.setattr(grpo, "grpo_loss", spy)
    torch.manual_seed(cfg.seed)
    policy, reference = grpo.load_policy_and_reference(cfg, torch.device("cpu"))
    tokenizer = grpo.load_tokenizer(cfg.model)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
    for _ in range(steps):
        out = grpo.grpo_step(policy, reference, tokenizer, optimizer, rows, cfg)
    return calls, out, policy


def arithmetic_rows(n):
    return rewards.load_dataset_rows("arithmetic", "train", arithmetic_max=20)[:n]


def test_grpo_step_pairs_each_completion_with_its_questions_answer_and_groups_by_g(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    """Bugs: answers repeated in the wrong order (answers * G), or groups of P instead of G. P = 3, G = 2: the
    three answers differ, and P != G. The rewards are fixed so that grouping by 3 gives other advantages."""
    rows = arithmetic_rows(3)
    assert len({r["answer"] for r in rows}) == 3
    seen = []
    fixed = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])  # groups of 2: (1, 0), (0, 0), (1, 1)
    monkeypatch.setattr(grpo, "score_completions",
                        lambda texts, answers, weights: seen.append(answers) or (fixed, {"format": fixed, "answer": fixed}))
    cfg = tiny_config(tiny_model_dir, tmp_path, prompts_per_step=3, num_generations=2, micro_batch_size=6)
    _, (_, _, _, advantages), _ = one_step(cfg, rows, monkeypatch)
    assert seen == [[r["answer"] for r in rows for _ in range(2)]]  # completion i answers question i // G
    torch.testing.assert_close(advantages, group_advantages(fixed, 2))
    assert not torch.allclose(advantages, group_advantages(fixed, 3))  # grouping by P would differ


def test_mu_passes_score_against_the_sampler_and_clip(tiny_model_dir, tmp_path, monkeypatch):
    """Bugs: old log-probs from the reference, or taken after the first update, or not reused. At step 2 (the
    reference is now behind the policy) the first of mu = 3 passes must see ratio 1 exactly, the others the
    same old log-probs and a moved policy, with some tokens outside the clip range."""
    cfg = tiny_config(tiny_model_dir, tmp_path, mu=3, learning_rate=3e-2, beta=0.04, micro_batch_size=8)
    calls, (metrics, *_), _ = one_step(cfg, arithmetic_rows(2), monkeypatch, steps=2)
    first, second, third = calls[3:]  # step 2's passes (one micro-batch each)
    assert torch.equal(first["logp"], first["old_logp"])  # the sampler's log-probs: ratio 1 before any update
    assert not torch.allclose(first["old_logp"], first["ref_logp"], atol=1e-3)  # ... not the reference's
    assert torch.equal(second["old_logp"], first["old_logp"]) and torch.equal(third["old_logp"], first["old_logp"])
    assert not torch.allclose(second["logp"], second["old_logp"], atol=1e-3)  # the policy moved
    assert metrics["clip/low_frac"] + metrics["clip/high_frac"] > 0


def test_lora_reference_is_the_base_model_in_grpo_step(tiny_model_dir, tmp_path, monkeypatch):
    """Bug: grpo_step forgets disable_adapter, so the reference is the policy and the KL is 0 forever."""
    lora = dict(lora_r=4, lora_alpha=8, lora_target_modules="q_proj,v_proj,down_proj")
    cfg = tiny_config(tiny_model_dir, tmp_path, learning_rate=5e-2, beta=0.04, micro_batch_size=8, **lora)
    calls, (metrics, rollout, *_), _ = one_step(cfg, arithmetic_rows(2), monkeypatch, steps=2)
    last = calls[-1]
    base = grpo.load_model(str(tiny_model_dir), torch.device("cpu")).eval()
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    with torch.no_grad():
        base_logp = per_token_logps(base, input_ids, attention_mask, rollout.completion_ids.shape[1])
    torch.testing.assert_close(last["ref_logp"], base_logp, atol=1e-5, rtol=0)  # float32, the same model
    assert not torch.allclose(last["logp"], last["ref_logp"], atol=1e-3) and metrics["kl"] > 0


@pytest.mark.parametrize("loss_type, kl_estimator, epsilon_low, epsilon_high, beta, temperature", [
    ("dr_grpo", "k3", 0.1, 0.3, 0.02, 0.7), ("dapo", "k2", 0.25, 0.15, 0.1, 1.3)])
def test_grpo_step_passes_every_setting_to_the_loss(tiny_model_dir, tmp_path, monkeypatch, loss_type,
                                                    kl_estimator, epsilon_low, epsilon_high, beta, temperature):
    """Bugs: a setting left at its default on the way to the loss (loss type, KL estimator, ε, β), Dr. GRPO
    keeping the std, the log-probs taken at another temperature than the sampler's, another clipping norm."""
    temperatures, norms = [], []
    logps = grpo.per_token_logps
    monkeypatch.setattr(grpo, "per_token_logps", lambda *a, **k: temperatures.append(a[4]) or logps(*a, **k))
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, norm: norms.append(norm) or clip(params, norm))
    sampled = []
    generate = grpo.generate_completions
    monkeypatch.setattr(grpo, "generate_completions", lambda *a: sampled.append(a[5]) or generate(*a))
    cfg = tiny_config(tiny_model_dir, tmp_path, loss_type=loss_type, kl_estimator=kl_estimator, mu=2,
                      epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta, temperature=temperature,
                      max_grad_norm=0.3)
    calls, (_, _, step_rewards, advantages), _ = one_step(cfg, arithmetic_rows(2), monkeypatch)
    expected = dict(beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type,
                    max_completion_length=cfg.max_completion_length, kl_estimator=kl_estimator)
    assert all(c["settings"].items() >= expected.items() for c in calls)
    assert sampled == [temperature] and set(temperatures) == {temperature} and norms == [0.3, 0.3]
    std = "group" if loss_type != "dr_grpo" else "none"
    torch.testing.assert_close(advantages, group_advantages(step_rewards, cfg.num_generations, std))


def test_asymmetric_clip_reference_value():
    """Bug: ε_low and ε_high swapped in the clamp. Token 2 of completion 1 (ratio e^0.3, Â > 0) is cut at
    1 + ε_high, token 2 of completion 2 (ratio e^-0.3, Â < 0) at 1 - ε_low; recomputed here in plain floats."""
    import math
    args = dict(TWO_COMPLETIONS, ref_logp=None)
    low, high = 0.1, 0.3
    loss, _ = grpo_loss(**args, beta=0.0, epsilon_low=low, epsilon_high=high, loss_type="grpo", max_completion_length=4)
    per_sequence = []
    for logp, old, mask, A in zip(args["logp"].tolist(), args["old_logp"].tolist(), args["mask"].tolist(),
                                  args["advantages"].tolist()):
        terms = [-min(math.exp(a - b) * A, min(max(math.exp(a - b), 1 - low), 1 + high) * A)
                 for a, b, m in zip(logp, old, mask) if m]
        per_sequence.append(sum(terms) / len(terms))
    expected = sum(per_sequence) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6), (  # float32 against float64: ~1e-7
        "ρ above 1 + ε_high is cut with Â > 0, below 1 - ε_low with Â < 0; then the pessimistic min")
    swapped, _ = grpo_loss(**args, beta=0.0, epsilon_low=high, epsilon_high=low, loss_type="grpo", max_completion_length=4)
    assert abs(swapped.item() - expected) > 1e-3


def test_evaluate_counts_right_answers_and_the_strict_format(monkeypatch):
    """Bugs: evaluate's figures (only its keys were checked), a loose format counted as the strict one. Four
    replies: right and formatted, right with one tag pair, wrong and formatted, nothing: 2/4 and 2/4."""
    texts = ["<reasoning>1+1</reasoning>\n<answer>2</answer>", "<answer>3</answer>",  # loose: format 0.25, not 1
             "<reasoning>x</reasoning>\n<answer>9</answer>", ""]
    rows = [{"prompt": [], "answer": a} for a in ("2", "3", "4", "5")]
    monkeypatch.setattr(grpo, "generate_completions", lambda model, tok, prompts, *a: grpo.Rollout(
        None, None, None, None, None, texts[:len(prompts)]))
    assert grpo.evaluate(None, None, rows, batch_size=4) == {"accuracy": 0.5, "format_rate": 0.5, "n": 4}


class SilentBar:
    def write(self, text):
        pass

    def set_postfix(self, **kwargs):
        pass


def test_a_diagnostic_needs_its_steps_in_a_row(tmp_path):
    """Bug: `all` -> `any` over the last PATIENCE steps. Truncated on steps 1 and 3 but not 2: nothing said;
    then on PATIENCE steps in a row: said, once."""
    base = {"completion/truncated_frac": 0.0, "groups/zero_std_frac": 0.0, "reward/format": 0.5, "grad_norm": 1.0,
            "kl": 0.0, "reward/total": 0.5, "accuracy": 0.5}
    pattern = [1.0, 0.0, 1.0] + [1.0] * (grpo.PATIENCE - 1)  # in a row from step 3 on
    for step, truncated in enumerate(pattern, 1):
        grpo.log_step(tmp_path, step, {**base, "completion/truncated_frac": truncated}, SilentBar())
    said = said_in(tmp_path)
    assert said == {"truncated": 2 + grpo.PATIENCE}


def test_data_order_changes_with_the_epoch_and_the_seed():
    """Bugs: no shuffle, an ignored seed, the same order every epoch (the other test checks one epoch's rows)."""
    rows = [{"i": i} for i in range(12)]
    order = lambda seed, epoch: [r["i"] for s in range(3 * epoch, 3 * epoch + 3)  # noqa: E731
                                 for r in grpo.rows_for_step(rows, s, 4, seed)]
    assert order(0, 0) != list(range(12))  # shuffled
    assert sorted(order(0, 1)) == list(range(12)) and order(0, 1) != order(0, 0)  # a new order each epoch
    assert order(1, 0) != order(0, 0)  # the seed matters


# ---------------------------------------------------------------------------------------------
# The paper's other half: process supervision, the gradient coefficient, the batch's std, mini-batches


def test_reward_to_go_sums_each_rows_rewards_from_t_on():
    rewards_ = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.0, 0.0, 0.0, 3.0]])
    expected = torch.tensor([[2.0, 1.0, 1.0, -1.0], [3.0, 3.0, 3.0, 3.0]])  # by hand
    close(grpo.reward_to_go(rewards_), expected, "reward-to-go: at t, the sum of each row's rewards at t and after "
          "(what token t can still change), never those before it")


def test_process_advantages_reference_values():
    """The paper's section 4.1.3 by hand. Group 1 (G = 2, T = 6): completion 0 has steps ending at tokens 1, 3, 5
    (rewards 1, 0, 1.5; the last is its answer's), completion 1 only its answer's, 0, at token 4 (a shorter reply,
    no checked step). R = [1, 0, 1.5, 0]: mean 0.625, sample std 0.75, so r̃ = (r - 0.625) / 0.7501. Â_it sums the
    r̃ of its steps ending at t or after: 0 after a reply's last step. Group 2: equal rewards: Â = 0 exactly."""
    steps = [[(1, 1.0), (3, 0.0), (5, 1.5)], [(4, 0.0)],
             [(0, 1.0), (2, 1.0)], [(5, 1.0)]]
    advantages = grpo.process_advantages(steps, group_size=2, length=6)
    r1, r0, r15 = 0.499933, -0.833222, 1.166511  # r̃ of 1, 0 and 1.5
    expected = torch.tensor([[r1 + r0 + r15, r1 + r0 + r15, r0 + r15, r0 + r15, r15, r15],
                             [r0, r0, r0, r0, r0, 0.0],
                             [0.0] * 6, [0.0] * 6])
    close(advantages, expected, "r̃ = (r - mean(R)) / (std(R) + eps) over all the steps of the group, the sample "
          "std; Â_it = Σ r̃ of the steps of completion i ending at t or after (0 after its last)", atol=1e-5, rtol=0)
    assert advantages[2:].eq(0).all(), "a group whose step rewards are all equal must give exactly 0"


def test_process_advantages_without_steps_are_the_outcome_advantages():
    """A group in which no reply states a step: each has one step, its answer, at its last token; then r̃ is the
    outcome advantage and Â_it is that same value on each of its tokens up to its end."""
    rewards_, lengths = torch.tensor([1.5, 0.0, 0.5, 0.0]), [3, 5, 2, 4]
    steps = [[(n - 1, r.item())] for n, r in zip(lengths, rewards_)]
    advantages = grpo.process_advantages(steps, group_size=4, length=5)
    outcome = group_advantages(rewards_, 4)
    for i, n in enumerate(lengths):
        close(advantages[i, :n], outcome[i].expand(n), "with one step per reply, its answer at its last token, Â "
              "must be the outcome advantage on each of its tokens")
        assert advantages[i, n:].eq(0).all(), "after a reply's last step (its last token) Â is 0"


def byte_level_tokenizer(text: str):
    """A byte-level BPE tokenizer trained on `text`: it decodes any ids back to their exact text, and its merges
    make tokens of several characters (and a character of several bytes, such as ×, several tokens)."""
    from tokenizers import trainers
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    backend.train_from_iterator([text] * 4, trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_step_token_ends_name_the_token_that_holds_each_steps_last_character():
    """Each step's token index k: the reply's tokens up to k decode to text that reaches the step's end, those
    before k do not. The reward is reasoning_steps' (1 holds, 0 does not)."""
    text = "<reasoning>\nFirst, 3 × 4 = 12\nthen 12 - 2 = 11\nso 11 = 11</reasoning><answer>11</answer>"
    tokenizer = byte_level_tokenizer(text)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text and len(ids) < len(text.encode())  # merged
    ends = rewards.step_token_ends(tokenizer, ids, text)
    steps = rewards.reasoning_steps(text)
    assert [r for _, r in ends] == [1.0, 0.0, 1.0] and len(steps) == 3
    for (k, _), (_, end, _) in zip(ends, steps):
        assert len(tokenizer.decode(ids[:k + 1], skip_special_tokens=True)) >= end
        assert len(tokenizer.decode(ids[:k], skip_special_tokens=True)) < end


def test_process_supervision_in_a_step_gives_each_token_its_advantage(tiny_model_dir, tmp_path, monkeypatch):
    """grpo_step with --supervision process: the advantages are [B, T], the paper's formula over the steps that
    rewards.py finds in the sampled replies, each reply's total reward as its last step, at its last token."""
    text = "<reasoning>\n1 + 1 = 2\n2 + 2 = 5\n</reasoning><answer>2</answer>"
    replies = iter([text, "x", text, "<answer>2</answer>"] * 2)  # the tiny model writes noise: choose its texts
    generate = grpo.generate_completions

    def fixed_texts(*args):
        rollout = generate(*args)
        rollout.texts = [next(replies) for _ in rollout.texts]
        return rollout
    monkeypatch.setattr(grpo, "generate_completions", fixed_texts)
    cfg = tiny_config(tiny_model_dir, tmp_path, supervision="process", max_completion_length=64)
    calls, (_, rollout, total, advantages), _ = one_step(cfg, arithmetic_rows(2), monkeypatch)
    B, T = rollout.completion_ids.shape
    assert advantages.shape == (B, T) and torch.equal(torch.cat([c["advantages"] for c in calls]), advantages)
    tokenizer = grpo.load_tokenizer(cfg.model)
    lengths = rollout.completion_mask.sum(dim=1).tolist()
    steps = [[*rewards.step_token_ends(tokenizer, ids[:n], text), (n - 1, r)]
             for ids, n, text, r in zip(rollout.completion_ids.tolist(), lengths, rollout.texts, total.tolist())]
    assert [len(s) for s in steps] == [3, 1, 3, 1] * 2  # two checked steps (one true, one false) and the answer
    torch.testing.assert_close(advantages, grpo.process_advantages(steps, cfg.num_generations, T))
    assert not advantages.eq(0).all()


def test_online_rft_coefficient_is_one_for_a_right_answer_and_zero_otherwise(tiny_model_dir, tmp_path, monkeypatch):
    """The paper's eq. 10 (Table 10): GC = 1 if the answer is right, else 0, whatever the format or the group."""
    replies = iter(["<reasoning>a</reasoning><answer>{}</answer>", "{}", "no", "<answer>-1</answer>"] * 2)
    rows = arithmetic_rows(2)
    generate = grpo.generate_completions

    def fixed_texts(*args):
        rollout = generate(*args)
        rollout.texts = [next(replies).format(rows[i // 4]["answer"]) for i in range(len(rollout.texts))]
        return rollout
    monkeypatch.setattr(grpo, "generate_completions", fixed_texts)
    cfg = tiny_config(tiny_model_dir, tmp_path, advantage="online_rft")
    calls, (_, _, total, advantages), _ = one_step(cfg, rows, monkeypatch)
    assert advantages.tolist() == [1.0, 1.0, 0.0, 0.0] * 2  # the format reward (in the total) changes nothing
    assert total.tolist() != advantages.tolist()


def test_batch_std_divides_by_the_whole_batchs_std():
    """TRL's scale_rewards="batch": each group's mean subtracted, the batch's sample std (0.534522) divided by."""
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]), 4, std="batch")
    expected = [1.402859, -0.467620, -0.467620, -0.467620, 0.467620, 0.467620, -1.402859, 0.467620]
    close(advantages, torch.tensor(expected), 'std="batch": each group\'s own mean subtracted, divided by the '
          "sample std of the whole batch's rewards", atol=1e-5, rtol=0)  # literals of 6 decimals


def test_per_token_advantages_equal_to_each_completions_one_give_the_same_loss_and_gradient():
    logp = TWO_COMPLETIONS["logp"].clone().requires_grad_(True)
    settings = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo", max_completion_length=4)
    args = (TWO_COMPLETIONS["old_logp"], TWO_COMPLETIONS["ref_logp"])
    one, _ = grpo_loss(logp, *args, TWO_COMPLETIONS["advantages"], TWO_COMPLETIONS["mask"], **settings)
    per_token = TWO_COMPLETIONS["advantages"][:, None].expand(2, 4)
    each, _ = grpo_loss(logp, *args, per_token, TWO_COMPLETIONS["mask"], **settings)
    why = "Â per token ([B, T]) equal to each completion's Â ([B]) must give the same loss and gradient"
    assert one.item() == each.item(), why
    assert torch.equal(*(torch.autograd.grad(x, logp)[0] for x in (one, each))), why


def test_k1_to_go_puts_the_kl_to_go_in_the_advantage_not_in_the_loss():
    """-β Σ_{t' >= t} k1 of the sample (from π_θ_old) joins Â_t; no KL term is added; the KL reported is k1's mean."""
    old, ref = TWO_COMPLETIONS["old_logp"], TWO_COMPLETIONS["ref_logp"]
    mask, beta = TWO_COMPLETIONS["mask"], 0.5
    settings = dict(epsilon_low=10.0, epsilon_high=10.0, loss_type="dapo", max_completion_length=4)  # no clip here
    to_go, diagnostics = grpo_loss(TWO_COMPLETIONS["logp"], old, ref, TWO_COMPLETIONS["advantages"], mask,
                                   beta=beta, kl_estimator="k1_to_go", **settings)
    advantages = TWO_COMPLETIONS["advantages"][:, None] - beta * grpo.reward_to_go((old - ref) * mask)
    by_hand, _ = grpo_loss(TWO_COMPLETIONS["logp"], old, ref, advantages, mask, beta=0.0, **settings)
    assert to_go.item() == pytest.approx(by_hand.item(), abs=1e-6), (  # float32 of the same sums
        "k1_to_go: Â_t - β Σ_{t' >= t} k1_t' with k1 of the sample, old_logp - ref_logp (reward_to_go), and no KL "
        "term in the loss")
    k1 = ((TWO_COMPLETIONS["logp"] - ref) * mask).sum() / mask.sum()
    assert diagnostics["kl"] == pytest.approx(k1.item(), abs=1e-6), "k1_to_go reports k1's token mean as the KL"


def test_mini_batches_take_an_optimizer_step_each_on_their_part_of_the_batch(tiny_model_dir, tmp_path,
                                                                              monkeypatch):
    """verl's mini-batches: B = 8 in 2 parts of 4, one optimizer step each, each loss over its own part (4
    sequences, its tokens)."""
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1))
    cfg = tiny_config(tiny_model_dir, tmp_path, mini_batches=2, micro_batch_size=2)
    calls, (_, rollout, _, _), _ = one_step(cfg, arithmetic_rows(2), monkeypatch)
    assert len(steps) == 2 and len(calls) == 4  # 2 mini-batches x 2 micro-batches
    mask = rollout.completion_mask
    assert [c["settings"]["num_sequences"] for c in calls] == [4] * 4
    assert [c["settings"]["num_tokens"] for c in calls] == [int(mask[:4].sum())] * 2 + [int(mask[4:].sum())] * 2


def test_mini_batches_move_the_ratio_once_the_policy_has_stepped(tiny_model_dir, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_model_dir, tmp_path, mini_batches=2, micro_batch_size=4, learning_rate=1e-2)
    calls, _, _ = one_step(cfg, arithmetic_rows(2), monkeypatch)
    first, second = ((c["logp"] - c["old_logp"]).abs().max().item() for c in calls)
    assert first < 1e-5 < second  # before any step the policy is the sampler (rounding only); after one it is not


@pytest.mark.parametrize("overrides, message", [
    (dict(mini_batches=3), "--mini-batches 3 must divide a step's completions, P*G."),
    (dict(mini_batches=0), "--mini-batches is 0; it must be > 0."),
    (dict(supervision="process", advantage="online_rft"), "--supervision process normalizes the steps' rewards"),
    (dict(supervision="process", advantage="grpo_batch_std"), "use it with --advantage grpo."),
    (dict(advantage="rft"), "--advantage 'rft' is unknown; choose one of grpo, grpo_batch_std, online_rft."),
])
def test_the_new_settings_refuse_what_cannot_work(tiny_model_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        grpo.check_config(tiny_config(tiny_model_dir, tmp_path, **overrides))


def test_step_statistics_count_steps_that_hold_and_that_repeat():
    replies = ["<reasoning>\n1 + 2 = 3\n1 + 2 = 3\n2 + 2 = 5\n</reasoning>", "no steps",
               "<reasoning>\n3 * 3 = 9\n</reasoning>"]
    stats = rewards.step_statistics(replies)
    assert stats == {"steps/per_reply": 4 / 3, "steps/hold_frac": 3 / 4, "steps/repeated_frac": 1 / 4}
    assert rewards.step_statistics([]) == {"steps/per_reply": 0.0, "steps/hold_frac": 0.0,
                                           "steps/repeated_frac": 0.0}


def test_load_tokenizer_runs_no_remote_code_unless_asked_and_pads_with_eos(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    asked = []
    load = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda name, **kw: asked.append(kw) or load(name, **kw))
    grpo.load_tokenizer(str(tiny_model_dir))
    grpo.load_tokenizer(str(tiny_model_dir), trust_remote_code=True)
    assert asked == [{"trust_remote_code": False}, {"trust_remote_code": True}]
    no_pad = tmp_path / "no-pad"
    tokenizer = load(str(tiny_model_dir))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(no_pad)
    assert load(str(no_pad)).pad_token is None and grpo.load_tokenizer(str(no_pad)).pad_token == "<|im_end|>"
    with pytest.raises(ConfigError) as refused:
        grpo.load_tokenizer(str(tmp_path / "empty"))
    assert str(refused.value).endswith("Pass a Hub id or a local folder with config.json, weights and tokenizer.")


def test_step_statistics_of_one_reply_with_one_step():
    assert rewards.step_statistics(["<reasoning>\n2 + 2 = 4\n</reasoning>"]) == {
        "steps/per_reply": 1.0, "steps/hold_frac": 1.0, "steps/repeated_frac": 0.0}
    assert rewards.step_statistics(["<reasoning>\n2 + 2 = 5\n</reasoning>"])["steps/hold_frac"] == 0.0


def test_process_advantages_normalize_each_group_apart_and_sum_steps_ending_together():
    """Two groups: each with its own mean and std (the second's rows never see the first's); two steps that end
    at the same token both count; a group of one step, or none, or of equal float rewards gives exactly 0."""
    one = [[(0, 1.0), (2, 0.0)], [(1, 0.5), (1, 1.0)]]  # the second reply's two steps end at token 1
    two = [[(2, 3.0)], [(0, 0.0), (2, 1.0)]]
    both = grpo.process_advantages(one + two, group_size=2, length=3)
    close(both, torch.cat([grpo.process_advantages(one, 2, 3), grpo.process_advantages(two, 2, 3)]),
          "each group's steps are normalized by its own mean and std: another group must not change them")
    R = torch.tensor([1.0, 0.0, 0.5, 1.0])
    summed = ((0.5 - R.mean()) + (1.0 - R.mean())) / (R.std() + 1e-4)
    close(both[1, :2], summed.expand(2), "two steps that end at the same token both count")
    assert both[1, 2] == 0, "after a reply's last step Â is 0"
    for steps, size in (([[(1, 1.0)]], 1), ([[], []], 2), ([[(0, 0.45)], [(1, 0.45), (2, 0.45)]], 2)):
        assert grpo.process_advantages(steps, size, 3).eq(0).all(), (
            f"a group of one step, of none, or of equal rewards must give exactly 0: it teaches nothing ({steps})")
    two_values = grpo.process_advantages([[(0, 1.0)], [(0, 0.0)]], 2, 1)  # two distinct rewards are enough
    close(two_values, torch.tensor([[0.707007], [-0.707007]]), "two distinct step rewards in a group are enough",
          atol=1e-5, rtol=0)  # ±0.5 / 0.7072


# ---------------------------------------------------------------------------------------------
# exercises/: a learner writes Part 1 and checks it with the tests above (exercises/README.md)

EXERCISES_DIR = HERE / "exercises"


def exercise_module(name: str):
    """exercises/check.py or train.py or part1.py, imported as a learner's command imports it."""
    if str(EXERCISES_DIR) not in sys.path:
        sys.path.insert(0, str(EXERCISES_DIR))
    return importlib.import_module(name)


def test_the_exercise_file_holds_grpos_signatures_and_formulas_and_no_code():
    """No second copy of the algorithm: each stub has grpo.py's signature, its docstring opens with grpo.py's (the
    formula), and its body only raises NotImplementedError; the stubs come in the order of one step."""
    check, train, part1 = (exercise_module(name) for name in ("check", "train", "part1"))
    defined = [name for name, value in vars(part1).items() if inspect.isfunction(value) and value.__module__ == "part1"]
    assert defined == check.PART1
    for name in check.PART1:
        stub, solution = getattr(part1, name), getattr(grpo, name)
        assert inspect.signature(stub) == inspect.signature(solution), name
        assert inspect.getdoc(stub).startswith(inspect.getdoc(solution)), f"{name}: its docstring must open with grpo.py's"
        assert train.is_stub(stub), name
    assert not train.is_stub(grpo.grpo_loss)


def test_the_exercise_tests_pass_on_grpo_fail_on_the_stubs_and_catch_each_catalogued_mistake(tmp_path):
    """In one run of exercises/check.py --mistakes: every exercise test passes on grpo.py; on the untouched stubs
    each fails, with NotImplementedError (not a crash elsewhere); each mistake of exercises/mistakes.py (two or
    more per exercise) fails a test of its exercise whose message names it."""
    report_path = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(EXERCISES_DIR / "check.py"), "--mistakes", "--json", str(report_path)],
                          capture_output=True, text=True, timeout=900, cwd=HERE)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    check, mistakes = exercise_module("check"), exercise_module("mistakes")
    assert report["solution"] and all(r["passed"] for r in report["solution"].values()), report["solution"]
    for exercise, results in report["stubs"].items():
        assert len(results) >= len(check.EXERCISES[exercise]), exercise
        assert all(r["error"] == "NotImplementedError" for r in results.values()), (exercise, results)
    per_exercise = {e: [m for m in mistakes.MISTAKES if m.exercise == e] for e in check.EXERCISES}
    assert all(len(m) >= 2 for m in per_exercise.values()), per_exercise
    for mistake in mistakes.MISTAKES:
        assert report["mistakes"][mistake.name]["caught_by"], (mistake.name, report["mistakes"][mistake.name])


def test_training_with_a_learners_functions_runs_them_and_gives_grpos_run(tiny_model_dir, tmp_path):
    """exercises/train.py with a learner's file whose functions are grpo.py's (each logging its calls): every one
    is called, and the run's metrics are grpo.py's own, number for number. Untouched stubs: refused at once."""
    names = exercise_module("check").PART1
    calls = tmp_path / "calls.txt"
    (tmp_path / "mine.py").write_text("\n".join([
        "import grpo", f"SOLUTION = {{name: getattr(grpo, name) for name in {names!r}}}",
        "def logged(name):", "    def function(*args, **kwargs):",
        f"        open({str(calls)!r}, 'a').write(name + '\\n')", "        return SOLUTION[name](*args, **kwargs)",
        "    return function", *(f"{name} = logged({name!r})" for name in names)]))
    flags = ["--model", str(tiny_model_dir), "--dataset", "arithmetic", "--prompts-per-step", "2", "--num-generations",
             "4", "--max-completion-length", "8", "--max-steps", "2", "--eval-size", "0", "--save-every", "0",
             "--device", "cpu", "--mu", "2", "--supervision", "process"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    theirs = run_cli(*flags, "--output-dir", str(tmp_path / "grpo"))
    mine = subprocess.run([sys.executable, str(EXERCISES_DIR / "train.py"), "--file", str(tmp_path / "mine.py"),
                           *flags, "--output-dir", str(tmp_path / "mine")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert theirs.returncode == 0 and mine.returncode == 0, theirs.stderr + mine.stderr
    assert set(calls.read_text().split()) == set(names)
    untimed = [[{k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))}
                for m in grpo.read_jsonl(tmp_path / run / "metrics.jsonl")] for run in ("grpo", "mine")]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 2
    stubs = subprocess.run([sys.executable, str(EXERCISES_DIR / "train.py"), *flags], env=env, capture_output=True,
                           text=True, timeout=120)
    assert stubs.returncode == 2 and f"{', '.join(names)} not written yet" in stubs.stderr, stubs.stderr


def test_each_question_of_the_exercises_has_an_answer_that_names_the_tests_that_check_it():
    section = (EXERCISES_DIR / "README.md").read_text().split("## Questions without code")[1]
    questions = re.findall(r"^(\d)\. ", section, re.M)
    answers = re.split(r"^## (?=\d\. )", (EXERCISES_DIR / "answers.md").read_text(), flags=re.M)[1:]
    assert 3 <= len(answers) == len(questions) <= 5 and [a[0] for a in answers] == questions
    defined = set(re.findall(r"^def (test_\w+)", Path(__file__).read_text(), re.M))
    facts = {"1": "-Â_i / (|o_i| B)", "2": dict(((k, o), w) for k, o, w in KL_GRADIENT_TABLE)[("k3", True)],
             "3": "exactly 0", "4": "ρ = 1 exactly", "5": "an action the policy took"}  # what the tests assert
    for answer in answers:
        short = re.search(r"\*\*Short answer:\*\* (.+)", answer).group(1)
        assert facts[answer[0]] in short, (answer[0], short)
        named = re.findall(r"`(test_\w+)`", answer.split("Checked by")[1])
        assert named and set(named) <= defined, (answer[0], named)
