"""
Is the compiled decoding step (--compile) the eager loop, on the machine at hand? fp32 greedy
tokens of both, for the same prompts, before and after one AdamW step (the weights change in
place: a CUDA graph that kept the old ones would part from the eager loop after it).

bf16 or sampled tokens of random weights part for reasons that are no bug (a rounding flips a
near tie), so this compares fp32 greedy tokens, and reports where two rows first part and the
eager logits' margin there (the top two logits' gap): a gap far above fp32 rounding (1e-4 and
more) where they part is a bug; a gap near 1e-6 is rounding.

    python bench/compiled_greedy.py MODEL [--rows 16] [--tokens 64] [--json out.json]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo  # noqa: E402
import rewards  # noqa: E402
from machinery import devices, loading  # noqa: E402


def compare(model, tokenizer, prompts, tokens: int) -> dict:
    """Greedy tokens eager and compiled; where they part, the eager logits' top-two gap."""
    eager, compiled = (
        grpo.generate_completions(
            model, tokenizer, prompts, 1, tokens, 0.0, compiled=flag
        ).completion_ids
        for flag in (False, True)
    )
    length = min(eager.shape[1], compiled.shape[1])
    differ = (eager[:, :length] != compiled[:, :length]).any(dim=1) | (
        eager.shape[1] != compiled.shape[1]
    )
    gaps = []
    for row in differ.nonzero().flatten().tolist():
        t = int((eager[row, :length] != compiled[row, :length]).int().argmax())
        ids = torch.cat(
            [
                grpo.generate_completions(model, tokenizer, [prompts[row]], 1, 1, 0.0).prompt_ids,
                eager[row : row + 1, :t],
            ],
            dim=1,
        )
        with torch.no_grad():
            top = model(input_ids=ids).logits[0, -1].float().topk(2).values
        gaps.append({"row": row, "token": t, "gap": (top[0] - top[1]).item()})
    return {"rows": len(prompts), "rows_differ": int(differ.sum()), "where": gaps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("model")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()
    device = devices.pick_device("auto")
    tokenizer = loading.load_tokenizer(args.model)
    model = loading.load_model(args.model, device).eval()  # fp32
    questions = [
        row["question"] for row in rewards.load_dataset_rows("arithmetic", "test")[: args.rows]
    ]
    prompts = [rewards.make_prompt(q) for q in questions]
    result = {"device": str(device), "before": compare(model, tokenizer, prompts, args.tokens)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = grpo.generate_completions(model, tokenizer, prompts[:4], 1, 16, 0.0).completion_ids
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    result["after_one_step"] = compare(model, tokenizer, prompts, args.tokens)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
