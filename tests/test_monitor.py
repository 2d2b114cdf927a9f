"""DriftMonitor end to end on small seeded models and streams."""

import io
import math

import pytest
import torch
from torch import nn

import selfheal_ext as sh
from conftest import DEVICES


def _mlp(seed=0, outputs=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, outputs)).eval()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 96, 3, padding=1),
                                      nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(96, 5)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


def _stream(batches, size, seed, shift=0.0, scale=1.0, features=8):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, features, generator=generator) * scale + shift for _ in range(batches)]


def _calibrated(model=None, batches=40, size=32, **kwargs):
    model = model or _mlp()
    kwargs.setdefault("window", 64)
    kwargs.setdefault("false_alarm_every", 100_000)
    kwargs.setdefault("bootstrap", 2000)
    monitor = sh.DriftMonitor(model, **kwargs)
    report = monitor.calibrate(_stream(batches, size, seed=1))
    return monitor, report


def test_default_taps_mlp_and_cnn():
    assert sh.DriftMonitor(_mlp()).tap_names == ["0", "2", "4"]
    # Blocks of the CNN: 'features' (one block holding both convolutions) and the head.
    assert sh.DriftMonitor(SmallCNN()).tap_names == ["features", "head"]
    assert sh.DriftMonitor(SmallCNN(), taps=[nn.Conv2d]).tap_names == ["features.0", "features.2"]
    with pytest.raises(ValueError, match="no module named 'nope'"):
        sh.DriftMonitor(_mlp(), taps=["nope"])


def test_failed_recalibration_keeps_the_old_reference():
    monitor, _ = _calibrated()
    twin, _ = _calibrated()
    with pytest.raises(ValueError, match="at least 256"):
        monitor.calibrate(_stream(2, 10, seed=0))
    for x in _stream(3, 32, seed=15):
        a, b = monitor(x), twin(x)
        assert monitor.last_report.score == twin.last_report.score


def test_calibration_refuses_too_little_data():
    monitor = sh.DriftMonitor(_mlp(), window=64)
    with pytest.raises(ValueError, match=r"at least 256 healthy samples .*got 100"):
        monitor.calibrate(_stream(10, 10, seed=0))
    with pytest.raises(RuntimeError, match="before calibrate"):
        monitor.update(torch.zeros(2, 4))


def test_clean_stream_has_no_alarm_and_change_point_is_found_quickly():
    monitor, report = _calibrated()
    assert report.samples == 1280 and report.dropped_nonfinite == 0
    for x in _stream(300, 32, seed=2):
        monitor(x)
        assert not monitor.drift_detected, monitor.last_report
    delays = {}
    for shift in (0.5, 1.0):
        monitor.reset()
        for x in _stream(10, 32, seed=3):
            monitor(x)
        for batch, x in enumerate(_stream(30, 32, seed=4, shift=shift)):
            monitor(x)
            if monitor.drift_detected:
                delays[shift] = batch + 1
                break
        else:
            pytest.fail(f"shift {shift} not detected in 30 batches")
    # A 1-sigma shift of every input is plain within two 32-sample batches; a
    # half-sigma one at this strict level (one false alarm per 100,000 batches)
    # takes a CUSUM run or a fuller window.
    assert delays[1.0] <= 3 and delays[0.5] <= 20, delays
    attribution = monitor.last_report.attribution
    assert attribution is not None and set(attribution.signals) == {"0", "2", "4", "entropy_mean", "entropy_tail"}
    assert attribution.top_signal in ("0", "2", "4")
    assert len(attribution.features["0"]) == 5


def test_small_persistent_shift_is_caught_by_cusum():
    monitor, _ = _calibrated(batches=80, false_alarm_every=10_000)
    reasons = set()
    for batch, x in enumerate(_stream(200, 32, seed=5, shift=0.15)):
        monitor(x)
        if monitor.drift_detected:
            reasons.update(monitor.last_report.reasons)
            break
    else:
        pytest.fail("a persistent 0.15-sigma shift went unnoticed for 200 batches")
    assert reasons


def test_a_large_shift_alarms_on_its_first_batch_while_the_window_fills():
    monitor, report = _calibrated()
    assert math.isfinite(report.batch_threshold) and report.batch_threshold == monitor.batch_threshold
    # the per-batch test's false-alarm share: under the CUSUM's threshold, above
    # the limit a standard normal crosses once per 100,000 batches (two sides)
    assert 4.4 < monitor.batch_threshold < monitor.cusum_threshold
    for x in _stream(300, 32, seed=2):  # (clean: never past the limit)
        monitor(x)
        assert "batch" not in monitor.last_report.reasons
    monitor.reset()
    monitor(_stream(1, 32, seed=4, shift=2.0)[0])
    first = monitor.last_report
    assert first.warming_up and first.drift and first.reasons == ("batch",), first
    assert max(first.cusum) < monitor.cusum_threshold  # (the CUSUM alone would still wait)
    # the same batch scored inside the limit does not alarm on this test
    monitor.reset()
    monitor.batch_threshold = math.inf
    monitor(_stream(1, 32, seed=4, shift=2.0)[0])
    assert not monitor.last_report.drift


def test_states_saved_before_the_batch_test_load_with_it_off():
    monitor, _ = _calibrated()
    state = monitor.state_dict()
    assert state["batch_threshold"] == monitor.batch_threshold
    old = {key: value for key, value in state.items() if key != "batch_threshold"}
    restored = sh.DriftMonitor(_mlp(), window=64, false_alarm_every=100_000, bootstrap=2000)
    with pytest.warns(RuntimeWarning, match="predates the per-batch test"):
        restored.load_state_dict(old)
    assert restored.batch_threshold == math.inf
    restored(_stream(1, 32, seed=4, shift=2.0)[0])
    assert "batch" not in restored.last_report.reasons
    for bad in (float("nan"), -1.0, 0.0):
        fresh = sh.DriftMonitor(_mlp(), window=64, false_alarm_every=100_000, bootstrap=2000)
        with pytest.raises(ValueError, match="batch_threshold"):
            fresh.load_state_dict(dict(state, batch_threshold=bad))
        assert not fresh.calibrated and not hasattr(fresh, "reference_counts")  # (refused before any change)


def test_signals_match_the_bootstrap_computation():
    monitor, _ = _calibrated()
    for x in _stream(5, 32, seed=6, shift=0.3):
        report = monitor.update(monitor.model(x))
    counts, stats, samples = monitor._window.totals()
    features, bins = monitor.reference_counts.shape
    raw = monitor._raw_signals(counts[: features * bins].view(1, features, bins), stats[0:1], stats[2:3],
                               stats[3:4], samples)
    z = monitor._standardise(raw)[0]
    assert z.tolist() == pytest.approx(list(report.signals.values()), rel=1e-9, abs=1e-9)
    assert report.score == pytest.approx(z.max().item())


@pytest.mark.parametrize("window_kind", ["sliding", "exponential"])
def test_state_round_trip_gives_identical_decisions(window_kind):
    monitor, _ = _calibrated(window_kind=window_kind)
    for x in _stream(7, 32, seed=7):
        monitor(x)
    buffer = io.BytesIO()
    torch.save(monitor.state_dict(), buffer)
    buffer.seek(0)
    restored = sh.DriftMonitor(_mlp(), window=64, false_alarm_every=100_000, bootstrap=2000, window_kind=window_kind)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    for x in _stream(6, 32, seed=8) + _stream(6, 32, seed=9, shift=0.8):
        a = monitor.update(monitor.model(x))
        b = restored.update(restored.model(x))
        assert (a.drift, a.reasons, a.score, a.cusum, a.signals) == (b.drift, b.reasons, b.score, b.cusum, b.signals)
    assert a.drift


def test_load_state_dict_rejects_other_configurations_and_corruption():
    monitor, _ = _calibrated()
    state = monitor.state_dict()
    with pytest.raises(ValueError, match="different configuration"):
        sh.DriftMonitor(_mlp(), window=128, false_alarm_every=100_000, bootstrap=2000).load_state_dict(state)
    with pytest.raises(ValueError, match="taps"):
        sh.DriftMonitor(_mlp(), taps=["4"], window=64, false_alarm_every=100_000,
                        bootstrap=2000).load_state_dict(state)
    fresh = sh.DriftMonitor(_mlp(), window=64, false_alarm_every=100_000, bootstrap=2000)
    corrupt = dict(state, reference_counts=-state["reference_counts"])
    with pytest.raises(ValueError, match="negative reference counts"):
        fresh.load_state_dict(corrupt)
    with pytest.raises(ValueError, match="format_version"):
        fresh.load_state_dict({"lo": 1})
    assert not fresh.calibrated


def test_nonfinite_surge_is_reported_and_never_binned():
    monitor, _ = _calibrated()
    for x in _stream(4, 32, seed=10):
        monitor(x)
    x = _stream(1, 32, seed=11)[0]
    x[:6] = float("nan")
    output = monitor.model(x)
    # The taps binned the 26 finite rows and only counted the 6 NaN rows.
    assert torch.all(monitor._batch_counts.sum(dim=1) == 26)
    assert torch.all(monitor._batch_nonfinite == 6)
    report = monitor.update(output)
    assert report.nonfinite_samples == 6
    assert "nonfinite" in report.reasons and report.drift
    assert math.isfinite(report.score)


def test_nan_rows_in_calibration_are_dropped_and_counted():
    monitor = sh.DriftMonitor(_mlp(), window=64, false_alarm_every=100_000, bootstrap=2000)
    batches = _stream(40, 32, seed=1)
    batches[3][:5] = float("inf")
    batches[7][2] = float("nan")
    report = monitor.calibrate(batches)
    assert report.dropped_nonfinite == 6 and report.samples == 1280 - 6
    assert torch.isfinite(monitor.lo).all() and torch.isfinite(monitor.hi).all()
    assert monitor.reference_counts.sum() == (report.samples // 2) * monitor.reference_counts.shape[0]


def test_batch_of_one_and_empty_batch():
    monitor, _ = _calibrated(false_alarm_every=1_000_000)
    for x in _stream(200, 1, seed=12):
        report = monitor.update(monitor.model(x))
        assert report.samples == 1
    assert not report.warming_up and report.window_samples >= 64
    assert monitor.alarms == 0
    window_before = monitor._window.totals()[0].clone()
    empty = monitor.update(monitor.model(torch.zeros(0, 8)))
    assert empty.samples == 0 and not empty.drift
    assert torch.equal(monitor._window.totals()[0], window_before)


def test_rows_mismatch_and_paused():
    monitor, _ = _calibrated()
    monitor.model(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="saw 4 rows but the logits have 3"):
        monitor.update(torch.randn(3, 4))
    with monitor.paused():
        monitor.model(torch.randn(4, 8))
    output = monitor(torch.randn(5, 8))
    assert output.shape == (5, 4) and monitor.last_report.samples == 5


def test_binary_single_logit_and_conv_projection():
    monitor = sh.DriftMonitor(_mlp(outputs=1), window=64, false_alarm_every=100_000, bootstrap=2000)
    monitor.calibrate(_stream(20, 32, seed=1))
    assert monitor(torch.randn(16, 8)).shape == (16, 1)
    assert 0.5 <= monitor.last_report.batch_accuracy_estimate <= 1.0

    cnn = SmallCNN().eval()
    monitor = sh.DriftMonitor(cnn, window=32, false_alarm_every=100_000, bootstrap=1000, max_features=16)
    generator = torch.Generator().manual_seed(0)
    report = monitor.calibrate([torch.randn(16, 3, 8, 8, generator=generator) for _ in range(10)])
    # 'features' gets the 3-channel image (pooled per channel), the head 96
    # features, projected to 16.
    assert report.features == {"features": 3, "head": 16}
    projection = monitor.state_dict()["projections"]["head"]
    assert projection.shape == (96, 16)
    assert torch.equal((projection != 0).sum(dim=1), torch.ones(96, dtype=torch.long))  # count sketch
    assert monitor.state_dict()["projections"]["features"] is None
    out = monitor(torch.randn(16, 3, 8, 8, generator=generator) * 3)
    assert out.shape == (16, 5)


def test_labels_calibrate_the_accuracy_estimate():
    torch.manual_seed(0)
    teacher = nn.Linear(8, 3)
    model = nn.Sequential(nn.Linear(8, 3))
    model[0].weight.data = teacher.weight.data * 4  # over-confident copy
    model[0].bias.data = teacher.bias.data * 4
    generator = torch.Generator().manual_seed(1)

    def labelled(n):
        x = torch.randn(n, 8, generator=generator)
        y = torch.multinomial(torch.softmax(teacher(x), dim=1), 1, generator=generator).squeeze(1)
        return x, y

    monitor = sh.DriftMonitor(model, window=64, false_alarm_every=100_000, bootstrap=2000)
    report = monitor.calibrate([labelled(128) for _ in range(20)])
    assert report.temperature == pytest.approx(4.0, rel=0.25)
    x, y = labelled(4096)
    with torch.no_grad(), monitor.paused():
        accuracy = (model(x).argmax(1) == y).double().mean().item()
    monitor(x)
    assert monitor.last_report.batch_accuracy_estimate == pytest.approx(accuracy, abs=0.03)


@pytest.mark.parametrize("features,dim", [(96, 16), (784, 64), (5, 4), (1024, 64)])
def test_count_sketch_equals_the_dense_projection(features, dim):
    from selfheal_ext.taps import apply_sketch, random_projection, sketch_plan
    projection = random_projection(features, dim, seed=3)
    x = torch.randn(7, features)
    plan = sketch_plan(projection)
    # float64 sums of the float32 inputs, rounded to float32 once
    assert torch.equal(apply_sketch(x, plan), (x.double() @ projection.double()).float())
    with pytest.raises(ValueError, match="exactly one non-zero"):
        sketch_plan(projection * 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("window_kind,max_features", [("sliding", 64), ("exponential", 64), ("sliding", 16)])
def test_monitor_on_cuda_matches_cpu(window_kind, max_features):
    # max_features 16 sketches the 32-wide taps (count sketch planned on the GPU).
    cpu_monitor, _ = _calibrated(window_kind=window_kind, max_features=max_features)
    cuda_model = _mlp().cuda()
    cuda_monitor = sh.DriftMonitor(cuda_model, window=64, false_alarm_every=100_000, bootstrap=2000,
                                   window_kind=window_kind, max_features=max_features)
    cuda_monitor.load_state_dict(cpu_monitor.state_dict())
    for x in _stream(6, 32, seed=13) + _stream(4, 32, seed=14, shift=1.0):
        a = cpu_monitor(x)
        b = cuda_monitor(x.cuda())
        assert b.device.type == "cuda"
        ra, rb = cpu_monitor.last_report, cuda_monitor.last_report
        assert ra.drift == rb.drift and ra.reasons == rb.reasons
        assert ra.score == pytest.approx(rb.score, rel=1e-4, abs=1e-4)
    # Model outputs differ in rounding between devices, so a value on a bin
    # edge may move; every value is still binned exactly once.
    assert cpu_monitor._window.totals()[0].sum().item() == cuda_monitor._window.totals()[0].cpu().sum().item()


@pytest.mark.parametrize("device", DEVICES)
def test_monitor_calibrates_and_serves_on_its_device_with_sketched_taps(device):
    # The whole life on one device: calibrate, read, state round trip, with
    # the 32-wide taps sketched to max_features 8 (on CUDA, bench/overhead.py
    # found the sketch planning comparing against a CPU tensor).
    def monitor_on(device):
        return sh.DriftMonitor(_mlp().to(device), window=64, false_alarm_every=100_000, bootstrap=2000,
                               max_features=8)
    monitor = monitor_on(device)
    monitor.calibrate([x.to(device) for x in _stream(40, 32, seed=1)])
    for x in _stream(3, 32, seed=2):
        monitor(x.to(device))
        assert not monitor.last_report.drift
    for x in _stream(6, 32, seed=3, shift=2.0):
        monitor(x.to(device))
    assert monitor.last_report.drift
    restored = monitor_on(device)
    restored.load_state_dict(monitor.state_dict())
    x = _stream(1, 32, seed=4, shift=2.0)[0].to(device)
    monitor(x)
    restored(x)
    assert restored.last_report.score == pytest.approx(monitor.last_report.score, rel=1e-6)


def test_moments_pooling_sees_noise_that_channel_means_miss():
    from selfheal_ext.taps import pool_features
    x = torch.rand(8, 3, 5, 5)
    pooled = pool_features(x, True, "moments")
    assert pooled.shape == (8, 6)
    assert torch.allclose(pooled[:, :3], x.flatten(2).mean(2)) and torch.allclose(pooled[:, 3:], x.flatten(2).std(2, correction=0))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3)).eval()
    healthy = [torch.rand(64, 1, 16, 16) for _ in range(12)]
    noisy = [(torch.rand(64, 1, 16, 16) + 0.5 * torch.randn(64, 1, 16, 16)) for _ in range(6)]
    options = dict(taps=["0"], window=128, false_alarm_every=200, bootstrap=400)
    scores = {}
    for pooling in ("mean", "moments"):
        monitor = sh.DriftMonitor(model, pooling={"0": pooling}, **options)
        monitor.calibrate(healthy)
        for x in noisy:
            monitor(x)
        scores[pooling] = monitor.last_report.signals["0"]
        state = monitor.state_dict()
        assert state["config"]["pooling"] == ({} if pooling == "mean" else {"0": "moments"})
        twin = sh.DriftMonitor(model, pooling={"0": pooling}, **options)
        twin.load_state_dict(state)
    # zero-mean noise leaves the channel mean alone; its spread is what moved
    assert scores["moments"] > monitor.window_threshold and scores["moments"] > 5 * max(scores["mean"], 1.0)
    with pytest.raises(ValueError, match="pooling"):
        sh.DriftMonitor(model, pooling={"0": "median"}, **options)
    with pytest.raises(ValueError, match="not a tap"):
        sh.DriftMonitor(model, pooling={"3": "moments"}, **options)


def _read(monitor, x):
    return monitor.update(monitor.model(x))


def _fields(report):
    return (report.batch, report.drift, report.reasons, report.score, report.cusum, report.signals,
            report.divergence, report.samples, report.window_samples)


def test_read_every_reads_one_batch_in_k_at_the_served_false_alarm_rate():
    # read_every=3 at 300,000 served batches per false alarm runs the tests of
    # a monitor that reads every batch at 100,000: same thresholds, and on the
    # batches it reads, the same decisions as that monitor fed only those.
    sparse, _ = _calibrated(read_every=3, false_alarm_every=300_000)
    dense, _ = _calibrated(false_alarm_every=100_000)
    assert (sparse.window_threshold, sparse.cusum_threshold) == (dense.window_threshold, dense.cusum_threshold)
    stream = _stream(18, 32, seed=21) + _stream(30, 32, seed=22, shift=0.8)
    # Unread batches are never looked at: drifted and non-finite ones at
    # unread positions change nothing.
    stream[1] = stream[1] * 50 + 9
    stream[2] = torch.full_like(stream[2], float("nan"))
    reads = 0
    for index, x in enumerate(stream):
        report = _read(sparse, x)
        if index % 3 == 0:
            assert report.read
            expected = _read(dense, x)
            assert _fields(report) == _fields(expected)
            reads += 1
        else:
            assert not report.read
            assert _fields(report) == _fields(sparse.last_report)
            assert report.nonfinite_samples == 0
    assert reads == 16 and sparse.batches_seen == 16 and sparse.batches_served == 48
    assert sparse.drift_detected and report.drift
    # the reading unread batches repeat survives a save (attribution included)
    buffer = io.BytesIO()
    torch.save(sparse.state_dict(), buffer)
    buffer.seek(0)
    restored = sh.DriftMonitor(_mlp(), window=64, false_alarm_every=300_000, bootstrap=2000, read_every=3)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.last_report == sparse.last_report and restored.last_report.attribution.features
    assert restored.attribution() == sparse.attribution()  # the window's divergences are rebuilt
    sparse.remove()
    with pytest.raises(RuntimeError, match="removed"):
        sparse.update(torch.zeros(32, 4))


def test_read_all_reads_every_batch_and_state_keeps_the_phase():
    monitor, _ = _calibrated(read_every=4, false_alarm_every=400_000)
    for x in _stream(2, 32, seed=23):
        _read(monitor, x)
    assert monitor.batches_seen == 1
    monitor.read_all = True
    for x in _stream(3, 32, seed=24):
        assert _read(monitor, x).read
    monitor.read_all = False
    # each read restarts the count: three unread batches follow the last one
    assert not _read(monitor, _stream(1, 32, seed=25)[0]).read
    assert not _read(monitor, _stream(1, 32, seed=26)[0]).read
    assert monitor.batches_seen == 4 and monitor.batches_served == 7
    restored = sh.DriftMonitor(_mlp(), window=64, false_alarm_every=400_000, bootstrap=2000, read_every=4)
    buffer = io.BytesIO()
    torch.save(monitor.state_dict(), buffer)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.last_report == monitor.last_report
    for x in _stream(9, 32, seed=27, shift=0.5):
        a, b = _read(monitor, x), _read(restored, x)
        assert a.read == b.read and _fields(a) == _fields(b)
    monitor.reset()
    assert _read(monitor, _stream(1, 32, seed=29)[0]).read  # reset: the next batch is read
    corrupt = dict(monitor.state_dict(), skip_left=7)
    with pytest.raises(ValueError, match="skip_left"):
        restored.load_state_dict(corrupt)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_read_every_rejects_bad_values(value):
    with pytest.raises(ValueError, match="read_every"):
        sh.DriftMonitor(_mlp(), read_every=value)


def test_read_every_of_one_is_left_out_of_the_saved_configuration():
    monitor, _ = _calibrated()
    state = monitor.state_dict()
    assert "read_every" not in state["config"]
    fresh = sh.DriftMonitor(_mlp(), window=64, false_alarm_every=100_000, bootstrap=2000)
    fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="different configuration"):
        sh.DriftMonitor(_mlp(), window=64, false_alarm_every=100_000, bootstrap=2000,
                        read_every=2).load_state_dict(state)


def test_read_every_must_leave_a_false_alarm_budget():
    with pytest.raises(ValueError, match="must exceed read_every"):
        sh.DriftMonitor(_mlp(), read_every=100, false_alarm_every=100)


def test_unread_batches_run_the_model_without_hooks_and_taps_come_first():
    model = _mlp()
    monitor, _ = _calibrated(model, read_every=3, false_alarm_every=300_000)
    tapped = [tap.module for tap in monitor.taps]
    # a user's pre-hook on a tapped module, registered after the monitor: the
    # monitor's hook still runs first on every read batch (it is prepended
    # each time it is re-attached), so it sees the module's input as called
    order = []
    model.get_submodule("2").register_forward_pre_hook(
        lambda module, args: order.append(monitor._rows_seen.get("2", 0)))
    attached = []
    with torch.no_grad():
        for index, x in enumerate(_stream(7, 32, seed=31)):
            attached.append(all(len(module._forward_pre_hooks) > 0 for module in tapped if module is not
                                model.get_submodule("2")))
            report = monitor.update(model(x))
            assert report.read == (index % 3 == 0)
    assert attached == [True, False, False, True, False, False, True]
    assert order == [32, 0, 0, 32, 0, 0, 32]
    monitor.read_all = True
    assert all(len(module._forward_pre_hooks) > 0 for module in tapped)
    monitor.read_all = False
    monitor.remove()
    monitor.reset()
    assert not any(len(m._forward_pre_hooks) for m in tapped if m is not model.get_submodule("2"))
