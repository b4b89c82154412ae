"""
scale/: the same run on TRL (scale/trl_grpo.py) and verl (scale/verl/).
"""

import contextlib
import json
import os
from dataclasses import fields

# Before huggingface_hub reads it (at import): the tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
import pytest  # noqa: E402
import torch  # noqa: E402

import grpo  # noqa: E402
import rewards  # noqa: E402
from grpo import (  # noqa: E402
    Config,
    grpo_loss,
    per_token_logps,
)
from machinery import devices, flags, loading, logs  # noqa: E402
from tests.conftest import load_scale_module, need, parse_flags  # noqa: E402

# (our flags, GRPOConfig field, its value): every flag that TRL has a field for
TRL_FIELDS = [
    ("--num-generations 4", "num_generations", 4),
    ("--micro-batch-size 4", "per_device_train_batch_size", 4),
    (
        "--prompts-per-step 4 --num-generations 8 --micro-batch-size 4",
        "gradient_accumulation_steps",
        8,
    ),
    ("--max-completion-length 64", "max_completion_length", 64),
    ("--temperature 0.7", "temperature", 0.7),
    ("--beta 0.1", "beta", 0.1),
    ("--epsilon-low 0.1", "epsilon", 0.1),
    ("--epsilon-high 0.28", "epsilon_high", 0.28),
    ("--loss-type grpo", "loss_type", "grpo"),
    ("--loss-type dapo", "loss_type", "dapo"),
    ("--loss-type bnpo", "loss_type", "dapo"),  # ours is TRL's dapo (whole-batch token mean)
    ("--loss-type dr_grpo", "loss_type", "dr_grpo"),
    ("--loss-type cispo", "loss_type", "cispo"),
    ("--loss-type cispo --epsilon-high 4", "epsilon_high", 5.0),  # TRL's ε_max, our 1 + ε_high
    ("--importance-sampling-level sequence", "importance_sampling_level", "sequence"),
    ("--importance-sampling-level token", "importance_sampling_level", "token"),
    ("--mask-truncated-completions", "mask_truncated_completions", True),
    ("--no-mask-truncated-completions", "mask_truncated_completions", False),
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
    (
        "--trust-remote-code",
        "model_init_kwargs",
        {"dtype": torch.float32, "trust_remote_code": True},
    ),
    ("--trust-remote-code", "trust_remote_code", True),  # the tokenizer TRL loads itself
    ("--no-trust-remote-code", "trust_remote_code", False),
    (
        "--advantage grpo_batch_std",
        "scale_rewards",
        "batch",
    ),  # TRL's group mean, then the batch's std
    ("--advantage grpo", "scale_rewards", "group"),
    # mini-batches: P x G = 64 in 2 updates of 32 = 4 micro-batches of 8; TRL counts micro-batches per generation
    ("--mini-batches 2", "gradient_accumulation_steps", 4),
    ("--mini-batches 2", "steps_per_generation", 8),
    (
        "--mini-batches 2 --mu 2 --max-steps 10",
        "max_steps",
        40,
    ),  # optimizer steps: 2 passes x 2 updates each
    ("--mini-batches 2 --save-every 5", "save_steps", 10),
]


@pytest.mark.parametrize("flags, field, value", TRL_FIELDS)
def test_trl_runner_maps_each_flag_to_its_grpo_config_field(tmp_path, flags, field, value):
    need("trl")
    trl_grpo = load_scale_module("scale/trl_grpo.py")
    cfg = parse_flags([*flags.split(), "--output-dir", str(tmp_path / "run")])
    config = trl_grpo.trl_config(cfg)
    assert getattr(config, field) == value
    assert config.output_dir == str(tmp_path / "run")


def test_trl_runner_maps_lora_and_splits_the_batch_over_processes(tmp_path):
    need("trl")
    trl_grpo = load_scale_module("scale/trl_grpo.py")
    cfg = parse_flags(
        ["--lora-r", "8", "--lora-alpha", "16", "--lora-target-modules", "q_proj,v_proj"]
    )
    lora = trl_grpo.peft_config(cfg)
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (8, 16, {"q_proj", "v_proj"})
    assert trl_grpo.peft_config(parse_flags([])) is None
    cfg = parse_flags(
        ["--prompts-per-step", "8", "--num-generations", "8", "--micro-batch-size", "4"]
    )
    assert (
        trl_grpo.trl_config(cfg, num_processes=4).gradient_accumulation_steps == 4
    )  # 4 x 4 x 4 = 64 = P x G


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--kl-estimator k2", "--kl-estimator 'k2': TRL estimates the KL with k3 only"),
        (
            "--weight-decay 0.1",
            "--weight-decay 0.1: TRL's Trainer does not decay biases and norm weights",
        ),
        ("--use-vllm", "--use-vllm: vllm is not installed. pip install vllm"),
        ("--logp-chunk-size 256", "--logp-chunk-size 256: TRL computes log-probs its own way"),
        ("--compile", "--compile True: TRL samples with its own generate()"),
        (
            "--prompts-per-step 2 --num-generations 4 --micro-batch-size 3",
            "--micro-batch-size 3: TRL splits",
        ),
        (
            "--advantage online_rft",
            "--advantage 'online_rft': TRL's advantage is always the group's reward minus",
        ),
        (
            "--supervision process",
            "--supervision 'process': TRL's GRPOTrainer has no process supervision",
        ),
        ("--kl-estimator k1_to_go", "--kl-estimator 'k1_to_go': TRL estimates the KL with k3 only"),
        ("--kl-estimator k1_is", "--kl-estimator 'k1_is': TRL estimates the KL with k3 only"),
    ],
)
def test_trl_runner_refuses_what_trl_cannot_do_before_loading_a_model(
    tmp_path, monkeypatch, capsys, flags, message
):
    need("trl")
    trl_grpo = load_scale_module("scale/trl_grpo.py")
    monkeypatch.setattr(loading, "load_tokenizer", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as stop:
        trl_grpo.main(
            [*flags.split(), "--dataset", "arithmetic", "--output-dir", str(tmp_path / "run")]
        )
    assert (
        stop.value.code == 2 and message in capsys.readouterr().err
    )  # as grpo.py's (and argparse's) errors


def test_trl_runner_takes_no_compile_which_asks_nothing_of_trl(tmp_path):
    trl_grpo = load_scale_module("scale/trl_grpo.py")
    assert (
        trl_grpo.refusals(parse_flags(["--no-compile", "--output-dir", str(tmp_path / "run")]))
        == []
    )


def test_trl_runner_maps_use_vllm_to_colocated_vllm(tmp_path):
    need("trl")
    trl_grpo = load_scale_module("scale/trl_grpo.py")
    cfg = parse_flags(["--output-dir", str(tmp_path / "run")])
    config = trl_grpo.trl_config(cfg, use_vllm=True)
    assert (config.use_vllm, config.vllm_mode) == (True, "colocate")
    assert trl_grpo.trl_config(cfg).use_vllm is False


def test_trl_runner_scores_with_our_rewards_on_the_answer_column():
    trl_grpo = load_scale_module("scale/trl_grpo.py")
    texts = [
        "<reasoning>2 + 2</reasoning>\n<answer>4</answer>",
        "<answer>5</answer>",
        "it is 4",
        "7",
    ]
    answers = ["4", "4", "4", "7"]
    completions = [[{"role": "assistant", "content": t}] for t in texts]  # TRL passes chat messages
    functions = trl_grpo.trl_reward_functions()
    assert [f.__name__ for f in functions] == list(
        rewards.REWARD_FUNCTIONS
    )  # TRL logs them by name
    for function, ours in zip(functions, rewards.REWARD_FUNCTIONS.values()):
        scores = function(completions, answer=answers, prompt=["?"] * 4, question=["?"] * 4)
        assert scores == ours(texts, answers)
    assert functions[1](completions, answer=answers) == [
        1.0,
        0.0,
        1.0,
        1.0,
    ]  # not all alike: the column matters


def test_trl_runner_trains_a_step_on_the_tiny_model_with_our_rewards(
    tiny_model_dir, tmp_path, monkeypatch
):
    need("trl")
    trl_grpo = load_scale_module("scale/trl_grpo.py")

    class GrpoPrecision(contextlib.nullcontext):  # what devices.autocast_for returns, recognisable
        pass

    monkeypatch.setattr(devices, "autocast_for", lambda device, precision: GrpoPrecision())
    evaluated_under = []
    evaluate = grpo.evaluate
    monkeypatch.setattr(
        grpo, "evaluate", lambda *args: evaluated_under.append(args[-1]) or evaluate(*args)
    )
    drawn = []
    monkeypatch.setattr(trl_grpo, "plot_curves", lambda *args: drawn.append(args))
    results = trl_grpo.main(
        [
            "--model",
            str(tiny_model_dir),
            "--dataset",
            "arithmetic",
            "--max-steps",
            "2",
            "--prompts-per-step",
            "2",
            "--num-generations",
            "4",
            "--micro-batch-size",
            "4",
            "--max-completion-length",
            "8",
            "--eval-size",
            "4",
            "--eval-batch-size",
            "4",
            "--save-every",
            "0",
            "--device",
            "cpu",
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    steps = [log for log in results["log_history"] if "rewards/format/mean" in log]
    assert len(steps) == 2 and all("rewards/answer/mean" in log and "kl" in log for log in steps)
    assert set(results["before"]) == set(results["after"]) == {"accuracy", "format_rate", "n"}
    assert len(evaluated_under) == 2 and all(
        isinstance(a, GrpoPrecision) for a in evaluated_under
    )  # as grpo.py
    assert list(
        (tmp_path / "run").glob("checkpoint-*")
    )  # --save-every 0: one checkpoint at the end, to resume
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["engine"] == "trl"
    # grpo.py's logs too: metrics.jsonl with grpo.py's keys (the figures TRL logged), samples.jsonl, curves.png
    metrics = logs.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for ours, theirs in trl_grpo.TRL_METRICS.items():
        assert [m[ours] for m in metrics] == [log[theirs] for log in steps], ours
    assert all(0 <= m["format_rate"] <= 1 for m in metrics)
    samples = logs.read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert [s["step"] for s in samples] == [2, 2] and samples[0]["question"].startswith("What is ")
    assert drawn == [
        (tmp_path / "run" / "metrics.jsonl", tmp_path / "run" / "curves.png")
    ]  # at the end, as grpo.py
    assert not (
        tmp_path / "run" / "completions"
    ).exists()  # no parquet files; no table on the console


def test_trl_runner_help_is_grpo_pys_flags_and_its_own(capsys):
    trl_grpo = load_scale_module("scale/trl_grpo.py")
    with pytest.raises(SystemExit) as stop:
        trl_grpo.main(["--help"])
    text = capsys.readouterr().out
    assert stop.value.code == 0 and text.startswith("usage: trl_grpo.py") and "--use-vllm" in text
    assert all(flags.flag(f.name) in text for f in fields(Config))


def test_verl_reward_is_the_weighted_sum_that_grpo_trains_on():
    reward = load_scale_module("scale/verl/reward.py")
    completions = [
        "<reasoning>2+2</reasoning><answer>4</answer>",
        "<answer>5</answer>",
        "it is 4",
        "",
        "<reasoning>x</reasoning>\n<answer>4</answer> more",
    ]
    completions.append(
        "<reasoning>\n1 + 2 = 3\n</reasoning><answer>4</answer>"
    )  # one step that holds
    weights = {"format": 0.5, "answer": 1.0, "step": 0.0}
    total, _ = grpo.score_completions(completions, ["4"] * len(completions), weights)
    assert [reward.compute_score("openai/gsm8k", c, "4") for c in completions] == total.tolist()
    assert (
        reward.compute_score("x", completions[0], "4", None, format_weight=0.0, answer_weight=3.0)
        == 3.0
    )
    assert (
        reward.compute_score("x", completions[-1], "4", None, format_weight=0, step_weight=2.0)
        == 1.4
    )
    assert (reward.FORMAT_WEIGHT, reward.ANSWER_WEIGHT, reward.STEP_WEIGHT) == (
        Config.format_weight,
        Config.answer_weight,
        Config.step_weight,
    )


def test_verl_parquet_rows_have_verls_schema_and_our_prompt(tmp_path):
    from datasets import Dataset

    prepare = load_scale_module("scale/verl/prepare_data.py")
    paths = prepare.write_parquet("arithmetic", tmp_path / "verl", arithmetic_max=20)
    for split, path in paths.items():
        rows = Dataset.from_parquet(str(path)).to_list()
        ours = rewards.load_dataset_rows("arithmetic", split, arithmetic_max=20)
        assert len(rows) == len(ours)
        assert set(rows[0]) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
        assert rows[0]["prompt"] == rewards.make_prompt(
            ours[0]["question"]
        )  # system prompt, worked example, question
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

    args = trl.GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=5,
        temperature=0.7,
        beta=0.04,
        epsilon=0.2,
        epsilon_high=0.28,
        disable_dropout=True,
        activation_checkpointing=True,
        model_init_kwargs={"dtype": torch.float32},
    )
    trainer = trl.GRPOTrainer(
        model=str(tiny_model_dir),
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "a b"}] * 4),
    )
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train; one micro-batch here
    return trainer


def agree_with_trl(trainer, tiny_model_dir, loss_type, kl_estimator, mu, **variant):
    """Log-probs, entropies, loss and gradient of one batch, ours against TRL's `_compute_loss` with the same
    settings. variant: epsilons (low, high), importance_sampling_level, mask_truncated_completions."""
    low, high = variant.get("epsilons", (0.2, 0.28))
    level = variant.get("importance_sampling_level", "token")
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(5, 30, (4, 4), generator=generator)
    prompt_mask = torch.tensor(
        [[0, 1, 1, 1]] * 2 + [[1, 1, 1, 1]] * 2
    )  # group 1's prompt is one token shorter
    completion_ids = torch.randint(5, 30, (4, 5), generator=generator)
    completion_mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]
    )  # row 0 reaches max_completion_length: truncated
    input_ids, attention_mask = (
        torch.cat([prompt_ids, completion_ids], 1),
        torch.cat([prompt_mask, completion_mask], 1),
    )
    advantages = torch.tensor([0.7, -0.7, -1.1, 1.1])
    ours = loading.load_model(str(tiny_model_dir), torch.device("cpu")).train()
    with torch.no_grad():
        logp = per_token_logps(ours, input_ids, attention_mask, 5, temperature=0.7)
    ref_logp = (
        logp - 0.3 + 0.6 * torch.rand(logp.shape, generator=generator)
    )  # the reference above and below
    old_logp = (
        logp - 0.5 + torch.rand(logp.shape, generator=generator) if mu > 1 else None
    )  # ratio 0.61-1.65
    kept = completion_mask.bool()  # TRL leaves 0 where the mask is 0
    assert (ref_logp > logp)[kept].any() and (ref_logp < logp)[
        kept
    ].any()  # both signs of the KL's log-ratio
    if (
        mu > 1
    ):  # every branch of the clipped surrogate meets TRL's: cut below (Â < 0), above (Â > 0), inside
        ratio = grpo.importance_ratio(logp, old_logp, completion_mask, level).expand_as(logp)[kept]
        A = advantages[:, None].expand_as(logp)[kept]
        assert ((ratio < 1 - low) & (A < 0)).any() and ((ratio > 1 + high) & (A > 0)).any()
        if level == "token":
            assert ((ratio > 1 - low) & (ratio < 1 + high)).any() and (
                (ratio < 1 - low) & (A > 0)
            ).any()
    loss_mask = completion_mask
    if variant.get("mask_truncated_completions"):  # TRL zeroes a truncated reply's completion_mask
        loss_mask = completion_mask * (completion_mask[:, -1:] == 0)  # (no EOS within 5 tokens)
    their_cap = high + (loss_type == "cispo")  # TRL's cispo caps the ratio at epsilon_high itself

    theirs = trainer.model
    trainer.loss_type, trainer.args.use_bias_correction_kl = loss_type, kl_estimator == "k3_ratio"
    trainer.epsilon_low, trainer.epsilon_high, trainer.importance_sampling_level = (
        low,
        their_cap,
        level,
    )
    theirs.train().zero_grad()
    their_logp, their_entropy = trainer._get_per_token_logps_and_entropies(
        theirs, input_ids, attention_mask, 5, compute_entropy=True
    )[:2]
    torch.testing.assert_close(their_logp.detach()[kept], logp[kept], atol=1e-5, rtol=0)
    with torch.no_grad():
        _, entropy = per_token_logps(ours, input_ids, attention_mask, 5, 0.7, entropy=True)
    # the entropy: TRL's fused output layer against our chunks, float32 sums of V terms (seen within 1e-6)
    torch.testing.assert_close(their_entropy[kept], entropy[kept], atol=1e-5, rtol=0)
    inputs = dict(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=loss_mask,
        advantages=advantages,
        ref_per_token_logps=ref_logp,
        old_per_token_logps=old_logp,
        num_items_in_batch=loss_mask.sum(),
    )
    their_loss = trainer._compute_loss(theirs, inputs)
    their_loss.backward()

    def our_loss_and_gradient(estimator):
        ours.zero_grad()
        logp = per_token_logps(ours, input_ids, attention_mask, 5, temperature=0.7)
        loss, _ = grpo_loss(
            logp,
            old_logp if mu > 1 else logp.detach(),
            ref_logp,
            advantages,
            loss_mask,
            beta=0.04,
            epsilon_low=low,
            epsilon_high=high,
            loss_type=loss_type,
            max_completion_length=5,
            kl_estimator=estimator,
            importance_sampling_level=level,
        )
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in ours.parameters()])

    our_loss, our_gradient = our_loss_and_gradient(kl_estimator)
    their_gradient = torch.cat([p.grad.flatten() for p in theirs.parameters()])
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=1e-6)
    assert (our_gradient - their_gradient).norm() < 1e-5 * their_gradient.norm()
    _, other_gradient = our_loss_and_gradient("k3" if kl_estimator == "k3_ratio" else "k3_ratio")
    assert (
        other_gradient - their_gradient
    ).norm() > 1e-4 * their_gradient.norm()  # 10x the tolerance


@pytest.mark.parametrize("mu", [1, 2])
@pytest.mark.parametrize("kl_estimator", ["k3", "k3_ratio"])
@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_logps_loss_and_gradient_agree_with_trl(
    trl_trainer, tiny_model_dir, loss_type, kl_estimator, mu
):
    """Log-probs, entropies, loss and gradient equal TRL's on one batch, with the reference above and below the
    policy and (mu = 2) ratios cut at both clip edges and inside them. cispo: TRL's ε_max is our 1 + ε_high."""
    agree_with_trl(trl_trainer, tiny_model_dir, loss_type, kl_estimator, mu)


@pytest.mark.parametrize("mu", [1, 2])
@pytest.mark.parametrize(
    "loss_type, variant",
    [
        # GSPO with its paper's epsilons: every sequence ratio at mu = 2 falls outside, on both sides. The KL
        # term is plain k3: TRL's bias correction weighs it by the sequence ratio, ours by each token's own
        ("grpo", dict(importance_sampling_level="sequence", epsilons=(3e-4, 4e-4))),
        *[(t, dict(mask_truncated_completions=True)) for t in grpo.LOSS_TYPES],
    ],
)
def test_gspo_and_overlong_filtering_agree_with_trl(
    trl_trainer, tiny_model_dir, loss_type, variant, mu
):
    """GSPO (TRL's importance_sampling_level="sequence") and overlong filtering (mask_truncated_completions: the
    truncated row 0 masked as TRL masks it) give TRL's loss and gradient; CISPO is in the test above."""
    try:
        agree_with_trl(trl_trainer, tiny_model_dir, loss_type, "k3", mu, **variant)
    finally:  # the shared trainer back to the token level
        trl_trainer.importance_sampling_level = "token"
