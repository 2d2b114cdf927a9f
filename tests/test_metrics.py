"""Prometheus exposition: scraped over loopback, the values match the healer."""
import copy
import re
import urllib.request

import pytest
import torch

from selfheal_ext import SelfHealer
from healing_data import Task, trained_model

prometheus_client = pytest.importorskip("prometheus_client")
from selfheal_ext.metrics import Metrics  # noqa: E402


def _scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_scraped_over_loopback_match_the_healer():
    task = Task()
    healer = SelfHealer(copy.deepcopy(trained_model(task)),
                        monitor_options=dict(window=256, false_alarm_every=200, bootstrap=400))
    healer.calibrate([task.sample(64)[0] for _ in range(24)])
    metrics = Metrics(healer)
    port = metrics.serve(port=0)
    try:
        for _ in range(5):
            healer(task.sample(64)[0])
        clean = _scrape(port)
        assert clean["selfheal_batches_total"] == 5 and clean["selfheal_samples_total"] == 320
        assert clean["selfheal_adapters_active"] == 0 and clean["selfheal_drift_alarm"] == 0
        for _ in range(20):
            healer(task.sample(64, corrupt=True)[0])
        drifted = _scrape(port)
        assert drifted["selfheal_batches_total"] == 25
        assert drifted["selfheal_adapters_active"] == 1 and drifted["selfheal_alarms_total"] >= 1
        assert drifted["selfheal_adaptation_steps_total"] == healer.steps > 0
        assert drifted['selfheal_events_total{kind="step"}'] == healer.steps
        assert drifted["selfheal_drift_score"] == pytest.approx(healer.drift.score)
        assert drifted["selfheal_drift_threshold"] == pytest.approx(healer.monitor.window_threshold)
        assert 0 < drifted["selfheal_estimated_accuracy"] <= 1
        for phase in ("forward", "monitor", "adapt"):
            assert drifted[f'selfheal_batch_seconds_count{{phase="{phase}"}}'] == 25
        # bound to localhost only
        assert metrics._server.server_address[0] == "127.0.0.1"
    finally:
        metrics.close()
    healer(task.sample(64)[0])  # no listener any more: nothing breaks


def test_metrics_count_read_batches_once_with_read_every():
    task = Task()
    healer = SelfHealer(copy.deepcopy(trained_model(task)),
                        monitor_options=dict(window=256, false_alarm_every=800, bootstrap=400, read_every=4))
    healer.calibrate([task.sample(64)[0] for _ in range(24)])
    metrics = Metrics(healer)
    for _ in range(10):
        healer(task.sample(64)[0])
    values = {metric.name: {sample.name: sample.value for sample in metric.samples}
              for metric in metrics.registry.collect()}
    assert values["selfheal_batches"]["selfheal_batches_total"] == 10
    # batches 1, 5 and 9 were read; the unread ones repeat a reading, counted once
    assert values["selfheal_batches_read"]["selfheal_batches_read_total"] == 3 == healer.monitor.batches_seen
    assert values["selfheal_samples_read"]["selfheal_samples_read_total"] == 3 * 64
    assert values["selfheal_samples"]["selfheal_samples_total"] == 10 * 64
    healer.remove_listener(metrics)


def test_a_failing_listener_is_removed_and_serving_goes_on():
    task = Task()
    healer = SelfHealer(copy.deepcopy(trained_model(task)),
                        monitor_options=dict(window=256, false_alarm_every=200, bootstrap=400))
    healer.calibrate([task.sample(64)[0] for _ in range(24)])

    def broken(h, report):
        raise RuntimeError("observer bug")

    healer.add_listener(broken)
    with pytest.warns(RuntimeWarning, match="observer bug"):
        out = healer(task.sample(8)[0])
    assert out.shape == (8, 5) and broken not in healer._listeners


def test_closed_metrics_are_not_served_and_bad_ports_are_named():
    healer = SelfHealer(copy.deepcopy(trained_model(Task())))
    metrics = Metrics(healer)
    for port in ("abc", -1, 70000, 1.5, True, None):
        with pytest.raises(ValueError, match=r"argument 'port' must be an int in 0\.\.65535"):
            metrics.serve(port=port)
    metrics.close()
    metrics.close()  # idempotent
    # serving now would publish values frozen at close()
    with pytest.raises(RuntimeError, match="closed"):
        metrics.serve(port=0)
    assert metrics not in healer._listeners
