"""ActMAD (Mirza et al., "ActMAD: Activation Matching to Align
Distributions for Test-Time-Training", CVPR 2023), for bench_heal.py.

The outputs of every BatchNorm layer are tapped. On clean data (the
benchmark's calibration set, standing in for the training set the paper
uses) each tap's mean and variance are recorded; at test time every
parameter of the model takes one Adam step per batch on

    L = sum_l  | mu_l(batch) - mu_l(clean) |_1 + | var_l(batch) - var_l(clean) |_1

(each term averaged over the tap's features), the model in eval mode so
BatchNorm normalises with its running statistics and the loss sees the
shift. The statistics are per feature location as in the paper (each
channel at each position of a feature map is its own feature: the
alignment keeps where activations are, not only how much of them);
``per_location=False`` pools the positions of a channel instead.

Per location, the variance is over the batch, so a batch needs two samples
at least; ActMAD then raises ValueError, as a BatchNorm in training mode
does. Learning rate: the paper trains with a 1e-3 rate; Adam 1e-3 on every
parameter is used here.
"""

import copy

import torch

from .tta import _BN


def _statistic_dims(output, per_location):
    return (0,) if per_location else (0,) + tuple(range(2, output.dim()))


class ActMAD:
    name = "ActMAD"

    def __init__(self, model, calibration, lr=1e-3, per_location=True):
        self.source = model
        self.lr = lr  # Adam on all parameters (paper: 1e-3)
        self.per_location = per_location  # statistics per feature location (paper: yes)
        if not any(isinstance(m, _BN) for m in model.modules()):
            raise ValueError("ActMAD taps the BatchNorm layers' outputs; the model has none")
        self.reference = self._clean_statistics(calibration)
        self.reset()

    def reset(self):
        self.model = copy.deepcopy(self.source).eval()
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr, betas=(0.9, 0.999))

    def _taps(self, model):
        outputs = []
        handles = [m.register_forward_hook(lambda module, args, output: outputs.append(output))
                   for m in model.modules() if isinstance(m, _BN)]
        return outputs, handles

    @torch.no_grad()
    def _clean_statistics(self, calibration):
        """Per tap: (mean, variance) over every calibration sample, in float64."""
        model = copy.deepcopy(self.source).eval()
        outputs, handles = self._taps(model)
        sums, squares, counts = None, None, None
        try:
            for x in calibration:
                outputs.clear()
                model(x)
                dims = [_statistic_dims(o, self.per_location) for o in outputs]
                batch_sums = [o.double().sum(dim=d) for o, d in zip(outputs, dims)]
                batch_squares = [(o.double() ** 2).sum(dim=d) for o, d in zip(outputs, dims)]
                batch_counts = [o.numel() // s.numel() for o, s in zip(outputs, batch_sums)]
                if sums is None:
                    sums, squares, counts = batch_sums, batch_squares, batch_counts
                else:
                    sums = [a + b for a, b in zip(sums, batch_sums)]
                    squares = [a + b for a, b in zip(squares, batch_squares)]
                    counts = [a + b for a, b in zip(counts, batch_counts)]
        finally:
            for handle in handles:
                handle.remove()
        if sums is None:
            raise ValueError("ActMAD needs clean calibration batches; got none")
        statistics = []
        for total, square, count in zip(sums, squares, counts):
            if count < 2:
                raise ValueError(f"ActMAD needs at least 2 clean values per feature; got {count}")
            mean = total / count
            variance = (square - count * mean ** 2) / (count - 1)
            statistics.append((mean.float(), variance.clamp_min(0).float()))
        return statistics

    def __call__(self, x):
        if self.per_location and len(x) < 2:
            raise ValueError(f"ActMAD aligns each feature's variance over the batch; a batch needs at least 2 "
                             f"samples, got {len(x)}")
        outputs, handles = self._taps(self.model)
        try:
            with torch.enable_grad():
                logits = self.model(x)
                loss = 0.0
                for output, (mean, variance) in zip(outputs, self.reference):
                    dims = _statistic_dims(output, self.per_location)
                    if output.numel() // mean.numel() < 2:
                        raise ValueError(f"ActMAD: one value per feature in a batch of shape {tuple(x.shape)}; "
                                         "its variance is undefined")
                    batch_var, batch_mean = torch.var_mean(output, dim=dims)
                    loss = loss + (batch_mean - mean).abs().mean() + (batch_var - variance).abs().mean()
                if torch.isfinite(loss):
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
        finally:
            for handle in handles:
                handle.remove()
        return logits.detach()
