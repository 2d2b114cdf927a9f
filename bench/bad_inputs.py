"""Bad input, per public function: each case must end in a clear error (a
TypeError, ValueError, RuntimeError or KeyError whose message starts with
"selfheal" and so comes from this package's own checks), never in a crash,
an error from deep inside a library, or a silent success. Prints one line
per function and the cases that failed the bar.

    OMP_NUM_THREADS=1 python bench/bad_inputs.py
"""
import contextlib
import io
import sqlite3
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from selfheal_ext import SelfHealer, ops  # noqa: E402
from selfheal_ext.cli import main as cli  # noqa: E402
from selfheal_ext.governance import AuditLog  # noqa: E402

NAN, INF = float("nan"), float("inf")


def adapter_cases():
    x, down, up = torch.randn(4, 8), torch.randn(2, 8), torch.randn(8, 2)
    return [
        lambda: ops.adapter(x, down, up, activation="tanh"),
        lambda: ops.adapter(x, torch.randn(2, 7), up),
        lambda: ops.adapter(x, down, torch.randn(7, 2)),
        lambda: ops.adapter(x.half(), down, up),
        lambda: ops.adapter(x.long(), down.long(), up.long()),
        lambda: ops.adapter(x, down, up, down_bias=torch.randn(3)),
        lambda: ops.adapter(x, down, up, scale=torch.randn(7)),
        lambda: ops.adapter(torch.randn(4, 9), down, up),
    ]


def softmax_entropy_cases():
    return [
        lambda: ops.softmax_entropy(torch.randn(3)),
        lambda: ops.softmax_entropy(torch.randn(2, 3, 4)),
        lambda: ops.softmax_entropy(torch.randint(0, 3, (2, 3))),
    ]


def histogram_cases():
    counts, nonfinite = torch.zeros(3, 6, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    x, lo, hi = torch.randn(5, 3), torch.zeros(3), torch.ones(3)
    with torch.inference_mode():
        frozen = torch.zeros(3, 6, dtype=torch.long)
    return [
        lambda: ops.histogram_update_(counts.float(), nonfinite, x, lo, hi),
        lambda: ops.histogram_update_(counts, nonfinite, torch.randn(5, 4), lo, hi),
        lambda: ops.histogram_update_(counts, nonfinite[:2], x, lo, hi),
        lambda: ops.histogram_update_(counts, nonfinite, x, lo.double(), hi),
        lambda: ops.histogram_update_(counts, nonfinite, x.long(), lo, hi),
        lambda: ops.histogram_update_(counts[:, ::2], nonfinite, x, lo, hi),
        lambda: ops.histogram_update_(frozen, nonfinite, x, lo, hi),
    ]


def divergence_cases():
    p = torch.randint(0, 9, (3, 5))
    cases = []
    for op in (ops.kl_divergence, ops.js_divergence):
        cases += [
            lambda op=op: op(p, p, -1.0),
            lambda op=op: op(p, p, NAN),
            lambda op=op: op(p, p, 1e308),
            lambda op=op: op(p, p[:, :4]),
            lambda op=op: op(p.double(), p),
            lambda op=op: op(torch.tensor([[1e308, 1e308]], dtype=torch.float64),
                             torch.tensor([[1.0, 1.0]], dtype=torch.float64)),
            lambda op=op: op(p.double() - 20, p.double()),
            lambda op=op: op(torch.full((3, 5), NAN), p.float()),
        ]
    cases.append(lambda: ops.kl_divergence(p, p, 0.0))
    return cases


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3)).eval()


def healer_cases(directory):
    healer = SelfHealer(model(), audit=Path(directory) / "a.db")
    healer.calibrate([torch.randn(64, 8) for _ in range(40)])
    other = SelfHealer(nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval(),
                       audit=Path(directory) / "a.db")
    other.calibrate([torch.randn(64, 8) for _ in range(40)])
    other_version = other.snapshot()
    state = healer.state_dict()
    poisoned = {**state, "adapters": {k: torch.full_like(v, NAN) if v.is_floating_point() else v
                                      for k, v in state["adapters"].items()}}
    return {
        "SelfHealer.rollback": [
            lambda: healer.rollback(1.5), lambda: healer.rollback(True), lambda: healer.rollback(None),
            lambda: healer.rollback(NAN), lambda: healer.rollback(99), lambda: healer.rollback(-1),
            lambda: healer.rollback("0" * 64), lambda: healer.rollback(other.version_digests[other_version]),
        ],
        "SelfHealer.load_state_dict": [
            lambda: healer.load_state_dict(other.state_dict()), lambda: healer.load_state_dict(poisoned),
            lambda: healer.load_state_dict(None),
        ],
        "SelfHealer.__call__": [
            lambda: healer(torch.tensor(1.0)), lambda: healer(torch.randn(4, 7)),
        ],
    }


def audit_cases(directory):
    foreign = Path(directory) / "app.db"
    connection = sqlite3.connect(foreign)
    connection.execute("CREATE TABLE users (id INTEGER)")
    connection.commit()
    connection.close()
    (Path(directory) / "a_dir").mkdir()
    return [
        lambda: AuditLog(foreign), lambda: AuditLog(Path(directory) / "a_dir"),
        lambda: AuditLog(Path(directory) / "missing.db", readonly=True),
        lambda: AuditLog(Path(directory) / "x.db", durability="maybe"),
    ]


def cli_cases(directory):
    db = Path(directory) / "cli.db"
    log = AuditLog(db)
    log.append("step", loss=0.5)
    log.close()
    (Path(directory) / "exists.jsonl").write_text("x")
    argvs = [
        ["audit", "export", db, db], ["audit", "export", db, f"{db}-wal"], ["report", db, "--out", db],
        ["audit", "export", db, Path(directory) / "exists.jsonl"], ["audit", "show", db, "--version", "9" * 30],
        ["audit", "approve", db, ""], ["audit", "verify", Path(directory) / "missing.db"],
        ["demo", "--out", Path(directory) / "exists.jsonl"], ["audit", "show", db, "--since", "yesterday"],
    ]

    def run(argv):
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                status = cli([str(a) for a in argv])
            except SystemExit as exit_:
                status = exit_.code
        if status == 0 or "Traceback" in err.getvalue():
            raise AssertionError(f"status {status}: {err.getvalue()[-300:]}")
        raise ValueError("selfheal: refused")  # a clean refusal (non-zero status, a message)
    return [lambda argv=argv: run(argv) for argv in argvs]


def clean(case) -> str:
    try:
        case()
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        message = str(error).strip("'\"")
        return "" if message.startswith("selfheal") else f"{type(error).__name__}: {message[:120]}"
    except Exception as error:  # noqa: BLE001 - reported
        return f"{type(error).__name__}: {str(error)[:120]}"
    return "no error"


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as directory:
        groups = {"ops.adapter": adapter_cases(), "ops.softmax_entropy": softmax_entropy_cases(),
                  "ops.histogram_update_": histogram_cases(), "ops.kl_divergence / js_divergence": divergence_cases(),
                  **healer_cases(directory), "AuditLog": audit_cases(directory), "selfheal CLI": cli_cases(directory)}
        total = failed = 0
        for name, cases in groups.items():
            problems = [(index, clean(case)) for index, case in enumerate(cases)]
            problems = [(index, text) for index, text in problems if text]
            total, failed = total + len(cases), failed + len(problems)
            print(f"{name:<36} {len(cases):>3} bad inputs, {len(cases) - len(problems):>3} refused cleanly")
            for index, text in problems:
                print(f"    case {index}: {text}")
        print(f"total: {total} bad inputs, {total - failed} refused cleanly")


if __name__ == "__main__":
    main()
