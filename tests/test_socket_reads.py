"""The receive path's socket reads: exact counts, a closed connection, and no
allocation ahead of the bytes a peer only declares."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace
from typing import Any, cast

import pytest

from gateway.receive import _read_into, _shutdown_socket


def _serve(data: bytes, close: bool) -> socket.socket:
    ours, theirs = socket.socketpair()

    def send() -> None:
        theirs.sendall(data)
        if close:
            theirs.close()

    threading.Thread(target=send, daemon=True).start()
    return ours


def test_reads_exactly_the_count_and_leaves_the_rest_on_the_socket() -> None:
    data = bytes(range(256)) * 40
    with _serve(data, close=False) as sock:
        buffer = bytearray(b"HEADER")
        assert _read_into(sock, buffer, 6, 1000, step=64) == 1000
        assert bytes(buffer) == b"HEADER" + data[:1000]
        rest = bytearray(len(data) - 1000)
        assert _read_into(sock, rest, 0, len(rest)) == len(rest)
        assert bytes(rest) == data[1000:]


def test_a_declared_length_is_not_allocated_before_its_bytes_arrive() -> None:
    data = b"x" * 5000
    with _serve(data, close=True) as sock:
        buffer = bytearray(64)
        assert _read_into(sock, buffer, 0, 2**31, step=64) == len(data)
        assert bytes(buffer[: len(data)]) == data
        assert len(buffer) <= 2 * len(data)


def test_a_socket_whose_shutdown_fails_is_closed_all_the_same() -> None:
    """A connection the peer dropped cannot be shut down; pynetdicom then
    left its descriptor open until garbage collection."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # not connected: shutdown fails
    with pytest.raises(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    _shutdown_socket(cast(Any, SimpleNamespace(socket=sock)))
    assert sock.fileno() == -1
    _shutdown_socket(cast(Any, SimpleNamespace(socket=None)))  # no socket: nothing to do
