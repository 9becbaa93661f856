"""``deid-gateway echo``: C-ECHO the configured destinations (or one of them)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, DicomDestination, load_config
from gateway.forward import echo


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "echo",
        help="check DICOM destinations with C-ECHO",
        description="Send a C-ECHO to each DICOM destination of the configuration, "
        "or to the one named. Exits 1 if any does not answer Success.",
    )
    parser.add_argument("destination", nargs="?", help="destination name (default: all)")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="YAML configuration file (default: the embedded defaults)",
    )
    parser.set_defaults(func=_echo)


def _echo(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"deid-gateway echo: configuration error: {exc}", file=sys.stderr)
        return 2
    dests = [d for d in config.destinations if isinstance(d, DicomDestination)]
    if args.destination is not None:
        dests = [d for d in dests if d.name == args.destination]
        if not dests:
            print(
                f"deid-gateway echo: no DICOM destination named {args.destination!r}",
                file=sys.stderr,
            )
            return 2
    if not dests:
        print("deid-gateway echo: the configuration has no DICOM destination", file=sys.stderr)
        return 2
    failed = 0
    for dest in dests:
        ok, detail = echo(dest, config.listen.ae_title)
        failed += not ok
        print(
            f"{dest.name}\t{dest.ae_title}@{dest.host}:{dest.port}\t"
            f"{'ok' if ok else 'FAILED'}\t{detail}"
        )
    return 1 if failed else 0
