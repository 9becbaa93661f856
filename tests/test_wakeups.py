"""pynetdicom with event-driven reactors: associations still work end to end
(requests, responses, release, abort) and leave no descriptor behind."""

from __future__ import annotations

import os
import threading
import time

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway import wakeups
from tests.peers import free_port


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def _wait_threads_gone(before: set[threading.Thread]) -> None:
    deadline = time.monotonic() + 10
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.05)


def test_echo_release_and_abort_with_event_driven_reactors() -> None:
    wakeups.install()
    wakeups.install()  # once per process, whatever the number of calls
    port = free_port()
    released: list[bool] = []
    scp = AE(ae_title="SCP")
    scp.add_supported_context(Verification)
    server = scp.start_server(
        ("127.0.0.1", port), block=False,
        evt_handlers=[(evt.EVT_RELEASED, lambda event: released.append(True))],
    )
    scu = AE(ae_title="SCU")
    scu.add_requested_context(Verification)
    try:
        threads = set(threading.enumerate())
        before = _descriptors()
        for index in range(20):
            assoc = scu.associate("127.0.0.1", port, ae_title="SCP")
            assert assoc.is_established
            assert hasattr(assoc, "_gateway_wake")
            for _ in range(3):
                status = assoc.send_c_echo()
                assert int(status.Status) == 0x0000
            if index % 2:
                assoc.abort()
                assert assoc.is_aborted
            else:
                assoc.release()
                assert assoc.is_released
        _wait_threads_gone(threads)
        assert set(threading.enumerate()) - threads == set()
        assert _descriptors() == before
        deadline = time.monotonic() + 5
        while len(released) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(released) == 10
    finally:
        server.shutdown()


def test_a_paused_reactor_is_reached_without_waiting_for_the_idle_timeout() -> None:
    """Clearing the reactor checkpoint (what every request does) wakes the
    association thread, so the pause is reached at once and not after
    :data:`~gateway.wakeups.IDLE_WAIT`."""
    wakeups.install()
    wake = threading.Event()
    checkpoint = wakeups._Checkpoint(wake)
    checkpoint.set()
    checkpoint.clear()
    assert wake.is_set() and not checkpoint.is_set()


class _Reactor:
    """The parts of an association :func:`wakeups._paused` looks at."""

    def __init__(self, checkpoint: wakeups._Checkpoint) -> None:
        self._reactor_checkpoint = checkpoint
        self._kill = False
        self.alive = True
        wakeups._set_paused(self, True)  # type: ignore[arg-type]

    def is_alive(self) -> bool:
        return self.alive


def _paused(reactor: _Reactor) -> bool:
    return wakeups._paused(reactor)  # type: ignore[arg-type]


def test_a_reactor_that_passed_the_checkpoint_is_not_paused_until_it_blocks_there() -> None:
    """pynetdicom's reactor flags itself paused before it waits at the
    checkpoint: cleared just after it passed, the flag still says paused while
    the reactor goes on to take messages off the queue. Paused means blocked
    at the cleared checkpoint."""
    checkpoint = wakeups._Checkpoint(threading.Event())
    checkpoint.set()
    reactor = _Reactor(checkpoint)
    assert checkpoint.wait(0)  # the reactor passes the open checkpoint...
    checkpoint.clear()  # ...and a sender closes it just after
    assert not _paused(reactor)
    passed = threading.Event()

    def reactor_loop() -> None:
        checkpoint.wait()
        passed.set()

    thread = threading.Thread(target=reactor_loop)
    thread.start()
    deadline = time.monotonic() + 5
    while not _paused(reactor) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert _paused(reactor) and not passed.is_set()
    checkpoint.set()
    thread.join(5)
    assert passed.is_set()


def test_a_reactor_that_is_not_running_counts_as_paused() -> None:
    checkpoint = wakeups._Checkpoint(threading.Event())
    reactor = _Reactor(checkpoint)
    wakeups._set_paused(reactor, False)  # type: ignore[arg-type]
    checkpoint.clear()
    assert not _paused(reactor)
    reactor.alive = False
    assert _paused(reactor)
    reactor.alive, reactor._kill = True, True
    assert _paused(reactor)
