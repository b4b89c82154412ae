"""
The project's shape: grpo.py is read, machinery/ is looked up and imports one way, in layers, and
rewards.py is the task only. Each limit here is the design's (README: A map of the code).
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MACHINERY = ROOT / "machinery"


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module)
    return found


def layers() -> list[str]:
    """The modules in the order machinery/__init__.py lists them: each may import those above it."""
    docstring = ast.get_docstring(ast.parse((MACHINERY / "__init__.py").read_text()))
    return re.findall(r"^  (\w+) ", docstring, re.M)


def test_every_machinery_module_is_listed_once_in_its_layer():
    on_disk = sorted(p.stem for p in MACHINERY.glob("*.py") if p.stem != "__init__")
    assert sorted(layers()) == on_disk and len(set(layers())) == len(on_disk)


def test_machinery_imports_one_way_in_layers():
    """Never grpo.py or rewards.py (what it needs from them, it is handed), and inside the package
    only the modules above (a circle could not be laid in layers)."""
    order = layers()
    for i, name in enumerate(order):
        imports = imported_modules(MACHINERY / f"{name}.py")
        assert not imports & {"grpo", "rewards"}, (
            f"machinery/{name}.py imports grpo.py or rewards.py"
        )
        inside = {m.removeprefix("machinery.") for m in imports if m.startswith("machinery.")}
        below = inside - set(order[:i])
        assert not below, f"machinery/{name}.py imports {sorted(below)}, which are not above it"


def test_the_line_limits_hold():
    """grpo.py read in one sitting: at most 650 lines as ruff formats it (CI checks the format);
    each machinery module at most 300."""
    assert len((ROOT / "grpo.py").read_text().splitlines()) <= 650
    for path in MACHINERY.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 300, path.name


def test_rewards_py_is_the_task_only():
    """No network, no Hub, no warning filters, no loading of models or tokenizers: the prompt, the
    data, the rewards and the steps. Its one import of the package is the error for bad data."""
    imports = imported_modules(ROOT / "rewards.py")
    allowed = {"bisect", "json", "random", "re", "fractions", "pathlib", "datasets"}
    allowed |= {"datasets.exceptions", "machinery.flags"}
    assert imports <= allowed, sorted(imports - allowed)
    source = (ROOT / "rewards.py").read_text()
    for word in ("socket", "huggingface_hub", "warnings", "from_pretrained", "AutoTokenizer"):
        assert word not in source, word
