"""RoTTA (Yuan et al., "Robust Test-Time Adaptation in Dynamic Scenarios",
CVPR 2023), for bench_heal.py, in two forms:

* ``RoTTARBN``: the robust batch normalisation (RBN) alone. Every BatchNorm
  normalises with global statistics kept as an exponential moving average
  that starts at the source's running statistics and moves once per batch
  towards the batch's:

      mu_g  <- (1 - alpha) mu_g  + alpha mu_batch
      var_g <- (1 - alpha) var_g + alpha var_batch,      alpha = 0.05

  No parameter is trained.
* ``RoTTA``: the whole method. A teacher (robust BatchNorm, statistics
  frozen while it predicts) labels each test sample; the sample enters the
  category-balanced memory (CSTU: category-balanced sampling with timeliness
  and uncertainty) whose every item has an age; every ``update_frequency`` samples the memory is one batch: the
  teacher sees it as is, the student a strongly augmented copy, and the
  student's norm affines take one Adam step on the consistency loss
  weighted by each item's timeliness; the teacher follows the student by
  an EMA of its parameters. Both update their robust statistics from the
  memory batch, as in training mode.

Batch 1: a convolutional layer's batch statistics are taken over the
sample's positions, as any BatchNorm does. A BatchNorm1d on ``(N, C)`` rows
with one row has a mean but no spread; the robust layer then updates the
mean and keeps its variance (the variance of one value is 0, and averaging
zeros in would shrink the variance towards nothing).
"""

import copy
import math

import torch
from torch import nn

from .augment import augment
from .tta import _BN


class RobustBatchNorm(nn.Module):
    """BatchNorm whose normalisation statistics are an EMA of batch statistics
    started at the source's (RoTTA's RBN). While ``update`` is on, each
    forward moves the EMA once and normalises with the moved statistics
    (gradients reach the batch's share); while off, it normalises with the
    stored EMA, as RoTTA's teacher does when it predicts."""

    def __init__(self, source, momentum):
        super().__init__()
        if source.running_mean is None or source.running_var is None:
            raise ValueError(f"RobustBatchNorm: the source {type(source).__name__} tracks no running statistics "
                             "(track_running_stats=False); RoTTA starts from them")
        self.momentum = momentum
        self.eps = source.eps
        self.weight = nn.Parameter(source.weight.detach().clone()) if source.affine else None
        self.bias = nn.Parameter(source.bias.detach().clone()) if source.affine else None
        self.register_buffer("mean", source.running_mean.detach().clone())
        self.register_buffer("var", source.running_var.detach().clone())
        self.update = True

    def forward(self, x):
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.update:
            dims = [0] + list(range(2, x.dim()))
            batch_var, batch_mean = torch.var_mean(x, dim=dims, unbiased=False)
            mean = (1 - self.momentum) * self.mean + self.momentum * batch_mean
            one_value = x.numel() == x.shape[1]  # one row of a BatchNorm1d: no spread to learn from
            var = self.var if one_value else (1 - self.momentum) * self.var + self.momentum * batch_var
            self.mean.copy_(mean.detach())
            self.var.copy_(var.detach())
        else:
            mean, var = self.mean, self.var
        x = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            x = x * self.weight.view(shape) + self.bias.view(shape)
        return x


def robust_copy(model, momentum):
    """An eval-mode copy of ``model`` with every BatchNorm replaced by a
    ``RobustBatchNorm`` started at its running statistics."""
    adapted = copy.deepcopy(model).eval()
    for name, module in list(adapted.named_modules()):
        if isinstance(module, _BN):
            parent_name, _, child = name.rpartition(".")
            parent = adapted.get_submodule(parent_name) if parent_name else adapted
            setattr(parent, child, RobustBatchNorm(module, momentum))
    if not any(isinstance(m, RobustBatchNorm) for m in adapted.modules()):
        raise ValueError("RoTTA needs a model with BatchNorm layers; found none")
    return adapted


def _set_update(model, update):
    for module in model.modules():
        if isinstance(module, RobustBatchNorm):
            module.update = update


class RoTTARBN:
    name = "RoTTA-RBN"

    def __init__(self, model, momentum=0.05):
        self.source = model
        self.momentum = momentum  # alpha of RBN's EMA (paper's implementation details: 0.05)
        self.reset()

    def reset(self):
        self.model = robust_copy(self.source, self.momentum)

    @torch.no_grad()
    def __call__(self, x):
        return self.model(x)


class CategoryBalancedMemory:
    """CSTU (RoTTA's memory bank): at most ``capacity`` samples, a
    share ``capacity / classes`` per predicted class. A new sample's score is
    its normalised uncertainty; an old one's adds its age's timeliness term

        score = lambda_t / (1 + exp(-age / capacity)) + lambda_u * entropy / ln C.

    A sample enters when its class has room (and the bank has, or a majority
    class gives up its highest-scored item) or when it scores lower than the
    highest-scored item of its own class, which it then replaces."""

    def __init__(self, capacity, classes, lambda_t, lambda_u):
        self.capacity = capacity
        self.classes = classes
        self.per_class = capacity / classes
        self.lambda_t = lambda_t
        self.lambda_u = lambda_u
        self.items = [[] for _ in range(classes)]  # per class: [sample, uncertainty, age]

    def __len__(self):
        return sum(len(c) for c in self.items)

    def score(self, age, uncertainty):
        return (self.lambda_t / (1 + math.exp(-age / self.capacity))
                + self.lambda_u * uncertainty / math.log(self.classes))

    def add(self, sample, label, uncertainty):
        if self._make_room(label, self.score(0, uncertainty)):
            self.items[label].append([sample, uncertainty, 0])
        for items in self.items:
            for item in items:
                item[2] += 1

    def _make_room(self, label, new_score):
        if len(self.items[label]) < self.per_class:
            if len(self) < self.capacity:
                return True
            most = max(len(c) for c in self.items)
            return self._evict([c for c in range(self.classes) if len(self.items[c]) == most], new_score)
        return self._evict([label], new_score)

    def _evict(self, classes, new_score):
        worst = None
        for c in classes:
            for index, (_, uncertainty, age) in enumerate(self.items[c]):
                score = self.score(age, uncertainty)
                if worst is None or score > worst[0]:
                    worst = (score, c, index)
        if worst is None or worst[0] <= new_score:
            return False
        del self.items[worst[1]][worst[2]]
        return True

    def batch(self):
        """(samples stacked, ages) of every item in the bank."""
        items = [item for c in self.items for item in c]
        return torch.stack([item[0] for item in items]), torch.tensor([float(item[2]) for item in items])


class RoTTA:
    name = "RoTTA"

    def __init__(self, model, lr=1e-3, capacity=64, update_frequency=64, momentum=0.05, teacher_momentum=0.001,
                 lambda_t=1.0, lambda_u=1.0, seed=0):
        self.source = model
        self.lr = lr  # Adam on the norm affines (implementation details: 1e-3, betas 0.9/0.999)
        self.capacity = capacity  # N, the memory bank's capacity (implementation details: 64)
        self.update_frequency = update_frequency  # samples between updates (implementation details: 64, = N)
        self.momentum = momentum  # alpha of RBN's EMA (implementation details: 0.05)
        self.teacher_momentum = teacher_momentum  # nu, the teacher's EMA rate (implementation details: 0.001)
        self.lambda_t = lambda_t  # lambda_t, timeliness' weight in CSTU's score (implementation details: 1.0)
        self.lambda_u = lambda_u  # lambda_u, uncertainty's weight in CSTU's score (implementation details: 1.0)
        self.seed = seed  # the augmentations' own generator (the global RNG is left alone)
        self.reset()

    def reset(self):
        self.student = robust_copy(self.source, self.momentum)
        for p in self.student.parameters():
            p.requires_grad_(False)
        self.parameters = [p for m in self.student.modules() if isinstance(m, RobustBatchNorm)
                           for p in (m.weight, m.bias) if p is not None]
        for p in self.parameters:
            p.requires_grad_(True)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.parameters, lr=self.lr, betas=(0.9, 0.999))
        self.memory = None
        self.seen = 0
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, x):
        with torch.no_grad():
            _set_update(self.teacher, False)
            logits = self.teacher(x)
            log_probs = logits.log_softmax(dim=1)
            entropy = -(log_probs.exp() * log_probs).sum(dim=1)
        if self.memory is None:
            self.memory = CategoryBalancedMemory(self.capacity, logits.shape[1], self.lambda_t, self.lambda_u)
        for sample, label, uncertainty in zip(x, logits.argmax(dim=1).tolist(), entropy.tolist()):
            self.memory.add(sample.detach().clone(), label, uncertainty)
            self.seen += 1
            if self.seen % self.update_frequency == 0:
                self._update()
        return logits

    def _update(self):
        samples, ages = self.memory.batch()
        _set_update(self.teacher, True)
        _set_update(self.student, True)
        with torch.no_grad():
            teacher_probs = self.teacher(samples).softmax(dim=1)
        with torch.enable_grad():
            student_log_probs = self.student(augment(samples, self.generator)).log_softmax(dim=1)
            # each item's timeliness E(A) = exp(-A/N) / (1 + exp(-A/N)) weighs its consistency loss
            timeliness = torch.exp(-ages / self.capacity) / (1 + torch.exp(-ages / self.capacity))
            loss = (-(teacher_probs * student_log_probs).sum(dim=1) * timeliness).mean()
            if torch.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.student.parameters()):
                t.mul_(1 - self.teacher_momentum).add_(s, alpha=self.teacher_momentum)
