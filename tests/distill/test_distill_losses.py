"""The top-k KL estimators against the full-softmax KL: exact at k = V (values and gradients, any temperature), a lower
bound that grows with k below it, exact whenever the student's tail has the teacher's shape, and the τ² / mix
conventions of the training loss."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from slmkit.distill import distill_loss, topk_kl

V = 50


def full_kl(zt: torch.Tensor, zs: torch.Tensor, temperature: float = 1.0, reverse: bool = False) -> torch.Tensor:
    """The reference: KL over the whole vocabulary, per position, in float64."""
    lp, lq = (zt.double() / temperature).log_softmax(-1), (zs.double() / temperature).log_softmax(-1)
    if reverse:
        lp, lq = lq, lp
    return (lp.exp() * (lp - lq)).sum(-1)


def cache_rows(zt: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, ...]:
    """What the teacher cache stores for logits zt: top-k ids, their log-probs, log of the rest (as cache.py does)."""
    lp = (zt / temperature).log_softmax(-1)
    top, ids = lp.topk(k, dim=-1)
    rest = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), -1) if k < zt.size(-1) else \
        torch.full(zt.shape[:-1], float("-inf"))
    return ids.int(), top, rest


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return 3 * torch.randn(4, 6, V, generator=g), 3 * torch.randn(4, 6, V, generator=g)  # (B, T, V): peaked enough


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_exact_at_k_equal_to_the_vocabulary(logits, reverse, temperature):
    zt, zs = logits
    got = topk_kl(zs, *cache_rows(zt, V, temperature), temperature=temperature, reverse=reverse)
    assert_close(got.double(), full_kl(zt, zs, temperature, reverse), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_gradient_at_k_equal_to_the_vocabulary_is_the_full_kls(logits, reverse):
    zt, zs = logits
    a, b = zs.clone().requires_grad_(), zs.double().clone().requires_grad_()
    topk_kl(a, *cache_rows(zt, V, 2.0), temperature=2.0, reverse=reverse).sum().backward()
    full_kl(zt, b, 2.0, reverse).sum().backward()
    assert torch.isfinite(a.grad).all()
    assert_close(a.grad.double(), b.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("reverse", [False, True])
def test_below_v_a_lower_bound_that_grows_with_k(logits, reverse):
    zt, zs = logits
    full = full_kl(zt, zs, reverse=reverse)
    est = [topk_kl(zs, *cache_rows(zt, k), reverse=reverse).double() for k in (1, 4, 16, 32, 49, V)]
    for small, large in itertools.pairwise(est):
        assert (small <= large + 1e-5).all()  # a larger top-k refines the partition
    assert (est[0] >= -1e-6).all() and (est[-2] <= full + 1e-5).all()
    assert_close(est[-1], full, atol=2e-6, rtol=1e-5)
    assert (full - est[2]).mean() < (full - est[0]).mean()  # and closes in on it


def test_exact_when_the_students_tail_has_the_teachers_shape(logits):
    """The cache knows the teacher's tail mass, not its shape: a student whose tail is the teacher's up to a constant
    factor is scored exactly at any k."""
    zt, zs = logits
    k = 8
    ids, logp, rest = cache_rows(zt, k)
    student = (zt + 1.7).scatter(-1, ids.long(), zs.gather(-1, ids.long()))  # own top-k logits, teacher's tail + 1.7
    for reverse in (False, True):
        assert_close(topk_kl(student, ids, logp, rest, reverse=reverse).double(),
                     full_kl(zt, student, reverse=reverse), atol=2e-6, rtol=1e-5)


def test_zero_for_the_teacher_itself_and_finite_with_fp16_or_masked_logprobs(logits):
    zt, _ = logits
    ids, logp, rest = cache_rows(zt, 8)
    assert topk_kl(zt, ids, logp, rest).abs().max() < 1e-5
    logp16 = logp.half()
    logp16[..., -1] = float("-inf")  # a token the teacher masks
    z = zt.clone().requires_grad_()
    kl = topk_kl(z, ids, logp16, rest).sum() + topk_kl(z, ids, logp16, rest, reverse=True).sum()
    kl.backward()
    assert torch.isfinite(kl) and torch.isfinite(z.grad).all()


def test_loss_conventions_tau_squared_and_mix(logits):
    zt, zs = logits
    y = torch.randint(0, V, zs.shape[:-1], generator=torch.Generator().manual_seed(1))
    tau, k = 2.0, 16
    rows = cache_rows(zt, k, tau)
    fkl = topk_kl(zs, *rows, temperature=tau).mean()
    rkl = topk_kl(zs, *rows, temperature=tau, reverse=True).mean()
    ce = F.cross_entropy(zs.flatten(0, 1), y.flatten())
    assert_close(distill_loss(zs, y, *rows, loss="fkl", temperature=tau), tau**2 * fkl)
    assert_close(distill_loss(zs, y, *rows, loss="rkl", temperature=tau), tau**2 * rkl)
    assert_close(distill_loss(zs, y, *rows, loss="mix", temperature=tau, alpha=0.3), 0.3 * tau**2 * fkl + 0.7 * ce)
    assert_close(distill_loss(zs, y, *rows, loss="mix", alpha=0.0, temperature=tau), ce)  # alpha 0: hard labels only


@pytest.mark.parametrize(("loss", "alpha"), [("fkl", 1.0), ("mix", 0.3)])
@pytest.mark.parametrize("k", [16, V])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_written_out_backward_matches_autograd_through_topk_kl(logits, loss, alpha, k, temperature):
    zt, zs = logits
    y = torch.randint(0, V, zs.shape[:-1], generator=torch.Generator().manual_seed(1))
    rows = cache_rows(zt, k, temperature)
    a, b = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    got = distill_loss(a, y, *rows, loss=loss, temperature=temperature, alpha=alpha)
    want = topk_kl(b, *rows, temperature=temperature).mean() * temperature**2
    if loss == "mix":
        want = alpha * want + (1 - alpha) * F.cross_entropy(b.flatten(0, 1), y.flatten())
    (3.0 * got).backward()  # an upstream gradient other than 1 (grad_accum divides the loss)
    (3.0 * want).backward()
    assert_close(got, want)
    assert torch.isfinite(a.grad).all()
    assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-5)


def test_masked_teacher_tokens_keep_the_training_loss_finite(logits):
    zt, zs = logits
    ids, logp, rest = cache_rows(zt, 8)
    logp = logp.half()
    logp[..., -1] = float("-inf")
    z = zs.clone().requires_grad_()
    loss = distill_loss(z, torch.zeros(zs.shape[:-1], dtype=torch.long), ids, logp, rest, loss="mix")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("boost", [4.0, 12.0, 30.0])
def test_the_backward_stays_exact_when_the_students_tail_is_tiny(logits, boost):
    """A student confident in the teacher's top-k (tail mass from ~1e-2 down to ~1e-12 as the boost grows): half the
    rows take the tail by subtraction, the others by a sum over the tail itself; both must match autograd."""
    zt, zs = logits
    y = torch.randint(0, V, zs.shape[:-1], generator=torch.Generator().manual_seed(1))
    rows = cache_rows(zt, 8)
    zs = zs.scatter_add(-1, rows[0].long(), torch.full(rows[0].shape, boost))
    zs[:2] = logits[1][:2]  # rows with a sizeable tail beside the confident ones
    a, b = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    got = distill_loss(a, y, *rows, loss="mix", alpha=0.5)
    want = 0.5 * topk_kl(b, *rows).mean() + 0.5 * F.cross_entropy(b.flatten(0, 1), y.flatten())
    (3.0 * got).backward()
    (3.0 * want).backward()
    assert_close(got, want)
    assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-5)
