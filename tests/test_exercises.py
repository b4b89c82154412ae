"""
exercises/: the stubs, the checks, the catalogue of mistakes and training with a learner's functions.
"""

import importlib
import inspect
import json
import os
import re
import subprocess
import sys

# Before huggingface_hub reads it (at import): the tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

import grpo  # noqa: E402
from machinery import logs  # noqa: E402
from tests.conftest import HERE, KL_GRADIENT_TABLE, run_cli  # noqa: E402

# exercises/: a learner writes Part 1 and checks it with the tests above (exercises/README.md)

EXERCISES_DIR = HERE / "exercises"


def exercise_module(name: str):
    """exercises/check.py or train.py or part1.py, imported as a learner's command imports it."""
    if str(EXERCISES_DIR) not in sys.path:
        sys.path.insert(0, str(EXERCISES_DIR))
    return importlib.import_module(name)


def test_the_exercise_file_holds_grpos_signatures_and_formulas_and_no_code():
    """No second copy of the algorithm: each stub has grpo.py's signature, its docstring opens with grpo.py's (the
    formula), and its body only raises NotImplementedError; the stubs come in the order of one step."""
    check, train, part1 = (exercise_module(name) for name in ("check", "train", "part1"))
    defined = [
        name
        for name, value in vars(part1).items()
        if inspect.isfunction(value) and value.__module__ == "part1"
    ]
    assert defined == check.PART1
    for name in check.PART1:
        stub, solution = getattr(part1, name), getattr(grpo, name)
        assert inspect.signature(stub) == inspect.signature(solution), name
        assert inspect.getdoc(stub).startswith(inspect.getdoc(solution)), (
            f"{name}: its docstring must open with grpo.py's"
        )
        assert train.is_stub(stub), name
    assert not train.is_stub(grpo.grpo_loss)


@pytest.mark.slow
def test_the_exercise_tests_pass_on_grpo_fail_on_the_stubs_and_catch_each_catalogued_mistake(
    tmp_path,
):
    """In one run of exercises/check.py --mistakes: every exercise test passes on grpo.py; on the untouched stubs
    each fails, with NotImplementedError (not a crash elsewhere); each mistake of exercises/mistakes.py (two or
    more per exercise) fails a test of its exercise whose message names it."""
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(EXERCISES_DIR / "check.py"), "--mistakes", "--json", str(report_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=HERE,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    check, mistakes = exercise_module("check"), exercise_module("mistakes")
    assert report["solution"] and all(r["passed"] for r in report["solution"].values()), report[
        "solution"
    ]
    for exercise, results in report["stubs"].items():
        assert len(results) >= len(check.EXERCISES[exercise]), exercise
        assert all(r["error"] == "NotImplementedError" for r in results.values()), (
            exercise,
            results,
        )
    per_exercise = {e: [m for m in mistakes.MISTAKES if m.exercise == e] for e in check.EXERCISES}
    assert all(len(m) >= 2 for m in per_exercise.values()), per_exercise
    for mistake in mistakes.MISTAKES:
        assert report["mistakes"][mistake.name]["caught_by"], (
            mistake.name,
            report["mistakes"][mistake.name],
        )


@pytest.mark.slow
def test_training_with_a_learners_functions_runs_them_and_gives_grpos_run(tiny_model_dir, tmp_path):
    """exercises/train.py with a learner's file whose functions are grpo.py's (each logging its calls): every one
    is called, and the run's metrics are grpo.py's own, number for number. Untouched stubs: refused at once."""
    names = exercise_module("check").PART1
    calls = tmp_path / "calls.txt"
    (tmp_path / "mine.py").write_text(
        "\n".join(
            [
                "import grpo",
                f"SOLUTION = {{name: getattr(grpo, name) for name in {names!r}}}",
                "def logged(name):",
                "    def function(*args, **kwargs):",
                f"        open({str(calls)!r}, 'a').write(name + '\\n')",
                "        return SOLUTION[name](*args, **kwargs)",
                "    return function",
                *(f"{name} = logged({name!r})" for name in names),
            ]
        )
    )
    flags = [
        "--model",
        str(tiny_model_dir),
        "--dataset",
        "arithmetic",
        "--prompts-per-step",
        "2",
        "--num-generations",
        "4",
        "--max-completion-length",
        "8",
        "--max-steps",
        "2",
        "--eval-size",
        "0",
        "--save-every",
        "0",
        "--device",
        "cpu",
        "--mu",
        "2",
        "--supervision",
        "process",
        "--step-credit",
        "sum",  # the paper's sum of the steps to go: through reward_to_go
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    theirs = run_cli(*flags, "--output-dir", str(tmp_path / "grpo"))
    mine = subprocess.run(
        [
            sys.executable,
            str(EXERCISES_DIR / "train.py"),
            "--file",
            str(tmp_path / "mine.py"),
            *flags,
            "--output-dir",
            str(tmp_path / "mine"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert theirs.returncode == 0 and mine.returncode == 0, theirs.stderr + mine.stderr
    assert set(calls.read_text().split()) == set(names)
    untimed = [
        [
            {k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))}
            for m in logs.read_jsonl(tmp_path / run / "metrics.jsonl")
        ]
        for run in ("grpo", "mine")
    ]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 2
    untouched = ["--file", str(EXERCISES_DIR / "part1.py")]  # a learner's file, nothing written
    stubs = subprocess.run(
        [sys.executable, str(EXERCISES_DIR / "train.py"), *untouched, *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stubs.returncode == 2 and f"{', '.join(names)} not written yet" in stubs.stderr, (
        stubs.stderr
    )


def test_each_question_of_the_exercises_has_an_answer_that_names_the_tests_that_check_it():
    section = (EXERCISES_DIR / "README.md").read_text().split("## Questions without code")[1]
    questions = re.findall(r"^(\d)\. ", section, re.M)
    answers = re.split(r"^## (?=\d\. )", (EXERCISES_DIR / "answers.md").read_text(), flags=re.M)[1:]
    assert 3 <= len(answers) == len(questions) <= 5 and [a[0] for a in answers] == questions
    suite = [HERE / "test_grpo.py", *(HERE / "tests").glob("test_*.py")]
    defined = {name for f in suite for name in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    facts = {
        "1": "-Â_i / (|o_i| B)",
        "2": dict(((k, o), w) for k, o, w in KL_GRADIENT_TABLE)[("k3", True)],
        "3": "exactly 0",
        "4": "ρ = 1 exactly",
        "5": "an action the policy took",
    }  # what the tests assert
    for answer in answers:
        short = re.search(r"\*\*Short answer:\*\* (.+)", answer).group(1)
        assert facts[answer[0]] in short, (answer[0], short)
        named = re.findall(r"`(test_\w+)`", answer.split("Checked by")[1])
        assert named and set(named) <= defined, (answer[0], named)


def test_a_learners_file_is_their_own_copy_so_the_stubs_the_suite_checks_stay_pristine(
    tmp_path, monkeypatch, capsys
):
    """The first check copies the stubs to the learner's file, once; every later check, and
    train.py, read that file: writing in it never touches part1.py, which the suite checks."""
    check, train = exercise_module("check"), exercise_module("train")
    mine = tmp_path / "mine.py"
    monkeypatch.setattr(check, "MINE", mine)
    assert check.learners_file(None) == mine and mine.read_text() == check.STUBS.read_text()
    assert "your copy of the stubs" in capsys.readouterr().out
    written = "return rewards.flip(1).cumsum(dim=1).flip(1)  # mine"
    mine.write_text(mine.read_text().replace('raise NotImplementedError("reward_to_go")', written))
    assert check.learners_file(None) == mine and written in mine.read_text()  # never copied again
    assert check.learners_file(tmp_path / "other.py") == tmp_path / "other.py"  # --file wins
    assert (
        check.STUBS == EXERCISES_DIR / "part1.py" and "mine.py" in (HERE / ".gitignore").read_text()
    )
    monkeypatch.setattr(train, "MINE", tmp_path / "absent.py")
    with pytest.raises(SystemExit):
        train.main(["--max-steps", "1"])
    assert "python exercises/check.py makes it" in capsys.readouterr().err
