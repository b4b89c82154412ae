"""
The machinery that grpo.py calls, looked up rather than read: nothing here is GRPO itself.

One module per concern, in layers; each imports only the ones above it in this list, and none
imports grpo.py or rewards.py (what it needs from them, it is handed):

  flags        ConfigError, every Config field as a command-line flag, the flags' choices
  devices      the device, bf16 autocast, timing, peak memory, sampling where float64 is missing
  logs         JSON lines, results.json, curves.png, a note said once
  hub          --model and --dataset: paths or Hub ids, one quick look at the Hub; quiet libraries
  decoding     chat prompts to ids and ids to replies, the prompts' key-value cache, the
               shared-prompt cache, the compiled decoding step
  metrics      one line of metrics.jsonl per step, the silent failures said once
  loading      the tokenizer, the models (safetensors only), LoRA
  checkpoints  checkpoints, resume, Ctrl-C and NaN stops, the output folder's checks
  cli          parse_args and check_config: the flags as a Config, checked before any loading;
               run_main, the command line's errors and Ctrl-C
"""
