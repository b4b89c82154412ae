"""
How often a model writes the tags, and gets sums right, before any training, with and without a
worked example in the prompt (bench/README.md, "The learning runs"):

    python bench/prompt_probe.py SMOLLM2_FOLDER --largest 20,49,99 --examples arithmetic,word
    python bench/prompt_probe.py SMOLLM2_FOLDER --largest 49 --examples none

For each setting: 8 sums `a + b` (a, b up to --largest), 8 replies each at T = 1, 64 new tokens.
The settings run in the order given, from one seed.
"""

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402
import rewards  # noqa: E402
from machinery import hub, loading  # noqa: E402

R = rewards
WORD_EXAMPLE = [
    {"role": "user", "content": "Ann buys 3 boxes of 4 pens. How many pens does she have?"},
    {
        "role": "assistant",
        "content": f"{R.REASONING_START}\n3 boxes of 4 pens: 3 x 4 = 12 pens.\n"
        f"{R.REASONING_END}\n{R.ANSWER_START}\n12\n{R.ANSWER_END}",
    },
]
EXAMPLES = {"none": [], "arithmetic": R.EXAMPLE_TURN, "word": WORD_EXAMPLE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--largest", default="49")
    parser.add_argument("--examples", default="none,arithmetic")
    args = parser.parse_args()
    hub.quiet_libraries()
    tokenizer, model = (
        loading.load_tokenizer(args.model),
        loading.load_model(args.model, torch.device("cpu")),
    )
    torch.manual_seed(0)
    for example in args.examples.split(","):
        for largest in map(int, args.largest.split(",")):
            rng = random.Random(1)
            sums = [(rng.randint(0, largest), rng.randint(0, largest)) for _ in range(8)]
            prompts = [
                [
                    {"role": "system", "content": R.SYSTEM_PROMPT},
                    *EXAMPLES[example],
                    {"role": "user", "content": f"What is {a} + {b}?"},
                ]
                for a, b in sums
            ]
            texts = grpo.generate_completions(model.eval(), tokenizer, prompts, 8, 64, 1.0).texts
            answers = [str(a + b) for a, b in sums for _ in range(8)]
            strict = sum(map(R.is_strict_format, texts))
            any_tag = sum(any(tag in text for tag in R.TAGS) for text in texts)
            right = int(sum(R.answer_reward(texts, answers)))
            print(
                f"{example:>10}, up to {largest}: strict format {strict}/64, any tag {any_tag}/64, "
                f"right answer {right}/64"
            )


if __name__ == "__main__":
    main()
