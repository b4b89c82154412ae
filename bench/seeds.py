"""
Runs settled by seeds: each grid below (its settings, its methods, its seeds) run one or two at a
time, each run's outcome appended as one line to bench/seeds.jsonl, the committed file that the
tables and figures are drawn from (and nothing else).

    python bench/seeds.py SMOLLM2_FOLDER --grid readme                 # README's run, 5 seeds
    python bench/seeds.py SMOLLM2_FOLDER --grid readme --jobs 2 --threads 1
    python bench/seeds.py --grid readme --report                       # the table from the file

It survives interruption: a (grid, method, seed) already in the file is skipped; a run cut off
goes on from its latest checkpoint (--save-every 10, grpo.py's --resume: the same run as one never
stopped), so at most 10 steps are done again. Runs write to outputs/seeds/<grid>/<method>-s<seed>.
Every method of a grid gets the same seeds, so the same data order: comparisons are paired.
"""

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "seeds.jsonl"
RUNS = ROOT / "outputs" / "seeds"
README_RUN = "--dataset arithmetic --prompts-per-step 3 --max-completion-length 64"
GRIDS = {
    "readme": {  # README's Results: 80 steps of 3 questions x 8 completions, sums to 49 + 49
        "settings": f"{README_RUN} --learning-rate 5e-6 --max-steps 80".split(),
        "methods": {"GRPO": []},
        "seeds": range(5),
    },
}


def done(grid: str) -> dict[tuple[str, int], dict]:
    lines = RESULTS.read_text().splitlines() if RESULTS.exists() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    return {(r["method"], r["seed"]): r for r in rows if r["grid"] == grid}


def run_dir(grid: str, method: str, seed: int) -> Path:
    return RUNS / grid / f"{method.lower().replace(' ', '_').replace(',', '')}-s{seed}"


def command(model: str, grid: str, method: str, seed: int) -> list[str]:
    """grpo.py's command for one run; --resume where the folder holds a run to go on with."""
    spec = GRIDS[grid]
    out = run_dir(grid, method, seed)
    started = any(out.glob("checkpoint-*")) or (out / "metrics.jsonl").exists()
    flags = [*spec["settings"], *spec["methods"][method], "--seed", str(seed), "--save-every", "10"]
    return [
        sys.executable,
        str(ROOT / "grpo.py"),
        "--model",
        model,
        *flags,
        "--output-dir",
        str(out),
        *(["--resume"] if started else []),
    ]


def record(grid: str, method: str, seed: int, threads: int | None) -> dict:
    """One line of the results file from a finished run's results.json and metrics.jsonl."""
    out = run_dir(grid, method, seed)
    results = json.loads((out / "results.json").read_text())
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "grid": grid,
        "method": method,
        "seed": seed,
        "flags": [*GRIDS[grid]["settings"], *GRIDS[grid]["methods"][method]],
        "before": results["before"],
        "after": results["after"],
        "sampled_accuracy": [m["accuracy"] for m in steps],
        "format_rate": [m["format_rate"] for m in steps],
        "kl": [m["kl"] for m in steps],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, threads {threads or 'default'}",
    }


def run_grid(model: str, grid: str, jobs: int, threads: int | None) -> None:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    todo = [
        (method, seed)
        for seed in GRIDS[grid]["seeds"]
        for method in GRIDS[grid]["methods"]
        if (method, seed) not in done(grid)
    ]
    for i in range(0, len(todo), jobs):
        running = []
        for method, seed in todo[i : i + jobs]:
            out = run_dir(grid, method, seed)
            out.parent.mkdir(parents=True, exist_ok=True)
            log = open(out.parent / f"{out.name}.log", "a")
            running.append(
                (
                    method,
                    seed,
                    subprocess.Popen(
                        command(model, grid, method, seed),
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    ),
                )
            )
        for method, seed, process in running:
            if process.wait():
                sys.exit(f"{grid} {method} seed {seed} failed: {run_dir(grid, method, seed)}.log")
            with RESULTS.open("a") as f:
                f.write(json.dumps(record(grid, method, seed, threads)) + "\n")
            print(f"{grid} {method} seed {seed}: recorded in {RESULTS.name}")


def bootstrap_mean(values: list[float], draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of the mean of `values`."""
    rng = random.Random(seed)
    means = sorted(statistics.mean(rng.choices(values, k=len(values))) for _ in range(draws))
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def report(grid: str) -> None:
    """Per method: greedy accuracy before and after, its mean over seeds with a 95% interval."""
    rows = done(grid)
    print("| method | seeds | greedy before | greedy after | 95% interval (after) |")
    print("|---|---|---|---|---|")
    for method in GRIDS[grid]["methods"]:
        runs = [r for (m, _), r in sorted(rows.items()) if m == method]
        if not runs:
            continue
        before = [100 * r["before"]["accuracy"] for r in runs]
        after = [100 * r["after"]["accuracy"] for r in runs]
        low, high = bootstrap_mean(after) if len(after) > 1 else (after[0], after[0])
        print(
            f"| {method} | {len(runs)} | {statistics.mean(before):.1f}% | "
            f"{statistics.mean(after):.1f}% | {low:.1f}-{high:.1f}% |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", help="the chat model's folder (SmolLM2-135M-Instruct)")
    parser.add_argument("--grid", choices=GRIDS, required=True)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, help="torch threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--report", action="store_true", help="only print the table from the file")
    args = parser.parse_args()
    if not args.report:
        if not args.model:
            parser.error("the model's folder is needed to run (or pass --report)")
        run_grid(args.model, args.grid, args.jobs, args.threads)
    report(args.grid)


if __name__ == "__main__":
    main()
