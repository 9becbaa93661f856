"""``deid-gateway audit``: check and read the hash-chained audit trail.

``audit verify`` exits 0 when the chain is intact, 1 when it is broken (and
names the first record affected), 2 when the store cannot be opened.
``audit show`` prints records as JSON lines.

The store is ``--db``, else ``$DEID_GATEWAY_AUDIT_DB``, else the ``audit``
store of the node's configuration (``--config``, or the embedded defaults,
whose store is ``gateway-data/audit.sqlite`` in the working directory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from gateway.audit import AuditError, AuditTrail
from gateway.config import ConfigError, load_config

#: Environment variable naming the audit store when ``--db`` is not given.
ENV_DB = "DEID_GATEWAY_AUDIT_DB"


def register(subparsers: Any) -> None:
    """Add the ``audit`` command with its ``verify`` and ``show`` sub-commands."""
    parser = subparsers.add_parser(
        "audit",
        help="verify or show the audit trail",
        description="Verify or show the hash-chained audit trail.",
    )
    actions = parser.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    db_help = (
        f"SQLite file path or database URL (default: ${ENV_DB}, else the store of the configuration)"
    )
    config_help = "node configuration whose audit store to open (default: the embedded defaults)"

    verify = actions.add_parser("verify", help="recompute the hash chain; exit 1 if broken")
    verify.add_argument("--db", default=None, help=db_help)
    verify.add_argument("--config", type=Path, default=None, metavar="FILE", help=config_help)
    verify.set_defaults(func=_verify)

    show = actions.add_parser("show", help="print records as JSON lines")
    show.add_argument("--db", default=None, help=db_help)
    show.add_argument("--config", type=Path, default=None, metavar="FILE", help=config_help)
    show.add_argument("--after", type=int, default=0, metavar="SEQ", help="start after record SEQ")
    show.add_argument("--limit", type=int, default=100, help="at most this many records")
    show.set_defaults(func=_show)


def _open(args: argparse.Namespace) -> AuditTrail | None:
    target = args.db or os.environ.get(ENV_DB)
    if not target:
        try:
            target = load_config(args.config).audit_url
        except ConfigError as exc:
            print(f"audit: configuration error: {exc}", file=sys.stderr)
            return None
    try:
        return AuditTrail(target, create=False)
    except (AuditError, SQLAlchemyError) as exc:
        print(f"audit: cannot open the audit store: {exc}", file=sys.stderr)
        return None


def _verify(args: argparse.Namespace) -> int:
    trail = _open(args)
    if trail is None:
        return 2
    with trail:
        result = trail.verify()
    if result.ok:
        print(f"audit trail intact: {result.records} records, head {result.head_hash}")
        return 0
    print(
        f"audit trail BROKEN at record {result.broken_seq}: {result.problem} "
        f"({result.records} records verified before it)",
        file=sys.stderr,
    )
    return 1


def _show(args: argparse.Namespace) -> int:
    trail = _open(args)
    if trail is None:
        return 2
    with trail:
        for record in trail.records(after_seq=args.after, limit=args.limit):
            print(json.dumps(record, sort_keys=True))
    return 0
