"""
The specification of grpo.py's GRPO, in the order of one step: sampling, the completion mask, the
advantages (of outcomes and of steps), the log-probs, the KL estimators and the loss. exercises/check.py runs
these tests on a learner's functions. The rest of the suite is in tests/, by topic.

Run every test: python -m pytest -q
"""

import math
import os

# Before huggingface_hub reads it (at import): the tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
import pytest  # noqa: E402
import torch  # noqa: E402

import grpo  # noqa: E402
import rewards  # noqa: E402
from grpo import (  # noqa: E402
    completion_mask,
    generate_completions,
    group_advantages,
    grpo_loss,
    importance_ratio,
    kl_estimate,
    per_token_logps,
    sample_tokens,
)
from machinery import decoding  # noqa: E402
from machinery.decoding import prompt_cache  # noqa: E402
from machinery.flags import ConfigError  # noqa: E402
from tests import conftest  # noqa: E402
from tests.conftest import (  # noqa: E402
    EOS,
    KL_GRADIENT_TABLE,
    PAD,
    TWO_COMPLETIONS,
    X,
    check_flags,
    close,
    random_batch,
    tiny_config,
)

# The shared fixtures (tests/conftest.py): the tiny chat model, its tokenizer, a livelier copy.
tiny_model_dir = conftest.tiny_model_dir
tiny = conftest.tiny
lively = conftest.lively


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom, the cells expected under 5 times pooled."""
    expected = counts.sum() * probs
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    return float(((observed - expected)[keep] ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize(
    "temperature, other, device", [(1.0, 0.5, "cpu"), (0.5, 1.0, "cpu"), (1.0, 0.5, "mps")]
)
def test_sampling_draws_from_softmax_of_the_logits_over_the_temperature(
    lively, temperature, other, device, monkeypatch
):
    """device "mps": the draw on a device without float64 (torch.multinomial), run here on the CPU."""
    model, tokenizer = lively
    if device == "mps":
        monkeypatch.setattr(grpo, "NO_FLOAT64", {"cpu"})
        monkeypatch.setattr(torch, "rand", None)  # the float64 inverse CDF is not the one drawing
    torch.manual_seed(0)
    rollout = generate_completions(
        model, tokenizer, [rewards.make_prompt("What is 1 + 2?")], 4000, 1, temperature
    )
    counts = torch.bincount(
        rollout.completion_ids[:, 0], minlength=model.config.vocab_size
    ).double()
    with torch.no_grad():
        logits = model(input_ids=rollout.prompt_ids[:1]).logits[0, -1].double()  # [V]
    # The statistic is about chi-square(df): mean df, sd sqrt(2 df). Mean + 6 sd fails a correct
    # sampler with probability well under 1e-5, and the other temperature's probabilities exceed it.
    statistic, df = chi_square(counts, torch.softmax(logits / temperature, dim=-1))
    why = (
        f"4,000 draws must follow softmax(logits / temperature) at temperature {temperature}, the distribution "
        "whose log-probs the loss uses"
    )
    assert statistic < df + 6 * (2 * df) ** 0.5, (
        f"{why} (chi-square {statistic:.0f}, {df} degrees of freedom)"
    )
    statistic, df = chi_square(counts, torch.softmax(logits / other, dim=-1))
    assert statistic > df + 6 * (2 * df) ** 0.5, f"{why}, not at temperature {other}"


def test_greedy_decoding_over_the_shared_prompt_cache_equals_plain_generate(lively):
    """The decoding loop over the repeated prompt cache: greedy tokens as generate() over G copies."""
    model, tokenizer = lively
    prompts = [
        rewards.make_prompt("What is 1 + 2?"),
        rewards.make_prompt("What is 33 + 4 + 5 + 6?"),
    ]
    rollout = generate_completions(model, tokenizer, prompts, 3, 8, temperature=0.0)
    assert rollout.texts[0] != rollout.texts[3]  # the replies depend on the prompt
    with torch.no_grad():
        plain = model.generate(
            input_ids=rollout.prompt_ids,
            attention_mask=rollout.prompt_mask,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=[tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
        )
    completions = plain[:, rollout.prompt_ids.shape[1] :]
    assert completions.shape == rollout.completion_ids.shape
    # up to each row's first EOS (after it both pad, and nothing is scored)
    assert torch.equal(
        completions * rollout.completion_mask, rollout.completion_ids * rollout.completion_mask
    ), "temperature 0 must draw the most likely token (argmax), as generate(do_sample=False) does"


def test_the_uniform_number_keeps_float64_resolution(monkeypatch):
    """Token 0 has probability 1/2 + 2^-31 (float64 logits): a uniform number of 1/2 + 2^-30 lies past it, so the draw
    is token 1; the same number in float32 rounds to 1/2 and would draw token 0. A token below float32's resolution
    (2^-24) could otherwise never be drawn."""
    monkeypatch.setattr(
        torch,
        "rand",
        lambda *shape, dtype=None, **kwargs: torch.full(shape, 0.5 + 2**-30, dtype=dtype),
    )
    p = 0.5 + 2**-31
    logits = torch.tensor([[math.log(p), math.log(1 - p)]], dtype=torch.float64)
    assert sample_tokens(logits, temperature=1.0).tolist() == [1], (
        "the draw must resolve probabilities below float32's 2^-24: a float32 draw (torch.multinomial's, or a "
        "float32 CDF or uniform number) cannot; an inverse-CDF draw keeps its CDF and its uniform number in float64"
    )


def test_a_uniform_number_of_zero_never_draws_a_token_of_probability_zero(monkeypatch):
    """torch.rand can return exactly 0. The draw is the first token whose CDF exceeds u (searchsorted's
    right=True), so u = 0 gives the first token of positive probability, never token 0 when its probability is 0."""
    monkeypatch.setattr(
        torch, "rand", lambda *shape, **kwargs: torch.zeros(*shape, dtype=torch.float64)
    )
    assert sample_tokens(torch.tensor([[-math.inf, 0.0, 0.0]]), temperature=1.0).tolist() == [1], (
        "u = 0 drew a token of probability 0: draw the first token whose CDF exceeds u (searchsorted's right=True)"
    )


@pytest.mark.parametrize(
    "ids, eos_ids, expected, why",
    [
        (
            [[X, X, EOS, EOS, EOS]],
            [EOS],
            [[1, 1, 1, 0, 0]],
            "the padding is the EOS token here: only the first EOS counts",
        ),
        (
            [[EOS, X, X, PAD, PAD]],
            [EOS],
            [[1, 0, 0, 0, 0]],
            "a reply that ends at once is the EOS itself, one token",
        ),
        (
            [[X, X, X, X, X]],
            [EOS],
            [[1, 1, 1, 1, 1]],
            "no EOS: the reply was cut off (truncated), every token counts",
        ),
        (
            [[X, 9, X, EOS, X]],
            [EOS, 9],
            [[1, 1, 0, 0, 0]],
            "any of the end-of-reply ids ends it (Qwen2.5 has two)",
        ),
        (
            [[X, EOS, PAD], [X, X, 9]],
            [9, EOS],
            [[1, 1, 0], [1, 1, 1]],
            "each row ends at its own first EOS",
        ),
    ],
)
def test_completion_mask(ids, eos_ids, expected, why):
    assert completion_mask(torch.tensor(ids), eos_ids).tolist() == expected, (
        f"1 up to and including the first EOS (the policy sampled it: it learns to stop), 0 after it: {why}"
    )


def test_sampling_and_the_mask_make_their_tensors_on_their_inputs_device():
    """On torch's meta device (shapes, no data): a tensor made on the CPU beside a GPU's would fail there, and here."""
    ids = torch.zeros(3, 5, dtype=torch.long, device="meta")
    why = "a tensor made without device= lands on the CPU: beside a GPU's tensors that fails"
    assert completion_mask(ids, [1, 2]).device.type == "meta", why
    for temperature in (1.0, 0.0):
        assert sample_tokens(torch.zeros(3, 7, device="meta"), temperature).device.type == "meta", (
            why
        )


@pytest.mark.parametrize(
    "rewards, expected",
    [
        ([1, 0, 0, 1], [0.865875, -0.865875, -0.865875, 0.865875]),
        ([0.2, 0.5, 0.9], [-0.948888, -0.094889, 1.043777]),
        ([1, 1, 1, 1], [0, 0, 0, 0]),
    ],
)
def test_group_advantages_reference_values(rewards, expected):
    advantages = group_advantages(torch.tensor(rewards, dtype=torch.float32), len(rewards))
    close(
        advantages,
        torch.tensor(expected, dtype=torch.float32),
        "Â_i = (r_i - mean(r)) / (std(r) + 1e-4) "
        "over the group, with the sample std (N - 1: torch.std's default, as TRL's); equal rewards "
        "give exactly 0",
        atol=1e-5,
        rtol=0,
    )


def test_group_advantages_are_exactly_zero_for_equal_rewards_and_per_group():
    # Three float32 0.45s have a mean 3e-8 off 0.45: over (std + eps) that residue alone would be an advantage of
    # ~3e-4, a signal made of rounding. (Other groups differ, so a check over the whole batch would not catch it.)
    rewards = torch.tensor([0.45, 0.45, 0.45, 1.0, 0.0, 0.0])
    advantages = group_advantages(rewards, 3)
    assert advantages[:3].eq(0).all(), (
        "equal rewards must give advantage exactly 0: such a group teaches nothing "
        f"(a float32 mean's rounding over std + eps gave {advantages[:3].tolist()})"
    )
    close(
        advantages[3:],
        group_advantages(torch.tensor([1.0, 0.0, 0.0]), 3),
        "each group is its own baseline: "
        "its rewards minus its own mean, over its own std; another group's rewards must not change it",
    )
    no_std = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, std="none")
    close(
        no_std,
        torch.tensor([0.5, -0.5, -0.5, 0.5]),
        'std="none" (Dr. GRPO): r_i - mean(r), divided by nothing',
    )


def test_batch_std_divides_by_the_whole_batchs_std():
    """TRL's scale_rewards="batch": each group's mean subtracted, the batch's sample std (0.534522) divided by."""
    advantages = group_advantages(
        torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]), 4, std="batch"
    )
    expected = [1.402859, -0.467620, -0.467620, -0.467620, 0.467620, 0.467620, -1.402859, 0.467620]
    close(
        advantages,
        torch.tensor(expected),
        'std="batch": each group\'s own mean subtracted, divided by the '
        "sample std of the whole batch's rewards",
        atol=1e-5,
        rtol=0,
    )  # literals of 6 decimals


# The paper's other half: process supervision, the gradient coefficient, the batch's std, mini-batches


def test_reward_to_go_sums_each_rows_rewards_from_t_on():
    rewards_ = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.0, 0.0, 0.0, 3.0]])
    expected = torch.tensor([[2.0, 1.0, 1.0, -1.0], [3.0, 3.0, 3.0, 3.0]])  # by hand
    close(
        grpo.reward_to_go(rewards_),
        expected,
        "reward-to-go: at t, the sum of each row's rewards at t and after "
        "(what token t can still change), never those before it",
    )


def test_process_advantages_reference_values():
    """The paper's section 4.1.3 by hand, its sum of the steps to go (credit="sum"). Group 1 (G = 2, T = 6): completion 0 has steps ending at tokens 1, 3, 5
    (rewards 1, 0, 1.5; the last is its answer's), completion 1 only its answer's, 0, at token 4 (a shorter reply,
    no checked step). R = [1, 0, 1.5, 0]: mean 0.625, sample std 0.75, so r̃ = (r - 0.625) / 0.7501. Â_it sums the
    r̃ of its steps ending at t or after: 0 after a reply's last step. Group 2: equal rewards: Â = 0 exactly."""
    steps = [[(1, 1.0), (3, 0.0), (5, 1.5)], [(4, 0.0)], [(0, 1.0), (2, 1.0)], [(5, 1.0)]]
    advantages = grpo.process_advantages(steps, group_size=2, length=6, credit="sum")
    r1, r0, r15 = 0.499933, -0.833222, 1.166511  # r̃ of 1, 0 and 1.5
    expected = torch.tensor(
        [
            [r1 + r0 + r15, r1 + r0 + r15, r0 + r15, r0 + r15, r15, r15],
            [r0, r0, r0, r0, r0, 0.0],
            [0.0] * 6,
            [0.0] * 6,
        ]
    )
    close(
        advantages,
        expected,
        "r̃ = (r - mean(R)) / (std(R) + eps) over all the steps of the group, the sample "
        "std; Â_it = Σ r̃ of the steps of completion i ending at t or after (0 after its last)",
        atol=1e-5,
        rtol=0,
    )
    assert advantages[2:].eq(0).all(), (
        "a group whose step rewards are all equal must give exactly 0"
    )
    least = grpo.process_advantages(steps, group_size=2, length=6)  # the default: PURE's min
    expected = torch.tensor(
        [[r0, r0, r0, r0, r15, r15], [r0, r0, r0, r0, r0, 0.0], [0.0] * 6, [0.0] * 6]
    )
    close(
        least,
        expected,
        "min form: Â_it = the least r̃ of the steps of completion i ending at t or after (one "
        "step's credit at most, so more steps never add up); 0 after its last step",
        atol=1e-5,
        rtol=0,
    )


def test_process_advantages_without_steps_are_the_outcome_advantages():
    """A group in which no reply states a step: each has one step, its answer, at its last token; then r̃ is the
    outcome advantage and Â_it is that same value on each of its tokens up to its end."""
    rewards_, lengths = torch.tensor([1.5, 0.0, 0.5, 0.0]), [3, 5, 2, 4]
    steps = [[(n - 1, r.item())] for n, r in zip(lengths, rewards_)]
    advantages = grpo.process_advantages(steps, group_size=4, length=5)
    outcome = group_advantages(rewards_, 4)
    for i, n in enumerate(lengths):
        close(
            advantages[i, :n],
            outcome[i].expand(n),
            "with one step per reply, its answer at its last token, Â "
            "must be the outcome advantage on each of its tokens",
        )
        assert advantages[i, n:].eq(0).all(), "after a reply's last step (its last token) Â is 0"


def test_process_advantages_normalize_each_group_apart_and_sum_steps_ending_together():
    """Two groups: each with its own mean and std (the second's rows never see the first's); two steps that end
    at the same token both count; a group of one step, or none, or of equal float rewards gives exactly 0."""
    one = [
        [(0, 1.0), (2, 0.0)],
        [(1, 0.5), (1, 1.0)],
    ]  # the second reply's two steps end at token 1
    two = [[(2, 3.0)], [(0, 0.0), (2, 1.0)]]
    both = grpo.process_advantages(one + two, group_size=2, length=3, credit="sum")
    apart = [grpo.process_advantages(g, 2, 3, credit="sum") for g in (one, two)]
    close(
        both,
        torch.cat(apart),
        "each group's steps are normalized by its own mean and std: another group must not change them",
    )
    R = torch.tensor([1.0, 0.0, 0.5, 1.0])
    summed = ((0.5 - R.mean()) + (1.0 - R.mean())) / (R.std() + 1e-4)
    close(both[1, :2], summed.expand(2), "two steps that end at the same token both count")
    assert both[1, 2] == 0, "after a reply's last step Â is 0"
    least = grpo.process_advantages(one, 2, 3)
    close(
        least[1, :2],
        ((0.5 - R.mean()) / (R.std() + 1e-4)).expand(2),
        "min form: of two steps ending at the same token, the lesser counts",
    )
    unscaled = grpo.process_advantages(one, 2, 3, std=False)  # Dr. GRPO: no std
    close(unscaled[0], torch.tensor([-0.625] * 3), "std=False: r̃ = r - mean(R), here 0 - 0.625")
    for steps, size in (
        ([[(1, 1.0)]], 1),
        ([[], []], 2),
        ([[(0, 0.45)], [(1, 0.45), (2, 0.45)]], 2),
    ):
        assert grpo.process_advantages(steps, size, 3).eq(0).all(), (
            f"a group of one step, of none, or of equal rewards must give exactly 0: it teaches nothing ({steps})"
        )
    two_values = grpo.process_advantages(
        [[(0, 1.0)], [(0, 0.0)]], 2, 1
    )  # two distinct rewards are enough
    close(
        two_values,
        torch.tensor([[0.707007], [-0.707007]]),
        "two distinct step rewards in a group are enough",
        atol=1e-5,
        rtol=0,
    )  # ±0.5 / 0.7072


@pytest.mark.parametrize("credit", ["min", "sum"])
def test_one_more_true_step_never_lowers_a_token_and_one_more_wrong_step_never_raises_one(credit):
    """Property, over random groups: two replies of one group alike but for one step, true (the
    group's best reward) or wrong (its worst): at every token the one with the true step has Â
    at least the other's, the one with the wrong step at most. Each step's reward is 0 or 1."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    T = 8
    reply = st.lists(st.tuples(st.integers(0, T - 1), st.sampled_from([0.0, 1.0])), max_size=4)

    @hypothesis.settings(max_examples=150, deadline=None)
    @hypothesis.given(
        st.lists(reply, min_size=0, max_size=3), reply, st.integers(0, T - 1), st.booleans()
    )
    def check(others, base, t, true):
        changed = sorted([*base, (t, 1.0 if true else 0.0)])
        group = [base, changed, *others]
        advantages = grpo.process_advantages(group, len(group), T, credit=credit)
        gap = advantages[1] - advantages[0]  # the changed reply's Â minus its twin's
        assert (gap >= -1e-6).all() if true else (gap <= 1e-6).all(), (
            f"one more {'true' if true else 'wrong'} step must never "
            f"{'lower' if true else 'raise'} a token's Â ({credit}): {group}, gap {gap.tolist()}"
        )

    check()


# Log-probs


def naive_logps(model, input_ids, attention_mask, completion_length, temperature=1.0):
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).logits
    logits = logits[:, -completion_length - 1 : -1].float() / temperature
    return logits.log_softmax(-1).gather(-1, input_ids[:, -completion_length:, None]).squeeze(-1)


@pytest.mark.parametrize(
    "chunk_size, temperature, one_prompt", [(1024, 1.0, False), (5, 0.7, False), (5, 0.7, True)]
)
def test_per_token_logps_equals_plain_log_softmax(
    tiny, monkeypatch, chunk_size, temperature, one_prompt
):
    model, tokenizer = tiny
    input_ids, attention_mask, mask = random_batch(model, tokenizer, one_prompt=one_prompt)
    K = mask.shape[1]
    calls = []  # one group: the prompt runs once and all rows get its cache; otherwise no cache
    monkeypatch.setattr(
        decoding, "prompt_cache", lambda *args: calls.append(args) or prompt_cache(*args)
    )
    model.train()  # as in the update (the tiny model has no dropout: same numbers as eval)
    logp = per_token_logps(model, input_ids, attention_mask, K, temperature, chunk_size)
    model.eval()
    assert len(calls) == one_prompt and (not calls or len(calls[0][1]) == 1)
    expected = naive_logps(model, input_ids, attention_mask, K, temperature)
    assert logp.shape == expected.shape == mask.shape, (
        f"one log-prob per completion token, [B, T]: {logp.shape}"
    )
    # Same float32 numbers through different kernels (chunked matmul, logsumexp vs log_softmax).
    close(
        logp,
        expected,
        "log π(o_t | q, o_<t): the logits at t - 1 predict the next token, o_t, at the sampling "
        f"temperature ({temperature}), the distribution o_t was drawn from",
        rtol=1e-5,
        atol=1e-5,
    )
    # The chunks are recomputed in backward (checkpoint); the gradient must be the plain one.
    (logp * mask).sum().backward()
    chunked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (naive_logps(model, input_ids, attention_mask, K, temperature) * mask).sum().backward()
    for a, b in zip(chunked, [p.grad for p in model.parameters()]):
        close(a, b, "the gradient must be the plain log_softmax's", rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_per_token_logps_of_a_bf16_model_take_the_log_softmax_in_float32(tiny):
    """bf16 weights (or autocast) give bf16 logits: their log-softmax, a sum of V exponentials, must
    be taken in float32, or the log-probs lose 2-3 digits (the ratio and the KL with them)."""
    model, tokenizer = tiny
    half = type(model)(model.config).to(torch.bfloat16).eval()
    half.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    half.get_output_embeddings().weight.data.normal_(0, 2.0)  # logits spread as a real model's
    input_ids, attention_mask, mask = random_batch(half, tokenizer)
    K = mask.shape[1]
    with torch.no_grad():
        logp = per_token_logps(half, input_ids, attention_mask, K)
        expected = naive_logps(half, input_ids, attention_mask, K)  # its bf16 logits, in float32
    assert logp.dtype == torch.float32, "log-probs in float32, whatever the model's precision"
    close(
        logp,
        expected,
        "the log-softmax of bf16 logits in float32 (.float() before logsumexp): bf16 loses digits",
        atol=2e-3,
        rtol=0,
    )


def test_left_padding_does_not_change_logps(tiny):
    """Padding a prompt on the left must not shift the positions of its real tokens."""
    model, tokenizer = tiny
    ids = torch.randint(
        3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3)
    )
    pad = torch.full((1, 4), tokenizer.pad_token_id)
    alone = per_token_logps(model, ids, torch.ones_like(ids), 5)
    padded = per_token_logps(
        model,
        torch.cat([pad, ids], 1),
        torch.cat([torch.zeros_like(pad), torch.ones_like(ids)], 1),
        5,
    )
    close(
        padded,
        alone,
        "left padding must not change the log-probs: positions counted from the attention mask, "
        "the padding masked out",
        rtol=1e-5,
        atol=1e-5,
    )


def test_log_probs_keep_no_vocabulary_sized_tensor_for_the_backward_pass(tiny):
    """The vocabulary projection runs in chunks recomputed in backward: the autograd graph holds no [tokens, V]
    logits, only each chunk's hidden states (a naive log_softmax would keep all B x T x V of them)."""
    model, tokenizer = tiny
    V = model.config.vocab_size
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(0))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(tuple(t.shape)) or t, lambda t: t
    ):
        per_token_logps(model, ids, torch.ones_like(ids), 6, chunk_size=4)
    assert saved and not [
        shape for shape in saved if shape[-1] == V and len(shape) >= 2 and shape[0] != V
    ], (
        "no vocabulary-sized [tokens, V] tensor may stay saved for backward (B x T x V float32 logits: 10 GB at "
        "64 x 256 x 152k): project a chunk of tokens at a time, recomputed in backward (torch.utils.checkpoint). "
        f"Saved: {saved}"
    )


@pytest.mark.parametrize("grad", [True, False])
def test_entropy_is_that_of_the_softmax_at_the_sampling_temperature(tiny, grad):
    """H_t = -Σ_v p_v log p_v with p = softmax(logits / T), the distribution o_t was drawn from, in the same
    chunks as the log-probs (chunks of 5 here, across rows), with and without the gradient's checkpointing."""
    model, tokenizer = tiny
    input_ids, attention_mask, mask = random_batch(model, tokenizer)
    K = mask.shape[1]
    with torch.set_grad_enabled(grad):
        logp, entropy = per_token_logps(
            model, input_ids, attention_mask, K, 0.7, chunk_size=5, entropy=True
        )
    with torch.no_grad():
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        z = logits[:, -K - 1 : -1].float() / 0.7
        expected = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    assert entropy.shape == logp.shape == mask.shape, (
        f"one entropy per completion token: {entropy.shape}"
    )
    # float32 sums of V terms in another order: seen within 1e-6; 1e-5 leaves room for other CPUs.
    close(
        entropy,
        expected,
        "the entropy of softmax(logits / temperature) at each completion position (the sampler's "
        "distribution): logsumexp(z) - Σ softmax(z) z, z = logits / temperature",
        rtol=1e-5,
        atol=1e-5,
    )
    assert not entropy.requires_grad, (
        "the entropy is logged, not optimized: no gradient (torch.no_grad)"
    )
    close(
        logp.detach(),
        per_token_logps(model, input_ids, attention_mask, K, 0.7, chunk_size=5),
        "asking for the entropy must not change the log-probs",
        rtol=0,
        atol=0,
    )


def test_kl_estimators_reference_values():
    log_r = torch.tensor([-1.0, 0.5, 2.0])  # log_r = ref_logp - logp
    logp = torch.zeros(3)
    why = "Schulman's estimators of KL(π_θ || π_ref) with log_r = log π_ref - log π_θ: "
    close(
        kl_estimate(logp, log_r, "k3"),
        torch.tensor([0.367879, 0.148721, 4.389056]),
        why + "k3 = e^log_r - log_r - 1",
        atol=1e-5,
        rtol=0,
    )
    close(kl_estimate(logp, log_r, "k1"), -log_r, why + "k1 = -log_r")
    close(kl_estimate(logp, log_r, "k2"), 0.5 * log_r**2, why + "k2 = log_r² / 2")


def test_k3_ratio_is_k3_times_the_ratio_and_k1_is_refused(tiny_model_dir, tmp_path):
    logp, old_logp, ref_logp = (
        torch.tensor([-1.0, -0.5]),
        torch.tensor([-1.2, -0.1]),
        torch.tensor([-0.7, -0.9]),
    )
    close(
        kl_estimate(logp, ref_logp, "k3_ratio", old_logp),
        torch.exp(logp - old_logp) * (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1),
        "k3_ratio = ρ k3, ρ = π_θ / π_θ_old = e^(logp - old_logp)",
    )
    with pytest.raises(
        ConfigError, match="k1: as a loss its gradient is 0 in expectation on policy"
    ):
        check_flags(tiny_config(tiny_model_dir, tmp_path, kl_estimator="k1"))


def kl_gradients(theta, ref_logits):
    """Autograd of KL(π_θ || π_ref) and of KL(π_ref || π_θ) with respect to the logits θ."""
    theta = theta.clone().requires_grad_(True)
    logp, ref_logp = theta.log_softmax(-1), ref_logits.log_softmax(-1)
    reverse = (logp.exp() * (logp - ref_logp)).sum()
    forward = (ref_logp.exp() * (ref_logp - logp)).sum()
    return {
        "KL(π_θ || π_ref)": torch.autograd.grad(reverse, theta, retain_graph=True)[0],
        "KL(π_ref || π_θ)": torch.autograd.grad(forward, theta)[0],
    }


def expected_kl_term_gradient(kind, theta, old_logits, ref_logits):
    """∇_θ of E_{x ~ π_old}[β KL_x] as grpo_loss computes it (β = 1, Â = 0), summed over every x."""
    theta = theta.clone().requires_grad_(True)
    logp, ref_logp = theta.log_softmax(-1), ref_logits.log_softmax(-1)  # [V]
    old_logp = (
        logp.detach() if old_logits is None else old_logits.log_softmax(-1)
    )  # None: on policy
    expected = 0
    for x in range(len(theta)):
        one = lambda t: t[x].view(1, 1)  # noqa: E731  a completion of one token, x
        loss, _ = grpo_loss(
            one(logp),
            one(old_logp),
            one(ref_logp),
            torch.zeros(1, dtype=theta.dtype),
            torch.ones(1, 1),
            beta=1.0,
            epsilon_low=0.2,
            epsilon_high=0.2,
            loss_type="grpo",
            max_completion_length=1,
            kl_estimator=kind,
        )
        expected = expected + old_logp[x].exp() * loss
    return torch.autograd.grad(expected, theta)[0]


@pytest.mark.parametrize("kind, on_policy, whose", KL_GRADIENT_TABLE)
def test_which_kl_gradient_each_estimator_gives_as_a_loss(kind, on_policy, whose):
    generator = torch.Generator().manual_seed(0)
    theta, ref_logits, old_logits = torch.randn(
        3, 6, generator=generator, dtype=torch.float64
    )  # V = 6
    gradient = expected_kl_term_gradient(kind, theta, None if on_policy else old_logits, ref_logits)
    truths = kl_gradients(theta, ref_logits)
    why = f"{kind} as a loss, {'on' if on_policy else 'off'} policy, must give the gradient of {whose} (README's table)"
    if whose == "zero":
        close(gradient, torch.zeros_like(gradient), why, atol=1e-9, rtol=0)
    elif whose == "neither":
        for truth in truths.values():
            assert (gradient - truth).norm() > 0.05 * truth.norm(), why
    else:
        close(gradient, truths[whose], why, atol=1e-9, rtol=0)
        other = next(t for name, t in truths.items() if name != whose)
        assert (gradient - other).norm() > 0.05 * other.norm()  # the two KLs differ here


def raised_by(call) -> Exception | None:
    try:
        call()
    except NotImplementedError:  # a stub not written yet: that, not a wrong error
        raise
    except Exception as error:  # what it raised, whatever it was
        return error
    return None


def test_an_unknown_kl_estimator_or_loss_type_is_refused_by_name():
    """A typo must not run as some other estimator or mean: a ValueError that names the kind and
    the choices (not a KeyError from a dict, nor a silent default)."""
    logp = torch.zeros(3)
    error = raised_by(lambda: kl_estimate(logp, logp, "k4"))
    said = "unknown KL estimator 'k4'; choose one of k1, k2, k3, k3_ratio"
    assert isinstance(error, ValueError) and said in str(error), (
        f"kl_estimate with an unknown kind must raise ValueError: {said} (it raised {error!r})"
    )
    settings = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.2, max_completion_length=4)
    error = raised_by(lambda: grpo_loss(**TWO_COMPLETIONS, loss_type="ppo", **settings))
    said = "unknown loss_type 'ppo'; choose one of grpo, dapo, dr_grpo, cispo"
    assert isinstance(error, ValueError) and said in str(error), (
        f"grpo_loss with an unknown loss_type must raise ValueError: {said} (it raised {error!r})"
    )


# The importance ratio: per token (the paper's), or one per completion (GSPO)


def test_importance_ratio_per_token_and_gspos_per_completion():
    """Sequence level: s_i = exp(1/|o_i| Σ_t log ρ_it) over the reply's own tokens. Row 0's log-ratios are
    0.1, 0.3, -0.1 (mean 0.1), row 1's 0.2, -0.3 (mean -0.05); the padding's junk (-1.9 on row 0) stays out."""
    logp, old, mask = (TWO_COMPLETIONS[name] for name in ("logp", "old_logp", "mask"))
    close(
        importance_ratio(logp, old, mask),
        torch.exp(logp - old),
        "token level: ρ_it = π_θ / π_θ_old = e^(logp - old_logp), one per token",
    )
    s = importance_ratio(logp, old, mask, "sequence")
    assert s.shape == (2, 1), (
        f"one ratio per completion, [B, 1] (it broadcasts over tokens): {tuple(s.shape)}"
    )
    expected = torch.tensor([[math.exp(0.1)], [math.exp(-0.05)]])
    close(
        s,
        expected,
        "GSPO's ratio: the geometric mean of the reply's token ratios, exp(1/|o_i| Σ_t log ρ_it), the mean over "
        "its own tokens (the mask), never the padding; the mean of the log-ratios, not of the ratios, and not "
        "their sum (the whole reply's ratio: a long reply's would explode)",
        rtol=0,
        atol=1e-6,
    )
    one, none = torch.tensor([[1, 0, 0, 0]]), torch.zeros(1, 4, dtype=torch.long)
    close(
        importance_ratio(logp[:1], old[:1], one, "sequence"),
        torch.exp(logp[:1, :1] - old[:1, :1]),
        "a reply of one token: its sequence ratio is that token's ratio (divided by |o_i| = 1)",
        rtol=0,
        atol=1e-6,
    )
    assert importance_ratio(logp[:1], old[:1], none, "sequence").item() == 1.0, (
        "a reply with no token (every one masked): ratio 1, not 0/0"
    )


def test_the_sequence_ratios_gradient_is_its_value_times_the_mean_of_the_tokens():
    """∂s_i/∂log π_θ(o_it) = s_i / |o_i| on the reply's tokens, 0 on its padding: the gradient flows through the
    mean (GSPO's ∇s_i = s_i 1/|o_i| Σ_t ∇log π_θ(o_it))."""
    logp = TWO_COMPLETIONS["logp"].clone().requires_grad_(True)
    old, mask = TWO_COMPLETIONS["old_logp"], TWO_COMPLETIONS["mask"]
    s = importance_ratio(logp, old, mask, "sequence")
    assert s.requires_grad, (
        "the gradient must flow through the sequence ratio (no detach): GSPO learns by it"
    )
    (gradient,) = torch.autograd.grad(s.sum(), logp)
    expected = s.detach() * mask / mask.sum(dim=1, keepdim=True)
    close(
        gradient,
        expected,
        "∂s_i/∂logp_it = s_i / |o_i| on the reply's own tokens and 0 on its padding: the gradient must flow "
        "through the sequence ratio (no detach)",
        rtol=0,
        atol=1e-6,
    )


def test_an_unknown_importance_sampling_level_is_refused_by_name():
    logp = torch.zeros(1, 2)
    error = raised_by(lambda: importance_ratio(logp, logp, torch.ones(1, 2), "tokens"))
    said = "unknown importance_sampling_level 'tokens'; choose token or sequence"
    assert isinstance(error, ValueError) and said in str(error), (
        f"importance_ratio with an unknown level must raise ValueError: {said} (it raised {error!r})"
    )


@pytest.mark.parametrize(
    "loss_type, expected", [("grpo", -0.174898), ("dapo", -0.311043), ("dr_grpo", -0.129601)]
)
def test_grpo_loss_reference_values(loss_type, expected):
    """T = 4 tokens in the batch, max_completion_length 6 (Dr. GRPO's constant is the latter: a
    batch whose replies all ended early is divided by 6 too); log-probs on the padding."""
    loss, diagnostics = grpo_loss(
        **TWO_COMPLETIONS,
        beta=0.04,
        epsilon_low=0.2,
        epsilon_high=0.2,
        loss_type=loss_type,
        max_completion_length=6,
        kl_estimator="k3",
    )
    mean = {
        "grpo": "1/B Σ_i 1/|o_i| Σ_t",
        "dapo": "Σ_it / Σ_i |o_i|",
        "dr_grpo": "Σ_it / (B max_completion_length)",
    }
    assert loss.item() == pytest.approx(expected, abs=1e-5), (
        f"the loss by hand: per token -min(ρÂ, clip(ρ, 1 - ε_low, 1 + ε_high) Â) + β k3 (the min: the pessimistic of "
        f"the two, PPO's bound), then {loss_type}'s mean, {mean[loss_type]}"
    )
    # token 2 of completion 1: ratio e^0.3 = 1.35 > 1.2 with A > 0; token 2 of completion 2: e^-0.3 = 0.74 < 0.8 with A < 0
    why = "clip/high_frac, clip/low_frac: the share of the batch's tokens (the completions' own, never the padding) whose gradient the clip stops"
    assert diagnostics["clip/high_frac"] == pytest.approx(1 / 5), why
    assert diagnostics["clip/low_frac"] == pytest.approx(1 / 5), why
    tokens = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]  # the completions' 5 tokens, no padding
    value = {name: TWO_COMPLETIONS[name].tolist() for name in ("logp", "old_logp", "ref_logp")}
    log_r = [value["ref_logp"][i][t] - value["logp"][i][t] for i, t in tokens]
    k3 = sum(math.exp(x) - x - 1 for x in log_r) / 5
    ratio = sum(math.exp(value["logp"][i][t] - value["old_logp"][i][t]) for i, t in tokens) / 5
    why = "the diagnostics are token means over the completions' tokens only, never the padding"
    assert diagnostics["kl"] == pytest.approx(k3, abs=1e-6), why
    assert diagnostics["ratio_mean"] == pytest.approx(ratio, abs=1e-6), why


def test_asymmetric_clip_reference_value():
    """Bug: ε_low and ε_high swapped in the clamp. Token 2 of completion 1 (ratio e^0.3, Â > 0) is cut at
    1 + ε_high, token 2 of completion 2 (ratio e^-0.3, Â < 0) at 1 - ε_low; recomputed here in plain floats."""
    import math

    args = dict(TWO_COMPLETIONS, ref_logp=None)
    low, high = 0.1, 0.3
    loss, _ = grpo_loss(
        **args,
        beta=0.0,
        epsilon_low=low,
        epsilon_high=high,
        loss_type="grpo",
        max_completion_length=4,
    )
    per_sequence = []
    for logp, old, mask, A in zip(
        args["logp"].tolist(),
        args["old_logp"].tolist(),
        args["mask"].tolist(),
        args["advantages"].tolist(),
    ):
        terms = [
            -min(math.exp(a - b) * A, min(max(math.exp(a - b), 1 - low), 1 + high) * A)
            for a, b, m in zip(logp, old, mask)
            if m
        ]
        per_sequence.append(sum(terms) / len(terms))
    expected = sum(per_sequence) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6), (  # float32 against float64: ~1e-7
        "ρ above 1 + ε_high is cut with Â > 0, below 1 - ε_low with Â < 0; then the pessimistic min, "
        "and grpo's mean, 1/B Σ_i 1/|o_i| Σ_t (each completion's tokens averaged, then the completions)"
    )
    swapped, _ = grpo_loss(
        **args,
        beta=0.0,
        epsilon_low=high,
        epsilon_high=low,
        loss_type="grpo",
        max_completion_length=4,
    )
    assert abs(swapped.item() - expected) > 1e-3


# Gradients, not just losses


def test_grpo_gradient_with_ratio_one_is_minus_advantage_over_length():
    """At ratio 1 and beta 0 the loss is ~0 but d loss / d logp_it = -A_i / (|o_i| B)."""
    logp = TWO_COMPLETIONS["logp"].clone().requires_grad_(True)
    mask, advantages = TWO_COMPLETIONS["mask"], TWO_COMPLETIONS["advantages"]
    loss, _ = grpo_loss(
        logp,
        logp.detach(),
        None,
        advantages,
        mask,
        beta=0.0,
        epsilon_low=0.2,
        epsilon_high=0.2,
        loss_type="grpo",
        max_completion_length=4,
    )
    loss.backward()
    B, lengths = 2, mask.sum(dim=1, keepdim=True)
    expected = -advantages[:, None] / lengths / B * mask
    close(
        logp.grad,
        expected,
        "at ratio 1 (mu = 1) the gradient is the policy gradient, d loss / d logp_it = "
        "-Â_i / (|o_i| B) on each token of completion i (grpo's mean: each completion's tokens averaged, "
        "then the completions), 0 on padding; at ratio 1 the clip does not act",
    )
    assert loss.item() == pytest.approx(
        -advantages.mean().item()
    ), (  # ratio 1: each sequence's term is -A_i
        "at ratio 1 each completion's term is -Â_i: the loss is -mean(Â), about 0 when Â sums to 0 over a group"
    )


@pytest.mark.parametrize("kind", ["k3_ratio", "k3", "k2"])
def test_the_kl_term_pulls_the_policy_towards_the_reference(kind):
    """Â = 0: only the KL term acts. A small step down its expected gradient (by enumeration, as above) must
    lower KL(π_θ || π_ref), with each estimator that regularizes on policy."""
    generator = torch.Generator().manual_seed(0)
    theta, ref_logits = torch.randn(2, 6, generator=generator, dtype=torch.float64)

    def kl(logits):
        logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)
        return (logp.exp() * (logp - ref_logp)).sum().item()

    stepped = theta - 0.1 * expected_kl_term_gradient(kind, theta, None, ref_logits)
    assert kl(stepped) < kl(theta), (
        f"with Â = 0 only the KL term acts: a step down the loss's gradient must move "
        f"π_θ towards the reference (+ β KL: a penalty), yet the KL went "
        f"{kl(theta):.4f} -> {kl(stepped):.4f}"
    )


def test_clip_fractions_count_the_tokens_whose_gradient_the_clip_stops():
    """One token per row. Low: ratio below 1 - eps_low with A < 0; high: above 1 + eps_high with A > 0. Beyond the
    range on the other side of A, or with A = 0, the clip changes nothing. At the edge itself (eps = 0, ratio 1
    exactly) nothing is cut. A one-token batch averages over its one token."""
    ratio = torch.tensor([0.7, 0.7, 0.7, 1.1, 1.3, 1.3, 1.3, 1.0])
    advantages = torch.tensor([-1.0, 0.0, 0.5, -1.0, 1.0, 0.0, -1.0, 1.0])
    logp, mask = ratio.log()[:, None], torch.ones(8, 1)
    args = dict(ref_logp=None, beta=0.0, loss_type="grpo", max_completion_length=1)
    _, diagnostics = grpo_loss(
        logp,
        torch.zeros(8, 1),
        advantages=advantages,
        mask=mask,
        epsilon_low=0.2,
        epsilon_high=0.28,
        **args,
    )
    assert (diagnostics["clip/low_frac"], diagnostics["clip/high_frac"]) == (1 / 8, 1 / 8), (
        "clipped: ρ < 1 - ε_low with Â < 0, or ρ > 1 + ε_high with Â > 0 (there min() takes the clipped term, "
        "constant in θ); beyond the range on the other side of Â, or with Â = 0, the clip changes nothing"
    )
    _, edge = grpo_loss(
        torch.zeros(2, 1),
        torch.zeros(2, 1),
        advantages=torch.tensor([-1.0, 1.0]),
        mask=torch.ones(2, 1),
        epsilon_low=0.0,
        epsilon_high=0.0,
        **args,
    )
    assert (edge["clip/low_frac"], edge["clip/high_frac"]) == (0.0, 0.0), (
        "at the edge (ρ = 1 exactly) nothing is cut"
    )
    _, one = grpo_loss(
        logp[:1],
        torch.zeros(1, 1),
        advantages=advantages[:1],
        mask=mask[:1],
        epsilon_low=0.2,
        epsilon_high=0.28,
        **args,
    )
    assert (
        one["ratio_mean"] == pytest.approx(0.7) and one["clip/low_frac"] == 1.0
    ), (  # 0.7 up to float32 rounding
        "the diagnostics are means over the batch's tokens: here its one token"
    )


def test_without_reference_log_probs_the_loss_has_no_kl_term():
    args = dict(
        TWO_COMPLETIONS,
        loss_type="grpo",
        max_completion_length=4,
        epsilon_low=0.2,
        epsilon_high=0.2,
    )
    loss, diagnostics = grpo_loss(**{**args, "ref_logp": None}, beta=0.04)
    assert loss.item() == grpo_loss(**args, beta=0.0)[0].item() and diagnostics["kl"] == 0.0, (
        "ref_logp None (beta 0: no reference is loaded): no KL term, and a KL of 0 in the diagnostics"
    )


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_gradient_does_not_depend_on_micro_batch_size(tiny, loss_type):
    model, tokenizer = tiny
    input_ids, attention_mask, mask = random_batch(model, tokenizer)
    K, B = mask.shape[1], len(input_ids)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        logp0 = per_token_logps(model, input_ids, attention_mask, K)
    # An old policy and a reference that differ from the policy, so clipping and KL both act.
    old_logp = logp0 + 0.3 * torch.randn(logp0.shape, generator=g)
    ref_logp = logp0 + 0.3 * torch.randn(logp0.shape, generator=g)
    advantages = torch.randn(B, generator=g)
    settings = dict(
        beta=0.04,
        epsilon_low=0.2,
        epsilon_high=0.28,
        loss_type=loss_type,
        max_completion_length=K,
        num_sequences=B,
        num_tokens=int(mask.sum()),
    )

    def gradient(micro_batch_size):
        model.zero_grad()
        for i in range(0, B, micro_batch_size):
            mb = slice(i, i + micro_batch_size)
            logp = per_token_logps(model, input_ids[mb], attention_mask[mb], K)
            loss, _ = grpo_loss(
                logp, old_logp[mb], ref_logp[mb], advantages[mb], mask[mb], **settings
            )
            loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    full = gradient(B)
    assert full.abs().max() > 0, (
        "the loss must have a gradient with respect to the policy's weights"
    )
    for micro_batch_size in (1, 4):  # 4 does not divide B = 6: micro-batches of 4 and 2
        # float32, summed in a different order: seen within 2.1e-7 of the largest component; 1e-6 of it leaves
        # room for other CPUs' kernels. A per-micro-batch denominator is off by a factor (4/6, 2/6, ...).
        close(
            gradient(micro_batch_size),
            full,
            "the loss's mean is over the whole batch (num_sequences, num_tokens), "
            "not each micro-batch: the gradient must not depend on the micro-batch size",
            rtol=0,
            atol=1e-6 * full.abs().max().item(),
        )
    model.zero_grad()


def test_per_token_advantages_equal_to_each_completions_one_give_the_same_loss_and_gradient():
    logp = TWO_COMPLETIONS["logp"].clone().requires_grad_(True)
    settings = dict(
        beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo", max_completion_length=4
    )
    args = (TWO_COMPLETIONS["old_logp"], TWO_COMPLETIONS["ref_logp"])
    one, _ = grpo_loss(
        logp, *args, TWO_COMPLETIONS["advantages"], TWO_COMPLETIONS["mask"], **settings
    )
    per_token = TWO_COMPLETIONS["advantages"][:, None].expand(2, 4)
    each, _ = grpo_loss(logp, *args, per_token, TWO_COMPLETIONS["mask"], **settings)
    why = "Â per token ([B, T]) equal to each completion's Â ([B]) must give the same loss and gradient"
    assert one.item() == each.item(), why
    assert torch.equal(*(torch.autograd.grad(x, logp)[0] for x in (one, each))), why


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_k1_to_go_puts_the_kl_to_go_in_the_advantage_not_in_the_loss(loss_type):
    """-β w Σ_{t' >= t} k1 of the sample (from π_θ_old) joins Â_t (w: so that β weighs each completion's KL);
    no KL term is added; the KL reported is k1's mean. Replies of 3 and 2 tokens: grpo's w_i is each one's own."""
    old, ref = TWO_COMPLETIONS["old_logp"], TWO_COMPLETIONS["ref_logp"]
    mask, beta = TWO_COMPLETIONS["mask"], 0.5
    settings = dict(
        epsilon_low=10.0, epsilon_high=10.0, loss_type=loss_type, max_completion_length=4
    )  # no clip here
    to_go, diagnostics = grpo_loss(
        TWO_COMPLETIONS["logp"],
        old,
        ref,
        TWO_COMPLETIONS["advantages"],
        mask,
        beta=beta,
        kl_estimator="k1_to_go",
        **settings,
    )
    per_completion = {  # the division of each token that w undoes
        "dapo": mask.sum() / len(mask),  # Σ|o|: w = Σ|o| / B
        "grpo": mask.sum(dim=1, keepdim=True),  # |o_i|: w_i = |o_i|, each reply its own, [B, 1]
        "dr_grpo": 4,  # B max_completion_length: w = max_completion_length
    }[loss_type]
    advantages = TWO_COMPLETIONS["advantages"][:, None] - beta * per_completion * grpo.reward_to_go(
        (old - ref) * mask
    )
    by_hand, _ = grpo_loss(
        TWO_COMPLETIONS["logp"], old, ref, advantages, mask, beta=0.0, **settings
    )
    assert to_go.item() == pytest.approx(by_hand.item(), abs=1e-6), (  # float32 of the same sums
        "k1_to_go: Â_t - β w Σ_{t' >= t} k1_t' with k1 of the sample, old_logp - ref_logp (reward_to_go), w "
        f"undoing {loss_type}'s division of each reply's tokens (dapo: Σ|o| / B; grpo: |o_i|, each reply's own; "
        "dr_grpo: max_completion_length), so that β weighs one KL per completion; no KL term in the loss"
    )
    k1 = ((TWO_COMPLETIONS["logp"] - ref) * mask).sum() / mask.sum()
    assert diagnostics["kl"] == pytest.approx(k1.item(), abs=1e-6), (
        "k1_to_go reports k1's token mean as the KL"
    )


# What GRPO became: GSPO's sequence ratio and CISPO's capped weight in the loss

SETTINGS = dict(beta=0.0, epsilon_low=0.2, max_completion_length=4)


def test_gspo_clips_whole_replies_at_their_sequence_ratio():
    """s_0 = e^0.1 = 1.105, s_1 = e^-0.05 = 0.951. With ε_high 0.2 neither is clipped: the loss is
    -1/B Σ_i s_i Â_i. With ε_high 0.05, s_0 > 1.05 with Â > 0: every token of reply 0 loses its gradient,
    where the token-level ratio keeps token 2's (ρ = e^-0.1 is inside the range)."""
    logp = TWO_COMPLETIONS["logp"].clone().requires_grad_(True)
    args = (
        TWO_COMPLETIONS["old_logp"],
        None,
        TWO_COMPLETIONS["advantages"],
        TWO_COMPLETIONS["mask"],
    )
    gspo = dict(SETTINGS, loss_type="grpo", importance_sampling_level="sequence")
    loss, _ = grpo_loss(logp, *args, epsilon_high=0.2, **gspo)
    expected = -(math.exp(0.1) * 0.8 + math.exp(-0.05) * -0.5) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6), (
        "GSPO: -min(s_i Â_i, clip(s_i, 1 - ε_low, 1 + ε_high) Â_i) on every token of reply i, s_i its sequence "
        "ratio, then grpo's mean"
    )
    loss, _ = grpo_loss(logp, *args, epsilon_high=0.05, **gspo)
    (gradient,) = torch.autograd.grad(loss, logp)
    assert torch.equal(gradient[0], torch.zeros(4)) and gradient[1, :2].abs().min() > 0, (
        "GSPO clips a whole reply: s_0 = 1.105 > 1 + ε_high with Â > 0 stops the gradient of all its tokens, "
        f"reply 1's (inside the range) keeps its own: {gradient}"
    )
    token_level = dict(gspo, importance_sampling_level="token")
    (gradient,) = torch.autograd.grad(
        grpo_loss(logp, *args, epsilon_high=0.05, **token_level)[0], logp
    )
    assert gradient[0, 2] != 0, "token level: token 2 of reply 0 (ρ = e^-0.1) keeps its gradient"


def test_cispo_caps_the_weight_stops_its_gradient_and_keeps_every_tokens():
    """CISPO: X_it = -sg(min(ρ_it, 1 + ε_high)) Â_i log π_θ(o_it), a token mean over the batch (5 tokens). Its
    gradient on each token is -min(ρ_it, 1.2) Â_i / 5, the tokens that PPO's clip would stop included (ρ = e^0.3
    with Â > 0, ρ = e^-0.3 with Â < 0), and 0 on the padding."""
    logp = TWO_COMPLETIONS["logp"].clone().requires_grad_(True)
    old, mask = TWO_COMPLETIONS["old_logp"], TWO_COMPLETIONS["mask"]
    A = TWO_COMPLETIONS["advantages"]
    loss, _ = grpo_loss(logp, old, None, A, mask, epsilon_high=0.2, loss_type="cispo", **SETTINGS)
    weight = torch.exp(logp.detach() - old).clamp(max=1.2)  # [B, T]
    expected = -(weight * A[:, None] * logp.detach() * mask).sum() / 5
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6), (
        "CISPO's loss: -Σ_it sg(min(ρ_it, 1 + ε_high)) Â_i log π_θ(o_it) / Σ|o| (the weight capped at 1 + ε_high, "
        "no lower bound; dapo's token mean over the batch)"
    )
    (gradient,) = torch.autograd.grad(loss, logp)
    close(
        gradient,
        -(weight * A[:, None] * mask) / 5,
        "CISPO's gradient per token: -min(ρ, 1 + ε_high) Â / Σ|o|. The weight's gradient is stopped (sg: "
        ".detach()), so no token loses its own, not even one PPO's clip would stop; Σ|o| is the batch's tokens",
        rtol=0,
        atol=1e-6,
    )


def test_the_token_means_divide_by_the_tokens_there_are_one_or_none():
    """A batch of one token: dapo's and cispo's mean is that token's X, and grpo's 1/B Σ_i of its reply's; a
    batch whose every token is masked (each reply cut off and filtered out) gives a loss of 0, not 0/0."""
    logp, old = TWO_COMPLETIONS["logp"][:1], TWO_COMPLETIONS["old_logp"][:1]
    one = torch.tensor([[1, 0, 0, 0]])
    A = torch.tensor([0.8])
    x = -math.exp(0.1) * 0.8  # token 0: ρ = e^0.1 inside the clip range
    for loss_type in ("dapo", "grpo"):
        loss, _ = grpo_loss(
            logp, old, None, A, one, epsilon_high=0.2, loss_type=loss_type, **SETTINGS
        )
        assert loss.item() == pytest.approx(x, abs=1e-6), (
            f"{loss_type}: one token in the batch, so the mean is that token's -ρÂ (divided by 1)"
        )
    for loss_type in grpo.LOSS_TYPES:
        loss, _ = grpo_loss(
            logp,
            old,
            None,
            A,
            torch.zeros_like(one),
            epsilon_high=0.2,
            loss_type=loss_type,
            **SETTINGS,
        )
        assert loss.item() == 0.0, (
            f"{loss_type}: no token in the loss gives 0, not NaN ({loss.item()})"
        )
