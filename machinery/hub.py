"""Where the model and the data come from: local paths, or Hub ids looked up once; and no
per-file progress bars or deprecation notices from the libraries while they load."""

import re
from pathlib import Path

from machinery.flags import ConfigError

HUB_ID = re.compile(r"(?!.*\.jsonl?$)\w[\w.-]*(/[\w.-]+)?")  # "name" or "owner/name", not .jsonl


def check_sources(model: str, dataset: str, built_in: tuple[str, ...] = ()) -> None:
    """A path that exists, a built-in dataset, or a Hub id; anything else is a path that does
    not exist. When a Hub id is needed, one quick look at the Hub: unreachable, the cache only
    (as HF_HUB_OFFLINE=1)."""
    from_hub = []
    for name, source, what in (
        ("model", model, "model folder"),
        ("dataset", dataset, "data file or folder"),
    ):
        exists = Path(source).expanduser().exists()
        if not HUB_ID.fullmatch(source) and not exists:
            raise ConfigError(
                f"--{name} {source!r}: no such {what}. Check the path, or pass a Hub id."
            )
        if name == "model" and exists:
            check_model_folder(Path(source).expanduser(), source)
        if not exists and source not in built_in:
            from_hub.append(f"--{name} {source}")
    if from_hub:
        look_at_the_hub(from_hub)


def check_model_folder(folder: Path, name: str) -> None:
    """A model folder holds config.json, safetensors weights and a tokenizer (as save_pretrained
    writes them): name what is missing now, not through a loader's error about something else."""
    files = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    if not any(f.endswith(".safetensors") for f in files):
        missing.append("safetensors weights (model.safetensors)")
    if not files & {"tokenizer.json", "tokenizer.model", "vocab.json"}:
        missing.append("a tokenizer (tokenizer.json)")
    if missing:
        raise ConfigError(
            f"--model {name!r} is no model folder: it has no {', '.join(missing)}. Pass a folder "
            "that save_pretrained wrote (config.json, safetensors weights, tokenizer), or a Hub id."
        )


def look_at_the_hub(needed: list[str]) -> None:
    """The libraries retry an unreachable Hub for about a minute: one look of 3 s instead."""
    import socket
    import urllib.parse

    import datasets
    import huggingface_hub

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return
    host = urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:  # without it, the cache at once
        huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
        print(
            f"note: {host} cannot be reached: {', '.join(needed)} from the cache only. Without "
            "the Hub: --model ./folder, --dataset arithmetic or a JSON-lines file."
        )


def quiet_libraries() -> None:
    """One progress bar, the trainer's: no per-file bars from transformers and datasets, and no
    notice of an attribute that transformers 5 deprecates and peft still reads."""
    import warnings

    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
