"""Established drift detectors as a user would otherwise run them, for
bench_monitor.py to compare against: a kernel two-sample test (MMD, Gaussian
kernel, median-heuristic bandwidth, permutation p-value) and per-feature
Kolmogorov–Smirnov tests with a Bonferroni correction, both on a window of the
most recent samples against a fixed reference sample, alarming at p < 0.05
(the setting their documentation shows). Permutation p-values are
(k + 1) / (B + 1), never k / B.
"""

import math

import torch


class _Window:
    def __init__(self, size):
        self.size = size
        self.rows = None

    def add(self, x):
        self.rows = x if self.rows is None else torch.cat([self.rows, x])[-self.size:]
        return self.rows


class MMDPermutationDetector:
    name = "MMD permutation (B=100, p<0.05)"

    def __init__(self, reference, window, permutations=100, p_value=0.05, seed=0):
        self.reference = reference[-window:].double()
        self.window = _Window(window)
        self.permutations = permutations
        self.p_value = p_value
        self.generator = torch.Generator().manual_seed(seed)
        distances = torch.cdist(self.reference, self.reference)
        self.bandwidth = distances[distances > 0].median().item()

    def update(self, x):
        current = self.window.add(x.double())
        if current.shape[0] < self.window.size:
            return False
        pooled = torch.cat([self.reference, current])
        kernel = torch.exp(-torch.cdist(pooled, pooled) ** 2 / (2 * self.bandwidth ** 2))
        n = self.reference.shape[0]
        total = pooled.shape[0]

        def statistic(labels):  # labels: [..., total] with 1 for the first group
            first = labels / labels.sum(-1, keepdim=True)
            second = (1 - labels) / (1 - labels).sum(-1, keepdim=True)
            weights = first - second
            return torch.einsum("...i,ij,...j->...", weights, kernel, weights)

        observed = statistic(torch.cat([torch.ones(n), torch.zeros(total - n)]).double())
        orders = torch.argsort(torch.rand(self.permutations, total, generator=self.generator), dim=1)
        labels = (orders < n).double()
        permuted = statistic(labels)
        p = (int((permuted >= observed).sum()) + 1) / (self.permutations + 1)
        return p < self.p_value


class KSBonferroniDetector:
    name = "KS per feature, Bonferroni (p<0.05)"

    def __init__(self, reference, window, p_value=0.05):
        self.reference, _ = torch.sort(reference[-window:].double(), dim=0)
        self.window = _Window(window)
        self.p_value = p_value

    def update(self, x):
        current = self.window.add(x.double())
        if current.shape[0] < self.window.size:
            return False
        current, _ = torch.sort(current, dim=0)
        n, m = self.reference.shape[0], current.shape[0]
        pooled = torch.cat([self.reference, current])
        cdf_ref = torch.searchsorted(self.reference.t().contiguous(), pooled.t().contiguous(), right=True) / n
        cdf_cur = torch.searchsorted(current.t().contiguous(), pooled.t().contiguous(), right=True) / m
        statistic = (cdf_ref - cdf_cur).abs().max(dim=1).values
        effective = math.sqrt(n * m / (n + m))
        p = torch.tensor([_kolmogorov_survival((effective + 0.12 + 0.11 / effective) * d) for d in statistic.tolist()])
        return bool((p < self.p_value / statistic.numel()).any())


def _kolmogorov_survival(x):
    """P(K > x) for the Kolmogorov distribution (asymptotic two-sample KS p-value)."""
    if x < 0.2:
        return 1.0
    return min(1.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * x * x) for k in range(1, 101)))
