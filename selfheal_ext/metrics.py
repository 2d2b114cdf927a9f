"""Prometheus metrics for a serving ``SelfHealer`` (optional:
``pip install prometheus_client``).

    metrics = Metrics(healer)            # registers itself as a listener of the healer
    metrics.serve(port=9108)             # http://127.0.0.1:9108/metrics (localhost by default)

Exposed (prefix ``selfheal_``): ``drift_score``, ``drift_threshold``,
``drift_alarm`` (0/1), ``cusum_up``, ``estimated_accuracy`` (window, label-free),
``entropy_mean``, ``adapters_active``, ``adapter_version``,
``batches_total``, ``batches_read_total``, ``samples_total`` (served by this
process), ``samples_read_total`` (read by the monitor; with a process group,
summed over the ranks), ``alarms_total``, ``adaptation_steps_total``,
``rollbacks_total``, ``guard_trips_total``, ``rule_violations_total``,
``events_total{kind}``, and ``batch_seconds{phase}`` (histogram of the time a
served batch spends in the model forward with taps and adapters, in the
monitor's decision, and in adaptation and guards — the monitoring and
healing overhead as seen in production).
"""

from __future__ import annotations

import threading
from typing import Optional

_COUNTED = {"step": "adaptation_steps", "rollback": "rollbacks", "guard": "guard_trips",
            "rule_violation": "rule_violations"}


class Metrics:
    def __init__(self, healer, *, registry=None, prefix: str = "selfheal"):
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as error:
            raise ImportError("selfheal: metrics need prometheus_client (pip install prometheus_client)") from error
        self.registry = registry if registry is not None else CollectorRegistry()
        self.healer = healer
        self._lock = threading.Lock()
        self._server = None
        self._thread = None
        self._closed = False
        gauge = lambda name, text: Gauge(f"{prefix}_{name}", text, registry=self.registry)  # noqa: E731
        counter = lambda name, text, labels=(): Counter(f"{prefix}_{name}", text, labels,  # noqa: E731
                                                        registry=self.registry)
        self.drift_score = gauge("drift_score", "Standardised window drift score of the last batch")
        self.drift_threshold = gauge("drift_threshold", "Calibrated threshold of the window drift score")
        self.drift_alarm = gauge("drift_alarm", "1 when the last batch raised a drift alarm")
        self.cusum_up = gauge("cusum_up", "Upper CUSUM statistic of the batch scores")
        self.estimated_accuracy = gauge("estimated_accuracy", "Label-free accuracy estimate over the window")
        self.entropy_mean = gauge("entropy_mean", "Mean prediction entropy over the window (nats)")
        self.adapters_active = gauge("adapters_active", "1 while adapters are active")
        self.adapter_version = gauge("adapter_version", "Adapter version being served (0: the source model)")
        self.batches = counter("batches", "Batches served")
        self.batches_read = counter("batches_read", "Batches the monitor read (all of them unless read_every > 1)")
        self.samples = counter("samples", "Samples served by this process")
        self.samples_read = counter("samples_read", "Samples the monitor read (all of them unless read_every > 1)")
        self.alarms = counter("alarms", "Read batches that raised a drift alarm")
        self.counted = {name: counter(name, f"{name.replace('_', ' ').capitalize()}") for name in _COUNTED.values()}
        self.events = counter("events", "Healer events by kind", ("kind",))
        self.batch_seconds = Histogram(
            f"{prefix}_batch_seconds", "Seconds per served batch by phase", ("phase",), registry=self.registry,
            buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5))
        self._last_seq = healer.event_count
        healer.add_listener(self)

    def _new_events(self, events):
        """Events after the last one counted, by sequence number (the list is
        bounded: its oldest entries are dropped, so positions shift)."""
        new = [event for event in events[-max(0, self.healer.event_count - self._last_seq):]
               if event.seq > self._last_seq] if self.healer.event_count > self._last_seq else []
        self._last_seq = self.healer.event_count
        return new

    def __call__(self, healer, report) -> None:
        """Updates every metric from the batch just served (the healer's listener)."""
        with self._lock:
            if report is not None:
                self.drift_score.set(report.score)
                self.drift_threshold.set(report.threshold)
                self.drift_alarm.set(1.0 if report.drift else 0.0)
                self.cusum_up.set(report.cusum[0])
                self.estimated_accuracy.set(report.accuracy_estimate)
                self.entropy_mean.set(report.entropy_mean)
                self.batches.inc()
                self.samples.inc(getattr(healer, "batch_samples", report.samples))
                if report.read and report.samples:  # an unread batch repeats the last reading: counted once
                    self.batches_read.inc()
                    self.samples_read.inc(report.samples)
                    if report.drift:
                        self.alarms.inc()
            self.adapters_active.set(1.0 if healer.active else 0.0)
            self.adapter_version.set(healer.version)
            for event in self._new_events(healer.events):
                self.events.labels(kind=event.kind).inc()
                if event.kind in _COUNTED:
                    self.counted[_COUNTED[event.kind]].inc()
            for phase, seconds in getattr(healer, "timing", {}).items():
                self.batch_seconds.labels(phase=phase).observe(seconds)

    def serve(self, port: int = 9108, addr: str = "127.0.0.1") -> int:
        """Starts the HTTP exposition (``/metrics``) on ``addr:port`` (port 0:
        any free port) in a daemon thread; returns the port. Refused after
        ``close()``: closed metrics no longer follow the healer, and serving
        them would publish frozen values (make a new ``Metrics(healer)``)."""
        from prometheus_client import start_http_server
        if self._closed:
            raise RuntimeError("selfheal: these metrics were closed and no longer follow the healer; "
                               "create a new Metrics(healer) to serve again")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"selfheal: argument 'port' must be an int in 0..65535 (0: any free port), "
                             f"got {port!r}")
        if not isinstance(addr, str) or not addr:
            raise ValueError(f"selfheal: argument 'addr' must be a host address string, got {addr!r}")
        if self._server is not None:
            raise RuntimeError("selfheal: metrics are already served")
        started = start_http_server(port, addr=addr, registry=self.registry)
        if isinstance(started, tuple):  # prometheus_client >= 0.17 returns (server, thread)
            self._server, self._thread = started
            return self._server.server_port
        return port

    def close(self) -> None:
        """Stops following the healer and stops serving; idempotent."""
        self._closed = True
        self.healer.remove_listener(self)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
