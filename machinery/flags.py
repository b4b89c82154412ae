"""Every field of a config dataclass as a command-line flag, its comment as its --help."""

import argparse
import ast
import inspect
import io
import sys
import textwrap
import tokenize
from dataclasses import fields


class ConfigError(ValueError):
    """Bad input (a flag, a file, a model), found before any long work starts."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def flag(name: str) -> str:
    """The flag of a config field: `learning_rate` -> `--learning-rate`."""
    return "--" + name.replace("_", "-")


LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "cispo")
KL_ESTIMATORS = ("k1", "k2", "k3", "k3_ratio")
CHOICES = {
    "loss_type": (*LOSS_TYPES, "bnpo"),  # bnpo: dapo's former name
    "kl_estimator": (*KL_ESTIMATORS, "k1_to_go", "k1_is"),
    "importance_sampling_level": ("token", "sequence"),
    "advantage": ("grpo", "grpo_batch_std", "online_rft"),
    "supervision": ("outcome", "process"),
    "step_credit": ("min", "sum"),
    "precision": ("auto", "fp32", "bf16"),
    "device": ("auto", "cuda", "mps", "cpu"),
}
EXAMPLE = "python grpo.py --model ./chat-model --dataset arithmetic --max-steps 80"


def field_comments(config_class) -> dict[str, str]:
    """{field: the comment that ends its line} in the dataclass's source, read by Python's own
    parser and tokenizer."""
    source = textwrap.dedent(inspect.getsource(config_class))
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    body = ast.parse(source).body[0].body
    return {
        node.target.id: comments.get(node.end_lineno, "")
        for node in body
        if isinstance(node, ast.AnnAssign)
    }


def flag_parser(config_class, prog: str = "grpo.py") -> argparse.ArgumentParser:
    """Every field as a flag; one not typed stays out of the namespace (no default)."""
    helps = field_comments(config_class)
    parser = argparse.ArgumentParser(
        prog,
        description=f"GRPO in one file. Example, nothing from the Hub: {EXAMPLE}",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
        formatter_class=lambda prog: argparse.HelpFormatter(prog, width=100),  # long defaults whole
    )
    for f in fields(config_class):
        if "bool" in str(f.type):
            kind = dict(action=argparse.BooleanOptionalAction)
        else:
            kind = dict(type=type(f.default), choices=CHOICES.get(f.name))
        shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
        shown = "unset" if f.default is None else shown
        text = helps[f.name].replace("%", "%%")  # argparse formats % in help
        parser.add_argument(flag(f.name), help=f"{text} (default: {shown})", **kind)
    return parser


def is_negative_number(text: str) -> bool:
    try:
        return text.startswith("-") and float(text) < 0
    except ValueError:
        return False


def typed_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """{field: value} of the flags typed, and only those. argparse (before Python 3.13) reads
    "-1e-6" as a flag, so a negative number is joined to its flag: "--beta=-1e-6"."""
    joined = []
    for token in sys.argv[1:] if argv is None else argv:
        if (
            is_negative_number(token)
            and joined
            and joined[-1].startswith("--")
            and "=" not in joined[-1]
        ):
            joined[-1] += f"={token}"
        else:
            joined.append(token)
    return vars(parser.parse_args(joined))
