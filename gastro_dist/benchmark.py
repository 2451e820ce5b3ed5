"""Benchmarks: `gastro-dist bench loader` and `gastro-dist bench train` (being written)."""

from __future__ import annotations

import argparse


def add_bench_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure input-pipeline and training throughput")
    p.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
