"""The fused ops' behaviour at the edges of float arithmetic, decided case by
case to match selfheal_ext/reference.py (docs/ops/*.md, "Non-finite values")."""
import math

import pytest
import torch

from selfheal_ext import ops, reference

INF, NAN = float("inf"), float("nan")


def same_values(fused, eager):
    """Equal NaN/±inf patterns, and close finite values."""
    assert torch.equal(fused.isnan(), eager.isnan()), (fused, eager)
    assert torch.equal(fused.isposinf(), eager.isposinf()) and torch.equal(fused.isneginf(), eager.isneginf())
    finite = torch.isfinite(eager)
    torch.testing.assert_close(fused[finite], eager[finite], rtol=1e-5, atol=1e-30)


def adapter_case(activation, values, dtype=torch.float32):
    """One value per row, one feature, one hidden unit (unit projections,
    base 0): output row i is the activation of values[i]."""
    x = torch.tensor(values, dtype=dtype).reshape(-1, 1)
    eye = torch.ones(1, 1, dtype=dtype)
    base = torch.zeros_like(x)
    return (ops.adapter(x, eye, eye, base=base, activation=activation),
            reference.adapter(x, eye, eye, base=base, activation=activation))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_relu_propagates_nan_and_a_nan_feature_poisons_its_row(dtype):
    fused, eager = adapter_case("relu", [NAN, 1.0, -1.0, INF, -INF], dtype)
    same_values(fused, eager)
    assert fused[0, 0].isnan() and fused[3, 0] == INF and fused[4, 0] == 0
    x = torch.tensor([[NAN, 1.0, 2.0], [1.0, 2.0, 3.0]], dtype=dtype)
    down, up = torch.ones(2, 3, dtype=dtype), torch.ones(3, 2, dtype=dtype)
    y = ops.adapter(x, down, up, activation="relu")
    assert y[0].isnan().all() and torch.isfinite(y[1]).all()  # as the formula: the row, not just a column


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_silu_saturates_to_zero_and_is_nan_at_minus_infinity(dtype):
    values = [-1e37, -3e38, -1e30, -100.0, -88.0, -87.5, -20.0, 0.0, 20.0, 1e30, INF, -INF, NAN]
    fused, eager = adapter_case("silu", values, dtype)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-30, equal_nan=True)
    assert fused[0, 0] == 0 and fused[1, 0] == 0 and fused[10, 0] == INF
    assert fused[11, 0].isnan() and fused[12, 0].isnan()


def test_gelu_and_identity_edges_match_the_reference():
    values = [-1e37, -INF, INF, NAN, -10.0, 0.0, 3e38]
    for activation in ("gelu", "identity"):
        fused, eager = adapter_case(activation, values)
        same_values(fused, eager)


@pytest.mark.parametrize("classes", [3, 9, 300, 600])
@pytest.mark.parametrize("big", [1e38, 3.4e38])
def test_softmax_entropy_of_tied_huge_maxima_is_ln2(classes, big):
    logits = torch.full((2, classes), -3.4e38)
    logits[:, classes // 2] = big   # the second maximum may be in a later block than the first
    logits[:, classes - 1] = big
    logits[1, 0] = 0.0
    entropy, max_prob = ops.softmax_entropy(logits)
    ref_entropy, ref_max = reference.softmax_entropy(logits)
    torch.testing.assert_close(entropy, ref_entropy)
    torch.testing.assert_close(entropy, torch.full((2,), math.log(2)))
    torch.testing.assert_close(max_prob, ref_max)


def test_softmax_entropy_nonfinite_rows_match_the_reference():
    logits = torch.tensor([[NAN, 0.0, 1.0], [INF, 0.0, 1.0], [-INF, -INF, -INF], [-INF, 0.0, 0.0]])
    for fused, eager in zip(ops.softmax_entropy(logits), reference.softmax_entropy(logits)):
        same_values(fused, eager)


DIVERGENCES = [(ops.kl_divergence, reference.kl_divergence), (ops.js_divergence, reference.js_divergence)]


@pytest.mark.parametrize("fused, eager", DIVERGENCES, ids=["kl", "js"])
def test_divergence_refuses_counts_whose_total_overflows(fused, eager):
    p = torch.tensor([[1e308, 1e308, 0.0]], dtype=torch.float64)
    q = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    for op in (fused, eager):
        with pytest.raises((RuntimeError, ValueError), match="p_counts.*finite float64"):
            op(p, q)


@pytest.mark.parametrize("fused, eager", DIVERGENCES, ids=["kl", "js"])
def test_divergence_refuses_a_pseudo_count_whose_total_overflows(fused, eager):
    p = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    for op in (fused, eager):
        with pytest.raises((RuntimeError, ValueError), match="'pseudo_count' must be small enough"):
            op(p, p, 1e308)


@pytest.mark.parametrize("fused, eager", DIVERGENCES, ids=["kl", "js"])
@pytest.mark.parametrize("p_row, q_row, pseudo_count", [
    ([1.0, 2.0, 0.0], [1.0, 2.0, 3.0], 5e-324),            # denormal pseudo-count
    ([5e-324, 0.0, 0.0], [1.0, 2.0, 3.0], 5e-324),         # denormal counts
    ([1e-310, 3e-310, 0.0], [2e-310, 1e-310, 5e-311], 1e-320),
    ([0.0, 0.0, 0.0], [1e300, 0.0, 0.0], 5e-324),          # q's probability underflows to 0
    ([1e307, 1e307, 1e307], [1.0, 0.0, 0.0], 0.5),
])
def test_divergence_is_finite_for_extreme_accepted_inputs(fused, eager, p_row, q_row, pseudo_count):
    p = torch.tensor([p_row], dtype=torch.float64)
    q = torch.tensor([q_row], dtype=torch.float64)
    result, expected = fused(p, q, pseudo_count), eager(p, q, pseudo_count)
    assert torch.isfinite(result).all() and (result >= 0).all(), result
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)


def test_histogram_update_refuses_an_inference_tensor_outside_inference_mode():
    with torch.inference_mode():
        counts = torch.zeros(1, 4, dtype=torch.long)
        nonfinite = torch.zeros(1, dtype=torch.long)
    x, lo, hi = torch.zeros(3, 1), torch.zeros(1), torch.ones(1)
    with torch.inference_mode():
        other = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="inference tensor"):  # what plain torch does
        other.add_(1)
    for op in (ops.histogram_update_, reference.histogram_update_):
        with pytest.raises(RuntimeError, match="inference tensor"):
            op(counts, nonfinite, x, lo, hi)
    assert counts.sum() == 0
    with torch.inference_mode():  # inside inference mode it is allowed, as in torch
        ops.histogram_update_(counts, nonfinite, x, lo, hi)
    assert counts.sum() == 3
