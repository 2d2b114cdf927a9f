"""The ``selfheal audit`` commands: success and bad input, each bad case with
a clear message and a non-zero exit status. Most run in-process through
``main``; ``process`` runs the real entry point (``python -m selfheal_ext``)."""
import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys

import pytest

from selfheal_ext.cli import main
from selfheal_ext.governance import AuditLog


def process(*args):
    done = subprocess.run([sys.executable, "-m", "selfheal_ext", *args], capture_output=True, text=True,
                          timeout=120)
    return done.returncode, done.stdout, done.stderr


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(args))
        except SystemExit as exit_:  # argparse's own errors
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "audit.db"
    log = AuditLog(path)
    for i in range(6):
        log.append("step", version=1 + i // 3, batch=i, state_hash=f"{i:064x}", loss=0.5 - 0.01 * i,
                   when=1_800_000_000.0 + 60 * i)
    log.append("guard", version=2, reason="collapse: 1.2 effective classes", when=1_800_000_400.0)
    evidence = {name: {"accuracy_estimate": 0.9, "entropy": 0.2, "effective_classes": 4.5,
                       "agreement_with_source": 0.95} for name in ("source", "approved", "proposed")}
    evidence["rules"] = [{"rule": "fraud rate", "ok": True, "violation": 0.0}]
    log.append("proposal", version=0, state_hash="a" * 64, proposal="aaaaaaaaaaaa", proposed_version=3,
               evidence=evidence, when=1_800_000_500.0)
    log.close()
    return path


def test_verify_show_export(db, tmp_path):
    status, out, err = process("audit", "verify", str(db))
    assert status == 0 and "ok: 8 records" in out
    status, out, _ = run("audit", "show", str(db), "--kind", "step", "--version", "2")
    assert status == 0 and out.count(" step ") == 3 and "loss=0.47" in out
    status, out, _ = run("audit", "show", str(db), "--since", "2027-01-15T08:05:00", "--json")
    records = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and [r["seq"] for r in records] == [6, 7, 8]
    status, out, _ = run("audit", "show", str(db), "--kind", "rollback")
    assert status == 0 and "no records match" in out
    target = tmp_path / "out.jsonl"
    status, out, _ = run("audit", "export", str(db), str(target), "--limit", "2")
    assert status == 0 and len(target.read_text().splitlines()) == 2


def test_verify_names_the_broken_record(db):
    connection = sqlite3.connect(db)
    connection.execute("DROP TRIGGER records_no_update")
    connection.execute("UPDATE records SET payload=replace(payload, '0.48', '0.18') WHERE seq=3")
    connection.commit()
    connection.close()
    status, out, err = process("audit", "verify", str(db))
    assert status == 1 and "BROKEN at record 3" in err and "altered" in err


def test_proposals_and_decisions(db):
    assert main(["audit", "proposals", str(db)]) == 0
    status, out, _ = run("audit", "proposals", str(db))
    assert "aaaaaaaaaaaa  pending" in out and "rule 'fraud rate': ok" in out
    status, out, _ = run("audit", "approve", str(db), "aaaa", "--by", "alice")
    assert status == 0 and "recorded: approve proposal aaaaaaaaaaaa" in out
    request = AuditLog(db, readonly=True).records(kinds=["approval_request"])[0]
    assert request.payload == {"proposal": "aaaaaaaaaaaa", "decision": "approve", "by": "alice", "note": ""}
    status, out, _ = run("audit", "proposals", str(db))
    assert "requested (approve)" in out
    # the serving healer applies it and records "approve": then it is decided
    log = AuditLog(db)
    log.append("approve", proposal="aaaaaaaaaaaa", by="alice")
    log.close()
    status, _, err = run("audit", "reject", str(db), "aaaaaaaaaaaa")
    assert status == 1 and "is approved, not pending" in err
    status, _, err = run("audit", "approve", str(db), "bbbb")
    assert status == 1 and "no proposal matches 'bbbb'" in err
    assert AuditLog(db, readonly=True).verify().ok


def test_bad_input_exits_non_zero_with_a_message(tmp_path, db):
    status, _, err = run("audit", "verify", str(tmp_path / "missing.db"))
    assert status == 2 and "no audit database" in err
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(2048))
    for command in ("verify", "show", "proposals"):
        status, _, err = run("audit", command, str(garbage))
        assert status == 2 and "audit database" in err and "garbage.db" in err, (command, err)
    status, _, err = run("audit", "approve", str(garbage), "abc")
    assert status == 2 and "audit database" in err
    status, _, err = run("audit", "show", str(db), "--since", "yesterday")
    assert status == 2 and "not a time" in err
    status, _, err = process("audit", "frobnicate", str(db))
    assert status == 2 and "invalid choice" in err
    status, _, err = run("audit", "export", str(db), str(tmp_path / "no" / "such" / "dir" / "x.jsonl"))
    assert status == 2 and "cannot write" in err
