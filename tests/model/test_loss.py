"""The hand-written cross-entropy: the same value and gradient as F.cross_entropy over fp32 logits, across shapes,
chunk boundaries, ignored targets, reductions and bf16 logits; the logits untouched, and retain_graph works."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from slmkit.model import loss as loss_mod
from slmkit.model.loss import cross_entropy


def both(z0: torch.Tensor, y: torch.Tensor, reduction: str = "mean"):
    a, b = z0.clone().requires_grad_(), z0.clone().requires_grad_()
    ref = F.cross_entropy(a.float().reshape(-1, a.size(-1)), y.reshape(-1), ignore_index=-1, reduction=reduction)
    ours = cross_entropy(b, y, reduction=reduction)
    ref.backward()
    ours.backward()
    return ref, ours, a.grad, b.grad


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), v=st.integers(2, 300), chunk=st.sampled_from([1, 7, 256, 1 << 18]),
       ignored=st.floats(0, 0.9), reduction=st.sampled_from(["mean", "sum"]), seed=st.integers(0, 2**16))
def test_value_and_gradient_match_torch(n, v, chunk, ignored, reduction, seed):
    g = torch.Generator().manual_seed(seed)
    z = 4 * torch.randn(n, v, generator=g, dtype=torch.float64).float()
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignored] = -1
    y[0] = 0  # at least one target counts
    old = loss_mod._CHUNK_VALUES
    loss_mod._CHUNK_VALUES = chunk * v  # `chunk` rows per chunk, so chunk edges fall inside the batch
    try:
        ref, ours, ga, gb = both(z, y, reduction)
    finally:
        loss_mod._CHUNK_VALUES = old
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    per_row = 1.0 if reduction == "sum" else 1.0 / int((y != -1).sum())  # each row's gradient sums to 0 at this scale
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6 * per_row)
    assert torch.all(gb[y == -1] == 0)


def test_batched_logits_and_bf16():
    g = torch.Generator().manual_seed(1)
    z = (3 * torch.randn(2, 5, 1000, generator=g)).bfloat16()
    y = torch.randint(0, 1000, (2, 5), generator=g)
    y[1, 3] = -1
    ref, ours, ga, gb = both(z, y)
    assert gb.dtype == torch.bfloat16 and gb.shape == z.shape
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb, ga)  # the same fp32 gradient, rounded once to bf16


def test_the_logits_are_left_as_they_were():
    z = torch.randn(4, 10, requires_grad=True)
    before = z.detach().clone()
    cross_entropy(z, torch.tensor([1, 2, 3, 4])).backward()
    assert torch.equal(z.detach(), before)


def test_a_second_backward_adds_the_same_gradient_again():
    z = torch.randn(4, 10, requires_grad=True)
    loss = cross_entropy(z, torch.tensor([1, 2, 3, 4]))
    loss.backward(retain_graph=True)
    first = z.grad.clone()
    loss.backward()
    torch.testing.assert_close(z.grad, 2 * first)  # nothing saved is spent: a second backward adds the same again


def test_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), reduction="none")
