"""The benchmark's test-time adaptation baselines (bench/baselines): each runs
on a tiny BatchNorm model, changes only the state its paper says it changes,
draws no number from the global random stream (so adding a baseline to
bench_heal.py leaves SelfHealer's numbers as they were), and ``reset()``
restores the source exactly."""

import math
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from baselines.actmad import ActMAD  # noqa: E402
from baselines.roid import ROID  # noqa: E402
from baselines.rotta import CategoryBalancedMemory, RobustBatchNorm, RoTTA, RoTTARBN  # noqa: E402
from baselines.sar import SAR  # noqa: E402


def conv_model(classes=3, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes))
    with torch.no_grad():  # running statistics of "clean" data, non-trivial affines
        model.train()
        for _ in range(5):
            model(torch.randn(16, 1, 8, 8))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model[-1].weight.mul_(8)  # confident enough that some samples pass the entropy margins
    return model.eval()


def mlp_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model.train()
        for _ in range(5):
            model(torch.randn(32, 5))
    return model.eval()


def shifted_images(count, seed):
    g = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(count, 1, 8, 8, generator=g) + 0.7


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def robust_layers(model):
    return [m for m in model.modules() if isinstance(m, RobustBatchNorm)]


def test_rbn_moves_statistics_once_per_batch_towards_the_batch():
    model = mlp_model()
    source = model[1]
    method = RoTTARBN(model)
    x = torch.randn(16, 5) * 2 + 1
    hidden = model[0](x).detach()
    logits = method(x)
    assert torch.isfinite(logits).all()
    layer = robust_layers(method.model)[0]
    expected_mean = 0.95 * source.running_mean + 0.05 * hidden.mean(dim=0)
    expected_var = 0.95 * source.running_var + 0.05 * hidden.var(dim=0, unbiased=False)
    torch.testing.assert_close(layer.mean, expected_mean)
    torch.testing.assert_close(layer.var, expected_var)
    # the batch was normalised with the moved statistics
    normalised = (hidden - expected_mean) / torch.sqrt(expected_var + source.eps) * source.weight + source.bias
    torch.testing.assert_close(logits, model[3](torch.relu(normalised)))
    # no parameter trained; the source model untouched
    for p, q in zip(method.model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(source.running_mean, model[1].running_mean)
    method.reset()
    layer = robust_layers(method.model)[0]
    assert torch.equal(layer.mean, source.running_mean) and torch.equal(layer.var, source.running_var)


def test_rbn_batch_of_one():
    # a BatchNorm1d row: the mean moves, the variance (of one value: none) stays
    model = mlp_model()
    method = RoTTARBN(model)
    x = torch.randn(1, 5)
    assert torch.isfinite(method(x)).all()
    layer = robust_layers(method.model)[0]
    torch.testing.assert_close(layer.mean, 0.95 * model[1].running_mean + 0.05 * model[0](x).detach()[0])
    assert torch.equal(layer.var, model[1].running_var)
    # a convolution's sample has positions: both statistics move
    conv = conv_model()
    method = RoTTARBN(conv)
    assert torch.isfinite(method(shifted_images(1, 0))).all()
    layer = robust_layers(method.model)[0]
    assert not torch.equal(layer.var, conv[1].running_var)
    assert not torch.equal(layer.mean, conv[1].running_mean)


def test_memory_keeps_classes_balanced_and_prefers_certain_recent_samples():
    memory = CategoryBalancedMemory(capacity=5, classes=2, lambda_t=1.0, lambda_u=1.0)
    for i in range(3):
        memory.add(torch.full((1,), float(i)), 0, 0.1)
    assert [len(c) for c in memory.items] == [3, 0]  # 2.5 per class: room for a third
    memory.add(torch.zeros(1), 0, 0.1)  # class 0 full: replaces its oldest (highest-scored) item
    assert [len(c) for c in memory.items] == [3, 0]
    assert sorted(item[2] for item in memory.items[0]) == [1, 2, 3]
    memory.add(torch.zeros(1), 0, math.log(2))  # too uncertain to displace anything
    assert sorted(item[2] for item in memory.items[0]) == [2, 3, 4]
    memory.add(torch.ones(1), 1, 0.2)
    memory.add(torch.ones(1), 1, 0.2)
    assert [len(c) for c in memory.items] == [3, 2] and len(memory) == 5
    memory.add(torch.ones(1), 1, 0.2)  # bank full, class 1 under its share: the majority class gives way
    assert [len(c) for c in memory.items] == [2, 3]
    samples, ages = memory.batch()
    assert samples.shape == (5, 1) and ages.shape == (5,)


def test_rotta_updates_every_update_frequency_samples_and_teacher_follows_by_ema():
    model = conv_model()
    method = RoTTA(model, update_frequency=8, teacher_momentum=0.1)
    source = state(method.student)
    logits = method(shifted_images(7, 1))
    assert torch.isfinite(logits).all()
    assert_same_state(state(method.student), source)  # 7 samples: no update yet, teacher's statistics frozen
    assert_same_state(state(method.teacher), source)
    method(shifted_images(1, 2))
    student = dict(method.student.named_parameters())
    teacher = dict(method.teacher.named_parameters())
    moved = False
    for name, p in student.items():
        torch.testing.assert_close(teacher[name] - source[name], 0.1 * (p - source[name]))
        moved |= not torch.equal(p, source[name])
    assert moved
    assert not torch.equal(robust_layers(method.teacher)[0].mean, source["1.mean"])
    # only norm affines train: the convolutions and the head are the source's
    for name in ("0.weight", "3.weight", "8.weight"):
        assert torch.equal(student[name], source[name])
    method.reset()
    assert_same_state(state(method.student), source)
    assert_same_state(state(method.teacher), source)
    assert method.seen == 0 and method.memory is None


def test_rotta_batch_one_on_rows():
    method = RoTTA(mlp_model(), update_frequency=4)
    for i in range(8):
        assert torch.isfinite(method(torch.randn(1, 5))).all()
    assert method.seen == 8


def test_sar_recovers_to_source_when_loss_ema_falls_below_threshold():
    model = conv_model()
    sar = SAR(model, lr_per_64=0.05, margin_fraction=1.0, recovery_threshold=0.0)
    source = state(sar.model)
    for seed in range(3):
        assert torch.isfinite(sar(shifted_images(16, seed))).all()
    assert sar.loss_ema is not None and sar.recoveries == 0
    moved = state(sar.model)
    changed = [k for k in source if not torch.equal(source[k], moved[k])]
    assert changed and all(k.endswith(("1.weight", "1.bias", "4.weight", "4.bias")) for k in changed)
    sar.recovery_threshold = float("inf")  # every loss is "collapsed": the next step recovers
    sar(shifted_images(16, 9))
    assert sar.recoveries == 1 and sar.loss_ema is None
    assert_same_state(state(sar.model), source)
    sar.reset()
    assert sar.recoveries == 0


def test_sar_returns_the_logits_before_its_step_and_skips_unreliable_batches():
    model = conv_model()
    sar = SAR(model, margin_fraction=1e-6)  # nothing is reliable: no step
    source = state(sar.model)
    x = shifted_images(16, 3)
    with torch.no_grad():
        expected = sar.model(x)
    torch.testing.assert_close(sar(x), expected)
    assert_same_state(state(sar.model), source)
    assert sar.loss_ema is None


def test_roid_weight_ensembling_keeps_weights_in_the_source_update_mix():
    model = conv_model()
    roid = ROID(model, lr=1e-2)
    source = [p.detach().clone() for p in roid.parameters]
    logits = roid(shifted_images(16, 4))
    assert torch.isfinite(logits).all()
    moved = False
    for p, s in zip(roid.parameters, source):
        step = (p - s).abs().max()
        assert step <= 0.99 * 1e-2 * (1 + 1e-4) + 1e-7  # Adam's first step is at most lr; 1 % pulled back to the source
        moved |= bool(step > 0)
    assert moved
    pinned = ROID(model, lr=1e-2, ensemble_momentum=0.0)  # all weight on the source
    pinned(shifted_images(16, 4))
    for p, s in zip(pinned.parameters, source):
        assert torch.equal(p, s)
    roid.reset()
    for p, s in zip(roid.parameters, source):
        assert torch.equal(p, s)


def test_roid_weights_and_prior_correction():
    roid = ROID(conv_model())
    logits = torch.randn(32, 3) * 3
    weights = roid.weights(logits)
    assert (weights == 0).any() and (weights >= 1).sum() > 0
    assert torch.all((weights == 0) | (weights >= 1)) and torch.all(weights <= math.exp(3) + 1e-5)
    corrected = ROID.prior_corrected(logits)
    assert torch.isfinite(corrected).all()
    torch.testing.assert_close(corrected.exp().sum(dim=1) > 0, torch.ones(32, dtype=torch.bool))
    # one sample: no range to normalise over, weight 1
    assert torch.equal(roid.weights(torch.randn(1, 3)), torch.ones(1))


def test_actmad_reference_statistics_and_update():
    model = conv_model()
    calibration = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    method = ActMAD(model, calibration)
    with torch.no_grad():
        clean = torch.cat([model[1](model[0](x)) for x in calibration])
    mean, variance = method.reference[0]
    torch.testing.assert_close(mean, clean.mean(dim=0))
    torch.testing.assert_close(variance, clean.var(dim=0), rtol=1e-4, atol=1e-5)
    assert len(method.reference) == 2
    source = state(method.model)
    x = shifted_images(16, 5)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(method(x), expected)  # eval-mode BN: the source's prediction, then the step
    after = state(method.model)
    assert not torch.equal(after["0.weight"], source["0.weight"])  # every parameter trains
    assert torch.equal(after["1.running_mean"], source["1.running_mean"])  # statistics stay the source's
    with pytest.raises(ValueError, match="at least 2"):
        method(shifted_images(1, 6))
    method.reset()
    assert_same_state(state(method.model), source)
    pooled = ActMAD(model, calibration, per_location=False)
    assert pooled.reference[0][0].shape == (4,)
    assert torch.isfinite(pooled(shifted_images(1, 7))).all()


@pytest.mark.parametrize("make", [RoTTARBN, RoTTA, SAR, ROID, lambda m: ActMAD(m, [shifted_images(16, 99)])],
                         ids=["RoTTA-RBN", "RoTTA", "SAR", "ROID", "ActMAD"])
def test_global_random_stream_untouched_and_reset_is_exact(make):
    model = conv_model()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    method = make(model)
    first = [method(shifted_images(16, seed)) for seed in range(4)]
    assert all(torch.isfinite(logits).all() for logits in first)
    assert torch.equal(torch.get_rng_state(), before)
    method.reset()
    again = [method(shifted_images(16, seed)) for seed in range(4)]
    for a, b in zip(first, again):  # a reset replays the same stream bit for bit
        assert torch.equal(a, b)
