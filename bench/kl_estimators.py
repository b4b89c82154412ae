"""
The paper's k3 against k3_ratio (k3 times π_θ/π_θ_old, grpo.py's default) as the KL term of the
loss: the same 30-step run of the README's results settings with each, on two seeds, then the
KL and the accuracies side by side (mean and range over the seeds).

    python bench/kl_estimators.py SMOLLM2_FOLDER --out /tmp/kl          # runs 4 x 30 steps
    python bench/kl_estimators.py SMOLLM2_FOLDER --out /tmp/kl --parallel 2 --threads 1

Each run is `grpo.py --model SMOLLM2_FOLDER --dataset arithmetic --prompts-per-step 3
--max-completion-length 64 --learning-rate 5e-6 --max-steps 30 --save-every 0 --seed S
--kl-estimator E --output-dir OUT/E-seedS`; a folder that already holds a finished run is read,
not run again. Prints one markdown table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ESTIMATORS, SEEDS = ("k3", "k3_ratio"), (0, 1)
SETTINGS = [
    "--dataset",
    "arithmetic",
    "--prompts-per-step",
    "3",
    "--max-completion-length",
    "64",
    "--learning-rate",
    "5e-6",
    "--max-steps",
    "30",
    "--save-every",
    "0",
]


def command(model: str, run_dir: Path, flags: list[str]) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "grpo.py"),
        "--model",
        model,
        *flags,
        "--output-dir",
        str(run_dir),
    ]


def run_all(
    model: str, out: Path, runs: dict[str, list[str]], parallel: int, threads: int | None
) -> None:
    """Each run `name: flags` into out/name (log: out/name.log), `parallel` at a time; a finished one is kept."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    todo = [
        name
        for name in runs
        if not (out / name / "results.json").exists()
        or "after" not in json.loads((out / name / "results.json").read_text())
    ]
    for i in range(0, len(todo), parallel):
        running = [
            subprocess.Popen(
                command(model, out / name, runs[name]),
                env=env,
                stdout=open(out / f"{name}.log", "w"),
                stderr=subprocess.STDOUT,
            )
            for name in todo[i : i + parallel]
        ]
        if any(p.wait() for p in running):
            sys.exit(f"a run failed; its log is in {out}")


def summary(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = steps[-10:]
    return {
        "KL, mean of steps 21-30": statistics.mean(m["kl"] for m in last),
        "KL, largest step": max(m["kl"] for m in steps),
        "sampled accuracy, steps 21-30": statistics.mean(m["accuracy"] for m in last),
        "sampled format rate, steps 21-30": statistics.mean(m["format_rate"] for m in last),
        "greedy held-out accuracy, after": results["after"]["accuracy"],
        "greedy held-out format rate, after": results["after"]["format_rate"],
    }


def runs_parser(doc: str, runs: str) -> argparse.ArgumentParser:
    """The flags of a script that runs grpo.py several times with run_all: the model, the folder, how many at once."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "model", help="Hub id or local folder of the chat model (SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--out", required=True, help=f"folder of the {runs} runs")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, help="torch threads per run (OMP_NUM_THREADS)")
    return parser


def main():
    args = runs_parser(__doc__, "four").parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {
        f"{e}-seed{s}": [*SETTINGS, "--seed", str(s), "--kl-estimator", e]
        for s in SEEDS
        for e in ESTIMATORS
    }
    run_all(args.model, out, runs, args.parallel, args.threads)
    runs = {e: [summary(out / f"{e}-seed{s}") for s in SEEDS] for e in ESTIMATORS}
    print(
        "| measure | "
        + " | ".join(f"{e}: mean (seed {', seed '.join(map(str, SEEDS))})" for e in ESTIMATORS)
        + " |"
    )
    print("|---|" + "---|" * len(ESTIMATORS))
    for key in runs[ESTIMATORS[0]][0]:
        cells = []
        for e in ESTIMATORS:
            values = [r[key] for r in runs[e]]
            fmt = (lambda v: f"{v:.4f}") if key.startswith("KL") else (lambda v: f"{100 * v:.1f}%")
            cells.append(f"{fmt(statistics.mean(values))} ({', '.join(map(fmt, values))})")
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
