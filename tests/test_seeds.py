"""
bench/seeds.py, the runner whose file README's intervals are drawn from: it runs each run of a grid
once, goes on with one cut off, leaves a run another runner holds, and its statistics say what they
claim (a 95% interval, an order only where a paired interval excludes 0).
"""

import importlib
import json
import random
import statistics
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.conftest import HERE

sys.path.insert(0, str(HERE / "bench"))
seeds = importlib.import_module("seeds")

# A stand-in for grpo.py: it logs its command line, writes what a finished run leaves (a checkpoint,
# metrics.jsonl, results.json), and fails where the output folder's name says so.
FAKE_GRPO = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    argv = sys.argv[1:]
    out = Path(argv[argv.index("--output-dir") + 1])
    with open(out.parent.parent / "calls.jsonl", "a") as f:
        f.write(json.dumps(argv) + "\\n")
    if "fails" in out.name:
        sys.exit(1)
    steps, seed = int(argv[argv.index("--max-steps") + 1]), int(argv[argv.index("--seed") + 1])
    (out / "checkpoint-1").mkdir(parents=True, exist_ok=True)
    metrics = [{"accuracy": seed / 10, "format_rate": 1.0, "kl": 0.01 * t} for t in range(steps)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\\n" for m in metrics))
    result = {"accuracy": 0.5 + seed / 10, "format_rate": 1.0, "n": 10}
    before = {"accuracy": 0.2, "format_rate": 0.7, "n": 10}
    (out / "results.json").write_text(json.dumps({"before": before, "after": result, "steps": steps}))
    """
)
TOY = {
    "settings": ["--dataset", "arithmetic", "--max-steps", "3"],
    "first": 1,
    "methods": {"A": [], "B": ["--beta", "0"]},
    "seeds": range(2),
}


@pytest.fixture
def toy_grid(tmp_path, monkeypatch):
    """The runner pointed at a folder of its own, its grid TOY, grpo.py the stand-in above."""
    fake = tmp_path / "fake_grpo.py"
    fake.write_text(FAKE_GRPO)
    real_command = seeds.command
    monkeypatch.setattr(seeds, "RESULTS", tmp_path / "seeds.jsonl")
    monkeypatch.setattr(seeds, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(seeds, "GRIDS", {"toy": TOY})
    monkeypatch.setattr(
        seeds, "command", lambda *a: [sys.executable, str(fake), *real_command(*a)[2:]]
    )
    real_sleep = time.sleep
    monkeypatch.setattr(seeds.time, "sleep", lambda s: real_sleep(0.05))
    return tmp_path


def calls(folder) -> list[list[str]]:
    path = folder / "runs" / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_grid_runs_each_run_once_records_it_and_frees_its_disk(toy_grid):
    seeds.run_grid("MODEL", "toy", jobs=2, threads=1)
    lines = [json.loads(line) for line in (toy_grid / "seeds.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["seed"]) for r in lines) == [
        ("A", 0),
        ("A", 1),
        ("B", 0),
        ("B", 1),
    ]
    b1 = next(r for r in lines if (r["method"], r["seed"]) == ("B", 1))
    assert b1["flags"] == [*TOY["settings"], "--beta", "0"]
    assert b1["after"]["accuracy"] == 0.6 and b1["sampled_accuracy"] == [0.1] * 3
    assert b1["kl"] == [0.0, 0.01, 0.02]
    assert not list((toy_grid / "runs").rglob("checkpoint-*")), "a recorded run's checkpoint stays"
    assert not list((toy_grid / "runs").rglob("*.lock")), "a finished run's lock stays"
    assert len(calls(toy_grid)) == 4
    assert seeds.pending("toy") == []
    seeds.run_grid("MODEL", "toy", jobs=2, threads=1)
    assert len(calls(toy_grid)) == 4, "a recorded run was run again"


def test_seeds_of_a_method_with_a_dot_in_its_name_each_have_a_lock(toy_grid, monkeypatch, capsys):
    dotted = {**TOY, "first": 2, "methods": {"A, beta 0.001": ["--beta", "0.001"]}}
    monkeypatch.setattr(seeds, "GRIDS", {"toy": dotted})
    seeds.run_grid("MODEL", "toy", jobs=2, threads=1)
    assert "another process" not in capsys.readouterr().out, "one seed's lock held the other's"
    assert seeds.pending("toy") == [] and len(calls(toy_grid)) == 2


def test_the_first_methods_fill_every_seed_before_the_others(toy_grid):
    assert seeds.pending("toy") == [("A", 0), ("A", 1), ("B", 0), ("B", 1)]
    seeds.run_grid("MODEL", "toy", jobs=1, threads=None)
    assert [call[call.index("--seed") + 1] for call in calls(toy_grid)] == ["0", "1", "0", "1"]


def test_a_run_cut_off_goes_on_from_its_checkpoint_and_a_stale_lock_is_taken_over(toy_grid):
    out = seeds.run_dir("toy", "A", 0)
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"before": {"accuracy": 0.2}}))  # not the end's
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid whose process has ended: the lock of a runner that was stopped
    seeds.lock_of(out).write_text(str(gone.pid))
    seeds.run_grid("MODEL", "toy", jobs=1, threads=None)
    resumed = {(c[c.index("--output-dir") + 1], "--resume" in c) for c in calls(toy_grid)}
    assert (str(out), True) in resumed
    assert (str(seeds.run_dir("toy", "A", 1)), False) in resumed, "a fresh run was resumed"
    assert len(seeds.done("toy")) == 4


def test_a_run_that_ended_after_its_runner_is_recorded_not_run_again(toy_grid):
    """A runner stopped while its child went on to the end: the next runner finds the run finished
    and unrecorded, with no live process in its lock."""
    seeds.run_grid("MODEL", "toy", jobs=1, threads=None)
    lines = (toy_grid / "seeds.jsonl").read_text().splitlines()
    (toy_grid / "seeds.jsonl").write_text("".join(line + "\n" for line in lines[1:]))
    first = json.loads(lines[0])
    out = seeds.run_dir("toy", first["method"], first["seed"])
    (out / "checkpoint-1").mkdir()
    seeds.run_grid("MODEL", "toy", jobs=1, threads=None)
    assert len(calls(toy_grid)) == 4, "a finished run was trained again"
    assert len(seeds.done("toy")) == 4 and not (out / "checkpoint-1").exists()


def hold(out, seconds: float, code: str = "") -> None:
    """A process that trains the run in `out`, as far as a runner can tell: its pid in the run's
    lock, as a runner's child that outlived its runner; it lives `seconds`, then runs `code`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-c", f"import time; time.sleep({seconds})\n{code}"]
    )
    seeds.lock_of(out).write_text(str(process.pid))
    threading.Thread(target=process.wait, daemon=True).start()  # reaped, as init reaps an orphan


def test_a_run_another_process_trains_is_waited_for_then_recorded_once(toy_grid, capsys):
    """A runner stopped while its children went on: the next runner waits for each, then records
    a finished run without training it again; takes a cut-off one on from its checkpoint; and
    leaves one that a runner of its own recorded meanwhile."""
    finished, cut, recorded = (
        seeds.run_dir("toy", m, s) for m, s in (("B", 1), ("A", 1), ("B", 0))
    )
    (cut / "checkpoint-1").mkdir(parents=True)
    line = {"grid": "toy", "method": "B", "seed": 0, "flags": TOY["settings"] + ["--beta", "0"]}
    records = (  # as a runner does when its child ends: the line, then its lock gone
        f"open({str(seeds.RESULTS)!r}, 'a').write({json.dumps(line)!r} + '\\n')\n"
        f"import os; os.remove({str(seeds.lock_of(recorded))!r})"
    )
    finishes = FAKE_GRPO.replace(
        "argv = sys.argv[1:]",
        f"argv = {['--output-dir', str(finished), '--max-steps', '3', '--seed', '1']!r}",
    )
    hold(finished, 2, finishes)  # still going when the runner reaches it, the last of the four
    hold(cut, 0.3)
    hold(recorded, 0.3, records)
    seeds.run_grid("MODEL", "toy", jobs=2, threads=None)
    assert "toy B seed 1: trained by another process, waited for" in capsys.readouterr().out
    ran = [call[call.index("--output-dir") + 1 :] for call in calls(toy_grid)]
    held = [str(finished), "--max-steps", "3", "--seed", "1"]  # the holder's own, not the runner's
    assert sorted(ran) == sorted(
        [held, [str(seeds.run_dir("toy", "A", 0))], [str(cut), "--resume"]]
    )
    lines = [json.loads(line) for line in seeds.RESULTS.read_text().splitlines()]
    assert sorted((r["method"], r["seed"]) for r in lines) == [
        ("A", 0),
        ("A", 1),
        ("B", 0),
        ("B", 1),
    ]
    assert not list(seeds.RUNS.rglob("*.lock")) and not list(seeds.RUNS.rglob("checkpoint-*"))


def test_runs_that_other_processes_train_count_among_the_jobs_from_the_start(toy_grid, capsys):
    """One job, and a run that a stopped runner's child still trains, last in the grid's order: the
    runner starts nothing beside it, but waits for it first."""
    finished = seeds.run_dir("toy", "B", 1)
    argv = ["--output-dir", str(finished), "--max-steps", "3", "--seed", "1"]
    hold(finished, 0.5, FAKE_GRPO.replace("argv = sys.argv[1:]", f"argv = {argv!r}"))
    seeds.run_grid("MODEL", "toy", jobs=1, threads=None)
    said = capsys.readouterr().out.splitlines()
    assert said[:2] == [
        "toy B seed 1: trained by another process, waited for",
        "toy B seed 1: recorded in seeds.jsonl",
    ], said


def test_a_failed_run_is_named_and_not_recorded(toy_grid, monkeypatch):
    run_dir = seeds.run_dir
    monkeypatch.setattr(seeds, "run_dir", lambda g, m, s: run_dir(g, m + "fails" * (s == 1), s))
    with pytest.raises(
        SystemExit, match="failed, see the logs:\ntoy A seed 1: .*afails-s1.log\ntoy B seed 1: "
    ):
        seeds.run_grid("MODEL", "toy", jobs=1, threads=None)
    assert sorted(seeds.done("toy")) == [("A", 0), ("B", 0)]


def test_done_matches_the_grids_settings_in_any_order_and_an_earlier_stage_by_its_steps(toy_grid):
    """A line counts where its flags are the grid's (in any order), unless marked superseded."""
    line = {"grid": "toy", "method": "B", "seed": 0}
    rows = [
        line | {"flags": ["--beta", "0", "--max-steps", "3", "--dataset", "arithmetic"]},
        line | {"seed": 1, "flags": ["--dataset", "arithmetic", "--max-steps", "2", "--beta", "0"]},
        line | {"seed": 2, "flags": ["--dataset", "arithmetic", "--max-steps", "3"]},  # not B's
        line
        | {"seed": 3, "flags": TOY["settings"] + ["--beta", "0"], "superseded": "its code changed"},
        line
        | {
            "grid": "other",
            "flags": ["--dataset", "arithmetic", "--max-steps", "3", "--beta", "0"],
        },
    ]
    (toy_grid / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(seeds.done("toy")) == [("B", 0)]
    assert list(seeds.done("toy", steps=2)) == [("B", 1)]


def test_the_bootstrap_interval_is_the_normal_one_for_a_large_sample():
    """For 200 values the percentile bootstrap of the mean is close to mean ± 1.96 s/√n; the 5%
    tolerance holds the Monte Carlo error of 10,000 draws' 2.5% and 97.5% quantiles (about 1.5%
    of the half-width) and the plug-in s's √(199/200)."""
    rng = random.Random(1)
    values = [rng.gauss(10, 3) for _ in range(200)]
    mean, half = statistics.mean(values), 1.96 * statistics.stdev(values) / 200**0.5
    low, high = seeds.bootstrap_mean(values)
    assert low == pytest.approx(mean - half, abs=0.05 * half)
    assert high == pytest.approx(mean + half, abs=0.05 * half)
    assert seeds.bootstrap_mean([4.0, 4.0, 4.0]) == (4.0, 4.0)
    assert seeds.interval([61.0]) == "61.0 (one seed: no interval)"


def runs_of(scores: dict[str, list[float]]) -> dict[str, dict[int, dict]]:
    """Runs whose greedy accuracy after is `scores[method][seed]`, in points."""
    return {
        method: {s: {"after": {"accuracy": v / 100}} for s, v in enumerate(values)}
        for method, values in scores.items()
    }


def test_the_order_is_settled_where_the_paired_interval_excludes_zero_only():
    after = seeds.FIGURES["greedy after"]
    seed_effect = [40.0, 70.0, 55.0, 62.0, 48.0, 75.0, 43.0, 66.0]  # seeds differ by 35 points
    one_better = {"A": [v + 2 for v in seed_effect], "B": seed_effect}  # 2 points, every seed
    assert seeds.order(runs_of(one_better), after) == "A > B"
    # unpaired, the same means would not be told apart: the seeds' spread is 12 points
    assert seeds.bootstrap_mean([a - b for a in one_better["A"] for b in seed_effect])[0] < 0
    mixed = {
        "A": [v + d for v, d in zip(seed_effect, [3, -2, 4, -3, 2, -1, 1, -2])],
        "B": seed_effect,
    }
    assert seeds.order(runs_of(mixed), after) == "A ~ B"
    three = {"C": [v - 5 for v in seed_effect], **one_better}
    assert seeds.order(runs_of(three), after) == "A > B > C"
    assert seeds.order(runs_of({"A": [50.0], "B": [40.0]}), after) == "A ~ B", (
        "one seed settles nothing"
    )
    # A is settled above B only; C, last by its mean, swings by seed, so neither A nor B is settled
    # above it: `A > B ~ C` would claim A > C too
    swings = [10, -10, 9, -9, 8, -8, 1, -5]  # mean -0.5
    gapped = {
        "A": [v + 3 for v in seed_effect],
        "B": seed_effect,
        "C": [v + d for v, d in zip(seed_effect, swings)],
    }
    assert seeds.order(runs_of(gapped), after) == "A ~ B ~ C (and A > B)"
