"""The least a durable DICOM receiver in Python does: a reference, not the gateway.

A pynetdicom C-STORE SCP with chunked receive and TCP_NODELAY that moves each
received file into a directory and answers Success, with nothing else: no
allowlist, no check, no spool, no forwarding. With ``--fsync`` it flushes the
file and its directory to disk before answering, as the gateway must before it
acknowledges an instance; with ``--gateway-pynetdicom`` it receives through
the gateway's changes to pynetdicom (socket reads, data PDUs written straight
to the file, writeback while receiving, event-driven reactors).
``benchmarks/run`` sends the same workloads to it in the same run as the
baseline, so the report shows how much of the gap to dcmtk is pynetdicom and
the disk, and how much is the gateway.

    python -m benchmarks.floor_scp PORT DIRECTORY [--fsync] [--gateway-pynetdicom]
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import VLWholeSlideMicroscopyImageStorage  # type: ignore[attr-defined]

from gateway.receive import configure_receiving, set_nodelay

AE_TITLE = "FLOOR"


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--fsync", action="store_true", help="flush each instance to disk before Success")
    parser.add_argument("--gateway-pynetdicom", action="store_true",
                        help="with the gateway's changes to pynetdicom's receive path "
                             "(gateway.receive.configure_receiving)")
    args = parser.parse_args()
    directory: Path = args.directory
    directory.mkdir(parents=True, exist_ok=True)
    incoming = directory / ".incoming"  # on the same file system, so the move is a rename
    incoming.mkdir(exist_ok=True)
    tempfile.tempdir = str(incoming)
    _config.STORE_RECV_CHUNKED_DATASET = True
    if args.gateway_pynetdicom:
        configure_receiving(incoming)
    numbers = itertools.count()

    def on_store(event: evt.Event) -> int:
        target = directory / f"{next(numbers)}.dcm"
        Path(event.dataset_path).replace(target)  # the handler must move it before returning
        if args.fsync:
            _fsync(target)
            _fsync(directory, os.O_RDONLY | os.O_DIRECTORY)
        return 0x0000

    ae = AE(AE_TITLE)
    ae.maximum_pdu_size = 4 * 2**20
    ae.add_supported_context(VLWholeSlideMicroscopyImageStorage, [JPEGBaseline8Bit, ExplicitVRLittleEndian])
    ae.start_server(
        ("127.0.0.1", args.port),
        block=True,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, set_nodelay)],
    )


if __name__ == "__main__":
    main()
