"""Append-only, hash-chained audit trail: one record per instance and destination.

A record says what happened to one received instance: when and from whom it
came, the SHA-256 of the file as received, the new (de-identified) SOP
Instance UID, the profile and its content hash, how many elements each action
touched, the outcome and reason, and the destination and time of delivery.
It holds no identifying value: the input is represented by its hash only.

Records are numbered 1, 2, 3, ... and chained: each record's hash is the
SHA-256 of its canonical JSON form, which includes its number and the hash of
the record before it. A one-row *head* table holds the number and hash of the
last record. :meth:`AuditTrail.verify` recomputes the chain, so an edited
record (its hash no longer matches), an inserted or deleted one (a gap in the
numbers or a broken link), or records cut from the end (the head no longer
matches) are all reported with the number of the first record affected.

Storage goes through SQLAlchemy Core: an SQLite file by default, PostgreSQL by
URL (``postgresql://user@host/db``, driven by psycopg) for several replicas.
On SQLite, appends run SQLAlchemy's compiled SQL over one kept connection
(:class:`_SqliteAppends`).
All replicas write one linear chain: an append runs in one transaction that
first locks the head row (``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN
IMMEDIATE`` on SQLite), so appends are serialised across threads, processes
and replicas and the chain can never fork.

The chain detects tampering by anyone who does not rewrite every later record
and the head as well; to guard against that, copy the head (``deid-gateway
audit verify`` prints it) to a place the database's writers cannot change.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError

GENESIS_HASH: Final = "0" * 64
CHAIN_ID: Final = "main"
FORMAT_VERSION: Final = 1

#: Final fates of an instance at one destination.
OUTCOMES: Final = frozenset({"forwarded", "dropped", "quarantined"})

_SHA256: Final = re.compile(r"[0-9a-f]{64}")
_UID: Final = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_CODE: Final = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_AE_TITLE: Final = re.compile(r"[^\\\x00-\x1f]{1,16}")

_metadata = MetaData()
_records = Table(
    "audit_records",
    _metadata,
    Column(
        "seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    ),
    Column("received_at", String(40), nullable=False),
    Column("calling_ae", String(16), nullable=False),
    Column("input_sha256", String(64), nullable=False),
    Column("new_sop_instance_uid", String(64)),
    Column("profile", String(64), nullable=False),
    Column("profile_sha256", String(64), nullable=False),
    Column("action_counts", Text, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("reason", String(64)),
    Column("destination", String(64)),
    Column("delivered_at", String(40)),
    Column("prev_hash", String(64), nullable=False),
    Column("record_hash", String(64), nullable=False),
)
_head = Table(
    "audit_chain_head",
    _metadata,
    Column("chain", String(16), primary_key=True),
    Column("last_seq", BigInteger().with_variant(Integer, "sqlite"), nullable=False),
    Column("last_hash", String(64), nullable=False),
)

# The statements of an append, built once: SQLAlchemy then finds each one's
# compiled form in its cache instead of building and compiling it per record.
_LOCK_HEAD: Final = (
    select(_head.c.last_seq, _head.c.last_hash).where(_head.c.chain == CHAIN_ID).with_for_update()
)
_INSERT_RECORD: Final = insert(_records)
_MOVE_HEAD: Final = (
    update(_head)
    .where(_head.c.chain == CHAIN_ID)
    .values(last_seq=bindparam("new_seq"), last_hash=bindparam("new_hash"))
)

#: The stored fields the hash covers, in addition to ``seq`` and ``prev_hash``.
_CONTENT_FIELDS: Final = (
    "received_at",
    "calling_ae",
    "input_sha256",
    "new_sop_instance_uid",
    "profile",
    "profile_sha256",
    "action_counts",
    "outcome",
    "reason",
    "destination",
    "delivered_at",
)


class AuditError(Exception):
    """The audit store cannot be opened or written."""


def _timestamp(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class AuditEntry:
    """What the node knows about one instance's fate at one destination.

    Build it once the fate is final (delivered, dropped or quarantined). An
    instance sent to several destinations gets one entry per destination.
    """

    received_at: datetime
    calling_ae: str
    input_sha256: str
    profile: str
    profile_sha256: str
    outcome: str
    new_sop_instance_uid: str | None = None
    action_counts: Mapping[str, int] = field(default_factory=dict)
    reason: str | None = None
    destination: str | None = None
    delivered_at: datetime | None = None

    def __post_init__(self) -> None:
        if not _AE_TITLE.fullmatch(self.calling_ae):
            raise ValueError("calling_ae is not an AE title")
        for name in ("input_sha256", "profile_sha256"):
            if not _SHA256.fullmatch(getattr(self, name)):
                raise ValueError(f"{name} must be 64 lowercase hex digits")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}")
        if not _NAME.fullmatch(self.profile):
            raise ValueError("profile is not a plain name")
        if self.new_sop_instance_uid is not None and not (
            len(self.new_sop_instance_uid) <= 64 and _UID.fullmatch(self.new_sop_instance_uid)
        ):
            raise ValueError("new_sop_instance_uid is not a UID")
        if self.reason is not None and not (
            len(self.reason) <= 64 and _CODE.fullmatch(self.reason)
        ):
            raise ValueError("reason is not a reason code")
        if self.destination is not None and not _NAME.fullmatch(self.destination):
            raise ValueError("destination is not a plain name")
        for action, count in self.action_counts.items():
            if not (isinstance(action, str) and _NAME.fullmatch(action)):
                raise ValueError("action names must be plain names")
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ValueError("action counts must be non-negative integers")
        _timestamp(self.received_at)
        if self.delivered_at is not None:
            _timestamp(self.delivered_at)
        object.__setattr__(self, "action_counts", MappingProxyType(dict(self.action_counts)))

    def to_row(self) -> dict[str, str | None]:
        """The stored form: timestamps as UTC ISO-8601, counts as canonical JSON."""
        return {
            "received_at": _timestamp(self.received_at),
            "calling_ae": self.calling_ae,
            "input_sha256": self.input_sha256,
            "new_sop_instance_uid": self.new_sop_instance_uid,
            "profile": self.profile,
            "profile_sha256": self.profile_sha256,
            "action_counts": json.dumps(dict(self.action_counts), sort_keys=True),
            "outcome": self.outcome,
            "reason": self.reason,
            "destination": self.destination,
            "delivered_at": None if self.delivered_at is None else _timestamp(self.delivered_at),
        }


@dataclass(frozen=True)
class AppendResult:
    """Where a record landed in the chain."""

    seq: int
    record_hash: str


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :meth:`AuditTrail.verify`.

    ``broken_seq`` is the number of the first record found wrong (``None`` when
    the chain is intact); ``problem`` says what is wrong with it.
    """

    ok: bool
    records: int
    head_seq: int
    head_hash: str
    broken_seq: int | None = None
    problem: str | None = None


def record_hash(seq: int, prev_hash: str, row: Mapping[str, object]) -> str:
    """SHA-256 of a record's canonical JSON form (number, content, previous hash)."""
    document = {name: row[name] for name in _CONTENT_FIELDS}
    document.update({"v": FORMAT_VERSION, "seq": seq, "prev_hash": prev_hash})
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _database_url(target: str | Path) -> URL:
    """Turn a file path or a URL into a SQLAlchemy URL (psycopg for PostgreSQL)."""
    text = str(target)
    if "://" not in text:
        return URL.create("sqlite", database=str(Path(text).resolve()))
    url = make_url(text)
    if url.drivername in {"postgresql", "postgres"}:
        url = url.set(drivername="postgresql+psycopg")
    return url


class _SqliteAppends:
    """Appends to an SQLite store over one kept connection, in the SQL that
    SQLAlchemy compiles for the append's statements, compiled once.

    Through SQLAlchemy, each append checked a connection out of the pool, ran
    the begin event, found its three statements in the compiled cache and
    reset the connection on its return to the pool: about a fifth of the
    forwarding process's CPU for a study of small instances. The statements,
    the SQL and the order of parameters are SQLAlchemy's own, so both paths
    write the same rows; the transaction is the same ``BEGIN IMMEDIATE``.
    Callers serialise appends (the trail's lock).
    """

    def __init__(self, path: Path, engine: Engine) -> None:
        dialect = engine.dialect
        columns = [column.name for column in _records.columns]
        self._lock_head = _Compiled(_LOCK_HEAD.compile(dialect=dialect))
        self._insert = _Compiled(_INSERT_RECORD.compile(dialect=dialect, column_keys=columns))
        self._move_head = _Compiled(_MOVE_HEAD.compile(dialect=dialect))
        self._connection = sqlite3.connect(
            path, timeout=30, isolation_level=None, check_same_thread=False
        )
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=FULL")

    def append(self, row: Mapping[str, Any]) -> tuple[int, str]:
        """Append ``row`` at the end of the chain; its number and hash."""
        connection = self._connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            found = connection.execute(*self._lock_head.bind({})).fetchone()
            if found is None:
                raise AuditError("the audit trail has no chain head")
            last_seq, last_hash = found
            seq = int(last_seq) + 1
            digest = record_hash(seq, last_hash, row)
            connection.execute(
                *self._insert.bind({"seq": seq, "prev_hash": last_hash, "record_hash": digest, **row})
            )
            connection.execute(*self._move_head.bind({"new_seq": seq, "new_hash": digest}))
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return seq, digest

    def close(self) -> None:
        self._connection.close()


class _Compiled:
    """A statement compiled for SQLite: its SQL and how to order its parameters."""

    def __init__(self, compiled: Any) -> None:
        self.sql: str = compiled.string
        self._names: tuple[str, ...] = tuple(compiled.positiontup or ())
        #: Values the statement itself holds (the chain's id); the rest must be given.
        self._fixed = {name: bind.value for name, bind in compiled.binds.items() if not bind.required}

    def bind(self, values: Mapping[str, Any]) -> tuple[str, tuple[Any, ...]]:
        """The SQL and its parameters in order; KeyError when one is missing."""
        fixed = self._fixed
        return self.sql, tuple(fixed[name] if name in fixed else values[name] for name in self._names)


def _sqlite_path(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or url.database in {None, "", ":memory:"}:
        return None
    return Path(str(url.database))


def _create_private_file(path: Path) -> None:
    """Create ``path`` readable and writable by its owner only, if it does not exist.

    SQLite gives its journal and WAL files the mode of the database file, so
    they stay private too.
    """
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)


class AuditTrail:
    """The audit store. Thread-safe; one instance per process is enough."""

    def __init__(self, target: str | Path, *, create: bool = True) -> None:
        """Open the store at ``target``: an SQLite file path or a database URL.

        With ``create`` (the node's default) the file, tables and chain head
        are created when missing; without it (``audit verify``) a missing
        store is an :class:`AuditError`.
        """
        url = _database_url(target)
        sqlite_path = _sqlite_path(url)
        if sqlite_path is not None:
            if create:
                _create_private_file(sqlite_path)
            elif not sqlite_path.is_file():
                raise AuditError("no audit database at the given path")
        self._lock = threading.Lock()
        self._engine = self._make_engine(url, sqlite=sqlite_path is not None)
        try:
            self._prepare(create)
        except Exception:
            self._engine.dispose()
            raise
        self._sqlite = _SqliteAppends(sqlite_path, self._engine) if sqlite_path is not None else None

    @staticmethod
    def _make_engine(url: URL, *, sqlite: bool) -> Engine:
        if not sqlite:
            return create_engine(url, pool_pre_ping=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event below issue BEGIN itself.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # Writers take the database lock at BEGIN so the head read and the
            # insert happen under one lock; readers get a plain snapshot.
            read_only = conn.get_execution_options().get("audit_read_only", False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine

    def _prepare(self, create: bool) -> None:
        if create:
            _metadata.create_all(self._engine)
            try:
                with self._engine.begin() as conn:
                    exists = conn.execute(
                        select(_head.c.chain).where(_head.c.chain == CHAIN_ID)
                    ).first()
                    if exists is None:
                        conn.execute(
                            insert(_head).values(chain=CHAIN_ID, last_seq=0, last_hash=GENESIS_HASH)
                        )
            except IntegrityError:
                pass  # another replica created the head at the same moment
        else:
            tables = set(inspect(self._engine).get_table_names())
            if not {_records.name, _head.name} <= tables:
                raise AuditError("the database holds no audit trail")

    def append(self, entry: AuditEntry) -> AppendResult:
        """Append one record at the end of the chain, durably, and return its place."""
        row = entry.to_row()
        if self._sqlite is not None:
            with self._lock:
                seq, digest = self._sqlite.append(row)
            return AppendResult(seq=seq, record_hash=digest)
        with self._lock, self._engine.begin() as conn:
            head = conn.execute(_LOCK_HEAD).one()
            seq = int(head.last_seq) + 1
            digest = record_hash(seq, head.last_hash, row)
            conn.execute(
                _INSERT_RECORD, {"seq": seq, "prev_hash": head.last_hash, "record_hash": digest, **row}
            )
            conn.execute(_MOVE_HEAD, {"new_seq": seq, "new_hash": digest})
        return AppendResult(seq=seq, record_hash=digest)

    def _read(self) -> Connection:
        conn = self._engine.connect()
        if self._engine.dialect.name == "sqlite":
            return conn.execution_options(audit_read_only=True)
        return conn.execution_options(isolation_level="REPEATABLE READ")

    def verify(self) -> VerifyResult:
        """Recompute the whole chain and compare it with the head, in one snapshot."""
        with self._read() as conn:
            head = conn.execute(
                select(_head.c.last_seq, _head.c.last_hash).where(_head.c.chain == CHAIN_ID)
            ).first()
            head_seq = -1 if head is None else int(head.last_seq)
            head_hash = "" if head is None else str(head.last_hash)

            def broken(count: int, seq: int, problem: str) -> VerifyResult:
                return VerifyResult(False, count, head_seq, head_hash, seq, problem)

            expected, prev = 1, GENESIS_HASH
            rows = conn.execution_options(yield_per=1000).execute(
                select(_records).order_by(_records.c.seq)
            )
            for row in rows.mappings():
                seq = int(row["seq"])
                if seq != expected:
                    return broken(expected - 1, expected, f"record missing (next stored is {seq})")
                if row["prev_hash"] != prev:
                    return broken(expected - 1, seq, "does not link to the record before it")
                if (
                    record_hash(seq, prev, {k: row[k] for k in _CONTENT_FIELDS})
                    != row["record_hash"]
                ):
                    return broken(expected - 1, seq, "content does not match its hash")
                prev, expected = str(row["record_hash"]), expected + 1
            count = expected - 1
            if head is None:
                return broken(count, count + 1, "chain head is missing")
            if head_seq > count:
                return broken(count, count + 1, f"records {count + 1}..{head_seq} are missing")
            if head_seq < count:
                return broken(count, head_seq + 1, f"records after {head_seq} are not in the head")
            if head_hash != prev:
                return broken(count, count, "chain head does not match the last record")
            return VerifyResult(True, count, head_seq, head_hash)

    def records(self, *, after_seq: int = 0, limit: int = 100) -> list[dict[str, object]]:
        """Stored records with ``seq > after_seq``, oldest first, as column dicts."""
        with self._read() as conn:
            rows = conn.execute(
                select(_records)
                .where(_records.c.seq > after_seq)
                .order_by(_records.c.seq)
                .limit(limit)
            ).mappings()
            return [dict(row) for row in rows]

    def close(self) -> None:
        """Release the database connections."""
        if self._sqlite is not None:
            self._sqlite.close()
        self._engine.dispose()

    def __enter__(self) -> AuditTrail:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
