import torch

import selfheal_ext as sh


class MonitoredAdapterModel(torch.nn.Module):
    """A small model using every op the way the monitor and healer will."""

    def __init__(self, features=16, classes=5, rank=4, bins=6):
        super().__init__()
        self.body = torch.nn.Linear(features, features)
        self.down = torch.nn.Parameter(torch.randn(rank, features) * 0.2)
        self.up = torch.nn.Parameter(torch.randn(features, rank) * 0.2)
        self.scale = torch.nn.Parameter(torch.ones(features))
        self.head = torch.nn.Linear(features, classes)
        self.register_buffer("counts", torch.zeros(features, bins + 2, dtype=torch.long))
        self.register_buffer("reference", torch.randint(0, 9, (features, bins + 2)))
        self.register_buffer("nonfinite", torch.zeros(features, dtype=torch.long))
        self.register_buffer("lo", torch.full((features,), -2.0))
        self.register_buffer("hi", torch.full((features,), 2.0))

    def forward(self, x):
        h = torch.relu(self.body(x))
        sh.ops.histogram_update_(self.counts, self.nonfinite, h.detach(), self.lo, self.hi)
        h = sh.ops.adapter(h, self.down, self.up, scale=self.scale, activation="gelu")
        logits = self.head(h)
        entropy, max_prob = sh.ops.softmax_entropy(logits)
        drift = sh.ops.kl_divergence(self.counts, self.reference) + sh.ops.js_divergence(
            self.counts, self.reference)
        return logits, entropy, max_prob, drift


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    eager_model = MonitoredAdapterModel()
    compiled_model = MonitoredAdapterModel()
    compiled_model.load_state_dict(eager_model.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(32, 16)
    eager_out = eager_model(x)
    compiled_out = compiled(x)
    for a, b in zip(eager_out, compiled_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(eager_model.counts, compiled_model.counts)
    eager_grads = torch.autograd.grad(eager_out[1].mean(), list(eager_model.parameters()))
    compiled_grads = torch.autograd.grad(compiled_out[1].mean(), list(compiled_model.parameters()))
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
