"""C-STORE command sets and File Meta Information, encoded and decoded by hand.

pynetdicom builds a pydicom data set for every command set it sends or
receives and encodes or decodes it element by element, with validation: for
a study of small instances that is a large part of each C-STORE's cost. A
C-STORE's command set is a handful of elements of group 0000, always in
implicit VR little endian (PS3.7 6.3.1, 9.3.1); these functions read and
write exactly those, and give up (None) on anything else, which then takes
pynetdicom's path. The encodings are pynetdicom's, byte for byte
(``tests/test_cstore.py`` compares them).
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.utils import validate_uid

from gateway.pdu import COMMAND, LAST, P_DATA_TF_TYPE, PDU_HEADER, PDV_HEADER

# Command set elements (group 0000, implicit VR little endian).
_ELEMENT = struct.Struct("<HHL")
_US = struct.Struct("<H")
_UL = struct.Struct("<L")
GROUP_LENGTH = 0x0000
AFFECTED_SOP_CLASS = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_RESPONDED_TO = 0x0120
PRIORITY = 0x0700
DATA_SET_TYPE = 0x0800
STATUS = 0x0900
AFFECTED_SOP_INSTANCE = 0x1000
MOVE_ORIGINATOR_AE = 0x1030
MOVE_ORIGINATOR_ID = 0x1031
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
#: Command Data Set Type of a message without a data set; pynetdicom writes
#: 0x0001 for one with.
NO_DATA_SET = 0x0101
_DATA_SET = 0x0001
#: pynetdicom's default priority for a C-STORE request (LOW).
DEFAULT_PRIORITY = 0x0002
_REQUEST_ELEMENTS = frozenset(
    {GROUP_LENGTH, AFFECTED_SOP_CLASS, COMMAND_FIELD, MESSAGE_ID, PRIORITY, DATA_SET_TYPE,
     AFFECTED_SOP_INSTANCE, MOVE_ORIGINATOR_AE, MOVE_ORIGINATOR_ID}
)  # fmt: skip
_US_ELEMENTS = frozenset(
    {COMMAND_FIELD, MESSAGE_ID, MESSAGE_ID_RESPONDED_TO, PRIORITY, DATA_SET_TYPE, STATUS}
)
_UID_ELEMENTS = frozenset({AFFECTED_SOP_CLASS, AFFECTED_SOP_INSTANCE})
_UID_PADDING = b"\0 "


def _decode(command: bytes, allowed: frozenset[int] | None) -> dict[int, int | str | bytes] | None:
    """The elements of a command set: US values as int, UIDs as str, others as
    bytes; None when a length does not add up, an element repeats or is not
    in ``allowed`` (any element of group 0000 when None), or a US or UID
    value is not one."""
    values: dict[int, int | str | bytes] = {}
    offset, end = 0, len(command)
    while offset < end:
        if end - offset < _ELEMENT.size:
            return None
        group, element, length = _ELEMENT.unpack_from(command, offset)
        offset += _ELEMENT.size
        value = command[offset : offset + length]
        offset += length
        if group != 0 or len(value) != length or element in values:
            return None
        if allowed is not None and element not in allowed:
            return None
        if element in _US_ELEMENTS:
            if length != 2:
                return None
            values[element] = _US.unpack(value)[0]
        elif element in _UID_ELEMENTS:
            try:
                uid = value.rstrip(_UID_PADDING).decode("ascii")
            except UnicodeDecodeError:
                return None
            if not validate_uid(UID(uid)):
                return None
            values[element] = uid
        else:
            values[element] = value
    return values


def decode_store_request(command: bytes) -> dict[int, int | str | bytes] | None:
    """The elements of a C-STORE request with a data set, or None for
    anything else (another command, no data set, an element a C-STORE
    request does not have, a length that does not add up, a UID that is not
    one)."""
    values = _decode(command, _REQUEST_ELEMENTS)
    if values is None or values.get(COMMAND_FIELD) != C_STORE_RQ:
        return None
    if values.get(DATA_SET_TYPE, NO_DATA_SET) == NO_DATA_SET:
        return None
    if not all(element in values for element in (MESSAGE_ID, AFFECTED_SOP_CLASS, AFFECTED_SOP_INSTANCE)):
        return None
    return values


def decode_store_response(command: bytes, message_id: int) -> int | None:
    """The status of the C-STORE response to request ``message_id``, or None
    when ``command`` is not that response (another command or message, a data
    set announced, no status, or elements that do not decode)."""
    values = _decode(command, None)
    if values is None or values.get(COMMAND_FIELD) != C_STORE_RSP:
        return None
    if values.get(MESSAGE_ID_RESPONDED_TO) != message_id or values.get(DATA_SET_TYPE) != NO_DATA_SET:
        return None
    status = values.get(STATUS)
    return status if isinstance(status, int) else None


def _ui(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def _command(elements: tuple[tuple[int, bytes], ...]) -> bytes:
    body = b"".join(_ELEMENT.pack(0, element, len(value)) + value for element, value in elements)
    return _ELEMENT.pack(0, GROUP_LENGTH, 4) + _UL.pack(len(body)) + body


def encode_store_request(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, priority: int = DEFAULT_PRIORITY
) -> bytes:
    """The C-STORE request command set (with a data set), as pynetdicom encodes it."""
    return _command((
        (AFFECTED_SOP_CLASS, _ui(sop_class_uid)),
        (COMMAND_FIELD, _US.pack(C_STORE_RQ)),
        (MESSAGE_ID, _US.pack(message_id)),
        (PRIORITY, _US.pack(priority)),
        (DATA_SET_TYPE, _US.pack(_DATA_SET)),
        (AFFECTED_SOP_INSTANCE, _ui(sop_instance_uid)),
    ))  # fmt: skip


def encode_store_response(message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int) -> bytes:
    """The C-STORE response command set, as pynetdicom encodes it."""
    return _command((
        (AFFECTED_SOP_CLASS, _ui(sop_class_uid)),
        (COMMAND_FIELD, _US.pack(C_STORE_RSP)),
        (MESSAGE_ID_RESPONDED_TO, _US.pack(message_id)),
        (DATA_SET_TYPE, _US.pack(NO_DATA_SET)),
        (STATUS, _US.pack(status)),
        (AFFECTED_SOP_INSTANCE, _ui(sop_instance_uid)),
    ))  # fmt: skip


def command_pdu(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU holding a whole command set in one item."""
    item = PDV_HEADER.pack(len(command) + 2, context_id, COMMAND | LAST) + command
    return PDU_HEADER.pack(P_DATA_TF_TYPE, 0, len(item)) + item


# File Meta Information elements (explicit VR little endian).
_META_ELEMENT = struct.Struct("<HH2sH")
_META_LONG_ELEMENT = struct.Struct("<HH2sHL")
PREFIX = b"\0" * 128 + b"DICM"
_META_UIDS = {0x0002: "sop_class", 0x0003: "sop_instance", 0x0010: "transfer_syntax"}
#: VRs whose explicit length is 32 bits (after two reserved bytes), as pydicom lists them.
_LONG_VRS = frozenset(str(vr).encode("ascii") for vr in EXPLICIT_VR_LENGTH_32)


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information pynetdicom writes
    before a received data set (:func:`pynetdicom.dsutils.create_file_meta`
    written by pydicom), byte for byte."""
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    if len(version) % 2:
        version += b" "
    body = _META_LONG_ELEMENT.pack(2, 0x0001, b"OB", 0, 2) + b"\0\x01" + b"".join(
        _META_ELEMENT.pack(2, element, vr, len(value)) + value
        for element, vr, value in (
            (0x0002, b"UI", _ui(sop_class_uid)),
            (0x0003, b"UI", _ui(sop_instance_uid)),
            (0x0010, b"UI", _ui(transfer_syntax)),
            (0x0012, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID)),
            (0x0013, b"SH", version),
        )
    )
    return PREFIX + _META_ELEMENT.pack(2, GROUP_LENGTH, b"UL", 4) + _UL.pack(len(body)) + body


#: The largest File Meta Information :func:`read_file_meta` reads.
_META_LIMIT = 64 * 1024


def read_file_meta(fp: BinaryIO) -> tuple[str, str, str, int] | None:
    """SOP Class, SOP Instance and Transfer Syntax UIDs of a Part 10 file, and
    where its data set starts; None when the file does not start with a
    preamble, ``DICM`` and a File Meta Information group led by its group
    length and holding those three UIDs."""
    head = fp.read(len(PREFIX) + 12)
    if len(head) < len(PREFIX) + 12 or head[128:132] != b"DICM":
        return None
    group, element, vr, length = _META_ELEMENT.unpack_from(head, len(PREFIX))
    if (group, element, vr, length) != (2, GROUP_LENGTH, b"UL", 4):
        return None
    (group_length,) = _UL.unpack_from(head, len(PREFIX) + 8)
    if group_length > _META_LIMIT:
        return None
    meta = fp.read(group_length)
    if len(meta) != group_length:
        return None
    found: dict[str, str] = {}
    offset = 0
    while offset < group_length:
        if group_length - offset < 8:
            return None
        group, element, vr, length = _META_ELEMENT.unpack_from(meta, offset)
        if group != 2:
            return None
        if vr in _LONG_VRS:
            if group_length - offset < 12:
                return None
            (length,) = _UL.unpack_from(meta, offset + 8)
            start = offset + 12
        else:
            start = offset + 8
        offset = start + length
        if offset > group_length:
            return None
        name = _META_UIDS.get(element)
        if name is not None:
            try:
                found[name] = meta[start:offset].rstrip(_UID_PADDING).decode("ascii")
            except UnicodeDecodeError:
                return None
    if len(found) != len(_META_UIDS) or not all(found.values()):
        return None
    start = len(PREFIX) + 12 + group_length
    return found["sop_class"], found["sop_instance"], found["transfer_syntax"], start
