"""
rewards.py's data: JSON lines, the Hub's ids, the built-in tasks, the order of the rows.
"""

import json
import os

# Before huggingface_hub reads it (at import): the tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
import pytest  # noqa: E402

import rewards  # noqa: E402
from machinery.flags import ConfigError  # noqa: E402
from tests.conftest import write_jsonl  # noqa: E402

# Data


def test_data_from_jsonl_file_and_folder(tmp_path):
    rows = [
        {"question": "Q1?", "answer": "because\n#### 1,200"},
        {"question": "Q2?", "answer": "#### 7"},
    ]
    file = write_jsonl(tmp_path / "data.jsonl", rows)
    loaded = rewards.load_dataset_rows(str(file), "train")
    assert [r["answer"] for r in loaded] == ["1200", "7"]
    assert loaded[0]["prompt"][0]["role"] == "system" and loaded[0]["prompt"][-1] == {
        "role": "user",
        "content": "Q1?",
    }
    folder = tmp_path / "gsm"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", rows[:1])
    assert len(rewards.load_dataset_rows(str(folder), "train")) == 2
    assert len(rewards.load_dataset_rows(str(folder), "test")) == 1


def test_bad_data_is_a_clear_error(tmp_path, capsys, caplog):
    """Each message whole: what is wrong, with which file and line (numbered from 1, as an editor shows it), and
    what to do (the parts that come from elsewhere, the parse error and the Hub's, between a fixed beginning and
    end); said once, with nothing else printed or logged before it."""

    def message(source, split="train"):
        with pytest.raises(ConfigError) as error:
            rewards.load_dataset_rows(str(source), split)
        return str(error.value)

    good = {"question": "Q?", "answer": "#### 3"}
    file = write_jsonl(tmp_path / "bad.jsonl", [good, {"question": "Q?", "solution": "3"}])
    assert message(file) == (
        f"--dataset file {str(file)!r}, line 2, lacks the key(s) ['answer']; each row needs "
        "'question' and 'answer'."
    )
    (tmp_path / "empty_dir").mkdir()
    assert message(tmp_path / "empty_dir", "test") == (
        f"--dataset folder {str(tmp_path / 'empty_dir')!r} has no "
        "test.jsonl; it needs train.jsonl and test.jsonl."
    )
    (tmp_path / "empty.jsonl").write_text("\n")
    assert message(tmp_path / "empty.jsonl") == (
        f"--dataset file {str(tmp_path / 'empty.jsonl')!r} is empty; it needs "
        "rows with 'question' and 'answer'."
    )
    (tmp_path / "list.jsonl").write_text(
        '["question", "answer"]\n'
    )  # the keys' names, but no object
    assert ", line 1, lacks the key(s) ['answer', 'question']" in message(tmp_path / "list.jsonl")
    write_jsonl(tmp_path / "gap.jsonl", [good]).write_text(
        json.dumps(good) + "\n\n" + json.dumps(good) + "\n"
    )
    assert (
        len(rewards.load_dataset_rows(str(tmp_path / "gap.jsonl"), "train")) == 2
    )  # a blank line ends nothing
    (tmp_path / "broken.jsonl").write_text(
        (json.dumps(good) + "\n") * 6 + "not json\n" + json.dumps(good) + "\n"
    )
    capsys.readouterr()
    text = message(tmp_path / "broken.jsonl")
    assert text.startswith(
        f"--dataset file {str(tmp_path / 'broken.jsonl')!r}, line 7, is not JSON (Expecting value"
    )
    assert text.endswith("); write one JSON object per line, with 'question' and 'answer'.")
    assert (
        capsys.readouterr() == ("", "") and not caplog.records
    )  # no second, raw report of the same error
    # Offline (as here) the Hub cannot be reached; online this id does not exist: a clear error either way.
    text = message("nobody/no-such-dataset")
    assert text.startswith("--dataset 'nobody/no-such-dataset' cannot be loaded (")
    assert text.endswith(
        "). Check the id, --dataset-config and the network; without the Hub: --dataset arithmetic "
        "or a local JSON-lines file."
    )


def test_a_hub_dataset_is_asked_for_by_id_configuration_and_split(monkeypatch, tmp_path, capsys):
    """GSM8K's Hub id needs its configuration ("main" unless --dataset-config says otherwise); a single local file
    serves both splits, and says so when it is read for evaluation."""
    import datasets

    asked = []
    rows = datasets.Dataset.from_list([{"question": "Q?", "answer": "#### 3"}])
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *args, **kwargs: asked.append((args, kwargs)) or rows
    )
    assert rewards.load_dataset_rows("openai/gsm8k", "test")[0]["answer"] == "3"
    rewards.load_dataset_rows("someone/data", "train", "other")
    rewards.load_question_answer_rows("openai/gsm8k", "train")  # its own default configuration too
    assert asked == [
        (("openai/gsm8k", "main"), {"split": "test"}),
        (("someone/data", "other"), {"split": "train"}),
        (("openai/gsm8k", "main"), {"split": "train"}),
    ]
    file = write_jsonl(tmp_path / "one.jsonl", [{"question": "Q?", "answer": "#### 3"}])
    monkeypatch.undo()
    rewards.load_dataset_rows(str(file), "train")
    assert capsys.readouterr().out == ""
    rewards.load_dataset_rows(str(file), "test")
    assert capsys.readouterr().out == (
        f"note: --dataset {str(file)!r} is one file: evaluation uses questions it trains on.\n"
    )


def test_the_default_prompt_and_task_are_the_ones_documented():
    """A prompt is the system prompt, the worked example, then the question; the default task is a + b up to 49
    in seed 0's order, and arithmetic_problems gives the training problems unless asked for the held-out ones."""
    prompt = rewards.make_prompt("Q?")
    assert prompt == [
        {"role": "system", "content": rewards.SYSTEM_PROMPT},
        *rewards.EXAMPLE_TURN,
        {"role": "user", "content": "Q?"},
    ]
    rows = rewards.load_dataset_rows("arithmetic", "train")
    assert rows == rewards.load_dataset_rows("arithmetic", "train", "main", 49, 0, True)
    assert rows[0]["prompt"] == rewards.make_prompt(rows[0]["question"])  # with the worked example
    assert rewards.arithmetic_problems(9, 0) == rewards.arithmetic_problems(9, 0, held_out=False)


def test_arithmetic_task_holds_out_distinct_problems_never_trained_on():
    train = rewards.load_dataset_rows("arithmetic", "train", arithmetic_max=12, seed=5)
    assert train == rewards.load_dataset_rows("arithmetic", "train", arithmetic_max=12, seed=5)
    test = rewards.load_dataset_rows("arithmetic", "test", arithmetic_max=12, seed=5)
    pairs = []
    for row in train + test:
        a, b = map(int, row["question"].removeprefix("What is ").removesuffix("?").split(" + "))
        assert 0 <= a <= 12 and 0 <= b <= 12 and int(row["answer"]) == a + b
        pairs.append((a, b))
    assert sorted(pairs) == [(a, b) for a in range(13) for b in range(13)]  # each pair once
    assert all((a + 2 * b) % 5 == 0 for a, b in pairs[len(train) :])  # the held-out rule
    # The default task: at least 1,000 distinct problems to train on and 200 held out.
    default_train, default_test = (
        rewards.load_dataset_rows("arithmetic", split) for split in ("train", "test")
    )
    assert len(default_train) >= 1000 and len(default_test) >= 200


def test_the_task_of_three_terms_holds_out_distinct_problems_and_shows_two_checked_steps():
    """`arithmetic3`: every a + b - c with c <= a + b, each once, a fifth held out; its worked example shows one
    equation per step, each of which the step checker reads and finds true."""
    train = rewards.load_dataset_rows("arithmetic3", "train", arithmetic_max=6, seed=5)
    test = rewards.load_dataset_rows("arithmetic3", "test", arithmetic_max=6, seed=5)
    triples = []
    for row in train + test:
        a, rest = row["question"].removeprefix("What is ").removesuffix("?").split(" + ")
        b, c = rest.split(" - ")
        a, b, c = int(a), int(b), int(c)
        assert 0 <= c <= a + b and max(a, b, c) <= 6 and int(row["answer"]) == a + b - c
        triples.append((a, b, c))
    assert sorted(triples) == [
        (a, b, c) for a in range(7) for b in range(7) for c in range(7) if c <= a + b
    ]
    assert set(triples[len(train) :]) == {
        t for t in triples if (t[0] + 2 * t[1] + 3 * t[2]) % 5 == 0
    }  # held out
    assert train == rewards.load_dataset_rows(
        "arithmetic3", "train", arithmetic_max=6, seed=5
    )  # seeded
    assert train != rewards.load_dataset_rows("arithmetic3", "train", arithmetic_max=6, seed=6)
    assert " - " not in rewards.arithmetic_problems(3, 0)[0]["question"]  # two terms unless asked
    assert train[0]["prompt"][1:3] == rewards.EXAMPLE_TURN_STEPS  # the example of two steps
    example = rewards.EXAMPLE_TURN_STEPS[1]["content"]
    assert [reward for _, _, reward in rewards.reasoning_steps(example)] == [
        1.0,
        1.0,
    ] and rewards.is_strict_format(example)
    assert rewards.answer_reward([example], ["16"]) == [1.0]
    assert (
        rewards.load_dataset_rows("arithmetic", "test")[0]["prompt"][1:3] == rewards.EXAMPLE_TURN
    )  # unchanged


def test_the_prompt_shows_the_worked_example_as_an_earlier_turn_unless_switched_off():
    with_example, without = (
        rewards.make_prompt("What is 2 + 3?"),
        rewards.make_prompt("What is 2 + 3?", False),
    )
    assert [m["role"] for m in with_example] == ["system", "user", "assistant", "user"]
    assert with_example[1:3] == rewards.EXAMPLE_TURN and with_example[-1] == without[-1]
    assert [m["role"] for m in without] == ["system", "user"]
    assert rewards.is_strict_format(
        rewards.EXAMPLE_TURN[1]["content"]
    )  # the example is what earns 1.0
    rows = rewards.load_dataset_rows("arithmetic", "test", arithmetic_max=4, example_turn=False)
    assert all(r["prompt"] == rewards.make_prompt(r["question"], False) for r in rows)


def test_data_order_is_a_seeded_shuffle_per_epoch():
    rows = [{"i": i} for i in range(10)]
    steps = [[r["i"] for r in rewards.rows_for_step(rows, s, 4, seed=0)] for s in range(5)]
    first_epoch = steps[0] + steps[1] + steps[2][:2]
    assert sorted(first_epoch) == list(range(10))  # every row once per epoch
    assert steps == [[r["i"] for r in rewards.rows_for_step(rows, s, 4, seed=0)] for s in range(5)]


def test_data_order_changes_with_the_epoch_and_the_seed():
    """Bugs: no shuffle, an ignored seed, the same order every epoch (the other test checks one epoch's rows)."""
    rows = [{"i": i} for i in range(12)]

    def order(seed, epoch):
        steps = range(3 * epoch, 3 * epoch + 3)
        return [r["i"] for s in steps for r in rewards.rows_for_step(rows, s, 4, seed)]

    assert order(0, 0) != list(range(12))  # shuffled
    assert sorted(order(0, 1)) == list(range(12)) and order(0, 1) != order(
        0, 0
    )  # a new order each epoch
    assert order(1, 0) != order(0, 0)  # the seed matters


def test_an_eval_size_past_the_held_out_set_is_said(capsys):
    eval_rows = rewards.load_dataset_rows("arithmetic", "test", size=100_000)
    assert len(eval_rows) == 500  # the held-out sums of 0..49 + 0..49
    said = "note: 100000 test rows asked for (--eval-size), 500 there: all are used"
    assert said in capsys.readouterr().out
    assert len(rewards.load_dataset_rows("arithmetic", "test", size=200)) == 200
    assert "note" not in capsys.readouterr().out


def test_answers_that_are_no_number_are_counted_and_none_at_all_refused(tmp_path, capsys):
    """No reply can earn the answer reward of "four": such rows are kept (their format reward still
    teaches) and counted once, with the first; a file of only such rows is refused."""
    rows = [{"question": "2 + 2?", "answer": "four"}, {"question": "1 + 1?", "answer": "2"}]
    path = write_jsonl(tmp_path / "some.jsonl", rows)
    assert len(rewards.load_dataset_rows(str(path), "train")) == 2
    said = capsys.readouterr().out
    assert "1 of 2 answers are no number (row 1: 'four')" in said and said.count("note") == 1
    none = write_jsonl(tmp_path / "none.jsonl", rows[:1])
    with pytest.raises(ConfigError, match="no answer is a number"):
        rewards.load_dataset_rows(str(none), "train")
    rewards.load_dataset_rows("arithmetic", "test")
    assert capsys.readouterr().out == ""  # the built-in task's answers are all numbers
