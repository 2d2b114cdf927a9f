import math

import pytest
import torch

from selfheal_ext import ops, reference
from conftest import DEVICES

DIVERGENCES = [
    pytest.param(ops.kl_divergence, reference.kl_divergence, id="kl"),
    pytest.param(ops.js_divergence, reference.js_divergence, id="js"),
]


def random_counts(features, bins, seed, dtype=torch.long, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 50, (features, bins), generator=gen)
    counts[0] = 0               # an empty row
    counts[1, : bins // 2] = 0  # half-empty row
    return counts.to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused,eager", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.long, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("pseudo_count", [0.5, 1e-3, 2.0])
def test_divergence_matches_reference(device, fused, eager, dtype, pseudo_count):
    p = random_counts(9, 34, 0, dtype, device)
    q = random_counts(9, 34, 1, dtype, device)
    result = fused(p, q, pseudo_count)
    assert result.dtype == torch.float32 and result.shape == (9,)
    torch.testing.assert_close(result, eager(p, q, pseudo_count), rtol=1e-5, atol=1e-7)
    assert torch.isfinite(result).all() and (result >= 0).all()
    assert torch.equal(fused(p, p, pseudo_count), torch.zeros(9, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_divergence_known_values(device):
    p = torch.tensor([[3, 1]], device=device)
    q = torch.tensor([[1, 3]], device=device)
    # with +1/2: P = (0.7, 0.3), Q = (0.3, 0.7)
    kl = 0.4 * math.log(7 / 3)
    assert ops.kl_divergence(p, q).item() == pytest.approx(kl, rel=1e-6)
    m = 0.5
    js = 0.5 * (0.7 * math.log(0.7 / m) + 0.3 * math.log(0.3 / m)) * 2
    assert ops.js_divergence(p, q).item() == pytest.approx(js, rel=1e-6)
    # disjoint supports without smoothing: JS reaches ln 2, never inf or NaN
    disjoint = ops.js_divergence(torch.tensor([[5, 0]], device=device),
                                 torch.tensor([[0, 5]], device=device), 0.0)
    assert disjoint.item() == pytest.approx(math.log(2), rel=1e-6)
    empty = torch.zeros(1, 2, dtype=torch.long, device=device)
    assert ops.js_divergence(empty, p, 0.0).item() == 0.0


def test_divergence_bad_arguments():
    p = torch.zeros(3, 5, dtype=torch.long)
    with pytest.raises(RuntimeError, match="'pseudo_count'"):
        torch.ops.selfheal.kl_divergence(p, p, 0.0)
    with pytest.raises(RuntimeError, match="'pseudo_count'"):
        torch.ops.selfheal.js_divergence(p, p, -1.0)
    with pytest.raises(RuntimeError, match="'q_counts'"):
        torch.ops.selfheal.kl_divergence(p, torch.zeros(3, 4, dtype=torch.long), 0.5)
    with pytest.raises(RuntimeError, match="'q_counts'"):
        torch.ops.selfheal.kl_divergence(p, p.float(), 0.5)
    with pytest.raises(RuntimeError, match="'p_counts'"):
        torch.ops.selfheal.kl_divergence(torch.zeros(5, dtype=torch.long), p, 0.5)
    with pytest.raises(RuntimeError, match="'p_counts'"):
        torch.ops.selfheal.js_divergence(p.to(torch.int32), p.to(torch.int32), 0.5)
    with pytest.raises(RuntimeError, match="non-negative"):
        torch.ops.selfheal.kl_divergence(p - 1, p, 0.5)
    with pytest.raises(RuntimeError, match="finite"):
        torch.ops.selfheal.js_divergence(torch.full((3, 5), float("nan")), torch.zeros(3, 5), 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["kl_divergence", "js_divergence"])
def test_divergence_opcheck(device, name):
    p = random_counts(6, 10, 0, device=device)
    q = random_counts(6, 10, 1, device=device)
    torch.library.opcheck(getattr(torch.ops.selfheal, name).default, (p, q, 0.5))


def test_divergence_extreme_tables_stay_finite():
    p = torch.tensor([[1e9, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 1e9]], dtype=torch.float64)
    assert torch.isfinite(ops.kl_divergence(p, q, 1e-300)).all()
    assert torch.isfinite(ops.js_divergence(p, q, 0.0)).all()


def test_reference_kl_refuses_zero_pseudo_count():
    p = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="'pseudo_count'"):
        reference.kl_divergence(p, p, 0.0)
