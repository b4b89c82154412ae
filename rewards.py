"""
Rule-based rewards for GRPO on math word problems (GSM8K).

DeepSeekMath trains on rewards a program can check, with no learned reward model. Each reward
here is a function `(completions, answers) -> list[float]`, one float per completion:

  format_reward   does the reply follow <reasoning>...</reasoning><answer>...</answer>?
  answer_reward   is the final answer numerically equal to the gold one?

grpo.py sums them with weights from its config and logs each one on its own.
Nothing here raises on odd text: a completion that cannot be read scores 0.
"""

import re

# The four tags the system prompt asks for, named once.
REASONING_START, REASONING_END = "<reasoning>", "</reasoning>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"
TAGS = (REASONING_START, REASONING_END, ANSWER_START, ANSWER_END)

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
