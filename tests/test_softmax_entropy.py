import math

import pytest
import torch

from selfheal_ext import ops, reference
from conftest import DEVICES, DTYPES, assert_no_worse_than_eager

SHAPES = [(1, 1), (1, 7), (5, 1000), (3, 31), (2, 4097), (4, 32000)]


def random_logits(shape, dtype, device, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_softmax_entropy_matches_reference(device, dtype, shape):
    z = random_logits(shape, dtype, device)
    entropy, max_prob = ops.softmax_entropy(z)
    assert entropy.dtype == max_prob.dtype == torch.float32
    assert entropy.shape == max_prob.shape == (shape[0],)
    eager = reference.softmax_entropy(z)
    oracle = reference.softmax_entropy(z.double())
    assert_no_worse_than_eager(entropy, eager[0], oracle[0], torch.float32, "entropy")
    assert_no_worse_than_eager(max_prob, eager[1], oracle[1], torch.float32, "max_prob")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (4, 2000)], ids=str)
def test_softmax_entropy_gradients(device, dtype, shape):
    z = random_logits(shape, dtype, device).requires_grad_()
    gen = torch.Generator().manual_seed(3)
    ge, gm = (torch.randn(shape[0], generator=gen).to(device) for _ in range(2))

    def grad_of(fn, logits):
        logits = logits.detach().requires_grad_()
        entropy, max_prob = fn(logits)
        return torch.autograd.grad((entropy * ge.to(entropy.dtype)).sum()
                                   + (max_prob * gm.to(max_prob.dtype)).sum(), logits)[0]

    fused = grad_of(ops.softmax_entropy, z)
    assert fused.dtype == dtype
    eager = grad_of(reference.softmax_entropy, z)
    oracle = grad_of(reference.softmax_entropy, z.double())
    assert_no_worse_than_eager(fused, eager, oracle, dtype, "grad_logits")


def test_softmax_entropy_gradcheck():
    z = random_logits((3, 9), torch.float32, "cpu").requires_grad_()

    def fn(logits):
        entropy, max_prob = ops.softmax_entropy(logits)
        return entropy + 0.5 * max_prob

    # fp32 op: gradcheck with tolerances suited to fp32 finite differences.
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-2, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_entropy_known_values_and_extremes(device):
    z = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],                        # uniform: ln 4, 1/4
            [1e4, -1e4, 0.0, 5e3],                       # huge logits: one-hot
            [0.0, float("-inf"), 0.0, float("-inf")],    # masked classes: ln 2, 1/2
            [1.0, float("nan"), 0.0, 0.0],               # NaN row: NaN
            [float("-inf")] * 4,                         # no finite logit: NaN
            [0.0, float("inf"), 1.0, 2.0],               # +inf: undefined, NaN
        ],
        device=device,
    )
    entropy, max_prob = ops.softmax_entropy(z)
    torch.testing.assert_close(entropy[:3].cpu(), torch.tensor([math.log(4), 0.0, math.log(2)]))
    torch.testing.assert_close(max_prob[:3].cpu(), torch.tensor([0.25, 1.0, 0.5]))
    assert torch.isnan(entropy[3:]).all() and torch.isnan(max_prob[3:]).all()
    one_class = ops.softmax_entropy(torch.randn(5, 1, device=device))
    assert torch.equal(one_class[0].cpu(), torch.zeros(5))
    assert torch.equal(one_class[1].cpu(), torch.ones(5))


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_entropy_non_contiguous_and_empty(device):
    z = random_logits((40, 6), torch.float32, device).t()  # [6, 40], column-major
    torch.testing.assert_close(ops.softmax_entropy(z), reference.softmax_entropy(z))
    entropy, max_prob = ops.softmax_entropy(torch.zeros(0, 10, device=device))
    assert entropy.shape == max_prob.shape == (0,)


def test_softmax_entropy_bad_arguments():
    with pytest.raises(RuntimeError, match="'logits'"):
        torch.ops.selfheal.softmax_entropy(torch.zeros(10))
    with pytest.raises(RuntimeError, match="'logits'"):
        torch.ops.selfheal.softmax_entropy(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="'logits'"):
        torch.ops.selfheal.softmax_entropy(torch.zeros(2, 0))


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_entropy_opcheck(device):
    z = random_logits((4, 37), torch.float32, device).requires_grad_()
    torch.library.opcheck(torch.ops.selfheal.softmax_entropy.default, (z,))
    entropy, _, lse = torch.ops.selfheal.softmax_entropy(z.detach())
    torch.library.opcheck(
        torch.ops.selfheal.softmax_entropy_backward.default,
        (torch.randn_like(entropy), torch.randn_like(entropy), z.detach(), entropy, lse),
    )


def test_softmax_entropy_max_prob_gradient_at_ties_goes_to_the_first_maximum():
    z = torch.zeros(2, 4, requires_grad=True)
    fused = torch.autograd.grad(ops.softmax_entropy(z)[1].sum(), z)[0]
    eager = torch.autograd.grad(reference.softmax_entropy(z)[1].sum(), z)[0]
    torch.testing.assert_close(fused, eager)
    assert fused[0, 0] > 0 and (fused[0, 1:] < 0).all()
