"""The ``selfheal`` command line.

    selfheal --version
    selfheal demo [--quick] [--device cuda] [--out DIR] [--train]
                  [--data FILE --model pkg.module:factory [--weights FILE]]
    selfheal report AUDIT_DB [--out report.html] [--title TEXT] [--force]
    selfheal audit verify  DB [--expect-head HASH]
    selfheal audit show    DB [--kind KIND ...] [--since T] [--until T] [--version V] [--limit N] [--json]
    selfheal audit export  DB OUT.jsonl [filters as for show] [--force]
    selfheal audit proposals DB
    selfheal audit approve DB PROPOSAL [--by NAME] [--note TEXT]
    selfheal audit reject  DB PROPOSAL [--by NAME] [--note TEXT]

Exit status: 0 success, 1 a check failed or a decision was refused (a broken
chain, an unknown or already decided proposal), 2 bad input (missing or
corrupt file, bad arguments, an output path that is the log itself or one of
its files, an existing output file without ``--force``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .governance import AuditError, AuditLog, AuditRecord


class CommandError(Exception):
    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def _time(value: str) -> float:
    """Seconds since the epoch, or an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = _dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {value!r} (use ISO 8601, e.g. 2026-11-29T18:00, "
                                         "or seconds since the epoch)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_dt.timezone.utc)
    return parsed.timestamp()


# SQLite's companion files of a database (write-ahead log, shared memory, rollback journal).
_DB_COMPANIONS = ("-wal", "-shm", "-journal")
# Audit record fields are SQLite INTEGERs: signed 64-bit.
_INT64_MAX = 2 ** 63 - 1


def _record_number(value: str) -> int:
    """An argparse type: an integer a record field can hold (0 .. 2**63 - 1)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if not 0 <= number <= _INT64_MAX:
        raise argparse.ArgumentTypeError(f"must be between 0 and {_INT64_MAX}, got {value}")
    return number


def _check_output(out: str, db: str, force: bool) -> None:
    """Refuses an output path that is the audit log, one of its SQLite files
    or inside its snapshot store, and an existing file unless ``force``."""
    target = Path(out).resolve()
    log = Path(db).resolve()
    protected = {log} | {log.with_name(log.name + suffix) for suffix in _DB_COMPANIONS}
    snapshots = log.with_name(log.name + ".snapshots")
    if target in protected or target == snapshots or snapshots in target.parents:
        raise CommandError(f"refusing to write {out!r}: it is the audit log {db!r} or one of its files", 2)
    if target.is_dir():
        raise CommandError(f"cannot write {out!r}: it is a directory", 2)
    if target.exists() and not force:
        raise CommandError(f"{out!r} exists; pass --force to overwrite it", 2)


def _number(value, spec: str = ".3f") -> str:
    """A number from a record, formatted; anything else (NaN is stored as the
    string "nan", a tampered record may hold anything) as it is."""
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return repr(value)


def _open(path: str, readonly: bool = True) -> AuditLog:
    if not Path(path).exists():
        raise CommandError(f"no audit database at {path!r}", 2)
    try:
        # writing (decisions) opens an existing log only: nothing is created
        # in, or changed about, a file that is not one
        return AuditLog(path, readonly=readonly, create=False)
    except AuditError as error:
        raise CommandError(str(error).removeprefix("selfheal: "), 2) from None


def _filters(args) -> Dict:
    return {"kinds": args.kind or None, "since": args.since, "until": args.until, "version": args.version,
            "limit": args.limit}


def _table(records: List[AuditRecord]) -> str:
    header = ("seq", "time (UTC)", "kind", "version", "batch", "state", "detail")
    rows = [header]
    for r in records:
        when = r.iso_time[:19].replace("T", " ")
        rows.append((str(r.seq), when, r.kind, "" if r.version is None else str(r.version),
                     "" if r.batch is None else str(r.batch), (r.state_hash or "")[:12], r.summary()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
        if index == 0:
            lines.append("  ".join("-" * width for width in widths) + "  " + "-" * 6)
    return "\n".join(lines)


def _cmd_verify(args) -> int:
    log = _open(args.db)
    result = log.verify(expect_head=args.expect_head)
    log.close()
    if result.ok:
        print(f"ok: {result.records} records, chain intact, head {result.head}")
        return 0
    where = f" at record {result.first_bad}" if result.first_bad is not None else ""
    print(f"BROKEN{where}: {result.reason} ({result.records} records verified before it)", file=sys.stderr)
    return 1


def _cmd_show(args) -> int:
    log = _open(args.db)
    records = log.records(**_filters(args))
    log.close()
    if args.json:
        for record in records:
            print(json.dumps(record.as_dict(), sort_keys=True))
    elif not records:
        print("no records match")
    else:
        print(_table(records))
    return 0


def _cmd_export(args) -> int:
    _check_output(args.out, args.db, args.force)
    log = _open(args.db)
    try:
        count = log.export_jsonl(args.out, **_filters(args))
    except OSError as error:
        raise CommandError(f"cannot write {args.out!r}: {error}", 2) from None
    finally:
        log.close()
    print(f"wrote {count} records to {args.out}")
    return 0


def _cmd_proposals(args) -> int:
    log = _open(args.db)
    found = log.proposals()
    log.close()
    if not found:
        print("no proposals")
        return 0
    for p in found:
        when = AuditRecord(0, p["time"], "", None, None, None, {}, "", "").iso_time[:19].replace("T", " ")
        print(f"{p['id']}  {p['status']:<22} version {p['proposed_version']}  {when} UTC")
        evidence = p["evidence"] if isinstance(p["evidence"], dict) else {}
        for name in ("source", "approved", "proposed"):
            if name in evidence:
                e = evidence[name] if isinstance(evidence[name], dict) else {}
                print(f"    {name:<9} est. accuracy {_number(e.get('accuracy_estimate'))}  "
                      f"entropy {_number(e.get('entropy'))}  classes {_number(e.get('effective_classes'), '.2f')}  "
                      f"agreement with source {_number(e.get('agreement_with_source'))}")
        for rule in evidence.get("rules", []) if isinstance(evidence, dict) else []:
            rule = rule if isinstance(rule, dict) else {}
            print(f"    rule {rule.get('rule')!r}: {'ok' if rule.get('ok') else 'VIOLATED'} "
                  f"(violation {_number(rule.get('violation'), '.4g')})")
    return 0


def _cmd_decide(args) -> int:
    if not args.proposal.strip():
        raise CommandError("the proposal id is empty: give the id (or a unique prefix) that "
                           "'selfheal audit proposals' shows", 2)
    log = _open(args.db, readonly=False)
    try:
        proposals = log.proposals()
        matches = [p for p in proposals if p["id"].startswith(args.proposal)]
        if len(matches) != 1:
            known = ", ".join(p["id"] for p in proposals) or "none"
            raise CommandError(f"{'no' if not matches else 'more than one'} proposal matches {args.proposal!r} "
                               f"(known: {known})")
        proposal = matches[0]
        if proposal["status"] != "pending":
            raise CommandError(f"proposal {proposal['id']} is {proposal['status']}, not pending")
        record = log.append("approval_request", version=proposal["proposed_version"], proposal=proposal["id"],
                            decision=args.command, by=args.by, note=args.note or "")
    finally:
        log.close()
    print(f"recorded: {args.command} proposal {proposal['id']} (record {record.seq}); "
          "the serving healer applies it at its next check")
    return 0


def _cmd_demo(args) -> int:
    from .demo import DemoError, run_demo
    if args.batch_size < 1:
        raise CommandError("--batch-size must be >= 1", 2)
    if (args.model or args.weights) and not args.data:
        raise CommandError("--model and --weights go with --data", 2)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CommandError(f"--out {args.out!r} is a file; the demo writes a directory (its audit log, "
                           "snapshots and report)", 2)
    try:
        run_demo(quick=args.quick, device=args.device, out=args.out, train=args.train, data=args.data,
                 model_spec=args.model, weights=args.weights, batch_size=args.batch_size, seed=args.seed,
                 report=not args.no_report, progress=not args.no_progress)
    except DemoError as error:
        raise CommandError(str(error), 2) from None
    except OSError as error:
        raise CommandError(f"cannot write the demo's files in {args.out!r}: {error}", 2) from None
    return 0


def _cmd_report(args) -> int:
    _open(args.db).close()  # a clear error for a missing or foreign file
    try:
        from .report import write_report
    except ImportError as error:
        raise CommandError(f"the report needs matplotlib ({error}); pip install matplotlib", 2) from None
    out = args.out or str(Path(args.db).with_suffix(".html"))
    _check_output(out, args.db, args.force)
    try:
        path = write_report(args.db, out, title=args.title)
    except OSError as error:
        raise CommandError(f"cannot write {out!r}: {error}", 2) from None
    except (ValueError, TypeError) as error:  # a log whose records cannot be plotted
        raise CommandError(f"cannot render {args.db!r}: {type(error).__name__}: {error}", 1) from None
    print(f"wrote {path}")
    return 0


def _version_text() -> str:
    from . import __version__
    from ._extension import build_info
    info = build_info()
    if info["extension_loaded"]:
        kernels = sorted({device for devices in info["kernels"].values() for device in devices})
        build = f"compiled kernels: {', '.join(kernels)}"
    else:
        build = "compiled extension not loaded: pure-PyTorch reference ops"
    return f"selfheal {__version__} (torch {info['torch_version']}, {build})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfheal", description="selfheal_ext command line")
    parser.add_argument("--version", action="version", version=_version_text())
    commands = parser.add_subparsers(dest="group", required=True)

    demo = commands.add_parser("demo", help="a CNN serving drifting digits, healed live; writes an audit log and report")
    demo.add_argument("--quick", action="store_true", help="three drifts, shorter segments")
    demo.add_argument("--device", default="cpu", help="cpu or cuda")
    demo.add_argument("--out", default="selfheal_demo", help="directory for the audit log, snapshots and report")
    demo.add_argument("--train", action="store_true", help="train the demo model now instead of loading the shipped one")
    demo.add_argument("--data", help="your own data: .pt/.npz with reference and stream tensors (or x[, y])")
    demo.add_argument("--model", help="with --data: pkg.module:factory returning your nn.Module")
    demo.add_argument("--weights", help="with --data: .safetensors or .pt state dict for the model")
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-report", action="store_true")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=_cmd_demo)

    report = commands.add_parser("report", help="an HTML page with plots from an audit log")
    report.add_argument("db")
    report.add_argument("--out", help="HTML file (default: the log's name with .html)")
    report.add_argument("--title")
    report.add_argument("--force", action="store_true", help="overwrite an existing output file")
    report.set_defaults(run=_cmd_report)

    audit = commands.add_parser("audit", help="read, verify and act on an audit log")
    sub = audit.add_subparsers(dest="command", required=True)

    verify = sub.add_parser("verify", help="recompute the hash chain; name the first broken record")
    verify.add_argument("db")
    verify.add_argument("--expect-head", help="the head hash kept elsewhere (detects records cut from the end)")
    verify.set_defaults(run=_cmd_verify)

    def add_filters(p):
        p.add_argument("--kind", action="append", help="record kind (repeatable): drift, step, guard, ...")
        p.add_argument("--since", type=_time, help="ISO 8601 time or epoch seconds")
        p.add_argument("--until", type=_time, help="ISO 8601 time or epoch seconds")
        p.add_argument("--version", type=_record_number, help="adapter version")
        p.add_argument("--limit", type=_record_number)

    show = sub.add_parser("show", help="records as a table (or JSON lines)")
    show.add_argument("db")
    add_filters(show)
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=_cmd_show)

    export = sub.add_parser("export", help="records as JSON lines")
    export.add_argument("db")
    export.add_argument("out")
    add_filters(export)
    export.add_argument("--force", action="store_true", help="overwrite an existing output file")
    export.set_defaults(run=_cmd_export)

    proposals = sub.add_parser("proposals", help="proposals and their evidence (approval mode)")
    proposals.add_argument("db")
    proposals.set_defaults(run=_cmd_proposals)

    for name in ("approve", "reject"):
        decide = sub.add_parser(name, help=f"{name} a pending proposal")
        decide.add_argument("db")
        decide.add_argument("proposal", help="proposal id (or a unique prefix)")
        decide.add_argument("--by", default="cli", help="who decides (recorded)")
        decide.add_argument("--note", help="why (recorded)")
        decide.set_defaults(run=_cmd_decide)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CommandError as error:
        print(f"selfheal: error: {error}", file=sys.stderr)
        return error.status
    except AuditError as error:
        print(f"selfheal: error: {str(error).removeprefix('selfheal: ')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
