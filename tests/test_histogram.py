import pytest
import torch

from selfheal_ext import ops, reference
from conftest import DEVICES, DTYPES, HAS_CUDA


def empty_tables(features, bins, device):
    return (torch.zeros(features, bins + 2, dtype=torch.long, device=device),
            torch.zeros(features, dtype=torch.long, device=device))


def both(x, lo, hi, bins):
    fused = empty_tables(x.shape[1], bins, x.device)
    eager = empty_tables(x.shape[1], bins, x.device)
    ops.histogram_update_(*fused, x, lo, hi)
    reference.histogram_update_(*eager, x, lo, hi)
    return fused, eager


@pytest.mark.parametrize("device", DEVICES)
def test_histogram_known_counts(device):
    values = [-0.1, 0.0, 0.25, 0.5, 0.75, 0.999, 1.0, 7.0,
              float("nan"), float("inf"), float("-inf")]
    x = torch.tensor(values, device=device).unsqueeze(1)
    counts, nonfinite = empty_tables(1, 4, device)
    ops.histogram_update_(counts, nonfinite, x, torch.zeros(1, device=device),
                          torch.ones(1, device=device))
    # underflow | [0, .25) | [.25, .5) | [.5, .75) | [.75, 1) | overflow
    assert counts.tolist() == [[1, 1, 1, 1, 2, 2]]
    assert nonfinite.tolist() == [3]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_histogram_matches_reference_exactly(device, dtype):
    gen = torch.Generator().manual_seed(0)
    features, bins = 37, 8
    lo = torch.linspace(-2, 1, features)
    hi = lo + torch.linspace(0.5, 4, features)
    x = (torch.randn(1001, features, generator=gen) * 2).to(dtype)
    # values exactly on every edge, at lo and at hi, and non-finite values
    edges = lo[None, :] + (hi - lo)[None, :] * torch.arange(bins + 1)[:, None] / bins
    x = torch.cat([x, edges.to(dtype), lo[None].to(dtype), hi[None].to(dtype)])
    x[5, 3], x[6, 4], x[7, 5] = float("nan"), float("inf"), float("-inf")
    x, lo, hi = x.to(device), lo.to(device), hi.to(device)
    (counts, nonfinite), (counts_ref, nonfinite_ref) = both(x, lo, hi, bins)
    assert torch.equal(counts, counts_ref)
    assert torch.equal(nonfinite, nonfinite_ref)
    assert counts.sum().item() + nonfinite.sum().item() == x.numel()


@pytest.mark.parametrize("device", DEVICES)
def test_histogram_values_on_edges_land_in_the_upper_bin(device):
    lo = torch.tensor([-2.0, 0.0, 10.0], device=device)
    hi = torch.tensor([2.0, 1.0, 26.0], device=device)
    bins = 8
    k = torch.arange(bins + 1, device=device, dtype=torch.float32)
    x = lo + (hi - lo) * k[:, None] / bins  # exact in fp32 for these edges
    counts, nonfinite = empty_tables(3, bins, device)
    ops.histogram_update_(counts, nonfinite, x, lo, hi)
    # edge k opens regular bin k (column k + 1); the last edge is hi: overflow
    assert counts.tolist() == [[0] + [1] * bins + [1]] * 3
    assert nonfinite.tolist() == [0, 0, 0]


@pytest.mark.parametrize("device", DEVICES)
def test_histogram_accumulates_and_is_order_independent(device):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(500, 3, generator=gen).to(device)
    lo, hi = torch.full((3,), -1.0, device=device), torch.full((3,), 1.0, device=device)
    whole = empty_tables(3, 5, device)
    ops.histogram_update_(*whole, x, lo, hi)
    pieces = empty_tables(3, 5, device)
    shuffled = x[torch.randperm(500, generator=gen).to(device)]
    for chunk in (shuffled[:1], shuffled[1:200], shuffled[200:200], shuffled[200:]):
        ops.histogram_update_(*pieces, chunk, lo, hi)  # batch of one and empty batch included
    assert torch.equal(whole[0], pieces[0]) and torch.equal(whole[1], pieces[1])


@pytest.mark.parametrize("device", DEVICES)
def test_histogram_non_contiguous_input(device):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 300, generator=gen).to(device).t()  # [300, 6], strided
    lo, hi = torch.full((6,), -1.5, device=device), torch.full((6,), 1.5, device=device)
    (counts, nonfinite), (counts_ref, nonfinite_ref) = both(x, lo, hi, 12)
    assert torch.equal(counts, counts_ref) and torch.equal(nonfinite, nonfinite_ref)


@pytest.mark.parametrize(
    "change,argument",
    [
        (dict(counts=torch.zeros(4, 7, dtype=torch.int32)), "counts"),
        (dict(counts=torch.zeros(3, 7, dtype=torch.long)), "counts"),
        (dict(counts=torch.zeros(4, 2, dtype=torch.long)), "counts"),
        (dict(nonfinite=torch.zeros(4)), "nonfinite"),
        (dict(nonfinite=torch.zeros(5, dtype=torch.long)), "nonfinite"),
        (dict(lo=torch.zeros(3)), "lo"),
        (dict(hi=torch.zeros(4, dtype=torch.float64)), "hi"),
        (dict(x=torch.zeros(10)), "x"),
        (dict(x=torch.zeros(10, 4, dtype=torch.long)), "x"),
    ],
)
def test_histogram_bad_arguments_name_the_argument(change, argument):
    args = dict(counts=torch.zeros(4, 7, dtype=torch.long), nonfinite=torch.zeros(4, dtype=torch.long),
                x=torch.randn(10, 4), lo=torch.zeros(4), hi=torch.ones(4))
    args.update(change)
    before = args["counts"].clone()
    with pytest.raises(RuntimeError, match=f"'{argument}'"):
        torch.ops.selfheal.histogram_update_(**args)
    assert torch.equal(args["counts"], before)  # nothing written on error


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_histogram_cuda_rejects_mixed_devices():
    counts, nonfinite = empty_tables(4, 5, "cuda")
    with pytest.raises(RuntimeError, match="'lo'"):
        torch.ops.selfheal.histogram_update_(counts, nonfinite, torch.randn(10, 4, device="cuda"),
                                             torch.zeros(4), torch.ones(4, device="cuda"))


@pytest.mark.parametrize("device", DEVICES)
def test_histogram_opcheck(device):
    counts, nonfinite = empty_tables(5, 6, device)
    x = torch.randn(33, 5, device=device)
    torch.library.opcheck(
        torch.ops.selfheal.histogram_update_.default,
        (counts, nonfinite, x, torch.full((5,), -1.0, device=device), torch.ones(5, device=device)),
    )


def test_histogram_many_features_few_rows():
    x = torch.randn(3, 5000)
    lo, hi = torch.full((5000,), -1.0), torch.full((5000,), 1.0)
    (counts, nonfinite), (counts_ref, nonfinite_ref) = both(x, lo, hi, 255)
    assert torch.equal(counts, counts_ref) and counts.sum() == x.numel()


def test_reference_fallback_checks_before_writing():
    counts = torch.zeros(4, 7, dtype=torch.long)
    with pytest.raises(ValueError, match="'nonfinite'"):
        reference.histogram_update_(counts, torch.zeros(3, dtype=torch.long), torch.randn(10, 4),
                                    torch.zeros(4), torch.ones(4))
    assert counts.sum() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_histogram_degenerate_edges_match_reference(device):
    # Infinite, NaN and zero-width ranges: the kernels follow the reference's
    # float64 rule (NaN positions land in bin 1, values >= hi overflow).
    x = torch.tensor([[-5.0, 0.0, 1.0, 3.0], [0.5, 0.5, 0.5, 0.5], [1e30, -1e30, 2.0, 1.0]], device=device).t()
    x = x.contiguous()
    lo = torch.tensor([float("-inf"), float("nan"), 1.0], device=device)
    hi = torch.tensor([0.0, 1.0, 1.0], device=device)
    counts = torch.zeros(3, 6, dtype=torch.long, device=device)
    bad = torch.zeros(3, dtype=torch.long, device=device)
    ops.histogram_update_(counts, bad, x, lo, hi)
    expected_counts = torch.zeros(3, 6, dtype=torch.long)
    expected_bad = torch.zeros(3, dtype=torch.long)
    reference.histogram_update_(expected_counts, expected_bad, x.cpu(), lo.cpu(), hi.cpu())
    assert torch.equal(counts.cpu(), expected_counts)
    assert torch.equal(bad.cpu(), expected_bad)


@pytest.mark.parametrize("device", DEVICES)
def test_histogram_values_one_ulp_either_side_of_every_edge_match_reference(device):
    # the vectorised CPU bin rule takes the floor through an int32 round trip;
    # a value just below an edge must stay in the lower bin, as in the reference
    gen = torch.Generator().manual_seed(3)
    features, bins = 29, 16
    lo = torch.randn(features, generator=gen)
    hi = lo + torch.rand(features, generator=gen) * 3 + 0.01
    edges = lo[None, :] + (hi - lo)[None, :] * torch.arange(bins + 1)[:, None] / bins
    x = torch.cat([torch.nextafter(edges, torch.tensor(-float("inf"))), edges,
                   torch.nextafter(edges, torch.tensor(float("inf")))])
    (counts, nonfinite), (counts_ref, nonfinite_ref) = both(x.to(device), lo.to(device), hi.to(device), bins)
    assert torch.equal(counts, counts_ref) and torch.equal(nonfinite, nonfinite_ref)
