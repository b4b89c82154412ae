"""The command line as a Config, and every check that can fail before a model loads."""

import sys
from dataclasses import fields, replace
from pathlib import Path

from machinery.checkpoints import check_output_dir, run_config, said_on_ctrl_c
from machinery.devices import compiles_by_default, pick_device
from machinery.flags import CHOICES, ConfigError, flag, flag_parser, require, typed_flags
from machinery.hub import check_sources

POSITIVE = """prompts_per_step max_completion_length max_steps mu mini_batches temperature
    micro_batch_size logp_chunk_size eval_batch_size learning_rate arithmetic_max""".split()
NOT_NEGATIVE = """eval_size save_every log_samples_every ref_sync_every lora_r beta
    weight_decay""".split()


def parse_args(config_class, argv: list[str] | None = None, parser=None):
    """The flags typed as a `config_class`; on --resume, those not typed keep the run's (not
    --compile, which is this machine's)."""
    names = {f.name for f in fields(config_class)}
    typed = typed_flags(parser or flag_parser(config_class), argv)
    typed = {k: v for k, v in typed.items() if k in names}  # no runner's own flags
    output_dir = Path(typed.get("output_dir", config_class.output_dir))
    run = run_config(output_dir) if typed.get("resume") else {}
    kept = names - set(typed) - {"resume", "compile"}
    return config_class(**{k: v for k, v in run.items() if k in kept}, **typed)


def run_main(config_class, train, argv: list[str] | None = None) -> None:
    """`python grpo.py ARGS`: train(the flags as a config). Bad input: one line on stderr, exit
    code 2, as argparse's own errors; Ctrl-C outside the loop (loading, evaluating): what's kept."""
    cfg = None
    try:
        cfg = parse_args(config_class, argv)
        train(cfg)
    except ConfigError as error:
        print(f"grpo.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(said_on_ctrl_c(cfg))


def check_config(cfg, built_in_datasets: tuple[str, ...] = ()) -> None:
    """Fail at once, with the fix, on settings that would otherwise fail late or silently."""
    require(
        cfg.num_generations >= 2,
        f"--num-generations is {cfg.num_generations}; GRPO compares completions within a group, "
        "so use 2 or more (8 is usual).",
    )
    for name in POSITIVE:
        require(getattr(cfg, name) > 0, f"{flag(name)} is {getattr(cfg, name)}; it must be > 0.")
    for name in NOT_NEGATIVE:
        require(getattr(cfg, name) >= 0, f"{flag(name)} is {getattr(cfg, name)}; it must be >= 0.")
    require(
        cfg.kl_estimator != "k1",
        "--kl-estimator k1: as a loss its gradient is 0 in expectation on policy: it regularizes "
        "nothing. Use k3_ratio (the default), k3 or k2.",
    )
    require(
        0 <= cfg.epsilon_low < 1 and cfg.epsilon_high >= 0,
        f"clip range [1 - {cfg.epsilon_low}, 1 + {cfg.epsilon_high}]: use 0 <= epsilon-low < 1 "
        "<= 1 + high.",
    )
    for name, choices in CHOICES.items():
        require(
            getattr(cfg, name) in choices,
            f"{flag(name)} {getattr(cfg, name)!r} is unknown; choose one of {', '.join(choices)}.",
        )
    require(
        cfg.prompts_per_step % cfg.mini_batches == 0,
        f"--mini-batches {cfg.mini_batches} must divide --prompts-per-step {cfg.prompts_per_step}: "
        "each mini-batch holds whole groups (verl's ppo_mini_batch_size = P / N).",
    )
    require(
        cfg.supervision == "outcome" or cfg.advantage == "grpo",
        "--supervision process normalizes the steps' rewards over their group: use it with "
        "--advantage grpo.",
    )
    require(
        not (cfg.loss_type == "dr_grpo" and cfg.advantage == "grpo_batch_std"),
        "--loss-type dr_grpo drops the std from Â (Dr. GRPO), the batch's too: --advantage "
        "grpo_batch_std would be discarded. Use one of them.",
    )
    gspo = cfg.importance_sampling_level == "sequence"
    require(
        not gspo or cfg.loss_type == "grpo",
        f"--importance-sampling-level sequence (GSPO) with --loss-type {cfg.loss_type}: one ratio "
        "per reply belongs to a mean over replies; a sum over tokens weighs each by its length "
        "(TRL only warns). Use --loss-type grpo.",
    )
    require(
        not gspo or (cfg.supervision == "outcome" and cfg.kl_estimator != "k1_to_go"),
        "--importance-sampling-level sequence (GSPO) gives each token its reply's ratio, and so "
        "the reply's mean gradient: per-token advantages (--supervision process, --kl-estimator "
        "k1_to_go) would be averaged away. Use token-level ratios with them.",
    )
    require(
        not (cfg.lora_r and cfg.ref_sync_every),
        "--ref-sync-every needs full fine-tuning: with LoRA the reference is the base model "
        "itself. Set one of them to 0.",
    )
    check_sources(cfg.model, cfg.dataset, built_in_datasets)


def check_run(cfg, built_in_datasets: tuple[str, ...] = ()):
    """(cfg, device): the flags checked, the device found, --compile settled for it, and the
    output folder checked (a new run, or one to resume), all before anything loads."""
    check_config(cfg, built_in_datasets)
    device = pick_device(cfg.device)
    if cfg.compile is None:
        cfg = replace(cfg, compile=compiles_by_default(device))
    check_output_dir(cfg)
    return cfg, device
