"""
Peak memory of per_token_logps against a naive full log-softmax, for a 150k-token vocabulary.

A tiny random Llama (2 layers, hidden 64) with Qwen2.5's vocabulary size (151,936), B
completions of 512 tokens after a 64-token prompt, on CPU. Each measurement runs in a fresh
process and reports its peak resident memory minus the memory held before the call.

    python bench/logps_memory.py                 # the table
    python bench/logps_memory.py --completions 64 --way chunked --grad   # one measurement

naive:   model(...).logits for the completion positions, log_softmax over the vocabulary, gather
chunked: grpo.per_token_logps (hidden states once, vocabulary projection 1024 tokens at a time)
"""

import argparse
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo  # noqa: E402

VOCAB, PROMPT, COMPLETION = 151_936, 64, 512


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(completions: int, way: str, grad: bool) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(config)
    input_ids = torch.randint(0, VOCAB, (completions, PROMPT + COMPLETION))
    attention_mask = torch.ones_like(input_ids)
    baseline = rss_mb()
    with torch.set_grad_enabled(grad):
        if way == "chunked":
            logp = grpo.per_token_logps(model, input_ids, attention_mask, COMPLETION)
        else:
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=COMPLETION + 1
            ).logits
            logp = (
                logits[:, :-1]
                .float()
                .log_softmax(-1)
                .gather(-1, input_ids[:, -COMPLETION:, None])
                .squeeze(-1)
            )
        if grad:
            logp.sum().backward()
    return rss_mb() - baseline


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--completions", type=int)
    parser.add_argument("--way", choices=["naive", "chunked"])
    parser.add_argument("--grad", action="store_true")
    args = parser.parse_args()
    if args.way:
        print(f"{measure(args.completions, args.way, args.grad):.0f}")
        return
    # The naive way needs B x 512 x 151,936 x 4 bytes for the logits and as much again for the
    # log-softmax: 2.5 GB per completion, so it stops at 8 completions on a 24 GB machine.
    runs = [(b, "naive", g) for b in (1, 2, 4, 8) for g in (False, True)]
    runs += [(b, "chunked", g) for b in (1, 8, 64) for g in (False, True)]
    print(f"{'completions':>11} {'way':>8} {'grad':>5} {'peak MB above baseline':>24}")
    for completions, way, grad in runs:
        command = [sys.executable, __file__, "--completions", str(completions), "--way", way] + (
            ["--grad"] if grad else []
        )
        child = subprocess.run(command, capture_output=True, text=True)
        result = (
            child.stdout.strip() if child.returncode == 0 else f"failed (exit {child.returncode})"
        )
        print(f"{completions:>11} {way:>8} {str(grad):>5} {result:>24}", flush=True)


if __name__ == "__main__":
    main()
