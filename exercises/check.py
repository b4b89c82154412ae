"""
Check your functions with the project's own tests (test_grpo.py), one exercise at a time:

  python exercises/check.py group_advantages         # one exercise, on exercises/mine.py
  python exercises/check.py                          # every exercise, in order
  python exercises/check.py --file my_part1.py       # another file of yours
  python exercises/check.py --file grpo.py           # the solution: every test passes
  python exercises/check.py --mistakes               # the typical mistakes, each caught

Each test of an exercise runs with your functions in grpo.py's place (grpo.py's own functions call
them too); the functions of the other exercises stay grpo.py's, so each exercise is checked alone.
"""

import argparse
import contextlib
import importlib.util
import inspect
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import pytest  # noqa: E402
from mistakes import MISTAKES  # noqa: E402

import grpo  # noqa: E402

# Each exercise, in the order of one GRPO step: the function you write, the tests that check it.
EXERCISES = {
    "sample_tokens": [
        "test_sampling_draws_from_softmax_of_the_logits_over_the_temperature[1.0-0.5-cpu]",
        "test_sampling_draws_from_softmax_of_the_logits_over_the_temperature[0.5-1.0-cpu]",
        "test_greedy_decoding_over_the_shared_prompt_cache_equals_plain_generate",
        "test_the_uniform_number_keeps_float64_resolution",
        "test_a_uniform_number_of_zero_never_draws_a_token_of_probability_zero",
    ],
    "completion_mask": [
        "test_completion_mask",
        "test_sampling_and_the_mask_make_their_tensors_on_their_inputs_device",
    ],
    "group_advantages": [
        "test_group_advantages_reference_values",
        "test_group_advantages_are_exactly_zero_for_equal_rewards_and_per_group",
        "test_batch_std_divides_by_the_whole_batchs_std",
    ],
    "reward_to_go": ["test_reward_to_go_sums_each_rows_rewards_from_t_on"],
    "process_advantages": [
        "test_process_advantages_reference_values",
        "test_process_advantages_without_steps_are_the_outcome_advantages",
        "test_process_advantages_normalize_each_group_apart_and_sum_steps_ending_together",
        "test_one_more_true_step_never_lowers_a_token_and_one_more_wrong_step_never_raises_one[min]",
        "test_one_more_true_step_never_lowers_a_token_and_one_more_wrong_step_never_raises_one[sum]",
    ],
    "per_token_logps": [
        "test_per_token_logps_equals_plain_log_softmax[1024-1.0-False]",
        "test_per_token_logps_equals_plain_log_softmax[5-0.7-False]",
        "test_left_padding_does_not_change_logps",
        "test_log_probs_keep_no_vocabulary_sized_tensor_for_the_backward_pass",
        "test_per_token_logps_of_a_bf16_model_take_the_log_softmax_in_float32",
        "test_entropy_is_that_of_the_softmax_at_the_sampling_temperature[True]",
        "test_entropy_is_that_of_the_softmax_at_the_sampling_temperature[False]",
    ],
    "kl_estimate": [
        "test_kl_estimators_reference_values",
        "test_k3_ratio_is_k3_times_the_ratio_and_k1_is_refused",
        "test_which_kl_gradient_each_estimator_gives_as_a_loss",
        "test_an_unknown_kl_estimator_or_loss_type_is_refused_by_name",
    ],
    "importance_ratio": [
        "test_importance_ratio_per_token_and_gspos_per_completion",
        "test_the_sequence_ratios_gradient_is_its_value_times_the_mean_of_the_tokens",
        "test_an_unknown_importance_sampling_level_is_refused_by_name",
    ],
    "grpo_loss": [
        "test_grpo_loss_reference_values",
        "test_asymmetric_clip_reference_value",
        "test_grpo_gradient_with_ratio_one_is_minus_advantage_over_length",
        "test_the_kl_term_pulls_the_policy_towards_the_reference",
        "test_clip_fractions_count_the_tokens_whose_gradient_the_clip_stops",
        "test_without_reference_log_probs_the_loss_has_no_kl_term",
        "test_gradient_does_not_depend_on_micro_batch_size",
        "test_per_token_advantages_equal_to_each_completions_one_give_the_same_loss_and_gradient",
        "test_k1_to_go_puts_the_kl_to_go_in_the_advantage_not_in_the_loss[dapo]",
        "test_k1_to_go_puts_the_kl_to_go_in_the_advantage_not_in_the_loss[grpo]",
        "test_k1_to_go_puts_the_kl_to_go_in_the_advantage_not_in_the_loss[dr_grpo]",
        "test_an_unknown_kl_estimator_or_loss_type_is_refused_by_name",
        "test_the_token_means_divide_by_the_tokens_there_are_one_or_none",
        "test_gspo_clips_whole_replies_at_their_sequence_ratio",
        "test_cispo_caps_the_weight_stops_its_gradient_and_keeps_every_tokens",
    ],
}
PART1 = list(EXERCISES)


def learner_functions(path: Path, exercises: list[str]) -> dict:
    """{name: function} of `exercises` (each the function of its name) from the file at `path`.
    Its other Part 1 functions become grpo.py's, so that (say) your grpo_loss is checked with
    grpo.py's kl_estimate until you check both together. grpo.py gives its own functions."""
    if path.resolve() == Path(grpo.__file__).resolve():
        return {name: getattr(grpo, name) for name in exercises}
    spec = importlib.util.spec_from_file_location("learner_part1", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in set(PART1) - set(exercises):
        setattr(module, name, getattr(grpo, name))
    return {name: getattr(module, name) for name in exercises}


def with_mistake(mistake) -> dict:
    """grpo.py's function with one line of it changed as the mistake says: {name: function}."""
    source = inspect.getsource(getattr(grpo, mistake.exercise))
    if source.count(mistake.right) != 1:
        raise ValueError(
            f"mistake {mistake.name!r}: {mistake.right!r} is not once in grpo.py's "
            f"{mistake.exercise}; update exercises/mistakes.py"
        )
    namespace = dict(vars(grpo))  # grpo.py's globals: the other functions stay the right ones
    exec(
        compile(source.replace(mistake.right, mistake.wrong), f"<mistake {mistake.name}>", "exec"),
        namespace,
    )
    return {mistake.exercise: namespace[mistake.exercise]}


class Swap:
    """A pytest plugin: every test runs with `functions` in place of grpo.py's own, both as
    grpo.NAME and as test_grpo's imported NAME; it records each test's outcome and message."""

    def __init__(self, functions: dict):
        self.functions, self.saved, self.results = functions, [], {}

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        self.saved = [
            (module, name, getattr(module, name))
            for module in (grpo, item.module)
            for name in self.functions
            if hasattr(module, name)
        ]
        for module, name, _ in self.saved:
            setattr(module, name, self.functions[name])

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item):
        for module, name, function in self.saved:
            setattr(module, name, function)

    def pytest_runtest_makereport(self, item, call):  # the first failure of a test is its outcome
        if call.excinfo is not None:
            self.results.setdefault(
                item.name,
                {
                    "passed": False,
                    "error": call.excinfo.typename,
                    "message": str(call.excinfo.value),
                },
            )
        elif call.when == "call":
            self.results.setdefault(item.name, {"passed": True, "error": None})


STUBS = Path(__file__).parent / "part1.py"  # the pristine stubs: the suite checks them, keep them
MINE = Path(__file__).parent / "mine.py"  # the learner's copy, made by the first check


def learners_file(path: Path | None) -> Path:
    """The file to check: --file's, or exercises/mine.py, copied from the stubs the first time
    (so that writing your functions never touches the stubs the suite checks)."""
    if path is not None:
        return path
    if not MINE.exists():
        MINE.write_text(STUBS.read_text())
        print(f"wrote {MINE}: your copy of the stubs. Write your functions there.")
    return MINE


def run(exercises: list[str], functions: dict, quiet: bool = False) -> dict:
    """Run the tests of `exercises` with `functions` in grpo.py's place: {test: outcome}."""
    swap = Swap(functions)
    tests = [f"{ROOT / 'test_grpo.py'}::{test}" for e in exercises for test in EXERCISES[e]]
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        flags = [
            "-q",
            "--tb=short",
            "--rootdir",
            str(ROOT),
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore::pytest.PytestAssertRewriteWarning",
        ]  # (grpo was imported first)
        code = pytest.main([*tests, *flags], plugins=[swap])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        raise RuntimeError(f"pytest could not run the tests of {exercises} (exit code {code})")
    return swap.results


def catalogue(stubs: Path) -> dict:
    """What CI checks: the solution passes, the untouched stubs fail each test with
    NotImplementedError, and each catalogued mistake fails a test whose message says `says`."""
    report = {
        "solution": run(
            list(EXERCISES), learner_functions(Path(grpo.__file__), list(EXERCISES)), quiet=True
        )
    }
    report["stubs"] = {e: run([e], learner_functions(stubs, [e]), quiet=True) for e in EXERCISES}
    report["mistakes"] = {}
    for mistake in MISTAKES:
        results = run([mistake.exercise], with_mistake(mistake), quiet=True)
        failed = {test: r["message"] for test, r in results.items() if not r["passed"]}
        report["mistakes"][mistake.name] = {
            "failed": sorted(failed),
            "caught_by": sorted(t for t, m in failed.items() if mistake.says in m),
        }
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "exercises",
        nargs="*",
        metavar="EXERCISE",
        help=f"one or more of: {', '.join(EXERCISES)} (default: all, in order)",
    )
    parser.add_argument(
        "--file",
        type=Path,
        help="the file of your functions (default: exercises/mine.py, made from part1.py)",
    )
    parser.add_argument(
        "--mistakes",
        action="store_true",
        help="show that the tests catch each mistake of exercises/mistakes.py",
    )
    parser.add_argument("--json", type=Path, help="with --mistakes: also write the report here")
    args = parser.parse_args(argv)
    if args.mistakes:
        report = catalogue(STUBS)
        for mistake in MISTAKES:
            caught = report["mistakes"][mistake.name]["caught_by"]
            print(
                f"{'caught' if caught else 'MISSED'}  {mistake.exercise}: {mistake.what}"
                f"\n        by {', '.join(caught) or 'no test with its message'}"
            )
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return 0 if all(m["caught_by"] for m in report["mistakes"].values()) else 1
    for unknown in set(args.exercises) - set(EXERCISES):
        parser.error(f"no exercise {unknown!r}; choose among {', '.join(EXERCISES)}")
    file = learners_file(args.file)
    if not file.exists():
        parser.error(f"{file} does not exist: pass your file with --file")
    exercises = args.exercises or list(EXERCISES)
    results = run(exercises, learner_functions(file, exercises))
    print()
    for exercise in exercises:
        outcomes = [
            r
            for test, r in results.items()
            if test.split("[")[0] in {t.split("[")[0] for t in EXERCISES[exercise]}
        ]
        failed = [r for r in outcomes if not r["passed"]]
        todo = any(r["error"] == "NotImplementedError" for r in failed)
        state = (
            "not written yet"
            if todo
            else f"{len(failed)} of {len(outcomes)} tests fail"
            if failed
            else f"{len(outcomes)} of {len(outcomes)} tests pass"
        )
        print(f"{'ok  ' if not failed else 'todo' if todo else 'FAIL'}  {exercise}: {state}")
    return 0 if all(r["passed"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
