"""``deid-gateway serve``: run the DICOM node until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from gateway.config import ConfigError, load_config
from gateway.logs import configure_logging


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the C-STORE receiver, spool and forwarder",
        description=(
            "Receive instances over DICOM, de-identify them and forward them to the "
            "configured destinations. Without --config the embedded defaults are used: "
            "127.0.0.1:11112, spool, quarantine, archive folder and a generated key "
            "under ./gateway-data/."
        ),
    )
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE", help="YAML configuration file"
    )
    parser.add_argument(
        "--mapping-dir", type=Path, default=None, metavar="DIR",
        help="write uid_mapping.csv and patient_id_mapping.csv (id_old,id_new) here, "
        "owner-readable only (overrides the configuration's mapping_dir)",
    )  # fmt: skip
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    configure_logging()
    try:
        config = load_config(args.config)
        if args.mapping_dir is not None:
            config = dataclasses.replace(config, mapping_dir=args.mapping_dir.resolve())
        from gateway.node import Node  # the engine loads profiles: only when serving

        node = Node(config)
        host, port = node.start()
    except ConfigError as exc:
        print(f"deid-gateway serve: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"deid-gateway serve: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(
        f"deid-gateway listening on {host}:{port} as {config.listen.ae_title}",
        file=sys.stderr,
        flush=True,
    )
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopping.wait(1.0):
        pass
    node.stop()
    return 0
