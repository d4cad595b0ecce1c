"""The DP's unicast fallback: a small threaded HTTP server of session images with range requests.

Server side (stdlib ``http.server``).  ``GET /sessions/<session id>/image`` (and ``HEAD``) serves
the image of a session this DP runs or recently ran, to clients that show the token their offer
carried (:data:`clientagent.unicast.TOKEN_HEADER` with :data:`~clientagent.unicast.CLIENT_HEADER`):
anyone else gets 403 and no byte.  ``Range: bytes=a-b`` / ``a-`` / ``-n`` (one range) answers 206;
a range outside the image (or several ranges) 416 with ``Content-Range: bytes */size``.  Bodies are
read and sent 1 MiB at a time (bounded memory per connection), optionally paced per transfer
(``http_rate_mbps``), and for sealed sessions encrypted with the session's key stream
(:func:`clientagent.unicast.crypt`).
"""

from __future__ import annotations

import hmac
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from clientagent.unicast import CLIENT_HEADER, ENCRYPTED_HEADER, TOKEN_HEADER, crypt, http_key, token
from mcproto.errors import ConfigError

log = logging.getLogger("mcdeploy.dp.http")

PATH = re.compile(r"^/sessions/([0-9]{1,20})/image$")
RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
READ_BYTES = 1024 * 1024


@dataclass
class Served:
    """One session's image as the HTTP server serves it."""

    session_id: int
    path: str
    size: int
    secret: bytes  # tokens are HMAC(secret, session:client)
    key: bytes | None  # sealed sessions: the body key (derived from the session key)
    knows: Any  # callable(client_id) -> bool: the session admitted this client
    bytes_out: dict[str, int] = field(default_factory=dict)  # per client
    last_seen: dict[str, float] = field(default_factory=dict)
    requests: int = 0
    refused: int = 0
    until: float = float("inf")  # monotonic time after which it is no longer served


class ImageServer:
    """The agent's one HTTP server; sessions are added while they run and linger a while after."""

    def __init__(self, host: str, port: int, rate_mbps: float = 0.0, advertise: str = "") -> None:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        except (OSError, UnicodeError) as exc:
            raise ConfigError(f"cannot listen on TCP {where}: {getattr(exc, 'strerror', None) or exc}") from None
        server_cls = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
        try:
            self.httpd = server_cls((host, port), _Handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on TCP {where}: {exc.strerror or exc}") from None
        self.httpd.images = self  # type: ignore[attr-defined]
        self.address: tuple[str, int] = self.httpd.server_address[:2]  # type: ignore[assignment]
        self.advertise = advertise or str(self.address[0])
        self.rate = rate_mbps * 1e6 / 8
        self._sessions: dict[int, Served] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> ImageServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="dp-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, session_id: int) -> str:
        host = self.advertise
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.address[1]}/sessions/{session_id}/image"

    def add(self, served: Served) -> None:
        with self._lock:
            self._sessions[served.session_id] = served

    def linger(self, session_id: int, seconds: float) -> None:
        """Serve this session ``seconds`` more, then forget it."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is not None:
                s.until = time.monotonic() + seconds

    def get(self, session_id: int) -> Served | None:
        now = time.monotonic()
        with self._lock:
            for sid in [sid for sid, s in self._sessions.items() if s.until < now]:
                del self._sessions[sid]
            return self._sessions.get(session_id)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mcdeploy-dp"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _plain(self, code: int, text: str, extra: dict[str, str] | None = None) -> None:
        data = (text + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _serve(self, body: bool) -> None:
        images: ImageServer = self.server.images  # type: ignore[attr-defined]
        m = PATH.match(self.path.split("?", 1)[0])
        served = images.get(int(m.group(1))) if m else None
        if served is None:
            self._plain(404, "no such session image on this DP")
            return
        client = self.headers.get(CLIENT_HEADER, "")
        given = self.headers.get(TOKEN_HEADER, "")
        served.requests += 1
        if not (client and given and len(client) <= 128
                and hmac.compare_digest(given.encode(), token(served.secret, served.session_id, client).encode())
                and served.knows(client)):
            served.refused += 1
            log.warning("unicast: refused %s for session %x from %s (%s)", self.command, served.session_id,
                        self.address_string(), "no token" if not given else "bad token or unknown client")
            self._plain(403, "forbidden: a token from this session's offer is required")
            return
        size = served.size
        rng = self.headers.get("Range")
        if rng is None:
            start, end, code = 0, size, 200
        else:
            r = RANGE.match(rng.strip())
            start = end = -1
            if r and (r.group(1) or r.group(2)):
                if r.group(1):
                    start = int(r.group(1))
                    end = min(size, int(r.group(2)) + 1) if r.group(2) else size
                    if r.group(2) and int(r.group(2)) < start:
                        start = -1
                else:
                    n = int(r.group(2))
                    start, end = max(0, size - n), size
                    if n == 0:
                        start = -1
            if start < 0 or start >= size or end <= start:
                self._plain(416, "range not satisfiable", {"Content-Range": f"bytes */{size}"})
                return
            code = 206
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        if served.key is not None:
            self.send_header(ENCRYPTED_HEADER, "chacha20")
        self.end_headers()
        if not body:
            return
        served.last_seen[client] = time.monotonic()
        self._send_body(served, client, start, end, images.rate)

    def _send_body(self, served: Served, client: str, start: int, end: int, rate: float) -> None:
        began = time.monotonic()
        sent = 0
        try:
            with open(served.path, "rb") as f:
                f.seek(start)
                pos = start
                while pos < end:
                    data = f.read(min(READ_BYTES, end - pos))
                    if not data:
                        log.error("unicast: %s is shorter than its image (%d bytes)", served.path, served.size)
                        self.close_connection = True
                        return
                    if served.key is not None:
                        data = crypt(served.key, served.session_id, pos, data)
                    self.wfile.write(data)
                    pos += len(data)
                    sent += len(data)
                    served.bytes_out[client] = served.bytes_out.get(client, 0) + len(data)
                    served.last_seen[client] = time.monotonic()
                    if rate > 0:
                        ahead = sent / rate - (time.monotonic() - began)
                        if ahead > 0:
                            time.sleep(ahead)
        except OSError as exc:  # the client went away: nothing to answer
            log.info("unicast: transfer to %s ended early: %s", self.address_string(), exc)
            self.close_connection = True


def served_for(session_id: int, path: str, size: int, session_key: bytes | None, knows: Any,
               secret: bytes) -> Served:
    return Served(session_id=session_id, path=path, size=size, secret=secret,
                  key=http_key(session_key) if session_key is not None else None, knows=knows)
