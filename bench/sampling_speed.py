"""
Time grpo.py's decoding loop (`generate_completions`) against the `model.generate` call it
replaced, on the same prompts, in one process, alternating the two so that the machine's drift
hits both alike. Both sample from softmax(logits / T) (top-k, top-p and the repetition penalty
switched off in `generate`); they draw different random numbers, so the texts differ.

    python bench/sampling_speed.py SMOLLM2_FOLDER GSM8K_FOLDER            # the CPU bench work
    python bench/sampling_speed.py MODEL_FOLDER GSM8K_FOLDER --questions 8 --generations 8 \
        --tokens 512 --device cuda                                         # 64 rows on a GPU

With --profile it also prints the operators that take the loop's time (torch.profiler).
"""

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402
import rewards  # noqa: E402


@torch.no_grad()
def generate_with_hf(model, tokenizer, prompts, num_generations, max_completion_length,
                     temperature, autocast=nullcontext()):
    """The sampling path before the decoding loop: one `model.generate` call over a prompt cache."""
    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False).to(device)
    prompt_ids = encoded.input_ids.repeat_interleave(num_generations, dim=0)
    prompt_mask = encoded.attention_mask.repeat_interleave(num_generations, dim=0)
    eos_ids = model.generation_config.eos_token_id
    eos_ids = sorted({i for i in [*(eos_ids if isinstance(eos_ids, list) else [eos_ids]),
                                  tokenizer.eos_token_id] if i is not None})
    with autocast:
        cache = grpo.prompt_cache(model, encoded.input_ids, encoded.attention_mask, num_generations)
        output = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, past_key_values=cache,
                                max_new_tokens=max_completion_length, eos_token_id=eos_ids,
                                pad_token_id=tokenizer.pad_token_id, repetition_penalty=1.0,
                                use_cache=True, do_sample=True, temperature=temperature, top_k=0,
                                top_p=1.0)
    return output[:, prompt_ids.shape[1]:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    device = grpo.pick_device(args.device)
    autocast = grpo.autocast_for(device, args.precision)
    grpo.quiet_libraries()
    tokenizer = grpo.load_tokenizer(args.model)
    model = grpo.load_model(args.model, device).eval()
    prompts = [r["prompt"] for r in rewards.load_dataset_rows(args.data, "train", example_turn=False)[:args.questions]]
    work = (model, tokenizer, prompts, args.generations, args.tokens, 1.0, autocast)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def per_token(fn):  # seconds per decoding step, and the steps taken
        torch.manual_seed(0)
        sync()
        start = time.perf_counter()
        out = fn(*work)
        sync()
        ids = out.completion_ids if isinstance(out, grpo.Rollout) else out
        return (time.perf_counter() - start) / ids.shape[1], ids.shape[1]

    per_token(grpo.generate_completions), per_token(generate_with_hf)  # warm-up
    times = {"loop": [], "generate": []}
    for _ in range(args.repeats):
        for name, fn in (("loop", grpo.generate_completions), ("generate", generate_with_hf)):
            seconds, steps = per_token(fn)
            times[name].append(seconds)
            print(f"{name:9s} {steps:4d} decoding steps, {1000 * seconds:7.1f} ms per step", flush=True)
    loop, hf = statistics.median(times["loop"]), statistics.median(times["generate"])
    rows = args.questions * args.generations
    print(f"\n{rows} rows, {device}, {args.precision}: median ms per decoding step: loop {1000 * loop:.1f}, "
          f"generate {1000 * hf:.1f}; loop / generate = {loop / hf:.2f}")
    if args.profile:
        with torch.profiler.profile() as profile:
            grpo.generate_completions(*work)
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
