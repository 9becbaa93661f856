"""The receiving process writes P-DATA-TF PDUs that only continue a data set
straight into its file; everything else goes pynetdicom's own way.

The end-to-end check that instances arrive intact through this path is in the
node's integration tests (storescu sends multi-PDU instances, tiles compared
byte for byte); these tests pin down which PDUs take it.
"""

from __future__ import annotations

import queue
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom import evt

from gateway.receive import _write_data_fragments
from gateway.received_file import ReceivedFile

#: Message control headers (PS3.8 E.2): data not last, data last, command not last, command last.
DATA, DATA_LAST, COMMAND, COMMAND_LAST = 0x00, 0x02, 0x01, 0x03


def p_data(*items: tuple[int, int, bytes]) -> bytearray:
    """A P-DATA-TF PDU of (context ID, message control header, data) items."""
    body = b"".join(struct.pack(">LBB", len(data) + 2, context, control) + data
                    for context, control, data in items)
    return bytearray(struct.pack(">BBL", 0x04, 0, len(body)) + body)


class FakeDul:
    """The parts of a DUL provider the fast path looks at."""

    def __init__(self, target: object, *, context_id: int = 1, state: str = "Sta6",
                 handlers: frozenset[object] = frozenset()) -> None:
        self.state_machine = SimpleNamespace(current_state=state)
        self.event_queue: queue.Queue[str] = queue.Queue()
        self._recv_pdu: queue.Queue[object] = queue.Queue()
        message = SimpleNamespace(_data_set_file=target, context_id=context_id)
        self.assoc = SimpleNamespace(
            dimse=SimpleNamespace(message=message),
            get_handlers=lambda event: [(print, None)] if event in handlers else [],
        )

    def write(self, pdu: bytearray) -> bool:
        return _write_data_fragments(cast(Any, self), pdu)


@pytest.fixture
def target(tmp_path: Path) -> ReceivedFile:
    return ReceivedFile(tmp_path, delete=False, mode="wb", suffix=".dcm")


def written(target: ReceivedFile) -> bytes:
    target.close()
    return Path(target.name).read_bytes()


def test_data_fragments_are_written_in_order(target: ReceivedFile) -> None:
    dul = FakeDul(target)
    assert dul.write(p_data((1, DATA, b"first-")))
    assert dul.write(p_data((1, DATA, b"second-"), (1, DATA, b"third")))
    assert written(target) == b"first-second-third"


@pytest.mark.parametrize(
    "pdu",
    [
        pytest.param(p_data((1, DATA_LAST, b"end")), id="last-fragment"),
        pytest.param(p_data((1, DATA, b"more"), (1, DATA_LAST, b"end")), id="ends-with-last"),
        pytest.param(p_data((1, COMMAND, b"cmd")), id="command"),
        pytest.param(p_data((1, COMMAND_LAST, b"cmd")), id="command-last"),
        pytest.param(p_data((3, DATA, b"other")), id="other-context"),
        pytest.param(p_data((1, DATA, b"ok"), (3, DATA, b"other")), id="mixed-contexts"),
        pytest.param(p_data(), id="no-items"),
        pytest.param(p_data((1, DATA, b"data")) + b"\x00\x00", id="trailing-bytes"),
        pytest.param(bytearray(b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x01\x01\x00"), id="item-too-short"),
        pytest.param(bytearray(b"\x04\x00\x00\x00\x00\x06\x00\x00\x10\x00\x01\x00"), id="item-too-long"),
    ],
)
def test_anything_but_continuing_data_takes_pynetdicoms_path(
    target: ReceivedFile, pdu: bytearray
) -> None:
    assert not FakeDul(target).write(pdu)
    assert written(target) == b""


def test_not_while_an_earlier_pdu_or_event_waits(target: ReceivedFile) -> None:
    waiting_event = FakeDul(target)
    waiting_event.event_queue.put("Evt10")
    assert not waiting_event.write(p_data((1, DATA, b"x")))
    waiting_pdu = FakeDul(target)
    waiting_pdu._recv_pdu.put(object())
    assert not waiting_pdu.write(p_data((1, DATA, b"x")))
    assert written(target) == b""


@pytest.mark.parametrize("state", ["Sta1", "Sta7", "Sta13"])
def test_only_in_an_established_association(target: ReceivedFile, state: str) -> None:
    assert not FakeDul(target, state=state).write(p_data((1, DATA, b"x")))
    assert written(target) == b""


@pytest.mark.parametrize("event", [evt.EVT_PDU_RECV, evt.EVT_DATA_RECV])
def test_not_when_a_handler_wants_to_see_pdus(target: ReceivedFile, event: object) -> None:
    assert not FakeDul(target, handlers=frozenset({event})).write(p_data((1, DATA, b"x")))
    assert written(target) == b""


def test_not_without_a_data_set_file_of_the_receiver(tmp_path: Path) -> None:
    assert not FakeDul(None).write(p_data((1, DATA, b"x")))
    with (tmp_path / "other").open("wb") as other:
        assert not FakeDul(other).write(p_data((1, DATA, b"x")))
    assert (tmp_path / "other").read_bytes() == b""


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=4), max_size=12))
def test_any_split_into_pdus_and_items_gives_the_data_back(
    tmp_path_factory: pytest.TempPathFactory, pdus: list[list[bytes]]
) -> None:
    target = ReceivedFile(tmp_path_factory.mktemp("frag"), delete=False, mode="wb", suffix=".dcm")
    dul = FakeDul(target, context_id=5)
    for items in pdus:
        assert dul.write(p_data(*[(5, DATA, data) for data in items]))
    assert written(target) == b"".join(b"".join(items) for items in pdus)
