"""
rewards.py's rewards and the steps of the reasoning: exact values, adversarial text, any text.
"""

import json
import os
import time
from fractions import Fraction

# Before huggingface_hub reads it (at import): the tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

import grpo  # noqa: E402
import rewards  # noqa: E402
from rewards import (  # noqa: E402
    TAGS,
    answer_reward,
    extract_answer,
    extract_gold_answer,
    format_reward,
    parse_number,
)
from tests.conftest import byte_level_tokenizer, need  # noqa: E402

# Rewards and answer parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,000", 1000.0),
        ("$18", 18.0),
        ("18.00", 18.0),
        ("18", 18.0),
        ("-3", -3.0),
        (".5", 0.5),
        ("it costs $1,234.50 total", 1234.5),
        ("first 3 then 4", 4.0),
        ("no number", None),
        ("", None),
        ("The answer is 18.", 18.0),
        ("18, then 20", 20.0),
        ("= -3", -3.0),
        ("(-2.5)", -2.5),
        # a fraction is its value; scientific notation; the Unicode minus; a range is not negative
        ("3/4", 0.75),
        ("-3/4", -0.75),
        ("1.5e3", 1500.0),
        ("2e-3", 0.002),
        ("4E2", 400.0),
        ("\u22127", -7.0),
        ("\u22121.5e\u22122", -0.015),
        ("pages 5-10", 10.0),
        ("x-3", 3.0),
        # unreadable: commas not in groups of three, a zero denominator, a number of 101+ characters
        ("1,0000", None),
        ("1,2,3", None),
        ("1/0", None),
        ("1" * 101, None),
        ("5.5.5", None),
        # letters after the last digit are not part of it; a grouped number with an exponent
        ("7 Xmas trees", 7.0),
        ("1,000e3", 1e6),
        ("1,000E3", 1e6),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    "gold, right, wrong",
    [
        ("3/4", "0.75", "4"),
        ("0.75", "3/4", "3"),
        ("1.5e3", "1,500", "3"),
        ("2e-3", "0.002", "-3"),
        ("\u22127", "-7", "7"),
        ("-7", "\u22127", "7"),
        ("10", "pages 5-10", "-10"),
        ("1,0000", "10000", "0"),
    ],
)
def test_answer_reward_reads_gold_answers_in_the_same_forms(gold, right, wrong):
    completions = [
        f"<reasoning>r</reasoning><answer>{right}</answer>",
        f"<reasoning>r</reasoning><answer>{wrong}</answer>",
    ]
    assert answer_reward(completions, [extract_gold_answer(gold)] * 2) == [1.0, 0.0]


@pytest.mark.parametrize(
    "gold, near_miss",
    [
        # rounded or close: a reward comparing rounded numbers, or with a tolerance, would take these
        ("18", "18.4"),
        ("18", "17.6"),
        ("18", "18.5"),
        ("18", "18.001"),
        ("18", "17.9999"),
        ("2.5", "2"),
        ("2.5", "3"),
        # a sign dropped or added, a factor of 10, a fraction read as its numerator or its denominator
        ("-3", "3"),
        ("3", "-3"),
        ("3", "−3"),
        ("18", "180"),
        ("18", "1.8"),
        ("18", "1,800"),
        ("18", "18/4"),
        ("0.75", "3/5"),
        ("3", "3/4"),
        ("4", "3/4"),
        ("18", "36/3"),
    ],
)
def test_a_near_miss_scores_zero(gold, near_miss):
    """Exactly the gold number or nothing: no partial credit for nearly right (GRPO would learn "close enough")."""
    assert answer_reward(
        [f"<reasoning>r</reasoning><answer>{near_miss}</answer>"], [extract_gold_answer(gold)]
    ) == [0.0]
    assert answer_reward(
        [f"<reasoning>r</reasoning><answer>{gold}</answer>"], [extract_gold_answer(gold)]
    ) == [1.0]


def test_extract_gold_answer():
    assert extract_gold_answer("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert extract_gold_answer("#### 1,000") == "1000"
    assert extract_gold_answer("a #### b #### 42 ") == "42"
    assert extract_gold_answer("7") == "7"
    assert extract_gold_answer("2 + 10 = 12####12") == "12"  # no space around the marks


def test_the_answer_block_is_the_last_one_that_closes():
    assert (
        extract_answer("<answer>5</answer> then <answer>7") == "5"
    )  # the unclosed one after it is not read
    assert extract_answer("<answer>5</answer><answer>6</answer>") == "6"
    assert answer_reward([None, "<answer>3</answer>"], ["3", "3"]) == [
        0.0,
        1.0,
    ]  # a non-text completion scores 0


def test_answer_reward():
    completions = [
        "<reasoning>9*2</reasoning>\n<answer>18</answer>",
        "<reasoning>x</reasoning><answer>$18.00</answer>",
        "<reasoning>18 eggs</reasoning><answer>17</answer>",  # the answer block decides, not the reasoning
        "I think it is 16, no, 18",  # no tags: the last number counts
        "<answer>18</answer> but also <answer>19</answer>",  # the last block counts
        "<answer></answer>",
        "",
        "<answer>eighteen</answer>",
        "\x00\uffff<answer>",
    ]
    assert answer_reward(completions, ["18"] * len(completions)) == [1, 1, 0, 1, 0, 0, 0, 0, 0]
    assert answer_reward(["<answer>1,000</answer>"], ["1000"]) == [1.0]
    assert answer_reward([None], ["1"]) == [0.0]
    with pytest.raises(ValueError):
        answer_reward(["1", "2"], ["1"])  # a length mismatch is a bug in the caller, not odd text


def test_format_reward():
    completions = [
        "<reasoning>\nstep\n</reasoning>\n<answer>\n18\n</answer>",
        "  <reasoning>a</reasoning><answer>1</answer>\n",
        "<reasoning>a</reasoning><answer>1</answer> trailing text",  # not strict: 4 tags once -> 0.5
        "<answer>1</answer>",
        "<reasoning><reasoning></reasoning>",  # repeated tag earns nothing
        "plain text",
        "",
        None,
        # strict is each tag exactly once, in order: not two answer blocks, nor tags nested or swapped
        "<reasoning>a</reasoning><answer>1</answer><answer>2</answer>",
        "<reasoning>a <answer>1</answer></reasoning><answer>1</answer>",
        "<answer>1</answer><reasoning>a</reasoning>",
        "<reasoning>a</reasoning>so<answer>1</answer>",
    ]
    assert format_reward(completions) == [
        1.0,
        1.0,
        0.5,
        0.25,
        0.125,
        0.0,
        0.0,
        0.0,
        0.25,
        0.25,
        0.5,
        0.5,
    ]
    assert extract_answer("<answer> 5 </answer>") == " 5 "
    assert extract_answer("<answer>a<answer>b</answer>") == "b"  # the block that closes last


# Texts that made backtracking patterns take seconds: tags without their closing partner, long
# runs of the characters numbers are made of. 1 MB each.
ADVERSARIAL = {
    "open answer tags": "<answer>" * 125_000,
    "open reasoning then answer": "<reasoning>1<answer>" * 52_000,
    "digits": "1" * 1_000_000,
    "digit-comma": "1," * 500_000,
    "digit-dot": "1." * 500_000,
    "digit-e": "1e" * 500_000,
    "digit-slash": "1/" * 500_000,
    "dashes": "-" * 1_000_000,
    "unicode minus": "\u2212" * 1_000_000,
    "letters": "a" * 1_000_000,
    "tags and spaces": "<reasoning> </reasoning> <answer> </answer> " * 23_000,
}


def growth(score, text: str) -> float:
    """How much longer `score` takes on `text` than on an eighth of it, keeping its end (where a
    closing "=9" or "1=1" is): linear time gives 8x, the backtracking these texts once caused
    64x. The process's CPU time, the best of 9 of each, taken in turns: on a busy machine a run
    waits for its turns, which wall-clock time counts (more of them for the longer text) and CPU
    time does not."""

    small = text[: len(text) // 8 - 10] + text[-10:]
    large = text
    best = {small: float("inf"), large: float("inf")}
    for _ in range(9):
        for piece in (small, large):
            start = time.process_time()
            score(piece)
            best[piece] = min(best[piece], time.process_time() - start)
    return best[large] / best[small]


# The ratio's bound, 13x: 8x is linear, 64x quadratic; 13 leaves a margin of 1.6 for noise either
# way (a fixed cost per call only lowers the ratio).
LINEAR_GROWTH = 13


@pytest.mark.slow
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_rewards_take_linear_time_on_adversarial_text(name):
    """8 times the text takes about 8 times as long, not 64 (quadratic): the backtracking these
    texts once caused took seconds on 1 MB. A ratio, not a time: any machine, busy or not."""

    def score(text):
        format_reward([text]), answer_reward([text], ["1"])

    ratio = growth(score, ADVERSARIAL[name])
    assert ratio < LINEAR_GROWTH, f"{name}: 8x the text took {ratio:.1f}x as long"


@pytest.mark.slow
def test_rewards_never_raise_and_stay_in_range_on_any_text():
    hypothesis = need("hypothesis")
    strategies = hypothesis.strategies
    pieces = strategies.sampled_from(
        [*TAGS, "-", "\u2212", ",", ".", "/", "e", "E", " ", "\n", "1", "0", "9"]
    )
    texts = strategies.one_of(strategies.text(), strategies.lists(pieces).map("".join))

    @hypothesis.settings(max_examples=400, deadline=None)
    @hypothesis.given(texts, texts)
    def check(completion, gold):
        assert format_reward([completion])[0] in {0.0, 0.125, 0.25, 0.375, 0.5, 1.0}
        assert answer_reward([completion], [gold]) in ([0.0], [1.0])
        parse_number(completion)

    check()


# The steps of the reasoning (process supervision): a program checks each equation, exactly


@pytest.mark.parametrize(
    "text, expected",
    [
        ("14 + 7", 21),
        ("1/3 + 1/6", Fraction(1, 2)),
        ("0.1 + 0.2", Fraction(3, 10)),
        ("\u22123 × \u22122", 6),
        ("1,000 + 5", 1005),
        ("12 ÷ 4 × 3", 9),
        ("2 * (3 + 4)", 14),
        ("((((1))))", 1),
        ("-(2 - 5)", 3),
        ("+1", 1),
        ("--1", 1),
        ("7 - 2 - 1", 4),
        ("8 / 4 / 2", 1),
        ("2 + 3 * 4", 14),
        ("1\t+\t1", 2),
        # the bounds, at and just past them: a number of 100 characters, 20 parentheses deep, 20 signs
        ("9" * 100, int("9" * 100)),
        ("(" * 20 + "1" + ")" * 20, 1),
        ("-" * 15 + "1", -1),
        ("-" * 20 + "2", 2),
        ("(" * 21 + "1" + ")" * 21, None),
        ("-" * 25 + "1", None),
        # not plain arithmetic, or not readable: None, never an exception
        ("1/0", None),
        ("2^10", None),
        ("2**3", None),
        ("2(3)", None),
        ("1 +", None),
        ("", None),
        ("x + 1", None),
        ("(1", None),
        ("1)", None),
        ("1,0000", None),
        ("9" * 101, None),
        ("(" * 25 + "1" + ")" * 25, None),
    ],
)
def test_evaluate_arithmetic_exactly(text, expected):
    assert rewards.evaluate_arithmetic(text) == expected


@pytest.mark.parametrize(
    "line, holds",
    [
        ("14 + 7 = 21", True),
        ("14 + 7 = 22", False),
        ("3 × (4 + 2) = 18 = 9 × 2", True),
        ("1 = 1 = 2", False),
        ("She makes 9 * 2 = $18.", True),
        ("Total: 3 + 4 = 7, and 7 - 2 = 5", True),
        ("3 + 4 = 7, and 7 - 2 = 6", False),
        ("0.1 + 0.2 = 0.3", True),
        ("1/3 = 0.333", False),
        ("x = 5", None),
        ("so the answer is 21", None),
        ("5 / 0 = 1", None),
        ("= 5", None),
        ("a + b = c", None),
        ("$1 + $2 = $3", True),
    ],
)
def test_an_equation_holds_or_not_or_is_none(line, holds):
    assert rewards.equation_holds(line) is holds


def test_reasoning_steps_are_the_equations_of_the_reasoning_block_with_where_they_end():
    completion = (
        "intro 1 + 1 = 2\n<reasoning>\n14 + 7 = 21\n3 × 4 = 13\nso we add\n(2+3)*4 = 20 = 4 × 5\n"
        "</reasoning>\n<answer>\n21 = 21\n</answer>"
    )
    steps = rewards.reasoning_steps(completion)
    assert [reward for _, _, reward in steps] == [
        1.0,
        0.0,
        1.0,
    ]  # the line before the block, the answer: no steps
    assert [completion[start:end] for start, end, _ in steps] == [
        "14 + 7 = 21",
        "3 × 4 = 13",
        "(2+3)*4 = 20 = 4 × 5",
    ]
    assert all(completion[start - 1] == completion[end] == "\n" for start, end, _ in steps)
    assert rewards.reasoning_steps("<reasoning>2 + 2 = 4") == [
        (11, 20, 1.0)
    ]  # unclosed: to the end of the text
    assert rewards.reasoning_steps("2 + 2 = 4") == [] and rewards.reasoning_steps(None) == []

    def rewards_of(text):
        return [reward for _, _, reward in rewards.reasoning_steps(text)]

    # the first block only, and its own end; a stray end tag before it ends nothing
    assert rewards_of("<reasoning>\n1 + 1 = 2\n</reasoning>\n3 + 3 = 7\n</reasoning>") == [1.0]
    assert rewards_of(
        "<reasoning>\n1 + 1 = 2\n</reasoning><reasoning>\n3 + 3 = 7\n</reasoning>"
    ) == [1.0]
    assert rewards_of("</reasoning> <reasoning>\n1 + 1 = 3\n</reasoning>") == [0.0]
    # a line is read from its own start (or the tag's end): a long line before it does not make it too long
    assert rewards_of("<reasoning>\n" + "x" * 300 + "\n1 + 1 = 2\n</reasoning>") == [1.0]
    assert (
        rewards_of("x" * 300 + "<reasoning>1 + 1 = 2")
        == rewards_of("\n9 = 8 <reasoning>1 + 1 = 2")
        == [1.0]
    )
    # a line of MAX_STEP_LENGTH characters is a step, one longer is not
    line = "1 + 1 = " + " " * (rewards.MAX_STEP_LENGTH - 9) + "2"
    assert len(line) == rewards.MAX_STEP_LENGTH and rewards_of(f"<reasoning>\n{line}\n") == [1.0]
    assert rewards_of(f"<reasoning>\n {line}\n") == []
    # a line that ends in "=", or starts with it (no step), does not hide the next one
    assert rewards_of("<reasoning>\n1 + 1 =\n2 + 2 = 4\n</reasoning>") == [1.0]
    assert rewards_of("<reasoning>= 1\n1 + 1 = 2") == [1.0]
    # the first MAX_STEPS lines with "=", no more
    assert len(rewards.reasoning_steps("<reasoning>" + "1 = 1\n" * 300)) == rewards.MAX_STEPS


def test_the_step_reward_counts_distinct_correct_equations_and_is_bounded():
    """The scalar form (\"each correct step adds 0.2\"), bounded against farming: a repeated equation earns nothing
    more, and six correct ones no more than five (Gao et al., arXiv 2410.15115)."""

    def reply(*lines):
        return "<reasoning>\n" + "\n".join(lines) + "\n</reasoning><answer>1</answer>"

    assert rewards.step_reward(
        [reply("1 + 1 = 2"), reply("1 + 1 = 3"), reply("no equation"), None]
    ) == [0.2, 0.0, 0.0, 0.0]
    assert rewards.step_reward([reply(*["1 + 1 = 2"] * 9)]) == [0.2]  # repeated: once
    assert rewards.step_reward([reply(*[f"{k} + 1 = {k + 1}" for k in range(6)])]) == [
        1.0
    ]  # capped
    assert rewards.step_reward([reply("1 + 1 = 2", "2 + 2 = 4", "2 + 2 = 5")]) == [
        pytest.approx(0.4)
    ]
    assert rewards.step_reward([reply("1 * 0 = 0", "2 * 0 = 0")]) == [
        pytest.approx(0.4)
    ]  # distinct, whole lines


STEP_ADVERSARIAL = {
    "equal signs": "=" * 1_000_000,
    "lines of equations": "1=1\n" * 250_000,
    "lines of non-equations": "x=y\n" * 250_000,
    "one long equation": "9" * 999_990 + "=9",
    "open parentheses": "(" * 999_990 + "1=1",
    "long product": ("9*" * 95 + "9=1\n") * 5_000,
    "deep but short": ("(" * 60 + "1" + ")" * 60 + "=1\n") * 8_000,
    "newlines": "\n" * 1_000_000,
    "division by zero": "1/0=1\n" * 166_000,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", STEP_ADVERSARIAL)
def test_steps_take_linear_time_on_adversarial_text(name):
    """As the other rewards (8 times the text, about 8 times as long): "=" is found by str.find,
    each line read once, bounded lines, depth and count of steps."""

    def score(text):
        rewards.reasoning_steps(text), rewards.step_reward([text])

    ratio = growth(score, "<reasoning>" + STEP_ADVERSARIAL[name])
    assert ratio < LINEAR_GROWTH, f"{name}: 8x the text took {ratio:.1f}x as long"


def test_steps_never_raise_on_any_text():
    hypothesis = need("hypothesis")
    strategies = hypothesis.strategies
    pieces = strategies.sampled_from(
        [
            "<reasoning>",
            "</reasoning>",
            "=",
            "+",
            "-",
            "\u2212",
            "*",
            "×",
            "/",
            "÷",
            "(",
            ")",
            ",",
            ".",
            "$",
            " ",
            "\n",
            "0",
            "1",
            "9",
            "x",
        ]
    )
    texts = strategies.one_of(strategies.text(), strategies.lists(pieces, max_size=60).map("".join))

    @hypothesis.settings(max_examples=400, deadline=None)
    @hypothesis.given(texts)
    def check(text):
        steps = rewards.reasoning_steps("<reasoning>" + text)
        assert all(
            reward in (0.0, 1.0) and 11 <= start < end <= len(text) + 11
            for start, end, reward in steps
        )
        assert 0 <= rewards.step_reward(["<reasoning>" + text])[0] <= 1

    check()


def test_score_completions_weights_and_components():
    # format and answer differ in each row, so swapped weights would give other totals
    total, parts = grpo.score_completions(
        ["<reasoning>a</reasoning><answer>3</answer>", "4", ""],
        ["4", "4", "4"],
        {"format": 0.5, "answer": 2.0, "step": 0.0},
    )
    torch.testing.assert_close(parts["format"], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(parts["answer"], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(total, torch.tensor([0.5, 2.0, 0.0]))


def test_step_token_ends_name_the_token_that_holds_each_steps_last_character():
    """Each step's token index k: the reply's tokens up to k decode to text that reaches the step's end, those
    before k do not. The reward is reasoning_steps' (1 holds, 0 does not)."""
    text = "<reasoning>\nFirst, 3 × 4 = 12\nthen 12 - 2 = 11\nso 11 + 0 = 11</reasoning><answer>11</answer>"
    tokenizer = byte_level_tokenizer(text)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text and len(ids) < len(
        text.encode()
    )  # merged
    ends = rewards.step_token_ends(tokenizer, ids, text)
    steps = rewards.reasoning_steps(text)
    assert [r for _, r in ends] == [1.0, 0.0, 1.0] and len(steps) == 3
    for (k, _), (_, end, _) in zip(ends, steps):
        assert len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)) >= end
        assert len(tokenizer.decode(ids[:k], skip_special_tokens=True)) < end


def test_a_reply_that_ended_keeps_its_last_line_as_a_step_unless_it_was_cut():
    """step_token_ends' default is a reply that ended: its last line, with no newline after it, is a step; a
    truncated reply's (truncated=True) is not, for the cut may have fallen in it."""
    text = "<reasoning>\n2 + 2 = 4"
    tokenizer = byte_level_tokenizer(text)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert [r for _, r in rewards.step_token_ends(tokenizer, ids, text)] == [1.0]
    assert rewards.step_token_ends(tokenizer, ids, text, truncated=True) == []


def test_step_statistics_count_steps_that_hold_and_that_repeat():
    replies = [
        "<reasoning>\n1 + 2 = 3\n1 + 2 = 3\n2 + 2 = 5\n</reasoning>",
        "no steps",
        "<reasoning>\n3 * 3 = 9\n</reasoning>",
    ]
    stats = rewards.step_statistics(replies)
    assert stats == {
        "steps/per_reply": 4 / 3,
        "steps/hold_frac": 3 / 4,
        "steps/repeated_frac": 1 / 4,
    }
    assert rewards.step_statistics([]) == {
        "steps/per_reply": 0.0,
        "steps/hold_frac": 0.0,
        "steps/repeated_frac": 0.0,
    }


def test_step_statistics_of_one_reply_with_one_step():
    assert rewards.step_statistics(["<reasoning>\n2 + 2 = 4\n</reasoning>"]) == {
        "steps/per_reply": 1.0,
        "steps/hold_frac": 1.0,
        "steps/repeated_frac": 0.0,
    }
    assert (
        rewards.step_statistics(["<reasoning>\n2 + 2 = 5\n</reasoning>"])["steps/hold_frac"] == 0.0
    )


def sentencepiece_tokenizer(text: str):
    """A SentencePiece-style tokenizer, built offline: ▁ for spaces, one token per character seen
    in `text`, and byte fallback for any other (an emoji: four byte tokens, <0xF0>...)."""
    from tokenizers import normalizers

    chars = sorted(set(text.replace(" ", "▁")) - {"😀", "✓"})
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    vocab |= {c: 257 + i for i, c in enumerate(chars)}
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.mark.parametrize("kind", ["byte-level BPE", "SentencePiece, byte fallback"])
def test_a_step_ending_in_a_character_of_several_bytes_maps_to_the_token_that_completes_it(kind):
    """A step's token is the first whose prefix decodes to the whole line: a prefix that ends
    inside an emoji's bytes decodes to U+FFFD, which is not the line's last character."""
    text = "<reasoning>\n14 + 7 = 21 😀\n21 - 5 = 16 ✓\n</reasoning><answer>16</answer>"
    tokenizer = byte_level_tokenizer("plain words") if kind == "byte-level BPE" else None
    tokenizer = tokenizer or sentencepiece_tokenizer(text)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    steps = rewards.credited_steps(text)
    ends = rewards.step_token_ends(tokenizer, ids, text)
    assert len(ends) == len(steps) == 2
    for (k, _), (start, end, _) in zip(ends, steps):
        prefix = tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
        assert prefix[start:end] == text[start:end] and "\ufffd" not in prefix, (kind, prefix)
        assert text[start:end] not in tokenizer.decode(ids[:k], skip_special_tokens=True)


def test_credited_steps_are_distinct_lines_that_compute_and_not_a_line_cut_off():
    """Process supervision credits each distinct equation once, only one that computes something,
    and never the last line of a truncated reply that the cut fell in (14 + 7 = 2 at the cut)."""
    text = "<reasoning>\n1 = 1\n2 + 2 = 4\n2 + 2 = 4\n-3 = -3\n3 × 4 = 12\n14 + 7 = 2"
    lines = [text[s:e] for s, e, _ in rewards.credited_steps(text)]
    assert lines == ["2 + 2 = 4", "3 × 4 = 12", "14 + 7 = 2"]  # the last is wrong: 0
    cut = [text[s:e] for s, e, _ in rewards.credited_steps(text, truncated=True)]
    assert cut == ["2 + 2 = 4", "3 × 4 = 12"]  # cut in "14 + 7 = 2(1)": not a step
    whole = text + "\n"  # the last line ended before the cut: a step, and a wrong one
    assert [r for *_, r in rewards.credited_steps(whole, truncated=True)] == [1.0, 1.0, 0.0]


def test_a_step_counts_only_if_it_arrives_at_a_value_of_the_worked_solution():
    """With a row's values, a step that holds earns 1 only if its result (the last side of its last
    equation) is one of them: for 11 + 9 - 6, 11 + 9 = 20 and 9 - 6 = 3 (either order), not
    6 - 6 = 0; a false line stays 0. Without values, every line that holds counts."""
    (row,) = [
        r
        for r in rewards.arithmetic_problems(12, 0, terms=3)
        if r["question"] == "What is 11 + 9 - 6?"
    ]
    assert row["values"] == ["20", "5", "3", "14"]  # a + b, a - c, b - c, the answer
    text = "<reasoning>\n11 + 9 = 20\n6 - 6 = 0\n9 - 6 = 3 = 3\n20 - 6 = 13\n11 - 6 + 9 = 14\n"
    assert [r for *_, r in rewards.credited_steps(text, values=row["values"])] == [1, 0, 1, 0, 1]
    assert [r for *_, r in rewards.credited_steps(text)] == [1, 1, 1, 0, 1]
    assert rewards.step_result("so 11 + 9 = 20, and 20 - 6 = 14.") == 14
    assert rewards.step_result("2 + 2 =") is None and rewards.step_result("no equation") is None
    assert rewards.step_result("2 + 2 = 5 = 4") == 4  # where it ends, held or not (checked apart)
    assert rewards.step_result("11 + 9 = 20 apples, 3 left") == 20  # a number is no equation
    assert rewards.step_result("11 + 9 = 20, so 20 - 6 =") == 20  # nor an open one
    assert [r["values"] for r in rewards.arithmetic_problems(3, 0)[:1]] == [
        [rewards.arithmetic_problems(3, 0)[0]["answer"]]
    ]  # a + b: one step, the answer


def test_gsm8k_rows_carry_the_values_their_worked_solution_notes(tmp_path):
    """GSM8K notes each calculation of its solutions (<<48/2=24>>): those, then the final answer,
    are the values a step may reach; a bare answer notes none, and then every step that holds
    counts (None); a row may give its own."""
    solution = "She sold 48/2 = <<48/2=24>>24 in May.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"
    assert rewards.solution_values(solution) == ["24", "72", "72"]
    assert rewards.solution_values("72") is None
    lines = [
        {"question": "Q1?", "answer": solution},
        {"question": "Q2?", "answer": "7"},
        {"question": "Q3?", "answer": "7", "values": ["3", "7"]},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = rewards.load_dataset_rows(str(path), "train")
    assert [r["values"] for r in rows] == [["24", "72", "72"], None, ["3", "7"]]
    text = "<reasoning>\n48 / 2 = 24\n24 + 24 = 48\n24 + 48 = 72\n"
    assert [r for *_, r in rewards.credited_steps(text, values=rows[0]["values"])] == [1, 0, 1]
    cents = "A cent is 1/100 = <<1/100=.01>>.01 dollars, so 5 cost <<5*.01=.05>>.05.\n#### .05"
    text = "<reasoning>\n5 * 0.01 = 0.05\n500 * 2 = 1000\n"  # GSM8K writes .05, and 1,000
    values = rewards.solution_values(cents) + ["1,000"]
    assert [r for *_, r in rewards.credited_steps(text, values=values)] == [1, 1]
