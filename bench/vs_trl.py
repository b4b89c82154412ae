"""
The same GRPO work on grpo.py and on TRL's GRPOTrainer, one after the other, on this machine.

Work per step: 4 GSM8K questions x 8 completions, 128 new tokens, temperature 1.0, beta 0.04
(so both load a reference model), mu = 1, loss `grpo`, the rewards of rewards.py with the same
weights, micro-batches of 8 completions, no gradient checkpointing (TRL's default is on; both
off here), AdamW at lr 1e-6. 1 warm-up step, then 3 timed steps. Each side runs in its own
process, so that its peak resident memory is its own.

    pip install trl          # only for this script; not a dependency of grpo.py
    python bench/vs_trl.py --model PATH_OR_HUB_ID --data PATH/TO/gsm8k/train.jsonl

Prints, for each precision (fp32, and bf16 autocast on both sides), the median seconds per
step and the peak resident memory of each side, and our/TRL ratios. `--out` saves them as JSON.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpo  # noqa: E402
import rewards  # noqa: E402
from machinery import devices, loading  # noqa: E402
from rewards import answer_reward, format_reward  # noqa: E402

P, G, MAX_NEW_TOKENS, MICRO_BATCH, BETA, LR = 4, 8, 128, 8, 0.04, 1e-6
FORMAT_WEIGHT, ANSWER_WEIGHT = 0.5, 1.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def questions(args) -> list[dict]:
    """The first (warmup + steps) x P questions of the data file, in order, for both sides."""
    # the prompt its figures were measured with: no worked example
    return rewards.load_dataset_rows(args.data, "train", example_turn=False)[
        : (args.warmup + args.steps) * P
    ]


def run_ours(args) -> dict:
    import torch

    cfg = grpo.Config(
        model=args.model,
        prompts_per_step=P,
        num_generations=G,
        max_completion_length=MAX_NEW_TOKENS,
        temperature=1.0,
        beta=BETA,
        mu=1,
        loss_type="grpo",
        micro_batch_size=MICRO_BATCH,
        learning_rate=LR,
        precision=args.precision,
        device="cpu",
        seed=0,
        format_weight=FORMAT_WEIGHT,
        answer_weight=ANSWER_WEIGHT,
    )
    torch.manual_seed(cfg.seed)
    device = torch.device("cpu")
    autocast = devices.autocast_for(device, cfg.precision)
    tokenizer = loading.load_tokenizer(cfg.model)
    policy, reference = loading.load_policy_and_reference(cfg, device)
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=LR, weight_decay=0.0
    )
    rows = questions(args)
    times, phases = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        metrics, *_ = grpo.grpo_step(
            policy, reference, tokenizer, optimizer, rows[step * P : (step + 1) * P], cfg, autocast
        )
        times.append(time.perf_counter() - start)
        phases.append(
            {k: round(v, 2) for k, v in metrics.items() if k.startswith("time/")}
            | {"completion/len_mean": metrics["completion/len_mean"]}
        )
        print(
            f"ours {args.precision} step {step}: {times[-1]:.1f} s {phases[-1]}",
            file=sys.stderr,
            flush=True,
        )
    return {"step_seconds": times[args.warmup :], "phases": phases[args.warmup :]}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    def trl_format_reward(completions, **kwargs):
        return format_reward([c[0]["content"] for c in completions])

    def trl_answer_reward(completions, answer, **kwargs):
        return answer_reward([c[0]["content"] for c in completions], answer)

    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)
            print(
                f"trl {args.precision} step {len(times) - 1}: {times[-1]:.1f} s",
                file=sys.stderr,
                flush=True,
            )

    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "answer": r["answer"]} for r in questions(args)]
    )
    with tempfile.TemporaryDirectory() as output_dir:
        config = GRPOConfig(
            output_dir=output_dir,
            use_cpu=True,
            bf16=args.precision == "bf16",
            seed=0,
            model_init_kwargs={"dtype": torch.float32},  # fp32 weights, as ours
            per_device_train_batch_size=MICRO_BATCH,
            gradient_accumulation_steps=P * G // MICRO_BATCH,
            num_generations=G,
            max_completion_length=MAX_NEW_TOKENS,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=BETA,
            num_iterations=1,
            epsilon=0.2,
            loss_type="grpo",
            scale_rewards="group",
            reward_weights=[FORMAT_WEIGHT, ANSWER_WEIGHT],
            learning_rate=LR,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=1.0,
            activation_checkpointing=False,
            shuffle_dataset=False,
            max_steps=args.warmup + args.steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(
            model=args.model,
            reward_funcs=[trl_format_reward, trl_answer_reward],
            args=config,
            train_dataset=dataset,
            callbacks=[StepTimer()],
        )
        trainer.train()
    return {"step_seconds": times[args.warmup :]}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="Hub id or local folder of the chat model")
    parser.add_argument(
        "--data", required=True, help="GSM8K-style JSON-lines file (question, answer)"
    )
    parser.add_argument(
        "--precisions", default="fp32,bf16", help="comma-separated, from fp32 and bf16"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument(
        "--side", choices=["ours", "trl"], help=argparse.SUPPRESS
    )  # one side, in a child process
    parser.add_argument("--precision", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:  # child: run one side, print one JSON line
        result = run_ours(args) if args.side == "ours" else run_trl(args)
        print(json.dumps(result | {"peak_rss_mb": peak_rss_mb()}))
        return

    results = {}
    for precision in args.precisions.split(","):
        for side in ("ours", "trl"):
            command = [
                sys.executable,
                __file__,
                "--side",
                side,
                "--precision",
                precision,
                "--model",
                args.model,
                "--data",
                args.data,
                "--warmup",
                str(args.warmup),
                "--steps",
                str(args.steps),
            ]
            child = subprocess.run(command, stdout=subprocess.PIPE, text=True)
            if child.returncode != 0:
                sys.exit(
                    f"{side} at {precision} failed (exit {child.returncode}); its log is above"
                )
            result = json.loads(child.stdout.strip().splitlines()[-1])
            result["median_step_seconds"] = statistics.median(result["step_seconds"])
            results[f"{side}/{precision}"] = result

    print(f"\n{'precision':<10}{'side':<6}{'median s/step':>15}{'peak RSS MB':>13}")
    for key, r in results.items():
        side, precision = key.split("/")
        print(f"{precision:<10}{side:<6}{r['median_step_seconds']:>15.1f}{r['peak_rss_mb']:>13.0f}")
    for precision in args.precisions.split(","):
        ours, trl = results[f"ours/{precision}"], results[f"trl/{precision}"]
        print(
            f"{precision}: time ours/TRL = {ours['median_step_seconds'] / trl['median_step_seconds']:.2f}, "
            f"peak memory ours/TRL = {ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
