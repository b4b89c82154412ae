"""
The notebook runs top to bottom on the tiny model, and its saved outputs show nothing of this machine.
"""

import json
import os
import re

# Before huggingface_hub reads it (at import): the tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from tests.conftest import HERE, write_jsonl  # noqa: E402

# The notebook runs top to bottom (on the tiny model, with tiny sizes)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tiny_model_dir, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"question": f"What is {a} + {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"}
        for a in range(6)
    ]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "test.jsonl", rows)
    for name, value in (
        ("MODEL", str(tiny_model_dir)),
        ("DATA", str(data)),
        ("TINY", "1"),
        ("OUTPUT", str(tmp_path / "notebook-run")),
    ):
        monkeypatch.setenv(f"GRPO_NOTEBOOK_{name}", value)  # the kernel inherits this environment
    notebook = nbformat.read(HERE / "notebook.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    assert (tmp_path / "notebook-run" / "metrics.jsonl").exists()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert (
        sum("image/png" in o.get("data", {}) for o in outputs) >= 4
    )  # mask, surrogate, KL, curves
    assert not [
        o["text"] for o in outputs if "deprecated" in o.get("text", "")
    ]  # no notice of a renamed API
    assert not [
        o["text"] for o in outputs if "Warning" in o.get("text", "")
    ]  # nor any other warning


def test_the_saved_notebook_shows_no_path_of_its_machine_and_no_warning():
    """Its outputs are read by everyone: no folder of the machine that ran it (a library's warning names its
    site-packages), no warning, and no diagnostic on a healthy run (the note on the loss is markdown)."""
    import nbformat

    notebook = nbformat.read(HERE / "notebook.ipynb", as_version=4)
    texts = [
        o.get("text", "") + json.dumps(o.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
    ]
    assert len(texts) >= 20
    for text in texts:
        assert not re.search(
            r"/root/|/home/|/work/|/tmp/|/Users/|site-packages|[A-Z]:\\\\", text
        ), text[:300]
        assert "Warning" not in text and "loss is no score" not in text, text[:300]


def test_notebook_links_point_at_the_definitions():
    # The markdown links to lines like [`grpo_loss`](grpo.py#L461); an edit that moves a function breaks them.
    import nbformat

    markdown = "".join(
        c.source
        for c in nbformat.read(HERE / "notebook.ipynb", as_version=4).cells
        if c.cell_type == "markdown"
    )
    links = re.findall(r"\[`(?:\w+\.)?(\w+)`\]\(((?:machinery\/)?\w+\.py)#L(\d+)\)", markdown)
    assert len(links) >= 10
    for name, file, line in links:
        source_line = (HERE / file).read_text().splitlines()[int(line) - 1]
        assert re.match(rf"(def|class) {name}\b", source_line), (
            f"{file}#L{line} is not where {name} is defined"
        )
