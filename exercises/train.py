"""
Train with your functions: grpo.py's loop, with yours in place of grpo.py's own.

  python exercises/train.py --model SMOLLM2_FOLDER --dataset arithmetic --prompts-per-step 3 \\
    --max-completion-length 64 --learning-rate 5e-6 --max-steps 80 --save-every 0 --kl-estimator k3

Every flag but the two below is grpo.py's (python grpo.py --help). The run writes what grpo.py's
writes, curves.png included, to --output-dir.
  --file PATH      your functions (default: exercises/mine.py); all of them must be written
  --mistake NAME   instead: grpo.py's functions with one mistake of exercises/mistakes.py in place
"""

import argparse
import ast
import inspect
import sys
import textwrap
from pathlib import Path

from check import (  # (check.py puts grpo.py on the path)
    EXERCISES,
    MINE,
    learner_functions,
    with_mistake,
)
from mistakes import MISTAKES

import grpo  # noqa: E402


def is_stub(function) -> bool:
    """Whether the function still only raises NotImplementedError (after its docstring)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0].body
    body = body[1:] if body and isinstance(body[0], ast.Expr) else body
    return len(body) == 1 and isinstance(body[0], ast.Raise)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--file", type=Path, default=MINE)
    parser.add_argument("--mistake", choices=[m.name for m in MISTAKES])
    args, grpo_flags = parser.parse_known_args(argv)
    if {"-h", "--help"} & set(grpo_flags):
        print(__doc__)
    if args.mistake:
        mistake = next(m for m in MISTAKES if m.name == args.mistake)
        functions, source = with_mistake(mistake), f"mistake {mistake.name}: {mistake.what}"
    else:
        if not args.file.exists():
            parser.error(
                f"{args.file} does not exist: python exercises/check.py makes it (your copy of "
                "the stubs), or pass your file with --file"
            )
        functions, source = learner_functions(args.file, list(EXERCISES)), str(args.file)
        stubs = [name for name, function in functions.items() if is_stub(function)]
        if stubs:
            parser.exit(
                2,
                f"exercises/train.py: error: {args.file}: {', '.join(stubs)} not "
                f"written yet. Write each and check it: python exercises/check.py "
                f"{stubs[0]}\n",
            )
    print(f"grpo.py with {', '.join(functions)} from {source}")
    saved = {name: getattr(grpo, name) for name in functions}
    try:
        for name, function in functions.items():
            setattr(grpo, name, function)  # grpo.py's loop looks each up by its name at each call
        grpo.main(grpo_flags)
    finally:
        for name, function in saved.items():
            setattr(grpo, name, function)


if __name__ == "__main__":
    main(sys.argv[1:])
