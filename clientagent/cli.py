"""``mcdeploy-client``: receive an image from a DP's multicast session.

Portable: standard library + mcproto only.  Exit codes (for task sequences):
0 verified and acknowledged; 2 usage; 3 no session / DP unreachable;
4 transfer failed; 5 verification failed; 6 output failed (e.g. disk full);
7 verified but the DP never acknowledged.

:func:`run` (receive, progress, the one-line verdict and ``--json``) is shared
with ``mcdeploy receive``, so both commands report and exit the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import uuid
from typing import Any

from clientagent import identity
from clientagent.impair import Impairment
from clientagent.net import interface_index, is_multicast, parse_hostport
from clientagent.output import SPOOL_MEMORY, STDOUT
from clientagent.transfer import EXIT_USAGE, ClientOptions, ClientResultInfo, receive

DISCOVER_PORT = 47301  # the data port `mcdeploy send` uses by default


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
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--dp", help="the DP's control address, HOST:PORT or [V6]:PORT (port default 47100)")
    where.add_argument("--discover", metavar="GROUP[:PORT]",
                       help="find the session by the announce its sender repeats on this multicast group "
                       f"(IPv4 or [IPv6]:PORT; port default {DISCOVER_PORT}) instead of naming the DP")
    p.add_argument("--out", required=True,
                   help="output: a file, a block device, or - for stdout (in order, for piping into an apply "
                   "command; then --json goes to stderr)")
    p.add_argument("--dp-key", default=None, metavar="FINGERPRINT",
                   help="the DP identity to trust (64 hex digits, shown by `mcdeploy dp list`; put it on the boot "
                   "media): offers not signed by it are refused")
    p.add_argument("--controller-key", default=None, metavar="PUBLIC_KEY",
                   help="the controller's public key (64 hex digits, shown by `mcdeploy key`; put it on the boot "
                   "media): the image manifest must be signed by it and every chunk must match it before it "
                   "is committed, so nobody, not even another enrolled client, can inject data")
    p.add_argument("--interface", default=None,
                   help="where to join multicast groups: an IPv4 address, or for IPv6 an interface name, "
                   "index or address (default: the interface towards the DP; for --discover the system's "
                   "choice; an IPv6 address this system cannot map to its interface also means the "
                   "system's choice, so give the name or index on a multi-homed machine)")
    p.add_argument("--id", dest="client_id", default=None,
                   help="client identity (default: mac-<MAC address>)")
    p.add_argument("--deployment", default=None, help="join only this deployment")
    p.add_argument("--mac", default=None,
                   help="this machine's MAC address as the site knows it (default: the one the OS reports); "
                   "deployments to a collection admit only the machines they target, by MAC or SMBIOS UUID")
    p.add_argument("--smbios-uuid", default=None, metavar="UUID",
                   help="this machine's SMBIOS UUID (default: /sys/class/dmi/id/product_uuid on Linux when "
                   "readable, else none)")
    p.add_argument("--wait", type=float, default=120.0,
                   help="seconds to wait for a session to be announced/offered (default 120); a DP that says "
                   "\"wait\" is asked again within this, and each new reason is printed with the expected start")
    uni = p.add_argument_group("unicast fallback (deployments that allow it)")
    uni.add_argument("--unicast", action="store_true",
                     help="fetch the image from the DP over HTTP (range requests) instead of joining the multicast; "
                     "every chunk is checked against the signed manifest as for multicast")
    uni.add_argument("--unicast-after", type=float, default=10.0, metavar="S",
                     help="fall back to HTTP when nothing arrived on the multicast group for S seconds, or the group "
                     "cannot be joined (default 10); a client the DP drops with unicast allowed falls back at once")
    add_common_arguments(p)
    add_output_arguments(p)
    return p


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """Resume and output options; :func:`check_output` checks them, :func:`output_options` passes them on."""
    g = p.add_argument_group("output and resume")
    g.add_argument("--journal", default=None, metavar="PATH",
                   help="resume journal: a file, or a directory to keep it in (default: OUT.mcdeploy-journal "
                   "beside a file output). Run again with the same --out after a crash, kill or power loss and "
                   "only the missing blocks are received. A block device resumes only with --journal, on a disk "
                   "that survives a reboot. Not for --out -")
    g.add_argument("--no-resume", action="store_true",
                   help="keep no journal and ignore an existing one: always receive the whole image")
    g.add_argument("--no-sparse", action="store_true",
                   help="write all-zero blocks to a file output too (default: leave them as holes; block devices "
                   "always get zeros written)")
    g.add_argument("--spool-memory", type=float, default=SPOOL_MEMORY / 2**20, metavar="MIB",
                   help="--out -: MiB of out-of-order blocks kept in memory before they go to a temporary spool "
                   f"file (default {SPOOL_MEMORY // 2**20})")
    g.add_argument("--spool-dir", default=None, metavar="DIR",
                   help="--out -: directory of the spool file (default: the system's temporary directory)")


def check_output(args: argparse.Namespace) -> str | None:
    """A one-line usage error for the output options, or None."""
    if args.out == STDOUT and args.journal is not None:
        return ("--journal does not apply to --out -: stdout cannot be rewound, so a receive to a pipe cannot "
                "resume (receive to a file or device to resume)")
    if args.spool_memory < 0:
        return "--spool-memory must be >= 0"
    if args.spool_dir is not None and not os.path.isdir(args.spool_dir):
        return f"--spool-dir {args.spool_dir} is not a directory"
    return None


def output_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`ClientOptions` fields set by :func:`add_output_arguments`."""
    return {"journal": args.journal, "resume": not args.no_resume, "sparse": not args.no_sparse,
            "spool_memory": int(args.spool_memory * 2**20), "spool_dir": args.spool_dir}


def add_key_arguments(p: argparse.ArgumentParser, role: str) -> None:
    """``--key``/``--key-file``: a pre-shared key for standalone transfers (sealed, encrypted packets)."""
    g = p.add_argument_group("encryption (standalone)")
    g.add_argument("--key", default=None, metavar="HEX",
                   help=f"pre-shared key, at least 32 hex digits: {role} only packets sealed with keys derived from "
                   "it (ChaCha20-Poly1305; forged or damaged packets are dropped and counted)")
    g.add_argument("--key-file", default=None, metavar="PATH",
                   help="read the pre-shared key from a file (raw bytes, >= 16, or hex text); prefer this to --key, "
                   "which other local users can see in the process list")


def load_shared_key(args: argparse.Namespace) -> bytes | None:
    """The pre-shared key from ``--key``/``--key-file``, or None; ValueError with a one-line reason."""
    if args.key and args.key_file:
        raise ValueError("give --key or --key-file, not both")
    raw: bytes | None = None
    if args.key:
        try:
            raw = bytes.fromhex(args.key)
        except ValueError:
            raise ValueError("--key must be hex digits") from None
    elif args.key_file:
        try:
            with open(args.key_file, "rb") as fh:
                data = fh.read(4096)
        except OSError as exc:
            raise ValueError(f"cannot read --key-file: {exc.strerror}") from None
        try:
            text = data.decode("ascii").strip()
            raw = bytes.fromhex(text) if text and len(text) % 2 == 0 else data
        except (UnicodeDecodeError, ValueError):
            raw = data
    if raw is not None and len(raw) < 16:
        raise ValueError("the pre-shared key needs at least 16 bytes (32 hex digits)")
    return raw


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Options every receiving command has (also used by ``mcdeploy receive``)."""
    p.add_argument("--idle-timeout", type=float, default=30.0,
                   help="give up after this many seconds without a packet from the sender (default 30)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    test = p.add_argument_group("test features (never use in production)")
    test.add_argument("--test-loss", type=float, default=0.0, metavar="PCT",
                      help="TEST FEATURE: drop PCT %% of data packets on arrival to exercise repair")
    test.add_argument("--test-impair", default="", metavar="SPEC",
                      help="TEST FEATURE: damage arriving data packets like a bad network, e.g. "
                      "'loss=1,burst=1:8,reorder=25,dup=5,corrupt=1' (percentages; burst=P:LEN is Gilbert-Elliott; "
                      "cap=MBPS takes in at most that rate, like a slow machine)")
    test.add_argument("--test-seed", type=int, default=None, help="TEST FEATURE: seed for --test-loss/--test-impair")


def check_common(args: argparse.Namespace) -> str | None:
    """A one-line usage error for the common options and ``--interface``, or None."""
    if not 0.0 <= args.test_loss < 100.0:
        return "--test-loss must be in [0, 100)"
    if args.test_impair:
        try:
            Impairment.parse(args.test_impair)
        except ValueError as exc:
            return f"--test-impair: {exc}"
    if args.wait < 0 or args.idle_timeout <= 0:
        return "--wait must be >= 0 and --idle-timeout > 0"
    if getattr(args, "interface", None):
        try:
            interface_index(args.interface)
        except ValueError as exc:
            return f"--interface: {exc}"
    return None


def result_dict(opts: ClientOptions, result: ClientResultInfo) -> dict[str, Any]:
    """The ``--json`` line: every figure a task sequence or a test may want."""
    return {
        "client_id": opts.client_id, "exit_code": result.exit_code, "reason": result.reason,
        "verified": result.verified, "acknowledged": result.acknowledged, "sha256": result.sha256,
        "image_bytes": result.image_bytes, "seconds": round(result.seconds, 3),
        "transfer_seconds": round(result.transfer_seconds, 3),
        "packets": result.packets, "duplicates": result.duplicates, "rejected": result.rejected,
        "foreign": result.foreign,
        "test_dropped": result.test_dropped, "deployment": result.deployment, "moves": result.moves,
        "encrypted": result.encrypted, "manifest": result.manifest, "rejected_chunks": result.rejected_chunks,
        **result.extra,
    }


def run(opts: ClientOptions, prog: str, *, json_out: bool = False, quiet: bool = False) -> int:
    """Receive with ``opts``: progress on a terminal, one verdict line on stderr, optional JSON; the exit code.

    With ``--out -`` stdout carries the image, so the JSON line goes to stderr.
    """
    if opts.test_loss:
        print(f"{prog}: TEST FEATURE: dropping {opts.test_loss * 100:g} % of data packets on arrival",
              file=sys.stderr)
    if opts.test_impair:
        print(f"{prog}: TEST FEATURE: impairing arriving data packets: {opts.test_impair}", file=sys.stderr)
    tty = sys.stderr.isatty() and not quiet

    def progress(got: int, total: int) -> None:
        if tty:
            pct = 100.0 * got / total if total else 100.0
            print(f"\r{prog}: {pct:5.1f} % ({got}/{total} blocks)", end="", file=sys.stderr)

    def notice(text: str) -> None:
        print(("\n" if tty else "") + f"{prog}: {text}", file=sys.stderr)

    try:
        result = receive(opts, progress, notice)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    if tty:
        print(file=sys.stderr)
    mbps = result.image_bytes / result.seconds / 1e6 if result.seconds and result.exit_code == 0 else 0.0
    if result.exit_code == 0:
        via = f", delivered by {result.extra['path']}" if result.extra.get("path", "multicast") != "multicast" else ""
        print(f"{prog}: OK: {result.image_bytes} bytes verified and acknowledged in "
              f"{result.seconds:.2f} s ({mbps:.1f} MB/s{via})", file=sys.stderr)
    else:
        print(f"{prog}: FAILED ({result.exit_code}): {result.reason}", file=sys.stderr)
    if json_out:
        print(json.dumps(result_dict(opts, result)), file=sys.stderr if opts.out == STDOUT else sys.stdout,
              flush=True)
    return result.exit_code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "mcdeploy-client"
    try:
        dp = parse_hostport(args.dp) if args.dp else None
        group = parse_hostport(args.discover, DISCOVER_PORT) if args.discover else None
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    problem = check_common(args) or check_output(args)
    if problem is None and args.dp_key is not None and not re.fullmatch(r"(sha256:)?[0-9a-fA-F]{64}", args.dp_key):
        problem = "--dp-key must be the DP's 64-hex-digit fingerprint"
    if problem is None and args.controller_key is not None and not re.fullmatch(r"[0-9a-fA-F]{64}",
                                                                                args.controller_key):
        problem = "--controller-key must be the controller's 64-hex-digit public key (see `mcdeploy key`)"
    mac, smbios_uuid = None, None
    try:
        mac = identity.normalize_mac(args.mac) if args.mac else identity.local_mac()
        smbios_uuid = identity.normalize_uuid(args.smbios_uuid) if args.smbios_uuid else identity.local_smbios_uuid()
    except ValueError as exc:
        problem = problem or f"{'--mac' if 'MAC' in str(exc) else '--smbios-uuid'}: {exc}"
    if problem is None and args.unicast_after <= 0:
        problem = "--unicast-after must be > 0"
    if group is not None and problem is None and not is_multicast(group[0]):
        problem = f"--discover: {group[0]} is not a multicast group address"
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    opts = ClientOptions(dp=dp, out=args.out, client_id=args.client_id or default_client_id(),
                         deployment=args.deployment, wait_s=args.wait, idle_timeout_s=args.idle_timeout,
                         test_loss=args.test_loss / 100.0, test_impair=args.test_impair, seed=args.test_seed,
                         discover=group, dp_key=args.dp_key, controller_key=args.controller_key,
                         interface=args.interface, mac=mac, smbios_uuid=smbios_uuid, unicast=args.unicast,
                         unicast_after_s=args.unicast_after, **output_options(args))
    return run(opts, prog, json_out=args.json, quiet=args.quiet)

