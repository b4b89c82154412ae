"""
Mutation testing of the suite: mutmut changes one thing at a time in grpo.py's formulas (Part 1's
functions of tensors) and in rewards.py, and runs the tests that reach it; a mutant that no test
fails on "survives". Too slow for CI; run it by hand (pip install mutmut):

    python bench/mutation.py --out /tmp/mutation            # the whole run
    python bench/mutation.py --out /tmp/mutation --functions group_advantages,kl_estimate
    python bench/mutation.py --out /tmp/mutation --functions none --rewards step_reward

It works on a copy in --out: the files the tests need, a pyproject.toml with mutmut's settings
(workers forked from a server that has not run torch, one thread each: torch is not fork-safe once
its threads have started, and mutmut's default isolation crashed most of per_token_logps's mutants),
and "# pragma: no mutate" around every grpo.py function that is not one of FORMULAS (the loop,
loading, logging: their behaviour is tested end to end, not formula by formula). The tests run
are test_grpo.py and tests/ without their end-to-end runs (END_TO_END: the notebook, the TRL and verl runners,
whole runs of train()): they reach the formulas only through the loop, take minutes per mutant,
and can only add kills, so the score is a lower bound for the whole suite. Prints killed / total
per function, and each survivor's diff.
"""

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORMULAS = (
    "sample_tokens",
    "completion_mask",
    "score_completions",
    "group_advantages",
    "process_advantages",
    "reward_to_go",
    "min_to_go",
    "per_token_logps",
    "kl_estimate",
    "importance_ratio",
    "grpo_loss",
)
END_TO_END = (
    "test_exercises",  # exercises/ (not copied): the stubs and the catalogue, not the formulas
    "test_layout",  # the files' lines and imports, which mutmut's trampolines change
    "linear_time",  # a ratio of times, which the trampolines' calls distort
    "notebook",
    "trl_runner",
    "verl",
    "agree_with_trl",
    "ctrl_c",
    "resume",
    "end_to_end",
    "learns",
    "crash",
    "nan_loss",
    "says",
    "healthy",
    "lora_run",
    "kl_past",
    "reference_sync",
    "micro_batch_size_that",
    "logged_loss",
    "gpu_resumes",
    "nothing_deprecated",
    "random_state_is_checkpointed",
)
TESTS = " and ".join(f"not {name}" for name in END_TO_END)
KILLED = {1, 3, 36, 24, -24, 152, 255}  # mutmut's codes for a failing test, or a timeout
MUTMUT = str(Path(sys.executable).with_name("mutmut"))


def freeze(path: Path, functions: tuple[str, ...] | None) -> None:
    """Put "# pragma: no mutate" around every function of `path` not in `functions` (None: mutate all)."""
    source = path.read_text().splitlines()
    frozen = [
        node
        for node in ast.parse("\n".join(source)).body
        if functions is not None
        and isinstance(node, ast.FunctionDef)
        and node.name not in functions
    ]
    for node in sorted(
        frozen, key=lambda n: n.lineno, reverse=True
    ):  # from the end: line numbers hold
        first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        source[node.end_lineno : node.end_lineno] = ["# pragma: no mutate end"]
        source[first:first] = ["# pragma: no mutate start"]
    path.write_text("\n".join(source) + "\n")


def copy_project(
    out: Path, functions: tuple[str, ...], tests: str, rewards: tuple[str, ...] | None = None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("grpo.py", "rewards.py", "test_grpo.py"):
        shutil.copy(ROOT / name, out / name)
    for folder in ("machinery", "tests", "scale", "bench"):  # bench: tests/test_seeds.py reads it
        shutil.copytree(ROOT / folder, out / folder, dirs_exist_ok=True)
    freeze(out / "grpo.py", functions)
    freeze(out / "rewards.py", rewards)
    (out / "pyproject.toml").write_text(
        '[tool.mutmut]\nsource_paths = ["grpo.py", "rewards.py"]\n'
        'pytest_add_cli_args_test_selection = ["test_grpo.py", "tests"]\n'
        f'pytest_add_cli_args = ["-p", "no:cacheprovider", "-k", "{tests}"]\n'
        'also_copy = ["machinery", "tests", "scale", "bench"]\n'
        'process_isolation = "forkserver"\n'
    )  # torch is not fork-safe once its threads started


def report(out: Path) -> dict:
    by_function = defaultdict(Counter)
    survivors = []
    for meta in sorted((out / "mutants").glob("*.py.meta")):
        for mutant, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            function = re.sub(r"__mutmut_\d+$", "", mutant.split(".", 1)[1]).removeprefix("x_")
            status = "killed" if code in KILLED else "survived" if code == 0 else f"exit {code}"
            by_function[f"{meta.name.removesuffix('.py.meta')}.{function}"][status] += 1
            if status == "survived":
                survivors.append((mutant, status))
    print("\n| function | killed / mutants | score |\n|---|---|---|")
    for function, counts in sorted(by_function.items()):
        total = sum(counts.values())
        print(
            f"| `{function}` | {counts['killed']} / {total} | {100 * counts['killed'] / total:.0f}% |"
        )
    for mutant, status in survivors:
        diff = subprocess.run(
            [MUTMUT, "show", mutant], cwd=out, capture_output=True, text=True
        ).stdout
        print(
            f"\n{mutant} ({status}):\n"
            + "\n".join(
                line
                for line in diff.splitlines()
                if line.startswith(("+", "-")) and line[1:2] != line[:1]
            )
        )
    return {f: dict(c) for f, c in by_function.items()}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="a folder for the copy and mutmut's state")
    parser.add_argument(
        "--functions", default=",".join(FORMULAS), help="grpo.py functions to mutate"
    )
    parser.add_argument("--rewards", help="rewards.py functions to mutate (default: all of them)")
    parser.add_argument("--tests", default=TESTS, help="the tests to run (a pytest -k expression)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at a time")
    parser.add_argument("--report-only", action="store_true", help="read a finished run in --out")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.report_only:
        shutil.rmtree(out, ignore_errors=True)
        copy_project(
            out,
            tuple(args.functions.split(",")),
            args.tests,
            tuple(args.rewards.split(",")) if args.rewards else None,
        )
        one_thread = dict(
            os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"
        )  # jobs share the cores
        subprocess.run(
            [MUTMUT, "run", "--max-children", str(args.jobs)], cwd=out, check=False, env=one_thread
        )
    (out / "scores.json").write_text(json.dumps(report(out), indent=2))


if __name__ == "__main__":
    main()
