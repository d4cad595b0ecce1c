"""``mcdeploy-client``: receive an image from a DP's multicast session.

Portable: standard library + mcproto only.  Exit codes (for task sequences):
0 verified and acknowledged; 2 usage; 3 no session / DP unreachable;
4 transfer failed; 5 verification failed; 6 output failed (e.g. disk full);
7 verified but the DP never acknowledged.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid

from clientagent.net import parse_hostport
from clientagent.transfer import EXIT_USAGE, ClientOptions, receive


def default_client_id() -> str:
    """A stable identity: the MAC address the OS reports (``uuid.getnode``)."""
    return f"mac-{uuid.getnode():012x}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcdeploy-client",
        description="Join a DP's multicast session, receive the image into --out, verify its SHA-256 "
        "and report to the DP. Exit 0 only when verified and acknowledged; otherwise a one-line reason "
        "and: 3 no session/DP unreachable, 4 transfer failed, 5 verification failed, 6 output failed "
        "(e.g. disk full), 7 not acknowledged, 2 usage.",
    )
    p.add_argument("--dp", required=True, help="the DP's control address, HOST:PORT (port default 47100)")
    p.add_argument("--out", required=True, help="output file or block device")
    p.add_argument("--id", dest="client_id", default=None,
                   help="client identity (default: mac-<MAC address>)")
    p.add_argument("--deployment", default=None, help="join only this deployment")
    p.add_argument("--wait", type=float, default=120.0,
                   help="seconds to wait for a session to be offered (default 120)")
    p.add_argument("--idle-timeout", type=float, default=30.0,
                   help="give up after this many seconds without a packet from the sender (default 30)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    test = p.add_argument_group("test features (never use in production)")
    test.add_argument("--test-loss", type=float, default=0.0, metavar="PCT",
                      help="TEST FEATURE: drop PCT %% of data packets on arrival to exercise repair")
    test.add_argument("--test-seed", type=int, default=None, help="TEST FEATURE: seed for --test-loss")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        dp = parse_hostport(args.dp)
    except ValueError as exc:
        print(f"mcdeploy-client: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not 0.0 <= args.test_loss < 100.0:
        print("mcdeploy-client: error: --test-loss must be in [0, 100)", file=sys.stderr)
        return EXIT_USAGE
    if args.test_loss:
        print(f"mcdeploy-client: TEST FEATURE: dropping {args.test_loss:g} % of data packets on arrival",
              file=sys.stderr)
    opts = ClientOptions(dp=dp, out=args.out, client_id=args.client_id or default_client_id(),
                         deployment=args.deployment, wait_s=args.wait, idle_timeout_s=args.idle_timeout,
                         test_loss=args.test_loss / 100.0, seed=args.test_seed)
    tty = sys.stderr.isatty() and not args.quiet

    def progress(got: int, total: int) -> None:
        if tty:
            pct = 100.0 * got / total if total else 100.0
            print(f"\rmcdeploy-client: {pct:5.1f} % ({got}/{total} blocks)", end="", file=sys.stderr)

    try:
        result = receive(opts, progress)
    except KeyboardInterrupt:
        print("\nmcdeploy-client: interrupted", file=sys.stderr)
        return 130
    if tty:
        print(file=sys.stderr)
    mbps = result.image_bytes / result.seconds / 1e6 if result.seconds and result.exit_code == 0 else 0.0
    if result.exit_code == 0:
        print(f"mcdeploy-client: OK: {result.image_bytes} bytes verified and acknowledged in "
              f"{result.seconds:.2f} s ({mbps:.1f} MB/s)", file=sys.stderr)
    else:
        print(f"mcdeploy-client: FAILED ({result.exit_code}): {result.reason}", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "client_id": opts.client_id, "exit_code": result.exit_code, "reason": result.reason,
            "verified": result.verified, "acknowledged": result.acknowledged, "sha256": result.sha256,
            "image_bytes": result.image_bytes, "seconds": round(result.seconds, 3),
            "transfer_seconds": round(result.transfer_seconds, 3),
            "packets": result.packets, "duplicates": result.duplicates, "rejected": result.rejected,
            "test_dropped": result.test_dropped, "deployment": result.deployment,
        }))
    return result.exit_code
