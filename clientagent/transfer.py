"""The client's adapter: join a session, receive into an output, verify, report, wait for the ack.

Portable (selectors + sockets).  The sans-I/O :class:`mcproto.receiver.Receiver`
decides what to ask for and when; this module moves datagrams, writes bytes
and reads the clock.  Success is claimed only after the output was fsynced,
re-read and found to match the offer's SHA-256, and the DP acknowledged it.

The DP is found either by its address (``--dp``) or, for a receiver that knows
only a multicast group (``mcdeploy receive``, ``mcdeploy-client --discover``),
by :func:`discover`: the sender repeats an ``Announce`` on the group naming its
control port.  From there on both paths are the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import selectors
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from clientagent.impair import Impairment
from clientagent.net import format_hostport, host_of, interface_towards, open_control_socket, open_data_socket
from clientagent.output import FileOutput, OutputError
from mcproto import codec, packets
from mcproto.errors import MessageError, PacketError
from mcproto.events import Acknowledged, GaveUp, Moved, TransferComplete
from mcproto.messages import Announce, Join, NoSession, Offer
from mcproto.receiver import Receiver

# Exit codes a task sequence can act on.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NO_SESSION = 3
EXIT_TRANSFER_FAILED = 4
EXIT_VERIFY_FAILED = 5
EXIT_OUTPUT_FAILED = 6
EXIT_NOT_ACKED = 7


@dataclass
class ClientOptions:
    """What one receive needs; ``dp`` None means "discover the DP on ``discover`` (group, port)"."""

    dp: tuple[str, int] | None
    out: str
    client_id: str
    deployment: str | None = None
    wait_s: float = 120.0  # bounds discovery and joining together
    idle_timeout_s: float = 30.0
    test_loss: float = 0.0  # TEST FEATURE: drop this fraction of data packets on arrival
    test_impair: str = ""  # TEST FEATURE: impairment spec (see clientagent.impair)
    seed: int | None = None
    discover: tuple[str, int] | None = None
    # Where groups are joined: IPv4 address; IPv6 name, index or address.  None: the interface
    # towards the DP for data, the kernel's choice for discovery.
    interface: str | None = None
    agent: str = "mcdeploy-client/0.1"

    def impairment(self) -> Impairment | None:
        """The TEST FEATURE impairment asked for, or None (the normal case)."""
        imp = Impairment.parse(self.test_impair, seed=self.seed) if self.test_impair else Impairment(seed=self.seed)
        if self.test_loss:
            imp.loss = self.test_loss
        return imp if imp.active else None


@dataclass(frozen=True)
class Discovery:
    """A session found by its announce: where to join it, and what it said about itself."""

    dp: tuple[str, int]
    announce: Announce
    source: str  # the address the announce came from


@dataclass
class ClientResultInfo:
    exit_code: int
    reason: str
    image_bytes: int = 0
    seconds: float = 0.0
    sha256: str = ""
    acknowledged: bool = False
    verified: bool = False
    packets: int = 0
    transfer_seconds: float = 0.0  # first data packet to the end: excludes waiting for the start
    duplicates: int = 0
    rejected: int = 0
    test_dropped: int = 0
    moves: int = 0
    deployment: str = ""
    extra: dict = field(default_factory=dict)


Progress = Callable[[int, int], None]


def join_session(opts: ClientOptions, sock, dp_addr) -> Offer | ClientResultInfo:  # type: ignore[no-untyped-def]
    """Ask the DP for a session until offered one, told no, or ``wait_s`` passes."""
    assert opts.dp is not None
    join = codec.encode(Join(client_id=opts.client_id, deployment=opts.deployment, agent=opts.agent[:64]))
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    deadline = time.monotonic() + opts.wait_s
    next_send, interval, last_no = 0.0, 0.25, ""
    heard = False
    try:
        while (now := time.monotonic()) < deadline:
            if now >= next_send:
                try:
                    sock.sendto(join, dp_addr)
                except OSError as exc:
                    return ClientResultInfo(EXIT_NO_SESSION, f"cannot reach DP {opts.dp[0]}:{opts.dp[1]}: {exc}")
                next_send = now + interval
                interval = min(2.0, interval * 2)
            if not sel.select(max(0.0, min(next_send, deadline) - now)):
                continue
            try:
                data, addr = sock.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:  # e.g. ICMP port unreachable surfacing on Windows/Linux
                continue
            if addr[:2] != dp_addr[:2]:
                continue
            try:
                msg = codec.decode(data, allowed=(Offer, NoSession))
            except MessageError:
                continue
            heard = True
            if isinstance(msg, Offer):
                return msg
            last_no = msg.reason
            if msg.retry_after_ms == 0:
                return ClientResultInfo(EXIT_NO_SESSION, f"no session: {msg.reason}")
            next_send = min(deadline, now + msg.retry_after_ms / 1000.0)
    finally:
        sel.close()
    if heard:
        return ClientResultInfo(EXIT_NO_SESSION, f"no session after waiting {opts.wait_s:g} s: {last_no}")
    return ClientResultInfo(EXIT_NO_SESSION, f"DP {opts.dp[0]}:{opts.dp[1]} did not answer within "
                            f"{opts.wait_s:g} s (is mcdeploy-dp or `mcdeploy send` running there?)")


def discover(group: str, port: int, interface: str | None = None, wait: float = 30.0,
             deployment: str | None = None) -> Discovery | None:
    """Wait up to ``wait`` seconds for an ANNOUNCE on ``group:port``; None if none came.

    Every other packet on the group (data, heartbeats, garbage) is skipped; an announce that
    fails to parse or decode (only ``Announce`` is accepted) is ignored, so a stray sender cannot
    crash us, only fail to be found.  An empty ``control_host`` means the packet's source address
    (kept with its IPv6 scope).  ``deployment``: skip announces of other deployments.  Raises
    OSError/ValueError if the group cannot be joined on ``interface``.
    """
    sock = open_data_socket(group, port, interface)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    deadline = time.monotonic() + max(0.0, wait)
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(min(left, 0.5)):
                continue
            for _ in range(1024):  # bounded per wake-up: a busy group cannot starve the deadline check
                try:
                    data, addr = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                try:
                    kind, session, _, _, plen = packets.parse_header(data)
                    if kind != packets.KIND_ANNOUNCE:
                        continue
                    body = data[packets.HEADER_SIZE:packets.HEADER_SIZE + plen]
                    msg: Announce = codec.decode(body, allowed=(Announce,))
                except (PacketError, MessageError):
                    continue
                if msg.session_id != session or (deployment and msg.deployment != deployment):
                    continue
                source = host_of(addr)
                return Discovery((msg.control_host or source, msg.control_port), msg, source)
    finally:
        sel.close()
        sock.close()
    return None


def receive(opts: ClientOptions, progress: Progress | None = None) -> ClientResultInfo:
    """The whole client job; never raises for network or disk trouble, returns an exit code."""
    if opts.dp is None:
        found = _discover(opts)
        if isinstance(found, ClientResultInfo):
            return found
        opts = found
    assert opts.dp is not None
    try:
        ctrl, dp_addr = open_control_socket(opts.dp)
    except OSError as exc:
        return ClientResultInfo(EXIT_USAGE, f"cannot resolve DP {opts.dp[0]}: {exc}")
    try:
        offer = join_session(opts, ctrl, dp_addr)
        if isinstance(offer, ClientResultInfo):
            return offer
        return _run(opts, offer, ctrl, dp_addr, progress)
    finally:
        ctrl.close()


def _discover(opts: ClientOptions) -> ClientOptions | ClientResultInfo:
    """Find the DP by announce; the options to join it with (the rest of ``--wait`` left for joining)."""
    if opts.discover is None:
        return ClientResultInfo(EXIT_USAGE, "neither a DP address nor a group to discover one on")
    group, port = opts.discover
    where = format_hostport(group, port) + (f" via {opts.interface}" if opts.interface else "")
    started = time.monotonic()
    try:
        found = discover(group, port, opts.interface, opts.wait_s, opts.deployment)
    except ValueError as exc:
        return ClientResultInfo(EXIT_USAGE, f"cannot listen on {where}: {exc}")
    except OSError as exc:
        return ClientResultInfo(EXIT_NO_SESSION, f"cannot listen on {where}: {exc.strerror or exc}")
    if found is None:
        return ClientResultInfo(EXIT_NO_SESSION, f"no session announced on {where} within {opts.wait_s:g} s "
                                "(is `mcdeploy send` running for this group and port?)")
    left = max(2.0, opts.wait_s - (time.monotonic() - started))
    return dataclasses.replace(opts, dp=found.dp, deployment=opts.deployment or found.announce.deployment,
                               wait_s=left)


def _run(opts: ClientOptions, offer: Offer, ctrl, dp_addr, progress: Progress | None  # type: ignore[no-untyped-def]
         ) -> ClientResultInfo:
    impair = opts.impairment()
    started = first_data = time.monotonic()
    got_data = False
    info = ClientResultInfo(EXIT_TRANSFER_FAILED, "", image_bytes=offer.image_size, deployment=offer.deployment)
    assert opts.dp is not None
    interface = opts.interface or interface_towards(opts.dp[0])
    try:
        data = open_data_socket(offer.group, offer.port, interface)
    except (OSError, ValueError) as exc:
        info.reason = (f"cannot join group {format_hostport(offer.group, offer.port)} via {interface}: "
                       f"{getattr(exc, 'strerror', None) or exc}")
        _report_failure(opts, offer, ctrl, dp_addr, info.reason)
        return info
    try:
        output = FileOutput(opts.out, offer.image_size)
    except OutputError as exc:
        data.close()
        info.exit_code, info.reason = EXIT_OUTPUT_FAILED, str(exc)
        _report_failure(opts, offer, ctrl, dp_addr, info.reason)
        return info
    receiver = Receiver(offer, opts.client_id, started, idle_timeout=opts.idle_timeout_s)
    sel = selectors.DefaultSelector()
    sel.register(data, selectors.EVENT_READ, "data")
    sel.register(ctrl, selectors.EVENT_READ, "ctrl")
    bufsize = offer.symbol_size + 256
    next_progress = 0.0
    verifier: Verifier | None = None
    try:
        while not receiver.done:
            now = time.monotonic()
            timeout = max(0.0, min(receiver.get_timer(), now + 0.25) - now)
            for key, _ in sel.select(timeout):
                if key.data == "data":
                    for _ in range(512):
                        try:
                            pkt = data.recv(bufsize)
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:
                            break
                        info.packets += 1
                        for arrived in (impair.feed(pkt, now) if impair is not None else (pkt,)):
                            try:
                                w = receiver.receive_datagram(arrived, now)
                            except PacketError:
                                info.rejected += 1
                                continue
                            if w is not None:
                                if not got_data:
                                    got_data, first_data = True, now
                                output.write_at(w[0], w[1])
                else:
                    _read_control(ctrl, dp_addr, receiver, now)
            now = time.monotonic()
            receiver.handle_timer(now)
            while (ev := receiver.next_event()) is not None:
                if isinstance(ev, TransferComplete):
                    # Verify in a thread (hashlib releases the GIL): the loop keeps sending
                    # keepalives, so a long verification of a large image is not taken for a dead client.
                    verifier = Verifier(output)
                elif isinstance(ev, Acknowledged):
                    info.acknowledged = True
                    if ev.outcome == "done" and info.verified:
                        info.exit_code, info.reason = EXIT_OK, "verified and acknowledged"
                    elif info.exit_code == EXIT_TRANSFER_FAILED and info.verified:
                        info.reason = f"DP recorded failure: {ev.reason}"
                    else:
                        info.reason = info.reason or receiver.reason or ev.reason
                elif isinstance(ev, GaveUp):
                    if info.verified:
                        info.exit_code = EXIT_NOT_ACKED
                    info.reason = ev.reason
                elif isinstance(ev, Moved):
                    # A slower tier of the same session: keep every block, listen to its group instead.
                    sel.unregister(data)
                    data.close()
                    data = open_data_socket(ev.group, ev.port, interface)
                    sel.register(data, selectors.EVENT_READ, "data")
                    info.moves += 1
            if verifier is not None and verifier.finished:
                if verifier.error is not None:
                    raise verifier.error
                info.sha256, verifier = verifier.digest, None
                if info.sha256 == offer.image_sha256:
                    info.verified = True
                    receiver.verified(info.sha256, offer.image_size, time.monotonic() - started, now)
                else:
                    info.exit_code = EXIT_VERIFY_FAILED
                    receiver.fail("SHA-256 of the written image does not match the offer", now)
            for msg in receiver.datagrams_to_send(now):
                with contextlib.suppress(OSError):
                    ctrl.sendto(codec.encode(msg), dp_addr)
            if progress is not None and now >= next_progress:
                next_progress = now + 0.5
                progress(receiver.blocks_done, receiver.blocks)
    except OutputError as exc:
        info.exit_code, info.reason = EXIT_OUTPUT_FAILED, str(exc)
        _report_failure(opts, offer, ctrl, dp_addr, info.reason)
    finally:
        sel.close()
        data.close()
        output.close()
    if info.exit_code == EXIT_VERIFY_FAILED:
        info.reason = "SHA-256 of the written image does not match the offer"
    info.seconds = time.monotonic() - started
    info.transfer_seconds = time.monotonic() - first_data if got_data else 0.0
    info.test_dropped = impair.dropped if impair is not None else 0
    info.duplicates = receiver.duplicates
    if progress is not None:
        progress(receiver.blocks_done, receiver.blocks)
    return info


class Verifier:
    """fsync + re-read + SHA-256 of the output, off the receive loop."""

    def __init__(self, output: FileOutput) -> None:
        self.output = output
        self.digest = ""
        self.error: OutputError | None = None
        self._thread = threading.Thread(target=self._run, name="verify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.output.finish()
            self.digest = self.output.sha256()
        except OutputError as exc:
            self.error = exc

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()


def _read_control(ctrl, dp_addr, receiver: Receiver, now: float) -> None:  # type: ignore[no-untyped-def]
    for _ in range(64):
        try:
            data, addr = ctrl.recvfrom(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if addr[:2] != dp_addr[:2]:
            continue
        try:
            # Any session-plane message: the receiver acts on those it knows (Ack, and Drop where the
            # protocol has it) and counts the rest as rejected.
            msg = codec.decode(data)
        except MessageError:
            continue
        receiver.handle_message(msg, now)


def _report_failure(opts: ClientOptions, offer: Offer, ctrl, dp_addr, reason: str) -> None:  # type: ignore[no-untyped-def]
    """Best effort: tell the DP why we stop (a few tries, bounded), so the site sees the reason."""
    receiver = Receiver(offer, opts.client_id, time.monotonic(), report_timeout=5.0)
    receiver.fail(reason, time.monotonic())
    end = time.monotonic() + 5.0
    while not receiver.done and time.monotonic() < end:
        now = time.monotonic()
        for msg in receiver.datagrams_to_send(now):
            try:
                ctrl.sendto(codec.encode(msg), dp_addr)
            except OSError:
                return
        _read_control(ctrl, dp_addr, receiver, now)
        receiver.handle_timer(now)
        time.sleep(0.05)
