"""A small seeded classification task with a covariate shift, shared by the
adapter and healer tests: 5 classes in 16 dimensions, an MLP with BatchNorm,
and a per-feature affine corruption (the kind sensor recalibration causes)."""
import torch
from torch import nn

D, C = 16, 5


class Task:
    def __init__(self, seed=1):
        generator = torch.Generator().manual_seed(seed)
        self.centers = torch.randn(C, D, generator=generator) * 1.2
        corruption = torch.Generator().manual_seed(7)
        self.scale = 1 + 0.5 * torch.randn(D, generator=corruption)
        self.shift = torch.randn(D, generator=corruption)
        self.generator = torch.Generator().manual_seed(seed + 100)

    def sample(self, n, corrupt=False, labels=None):
        y = torch.randint(0, C, (n,), generator=self.generator) if labels is None else labels
        x = self.centers[y] + torch.randn(n, D, generator=self.generator)
        x = torch.tanh(x) * 2 + 0.3 * x
        if corrupt:
            x = x * self.scale + self.shift
        return x, y


def trained_model(task, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64),
                          nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, C))
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(400):
        x, y = task.sample(128)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def accuracy(outputs, labels):
    return sum(int((o.argmax(1) == y).sum()) for o, y in zip(outputs, labels)) / sum(len(y) for y in labels)
