"""Resume journal: which blocks of an output are known to be on stable storage.

Portable: ``os``, ``struct``, ``zlib``, ``json`` and a thread; nothing Linux-only.

A receive that is killed, crashes or loses power can be run again with the same
``--out``: the client rejoins the deployment and tells the receiver which blocks
it already holds, so only the rest crosses the network.  The journal lives beside
the output (``OUT.mcdeploy-journal``) or where ``--journal`` says.

Durability rule (what makes the journal trustworthy after a power loss): a block
is recorded only after its data was handed to the OS *and the output was
fsynced*; the journal is fsynced after the records.  :class:`Committer` does this
in batches (every ``interval`` seconds or ``max_batch`` blocks, in a background
thread so a slow fsync does not stall the receive loop).  The journal can lag the
disk (blocks written since the last commit are received again after a crash),
never lead it.

Format (little-endian), append-only::

    header  b"MCDJRNL1" | u32 n | n bytes of JSON identity | u32 crc32(everything before)
    record  u32 first | u32 count | u32 crc32(first|count, seeded with the header's crc)

A record names the committed blocks ``first .. first+count-1``.  Reading stops at
the first record that is short or fails its checksum (an append torn by a power
loss, or zeros a file system left at the tail); that tail is cut off before
appending again.  Seeding the record checksum with the header's makes records of
an older journal left in the same place useless.  The identity (image SHA-256,
size, symbol size, block symbols, output path and size) must match for a resume;
otherwise the receive starts fresh and says why.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from clientagent.output import OutputError, fsync_dir

MAGIC = b"MCDJRNL1"
SUFFIX = ".mcdeploy-journal"
VERSION = 1
_LEN = struct.Struct("<I")
_RECORD = struct.Struct("<III")
_RANGE = struct.Struct("<II")
MAX_HEADER = 64 * 1024


class JournalError(Exception):
    """The journal cannot be written; the receive goes on without resume."""


def identity(image_sha256: str, image_size: int, symbol_size: int, block_symbols: int, output: str,
             output_size: int, chunk_size: int = 0) -> dict[str, Any]:
    """What a journal must match to be resumed from: the same image, layout and output.

    ``chunk_size``: the manifest's (0: no manifest).  A journal written without manifest
    checks holds blocks nobody checked, so a run with a manifest does not trust it.
    """
    return {"version": VERSION, "image_sha256": image_sha256, "image_size": image_size,
            "symbol_size": symbol_size, "block_symbols": block_symbols,
            "output": os.path.abspath(output), "output_size": output_size, "chunk_size": chunk_size}


def default_path(out: str, journal: str | None) -> str:
    """``journal`` as given (a directory gets ``<name of out>.mcdeploy-journal`` inside), else beside ``out``."""
    if journal is None:
        return out + SUFFIX
    if os.path.isdir(journal):
        name = os.path.basename(out.rstrip("/\\")) or "output"
        return os.path.join(journal, name + SUFFIX)
    return journal


def ranges(blocks: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted block numbers as (first, count) runs."""
    out: list[tuple[int, int]] = []
    for b in sorted(set(blocks)):
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


@dataclass
class Contents:
    """What a journal file says, as far as it can be trusted."""

    identity: dict[str, Any] | None = None
    blocks: set[int] = field(default_factory=set)
    valid_bytes: int = 0  # length of the trustworthy prefix (header + whole, valid records)
    torn_bytes: int = 0  # bytes after it (a torn or damaged tail), ignored
    problem: str = ""  # why nothing can be trusted (no journal, bad header)
    header_crc: int = 0


def read(path: str) -> Contents:
    """Parse the journal at ``path``; never raises for a missing or damaged file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return Contents(problem="no journal")
    except OSError as exc:
        return Contents(problem=f"cannot read journal {path}: {exc.strerror or exc}")
    c = Contents()
    if len(data) < len(MAGIC) + 2 * _LEN.size or data[:len(MAGIC)] != MAGIC:
        c.problem = "journal header is damaged or not a journal"
        return c
    (n,) = _LEN.unpack_from(data, len(MAGIC))
    end = len(MAGIC) + _LEN.size + n
    if n > MAX_HEADER or len(data) < end + _LEN.size:
        c.problem = "journal header is damaged (torn)"
        return c
    (crc,) = _LEN.unpack_from(data, end)
    if zlib.crc32(data[:end]) != crc:
        c.problem = "journal header fails its checksum"
        return c
    try:
        ident = json.loads(data[len(MAGIC) + _LEN.size:end])
    except ValueError:
        c.problem = "journal header is not valid JSON"
        return c
    if not isinstance(ident, dict):
        c.problem = "journal header is not an identity"
        return c
    c.identity, c.header_crc = ident, crc
    pos = end + _LEN.size
    while pos + _RECORD.size <= len(data):
        first, count, rcrc = _RECORD.unpack_from(data, pos)
        if count == 0 or zlib.crc32(_RANGE.pack(first, count), crc) != rcrc:
            break
        c.blocks.update(range(first, first + count))
        pos += _RECORD.size
    c.valid_bytes, c.torn_bytes = pos, len(data) - pos
    return c


class Journal:
    """An open journal, appended to by :class:`Committer`."""

    def __init__(self, path: str, fd: int, header_crc: int, blocks: set[int]) -> None:
        self.path = path
        self._fd = fd
        self._crc = header_crc
        self.blocks = blocks  # every block recorded (read back at open, plus appended since)
        self.records = 0

    @classmethod
    def create(cls, path: str, ident: dict[str, Any]) -> Journal:
        """A new, empty journal for ``ident`` (replacing any file there), durable before it returns."""
        body = json.dumps(ident, sort_keys=True).encode()
        head = MAGIC + _LEN.pack(len(body)) + body
        crc = zlib.crc32(head)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
        except OSError as exc:
            raise JournalError(f"cannot create journal {path}: {exc.strerror or exc}") from None
        try:
            _write_all(fd, head + _LEN.pack(crc))
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            raise JournalError(f"cannot write journal {path}: {exc.strerror or exc}") from None
        fsync_dir(path)
        return cls(path, fd, crc, set())

    @classmethod
    def reopen(cls, path: str, contents: Contents) -> Journal:
        """Append to a journal read as ``contents``, cutting off a torn tail first."""
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise JournalError(f"cannot open journal {path}: {exc.strerror or exc}") from None
        try:
            if contents.torn_bytes:
                os.ftruncate(fd, contents.valid_bytes)
                os.fsync(fd)
            os.lseek(fd, contents.valid_bytes, os.SEEK_SET)
        except OSError as exc:
            os.close(fd)
            raise JournalError(f"cannot repair journal {path}: {exc.strerror or exc}") from None
        return cls(path, fd, contents.header_crc, set(contents.blocks))

    def append(self, blocks: Iterable[int]) -> None:
        """Record ``blocks`` (not yet durable: :meth:`sync`).  Only for blocks whose data was fsynced."""
        new = [b for b in blocks if b not in self.blocks]
        if not new:
            return
        recs = b"".join(_RECORD.pack(first, count, zlib.crc32(_RANGE.pack(first, count), self._crc))
                        for first, count in ranges(new))
        try:
            _write_all(self._fd, recs)
        except OSError as exc:
            raise JournalError(f"cannot write journal {self.path}: {exc.strerror or exc}") from None
        self.blocks.update(new)
        self.records += len(recs) // _RECORD.size

    def sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise JournalError(f"cannot sync journal {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """The receive succeeded (or its claims are void): the journal goes."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        fsync_dir(self.path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, "no progress writing")
        view = view[n:]


class Syncable(Protocol):
    def flush(self) -> None: ...

    def sync(self) -> None: ...


class Committer:
    """Makes received blocks durable in order: data written, output fsynced, journal appended and fsynced.

    The receive loop calls :meth:`add` for a block after ``output.write_at`` and :meth:`poll`
    each turn; when a batch is due, ``poll`` pushes buffered output to the OS (``output.flush``,
    on the loop's thread: the output is not thread-safe) and hands the batch to a background
    thread, which fsyncs the output and only then appends and fsyncs the journal.  Blocks that
    complete meanwhile wait for the next batch (group commit: under load batches grow, fsyncs do
    not multiply).  :meth:`close` commits what is left, synchronously.

    An output fsync error is the receive's error (:class:`OutputError`, raised by ``poll``/``close``);
    a journal write error only ends resume for this run (``journal_error``).
    """

    def __init__(self, output: Syncable, journal: Journal, *, interval: float = 0.1, max_batch: int = 64) -> None:
        self.output = output
        self.journal = journal
        self.interval = interval
        self.max_batch = max_batch
        self.commits = 0
        self.journal_error = ""
        self.error: OutputError | None = None
        self._pending: list[int] = []
        self._since = 0.0
        self._batch: list[int] | None = None
        self._stop = False
        self._closed = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._worker, name="journal-commit", daemon=True)
        self._thread.start()

    @property
    def committed(self) -> int:
        return len(self.journal.blocks)

    def add(self, block: int, now: float) -> None:
        """``block``'s data was just given to ``output.write_at``."""
        if not self._pending:
            self._since = now
        self._pending.append(block)

    def poll(self, now: float) -> None:
        """Start a commit if one is due and none is running; raise an earlier commit's output error."""
        if self.error is not None:
            raise self.error
        if self._closed or not self._pending:
            return
        if len(self._pending) < self.max_batch and now - self._since < self.interval:
            return
        with self._cv:
            if self._batch is not None:
                return
            self.output.flush()  # every pending block's bytes are with the OS before the fsync below
            self._batch, self._pending = self._pending, []
            self._cv.notify_all()

    def close(self) -> None:
        """Wait for a running commit, commit the rest here, stop the thread.  Idempotent."""
        if self._closed:
            if self.error is not None:
                raise self.error
            return
        self._closed = True
        with self._cv:
            while self._batch is not None:
                self._cv.wait()
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=60)
        if self.error is not None:
            raise self.error
        if self._pending:
            self.output.flush()
            batch, self._pending = self._pending, []
            self._commit(batch)
            if self.error is not None:
                raise self.error

    def _worker(self) -> None:
        while True:
            with self._cv:
                while self._batch is None and not self._stop:
                    self._cv.wait()
                if self._batch is None:
                    return
                batch = self._batch
            try:
                self._commit(batch)
            except Exception as exc:  # never leave close() waiting on a dead thread
                self.error = OutputError(f"cannot commit to {self.journal.path}: {exc}")
            with self._cv:
                self._batch = None
                self._cv.notify_all()

    def _commit(self, batch: list[int]) -> None:
        try:
            self.output.sync()  # 1. the data of every block in the batch is on stable storage
        except OutputError as exc:
            self.error = exc
            return
        if self.journal_error:
            return
        try:
            self.journal.append(batch)  # 2. only then is it claimed
            self.journal.sync()
            self.commits += 1
        except JournalError as exc:
            self.journal_error = str(exc)

