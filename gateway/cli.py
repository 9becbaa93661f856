"""The ``deid-gateway`` command line.

Each sub-command lives in its own module under :mod:`gateway.commands` and
contributes a ``register(subparsers)`` function that adds its parser and sets
``func`` (a callable taking the parsed namespace and returning an exit code).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.commands import (
    audit,
    deidentify,
    demo_data,
    echo,
    explain,
    profile_doc,
    quarantine,
    serve,
    verify,
)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="deid-gateway",
        description="DICOM de-identification gateway for digital pathology.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (deidentify, explain, verify, demo_data, serve, quarantine, echo, audit, profile_doc):
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 1
