"""Byte layouts of the upper-layer PDUs the gateway reads or writes itself (PS3.8 9.3)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Protocol

from pynetdicom import evt

#: A PDU's header: type, reserved, length of what follows.
PDU_HEADER = struct.Struct(">BBL")
P_DATA_TF_TYPE = 0x04
#: A presentation data value item's header: item length, context ID, message control header.
PDV_HEADER = struct.Struct(">LBB")
#: The state machine's state of an established association (PS3.8 Table 9-10).
ESTABLISHED = "Sta6"
#: Handlers that must see what pynetdicom's own path does: bound to an
#: association, they keep its PDUs on that path.
WATCHING_EVENTS = (
    evt.EVT_PDU_RECV, evt.EVT_DATA_RECV, evt.EVT_DIMSE_RECV,
    evt.EVT_PDU_SENT, evt.EVT_DATA_SENT, evt.EVT_DIMSE_SENT,
)  # fmt: skip
#: Message control header bits: a command fragment (else data set), the last fragment.
COMMAND = 0x01
LAST = 0x02


@dataclass(slots=True)
class Item:
    """One presentation data value item of a P-DATA-TF PDU: where its data is."""

    context_id: int
    #: The message control header.
    control: int
    #: The item's data (after the control header) is ``pdu[start:stop]``.
    start: int
    stop: int


def pdv_items(pdu: bytes | bytearray) -> list[Item] | None:
    """The items of a P-DATA-TF PDU (header included), or None when they do
    not add up to the PDU exactly or one is empty."""
    items = []
    offset, end = PDU_HEADER.size, len(pdu)
    while offset < end:
        if end - offset < PDV_HEADER.size:
            return None
        length, context_id, control = PDV_HEADER.unpack_from(pdu, offset)
        stop = offset + 4 + length
        if length < 2 or stop > end:
            return None
        items.append(Item(context_id, control, offset + PDV_HEADER.size, stop))
        offset = stop
    return items or None


class PDataReader(Protocol):
    """Takes received P-DATA-TF PDUs before pynetdicom does (see
    :func:`gateway.receive.configure_pynetdicom`)."""

    def take(self, dul: Any, pdu: bytearray) -> bool:
        """Handle ``pdu`` (header included) in the DUL thread; False leaves it
        to pynetdicom, untouched."""
        ...


_READER = "_gateway_pdata_reader"


def set_pdata_reader(dul: Any, reader: PDataReader) -> None:
    """Give the association of ``dul`` a reader of its received P-DATA PDUs."""
    setattr(dul, _READER, reader)


def pdata_reader(dul: Any) -> PDataReader | None:
    """The reader of received P-DATA PDUs of ``dul``'s association, if any."""
    reader: PDataReader | None = getattr(dul, _READER, None)
    return reader


def nothing_pending(dul: Any) -> bool:
    """The association is established and pynetdicom holds no event or PDU
    received before the one just read: a PDU taken here cannot overtake one
    it has yet to act on."""
    return (
        dul.state_machine.current_state == ESTABLISHED
        and not dul.event_queue.qsize()
        and not dul._recv_pdu.qsize()
    )
