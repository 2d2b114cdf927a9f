"""The product front: the demo end to end (short form; its printed numbers
come from the run), the demo on a user's own tensors and model, the report
checked in a real headless Chromium, and the CLI's bad-argument paths."""
import contextlib
import io
import os
import re
import shutil
import sys

import pytest
import torch

from selfheal_ext.cli import main
from selfheal_ext.demo import run_demo
from selfheal_ext.governance import AuditLog

HERE = os.path.dirname(os.path.abspath(__file__))


def cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(args))
        except SystemExit as exit_:
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    printed = []
    result = run_demo(quick=True, out=str(out), progress=False, print_fn=printed.append)
    return out, result, "\n".join(printed)


def test_demo_runs_end_to_end_and_prints_its_own_numbers(demo):
    out, result, text = demo
    summary = result["summary"]
    # the printed summary is the measured one
    assert (f"under drift: source {100 * summary['drift_source_accuracy']:.1f}% -> healed "
            f"{100 * summary['drift_healed_accuracy']:.1f}%") in text
    for segment in result["segments"]:
        row = [line for line in text.splitlines() if line.startswith(segment["name"])]
        assert any(f"{100 * segment['healed_accuracy']:.1f}%" in line for line in row)
    # it heals, does no harm on clean data, detects every drift
    assert summary["drift_healed_accuracy"] > summary["drift_source_accuracy"] + 0.1
    assert summary["clean_healed_accuracy"] >= summary["clean_source_accuracy"] - 0.02
    assert summary["missed"] == 0
    # calibrated with its labels, the label-free estimate reads the clean segments' accuracy
    assert abs(summary["clean_estimated_accuracy"] - summary["clean_healed_accuracy"]) <= 0.03, summary
    assert (f"accuracy estimate on clean segments: {100 * summary['clean_estimated_accuracy']:.1f}% (label-free), "
            f"true {100 * summary['clean_healed_accuracy']:.1f}%") in text
    for segment in result["segments"]:
        if segment["drifted"]:  # an alarm rose in the segment, or the one before was still on
            assert segment["detection_delay"] is not None or segment["carried"]
            if segment["detection_delay"] is not None:
                assert segment["events"].get("drift", 0) + segment["events"].get("activate", 0) >= 1
    assert result["audit_ok"] and result["records"] > 50
    log = AuditLog(out / "audit.db", readonly=True)
    assert log.verify().ok and log.records(kinds=["monitor"]) and log.records(kinds=["step"])
    assert (out / "report.html").is_file() and result["report"]
    assert re.search(r"audit log: .*audit\.db \(\d+ records, chain intact\)", text)


def _chromium():
    for browser in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(browser)
        if path:
            return path, shutil.which("chromedriver")
    return None, None


def test_report_opens_in_headless_chromium_with_every_image_loaded(demo, tmp_path):
    out, result, _ = demo
    page = tmp_path / "report.html"
    status, printed, err = cli("report", str(out / "audit.db"), "--out", str(page), "--title", "CI report")
    assert status == 0 and page.is_file(), err
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 4 and "Hash chain intact" in html
    browser, driver_path = _chromium()
    if browser is None or driver_path is None:
        pytest.skip("no chromium/chromedriver here (.ci/run installs Debian's)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(page.as_uri())
        assert driver.title == "CI report"
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
        assert len(images) == 4 and all(done and w > 100 and h > 100 for done, w, h in images), images
        # the segment accuracies as the demo measured them, the heatmap by name, time on the x axis
        table = driver.execute_script(
            "return Array.from(document.querySelectorAll('table.accuracy tr')).map("
            "r => Array.from(r.cells).map(c => c.textContent));")
        assert table[0][:4] == ["segment", "until (UTC)", "batches", "served accuracy"]
        assert [row[0] for row in table[1:]] == [s["name"] + (" (drift)" if s["drifted"] else "")
                                                 for s in result["segments"]]
        assert [row[3] for row in table[1:]] == [f"{100 * s['healed_accuracy']:.1f}%" for s in result["segments"]]
        alts = driver.execute_script("return Array.from(document.images).map(i => i.alt);")
        assert any(alt.startswith("Top drifting layers over time") for alt in alts), alts
        stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
        assert all(re.search(rf"x axis: time, {stamp} to {stamp} UTC", alt) for alt in alts), alts
        reasons = driver.execute_script("return Array.from(document.querySelectorAll('ul.alarms li')).map("
                                        "l => l.textContent);")
        assert reasons and all("largest change in" in text and "top_signal" not in text for text in reasons)
        # the demo calibrates with its labels: the estimate is calibrated, no caveat
        assert driver.find_elements("css selector", "p.caveat") == []
        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        assert errors == []
    finally:
        driver.quit()


USER_MODEL = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64),
                         nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 5))
'''


def test_demo_on_the_users_own_tensors_and_model(tmp_path, monkeypatch):
    sys.path.insert(0, HERE)
    try:
        from healing_data import Task, trained_model
    finally:
        sys.path.remove(HERE)
    task = Task()
    model = trained_model(task)
    (tmp_path / "usermodel.py").write_text(USER_MODEL)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    reference, _ = task.sample(1024)
    clean, y_clean = task.sample(512)
    drifted, y_drifted = task.sample(1024, corrupt=True)
    torch.save({"reference": reference, "stream": torch.cat([clean, drifted]),
                "stream_labels": torch.cat([y_clean, y_drifted]), "segments": torch.tensor([512])},
               tmp_path / "data.pt")
    monkeypatch.chdir(tmp_path)
    status, printed, err = cli("demo", "--data", "data.pt", "--model", "usermodel:build", "--weights", "weights.pt",
                               "--no-progress", "--no-report", "--out", "run")
    assert status == 0, err
    assert "segment 1" in printed and "segment 2" in printed and "chain intact" in printed
    healed = re.search(r"under drift: source ([\d.]+)% -> healed ([\d.]+)%", printed)
    assert healed and float(healed.group(2)) > float(healed.group(1))
    # labels are optional: then only the label-free estimate is shown
    torch.save({"x": torch.cat([reference, drifted])}, tmp_path / "unlabelled.pt")
    status, printed, err = cli("demo", "--data", "unlabelled.pt", "--model", "usermodel:build", "--weights",
                               "weights.pt", "--no-progress", "--no-report", "--out", "run2")
    assert status == 0, err
    assert "under drift" not in printed and "est. acc" in printed


def test_cli_bad_arguments_end_with_a_message_and_a_non_zero_status(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "usermodel.py").write_text(USER_MODEL)
    torch.save({"reference": torch.randn(600, 16), "stream": torch.randn(64, 16)}, tmp_path / "data.pt")
    cases = [
        (("demo", "--data", "missing.pt", "--model", "usermodel:build"), "no data file"),
        (("demo", "--model", "usermodel:build"), "go with --data"),
        (("demo", "--data", "data.pt"), "--model pkg.module:factory"),
        (("demo", "--data", "data.pt", "--model", "nosuchmodule:build"), "cannot import"),
        (("demo", "--data", "data.pt", "--model", "usermodel"), "pkg.module:factory"),
        (("demo", "--data", "data.pt", "--model", "usermodel:build", "--weights", "missing.pt"), "no weights file"),
        (("report", "missing.db"), "no audit database"),
    ]
    (tmp_path / "garbage.pt").write_bytes(os.urandom(300))
    cases.append((("demo", "--data", "garbage.pt", "--model", "usermodel:build"), "cannot read"))
    torch.save({"w": torch.zeros(3)}, tmp_path / "wrong.pt")
    cases.append((("demo", "--data", "data.pt", "--model", "usermodel:build", "--weights", "wrong.pt"),
                  "cannot load weights"))
    torch.save({"reference": torch.randn(40, 16), "stream": torch.randn(64, 16)}, tmp_path / "small.pt")
    cases.append((("demo", "--data", "small.pt", "--model", "usermodel:build", "--no-report"), "at least"))
    (tmp_path / "garbage.db").write_bytes(os.urandom(1024))
    cases.append((("report", "garbage.db"), "audit database"))
    for args, message in cases:
        status, _, err = cli(*args, *(("--no-progress",) if args[0] == "demo" else ()))
        assert status == 2 and message in err, (args, status, err)
    status, _, err = cli("demo", "--device", "cuda", "--no-progress")
    if not torch.cuda.is_available():
        assert status == 2 and "no CUDA device" in err


def test_a_drift_the_input_side_cannot_see_does_not_make_the_healer_flap():
    import selfheal_ext as sh
    from selfheal_ext.demo import load_digits, load_digits_model
    digits = load_digits()
    model, _ = load_digits_model()
    healer = sh.SelfHealer(model, monitor_options={"window": 128, "false_alarm_every": 1000})
    healer.calibrate(list(digits["calibration"][0].split(64)))
    x, _ = digits["test"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(16):  # mirrored digits: every channel's mean and spread unchanged
        healer(x[torch.randint(len(x), (64,), generator=generator)].flip(-1))
    kinds = [e.kind for e in healer.events]
    assert kinds.count("activate") == 1 and "release" not in kinds and healer.active


def test_report_survives_non_finite_values_and_escapes_every_cell(tmp_path):
    from selfheal_ext.report import write_report
    log = AuditLog(tmp_path / "audit.db")
    for batch in range(1, 6):
        log.append("monitor", batch=batch, score=float("nan") if batch == 3 else 1.0 + batch, threshold=4.0,
                   entropy_mean=float("inf") if batch == 2 else 0.5, accuracy_estimate=0.9,
                   batch_accuracy_estimate=0.9, active=batch > 3)
    log.append("guard", batch=4, reason="<script>alert(1)</script>")
    log.close()
    import sqlite3
    db = sqlite3.connect(tmp_path / "audit.db")
    db.execute("DROP TRIGGER records_no_update")
    db.execute("UPDATE records SET version='<img src=x onerror=alert(2)>' WHERE seq=6")
    db.commit()
    db.close()
    page = write_report(tmp_path / "audit.db", tmp_path / "report.html").read_text()
    assert "<script>" not in page and "<img src=x" not in page and "&lt;img src=x" in page
    assert "Hash chain BROKEN" in page and page.count("data:image/png;base64,") == 4
    # no segment records: accuracy per hour, estimated and marked so, with the no-labels caveat
    assert "Accuracy per hour" in page and "90.0% <i>(estimated)</i>" in page and "Caveat" in page


def test_alarm_reasons_in_words_and_labelled_estimates_drop_the_caveat(tmp_path):
    from selfheal_ext.report import alarm_words, write_report
    words = alarm_words({"reasons": ["window", "nonfinite"], "signals": {"6": 3.0, "entropy_tail": 7.5, "x": "nan"},
                         "estimated_drop": 0.12})
    assert words == ("The recent window's distribution moved away from the reference (window test); a surge of "
                     "NaN/Inf values; largest change in the share of uncertain (high-entropy) predictions; "
                     "estimated accuracy drop +12.0 points.")
    assert alarm_words({"reasons": ["batch"], "top_signal": "6"}).endswith("largest change in layer '6'.")
    log = AuditLog(tmp_path / "audit.db")
    for batch in range(1, 4):
        log.append("monitor", batch=batch, score=5.0, threshold=4.0, accuracy_estimate=0.8,
                   batch_accuracy_estimate=0.8, signals={"fc": 5.0, "entropy_mean": 1.0},
                   accuracy_estimates={"labelled": True, "atc": 0.8})
    log.append("activate", batch=3, reasons=["cusum_up"], top_signal="fc")
    log.close()
    page = write_report(tmp_path / "audit.db", tmp_path / "report.html").read_text()
    assert "Caveat" not in page and "top_signal=" not in page
    assert "A small persistent shift added up (CUSUM, upward); largest change in layer &#x27;fc&#x27;" in page


def test_a_listener_that_removes_itself_and_raises_does_not_break_serving():
    sys.path.insert(0, HERE)
    try:
        from healing_data import Task, trained_model
    finally:
        sys.path.remove(HERE)
    import selfheal_ext as sh
    task = Task()
    healer = sh.SelfHealer(trained_model(task), monitor_options=dict(window=256, false_alarm_every=200,
                                                                      bootstrap=400))
    healer.calibrate([task.sample(64)[0] for _ in range(24)])

    def leaving(h, report):
        h.remove_listener(leaving)
        raise RuntimeError("bye")

    healer.add_listener(leaving)
    with pytest.warns(RuntimeWarning, match="bye"):
        assert healer(task.sample(8)[0]).shape == (8, 5)
    assert healer.event_count == len(healer.events)


def test_user_data_shapes_are_checked_before_serving(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "usermodel.py").write_text(USER_MODEL)
    reference = torch.randn(600, 16)
    torch.save({"reference": reference, "stream": torch.randn(128, 16), "segments": [64]}, tmp_path / "ok.pt")
    status, printed, err = cli("demo", "--data", "ok.pt", "--model", "usermodel:build", "--no-progress",
                               "--no-report", "--out", "run")
    assert status == 0 and "segment 2" in printed, err
    for data, message in (
            ({"reference": reference, "stream": torch.randn(64, 16), "stream_labels": torch.zeros(64, 5)},
             "class indices"),
            ({"reference": torch.randn(600, 8), "stream": torch.randn(64, 8)}, "cannot run on the reference"),
            ({"reference": reference, "stream": torch.randn(64, 7)}, "differ"),
            ({"reference": torch.randn(600), "stream": torch.randn(64)}, "at least 2-D")):
        torch.save(data, tmp_path / "bad.pt")
        status, _, err = cli("demo", "--data", "bad.pt", "--model", "usermodel:build", "--no-progress",
                             "--no-report")
        assert status == 2 and message in err, (message, err)
    status, _, err = cli("demo", "--device", "gpu", "--no-progress")
    assert status == 2 and "--device 'gpu'" in err
