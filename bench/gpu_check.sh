#!/usr/bin/env bash
# The GPU check: what only a GPU can show, in two device calls on one warm machine, as one table
# (also written to $OUT/gpu_check.md, with every part's log in $OUT/logs.tgz):
#   (b) ms per decoding step, eager and compiled, 64 rows x 512 tokens, bf16, compile time;
#   (c) three default steps (eval off), --no-compile and --compile: seconds per step, peak memory;
#   (d) peak memory of two default steps as a 16 GB card runs them (fp32: T4, V100), alone, with
#       --gradient-checkpointing, with --lora-r 16, with both (the second step holds AdamW's state),
#       and both as a run goes by default: compiled decoding (its static caches) and evaluation on;
#   (e) fp32 greedy tokens, eager against compiled, before and after one AdamW step
#       (bench/compiled_greedy.py: rows that part, and the logit gap where they do);
#   (a) with --tests, in the second call: the test suite with CUDA visible (no notebook tests).
# (b) and (c) run alone, one after the other (they are timings); (d)'s four runs side by side
# after them (memory is per process; their times are not reported). Each part stops at DEADLINE
# seconds after the start (default 540) so that the table prints inside the call.
# The model has Qwen2.5-0.5B-Instruct's shape with random weights (bench/default_run.py), so every
# completion runs the full 512 tokens; TOKENIZER is a chat tokenizer's folder (SmolLM2's will do).
#
#   bash bench/gpu_check.sh TOKENIZER              # on the GPU machine: (b)-(e), ~9 minutes
#   bash bench/gpu_check.sh TOKENIZER --tests      # then: (a), ~3.5 minutes (bench/README.md)
#   bash bench/gpu_check.sh TOKENIZER --dry-run    # anywhere, every part: 2 layers, tiny sizes
set -uo pipefail
cd "$(dirname "$0")/.."
TOKENIZER=${1:?usage: bash bench/gpu_check.sh TOKENIZER [--tests | --dry-run]}
MODE=${2:-}
OUT=${OUT:-/tmp/gpu_check}
WORK=$(mktemp -d)
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # nothing to reach: never wait on it
PY=${PYTHON:-python3}
if [[ $MODE == --dry-run ]]; then  # the plumbing only: minutes on a CPU, no figure worth keeping
    export RANDOM_MODEL_LAYERS=2
    TESTS=(-k "generate or greedy or compiled_decoding")
    SPEED=(--questions 2 --generations 2 --tokens 8 --repeats 1)
    STEP=(--prompts-per-step 2 --num-generations 2 --max-completion-length 8 --micro-batch-size 4)
    GREEDY=(--rows 2 --tokens 4)
    EVAL=(--eval-size 3 --eval-batch-size 2 --compile)
    LIMIT=900
else
    TESTS=(-k "not notebook")  # the notebook's tests: no Jupyter kernel nor nbformat there
    SPEED=(--questions 8 --generations 8 --tokens 512 --repeats 1 --precision bf16)
    STEP=()
    GREEDY=(--rows 16 --tokens 64)
    EVAL=()  # grpo.py's own: 200 questions in batches of 32, compiled on CUDA
    LIMIT=180
fi
DEADLINE=${DEADLINE:-540}
$PY -c "import xdist" 2>/dev/null && TESTS+=(-n 8)  # pytest-xdist, where there: 8 processes
part() {  # name, command: its log in $LOGS, stopped at LIMIT seconds or at the DEADLINE
    local name=$1; shift; local left=$((DEADLINE - SECONDS)); ((left > LIMIT)) && left=$LIMIT
    if ((left < 10)); then echo "== $name: skipped, past the deadline" | tee "$LOGS/$name.log"
        return 0; fi
    echo "== $name (at ${SECONDS} s, ${left} s allowed): $*"
    timeout -k 5 "$left" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?; echo "   $name: exit $rc, $(tail -c 300 "$LOGS/$name.log" | tail -1)"
    tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null; return 0; }

$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
    | tee "$LOGS/versions.log"
if [[ $MODE != --tests ]]; then
    $PY -c "import sys; sys.path.insert(0, 'bench'); import default_run; \
default_run.write_random_model('$WORK/model', '$TOKENIZER')"
    part b_decoding $PY bench/sampling_speed.py "$WORK/model" arithmetic "${SPEED[@]}" \
        --json "$LOGS/b_decoding.json"
    for mode in eager compiled; do
        flag=(--no-compile); [[ $mode == compiled ]] && flag=(--compile)
        part "c_steps_$mode" $PY bench/default_run.py "$TOKENIZER" --max-steps 3 --eval-size 0 \
            --dataset arithmetic --output-dir "$WORK/c_$mode" "${STEP[@]}" "${flag[@]}"
        cp "$WORK/c_$mode/metrics.jsonl" "$LOGS/c_steps_$mode.metrics.jsonl" 2>/dev/null
    done
    part e_compiled_greedy $PY bench/compiled_greedy.py "$WORK/model" "${GREEDY[@]}" \
        --json "$LOGS/e_compiled_greedy.json"
    # (d)'s runs; the last as the 16 GB command runs by default (compiled, evaluation on)
    MEMORY=(fp32 fp32_checkpointing fp32_lora16 fp32_checkpointing_lora16 fp32_checkpointing_lora16_as_default)
    for name in "${MEMORY[@]}"; do
        extra=(--eval-size 0 --no-compile); [[ $name == *checkpointing* ]] && extra+=(--gradient-checkpointing)
        [[ $name == *lora16* ]] && extra+=(--lora-r 16 --learning-rate 1e-5)
        [[ $name == *as_default ]] && extra=(--gradient-checkpointing --lora-r 16 --learning-rate 1e-5 "${EVAL[@]}")
        part "d_$name" $PY bench/default_run.py "$TOKENIZER" --max-steps 2 \
            --dataset arithmetic --precision fp32 --output-dir "$WORK/d_$name" "${STEP[@]}" \
            "${extra[@]}" &
    done
    wait
    for name in "${MEMORY[@]}"; do
        cp "$WORK/d_$name/metrics.jsonl" "$LOGS/d_$name.metrics.jsonl" 2>/dev/null; done
fi
[[ $MODE != "" ]] && part a_tests $PY -m pytest -q -p no:cacheprovider test_grpo.py "${TESTS[@]}"

$PY - "$LOGS" <<'EOF' | tee "$OUT/gpu_check.md"
import json, re, sys
from pathlib import Path
logs = Path(sys.argv[1])
def read(name):
    return (logs / name).read_text() if (logs / name).exists() else ""
print("| part | figure |\n|---|---|")
print(f"| versions | {read('versions.log').strip()} |")
if read("a_tests.log"):  # each part's row where it ran
    tests = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?) in ([\d.]+)s", read("a_tests.log"), re.M)
    print(f"| (a) tests, CUDA visible | {'%s, %s s' % tests[-1] if tests else 'no summary: a_tests.log'} |")
def json_row(name, label, figures):  # a part that writes JSON: its row, or where to look
    if read(f"{name}.log"):
        try:
            print(f"| {label} | {figures(json.loads(read(f'{name}.json')))} |")
        except (KeyError, ValueError):
            print(f"| {label} | failed: {name}.log |")
json_row("b_decoding", "(b) decoding, ms per step", lambda b: f"{b['rows']} rows: eager {b['eager_ms']}, "
         f"compiled {b['compiled_ms']} (compile {b['compile_s']} s, {b['compilations']} compilations, "
         f"{b['rows_differ']} rows differ)")
json_row("e_compiled_greedy", "(e) fp32 greedy, eager against compiled", lambda e: f"{e['before']['rows']} "
         f"rows; rows that part: {e['before']['rows_differ']} before, {e['after_one_step']['rows_differ']} after "
         f"one AdamW step; where: {e['before']['where'] + e['after_one_step']['where']}")
def run(name):  # (seconds per step, peak MB, peak after each step): metrics.jsonl, default_run's JSON
    lines = read(f"{name}.log").strip().splitlines()
    figures = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    metrics = [json.loads(line) for line in read(f"{name}.metrics.jsonl").splitlines()]
    steps = [round(sum(v for k, v in m.items() if k.startswith("time/")), 1) for m in metrics]
    return steps, figures.get("cuda_max_allocated_mb", "n/a"), [round(m["memory/peak_mb"]) for m in metrics]
for mode in ("eager", "compiled"):
    if read(f"c_steps_{mode}.log"):
        steps, peak, _ = run(f"c_steps_{mode}")
        print(f"| (c) default steps, {mode} | s per step {steps or 'failed: c_steps_%s.log' % mode}; "
              f"peak {peak} MB |")
for log in sorted(logs.glob("d_*.log")):  # (d)'s runs
    _, peak, by_step = run(log.stem)
    print(f"| (d) two steps, {log.stem[2:]} | peak {peak} MB (after step 1, 2: {by_step or 'failed'}) |")
EOF
tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
rm -rf "$WORK"
