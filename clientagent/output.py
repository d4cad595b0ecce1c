"""Where a received image goes: a file, a block device or stdout, verified before success is claimed.

Portable: ``os.pwrite`` where the platform has it (Linux), seek + write
elsewhere (Windows); both are exercised by the tests.  Linux-only behaviour
(exclusive open of a block device) is chosen at run time.  Errors become
:class:`OutputError` with a one-line reason (a full disk says so).

Blocks complete in any order; memory stays bounded for any image size:

* :class:`FileOutput`, a **regular file**: created and truncated to the image's
  size, each block written at its offset.  A block that is all zeros is *not*
  written (``sparse``): the file was truncated, so the range is a hole that reads
  back as zeros and takes no disk space.  Verification re-reads the file.
* :class:`FileOutput`, a **block device** (``/dev/sdX``, ``\\\\.\\PhysicalDriveN``):
  opened without truncation (on Linux exclusively, so a mounted device is refused),
  refused if it is smaller than the image.  Zero blocks *are* written: a device
  reads zeros where nothing was written only if it is known to (a thin LUN, a
  TRIMmed SSD with deterministic read-zero) and we do not guess.  Verification
  re-reads the device.
* :class:`PipeOutput`, **stdout** (``--out -``): written strictly in order for an
  apply command reading the pipe.  Data is written as soon as it is contiguous;
  blocks that arrive ahead of a gap wait in memory up to ``memory_limit`` bytes and
  beyond that in an unlinked temporary spool file whose slots are reused, so the
  spool holds at most the blocks waiting at one time.  The stream is hashed as it is
  written (a pipe cannot be re-read).  Writes block while the reader is busy, which
  slows the receive loop and, through feedback, the sender's rate.  A pipe cannot be
  rewound, so resume does not apply to it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import sys
import tempfile
from typing import TYPE_CHECKING

from clientagent import platform
from mcproto.errors import McdeployError

if TYPE_CHECKING:
    from mcproto.manifest import Manifest

COALESCE_BYTES = 1024 * 1024
SPOOL_MEMORY = 64 * 1024 * 1024  # default bound on out-of-order blocks held in memory for --out -
STDOUT = "-"


SPARSE_GRAIN = 64 * 1024  # zero ranges this long (aligned) become holes, whatever the block size


class ChunkRejected(Exception):
    """A chunk did not match the signed manifest; the bytes ``start``..``end`` must be received again."""

    def __init__(self, chunk: int, start: int, end: int) -> None:
        super().__init__(f"chunk {chunk} does not match the signed manifest")
        self.chunk, self.start, self.end = chunk, start, end


class OutputError(McdeployError):
    """The output cannot be written (disk full, permission, ...)."""


def _reason(exc: OSError, path: str) -> str:
    if exc.errno == errno.ENOSPC:
        return f"disk full while writing {path}"
    return f"cannot write {path}: {exc.strerror or exc}"


def is_windows_device(path: str) -> bool:
    return path.startswith(("\\\\.\\", "//./"))


def classify(path: str) -> str:
    """``stdout``, ``device`` (an existing non-regular file, or a Windows ``\\\\.\\`` path) or ``file``."""
    if path == STDOUT:
        return "stdout"
    if is_windows_device(path):
        return "device"
    try:
        st = os.stat(path)
    except OSError:
        return "file"
    return "file" if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) else "device"


def fsync_dir(path: str) -> None:
    """Make a file's directory entry durable (POSIX); Windows file systems journal it themselves."""
    if sys.platform.startswith("win"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exclusive_device_open() -> bool:
    """Linux: O_EXCL on a block device fails with EBUSY while it is mounted or otherwise claimed."""
    return sys.platform.startswith("linux") and not platform.portable_forced()


class FileOutput:
    """A regular file or block device of (at least) the image's size, written out of order.

    ``fresh``: True truncates a regular file to nothing and then to ``size`` (its old contents
    are gone, unwritten ranges read as zeros); False keeps its contents (resuming); None opens
    only, :meth:`prepare` decides later (after the journal was read).  ``sparse``: skip writing
    all-zero ranges of a regular file (valid because each range is written once onto a file
    truncated at its fresh start); never for devices.
    """

    durable = True

    def __init__(self, path: str, size: int, *, use_pwrite: bool | None = None, fresh: bool | None = True,
                 sparse: bool = False) -> None:
        self.path = path
        self.size = size
        self.written = 0
        self.hole_bytes = 0  # zero ranges left as holes instead of written
        self.notes: list[str] = []
        self._run = bytearray()
        self._run_start = 0
        self._zeros: dict[int, bytes] = {}
        self._pwrite = platform.use_pwrite() if use_pwrite is None else use_pwrite
        self._fd = -1
        st = None
        if not is_windows_device(path):
            with contextlib.suppress(OSError):
                st = os.stat(path)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise OutputError(f"cannot write {path}: it is a directory")
        self.device = is_windows_device(path) or (st is not None and not stat.S_ISREG(st.st_mode))
        if self.device and st is not None and not stat.S_ISBLK(st.st_mode):
            raise OutputError(f"cannot write {path}: not a regular file or block device "
                              "(for a pipe, use --out - and redirect stdout)")
        self.kind = "device" if self.device else "file"
        self.existed = st is not None or self.device
        flags = os.O_RDWR | getattr(os, "O_BINARY", 0)
        if self.device:
            if st is not None and _exclusive_device_open():
                flags |= os.O_EXCL
        else:
            flags |= os.O_CREAT
        try:
            self._fd = os.open(path, flags, 0o644)
        except OSError as exc:
            if self.device and exc.errno == errno.EBUSY:
                raise OutputError(f"cannot write {path}: the device is in use (mounted, or held by another "
                                  "program); refusing to write to it") from None
            raise OutputError(_reason(exc, path)) from None
        self.found_size: int | None
        if self.device:
            self.found_size = self._device_size()
            if self.found_size is None:
                self.notes.append(f"the size of {path} is unknown here: not checked against the image")
            elif self.found_size < size:
                self.close()
                raise OutputError(f"{path} holds {self.found_size} bytes, less than the image's {size}: "
                                  "refusing to write a partial image")
        else:
            self.found_size = os.fstat(self._fd).st_size if st is not None else 0
        self.sparse = sparse and not self.device
        if fresh is not None:
            self.prepare(fresh)

    def _device_size(self) -> int | None:
        try:
            end = os.lseek(self._fd, 0, os.SEEK_END)
            os.lseek(self._fd, 0, os.SEEK_SET)
        except OSError:
            return None
        return end if end > 0 else None

    def prepare(self, fresh: bool) -> None:
        """Size a regular file to the image: from nothing if ``fresh``, else keeping its contents."""
        if self.device:
            return
        try:
            if fresh:
                os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, self.size)
        except OSError as exc:
            raise OutputError(_reason(exc, self.path)) from None
        if fresh:
            fsync_dir(self.path)  # the file's name survives a power loss, before a journal claims its blocks

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset``; contiguous writes are coalesced into one system call per
        ``COALESCE_BYTES`` (one ``pwrite`` per 1,400-byte symbol would double the client's syscalls)."""
        if self.sparse:
            if len(data) > SPARSE_GRAIN:  # large blocks: find holes at a finer grain than the block
                view = memoryview(data)
                for i in range(0, len(data), SPARSE_GRAIN):
                    self.write_at(offset + i, view[i:i + SPARSE_GRAIN])
                return
            if self._all_zero(data):
                self.hole_bytes += len(data)
                return
        if self._run and offset == self._run_start + len(self._run) and len(self._run) < COALESCE_BYTES:
            self._run += data
            return
        self._flush_run()
        self._run_start = offset
        self._run += data

    def _all_zero(self, data: bytes | memoryview) -> bool:
        n = len(data)
        zeros = self._zeros.get(n)
        if zeros is None:
            if len(self._zeros) >= 4:  # whole blocks have one length, the last block another
                self._zeros.clear()
            zeros = self._zeros[n] = bytes(n)
        return data == zeros

    def flush(self) -> None:
        """Hand buffered bytes to the OS (not yet durable: :meth:`sync`)."""
        self._flush_run()

    def _flush_run(self) -> None:
        if self._run:
            run, self._run = self._run, bytearray()
            self._write(self._run_start, run)

    def _write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            if not self._pwrite:
                os.lseek(self._fd, offset, os.SEEK_SET)
            while view:
                n = os.pwrite(self._fd, view, offset) if self._pwrite else os.write(self._fd, view)
                if n <= 0:
                    raise OSError(errno.ENOSPC, "no progress writing")
                view, offset = view[n:], offset + n
        except OSError as exc:
            raise OutputError(_reason(exc, self.path)) from None
        self.written += len(data)

    def sync(self) -> None:
        """fsync: every byte handed to the OS so far is on stable storage (safe from another thread)."""
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise OutputError(_reason(exc, self.path)) from None

    def finish(self) -> None:
        """Flush to stable storage: success is claimed only for data the disk holds."""
        self._flush_run()
        self.sync()

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` as the OS holds them (buffered writes are flushed first)."""
        self._flush_run()
        parts: list[bytes] = []
        got = 0
        try:
            if not self._pwrite:
                os.lseek(self._fd, offset, os.SEEK_SET)
            while got < length:
                part = (os.pread(self._fd, length - got, offset + got) if self._pwrite
                        else os.read(self._fd, length - got))
                if not part:
                    break
                parts.append(part)
                got += len(part)
        except OSError as exc:
            raise OutputError(f"cannot read back {self.path}: {exc.strerror}") from None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def sha256(self, chunk: int = 4 * 1024 * 1024) -> str:
        """Digest of the first ``size`` bytes as they are on disk (re-read, not remembered)."""
        h = hashlib.sha256()
        remaining = self.size
        try:
            os.lseek(self._fd, 0, os.SEEK_SET)
            while remaining > 0:
                block = os.read(self._fd, min(chunk, remaining))
                if not block:
                    break
                h.update(block)
                remaining -= len(block)
        except OSError as exc:
            raise OutputError(f"cannot read back {self.path}: {exc.strerror}") from None
        return h.hexdigest()

    def stats(self) -> dict[str, int]:
        return {"sparse_bytes": self.hole_bytes}

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


class PipeOutput:
    """The image written to a pipe (stdout) strictly in order, out-of-order blocks spooled within bounds.

    ``block_bytes``: the spool's slot size (blocks are that long, the last shorter; a longer
    write is kept as several slots).  Each range is written once.

    ``manifest``: nothing reaches the pipe before its chunk matched the signed manifest.  The
    contiguous bytes of the current chunk are held (one chunk, at most a block more); a chunk
    that fails is discarded and :class:`ChunkRejected` says which bytes to receive again.
    """

    durable = False
    kind = "stdout"
    found_size = None

    def __init__(self, size: int, block_bytes: int, *, fd: int | None = None, memory_limit: int = SPOOL_MEMORY,
                 spool_dir: str | None = None, use_pwrite: bool | None = None,
                 manifest: Manifest | None = None) -> None:
        self.size = size
        self.manifest = manifest
        self._hold = bytearray()
        self._held_at = 0  # image offset of the first held byte
        self.checked_chunks = 0
        self.rejected_chunks = 0
        self.path = "stdout" if fd is None else f"fd {fd}"
        self.block_bytes = max(1, block_bytes)
        self.memory_limit = memory_limit
        self.spool_dir = spool_dir
        self.notes: list[str] = []
        self.written = 0
        self.hole_bytes = 0
        self.peak_memory = 0
        self.spooled_blocks = 0  # blocks that went to the spool file
        self.peak_spool_bytes = 0
        self._pwrite = platform.use_pwrite() if use_pwrite is None else use_pwrite
        if fd is None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stdout.flush()
            fd = 1
            if os.isatty(fd):
                raise OutputError("refusing to write the image to a terminal: redirect stdout or pipe it into "
                                  "the command that applies it")
        if sys.platform == "win32":  # no newline translation on the image
            import msvcrt

            msvcrt.setmode(fd, os.O_BINARY)
        self._fd = fd
        self._next = 0
        self._mem: dict[int, bytes] = {}
        self._mem_bytes = 0
        self._disk: dict[int, tuple[int, int]] = {}  # offset -> (slot position, length)
        self._free: list[int] = []
        self._spool_end = 0
        self._spool = None  # type: ignore[var-annotated]
        self._hash = hashlib.sha256()

    @property
    def memory_bytes(self) -> int:
        return self._mem_bytes

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        if offset < self._next < offset + len(data):  # a block received again after its chunk was rejected
            data, offset = memoryview(data)[self._next - offset:], self._next
        n = len(data)
        if offset < self._next or offset in self._mem or offset in self._disk or n == 0:
            return  # already written or waiting: each range is written once
        if offset + n > self.size:
            raise OutputError(f"write beyond the end of the image at {offset}")
        if offset == self._next:
            self._emit(data)
            self._drain()
        elif self._mem_bytes + n <= self.memory_limit:
            self._mem[offset] = bytes(data)
            self._mem_bytes += n
            self.peak_memory = max(self.peak_memory, self._mem_bytes)
        else:
            view = memoryview(data)
            for i in range(0, n, self.block_bytes):
                self._spill(offset + i, view[i:i + self.block_bytes])

    def _emit(self, data: bytes | memoryview) -> None:
        if self.manifest is None:
            self._next += len(data)
            self._out(data)
            return
        self._hold += data
        self._next += len(data)
        chunk_size = self.manifest.chunk_size
        while self._hold:
            chunk = self._held_at // chunk_size
            need = min(chunk_size, self.size - self._held_at)
            if len(self._hold) < need:
                return
            piece = memoryview(self._hold)[:need]
            ok = self.manifest.check_chunk(chunk, piece)
            if not ok:
                piece.release()
                start, end = self._held_at, self._next
                self._hold.clear()
                self._next = start
                self.rejected_chunks += 1
                raise ChunkRejected(chunk, start, end)
            self.checked_chunks += 1
            self._out(piece)
            piece.release()
            del self._hold[:need]
            self._held_at += need

    def _out(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self._hash.update(view)
        try:
            while view:
                n = os.write(self._fd, view)
                if n <= 0:
                    raise OSError(errno.EPIPE, "no progress writing")
                view = view[n:]
        except BrokenPipeError:
            raise OutputError("cannot write stdout: the program reading it went away (broken pipe)") from None
        except OSError as exc:
            raise OutputError(_reason(exc, self.path)) from None
        self.written += len(data)

    def _drain(self) -> None:
        while self._next < self.size:
            data = self._mem.pop(self._next, None)
            if data is not None:
                self._mem_bytes -= len(data)
                self._emit(data)
                continue
            slot = self._disk.pop(self._next, None)
            if slot is None:
                return
            self._emit(self._unspill(*slot))

    def _spill(self, offset: int, data: memoryview) -> None:
        try:
            if self._spool is None:
                self._spool = tempfile.TemporaryFile(prefix="mcdeploy-spool-", dir=self.spool_dir)  # noqa: SIM115
            fd = self._spool.fileno()
            if self._free:
                pos = self._free.pop()
            else:
                pos, self._spool_end = self._spool_end, self._spool_end + self.block_bytes
                self.peak_spool_bytes = max(self.peak_spool_bytes, self._spool_end)
            view = data
            at = pos
            if not self._pwrite:
                os.lseek(fd, pos, os.SEEK_SET)
            while view:
                n = os.pwrite(fd, view, at) if self._pwrite else os.write(fd, view)
                if n <= 0:
                    raise OSError(errno.ENOSPC, "no progress writing")
                view, at = view[n:], at + n
        except OSError as exc:
            where = self.spool_dir or tempfile.gettempdir()
            raise OutputError(f"cannot spool out-of-order data in {where}: "
                              f"{'disk full' if exc.errno == errno.ENOSPC else exc.strerror or exc}") from None
        self._disk[offset] = (pos, len(data))
        self.spooled_blocks += 1

    def _unspill(self, pos: int, length: int) -> bytes:
        assert self._spool is not None
        fd = self._spool.fileno()
        parts: list[bytes] = []
        got = 0
        try:
            if not self._pwrite:
                os.lseek(fd, pos, os.SEEK_SET)
            while got < length:
                part = os.pread(fd, length - got, pos + got) if self._pwrite else os.read(fd, length - got)
                if not part:
                    raise OSError(errno.EIO, "spool file is short")
                parts.append(part)
                got += len(part)
        except OSError as exc:
            raise OutputError(f"cannot read back the spool file: {exc.strerror or exc}") from None
        self._free.append(pos)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def flush(self) -> None:
        """Nothing is buffered: contiguous data was written at once."""

    def sync(self) -> None:
        """A pipe has no stable storage."""

    def finish(self) -> None:
        if self._next != self.size or self._hold:
            raise OutputError(f"only {self._next} of {self.size} bytes could be written to {self.path} in order")

    def sha256(self) -> str:
        """Digest of the stream as written, in order (a pipe cannot be re-read)."""
        return self._hash.hexdigest()

    def stats(self) -> dict[str, int]:
        return {"spool_peak_memory": self.peak_memory, "spooled_blocks": self.spooled_blocks,
                "spool_peak_bytes": self.peak_spool_bytes}

    @property
    def memory_bytes_held(self) -> int:
        """Bytes waiting for their chunk's check (at most a chunk and a block)."""
        return len(self._hold)

    def close(self) -> None:
        self._mem.clear()
        self._mem_bytes = 0
        self._disk.clear()
        if self._spool is not None:
            with contextlib.suppress(OSError):
                self._spool.close()
            self._spool = None
