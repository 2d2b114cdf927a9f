"""Governance: an append-only, hash-chained audit log, content-addressed
adapter snapshots, policy limits, and the bias / feedback-loop guard.

* ``AuditLog`` — SQLite (WAL) table of records; each record carries the hash
  of the previous one, so a changed byte or a removed record breaks the chain
  at a named record (``verify``). One record is one transaction: a process
  killed at any moment leaves the log ending at its last committed record.
* ``SnapshotStore`` — adapter tensors saved as ``safetensors`` files named by
  the SHA-256 of their content, written to a temporary file and renamed into
  place; loading checks the content hash. Nothing is ever unpickled.
* ``Policy`` — limits an operator sets on automatic adaptation (rate, weight
  change, allowed hours).
* ``BiasGuard`` — watches what adaptation does to the predicted-class mix,
  overall and per declared group, against the source model on the same inputs.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

GENESIS = "0" * 64
_SCHEMA_VERSION = "1"
# The records table's columns, in order (what _create makes and verify() expects).
_RECORD_COLUMNS = ("seq", "time", "kind", "version", "batch", "state_hash", "payload", "prev_hash", "hash")
DEFAULT_AUDIT_FILE = "selfheal_audit.db"

# ------------------------------------------------------------------ helpers


def _plain(value: Any) -> Any:
    """JSON-safe copy: tensors and numpy scalars become Python numbers or
    lists; NaN/Inf become the strings ``"nan"``, ``"inf"``, ``"-inf"`` (JSON
    has no such numbers, and a record must hash the same everywhere)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict, str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def canonical_json(value: Any) -> str:
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def tensor_digest(tensors: Dict[str, torch.Tensor]) -> str:
    """SHA-256 of a dict of tensors: names (sorted), dtypes, shapes and raw
    bytes. The same tensors give the same digest on any device."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _record_hash(prev_hash: str, seq: int, when: float, kind: str, version: Optional[int],
                 batch: Optional[int], state_hash: Optional[str], payload: str) -> str:
    body = canonical_json({"seq": seq, "time": repr(float(when)), "kind": kind, "version": version,
                           "batch": batch, "state_hash": state_hash, "payload": payload})
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


# ---------------------------------------------------------------- audit log


@dataclass
class AuditRecord:
    seq: int
    time: float
    kind: str
    version: Optional[int]
    batch: Optional[int]
    state_hash: Optional[str]
    payload: Dict[str, Any]
    prev_hash: str
    hash: str

    # payload keys shown first in one-line summaries, by kind
    SUMMARY_KEYS = {
        "step": ("loss", "selected", "shift", "change"), "drift": ("score", "threshold", "reasons"),
        "guard": ("reason",), "rule_violation": ("reason",), "bias": ("reason",),
        "policy": ("limit", "value", "bound"), "rollback": ("to", "reason"), "proposal": ("proposal",),
        "proposal_refused": ("proposal", "problems"), "approve": ("proposal", "by"), "reject": ("proposal", "by"),
        "approval_request": ("proposal", "decision", "by")}

    def summary(self, width: int = 40, separator: str = " ") -> str:
        """``key=value`` pairs of the payload that matter for this kind (its
        first three keys otherwise), floats to 4 digits, values cut at ``width``."""
        parts = []
        for key in self.SUMMARY_KEYS.get(self.kind, tuple(self.payload)[:3]):
            if key in self.payload:
                value = self.payload[key]
                text = f"{value:.4g}" if isinstance(value, float) else (
                    value if isinstance(value, str) else json.dumps(value, sort_keys=True))
                parts.append(f"{key}={text if len(text) <= width else text[: width - 1] + '…'}")
        return separator.join(parts)

    @property
    def iso_time(self) -> str:
        try:
            return _dt.datetime.fromtimestamp(self.time, _dt.timezone.utc).isoformat()
        except (ValueError, OverflowError, OSError):
            return "?"

    def as_dict(self) -> Dict[str, Any]:
        return {"seq": self.seq, "time": _plain(self.time), "iso_time": self.iso_time,
                "kind": self.kind, "version": self.version, "batch": self.batch, "state_hash": self.state_hash,
                "payload": self.payload, "prev_hash": self.prev_hash, "hash": self.hash}


@dataclass
class VerifyResult:
    ok: bool
    records: int
    head: str
    first_bad: Optional[int] = None
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


class AuditError(RuntimeError):
    """The audit database cannot be opened or read (missing, not SQLite, corrupt)."""


class AuditLog:
    """Append-only audit trail in SQLite.

    Args:
        path: the database file (created when missing, unless ``readonly``).
        durability: ``"normal"`` (WAL + synchronous=NORMAL: a killed process
            loses nothing committed; a power cut may lose the last records but
            never corrupts the log) or ``"full"`` (an fsync per record).
        readonly: open an existing log for reading and verification only.
        create: create the file and tables when missing (False: the file must
            already be a selfheal audit log; nothing is added to other files).

    Records are written by ``append`` in one transaction each, serialised
    across processes by SQLite's write lock (a CLI approving a proposal and a
    serving process can share one log). Updates and deletes are refused by
    triggers; the hash chain shows any that were forced.
    """

    def __init__(self, path: Union[str, os.PathLike], *, durability: str = "normal", readonly: bool = False,
                 create: bool = True):
        if durability not in ("normal", "full"):
            raise ValueError(f"selfheal: durability must be 'normal' or 'full', got {durability!r}")
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        if (readonly or not create) and not self.path.is_file():
            raise AuditError(f"selfheal: no audit database at {str(self.path)!r}")
        if self.path.is_dir():
            raise AuditError(f"selfheal: audit path {str(self.path)!r} is a directory")
        try:
            if readonly:
                # a URI built from the resolved path, so '#', '?' and '%' in names are quoted
                self._db = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True,
                                           check_same_thread=False, timeout=30.0, isolation_level=None)
                self._check_schema()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0,
                                           isolation_level=None)
                # before changing anything in the file: an existing database
                # must already be a selfheal log (another application's
                # SQLite file gets no tables added)
                if not create or self._db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
                    self._check_schema()
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
                self._create()
                self._check_schema()
        except sqlite3.DatabaseError as error:
            raise AuditError(f"selfheal: {str(self.path)!r} is not a readable audit database ({error})") from None

    def _create(self) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, time REAL NOT NULL, "
                    "kind TEXT NOT NULL, version INTEGER, batch INTEGER, state_hash TEXT, payload TEXT NOT NULL, "
                    "prev_hash TEXT NOT NULL, hash TEXT NOT NULL)")
                self._db.execute("CREATE INDEX IF NOT EXISTS records_kind ON records (kind, seq)")
                for action in ("UPDATE", "DELETE"):
                    self._db.execute(
                        f"CREATE TRIGGER IF NOT EXISTS records_no_{action.lower()} BEFORE {action} ON records "
                        f"BEGIN SELECT RAISE(ABORT, 'selfheal audit log is append-only'); END")
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (repr(time.time()),))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _check_schema(self) -> None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError as error:
            raise AuditError(f"selfheal: {str(self.path)!r} is not a selfheal audit database ({error})") from None
        if row is None or row[0] != _SCHEMA_VERSION:
            raise AuditError(f"selfheal: {str(self.path)!r} has audit schema {row and row[0]!r}, "
                             f"expected {_SCHEMA_VERSION!r}")

    # ------------------------------------------------------------ writing

    def append(self, kind: str, *, version: Optional[int] = None, batch: Optional[int] = None,
               state_hash: Optional[str] = None, when: Optional[float] = None, **payload) -> AuditRecord:
        """Appends one record (one committed transaction) and returns it."""
        if self.readonly:
            raise AuditError("selfheal: this audit log was opened read-only")
        if not kind or not isinstance(kind, str):
            raise ValueError("selfheal: an audit record needs a kind")
        text = canonical_json(payload)
        when = time.time() if when is None else float(when)
        version = None if version is None else int(version)
        batch = None if batch is None else int(batch)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                last = self._db.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
                seq, prev = (1, GENESIS) if last is None else (last[0] + 1, last[1])
                digest = _record_hash(prev, seq, when, kind, version, batch, state_hash, text)
                self._db.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 (seq, when, kind, version, batch, state_hash, text, prev, digest))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return AuditRecord(seq, when, kind, version, batch, state_hash, json.loads(text), prev, digest)

    # ------------------------------------------------------------ reading

    def _rows(self, sql: str, args: Sequence = ()) -> Iterator[tuple]:
        with self._lock:
            try:
                rows = self._db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as error:
                raise AuditError(f"selfheal: audit database {str(self.path)!r} is corrupt ({error})") from None
        return iter(rows)

    @staticmethod
    def _record(row: tuple) -> AuditRecord:
        seq, when, kind, version, batch, state_hash, payload, prev, digest = row
        try:
            body = json.loads(payload)
        except (TypeError, ValueError):
            body = {"_unreadable_payload": str(payload)}
        try:
            when = float(when)
        except (TypeError, ValueError):
            when = float("nan")  # tampered; verify() names the record
        return AuditRecord(seq, when, str(kind), version, batch, state_hash, body, prev, digest)

    def records(self, *, kinds: Optional[Iterable[str]] = None, since: Optional[float] = None,
                until: Optional[float] = None, version: Optional[int] = None, after_seq: Optional[int] = None,
                limit: Optional[int] = None, newest_first: bool = False) -> List[AuditRecord]:
        """Records matching every filter given: ``kinds``, time range
        ``[since, until)`` (seconds since the epoch), adapter ``version``,
        sequence numbers after ``after_seq``; oldest first unless
        ``newest_first``."""
        clauses, args = [], []
        if kinds is not None:
            kinds = list(kinds)
            clauses.append(f"kind IN ({','.join('?' * len(kinds))})")
            args.extend(kinds)
        if since is not None:
            clauses.append("time >= ?")
            args.append(float(since))
        if until is not None:
            clauses.append("time < ?")
            args.append(float(until))
        if version is not None:
            clauses.append("version = ?")
            args.append(int(version))
        if after_seq is not None:
            clauses.append("seq > ?")
            args.append(int(after_seq))
        sql = f"SELECT {', '.join(_RECORD_COLUMNS)} FROM records"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY seq " + ("DESC" if newest_first else "ASC")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [self._record(row) for row in self._rows(sql, args)]

    def __bool__(self) -> bool:  # a log is a log even when empty (len() is its record count)
        return True

    def __len__(self) -> int:
        return next(self._rows("SELECT COUNT(*) FROM records"))[0]

    def head(self) -> str:
        row = next(self._rows("SELECT hash FROM records ORDER BY seq DESC LIMIT 1"), None)
        return GENESIS if row is None else row[0]

    def verify(self, expect_head: Optional[str] = None) -> VerifyResult:
        """Recomputes the hash chain from the first record. Names the first
        record whose content, link or sequence number is wrong. A removed
        *last* record cannot show in the chain itself: pass the head hash
        kept elsewhere (``expect_head``) to check that too. A records table
        whose columns were changed is reported as tampered."""
        prev, expected_seq, count = GENESIS, 1, 0
        try:
            columns = tuple(row[1] for row in self._rows("PRAGMA table_info(records)"))
            if columns != _RECORD_COLUMNS:
                return VerifyResult(False, 0, GENESIS, None,
                                    f"the records table was altered: columns {list(columns)}, "
                                    f"expected {list(_RECORD_COLUMNS)}")
            rows = self._rows(f"SELECT {', '.join(_RECORD_COLUMNS)} FROM records ORDER BY seq ASC")
        except AuditError as error:
            return VerifyResult(False, 0, GENESIS, None, str(error))
        for row in rows:
            seq, when, kind, version, batch, state_hash, payload, prev_hash, digest = row
            if seq != expected_seq:
                return VerifyResult(False, count, prev, seq,
                                    f"record {seq} follows record {expected_seq - 1}: "
                                    f"record(s) {expected_seq}..{seq - 1} are missing")
            if prev_hash != prev:
                return VerifyResult(False, count, prev, seq, f"record {seq} does not link to the record before it")
            try:
                intact = isinstance(payload, str) and isinstance(kind, str) and isinstance(when, float) and \
                    _record_hash(prev, seq, when, kind, version, batch, state_hash, payload) == digest
            except (TypeError, ValueError):
                intact = False
            if not intact:
                return VerifyResult(False, count, prev, seq, f"record {seq} was altered (its hash does not match)")
            prev, expected_seq, count = digest, seq + 1, count + 1
        if expect_head is not None and expect_head != prev:
            return VerifyResult(False, count, prev, None,
                                f"the chain ends at {prev[:16]}…, expected head {expect_head[:16]}… "
                                "(records were removed from the end, or this is another log)")
        return VerifyResult(True, count, prev)

    def proposals(self) -> List[Dict[str, Any]]:
        """Proposals recorded here with their status: pending, requested (a
        decision was written, the healer has not applied it yet), approved,
        rejected, expired."""
        found: Dict[str, Dict[str, Any]] = {}
        decided = {"approve": "approved", "reject": "rejected", "proposal_expired": "expired"}
        for record in self.records(kinds=["proposal", "approval_request", *decided]):
            pid = str(record.payload.get("proposal", ""))
            if record.kind == "proposal":
                found[pid] = {"id": pid, "seq": record.seq, "time": record.time, "version": record.version,
                              "proposed_version": record.payload.get("proposed_version"),
                              "state_hash": record.state_hash, "status": "pending",
                              "evidence": record.payload.get("evidence", {})}
            elif pid in found:
                if record.kind == "approval_request":
                    if found[pid]["status"] == "pending":
                        found[pid]["status"] = f"requested ({record.payload.get('decision')})"
                else:
                    found[pid]["status"] = decided[record.kind]
        return list(found.values())

    def export_jsonl(self, destination, **filters) -> int:
        """Writes the matching records as JSON lines to a path or a text file;
        returns how many."""
        records = self.records(**filters)
        own = isinstance(destination, (str, os.PathLike))
        handle = open(destination, "w", encoding="utf-8") if own else destination
        try:
            for record in records:
                handle.write(json.dumps(record.as_dict(), sort_keys=True) + "\n")
        finally:
            if own:
                handle.close()
        return len(records)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# ----------------------------------------------------------------- snapshots


class SnapshotError(ValueError):
    """A snapshot file is missing, corrupt, or not a safetensors file."""


class SnapshotStore:
    """Adapter states as ``<sha256>.safetensors`` files in ``directory``.

    The name is the digest of the tensors (``tensor_digest``), which is also
    the ``state_hash`` the audit log records, so every audited state can be
    found and checked. Files are written to a temporary name, synced and
    renamed: a killed process leaves either the whole file or none under the
    final name (leftover temporaries are ignored and removed by ``prune``).
    """

    suffix = ".safetensors"

    def __init__(self, directory: Union[str, os.PathLike]):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if not _is_digest(digest):
            raise SnapshotError(f"selfheal: {digest!r} is not a snapshot digest (64 hex digits)")
        return self.directory / (digest + self.suffix)

    def __contains__(self, digest: str) -> bool:
        try:
            return self.path(digest).is_file()
        except SnapshotError:
            return False

    def digests(self) -> List[str]:
        return sorted(p.name[: -len(self.suffix)] for p in self.directory.glob("*" + self.suffix)
                      if _is_digest(p.name[: -len(self.suffix)]))

    def save(self, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, Any]] = None) -> str:
        """Stores ``tensors`` (with JSON ``metadata``) and returns the digest."""
        from safetensors.torch import save as st_save
        cpu = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
        digest = tensor_digest(cpu)
        target = self.path(digest)
        if target.is_file():
            return digest
        blob = st_save(cpu, metadata={"selfheal": canonical_json(metadata or {})})
        temporary = self.directory / f".{digest}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        _fsync_directory(self.directory)
        return digest

    def load(self, digest: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        path = self.path(digest)
        if not path.is_file():
            raise SnapshotError(f"selfheal: no snapshot {digest[:16]}… in {str(self.directory)!r} (pruned by the "
                                "retention policy, or never stored: snapshot, proposal, approve and rollback "
                                "records name stored states; a step record's hash only identifies its state)")
        tensors, metadata = load_snapshot_file(path)
        if tensor_digest(tensors) != digest:
            raise SnapshotError(f"selfheal: snapshot {str(path)!r} is corrupt: its content does not match its name")
        return tensors, metadata

    def prune(self, keep: Iterable[str]) -> List[str]:
        """Deletes every snapshot not in ``keep`` (and stale temporaries);
        returns the digests removed."""
        keep = set(keep)
        removed = []
        for digest in self.digests():
            if digest not in keep:
                self.path(digest).unlink(missing_ok=True)
                removed.append(digest)
        for stale in self.directory.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        return removed


def load_snapshot_file(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Reads a safetensors snapshot: tensors and the healer's metadata. Any
    other content (a pickle, a truncated file) is refused with SnapshotError;
    nothing is unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as error:
        raise SnapshotError(f"selfheal: cannot read snapshot {str(path)!r} ({error})") from None
    try:
        tensors = st_load(blob)
        header_size = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8: 8 + header_size])
        metadata = json.loads(header.get("__metadata__", {}).get("selfheal", "{}"))
    except (SafetensorError, ValueError, TypeError, OverflowError) as error:
        raise SnapshotError(f"selfheal: {str(path)!r} is not a valid safetensors snapshot; refusing to load it "
                            f"(snapshots are never unpickled): {error}") from None
    return tensors, metadata


def _is_digest(text: str) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------- policy


@dataclass
class Policy:
    """Limits on automatic adaptation, set by an operator.

    Args:
        max_steps_per_minute: steps beyond this rate are refused (adaptation
            resumes when the rate allows).
        max_weight_change: L2 distance of the adapter parameters from the
            source that a step may not cross: the step is undone and
            adaptation stops until the drift passes or ``resume()``.
        allowed_hours: ``(start, end)`` local hours in which automatic
            adaptation may run (``(22, 6)`` wraps midnight); outside them the
            model serves its current version and takes no step.
        clock: returns the current local time (tests pass a fake clock).
    """
    max_steps_per_minute: Optional[float] = None
    max_weight_change: Optional[float] = None
    allowed_hours: Optional[Tuple[int, int]] = None
    clock: Callable[[], _dt.datetime] = field(default=_dt.datetime.now, repr=False)

    def __post_init__(self):
        if self.max_steps_per_minute is not None and not self.max_steps_per_minute > 0:
            raise ValueError(f"selfheal: max_steps_per_minute must be > 0, got {self.max_steps_per_minute}")
        if self.max_weight_change is not None and not self.max_weight_change > 0:
            raise ValueError(f"selfheal: max_weight_change must be > 0, got {self.max_weight_change}")
        if self.allowed_hours is not None:
            start, end = self.allowed_hours
            if not (0 <= int(start) <= 23 and 0 <= int(end) <= 24) or int(start) == int(end):
                raise ValueError(f"selfheal: allowed_hours must be (start, end) hours with start != end, "
                                 f"got {self.allowed_hours}")

    def hours_allow(self) -> bool:
        if self.allowed_hours is None:
            return True
        start, end = (int(h) for h in self.allowed_hours)
        hour = self.clock().hour
        return start <= hour < end if start < end else (hour >= start or hour < end)

    def as_dict(self) -> Dict[str, Any]:
        return {"max_steps_per_minute": self.max_steps_per_minute, "max_weight_change": self.max_weight_change,
                "allowed_hours": list(self.allowed_hours) if self.allowed_hours else None}


# ----------------------------------------------------------------- bias guard


class BiasGuard:
    """Stops adaptation that moves predictions where the source would not.

    Fed, per served batch while adapting, the adapted and the source model's
    logits for the same inputs. Keeps exponentially weighted predicted-class
    rates (about ``horizon`` samples), overall and per group, and trips when

    * the adapted overall class mix departs from the source's by more than
      ``max_class_shift`` in total variation, or
    * the spread of a ``positive_class`` rate across groups (max − min)
      exceeds the source's spread by more than ``max_gap_increase``
      (needs ``groups``: a callable mapping a batch to integer group ids, or
      an input column index; groups with fewer than ``min_group_samples``
      samples seen are not compared).
    """

    def __init__(self, *, groups: Union[None, int, Callable[[torch.Tensor], torch.Tensor]] = None,
                 positive_class: Optional[int] = None, max_class_shift: float = 0.25,
                 max_gap_increase: float = 0.1, horizon: int = 512, min_group_samples: int = 50):
        if groups is not None and positive_class is None:
            raise ValueError("selfheal: BiasGuard with groups needs positive_class (the outcome whose rate "
                             "is compared across groups)")
        if not 0 < max_class_shift <= 1 or not 0 < max_gap_increase <= 1:
            raise ValueError("selfheal: max_class_shift and max_gap_increase must be in (0, 1]")
        self.groups = groups
        self.positive_class = positive_class
        self.max_class_shift = float(max_class_shift)
        self.max_gap_increase = float(max_gap_increase)
        self.horizon = int(horizon)
        self.min_group_samples = int(min_group_samples)
        self.reset()

    def reset(self) -> None:
        self._adapted: Optional[torch.Tensor] = None
        self._source: Optional[torch.Tensor] = None
        self._seen = 0.0
        self._group_rates: Dict[int, List[float]] = {}  # group -> [adapted rate, source rate, samples]
        self.last: Dict[str, Any] = {}

    def _group_ids(self, x: torch.Tensor) -> torch.Tensor:
        if callable(self.groups):
            ids = self.groups(x)
        else:
            ids = x.reshape(x.shape[0], -1)[:, int(self.groups)]
        ids = torch.as_tensor(ids).reshape(-1)
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"selfheal: BiasGuard groups gave {ids.shape[0]} ids for a batch of {x.shape[0]}")
        return ids.round().long().cpu()

    def update(self, x: torch.Tensor, adapted_logits: torch.Tensor, source_logits: torch.Tensor) -> Optional[str]:
        """Folds one batch in; returns the reason when the guard trips."""
        finite = torch.isfinite(adapted_logits).all(dim=1) & torch.isfinite(source_logits).all(dim=1)
        if int(finite.sum()) == 0:
            return None
        classes = adapted_logits.shape[1]
        adapted = adapted_logits[finite].argmax(dim=1).cpu()
        source = source_logits[finite].argmax(dim=1).cpu()
        rows = float(adapted.shape[0])
        adapted_mix = torch.bincount(adapted, minlength=classes).double() / rows
        source_mix = torch.bincount(source, minlength=classes).double() / rows
        weight = rows / (self._seen + rows) if self._seen < self.horizon else rows / (self.horizon + rows)
        self._seen += rows
        self._adapted = adapted_mix if self._adapted is None else (1 - weight) * self._adapted + weight * adapted_mix
        self._source = source_mix if self._source is None else (1 - weight) * self._source + weight * source_mix
        shift = 0.5 * float((self._adapted - self._source).abs().sum())
        self.last = {"class_shift": shift}
        if self._seen >= min(self.horizon, 64) and shift > self.max_class_shift:
            return (f"bias: adapted class mix moved {shift:.3f} (total variation) from the source's on the same "
                    f"inputs, bound {self.max_class_shift}")
        if self.groups is None:
            return None
        ids = self._group_ids(x)[finite.cpu()]
        positive = self.positive_class
        for group in ids.unique().tolist():
            mask = ids == group
            count = float(mask.sum())
            a_rate = float((adapted[mask] == positive).double().mean())
            s_rate = float((source[mask] == positive).double().mean())
            entry = self._group_rates.setdefault(group, [a_rate, s_rate, 0.0])
            w = count / (entry[2] + count) if entry[2] < self.horizon else count / (self.horizon + count)
            entry[0] = (1 - w) * entry[0] + w * a_rate
            entry[1] = (1 - w) * entry[1] + w * s_rate
            entry[2] += count
        ready = {g: e for g, e in self._group_rates.items() if e[2] >= self.min_group_samples}
        if len(ready) < 2:
            return None
        adapted_gap = max(e[0] for e in ready.values()) - min(e[0] for e in ready.values())
        source_gap = max(e[1] for e in ready.values()) - min(e[1] for e in ready.values())
        self.last.update({"group_gap": adapted_gap, "source_group_gap": source_gap,
                          "group_rates": {str(g): e[0] for g, e in ready.items()}})
        if adapted_gap - source_gap > self.max_gap_increase:
            return (f"bias: positive rate of class {positive} differs across groups by {adapted_gap:.3f} "
                    f"(source {source_gap:.3f}), bound +{self.max_gap_increase}")
        return None

    def evaluate(self, x: torch.Tensor, adapted_logits: torch.Tensor,
                 source_logits: torch.Tensor) -> Tuple[Optional[str], Dict[str, Any]]:
        """The same two tests on one set of inputs (no memory): returns the
        reason when a bound is crossed (or None) and the measured values."""
        finite = torch.isfinite(adapted_logits).all(dim=1) & torch.isfinite(source_logits).all(dim=1)
        adapted = adapted_logits[finite].argmax(dim=1).cpu()
        source = source_logits[finite].argmax(dim=1).cpu()
        rows = adapted.shape[0]
        if rows == 0:
            return None, {"rows": 0}
        classes = adapted_logits.shape[1]
        mix_a = torch.bincount(adapted, minlength=classes).double() / rows
        mix_s = torch.bincount(source, minlength=classes).double() / rows
        shift = 0.5 * float((mix_a - mix_s).abs().sum())
        detail: Dict[str, Any] = {"rows": rows, "class_shift": shift}
        if shift > self.max_class_shift:
            return (f"bias: adapted class mix moved {shift:.3f} (total variation) from the source's on the same "
                    f"inputs, bound {self.max_class_shift}"), detail
        if self.groups is None:
            return None, detail
        ids = self._group_ids(x)[finite.cpu()]
        rates = {}
        for group in ids.unique().tolist():
            mask = ids == group
            if int(mask.sum()) >= self.min_group_samples:
                rates[group] = (float((adapted[mask] == self.positive_class).double().mean()),
                                float((source[mask] == self.positive_class).double().mean()))
        if len(rates) < 2:
            return None, detail
        adapted_gap = max(r[0] for r in rates.values()) - min(r[0] for r in rates.values())
        source_gap = max(r[1] for r in rates.values()) - min(r[1] for r in rates.values())
        detail.update({"group_gap": adapted_gap, "source_group_gap": source_gap,
                       "group_rates": {str(g): r[0] for g, r in rates.items()}})
        if adapted_gap - source_gap > self.max_gap_increase:
            return (f"bias: positive rate of class {self.positive_class} differs across groups by "
                    f"{adapted_gap:.3f} (source {source_gap:.3f}), bound +{self.max_gap_increase}"), detail
        return None, detail

    def state_dict(self) -> Dict[str, Any]:
        return {"adapted": self._adapted, "source": self._source, "seen": self._seen,
                "group_rates": {int(k): list(v) for k, v in self._group_rates.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._adapted = None if state["adapted"] is None else state["adapted"].clone()
        self._source = None if state["source"] is None else state["source"].clone()
        self._seen = float(state["seen"])
        self._group_rates = {int(k): [float(x) for x in v] for k, v in state["group_rates"].items()}
