"""Test-time adaptation baselines, as their papers describe them, for
bench_heal.py. Each wraps a copy of the source model and exposes
``method(x) -> logits`` (predict and adapt on the same forward pass, so the
returned logits never depend on an update made with ``x``) and ``reset()``.

* ``Source``: the unadapted model.
* ``BNAdapt``: BatchNorm layers normalise with the test batch's statistics
  (Schneider et al. 2020, "BN re-estimation"; no parameters change).
* ``Tent``: BN statistics from the batch, BN affine parameters trained by
  entropy minimisation, one Adam step per batch (Wang et al. 2021).
* ``Eata``: Tent plus the reliable-sample filter (entropy < 0.4 ln C), the
  redundancy filter (cosine similarity of probabilities to their running mean
  < 1 - 0.05), confidence weighting and a Fisher anchor estimated on clean
  calibration data with pseudo-labels (Niu et al. 2022).
"""

import copy
import math

import torch
from torch import nn
import torch.nn.functional as F

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _batch_stat_model(model):
    """A copy whose BatchNorm layers use batch statistics (and do not update
    their running estimates); everything else stays in eval mode."""
    adapted = copy.deepcopy(model).eval()
    for module in adapted.modules():
        if isinstance(module, _BN):
            module.train()
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
    return adapted


def _bn_affine(model):
    parameters = []
    for module in model.modules():
        if isinstance(module, _BN) and module.affine:
            parameters += [module.weight, module.bias]
    return parameters


class Source:
    name = "source"

    def __init__(self, model):
        self.model = copy.deepcopy(model).eval()

    @torch.no_grad()
    def __call__(self, x):
        return self.model(x)

    def reset(self):
        pass


def affine_trainable_copy(model):
    """A copy of ``model`` normalising with batch statistics whose only
    trainable parameters are its BatchNorm affines: ``(copy, affines)``."""
    copy = _batch_stat_model(model)
    for p in copy.parameters():
        p.requires_grad_(False)
    affines = _bn_affine(copy)
    for p in affines:
        p.requires_grad_(True)
    return copy, affines


class BNAdapt(Source):
    name = "BN re-estimation"

    def __init__(self, model):
        self.model = _batch_stat_model(model)


class Tent:
    name = "TENT"

    def __init__(self, model, lr=1e-3):
        self.source = model
        self.lr = lr
        self.reset()

    def reset(self):
        self.model, self.parameters = affine_trainable_copy(self.source)
        self.optimizer = torch.optim.Adam(self.parameters, lr=self.lr, betas=(0.9, 0.999))

    def loss(self, logits):
        log_probs = logits.log_softmax(dim=1)
        return -(log_probs.exp() * log_probs).sum(dim=1).mean()

    def __call__(self, x):
        with torch.enable_grad():
            logits = self.model(x)
            loss = self.loss(logits)
            self.optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad and torch.isfinite(loss):
                loss.backward()
                self.optimizer.step()
        return logits.detach()


class Eata(Tent):
    name = "EATA"

    def __init__(self, model, calibration, lr=1e-3, margin_fraction=0.4, redundancy=0.05, fisher_alpha=2000.0):
        self.margin_fraction = margin_fraction
        self.redundancy = redundancy
        self.fisher_alpha = fisher_alpha
        super().__init__(model, lr)
        self.fisher = self._fisher(calibration)
        self.anchor = [p.detach().clone() for p in self.parameters]

    def _fisher(self, calibration):
        fisher = [torch.zeros_like(p) for p in self.parameters]
        count = 0
        for x in calibration:
            with torch.enable_grad():
                logits = self.model(x)
                loss = F.cross_entropy(logits, logits.argmax(dim=1))
                grads = torch.autograd.grad(loss, self.parameters)
            for f, g in zip(fisher, grads):
                f += g.detach() ** 2
            count += 1
        return [f / max(count, 1) for f in fisher]

    def reset(self):
        super().reset()
        self.mean_probs = None
        if hasattr(self, "anchor"):
            self.anchor = [p.detach().clone() for p in self.parameters]

    def __call__(self, x):
        with torch.enable_grad():
            logits = self.model(x)
            log_probs = logits.log_softmax(dim=1)
            entropy = -(log_probs.exp() * log_probs).sum(dim=1)
            margin = self.margin_fraction * math.log(logits.shape[1])
            probs = log_probs.detach().exp()
            keep = entropy.detach() < margin
            if self.mean_probs is not None:
                keep &= F.cosine_similarity(probs, self.mean_probs.unsqueeze(0), dim=1) < 1 - self.redundancy
            if keep.any():
                chosen = probs[keep].mean(dim=0)
                self.mean_probs = chosen if self.mean_probs is None else 0.9 * self.mean_probs + 0.1 * chosen
                weights = torch.exp(-(entropy.detach()[keep] - margin))
                loss = (weights * entropy[keep]).mean()
                loss = loss + self.fisher_alpha * sum((f * (p - a) ** 2).sum()
                                                      for f, p, a in zip(self.fisher, self.parameters, self.anchor))
                if torch.isfinite(loss):
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
        return logits.detach()
