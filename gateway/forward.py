"""Forwarder workers: de-identify spooled instances and deliver them.

Each worker takes a due spool entry, runs the route's engine into ``work/``
(the new header; the unchanged pixel data stays in the spooled input), and
delivers the instance to every destination of the route not yet served, in
its own transfer syntax over an association it keeps open per destination:
sent from the two files by :mod:`gateway.store_scu`, or filled into one file
for a folder and for pynetdicom's own sending (``STORE_SEND_CHUNKED_DATASET``). A spool
entry is removed only when every destination has answered Success; failures
are retried with exponential back-off and, after the last attempt, the entry
goes to quarantine. An entry forwarded while it arrived
(:mod:`gateway.cut_through`) is processed the same way, in the thread that
forwarded it, and the requests it opened are completed (or abandoned) first.
"""

from __future__ import annotations

import heapq
import itertools
import os
import queue
import shutil
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pydicom import Dataset, dcmread
from pydicom.uid import UID
from pynetdicom import AE, build_context, evt
from structlog.typing import FilteringBoundLogger

from gateway import metrics
from gateway.audit import AuditEntry, AuditTrail, sha256_file
from gateway.config import Config, DicomDestination, FolderDestination, Route
from gateway.cut_through import Arrival, CutThrough
from gateway.deid.mapping import MappingWriter
from gateway.deid.profile import Profile
from gateway.deid.report import DeidReport, Outcome
from gateway.health import writable_directory_check
from gateway.logs import association_logger, get_logger, instance_logger
from gateway.pdu import set_pdata_reader
from gateway.priority import FORWARD_NICE, lower_thread_priority
from gateway.quarantine import Quarantine, Reason
from gateway.receive import set_nodelay
from gateway.spool import EntryInfo, Spool, fsync_dir
from gateway.store_scu import (
    DirectPData,
    ResponseReader,
    Segment,
    StoreRequestWriter,
    StoreSource,
    send_store,
)


def _log() -> FilteringBoundLogger:
    """A logger built per call, so it follows the configuration made at start-up."""
    return get_logger(logger=__name__)

#: Unsent P-DATA held per association, in bytes; see :func:`_limit_send_queue`.
SEND_QUEUE_BYTES = 8 * 2**20
#: An association left unused this long is released (some archives, dcmtk's
#: storescp among them, serve one association at a time).
IDLE_RELEASE_SECONDS = 5.0
#: How often the spool is rescanned for entries put back by ``quarantine release``.
RESCAN_SECONDS = 5.0
_MAX_CONTEXTS = 128


class Engine(Protocol):
    """What the forwarder needs of ``gateway.deid.Deidentifier``."""

    @property
    def profile(self) -> Profile: ...

    def deidentify_file(
        self, src: Path, dst: Path, *, durable: bool = True, pixels_by_reference: bool = False
    ) -> DeidReport: ...


class SendError(Exception):
    """A destination did not store the instance; the message is PHI-free."""


#: Profile name and hash in the audit record of an entry no profile was
#: applied to (its route is no longer configured).
_NO_PROFILE = ("none", "0" * 64)


@dataclass
class _Job:
    """One spool entry being processed: what its log lines and audit records need."""

    entry_id: str
    info: EntryInfo
    log: FilteringBoundLogger
    #: The spooled input, whose SHA-256 the audit records carry.
    input_path: Path
    profile: tuple[str, str] = _NO_PROFILE
    report: DeidReport | None = None
    deidentify_seconds: float = 0.0
    _digest: str | None = None

    def input_digest(self) -> str:
        """The input's SHA-256, computed the first time it is asked for.

        That is after the first delivery (or at a fate without one): hashing
        a whole-slide level takes a core for most of a second per GB, and
        nothing the archive is sent depends on it. Raises what reading the
        input raised.
        """
        if self._digest is None:
            self._digest = sha256_file(self.input_path)
        return self._digest

    @property
    def image_type(self) -> str | None:
        return None if self.report is None else self.report.image_type

    def elapsed(self) -> float:
        """Seconds since the instance was received (wall clock, as the entry records it)."""
        received = datetime.fromisoformat(self.info.received)
        return max((datetime.now(UTC) - received).total_seconds(), 0.0)


class Scheduler:
    """Spool entries waiting to be processed, each with the time it is due."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._known: set[str] = set()
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False

    def add(self, entry_id: str, delay: float = 0.0) -> None:
        with self._cond:
            if entry_id in self._known:
                return
            self._known.add(entry_id)
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), entry_id))
            self._cond.notify()

    def claim(self, entry_id: str) -> None:
        """Take an entry that is not due yet for another thread: until it is
        finished or put back (:meth:`retry`), adding it does nothing."""
        with self._cond:
            self._known.add(entry_id)

    def retry(self, entry_id: str, delay: float) -> None:
        """Put back an entry a worker holds, due after ``delay`` seconds."""
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), entry_id))
            self._cond.notify()

    def finish(self, entry_id: str) -> None:
        with self._cond:
            self._known.discard(entry_id)

    def take(self, timeout: float) -> str | None:
        """The next due entry, or ``None`` after ``timeout`` seconds or on close."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    return heapq.heappop(self._heap)[2]
                wake = min(deadline, self._heap[0][0]) if self._heap else deadline
                if wake <= now:
                    return None
                self._cond.wait(wake - now)
            return None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._known)


def _limit_send_queue(assoc: Any) -> None:
    """Give the association's outgoing PDU queue back-pressure.

    pynetdicom encodes a whole data set into P-DATA primitives up front and
    queues them without limit, so a 1 GB instance would sit in memory while
    the socket drains. This makes ``send_pdu`` wait while more than
    :data:`SEND_QUEUE_BYTES` are queued, as long as the association lives.
    """
    dul = assoc.dul
    pdu_size = assoc.acceptor.maximum_length or SEND_QUEUE_BYTES
    limit = max(4, SEND_QUEUE_BYTES // pdu_size)
    provider_queue: queue.Queue[Any] = dul.to_provider_queue
    original = dul.send_pdu

    def send_pdu(primitive: Any) -> None:
        with provider_queue.not_full:
            while provider_queue._qsize() >= limit and dul.is_alive() and not dul._kill_thread:
                provider_queue.not_full.wait(0.5)
        original(primitive)

    dul.send_pdu = send_pdu


def _client_ssl(dest: DicomDestination) -> tuple[ssl.SSLContext, str] | None:
    if dest.tls is None:
        return None
    context = ssl.create_default_context(cafile=str(dest.tls.ca_file))
    if dest.tls.cert_file is not None and dest.tls.key_file is not None:
        context.load_cert_chain(dest.tls.cert_file, dest.tls.key_file)
    return context, dest.host


class DicomLink:
    """The association to one DICOM destination, shared by the workers in turn.

    Workers de-identify in parallel but send to a destination one at a time
    over one kept association (``lock``), which suits archives that serve a
    single association at a time and keeps instances in order.

    Contexts are proposed one per (SOP class, transfer syntax) pair seen so far,
    because chunked sending needs an exact transfer syntax match; a new pair
    re-opens the association with the larger set.
    """

    def __init__(self, dest: DicomDestination, calling_ae_title: str, max_pdu: int) -> None:
        self.dest = dest
        self.ae = AE(ae_title=calling_ae_title)
        self.ae.maximum_pdu_size = max_pdu
        self.ae.acse_timeout = 30
        self.ae.dimse_timeout = 300
        self.ae.network_timeout = 300
        self.assoc: Any = None
        #: How the open association's P-DATA is written, and its responses read.
        self.pdata: DirectPData | None = None
        self.reader: ResponseReader | None = None
        self._message_ids = itertools.cycle(range(1, 0x10000))
        self.wanted: dict[tuple[str, str], None] = {}
        self.last_used = time.monotonic()
        self.lock = threading.Lock()

    def _accepted(self) -> set[tuple[str, str]]:
        return {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in self.assoc.accepted_contexts
        }

    def _open(self) -> None:
        self.close()
        contexts = [build_context(sop, ts) for sop, ts in self.wanted]
        self.assoc = self.ae.associate(
            self.dest.host,
            self.dest.port,
            contexts=contexts,
            ae_title=self.dest.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
            tls_args=_client_ssl(self.dest),
        )
        if not self.assoc.is_established:
            state = "rejected" if self.assoc.is_rejected else "failed"
            self.assoc = None
            raise SendError(f"association {state}")
        _limit_send_queue(self.assoc)
        self.pdata = DirectPData(self.assoc)
        self.reader = ResponseReader(self.assoc)
        set_pdata_reader(self.assoc.dul, self.reader)

    def _store(self, source: StoreSource) -> Any:
        """C-STORE over the open association; a connection that fails while
        the PDUs are written aborts it (no response will come)."""
        try:
            status = None
            if self.pdata is not None and self.reader is not None:
                message_id = next(self._message_ids)
                status = send_store(self.assoc, self.pdata, self.reader, source, message_id)
            if status is None:
                status = self.assoc.send_c_store(source.whole())
            return status
        except OSError:
            self.assoc.abort()
            self.assoc = None
            raise SendError("connection lost while sending") from None

    def send(
        self,
        source: Path | StoreSource,
        sop_class_uid: str,
        transfer_syntax_uid: str,
    ) -> int:
        """C-STORE ``source``; return the Success or Warning status or raise
        SendError."""
        if isinstance(source, Path):
            source = StoreSource(source)
        pair = (sop_class_uid, transfer_syntax_uid)
        fresh = self._prepare(pair)
        if pair not in self._accepted():
            raise SendError("presentation context (transfer syntax) refused")
        try:
            status = self._store(source)
        except SendError:
            if fresh:
                raise
            status = Dataset()  # as a kept association the peer closed meanwhile
        if "Status" not in status and not fresh:
            # A kept association the peer closed meanwhile: one immediate retry.
            self._open()
            if pair not in self._accepted():
                raise SendError("presentation context (transfer syntax) refused")
            status = self._store(source)
        return self._code(status)

    def _prepare(self, pair: tuple[str, str]) -> bool:
        """Make sure an association is open that proposed ``pair`` (SOP class,
        transfer syntax); True when it was opened now. Raises SendError."""
        self.last_used = time.monotonic()
        if pair not in self.wanted:
            self.wanted[pair] = None
            while len(self.wanted) > _MAX_CONTEXTS:
                del self.wanted[next(iter(self.wanted))]
        if self.assoc is None or not self.assoc.is_established or pair not in self._accepted():
            self._open()
            return True
        return False

    def _code(self, status: Dataset) -> int:
        """The Success or Warning status of a response, or SendError."""
        if "Status" not in status:
            self.close()
            raise SendError("no response (association lost or timed out)")
        code = int(status.Status)
        if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
            return code
        raise SendError(f"status 0x{code:04X}")

    def begin(self, meta: tuple[str, str, str, int]) -> StoreRequestWriter | None:
        """Start a C-STORE whose data set is written later (see
        :mod:`gateway.cut_through`), of the instance whose File Meta is
        ``meta``; None when it cannot be sent that way. The caller holds
        ``lock`` until the request ends."""
        pair = (meta[0], meta[2])
        for _ in range(2):
            try:
                fresh = self._prepare(pair)
            except SendError:
                return None
            if pair not in self._accepted() or self.pdata is None or self.reader is None:
                return None
            try:
                return StoreRequestWriter.open(
                    self.assoc, self.pdata, self.reader, meta, next(self._message_ids)
                )
            except OSError:
                self.abort()  # a kept association the peer closed meanwhile
                if fresh:
                    return None
        return None

    def finish_stream(self, writer: StoreRequestWriter, rest: list[Segment]) -> int:
        """Complete a request from :meth:`begin` with ``rest`` of its data set;
        return or raise as :meth:`send`."""
        self.last_used = time.monotonic()
        try:
            status = writer.finish(rest)
        except OSError:
            self.abort()
            raise SendError("connection lost while sending") from None
        return self._code(status)

    def abort(self) -> None:
        """Abort the association: a request left unfinished is not stored."""
        if self.assoc is not None:
            self.assoc.abort()
            self.assoc = None

    def close(self) -> None:
        if self.assoc is not None:
            if self.assoc.is_established:
                self.assoc.release()
            self.assoc = None


#: A folder destination's files are written here, at its root, then renamed
#: into place; :func:`open_folder` empties it at start-up, so a kill during a
#: write leaves nothing behind (and nothing half-written is ever in place).
PARTIAL_DIR = ".partial"


def open_folder(dest: FolderDestination) -> None:
    """Create a folder destination and empty its :data:`PARTIAL_DIR`.

    Replicas sharing one folder each empty it when they start: a write of
    another replica caught by that fails its rename and is retried.
    """
    partial = dest.folder / PARTIAL_DIR
    partial.mkdir(mode=0o700, parents=True, exist_ok=True)
    for child in partial.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink(missing_ok=True)


def write_to_folder(dest: FolderDestination, path: Path) -> None:
    """Place ``path`` at ``<folder>/<Study>/<Series>/<SOPInstance>.dcm`` atomically."""
    ds = dcmread(
        path,
        stop_before_pixels=True,
        specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
    )
    parts = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = str(ds.get(keyword, ""))
        if not UID(value).is_valid:
            raise SendError(f"{keyword} missing or not a valid UID")
        parts.append(value)
    directory = dest.folder.joinpath(*parts[:2])
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{parts[2]}.dcm"
    tmp = dest.folder / PARTIAL_DIR / f"{parts[2]}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with path.open("rb") as src, tmp.open("wb") as dst:
            while chunk := src.read(4 * 2**20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        tmp.replace(target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SendError(f"folder write failed ({exc.strerror or type(exc).__name__})") from None
    fsync_dir(directory)


class Forwarder:
    """The pool of worker threads draining the spool."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        quarantine: Quarantine,
        engines: Mapping[str, Engine],
        audit: AuditTrail,
    ) -> None:
        self.config = config
        self.spool = spool
        self.quarantine = quarantine
        self.engines = engines
        self.audit = audit
        # Evidence of what replaced what, written before an instance is delivered.
        self.mappings = MappingWriter(config.mapping_dir) if config.mapping_dir is not None else None
        self.scheduler = Scheduler()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._routes = {route.name: route for route in config.routes}
        self._links = {
            dest.name: DicomLink(dest, config.listen.ae_title, config.listen.max_pdu)
            for dest in config.destinations
            if isinstance(dest, DicomDestination)
        }
        #: Large instances forwarded while they arrive, if enabled.
        self.cut_through = CutThrough(self) if config.forwarding.cut_through_bytes else None

    def route(self, name: str) -> Route | None:
        """The route of that name, if configured."""
        return self._routes.get(name)

    def link(self, name: str) -> DicomLink | None:
        """The association to the DICOM destination of that name."""
        return self._links.get(name)

    def start(self, pending: Iterable[str]) -> None:
        for entry_id in pending:
            self.scheduler.add(entry_id)
        for index in range(self.config.forwarding.workers):
            thread = threading.Thread(target=self._work, name=f"forward-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        rescan = threading.Thread(target=self._rescan, name="forward-rescan", daemon=True)
        rescan.start()
        self._threads.append(rescan)

    def stop(self) -> None:
        if self.cut_through is not None:
            self.cut_through.stop()
        self._stop.set()
        self.scheduler.close()
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads.clear()
        for link in self._links.values():
            with link.lock:
                link.close()

    def submit(self, entry_id: str) -> None:
        self.scheduler.add(entry_id)

    def check_destination(self, name: str) -> bool:
        """One health check of a destination: C-ECHO, or a write test for a folder.

        The echo runs under the destination's link lock after closing the kept
        association: an archive that serves one association at a time (dcmtk's
        storescp among them) would otherwise keep the echo waiting behind it.
        """
        dest = self.config.destination(name)
        if isinstance(dest, FolderDestination):
            return writable_directory_check(dest.folder / PARTIAL_DIR)()
        link = self._links[name]
        with link.lock:
            link.close()
            ok, _ = echo(dest, self.config.listen.ae_title)
        return ok

    def _rescan(self) -> None:
        while not self._stop.wait(RESCAN_SECONDS):
            for entry_id in self.spool.pending():
                self.scheduler.add(entry_id)

    def _work(self) -> None:
        lower_thread_priority(FORWARD_NICE)
        while not self._stop.is_set():
            entry_id = self.scheduler.take(timeout=1.0)
            if entry_id is None:
                self._release_idle()
                continue
            self._run(entry_id)

    def process_arrival(self, entry_id: str, arrival: Arrival) -> None:
        """Process an entry forwarded while it arrived, in the calling thread
        (:mod:`gateway.cut_through`)."""
        self._run(entry_id, arrival)

    def _run(self, entry_id: str, arrival: Arrival | None = None) -> None:
        try:
            self._process(entry_id, arrival)
        except Exception as exc:
            self._fail_internal(entry_id, exc)

    def _release_idle(self) -> None:
        now = time.monotonic()
        for link in self._links.values():
            if now - link.last_used > IDLE_RELEASE_SECONDS and link.lock.acquire(blocking=False):
                try:
                    link.close()
                finally:
                    link.lock.release()

    def _fail_internal(self, entry_id: str, exc: Exception) -> None:
        """An unexpected error: quarantine the entry, or keep it if even that fails.

        Keeping it (retried after ``backoff_max``) is also what happens while
        the audit store cannot be written: no fate goes unrecorded.
        """
        _log().error("forward.internal-error", reason="internal-error", error_type=type(exc).__name__)
        try:
            job = self._job(entry_id, self.spool.info(entry_id))
            self._hold(job, "internal-error", f"forwarder raised {type(exc).__name__}")
        except Exception:
            self.scheduler.retry(entry_id, self.config.forwarding.backoff_max)

    def _job(self, entry_id: str, info: EntryInfo) -> _Job:
        """Start processing an entry: its logger, its input, its route's profile."""
        log = instance_logger(
            association_logger(info.assoc_id, info.calling_ae_title), info.sop_class_uid
        )
        engine = self.engines.get(info.route)
        profile = (
            (engine.profile.name, engine.profile.content_hash) if engine is not None else _NO_PROFILE
        )
        return _Job(entry_id, info, log, self.spool.instance(entry_id), profile)

    def _audit(
        self,
        job: _Job,
        outcome: str,
        *,
        reason: str | None = None,
        destination: str | None = None,
        delivered_at: datetime | None = None,
    ) -> int:
        """Append the record of a final fate and return its number.

        Raises when the store cannot take it, so the caller goes no further.
        """
        report = job.report
        result = self.audit.append(
            AuditEntry(
                received_at=datetime.fromisoformat(job.info.received),
                calling_ae=job.info.calling_ae_title,
                input_sha256=job.input_digest(),
                profile=job.profile[0],
                profile_sha256=job.profile[1],
                outcome=outcome,
                new_sop_instance_uid=report.new_sop_instance_uid if report is not None else None,
                action_counts=dict(report.action_counts) if report is not None else {},
                reason=reason,
                destination=destination,
                delivered_at=delivered_at,
            )
        )
        return result.seq

    def _hold(self, job: _Job, code: str, detail: str, *, counted: bool = False) -> None:
        """Quarantine an entry; ``counted`` when the engine's verdict was already counted."""
        seq = self._audit(job, "quarantined", reason=code)
        self.quarantine.hold(self.spool, job.entry_id, Reason(code, detail))
        self.scheduler.finish(job.entry_id)
        if not counted:
            metrics.record_quarantined(
                sop_class_uid=job.info.sop_class_uid, image_type=job.image_type, reason=code
            )
        job.log.warning(
            "instance.quarantined",
            outcome="quarantined",
            reason=code,
            deidentify_seconds=job.deidentify_seconds,
            total_seconds=job.elapsed(),
            audit_seq=seq,
        )

    def _process(self, entry_id: str, arrival: Arrival | None = None) -> None:
        if not self.spool.path(entry_id).is_dir():
            self.scheduler.finish(entry_id)  # purged or handled meanwhile
            return
        job = self._job(entry_id, self.spool.info(entry_id))
        route = self._routes.get(job.info.route)
        if route is None:
            self._hold(job, "route-missing", "the route of this entry is not configured")
            return
        output = self.spool.work / f"{entry_id}.dcm"
        try:
            started = time.monotonic()
            try:
                # A scratch copy: after a crash work/ is emptied and it is made
                # again. The pixel data stays in the spool until it is sent.
                report = self.engines[route.name].deidentify_file(
                    self.spool.instance(entry_id), output, durable=False, pixels_by_reference=True
                )
            except Exception as exc:
                self._hold(job, "internal-error", f"de-identification raised {type(exc).__name__}")
                return
            job.deidentify_seconds = time.monotonic() - started
            job.report = report
            job.log = job.log.bind(image_type=metrics.image_type_label(report.image_type))
            metrics.record_deidentified(
                report.outcome.value,
                sop_class_uid=job.info.sop_class_uid,
                image_type=report.image_type,
                reason=report.reason,
                duration_seconds=job.deidentify_seconds,
            )
            if report.outcome is Outcome.DROPPED:
                reason = report.reason or "policy"
                seq = self._audit(job, "dropped", reason=reason)
                self.spool.remove(entry_id)
                self.scheduler.finish(entry_id)
                job.log.info(
                    "instance.dropped",
                    outcome="dropped",
                    reason=reason,
                    deidentify_seconds=job.deidentify_seconds,
                    total_seconds=job.elapsed(),
                    audit_seq=seq,
                )
                return
            if report.reason == "rewrite-failed" and self.spool.free_bytes() < 2 * job.info.size:
                # The output did not fit on the spool's disk: that passes once
                # the backlog drains, and is no fault of the instance.
                job.log.warning("forward.no-space", outcome="retrying", reason="spool-full")
                self.scheduler.retry(entry_id, self.config.forwarding.backoff_max)
                return
            if report.outcome is not Outcome.PASSED or not output.is_file():
                self._hold(
                    job,
                    report.reason or "internal-error",
                    report.detail,
                    counted=report.outcome is Outcome.QUARANTINED,
                )
                return
            if self.mappings is not None:
                self.mappings.add(report)
            self._deliver(job, route, StoreSource(output, report.pixel_reference), report, arrival)
        finally:
            output.unlink(missing_ok=True)

    def _send(
        self,
        name: str,
        job: _Job,
        output: StoreSource,
        transfer_syntax: str,
        arrival: Arrival | None = None,
    ) -> None:
        """Deliver to one destination: complete the request opened while the
        instance arrived, if there is one and it agrees with ``output``, or
        send ``output`` whole."""
        dest = self.config.destination(name)
        if isinstance(dest, FolderDestination):
            write_to_folder(dest, output.whole())
            return
        if arrival is not None and arrival.finish(name, output) is not None:
            return
        link = self._links[name]
        with link.lock:
            link.send(output, job.info.sop_class_uid, transfer_syntax)

    def _deliver(
        self,
        job: _Job,
        route: Route,
        output: StoreSource,
        report: DeidReport,
        arrival: Arrival | None = None,
    ) -> None:
        entry_id, info = job.entry_id, job.info
        state = self.spool.state(entry_id)
        transfer_syntax = report.transfer_syntax_uid or info.transfer_syntax_uid
        size = output.size
        failures: list[str] = []
        # Requests opened while the instance arrived hold their associations:
        # they are completed first, so no other destination waits behind them.
        streamed = arrival.destinations if arrival is not None else frozenset()
        for name in sorted(route.destinations, key=lambda name: name not in streamed):
            if name in state.delivered:
                continue
            started = time.monotonic()
            try:
                self._send(name, job, output, transfer_syntax, arrival)
            except (SendError, OSError, RuntimeError, ValueError) as exc:
                seconds = time.monotonic() - started
                text = str(exc) if isinstance(exc, SendError) else type(exc).__name__
                failures.append(f"{name}: {text}")
                metrics.record_forward_attempt(
                    name, success=False, duration_seconds=seconds, retry=state.attempts > 0
                )
                job.log.warning(
                    "forward.failed",
                    outcome="failure",
                    destination=name,
                    attempt=state.attempts + 1,
                    forward_seconds=seconds,
                )
                continue
            seconds = time.monotonic() - started
            metrics.record_forward_attempt(
                name,
                success=True,
                duration_seconds=seconds,
                sop_class_uid=info.sop_class_uid,
                image_type=report.image_type,
                size_bytes=size,
                retry=state.attempts > 0,
            )
            delivered_at = datetime.now(UTC)
            try:
                job.input_digest()
            except OSError as exc:
                # Delivered, but the input cannot be read for its audit record.
                # The entry stays and is tried again (and sent again: delivery
                # is at least once), so no delivery goes unrecorded.
                job.log.error(
                    "forward.input-unreadable",
                    outcome="retrying",
                    destination=name,
                    reason="input-unreadable",
                    error_type=type(exc).__name__,
                )
                self.scheduler.retry(entry_id, self.config.forwarding.backoff_max)
                return
            seq = self._audit(job, "forwarded", destination=name, delivered_at=delivered_at)
            state.delivered.append(name)
            if not set(route.destinations) <= set(state.delivered):
                # Recorded so a restart sends to the others only; after the last
                # one the entry is removed instead (a crash first means a resend).
                self.spool.save_state(entry_id, state)
            job.log.info(
                "instance.forwarded",
                outcome="success",
                destination=name,
                attempt=state.attempts + 1,
                size_bytes=size,
                forward_seconds=seconds,
                audit_seq=seq,
            )
        if not failures:
            self.spool.remove(entry_id)
            self.scheduler.finish(entry_id)
            job.log.info(
                "instance.delivered",
                outcome="delivered",
                count=len(route.destinations),
                size_bytes=size,
                deidentify_seconds=job.deidentify_seconds,
                total_seconds=job.elapsed(),
            )
            return
        state.attempts += 1
        state.last_error = "; ".join(failures)
        self.spool.save_state(entry_id, state)
        forwarding = self.config.forwarding
        if state.attempts >= forwarding.max_attempts:
            self._hold(
                job,
                "retries-exhausted",
                f"{state.attempts} attempts, last: {state.last_error}",
            )
            return
        delay = min(forwarding.backoff_initial * 2 ** (state.attempts - 1), forwarding.backoff_max)
        job.log.info(
            "forward.retrying",
            outcome="retrying",
            attempt=state.attempts,
            max_attempts=forwarding.max_attempts,
            backoff_seconds=delay,
        )
        self.scheduler.retry(entry_id, delay)


def echo(dest: DicomDestination, calling_ae_title: str) -> tuple[bool, str]:
    """C-ECHO a destination; return success and a short description."""
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = 10
    ae.network_timeout = 10
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(
        dest.host,
        dest.port,
        ae_title=dest.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
        tls_args=_client_ssl(dest),
    )
    if not assoc.is_established:
        return False, "association rejected" if assoc.is_rejected else "association failed"
    status = assoc.send_c_echo()
    assoc.release()
    if "Status" not in status:
        return False, "no response"
    code = int(status.Status)
    return code == 0, f"status 0x{code:04X}"
