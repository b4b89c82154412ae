#!/usr/bin/env bash
# grpo.py's default run on verl: the same data, prompt, rewards and knobs (README: Going further).
# Adapt MODEL, DATA, the GPU count and the rollout engine to your cluster.
#   python scale/verl/prepare_data.py --dataset openai/gsm8k --out "$DATA"
#   bash scale/verl/run_grpo.sh
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
DATA=${DATA:-data/gsm8k-verl}
GPUS=${GPUS:-1}
P=8; G=8            # --prompts-per-step, --num-generations
MICRO=8             # --micro-batch-size (completions per forward/backward pass, per GPU)

python3 -m verl.trainer.main_ppo \
  algorithm.adv_estimator=grpo \
  algorithm.norm_adv_by_std_in_grpo=True \
  algorithm.use_kl_in_reward=False \
  data.train_files="$DATA/train.parquet" \
  data.val_files="$DATA/test.parquet" \
  data.train_batch_size=$P \
  data.max_response_length=512 \
  data.max_prompt_length=512 \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.model.enable_gradient_checkpointing=False \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.optim.weight_decay=0.0 \
  actor_rollout_ref.actor.grad_clip=1.0 \
  actor_rollout_ref.actor.ppo_mini_batch_size=$P \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=$MICRO \
  actor_rollout_ref.actor.ppo_epochs=1 \
  actor_rollout_ref.actor.clip_ratio_low=0.2 \
  actor_rollout_ref.actor.clip_ratio_high=0.2 \
  actor_rollout_ref.actor.use_kl_loss=True \
  actor_rollout_ref.actor.kl_loss_coef=0.04 \
  actor_rollout_ref.actor.kl_loss_type=low_var_kl \
  actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean \
  actor_rollout_ref.rollout.n=$G \
  actor_rollout_ref.rollout.temperature=1.0 \
  actor_rollout_ref.rollout.name=vllm \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=$MICRO \
  actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=$MICRO \
  custom_reward_function.path=scale/verl/reward.py \
  custom_reward_function.name=compute_score \
  trainer.n_gpus_per_node=$GPUS \
  trainer.nnodes=1 \
  trainer.total_training_steps=200 \
  trainer.save_freq=50 \
  trainer.test_freq=-1 \
  trainer.logger=console \
  "$@"
