"""Checkpoints, resume, and the two ways a run stops early: Ctrl-C (the step finishes, then a
save) and a NaN (the last good checkpoint stays)."""

import json
import shutil
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from machinery.devices import GPUS
from machinery.flags import flag, require
from machinery.logs import append_jsonl, plot_curves, read_jsonl

# What --resume may change (length, step size, machine, memory, logs); the rest is the run's own.
CHANGEABLE_ON_RESUME = """resume max_steps output_dir learning_rate weight_decay max_grad_norm
    micro_batch_size gradient_checkpointing precision logp_chunk_size device compile
    trust_remote_code eval_batch_size log_samples_every save_every""".split()


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted(output_dir.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def run_config(output_dir: Path) -> dict:
    """The settings of the run in output_dir: its latest checkpoint's, else results.json's."""
    latest = latest_checkpoint(output_dir)
    path = latest / "trainer_state.json" if latest else output_dir / "results.json"
    return json.loads(path.read_text()).get("config") or {} if path.exists() else {}


def finished(output_dir: Path, step: int) -> bool:
    """Whether the run ended at `step`: its final checkpoint saved and evaluated (train writes
    "steps" last); a run stopped in its last step, or in the final evaluation, has not."""
    path = output_dir / "results.json"
    return path.exists() and json.loads(path.read_text()).get("steps") == step


def check_output_dir(cfg) -> None:
    """A fresh output_dir; with --resume, a run there of the same settings but CHANGEABLE's, with
    steps to go or not finished (a run stopped in its last step is finished by --resume)."""
    out = Path(cfg.output_dir)
    require(
        not out.exists() or out.is_dir(),
        f"--output-dir {out} is a file. Pass a folder: a new one, or a run's to --resume.",
    )
    latest = latest_checkpoint(out)
    started = latest is not None or (out / "metrics.jsonl").exists()
    from_zero = " (no checkpoint yet: from step 0)" if latest is None else ""
    require(
        cfg.resume or not started,
        f"{out} already holds a run. Pass --resume to go on{from_zero}, or another --output-dir.",
    )
    require(
        started or not cfg.resume,
        f"--resume: {out} holds no run (no checkpoint-*, no metrics.jsonl). Drop --resume to "
        "start a new run there.",
    )
    run = run_config(out) if cfg.resume else {}
    step = json.loads((latest / "trainer_state.json").read_text())["step"] if latest else 0
    require(
        cfg.max_steps > step or (cfg.max_steps == step and not finished(out, step)),
        f"--resume: the run in {out} is already at step {step}; pass a larger --max-steps.",
    )
    differ = [
        f"{flag(name)} {value!r} (now {getattr(cfg, name)!r})"
        for name, value in run.items()
        if name not in CHANGEABLE_ON_RESUME and value != getattr(cfg, name, value)
    ]
    require(
        not differ,
        f"--resume: the run in {out} has {', '.join(differ)}. Pass the run's own values, or "
        "choose another --output-dir for a new run.",
    )
    for name in CHANGEABLE_ON_RESUME[1:]:  # not "resume"
        if run.get(name, getattr(cfg, name)) != getattr(cfg, name):
            print(f"--resume: {flag(name)} {run[name]!r} -> {getattr(cfg, name)!r}")


def save_checkpoint(output_dir: Path, step: int, policy, reference, tokenizer, optimizer, cfg):
    """checkpoint-<step> (weights or adapter, tokenizer, optimizer, RNG), then the old one goes."""
    path = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)  # safetensors; only the adapter with LoRA
    tokenizer.save_pretrained(tmp)
    if reference is not None and cfg.ref_sync_every:
        reference.save_pretrained(tmp / "reference")
    rng = {"torch": torch.get_rng_state()}  # and each GPU's (the one in use)
    rng.update({kind: gpu.get_rng_state() for kind, gpu in GPUS.items() if gpu.is_available()})
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp / "trainer_state.pt")
    state = {"step": step, "config": asdict(cfg)}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    old = latest_checkpoint(output_dir)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    if old is not None and old != path:
        shutil.rmtree(old)
    return path


def resume_run(cfg, checkpoint_dir: Path | None, optimizer) -> tuple[int, dict]:
    """(first step, results so far) from a checkpoint, or (0, {}); later logged steps go."""
    output_dir = Path(cfg.output_dir)
    step = 0
    results = {}
    output_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint_dir is not None:  # map_location: a GPU's checkpoint resumes on a CPU too
        state = torch.load(checkpoint_dir / "trainer_state.pt", "cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # the saved state holds the old values; flags win
            group.update(lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        torch.set_rng_state(state["rng"]["torch"])
        for kind, gpu in GPUS.items():  # a GPU's, where the run goes on on the same kind of GPU
            if kind in state["rng"] and gpu.is_available():
                gpu.set_rng_state(state["rng"][kind])
        step = json.loads((checkpoint_dir / "trainer_state.json").read_text())["step"]
        results = json.loads((output_dir / "results.json").read_text())
    if cfg.resume:
        print(f"resuming from {checkpoint_dir or 'no checkpoint yet: the start'} at step {step}")
    for path in (output_dir / "metrics.jsonl", output_dir / "samples.jsonl"):  # to be run again
        if path.exists():  # (no checkpoint: all of it)
            append_jsonl(path, [r for r in read_jsonl(path) if r["step"] <= step], mode="w")
    return step, results


def until_ctrl_c(steps):
    """Yield `steps`; Ctrl-C only sets a flag, read between steps (twice: stop now, unsaved)."""
    pressed = []

    def on_ctrl_c(signum, frame):
        if pressed:
            raise SystemExit("\nstopped unsaved: --resume goes on from the last save, or step 0")
        pressed.append(signum)
        print("\nCtrl-C: saving when this step ends (Ctrl-C again: stop now, without saving)")

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        for step in steps:  # (asking `steps` for the next one counts the step before as done)
            if pressed:  # the step before is whole: the loop's Ctrl-C handling saves it
                raise KeyboardInterrupt
            yield step
        if pressed:  # in the last step
            raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_run(output_dir: Path, completed: int, reason: BaseException, *to_save) -> None:
    """Exit on a NaN (keeping the last good checkpoint) or on Ctrl-C (saving the steps done)."""
    if isinstance(reason, FloatingPointError):
        last_good = latest_checkpoint(output_dir) or "none yet: step 0"
        sys.exit(
            f"step {completed + 1}: {reason} --resume goes on from the last good checkpoint "
            f"({last_good})."
        )
    path = save_checkpoint(output_dir, completed, *to_save)
    plot_curves(output_dir / "metrics.jsonl", output_dir / "curves.png")
    sys.exit(f"\ninterrupted: saved {path}; continue with --resume --output-dir {output_dir}")


def said_on_ctrl_c(cfg) -> str:
    """One line for a Ctrl-C outside the training loop (loading, an evaluation): what is kept,
    and the command that goes on from it."""
    if cfg is None:
        return "\ninterrupted: nothing was started."
    out = Path(cfg.output_dir)
    latest = latest_checkpoint(out) if out.is_dir() else None
    if latest is None:
        return "\ninterrupted before the first step: nothing to keep. Run the command again."
    step = int(latest.name.split("-")[1])
    if step >= cfg.max_steps:
        return (
            f"\ninterrupted: the weights of all {step} steps are saved in {latest}; "
            f"--resume --output-dir {out} evaluates them and finishes the run."
        )
    return f"\ninterrupted: {latest} is kept; continue with --resume --output-dir {out}"
