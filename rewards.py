"""
The task: the prompt, where the questions come from, and the rule-based rewards that score
the replies. grpo.py knows the task only through this file; to train on your own, change it.

  make_prompt        the chat messages for one question: a system prompt that asks for tags
  load_dataset_rows  rows {question, prompt, answer}: GSM8K from the Hub or JSON lines, or the
                     built-in `arithmetic` task, which needs no download

DeepSeekMath trains on rewards a program can check, with no learned reward model. Each reward
here is a function `(completions, answers) -> list[float]`, one float per completion:

  format_reward   does the reply follow <reasoning>...</reasoning><answer>...</answer>?
  answer_reward   is the final answer numerically equal to the gold one?

grpo.py sums them with weights from its config and logs each one on its own.
Nothing here raises on odd text: a completion that cannot be read scores 0.
"""

import random
import re
from pathlib import Path

# The four tags the system prompt asks for, named once.
REASONING_START, REASONING_END = "<reasoning>", "</reasoning>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"
TAGS = (REASONING_START, REASONING_END, ANSWER_START, ANSWER_END)

SYSTEM_PROMPT = (
    "Solve the math problem. First think step by step, then give only the final number. "
    "Reply in exactly this format:\n"
    f"{REASONING_START}\n...\n{REASONING_END}\n{ANSWER_START}\n...\n{ANSWER_END}"
)


def make_prompt(question: str) -> list[dict]:
    """Chat messages for one question; the tokenizer's chat template turns them into text."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


# Partial format credit for each tag that appears exactly once (4 tags -> at most 0.5),
# so a model that never writes the full structure still gets a signal towards it.
TAG_CREDIT = 0.125

STRICT_FORMAT = re.compile(
    rf"^\s*{REASONING_START}.*?{REASONING_END}\s*{ANSWER_START}.*?{ANSWER_END}\s*$", re.DOTALL
)
ANSWER_BLOCK = re.compile(rf"{ANSWER_START}(.*?){ANSWER_END}", re.DOTALL)
# "1,000", "-3", "18.00", ".5": thousands separators only in groups of three.
NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


def parse_number(text: str) -> float | None:
    """The last number in `text` as a float ("$1,000.00" -> 1000.0), or None if there is none."""
    numbers = NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def extract_answer(completion: str) -> str:
    """The text of the last <answer> block; without one, the whole completion.

    The fallback lets a model that has not learned the tags yet still earn the answer reward
    when the last number it writes is right (its missing tags cost it the format reward).
    """
    blocks = ANSWER_BLOCK.findall(completion)
    return blocks[-1] if blocks else completion


def extract_gold_answer(answer: str) -> str:
    """GSM8K's gold answer is the text after the last '####'; other sources give it bare."""
    return answer.split("####")[-1].strip().replace(",", "")


def format_reward(completions: list[str], answers: list[str] | None = None) -> list[float]:
    """1.0 for <reasoning>...</reasoning> then <answer>...</answer> and nothing else,
    else TAG_CREDIT for each of the four tags that appears exactly once."""
    rewards = []
    for completion in completions:
        if not isinstance(completion, str):
            rewards.append(0.0)
        elif STRICT_FORMAT.match(completion):
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


# name -> reward function; grpo.py weighs each by its `<name>_weight` config field.
REWARD_FUNCTIONS = {"format": format_reward, "answer": answer_reward}


# ---- The questions ----------------------------------------------------------------------------

class ConfigError(ValueError):
    """Bad input (a flag, a file, a model), found before any long work starts."""


def load_dataset_rows(source: str, split: str, dataset_config: str = "main",
                      arithmetic_digits: int = 1, seed: int = 0) -> list[dict]:
    """Rows {question, prompt, answer} of `arithmetic`, a JSON-lines file, a folder of them, or
    a Hub dataset; GSM8K's keys: "question" and "answer" (the final answer after '####')."""
    if source == "arithmetic":
        raw = arithmetic_problems(10_000 if split == "train" else 1_000, arithmetic_digits, seed,
                                  held_out=split != "train")
    else:
        raw = load_question_answer_rows(source, split, dataset_config)
    return [{"question": r["question"], "prompt": make_prompt(r["question"]),
             "answer": extract_gold_answer(r["answer"])} for r in raw]


def arithmetic_problems(n: int, digits: int, seed: int, held_out: bool = False) -> list[dict]:
    """`n` problems "What is a + b?"; pairs with (a + 2b) % 5 == 0 are the held-out ones."""
    rng, problems = random.Random(seed), []
    while len(problems) < n:
        a, b = rng.randint(0, 10**digits - 1), rng.randint(0, 10**digits - 1)
        if ((a + 2 * b) % 5 == 0) == held_out:
            problems.append({"question": f"What is {a} + {b}?", "answer": str(a + b)})
    return problems


def load_question_answer_rows(source: str, split: str, dataset_config: str = "main"):
    """Rows with "question" and "answer" from a JSON-lines file, a folder of train.jsonl and
    test.jsonl, or a Hub dataset (GSM8K: openai/gsm8k, configuration "main")."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetsError

    path = Path(source).expanduser()
    if path.is_dir():
        path = path / f"{split}.jsonl"
        if not path.exists():
            raise ConfigError(f"--dataset folder {source!r} has no {split}.jsonl; it needs "
                              "train.jsonl and test.jsonl.")
    local = path.is_file()
    if local and path.stat().st_size == 0:
        raise ConfigError(f"--dataset file {str(path)!r} is empty; it needs rows with "
                          "'question' and 'answer'.")
    try:
        raw = (load_dataset("json", data_files=str(path), split="train") if local
               else load_dataset(source, dataset_config, split=split))
    except (OSError, ValueError, DatasetsError) as error:
        if local:  # datasets keeps the parse error itself in __cause__
            raise ConfigError(f"--dataset file {str(path)!r} is not JSON lines ("
                              f"{error.__cause__ or error}); write one JSON object per line, "
                              "with 'question' and 'answer'.") from None
        raise ConfigError(f"--dataset {source!r} cannot be loaded ({error}). Check the id, "
                          "--dataset-config and the network, or pass a local file.") from None
    missing = {"question", "answer"} - set(raw.column_names)
    if missing:
        raise ConfigError(f"--dataset {source!r} lacks the key(s) {sorted(missing)}; each row "
                          "needs 'question' and 'answer'.")
    return raw
