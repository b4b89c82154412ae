"""
Shared fixtures and helpers of the tests: a tiny chat model and its tokenizer, built here (offline),
settings for runs of a few seconds, and the command line run in or out of this process.
"""

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

# Before huggingface_hub reads it (at import): the tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import grpo  # noqa: E402
import rewards  # noqa: E402
from grpo import (  # noqa: E402
    Config,
    completion_mask,
    grpo_loss,
)
from machinery import checkpoints, cli, loading, logs  # noqa: E402
from rewards import (  # noqa: E402
    TAGS,
)

EOS, PAD, X = 2, 0, 7  # token ids of the completion-mask tests

HERE = Path(__file__).resolve().parent.parent  # the project's folder


# A tiny chat model, built locally: word-level tokenizer + 2-layer Llama with random weights.

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_chat_model(path: Path, seed: int = 0) -> Path:
    """Save a tokenizer (the system prompt's words, digits one per token, the four tags as
    single tokens, EOS used as pad) and a random 2-layer Llama to `path`."""
    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    text = " ".join(
        [
            rewards.SYSTEM_PROMPT,
            *(m["content"] for m in rewards.EXAMPLE_TURN),
            "What is + ? system user assistant",
        ]
    )
    for tag in TAGS:
        text = text.replace(tag, " ")
    words = sorted({w for w, _ in pre.pre_tokenize_str(text)} | set("0123456789"))
    vocab = {w: i for i, w in enumerate(["[UNK]", "<|im_start|>", "<|im_end|>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.Fuse()  # "1", "5" -> "15"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tokenizer.add_tokens(list(TAGS))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    tokenizer = loading.load_tokenizer(str(tiny_model_dir))
    model = loading.load_model(str(tiny_model_dir), torch.device("cpu")).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def lively(tiny):
    """The tiny model's architecture with 10x larger random weights: its greedy tokens depend on
    the prompt (the tiny model's weights are so small that every prompt gets the same reply)."""
    model, tokenizer = tiny
    torch.manual_seed(0)
    config = model.config.__class__(**{**model.config.to_dict(), "initializer_range": 0.2})
    return LlamaForCausalLM(config).eval(), tokenizer


DRAW_CURVES = logs.plot_curves


@pytest.fixture(autouse=True)
def no_png(monkeypatch):
    """train() draws curves.png at the end; in-process runs skip the drawing (about 0.3 s each). The subprocess
    run of test_end_to_end_then_resume and test_plot_curves_draws_a_png_from_the_metrics draw it."""
    monkeypatch.setattr(grpo, "plot_curves", lambda *args: None)
    monkeypatch.setattr(checkpoints, "plot_curves", lambda *args: None)  # (a run stopped early)


def need(module: str):
    """pytest.importorskip, except where GRPO_TESTS_NO_SKIP is set (.ci/run): there a missing install fails the
    test instead of passing as a skip."""
    if os.environ.get("GRPO_TESTS_NO_SKIP"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(tiny_model_dir, tmp_path, **overrides) -> Config:
    """Settings for a run of a few seconds on the tiny model."""
    settings = dict(
        model=str(tiny_model_dir),
        dataset="arithmetic",
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        prompts_per_step=2,
        num_generations=4,
        max_completion_length=8,
        micro_batch_size=4,
        eval_size=4,
        eval_batch_size=4,
        save_every=1,
        log_samples_every=1,
        device="cpu",
    )
    return Config(**{**settings, **overrides})


# Reference values, computed from the formulas by hand (see grpo_loss's docstring) and copied here as literals.
# Tolerance 1e-5: the literals have 6 decimals; float32 arithmetic is exact to about 1e-7 here.
# The tests of Part 1's functions say what was expected and why (exercises/ runs them on a learner's code).


def close(actual, expected, why: str, **tolerances):
    """torch.testing.assert_close whose failure says first what was expected and why."""
    torch.testing.assert_close(
        actual, expected, msg=lambda numbers: f"{why}\n{numbers}", **tolerances
    )


def random_batch(
    model, tokenizer, seed=0, batch=6, prompt_len=5, completion_len=7, one_prompt=False
):
    """Token ids with left-padded prompts and completions that end early (after an EOS).
    one_prompt: every row has the same prompt (a group), with the same left padding."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (batch, prompt_len), generator=g)
    if one_prompt:
        prompt_ids[:] = prompt_ids[0]
    prompt_mask = torch.ones_like(prompt_ids)
    for i in range(batch):
        pad = 2 if one_prompt else i % 3
        prompt_ids[i, :pad] = tokenizer.pad_token_id
        prompt_mask[i, :pad] = 0
    completion_ids = torch.randint(3, vocab, (batch, completion_len), generator=g)
    for i in range(batch):
        end = 2 + i % (completion_len - 2)
        completion_ids[i, end] = tokenizer.eos_token_id
        completion_ids[i, end + 1 :] = tokenizer.pad_token_id
    mask = completion_mask(completion_ids, [tokenizer.eos_token_id])
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, mask], dim=1)
    return input_ids, attention_mask, mask


# Command line, end to end


def run_cli(*args, cwd=HERE, timeout=300):
    """`python grpo.py ARGS` in a fresh process: the real command line, as a user runs it (a few seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(HERE / "grpo.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(*args):
    """grpo.main(ARGS) in this process, as run_cli reports it: what `python grpo.py ARGS` does past its imports
    (sys.exit(message) prints the message to stderr and exits with 1)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            grpo.main(list(args))
        except SystemExit as stop:
            code = (
                stop.code
                if isinstance(stop.code, int)
                else (print(stop.code, file=sys.stderr) or 1)
            )
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


# Diagnostics: the silent failures, each said once


def said_in(output_dir: Path) -> dict[str, int]:
    """{diagnostic: the step whose line of metrics.jsonl carries it}."""
    return {
        name: m["step"]
        for m in logs.read_jsonl(output_dir / "metrics.jsonl")
        for name in m.get("diagnostics", {})
    }


def fixed_rewards(monkeypatch, reward):
    for name in rewards.REWARD_FUNCTIONS:
        monkeypatch.setitem(
            rewards.REWARD_FUNCTIONS,
            name,
            lambda completions, answers: [reward() for _ in completions],
        )


@pytest.fixture(scope="session")
def ends_early_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model, made to end about a third of its tokens: one dimension of every embedding
    is large, so after the final norm it is about 5.7 in every position, and only the end-of-reply
    row of the output layer reads it (logit ~ 3.4 against ~0 for the ~60 others)."""
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[model.config.eos_token_id, 0] = 0.6
    path = tmp_path_factory.mktemp("ends-early")
    model.save_pretrained(path)
    PreTrainedTokenizerFast.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


# LoRA: the reference model for free


def lora_policy(tiny_model_dir, tmp_path, **overrides):
    lora = dict(lora_r=4, lora_alpha=8, lora_target_modules="q_proj,v_proj,down_proj")
    cfg = tiny_config(tiny_model_dir, tmp_path, **{**lora, **overrides})
    policy, reference = loading.load_policy_and_reference(cfg, torch.device("cpu"))
    return cfg, policy, reference


# scale/: the same run on TRL (scale/trl_grpo.py) and verl (scale/verl/). TRL comes from
# scale/requirements.txt, which CI installs; verl is too heavy for CI, so its files are tested
# without it.


def load_scale_module(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, HERE / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# grpo_step wires each piece to the right data: each test below fails on one wiring bug named in its docstring.


def one_step(cfg, rows, monkeypatch, steps=1):
    """Run `steps` grpo_steps on the same rows; return every grpo_loss call's arguments and the last step's output."""
    calls = []

    def spy(logp, old_logp, ref_logp, advantages, mask, **settings):
        calls.append(
            dict(
                logp=logp.detach().clone(),
                old_logp=old_logp.clone(),
                advantages=advantages.clone(),
                ref_logp=None if ref_logp is None else ref_logp.clone(),
                mask=mask.clone(),
                settings=settings,
            )
        )
        return grpo_loss(logp, old_logp, ref_logp, advantages, mask, **settings)

    monkeypatch.setattr(grpo, "grpo_loss", spy)
    torch.manual_seed(cfg.seed)
    policy, reference = loading.load_policy_and_reference(cfg, torch.device("cpu"))
    tokenizer = loading.load_tokenizer(cfg.model)
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate
    )
    for _ in range(steps):
        out = grpo.grpo_step(policy, reference, tokenizer, optimizer, rows, cfg)
    return calls, out, policy


def arithmetic_rows(n):
    return rewards.load_dataset_rows("arithmetic", "train", arithmetic_max=20)[:n]


class SilentBar:
    def write(self, text):
        pass

    def set_postfix(self, **kwargs):
        pass


def byte_level_tokenizer(text: str):
    """A byte-level BPE tokenizer trained on `text`: it decodes any ids back to their exact text, and its merges
    make tokens of several characters (and a character of several bytes, such as ×, several tokens)."""
    from tokenizers import trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer, backend.decoder = (
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
    )
    backend.train_from_iterator(
        [text] * 4,
        trainers.BpeTrainer(
            vocab_size=320,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend)


# The KL term as a loss, by exact enumeration: one token from a categorical policy over V choices, its
# expected gradient Σ_x π_old(x) ∇ grpo_loss(x) summed over every x (no sampling noise), against
# autograd of the two KLs. float64, so "equal" is to rounding (1e-9) and "neither" is far (> 5%).
KL_GRADIENT_TABLE = [  # (estimator, θ_old = θ?, whose gradient it is)
    ("k1", True, "zero"),
    ("k1", False, "neither"),
    ("k2", True, "KL(π_θ || π_ref)"),
    ("k2", False, "neither"),
    ("k3", True, "KL(π_ref || π_θ)"),
    ("k3", False, "neither"),
    ("k3_ratio", True, "KL(π_θ || π_ref)"),
    ("k3_ratio", False, "KL(π_θ || π_ref)"),
    ("k1_to_go", True, "KL(π_θ || π_ref)"),
    ("k1_to_go", False, "neither"),  # one token: its own k1 to go
    ("k1_is", True, "KL(π_θ || π_ref)"),
    ("k1_is", False, "KL(π_θ || π_ref)"),  # ρ k1: E_old[ρ k1] = E_θ[k1]
]


# Two completions of 3 and 2 tokens, padded to T = 4. The padding holds log-probs as a real batch
# does (the model scores the pad tokens too), each of them different: a formula that forgets the
# mask anywhere (the KL, the KL to go, the diagnostics) changes the numbers.
TWO_COMPLETIONS = dict(
    logp=torch.tensor([[-1.0, -0.5, -2.0, -3.1], [-0.3, -1.3, -0.2, -4.0]]),
    old_logp=torch.tensor([[-1.1, -0.8, -1.9, -1.2], [-0.5, -1.0, -2.6, -0.1]]),
    ref_logp=torch.tensor([[-1.2, -0.4, -2.1, -0.3], [-0.4, -1.5, -1.4, -2.2]]),
    advantages=torch.tensor([0.8, -0.5]),
    mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
)


def check_flags(cfg: Config) -> None:
    """machinery.cli.check_config with rewards.py's built-in datasets, as grpo.train calls it."""
    cli.check_config(cfg, rewards.BUILT_IN_TASKS)


def parse_flags(argv: list[str]) -> Config:
    """machinery.cli.parse_args of grpo.py's Config, as grpo.main calls it."""
    return cli.parse_args(Config, argv)
