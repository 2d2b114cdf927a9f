"""The CLI never writes over the log it reads (or its SQLite and snapshot
files), never overwrites a file without --force, and answers hostile input
with a message and exit status 2 (or a report of tampering), never a traceback."""
import contextlib
import io
import sqlite3

import pytest

from selfheal_ext.cli import main
from selfheal_ext.governance import AuditError, AuditLog


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse's own errors
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


def proposal_evidence(value):
    evidence = {name: {"accuracy_estimate": value, "entropy": value, "effective_classes": value,
                       "agreement_with_source": value} for name in ("source", "proposed")}
    evidence["rules"] = [{"rule": "fraud rate", "ok": False, "violation": value}]
    return evidence


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "log.db"
    log = AuditLog(path)
    for i in range(5):
        log.append("step", version=1, batch=i, loss=0.5)
    log.append("proposal", version=0, state_hash="a" * 64, proposal="aaaaaaaaaaaa", proposed_version=1,
               evidence=proposal_evidence(0.5))
    log.close()
    return path


def intact(path, records=6):
    result = AuditLog(path, readonly=True).verify()
    return result.ok and result.records == records


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm", "-journal", ".snapshots", ".snapshots/x.jsonl"])
def test_export_and_report_refuse_the_log_and_its_files(db, suffix):
    target = f"{db}{suffix}"
    status, out, err = run("audit", "export", db, target, "--force")
    assert status == 2 and "refusing to write" in err and "wrote" not in out
    assert intact(db)
    status, out, err = run("report", db, "--out", target, "--force")
    assert status == 2 and "refusing to write" in err
    assert intact(db)


def test_a_path_that_resolves_to_the_log_is_refused(db, tmp_path):
    (tmp_path / "sub").mkdir()
    status, _, err = run("audit", "export", db, tmp_path / "sub" / ".." / "log.db")
    assert status == 2 and "refusing to write" in err
    link = tmp_path / "alias.db"
    link.symlink_to(db)
    status, _, err = run("audit", "export", db, link, "--force")
    assert status == 2 and "refusing to write" in err
    assert intact(db)


def test_an_existing_file_is_overwritten_only_with_force(db, tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("keep me\n")
    status, _, err = run("audit", "export", db, target)
    assert status == 2 and "--force" in err and target.read_text() == "keep me\n"
    status, out, _ = run("audit", "export", db, target, "--force")
    assert status == 0 and len(target.read_text().splitlines()) == 6
    page = tmp_path / "page.html"
    page.write_text("keep me")
    status, _, err = run("report", db, "--out", page)
    assert status == 2 and "--force" in err and page.read_text() == "keep me"


def test_demo_out_an_existing_file_is_a_clean_error(tmp_path):
    existing = tmp_path / "a_file"
    existing.write_text("x")
    status, _, err = run("demo", "--quick", "--out", existing, "--no-progress", "--no-report")
    assert status == 2 and "is a file" in err and "Traceback" not in err
    assert existing.read_text() == "x"


@pytest.mark.parametrize("option", ["--version", "--limit"])
def test_huge_numbers_are_a_clean_error(db, option):
    status, _, err = run("audit", "show", db, option, "9" * 40)
    assert status == 2 and "must be between 0 and" in err
    status, _, err = run("audit", "show", db, option, "-1")
    assert status == 2


@pytest.mark.parametrize("proposal", ["", "   "])
def test_an_empty_proposal_id_approves_nothing(db, proposal):
    status, _, err = run("audit", "approve", db, proposal)
    assert status == 2 and "empty" in err
    assert AuditLog(db, readonly=True).records(kinds=["approval_request"]) == []


def test_verify_reports_an_extra_column_as_tampering(db):
    connection = sqlite3.connect(db)
    connection.execute("ALTER TABLE records ADD COLUMN extra TEXT")
    connection.commit()
    connection.close()
    status, _, err = run("audit", "verify", db)
    assert status == 1 and "BROKEN" in err and "records table was altered" in err
    status, out, _ = run("audit", "show", db)
    assert status == 0 and out.count(" step ") == 5


def test_proposals_with_nan_or_odd_evidence_do_not_crash(tmp_path):
    path = tmp_path / "nan.db"
    log = AuditLog(path)
    log.append("proposal", version=0, state_hash="a" * 64, proposal="bbbbbbbbbbbb", proposed_version=1,
               evidence=proposal_evidence(float("nan")))
    log.append("proposal", version=0, state_hash="c" * 64, proposal="cccccccccccc", proposed_version=2,
               evidence={"source": "garbage", "rules": ["x"]})
    log.close()
    status, out, err = run("audit", "proposals", path)
    assert status == 0, err
    assert "est. accuracy nan" in out and "cccccccccccc" in out


def test_another_applications_sqlite_file_is_refused_untouched(tmp_path):
    path = tmp_path / "app.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    connection.execute("INSERT INTO users VALUES (1, 'ada')")
    connection.commit()
    connection.close()
    before = path.read_bytes()
    with pytest.raises(AuditError, match="not a selfheal audit database"):
        AuditLog(path)
    connection = sqlite3.connect(path)
    tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    connection.close()
    assert tables == ["users"] and path.read_bytes() == before


def test_a_healer_refuses_another_applications_sqlite_file(tmp_path):
    import torch
    from selfheal_ext import SelfHealer
    path = tmp_path / "app.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    connection.commit()
    connection.close()
    with pytest.raises(AuditError, match="not a selfheal audit database"):
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 5)).eval()
        SelfHealer(model, audit=path)
    connection = sqlite3.connect(path)
    assert [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["users"]
    connection.close()
