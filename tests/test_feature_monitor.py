"""FeatureMonitor: drift on feature tables without a model (torch, numpy, pandas)."""

import io

import numpy as np
import pytest
import torch

import selfheal_ext as sh

OPTIONS = dict(window=256, false_alarm_every=1000, bootstrap=1000)


def _table(rows, columns, seed, shift=None, amount=0.0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, columns, generator=generator)
    if shift is not None:
        x[:, shift] += amount
    return x


def _names(columns):
    return [f"sensor_{i}" for i in range(columns)]


@pytest.fixture(scope="module")
def wide_monitor():
    monitor = sh.FeatureMonitor(feature_names=_names(50), **OPTIONS)
    monitor.calibrate(_table(4096, 50, seed=0))
    return monitor


def test_tensor_and_numpy_paths_agree():
    reference = _table(2048, 6, seed=1)
    by_tensor = sh.FeatureMonitor(**OPTIONS)
    by_numpy = sh.FeatureMonitor(**OPTIONS)
    assert by_tensor.calibrate(reference).window_threshold == by_numpy.calibrate(reference.numpy()).window_threshold
    assert by_tensor.feature_names == [f"f{i}" for i in range(6)]
    for batch in _table(640, 6, seed=2, shift=3, amount=1.0).split(64):
        a, b = by_tensor.update(batch), by_numpy.update(batch.numpy())
        assert (a.score, a.reasons, a.cusum) == (b.score, b.reasons, b.cusum)
    assert by_tensor.drift_detected and by_numpy.drift_detected
    assert by_tensor.last_report.attribution.columns[0][0] == "f3"


def test_update_then_drift_detected_quiet_on_clean_data(wide_monitor):
    wide_monitor.reset()
    for batch in _table(1024, 50, seed=3).split(64):
        wide_monitor.update(batch)
        assert not wide_monitor.drift_detected
    assert set(wide_monitor.last_report.signals) == set(_names(50))
    for batch in _table(1024, 50, seed=4, shift=7, amount=1.5).split(64):
        wide_monitor.update(batch)
    assert wide_monitor.drift_detected
    assert wide_monitor.last_report.attribution.columns[0][0] == "sensor_7"
    assert wide_monitor.last_report.attribution.top_signal == "sensor_7"


def test_one_shifted_column_among_50_is_named_in_the_top_3(wide_monitor):
    """40 seeded trials, each a window of data with one column shifted by
    half a standard deviation: the column is among the 3 most divergent."""
    hits = 0
    for trial in range(40):
        column = int(torch.randint(50, (1,), generator=torch.Generator().manual_seed(100 + trial)))
        wide_monitor.reset()
        for batch in _table(512, 50, seed=200 + trial, shift=column, amount=0.5).split(64):
            wide_monitor.update(batch)
        top = [name for name, _ in wide_monitor.attribution(top=3).columns]
        hits += f"sensor_{column}" in top
    print(f"shifted column in the top 3 in {hits}/40 trials")
    assert hits >= 38, f"shifted column in the top 3 in {hits}/40 trials"


def _categorical_reference(rows, seed, weights=(0.4, 0.3, 0.2, 0.1)):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.multinomial(torch.tensor(weights), rows, replacement=True, generator=generator)
    values = torch.tensor([5.0, 1000.0, -3.0, 7.5])[codes]  # category labels that are numbers far apart
    return torch.stack([torch.randn(rows, generator=generator), values], dim=1)


def test_categorical_column_is_counted_per_category_with_an_unseen_bin():
    monitor = sh.FeatureMonitor(feature_names=["amount", "store"], categorical=["store"], **OPTIONS)
    monitor.calibrate(_categorical_reference(2048, seed=5))
    assert monitor.categories == {1: [5.0, 1000.0, -3.0, 7.5]}
    counts = monitor.monitor.reference_counts[1]
    # one regular bin per category, most frequent first; underflow (other) and overflow (unseen) empty
    assert (counts[1:5] > 0).all() and counts[0] == 0 and counts[5:].sum() == 0
    for batch in _categorical_reference(512, seed=6).split(64):
        monitor.update(batch)
    assert not monitor.drift_detected
    # the same values in another mix: a categorical drift, attributed to the column by name
    for batch in _categorical_reference(512, seed=7, weights=(0.1, 0.2, 0.3, 0.4)).split(64):
        monitor.update(batch)
    assert monitor.drift_detected and monitor.last_report.attribution.columns[0][0] == "store"
    monitor.reset()
    unseen = _categorical_reference(64, seed=8)
    unseen[:, 1] = 6.0  # between two reference categories: numerically close, still a new category
    monitor.update(unseen)
    assert monitor.monitor._window.totals()[0][: 2 * 18].view(2, 18)[1, -1] == 64
    assert monitor.drift_detected


def test_more_categories_than_bins_share_an_other_bin():
    rows = 2048
    generator = torch.Generator().manual_seed(9)
    values = torch.randint(0, 20, (rows,), generator=generator).float()
    monitor = sh.FeatureMonitor(categorical=[0], bins=4, window=256, false_alarm_every=1000, bootstrap=1000)
    monitor.calibrate(values.reshape(-1, 1))
    assert len(monitor.categories[0]) == 20
    counts = monitor.monitor.reference_counts[0]
    assert counts[0] > counts[1:5].sum()  # 16 rarer categories in the underflow ("other") bin
    assert counts[-1] == 0


def test_dataframe_path_names_and_categories():
    pd = pytest.importorskip("pandas")
    generator = np.random.default_rng(10)
    rows = 2048

    def frame(rows, shift=0.0, countries=("fr", "de", "it")):
        return pd.DataFrame({
            "age": generator.normal(40, 10, rows) + shift,
            "income": generator.lognormal(10, 1, rows),
            "country": generator.choice(countries, rows),
            "segment": pd.Categorical(generator.choice(["a", "b"], rows)),
        })

    monitor = sh.FeatureMonitor(**OPTIONS)
    report = monitor.calibrate(frame(rows))
    assert monitor.feature_names == ["age", "income", "country", "segment"]
    assert sorted(monitor.categories) == [2, 3] and sorted(monitor.categories[2]) == ["de", "fr", "it"]
    assert list(report.features) == ["age", "income", "country", "segment"]
    for start in range(0, 512, 64):
        monitor.update(frame(64))
    assert not monitor.drift_detected
    for start in range(0, 512, 64):
        monitor.update(frame(64, shift=8.0))
    assert monitor.drift_detected and monitor.last_report.attribution.columns[0][0] == "age"
    monitor.reset()
    monitor.update(frame(64, countries=("es",)))
    assert monitor.drift_detected and monitor.last_report.attribution.columns[0][0] == "country"
    with pytest.raises(ValueError, match="columns"):
        monitor.update(frame(64)[["income", "age", "country", "segment"]])


def test_errors_name_the_problem():
    monitor = sh.FeatureMonitor(**OPTIONS)
    with pytest.raises(RuntimeError, match="before calibrate"):
        monitor.update(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="2-D"):
        monitor.calibrate(torch.zeros(2048))
    with pytest.raises(ValueError, match="feature_names has 2 names, the data has 3"):
        sh.FeatureMonitor(feature_names=["a", "b"], **OPTIONS).calibrate(torch.zeros(2048, 3))
    with pytest.raises(ValueError, match="not a column"):
        sh.FeatureMonitor(categorical=["zip"], **OPTIONS).calibrate(torch.zeros(2048, 3))
    with pytest.raises(ValueError, match="window"):
        sh.FeatureMonitor(window=4)
    text = np.array([["1.5", "x"]] * 2048, dtype=object)
    with pytest.raises(ValueError, match="column 'f1'.*categorical="):
        sh.FeatureMonitor(**OPTIONS).calibrate(text)
    monitor.calibrate(_table(2048, 3, seed=11))
    with pytest.raises(ValueError, match="4 columns, the monitor was calibrated with 3"):
        monitor.update(torch.zeros(8, 4))


def test_state_round_trip_and_corrupt_states_are_refused():
    monitor = sh.FeatureMonitor(feature_names=["amount", "store"], categorical=["store"], **OPTIONS)
    monitor.calibrate(_categorical_reference(2048, seed=12))
    for batch in _categorical_reference(256, seed=13).split(64):
        monitor.update(batch)
    buffer = io.BytesIO()
    torch.save(monitor.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = sh.FeatureMonitor(feature_names=["amount", "store"], categorical=["store"], **OPTIONS)
    restored.load_state_dict(state)
    assert restored.feature_names == ["amount", "store"] and restored.categories == monitor.categories
    for batch in _categorical_reference(512, seed=14, weights=(0.1, 0.2, 0.3, 0.4)).split(64):
        a, b = monitor.update(batch), restored.update(batch)
        assert (a.drift, a.reasons, a.score, a.cusum, a.signals) == (b.drift, b.reasons, b.score, b.cusum, b.signals)
    assert a.drift and b.attribution.columns[0][0] == "store"

    fresh = sh.FeatureMonitor(**OPTIONS)
    corrupt = {
        "kind": dict(state, kind="DriftMonitor"),
        "feature_names": dict(state, feature_names=["amount"]),
        "categories": dict(state, categories={1: [5.0, 5.0]}),
        "categories entry": dict(state, categories={7: [1.0]}),
        "options": dict(state, options=dict(state["options"], bins=8)),
        "reference_counts": dict(state, monitor=dict(state["monitor"],
                                                     reference_counts=-state["monitor"]["reference_counts"])),
    }
    for what, bad in corrupt.items():
        with pytest.raises(ValueError):
            fresh.load_state_dict(bad)
        assert not fresh.calibrated and fresh.feature_names is None, what
    with pytest.raises(ValueError, match="given"):
        sh.FeatureMonitor(feature_names=["x", "y"], **OPTIONS).load_state_dict(state)
