"""The device, its precision, the clock and peak memory, and sampling where float64 is missing."""

import importlib.util
import sys
import time
from contextlib import contextmanager, nullcontext

import torch

from machinery.flags import require

GPUS = {"cuda": torch.cuda, "mps": torch.mps}  # each with is_available and its random state
NO_FLOAT64 = {"mps"}  # devices without float64: sampling draws there with torch.multinomial


def pick_device(name: str) -> torch.device:
    found = [kind for kind, gpu in GPUS.items() if gpu.is_available()] + ["cpu"]
    name = found[0] if name == "auto" else name
    require(name in found, f"--device {name}: torch finds none. Use --device auto.")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast over fp32 weights (bf16 weights lose AdamW's updates), or nothing. "auto": bf16
    on GPUs with native bf16 (A100, L4, RTX 30xx, H100), else fp32 (Qwen2 overflows in fp16)."""
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "bf16" or (precision == "auto" and native):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def compiles_by_default(device: torch.device) -> bool:
    """--compile unset: on where it is faster (bench/README.md), CUDA GPUs that Triton compiles
    for (V100 and later)."""
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.get_device_capability(device) >= (7, 0)


def draw_without_float64(probs: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B]: torch's own draw in float32, redrawn where MPS drew a token of probability 0
    (pytorch#192577)."""
    tokens = torch.multinomial(probs, 1).squeeze(-1)  # [B]
    while (wrong := probs.gather(-1, tokens[:, None]).squeeze(-1) == 0).any():
        tokens[wrong] = torch.multinomial(probs[wrong], 1).squeeze(-1)
    return tokens


@contextmanager
def timed(metrics: dict, key: str, device: torch.device):
    """Add the seconds spent inside the block to metrics[key] (waiting for the GPU to finish)."""
    synchronize = getattr(torch, device.type).synchronize  # torch.cpu's waits for nothing
    synchronize()
    start = time.perf_counter()
    yield
    synchronize()
    metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - start


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory: torch's on CUDA, none on MPS (no counter), else the process's resident."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if device.type == "mps" or sys.platform == "win32":  # no peak counter; no `resource`
        return None  # null in metrics.jsonl (NaN is no JSON)
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, else KiB
