"""Symbolic rules: each kind blocks a violating model and passes a clean one
(unit level), differentiable penalties point the right way, and in the healer
the gate refuses and rolls back a version that breaks a rule on the recent
buffer while a rule that holds changes nothing."""
import copy

import pytest
import torch

from selfheal_ext import SelfHealer
from selfheal_ext.rules import (ClassRate, Forbidden, Monotonic, RuleContext, SourceAgreement, UserRule,
                                check_rules, total_penalty, validate_rules)
from healing_data import C, Task, accuracy, trained_model

MONITOR = dict(window=256, false_alarm_every=200, bootstrap=400)


def _probs(classes, n_classes=3, confidence=0.9):
    classes = torch.as_tensor(classes)
    probs = torch.full((classes.shape[0], n_classes), (1 - confidence) / (n_classes - 1))
    probs[torch.arange(classes.shape[0]), classes] = confidence
    return probs


def test_class_rate():
    x = torch.zeros(10, 2)
    source = _probs([0] * 2 + [1] * 8)                      # rate of class 0: 0.2
    rule = ClassRate(0, 0.0, 0.3)
    bad = rule.check(RuleContext(x, _probs([0] * 5 + [1] * 5), source))
    assert not bad.ok and bad.violation == pytest.approx(0.2) and bad.source_violation == 0
    assert rule.check(RuleContext(x, _probs([0] * 3 + [1] * 7), source)).ok
    # a source that already breaks the bound does not freeze adaptation, but it may not get worse
    worse_source = _probs([0] * 6 + [1] * 4)
    assert rule.check(RuleContext(x, _probs([0] * 5 + [1] * 5), worse_source)).ok
    assert not rule.check(RuleContext(x, _probs([0] * 7 + [1] * 3), worse_source)).ok
    # penalty: gradient lowers class 0's probability when above the bound
    probs = _probs([0] * 5 + [1] * 5).requires_grad_(True)
    rule.penalty(RuleContext(x, probs, source)).backward()
    assert (probs.grad[:, 0] > 0).all()
    with pytest.raises(ValueError):
        ClassRate(0, 0.5, 0.2)


def test_monotonic():
    x = torch.randn(32, 3)

    def model(direction):
        return lambda z: torch.stack([1 - torch.sigmoid(direction * z[:, 1]), torch.sigmoid(direction * z[:, 1])], 1)

    rule = Monotonic("age", 1, feature_names=["income", "age", "zip"], step=0.5)
    source = model(1.0)
    for direction, ok in ((-1.0, False), (2.0, True)):
        adapted = model(direction)
        result = rule.check(RuleContext(x, adapted(x), source(x), model=adapted, source_model=source))
        assert result.ok is ok and (result.violation > 0) is (not ok) and result.source_violation == 0
    # penalty flows through the model's parameters
    weight = torch.tensor(-1.0, requires_grad=True)
    fn = lambda z: torch.stack([1 - torch.sigmoid(weight * z[:, 1]), torch.sigmoid(weight * z[:, 1])], 1)
    rule.penalty(RuleContext(x, fn(x), model=fn)).backward()
    assert weight.grad < 0  # increasing the weight reduces the violation
    decreasing = Monotonic(1, 1, increasing=False, step=0.5)
    assert not decreasing.check(RuleContext(x, source(x), model(-1.0)(x), model=source, source_model=model(-1.0))).ok
    with pytest.raises(ValueError, match="feature_names"):
        Monotonic("age", 1)
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        rule.check(RuleContext(torch.randn(4, 3, 2), torch.rand(4, 2), model=source))


def test_forbidden():
    x = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])
    rule = Forbidden(lambda z: z[:, 0] > 0, classes=[2])
    source = _probs([0, 1, 2, 2])  # class 2 only where the predicate does not hold
    assert rule.check(RuleContext(x, _probs([0, 0, 2, 1]), source)).ok
    bad = rule.check(RuleContext(x, _probs([2, 0, 2, 2]), source))
    assert not bad.ok and bad.violation == pytest.approx(0.5)
    probs = source.clone().requires_grad_(True)
    rule.penalty(RuleContext(x, probs, source)).backward()
    assert (probs.grad[:2, 2] > 0).all() and (probs.grad[2:] == 0).all()
    # no matching row: nothing to violate
    assert rule.check(RuleContext(-x.abs(), _probs([2, 2, 2, 2]), source)).violation == 0


def test_source_agreement_on_a_protected_slice():
    x = torch.arange(20.0).reshape(20, 1)
    source = _probs([0] * 20)
    rule = SourceAgreement(0.9, where=lambda z: z[:, 0] < 10)
    flipped_outside = _probs([0] * 10 + [1] * 10)
    assert rule.check(RuleContext(x, flipped_outside, source)).ok
    flipped_inside = _probs([1] * 2 + [0] * 18)
    result = rule.check(RuleContext(x, flipped_inside, source))
    assert not result.ok and result.violation == pytest.approx(0.1)
    probs = flipped_inside.clone().requires_grad_(True)
    assert rule.penalty(RuleContext(x, probs, source)) > 0


def test_user_rules_and_validation():
    x = torch.zeros(4, 2)
    never_two = UserRule(lambda inputs, probs: bool((probs.argmax(1) != 2).all()), "never class 2")
    assert never_two.check(RuleContext(x, _probs([0, 1, 0, 1]), _probs([0, 0, 0, 0]))).ok
    assert not never_two.check(RuleContext(x, _probs([0, 2, 0, 1]), _probs([0, 0, 0, 0]))).ok
    soft = UserRule(lambda inputs, probs: probs[:, 2].mean(), "little class 2", tolerance=0.1)
    probs = _probs([0, 1, 0, 1]).requires_grad_(True)
    assert soft.penalty(RuleContext(x, probs)) is not None
    total = total_penalty([never_two, soft], RuleContext(x, probs))
    assert total.requires_grad  # the bool rule has no penalty; the soft one does
    results = check_rules([never_two, soft], RuleContext(x, _probs([0, 1, 0, 1]), _probs([0, 0, 0, 0])))
    assert [r.ok for r in results] == [True, True]
    results = check_rules([never_two, soft], RuleContext(x, _probs([0, 2, 0, 1]), _probs([0, 0, 0, 0])))
    assert [r.ok for r in results] == [False, False]  # p(class 2) 0.26 vs the source's 0.05 + 0.1
    with pytest.raises(ValueError, match="non-finite"):
        UserRule(lambda i, p: float("nan"), "nan").check(RuleContext(x, _probs([0, 1, 0, 1])))
    with pytest.raises(TypeError, match="UserRule"):
        validate_rules([lambda i, p: True])
    with pytest.raises(ValueError, match="unique"):
        validate_rules([never_two, never_two])


# ------------------------------------------------------------------- healer


@pytest.fixture(scope="module")
def setting():
    task = Task()
    model = trained_model(task)
    calibration = [task.sample(64)[0] for _ in range(24)]
    stream = [task.sample(64, corrupt=True) for _ in range(40)]
    return task, model, calibration, stream


def _healer(setting, **options):
    task, model, calibration, _ = setting
    healer = SelfHealer(copy.deepcopy(model), monitor_options=MONITOR, **options)
    healer.calibrate(calibration)
    return healer


def _rate(healer, x, cls):
    with torch.no_grad(), healer.monitor.paused():
        healer.adapters.set_update_running(False)
        try:
            return float((healer.model(x).argmax(1) == cls).float().mean())
        finally:
            healer.adapters.set_update_running(True)


def test_the_gate_refuses_a_version_that_breaks_a_rule(setting):
    task, model, _, stream = setting
    free = _healer(setting)
    for x, _ in stream:
        free(x)
    buffer = torch.cat([x for x, _ in stream[-4:]])
    with torch.no_grad():
        source_rates = torch.bincount(model(buffer).argmax(1), minlength=C).float() / buffer.shape[0]
    healed_rates = torch.tensor([_rate(free, buffer, c) for c in range(C)])
    cls = int((healed_rates - source_rates).argmax())  # the class healing predicts more often
    assert healed_rates[cls] > source_rates[cls] + 0.02
    bound = float(source_rates[cls]) + 0.005
    rule = ClassRate(cls, 0.0, bound, weight=0.0)  # gate only, no penalty
    gated = _healer(setting, rules=[rule])
    for x, _ in stream:
        gated(x)
        # after every batch, the served version keeps the rule on the recent buffer
        # (or breaks it no more than the source does)
        recent = gated._buffer()
        served = _rate(gated, recent, cls)
        with torch.no_grad():
            source = float((model(recent).argmax(1) == cls).float().mean())
        assert served <= max(bound, source) + 1e-6
    violations = [e for e in gated.events if e.kind == "rule_violation"]
    assert violations and all(e.detail["results"][0]["rule"] == rule.name for e in violations)
    assert [e.kind for e in gated.events].count("rollback") >= len(violations)


def test_a_rule_that_holds_changes_nothing_and_penalties_steer(setting):
    task, model, _, stream = setting
    free = _healer(setting)
    holds = _healer(setting, rules=[ClassRate(0, 0.0, 1.0, weight=0.0)])
    out_free = [free(x) for x, _ in stream]
    out_holds = [holds(x) for x, _ in stream]
    assert all(torch.equal(a, b) for a, b in zip(out_free, out_holds))
    assert not any(e.kind == "rule_violation" for e in holds.events)
    # a penalty on class 1's mean probability (tolerance 1: never gated, only
    # the penalty acts) lowers it, at a learning rate where the steps matter
    free = _healer(setting, lr=1e-2)
    steered = _healer(setting, lr=1e-2, rules=[UserRule(lambda z, p: p[:, 1].mean(), "less class 1",
                                                        weight=5.0, tolerance=1.0)])
    out_free = [free(x) for x, _ in stream]
    out_steered = [steered(x) for x, _ in stream]
    mean_p1 = lambda outs: float(torch.cat([torch.softmax(o, 1)[:, 1] for o in outs[10:]]).mean())
    assert mean_p1(out_steered) < mean_p1(out_free) - 0.02
    labels = [y for _, y in stream]
    assert accuracy(out_steered, labels) > 0.9  # still a good classifier
