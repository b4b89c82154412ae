"""
The task: the prompt, where the questions come from, and the rule-based rewards that score
the replies. grpo.py knows the task only through this file; to train on your own, change it.

  make_prompt        the chat messages for one question: a system prompt that asks for tags,
                     and a worked example as an earlier turn
  load_dataset_rows  rows {question, prompt, answer, values}: GSM8K from the Hub or JSON lines, or a
                     built-in task, which needs no download: `arithmetic` (a + b) or
                     `arithmetic3` (a + b - c, two steps, for process supervision)
  rows_for_step      the questions of one training step

The rewards are rules a program checks, as DeepSeek-R1's were (DeepSeekMath's RL scored with a
learned reward model). Each is a function `(completions, answers) -> list[float]`, one per reply:

  format_reward   does the reply follow <reasoning>...</reasoning><answer>...</answer>?
  answer_reward   is the final answer numerically equal to the gold one?

grpo.py sums them with weights from its config and logs each one on its own.
Nothing here raises on odd text: a completion that cannot be read scores 0.

For process supervision (DeepSeekMath, section 4.1.3), a reward for each step of the reasoning:

  reasoning_steps  each line of <reasoning> that states an equation, where it lies, and whether
                   its arithmetic holds (exact fractions, a small parser: never eval)
  step_reward      the steps as one reward per reply: 0.2 for each distinct equation that holds,
                   at most 1.0 (weighted by --step-weight, 0 by default)
  credited_steps   the steps process supervision credits: distinct, computing, not cut off,
                   and arriving at a value of the row's worked solution (its "values")
  step_token_ends  where each credited step ends in the reply's tokens, for per-token advantages
  step_statistics  steps per reply, how many hold, how many repeat an earlier one (logged)
"""

import bisect
import json
import random
import re
from fractions import Fraction
from pathlib import Path

from machinery.flags import ConfigError

# The four tags the system prompt asks for, named once.
REASONING_START, REASONING_END = "<reasoning>", "</reasoning>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"
TAGS = (REASONING_START, REASONING_END, ANSWER_START, ANSWER_END)

SYSTEM_PROMPT = (
    "Solve the math problem. First think step by step, then give only the final number. "
    "Reply in exactly this format:\n"
    f"{REASONING_START}\n...\n{REASONING_END}\n{ANSWER_START}\n...\n{ANSWER_END}"
)


# One worked example, as an earlier user and assistant turn: a small model copies a format it
# has seen in use far more often than one it is only told about (README: Results). On the
# offline SmolLM2-135M copy it wrote the strict format in 19 of 64 replies with this example,
# 1-4 of 64 with a word problem in its place, 0 of 64 without one (sums up to 49 + 49, T = 1).
EXAMPLE_TURN = [
    {"role": "user", "content": "What is 14 + 7?"},
    {
        "role": "assistant",
        "content": f"{REASONING_START}\n14 + 7 = 21\n{REASONING_END}\n"
        f"{ANSWER_START}\n21\n{ANSWER_END}",
    },
]


# The worked example of the built-in task of three terms (`arithmetic3`): one equation per step,
# each a step that process supervision can check (reasoning_steps).
EXAMPLE_TURN_STEPS = [
    {"role": "user", "content": "What is 14 + 7 - 5?"},
    {
        "role": "assistant",
        "content": f"{REASONING_START}\n14 + 7 = 21\n21 - 5 = 16\n"
        f"{REASONING_END}\n{ANSWER_START}\n16\n{ANSWER_END}",
    },
]


def make_prompt(
    question: str, example_turn: bool = True, example: list[dict] = EXAMPLE_TURN
) -> list[dict]:
    """Chat messages for one question, after the worked example unless `example_turn` is off;
    the tokenizer's chat template turns them into text."""
    example = example if example_turn else []
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        *example,
        {"role": "user", "content": question},
    ]


# Partial format credit for each tag that appears exactly once (4 tags -> at most 0.5),
# so a model that never writes the full structure still gets a signal towards it.
TAG_CREDIT = 0.125

# A number as a reader reads it: "1,000" (commas only in groups of three), "-3" and "−3"
# (Unicode minus), "18.00", ".5", "1.5e3", "3/4". A dash after a word or a number is not a
# sign: "pages 5-10" ends in 10, not -10. Group 1 is the sign, 2 the value, 3 a denominator.
NUMBER = re.compile(
    r"(?:(?<![\w).,])([-\u2212]))?(?<![\d.,])"
    r"(\d(?:[\d,]*\d)?(?:\.\d+)?(?:[eE][-+\u2212]?\d+)?|\.\d+)"
    r"(?:/(\d+(?:\.\d+)?))?"
)
THOUSANDS = re.compile(r"\d{1,3}(,\d{3})*")
# The characters a number is written with, and the longest number worth reading.
NUMBER_CHARS, MAX_NUMBER_LENGTH = re.compile(r"[\d,.eE+\-\u2212/]*"), 100


def parse_number(text: str) -> float | None:
    """The last number in `text` as a float ("$1,000.00" -> 1000.0, "3/4" -> 0.75), or None if
    there is none or it cannot be read ("1,0000": 10000, or 1 and 0000?; "1/0").

    The last number ends at the last digit, so only the characters just before it are read:
    the time is linear in the text, whatever the text (a regex scan of all of it is not)."""
    end = 1 + max(text.rfind(digit) for digit in "0123456789")
    if end == 0:
        return None
    run = len(NUMBER_CHARS.match(text[end - 1 :: -1]).group())  # number characters before `end`
    last = None
    for last in NUMBER.finditer(text, end - min(run, MAX_NUMBER_LENGTH), end):
        pass
    if last is None or last.end() != end:
        return None
    sign, value, denominator = last.groups()
    whole = re.split("[.eE]", value)[0]
    if "," in whole and not THOUSANDS.fullmatch(whole):
        return None
    number = float(value.replace(",", "").replace("\u2212", "-"))
    if denominator is not None:
        if float(denominator) == 0:
            return None
        number /= float(denominator)
    return -number if sign else number


def extract_answer(completion: str) -> str:
    """The text of the last <answer> block (between the last </answer> and the <answer> before
    it); without one, the whole completion.

    The fallback lets a model that has not learned the tags yet still earn the answer reward
    when the last number it writes is right (its missing tags cost it the format reward).
    """
    end = completion.rfind(ANSWER_END)
    start = completion.rfind(ANSWER_START, 0, max(end, 0))
    return completion[start + len(ANSWER_START) : end] if end >= 0 and start >= 0 else completion


def extract_gold_answer(answer: str) -> str:
    """GSM8K's gold answer is the text after the last '####'; other sources give it bare."""
    return answer.split("####")[-1].strip().replace(",", "")


# GSM8K's worked solutions note each calculation: "48/2 = <<48/2=24>>24 clips".
CALCULATION = re.compile(r"<<[^<>=]*=([^<>=]*)>>")


def solution_values(answer: str) -> list[str] | None:
    """The values a worked solution reaches, for process supervision's steps: GSM8K's noted
    calculations, then its final answer; None where no calculation is noted (a bare answer): then
    every step that holds counts."""
    notes = CALCULATION.findall(answer)
    return [*notes, extract_gold_answer(answer)] if notes else None


def is_strict_format(completion: str) -> bool:
    """<reasoning>...</reasoning> then <answer>...</answer>: each tag exactly once, in this
    order, and nothing but white space outside them."""
    if any(completion.count(tag) != 1 for tag in TAGS):
        return False
    starts = [completion.find(tag) for tag in TAGS]
    ends = [start + len(tag) for start, tag in zip(starts, TAGS)]
    outside = completion[: starts[0]] + completion[ends[1] : starts[2]] + completion[ends[3] :]
    return starts == sorted(starts) and not outside.strip()


def format_reward(completions: list[str], answers: list[str] | None = None) -> list[float]:
    """1.0 for <reasoning>...</reasoning> then <answer>...</answer> and nothing else,
    else TAG_CREDIT for each of the four tags that appears exactly once."""
    rewards = []
    for completion in completions:
        if not isinstance(completion, str):
            rewards.append(0.0)
        elif is_strict_format(completion):
            rewards.append(1.0)
        else:
            rewards.append(TAG_CREDIT * sum(completion.count(tag) == 1 for tag in TAGS))
    return rewards


def answer_reward(completions: list[str], answers: list[str]) -> list[float]:
    """1.0 when the completion's answer equals the gold answer as a number, else 0.0."""
    rewards = []
    for completion, gold in zip(completions, answers, strict=True):
        if not isinstance(completion, str):
            rewards.append(0.0)
            continue
        predicted, expected = parse_number(extract_answer(completion)), parse_number(str(gold))
        rewards.append(float(predicted is not None and predicted == expected))
    return rewards


# ---- The steps of the reasoning (DeepSeekMath's process supervision, section 4.1.3) ------------
# A step is a line of the <reasoning> block that states an equation of plain arithmetic: numbers,
# + - × * / ÷ and parentheses on each side of "=", as in "14 + 7 = 21" or "3 × (4 + 2) = 18". Its
# reward says whether the sides are equal, exactly (fractions, never floats). It is read by a small
# parser, never `eval`: no powers (2^99999 would stall it), numbers of at most MAX_NUMBER_LENGTH
# characters, lines of at most MAX_STEP_LENGTH, parentheses at most MAX_DEPTH deep, and the first
# MAX_STEPS lines with "=" of a reply (more than 512 tokens hold): bounded work per reply.
MAX_STEP_LENGTH, MAX_DEPTH, MAX_STEPS = 200, 20, 256
STEP_CREDIT = 0.2  # step_reward: for each distinct equation that holds
EQUATION_CHARS = re.compile(r"[\d \t.,+\-*/×÷()=\u2212$]+")
ARITHMETIC_TOKEN = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|[-+*/×÷()]")


def reasoning_steps(completion: str) -> list[tuple[int, int, float]]:
    """(start, end, reward) for each step of the completion's <reasoning> block, in order:
    `completion[start:end]` is the step's line, `reward` 1.0 if its equation holds, else 0.0.
    No <reasoning> tag: no steps. An unclosed block runs to the end of the text. Only lines with
    "=" are looked at (found by str.find, so the time is linear), the first MAX_STEPS of them."""
    if not isinstance(completion, str):
        return []
    before, tag, rest = completion.partition(REASONING_START)
    block = rest.partition(REASONING_END)[0] + "\n"  # the last line ends where the block does
    offset, steps, position = len(before) + len(tag), [], 0
    for _ in range(MAX_STEPS):  # (no tag: no text after one, so no "=")
        equal = block.find("=", position)
        if equal < 0:
            break
        start, end = block.rfind("\n", 0, equal) + 1, block.find("\n", equal)
        holds = equation_holds(block[start:end]) if end - start <= MAX_STEP_LENGTH else None
        if holds is not None:
            steps.append((offset + start, offset + end, float(holds)))
        position = end + 1
    return steps


OPERATION = re.compile(r"[\d)]\s*[-+*/×÷\u2212]\s*[\d(.]")  # an operator between two operands


def credited_steps(
    completion: str, truncated: bool = False, values: list[str] | None = None
) -> list[tuple[int, int, float]]:
    """The steps that process supervision credits, as reasoning_steps gives them: each distinct
    line once (a repeat proves nothing new), only lines that compute something ("14 + 7 = 21",
    not "1 = 1"), and not the last line of a truncated reply if the cut fell in it. With `values`
    (a row's: those its worked solution reaches), a step that holds earns 1 only if it arrives at
    one of them: "6 - 6 = 0" holds, but for 11 + 9 - 6 it computes nothing the answer needs, and
    a policy paid for any true line learns to write such lines instead of the answer."""
    seen, steps = set(), []
    reached = None if values is None else {solution_value(v) for v in values}
    for start, end, reward in reasoning_steps(completion):
        line = completion[start:end].strip()
        cut = truncated and end >= len(completion)  # no newline after it: the cut fell in it
        if reward and reached is not None and step_result(line) not in reached:
            reward = 0.0
        if line not in seen and OPERATION.search(line) and not cut:
            steps.append((start, end, reward))
        seen.add(line)
    return steps


def solution_value(value) -> Fraction | None:
    """A value of a worked solution as an exact fraction ("72", "1,000", ".05", "-3"), or None."""
    try:
        return Fraction(str(value).replace(",", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


def step_token_ends(
    tokenizer, ids: list[int], text: str, truncated: bool = False, values: list[str] | None = None
) -> list[tuple[int, float]]:
    """(token index, reward) of each credited step of `text` = tokenizer.decode(ids): the first
    token whose prefix decodes to the whole line, its last character whole (a character of several
    bytes over two tokens decodes to U+FFFD until its last byte). A bisection: log |ids| decodes."""

    def decoded(k):  # the length of the text of the first k + 1 tokens, whole characters only
        return len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True).rstrip("\ufffd"))

    return [
        (bisect.bisect_left(range(len(ids)), end, key=decoded), reward)
        for _, end, reward in credited_steps(text, truncated, values)
    ]


def step_statistics(completions: list[str]) -> dict[str, float]:
    """Over a batch of replies: steps per reply, the fraction of steps that hold, and the fraction
    that repeat an earlier step of their reply (a sign of farming the steps' reward)."""
    steps = [
        [(text[start:end].strip(), reward) for start, end, reward in reasoning_steps(text)]
        for text in completions
    ]
    count = sum(map(len, steps))
    return {
        "steps/per_reply": count / max(len(steps), 1),
        "steps/hold_frac": sum(reward for s in steps for _, reward in s) / max(count, 1),
        "steps/repeated_frac": (count - sum(len(set(s)) for s in steps)) / max(count, 1),
    }


def equation_holds(line: str) -> bool | None:
    """Whether every equation in `line` holds (all sides of each equal); None if it states none
    that can be read (a side that is no arithmetic, a division by zero, a number too long)."""
    verdicts = []
    for run in EQUATION_CHARS.findall(line):
        sides = equation_sides(run)
        if len(sides) < 2 or not all(sides):
            continue
        values = [evaluate_arithmetic(side) for side in sides]
        if any(value is None for value in values):
            return None
        verdicts.append(all(value == values[0] for value in values))
    return all(verdicts) if verdicts else None


def equation_sides(run: str) -> list[str]:
    """The sides of a run of equation characters: " $3 + 4 = 7." -> ["3 + 4", "7"]."""
    return [side.strip(" \t.,$") for side in run.replace("$", "").split("=")]


def step_result(line: str) -> Fraction | None:
    """What a step arrives at: the last side of its last equation ("20 - 6 = 14" -> 14)."""
    equations = [
        s for s in map(equation_sides, EQUATION_CHARS.findall(line)) if len(s) > 1 and all(s)
    ]
    return evaluate_arithmetic(equations[-1][-1]) if equations else None


def evaluate_arithmetic(text: str) -> Fraction | None:
    """The exact value of + - × / and parentheses over decimal numbers, or None if `text` is not
    that (or divides by zero, or nests deeper than MAX_DEPTH, or has a number too long)."""
    text = text.replace("\u2212", "-").replace(" ", "").replace("\t", "")
    tokens = ARITHMETIC_TOKEN.findall(text)
    if "".join(tokens) != text or any(len(t) > MAX_NUMBER_LENGTH for t in tokens):
        return None
    position = 0

    def peek():
        return tokens[position] if position < len(tokens) else None

    def take():
        nonlocal position
        position += 1
        return tokens[position - 1]

    def expression(depth):  # term (("+" | "-") term)*
        value = term(depth)
        while value is not None and peek() in ("+", "-"):
            sign, right = take(), term(depth)
            value = None if right is None else value + right if sign == "+" else value - right
        return value

    def term(depth):  # factor (("*" | "×" | "/" | "÷") factor)*
        value = factor(depth)
        while value is not None and peek() in ("*", "×", "/", "÷"):
            operator, right = take(), factor(depth)
            if right is None or (operator in "/÷" and right == 0):
                return None
            value = value * right if operator in "*×" else value / right
        return value

    def factor(depth):  # ("-" | "+") factor | number | "(" expression ")"
        token = peek()
        if token is None or depth > MAX_DEPTH:
            return None
        take()
        if token in ("-", "+"):
            value = factor(depth + 1)
            return None if value is None else -value if token == "-" else value
        if token == "(":
            value = expression(depth + 1)
            return value if value is not None and peek() == ")" and take() else None
        return Fraction(token.replace(",", "")) if token[0].isdigit() else None

    value = expression(0)
    return value if position == len(tokens) else None


def step_reward(completions: list[str], answers: list[str] | None = None) -> list[float]:
    """The steps as one reward per reply (the seeds' scalar form: "each correct step adds 0.2"),
    bounded against farming (Gao et al., arXiv 2410.15115): STEP_CREDIT for each distinct
    equation that holds, at most 1.0; a repeated one earns nothing more."""
    rewards = []
    for completion in completions:
        lines = {
            completion[start:end].strip()
            for start, end, reward in reasoning_steps(completion)
            if reward == 1.0
        }
        rewards.append(min(1.0, STEP_CREDIT * len(lines)))
    return rewards


# name -> reward function; grpo.py weighs each by its `<name>_weight` config field.
REWARD_FUNCTIONS = {"format": format_reward, "answer": answer_reward, "step": step_reward}


# ---- The questions ----------------------------------------------------------------------------

# The built-in tasks, which need no download, and their number of terms.
BUILT_IN_TASKS = {"arithmetic": 2, "arithmetic3": 3}


def load_dataset_rows(
    source: str,
    split: str,
    dataset_config: str = "main",
    arithmetic_max: int = 49,
    seed: int = 0,
    example_turn: bool = True,
    size: int | None = None,
) -> list[dict]:
    """Rows {question, prompt, answer, values} of a built-in task (BUILT_IN_TASKS), a JSON-lines
    file, a folder of them, or a Hub dataset; GSM8K's keys: "question" and "answer" (after '####').
    "values": those a worked solution reaches (a row's own, or solution_values). The first `size`
    of them (all, if fewer: said)."""
    if source in BUILT_IN_TASKS:
        raw = arithmetic_problems(
            arithmetic_max, seed, held_out=split != "train", terms=BUILT_IN_TASKS[source]
        )
    else:
        raw = load_question_answer_rows(source, split, dataset_config)
    example = EXAMPLE_TURN_STEPS if BUILT_IN_TASKS.get(source) == 3 else EXAMPLE_TURN
    rows = [
        {
            "question": r["question"],
            "prompt": make_prompt(r["question"], example_turn, example),
            "answer": extract_gold_answer(r["answer"]),
            "values": r.get("values") or solution_values(r["answer"]),
        }
        for r in raw
    ]
    check_answers(rows, f"--dataset {source!r} ({split})")
    if size is not None and len(rows) < size:
        print(f"note: {size} {split} rows asked for (--eval-size), {len(rows)} there: all are used")
    return rows[:size]


def check_answers(rows: list[dict], name: str) -> None:
    """Every gold answer should be a number: no reply can earn the answer reward of one that is
    not. Such rows are kept (the format reward still teaches) and counted; none readable:
    refused."""
    unreadable = [i for i, row in enumerate(rows) if parse_number(row["answer"]) is None]
    if not unreadable:
        return
    first = f"row {unreadable[0] + 1}: {rows[unreadable[0]]['answer']!r}"
    if len(unreadable) == len(rows):
        raise ConfigError(
            f"{name}: no answer is a number ({first}); the answer reward compares the reply's "
            "final number with it. Give each row a numeric 'answer'."
        )
    print(
        f"note: {name}: {len(unreadable)} of {len(rows)} answers are no number ({first}); no reply "
        "can earn their answer reward. They are kept; fix or drop them for a cleaner signal."
    )


def rows_for_step(rows: list[dict], step: int, prompts_per_step: int, seed: int) -> list[dict]:
    """The P rows of a step: epoch after epoch of a seeded shuffle (a resumed run: same order)."""
    picked = []
    for k in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, i = divmod(k, len(rows))
        order = list(range(len(rows)))
        random.Random(seed + epoch).shuffle(order)
        picked.append(rows[order[i]])
    return picked


def arithmetic_problems(
    largest: int, seed: int, held_out: bool = False, terms: int = 2
) -> list[dict]:
    """Every "What is a + b?" with a and b from 0 to `largest`, in a seeded order; the pairs
    with (a + 2b) % 5 == 0 (a fifth of them) are held out: evaluated, never trained on.
    terms=3: every "What is a + b - c?" with c at most a + b (two steps: a sum, a difference);
    held out where (a + 2b + 3c) % 5 == 0."""
    numbers = range(largest + 1)
    if terms == 2:
        pairs = [(a, b) for a in numbers for b in numbers if ((a + 2 * b) % 5 == 0) == held_out]
        random.Random(seed).shuffle(pairs)
        return [
            {"question": f"What is {a} + {b}?", "answer": str(a + b), "values": [str(a + b)]}
            for a, b in pairs
        ]
    triples = [
        (a, b, c)
        for a in numbers
        for b in numbers
        for c in numbers
        if c <= a + b and ((a + 2 * b + 3 * c) % 5 == 0) == held_out
    ]
    random.Random(seed).shuffle(triples)
    return [
        {
            "question": f"What is {a} + {b} - {c}?",
            "answer": str(a + b - c),
            "values": [str(v) for v in (a + b, a - c, b - c, a + b - c)],  # either order's steps
        }
        for a, b, c in triples
    ]


def load_question_answer_rows(source: str, split: str, dataset_config: str = "main"):
    """Rows with "question" and "answer" from a JSON-lines file, a folder of train.jsonl and
    test.jsonl, or a Hub dataset (GSM8K: openai/gsm8k, configuration "main")."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetsError

    path = Path(source).expanduser()
    if path.is_file() and split == "test":
        print(f"note: --dataset {source!r} is one file: evaluation uses questions it trains on.")
    if path.is_dir():
        path = path / f"{split}.jsonl"
        if not path.exists():
            raise ConfigError(
                f"--dataset folder {source!r} has no {split}.jsonl; it needs "
                "train.jsonl and test.jsonl."
            )
    if path.is_file():
        return read_question_answer_lines(path)
    try:
        raw = load_dataset(source, dataset_config, split=split)
    except (OSError, ValueError, DatasetsError) as error:
        raise ConfigError(
            f"--dataset {source!r} cannot be loaded ({error}). Check the id, "
            "--dataset-config and the network; without the Hub: --dataset "
            "arithmetic or a local JSON-lines file."
        ) from None
    missing = {"question", "answer"} - set(raw.column_names)
    if missing:
        raise ConfigError(
            f"--dataset {source!r} lacks the key(s) {sorted(missing)}; each row "
            "needs 'question' and 'answer'."
        )
    return raw


def read_question_answer_lines(path: Path) -> list[dict]:
    """The rows of a JSON-lines file, each with "question" and "answer"; a bad line is named by
    its number (from 1, as an editor shows it)."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"--dataset file {str(path)!r}, line {number}, is not JSON "
                f"({error}); write one JSON object per line, with 'question' "
                "and 'answer'."
            ) from None
        missing = {"question", "answer"} - set(row if isinstance(row, dict) else ())
        if missing:
            raise ConfigError(
                f"--dataset file {str(path)!r}, line {number}, lacks the key(s) "
                f"{sorted(missing)}; each row needs 'question' and 'answer'."
            )
        rows.append(row)
    if not rows:
        raise ConfigError(
            f"--dataset file {str(path)!r} is empty; it needs rows with 'question' and 'answer'."
        )
    return rows
