"""
LoRA (the reference for free), gradient checkpointing and dropout: every pass computes alike.
"""

import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

# Before huggingface_hub reads it (at import): the tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
import pytest  # noqa: E402
import torch  # noqa: E402

import grpo  # noqa: E402
import rewards  # noqa: E402
from grpo import (  # noqa: E402
    grpo_loss,
    per_token_logps,
)
from machinery import decoding, loading, logs  # noqa: E402
from machinery.decoding import prompt_cache  # noqa: E402
from machinery.flags import ConfigError  # noqa: E402
from tests.conftest import lora_policy, random_batch, tiny_config  # noqa: E402


def test_lora_trains_only_the_adapter_and_its_reference_is_the_base_model(tiny_model_dir, tmp_path):
    cfg, policy, reference = lora_policy(tiny_model_dir, tmp_path, learning_rate=1e-2)
    assert reference is None  # no second copy of the model
    base = loading.load_model(str(tiny_model_dir), torch.device("cpu")).eval()
    tokenizer = loading.load_tokenizer(str(tiny_model_dir))
    input_ids, attention_mask, mask = random_batch(base, tokenizer)
    K = mask.shape[1]
    with torch.no_grad():
        base_logp = per_token_logps(base, input_ids, attention_mask, K)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate)
    rows = rewards.load_dataset_rows("arithmetic", "train")[: cfg.prompts_per_step]
    torch.manual_seed(0)
    for _ in range(3):
        grpo.grpo_step(policy, None, tokenizer, optimizer, rows, cfg)
    changed = {name for name, p in policy.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert all("lora_" in name for name, p in policy.named_parameters() if p.requires_grad)
    with torch.no_grad():
        policy_logp = per_token_logps(policy, input_ids, attention_mask, K)
        with policy.disable_adapter():
            ref_logp = per_token_logps(policy, input_ids, attention_mask, K)
    assert not torch.allclose(policy_logp, base_logp, atol=1e-4)  # the adapter moved the policy
    torch.testing.assert_close(
        ref_logp, base_logp, rtol=1e-5, atol=1e-5
    )  # adapter off = the base model


def test_lora_run_saves_an_adapter_that_loads_back_and_resumes(tiny_model_dir, tmp_path):
    cfg = tiny_config(
        tiny_model_dir, tmp_path, lora_r=4, lora_alpha=8, learning_rate=1e-2, eval_size=0
    )
    grpo.train(cfg)
    out = Path(cfg.output_dir)
    adapter = out / "checkpoint-2"
    assert (adapter / "adapter_model.safetensors").exists() and not (
        adapter / "model.safetensors"
    ).exists()
    tokenizer = loading.load_tokenizer(str(adapter))
    input_ids, attention_mask, mask = random_batch(
        loading.load_model(str(tiny_model_dir), torch.device("cpu")), tokenizer
    )
    K = mask.shape[1]
    loaded = loading.add_lora(
        loading.load_model(str(tiny_model_dir), torch.device("cpu")), cfg, adapter
    ).eval()
    # merged into the weights as the README shows, then saved and loaded as a plain model
    loading.add_lora(
        loading.load_model(str(tiny_model_dir), torch.device("cpu")), cfg, adapter
    ).merge_and_unload().save_pretrained(out / "merged")
    merged = loading.load_model(str(out / "merged"), torch.device("cpu")).eval()
    with torch.no_grad():
        from_adapter = per_token_logps(loaded, input_ids, attention_mask, K)
        from_merged = per_token_logps(merged, input_ids, attention_mask, K)
        with loaded.disable_adapter():
            base = per_token_logps(loaded, input_ids, attention_mask, K)
    assert not torch.allclose(from_adapter, base, atol=1e-4)  # the saved adapter is a trained one
    torch.testing.assert_close(
        from_merged, from_adapter, rtol=1e-4, atol=1e-4
    )  # merging adds W + BA in float32
    grpo.train(replace(cfg, max_steps=3, resume=True))
    assert [m["step"] for m in logs.read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert (out / "checkpoint-3" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, tmp_path, lora):
    overrides = dict(lora_r=4, lora_alpha=8) if lora else {}
    grads = []
    for checkpointing in (False, True):
        cfg = tiny_config(
            tiny_model_dir, tmp_path, gradient_checkpointing=checkpointing, **overrides
        )
        torch.manual_seed(0)  # the same random LoRA A matrices both times
        policy, _ = loading.load_policy_and_reference(cfg, torch.device("cpu"))
        assert (
            any(getattr(m, "gradient_checkpointing", False) for m in policy.modules())
            == checkpointing
        )
        tokenizer = loading.load_tokenizer(str(tiny_model_dir))
        input_ids, attention_mask, mask = random_batch(policy, tokenizer)
        policy.train()
        logp = per_token_logps(policy, input_ids, attention_mask, mask.shape[1])
        loss, _ = grpo_loss(
            logp,
            logp.detach(),
            None,
            torch.linspace(-1, 1, len(logp)),
            mask,
            beta=0.0,
            epsilon_low=0.2,
            epsilon_high=0.2,
            loss_type="grpo",
            max_completion_length=mask.shape[1],
        )
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad})
    off, on = grads
    assert off.keys() == on.keys()
    # Gradient reaches every trainable tensor, except LoRA's A matrices: B starts at 0, so A's gradient is 0 at first.
    assert all(g.abs().sum() > 0 for name, g in on.items() if "lora_A" not in name)
    for name in off:  # the same float32 ops recomputed: equal up to kernel-level reordering
        torch.testing.assert_close(on[name], off[name], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="session")
def dropout_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with attention dropout 0.5 in its config (Llama's only dropout)."""
    path = tmp_path_factory.mktemp("dropout")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    return path


def test_a_model_with_dropout_is_scored_as_it_sampled(tiny_model_dir, dropout_model_dir, tmp_path):
    """At step 1 the policy is the reference, so the KL is exactly 0 unless the training pass (train mode)
    scores another policy than the reference's pass (eval mode): dropout left on in training does."""
    cfg = tiny_config(
        tiny_model_dir, tmp_path, model=str(dropout_model_dir), max_steps=1, eval_size=0, beta=0.04
    )
    grpo.train(cfg)
    assert logs.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")[0]["kl"] == 0.0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_old_reference_and_training_passes_compute_alike(
    tiny_model_dir, tmp_path, monkeypatch, checkpointing
):
    """The shared prompt cache serves all three log-prob passes of a step, or none of them (under gradient
    checkpointing transformers keeps no cache): computed in two ways, the step-0 KL and the first ratio are not
    exactly 0 and 1 under bf16 on a real model (on this tiny one both ways round alike, hence the count)."""
    calls = []
    for module in (grpo, decoding):  # sampling's, and the log-prob passes' (shared_prompt)
        monkeypatch.setattr(module, "prompt_cache", lambda *a: calls.append(1) or prompt_cache(*a))
    cfg = tiny_config(
        tiny_model_dir,
        tmp_path,
        prompts_per_step=1,
        max_steps=1,
        eval_size=0,
        beta=0.04,
        mu=2,
        gradient_checkpointing=checkpointing,
    )  # P = 1: a micro-batch is one group
    grpo.train(cfg)
    passes = 1 + 1 + 2  # old policy, reference, mu = 2 training passes (one micro-batch each)
    assert len(calls) == 1 + (0 if checkpointing else passes)  # 1: sampling


def test_lora_without_peft_says_how_to_install_it(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(ConfigError, match="pip install peft"):
        lora_policy(tiny_model_dir, tmp_path)


def test_lora_target_modules_the_model_lacks_name_the_ones_it_has(tiny_model_dir, tmp_path):
    with pytest.raises(
        ConfigError, match="'qkv_proj,fc1'.* linear layers are named: down_proj,gate_proj,k_proj"
    ):
        lora_policy(tiny_model_dir, tmp_path, lora_target_modules="qkv_proj,fc1")
