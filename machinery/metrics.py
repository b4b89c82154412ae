"""One line of metrics.jsonl per step (README: Reading the metrics), and the silent failures of a
run, each said once, with what it means and what to do."""

from pathlib import Path

import torch

from machinery.devices import peak_memory_mb
from machinery.logs import append_jsonl, read_jsonl

PATIENCE = 3  # steps in a row
MOST = 0.5  # a fraction of the batch
KL_LIMIT = 0.5  # KL per token
ENTROPY_FLOOR = 0.05  # nats per token: a policy that samples nearly the same reply each time
DIAGNOSTICS = {  # name: (steps in a row, condition, what it means and what to do)
    "truncated": (
        PATIENCE,
        lambda m: m["completion/truncated_frac"] > MOST,
        "most completions end unfinished: raise --max-completion-length, or check the "
        "end-of-reply ids.",
    ),
    "equal_rewards": (
        PATIENCE,
        lambda m: m["groups/zero_std_frac"] > MOST,
        "most groups have equal rewards: the task is too easy or too hard. Raise G, or change "
        "data.",
    ),
    "no_format": (
        PATIENCE,
        lambda m: m["reward/format"] == 0,
        "the format reward is 0: the model never writes the tags. Keep --example-turn, or change "
        "the prompt.",
    ),
    "zero_gradient": (
        PATIENCE,
        lambda m: m["grad_norm"] == 0,
        "the gradient is 0: the weights do not change. No group has an advantage, or nothing is "
        "trainable.",
    ),
    "entropy": (
        PATIENCE,
        lambda m: m.get("entropy", ENTROPY_FLOOR) < ENTROPY_FLOOR,
        f"the policy's entropy fell below {ENTROPY_FLOOR} nats per token: it samples nearly one "
        "reply per question, its groups stop differing and Â goes to 0 (entropy collapse). Raise "
        "--epsilon-high (0.28: DAPO's clip-higher), --temperature or --beta.",
    ),
    "kl": (
        1,
        lambda m: m["kl"] > KL_LIMIT,
        f"the KL passed {KL_LIMIT} per token: the policy drifts from the reference. Lower "
        "--learning-rate or raise --beta.",
    ),
}


def require_finite(value: torch.Tensor, what: str) -> None:
    if not torch.isfinite(value):
        raise FloatingPointError(f"{what} is not finite. Lower --learning-rate, or use fp32.")


def step_metrics(rollout, rewards, components, group_size: int, update, task_metrics, optimizer):
    """One line of metrics.jsonl: rewards, accuracy, format, groups, lengths, the task's own
    metrics, the update's (loss, grad norm, [(tokens, diagnostics)]) with the diagnostics
    token-weighted over micro-batches and passes."""
    loss, grad_norm, diagnostics = update
    lengths = rollout.completion_mask.sum(dim=1).float()  # [B]
    grouped = rewards.view(-1, group_size)  # [P, G]
    tokens = max(sum(n for n, _ in diagnostics), 1)  # (0: every reply masked as truncated)
    parts = {"total": rewards, **components}
    return {
        **{f"reward/{name}": r.mean().item() for name, r in parts.items()},
        **{f"reward/{name}_std": r.std().item() for name, r in parts.items()},
        "accuracy": (components["answer"] == 1).float().mean().item(),
        "format_rate": (components["format"] == 1).float().mean().item(),  # strictly formatted
        "groups/zero_std_frac": (grouped == grouped[:, :1]).all(dim=1).float().mean().item(),
        "completion/len_mean": lengths.mean().item(),
        "completion/len_max": lengths.max().item(),
        "completion/truncated_frac": rollout.truncated.float().mean().item(),
        **task_metrics,
        "loss": loss,
        "grad_norm": grad_norm,  # the mean over the step's optimizer steps
        "lr": optimizer.param_groups[0]["lr"],
        **{key: sum(n * d[key] for n, d in diagnostics) / tokens for key in diagnostics[0][1]},
        "memory/peak_mb": peak_memory_mb(rollout.completion_ids.device),
    }


def log_step(output_dir: Path, step: int, metrics: dict, bar) -> None:
    """Append the step's metrics, saying each diagnostic the first time its condition holds."""
    history = [*read_jsonl(output_dir / "metrics.jsonl"), metrics]
    said = {name for m in history[:-1] for name in m.get("diagnostics", {})}
    for name, (steps, holds, message) in DIAGNOSTICS.items():
        if name not in said and len(history) >= steps and all(map(holds, history[-steps:])):
            metrics.setdefault("diagnostics", {})[name] = message
            bar.write(f"step {step}: {message}")
    append_jsonl(output_dir / "metrics.jsonl", [{"step": step, **metrics}])
    bar.set_postfix(  # drawn at the bar's own pace
        reward=f"{metrics['reward/total']:.3f}",
        acc=f"{metrics['accuracy']:.2f}",
        kl=f"{metrics['kl']:.4f}",
        refresh=False,
    )
