"""ROID (Marsden, Döbler and Yang, "Universal Test-Time Adaptation through
Weight Ensembling, Diversity Weighting, and Prior Correction", WACV 2024),
for bench_heal.py. BatchNorm statistics from the test batch; the norm
layers' affine parameters take one Adam step per batch on

    L = mean_i w_i [ SLR(p_i) + SCE(p_i^aug, p_i) ]

* soft likelihood ratio, with probabilities clipped at 0.99 so that a
  confident sample's gradient does not vanish nor explode:
      SLR(p) = -sum_c p_c log(p_c / (1 - p_c))
* weights w_i = exp(d_i c_i / T), T = 1/3, both terms min-max normalised
  over the batch: certainty c_i = -entropy(p_i); diversity
  d_i = 1 - cos(p_i, p_bar), p_bar an EMA (0.9) of the batch's mean
  prediction started at uniform; samples with d_i under the batch's mean get
  weight 0 (they repeat what the model has been predicting);
* consistency: symmetric cross-entropy between the prediction on an
  augmented copy and the prediction on the batch (the target held fixed);
* weight ensembling after every step: theta <- 0.99 theta + 0.01 theta_source;
* prior correction of the served probabilities: with the batch's mean
  prediction p_t and smoothing s = max(1/B, 1/C) / max(p_t),
      p_i' ∝ p_i (p_t + s) / (1 + s C),
  which sharpens the prediction towards the classes the batch holds; it
  changes the output only, never the loss.

A batch of one: the min-max normalisation has no range; both normalised
terms are then 0 and the sample's weight is 1 (neither certain nor
redundant relative to a batch). The convolutional layers' statistics come
from the sample's positions; a BatchNorm1d on rows refuses a single row.
"""


import torch
import torch.nn.functional as F

from .augment import augment
from .tta import affine_trainable_copy


def _min_max(values):
    return (values - values.min()) / (values.max() - values.min()).clamp_min(1e-12)


def soft_likelihood_ratio(logits, clip):
    probs = logits.softmax(dim=1).clamp(max=clip)
    return -(probs * torch.log(probs / (1 - probs) + 1e-5)).sum(dim=1)


def symmetric_cross_entropy(logits, target_logits):
    target = target_logits.detach()
    return -0.5 * ((target.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1)
                   + (logits.softmax(dim=1) * target.log_softmax(dim=1)).sum(dim=1))


class ROID:
    name = "ROID"

    def __init__(self, model, lr=1e-3, ensemble_momentum=0.99, temperature=1 / 3, prior_momentum=0.9, clip=0.99,
                 consistency=True, seed=0):
        self.source = model
        self.lr = lr  # Adam on the norm affines (paper's CIFAR setting, as TENT's: 1e-3)
        self.ensemble_momentum = ensemble_momentum  # alpha of the weight ensemble with the source (paper: 0.99)
        self.temperature = temperature  # T of w = exp(d c / T) (paper: 1/3)
        self.prior_momentum = prior_momentum  # EMA of the mean prediction for the diversity weight (paper: 0.9)
        self.clip = clip  # probability clip inside the SLR loss (paper: 0.99)
        self.consistency = consistency  # the augmentation-consistency term (paper: on)
        self.seed = seed  # the augmentations' own generator (the global RNG is left alone)
        self.reset()

    def reset(self):
        self.model, self.parameters = affine_trainable_copy(self.source)
        self.source_parameters = [p.detach().clone() for p in self.parameters]
        self.optimizer = torch.optim.Adam(self.parameters, lr=self.lr, betas=(0.9, 0.999))
        self.mean_prediction = None
        self.generator = torch.Generator().manual_seed(self.seed)

    def weights(self, logits):
        """Certainty x diversity weights of the batch; moves the mean-prediction EMA."""
        probs = logits.softmax(dim=1)
        if self.mean_prediction is None:
            self.mean_prediction = torch.full((logits.shape[1],), 1.0 / logits.shape[1])
        diversity = _min_max(1 - F.cosine_similarity(self.mean_prediction.unsqueeze(0), probs, dim=1))
        certainty = _min_max((probs * logits.log_softmax(dim=1)).sum(dim=1))
        weights = torch.exp(diversity * certainty / self.temperature)
        weights[diversity < diversity.mean()] = 0.0
        m = self.prior_momentum
        self.mean_prediction = m * self.mean_prediction + (1 - m) * probs.mean(dim=0)
        return weights

    def __call__(self, x):
        with torch.enable_grad():
            logits = self.model(x)
            with torch.no_grad():
                weights = self.weights(logits.detach())
            loss = (weights * soft_likelihood_ratio(logits, self.clip)).mean()
            if self.consistency:
                augmented = self.model(augment(x, self.generator))
                loss = loss + (weights * symmetric_cross_entropy(augmented, logits)).mean()
            if loss.requires_grad and torch.isfinite(loss) and bool((weights > 0).any()):
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                with torch.no_grad():
                    for p, s in zip(self.parameters, self.source_parameters):
                        p.mul_(self.ensemble_momentum).add_(s, alpha=1 - self.ensemble_momentum)
        return self.prior_corrected(logits.detach())

    @staticmethod
    def prior_corrected(logits):
        """Log-probabilities after ROID's prior correction (see the module doc)."""
        probs = logits.softmax(dim=1)
        prior = probs.mean(dim=0)
        smoothing = max(1.0 / len(logits), 1.0 / logits.shape[1]) / prior.max()
        corrected = probs * (prior + smoothing) / (1 + smoothing * logits.shape[1])
        return torch.log(corrected.clamp_min(1e-30))
