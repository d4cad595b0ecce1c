"""``mcdeploy simulate``: PLACEHOLDER, being written."""

from __future__ import annotations

import argparse

DESCRIPTION = "Simulate a session."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--receivers", type=int, default=10)


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
