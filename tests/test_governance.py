"""Audit log (hash chain, tamper evidence, queries), snapshot store (content
addressing, refusing pickles), policy limits and the bias guard."""
import datetime
import json
import math
import os
import pickle
import sqlite3

import pytest
import torch

from selfheal_ext.governance import (GENESIS, AuditError, AuditLog, BiasGuard, Policy, SnapshotError,
                                     SnapshotStore, load_snapshot_file, tensor_digest)


def _filled(path, n=12):
    log = AuditLog(path)
    for i in range(n):
        log.append("step", version=i // 4, batch=i, state_hash=f"{i:064x}", loss=0.1 * i + 0.123456789,
                   marker=f"record-{i:03d}", when=1_800_000_000.0 + i)
    return log


def test_chain_verifies_and_queries_filter(tmp_path):
    log = _filled(tmp_path / "audit.db")
    log.append("guard", reason="collapse", when=1_800_000_100.0)
    result = log.verify()
    assert result.ok and result.records == 13 and result.head == log.head() != GENESIS
    assert [r.seq for r in log.records(kinds=["guard"])] == [13]
    assert [r.batch for r in log.records(version=1)] == [4, 5, 6, 7]
    assert [r.batch for r in log.records(since=1_800_000_003.0, until=1_800_000_005.0)] == [3, 4]
    assert [r.seq for r in log.records(after_seq=10)] == [11, 12, 13]
    assert log.records(newest_first=True, limit=1)[0].kind == "guard"
    # records link: each carries its predecessor's hash
    records = log.records()
    assert records[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(records, records[1:]))
    out = tmp_path / "audit.jsonl"
    assert log.export_jsonl(out, kinds=["step"]) == 12
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["payload"]["marker"] == "record-000" and lines[0]["iso_time"].startswith("2027-01-15")
    # verification with the head kept elsewhere
    assert log.verify(expect_head=result.head).ok


def test_non_finite_payloads_are_recorded_as_strings(tmp_path):
    log = AuditLog(tmp_path / "audit.db")
    record = log.append("step", loss=float("nan"), shift=float("inf"), values=torch.tensor([1.0, float("-inf")]))
    assert record.payload == {"loss": "nan", "shift": "inf", "values": [1.0, "-inf"]}
    assert log.verify().ok


def test_updates_and_deletes_are_refused(tmp_path):
    log = _filled(tmp_path / "audit.db", 3)
    db = sqlite3.connect(tmp_path / "audit.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE records SET payload='{}' WHERE seq=2")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM records WHERE seq=2")
    db.close()
    assert log.verify().ok


def _flip_in_file(path, needle: bytes, replacement: bytes):
    data = bytearray(path.read_bytes())
    index = data.find(needle)
    assert index >= 0 and data.find(needle, index + 1) < 0
    data[index: index + len(needle)] = replacement
    path.write_bytes(bytes(data))


def test_a_flipped_byte_names_the_record(tmp_path):
    path = tmp_path / "audit.db"
    _filled(path).close()  # closing checkpoints the WAL into the main file
    _flip_in_file(path, b"record-007", b"record-00X")
    result = AuditLog(path, readonly=True).verify()
    assert not result.ok and result.first_bad == 8 and "altered" in result.reason and result.records == 7


def test_a_deleted_record_is_found(tmp_path):
    path = tmp_path / "audit.db"
    _filled(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER records_no_delete")  # what a tamperer would have to do first
    db.execute("DELETE FROM records WHERE seq=5")
    db.commit()
    db.close()
    result = AuditLog(path, readonly=True).verify()
    assert not result.ok and result.first_bad == 6 and "5..5 are missing" in result.reason


def test_records_cut_from_the_end_need_the_kept_head(tmp_path):
    path = tmp_path / "audit.db"
    log = _filled(path)
    head = log.verify().head
    log.close()
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER records_no_delete")
    db.execute("DELETE FROM records WHERE seq=12")
    db.commit()
    db.close()
    log = AuditLog(path, readonly=True)
    assert log.verify().ok  # the chain itself is intact...
    result = log.verify(expect_head=head)
    assert not result.ok and "removed from the end" in result.reason  # ...but not what was kept


def test_rewriting_a_record_and_its_hash_breaks_the_next_link(tmp_path):
    path = tmp_path / "audit.db"
    _filled(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER records_no_update")
    db.execute("UPDATE records SET payload=replace(payload, 'record-003', 'record-999'), hash=? WHERE seq=4",
               ("f" * 64,))
    db.commit()
    db.close()
    result = AuditLog(path, readonly=True).verify()
    assert not result.ok and result.first_bad == 4


def test_bad_files_give_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(AuditError, match="not a readable audit database"):
        AuditLog(garbage)
    with pytest.raises(AuditError, match="no audit database"):
        AuditLog(tmp_path / "missing.db", readonly=True)
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(AuditError, match="not a selfheal audit database"):
        AuditLog(other, readonly=True)
    with pytest.raises(AuditError, match="read-only"):
        _filled(tmp_path / "ok.db", 1).close() or AuditLog(tmp_path / "ok.db", readonly=True).append("x")
    with pytest.raises(ValueError, match="durability"):
        AuditLog(tmp_path / "x.db", durability="sometimes")


def test_two_writers_share_one_chain(tmp_path):
    path = tmp_path / "audit.db"
    first, second = AuditLog(path), AuditLog(path, durability="full")
    for i in range(5):
        first.append("a", i=i)
        second.append("b", i=i)
    assert len(first) == 10 and first.verify().ok and second.verify().ok


# ----------------------------------------------------------------- snapshots


def test_snapshots_are_content_addressed_and_exact(tmp_path):
    store = SnapshotStore(tmp_path / "snaps")
    tensors = {"a.up": torch.randn(5, 3), "b.gamma": torch.randn(7).to(torch.bfloat16),
               "c.count": torch.arange(4), "d.half": torch.randn(2, 2).half()}
    digest = store.save(tensors, {"version": 3})
    assert digest == tensor_digest(tensors) and digest in store and store.digests() == [digest]
    assert store.save(tensors) == digest  # same content, same file
    loaded, meta = store.load(digest)
    assert meta == {"version": 3}
    assert set(loaded) == set(tensors)
    for name in tensors:
        assert loaded[name].dtype == tensors[name].dtype and torch.equal(loaded[name], tensors[name])
    # a changed byte in the file: the content no longer matches its name
    path = store.path(digest)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="corrupt"):
        store.load(digest)
    with pytest.raises(SnapshotError, match="no snapshot"):
        store.load("0" * 64)
    with pytest.raises(SnapshotError, match="not a snapshot digest"):
        store.load("../../etc/passwd")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['SELFHEAL_PWNED']}",))


def test_a_pickle_payload_is_refused_and_never_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SELFHEAL_PWNED", str(marker))
    store = SnapshotStore(tmp_path / "snaps")
    digest = "a" * 64
    with open(store.path(digest), "wb") as handle:
        pickle.dump({"up": _Payload()}, handle)
    torch.save({"up": _Payload()}, tmp_path / "evil.pt")
    for path in (store.path(digest), tmp_path / "evil.pt"):
        with pytest.raises(SnapshotError, match="never unpickled"):
            load_snapshot_file(path)
    with pytest.raises(SnapshotError):
        store.load(digest)
    assert not marker.exists()


def test_truncated_snapshots_and_stale_temporaries(tmp_path):
    store = SnapshotStore(tmp_path / "snaps")
    digest = store.save({"x": torch.randn(100)})
    path = store.path(digest)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(SnapshotError, match="not a valid safetensors"):
        store.load(digest)
    stale = store.directory / f".{'b' * 64}.123.456.tmp"
    stale.write_bytes(b"half")
    assert store.digests() == [digest]  # a temporary is never taken for a snapshot
    assert store.prune(keep=[]) == [digest] and not stale.exists()


# -------------------------------------------------------------------- policy


class _Clock:
    def __init__(self, hour):
        self.hour = hour

    def __call__(self):
        return datetime.datetime(2026, 11, 29, self.hour, 30)


def test_policy_hours_wrap_midnight_and_bad_limits():
    clock = _Clock(23)
    night = Policy(allowed_hours=(22, 6), clock=clock)
    assert night.hours_allow()
    clock.hour = 5
    assert night.hours_allow()
    clock.hour = 12
    assert not night.hours_allow()
    day = Policy(allowed_hours=(9, 17), clock=clock)
    assert day.hours_allow()
    clock.hour = 17
    assert not day.hours_allow()
    with pytest.raises(ValueError):
        Policy(allowed_hours=(5, 5))
    with pytest.raises(ValueError):
        Policy(max_weight_change=0)
    with pytest.raises(ValueError):
        Policy(max_steps_per_minute=-1)


# ---------------------------------------------------------------- bias guard


def _logits_for(classes, n_classes=3):
    return torch.nn.functional.one_hot(torch.as_tensor(classes), n_classes).float() * 5


def test_bias_guard_trips_on_a_forced_group_shift_and_not_on_a_fair_one():
    groups = torch.tensor([0, 1] * 50)
    x = torch.stack([groups.float(), torch.randn(100)], dim=1)
    source = _logits_for([1 if i % 4 < 2 else 0 for i in range(100)])  # 50 % positive in both groups
    guard = BiasGuard(groups=0, positive_class=1, max_class_shift=0.5, max_gap_increase=0.1, min_group_samples=20)
    # adaptation that flips group 1's positives to negative: rates 50 % vs 0 %
    shifted = source.clone()
    shifted[groups == 1] = _logits_for([0] * 50)
    reason, detail = guard.evaluate(x, shifted, source)
    assert reason is not None and "differs across groups" in reason and detail["group_gap"] == pytest.approx(0.5)
    # the same change in both groups keeps the gap: not a bias trip (class shift under its bound)
    fair = _logits_for([1 if i % 8 < 2 else 0 for i in range(100)])
    assert guard.evaluate(x, fair, source)[0] is None
    # streaming form: trips once enough samples of each group were seen
    tripped = None
    for _ in range(3):
        tripped = tripped or guard.update(x, shifted, source)
    assert tripped is not None and "groups" in tripped
    strict = BiasGuard(max_class_shift=0.1)
    assert "class mix moved" in strict.evaluate(x, shifted, source)[0]
    with pytest.raises(ValueError, match="positive_class"):
        BiasGuard(groups=0)
    with pytest.raises(ValueError, match="ids for a batch"):
        BiasGuard(groups=lambda z: torch.zeros(3), positive_class=1, max_class_shift=1).evaluate(x, shifted, source)


def test_tampered_field_types_odd_paths_and_scalar_tensors(tmp_path):
    path = tmp_path / "odd#name?.db"
    log = _filled(path, 4)
    log.close()
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER records_no_update")
    db.execute("UPDATE records SET time='abc' WHERE seq=3")
    db.commit()
    db.close()
    readonly = AuditLog(path, readonly=True)
    result = readonly.verify()
    assert not result.ok and result.first_bad == 3
    assert readonly.records()[2].iso_time == "?"
    # a 0-d tensor hashes and stores like any other
    store = SnapshotStore(tmp_path / "snaps")
    digest = store.save({"scalar": torch.tensor(1.5), "empty": torch.zeros(0)})
    assert store.load(digest)[0]["scalar"].item() == 1.5
    (store.directory / ("z" * 64 + ".safetensors")).write_bytes(b"not ours")
    assert store.digests() == [digest]


def test_opening_for_decisions_never_changes_another_file(tmp_path):
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    before = other.read_bytes()
    with pytest.raises(AuditError, match="not a selfheal audit database"):
        AuditLog(other, create=False)
    assert other.read_bytes() == before
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with pytest.raises(AuditError):
        AuditLog(empty, create=False)
    assert empty.read_bytes() == b""
