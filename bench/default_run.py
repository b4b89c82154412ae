"""
Time and memory of the default run (`python grpo.py`) without downloading its weights.

Writes a model of Qwen2.5-0.5B-Instruct's shape (hidden 896, 24 layers, 14 query and 2 key-value
heads, MLP 4864, vocabulary 151,936, tied embeddings: 494M parameters) with random weights and
the chat tokenizer given, then runs grpo.py's `train` on it with the flags given, and prints the
seconds spent loading the models, evaluating and saving, the total, and on CUDA the peak memory
allocated and reserved by torch. Per-step phase times are in <output_dir>/metrics.jsonl.

Random weights almost never sample the end-of-reply token, so every completion (and every
greedy answer in the evaluation) runs to --max-completion-length: the slowest and largest step
the settings allow. A trained model stops earlier.

    python bench/default_run.py TOKENIZER [grpo.py flags]
    python bench/default_run.py Qwen/Qwen2.5-0.5B-Instruct --max-steps 3   # the default run, 3 steps
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo  # noqa: E402
from machinery import devices  # noqa: E402

QWEN2_5_0_5B = dict(
    vocab_size=151_936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=int(os.environ.get("RANDOM_MODEL_LAYERS", 24)),  # fewer: a dry run
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32_768,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def write_random_model(folder: str, tokenizer_name: str) -> None:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    config = Qwen2Config(
        **QWEN2_5_0_5B,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)  # bf16, as the Hub's copy
    tokenizer.save_pretrained(folder)


def timed(times: dict, name: str, fn):
    """fn, appending the seconds of each call to times[name] (devices.timed: it waits for the GPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def wrapper(*args, **kwargs):
        seconds = {}
        with devices.timed(seconds, name, device):
            result = fn(*args, **kwargs)
        times.setdefault(name, []).append(round(seconds[name], 1))
        return result

    return wrapper


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    tokenizer_name, flags = sys.argv[1], sys.argv[2:]
    times = {}
    for name in (
        "load_policy_and_reference",
        "evaluate",
        "save_checkpoint",
    ):  # train() calls these by name
        setattr(grpo, name, timed(times, name, getattr(grpo, name)))
    with tempfile.TemporaryDirectory() as folder:
        write_random_model(folder, tokenizer_name)
        start = time.perf_counter()
        grpo.main(["--model", folder, *flags])
        times["total"] = round(time.perf_counter() - start, 1)
    if torch.cuda.is_available():
        times["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        times["cuda_max_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20)
    print(json.dumps(times))


if __name__ == "__main__":
    main()
