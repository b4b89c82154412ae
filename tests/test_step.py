"""
grpo_step wires each piece to the right data; the paper's other half in a step (process
supervision, Online RFT, mini-batches); mu, beta 0, micro-batches.
"""

import os
import re
from dataclasses import replace
from pathlib import Path

# Before huggingface_hub reads it (at import): the tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
import pytest  # noqa: E402
import torch  # noqa: E402

import grpo  # noqa: E402
import rewards  # noqa: E402
from grpo import (  # noqa: E402
    group_advantages,
    per_token_logps,
)
from machinery import loading, logs  # noqa: E402
from machinery.flags import ConfigError  # noqa: E402
from tests.conftest import (  # noqa: E402
    arithmetic_rows,
    byte_level_tokenizer,
    check_flags,
    one_step,
    tiny_config,
)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_a_micro_batch_size_that_does_not_divide_the_batch_gives_the_same_step(
    tiny_model_dir, tmp_path, loss_type
):
    """P x G = 8 completions in micro-batches of 3 (3 + 3 + 2) or all at once: the loss divides by
    whole-batch totals, so the first step's loss and gradient norm are the same."""
    runs = []
    for micro_batch_size in (8, 3):
        cfg = tiny_config(
            tiny_model_dir,
            tmp_path,
            output_dir=str(tmp_path / str(micro_batch_size)),
            micro_batch_size=micro_batch_size,
            loss_type=loss_type,
            max_steps=1,
            mu=2,
            learning_rate=1e-2,
            eval_size=0,
            save_every=0,
        )
        grpo.train(cfg)
        runs.append(logs.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")[0])
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
    cfg = tiny_config(
        tiny_model_dir, tmp_path, mu=3, max_steps=1, learning_rate=1e-2, eval_size=0, save_every=0
    )
    grpo.train(cfg)
    logged = logs.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")[0]["loss"]
    assert len(losses) == 3 * 2  # P x G = 8 completions in micro-batches of 4, three passes
    passes = [
        losses[0] + losses[1],
        losses[2] + losses[3],
        losses[4] + losses[5],
    ]  # each pass's loss
    assert passes[0] != pytest.approx(
        passes[2]
    )  # the passes see a moved policy: a mean is not the last one
    assert logged == pytest.approx(sum(passes) / 3, rel=1e-6)


def test_beta_zero_loads_no_reference_model(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, beta=0.0)
    policy, reference = loading.load_policy_and_reference(cfg, torch.device("cpu"))
    assert reference is None
    policy, reference = loading.load_policy_and_reference(
        replace(cfg, beta=0.04), torch.device("cpu")
    )
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())


def test_mu_greater_than_one_uses_old_logps_and_clips(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, mu=3, learning_rate=1e-2, max_steps=2, eval_size=0)
    grpo.train(cfg)
    metrics = logs.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")
    # passes 2 and 3 see a moved policy: the ratio leaves 1 (with mu = 1 it is exactly 1)
    assert any(m["ratio_mean"] != 1.0 for m in metrics)


def test_grpo_step_pairs_each_completion_with_its_questions_answer_and_groups_by_g(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Bugs: answers repeated in the wrong order (answers * G), or groups of P instead of G. P = 3, G = 2: the
    three answers differ, and P != G. The rewards are fixed so that grouping by 3 gives other advantages."""
    rows = arithmetic_rows(3)
    assert len({r["answer"] for r in rows}) == 3
    seen = []
    fixed = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])  # groups of 2: (1, 0), (0, 0), (1, 1)
    monkeypatch.setattr(
        grpo,
        "score_completions",
        lambda texts, answers, weights: (
            seen.append(answers) or (fixed, {"format": fixed, "answer": fixed})
        ),
    )
    cfg = tiny_config(
        tiny_model_dir, tmp_path, prompts_per_step=3, num_generations=2, micro_batch_size=6
    )
    _, (_, _, _, advantages), _ = one_step(cfg, rows, monkeypatch)
    assert seen == [
        [r["answer"] for r in rows for _ in range(2)]
    ]  # completion i answers question i // G
    torch.testing.assert_close(advantages, group_advantages(fixed, 2))
    assert not torch.allclose(advantages, group_advantages(fixed, 3))  # grouping by P would differ


def test_mu_passes_score_against_the_sampler_and_clip(tiny_model_dir, tmp_path, monkeypatch):
    """Bugs: old log-probs from the reference, or taken after the first update, or not reused. At step 2 (the
    reference is now behind the policy) the first of mu = 3 passes must see ratio 1 exactly, the others the
    same old log-probs and a moved policy, with some tokens outside the clip range."""
    cfg = tiny_config(
        tiny_model_dir, tmp_path, mu=3, learning_rate=3e-2, beta=0.04, micro_batch_size=8
    )
    calls, (metrics, *_), _ = one_step(cfg, arithmetic_rows(2), monkeypatch, steps=2)
    first, second, third = calls[3:]  # step 2's passes (one micro-batch each)
    assert torch.equal(
        first["logp"], first["old_logp"]
    )  # the sampler's log-probs: ratio 1 before any update
    assert not torch.allclose(
        first["old_logp"], first["ref_logp"], atol=1e-3
    )  # ... not the reference's
    assert torch.equal(second["old_logp"], first["old_logp"]) and torch.equal(
        third["old_logp"], first["old_logp"]
    )
    assert not torch.allclose(second["logp"], second["old_logp"], atol=1e-3)  # the policy moved
    assert metrics["clip/low_frac"] + metrics["clip/high_frac"] > 0


def test_lora_reference_is_the_base_model_in_grpo_step(tiny_model_dir, tmp_path, monkeypatch):
    """Bug: grpo_step forgets disable_adapter, so the reference is the policy and the KL is 0 forever."""
    lora = dict(lora_r=4, lora_alpha=8, lora_target_modules="q_proj,v_proj,down_proj")
    cfg = tiny_config(
        tiny_model_dir, tmp_path, learning_rate=5e-2, beta=0.04, micro_batch_size=8, **lora
    )
    calls, (metrics, rollout, *_), _ = one_step(cfg, arithmetic_rows(2), monkeypatch, steps=2)
    last = calls[-1]
    base = loading.load_model(str(tiny_model_dir), torch.device("cpu")).eval()
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    with torch.no_grad():
        base_logp = per_token_logps(
            base, input_ids, attention_mask, rollout.completion_ids.shape[1]
        )
    torch.testing.assert_close(
        last["ref_logp"], base_logp, atol=1e-5, rtol=0
    )  # float32, the same model
    assert not torch.allclose(last["logp"], last["ref_logp"], atol=1e-3) and metrics["kl"] > 0


@pytest.mark.parametrize(
    "loss_type, kl_estimator, epsilon_low, epsilon_high, beta, temperature",
    [("dr_grpo", "k3", 0.1, 0.3, 0.02, 0.7), ("dapo", "k2", 0.25, 0.15, 0.1, 1.3)],
)
def test_grpo_step_passes_every_setting_to_the_loss(
    tiny_model_dir,
    tmp_path,
    monkeypatch,
    loss_type,
    kl_estimator,
    epsilon_low,
    epsilon_high,
    beta,
    temperature,
):
    """Bugs: a setting left at its default on the way to the loss (loss type, KL estimator, ε, β), Dr. GRPO
    keeping the std, the log-probs taken at another temperature than the sampler's, another clipping norm."""
    temperatures, norms = [], []
    logps = grpo.per_token_logps
    monkeypatch.setattr(
        grpo, "per_token_logps", lambda *a, **k: temperatures.append(a[4]) or logps(*a, **k)
    )
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils,
        "clip_grad_norm_",
        lambda params, norm: norms.append(norm) or clip(params, norm),
    )
    sampled = []
    generate = grpo.generate_completions
    monkeypatch.setattr(
        grpo, "generate_completions", lambda *a: sampled.append(a[5]) or generate(*a)
    )
    cfg = tiny_config(
        tiny_model_dir,
        tmp_path,
        loss_type=loss_type,
        kl_estimator=kl_estimator,
        mu=2,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        beta=beta,
        temperature=temperature,
        max_grad_norm=0.3,
    )
    calls, (_, _, step_rewards, advantages), _ = one_step(cfg, arithmetic_rows(2), monkeypatch)
    expected = dict(
        beta=beta,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        loss_type=loss_type,
        max_completion_length=cfg.max_completion_length,
        kl_estimator=kl_estimator,
    )
    assert all(c["settings"].items() >= expected.items() for c in calls)
    assert sampled == [temperature] and set(temperatures) == {temperature} and norms == [0.3, 0.3]
    std = "group" if loss_type != "dr_grpo" else "none"
    torch.testing.assert_close(advantages, group_advantages(step_rewards, cfg.num_generations, std))


def test_process_supervision_in_a_step_gives_each_token_its_advantage(
    tiny_model_dir, tmp_path, monkeypatch
):
    """grpo_step with --supervision process: the advantages are [B, T], the outcome's Â (each
    reply's total reward normalized in its group) on each token plus the steps' part, the steps
    that rewards.py credits in the sampled replies, normalized over the group's steps."""
    text = "<reasoning>\n1 + 1 = 2\n2 + 2 = 5\n</reasoning><answer>2</answer>"
    replies = iter(
        [text, "x", text, "<answer>2</answer>"] * 2
    )  # the tiny model writes noise: choose its texts
    generate = grpo.generate_completions

    def fixed_texts(*args):
        rollout = generate(*args)
        rollout.texts = [next(replies) for _ in rollout.texts]
        return rollout

    monkeypatch.setattr(grpo, "generate_completions", fixed_texts)
    cfg = tiny_config(tiny_model_dir, tmp_path, supervision="process", max_completion_length=64)
    first, second = arithmetic_rows(2)  # 1 + 1 = 2 reaches a value of the first's solution only
    rows = [dict(first, values=["2", first["answer"]]), second]
    calls, (_, rollout, total, advantages), _ = one_step(cfg, rows, monkeypatch)
    B, T = rollout.completion_ids.shape
    assert advantages.shape == (B, T) and torch.equal(
        torch.cat([c["advantages"] for c in calls]), advantages
    )
    tokenizer = loading.load_tokenizer(cfg.model)
    lengths = rollout.completion_mask.sum(dim=1).tolist()
    steps = [
        rewards.step_token_ends(
            tokenizer, ids[:n], text, cut, rows[i // cfg.num_generations]["values"]
        )
        for i, (ids, n, text, cut) in enumerate(
            zip(rollout.completion_ids.tolist(), lengths, rollout.texts, rollout.truncated.tolist())
        )
    ]
    # 2 + 2 = 5 is false; 1 + 1 = 2 holds, but the second question's solution never reaches 2
    rewarded = [[r for _, r in s] for s in steps]
    assert rewarded == [[1.0, 0.0], [], [1.0, 0.0], [], [0.0, 0.0], [], [0.0, 0.0], []]
    outcome = group_advantages(total, cfg.num_generations)[:, None]  # [B, 1]
    expected = outcome + grpo.process_advantages(steps, cfg.num_generations, T)
    torch.testing.assert_close(advantages, expected)
    assert not advantages.eq(0).all()


def process_batch(texts: list[str], answer: str, truncated=None, values=None, **settings):
    """compute_advantages on `texts`, one group, tokenized by a byte-level BPE: (Â [G, T], steps);
    `values`: those the question's worked solution reaches (None: every step that holds counts)."""
    tokenizer = byte_level_tokenizer(" ".join(texts))
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    T = max(map(len, ids))
    completion_ids = torch.tensor([i + [0] * (T - len(i)) for i in ids])  # [G, T]
    mask = torch.tensor([[1] * len(i) + [0] * (T - len(i)) for i in ids])  # [G, T]
    cut = torch.tensor(truncated or [False] * len(texts))
    empty = torch.zeros(len(texts), 1, dtype=torch.long)
    rollout = grpo.Rollout(empty, empty, completion_ids, mask, cut, texts)
    cfg = grpo.Config(num_generations=len(texts), supervision="process", **settings)
    row = {"answer": answer, "values": values}
    _, _, advantages = grpo.compute_advantages(rollout, [row], cfg, tokenizer)
    return advantages, mask


def reply(steps: list[str], answer: str) -> str:
    return "<reasoning>\n" + "\n".join(steps) + f"\n</reasoning>\n<answer>\n{answer}\n</answer>"


def test_in_a_group_of_right_answers_more_true_steps_never_get_less_credit():
    """The review's case: four right replies with 0, 1, 2 and 3 true steps. Pooling the outcome
    with the steps gave first tokens +1.16, +0.39, -0.39, -1.16: the more correct reasoning, the
    less credit. Now never less (here all 0: every step holds, so no step beats another); and with
    a wrong step in the group, a true one earns more than none."""
    true = ["1 + 2 = 3", "3 + 4 = 7", "7 + 5 = 12"]
    advantages, _ = process_batch([reply(true[:k], "12") for k in range(4)], "12")
    first = advantages[:, 0].tolist()
    assert first == sorted(first), first
    mixed = [reply([], "12"), reply(true[:1], "12"), reply(["1 + 2 = 4"], "12"), reply(true, "12")]
    advantages, _ = process_batch(mixed, "12")
    first = advantages[:, 0].tolist()
    assert first[2] < first[0] < first[1] <= first[3], first


@pytest.mark.parametrize("farm", ["1 = 1", "2 + 2 = 4"])
def test_farming_trivial_or_repeated_equations_never_beats_a_clean_right_reply(farm):
    """A wrong answer after 40 lines of `1 = 1` (no operation: no step) or of one true equation
    repeated (credited once): at no token above the clean right reply, whose steps hold."""
    clean = reply(["14 + 7 = 21", "21 - 5 = 16"], "16")
    farmer = reply([farm] * 40, "3")
    sloppy = reply(["14 + 7 = 22", "22 - 5 = 17"], "17")
    advantages, mask = process_batch([clean, farmer, sloppy, sloppy], "16")
    best_of_farmer = advantages[1][mask[1].bool()].max()
    worst_of_clean = advantages[0][mask[0].bool()].min()
    assert best_of_farmer < worst_of_clean, (best_of_farmer, worst_of_clean)


def test_true_lines_that_the_solution_never_reaches_earn_what_false_ones_do():
    """What an 80-step run learned (bench/README.md, Figure 5 in miniature): every answer wrong,
    every line true and of no use, as "6 - 6 = 0" for 11 + 9 - 6. Counting each line that holds,
    such a reply got as much credit as one that computes the answer and then miswrites it; counting
    only the lines that reach a value of the worked solution (the task's rows carry them), as much
    as false lines."""
    problems = rewards.arithmetic_problems(12, 0, terms=3)
    row = next(r for r in problems if r["question"] == "What is 11 + 9 - 6?")
    useless = reply(["6 - 6 = 0", "3 + 3 = 6"], "0")
    miswritten = reply(["11 + 9 = 20", "20 - 6 = 14"], "15")
    false = reply(["11 + 9 = 19", "19 - 6 = 13"], "13")
    right = reply(["9 - 6 = 3", "11 + 3 = 14"], "14")  # the other order: b - c first
    texts = [useless, miswritten, false, right]
    first = process_batch(texts, "14", values=row["values"])[0][:, 0].tolist()
    assert first[0] == pytest.approx(first[2]) and first[0] < first[1] < first[3], first
    holds_only = process_batch(texts, "14")[0][:, 0].tolist()
    assert holds_only[0] == pytest.approx(holds_only[1]), "without values, the hack is open"


def test_with_equal_outcomes_and_equal_steps_every_advantage_is_zero():
    texts = [reply(["1 + 2 = 3", "3 + 4 = 7"], "7")] * 2 + [reply(["2 + 2 = 4"], "7")] * 2
    advantages, _ = process_batch(texts, "7")
    assert advantages.eq(0).all(), "equal outcomes and steps that all hold teach nothing"


def test_process_advantages_keep_the_scale_of_outcome_supervision():
    """Each part is normalized to unit std within its group, and the steps' part is one step's
    r̃ at most (the min form): the token-mean |Â| stays within 2x outcome supervision's."""
    texts = [
        reply(["14 + 7 = 21", "21 - 5 = 16"], "16"),
        reply(["14 + 7 = 22", "22 - 5 = 17"], "17"),
        reply(["14 + 7 = 21", "21 - 5 = 15"], "15"),
        reply(["14 + 7 = 21"], "16"),
    ]
    process, mask = process_batch(texts, "16")
    total, _ = grpo.score_completions(
        texts, ["16"] * 4, {"format": 0.5, "answer": 1.0, "step": 0.0}
    )
    outcome = group_advantages(total, 4)[:, None].expand_as(process)
    on = mask.bool()
    ratio = process[on].abs().mean() / outcome[on].abs().mean()
    assert 0.5 <= ratio <= 2, ratio


def test_dr_grpo_drops_the_std_of_the_outcome_and_of_the_steps():
    texts = [reply(["1 + 2 = 3"], "3"), reply(["1 + 2 = 4"], "4")]
    advantages, mask = process_batch(texts, "3", loss_type="dr_grpo")
    # outcome: totals 1.5 and 0.5, minus their mean; steps: 1 and 0, minus theirs (0.5)
    torch.testing.assert_close(advantages[0, 0], torch.tensor(0.5 + 0.5))
    torch.testing.assert_close(advantages[1, 0], torch.tensor(-0.5 - 0.5))


def test_a_truncated_replys_cut_last_line_is_no_step():
    """`14 + 7 = 2` where the cut fell (the model was writing 21): not a wrong step."""
    cut = "<reasoning>\n1 + 2 = 3\n14 + 7 = 2"
    whole = "<reasoning>\n1 + 2 = 3\n14 + 7 = 21\n"
    advantages, _ = process_batch([cut, whole], "99", truncated=[True, True])  # both wrong
    assert advantages.eq(0).all(), (
        "both replies hold their only credited steps: nothing to tell apart"
    )


def test_online_rft_coefficient_is_one_for_a_right_answer_and_zero_otherwise(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The paper's eq. 10 (Table 10): GC = 1 if the answer is right, else 0, whatever the format or the group."""
    replies = iter(
        ["<reasoning>a</reasoning><answer>{}</answer>", "{}", "no", "<answer>-1</answer>"] * 2
    )
    rows = arithmetic_rows(2)
    generate = grpo.generate_completions

    def fixed_texts(*args):
        rollout = generate(*args)
        rollout.texts = [
            next(replies).format(rows[i // 4]["answer"]) for i in range(len(rollout.texts))
        ]
        return rollout

    monkeypatch.setattr(grpo, "generate_completions", fixed_texts)
    cfg = tiny_config(tiny_model_dir, tmp_path, advantage="online_rft")
    calls, (_, _, total, advantages), _ = one_step(cfg, rows, monkeypatch)
    assert (
        advantages.tolist() == [1.0, 1.0, 0.0, 0.0] * 2
    )  # the format reward (in the total) changes nothing
    assert total.tolist() != advantages.tolist()


def test_mini_batches_take_an_optimizer_step_each_on_their_part_of_the_batch(
    tiny_model_dir, tmp_path, monkeypatch
):
    """verl's mini-batches: B = 8 in 2 parts of 4, one optimizer step each, each loss over its own part (4
    sequences, its tokens)."""
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1))
    cfg = tiny_config(tiny_model_dir, tmp_path, mini_batches=2, micro_batch_size=2)
    calls, (_, rollout, _, _), _ = one_step(cfg, arithmetic_rows(2), monkeypatch)
    assert len(steps) == 2 and len(calls) == 4  # 2 mini-batches x 2 micro-batches
    mask = rollout.completion_mask
    assert [c["settings"]["num_sequences"] for c in calls] == [4] * 4
    assert [c["settings"]["num_tokens"] for c in calls] == [int(mask[:4].sum())] * 2 + [
        int(mask[4:].sum())
    ] * 2


def test_mini_batches_move_the_ratio_once_the_policy_has_stepped(
    tiny_model_dir, tmp_path, monkeypatch
):
    cfg = tiny_config(
        tiny_model_dir, tmp_path, mini_batches=2, micro_batch_size=4, learning_rate=1e-2
    )
    calls, _, _ = one_step(cfg, arithmetic_rows(2), monkeypatch)
    first, second = ((c["logp"] - c["old_logp"]).abs().max().item() for c in calls)
    assert (
        first < 1e-5 < second
    )  # before any step the policy is the sampler (rounding only); after one it is not


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(mini_batches=3),
            "--mini-batches 3 must divide --prompts-per-step 2: each mini-batch",
        ),
        (dict(mini_batches=4), "holds whole groups"),  # 4 divides P*G = 8, not P = 2: a group split
        (dict(mini_batches=0), "--mini-batches is 0; it must be > 0."),
        (
            dict(supervision="process", advantage="online_rft"),
            "--supervision process normalizes the steps' rewards",
        ),
        (dict(supervision="process", advantage="grpo_batch_std"), "use it with --advantage grpo."),
        (
            dict(advantage="rft"),
            "--advantage 'rft' is unknown; choose one of grpo, grpo_batch_std, online_rft.",
        ),
        # GSPO: one ratio per reply, for a mean over replies; never per-token advantages
        *[
            (
                dict(importance_sampling_level="sequence", loss_type=loss_type),
                f"--importance-sampling-level sequence (GSPO) with --loss-type {loss_type}:",
            )
            for loss_type in ("dapo", "dr_grpo", "cispo")
        ],
        (
            dict(importance_sampling_level="sequence", supervision="process"),
            "per-token advantages (--supervision process, --kl-estimator k1_to_go) would be averaged",
        ),
        (
            dict(importance_sampling_level="sequence", kl_estimator="k1_to_go"),
            "Use token-level ratios with them.",
        ),
        (
            dict(importance_sampling_level="seq"),
            "--importance-sampling-level 'seq' is unknown; choose one of token, sequence.",
        ),
    ],
)
def test_the_new_settings_refuse_what_cannot_work(tiny_model_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_flags(tiny_config(tiny_model_dir, tmp_path, **overrides))


def test_overlong_filtering_leaves_truncated_replies_out_of_the_loss_only(
    ends_early_model_dir, tmp_path, monkeypatch
):
    """--mask-truncated-completions (DAPO): a reply cut at max_completion_length has loss mask 0 on every token;
    the others keep theirs; the advantages are still those of the whole group (TRL's too), and the truncated
    fraction is still logged. Without the flag, the loss mask is the completion mask."""
    for flag in (True, False):
        cfg = tiny_config(
            ends_early_model_dir,
            tmp_path / str(flag),
            mask_truncated_completions=flag,
            max_completion_length=6,
        )
        calls, (metrics, rollout, rewards_, advantages), _ = one_step(
            cfg, arithmetic_rows(2), monkeypatch
        )
        truncated = rollout.truncated
        assert truncated.any() and not truncated.all(), "the test needs both kinds of reply"
        expected = (
            rollout.completion_mask * ~truncated[:, None] if flag else rollout.completion_mask
        )
        assert torch.equal(torch.cat([c["mask"] for c in calls]), expected), (
            "overlong filtering: a truncated reply's tokens leave the loss, no other's"
        )
        std = "group"
        torch.testing.assert_close(advantages, group_advantages(rewards_, cfg.num_generations, std))
        assert metrics["completion/truncated_frac"] == truncated.float().mean().item()


def test_the_step_logs_the_policys_mean_entropy_over_the_replies_tokens(
    tiny_model_dir, tmp_path, monkeypatch
):
    """metrics["entropy"]: the token mean, over the completions' tokens, of the entropy of the policy that
    sampled them (mu = 1: the policy before its update) at the sampling temperature."""
    cfg = tiny_config(tiny_model_dir, tmp_path, temperature=0.7)
    _, (metrics, rollout, *_), _ = one_step(cfg, arithmetic_rows(2), monkeypatch)
    sampler = loading.load_model(str(tiny_model_dir), torch.device("cpu")).eval()
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    T = rollout.completion_ids.shape[1]
    with torch.no_grad():
        _, entropy = per_token_logps(sampler, input_ids, attention_mask, T, 0.7, entropy=True)
    mask = rollout.completion_mask
    expected = ((entropy * mask).sum() / mask.sum()).item()
    # float32 token means summed per micro-batch, then weighted: seen within 1e-7
    assert metrics["entropy"] == pytest.approx(expected, abs=1e-5), (
        "the entropy logged is the sampler's, at its temperature, over the replies' own tokens"
    )


def test_gspo_and_cispo_reach_the_loss_from_their_flags(tiny_model_dir, tmp_path, monkeypatch):
    for overrides in (dict(importance_sampling_level="sequence"), dict(loss_type="cispo")):
        cfg = tiny_config(tiny_model_dir, tmp_path / str(len(overrides)), mu=2, **overrides)
        check_flags(cfg)
        calls, _, _ = one_step(cfg, arithmetic_rows(2), monkeypatch)
        assert calls and all(c["settings"].items() >= overrides.items() for c in calls)
