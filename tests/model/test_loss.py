"""The hand-written cross-entropy: the same value and gradient as F.cross_entropy over fp32 logits, across shapes,
chunk boundaries, ignored targets, reductions and bf16 logits; the logits untouched, and retain_graph works. The head
and loss together (linear_cross_entropy): F.cross_entropy over F.linear's logits, with the C kernel and without."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slmkit import kernels
from slmkit.model import loss as loss_mod
from slmkit.model.loss import cross_entropy, linear_cross_entropy


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


# --- the head and the loss together: linear_cross_entropy ----------------------------------------------------------


def linear_both(h0, w0, y, reduction="mean", train_w=True, dtype=None):
    """(reference loss, ours, (grad h, grad w) of each): F.cross_entropy over h @ wᵀ against linear_cross_entropy."""
    h1, h2 = h0.clone().requires_grad_(), h0.clone().requires_grad_()
    w1, w2 = w0.clone().requires_grad_(train_w), w0.clone().requires_grad_(train_w)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ref = F.cross_entropy(F.linear(h1, w1).float().reshape(-1, w0.shape[0]), y.reshape(-1), ignore_index=-1,
                              reduction=reduction)
        ours = linear_cross_entropy(h2, w2, y, reduction=reduction)
    ref.backward()
    ours.backward()
    return ref, ours, (h1.grad, w1.grad), (h2.grad, w2.grad)


@pytest.fixture(params=["kernels", "torch"])
def rows_impl(request, monkeypatch):
    """Both ways a chunk's rows are turned into losses and gradients: the C kernel, and PyTorch without it."""
    if request.param == "kernels":
        if not kernels.available():
            pytest.skip("no C compiler")
    else:
        monkeypatch.setattr(kernels, "available", lambda: False)
    return request.param


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # one impl
@given(n=st.integers(1, 30), c=st.integers(1, 24), v=st.integers(2, 200), rows=st.sampled_from([1, 4, 1000]),
       ignored=st.floats(0, 0.9), reduction=st.sampled_from(["mean", "sum"]), train_w=st.booleans(),
       seed=st.integers(0, 2**16))
def test_linear_value_and_gradients_match_torch(rows_impl, n, c, v, rows, ignored, reduction, train_w, seed):
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(n, c, generator=g), torch.randn(v, c, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignored] = -1
    y[0] = 0
    old = loss_mod._FUSED_VALUES
    loss_mod._FUSED_VALUES = rows * v  # `rows` rows per chunk: chunk edges inside the batch, or one chunk
    try:
        ref, ours, (gh1, gw1), (gh2, gw2) = linear_both(h, w, y, reduction, train_w)
    finally:
        loss_mod._FUSED_VALUES = old
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh2, gh1, rtol=1e-4, atol=1e-5)
    if train_w:
        torch.testing.assert_close(gw2, gw1, rtol=1e-4, atol=1e-5)
    else:
        assert gw1 is None and gw2 is None


def test_linear_under_bf16_autocast_is_as_close_as_autocasts_own_head(rows_impl):
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(2, 50, 64, generator=g), torch.randn(3000, 64, generator=g) / 8
    y = torch.randint(0, 3000, (2, 50), generator=g)
    y[0, :5] = -1
    exact = linear_both(h.double(), w.double(), y)  # fp64: the reference both are measured against
    auto = linear_both(h, w, y, dtype=torch.bfloat16)  # autocast's bf16 head + F.cross_entropy, and ours under it
    assert auto[3][0].dtype == torch.float32 and auto[3][1].dtype == torch.float32  # the inputs' dtypes come back
    for i, (ref, ours) in enumerate(zip(auto[2], auto[3], strict=True)):
        err_ref, err_ours = (ref.double() - exact[2][i]).abs().max(), (ours.double() - exact[2][i]).abs().max()
        assert err_ours <= 1.5 * err_ref + 1e-7, (i, float(err_ours), float(err_ref))
    ref, ours, exact_loss = auto[0].item(), auto[1].item(), exact[0].item()
    assert abs(ours - exact_loss) <= 1.5 * abs(ref - exact_loss) + 1e-4


def test_linear_without_grad_gives_the_loss_alone():
    g = torch.Generator().manual_seed(4)
    h, w, y = torch.randn(9, 8, generator=g), torch.randn(40, 8, generator=g), torch.randint(0, 40, (9,), generator=g)
    with torch.no_grad():
        ours = linear_cross_entropy(h, w, y)
    torch.testing.assert_close(ours, F.cross_entropy(h @ w.T, y))


def test_a_frozen_head_is_rounded_once_and_again_after_it_changes():
    w = torch.randn(30, 8)
    h, y = torch.randn(5, 8, requires_grad=True), torch.randint(0, 30, (5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_cross_entropy(h, w, y).backward()
        first = loss_mod._rounded[3]
        linear_cross_entropy(h, w, y).backward()
        assert loss_mod._rounded[3] is first  # kept
        with torch.no_grad():
            w.mul_(2)  # an in-place change (a merge, an optimizer step on a tied embedding) bumps its version
        linear_cross_entropy(h, w, y).backward()
    assert loss_mod._rounded[3] is not first and torch.equal(loss_mod._rounded[3], w.bfloat16())
