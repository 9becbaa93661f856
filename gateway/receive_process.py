"""The receiver in a process of its own.

Answering a C-STORE is bound by latency: pynetdicom hands every message
between its threads several times before the response leaves. In the process
that de-identifies and forwards, each hand-off waits for the GIL, held by
CPU-bound work, and a study of small instances is acknowledged ten times
slower than it is received. So the node runs :class:`~gateway.receive.Receiver`
in a child process: a fresh interpreter (``python -m gateway.receive_process``),
so no lock or thread of the main process is inherited, and no helper process
of :mod:`multiprocessing` is started beside it.

The child admits instances to the spool itself (the spool is a directory; the
rename into ``ready/`` is what makes an entry exist) and tells the main
process over a pipe: admitted entries, large data sets while they arrive
(for :mod:`gateway.cut_through`), counts for the metrics and log events.
The main process submits the entries to its forwarder, applies the counts to
its own registry and writes the events through its own log guard, so
``/metrics`` and the log read as from one process.

A child that ends on its own (a crash) is started again on the same address,
after a pause that grows with each failure, so the gateway does not stay up
without a receiver; until then ``/readyz`` reports ``listening`` failing.

The child ends with the main process: the kernel kills it when the thread
that started it ends (``PR_SET_PDEATHSIG``), so a gateway killed outright
leaves no receiver behind to write into a spool the next one is recovering;
and it exits when its end of the pipe closes. An entry it admitted just
before is durable and is found by the forwarder's rescan or at the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, MutableMapping
from multiprocessing.connection import Connection
from typing import Any, Protocol

import structlog

from gateway import metrics
from gateway.config import Config
from gateway.deid.iod import pixel_data_sop_classes
from gateway.logs import get_logger
from gateway.receive import Receiver, configure_receiving
from gateway.spool import EntryInfo, Spool

#: How long the child may take to import, load its tables and listen.
START_SECONDS = 120.0
#: How long a stopping child may take to close its associations.
STOP_SECONDS = 30.0
#: Pauses before restarting a child that ended on its own, one per attempt;
#: the last one repeats.
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0)
#: prctl(2) option: the signal a process gets when its parent thread ends.
_PR_SET_PDEATHSIG = 1

_METRICS = frozenset(
    {
        "record_association_accepted",
        "record_association_rejected",
        "record_received",
        "record_refused",
    }
)


class _Channel:
    """The child's end of the pipe; receiver threads send through it in turn."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self.conn.send(message)


class _PipeEvents:
    """The receiver's events (:class:`~gateway.receive.ReceiveEvents`), sent to the main process."""

    def __init__(self, channel: _Channel) -> None:
        self._channel = channel

    def admitted(self, entry_id: str) -> None:
        self._channel.send(("admitted", entry_id))

    def arriving(self, path: str, info: EntryInfo) -> None:
        self._channel.send(("arriving", path, info))

    def arrival_ended(self, path: str, entry_id: str | None) -> None:
        self._channel.send(("arrival-ended", path, entry_id))

    def record_association_accepted(self) -> None:
        self._channel.send(("metric", "record_association_accepted", ()))

    def record_association_rejected(self, reason: str) -> None:
        self._channel.send(("metric", "record_association_rejected", (reason,)))

    def record_received(self, sop_class_uid: str | None, size_bytes: int) -> None:
        self._channel.send(("metric", "record_received", (sop_class_uid, size_bytes)))

    def record_refused(self, sop_class_uid: str | None, reason: str) -> None:
        self._channel.send(("metric", "record_refused", (sop_class_uid, reason)))


class _StdlibToPipe(logging.Handler):
    """Records of pynetdicom and other libraries, sent to the main process's log."""

    def __init__(self, channel: _Channel) -> None:
        super().__init__(logging.WARNING)
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._channel.send(("stdlog", record.levelno, record.name, record.getMessage()))
        except Exception:  # the pipe is gone: the process is ending
            self.handleError(record)


def _forward_logging(channel: _Channel) -> None:
    """Send every structlog event and library warning of the child to the main process."""

    def to_pipe(logger: object, method: str, event_dict: MutableMapping[str, Any]) -> Mapping[str, Any]:
        channel.send(("log", method, dict(event_dict)))
        raise structlog.DropEvent

    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, to_pipe],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_StdlibToPipe(channel))
    root.setLevel(logging.WARNING)


def _child(conn: Connection) -> None:
    """The receiving process: listen, admit, report; end when told or orphaned."""
    config, pixel_classes = conn.recv()
    channel = _Channel(conn)
    _forward_logging(channel)
    spool = Spool(config.spool_dir, config.limits.min_free_bytes)
    configure_receiving(spool.incoming)
    receiver = Receiver(config, spool, _PipeEvents(channel), pixel_classes)
    try:
        host, port = receiver.start()
    except OSError as exc:
        channel.send(("failed", exc.errno or 0, exc.strerror or type(exc).__name__))
        return
    channel.send(("listening", host, port))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            os._exit(1)  # the main process is gone: so is every reason to answer
        if message == "stop":
            break
    receiver.stop()
    channel.send(("stopped",))


class Arrivals(Protocol):
    """Where the large data sets the child reports while they arrive go."""

    def arriving(self, path: str, info: EntryInfo) -> None: ...

    def ended(self, path: str, entry_id: str | None) -> None: ...

    def receiver_ended(self) -> None:
        """The child ended: no data set it was receiving will end otherwise."""


class ReceiverProcess:
    """Runs the receiver in a child process and relays what it reports."""

    def __init__(
        self,
        config: Config,
        admitted: Callable[[str], None],
        spool_lock_fd: int | None = None,
        arrivals: Arrivals | None = None,
    ) -> None:
        """``spool_lock_fd`` is inherited by the child, so that the spool stays
        locked while it lives (see :mod:`gateway.spool`)."""
        self.config = config
        self._admitted = admitted
        self._arrivals = arrivals
        self._spool_lock_fd = spool_lock_fd
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._thread: threading.Thread | None = None
        self._listening = False
        self._stopping = threading.Event()
        self._address: tuple[str, int] | None = None

    @property
    def listening(self) -> bool:
        """True while the child reports listening and has not ended."""
        return self._listening

    @property
    def pid(self) -> int | None:
        """The child's process id, while there is one."""
        return self._process.pid if self._process is not None else None

    def start(self) -> tuple[str, int]:
        """Start the child; return the address it listens on, or raise OSError."""
        self._address = self._spawn(self.config)
        # One thread relays for the children's whole succession: a restarted
        # child must be started by a thread that lives as long as the node,
        # since the kernel kills it when the thread that started it ends.
        self._thread = threading.Thread(target=self._supervise, name="receiver-relay", daemon=True)
        self._thread.start()
        return self._address

    def _spawn(self, config: Config) -> tuple[str, int]:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()]
                + ([self._spool_lock_fd] if self._spool_lock_fd is not None else []),
            )
            conn = Connection(ours.detach())
        self._process, self._conn = process, conn
        conn.send((config, pixel_data_sop_classes()))
        while True:
            if not conn.poll(START_SECONDS):
                self._kill()
                raise OSError(0, "the receiver process did not start in time")
            try:
                message = conn.recv()
            except EOFError:
                self._kill()
                raise OSError(0, "the receiver process ended while starting") from None
            if message[0] == "listening":
                break
            if message[0] == "failed":
                self._kill()
                raise OSError(message[1], message[2])
            self._handle(message)
        self._listening = True
        return str(message[1]), int(message[2])

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "admitted":
            self._admitted(message[1])
        elif kind == "arriving" and self._arrivals is not None:
            self._arrivals.arriving(message[1], message[2])
        elif kind == "arrival-ended" and self._arrivals is not None:
            self._arrivals.ended(message[1], message[2])
        elif kind == "metric" and message[1] in _METRICS:
            getattr(metrics, message[1])(*message[2])
        elif kind == "log":
            fields = dict(message[2])
            event = fields.pop("event", "")
            level = logging.getLevelName(message[1].upper())
            get_logger().log(level if isinstance(level, int) else logging.ERROR, event, **fields)
        elif kind == "stdlog":
            logging.getLogger(message[2]).log(message[1], "%s", message[3])

    def _supervise(self) -> None:
        while True:
            self._relay()
            self._listening = False
            if self._arrivals is not None:
                self._arrivals.receiver_ended()
            if self._stopping.is_set():
                return
            get_logger(logger=__name__).critical("receiver.ended")
            if not self._restart():
                return

    def _relay(self) -> None:
        """Handle the child's messages until it says it stopped or its pipe closes."""
        assert self._conn is not None
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "stopped":
                break
            try:
                self._handle(message)
            except Exception as exc:  # one bad message must not end the relay
                get_logger(logger=__name__).error(
                    "receiver.relay-failed", error_type=type(exc).__name__
                )

    def _restart(self) -> bool:
        """Start a new child on the address the first one listened on; False
        when the node stopped meanwhile."""
        assert self._address is not None
        self._kill()
        if self._conn is not None:
            self._conn.close()
        config = dataclasses.replace(
            self.config, listen=dataclasses.replace(self.config.listen, port=self._address[1])
        )
        attempt = 0
        while not self._stopping.wait(RESTART_DELAYS[min(attempt, len(RESTART_DELAYS) - 1)]):
            attempt += 1
            try:
                self._spawn(config)
            except OSError as exc:
                get_logger(logger=__name__).error(
                    "receiver.restart-failed", attempt=attempt, error_type=type(exc).__name__
                )
                continue
            get_logger(logger=__name__).warning("receiver.restarted", attempt=attempt)
            return True
        return False

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(5)

    def stop(self) -> None:
        """Stop listening; instances already admitted stay in the spool."""
        self._stopping.set()
        if self._conn is not None:
            with contextlib.suppress(OSError):  # the child is already gone
                self._conn.send("stop")
        if self._thread is not None:
            self._thread.join(STOP_SECONDS)
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(5)
            self._kill()
        if self._conn is not None:
            self._conn.close()
        self._listening = False


__all__ = ["ReceiverProcess"]

def _die_with_parent(parent_pid: int) -> None:
    """Be killed with the process that started this one (Linux), or end now if
    it is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


if __name__ == "__main__":
    _die_with_parent(int(sys.argv[2]))
    _child(Connection(int(sys.argv[1])))

