"""Deterministic tests of the monitor's building blocks: windows and thresholds."""

import math

import pytest
import torch

from selfheal_ext.thresholds import (
    binomial_upper_tail, cusum_run_length, cusum_threshold, fit_temperature, upper_quantile)
from selfheal_ext.windows import ExponentialWindow, SlidingWindow


def _batches(sizes, width=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 7, (width,), generator=generator), n) for n in sizes]


@pytest.mark.parametrize("sizes", [[1] * 300, [7, 3, 64, 1, 1, 200, 5] * 10, [300, 40, 1000, 2]])
def test_sliding_window_holds_exactly_the_newest_batches(sizes):
    window = SlidingWindow(100, (5,), 2, torch.device("cpu"))
    history = []
    for counts, n in _batches(sizes):
        window.add(counts, torch.tensor([float(n), 1.0], dtype=torch.float64), n)
        history.append((counts, n))
        totals, stats, samples = window.totals()
        # The window is a suffix of the stream: find it and compare exactly.
        covered, expected = 0, torch.zeros(5, dtype=torch.int64)
        batches = 0
        for past_counts, past_n in reversed(history):
            if covered == samples:
                break
            covered += past_n
            expected += past_counts
            batches += 1
        assert covered == samples, "window does not end on a batch boundary"
        assert torch.equal(totals, expected)
        assert stats[0].item() == samples and stats[1].item() == batches
        total_seen = sum(n for _, n in history)
        if total_seen >= 100:
            assert samples >= 100
            assert samples < 100 + window.chunk_samples + n + max(n for _, n in history)


def test_sliding_window_state_round_trip_and_reset():
    window = SlidingWindow(50, (5,), 2, torch.device("cpu"))
    for counts, n in _batches([3, 9, 20, 1, 30]):
        window.add(counts, torch.ones(2, dtype=torch.float64), n)
    clone = SlidingWindow(50, (5,), 2, torch.device("cpu"))
    clone.load_state_dict(window.state_dict())
    for counts, n in _batches([4, 40, 2], seed=1):
        window.add(counts, torch.ones(2, dtype=torch.float64), n)
        clone.add(counts, torch.ones(2, dtype=torch.float64), n)
        assert torch.equal(window.totals()[0], clone.totals()[0])
        assert window.totals()[2] == clone.totals()[2]
    window.reset()
    assert window.totals()[2] == 0 and window.totals()[0].sum() == 0
    bad = clone.state_dict()
    bad["ring_samples"] = bad["ring_samples"] + 1
    with pytest.raises(ValueError, match="do not add up"):
        window.load_state_dict(bad)
    with pytest.raises(ValueError, match="window state is for"):
        window.load_state_dict(ExponentialWindow(50, (5,), 2, torch.device("cpu")).state_dict())


def test_exponential_window_effective_size_and_weights():
    window = ExponentialWindow(64, (1,), 1, torch.device("cpu"))
    for _ in range(2000):
        window.add(torch.ones(1, dtype=torch.int64), torch.ones(1, dtype=torch.float64), 1)
    counts, stats, effective = window.totals()
    assert effective == pytest.approx(64, rel=1e-3)
    # Every sample counted once, rescaled to the effective size.
    assert counts.item() == pytest.approx(64, rel=1e-3)
    # One batch of 10 ages the old mass by decay**10.
    before = window.weight
    window.add(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.float64), 10)
    assert window.weight == pytest.approx(before * window.decay ** 10 + 10)


def test_upper_quantile_empirical_and_extrapolated():
    generator = torch.Generator().manual_seed(0)
    samples = -torch.log(torch.rand(200_000, generator=generator, dtype=torch.float64))  # Exp(1)
    assert upper_quantile(samples, 1e-3) == pytest.approx(-math.log(1e-3), rel=0.05)
    # 2e-6 * 200k = 0.4 expected exceedances: the tail is extrapolated.
    assert upper_quantile(samples, 2e-6) == pytest.approx(-math.log(2e-6), rel=0.08)
    # A chi-square(17) tail (a window divergence's shape) from 10,000 samples at
    # 8.5e-5 (the default window level, about one sample beyond it): the
    # exponential-tail extrapolation lands between 0.15x and 1.5x of the target,
    # on the conservative side, as documented.
    population = (torch.randn(2_000_000, 17, generator=generator, dtype=torch.float64) ** 2).sum(dim=1)
    for seed in range(6):
        picks = torch.randint(population.numel(), (10_000,), generator=torch.Generator().manual_seed(seed))
        achieved = (population > upper_quantile(population[picks], 8.5e-5)).double().mean().item()
        assert 8.5e-5 * 0.15 < achieved < 8.5e-5 * 1.5
    with pytest.raises(ValueError, match="alpha"):
        upper_quantile(samples, 0.0)


def test_cusum_run_length_matches_published_values():
    # Standard normal increments, k = 0.5: the two-sided tabular CUSUM has an
    # in-control ARL of about 168 at h = 4 and 465 at h = 5 (Montgomery,
    # Introduction to Statistical Quality Control, table 9.3); one side alarms
    # half as often, so 336 and 930 (a direct simulation gives 334 at h = 4).
    generator = torch.Generator().manual_seed(0)
    normal = torch.randn(400_000, generator=generator, dtype=torch.float64)
    assert cusum_run_length(normal - 0.5, 4.0) == pytest.approx(2 * 168, rel=0.05)
    assert cusum_run_length(normal - 0.5, 5.0) == pytest.approx(2 * 465, rel=0.05)
    threshold = cusum_threshold(normal - 0.5, 2 * 465)
    assert threshold == pytest.approx(5.0, abs=0.1)
    with pytest.raises(ValueError, match="drift downwards"):
        cusum_threshold(normal + 0.1, 100)


def test_binomial_upper_tail():
    assert binomial_upper_tail(0, 10, 0.3) == 1.0
    assert binomial_upper_tail(11, 10, 0.3) == 0.0
    exact = sum(math.comb(10, k) * 0.3 ** k * 0.7 ** (10 - k) for k in range(4, 11))
    assert binomial_upper_tail(4, 10, 0.3) == pytest.approx(exact, rel=1e-12)


def test_fit_temperature_recovers_the_scaling():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20_000, 5, generator=generator, dtype=torch.float64) * 2
    labels = torch.multinomial(torch.softmax(true_logits, dim=1), 1, generator=generator).squeeze(1)
    assert fit_temperature(true_logits * 3.0, labels) == pytest.approx(3.0, rel=0.05)


def test_tail_fit_is_the_least_squares_line_and_survives_degenerate_tails():
    from selfheal_ext.thresholds import _tail_fit_quantile

    def lstsq_fit(ordered, alpha):
        n = ordered.numel()
        top, skip = max(30, n // 10), 5
        log_survival = torch.log((torch.arange(skip, top, dtype=torch.float64) + 0.5) / n)
        values = ordered[skip:top]
        design = torch.stack([torch.ones_like(values), values], dim=1)
        intercept, slope = torch.linalg.lstsq(design, log_survival.unsqueeze(1)).solution.squeeze(1).tolist()
        return (math.log(alpha) - intercept) / slope

    generator = torch.Generator().manual_seed(0)
    for size in (300, 1000, 5000):
        ordered, _ = torch.sort(torch.randn(size, generator=generator, dtype=torch.float64) ** 2, descending=True)
        assert _tail_fit_quantile(ordered, 1e-5) == pytest.approx(lstsq_fit(ordered, 1e-5), rel=1e-12)
    # Tied or unsquarable tails, and too few points, give the sample maximum.
    assert _tail_fit_quantile(torch.full((60,), 3.0, dtype=torch.float64), 1e-4) == 3.0
    huge, _ = torch.sort(torch.rand(100, generator=generator, dtype=torch.float64) * 1e300, descending=True)
    assert _tail_fit_quantile(huge, 1e-4) == float(huge[0])
    assert _tail_fit_quantile(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64), 1e-4) == 5.0
