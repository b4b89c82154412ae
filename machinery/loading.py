"""The tokenizer and the models: safetensors weights only, no remote code unless asked; LoRA."""

from pathlib import Path

import torch

from machinery.flags import ConfigError, require
from machinery.hub import quiet_libraries


def load_tokenizer(name: str, trust_remote_code: bool = False, messages: list[dict] | None = None):
    """The model's tokenizer; its chat template must format `messages` (the task's prompt: Gemma's
    refuses a system message, some models have none), found out now, not mid-run. No pad token:
    EOS's."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"--model {name!r} cannot be loaded ({error}). Pass a Hub id or a local folder with "
            "config.json, weights and tokenizer."
        ) from None
    if messages is not None:
        try:
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:
            raise ConfigError(
                f"--model {name!r}: its chat template cannot format a system prompt and a "
                f"question ({error}). Use another chat model."
            ) from None
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def load_model(name: str, device: torch.device, dtype=torch.float32, trust_remote_code=False):
    """A causal LM from safetensors weights, in `dtype`, on `device`, without dropout: training
    scores the policy that sampled."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"--model {name!r} cannot be loaded ({error}). Pass a causal LM with safetensors "
            "weights."
        ) from None
    check_logits(model, name)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "attention_dropout", None), float):  # Llama's, Qwen2's
            module.attention_dropout = 0.0
    return model.to(device)


def check_logits(model, name: str) -> None:
    """grpo.py computes logits as output_layer(decoder(ids)): the model's own must be those."""
    ids = torch.arange(4)[None]  # [1, 4] any few tokens
    with torch.no_grad():
        try:
            ours = model.get_output_embeddings()(model.get_decoder()(ids).last_hidden_state)
        except AttributeError as error:
            raise ConfigError(
                f"--model {name!r}: its decoder or output layer cannot be reached ({error}). Use "
                "a Llama- or Qwen-like model."
            ) from None
        expected = model(input_ids=ids).logits  # [1, 4, V]
    require(
        torch.allclose(ours, expected, atol=1e-4),  # the same products, up to rounding
        f"--model {name!r} transforms its logits after the output layer (soft-capping or "
        "scaling), which per_token_logps does not reproduce. Use another model.",
    )


def add_lora(model, cfg, adapter_dir: Path | None = None):
    """Wrap `model` with LoRA adapters (new, or saved in `adapter_dir`); the base stays frozen."""
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError:
        raise ConfigError("--lora-r needs the peft library: pip install peft") from None
    quiet_libraries()  # and no notice of peft's read of an attribute transformers 5 deprecates
    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,  # one policy: the one that sampled
        target_modules=cfg.lora_target_modules.split(","),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as error:  # no module of the model has one of these names
        linear = {
            n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
        }
        raise ConfigError(
            f"--lora-target-modules {cfg.lora_target_modules!r}: {error} This model's linear "
            f"layers are named: {','.join(sorted(linear))}."
        ) from None


def load_policy_and_reference(cfg, device: torch.device, checkpoint_dir: Path | None = None):
    """The trainable policy (fp32) and the frozen reference (None if beta = 0 or with LoRA)."""
    remote = cfg.trust_remote_code
    weights = cfg.model if cfg.lora_r or checkpoint_dir is None else str(checkpoint_dir)
    low = cfg.lora_r and cfg.learning_rate == type(cfg).learning_rate  # LoRA wants ~10x (README)
    note = "; note: --learning-rate 1e-06 is full fine-tuning's, LoRA wants about 10x more"
    print(
        f"loading the policy: {weights}"
        + f", LoRA rank {cfg.lora_r}" * (cfg.lora_r > 0)
        + note * low
    )
    policy = load_model(weights, device, trust_remote_code=remote)
    if cfg.lora_r:  # the base model, then its adapter: new, or the checkpoint's
        policy = add_lora(policy, cfg, checkpoint_dir)
    reference = None
    if cfg.beta > 0 and not cfg.lora_r:  # fp32: in bf16 the step-0 KL is 1.4e-3, not 0
        synced = checkpoint_dir is not None and cfg.ref_sync_every
        weights = str(checkpoint_dir / "reference" if synced else cfg.model)
        print(f"loading the reference: {weights}")
        reference = load_model(weights, device, torch.float32, remote).eval().requires_grad_(False)
    if cfg.gradient_checkpointing:  # the reference too: its passes then compute as the policy's
        for model in (policy, reference):
            if model is not None:
                model.activation_checkpointing_enable({"use_reentrant": False})  # torch's advice
        if cfg.lora_r:  # frozen embeddings: give checkpointed layers an input with grad
            policy.enable_input_require_grads()
    return policy, reference
