"""Label-free accuracy estimates (confidence, ATC, DoC) and the harmful-only alarm mode."""

import math

import pytest
import torch
from torch import nn

import selfheal_ext as sh
from selfheal_ext.accuracy_estimate import AccuracyEstimator


def test_atc_threshold_matches_the_reference_accuracy_and_doc_formula():
    generator = torch.Generator().manual_seed(0)
    confidence = torch.rand(1000, generator=generator) * 0.5 + 0.5
    correct = torch.rand(1000, generator=generator) < confidence
    estimator = AccuracyEstimator.fit(confidence, correct)
    accuracy = float(correct.double().mean())
    assert estimator.reference_accuracy == pytest.approx(accuracy)
    assert float((confidence > estimator.atc_threshold).double().mean()) == pytest.approx(accuracy, abs=1e-3)
    target = confidence * 0.8
    estimates = estimator.estimate(float(target.sum()), float(estimator.batch_sums(target)), 1000)
    assert estimates["atc"] == pytest.approx(float((target > estimator.atc_threshold).double().mean()))
    assert estimates["doc"] == pytest.approx(accuracy - (float(confidence.mean()) - float(target.mean())))
    assert estimator.drop(estimates, "auto") == pytest.approx(accuracy - estimates["atc"])
    unlabelled = AccuracyEstimator.fit(confidence)
    estimates = unlabelled.estimate(float(target.sum()), 0.0, 1000)
    assert estimates["atc"] is None and estimates["doc"] is None and not estimates["labelled"]
    assert unlabelled.drop(estimates, "auto") == pytest.approx(float(confidence.mean() - target.mean()))
    with pytest.raises(ValueError, match="needs labels"):
        unlabelled.drop(estimates, "atc")


def test_estimator_state_is_validated():
    good = AccuracyEstimator(0.9, 0.85, 0.7).state_dict()
    assert AccuracyEstimator.from_state(good) == AccuracyEstimator(0.9, 0.85, 0.7)
    for bad in (dict(good, reference_confidence=1.5), dict(good, atc_threshold=None),
                dict(good, reference_accuracy="x"), dict(good, atc_threshold=math.nan), [1, 2]):
        with pytest.raises(ValueError, match="accuracy_estimator"):
            AccuracyEstimator.from_state(bad)


def _model():
    """A fixed classifier of two classes on feature 0; features 1-7 are
    watched (the head's input) but do not affect the prediction."""
    model = nn.Sequential(nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
        model[0].weight[0, 0], model[0].weight[1, 0] = -1.5, 1.5
    return model


def _batches(batches, seed, separation=1.5, nuisance=0.0, size=64):
    """Class means at +-``separation`` on feature 0: a smaller separation
    costs accuracy (more overlap); ``nuisance`` shifts the ignored features."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        y = torch.randint(0, 2, (size,), generator=generator)
        x = torch.randn(size, 8, generator=generator)
        x[:, 0] += (2 * y - 1).float() * separation
        x[:, 1:] += nuisance
        out.append((x, y))
    return out


def _monitor(**options):
    monitor = sh.DriftMonitor(_model(), window=256, false_alarm_every=1000, bootstrap=1000, **options)
    report = monitor.calibrate(_batches(40, seed=1))
    return monitor, report


def _run(monitor, stream):
    monitor.reset()
    alarms, suppressed, correct, total = 0, 0, 0, 0
    for x, y in stream:
        logits = monitor(x)
        correct += int((logits.argmax(dim=1) == y).sum())
        total += len(y)
        alarms += monitor.drift_detected
        suppressed += bool(monitor.last_report.suppressed)
    return alarms, suppressed, correct / total


def test_harmful_only_mode_suppresses_a_benign_shift_and_raises_a_harmful_one():
    plain, calibration = _monitor()
    harmful_only, _ = _monitor(alarm_min_drop=0.05)
    reference_accuracy = calibration.reference_accuracy
    benign = _batches(16, seed=2, nuisance=2.0)
    harmful = _batches(16, seed=3, separation=0.5)
    alarms, _, accuracy = _run(plain, benign)
    assert alarms > 0 and accuracy > reference_accuracy - 0.03  # the data moved, the accuracy did not
    alarms, suppressed, _ = _run(harmful_only, benign)
    assert alarms == 0 and suppressed > 0
    report = harmful_only.last_report
    assert report.suppressed and abs(report.estimated_drop) < 0.05 and report.attribution is not None
    alarms, _, accuracy = _run(harmful_only, harmful)
    assert accuracy < reference_accuracy - 0.15
    assert alarms > 0 and harmful_only.last_report.estimated_drop > 0.1
    estimates = harmful_only.last_report.accuracy_estimates
    assert estimates["labelled"] and estimates["reference"] == pytest.approx(reference_accuracy)
    # the shift makes the source model over-confident: every estimate is above the truth, none above the reference
    for name in ("confidence", "atc", "doc"):
        assert accuracy - 0.02 < estimates[name] < reference_accuracy - 0.05, name


def test_labels_are_needed_for_atc_and_doc_and_the_state_keeps_the_estimator():
    monitor = sh.DriftMonitor(_model(), window=256, false_alarm_every=1000, bootstrap=1000, accuracy_estimator="atc")
    with pytest.raises(ValueError, match="calibrate on \\(x, y\\) pairs"):
        monitor.calibrate([x for x, _ in _batches(40, seed=1)])
    with pytest.raises(ValueError, match="alarm_min_drop"):
        sh.DriftMonitor(_model(), alarm_min_drop=5)
    with pytest.raises(ValueError, match="accuracy_estimator"):
        sh.DriftMonitor(_model(), accuracy_estimator="agreement")
    unlabelled = sh.DriftMonitor(_model(), window=256, false_alarm_every=1000, bootstrap=1000)
    report = unlabelled.calibrate([x for x, _ in _batches(40, seed=1)])
    assert any("no ATC/DoC" in note for note in report.notes)
    unlabelled(_batches(1, seed=4)[0][0])
    assert unlabelled.last_report.accuracy_estimates["atc"] is None

    monitor, _ = _monitor(alarm_min_drop=0.05)
    state = monitor.state_dict()
    assert state["config"]["alarm_min_drop"] == 0.05 and state["accuracy_estimator"]["atc_threshold"] is not None
    restored = sh.DriftMonitor(_model(), window=256, false_alarm_every=1000, bootstrap=1000, alarm_min_drop=0.05)
    restored.load_state_dict(state)
    for x, _ in _batches(6, seed=5, separation=0.5):
        monitor(x), restored(x)
        assert monitor.last_report.accuracy_estimates == restored.last_report.accuracy_estimates
    corrupt = dict(state, accuracy_estimator=dict(state["accuracy_estimator"], reference_accuracy=2.0))
    fresh = sh.DriftMonitor(_model(), window=256, false_alarm_every=1000, bootstrap=1000, alarm_min_drop=0.05)
    with pytest.raises(ValueError, match="accuracy_estimator"):
        fresh.load_state_dict(corrupt)
    assert not fresh.calibrated
    # a state saved before the estimators (no key, five window statistics) loads with the mean confidence only
    plain, _ = _monitor()
    old = {k: v for k, v in plain.state_dict().items() if k != "accuracy_estimator"}
    old["window_state"] = dict(old["window_state"], ring_stats=old["window_state"]["ring_stats"][:, :5])
    again = sh.DriftMonitor(_model(), window=256, false_alarm_every=1000, bootstrap=1000)
    again.load_state_dict(old)
    again(_batches(1, seed=6)[0][0])
    assert again.last_report.accuracy_estimates["atc"] is None
