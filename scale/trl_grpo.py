"""
grpo.py's run on TRL's GRPOTrainer: the same flags, prompt, data and rewards, when one GPU is not
enough. Nothing here changes grpo.py; TRL is not one of its dependencies.

    pip install -r requirements.txt -r scale/requirements.txt
    python scale/trl_grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 200     # one device
    python scale/trl_grpo.py --use-vllm --max-steps 200      # sampling by vLLM (pip install vllm)
    accelerate launch --num_processes 4 scale/trl_grpo.py --max-steps 200            # 4 GPUs

Every grpo.py flag means here what it means there. `trl_config` turns them into TRL's
`GRPOConfig`, field by field (checked against TRL 1.16's `GRPOTrainer`); a flag that TRL cannot
honour is refused, with the reason, before any model loads. The rewards are rewards.py's, with
grpo.py's weights; the rows (and so the prompt) come from rewards.load_dataset_rows; evaluation
is grpo.py's own `evaluate` (greedy accuracy and format rate, under grpo.py's precision), before
and after training. One flag is this runner's own: `--use-vllm` samples with vLLM, colocated with
training on the same GPUs (TRL's `use_vllm`, `vllm_mode="colocate"`).
"""

import importlib.util
import json
import os
import sys
import warnings
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402
import rewards  # noqa: E402
from machinery import checkpoints, cli, devices, flags, hub, loading  # noqa: E402
from machinery.logs import append_jsonl, log_samples, plot_curves, read_jsonl  # noqa: E402

# Our loss modes by what they compute (TRL 1.16, GRPOTrainer._compute_loss): TRL's `grpo` is the
# mean over sequences of each one's token mean, `dapo` the token mean over the whole batch (TRL's
# `bnpo` divides by each micro-batch's own tokens), `dr_grpo` the token sum over (B x L).
LOSS_TYPES = {
    "grpo": "grpo",
    "dapo": "dapo",
    "bnpo": "dapo",
    "dr_grpo": "dr_grpo",
    "cispo": "cispo",
}
# Flags that TRL has no equivalent for: refused when set (`--no-compile` asks nothing of TRL).
NO_TRL_EQUIVALENT = {
    "logp_chunk_size": "TRL computes log-probs its own way",
    "compile": "TRL samples with its own generate() (or vLLM: --use-vllm), not grpo.py's loop",
    # transformers' Trainer exempts biases and norm weights from weight decay; grpo.py decays all
    "weight_decay": "TRL's Trainer does not decay biases and norm weights, grpo.py decays every one",
    # TRL declined per-step rewards (trl#3090): its advantage is one number per completion
    "supervision": "TRL's GRPOTrainer has no process supervision (one advantage per completion)",
}
# grpo.py's --advantage as TRL's scale_rewards (its group mean, then this std); no Online RFT.
SCALE_REWARDS = {"grpo": "group", "grpo_batch_std": "batch"}
# TRL's KL term is k3, weighted by the ratio or not (`use_bias_correction_kl`); it has no k2.
TRL_KL_ESTIMATORS = ("k3", "k3_ratio")
# grpo.py's metrics.jsonl keys and the TRL 1.16 log keys that hold the same figures (its
# GRPOTrainer: the same group statistics, token means and clip conditions). TRL logs no strict
# format rate and no time per phase; `accuracy` is the answer reward's mean (it is 1 or 0).
TRL_METRICS = {
    "reward/total": "reward",
    "reward/total_std": "reward_std",
    "reward/format": "rewards/format/mean",
    "reward/format_std": "rewards/format/std",
    "reward/answer": "rewards/answer/mean",
    "reward/answer_std": "rewards/answer/std",
    "reward/step": "rewards/step/mean",
    "reward/step_std": "rewards/step/std",
    "accuracy": "rewards/answer/mean",
    "groups/zero_std_frac": "frac_reward_zero_std",
    "completion/len_mean": "completions/mean_length",
    "completion/len_max": "completions/max_length",
    "completion/truncated_frac": "completions/clipped_ratio",
    "loss": "loss",
    "kl": "kl",
    "clip/low_frac": "clip_ratio/low_mean",
    "clip/high_frac": "clip_ratio/high_mean",
    "grad_norm": "grad_norm",
    "entropy": "entropy",
    "lr": "learning_rate",
}


def refusals(cfg: grpo.Config, num_processes: int = 1, use_vllm: bool = False) -> list[str]:
    """What TRL cannot do as asked, one message per flag; empty when everything maps."""
    default = grpo.Config()
    messages = [
        f"{flags.flag(name)} {getattr(cfg, name)!r}: {why}; drop the flag."
        for name, why in NO_TRL_EQUIVALENT.items()
        if getattr(cfg, name) not in (getattr(default, name), False)
    ]
    if cfg.kl_estimator not in TRL_KL_ESTIMATORS:
        messages.append(
            f"--kl-estimator {cfg.kl_estimator!r}: TRL estimates the KL with k3 only, "
            f"with or without the ratio; use one of {', '.join(TRL_KL_ESTIMATORS)}."
        )
    if cfg.advantage not in SCALE_REWARDS:
        messages.append(
            f"--advantage {cfg.advantage!r}: TRL's advantage is always the group's "
            f"reward minus its mean; use one of {', '.join(SCALE_REWARDS)}."
        )
    if use_vllm and importlib.util.find_spec("vllm") is None:
        messages.append(
            "--use-vllm: vllm is not installed. pip install vllm (it needs a CUDA "
            "GPU), or drop --use-vllm to sample with transformers."
        )
    completions = cfg.prompts_per_step * cfg.num_generations // cfg.mini_batches  # an update's
    if completions % (cfg.micro_batch_size * num_processes):
        messages.append(
            f"--micro-batch-size {cfg.micro_batch_size}: TRL splits a step's P x G / "
            f"mini-batches = {completions} completions into micro-batches of this "
            f"size on each of "
            f"{num_processes} process(es), so it must divide {completions} / "
            f"{num_processes}; change it, --prompts-per-step or the processes."
        )
    if not cfg.resume and checkpoints.latest_checkpoint(Path(cfg.output_dir)) is not None:
        messages.append(
            f"{cfg.output_dir} already holds a run. Pass --resume to continue it, or "
            "choose another --output-dir."
        )
    return messages


def uses_bf16(cfg: grpo.Config) -> bool:
    """grpo.py's precision rule (`auto`: bf16 only on a GPU with native bf16)."""
    import torch

    autocast = devices.autocast_for(devices.pick_device(cfg.device), cfg.precision)
    return getattr(autocast, "fast_dtype", None) == torch.bfloat16


def trl_config(cfg: grpo.Config, num_processes: int = 1, use_vllm: bool = False):
    """TRL's GRPOConfig with grpo.py's settings. TRL counts optimizer steps: one grpo.py step (one
    generated batch, then mu x mini_batches optimizer steps) is that many of TRL's."""
    import torch
    from trl import GRPOConfig

    completions = cfg.prompts_per_step * cfg.num_generations // cfg.mini_batches  # an update's
    per_step = cfg.mu * cfg.mini_batches  # optimizer steps per grpo.py step
    accumulation = completions // (cfg.micro_batch_size * num_processes)  # micro-batches per update
    return GRPOConfig(
        output_dir=cfg.output_dir,
        seed=cfg.seed,
        max_steps=cfg.max_steps * per_step,
        num_generations=cfg.num_generations,
        per_device_train_batch_size=cfg.micro_batch_size,  # completions per micro-batch
        gradient_accumulation_steps=accumulation,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_k=0,
        top_p=1.0,
        min_p=None,
        repetition_penalty=1.0,
        beta=cfg.beta,
        epsilon=cfg.epsilon_low,
        # TRL's cispo caps the ratio at epsilon_high itself (ScaleRL's ε_max), grpo.py's at 1 + it
        epsilon_high=cfg.epsilon_high + (cfg.loss_type == "cispo"),
        importance_sampling_level=cfg.importance_sampling_level,  # sequence: GSPO
        mask_truncated_completions=cfg.mask_truncated_completions,
        use_bias_correction_kl=cfg.kl_estimator == "k3_ratio",  # k3 x π_θ / π_θ_old, or plain k3
        loss_type=LOSS_TYPES[cfg.loss_type],
        scale_rewards="none" if cfg.loss_type == "dr_grpo" else SCALE_REWARDS[cfg.advantage],
        num_iterations=cfg.mu,  # TRL then samples once every mu x mini_batches optimizer steps
        # TRL counts micro-batches per generation; it shuffles the batch first, grpo.py splits in order
        steps_per_generation=accumulation * cfg.mini_batches,
        sync_ref_model=cfg.ref_sync_every > 0,
        ref_model_sync_steps=max(cfg.ref_sync_every, 1) * per_step,
        ref_model_mixup_alpha=1.0,  # a full copy of the policy, as grpo.py's
        reward_weights=[getattr(cfg, f"{name}_weight") for name in rewards.REWARD_FUNCTIONS],
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        activation_checkpointing=cfg.gradient_checkpointing,  # TRL's default is on; ours off
        disable_dropout=True,  # the learner scores the sampler's policy, as in grpo.py
        bf16=uses_bf16(cfg),
        use_cpu=cfg.device == "cpu",
        trust_remote_code=cfg.trust_remote_code,
        model_init_kwargs={"dtype": torch.float32, "trust_remote_code": cfg.trust_remote_code},
        # --save-every 0 saves at the end only, as grpo.py does (a checkpoint --resume finds)
        save_strategy="steps",
        save_steps=(cfg.save_every or cfg.max_steps) * per_step,
        save_total_limit=1,  # the latest checkpoint only, as grpo.py
        use_vllm=use_vllm,
        vllm_mode="colocate",  # vLLM on the training GPUs, when asked for
        log_completions=False,
        logging_steps=1,
        report_to="none",  # our logs: OurLogs
    )


def trl_reward_functions(seen: dict | None = None) -> list:
    """rewards.py's functions with TRL's signature: completions are chat messages, and the
    data set's `answer` column arrives as a keyword. `seen` keeps the last batch scored (for
    samples.jsonl) and counts the strictly formatted replies (the format rate)."""

    def wrap(name, fn):
        def reward(completions, answer, **kwargs):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            scores = fn(texts, answer)
            if seen is not None and name == "format":
                seen.update(
                    texts=texts,
                    answers=list(answer),
                    prompts=kwargs.get("prompts"),
                    strict=seen.get("strict", 0) + scores.count(1.0),
                    scored=seen.get("scored", 0) + len(scores),
                )
            return scores

        reward.__name__ = name  # TRL logs each reward under its function's name
        return reward

    return [wrap(name, fn) for name, fn in rewards.REWARD_FUNCTIONS.items()]


def our_logs(cfg: grpo.Config, seen: dict):
    """A TrainerCallback that writes grpo.py's logs beside TRL's checkpoints: metrics.jsonl (one
    line per TRL log, that is per optimizer step, with grpo.py's keys where TRL has the figure),
    samples.jsonl (two completions every --log-samples-every steps, and at the last) and
    curves.png, as grpo.py draws them. A resumed run drops the lines after its checkpoint."""
    from transformers import TrainerCallback

    out = Path(cfg.output_dir)

    class OurLogs(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                out.mkdir(parents=True, exist_ok=True)
                for path in (out / "metrics.jsonl", out / "samples.jsonl"):
                    if path.exists():
                        kept = [r for r in read_jsonl(path) if r["step"] <= state.global_step]
                        append_jsonl(path, kept, mode="w")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return  # not a training step's log (the end-of-training summary, say)
            line = {
                "step": state.global_step,
                **{ours: logs[theirs] for ours, theirs in TRL_METRICS.items() if theirs in logs},
            }
            if seen.get("scored"):  # strictly formatted, since the last log
                line["format_rate"] = seen.pop("strict") / seen.pop("scored")
            append_jsonl(out / "metrics.jsonl", [line])
            if seen.get("texts"):  # log_samples writes the first two: score those only
                total, _ = grpo.score_completions(
                    seen["texts"][:2],
                    seen["answers"][:2],
                    {name: getattr(cfg, f"{name}_weight") for name in rewards.REWARD_FUNCTIONS},
                )
                row = {
                    "question": seen["prompts"][0][-1]["content"] if seen.get("prompts") else "",
                    "answer": seen["answers"][0],
                }
                log_samples(
                    replace(cfg, max_steps=args.max_steps),
                    state.global_step,
                    row,
                    seen["texts"],
                    total,
                )

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                plot_curves(out / "metrics.jsonl", out / "curves.png")

    return OurLogs()


def peft_config(cfg: grpo.Config):
    if not cfg.lora_r:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=cfg.lora_target_modules.split(","),
        task_type="CAUSAL_LM",
    )


def main(argv: list[str] | None = None) -> dict:
    parser = flags.flag_parser(
        grpo.Config, "trl_grpo.py"
    )  # grpo.py's flags, and this runner's own one
    parser.description = (
        "grpo.py's run on TRL's GRPOTrainer: the same flags, prompt, data and "
        "rewards. Example: accelerate launch --num_processes 4 scale/trl_grpo.py --max-steps 200"
    )
    parser.add_argument(
        "--use-vllm",
        action="store_true",
        help="sample with vLLM, colocated on "
        "the training GPUs (TRL's use_vllm, vllm_mode='colocate'; pip install vllm)",
    )
    cfg = cli.parse_args(grpo.Config, argv, parser)
    use_vllm = getattr(parser.parse_args(argv), "use_vllm", False)  # absent unless typed
    num_processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch
    try:
        cli.check_config(
            cfg, rewards.BUILT_IN_TASKS
        )  # grpo.py's checks of the flags; the output folder is TRL's
        refused = refusals(cfg, num_processes, use_vllm)
        flags.require(not refused, "\n".join(refused))
        settings = (cfg.dataset_config, cfg.arithmetic_max, cfg.seed, cfg.example_turn)
        train_rows = rewards.load_dataset_rows(cfg.dataset, "train", *settings)
        eval_rows = rewards.load_dataset_rows(cfg.dataset, "test", *settings)[: cfg.eval_size]
        args = trl_config(cfg, num_processes, use_vllm)
    except flags.ConfigError as error:  # exit code 2, as argparse's errors and grpo.py's
        print(f"trl_grpo.py: error: {error}", file=sys.stderr)
        sys.exit(2)

    from datasets import Dataset
    from trl import GRPOTrainer

    hub.quiet_libraries()  # and TRL's read of an attribute transformers 5 deprecates: not ours
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "answer": r["answer"]} for r in train_rows]
    )
    seen = {}  # the last batch scored, for samples.jsonl and the format rate
    trainer = GRPOTrainer(
        model=cfg.model,
        reward_funcs=trl_reward_functions(seen),
        args=args,
        train_dataset=dataset,
        peft_config=peft_config(cfg),
        callbacks=[our_logs(cfg, seen)],
    )
    tokenizer = loading.load_tokenizer(
        cfg.model, cfg.trust_remote_code, rewards.make_prompt("What is 1 + 1?")
    )
    results = {}

    def evaluate(when):
        if cfg.eval_size and trainer.accelerator.is_main_process:
            model = trainer.accelerator.unwrap_model(trainer.model)
            autocast = devices.autocast_for(next(model.parameters()).device, cfg.precision)
            results[when] = grpo.evaluate(
                model,
                tokenizer,
                eval_rows,
                cfg.eval_batch_size,
                cfg.max_completion_length,
                autocast,
            )  # as grpo.py
            print(f"{when} training: {results[when]}")
        trainer.accelerator.wait_for_everyone()

    if not cfg.resume:
        evaluate("before")
    trainer.train(resume_from_checkpoint=cfg.resume or None)
    trainer.save_model(cfg.output_dir)
    evaluate("after")
    if trainer.accelerator.is_main_process:  # TRL's own per-step logs (rewards, KL, ...) too
        results |= {
            "steps": cfg.max_steps,
            "engine": "trl",
            "config": asdict(cfg),
            "log_history": trainer.state.log_history,
        }
        (Path(cfg.output_dir) / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
