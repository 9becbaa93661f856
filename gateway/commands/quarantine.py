"""``deid-gateway quarantine list|show|release|purge``: look after held instances.

``release`` puts an entry back in the spool (attempts reset); a running node
picks it up within seconds. ``purge`` deletes it for good.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, load_config
from gateway.quarantine import Quarantine
from gateway.spool import Spool


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "quarantine",
        help="list, show, release or purge quarantined instances",
        description="Inspect and act on instances held in quarantine.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="YAML configuration file (default: the embedded defaults)",
    )
    actions = parser.add_subparsers(dest="quarantine_command", required=True, metavar="ACTION")
    actions.add_parser("list", help="one line per entry: id, time, reason, SOP class, size")
    show = actions.add_parser("show", help="everything known about one entry, as JSON")
    show.add_argument("entry_id")
    for name, text in (("release", "send entries again"), ("purge", "delete entries")):
        action = actions.add_parser(name, help=text)
        group = action.add_mutually_exclusive_group(required=True)
        group.add_argument("entry_ids", nargs="*", default=[], metavar="ID")
        group.add_argument("--all", action="store_true", help="every entry")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"deid-gateway quarantine: configuration error: {exc}", file=sys.stderr)
        return 2
    quarantine = Quarantine(config.quarantine_dir)
    command: str = args.quarantine_command
    if command == "list":
        for entry in quarantine.entries():
            print(
                f"{entry.entry_id}\t{entry.reason.when}\t{entry.reason.code}\t"
                f"{entry.info.sop_class_uid}\t{entry.size}\t{entry.reason.detail}"
            )
        return 0
    if command == "show":
        try:
            entry = quarantine.get(args.entry_id)
        except KeyError:
            print(f"deid-gateway quarantine: no entry {args.entry_id!r}", file=sys.stderr)
            return 1
        print(json.dumps(asdict(entry), indent=2))
        return 0
    ids: list[str] = quarantine.ids() if args.all else args.entry_ids
    spool = Spool(config.spool_dir)
    missing = 0
    for entry_id in ids:
        try:
            if command == "release":
                spool.ready.mkdir(mode=0o700, parents=True, exist_ok=True)
                spool.incoming.mkdir(mode=0o700, parents=True, exist_ok=True)
                quarantine.release(entry_id, spool)
            else:
                quarantine.purge(entry_id)
        except KeyError:
            print(f"deid-gateway quarantine: no entry {entry_id!r}", file=sys.stderr)
            missing += 1
            continue
        print(f"{'released' if command == 'release' else 'purged'} {entry_id}")
    return 1 if missing else 0
