"""
Time grpo.py's decoding loop (`generate_completions`) eager against compiled (`--compile`: a
static cache and a `torch.compile`d decoding step), on the same prompts, in one process,
alternating the two so that the machine's drift hits both alike. Both draw the same tokens at
the same seed (test_grpo.py checks it on a tiny model); this script counts the differing rows.

    python bench/sampling_speed.py SMOLLM2_FOLDER GSM8K_FOLDER            # CPU: 4 x 8 = 32 rows
    python bench/sampling_speed.py MODEL_FOLDER GSM8K_FOLDER --questions 8 --generations 8 \
        --tokens 512 --device cuda --precision bf16                        # 64 rows on a GPU

The first compiled call compiles (its time, less a later compiled call's, is printed as the
compile time); later calls with the same number of rows and prompts of a similar length (the same
multiple of 256 slots) reuse it. With --profile it also prints where the eager loop's time goes.
"""

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402
import rewards  # noqa: E402
from machinery import devices, hub, loading  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    device = devices.pick_device(args.device)
    autocast = devices.autocast_for(device, args.precision)
    hub.quiet_libraries()
    tokenizer = loading.load_tokenizer(args.model)
    model = loading.load_model(args.model, device).eval()
    rows = rewards.load_dataset_rows(args.data, "train", example_turn=False)
    batches = [
        [r["prompt"] for r in rows[i : i + args.questions]]  # other prompts every repeat
        for i in range(0, args.questions * (args.repeats + 1), args.questions)
    ]
    paths = {
        "eager": grpo.generate_completions,
        "compiled": partial(grpo.generate_completions, compiled=True),
    }

    def per_step(name, prompts):  # seconds per decoding step, and the completions
        times = {}
        torch.manual_seed(0)
        with devices.timed(times, "s", device):
            out = paths[name](
                model, tokenizer, prompts, args.generations, args.tokens, args.temperature, autocast
            )
        return times["s"] / out.completion_ids.shape[1], out

    warm = {name: per_step(name, batches[0]) for name in paths}  # the compiled one compiles
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    times, differ = {name: [] for name in paths}, 0
    for prompts in batches[1:]:
        outs = {}
        for name in paths:
            seconds, outs[name] = per_step(name, prompts)
            times[name].append(seconds)
            print(
                f"{name:9s} {outs[name].completion_ids.shape[1]:4d} decoding steps, "
                f"{1000 * seconds:7.1f} ms per step",
                flush=True,
            )
        eager, fast = (outs[name].completion_ids for name in paths)
        differ += (eager.shape != fast.shape) or int((eager != fast).any(dim=1).sum())
    eager, compiled = (statistics.median(times[name]) for name in paths)
    steps = warm["compiled"][1].completion_ids.shape[1]  # the first compiled call less a later one
    compile_s = (warm["compiled"][0] - compiled) * steps
    print(
        f"compile time: {compile_s:.1f} s (the first compiled call less the median of the "
        f"later ones, {steps} steps)",
        flush=True,
    )
    compilations = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(
        f"\n{args.questions * args.generations} rows, {device}, {args.precision}: median ms per "
        f"decoding step: eager {1000 * eager:.1f}, compiled {1000 * compiled:.1f}; compiled / "
        f"eager = {compiled / eager:.2f}; rows whose tokens differ: {differ}; compilations: "
        f"{graphs} at the first call, {compilations} in all"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rows": args.questions * args.generations,
                    "eager_ms": round(1000 * eager, 2),
                    "compiled_ms": round(1000 * compiled, 2),
                    "rows_differ": differ,
                    "compile_s": round(compile_s, 1),
                    "compilations": compilations,
                }
            )
        )
    if args.profile:
        with torch.profiler.profile() as profile:
            grpo.generate_completions(
                model,
                tokenizer,
                batches[0],
                args.generations,
                args.tokens,
                args.temperature,
                autocast,
            )
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
