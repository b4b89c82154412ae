"""
The loss beyond the exercises: which gradient of the whole completions' KL each estimator gives,
unknown kinds refused, DAPO's former name.
"""

import os
import re

# Before huggingface_hub reads it (at import): the tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
import pytest  # noqa: E402
import torch  # noqa: E402

from grpo import (  # noqa: E402
    Config,
    grpo_loss,
    kl_estimate,
)
from tests.conftest import TWO_COMPLETIONS, check_flags  # noqa: E402


def test_an_unknown_kl_estimator_is_refused():
    logp = torch.zeros(3)
    with pytest.raises(
        ValueError, match=re.escape("unknown KL estimator 'k4'; choose one of k1, k2, k3, k3_ratio")
    ):
        kl_estimate(logp, logp, "k4")


def sequence_logps(first, second):
    """A tabular policy over completions of two tokens (a, b) from V = 3: logits of the first token [3] and of
    the second given the first [3, 3]. Returns log π(a) [3] and log π(b | a) [3, 3]."""
    return first.log_softmax(-1), second.log_softmax(-1)


def expected_sequence_kl_term_gradient(kind, theta, ref, old=None):
    """∇_θ of E_{(a, b) ~ π_old}[Σ_t KL_t] over every completion, each completion's term as grpo_loss gives it (β = 1,
    Â = 0, a sum over its tokens; old None: on policy). k1_to_go: -Σ_t ρ_t Â_t with Â_t = -Σ_{t' >= t} k1_t', the
    KL as a reward-to-go, whose gradient on policy is Σ_t ∇log π(o_t) · Σ_{t' >= t} log(π/π_ref)(o_t')."""
    first, second = (p.clone().requires_grad_(True) for p in theta)
    (logp1, logp2), (ref1, ref2) = sequence_logps(first, second), sequence_logps(*ref)
    old1, old2 = (logp1.detach(), logp2.detach()) if old is None else sequence_logps(*old)
    expected = 0
    for a in range(3):
        for b in range(3):
            logp, ref_logp = (
                torch.stack([logp1[a], logp2[a, b]]),
                torch.stack([ref1[a], ref2[a, b]]),
            )
            old_logp = torch.stack([old1[a], old2[a, b]])
            term, _ = grpo_loss(
                logp[None],
                old_logp[None],
                ref_logp[None],
                torch.zeros(1, dtype=logp.dtype),
                torch.ones(1, 2),
                beta=1.0,
                epsilon_low=0.2,
                epsilon_high=0.2,
                loss_type="dr_grpo",
                max_completion_length=1,
                kl_estimator=kind,
            )  # dr_grpo over 1 x 1: the plain sum
            expected = expected + (old_logp.sum()).exp() * term
    return torch.autograd.grad(expected, (first, second))


def sequence_kl_gradients(theta, ref):
    """Autograd of the KL of whole completions, KL(π_θ || π_ref) = Σ_(a,b) π(a, b) log(π(a, b) / π_ref(a, b))."""
    first, second = (p.clone().requires_grad_(True) for p in theta)
    (logp1, logp2), (ref1, ref2) = sequence_logps(first, second), sequence_logps(*ref)
    logp, ref_logp = (
        logp1[:, None] + logp2,
        ref1[:, None] + ref2,
    )  # [3, 3] log-probs of whole completions
    return torch.autograd.grad((logp.exp() * (logp - ref_logp)).sum(), (first, second))


WHOLE_COMPLETION_TABLE = [  # (estimator, its expected gradient on policy, summed over a completion's tokens)
    ("k1", "zero"),
    ("k2", "last token only"),
    ("k3", "neither"),
    ("k3_ratio", "last token only"),
    ("k1_to_go", "exact"),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind, whose", WHOLE_COMPLETION_TABLE)
def test_which_gradient_of_the_whole_completions_kl_each_estimator_gives(kind, whose, seed):
    """README's column "whole completion", by exact enumeration of the 9 completions of two tokens (float64).
    A per-token KL term holds each token's prefix fixed: its gradient misses the terms through which the first
    token changes the context of the second. Exact for the second token's logits (k2, k3_ratio), off for the
    first's; the KL as a reward-to-go (Tang and Munos, arXiv 2506.09477) is exact for both."""
    generator = torch.Generator().manual_seed(seed)
    theta, ref = [
        (
            torch.randn(3, generator=generator, dtype=torch.float64),
            torch.randn(3, 3, generator=generator, dtype=torch.float64),
        )
        for _ in range(2)
    ]
    got, truth = (
        expected_sequence_kl_term_gradient(kind, theta, ref),
        sequence_kl_gradients(theta, ref),
    )
    if whose == "zero":
        assert all(g.abs().max() < 1e-12 for g in got)
    elif whose == "exact":
        for g, t in zip(got, truth):
            torch.testing.assert_close(g, t, atol=1e-12, rtol=0)
    else:
        last_exact = whose == "last token only"
        assert ((got[1] - truth[1]).norm() < 1e-12) == last_exact
        assert (got[0] - truth[0]).norm() > 0.05 * truth[
            0
        ].norm()  # the first token's: 10% and more, seen


def test_off_policy_no_estimator_gives_the_whole_completions_kl_gradient():
    """mu > 1, samples from π_old: none of the per-token estimators, nor the reward-to-go without importance
    weights over prefixes, gives the gradient of the whole completions' KL (Shah et al., arXiv 2512.21852)."""
    generator = torch.Generator().manual_seed(0)
    theta, ref, old = [
        (
            torch.randn(3, generator=generator, dtype=torch.float64),
            torch.randn(3, 3, generator=generator, dtype=torch.float64),
        )
        for _ in range(3)
    ]
    truth = torch.cat([t.flatten() for t in sequence_kl_gradients(theta, ref)])
    for kind in ("k2", "k3", "k3_ratio", "k1_to_go"):
        got = torch.cat(
            [g.flatten() for g in expected_sequence_kl_term_gradient(kind, theta, ref, old)]
        )
        assert (got - truth).norm() > 0.05 * truth.norm(), kind


def test_unknown_loss_type_raises():
    with pytest.raises(
        ValueError, match=re.escape("unknown loss_type 'ppo'; choose one of grpo, dapo, dr_grpo")
    ):
        grpo_loss(
            **TWO_COMPLETIONS,
            beta=0.04,
            epsilon_low=0.2,
            epsilon_high=0.2,
            loss_type="ppo",
            max_completion_length=4,
        )


def test_asymmetric_clip_range():
    # ratio e^0.3 = 1.35 on a token with A > 0: clipped by 1 + 0.2, not by 1 + 0.4
    args = dict(TWO_COMPLETIONS, ref_logp=None)
    _, tight = grpo_loss(
        **args,
        beta=0.0,
        epsilon_low=0.2,
        epsilon_high=0.2,
        loss_type="grpo",
        max_completion_length=4,
    )
    _, wide = grpo_loss(
        **args,
        beta=0.0,
        epsilon_low=0.2,
        epsilon_high=0.4,
        loss_type="grpo",
        max_completion_length=4,
    )
    assert tight["clip/high_frac"] > 0 and wide["clip/high_frac"] == 0


def test_bnpo_is_dapos_former_name_and_still_works(tmp_path):
    check_flags(Config(loss_type="bnpo", output_dir=str(tmp_path / "run")))  # accepted
    settings = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.2, max_completion_length=4)
    bnpo, _ = grpo_loss(**TWO_COMPLETIONS, loss_type="bnpo", **settings)
    dapo, _ = grpo_loss(**TWO_COMPLETIONS, loss_type="dapo", **settings)
    assert (
        bnpo.item() == dapo.item() == pytest.approx(-0.311043, abs=1e-5)
    )  # the token-mean reference value above
