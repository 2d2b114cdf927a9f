"""Seeded fuzzing of every op against selfheal_ext/reference.py: random
shapes, dtypes, strides (non-contiguous views) and non-finite values.

The default run is a few hundred cases (seconds); SELFHEAL_FUZZ_LONG=1 runs
the long version (SELFHEAL_FUZZ_CASES cases per op, default 3000)."""
import os

import pytest
import torch

from selfheal_ext import ops, reference
from conftest import ERROR_FLOOR

LONG = os.environ.get("SELFHEAL_FUZZ_LONG") == "1"
LONG_CASES = int(os.environ.get("SELFHEAL_FUZZ_CASES", "3000"))
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPECIALS = [float("nan"), float("inf"), float("-inf")]


def strided(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``t`` itself, or an equal non-contiguous view (every other column of a
    wider tensor)."""
    if t.dim() < 2 or torch.rand((), generator=gen) < 0.5:
        return t
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous() or t.shape[-1] == 1
    return view


def poison(t: torch.Tensor, gen: torch.Generator, rate: float, extremes=()) -> torch.Tensor:
    """Puts NaN/±inf (and values from ``extremes``) at random places."""
    values = SPECIALS + list(extremes)
    mask = torch.rand(t.shape, generator=gen) < rate
    picks = torch.randint(0, len(values), t.shape, generator=gen)
    choice = torch.tensor(values, dtype=torch.float64)[picks].to(t.dtype)
    return torch.where(mask, choice, t)


def same_nonfinite(fused, eager, what):
    for test in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(test(fused), test(eager)), f"{what}: {test.__name__} pattern differs"


def check_adapter(gen, case):
    dtype = [torch.float32, torch.float16, torch.bfloat16, torch.float64][case % 4]
    activation = reference.ACTIVATIONS[int(torch.randint(0, 4, (), generator=gen))]
    rows, channels = int(torch.randint(1, 40, (), generator=gen)), int(torch.randint(1, 70, (), generator=gen))
    rank = int(torch.randint(1, 9, (), generator=gen))
    x = torch.randn(rows, channels, generator=gen, dtype=torch.float64)
    if case % 3 == 0:
        x = poison(x, gen, 0.02)
    down = torch.randn(rank, channels, generator=gen, dtype=torch.float64) / channels ** 0.5
    up = torch.randn(channels, rank, generator=gen, dtype=torch.float64) / rank ** 0.5
    bias = torch.randn(rank, generator=gen, dtype=torch.float64)
    args = [strided(t.to(dtype), gen) for t in (x, down, up)]
    fused = ops.adapter(args[0], args[1], args[2], bias.to(dtype), activation=activation)
    eager = reference.adapter(args[0], args[1], args[2], bias.to(dtype), activation=activation)
    oracle = reference.adapter(*(a.double() for a in args), bias.to(dtype).double(), activation=activation)
    what = f"adapter {dtype} {activation} {tuple(x.shape)} r={rank}"
    same_nonfinite(fused.double(), oracle, what)
    finite = torch.isfinite(oracle)
    error = (fused.double() - oracle)[finite].abs().max().item() if finite.any() else 0.0
    eager_error = (eager.double() - oracle)[finite].abs().max().item() if finite.any() else 0.0
    scale = oracle[finite].abs().max().item() if finite.any() else 1.0
    assert error <= 2 * eager_error + ERROR_FLOOR[dtype] * max(scale, 1.0), (what, error, eager_error)


def check_softmax_entropy(gen, case):
    dtype = FLOAT_DTYPES[case % 3]
    rows, classes = int(torch.randint(1, 20, (), generator=gen)), int(torch.randint(1, 700, (), generator=gen))
    logits = torch.randn(rows, classes, generator=gen, dtype=torch.float64) * float(torch.rand((), generator=gen) * 30)
    if case % 2 == 0:
        biggest = torch.finfo(dtype).max
        logits = poison(logits, gen, 0.01, extremes=(biggest, -biggest, biggest / 2))
    z = strided(logits.to(dtype), gen)
    what = f"softmax_entropy {dtype} {tuple(z.shape)}"
    for fused, eager in zip(ops.softmax_entropy(z), reference.softmax_entropy(z)):
        same_nonfinite(fused, eager, what)
        finite = torch.isfinite(eager)
        torch.testing.assert_close(fused[finite], eager[finite], rtol=1e-4, atol=1e-4, msg=what)


def check_histogram(gen, case):
    dtype = FLOAT_DTYPES[case % 3]
    rows, features = int(torch.randint(0, 50, (), generator=gen)), int(torch.randint(1, 20, (), generator=gen))
    bins = int(torch.randint(1, 40, (), generator=gen))
    x = poison(torch.randn(rows, features, generator=gen, dtype=torch.float64) * 2, gen, 0.05)
    x = strided(x.to(dtype), gen)
    lo = torch.randn(features, generator=gen) - 1
    hi = lo + torch.rand(features, generator=gen) * 3 + 1e-3
    results = []
    for op in (ops.histogram_update_, reference.histogram_update_):
        counts = torch.zeros(features, bins + 2, dtype=torch.long)
        nonfinite = torch.zeros(features, dtype=torch.long)
        op(counts, nonfinite, x, lo, hi)
        results.append((counts, nonfinite))
    what = f"histogram_update_ {dtype} {tuple(x.shape)} bins={bins}"
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1]), what


def check_divergence(gen, case):
    dtype = [torch.long, torch.float32, torch.float64][case % 3]
    features, bins = int(torch.randint(1, 12, (), generator=gen)), int(torch.randint(1, 60, (), generator=gen))
    tables = []
    for _ in range(2):
        counts = torch.randint(0, 100, (features, bins), generator=gen).double()
        counts[torch.rand(features, bins, generator=gen) < 0.3] = 0
        if dtype == torch.float64 and case % 2 == 0:  # denormal, tiny and huge counts
            extremes = torch.tensor([5e-324, 1e-310, 1e-300, 1e300, 1e307])
            picks = extremes[torch.randint(0, 5, (features, bins), generator=gen)]
            counts = torch.where(torch.rand(features, bins, generator=gen) < 0.2, picks, counts)
        tables.append(strided(counts.to(dtype), gen))
    pseudo = [0.5, 1.0, 1e-3, 1e-300, 5e-324, 0.0][int(torch.randint(0, 6, (), generator=gen))]
    for fused, eager in ((ops.kl_divergence, reference.kl_divergence), (ops.js_divergence, reference.js_divergence)):
        if fused is ops.kl_divergence and pseudo == 0.0:
            continue
        what = f"{fused.__name__} {dtype} {tuple(tables[0].shape)} pseudo_count={pseudo}"
        try:
            expected = eager(*tables, pseudo)
        except ValueError:
            with pytest.raises(RuntimeError):
                fused(*tables, pseudo)
            continue
        result = fused(*tables, pseudo)
        assert torch.isfinite(result).all() and (result >= 0).all(), (what, result)
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6, msg=what)


CHECKS = [check_adapter, check_softmax_entropy, check_histogram, check_divergence]


def run_cases(check, cases, seed):
    gen = torch.Generator().manual_seed(seed)
    for case in range(cases):
        check(gen, case)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_fuzz_against_reference(check):
    run_cases(check, 60, seed=1234)


@pytest.mark.skipif(not LONG, reason="long fuzz: set SELFHEAL_FUZZ_LONG=1")
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_fuzz_against_reference_long(check):
    run_cases(check, LONG_CASES, seed=int(os.environ.get("SELFHEAL_FUZZ_SEED", "99")))
