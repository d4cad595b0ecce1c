"""Where a received image goes: a file written at offsets, verified before success is claimed.

Portable: ``os.pwrite`` where the platform has it (Linux), seek + write
elsewhere (Windows); both are exercised by the tests.  Errors become
:class:`OutputError` with a one-line reason (a full disk says so).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os

from clientagent import platform
from mcproto.errors import McdeployError

COALESCE_BYTES = 1024 * 1024


class OutputError(McdeployError):
    """The output cannot be written (disk full, permission, ...)."""


def _reason(exc: OSError, path: str) -> str:
    if exc.errno == errno.ENOSPC:
        return f"disk full while writing {path}"
    return f"cannot write {path}: {exc.strerror or exc}"


class FileOutput:
    """A regular file or block device of the image's size, written out of order."""

    def __init__(self, path: str, size: int, *, use_pwrite: bool | None = None) -> None:
        self.path = path
        self.size = size
        self.written = 0
        self._run = bytearray()
        self._run_start = 0
        self._pwrite = platform.use_pwrite() if use_pwrite is None else use_pwrite
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0)
        try:
            self._fd = os.open(path, flags, 0o644)
            if os.path.isfile(path):
                os.ftruncate(self._fd, size)
        except OSError as exc:
            raise OutputError(_reason(exc, path)) from None

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset``; contiguous writes are coalesced into one system call per
        ``COALESCE_BYTES`` (one ``pwrite`` per 1,400-byte symbol would double the client's syscalls)."""
        if self._run and offset == self._run_start + len(self._run) and len(self._run) < COALESCE_BYTES:
            self._run += data
            return
        self._flush_run()
        self._run_start = offset
        self._run += data

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

    def finish(self) -> None:
        """Flush to stable storage: success is claimed only for data the disk holds."""
        self._flush_run()
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise OutputError(_reason(exc, self.path)) from None

    def sha256(self, chunk: int = 4 * 1024 * 1024) -> str:
        """Digest of the first ``size`` bytes as they are on disk (re-read, not remembered)."""
        h = hashlib.sha256()
        remaining = self.size
        os.lseek(self._fd, 0, os.SEEK_SET)
        try:
            while remaining > 0:
                block = os.read(self._fd, min(chunk, remaining))
                if not block:
                    break
                h.update(block)
                remaining -= len(block)
        except OSError as exc:
            raise OutputError(f"cannot read back {self.path}: {exc.strerror}") from None
        return h.hexdigest()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
