"""The `compare` flow and `rfatlas compare`: Table 1 of Kobayashi & Shouno 2020 for several atlases."""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from rfcore.noise import compare_table

TABLE_TITLE = "Inactive channels and noise injection (Kobayashi & Shouno 2020, Table 1)"


@flow(name="compare")
def compare(urls: list[str]) -> str:
    """Table 1 for the atlases as markdown; also recorded as the `noise-compare` artifact."""
    table = compare_table(urls)
    create_markdown_artifact(
        markdown=f"## {TABLE_TITLE}\n\n{table}", key="noise-compare", description=TABLE_TITLE
    )
    return table


def _cmd_compare(args: argparse.Namespace) -> int:
    print(compare_table(args.urls) if args.no_artifact else compare(list(args.urls)), end="")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add `rfatlas compare`."""
    p = subparsers.add_parser("compare", help="print Table 1 (inactive channels, ΔL, ΔL_rnd) for atlases")
    p.add_argument("urls", nargs="+", metavar="URL", help="atlas URLs with noise results")
    p.add_argument(
        "--no-artifact", action="store_true", help="print only; skip the Prefect markdown artifact"
    )
    p.set_defaults(func=_cmd_compare)
