"""rollback() and load_state_dict() are all or nothing: a state that does not
fit this healer (shapes, dtypes, names) or holds NaN/Inf is refused before
anything is written, nothing is audited, and no unusable version is kept."""
import copy
import functools
import math

import pytest
import torch
from torch import nn

from selfheal_ext import SelfHealer
from selfheal_ext.governance import AuditLog, SnapshotError
from healing_data import C, D, Task

MONITOR = dict(window=128, false_alarm_every=100, bootstrap=200)


@functools.lru_cache(maxsize=None)
def trained_mlp(width, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width),
                          nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, C))
    task = Task()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        x, y = task.sample(128)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def mlp(width):
    return copy.deepcopy(trained_mlp(width))


def adapted_healer(width, audit, task):
    healer = SelfHealer(mlp(width), audit=audit, lr=1e-2, monitor_options=MONITOR)
    healer.calibrate([task.sample(64)[0] for _ in range(12)])
    for _ in range(30):
        healer(task.sample(64, corrupt=True)[0])
    assert healer.steps > 0
    healer.snapshot()
    return healer


def differences(a, b, path=""):
    """Paths where two nested states differ (empty: the same)."""
    if isinstance(a, dict) and isinstance(b, dict) and set(a) == set(b):
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    return [] if same(a, b) else [path]


def same(a, b):
    """Equal nested states (tensors bit for bit, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)) and torch.equal(a.isnan(), b.isnan())
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two MLPs of widths 128 and 96 sharing one audit log: their adapter
    tensor names match, their shapes do not. (Shared by the tests: each
    checks that its refused call changed nothing.)"""
    task = Task()
    audit = tmp_path_factory.mktemp("pair") / "audit.db"
    wide = adapted_healer(128, audit, task)
    narrow = adapted_healer(96, audit, task)
    return wide, narrow, task, audit


def served(healer, x):
    """The served model's logits for x, without updating its normalisation statistics."""
    healer.adapters.set_update_running(False)
    try:
        with torch.no_grad(), healer.monitor.paused():
            return healer.model(x)
    finally:
        healer.adapters.set_update_running(True)


def assert_unchanged(healer, before, logits_before, x, audit, records_before):
    assert differences(healer.state_dict(), before) == []
    assert torch.equal(served(healer, x), logits_before)
    assert len(AuditLog(audit, readonly=True)) == records_before


def test_rollback_to_another_architectures_version_changes_nothing(pair):
    wide, narrow, task, audit = pair
    x = task.sample(64, corrupt=True)[0]
    before, logits, records = wide.state_dict(), served(wide, x), len(AuditLog(audit, readonly=True))
    versions = dict(wide.version_digests)
    with pytest.raises(SnapshotError, match=r"must be torch.float32 \(128"):
        wide.rollback(narrow.version_digests[narrow.version])
    assert wide.version_digests == versions  # the unusable version is not registered
    assert_unchanged(wide, before, logits, x, audit, records)


def test_load_state_dict_of_another_architecture_changes_nothing(pair):
    wide, narrow, task, audit = pair
    x = task.sample(64, corrupt=True)[0]
    before, logits, records = narrow.state_dict(), served(narrow, x), len(AuditLog(audit, readonly=True))
    with pytest.raises(ValueError, match="must be torch.float32"):
        narrow.load_state_dict(wide.state_dict())
    assert_unchanged(narrow, before, logits, x, audit, records)
    twin = SelfHealer(mlp(96), lr=1e-2, monitor_options=MONITOR)
    twin.calibrate([task.sample(64)[0] for _ in range(12)])
    twin.load_state_dict(narrow.state_dict())
    twin(x)  # the monitor still fits the model (it had been replaced by the wide one's)


def nan_state(state):
    poisoned = copy.deepcopy(state)
    name = next(n for n, t in poisoned["adapters"].items() if t.is_floating_point() and t.numel())
    poisoned["adapters"][name].fill_(float("nan"))
    return poisoned


def test_a_snapshot_full_of_nan_is_refused_by_rollback(pair, tmp_path):
    wide, _, task, audit = pair
    digest = wide.snapshots.save(nan_state(wide.state_dict())["adapters"], {"version": 99})
    x = task.sample(64, corrupt=True)[0]
    before, logits, records = wide.state_dict(), served(wide, x), len(AuditLog(audit, readonly=True))
    with pytest.raises(SnapshotError, match="NaN or Inf"):
        wide.rollback(digest)
    assert digest not in wide.version_digests.values()
    assert_unchanged(wide, before, logits, x, audit, records)


@pytest.mark.parametrize("where", ["adapters", "version", "monitor", "fisher"])
def test_a_state_with_nan_is_refused_by_load_state_dict(pair, where):
    wide, _, task, audit = pair
    state = wide.state_dict()
    if where == "adapters":
        state = nan_state(state)
    elif where == "version":
        version = max(state["versions"])
        name = next(iter(state["versions"][version]))
        state["versions"][version][name] = torch.full_like(state["versions"][version][name], float("inf"))
    elif where == "monitor":
        state["monitor"]["signal_scale"] = torch.full_like(state["monitor"]["signal_scale"], float("nan"))
    else:
        name = next(iter(state["fisher"]))
        state["fisher"][name] = torch.full_like(state["fisher"][name], float("nan"))
    twin = SelfHealer(mlp(128), lr=1e-2, monitor_options=MONITOR)
    twin.calibrate([task.sample(64)[0] for _ in range(12)])
    x = task.sample(64, corrupt=True)[0]
    before, logits = twin.state_dict(), served(twin, x)
    with pytest.raises(ValueError, match="NaN"):
        twin.load_state_dict(state)
    assert same(twin.state_dict(), before) and torch.equal(served(twin, x), logits)


@pytest.mark.parametrize("version, error", [(1.5, TypeError), (True, TypeError), (None, TypeError),
                                            (float("nan"), TypeError), (1.0, TypeError)])
def test_rollback_names_a_bad_version_argument(pair, version, error):
    wide, _, task, audit = pair
    before, records = wide.state_dict(), len(AuditLog(audit, readonly=True))
    with pytest.raises(error, match=r"argument 'version' must be .* got "):
        wide.rollback(version)
    assert same(wide.state_dict(), before) and len(AuditLog(audit, readonly=True)) == records


def test_the_monitor_alone_validates_before_writing(pair):
    wide, narrow, task, _ = pair
    before = narrow.monitor.state_dict()
    with pytest.raises(ValueError, match="features"):
        narrow.monitor.load_state_dict(wide.monitor.state_dict())
    assert same(narrow.monitor.state_dict(), before)
    broken = copy.deepcopy(before)
    broken["cusum"] = [float("nan"), 0.0]
    with pytest.raises(ValueError, match="cusum"):
        narrow.monitor.load_state_dict(broken)
    assert same(narrow.monitor.state_dict(), before)
