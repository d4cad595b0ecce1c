"""Checks that an image's content on this DP is what the controller recorded.

Server side.  A DP must never multicast bytes other than the image the
deployment names: before a session opens, the file's size and SHA-256 are
compared with the job.  Digests are cached by (path, size, mtime) so a
second session of the same image does not re-read it.
"""

from __future__ import annotations

import hashlib
import os
import threading

from mcproto.messages import ImageRef

_cache: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def file_sha256(path: str, chunk: int = 4 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_content(image: ImageRef) -> str | None:
    """None if the content matches the reference, else a one-line reason."""
    try:
        st = os.stat(image.path)
    except OSError as exc:
        return f"image content {image.path} is not readable on this DP: {exc.strerror}"
    if st.st_size != image.size:
        return f"image content {image.path} is {st.st_size} bytes, expected {image.size}"
    key = (image.path, st.st_size, st.st_mtime_ns)
    with _lock:
        digest = _cache.get(key)
    if digest is None:
        try:
            digest = file_sha256(image.path)
        except OSError as exc:
            return f"cannot read image content {image.path}: {exc.strerror}"
        with _lock:
            _cache[key] = digest
    if digest != image.sha256:
        return f"image content {image.path} does not match its recorded SHA-256"
    return None
