#!/usr/bin/env bash
# The GPU check: what only a GPU can show, in one device call of under 8 minutes on an H100, as one
# table (also written to $OUT/gpu_check.md, with each part's log beside it):
#   (a) the test suite with CUDA visible (the notebook's test left out: no Jupyter kernel there);
#   (b) ms per decoding step, eager and --compile, 64 rows x 512 tokens, bf16, compile time;
#   (c) three default steps (eval off), eager and --compile: seconds per step, peak memory;
#   (d) peak memory of one default step as a 16 GB card runs it (fp32: T4, V100), alone, with
#       --gradient-checkpointing, with --lora-r 16.
# The model has Qwen2.5-0.5B-Instruct's shape with random weights (bench/default_run.py), so every
# completion runs the full 512 tokens; TOKENIZER is a chat tokenizer's folder (SmolLM2's will do).
#
#   bash bench/gpu_check.sh TOKENIZER              # on the GPU machine (bench/README.md: the call)
#   bash bench/gpu_check.sh TOKENIZER --dry-run    # anywhere: 2 layers, tiny sizes, CPU allowed
set -uo pipefail
cd "$(dirname "$0")/.."
TOKENIZER=${1:?usage: bash bench/gpu_check.sh TOKENIZER [--dry-run]}
OUT=${OUT:-/tmp/gpu_check}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [[ ${2:-} == --dry-run ]]; then  # the plumbing only: minutes on a CPU, no figure worth keeping
    export RANDOM_MODEL_LAYERS=2
    TESTS=(-k "generate or greedy or compiled_decoding")
    SPEED=(--questions 2 --generations 2 --tokens 8 --repeats 1)
    STEP=(--prompts-per-step 2 --num-generations 2 --max-completion-length 8 --micro-batch-size 4)
    LIMIT=900
else
    TESTS=(-k "not notebook_runs")
    SPEED=(--questions 8 --generations 8 --tokens 512 --repeats 1 --precision bf16)
    STEP=()
    LIMIT=180
fi
$PY -c "import xdist" 2>/dev/null && TESTS+=(-n 8)  # pytest-xdist, where there: 8 processes
part() { local name=$1; shift; echo "== $name: $*"; timeout "$LIMIT" "$@" >"$OUT/$name.log" 2>&1
         local rc=$?; echo "   exit $rc, $(tail -c 300 "$OUT/$name.log" | tail -1)"; return 0; }

$PY -c "import sys; sys.path.insert(0, 'bench'); import default_run; \
default_run.write_random_model('$WORK/model', '$TOKENIZER')"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
    | tee "$OUT/versions.log"

part a_tests $PY -m pytest -q -p no:cacheprovider test_grpo.py "${TESTS[@]}"
part b_decoding $PY bench/sampling_speed.py "$WORK/model" arithmetic "${SPEED[@]}" \
    --json "$OUT/b_decoding.json"
for mode in eager compiled; do
    flag=(); [[ $mode == compiled ]] && flag=(--compile)
    part "c_steps_$mode" $PY bench/default_run.py "$TOKENIZER" --max-steps 3 --eval-size 0 \
        --dataset arithmetic --output-dir "$WORK/c_$mode" "${STEP[@]}" "${flag[@]}"
done
for name in fp32 fp32_checkpointing fp32_lora16; do
    extra=(); [[ $name == *checkpointing ]] && extra=(--gradient-checkpointing)
    [[ $name == *lora16 ]] && extra=(--lora-r 16 --learning-rate 1e-5)
    part "d_$name" $PY bench/default_run.py "$TOKENIZER" --max-steps 1 --eval-size 0 \
        --dataset arithmetic --precision fp32 --output-dir "$WORK/d_$name" "${STEP[@]}" "${extra[@]}"
done

$PY - "$OUT" "$WORK" <<'EOF' | tee "$OUT/gpu_check.md"
import json, re, sys
from pathlib import Path
out, work = Path(sys.argv[1]), Path(sys.argv[2])
print("| part | figure |\n|---|---|")
print(f"| versions | {(out / 'versions.log').read_text().strip()} |")
tests = (out / "a_tests.log").read_text()
summary = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?) in ([\d.]+)s", tests, re.M)
print(f"| (a) tests, CUDA visible | {summary[-1][0] + ', ' + summary[-1][1] + ' s' if summary else 'no summary: see a_tests.log'} |")
try:
    b = json.loads((out / "b_decoding.json").read_text())
    print(f"| (b) decoding, {b['rows']} rows, ms per step | eager {b['eager_ms']}, compiled {b['compiled_ms']} "
          f"(compile {b['compile_s']} s, {b['compilations']} compilations, {b['rows_differ']} rows differ) |")
except (OSError, ValueError):
    print("| (b) decoding | failed: see b_decoding.log |")
def run(name):  # (seconds per step, peak MB) from default_run's JSON line and metrics.jsonl
    log = (out / f"{name}.log").read_text().strip().splitlines()
    figures = json.loads(log[-1]) if log and log[-1].startswith("{") else {}
    metrics = [json.loads(line) for line in (work / name.replace("steps_", "")).joinpath("metrics.jsonl").read_text().splitlines()] \
        if (work / name.replace("steps_", "")).joinpath("metrics.jsonl").exists() else []
    steps = [round(sum(v for k, v in m.items() if k.startswith("time/")), 1) for m in metrics]
    return steps, figures.get("cuda_max_allocated_mb", "n/a")
for mode in ("eager", "compiled"):
    steps, peak = run(f"c_steps_{mode}")
    print(f"| (c) default steps, {mode} | s per step {steps or 'failed: see c_steps_' + mode + '.log'}; peak {peak} MB |")
for name in ("fp32", "fp32_checkpointing", "fp32_lora16"):
    steps, peak = run(f"d_{name}")
    print(f"| (d) one step, {name} | peak {peak} MB; {steps or 'failed: see d_' + name + '.log'} s |")
EOF
rm -rf "$WORK"
