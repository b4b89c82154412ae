"""
The KL of whole completions off policy: k1_is (exact in expectation, importance weights over
prefixes) against k1_to_go (exact on policy only), on one real batch at mu = 2.

Two batches of README's run (3 arithmetic questions x 8 completions, up to 64 tokens): an AdamW
step (lr 5e-6, the default loss) on the first moves the policy off the reference (at the first step
π_old = π_ref, so k1 of the sample, k1_to_go's, is exactly 0); the second is sampled by that policy
and stepped on once, so that the second pass of mu = 2 scores a policy that moved again. Then, for each completion alone, the gradient of its KL term (Â = 0, β = 1,
loss type grpo, B = the batch) under each estimator: their mean, the spread of the per-completion
gradients around it (the estimator's variance, summed over parameters) and the prefix weights
Π ρ that k1_is multiplies by.

    python bench/kl_variance.py SMOLLM2_FOLDER
"""

import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo  # noqa: E402
import rewards  # noqa: E402
from machinery import loading  # noqa: E402


def main(model_dir: str) -> None:
    torch.manual_seed(0)
    cfg = grpo.Config(
        model=model_dir, prompts_per_step=3, max_completion_length=64, learning_rate=5e-6, mu=2
    )
    tokenizer = loading.load_tokenizer(model_dir)
    device = torch.device("cpu")
    policy = loading.load_model(model_dir, device)
    reference = loading.load_model(model_dir, device).eval().requires_grad_(False)
    train_rows = rewards.load_dataset_rows("arithmetic", "train")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate)
    for step in range(2):  # step 0 moves θ off the reference; step 1's batch is the one measured
        rows = rewards.rows_for_step(train_rows, step, 3, 0)
        prompts = [r["prompt"] for r in rows]
        rollout = grpo.generate_completions(policy, tokenizer, prompts, 8, 64, 1.0)
        input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
        attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
        T = rollout.completion_ids.shape[1]
        old = grpo.frozen_logps(policy, input_ids, attention_mask, T, cfg, nullcontext())
        ref = grpo.frozen_logps(reference, input_ids, attention_mask, T, cfg, nullcontext())
        _, _, advantages = grpo.compute_advantages(rollout, rows, cfg, tokenizer)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": rollout.completion_mask,
            "advantages": advantages,
            "old_logp": old,
            "ref_logp": ref,
        }
        one_pass = grpo.Config(**{**vars(cfg), "mu": 1})
        grpo.update_policy(policy, optimizer, batch, one_pass, nullcontext())  # mu = 2's first pass
    mask = rollout.completion_mask.float()
    B = len(mask)
    params = [p for p in policy.parameters() if p.requires_grad]
    sums = {"k1_to_go": 0, "k1_is": 0}  # Σ_i g_i, one completion's estimate of ∇KL each
    squares = {"k1_to_go": 0.0, "k1_is": 0.0}  # Σ_i |g_i|²
    with torch.no_grad():
        now = grpo.frozen_logps(policy, input_ids, attention_mask, T, cfg, nullcontext())
    prefix = torch.exp(((now - old) * mask).cumsum(dim=1))[mask.bool()]
    for i in range(B):
        logp = grpo.per_token_logps(policy, input_ids[i : i + 1], attention_mask[i : i + 1], T)
        for kind in sums:
            loss, _ = grpo.grpo_loss(
                logp,
                old[i : i + 1],
                ref[i : i + 1],
                torch.zeros(1),
                mask[i : i + 1],
                beta=1.0,
                epsilon_low=0.2,
                epsilon_high=0.2,
                loss_type="grpo",
                max_completion_length=64,
                kl_estimator=kind,
                num_sequences=1,
            )
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            g = torch.cat(
                [
                    (d if d is not None else torch.zeros_like(p)).flatten()
                    for d, p in zip(grads, params)
                ]
            )
            sums[kind] = sums[kind] + g
            squares[kind] += float(g.square().sum())
    print(
        f"prefix weights Π ρ over {int(mask.sum())} tokens: min {prefix.min():.4f}, max {prefix.max():.4f}"
    )
    means = {kind: total / B for kind, total in sums.items()}
    for kind, mean in means.items():
        variance = squares[kind] / B - float(mean.square().sum())
        print(
            f"{kind}: |mean gradient| {mean.norm():.4e}, variance (Σ over parameters) {variance:.4e}"
        )
    cosine = torch.nn.functional.cosine_similarity(means["k1_to_go"], means["k1_is"], dim=0)
    print(f"the two mean gradients: cosine {cosine:.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
