"""
The KL at step 0, when the policy *is* the reference, under bf16 autocast: with the reference's
weights in bf16 and in fp32 (the policy's are fp32, as AdamW needs), and the memory of each.

    python bench/reference_precision.py SMOLLM2_FOLDER GSM8K_FOLDER
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402
import rewards  # noqa: E402
from machinery import devices, loading  # noqa: E402

model_dir, data = sys.argv[1], sys.argv[2]
device = devices.pick_device("auto")
autocast = devices.autocast_for(device, "bf16")
tokenizer = loading.load_tokenizer(model_dir)
policy = loading.load_model(model_dir, device).eval()
references = {
    "bf16": loading.load_model(model_dir, device, torch.bfloat16).eval(),
    "fp32": loading.load_model(model_dir, device).eval(),
}
torch.manual_seed(0)
rows = rewards.load_dataset_rows(data, "train", example_turn=False)[:4]  # as measured
rollout = grpo.generate_completions(
    policy, tokenizer, [r["prompt"] for r in rows], 4, 64, 1.0, autocast
)
input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
T, mask = rollout.completion_ids.shape[1], rollout.completion_mask.float()
with torch.no_grad(), autocast:
    logp = grpo.per_token_logps(policy, input_ids, attention_mask, T)
    for name, reference in references.items():
        ref_logp = grpo.per_token_logps(reference, input_ids, attention_mask, T)
        kl = (grpo.kl_estimate(logp, ref_logp, "k3") * mask).sum() / mask.sum()
        gap = ((logp - ref_logp).abs() * mask).max()
        mib = sum(p.numel() * p.element_size() for p in reference.parameters()) / 2**20
        print(
            f"reference weights {name}: step-0 k3 KL, token mean {kl:.3g}; "
            f"largest log-prob gap {gap:.3g}; weights {mib:.0f} MiB"
        )
