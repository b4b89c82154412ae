"""
Runs settled by seeds: each grid below (its settings, its methods, its seeds) run one or two at a
time, each run's outcome appended as one line to bench/seeds.jsonl, the committed file that the
tables and figures are drawn from (and nothing else).

    python bench/seeds.py SMOLLM2_FOLDER --grid readme                 # README's run, 5 seeds
    python bench/seeds.py SMOLLM2_FOLDER --grid readme --jobs 2 --threads 1
    python bench/seeds.py --grid readme --report                       # the table from the file
    python bench/seeds.py SMOLLM2_FOLDER --grid figure5 --jobs 2 --threads 1   # Figure 5, 8 seeds
    python bench/seeds.py --grid figure5 --report --figure assets/figure5-seeds.png

It survives interruption: a (grid, method, seed) already in the file with the grid's settings is
skipped; a run cut off goes on from its latest checkpoint (--save-every 10, grpo.py's --resume: the
same run as one never stopped), so at most 10 steps are done again, and a run of fewer steps goes on
to the grid's. A lock file beside each run's folder holds the pid of the grpo.py that trains it:
two runners may share a grid, and neither takes a run that is still going: it waits for it, as one
of its --jobs, and records it if its own runner was stopped; one that ended after its runner
did is recorded, not trained again. A recorded run's checkpoint is deleted (its metrics and results
stay): a grid's checkpoints would fill the disk.
Runs write to outputs/seeds/<grid>/<method>-s<seed>.
Every method of a grid gets the same seeds, so the same data order: comparisons are paired.
"""

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "seeds.jsonl"
RUNS = ROOT / "outputs" / "seeds"
README_RUN = "--dataset arithmetic --prompts-per-step 3 --max-completion-length 64"
# Figure 5's task: a + b - c up to 12, whose 370 held-out problems are all evaluated by every run
# (the same set, whatever the seed); 3 questions x 8 replies a step, as README's run.
FIGURE5 = """--dataset arithmetic3 --arithmetic-max 12 --eval-size 370 --prompts-per-step 3
    --max-completion-length 64 --learning-rate 5e-6 --log-samples-every 10"""
ONLINE_RFT = ["--advantage", "online_rft", "--beta", "0"]  # eq. 10: no KL term (--mu 1: no clip)
ANSWER_ONLY = ["--format-weight", "0"]  # the three methods on the same reward: Online RFT's
GRIDS = {
    "readme": {  # README's Results: 80 steps of 3 questions x 8 completions, sums to 49 + 49
        "settings": f"{README_RUN} --learning-rate 5e-6 --max-steps 80".split(),
        "methods": {"GRPO": []},
        "seeds": range(5),
    },
    "figure5": {  # the paper's Figure 5 in miniature, paired: every method on the same seeds
        "settings": [*FIGURE5.split(), "--max-steps", "80"],  # at 40 the curves still rose
        "first": 3,  # the paper's three methods over all seeds, then the two on the answer alone
        "methods": {
            "Online RFT": ONLINE_RFT,
            "GRPO, outcome": [],
            "GRPO, process": ["--supervision", "process"],
            "GRPO, outcome, answer only": ANSWER_ONLY,
            "GRPO, process, answer only": ["--supervision", "process", *ANSWER_ONLY],
        },
        "seeds": range(8),
    },
    "kl": {  # the KL of whole completions off policy (--mu 2): k1_is against k1_to_go, k3_ratio
        "settings": [*FIGURE5.split(), "--max-steps", "40", "--mu", "2"],
        "methods": {  # one strength: β weighs a token's KL, or a whole reply's (about 40 tokens)
            "k3_ratio": [],
            "k1_to_go, beta 0.001": ["--kl-estimator", "k1_to_go", "--beta", "0.001"],
            "k1_is, beta 0.001": ["--kl-estimator", "k1_is", "--beta", "0.001"],
        },
        "seeds": range(3),
    },
    "notebook": {  # the notebook's section 8 as a command: its spread over seeds
        "settings": f"{README_RUN} --learning-rate 5e-6 --max-steps 30 --eval-size 100".split(),
        "methods": {"GRPO": []},
        "seeds": range(3),
    },
}


def settings(flags: list[str]) -> dict[str, str]:
    """Flags as {flag: value}: every flag of a grid takes a value."""
    return dict(zip(flags[::2], flags[1::2]))


def done(grid: str, steps: int | None = None) -> dict[tuple[str, int], dict]:
    """The grid's recorded runs, by (method, seed): those run with the grid's settings as they are
    (a line of earlier settings stays in the file, as what it was, and is run again, as is one
    marked "superseded": its code changed since); with `steps`, those that ran the grid's settings
    for that many steps instead."""
    lines = RESULTS.read_text().splitlines() if RESULTS.exists() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    spec = GRIDS[grid]
    steps_now = {} if steps is None else {"--max-steps": str(steps)}
    return {
        (r["method"], r["seed"]): r
        for r in rows
        if r["grid"] == grid
        and r["method"] in spec["methods"]
        and "superseded" not in r
        and settings(r["flags"])
        == settings(spec["settings"]) | settings(spec["methods"][r["method"]]) | steps_now
    }


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
    flags = [*GRIDS[grid]["settings"], *GRIDS[grid]["methods"][method]]
    flags[flags.index("--max-steps") + 1] = str(results["steps"])  # what it ran, should they differ
    return {
        "grid": grid,
        "method": method,
        "seed": seed,
        "flags": flags,
        "before": results["before"],
        "after": results["after"],
        "sampled_accuracy": [m["accuracy"] for m in steps],
        "format_rate": [m["format_rate"] for m in steps],
        "kl": [m["kl"] for m in steps],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, threads {threads or 'default'}",
    }


def pending(grid: str) -> list[tuple[str, int]]:
    """The grid's runs not yet in the file, in the order they run: the grid's `first` methods over
    every seed, then the others (so the headline comparison fills in first, paired all along)."""
    spec, finished = GRIDS[grid], done(grid)
    methods = list(spec["methods"])
    first = spec.get("first", len(methods))
    stages = (methods[:first], methods[first:])
    return [
        (m, s) for stage in stages for s in spec["seeds"] for m in stage if (m, s) not in finished
    ]


def lock_of(out: Path) -> Path:
    """The lock file beside a run's folder (not `with_suffix`: "beta 0.001" has a dot in it)."""
    return out.parent / f"{out.name}.lock"


def holder(lock: Path) -> int | None:
    """The pid in a run's lock file, if that process is alive."""
    try:
        pid = int(lock.read_text())
        os.kill(pid, 0)  # raises where that process is gone
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def claim(out: Path) -> bool:
    """Whether this runner may take the run in `out`: a lock file beside it holds the pid of the
    process that trains it, so two runners never train into one folder, nor one into a folder
    whose run goes on after its runner was stopped."""
    lock = lock_of(out)
    if holder(lock):
        return False
    lock.unlink(missing_ok=True)  # left by a runner that was stopped
    try:
        with open(lock, "x") as f:
            f.write(str(os.getpid()))
    except FileExistsError:  # taken by another runner just now
        return False
    return True


class Held:
    """A run trained by a process this runner did not start (one that outlived its stopped runner,
    or another runner's): waited for as one of the `jobs`, until its lock's process has ended."""

    returncode = 0  # its own runner would have failed it: here only its results tell

    def __init__(self, lock: Path):
        self.lock = lock

    def poll(self) -> int | None:
        return None if holder(self.lock) else 0


def finished(grid: str, out: Path) -> bool:
    """Whether the run in `out` ran all of the grid's steps (results.json gets "steps" at the end;
    before that it holds the evaluation before training)."""
    results = out / "results.json"
    steps = int(settings(GRIDS[grid]["settings"])["--max-steps"])
    return results.exists() and json.loads(results.read_text()).get("steps") == steps


def save(grid: str, method: str, seed: int, out: Path, threads: int | None) -> None:
    """Append a finished run's line to the results file, then free its checkpoints' disk."""
    with RESULTS.open("a") as f:
        f.write(json.dumps(record(grid, method, seed, threads)) + "\n")
    for checkpoint in out.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)  # 1.5 GB a run: a grid's would not fit on the disk
    lock_of(out).unlink(missing_ok=True)
    print(f"{grid} {method} seed {seed}: recorded in {RESULTS.name}", flush=True)


def run_grid(model: str, grid: str, jobs: int, threads: int | None) -> None:
    """Up to `jobs` runs at a time, a new one started as soon as one ends; each recorded on its end.
    A run that another process trains is waited for: recorded if it ends finished and its own
    runner did not record it, else taken on from its checkpoint."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    todo, running, failed = pending(grid), {}, []
    todo.sort(key=lambda run: not holder(lock_of(run_dir(grid, *run))))  # held: first
    while todo or running:
        while todo and len(running) < jobs:
            method, seed = todo.pop(0)
            out = run_dir(grid, method, seed)
            out.parent.mkdir(parents=True, exist_ok=True)
            if (method, seed) in done(grid):  # recorded by another runner since we started
                continue
            if not holder(lock_of(out)) and finished(grid, out):  # ended after its runner did
                save(grid, method, seed, out, threads)
                continue
            if not claim(out):
                print(f"{grid} {method} seed {seed}: trained by another process, waited for")
                running[Held(lock_of(out))] = (method, seed, out)
                continue
            log = open(out.parent / f"{out.name}.log", "a")
            cmd = command(model, grid, method, seed)
            process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            lock_of(out).write_text(str(process.pid))  # the run's own: it outlives us
            running[process] = (method, seed, out)
        time.sleep(5)
        for process in [p for p in running if p.poll() is not None]:
            method, seed, out = running.pop(process)
            if isinstance(process, Held) and (method, seed) in done(grid):
                continue  # recorded by the runner that started it
            if isinstance(process, Held) and not finished(grid, out):
                todo.insert(0, (method, seed))  # cut off: taken on from its checkpoint
                continue
            lock_of(out).unlink(missing_ok=True)
            if process.returncode:
                failed.append(f"{grid} {method} seed {seed}: {out}.log")
                continue
            save(grid, method, seed, out, threads)
    if failed:
        sys.exit("failed, see the logs:\n" + "\n".join(failed))


def bootstrap_mean(values: list[float], draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval of the mean of `values`."""
    rng = random.Random(seed)
    means = sorted(statistics.mean(rng.choices(values, k=len(values))) for _ in range(draws))
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def interval(values: list[float]) -> str:
    """The mean and its 95% bootstrap interval, as "mean [low, high]"."""
    if len(values) == 1:
        return f"{values[0]:.1f} (one seed: no interval)"
    low, high = bootstrap_mean(values)
    return f"{statistics.mean(values):.1f} [{low:.1f}, {high:.1f}]"


FIGURES = {  # what each run gives, in points: greedy before and after, sampled over the last steps
    "greedy before": lambda r: 100 * r["before"]["accuracy"],
    "greedy after": lambda r: 100 * r["after"]["accuracy"],
    "format before": lambda r: 100 * r["before"]["format_rate"],
    "format after": lambda r: 100 * r["after"]["format_rate"],
    "sampled, first 5 steps": lambda r: 100 * statistics.mean(r["sampled_accuracy"][:5]),
    "sampled, last 5 steps": lambda r: 100 * statistics.mean(r["sampled_accuracy"][-5:]),
    "KL, last 5 steps (x100)": lambda r: 100 * statistics.mean(r["kl"][-5:]),
    "KL, largest step (x100)": lambda r: 100 * max(r["kl"]),
}


def report(grid: str, steps: int | None = None) -> None:
    """Each run's figures; per method, each figure's mean over seeds with a 95% bootstrap interval;
    then each pair of methods' paired differences (the same seeds: the same data order and questions)."""
    rows = done(grid, steps)
    runs = {m: {s: r for (m2, s), r in rows.items() if m2 == m} for m in GRIDS[grid]["methods"]}
    runs = {m: r for m, r in runs.items() if r}
    print("| method | seed | " + " | ".join(FIGURES) + " |")
    print("|---|---|" + "---|" * len(FIGURES))
    for method, by_seed in runs.items():
        for seed, r in sorted(by_seed.items()):
            print(
                f"| {method} | {seed} | "
                + " | ".join(f"{f(r):.1f}" for f in FIGURES.values())
                + " |"
            )
    print("\n| method | seeds | " + " | ".join(FIGURES) + " |")
    print("|---|---|" + "---|" * len(FIGURES))
    for method, by_seed in runs.items():
        cells = [interval([f(r) for r in by_seed.values()]) for f in FIGURES.values()]
        print(f"| {method} | {len(by_seed)} | " + " | ".join(cells) + " |")
    pairs = [(a, b) for i, a in enumerate(runs) for b in list(runs)[i + 1 :]]
    if pairs:
        print("\n| paired difference, A - B | seeds | " + " | ".join(FIGURES) + " |")
        print("|---|---|" + "---|" * len(FIGURES))
    for a, b in pairs:
        seeds = sorted(set(runs[a]) & set(runs[b]))
        if seeds:
            cells = [
                interval([f(runs[a][s]) - f(runs[b][s]) for s in seeds]) for f in FIGURES.values()
            ]
            print(f"| {a} - {b} | {len(seeds)} | " + " | ".join(cells) + " |")
    for name in ("greedy after", "sampled, last 5 steps") if len(runs) > 1 else ():
        print(f"\n{name}: {order(runs, FIGURES[name])}")


def order(runs: dict[str, dict[int, dict]], figure) -> str:
    """The methods from best to worst by their mean: `>` where every method before it is above every
    method after it, each pair's paired 95% interval excluding 0 (settled at this scale), `~`
    elsewhere; then, in brackets, each settled pair that the chain does not show."""
    mean = {m: statistics.mean(figure(r) for r in by_seed.values()) for m, by_seed in runs.items()}
    ranked = sorted(mean, key=mean.get, reverse=True)

    def above(a: str, b: str) -> bool:
        seeds = sorted(set(runs[a]) & set(runs[b]))
        gaps = [figure(runs[a][s]) - figure(runs[b][s]) for s in seeds]
        return len(gaps) > 1 and bootstrap_mean(gaps)[0] > 0

    settled = {(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1 :] if above(a, b)}
    cuts = [
        all((a, b) in settled for a in ranked[:i] for b in ranked[i:])
        for i in range(1, len(ranked))
    ]
    text = ranked[0] + "".join(f" {'>' if cut else '~'} {m}" for cut, m in zip(cuts, ranked[1:]))
    hidden = [
        f"{a} > {b}"
        for i, a in enumerate(ranked)
        for j, b in enumerate(ranked[i + 1 :], i + 1)
        if not any(cuts[i:j]) and (a, b) in settled
    ]
    return text + (f" (and {'; '.join(hidden)})" if hidden else "")


WINDOW = 5  # steps in the curves' running mean


def running_mean(values: list[float], window: int) -> list[float]:
    return [statistics.mean(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def draw(grid: str, path: str, steps: int | None = None) -> None:
    """Sampled accuracy and the strict-format rate per step: a line per method (the mean over
    seeds), its 95% bootstrap interval shaded."""
    from matplotlib.figure import Figure

    rows = done(grid, steps)
    fig = Figure(figsize=(10, 3.6), dpi=80, layout="tight")
    axes = fig.subplots(1, 2)
    for method in GRIDS[grid]["methods"]:
        runs = [r for (m, _), r in sorted(rows.items()) if m == method]
        for ax, key in zip(axes, ("sampled_accuracy", "format_rate")):
            if not runs:
                continue
            smooth = [running_mean(r[key], WINDOW) for r in runs]  # 24 replies a step: noisy
            curves = list(zip(*smooth))  # per step: one value per seed
            steps = range(1, len(curves) + 1)
            mean = [statistics.mean(c) for c in curves]
            low, high = zip(*(bootstrap_mean(list(c), draws=2000) for c in curves))
            ax.plot(steps, mean, label=f"{method} ({len(runs)} seed{'s' * (len(runs) > 1)})")
            ax.fill_between(steps, low, high, alpha=0.2)
    titles = (
        f"sampled accuracy (T = 1), {WINDOW}-step mean",
        f"strict-format rate, {WINDOW}-step mean",
    )
    for ax, title in zip(axes, titles):
        ax.set(title=title, xlabel="step")
    axes[0].legend(fontsize=7)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", help="the chat model's folder (SmolLM2-135M-Instruct)")
    parser.add_argument("--grid", choices=GRIDS, required=True)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, help="torch threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--report", action="store_true", help="only print the table from the file")
    parser.add_argument("--figure", help="also draw the curves into this PNG")
    parser.add_argument(
        "--steps", type=int, help="report the runs recorded at this --max-steps (an earlier stage)"
    )
    args = parser.parse_args()
    if not args.report:
        if not args.model:
            parser.error("the model's folder is needed to run (or pass --report)")
        run_grid(args.model, args.grid, args.jobs, args.threads)
    report(args.grid, args.steps)
    if args.figure:
        draw(args.grid, args.figure, args.steps)


if __name__ == "__main__":
    main()
