"""Event-driven waits for pynetdicom's reactor threads.

Every pynetdicom association runs two threads that poll. The DUL reactor
sleeps ``_run_loop_delay`` (1 ms) whenever a pass found nothing to do, then
checks its socket and queues; the association reactor sleeps 1 ms between
looks at its message queue. Each wake-up takes the GIL from the thread doing
the real work (checking a received file, de-identifying, hashing), two
thousand times a second per association, and a message waits up to a
millisecond at each hop between the threads.

Here both sleeps become waits that end as soon as there is something to do:

* the DUL thread waits in ``select`` on its socket and on a wake-up socket
  that :meth:`~pynetdicom.dul.DULServiceProvider.send_pdu` writes to when
  another thread hands it something to send;
* the association thread waits on an event that the DUL's state machine
  sets after every action (a message decoded, a release or abort received)
  and that pausing the reactor (``_reactor_checkpoint.clear()``, which
  every request and release does) sets too.

The waits still end after :data:`IDLE_WAIT` seconds, so what nothing signals
(timers, a killed thread, a socket closed by another thread) is seen as
before, only up to that much later. The wake-up socket pair is closed when
the DUL thread ends. :func:`install` patches pynetdicom's classes and modules
once per process.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

from pynetdicom import association, dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine

#: Longest wait of an idle reactor thread, in seconds.
IDLE_WAIT = 0.02
#: The association reactor's own sleep between passes (pynetdicom 3.0).
_REACTOR_SLEEP = 0.001
_WAKE = "_gateway_wake"
_installed = False
_install_lock = threading.Lock()


class _Checkpoint(threading.Event):
    """The association's reactor checkpoint: clearing it (to pause the
    reactor) wakes the reactor, so it reaches the pause at once.

    It also knows whether a reactor is blocked in :meth:`wait` on the cleared
    checkpoint, which is what "paused" has to mean (see :func:`_paused`).
    """

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake
        self._state = threading.Condition(threading.Lock())
        self._open = False
        #: A thread waits in :meth:`wait` for the checkpoint to be set.
        self.blocked = False

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._state:
            self._open = True
            self._state.notify_all()

    def clear(self) -> None:
        with self._state:
            self._open = False
        self._wake.set()

    def wait(self, timeout: float | None = None) -> bool:
        with self._state:
            if self._open:
                return True
            self.blocked = True
            try:
                return self._state.wait_for(lambda: self._open, timeout)
            finally:
                self.blocked = False


_PAUSED = "_gateway_paused"


def _paused(self: Association) -> bool:
    """``Association._is_paused`` without pynetdicom's race.

    A sender clears the checkpoint and waits for ``_is_paused`` before it
    sends a request, so that the reactor thread cannot take the response off
    the queue. pynetdicom's reactor sets ``_is_paused`` before it waits at
    the checkpoint and clears it after: a reactor that passed the checkpoint
    just before it was cleared still shows True, the request goes out, and
    a fast response is taken by the reactor and dropped ("unexpected
    C-STORE"), leaving the sender waiting for its DIMSE timeout. Here a
    running reactor counts as paused only while it is blocked at the cleared
    checkpoint (or the association is being killed, or the thread is not
    running).
    """
    flagged = bool(self.__dict__.get(_PAUSED, False))
    checkpoint = self.__dict__.get("_reactor_checkpoint")
    if not isinstance(checkpoint, _Checkpoint) or checkpoint.is_set():
        return flagged
    if self.__dict__.get("_kill", False) or not self.is_alive():
        return True  # no reactor will take anything (pynetdicom would wait for ever)
    return flagged and checkpoint.blocked


def _set_paused(self: Association, value: bool) -> None:
    self.__dict__[_PAUSED] = value


class _Clock:
    """Stands in for the ``time`` module inside one pynetdicom module: its
    ``sleep`` first offers the wait to ``wait``, which returns False for the
    sleeps it does not replace."""

    def __init__(self, wait: Callable[[float], bool]) -> None:
        self._wait = wait

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if not self._wait(seconds):
            time.sleep(seconds)


def _association_wait(seconds: float) -> bool:
    thread = threading.current_thread()
    if seconds != _REACTOR_SLEEP or not isinstance(thread, Association):
        return False
    wake = getattr(thread, _WAKE, None)
    if wake is None:
        return False
    wake.wait(IDLE_WAIT)
    wake.clear()  # whatever set it is looked at after this, in the same pass
    return True


def _dul_wait(seconds: float) -> bool:
    thread = threading.current_thread()
    if not isinstance(thread, DULServiceProvider) or seconds > IDLE_WAIT:
        return False
    wake = getattr(thread, _WAKE, None)
    transport = thread.socket
    sock = transport.socket if transport is not None else None
    if wake is None or sock is None:
        return False
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True  # decrypted data waits in the TLS buffer, unseen by select
    try:
        ready, _, _ = select.select([sock, wake[0]], [], [], IDLE_WAIT)
    except (OSError, ValueError):  # closed meanwhile: pynetdicom finds out itself
        return False
    if wake[0] in ready:
        with contextlib.suppress(OSError):
            wake[0].recv(4096)
    return True


def _wrap_init(original: Callable[..., None]) -> Callable[..., None]:
    def init(self: Association, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        wake = threading.Event()
        checkpoint = _Checkpoint(wake)
        if self._reactor_checkpoint.is_set():
            checkpoint.set()
        self._reactor_checkpoint = checkpoint
        setattr(self, _WAKE, wake)
        pair = socket.socketpair()
        for end in pair:
            end.setblocking(False)
        setattr(self.dul, _WAKE, pair)
        weakref.finalize(self.dul, _close, pair)

    return init


def _close(pair: tuple[socket.socket, socket.socket]) -> None:
    for end in pair:
        end.close()


def _wrap_run_reactor(original: Callable[..., None]) -> Callable[..., None]:
    def run_reactor(self: DULServiceProvider) -> None:
        try:
            original(self)
        finally:  # the thread is done with its wake-up socket: close it now, not at collection
            pair = getattr(self, _WAKE, None)
            if pair is not None:
                _close(pair)

    return run_reactor


def _wrap_send_pdu(original: Callable[..., None]) -> Callable[..., None]:
    def send_pdu(self: DULServiceProvider, primitive: Any) -> None:
        original(self, primitive)
        pair = getattr(self, _WAKE, None)
        if pair is not None and threading.current_thread() is not self:
            with contextlib.suppress(OSError):  # full (a wake-up is pending) or closed
                pair[1].send(b"\0")

    return send_pdu


def _wrap_do_action(original: Callable[..., None]) -> Callable[..., None]:
    def do_action(self: StateMachine, event: str) -> None:
        try:
            original(self, event)
        finally:
            wake = getattr(self.dul.assoc, _WAKE, None)
            if wake is not None and not wake.is_set():
                wake.set()

    return do_action


def _set_clock(module: ModuleType, wait: Callable[[float], bool]) -> None:
    setattr(module, "time", _Clock(wait))  # noqa: B010 - replaces a module attribute of pynetdicom


def install() -> None:
    """Patch pynetdicom (once per process) so its reactors wait for events."""
    global _installed
    with _install_lock:
        if _installed:
            return
        Association.__init__ = _wrap_init(Association.__init__)  # type: ignore[method-assign]
        DULServiceProvider.send_pdu = _wrap_send_pdu(DULServiceProvider.send_pdu)  # type: ignore[method-assign]
        DULServiceProvider.run_reactor = _wrap_run_reactor(  # type: ignore[method-assign]
            DULServiceProvider.run_reactor
        )
        StateMachine.do_action = _wrap_do_action(StateMachine.do_action)  # type: ignore[method-assign]
        Association._is_paused = property(_paused, _set_paused)  # type: ignore[assignment]
        _set_clock(association, _association_wait)
        _set_clock(dul, _dul_wait)
        _installed = True


__all__ = ["IDLE_WAIT", "install"]
