"""``mcdeploy send`` / ``mcdeploy receive``: the transport alone, without Redis or a controller.

Server side (send) and client side (receive) adapters.  PLACEHOLDER: being written.
"""

from __future__ import annotations

import argparse

SEND_DESCRIPTION = "Multicast a file (standalone)."
RECEIVE_DESCRIPTION = "Receive a file from `mcdeploy send` (standalone)."


def add_send_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")


def add_receive_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True)


def run_send(args: argparse.Namespace) -> int:
    raise NotImplementedError


def run_receive(args: argparse.Namespace) -> int:
    raise NotImplementedError
