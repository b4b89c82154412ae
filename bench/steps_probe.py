"""
What a model does on a built-in task before any training, step by step: its greedy accuracy and
strict-format rate on the first held-out problems (grpo.py's `evaluate`), and, greedy and sampled,
the steps of its reasoning (rewards.reasoning_steps: each line with an equation, checked
exactly): steps per reply, the fraction of steps that hold, and, sampled (T = 1, G per question),
how many groups have rewards that differ (a group whose rewards are all equal teaches nothing).

    python bench/steps_probe.py SMOLLM2_FOLDER --dataset arithmetic3
    python bench/steps_probe.py SMOLLM2_FOLDER --dataset arithmetic3 --arithmetic-max 20
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402
import rewards  # noqa: E402
from machinery import hub, loading  # noqa: E402


def steps_summary(texts: list[str]) -> dict:
    steps = [rewards.reasoning_steps(text) for text in texts]
    count = sum(len(s) for s in steps)
    return {
        "steps_per_reply": round(count / len(texts), 2),
        "steps_that_hold": round(sum(r for s in steps for _, r in s) / max(count, 1), 3),
        "replies_with_2_steps_or_more": round(sum(len(s) >= 2 for s in steps) / len(texts), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--dataset", default="arithmetic3")
    parser.add_argument("--arithmetic-max", type=int, default=49)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    hub.quiet_libraries()
    tokenizer, model = (
        loading.load_tokenizer(args.model),
        loading.load_model(args.model, torch.device("cpu")),
    )
    model.eval()
    torch.manual_seed(0)
    held_out = rewards.load_dataset_rows(args.dataset, "test", arithmetic_max=args.arithmetic_max)
    rows = held_out[: args.eval_size]
    result = {
        "dataset": args.dataset,
        "arithmetic_max": args.arithmetic_max,
        "greedy": grpo.evaluate(model, tokenizer, rows, 32, args.tokens),
    }
    greedy = [
        text
        for i in range(0, len(rows), 32)
        for text in grpo.generate_completions(
            model, tokenizer, [r["prompt"] for r in rows[i : i + 32]], 1, args.tokens, 0.0
        ).texts
    ]
    result["greedy"] |= steps_summary(greedy)
    train = rewards.load_dataset_rows(args.dataset, "train", arithmetic_max=args.arithmetic_max)
    asked = train[: args.questions]
    G = args.generations
    texts = grpo.generate_completions(
        model, tokenizer, [r["prompt"] for r in asked], G, args.tokens, 1.0
    ).texts
    answers = [r["answer"] for r in asked for _ in range(G)]
    answer = torch.tensor(rewards.answer_reward(texts, answers)).view(-1, G)
    step = torch.tensor(rewards.step_reward(texts)).view(-1, G)
    differ = lambda r: round((r != r[:, :1]).any(dim=1).float().mean().item(), 3)  # noqa: E731
    result["sampled"] = {
        "accuracy": round(answer.mean().item(), 3),
        "strict_format": round(sum(map(rewards.is_strict_format, texts)) / len(texts), 3),
        "groups_whose_answer_rewards_differ": differ(answer),
        "groups_whose_step_rewards_differ": differ(step),
        **steps_summary(texts),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
