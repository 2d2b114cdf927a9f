"""sketch_histogram_update_: the fused count sketch + histogram against
reference.sketch_histogram_update_ (exact counts), bad input, opcheck."""
import pytest
import torch

from selfheal_ext import ops, reference
from selfheal_ext.taps import random_projection, sketch_plan
from conftest import DEVICES, DTYPES


def tables(features, bins, device):
    return (torch.zeros(features, bins + 2, dtype=torch.long, device=device),
            torch.zeros(features, dtype=torch.long, device=device))


def run_both(x, bucket, weight, lo, hi, bins):
    features = lo.shape[0]
    fused, eager = tables(features, bins, x.device), tables(features, bins, "cpu")
    ops.sketch_histogram_update_(*fused, x, bucket, weight, lo, hi)
    reference.sketch_histogram_update_(*eager, x.cpu(), bucket.cpu(), weight.cpu(), lo.cpu(), hi.cpu())
    return [t.cpu() for t in fused], eager


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width,features", [(1, 1, 1), (257, 1000, 64), (33, 97, 7), (4000, 130, 16)])
def test_sketch_histogram_matches_reference_exactly(device, dtype, rows, width, features):
    gen = torch.Generator().manual_seed(rows + width)
    x = (torch.randn(rows, width, generator=gen) * 2).to(dtype).to(device)
    bucket = torch.randint(0, features, (width,), generator=gen)
    weight = torch.randn(width, generator=gen)
    values = reference.sketch(x.cpu(), bucket, weight, features)
    lo = values.quantile(0.05, dim=0) if rows > 1 else values[0] - 1
    hi = values.quantile(0.95, dim=0) if rows > 1 else values[0] + 1
    bins = 9
    (counts, bad), (counts_ref, bad_ref) = run_both(x, bucket.to(device), weight.to(device), lo.to(device),
                                                   hi.to(device), bins)
    assert torch.equal(counts, counts_ref) and torch.equal(bad, bad_ref)
    assert counts.sum() == rows * features


def test_sketch_equals_the_dense_projection_then_histogram():
    # The monitor's count sketch: binning sketch(x) equals binning x @ projection.
    projection = random_projection(300, 32, seed=5)
    bucket, sign, dim = sketch_plan(projection)
    x = torch.randn(500, 300, dtype=torch.float64).float()
    dense = (x.double() @ projection.double()).float()
    assert torch.equal(reference.sketch(x, bucket, sign, dim), dense)
    lo, hi = dense.min(dim=0).values, dense.max(dim=0).values
    fused, expected = tables(dim, 12, "cpu"), tables(dim, 12, "cpu")
    ops.sketch_histogram_update_(*fused, x, bucket, sign, lo, hi)
    ops.histogram_update_(*expected, dense, lo, hi)
    assert torch.equal(fused[0], expected[0])


@pytest.mark.parametrize("device", DEVICES)
def test_sketch_histogram_nonfinite_and_strided(device):
    x = torch.randn(20, 12, device=device)
    x[3, 5] = float("nan")
    x[7, 0] = float("inf")
    x[7, 1] = float("-inf")  # inf - inf in one bucket: NaN, still one non-finite value
    bucket = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2], device=device)
    weight = torch.ones(12, device=device)
    lo, hi = torch.full((3,), -3.0, device=device), torch.full((3,), 3.0, device=device)
    strided = torch.randn(12, 20, device=device).t()  # non-contiguous x
    strided.copy_(x)
    for source in (x, strided):
        (counts, bad), (counts_ref, bad_ref) = run_both(source, bucket, weight, lo, hi, 5)
        assert torch.equal(counts, counts_ref) and torch.equal(bad, bad_ref)
        assert bad.tolist() == [1, 0, 1]  # row 7's bucket 0, row 3's bucket 2
        assert counts.sum() == 20 * 3 - 2


@pytest.mark.parametrize("device", DEVICES)
def test_sketch_histogram_empty_batch_and_empty_bucket(device):
    counts, bad = tables(4, 3, device)
    lo, hi = torch.zeros(4, device=device), torch.ones(4, device=device)
    ops.sketch_histogram_update_(counts, bad, torch.empty(0, 6, device=device),
                                 torch.zeros(6, dtype=torch.long, device=device), torch.ones(6, device=device), lo, hi)
    assert counts.sum() == 0
    # Buckets 1..3 receive no input: their value is 0, binned like any 0.
    ops.sketch_histogram_update_(counts, bad, torch.full((5, 6), 0.1, device=device),
                                 torch.zeros(6, dtype=torch.long, device=device), torch.ones(6, device=device), lo, hi)
    assert counts.cpu()[:, 1].tolist() == [0, 5, 5, 5] and counts.cpu()[0, 2].item() == 5  # 0.6 in [1/3, 2/3)


def test_sketch_histogram_bad_input_names_the_argument_and_writes_nothing():
    counts, bad = tables(4, 3, "cpu")
    x = torch.randn(10, 6)
    lo, hi = torch.zeros(4), torch.ones(4)
    good_bucket, good_weight = torch.zeros(6, dtype=torch.long), torch.ones(6)
    cases = [
        ("'bucket'", (x, torch.full((6,), 4, dtype=torch.long), good_weight, lo, hi)),
        ("'bucket'", (x, torch.full((6,), -1, dtype=torch.long), good_weight, lo, hi)),
        ("'bucket'", (x, torch.zeros(5, dtype=torch.long), good_weight, lo, hi)),
        ("'bucket'", (x, torch.zeros(6, dtype=torch.int32), good_weight, lo, hi)),
        ("'weight'", (x, good_bucket, torch.ones(6, dtype=torch.float64), lo, hi)),
        ("'x'", (x.long(), good_bucket, good_weight, lo, hi)),
        ("'lo'", (x, good_bucket, good_weight, torch.zeros(3), hi)),
    ]
    for function, error in ((torch.ops.selfheal.sketch_histogram_update_, RuntimeError),
                            (reference.sketch_histogram_update_, ValueError)):
        for name, args in cases:
            with pytest.raises(error, match=name):
                function(counts, bad, *args)
    assert counts.sum() == 0 and bad.sum() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_sketch_histogram_opcheck(device):
    counts, bad = tables(5, 6, device)
    x = torch.randn(33, 17, device=device)
    bucket = torch.randint(0, 5, (17,), device=device)
    torch.library.opcheck(
        torch.ops.selfheal.sketch_histogram_update_.default,
        (counts, bad, x, bucket, torch.randn(17, device=device), torch.full((5,), -1.0, device=device),
         torch.ones(5, device=device)),
    )
