"""
Write our train and test rows as the parquet files verl reads, in its documented schema:
`data_source`, `prompt` (chat messages: rewards.py's system prompt, its worked example, the
question), `ability`, `reward_model` ({"style": "rule", "ground_truth": the gold answer}) and
`extra_info`.

    python scale/verl/prepare_data.py --dataset openai/gsm8k --out data/gsm8k-verl
    python scale/verl/prepare_data.py --dataset arithmetic --arithmetic-max 49 --out data/arith

Takes grpo.py's data flags (--dataset, --dataset-config, --arithmetic-max, --seed,
--example-turn / --no-example-turn).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import rewards  # noqa: E402
from machinery.flags import ConfigError  # noqa: E402


def verl_rows(rows: list[dict], data_source: str, split: str) -> list[dict]:
    return [
        {
            "data_source": data_source,
            "prompt": row["prompt"],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": row["answer"]},
            "extra_info": {"split": split, "index": i, "question": row["question"]},
        }
        for i, row in enumerate(rows)
    ]


def write_parquet(
    dataset: str,
    out: Path,
    dataset_config: str = "main",
    arithmetic_max: int = 49,
    seed: int = 0,
    example_turn: bool = True,
) -> dict[str, Path]:
    from datasets import Dataset

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "test"):
        rows = rewards.load_dataset_rows(
            dataset, split, dataset_config, arithmetic_max, seed, example_turn
        )
        paths[split] = out / f"{split}.parquet"
        Dataset.from_list(verl_rows(rows, dataset, split)).to_parquet(str(paths[split]))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="openai/gsm8k")
    parser.add_argument("--dataset-config", default="main")
    parser.add_argument("--arithmetic-max", type=int, default=49)
    parser.add_argument("--example-turn", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder for train.parquet and test.parquet")
    args = parser.parse_args(argv)
    try:
        paths = write_parquet(
            args.dataset,
            Path(args.out),
            args.dataset_config,
            args.arithmetic_max,
            args.seed,
            args.example_turn,
        )
    except ConfigError as error:
        sys.exit(f"prepare_data.py: error: {error}")
    print("\n".join(f"{split}: {path}" for split, path in paths.items()))


if __name__ == "__main__":
    main()
