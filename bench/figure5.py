"""
The paper's Figure 5 in miniature: Online RFT, GRPO with outcome supervision and GRPO with process
supervision, the same budget each, two seeds, on the built-in task where steps matter
(`arithmetic3`: a + b - c, numbers up to 9); then the KL of whole completions (`k1_to_go`) against
the default `k3_ratio` on one run of outcome supervision.

    python bench/figure5.py SMOLLM2_FOLDER --out /tmp/fig5 --parallel 2 --threads 1 \\
        --figure assets/figure5-miniature.png

Each run is `grpo.py --model SMOLLM2_FOLDER` with SETTINGS, `--seed S`, its method's flags and
`--output-dir OUT/<method>-seedS`; a folder that already holds a finished run is read, not run
again. Prints one markdown table; draws the sampled accuracy per step, a line per method.
"""

import json
import statistics
from pathlib import Path

from kl_estimators import run_all, runs_parser

SETTINGS = [
    "--dataset",
    "arithmetic3",
    "--arithmetic-max",
    "9",
    "--prompts-per-step",
    "3",
    "--max-completion-length",
    "64",
    "--learning-rate",
    "5e-6",
    "--max-steps",
    "25",
    "--save-every",
    "0",
    "--eval-size",
    "100",
    "--log-samples-every",
    "5",
]
METHODS = {
    "Online RFT": ["--advantage", "online_rft"],
    "GRPO, outcome": [],
    "GRPO, process": ["--supervision", "process"],
}
SEEDS, LAST = (0, 1), 5  # the table's "last" steps


def folder(method: str, seed: int) -> str:
    return f"{method.lower().replace(', ', '-').replace(' ', '_')}-seed{seed}"


def runs() -> dict[str, list[str]]:
    """The six runs of the figure, then the KL option's run (seed 0): in pairs of like length."""
    todo = {
        folder(m, s): [*SETTINGS, "--seed", str(s), *flags]
        for s in SEEDS
        for m, flags in METHODS.items()
    }
    todo["kl_to_go-seed0"] = [*SETTINGS, "--seed", "0", "--kl-estimator", "k1_to_go"]
    return todo


def summary(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = steps[-LAST:]

    def mean(key):
        return statistics.mean(m[key] for m in last)

    return {
        "greedy held-out accuracy, before": results["before"]["accuracy"],
        "greedy held-out accuracy, after": results["after"]["accuracy"],
        "greedy strict-format rate, after": results["after"]["format_rate"],
        f"sampled accuracy, first {LAST} steps": statistics.mean(
            m["accuracy"] for m in steps[:LAST]
        ),
        f"sampled accuracy, last {LAST} steps": mean("accuracy"),
        f"steps per reply, last {LAST} (first {LAST})": (
            mean("steps/per_reply"),
            statistics.mean(m["steps/per_reply"] for m in steps[:LAST]),
        ),
        f"steps that hold, last {LAST}": mean("steps/hold_frac"),
        f"repeated steps, last {LAST}": mean("steps/repeated_frac"),
        f"KL per token, last {LAST}; largest": (mean("kl"), max(m["kl"] for m in steps)),
        "accuracy": [m["accuracy"] for m in steps],
        "format_rate": [m["format_rate"] for m in steps],
    }


def cell(key: str, values: list) -> str:
    if isinstance(values[0], tuple):
        return "; ".join(cell(key, [v[i] for v in values]) for i in range(len(values[0])))
    fmt = (
        (lambda v: f"{v:.2f}")
        if key.startswith(("steps per", "KL"))
        else (lambda v: f"{100 * v:.1f}%")
    )
    fmt = (lambda v: f"{v:.4f}") if key.startswith("KL") else fmt
    return (
        f"{fmt(statistics.mean(values))} ({', '.join(map(fmt, values))})"
        if len(values) > 1
        else fmt(values[0])
    )


def draw(table: dict[str, list[dict]], path: Path, smooth: int = 5) -> None:
    """Sampled accuracy and strict-format rate per step (moving means over `smooth` steps), a line per method,
    a style per seed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=80, layout="tight")
    for ax, key in zip(fig.subplots(1, 2), ("accuracy", "format_rate")):
        for color, (method, seeds) in zip(
            ("tab:gray", "tab:blue", "tab:orange", "tab:green"), table.items()
        ):
            for style, run in zip(("-", ":"), seeds):
                values = run[key]
                smoothed = [
                    statistics.mean(values[max(0, i - smooth + 1) : i + 1])
                    for i in range(len(values))
                ]
                ax.plot(
                    range(1, len(values) + 1),
                    smoothed,
                    style,
                    color=color,
                    label=method * (style == "-"),
                )
        what = "strict-format rate" if key == "format_rate" else "accuracy"
        ax.set(
            title=f"sampled {what}, mean of {smooth} steps",
            xlabel="step (3 questions x 8 replies)",
            ylim=(0, 1),
        )
    ax.legend(title="seed 0 solid, seed 1 dotted", fontsize=8)
    fig.suptitle("arithmetic3 (a + b - c, numbers up to 9), SmolLM2-135M-Instruct")
    fig.savefig(path)


def main():
    parser = runs_parser(__doc__, "seven")
    parser.add_argument("--figure", type=Path, help="where to draw the accuracy per step (PNG)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_all(args.model, out, runs(), args.parallel, args.threads)
    table = {m: [summary(out / folder(m, s)) for s in SEEDS] for m in METHODS}
    table["GRPO, outcome, k1_to_go"] = [summary(out / "kl_to_go-seed0")]
    print("| measure: mean (seed 0, seed 1) | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for key in table["GRPO, outcome"][0]:
        if key not in ("accuracy", "format_rate"):  # the per-step lists: drawn, not tabled
            print(
                f"| {key} | "
                + " | ".join(cell(key, [r[key] for r in rs]) for rs in table.values())
                + " |"
            )
    if args.figure:
        draw(table, args.figure)


if __name__ == "__main__":
    main()
