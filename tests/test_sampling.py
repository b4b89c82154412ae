"""
Sampling beyond the exercises: one batch of completions, the end-of-reply ids, MPS's draw.
"""

import math
import os

# Before huggingface_hub reads it (at import): the tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
import torch  # noqa: E402

import grpo  # noqa: E402
import rewards  # noqa: E402
from grpo import completion_mask, generate_completions, sample_tokens

# Completion mask and sampling


def test_generate_completions_one_batch(tiny):
    model, tokenizer = tiny
    prompts = [rewards.make_prompt("What is 1 + 2?"), rewards.make_prompt("What is 33 + 4?")]
    model.generation_config.top_k = 1  # a model's own config must not turn sampling into greedy
    try:
        torch.manual_seed(0)
        rollout = generate_completions(model, tokenizer, prompts, 4, 6, temperature=1.0)
    finally:
        model.generation_config.top_k = None
    B = 8
    assert (
        rollout.prompt_ids.shape[0] == rollout.completion_ids.shape[0] == B
        and len(rollout.texts) == B
    )
    assert rollout.completion_ids.shape[1] <= 6
    assert (
        rollout.prompt_ids[:4] == rollout.prompt_ids[0]
    ).all()  # each prompt repeated G times, in a block
    assert (
        rollout.prompt_mask[:, -1].eq(1).all()
    )  # left padding: every prompt ends at the same column
    assert len(set(rollout.texts[:4])) > 1  # sampled, not greedy
    eos = tokenizer.eos_token_id
    has_eos = (rollout.completion_ids == eos).any(dim=1)
    assert torch.equal(rollout.truncated, ~has_eos)
    for ids, mask in zip(
        rollout.completion_ids.tolist(), rollout.completion_mask.tolist()
    ):  # counted by hand
        length = (
            ids.index(eos) + 1 if eos in ids else len(ids)
        )  # up to and including the first end-of-reply id
        assert mask == [1] * length + [0] * (len(ids) - length)
    greedy = [
        generate_completions(model, tokenizer, prompts[:1], 2, 6, temperature=0.0).texts
        for _ in range(2)
    ]
    assert greedy[0][0] == greedy[0][1] == greedy[1][0]


def test_greedy_decoding_stops_at_any_end_of_reply_id_as_generate_does(lively):
    """Several end-of-reply ids (Qwen2.5 has two) and left padding: the same tokens as generate(),
    each row padded after its first end-of-reply id, the mask and `truncated` from those ids."""
    model, tokenizer = lively
    prompts = [
        rewards.make_prompt("What is 1 + 2?"),
        rewards.make_prompt("What is 33 + 4 + 5 + 6?"),
    ]
    stop = int(generate_completions(model, tokenizer, prompts, 1, 8, 0.0).completion_ids[0, 2])
    eos_ids = [
        tokenizer.eos_token_id,
        stop,
    ]  # a token that greedy decoding draws early now ends a reply
    model.generation_config.eos_token_id = eos_ids
    try:
        rollout = generate_completions(model, tokenizer, prompts, 2, 8, temperature=0.0)
        with torch.no_grad():
            plain = model.generate(
                input_ids=rollout.prompt_ids,
                attention_mask=rollout.prompt_mask,
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=eos_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert (
        rollout.prompt_mask[2:].eq(0).any() or rollout.prompt_mask[:2].eq(0).any()
    )  # one prompt is padded
    assert torch.equal(rollout.completion_ids, plain[:, rollout.prompt_ids.shape[1] :])
    assert (
        rollout.completion_mask[0].sum() <= 3 and not rollout.truncated[0]
    )  # row 0 ended at `stop`
    assert torch.equal(rollout.completion_mask, completion_mask(rollout.completion_ids, eos_ids))
    assert torch.equal(
        rollout.truncated, ~torch.isin(rollout.completion_ids, torch.tensor(eos_ids)).any(dim=1)
    )


def test_on_mps_a_drawn_token_of_probability_zero_is_drawn_again(monkeypatch):
    """torch.multinomial on MPS has returned tokens of probability 0 (pytorch#192577): such a row is drawn again,
    the others keep their draw. Here a stand-in multinomial errs on its first call, as MPS would."""
    real, calls = torch.multinomial, []

    def erring(probs, n):
        calls.append(len(probs))
        return torch.zeros(len(probs), n, dtype=torch.long) if len(calls) == 1 else real(probs, n)

    monkeypatch.setattr(torch, "multinomial", erring)
    monkeypatch.setattr(grpo, "NO_FLOAT64", {"cpu"})  # the CPU takes MPS's branch
    logits = torch.tensor(
        [[-math.inf, 0.0, 0.0], [0.0, -math.inf, -math.inf], [-math.inf, -math.inf, 0.0]]
    )
    tokens = sample_tokens(logits, 1.0)
    assert (
        calls == [3, 2] and tokens[1] == 0 and tokens[2] == 2 and tokens[0] in (1, 2)
    )  # rows 0, 2 drawn again


def test_a_models_generation_config_does_not_reach_sampling(lively):
    """min_p, no_repeat_ngram_size, typical_p, bad_words_ids (and top-k, top-p, the repetition
    penalty, a temperature) in a model's generation_config: the same tokens at the same seed."""
    model, tokenizer = lively
    prompts = [rewards.make_prompt("What is 1 + 2?"), rewards.make_prompt("What is 33 + 4?")]
    torch.manual_seed(0)
    plain = generate_completions(model, tokenizer, prompts, 4, 8, temperature=1.0)
    config, saved = model.generation_config, model.generation_config.to_dict()
    settings = dict(
        min_p=0.5,
        no_repeat_ngram_size=1,
        typical_p=0.2,
        top_k=1,
        top_p=0.1,
        repetition_penalty=5.0,
        temperature=0.1,
        bad_words_ids=[[int(plain.completion_ids[0, 0])]],
    )
    for name, value in settings.items():
        setattr(config, name, value)
    try:
        torch.manual_seed(0)
        again = generate_completions(model, tokenizer, prompts, 4, 8, temperature=1.0)
    finally:
        for name in settings:
            setattr(config, name, saved.get(name))
    assert len(set(plain.texts)) > 2  # sampled: the settings above would have narrowed it
    assert torch.equal(again.completion_ids, plain.completion_ids)
