"""
Checkpoints and resume (machinery/checkpoints.py): Ctrl-C anywhere, a NaN, a crash; each step once.
"""

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

# Before huggingface_hub reads it (at import): the tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
import pytest  # noqa: E402
import torch  # noqa: E402

import grpo  # noqa: E402
from machinery import checkpoints, devices, logs, metrics  # noqa: E402
from machinery.flags import ConfigError  # noqa: E402
from tests.conftest import run_cli, run_main, tiny_config  # noqa: E402


@pytest.mark.slow
def test_end_to_end_then_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    common = [
        "--model",
        str(tiny_model_dir),
        "--dataset",
        "arithmetic",
        "--output-dir",
        str(out),
        "--prompts-per-step",
        "2",
        "--num-generations",
        "4",
        "--max-completion-length",
        "8",
        "--micro-batch-size",
        "4",
        "--eval-size",
        "4",
        "--save-every",
        "1",
        "--log-samples-every",
        "1",
        "--device",
        "cpu",
    ]
    first = run_cli(*common, "--max-steps", "2")
    assert first.returncode == 0, first.stderr
    metrics = logs.read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for key in (
        "reward/total",
        "reward/format",
        "reward/answer",
        "accuracy",
        "groups/zero_std_frac",
        "completion/len_mean",
        "completion/truncated_frac",
        "kl",
        "clip/low_frac",
        "clip/high_frac",
        "loss",
        "grad_norm",
        "lr",
        "time/generate",
        "time/score",
        "time/logps",
        "time/update",
        "memory/peak_mb",
    ):
        assert key in metrics[0], key
    assert (out / "checkpoint-2" / "model.safetensors").exists() and not (
        out / "checkpoint-1"
    ).exists()
    assert (out / "curves.png").stat().st_size > 1000
    assert len(logs.read_jsonl(out / "samples.jsonl")) == 4
    results = json.loads((out / "results.json").read_text())
    assert set(results["before"]) == {"accuracy", "format_rate", "n"} and results["after"]["n"] == 4

    again = run_main(
        *common, "--max-steps", "2"
    )  # a second run into the same folder would mix two runs
    assert again.returncode != 0 and "already holds a run" in again.stderr

    resumed = run_main(*common, "--max-steps", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert [m["step"] for m in logs.read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert (out / "checkpoint-3").exists() and not (out / "checkpoint-2").exists()
    assert json.loads((out / "results.json").read_text())["before"] == results["before"]
    done = run_main(*common, "--max-steps", "3", "--resume")
    assert done.returncode != 0 and "already at step 3; pass a larger --max-steps" in done.stderr


def test_a_run_without_a_checkpoint_starts_again_with_resume(tiny_model_dir, tmp_path, capsys):
    """A run stopped before its first checkpoint (a kill, a crash, Ctrl-C twice) left metrics.jsonl and no
    checkpoint: a new run there is refused with --resume as the way on, and --resume starts it again from step 0,
    each log holding each step once."""
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=2, eval_size=0, save_every=0)
    grpo.train(cfg)
    shutil.rmtree(Path(cfg.output_dir) / "checkpoint-2")  # as if killed before the end
    with pytest.raises(
        ConfigError,
        match=r"Pass --resume to go on \(no checkpoint yet: from step 0\), or another --output-dir\.",
    ):
        grpo.train(cfg)
    capsys.readouterr()
    grpo.train(replace(cfg, resume=True))
    assert "resuming from no checkpoint yet: the start at step 0" in capsys.readouterr().out
    assert [m["step"] for m in logs.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in logs.read_jsonl(Path(cfg.output_dir) / "samples.jsonl")] == [
        1,
        1,
        2,
        2,
    ]
    with pytest.raises(ConfigError, match="holds no run"):
        grpo.train(replace(cfg, output_dir=str(tmp_path / "nothing"), resume=True))


def test_resume_keeps_the_runs_own_flags_and_prints_a_change(tiny_model_dir, tmp_path):
    """`--resume --output-dir X` (as the interrupt message prints it) continues the run as it was: a flag not typed
    keeps the run's value (the learning rate among them); a typed change is printed."""
    out = tmp_path / "run"
    first = run_main(
        "--model",
        str(tiny_model_dir),
        "--dataset",
        "arithmetic",
        "--output-dir",
        str(out),
        "--prompts-per-step",
        "2",
        "--num-generations",
        "4",
        "--max-completion-length",
        "8",
        "--micro-batch-size",
        "4",
        "--eval-size",
        "0",
        "--learning-rate",
        "5e-6",
        "--max-steps",
        "1",
        "--log-samples-every",
        "0",
        "--device",
        "cpu",
    )
    assert first.returncode == 0, first.stderr
    state_file = (
        out / "checkpoint-1" / "trainer_state.json"
    )  # a flag of an older grpo.py, since retired
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "config": {**state["config"], "retired_flag": 1}}))
    again = run_main("--resume", "--output-dir", str(out), "--max-steps", "2")
    assert again.returncode == 0, again.stderr
    assert (
        "--resume: --learning-rate" not in again.stdout
        and "--resume: --max-steps 1 -> 2" in again.stdout
    )
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["learning_rate"] == 5e-6 and results["config"]["model"] == str(
        tiny_model_dir
    )
    changed = run_main(
        "--resume", "--output-dir", str(out), "--max-steps", "3", "--learning-rate", "1e-5"
    )
    assert changed.returncode == 0, changed.stderr
    assert "--resume: --learning-rate 5e-06 -> 1e-05" in changed.stdout
    assert [m["lr"] for m in logs.read_jsonl(out / "metrics.jsonl")] == [5e-6, 5e-6, 1e-5]
    assert not (
        out / "samples.jsonl"
    ).exists()  # --log-samples-every 0: none, and no empty file from a resume


def test_resume_continues_the_same_run(tiny_model_dir, tmp_path):
    """Stopping after step 2 and resuming gives the same step 3 as running 3 steps straight."""
    straight = tiny_config(
        tiny_model_dir, tmp_path, output_dir=str(tmp_path / "straight"), max_steps=3, eval_size=0
    )
    stopped = replace(straight, output_dir=str(tmp_path / "stopped"), max_steps=2)
    grpo.train(straight)
    grpo.train(stopped)
    grpo.train(replace(stopped, max_steps=3, resume=True))
    a, b = (logs.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl") for cfg in (straight, stopped))
    # Same data, sampling (RNG restored), weights and optimizer state, the same float32 operations on the same CPU
    # kernels in one process: equal, not only close (as the Ctrl-C grid checks). Times and memory vary.
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))}  # noqa: E731
    assert drop(a[2]) == drop(b[2])


def test_resume_refuses_other_settings_but_takes_a_new_learning_rate(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=1, eval_size=0)
    grpo.train(cfg)
    with pytest.raises(
        ConfigError,
        match=r"has --seed 0 \(now 1\), --lora-r 0 \(now 4\)\. Pass the run's own values",
    ):
        grpo.train(replace(cfg, max_steps=2, resume=True, seed=1, lora_r=4))
    grpo.train(
        replace(cfg, max_steps=2, resume=True, learning_rate=0.125, gradient_checkpointing=True)
    )
    # The optimizer's saved state holds lr 1e-6; the flag must win (as after a NaN: "Lower --learning-rate").
    assert [m["lr"] for m in logs.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")] == [
        cfg.learning_rate,
        0.125,
    ]


def test_a_checkpoint_saved_on_a_gpu_resumes_without_one(tiny_model_dir, tmp_path, monkeypatch):
    """A GPU run saves AdamW's state as CUDA tensors. Write the checkpoint as such a run would (every
    storage tagged cuda:0), then resume it here."""
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=1, eval_size=0)
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        grpo.train(cfg)
    if (
        not torch.cuda.is_available()
    ):  # the file really asks for a GPU: a plain torch.load fails here
        with pytest.raises(RuntimeError, match="CUDA device"):
            torch.load(
                Path(cfg.output_dir) / "checkpoint-1" / "trainer_state.pt", weights_only=True
            )
    grpo.train(replace(cfg, max_steps=2, resume=True))
    assert [m["step"] for m in logs.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")] == [1, 2]


def test_on_mps_the_random_state_is_checkpointed_the_clock_waits_and_no_peak_is_made_up(
    tiny_model_dir, tmp_path, monkeypatch
):
    """No Mac here: torch's MPS functions replaced by stand-ins that record their calls. A run saves the
    MPS generator's state and a resume restores it (as CUDA's); `timed` waits for MPS before reading the
    clock; peak memory on MPS is null (torch keeps no peak there), not the CPU's resident memory, nor NaN."""
    real_peak = devices.peak_memory_mb
    state, restored, waits = torch.arange(8, dtype=torch.uint8), [], []
    monkeypatch.setattr(torch.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: state.clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waits.append(1))
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=1, eval_size=0, device="cpu")
    grpo.train(cfg)
    saved = torch.load(
        Path(cfg.output_dir) / "checkpoint-1" / "trainer_state.pt", weights_only=True
    )
    assert torch.equal(saved["rng"]["mps"], state)
    grpo.train(replace(cfg, max_steps=2, resume=True))
    assert len(restored) == 1 and torch.equal(restored[0], state)
    times = {}
    with devices.timed(times, "t", torch.device("mps")):
        pass
    assert waits == [1, 1] and times["t"] >= 0  # before the start and before the end
    assert (
        devices.peak_memory_mb(torch.device("mps")) is None
    )  # no peak: none, not NaN (which JSON lacks)
    monkeypatch.setattr(metrics, "peak_memory_mb", lambda device: real_peak(torch.device("mps")))
    grpo.train(replace(cfg, max_steps=3, resume=True))
    line = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()[-1]
    assert (
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is no JSON"))[
            "memory/peak_mb"
        ]
        is None
    )


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    real_loss, calls = grpo.grpo_loss, []

    def nan_on_second_step(*args, **kwargs):
        loss, diagnostics = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 1 else loss), diagnostics

    monkeypatch.setattr(grpo, "grpo_loss", nan_on_second_step)
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=3, micro_batch_size=8, eval_size=0)
    with pytest.raises(
        SystemExit,
        match=r"step 2: the loss is not finite.*--resume goes on from the last good checkpoint \(.*checkpoint-1\)",
    ):
        grpo.train(cfg)
    assert checkpoints.latest_checkpoint(Path(cfg.output_dir)).name == "checkpoint-1"
    monkeypatch.setattr(
        grpo, "grpo_loss", real_loss
    )  # the advice works: resume with a lower learning rate
    grpo.train(replace(cfg, resume=True, learning_rate=cfg.learning_rate / 10))
    assert [m["step"] for m in logs.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")] == [1, 2, 3]


def test_ctrl_c_saves_a_checkpoint_to_resume_from(tiny_model_dir, tmp_path, monkeypatch):
    real_step, calls = grpo.grpo_step, []

    def interrupt_on_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_step", interrupt_on_third_step)
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=5, save_every=0, eval_size=0)
    with pytest.raises(SystemExit, match="interrupted: saved .*checkpoint-2"):
        grpo.train(cfg)
    monkeypatch.setattr(grpo, "grpo_step", real_step)
    grpo.train(replace(cfg, resume=True))
    assert [m["step"] for m in logs.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")] == [
        1,
        2,
        3,
        4,
        5,
    ]


def test_ctrl_c_after_a_step_keeps_that_step(tiny_model_dir, tmp_path, monkeypatch):
    real_save = checkpoints.save_checkpoint

    def interrupt_the_first_save(
        output_dir, step, *args
    ):  # Ctrl-C while step 2's checkpoint is written
        monkeypatch.setattr(grpo, "save_checkpoint", real_save)
        raise KeyboardInterrupt

    monkeypatch.setattr(grpo, "save_checkpoint", interrupt_the_first_save)
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=4, save_every=2, eval_size=0)
    with pytest.raises(
        SystemExit, match="interrupted: saved .*checkpoint-2"
    ):  # not checkpoint-1: step 2 is done
        grpo.train(cfg)
    grpo.train(replace(cfg, resume=True))
    assert [m["step"] for m in logs.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")] == [
        1,
        2,
        3,
        4,
    ]


# Where a Ctrl-C lands inside step 2: in a call of these functions that each step makes
CTRL_C_POINTS = {
    "sampling": "generate_completions",
    "scoring": "score_completions",
    "log-probs": "frozen_logps",
    "right after the update": "step_metrics",
    "logging": "log_step",
}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """The runs of 2 and 3 steps that the Ctrl-C grid compares with, each trained once per mu."""
    done = {}

    def runs(cfg):
        if cfg.mu not in done:
            base = tmp_path_factory.mktemp(f"uninterrupted-mu{cfg.mu}")
            done[cfg.mu] = [
                replace(cfg, output_dir=str(base / f"straight-{n}"), max_steps=n) for n in (2, 3)
            ]
            for run in done[cfg.mu]:
                grpo.train(run)
        return done[cfg.mu]

    return runs


@pytest.mark.parametrize("mu", [1, 2])
@pytest.mark.parametrize("point", CTRL_C_POINTS)
def test_ctrl_c_anywhere_in_a_step_saves_whole_steps_and_resumes_the_same_run(
    tiny_model_dir, tmp_path, monkeypatch, uninterrupted, point, mu
):
    import signal

    from safetensors.torch import load_file

    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=3, save_every=0, eval_size=0, mu=mu)
    straight = uninterrupted(cfg)
    name = CTRL_C_POINTS[point]
    calls_per_step = 2 if name == "frozen_logps" and mu > 1 else 1  # old policy and reference
    real, calls, call = getattr(grpo, name), [], calls_per_step + 1  # the first call of step 2

    def ctrl_c_then_go_on(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            signal.raise_signal(signal.SIGINT)  # as a terminal's Ctrl-C: the handler runs now
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, name, ctrl_c_then_go_on)
    before = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN in a background job
    with pytest.raises(SystemExit, match="interrupted: saved .*checkpoint-2"):
        grpo.train(cfg)
    assert signal.getsignal(signal.SIGINT) == before  # the loop's handler is gone
    monkeypatch.setattr(grpo, name, real)
    saved, expected = (
        load_file(Path(d) / "checkpoint-2" / "model.safetensors")
        for d in (cfg.output_dir, straight[0].output_dir)
    )
    assert saved.keys() == expected.keys() and all(
        torch.equal(saved[k], expected[k]) for k in saved
    )
    grpo.train(replace(cfg, resume=True))
    # The resumed process repeats the same float32 operations on the same weights, optimizer state, data
    # and RNG state as the straight run, on the same CPU kernels: equal, not only close. Times and memory vary.
    ours, theirs = (
        logs.read_jsonl(Path(d) / "metrics.jsonl") for d in (cfg.output_dir, straight[1].output_dir)
    )
    assert [
        {k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))} for m in ours
    ] == [{k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))} for m in theirs]


def test_a_second_ctrl_c_stops_at_once_without_saving(tiny_model_dir, tmp_path, monkeypatch):
    import signal

    real = grpo.score_completions

    def two_ctrl_c(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, "score_completions", two_ctrl_c)
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=3, save_every=0, eval_size=0)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(
        SystemExit, match="stopped unsaved: --resume goes on from the last save, or step 0"
    ):
        grpo.train(cfg)
    assert checkpoints.latest_checkpoint(Path(cfg.output_dir)) is None
    assert signal.getsignal(signal.SIGINT) == before


def test_resume_after_a_crash_finds_each_step_once_in_each_log(
    tiny_model_dir, tmp_path, monkeypatch
):
    real, calls = grpo.grpo_step, []

    def crash_in_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("the machine went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_step", crash_in_step_4)
    cfg = tiny_config(
        tiny_model_dir, tmp_path, max_steps=5, save_every=2, log_samples_every=1, eval_size=0
    )
    with pytest.raises(RuntimeError):
        grpo.train(cfg)  # logs hold steps 1-3, the checkpoint step 2
    monkeypatch.setattr(grpo, "grpo_step", real)
    grpo.train(replace(cfg, resume=True))  # runs step 3 again, then 4 and 5
    for name, per_step in (
        ("metrics.jsonl", 1),
        ("samples.jsonl", 2),
    ):  # two completions per logged step
        steps = [r["step"] for r in logs.read_jsonl(Path(cfg.output_dir) / name)]
        assert steps == [step for step in range(1, 6) for _ in range(per_step)], name


def test_reference_sync_copies_the_policy_and_is_checkpointed(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_config(
        tiny_model_dir,
        tmp_path,
        ref_sync_every=2,
        learning_rate=1e-2,
        max_steps=3,
        eval_size=0,
        save_every=2,
    )
    grpo.train(replace(cfg, max_steps=2))
    saved = Path(cfg.output_dir) / "checkpoint-2"
    policy, reference = (
        load_file(saved / "model.safetensors"),
        load_file(saved / "reference" / "model.safetensors"),
    )
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(policy[k], initial[k]) for k in policy)  # the policy moved...
    assert all(
        torch.equal(policy[k], reference[k]) for k in policy
    )  # ...and the reference followed at step 2
    grpo.train(replace(cfg, resume=True))  # resuming loads that reference back
    # Step 3 starts from the policy that the reference copied at step 2: its KL is exactly 0. A resume that
    # loaded the initial model as the reference instead would see the policy's two steps of drift.
    assert logs.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")[2]["kl"] == 0.0


def small_run_flags(model_dir, out, steps: int) -> list[str]:
    """The command line of a run of a few seconds on the tiny model, with both evaluations."""
    sizes = (
        "--prompts-per-step 2 --num-generations 4 --max-completion-length 8 --micro-batch-size 4"
    )
    evals = "--eval-size 4 --eval-batch-size 4 --device cpu --dataset arithmetic"
    return [
        *f"{sizes} {evals} --max-steps {steps}".split(),
        *["--model", str(model_dir), "--output-dir", str(out)],
    ]


def test_ctrl_c_in_the_last_step_then_the_printed_command_finishes_the_run(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Stopped in its last step, the run is saved but not finished (no final checkpoint, no
    evaluation after): the command it prints finishes it; then that command has nothing to do."""
    import signal

    real, calls = grpo.score_completions, []

    def ctrl_c_in_step_3(*args):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # as a terminal's Ctrl-C, in the last step
        return real(*args)

    monkeypatch.setattr(grpo, "score_completions", ctrl_c_in_step_3)
    out = tmp_path / "run"
    stopped = run_main(*small_run_flags(tiny_model_dir, out, 3))
    assert "interrupted: saved" in stopped.stderr and "checkpoint-3" in stopped.stderr
    assert "3/3" in stopped.stderr  # the progress bar counts the last step, done
    command = stopped.stderr.split("continue with ")[1].split()
    monkeypatch.setattr(grpo, "score_completions", real)
    finished = run_main(*command)
    assert finished.returncode == 0, finished.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 3 and {"before", "after"} <= set(results)
    assert Path(results["final_checkpoint"]).name == "checkpoint-3"
    assert [m["step"] for m in logs.read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    again = run_main(*command)
    assert again.returncode == 2 and "already at step 3; pass a larger --max-steps" in again.stderr


def test_ctrl_c_outside_the_loop_says_in_one_line_what_is_kept_and_how_to_go_on(
    tiny_model_dir, tmp_path, monkeypatch
):
    """While the models load nothing is kept: one line, no traceback. In the final evaluation the
    weights are saved: the line names them and the command that evaluates them, which works."""
    out = tmp_path / "run"
    real_load = grpo.load_policy_and_reference

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(grpo, "load_policy_and_reference", ctrl_c)
    loading = run_main(*small_run_flags(tiny_model_dir, out, 2))
    said = "interrupted before the first step: nothing to keep. Run the command again."
    assert loading.returncode == 1 and loading.stderr.strip() == said
    monkeypatch.setattr(grpo, "load_policy_and_reference", real_load)
    real_evaluate, calls = grpo.evaluate, []

    def ctrl_c_in_the_final_evaluation(*args):
        calls.append(1)
        if len(calls) == 2:  # the first is the evaluation before training
            raise KeyboardInterrupt
        return real_evaluate(*args)

    monkeypatch.setattr(grpo, "evaluate", ctrl_c_in_the_final_evaluation)
    stopped = run_main(*small_run_flags(tiny_model_dir, out, 2))  # the same command again
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr
    assert f"the weights of all 2 steps are saved in {out / 'checkpoint-2'}" in stopped.stderr
    command = stopped.stderr.split("steps are saved in ")[1].split("; ")[1].split()[:3]
    assert command == ["--resume", "--output-dir", str(out)]
    monkeypatch.setattr(grpo, "evaluate", real_evaluate)
    finished = run_main(*command)
    assert finished.returncode == 0, finished.stderr
    assert "after" in json.loads((out / "results.json").read_text())
