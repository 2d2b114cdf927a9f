import copy

import pytest
import torch
from torch import nn

from selfheal_ext import reference
from selfheal_ext.adapters import (AdapterSet, BottleneckAdapter, NormStatsAdapter, Placement, attach_adapters,
                                   plan_adapters)


class Mixed(nn.Module):
    """Conv + BatchNorm + GroupNorm + a transformer-style LayerNorm/Linear block."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(4, 32)
        self.proj = nn.Linear(32, 48)
        self.ln = nn.LayerNorm(48)
        self.mlp = nn.Linear(48, 48)
        self.head = nn.Linear(48, 7)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = torch.relu(self.gn(self.conv2(h)))
        tokens = h.flatten(2).transpose(1, 2)          # [N, L, 32]
        tokens = self.ln(self.proj(tokens))
        tokens = tokens + torch.relu(self.mlp(tokens))
        return self.head(tokens.mean(dim=1))


def trained_stats(model):
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, 12, 12))
    return model.eval()


def test_dormant_adapters_are_exactly_the_identity():
    torch.manual_seed(0)
    model = trained_stats(Mixed())
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        before = model(x)
    adapters = attach_adapters(model, budget=0.2)
    kinds = {p.kind for p in adapters.placements}
    assert kinds == {"norm", "affine", "bottleneck"}
    # Dormant: bit-identical, even after the adapters were trained to something else.
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(0.1)
        assert torch.equal(model(x), before)
        adapters.active = True
        assert not torch.equal(model(x), before)
        adapters.active = False
        assert torch.equal(model(x), before)
    adapters.remove()
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_budget_is_respected_and_reported():
    model = Mixed()
    total = sum(p.numel() for p in model.parameters())
    for budget in (0.01, 0.05, 0.2):
        adapters = attach_adapters(model, budget=budget)
        assert adapters.parameter_count <= budget * total
        assert adapters.parameter_count == sum(p.parameters for p in adapters.placements)
        assert adapters.budget_fraction == pytest.approx(adapters.parameter_count / total)
        assert f"{adapters.parameter_count} parameters" in adapters.summary()
        adapters.remove()
    # The head (last Linear) never gets an adapter: its output is the logits.
    assert all(p.target != "head" for p in plan_adapters(model, budget=0.5))


def test_placement_by_name_and_type_and_bad_arguments():
    model = Mixed()
    only_conv = plan_adapters(model, budget=0.5, targets=[nn.Conv2d])
    assert {p.target for p in only_conv} == {"conv", "conv2"} and {p.kind for p in only_conv} == {"bottleneck"}
    named = plan_adapters(model, budget=0.5, targets=["ln"])
    assert [(p.target, p.kind) for p in named] == [("ln", "affine")]
    with pytest.raises(ValueError, match="no module matches"):
        plan_adapters(model, targets=["nope"])
    with pytest.raises(ValueError, match="budget"):
        plan_adapters(model, budget=0.0)
    with pytest.raises(ValueError, match="kinds"):
        plan_adapters(model, kinds=("lora",))
    with pytest.raises(ValueError, match="no adapter fits"):
        plan_adapters(nn.Sequential(nn.Linear(4, 2)))


@pytest.mark.parametrize("channels_first", [False, True])
def test_bottleneck_adapter_matches_the_reference(channels_first):
    torch.manual_seed(0)
    adapter = BottleneckAdapter(12, 3, channels_first, activation="gelu", seed=4)
    with torch.no_grad():
        adapter.up.normal_()
        adapter.bias.normal_()
    x = torch.randn(4, 12, 5, 3) if channels_first else torch.randn(4, 6, 12)
    expected = reference.adapter(x, adapter.down, adapter.up, adapter.bias, activation="gelu",
                                 channels_first=channels_first)
    torch.testing.assert_close(adapter(x), expected, rtol=1e-5, atol=1e-5)
    # gradients reach the adapter's parameters through the fused op
    adapter(x).square().sum().backward()
    assert adapter.up.grad is not None and adapter.down.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(64, 16, 16, 16), (64, 8, 5, 3), (32, 24)])
def test_norm_statistics_batch_moments_match_float64_far_from_zero(shape):
    # Values far from zero relative to their spread (mean 100, std 0.01): the
    # batch moments must not lose the variance to cancellation.
    bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1]).eval()
    adapter = NormStatsAdapter(bn, prior=0.0)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.01 + 100
    dims = [0] + list(range(2, x.dim()))
    mean, var = adapter.statistics(x)  # prior 0: the batch's own moments
    torch.testing.assert_close(mean.double(), x.double().mean(dims), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), x.double().var(dims, unbiased=False), rtol=1e-4, atol=0)


def test_norm_statistics_prior_small_batches_robust_mode_and_nan():
    bn = nn.BatchNorm1d(4).eval()
    bn.running_mean.fill_(0.0)
    bn.running_var.fill_(1.0)
    adapter = NormStatsAdapter(bn, prior=16.0, running_horizon=128.0, min_batch=16)
    # a batch of one: the recent stream's moments, this sample folded in with
    # weight 1/129, its distance to the mean supplying the variance
    one = torch.full((1, 4), 5.0)
    mean, var = adapter.statistics(one)
    m = 1 / 129
    torch.testing.assert_close(mean, torch.full((4,), 5.0 * m))
    torch.testing.assert_close(var, torch.full((4,), (1 - m) + m * (1 - m) * 25.0))
    # a large batch: w = n / (n + prior * f) on its own statistics, the rest on
    # the recent stream's (this batch folded in with weight 64 / 192)
    batch = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 2 + 3
    batch_mean, batch_var = batch.double().mean(0), batch.double().var(0, unbiased=False)
    sampling = batch.double().var(0) / 64
    m = 64 / 192

    def expected(running_mean, running_var):
        folded_mean = running_mean + m * (batch_mean - running_mean)
        folded_var = (1 - m) * running_var + m * batch_var + m * (1 - m) * (batch_mean - running_mean) ** 2
        d = float(((batch_mean - folded_mean) ** 2 / sampling).mean())
        f = min(1.0, NormStatsAdapter.CHANGE_LEVEL / d)
        w = 64 / (64 + 16.0 * f)
        return (w * batch_mean + (1 - w) * folded_mean,
                w * batch_var + (1 - w) * folded_var + w * (1 - w) * (batch_mean - folded_mean) ** 2, f)

    # near the recent stream's statistics (a drift holding steady): the full prior
    near_mean, near_var = batch_mean + 0.5 * sampling.sqrt(), batch_var * 1.1
    adapter.running_mean.copy_(near_mean)
    adapter.running_var.copy_(near_var)
    mean, var = adapter.statistics(batch)
    want_mean, want_var, f = expected(near_mean, near_var)
    assert f == 1.0
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-5, atol=1e-5)
    # far from them (a drift begins: the source's statistics, mean 0 and
    # variance 1, against a batch at 3 +- 2): the prior shrinks to almost
    # nothing and the batch's own statistics decide
    adapter.reset_running()
    mean, var = adapter.statistics(batch)
    want_mean, want_var, f = expected(torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    assert f < 0.05
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-5, atol=1e-5)
    assert (mean - batch.mean(0)).abs().max() < 0.05
    # forwarded again with update_running off (the healer's step), the same statistics
    adapter.update_running = False
    again_mean, again_var = adapter.statistics(batch)
    assert torch.equal(again_mean, mean) and torch.equal(again_var, var)
    adapter.update_running = True
    # robust mode normalises with the running statistics, updated slowly:
    # over robust_horizon (4096) samples rather than running_horizon (128)
    adapter.robust = True
    running_before = adapter.running_mean.clone()
    mean, _ = adapter.statistics(batch)
    torch.testing.assert_close(mean, running_before + (batch.mean(0) - running_before) * (64 / 4160))
    adapter.update_running = False
    frozen = adapter.running_mean.clone()
    mean, _ = adapter.statistics(batch * 10)
    assert torch.equal(mean, frozen) and torch.equal(adapter.running_mean, frozen)
    # a batch with NaN neither updates the running statistics nor is used
    adapter.robust, adapter.update_running = False, True
    poisoned = batch.clone()
    poisoned[3, 1] = float("nan")
    mean, var = adapter.statistics(poisoned)
    assert torch.equal(adapter.running_mean, frozen) and torch.isfinite(mean).all() and torch.isfinite(var).all()
    # the layer's own buffers are never written
    assert bn.running_mean.abs().sum() == 0
    with pytest.raises(TypeError, match="BatchNorm"):
        NormStatsAdapter(nn.LayerNorm(4))


def test_norm_statistics_prior_steadies_a_holding_drift_and_follows_a_change():
    # While a drift holds, the recent stream's statistics make a better
    # estimate of the true moments than one batch alone; when the stream
    # changes, the batch's own statistics take over at once.
    generator = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm1d(8).eval()  # source: mean 0, variance 1
    adapter = NormStatsAdapter(bn)  # defaults: prior 128, running horizon 128
    errors_used, errors_batch = [], []
    for step in range(16):  # a drift: mean 2, standard deviation 1.5
        batch = torch.randn(64, 8, generator=generator) * 1.5 + 2.0
        mean, var = adapter.statistics(batch)
        if step == 0:
            # the change from the source (2 in the mean): the batch's own
            # statistics decide (within 5 % of the change; a prior of full
            # weight would leave the mean a third of the way)
            assert (mean - batch.mean(0)).abs().max() < 0.1
        if step >= 6:
            errors_used.append(float((mean - 2.0).square().mean() + (var - 2.25).square().mean()))
            errors_batch.append(float((batch.mean(0) - 2.0).square().mean()
                                      + (batch.var(0, unbiased=False) - 2.25).square().mean()))
    assert sum(errors_used) < 0.6 * sum(errors_batch)
    # the drift changes (mean -1: a change of 3), and the prior steps aside
    batch = torch.randn(64, 8, generator=generator) * 1.5 - 1.0
    mean, var = adapter.statistics(batch)
    assert (mean - batch.mean(0)).abs().max() < 0.15


def test_norm_statistics_refold_robust_is_the_slow_fold_of_the_same_batch():
    # A batch served as many classes and found, after serving, to be a run:
    # its fold into the running moments is redone as robust mode's (over
    # robust_horizon), exactly as if it had been served in robust mode.
    generator = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm1d(6).eval()
    fast, slow = NormStatsAdapter(bn), NormStatsAdapter(bn)
    mean, var = torch.randn(6, generator=generator), torch.rand(6, generator=generator) + 0.5
    for adapter in (fast, slow):  # a shared history first
        adapter.running_mean.copy_(mean)
        adapter.running_var.copy_(var)
    run = torch.randn(64, 6, generator=generator) * 0.3 + 3.0
    fast.statistics(run)
    assert (fast.running_mean - slow.running_mean).abs().min() > 0.3  # a third of the way to 3: moved far
    slow.robust = True
    slow.statistics(run)
    fast.refold_robust()
    torch.testing.assert_close(fast.running_mean, slow.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.running_var, slow.running_var, rtol=0, atol=1e-6)
    # once only (a second call changes nothing), and nothing to redo after a
    # reset or when the batch already was folded in robust mode
    fast.refold_robust()
    torch.testing.assert_close(fast.running_mean, slow.running_mean, rtol=0, atol=1e-6)
    slow.refold_robust()
    torch.testing.assert_close(fast.running_mean, slow.running_mean, rtol=0, atol=1e-6)
    fast.reset_running()
    fast.refold_robust()
    assert torch.equal(fast.running_mean, fast.source_mean) and torch.equal(fast.running_var, fast.source_var)
    # a non-finite batch changed nothing, and its refold changes nothing either
    before = slow.running_mean.clone(), slow.running_var.clone()
    slow.robust = False
    slow.statistics(torch.full((64, 6), float("nan")))
    slow.refold_robust()
    assert torch.equal(slow.running_mean, before[0]) and torch.equal(slow.running_var, before[1])
    # an empty batch folds nothing in and leaves nothing to refold (not the
    # batch before it)
    fast.statistics(run)
    fast.statistics(run[:0])
    before = fast.running_mean.clone()
    fast.refold_robust()
    assert torch.equal(fast.running_mean, before)


def test_norm_statistics_class_agnostic_layer_ignores_robust_mode():
    # A layer whose statistics do not depend on the class (marked by the
    # healer's calibration) normalises a batch in robust mode exactly as
    # outside it: its own statistics mixed with the prior, folded in at the
    # fast rate, and never refolded as a run's.
    generator = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm1d(6).eval()
    plain, agnostic, robust = (NormStatsAdapter(bn) for _ in range(3))
    agnostic.class_agnostic = True
    agnostic.robust = robust.robust = True
    for step in range(3):
        batch = torch.randn(64, 6, generator=generator) * 2.0 + 1.5
        want = plain.statistics(batch)
        got = agnostic.statistics(batch)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(agnostic.running_mean, plain.running_mean, rtol=0, atol=0)
        agnostic.refold_robust()
        torch.testing.assert_close(agnostic.running_var, plain.running_var, rtol=0, atol=0)
        # (a layer that is not class-agnostic keeps the slow running statistics)
        mean, _ = robust.statistics(batch)
        assert torch.equal(mean, robust.running_mean)
    assert (agnostic.running_mean - robust.running_mean).abs().min() > 0.5
    # batches under min_batch use the running statistics either way
    small = torch.randn(4, 6, generator=generator) + 1.5
    mean, _ = agnostic.statistics(small)
    assert torch.equal(mean, agnostic.running_mean)


def test_norm_statistics_gradient_is_the_batch_statistics_gradient_whatever_the_prior():
    # The prior steadies the values of the statistics; the gradient through
    # them is the batch's own (as in TENT), not `w` times it. With the
    # recent stream's statistics equal to the batch's, the values match a
    # prior of 0, and so must the gradients.
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    x = torch.randn(32, 6, 5, 5) * 1.5 + 0.5
    dims = [0, 2, 3]
    grads, outputs = [], []
    for prior in (0.0, 128.0):
        adapter = NormStatsAdapter(bn, prior=prior)
        adapter.running_mean.copy_(x.mean(dims))
        adapter.running_var.copy_(x.var(dims, unbiased=False))
        adapter.update_running = False
        leaf = x.clone().requires_grad_(True)
        out = adapter.normalise(bn, leaf)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append(leaf.grad)
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    # (the mixture's own gradient would scale the statistics' share by w = 32 / 160)
    assert (grads[0] - torch.linspace(-1, 1, x.numel()).view_as(x) * torch.rsqrt(
        x.var(dims, unbiased=False) + bn.eps).view(1, -1, 1, 1)).abs().max() > 1e-2


def test_reset_parameters_returns_to_identity_when_active():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    x = torch.randn(6, 8)
    with torch.no_grad():
        before = model(x)
    adapters = AdapterSet(model, [Placement("2", "bottleneck", 32, False, rank=4),
                                  Placement("0", "affine", 32, False)])
    adapters.active = True
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-6)  # untrained: up = 0, gamma = beta = 0
        for p in adapters.parameters():
            p.add_(0.3)
        assert not torch.allclose(model(x), before, atol=1e-3)
        adapters.reset_parameters()
        assert torch.allclose(model(x), before, atol=1e-6)
    with pytest.raises(ValueError, match="no module named"):
        AdapterSet(model, [Placement("9", "affine", 3, False)])
