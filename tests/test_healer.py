import copy
import math

import pytest
import torch

from selfheal_ext import HealerConfig, SelfHealer
from selfheal_ext.heal.batch_check import class_diversity
from selfheal_ext.heal.objective import distance_from
from healing_data import C, Task, accuracy, trained_model

MONITOR = dict(window=256, false_alarm_every=200, bootstrap=400)


@pytest.fixture
def task():
    # A fresh sampler per test (same classes and corruption): every test sees
    # the same data whatever ran before it.
    return Task()


@pytest.fixture(scope="module")
def source_model():
    return trained_model(Task())


def make_healer(task, source_model, **options):
    model = copy.deepcopy(source_model)
    options.setdefault("monitor_options", MONITOR)
    healer = SelfHealer(model, **options)
    healer.calibrate([task.sample(64)[0] for _ in range(24)])
    return healer


def drift_stream(task, batches=40, size=64, **kw):
    return [task.sample(size, corrupt=True, **kw) for _ in range(batches)]


def test_dormant_healer_serves_the_source_model_exactly(task, source_model):
    healer = make_healer(task, source_model)
    for _ in range(10):
        x, _ = task.sample(64)
        with torch.no_grad():
            expected = source_model(x)
        assert torch.equal(healer(x), expected)
    assert not healer.active and healer.steps == 0


def test_healing_restores_most_of_the_lost_accuracy(task, source_model):
    healer = make_healer(task, source_model)
    stream = drift_stream(task)
    with torch.no_grad():
        source = accuracy([source_model(x) for x, _ in stream], [y for _, y in stream])
        clean_batches = [task.sample(64) for _ in range(20)]
        clean = accuracy([source_model(x) for x, _ in clean_batches], [y for _, y in clean_batches])
    healed = accuracy([healer(x) for x, _ in stream], [y for _, y in stream])
    assert healer.active and healer.steps > 0
    assert healed >= source + 0.05, (source, healed, clean)
    restored = (healed - source) / (clean - source)
    assert restored > 0.5, restored
    assert any(event.kind == "activate" for event in healer.events)


def test_predict_first_the_logits_never_depend_on_the_same_batch(task, source_model):
    healer = make_healer(task, source_model)
    stream = drift_stream(task, batches=12)
    for x, _ in stream[:6]:
        healer(x)
    assert healer.active
    x, _ = stream[6]
    state = healer.state_dict()
    twin = make_healer(task, source_model)
    twin.load_state_dict(state)
    # the twin only predicts (adapters frozen at the same state): same logits
    with torch.no_grad():
        twin.adapters.active = True
        expected = twin.model(x)
    assert torch.equal(healer(x), expected)


def test_reset_restores_bit_identical_outputs(task, source_model):
    healer = make_healer(task, source_model)
    for x, _ in drift_stream(task, batches=15):
        healer(x)
    assert healer.steps > 0
    probe = task.sample(64)[0]
    healer.reset()
    assert not healer.active and healer.version == 0 and list(healer.versions) == [0]
    fresh = make_healer(task, source_model)
    for name, value in healer.adapters.state_dict().items():  # every tensor, down projections included
        assert torch.equal(value, fresh.adapters.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(healer.model(probe), source_model(probe))
    assert torch.equal(healer(probe), source_model(probe).detach())


def test_rollback_to_a_version_is_exact(task, source_model):
    healer = make_healer(task, source_model)
    stream = drift_stream(task, batches=20)
    for x, _ in stream[:8]:
        healer(x)
    version = healer.snapshot()
    saved = {k: v.clone() for k, v in healer.adapters.state_dict().items()}
    for x, _ in stream[8:]:
        healer(x)
    assert any(not torch.equal(saved[k], v) for k, v in healer.adapters.state_dict().items())
    healer.rollback(version)
    assert all(torch.equal(saved[k], v) for k, v in healer.adapters.state_dict().items())
    with pytest.raises(KeyError, match="no adapter version"):
        healer.rollback(999)


def _run_and_check_rollbacks(healer, stream):
    """Serves the stream; every rollback must restore its version exactly."""
    restored = []
    for x, _ in stream:
        before = len(healer.events)
        healer(x)
        for event in healer.events[before:]:
            if event.kind == "rollback":
                state = healer.adapters.state_dict()
                target = healer.versions[event.detail["to"]]
                restored.append(all(torch.equal(state[k], target[k]) for k in target))
    guards = [e for e in healer.events if e.kind == "guard"]
    assert guards, [e.kind for e in healer.events][:20]
    assert [e.kind for e in healer.events].count("rollback") == len(guards) and all(restored)
    assert healer.learning_rate <= healer.config.lr / 2
    return guards


def _collapsing(healer):
    """Replaces the healer's objective with one that drives every prediction
    to class 0 (a broken loss, a poisoned stream)."""
    def collapsing_loss(output, parameters, x=None, model=None, adapters=None):
        logits = healer._logits(output).float()
        return torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long)), len(logits)

    healer._loss = collapsing_loss
    return healer


def test_forced_collapse_is_caught_and_rolled_back(task, source_model):
    # The plain entropy collapse (lr=1.0, no anchor, no filters) happens on
    # some streams only: it turns on the last bits of the BatchNorm moments
    # (2 trips in 9 runs over three streams and lr 0.3/1/3). The objective is
    # made to collapse instead; the label-ordered test below forces a natural
    # collapse reliably. With the divergence guard off, the collapse guard
    # (effective classes) must catch it.
    healer = _collapsing(make_healer(task, source_model, lr=0.05, anchor=0.0, max_shift=1e6,
                                     divergence_rise=float("inf")))
    guards = _run_and_check_rollbacks(healer, drift_stream(task, batches=40))
    assert all("effective classes" in g.detail["reason"] for g in guards)
    # with every guard on, the adapted layers' divergence sees it first
    healer = _collapsing(make_healer(Task(), source_model, lr=0.05, anchor=0.0, max_shift=1e6))
    guards = _run_and_check_rollbacks(healer, drift_stream(Task(), batches=20))
    assert "divergence of the adapted layers" in guards[0].detail["reason"]


def test_forced_collapse_on_a_label_ordered_stream_is_caught_by_the_agreement_guard(task, source_model):
    # The label-ordered gate switched off (it would refuse to learn from these
    # batches): a long run of one class teaches the adapters to predict it
    # everywhere, and the opt-in agreement guard sees the next class overturned.
    healer = make_healer(task, source_model, lr=1.0, anchor=0.0, entropy_margin=1.0, redundancy=0.0,
                         max_shift=1e6, label_shift=float("inf"), agreement_floor=0.25)
    stream = []
    for label, batches in ((0, 20), (1, 10), (2, 10)):
        stream += drift_stream(task, batches=batches, labels=torch.full((64,), label))
    guards = _run_and_check_rollbacks(healer, stream)
    assert any("agreement" in g.detail["reason"] for g in guards)


def test_label_ordered_stream_is_not_learnt_from_by_default(task, source_model):
    healer = make_healer(task, source_model)
    stream = []
    for label in range(C):
        stream += drift_stream(task, batches=6, labels=torch.full((64,), label))
    outputs = [healer(x) for x, _ in stream]
    assert healer.active and healer.status().robust_norm
    # (a corrupted run of one class can look a little diverse to the source model)
    assert healer.steps <= len(stream) // 4
    assert any(e.kind == "skip" and e.detail["reason"] == "classes arrive in runs" for e in healer.events)
    with torch.no_grad():
        source = accuracy([source_model(x) for x, _ in stream], [y for _, y in stream])
    # Robust mode still follows the drift, slowly (robust_horizon): 90.2 %
    # against the source's 89.2 % here; statistics held in robust mode gave
    # exactly the source's accuracy. (93.6 % with the entropy check before
    # 2026-12-06: the information check clears one run batch of the 30 here,
    # served with its own statistics at 23 %; docs/architecture.md.)
    assert accuracy(outputs, [y for _, y in stream]) >= source + 0.005
    assert sum(e.kind == "step" for e in healer.events) <= 2


def _active_on_a_drift_with_nothing_hinting_at_a_run(task, source_model, **options):
    healer = make_healer(task, source_model, **options)
    for x, _ in drift_stream(task, batches=12):
        healer(x)
    assert healer.active and not healer._in_run()
    healer.label_shift.level, healer.label_shift.robust = None, False  # nothing hints at a run before the next batch
    return healer


def test_a_run_that_begins_is_checked_before_it_is_served(task, source_model):
    # Nothing hinted at a run before this batch; its own source class mix
    # does (read before serving, from the source forward the guards take
    # anyway), so the check runs first and the run is served with the
    # robust statistics, folded in slowly, and not learnt from.
    healer = _active_on_a_drift_with_nothing_hinting_at_a_run(task, source_model)
    run = task.sample(64, corrupt=True, labels=torch.full((64,), 1))[0]
    steps = healer.steps
    served = healer(run)
    assert healer._check is False and not healer._served_fast and healer.steps == steps
    assert healer.events[-1].kind == "skip" and healer.events[-1].detail["batch_information"] is not None
    norms = healer.adapters.norm_adapters()
    assert all(a._last_fold[-1] == a.robust_horizon for a in norms)
    # the output is the robust statistics' (the running moments, this batch
    # folded in slowly): the same forward again, nothing folded in twice
    healer.adapters.set_robust(True)
    healer.adapters.set_update_running(False)
    with torch.no_grad(), healer.monitor.paused():
        assert torch.equal(healer.model(run), served)


def test_a_run_found_after_serving_moves_the_running_statistics_only_as_a_run(task, source_model):
    # Without the batch-statistics check nothing can call the batch a run
    # before it is served: it is served with its own statistics, folded into
    # the recent stream's moments at the fast rate. The label-shift guard,
    # with its class mix folded in, then calls it a run: the fold is redone
    # over robust_horizon, as if it had been served in robust mode.
    healer = _active_on_a_drift_with_nothing_hinting_at_a_run(task, source_model, batch_diversity=False)
    norms = healer.adapters.norm_adapters()
    before = [(a.running_mean.clone(), a.running_var.clone()) for a in norms]
    run = task.sample(64, corrupt=True, labels=torch.full((64,), 1))[0]
    steps = healer.steps
    healer(run)
    assert healer._served_fast and healer._check is None and healer._in_run() and healer.steps == steps
    assert healer.events[-1].kind == "skip"
    for adapter, (mean, var) in zip(norms, before):
        old_mean, old_var, batch_mean, batch_var, _, count, horizon = adapter._last_fold
        assert torch.equal(old_mean, mean) and torch.equal(old_var, var) and horizon == adapter.robust_horizon
        m = count / (count + adapter.robust_horizon)
        torch.testing.assert_close(adapter.running_mean, mean + m * (batch_mean - mean))
        # (the fast fold would have moved it by count / (count + running_horizon), a third)
        assert (adapter.running_mean - mean).abs().max() < 0.05 * (batch_mean - mean).abs().max()


def collapsing_stream(task, batches=20):
    """A drift strong enough that the source predicts one class for
    (almost) every input: i.i.d. batches that look like a run of one class."""
    return [(x * 0.3 + 3.0, y) for x, y in drift_stream(task, batches=batches)]


def _neutral(check, healer):
    """The batch-statistics check with its recent verdicts reset to neither
    side before each call: its threshold is then the calibrated one."""
    def call(x, **options):
        healer.batch_check.prior = 0.5
        return check(x, **options)
    return call


def test_batch_diversity_is_calibrated_between_diverse_batches_and_runs(task, source_model):
    healer = make_healer(task, source_model)
    levels = healer.batch_check.levels
    assert levels["measure"] == "information" and levels["diverse"] > levels["threshold"] > levels["run"]
    assert levels["threshold"] == pytest.approx(levels["run"] + 0.3 * (levels["diverse"] - levels["run"]))
    # a batch of one class, normalised with its own statistics, loses its class signal
    one_class = task.sample(64, labels=torch.full((64,), 3))[0]
    healer.adapters.active = True
    # (with no verdicts to lean on, neither way, the threshold is the calibrated one)
    healer.batch_check.is_diverse = _neutral(healer.batch_check.is_diverse, healer)
    assert healer.batch_check.is_diverse(one_class) is False and healer.batch_check.reading.information < levels["threshold"]
    assert healer.batch_check.is_diverse(task.sample(64)[0]) is True and healer.batch_check.reading.information > levels["threshold"]
    assert healer.batch_check.is_diverse(task.sample(8)[0]) is None  # too few rows to tell
    # the check uses the batch's statistics alone (no prior), so a
    # small batch of one class is not pulled towards "diverse"
    assert healer.batch_check.is_diverse(one_class[:16]) is False
    healer.adapters.active = False
    del healer.batch_check.is_diverse  # (the healer's own check, verdicts and all, while it serves)
    # trained adapters do not move the check: it re-normalises the source model
    for x, _ in drift_stream(task, batches=30):
        healer(x)
    assert healer.active and healer.steps >= 20
    healer.adapters.active = True
    assert healer.batch_check.is_diverse(one_class) is False
    twin = make_healer(task, source_model, batch_diversity=False)
    twin.load_state_dict(healer.state_dict())
    assert twin.batch_check.levels == levels
    # levels saved by the older entropy measure cannot be read as information
    old = healer.state_dict()
    old["diversity"] = {"diverse": 0.1, "run": 0.7, "threshold": 0.4}
    with pytest.warns(RuntimeWarning, match="recalibrate|calibrate"):
        twin.load_state_dict(old)
    assert twin.batch_check.levels is None
    assert make_healer(task, source_model, batch_diversity=False).batch_check.levels is None
    assert make_healer(task, source_model, label_shift=float("inf")).batch_check.levels is None
    # without BatchNorm the check has nothing to tell runs apart with
    plain = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, C)).eval()
    healer = SelfHealer(plain, monitor_options=MONITOR)
    healer.calibrate([task.sample(64)[0] for _ in range(24)])
    assert healer.batch_check.levels is None


def test_the_checks_recent_verdicts_move_its_threshold(task, source_model):
    # Runs of classes persist over batches, and so does an i.i.d. drifted
    # stream: the check's threshold leans towards its own recent verdicts,
    # by up to check_sway / 2 of the way between the calibrated levels.
    healer = make_healer(task, source_model)
    levels = healer.batch_check.levels
    gap = levels["diverse"] - levels["run"]
    sway = healer.config.check_sway
    for prior, expected in ((1.0, levels["threshold"] - sway / 2 * gap), (0.5, levels["threshold"]),
                            (0.0, levels["threshold"] + sway / 2 * gap)):
        healer.batch_check.prior = prior
        assert healer.batch_check.threshold() == pytest.approx(expected)
    # the onset's check (no verdicts yet) uses the calibrated threshold
    assert healer.batch_check.threshold(onset=True) == levels["threshold"]
    # a batch right at the calibrated threshold: "many classes" after a row
    # of such verdicts, "run" after a row of runs
    x = task.sample(64, corrupt=True)[0]
    healer.adapters.active = True
    healer.batch_check.prior = 0.5
    healer.batch_check.is_diverse(x)
    healer.batch_check.levels = dict(levels, threshold=healer.batch_check.reading.information, spread_threshold=None)
    healer.batch_check.prior = 1.0
    assert healer.batch_check.is_diverse(x) is True and healer.batch_check.reading.threshold < healer.batch_check.reading.information
    assert healer.batch_check.prior == 1.0
    healer.batch_check.prior = 0.0
    assert healer.batch_check.is_diverse(x) is False and healer.batch_check.prior == 0.0
    # each verdict weighs check_memory
    healer.batch_check.prior = 0.5
    healer.batch_check.is_diverse(x)  # (at the calibrated threshold: not above it)
    assert healer.batch_check.prior == pytest.approx(0.5 * (1 - healer.config.check_memory))
    # saved and restored with the state; a new drift episode starts at "many classes"
    twin = make_healer(task, source_model)
    twin.load_state_dict(healer.state_dict())
    assert twin.batch_check.prior == healer.batch_check.prior
    healer.adapters.active = False
    healer.batch_check.levels = levels
    healer.batch_check.prior = 0.0
    healer.reset()
    assert healer.batch_check.prior == 1.0
    healer(task.sample(64, corrupt=True)[0])
    healer.batch_check.prior = 0.0
    healer._activate(healer.drift)
    assert healer.batch_check.prior == 1.0


def test_the_check_also_reads_the_rows_spread_at_the_last_norm_layer(task, source_model):
    healer = make_healer(task, source_model)
    levels = healer.batch_check.levels
    assert levels["spread_diverse"] > levels["spread_run"]
    one_class = task.sample(64, labels=torch.full((64,), 3))[0]
    mixed = task.sample(64)[0]
    run_spread, mixed_spread = (float(healer.batch_check.statistics_sums(x)[1]) for x in (one_class, mixed))
    assert run_spread < mixed_spread  # rows of one class share their class's features
    healer.adapters.active = True
    # information alone can never clear a batch above 1: the spread decides
    healer.batch_check.levels = dict(levels, threshold=2.0, spread_threshold=0.5 * (run_spread + mixed_spread))
    assert healer.batch_check.is_diverse(mixed) is True and healer.batch_check.is_diverse(one_class) is False
    assert healer.batch_check.reading.spread == pytest.approx(run_spread)
    healer.batch_check.levels = dict(levels, threshold=2.0, spread_threshold=None)
    assert healer.batch_check.is_diverse(mixed) is False  # off: information alone
    healer.adapters.active = False
    # the spread is used where calibration separates runs from healthy
    # batches by spread_separation standard deviations and their spreads by
    # a ratio of at least exp(spread_min_gap), half-way between them
    gap = levels["spread_diverse"] - levels["spread_run"]
    for separation, min_gap, used in ((0.0, 0.0, True), (1e9, 0.0, False), (0.0, gap * 0.99, True),
                                      (0.0, gap * 1.01, False)):
        settings = HealerConfig(spread_separation=separation, spread_min_gap=min_gap)
        levels = make_healer(task, source_model, config=settings).batch_check.levels
        assert levels["spread_separation"] > 0
        if used:
            assert levels["spread_threshold"] == pytest.approx(
                levels["spread_run"] + 0.5 * (levels["spread_diverse"] - levels["spread_run"]))
        else:
            assert levels["spread_threshold"] is None
    # states saved before the spread existed load with it off
    old = healer.state_dict()
    old["diversity"] = {k: v for k, v in old["diversity"].items() if not k.startswith("spread")}
    twin = make_healer(task, source_model)
    twin.load_state_dict(old)
    twin.adapters.active = True
    assert twin.batch_check.is_diverse(one_class) is False


def test_the_check_also_reads_how_many_classes_the_rows_are_predicted_as(task, source_model):
    # A strong corruption of the noise family leaves a batch's predictions
    # vague (its information falls towards the runs') while their argmax
    # still follows the class: where calibration separates the two levels,
    # diverse argmax with information at least at the lowest swayed split
    # counts as many classes.
    healer = make_healer(task, source_model)
    levels = healer.batch_check.levels
    # on this MLP a re-normalised run's argmax is as spread as a healthy
    # batch's (as on the benchmark's tabular MLP): measured, and off
    assert 0 < levels["classes_run"] <= 1 and 0 < levels["classes_diverse"] <= 1
    assert levels["classes_threshold"] is None
    mixed = task.sample(64)[0]
    sums = healer.batch_check.statistics_sums(mixed)[0]
    counts = sums[2 + C:]
    assert float(counts.sum()) == 64 and torch.equal(counts, counts.round())
    share = counts[counts > 0] / 64
    assert float(class_diversity(sums)) == pytest.approx(float(-(share * share.log()).sum() / math.log(C)))
    healer.adapters.active = True
    healer.batch_check.is_diverse(mixed)
    information, classes = healer.batch_check.reading.information, healer.batch_check.reading.classes
    assert classes == pytest.approx(float(class_diversity(sums)))
    lowest = healer.config.check_split - 0.5 * healer.config.check_sway
    # the information threshold out of reach: the predicted classes decide,
    # provided the information is above the lowest swayed split of levels
    # placed around it
    for information_above, classes_threshold, expected in ((True, classes - 1e-6, True), (True, None, False),
                                                           (True, classes + 1e-6, False),
                                                           (False, classes - 1e-6, False)):
        run = information - (2.0 if information_above else 0.5) * lowest  # (floor: run + lowest)
        healer.batch_check.levels = dict(levels, threshold=2.0, spread_threshold=None, run=run, diverse=run + 1.0,
                                 classes_threshold=classes_threshold)
        assert healer.batch_check.is_diverse(mixed) is expected, (information_above, classes_threshold)
    healer.adapters.active = False
    # used where calibration separates the levels by classes_separation
    # standard deviations and classes_min_gap, classes_split of the way up
    for separation, min_gap, used in ((-1e9, -1.0, True), (1e9, -1.0, False), (-1e9, 1.0, False)):
        settings = HealerConfig(classes_separation=separation, classes_min_gap=min_gap)
        levels = make_healer(task, source_model, config=settings).batch_check.levels
        if used:
            gap = levels["classes_diverse"] - levels["classes_run"]
            assert levels["classes_threshold"] == pytest.approx(levels["classes_run"] + settings.classes_split * gap)
        else:
            assert levels["classes_threshold"] is None
    # states saved before the measure existed load with it off
    old = healer.state_dict()
    old["diversity"] = dict(old["diversity"], threshold=2.0, run=information - 2.0 * lowest,
                            diverse=information - 2.0 * lowest + 1.0, spread_threshold=None,
                            classes_threshold=classes - 1e-6)
    twin = make_healer(task, source_model)
    twin.load_state_dict(old)
    twin.adapters.active = True
    assert twin.batch_check.is_diverse(mixed) is True
    old["diversity"] = {k: v for k, v in old["diversity"].items() if not k.startswith("classes")}
    twin.load_state_dict(old)
    assert twin.batch_check.is_diverse(mixed) is False


def test_a_drift_that_collapses_the_source_onto_one_class_is_not_taken_for_a_run(task, source_model):
    stream = collapsing_stream(task)
    labels = [y for _, y in stream]
    with torch.no_grad():
        source_outputs = [source_model(x) for x, _ in stream]
    predicted = torch.cat([o.argmax(1) for o in source_outputs])
    assert torch.bincount(predicted, minlength=C).max() >= 0.95 * predicted.numel()  # the source collapsed
    source = accuracy(source_outputs, labels)

    results = {}
    for check in (True, False):
        healer = make_healer(Task(), source_model, batch_diversity=check)
        outputs = [healer(x) for x, _ in stream]
        results[check] = (accuracy(outputs, labels), healer, outputs)
    healed, healer, outputs = results[True]
    unchecked, blind, _ = results[False]
    # without the check the guard takes the collapse for a run of one class
    # and waits for the recent mix to follow (about a window of batches)
    assert sum(e.kind == "skip" and e.detail["reason"] == "classes arrive in runs" for e in blind.events) >= 5
    assert healed >= unchecked + 0.2 and healed >= 0.9, (source, unchecked, healed)
    assert not any(e.kind == "skip" and e.detail["reason"] == "classes arrive in runs" for e in healer.events)
    assert any(e.kind == "step" and "batch_information" in e.detail for e in healer.events)
    # the batch that activated the adapters is served again with its own
    # statistics (no weight had changed yet): it is healed too
    assert healer.events[0].kind == "drift" and healer.events[0].batch == 1
    assert accuracy(outputs[:1], labels[:1]) >= 0.9 > accuracy(source_outputs[:1], labels[:1])


@pytest.mark.parametrize("label", range(C))
def test_the_onset_batch_of_a_run_is_served_by_the_source_model(task, source_model, label):
    # The first drifted batch holds one class: served as the source served
    # it. (Class 2 under this drift: the source spreads its predictions, 43
    # of 64 on class 2, so only the batch-statistics check sees the run.)
    healer = make_healer(task, source_model)
    stream = drift_stream(task, batches=4, labels=torch.full((64,), label))
    for x, _ in stream:
        was_active = healer.active
        output = healer(x)
        if healer.active and not was_active:
            with torch.no_grad():
                assert torch.equal(output, source_model(x))
            assert healer.batch_check.reading.information < healer.batch_check.levels["threshold"]
            break
    else:
        pytest.fail("the drift was not detected")


def test_nan_inputs_never_reach_the_adapter_weights(task, source_model):
    healer = make_healer(task, source_model)
    for i, (x, _) in enumerate(drift_stream(task, batches=20)):
        if i % 3 == 0:
            x = x.clone()
            x[:5] = float("nan")
            x[5, 2] = float("inf")
        out = healer(x)
        assert torch.isfinite(out[6:]).all()
    assert healer.steps > 0
    for name, value in healer.adapters.state_dict().items():
        assert torch.isfinite(value).all(), name
    # a batch that is entirely non-finite is served and skipped, not learnt from
    bad = torch.full((8, task.centers.shape[1]), float("nan"))
    healer(bad)
    for name, value in healer.adapters.state_dict().items():
        assert torch.isfinite(value).all(), name


class _NoiseSide(torch.nn.Module):
    """The tests' MLP with a side path on 8 more input columns of pure noise:
    the side BatchNorm's statistics say nothing about the class."""

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.side = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
        self.mix = torch.nn.Linear(8, C)
        with torch.no_grad():
            self.mix.weight.mul_(0.01)

    def forward(self, x):
        return self.body(x[:, :16]) + self.mix(self.side(x[:, 16:]))


def test_class_agnostic_layers_are_found_at_calibration_follow_drift_in_runs_and_are_kept(task, source_model):
    torch.manual_seed(0)
    model = _NoiseSide(copy.deepcopy(source_model)).eval()
    noise = torch.Generator().manual_seed(3)

    def sample(n, offset=0.0, **kw):
        x, y = task.sample(n, **kw)
        return torch.cat([x, torch.randn(n, 8, generator=noise) + offset], dim=1), y
    healer = SelfHealer(model, monitor_options=MONITOR)
    healer.calibrate([sample(64)[0] for _ in range(24)])
    targets = [p.target for p in healer.adapters.placements if p.kind == "norm"]
    norms = dict(zip(targets, healer.adapters.norm_adapters()))
    shifts = dict(zip(targets, healer.batch_check.class_shift))
    assert shifts["side.1"] < HealerConfig().agnostic_shift and norms["side.1"].class_agnostic
    assert all(shifts[t] > 10 * HealerConfig().agnostic_shift and not norms[t].class_agnostic for t in targets if t != "side.1")
    # classes in runs, drifted, the noise columns moved too: robust mode
    # holds the class-dependent layers' statistics, the side layer follows
    side_inputs = []
    handle = model.side[1].register_forward_pre_hook(lambda m, args: side_inputs.append(args[0].mean(dim=0)))
    runs = 0
    for c in [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 0, 0, 0]:
        healer(sample(64, offset=3.0, corrupt=True, labels=torch.full((64,), c))[0])
        runs += healer.active and healer._in_run()
    handle.remove()
    assert healer.active and runs >= 12
    target = side_inputs[-1]  # (the side layer's input mean in the drifted stream)
    moved = (norms["side.1"].running_mean - norms["side.1"].source_mean).norm()
    assert moved > 0.8 * (target - norms["side.1"].source_mean).norm()
    # (unmarked, robust mode left it at 2.0 of 4.1: moved only by the
    # batches served before the runs were recognised)
    # the approval stage's and the deferred worker's copies carry the marks
    _, shadow, _ = healer._detached_copy(healer.adapters.state_dict())
    assert [a.class_agnostic for a in shadow.norm_adapters()] == [norms[t].class_agnostic for t in targets]
    # the marks come back with the state; older states have none
    twin = SelfHealer(copy.deepcopy(model), monitor_options=MONITOR)
    twin.load_state_dict(healer.state_dict())
    assert twin.batch_check.class_shift == healer.batch_check.class_shift
    assert [a.class_agnostic for a in twin.adapters.norm_adapters()] == [norms[t].class_agnostic for t in targets]
    old = healer.state_dict()
    del old["class_shift"]
    twin.load_state_dict(old)
    assert twin.batch_check.class_shift is None and not any(a.class_agnostic for a in twin.adapters.norm_adapters())
    # a corrupt entry is refused before anything is loaded
    twin.load_state_dict(healer.state_dict())
    before = {k: v.clone() for k, v in twin.adapters.state_dict().items()}
    batches = twin.batches
    old["adapters"] = {k: torch.zeros_like(v) for k, v in old["adapters"].items()}
    old["counters"] = dict(old["counters"], batches=10 ** 6)
    for corrupt in ([0.01], [0.01] * (len(targets) - 1) + ["x"], "0.01"):
        old["class_shift"] = corrupt
        with pytest.raises(ValueError, match="class_shift"):
            twin.load_state_dict(old)
        assert all(torch.equal(v, before[k]) for k, v in twin.adapters.state_dict().items())
        assert twin.batches == batches and twin.batch_check.class_shift == healer.batch_check.class_shift
    # the label-shift guard off: no robust mode, nothing measured
    off = SelfHealer(copy.deepcopy(model), monitor_options=MONITOR, label_shift=float("inf"))
    off.calibrate([sample(64)[0] for _ in range(24)])
    assert off.batch_check.class_shift is None and not any(a.class_agnostic for a in off.adapters.norm_adapters())


def test_state_round_trip_gives_identical_next_outputs(task, source_model):
    healer = make_healer(task, source_model)
    stream = drift_stream(task, batches=16)
    for x, _ in stream[:8]:
        healer(x)
    twin = make_healer(task, source_model)
    twin.load_state_dict(healer.state_dict())
    for x, _ in stream[8:]:
        assert torch.equal(healer(x), twin(x))
    assert healer.steps == twin.steps
    with pytest.raises(ValueError, match="adapters do not match"):
        other = SelfHealer(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8),
                                               torch.nn.Linear(8, C)).eval(), monitor_options=MONITOR)
        other.load_state_dict(healer.state_dict())


def test_adapters_return_to_dormant_when_the_drift_passes(task, source_model):
    healer = make_healer(task, source_model, release_after=6)
    for x, _ in drift_stream(task, batches=10):
        healer(x)
    assert healer.active
    for _ in range(30):
        healer(task.sample(64)[0])
    assert not healer.active
    assert any(e.kind == "release" for e in healer.events)
    x = task.sample(64)[0]
    with torch.no_grad():
        assert torch.equal(healer(x), source_model(x))


def test_deferred_mode_heals_on_a_background_thread(task, source_model):
    healer = make_healer(task, source_model, mode="deferred")
    stream = drift_stream(task, batches=40)
    try:
        outputs = []
        for x, _ in stream:
            outputs.append(healer(x))
            healer.flush(timeout=5)
        assert healer.active and healer.steps > 0
        with torch.no_grad():
            source = accuracy([source_model(x) for x, _ in stream[20:]], [y for _, y in stream[20:]])
        assert accuracy(outputs[20:], [y for _, y in stream[20:]]) > source
    finally:
        healer.close()
    assert healer._worker is None


def test_hard_caps_on_steps_weight_change_and_periodic_reset(task, source_model):
    capped = make_healer(task, source_model, lr=0.05, max_shift=0.05, max_steps_per_minute=5, reset_every=3)
    for x, _ in drift_stream(task, batches=14):
        capped(x)
        assert distance_from(dict(capped.adapters.named_parameters()), capped.versions[0]) <= 0.05 + 1e-6
    assert capped.steps == 5  # the rest were refused by the rate limit
    # the refusals are one policy event (per streak of refused steps), not one per batch
    limits = [e for e in capped.events if e.kind == "policy" and e.detail["limit"] == "max_steps_per_minute"]
    assert len(limits) == 1 and limits[0].detail["bound"] == 5
    assert sum(e.kind == "reset" and e.detail["reason"] == "periodic" for e in capped.events) == 1


def test_batch_of_one_and_bad_arguments(task, source_model):
    healer = make_healer(task, source_model)
    out = healer(task.sample(1)[0])
    assert out.shape == (1, C)
    for x, _ in drift_stream(task, batches=8, size=1):
        healer(x)
    for name, value in healer.adapters.state_dict().items():
        assert torch.isfinite(value).all(), name
    assert healer.active
    assert healer(task.sample(4)[0][:0]).shape == (0, C)  # an empty batch while healing
    fresh = SelfHealer(copy.deepcopy(source_model), monitor_options=MONITOR)
    with pytest.raises(RuntimeError, match="calibrate"):
        fresh(task.sample(4)[0])
    with pytest.raises(TypeError, match="tensor"):
        healer([1, 2, 3])
    with pytest.raises(ValueError, match="mode"):
        SelfHealer(copy.deepcopy(source_model), mode="sometimes")
    with pytest.raises(ValueError, match="process_group"):
        SelfHealer(copy.deepcopy(source_model), mode="deferred", process_group=object())
    assert math.isfinite(healer.adapters.budget_fraction) and healer.adapters.budget_fraction <= 0.05


def test_read_every_spares_dormant_serving_and_reads_every_batch_while_active(task, source_model):
    healer = make_healer(task, source_model, monitor_options=dict(MONITOR, read_every=4, false_alarm_every=800))
    tracked = []
    track = healer._track
    healer._track = lambda logits: (tracked.append(healer.batches), track(logits))
    for _ in range(8):
        x, _ = task.sample(64)
        with torch.no_grad():
            assert torch.equal(healer(x), source_model(x))
    assert healer.monitor.batches_seen == 2 and not healer.active
    assert tracked == [1, 5]  # the class mix is tracked on read batches only
    stream = drift_stream(task, batches=24)
    read_before = healer.monitor.batches_seen
    for index, (x, _) in enumerate(stream):
        healer(x)
        if healer.active:
            break
    # activation comes on a read batch (batches 1, 5, 9, ... of the healer)
    assert healer.active and index < 16 and healer.drift.read and healer.batches % 4 == 1
    activated_at = healer.monitor.batches_seen
    for x, _ in stream[index + 1:index + 6]:
        healer(x)
    assert healer.monitor.batches_seen == activated_at + 5 > read_before
    assert healer.steps > 0


def test_read_every_with_a_process_group_is_refused(task, source_model):
    with pytest.raises(ValueError, match="read_every > 1 with a process_group"):
        SelfHealer(copy.deepcopy(source_model), process_group=object(),
                   monitor_options=dict(MONITOR, read_every=2, false_alarm_every=400))


def test_the_step_reuses_the_served_forward_with_the_same_result(task, source_model, monkeypatch):
    # Inline, the served forward of a batch about to be learnt from records
    # its graph and the step starts from it: one forward fewer, and exactly
    # what a separate step forward gives (same statistics, same weights).
    stream = drift_stream(task, batches=16)
    stream[9] = (stream[9][0].clone(), stream[9][1])
    stream[9][0][3, 0] = float("nan")  # a batch with a non-finite row: the step forwards its finite rows itself

    def serve(healer):
        forwards = []
        healer.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
        return [healer(x) for x, _ in stream], len(forwards)
    reused = make_healer(Task(), source_model)  # (both calibrated on the same batches)
    separate = make_healer(Task(), source_model)
    monkeypatch.setattr(separate, "_step_expected", lambda x, held: False)
    outputs, reused_forwards = serve(reused)
    expected, separate_forwards = serve(separate)
    assert reused.steps == separate.steps >= 10
    # every step but the onset batch's and the non-finite batch's reused its served forward
    assert separate_forwards - reused_forwards == reused.steps - 2
    for got, want in zip(outputs, expected):
        assert not got.requires_grad and got.grad_fn is None
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # (the NaN row stays NaN)
    for (name, p), q in zip(reused.adapters.named_parameters(), separate.adapters.parameters()):
        assert torch.equal(p, q), name
    assert reused._served_graph is None  # nothing is held on to between batches


def test_no_graph_is_kept_for_a_step_the_rate_limit_refuses(source_model):
    healer = make_healer(Task(), source_model, max_steps_per_minute=3)
    kept = []
    original = SelfHealer._served_forward

    def watching(self, x, keep_graph=False):
        kept.append(keep_graph)
        return original(self, x, keep_graph)
    healer._served_forward = watching.__get__(healer)
    for x, _ in drift_stream(Task(), batches=12):
        healer(x)
    assert healer.steps == 3 and sum(kept) <= 3


def test_serving_under_inference_mode_heals_as_usual(source_model):
    # Serving code often wraps inference in torch.inference_mode(): the
    # healer calibrates, serves and steps there exactly as outside it.
    stream = drift_stream(Task(), batches=10)
    model = copy.deepcopy(source_model)  # (a model whose own weights are inference tensors cannot be healed)
    with torch.inference_mode():
        inside = SelfHealer(model, monitor_options=MONITOR)
        sampler = Task()
        inside.calibrate([sampler.sample(64)[0] for _ in range(24)])
        outputs = [inside(x.clone()) for x, _ in stream]  # (inference tensors, as served there)
        steps, active = inside.steps, inside.active
        inside.reset()
        state = inside.state_dict()
    inside.load_state_dict(state)
    assert torch.equal(inside(stream[0][0]), outputs[0])  # the healer is usable outside inference mode too
    outside = make_healer(Task(), source_model)
    expected = [outside(x) for x, _ in stream]
    assert active and steps == outside.steps >= 5
    for got, want in zip(outputs, expected):
        assert not got.is_inference() and torch.equal(got, want)


def test_entry_points_keep_the_callers_grad_mode_outside_inference_mode(source_model):
    healer = make_healer(Task(), source_model)
    seen = []
    original = SelfHealer._serve

    def serve(self, x):
        seen.append(torch.is_grad_enabled())
        return original(self, x)
    healer._serve = serve.__get__(healer)
    x = Task().sample(64)[0]
    with torch.no_grad():
        healer(x)
    healer(x)
    with torch.inference_mode():
        healer(x)
    assert seen == [False, True, False]
