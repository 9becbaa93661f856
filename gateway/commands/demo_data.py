"""``deid-gateway demo-data``: write a synthetic study with planted fake PHI.

For trying the gateway out and for demonstrations: nothing in it comes from a
real patient, and every identifying value is a distinctive token that must
not survive de-identification.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``demo-data`` sub-command."""
    parser = subparsers.add_parser(
        "demo-data",
        help="write a synthetic whole-slide study full of planted fake PHI",
        description="Write slides (pyramid, label, overview), an SR and secondary captures "
        "of one synthetic patient into DIR; with --tokens, list the planted values in FILE.",
    )
    parser.add_argument("directory", type=Path, metavar="DIR")
    parser.add_argument("--slides", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="another seed, another patient")
    parser.add_argument("--tokens", type=Path, default=None, metavar="FILE")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    # Imported here, not with the command line: every other command, serve
    # included, would otherwise load the synthetic writer (highdicom, codecs).
    from gateway.synthetic import PlantedPHI, write_study

    phi = PlantedPHI.create(seed=args.seed)
    study = write_study(args.directory, phi, slides=args.slides)
    print(f"wrote {len(study.all_files())} instances to {args.directory}")
    if args.tokens is not None:
        args.tokens.write_text("\n".join(phi.all_tokens()) + "\n", encoding="utf-8")
    return 0
