"""
The loss beyond the exercises: which gradient of the whole completions' KL each estimator gives,
unknown kinds refused, DAPO's former name.
"""

import os

# Before huggingface_hub reads it (at import): the tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
import pytest  # noqa: E402
import torch  # noqa: E402

from grpo import (  # noqa: E402
    Config,
    grpo_loss,
)
from tests.conftest import TWO_COMPLETIONS, check_flags  # noqa: E402


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


END, V, L = 0, 3, 3  # token 0 ends a reply; 3 tokens; completions of up to 3 tokens


def varied_completions() -> list[tuple[int, ...]]:
    """Every completion of up to L tokens: ended by END, or cut at L (15 of them, lengths 1-3)."""
    done, open_ = [], [()]
    for _ in range(L):
        grown = [o + (x,) for o in open_ for x in range(V)]
        done += [o for o in grown if o[-1] == END]
        open_ = [o for o in grown if o[-1] != END]
    return done + open_


def table_policy(generator):
    """A tabular policy: the logits of each token given every prefix, [V], [V, V], [V, V, V]."""
    return [
        torch.randn(*(V,) * (n + 1), generator=generator, dtype=torch.float64) for n in range(L)
    ]


def token_logps(tables, o) -> torch.Tensor:
    """[len(o)] log π(o_t | o_<t) of the tabular policy."""
    return torch.stack([tables[t][o[:t]].log_softmax(-1)[o[t]] for t in range(len(o))])


def expected_whole_kl_gradient(kind, loss_type, theta, ref, old, B=4, N=7):
    """∇_θ E_{o ~ π_old}[the loss of o], Â = 0, β = 1, each o scored as a micro-batch of a batch of
    B completions and N tokens, padded to L with junk: log-probs that are no completion's."""
    theta = [t.clone().requires_grad_(True) for t in theta]
    junk = torch.linspace(-3.0, -1.0, L, dtype=torch.float64)
    expected = 0
    for o in varied_completions():
        n = len(o)
        pad = L - n

        def padded(logps, filler):
            return torch.cat([logps, filler[:pad]])[None]  # [1, L]

        logp = padded(token_logps(theta, o), theta[0][1:2].expand(L) * 0.7)  # junk with a gradient
        with torch.no_grad():
            old_logp, ref_logp = (padded(token_logps(p, o), junk) for p in (old or theta, ref))
        mask = torch.tensor([[1.0] * n + [0.0] * pad])
        loss, _ = grpo_loss(
            logp,
            old_logp,
            ref_logp,
            torch.zeros(1, dtype=torch.float64),
            mask,
            beta=1.0,
            epsilon_low=0.99,
            epsilon_high=1e9,  # no clip: the KL term alone
            loss_type=loss_type,
            max_completion_length=L,
            kl_estimator=kind,
            num_sequences=B,
            num_tokens=N,
        )
        expected = expected + token_logps(old or theta, o).sum().exp().detach() * loss
    gradient = torch.autograd.grad(expected, theta)
    return torch.cat([g.flatten() for g in gradient]) * B  # β weighs 1/B of each completion's KL


def whole_kl_gradient(theta, ref) -> torch.Tensor:
    """Autograd of KL(π_θ || π_ref) = Σ_o π_θ(o) log(π_θ(o) / π_ref(o)) over every completion."""
    theta = [t.clone().requires_grad_(True) for t in theta]
    kl = 0
    for o in varied_completions():
        logp, ref_logp = token_logps(theta, o).sum(), token_logps(ref, o).sum()
        kl = kl + logp.exp() * (logp - ref_logp)
    return torch.cat([g.flatten() for g in torch.autograd.grad(kl, theta)])


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize(
    "kind, off_policy", [("k1_to_go", False), ("k1_is", False), ("k1_is", True)]
)
def test_the_whole_completions_kl_is_exact_for_every_loss_type_and_k1_is_off_policy(
    kind, off_policy, loss_type
):
    """Exact enumeration (float64) of every completion of up to 3 tokens, lengths 1 to 3, junk in
    the padding: the expected gradient of the KL term is ∇KL(π_θ || π_ref) of whole completions,
    β weighing each completion's KL (not each token's: grpo no longer divides it by |o_i|), for
    every loss type; with samples of π_old ≠ π_θ, k1_is's importance weights over prefixes keep it
    exact."""
    generator = torch.Generator().manual_seed(0)
    theta, ref, old = (table_policy(generator) for _ in range(3))
    got = expected_whole_kl_gradient(kind, loss_type, theta, ref, old if off_policy else None)
    torch.testing.assert_close(got, whole_kl_gradient(theta, ref), atol=1e-10, rtol=0)


def test_off_policy_k1_to_go_is_not_exact_for_whole_completions_of_varied_length():
    generator = torch.Generator().manual_seed(1)
    theta, ref, old = (table_policy(generator) for _ in range(3))
    truth = whole_kl_gradient(theta, ref)
    got = expected_whole_kl_gradient("k1_to_go", "dapo", theta, ref, old)
    assert (got - truth).norm() > 0.05 * truth.norm()
