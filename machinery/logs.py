"""What a run writes: JSON lines, results.json, curves.png, and a note said once."""

import functools
import json
from dataclasses import asdict
from pathlib import Path

say_once = functools.cache(print)


def read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def append_jsonl(path: Path, records: list[dict], mode: str = "a") -> None:
    with path.open(mode) as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def log_samples(cfg, step: int, row: dict, texts: list[str], rewards) -> None:
    """Two completions of the step's first question in samples.jsonl, every N steps, the last."""
    if cfg.log_samples_every and (step % cfg.log_samples_every == 0 or step == cfg.max_steps):
        records = [
            {
                "step": step,
                "question": row["question"],
                "gold": row["answer"],
                "completion": text,
                "reward": reward.item(),
            }
            for text, reward in zip(texts[:2], rewards)
        ]
        append_jsonl(Path(cfg.output_dir) / "samples.jsonl", records)


def write_results(cfg, results: dict) -> dict:
    """results.json: the results so far, each diagnostic said, and the run's config."""
    metrics = read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")
    results["diagnostics"] = {
        name: f"step {m['step']}: {text}"
        for m in metrics
        for name, text in m.get("diagnostics", {}).items()
    }
    results["config"] = asdict(cfg)
    (Path(cfg.output_dir) / "results.json").write_text(json.dumps(results, indent=2))
    return results


PANELS = {
    "reward/total": "mean reward",
    "accuracy format_rate": "accuracy (answer = 1), format rate (strict)",
    "kl": "KL(policy || reference), log scale",
    "completion/len_mean": "mean completion length (tokens)",
    "entropy": "policy entropy per token (nats, at the sampling temperature)",
    "grad_norm": "gradient norm (before clipping)",
}


def plot_curves(metrics_path: Path, out_path: Path):
    """Reward, accuracy and format rate, KL, completion length per step from metrics.jsonl."""
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's plotting backend alone

    records = read_jsonl(metrics_path)
    if not records:  # no step yet: no picture
        return None
    fig = Figure(figsize=(9, 9), dpi=80, layout="tight")
    for ax, (keys, title) in zip(fig.subplots(3, 2).flat, PANELS.items()):
        for key in keys.split():
            ax.plot([r["step"] for r in records], [r.get(key) for r in records], label=key)
        ax.set(title=title, xlabel="step")
        if keys == "kl":  # one spike would flatten the rest; symlog: 0 and negative k1 drawn too
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.xaxis.get_major_locator().set_params(integer=True)  # no step 1.5
        ax.legend()
    fig.savefig(out_path)
    return fig
