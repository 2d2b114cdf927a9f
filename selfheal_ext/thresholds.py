"""Thresholds from a target false-alarm rate.

Pure functions used by ``DriftMonitor.calibrate``: an upper quantile of a
bootstrap sample (with a fitted tail when the sample is too short for the
level), the threshold of a CUSUM for a target average run length
(Brook–Evans Markov chain on the empirical increment distribution), a binomial
upper tail, and temperature scaling of logits.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

# Fewer exceedances than this at the target level and the empirical quantile is
# too noisy: extrapolate with a generalised-Pareto tail instead.
MIN_EXCEEDANCES = 20


def _tail_fit_quantile(ordered: torch.Tensor, alpha: float) -> float:
    """Extrapolated upper quantile from the top of a sample sorted in
    descending order: ``log S(x)`` (empirical survival) over the top tenth is
    fitted by least squares with a line, i.e. an exponential tail (a
    generalised Pareto tail of shape 0). Divergences are chi-square-like and so
    are their maxima over layers: their log-survival is asymptotically linear.
    A lighter (Gaussian) tail gets a higher, conservative threshold; a
    quadratic fit tracked Gaussian tails better but was anti-conservative, by
    up to 5x, on the monitor's own bootstrap maxima. The five most extreme
    points, where the empirical survival is noisiest, are left out."""
    n = ordered.numel()
    top = min(n, max(30, n // 10))
    skip = 5
    if top - skip < 2:
        return float(ordered[0])
    values = ordered[skip:top].double().tolist()
    targets = [math.log((rank + 0.5) / n) for rank in range(skip, top)]
    # The least-squares line in closed form, in Python floats with exactly
    # rounded sums: the same threshold from the same sample at any thread
    # count (LAPACK's lstsq moved the last bit between two calls in one
    # process on a 16-core host). Values too large to square give up the fit.
    count = len(values)
    try:
        mean_x, mean_y = math.fsum(values) / count, math.fsum(targets) / count
        deviations = [v - mean_x for v in values]
        spread = math.fsum(d * d for d in deviations)
        if not 0.0 < spread < math.inf:
            return float(ordered[0])
        slope = math.fsum(d * (t - mean_y) for d, t in zip(deviations, targets)) / spread
    except (OverflowError, ValueError):
        return float(ordered[0])
    intercept = mean_y - slope * mean_x
    if not slope < 0.0:
        return float(ordered[0])
    return (math.log(alpha) - intercept) / slope


def upper_quantile(samples: torch.Tensor, alpha: float) -> float:
    """The value exceeded with probability ``alpha`` by the distribution the
    ``samples`` were drawn from.

    With at least ``MIN_EXCEEDANCES`` samples expected above it, the empirical
    quantile; otherwise the tail is extrapolated (``_tail_fit_quantile``),
    since a bootstrap long enough for a one-in-a-million level would take
    longer than users wait for a calibration. An extrapolated level is
    less certain: from 10,000 samples at a level of 8.5e-5 the achieved rate of
    a chi-square tail lands within about 2x of ``alpha`` (tested).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"selfheal: alpha must be in (0, 1), got {alpha}")
    x = samples.double().flatten()
    n = x.numel()
    if n < 50:
        raise ValueError(f"selfheal: need at least 50 bootstrap samples for a threshold, got {n}")
    if alpha * n >= MIN_EXCEEDANCES:
        return torch.quantile(x, 1.0 - alpha, interpolation="higher").item()
    ordered, _ = torch.sort(x, descending=True)
    return _tail_fit_quantile(ordered, alpha)


def cusum_run_length(increments: torch.Tensor, threshold: float, states: int = 200) -> float:
    """Average run length from 0 of ``g <- max(0, g + X)``, alarm when ``g > threshold``,
    for i.i.d. ``X`` drawn from the empirical distribution of ``increments``
    (Brook & Evans, 1972: a Markov chain on ``states`` cells of ``[0, threshold]``)."""
    ordered, _ = torch.sort(increments.double().flatten())
    n = ordered.numel()
    width = threshold / (states - 0.5)
    centres = torch.arange(states, dtype=torch.float64) * width

    def cdf(values: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(ordered, values, right=True).double() / n

    # From cell i to cell j: g' = max(0, c_i + X) in ((j - 1/2)w, (j + 1/2)w];
    # cell 0 also takes everything at or below w/2 (g' = 0 included).
    upper_edges = (torch.arange(states, dtype=torch.float64) + 0.5) * width
    cumulative = cdf(upper_edges.unsqueeze(0) - centres.unsqueeze(1))
    transition = torch.diff(cumulative, dim=1, prepend=torch.zeros(states, 1, dtype=torch.float64))
    system = torch.eye(states, dtype=torch.float64) - transition
    run_lengths = torch.linalg.solve(system, torch.ones(states, dtype=torch.float64))
    return run_lengths[0].item()


def cusum_threshold(increments: torch.Tensor, run_length: float) -> float:
    """Smallest CUSUM threshold whose average run length under the null is at
    least ``run_length`` batches (bisection on ``cusum_run_length``)."""
    if float(increments.double().mean()) >= 0.0:
        raise ValueError("selfheal: CUSUM increments must drift downwards under the null "
                         "(mean increment >= 0); raise the allowance")
    low, high = 0.0, 1.0
    while cusum_run_length(increments, high) < run_length:
        low, high = high, high * 2.0
        if high > 1e6:
            raise ValueError("selfheal: no CUSUM threshold reaches the requested run length")
    for _ in range(40):
        middle = 0.5 * (low + high)
        if cusum_run_length(increments, middle) < run_length:
            low = middle
        else:
            high = middle
        if high - low < 1e-4 * high:
            break
    return high


def binomial_upper_tail(successes: int, trials: int, rate: float) -> float:
    """``P(K >= successes)`` for ``K ~ Binomial(trials, rate)``."""
    if successes <= 0:
        return 1.0
    if successes > trials:
        return 0.0
    log_rate, log_miss = math.log(rate), math.log1p(-rate)
    terms = [
        math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1)
        + k * log_rate + (trials - k) * log_miss
        for k in range(successes, trials + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature ``T`` minimising the cross-entropy of ``softmax(logits / T)``
    (temperature scaling, Guo et al. 2017): golden-section search on ``log T``."""
    logits = logits.double()
    labels = labels.long()

    def loss(log_t: float) -> float:
        return torch.nn.functional.cross_entropy(logits / math.exp(log_t), labels).item()

    low, high = math.log(0.05), math.log(20.0)
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = high - golden * (high - low), low + golden * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(60):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - golden * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + golden * (high - low)
            fb = loss(b)
    return math.exp(0.5 * (low + high))

