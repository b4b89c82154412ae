"""
Runs end to end: the logs, the curves, the diagnostics of the silent failures, a toy task learned.
"""

import logging
import os
import random
import warnings
from dataclasses import replace
from pathlib import Path

# Before huggingface_hub reads it (at import): the tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

import grpo  # noqa: E402
from machinery import logs, metrics  # noqa: E402
from tests.conftest import DRAW_CURVES, SilentBar, fixed_rewards, said_in, tiny_config, write_jsonl  # noqa: E402


def test_every_run_writes_samples_at_its_last_step(tiny_model_dir, tmp_path):
    cfg = tiny_config(
        tiny_model_dir, tmp_path, max_steps=3, eval_size=0, save_every=0, log_samples_every=2
    )
    grpo.train(cfg)
    assert [r["step"] for r in logs.read_jsonl(Path(cfg.output_dir) / "samples.jsonl")] == [
        2,
        2,
        3,
        3,
    ]


def test_plot_curves_draws_a_png_from_the_metrics(tmp_path):
    records = [
        {
            "step": i,
            "reward/total": 0.1 * i,
            "accuracy": 0.05 * i,
            "format_rate": 0.1 * i,
            "kl": 0.01 * i,
            "completion/len_mean": 10 + i,
            "entropy": 1.0 / i,
            "grad_norm": 0.5,
        }
        for i in range(1, 6)
    ]
    write_jsonl(tmp_path / "metrics.jsonl", records)
    DRAW_CURVES(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_jsonl(tmp_path / "two.jsonl", records[:2])
    figure = DRAW_CURVES(tmp_path / "two.jsonl", tmp_path / "two.png")
    for ax in figure.axes:  # two steps: ticks at whole steps only, not at 1.25, 1.5, ...
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 2]
        assert ticks and all(t == int(t) for t in ax.get_xticks()), ax.get_xticks()
    assert [ax.get_title() for ax in figure.axes] == [
        "mean reward",
        "accuracy (answer = 1), format rate (strict)",
        "KL(policy || reference), log scale",
        "mean completion length (tokens)",
        "policy entropy per token (nats, at the sampling temperature)",
        "gradient norm (before clipping)",
    ]
    scales = [ax.get_yscale() for ax in figure.axes]
    assert scales == ["linear", "linear", "symlog", "linear", "linear", "linear"], (
        "one KL spike must not flatten the rest"
    )
    (tmp_path / "empty.jsonl").write_text("")
    DRAW_CURVES(tmp_path / "empty.jsonl", tmp_path / "nothing.png")  # no steps yet: no picture
    assert not (tmp_path / "nothing.png").exists()


def test_a_run_says_nothing_deprecated(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """transformers renamed `past_key_values` to `cache` (the old name goes in 5.40): a run, LoRA and
    gradient checkpointing included, uses no deprecated name. Its notices go through warnings (the
    kwarg) and through its logger's warning_once (the output attribute), both recorded here."""
    said = []
    monkeypatch.setattr(
        logging.Logger, "warning_once", lambda self, message, *a, **k: said.append(message)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = tiny_config(
            tiny_model_dir, tmp_path, max_steps=1, lora_r=4, gradient_checkpointing=True
        )
        grpo.train(cfg)
        grpo.train(replace(cfg, max_steps=2, resume=True))  # the adapter loaded back
    said += [
        str(w.message)
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning))
    ]
    # peft (0.15-0.21) reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model:
    # grpo.py's call, so grpo.py silences it, and nothing deprecated is said at all.
    assert not [message for message in said if "deprecat" in message.lower()], said
    # and LoRA at full fine-tuning's learning rate is said to be so, once per start
    assert (
        capsys.readouterr().out.count(
            "note: --learning-rate 1e-06 is full fine-tuning's, LoRA wants about 10x"
        )
        == 2
    )


# Learning: the signs and the plumbing, end to end


@pytest.mark.slow
def test_a_tiny_model_learns_a_toy_task(tiny_model_dir, tmp_path):
    """Toy verifiable task: whatever the question, the answer is 7. A random 2-layer model
    starts near chance (its last number is rarely exactly 7); GRPO must push it up."""
    rng = random.Random(0)
    data = write_jsonl(
        tmp_path / "sevens.jsonl",
        [
            {"question": f"What is {rng.randint(0, 9)} + {rng.randint(0, 9)}?", "answer": "#### 7"}
            for _ in range(200)
        ],
    )
    cfg = tiny_config(
        tiny_model_dir,
        tmp_path,
        dataset=str(data),
        max_steps=60,
        prompts_per_step=8,
        num_generations=8,
        max_completion_length=8,
        micro_batch_size=32,
        learning_rate=1e-2,
        beta=0.04,
        format_weight=0.0,
        eval_size=0,
        save_every=0,
        log_samples_every=0,
    )
    grpo.train(cfg)
    accuracy = [m["accuracy"] for m in logs.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")]
    # Steps 1-2 sample from (nearly) the untrained model: chance, a few percent. A working loop
    # is above 0.9 over the last 10 steps here; wrong signs or a broken advantage or mask leave
    # it near chance or push it to 0. The margins leave room for other seeds and torch versions.
    chance, last = sum(accuracy[:2]) / 2, sum(accuracy[-10:]) / 10
    assert chance < 0.25 and last > chance + 0.5, (chance, last)


def test_a_failing_run_says_what_is_wrong_once_each(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # The tiny model ends almost no reply within 8 tokens; with every reward 0, every group's rewards
    # are equal, the format reward is 0, and (advantages 0, policy = reference) the gradient is 0.
    fixed_rewards(monkeypatch, lambda: 0.0)
    cfg = tiny_config(
        tiny_model_dir, tmp_path, max_steps=metrics.PATIENCE + 2, eval_size=0, save_every=0
    )
    results = grpo.train(cfg)
    P = metrics.PATIENCE
    assert said_in(Path(cfg.output_dir)) == {
        "truncated": P,
        "equal_rewards": P,
        "no_format": P,
        "zero_gradient": P,
    }
    console = capsys.readouterr().out
    for name in said_in(Path(cfg.output_dir)):  # on the console, once each, with its step
        assert console.count(metrics.DIAGNOSTICS[name][2]) == 1
    assert set(results["diagnostics"]) == set(said_in(Path(cfg.output_dir)))
    assert results["diagnostics"]["truncated"] == f"step {P}: {metrics.DIAGNOSTICS['truncated'][2]}"


def test_a_kl_past_the_limit_is_said(tiny_model_dir, tmp_path, monkeypatch):
    rng = random.Random(0)
    fixed_rewards(monkeypatch, rng.random)  # rewards that differ: a real gradient
    cfg = tiny_config(
        tiny_model_dir, tmp_path, max_steps=5, eval_size=0, save_every=0, learning_rate=0.1
    )
    grpo.train(
        cfg
    )  # steps of 0.1 on weights of about 0.02: the policy runs away from the reference
    kl = [m["kl"] for m in logs.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")]
    first = next(step for step, value in enumerate(kl, 1) if value > metrics.KL_LIMIT)
    assert kl[0] == 0 and said_in(Path(cfg.output_dir))["kl"] == first


def test_a_healthy_run_says_nothing(ends_early_model_dir, tmp_path, monkeypatch, capsys):
    """Diagnostics are failures: a healthy run has none (the note on the loss lives in README and the notebook)."""
    rng = random.Random(0)
    fixed_rewards(
        monkeypatch, rng.random
    )  # every group's rewards differ; the format reward is not 0
    cfg = tiny_config(
        ends_early_model_dir,
        tmp_path,
        max_steps=metrics.PATIENCE + 2,
        eval_size=0,
        save_every=0,
        max_completion_length=16,
    )
    results = grpo.train(cfg)
    lines = logs.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")
    assert (
        max(m["completion/truncated_frac"] for m in lines) <= 0.25
        and min(m["grad_norm"] for m in lines) > 0
    )
    assert said_in(Path(cfg.output_dir)) == {} and results["diagnostics"] == {}
    console = capsys.readouterr().out
    assert "step " not in console and "note" not in console and "loss" not in console


def test_resume_does_not_say_again_what_was_said(tiny_model_dir, tmp_path, monkeypatch, capsys):
    fixed_rewards(monkeypatch, lambda: 0.0)
    cfg = tiny_config(
        tiny_model_dir, tmp_path, max_steps=metrics.PATIENCE, eval_size=0, save_every=1
    )
    grpo.train(cfg)
    capsys.readouterr()
    grpo.train(replace(cfg, max_steps=metrics.PATIENCE + 2, resume=True))
    console = capsys.readouterr().out
    assert not [
        message for _, _, message in metrics.DIAGNOSTICS.values() if message in console
    ]  # none again
    assert said_in(Path(cfg.output_dir))["truncated"] == metrics.PATIENCE


def test_evaluate_counts_right_answers_and_the_strict_format(monkeypatch):
    """Bugs: evaluate's figures (only its keys were checked), a loose format counted as the strict one. Four
    replies: right and formatted, right with one tag pair, wrong and formatted, nothing: 2/4 and 2/4."""
    texts = [
        "<reasoning>1+1</reasoning>\n<answer>2</answer>",
        "<answer>3</answer>",  # loose: format 0.25, not 1
        "<reasoning>x</reasoning>\n<answer>9</answer>",
        "",
    ]
    rows = [{"prompt": [], "answer": a} for a in ("2", "3", "4", "5")]
    monkeypatch.setattr(
        grpo,
        "generate_completions",
        lambda model, tok, prompts, *a: grpo.Rollout(
            None, None, None, None, None, texts[: len(prompts)]
        ),
    )
    assert grpo.evaluate(None, None, rows, batch_size=4) == {
        "accuracy": 0.5,
        "format_rate": 0.5,
        "n": 4,
    }


HEALTHY_STEP = {  # a step's metrics that set off no diagnostic
    "completion/truncated_frac": 0.0,
    "groups/zero_std_frac": 0.0,
    "reward/format": 0.5,
    "grad_norm": 1.0,
    "kl": 0.0,
    "reward/total": 0.5,
    "accuracy": 0.5,
}


def test_a_diagnostic_needs_its_steps_in_a_row(tmp_path):
    """Bug: `all` -> `any` over the last PATIENCE steps. Truncated on steps 1 and 3 but not 2: nothing said;
    then on PATIENCE steps in a row: said, once."""
    base = HEALTHY_STEP
    pattern = [1.0, 0.0, 1.0] + [1.0] * (metrics.PATIENCE - 1)  # in a row from step 3 on
    for step, truncated in enumerate(pattern, 1):
        metrics.log_step(
            tmp_path, step, {**base, "completion/truncated_frac": truncated}, SilentBar()
        )
    said = said_in(tmp_path)
    assert said == {"truncated": 2 + metrics.PATIENCE}


def test_an_entropy_collapse_is_said_with_what_to_try(tmp_path):
    """The entropy below ENTROPY_FLOOR for PATIENCE steps in a row: said once, naming the flags to try. A step
    without an entropy (a run from before it was logged, resumed) says nothing."""
    base = HEALTHY_STEP
    floor = metrics.ENTROPY_FLOOR
    pattern = [None, floor / 2, floor, floor / 2] + [floor / 10] * (metrics.PATIENCE - 1)
    for step, entropy in enumerate(pattern, 1):
        line = base if entropy is None else {**base, "entropy": entropy}
        metrics.log_step(tmp_path, step, dict(line), SilentBar())
    assert said_in(tmp_path) == {"entropy": 3 + metrics.PATIENCE}  # floor itself is not below it
    message = metrics.DIAGNOSTICS["entropy"][2]
    assert all(flag in message for flag in ("--epsilon-high", "--temperature", "--beta"))
