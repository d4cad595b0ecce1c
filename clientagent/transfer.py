"""The client's adapter: join a session, receive into an output, verify, report, wait for the ack.

Portable (selectors + sockets).  The sans-I/O :class:`mcproto.receiver.Receiver`
decides what to ask for and when; this module moves datagrams, writes bytes
and reads the clock.  Success is claimed only after the output was fsynced,
re-read and found to match the offer's SHA-256, and the DP acknowledged it.

Outputs (:mod:`clientagent.output`): a file (zero blocks left as holes), a block
device, or stdout (``--out -``, in order through a bounded spool, hashed as it is
written).  Resume (:mod:`clientagent.journal`): blocks are committed to a journal
beside the output once fsynced; a run with the same ``--out`` after a crash hands
them to the receiver as already done, so only the missing blocks are received.

The DP is found either by its address (``--dp``) or, for a receiver that knows
only a multicast group (``mcdeploy receive``, ``mcdeploy-client --discover``),
by :func:`discover`: the sender repeats an ``Announce`` on the group naming its
control port.  From there on both paths are the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import selectors
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from clientagent import integrity, unicast
from clientagent import journal as journal_mod
from clientagent.impair import Impairment
from clientagent.journal import Committer, Journal, JournalError
from clientagent.net import format_hostport, host_of, interface_towards, open_control_socket, open_data_socket
from clientagent.output import SPOOL_MEMORY, FileOutput, OutputError, PipeOutput, classify
from clientagent.udpio import BatchReceiver
from mcproto import codec, keyexchange, packets, seal
from mcproto.errors import ForeignPacket, MessageError, PacketError
from mcproto.events import Acknowledged, GaveUp, Moved, TransferComplete
from mcproto.fec import FEC_RS16, offer_layout, rs16_available
from mcproto.manifest import Manifest, ManifestError
from mcproto.messages import Ack, Announce, Done, Failed, Join, NoSession, Offer, Status
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
    mac: str | None = None  # this machine's identity in the Join (see clientagent.identity)
    smbios_uuid: str | None = None
    shared_key: bytes | None = None  # standalone: packets sealed under keys derived from it
    dp_key: str | None = None  # pinned fingerprint of the DP's identity (SHA-256 of its public key, hex)
    controller_key: str | None = None  # pinned controller public key (64 hex): the manifest must be signed by it
    # Outputs and resume (see clientagent.output and clientagent.journal).
    journal: str | None = None  # journal file, or a directory for it; None: beside a regular-file output
    resume: bool = True  # keep a journal and resume from a matching one; False: always start fresh
    sparse: bool = True  # leave all-zero blocks of a regular-file output as holes
    spool_memory: int = SPOOL_MEMORY  # --out -: bytes of out-of-order blocks held in memory before spooling
    spool_dir: str | None = None  # --out -: where the spool file goes (default: the temp directory)
    commit_interval_s: float = 0.1  # a written block is committed to the journal within about this long
    # Unicast fallback (see clientagent.unicast): fetch over HTTP from the start (``unicast``), or once
    # nothing arrived on the group for ``unicast_after_s`` (only when the deployment allows fallback).
    unicast: bool = False
    unicast_after_s: float = 10.0

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
    rejected: int = 0  # failed authentication or malformed: forged or damaged
    foreign: int = 0  # well-formed packets of another session sharing the group and port
    test_dropped: int = 0
    moves: int = 0
    encrypted: bool = False
    manifest: str = "none"  # "signed" (checked against the pinned controller key), "unverified", "none"
    rejected_chunks: int = 0  # chunks that failed the manifest and were received again
    deployment: str = ""
    extra: dict = field(default_factory=dict)


Progress = Callable[[int, int], None]
Notice = Callable[[str], None]


def join_session(opts: ClientOptions, sock, dp_addr,  # type: ignore[no-untyped-def]
                 client_key: str | None = None, notice: Notice | None = None) -> Offer | ClientResultInfo:
    """Ask the DP for a session until offered one, told "nothing for you", or ``wait_s`` passes.

    A "wait" (``NoSession`` with a retry) is told to ``notice`` once per change of its reason or
    expected start ("waiting: <reason>, expected start <time>"), not per retry.
    """
    assert opts.dp is not None
    join = codec.encode(Join(client_id=opts.client_id, deployment=opts.deployment, agent=opts.agent[:64],
                             client_key=client_key, mac=opts.mac, smbios_uuid=opts.smbios_uuid))
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    deadline = time.monotonic() + opts.wait_s
    next_send, interval, last_no = 0.0, 0.25, ""
    heard = False
    told: tuple[str, float | None] | None = None
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
                return ClientResultInfo(EXIT_NO_SESSION, f"nothing for you: {msg.reason}")
            if msg.expected_start is not None:
                last_no += f" (expected start {_clock(msg.expected_start)})"
            if notice is not None and told != (msg.reason, msg.expected_start):
                told = (msg.reason, msg.expected_start)
                notice(f"waiting: {msg.reason}" + (f", expected start {_clock(msg.expected_start)}"
                                                   if msg.expected_start is not None else ""))
            next_send = min(deadline, now + msg.retry_after_ms / 1000.0)
    finally:
        sel.close()
    if heard:
        return ClientResultInfo(EXIT_NO_SESSION, f"no session after waiting {opts.wait_s:g} s: {last_no}")
    return ClientResultInfo(EXIT_NO_SESSION, f"DP {opts.dp[0]}:{opts.dp[1]} did not answer within "
                            f"{opts.wait_s:g} s (is mcdeploy-dp or `mcdeploy send` running there?)")


def _clock(unix: float) -> str:
    """A wall-clock time for people: local time, with the date when it is not today, and the offset from now."""
    t = time.localtime(unix)
    left = unix - time.time()
    when = time.strftime("%H:%M:%S" if t[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M:%S", t)
    return f"{when} (in {max(0, round(left))} s)"


def discover(group: str, port: int, interface: str | None = None, wait: float = 30.0,
             deployment: str | None = None, shared_key: bytes | None = None) -> Discovery | None:
    """Wait up to ``wait`` seconds for an ANNOUNCE on ``group:port``; None if none came.

    Every other packet on the group (data, heartbeats, garbage) is skipped; an announce that
    fails to parse or decode (only ``Announce`` is accepted) is ignored, so a stray sender cannot
    crash us, only fail to be found.  An empty ``control_host`` means the packet's source address
    (kept with its IPv6 scope).  ``deployment``: skip announces of other deployments.  With a
    ``shared_key`` only sealed announces that authenticate under that session's derived key count.
    Raises OSError/ValueError if the group cannot be joined on ``interface``.
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
                    if shared_key is not None:
                        session = seal.HEADER.unpack_from(data)[6] if len(data) >= seal.HEADER_SIZE else 0
                        opener = seal.PacketOpener(seal.session_key(shared_key, session), session)
                        kind, _, _, body = opener.open(data)
                    else:
                        kind, session, _, _, plen = packets.parse_header(data)
                        body = data[packets.HEADER_SIZE:packets.HEADER_SIZE + plen]
                    if kind != packets.KIND_ANNOUNCE:
                        continue
                    msg: Announce = codec.decode(body, allowed=(Announce,))
                except (PacketError, MessageError, struct.error):
                    continue
                if msg.session_id != session or (deployment and msg.deployment != deployment):
                    continue
                source = host_of(addr)
                return Discovery((msg.control_host or source, msg.control_port), msg, source)
    finally:
        sel.close()
        sock.close()
    return None


def receive(opts: ClientOptions, progress: Progress | None = None, notice: Notice | None = None
            ) -> ClientResultInfo:
    """The whole client job; never raises for network or disk trouble, returns an exit code.

    ``notice`` gets one-line remarks worth telling the user (resuming, starting fresh and why,
    an unknown device size); ``progress`` (blocks done, blocks) twice a second.
    """
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
    say = notice or _silent
    # A fresh X25519 key per receive: the DP wraps the session key to it (see mcproto.keyexchange).
    client_secret = X25519PrivateKey.generate()
    client_key = keyexchange.raw_public(client_secret.public_key()).hex()
    try:
        offer = join_session(opts, ctrl, dp_addr, client_key, say)
        if isinstance(offer, ClientResultInfo):
            return offer
        session_key: bytes | None = None
        if offer.encrypted:
            try:
                keyexchange.check_offer(offer, opts.dp_key)
                if offer.eph_key is None or offer.key_box is None:
                    raise keyexchange.KeyExchangeError("the encrypted offer carries no key")
                session_key = keyexchange.unwrap(client_secret, offer.eph_key, offer.key_box, offer.session_id,
                                                 opts.client_id)
            except keyexchange.KeyExchangeError as exc:
                return _refuse(opts, offer, ctrl, dp_addr, str(exc))
            if not opts.dp_key:
                say("the DP's identity is not pinned (--dp-key): trusting whoever signed this offer")
        elif opts.dp_key:
            return _refuse(opts, offer, ctrl, dp_addr, "--dp-key was given but the session is not encrypted "
                           "and signed")
        if offer.fec == FEC_RS16 and not rs16_available():
            return _refuse(opts, offer, ctrl, dp_addr, "the session uses fec rs16, which this client cannot decode "
                           "(reed-solomon-leopard has no wheel for this Python; use Python 3.11/3.12, or have the DP "
                           "use fec rs)")
        try:
            blob = (integrity.fetch(ctrl, dp_addr, offer, opts.client_id, min(opts.wait_s, 60.0))
                    if offer.manifest_bytes else None)
            trust = integrity.settle(offer, blob, opts.controller_key)
        except (integrity.IntegrityError, ManifestError) as exc:
            return _refuse(opts, offer, ctrl, dp_addr, str(exc))
        if trust.status == "unverified":
            say("the image manifest is not verified (no --controller-key pinned): chunks are checked against "
                "what the DP serves")
        return _run(opts, offer, ctrl, dp_addr, progress, say, session_key, trust)
    finally:
        ctrl.close()


def _refuse(opts: ClientOptions, offer: Offer, ctrl, dp_addr, why: str  # type: ignore[no-untyped-def]
            ) -> ClientResultInfo:
    """Refuse an offer: tell the DP why (so the site's record says it), and stop."""
    reason = f"refused the DP's offer: {why}"
    _report_failure(opts, offer, ctrl, dp_addr, reason, refused=True)
    return ClientResultInfo(EXIT_NO_SESSION, reason, deployment=offer.deployment)


def _discover(opts: ClientOptions) -> ClientOptions | ClientResultInfo:
    """Find the DP by announce; the options to join it with (the rest of ``--wait`` left for joining)."""
    if opts.discover is None:
        return ClientResultInfo(EXIT_USAGE, "neither a DP address nor a group to discover one on")
    group, port = opts.discover
    where = format_hostport(group, port) + (f" via {opts.interface}" if opts.interface else "")
    started = time.monotonic()
    try:
        found = discover(group, port, opts.interface, opts.wait_s, opts.deployment, opts.shared_key)
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


def _silent(_: str) -> None:
    pass


@dataclass
class _Opened:
    """An output ready to be written, with its journal (None: no resume) and the blocks it already holds."""

    output: FileOutput | PipeOutput
    journal: Journal | None = None
    done: set[int] = field(default_factory=set)


def _open_output(opts: ClientOptions, offer: Offer, say: Notice, manifest: Manifest | None = None) -> _Opened:
    """Open ``opts.out`` and its journal; resume from the journal if it matches this image and output.

    Order matters for power loss: a fresh journal is durable before the output is truncated, so
    a journal never outlives the data it describes.  Raises :class:`OutputError`.
    """
    layout = offer_layout(offer)
    if classify(opts.out) == "stdout":
        out = PipeOutput(offer.image_size, layout.block_bytes, memory_limit=opts.spool_memory,
                         spool_dir=opts.spool_dir, manifest=manifest)
        if opts.resume:
            say("resume does not apply to --out -: a pipe cannot be rewound, so a restart receives the whole "
                "image again")
        return _Opened(out)
    output = FileOutput(opts.out, offer.image_size, fresh=None, sparse=opts.sparse)
    try:
        for note in output.notes:
            say(note)
        if not opts.resume:
            output.prepare(fresh=True)
            return _Opened(output)
        if output.device and opts.journal is None:
            say(f"resume is off for {opts.out}: a device's journal needs --journal FILE|DIR on a disk that "
                "survives a reboot")
            return _Opened(output)
        path = journal_mod.default_path(opts.out, opts.journal)
        ident = journal_mod.identity(offer.image_sha256, offer.image_size, offer.symbol_size, offer.block_symbols,
                                     opts.out, output.found_size if output.device else offer.image_size,
                                     manifest.chunk_size if manifest is not None else 0)
        try:
            found = journal_mod.read(path)
            why = _unusable(found, ident, output, offer.image_size)
            done = set() if why else {b for b in found.blocks if 0 <= b < layout.blocks}
            if done:
                journal = Journal.reopen(path, found)
                output.prepare(fresh=False)
                torn = f" (ignored a torn tail of {found.torn_bytes} bytes)" if found.torn_bytes else ""
                say(f"resuming from journal {path}: {len(done)} of {layout.blocks} blocks already on disk{torn}")
                return _Opened(output, journal, done)
            if why and why != "no journal":
                say(f"journal {path} not used ({why}): starting fresh")
            journal = Journal.create(path, ident)
        except JournalError as exc:
            say(f"resume is off: {exc}")
            output.prepare(fresh=True)
            return _Opened(output)
        output.prepare(fresh=True)
        return _Opened(output, journal)
    except OutputError:
        output.close()
        raise


def _unusable(found: journal_mod.Contents, ident: dict, output: FileOutput, size: int) -> str:
    """Why a journal read as ``found`` cannot be resumed from for this image and output ("" if it can)."""
    if found.identity is None:
        return found.problem
    differ = sorted(k for k in set(ident) | set(found.identity) if ident.get(k) != found.identity.get(k))
    if differ:
        return "it is for another image or output: " + ", ".join(differ) + " differ"
    if not output.existed:
        return f"{output.path} no longer exists"
    if not output.device and output.found_size != size:
        return f"{output.path} is {output.found_size} bytes, not {size}"
    return ""


def _run(opts: ClientOptions, offer: Offer, ctrl, dp_addr, progress: Progress | None,  # type: ignore[no-untyped-def]
         say: Notice, session_key: bytes | None = None, trust: integrity.Trust | None = None) -> ClientResultInfo:
    impair = opts.impairment()
    started = first_data = time.monotonic()
    got_data = False
    info = ClientResultInfo(EXIT_TRANSFER_FAILED, "", image_bytes=offer.image_size, deployment=offer.deployment)
    assert opts.dp is not None
    interface = opts.interface or interface_towards(opts.dp[0])
    fallback = ""  # why the rest comes by unicast (HTTP), once set
    data = None
    if opts.unicast:
        if not offer.http_url:
            info.reason = ("--unicast: this deployment does not allow unicast fallback (its offer names no HTTP "
                           "server)")
            _report_failure(opts, offer, ctrl, dp_addr, info.reason)
            return info
        fallback = "--unicast"
    else:
        try:
            data = open_data_socket(offer.group, offer.port, interface)
        except (OSError, ValueError) as exc:
            info.reason = (f"cannot join group {format_hostport(offer.group, offer.port)} via {interface}: "
                           f"{getattr(exc, 'strerror', None) or exc}")
            if not offer.http_url:
                _report_failure(opts, offer, ctrl, dp_addr, info.reason)
                return info
            fallback, info.reason = info.reason, ""
    trust = trust or integrity.Trust(None, "none")
    info.manifest = trust.status
    try:
        opened = _open_output(opts, offer, say, trust.manifest)
    except OutputError as exc:
        if data is not None:
            data.close()
        info.exit_code, info.reason = EXIT_OUTPUT_FAILED, str(exc)
        _report_failure(opts, offer, ctrl, dp_addr, info.reason)
        return info
    output, journal = opened.output, opened.journal
    committer = Committer(output, journal, interval=opts.commit_interval_s) if journal is not None else None
    key = session_key or (seal.session_key(opts.shared_key, offer.session_id) if opts.shared_key else None)
    info.encrypted = key is not None
    receiver = Receiver(offer, opts.client_id, started, idle_timeout=opts.idle_timeout_s, done_blocks=opened.done,
                        key=key)
    block_bytes = receiver.layout.block_bytes
    writer = integrity.CheckedWriter(output, committer, trust.manifest, block_bytes, receiver.blocks, opened.done)
    received = 0  # blocks completed by this run (a resumed run: only those the journal did not have)
    have = set(opened.done)  # blocks written (committed, or waiting for their chunk's check)
    committing = committer is not None  # until the transfer is complete; then the verifier commits the rest
    sel = selectors.DefaultSelector()
    if data is not None:
        sel.register(data, selectors.EVENT_READ, "data")
    sel.register(ctrl, selectors.EVENT_READ, "ctrl")
    bufsize = offer.symbol_size + 256
    rx_batch = BatchReceiver(data, bufsize) if data is not None else None  # UDP GRO where the kernel has it
    info.extra["udp_receive"] = rx_batch.mode if rx_batch is not None else ""
    next_progress = 0.0
    last_packet = time.monotonic()
    verifier: Verifier | None = None
    try:
        while not receiver.done and not fallback:
            now = time.monotonic()
            if (offer.http_url and now - last_packet > opts.unicast_after_s
                    and receiver.blocks_done < receiver.blocks and verifier is None):
                fallback = f"nothing arrived on the multicast group for {opts.unicast_after_s:g} s"
                break
            timeout = max(0.0, min(receiver.get_timer(), now + 0.25) - now)
            for key, _ in sel.select(timeout):
                if key.data == "data":
                    assert rx_batch is not None
                    for pkt in rx_batch.receive():
                        info.packets += 1
                        last_packet = now
                        for arrived in (impair.feed(bytes(pkt), now) if impair is not None else (pkt,)):
                            try:
                                w = receiver.receive_datagram(arrived, now)
                            except ForeignPacket:
                                info.foreign += 1  # another session on this group and port
                                continue
                            except PacketError:
                                info.rejected += 1
                                continue
                            if w is not None:
                                if not got_data:
                                    got_data, first_data = True, now
                                received += 1
                                have.add(w[0] // block_bytes)
                                again = writer.write(w[0], w[1], now)
                                if again:  # a chunk failed the manifest: receive its blocks again
                                    receiver.forget(again, now)
                                    received -= len(again)
                                    have.difference_update(again)
                else:
                    _read_control(ctrl, dp_addr, receiver, now)
            now = time.monotonic()
            receiver.handle_timer(now)
            while (ev := receiver.next_event()) is not None:
                if isinstance(ev, TransferComplete):
                    # Verify in a thread (hashlib releases the GIL): the loop keeps sending
                    # keepalives, so a long verification of a large image is not taken for a dead client.
                    committing = False
                    verifier = Verifier(output, committer.close if committer is not None else None)
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
                    assert data is not None
                    sel.unregister(data)
                    data.close()
                    data = open_data_socket(ev.group, ev.port, interface)
                    rx_batch = BatchReceiver(data, bufsize)
                    sel.register(data, selectors.EVENT_READ, "data")
                    info.moves += 1
            if committing:
                assert committer is not None
                committer.poll(now)
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
        if (not fallback and receiver.unicast_allowed and offer.http_url and not info.verified
                and info.exit_code == EXIT_TRANSFER_FAILED):
            fallback = info.reason or "dropped by the DP"  # dropped from the multicast, unicast allowed
        if fallback and not info.verified:
            if data is not None:
                sel.unregister(data)
                data.close()
                data = None
            if verifier is not None:  # dropped while verifying: let that end first
                verifier.join(300.0)
                verifier = None
            _unicast(opts, offer, ctrl, dp_addr, info, fallback, say, progress, writer, committer, output,
                     have, received, session_key)
        elif not info.extra.get("path") and info.verified:
            info.extra["path"] = "multicast"
    except OutputError as exc:
        info.exit_code, info.reason = EXIT_OUTPUT_FAILED, str(exc)
        _report_failure(opts, offer, ctrl, dp_addr, info.reason)
    except integrity.IntegrityError as exc:
        info.exit_code, info.reason = EXIT_VERIFY_FAILED, str(exc)
        _report_failure(opts, offer, ctrl, dp_addr, info.reason)
    finally:
        sel.close()
        if data is not None:
            data.close()
        if verifier is not None:
            verifier.join(300.0)  # the loop ended while verifying (e.g. dropped): let it stop using the output
        if committer is not None:
            with contextlib.suppress(OutputError):
                committer.close()  # what was written is committed, for a restart to resume from
        output.close()
        if journal is not None:
            _settle_journal(journal, committer, info.exit_code, receiver.blocks, say)
    if info.exit_code == EXIT_VERIFY_FAILED and not info.reason:
        info.reason = "SHA-256 of the written image does not match the offer"
    info.rejected_chunks = writer.rejected_chunks
    info.extra.update({
        "output": output.kind, "blocks": receiver.blocks, "blocks_received": received,
        "resumed_blocks": len(opened.done), "journal": journal.path if journal is not None else "",
        "checked_chunks": writer.checked_chunks,
        "journal_commits": committer.commits if committer is not None else 0,
        "journal_blocks": committer.committed if committer is not None else 0,
        **output.stats(),
    })
    if committer is not None and committer.journal_error:
        info.extra["journal_error"] = committer.journal_error
    info.seconds = time.monotonic() - started
    info.transfer_seconds = time.monotonic() - first_data if got_data else 0.0
    info.test_dropped = impair.dropped if impair is not None else 0
    info.duplicates = receiver.duplicates
    if progress is not None:
        progress(receiver.blocks_done, receiver.blocks)
    return info


def _unicast(opts: ClientOptions, offer: Offer, ctrl, dp_addr, info: ClientResultInfo,  # type: ignore[no-untyped-def]
             why: str, say: Notice, progress: Progress | None, writer: integrity.CheckedWriter,
             committer: Committer | None, output: FileOutput | PipeOutput, have: set[int], received: int,
             session_key: bytes | None) -> None:
    """The unicast fallback: fetch the blocks not in ``have`` over HTTP, check, verify, report ``Done``.

    Every block goes through ``writer`` (manifest chunk checks before commit, as for multicast data);
    a chunk that fails is fetched again (``writer`` fails the receive on a third failure of one chunk).
    Sets ``info``'s verdict; raises OutputError / IntegrityError like the multicast path.
    """
    layout = offer_layout(offer)
    block_bytes, blocks = layout.block_bytes, layout.blocks
    missing = [b for b in range(blocks) if b not in have]
    lacked = sum(min(offer.image_size, (b + 1) * block_bytes) - b * block_bytes for b in missing)
    info.exit_code, info.reason = EXIT_TRANSFER_FAILED, ""
    info.extra.update({"unicast_reason": why, "lacked_blocks": len(missing), "lacked_bytes": lacked})
    say(f"unicast fallback ({why}): fetching {len(missing)} of {blocks} blocks ({lacked} bytes) from "
        f"{offer.http_url}")
    fetcher = unicast.Fetcher(offer.http_url, offer.session_id, opts.client_id, offer.http_token,
                              session_key if offer.encrypted else None, timeout=max(5.0, opts.idle_timeout_s))
    started = time.monotonic()
    next_status = 0.0

    def keepalive() -> None:
        nonlocal next_status
        now = time.monotonic()
        if committer is not None:
            committer.poll(now)
        if now >= next_status:
            next_status = now + 1.0
            with contextlib.suppress(OSError):
                ctrl.sendto(codec.encode(Status(session_id=offer.session_id, client_id=opts.client_id,
                                                blocks_done=min(len(have), blocks))), dp_addr)
            if progress is not None:
                progress(len(have), blocks)

    def sink(offset: int, data: bytes) -> None:
        b = offset // block_bytes
        have.add(b)
        again = writer.write(offset, data, time.monotonic())
        have.difference_update(again)

    try:
        for _ in range(integrity.MAX_CHUNK_FAILURES + 1):
            todo = [b for b in range(blocks) if b not in have]
            if not todo:
                break
            for start, end in unicast.runs(todo, block_bytes, offer.image_size):
                fetcher.fetch(start, end, block_bytes, sink, keepalive)
    except unicast.UnicastError as exc:
        info.reason = f"unicast fallback failed: {exc}"
        _report_failure(opts, offer, ctrl, dp_addr, info.reason)
        return
    finally:
        fetcher.close()
    st = fetcher.stats
    seconds = time.monotonic() - started
    path = "mixed" if received and st.blocks else "unicast" if st.blocks else "multicast"
    info.extra.update({"path": path, "unicast_bytes": st.bytes, "unicast_blocks": st.blocks,
                       "unicast_requests": st.requests, "unicast_seconds": round(seconds, 3),
                       "unicast_mb_per_s": round(st.bytes / seconds / 1e6, 1) if seconds > 0 else 0.0})
    verifier = Verifier(output, committer.close if committer is not None else None)
    while not verifier.finished:
        verifier.join(0.5)
        keepalive()
    if verifier.error is not None:
        raise verifier.error
    info.sha256 = verifier.digest
    if info.sha256 != offer.image_sha256:
        info.exit_code, info.reason = EXIT_VERIFY_FAILED, "SHA-256 of the written image does not match the offer"
        _report_failure(opts, offer, ctrl, dp_addr, info.reason)
        return
    info.verified = True
    done = Done(session_id=offer.session_id, client_id=opts.client_id, sha256=info.sha256, bytes=offer.image_size,
                seconds=round(time.monotonic() - started, 6), path=path)  # type: ignore[arg-type]
    ack = _report(ctrl, dp_addr, done, 30.0)
    if ack is None:
        info.exit_code, info.reason = EXIT_NOT_ACKED, "the DP did not acknowledge our result within 30 s"
        return
    info.acknowledged = True
    if ack.outcome == "done":
        info.exit_code, info.reason = EXIT_OK, f"verified and acknowledged (delivered by {path})"
    else:
        info.reason = f"DP recorded failure: {ack.reason}"


def _report(ctrl, dp_addr, msg: Done | Failed, timeout: float) -> Ack | None:  # type: ignore[no-untyped-def]
    """Send ``msg`` until the DP acknowledges it (backing off) or ``timeout`` passes."""
    sel = selectors.DefaultSelector()
    sel.register(ctrl, selectors.EVENT_READ)
    end = time.monotonic() + timeout
    next_send, backoff = 0.0, 0.2
    try:
        while (now := time.monotonic()) < end:
            if now >= next_send:
                with contextlib.suppress(OSError):
                    ctrl.sendto(codec.encode(msg), dp_addr)
                next_send, backoff = now + backoff, min(2.0, backoff * 2)
            if not sel.select(max(0.0, min(next_send, end) - now)):
                continue
            for _ in range(64):
                try:
                    data, addr = ctrl.recvfrom(4096)
                except OSError:
                    break
                if addr[:2] != dp_addr[:2]:
                    continue
                try:
                    ack = codec.decode(data, allowed=(Ack,))
                except MessageError:
                    continue
                if ack.session_id == msg.session_id and ack.client_id == msg.client_id:
                    return ack
    finally:
        sel.close()
    return None


def _settle_journal(journal: Journal, committer: Committer | None, exit_code: int, blocks: int,
                    say: Notice) -> None:
    """Success: the journal goes.  A failed verification: it goes too (its claims are void).  Else it stays."""
    if exit_code == EXIT_OK:
        journal.remove()
    elif exit_code == EXIT_VERIFY_FAILED:
        journal.remove()
        say(f"journal {journal.path} removed: the written image did not verify, so a restart starts fresh")
    else:
        journal.close()
        committed = committer.committed if committer is not None else len(journal.blocks)
        say(f"journal {journal.path} kept: run again with the same --out to resume "
            f"({committed} of {blocks} blocks committed)")


class Verifier:
    """Final journal commit, fsync + re-read + SHA-256 of the output (or the stream's digest), off the receive loop."""

    def __init__(self, output: FileOutput | PipeOutput, before: Callable[[], None] | None = None) -> None:
        self.output = output
        self._before = before
        self.digest = ""
        self.error: OutputError | None = None
        self._thread = threading.Thread(target=self._run, name="verify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._before is not None:
                self._before()
            self.output.finish()
            self.digest = self.output.sha256()
        except OutputError as exc:
            self.error = exc

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


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


def _report_failure(opts: ClientOptions, offer: Offer, ctrl, dp_addr, reason: str,  # type: ignore[no-untyped-def]
                    refused: bool = False) -> None:
    """Best effort: tell the DP why we stop (resent with backoff until acknowledged, at most ~5 s), so the
    site sees the reason.  Needs nothing of the offer but its session (it may be one we cannot decode)."""
    _report(ctrl, dp_addr, Failed(session_id=offer.session_id, client_id=opts.client_id, reason=reason[:500],
                                  refused=refused), 5.0)
