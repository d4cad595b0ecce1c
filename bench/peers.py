"""The tools ``bench.transport`` compares, each driven with its documented best settings.

Every peer runs one transfer of one file from the sender namespace to every receiver namespace of
a :class:`bench.topology.Topology` and reports when all receivers had it; the caller verifies the
outputs by SHA-256.  Settings (see ``describe()`` of each peer, which goes into the JSON):

* ``mcdeploy``: ``mcdeploy send FILE --interface SENDER_IP --min-receivers N --exit-when-done
  --rate R [--symbol-size 8800 at MTU 9000]`` / ``mcdeploy receive --out F --group G --interface IP
  --no-resume``.  R is ``--mcdeploy-rate`` uncapped and the cap when capped.
* ``udpcast``: ``udp-sender --full-duplex --nokbd --min-receivers N [--blocksize 8800]
  [--max-bitrate CAPm]`` / ``udp-receiver --nokbd``.  ``--full-duplex`` is what the man page
  recommends on a switched network; uncapped there is no bitrate limit (its own slice/ACK flow
  control paces it).
* ``uftp``: ``uftp -R -1`` uncapped ("as fast as the interface allows"), ``-R CAP_KBPS`` capped,
  ``-b 8800`` at MTU 9000, closed group ``-H`` of the N receivers' ids so the session starts as soon
  as all registered / ``uftpd -d -D DIR`` in each receiver namespace.
* ``http``: nginx (sendfile) in the sender namespace, or Python's threading ``http.server`` when
  nginx is missing; one ``curl`` per receiver namespace, all started at once.

The clock starts when the sender starts (receivers are already listening) and stops at the first
moment a process has confirmed that every receiver has the whole file: the last receiver's exit
(``mcdeploy receive`` exits after verifying its SHA-256 and being acknowledged, ``udp-receiver``
after the final ACK plus its default 500 ms exit-wait, ``curl`` at the end of the body) or the
sender's successful exit (``udp-sender`` after all receivers acknowledged the last slice, ``uftp``
after every client reported completion), whichever comes first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.topology import Topology

GROUP_MCDEPLOY = "239.78.1.1"
GROUP_UDPCAST = "239.78.2.1"
GROUP_UFTP_PUB = "239.78.3.1"
GROUP_UFTP_PRIV = "239.78.3.2"
HTTP_PORT = 80
READY_TIMEOUT = 15.0
SETTLE_S = 0.2
DRAIN_S = 10.0  # after the end is known, how long the other processes get to exit on their own


@dataclass
class RunSpec:
    """One transfer to make."""

    topo: Topology
    n: int
    mtu: int
    loss: float
    regime: str  # "uncapped" | "capped"
    cap_mbit: float
    image: Path
    outdir: Path  # empty directory for this run's outputs
    timeout: float
    mcdeploy_rate: float


@dataclass
class RunOutcome:
    """What a peer observed; the caller adds the digest check."""

    seconds: float | None  # to all N, or None if it never finished
    outputs: list[Path]
    error: str = ""
    receiver_seconds: list[float | None] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)


class _Watched:
    """A process and the monotonic time it exited (set by a waiter thread)."""

    def __init__(self, proc: subprocess.Popen[Any], log: Path) -> None:
        self.proc = proc
        self.log = log
        self.exited_at: float | None = None
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        self.proc.wait()
        self.exited_at = time.monotonic()

    @property
    def rc(self) -> int | None:
        return self.proc.returncode if self.exited_at is not None else None

    def tail(self, chars: int = 300) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:].strip()
        return ""


def _start(topo: Topology, ns: str, argv: list[str], log: Path, cwd: Path | None = None,
           env: dict[str, str] | None = None) -> _Watched:
    fh = open(log, "wb")  # noqa: SIM115 - handed to the child, closed right after
    try:
        proc = topo.popen(ns, *argv, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    finally:
        fh.close()
    return _Watched(proc, log)


def _stop(topo: Topology, procs: list[_Watched]) -> None:
    for w in procs:
        topo.end(w.proc)
        topo.forget(w.proc)


def _wait_udp_ports(topo: Topology, namespaces: list[str], port: int, timeout: float = READY_TIMEOUT) -> str:
    """Wait until every namespace has a UDP socket on ``port``; '' or an error."""
    deadline = time.monotonic() + timeout
    pending = list(namespaces)
    while pending:
        pending = [ns for ns in pending if port not in topo.udp_ports(ns)]
        if not pending:
            time.sleep(SETTLE_S)
            return ""
        if time.monotonic() > deadline:
            return f"receivers not listening on UDP {port} after {timeout:.0f} s: {len(pending)} of {len(namespaces)}"
        time.sleep(0.05)
    return ""


def _dpkg_version(package: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        res = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True,
                             timeout=10)
        if res.returncode == 0:
            return res.stdout.strip()
    return ""


class Peer:
    name = ""
    binaries: tuple[str, ...] = ()
    apt_packages: tuple[str, ...] = ()
    #: whether the sender's exit status 0 means every receiver has the file
    sender_confirms = False

    def available(self) -> tuple[bool, str]:
        missing = [b for b in self.binaries if shutil.which(b) is None]
        if missing:
            return False, (f"{', '.join(missing)} not installed"
                           + (f" (apt-get install {' '.join(self.apt_packages)})" if self.apt_packages else ""))
        return True, ""

    def version(self) -> str:
        return " ".join(filter(None, (_dpkg_version(p) for p in self.apt_packages)))

    def describe(self) -> dict[str, Any]:
        return {}

    def setup(self, topo: Topology, workdir: Path, image: Path) -> None:
        """Once per topology (e.g. start a server)."""

    def teardown(self, topo: Topology) -> None:
        """Undo ``setup``; also called on errors."""

    def receivers(self, spec: RunSpec) -> list[tuple[str, list[str], Path]]:
        """(namespace, argv, output path) per receiver, started before the clock."""
        raise NotImplementedError

    def sender(self, spec: RunSpec) -> list[str] | None:
        raise NotImplementedError

    ready_port: int | None = None  # UDP port each receiver binds when ready

    def env(self) -> dict[str, str] | None:
        return None

    def run(self, spec: RunSpec) -> RunOutcome:
        topo = spec.topo
        logs = spec.outdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        recv_plan = self.receivers(spec)
        outputs = [out for _, _, out in recv_plan]
        procs: list[_Watched] = []
        try:
            rprocs = []
            if self.ready_port is not None:  # receivers first, then wait until they listen
                for i, (ns, argv, _out) in enumerate(recv_plan):
                    rprocs.append(_start(topo, ns, argv, logs / f"r{i}.log", cwd=spec.outdir, env=self.env()))
                procs += rprocs
                err = _wait_udp_ports(topo, [ns for ns, _, _ in recv_plan], self.ready_port)
                if err:
                    return RunOutcome(None, outputs, err, detail={"receiver_log": rprocs[0].tail()})
            t0 = time.monotonic()
            sargv = self.sender(spec)
            sproc = _start(topo, topo.sender, sargv, logs / "sender.log", cwd=spec.outdir,
                                                  env=self.env()) if sargv else None
            if sproc is not None:
                procs.append(sproc)
            if self.ready_port is None:  # receivers are the clients (HTTP): all start at t0
                for i, (ns, argv, _out) in enumerate(recv_plan):
                    rprocs.append(_start(topo, ns, argv, logs / f"r{i}.log", cwd=spec.outdir, env=self.env()))
                procs += rprocs
            return self._watch(spec, t0, sproc, rprocs, outputs)
        finally:
            _stop(topo, procs)

    def _receivers_exit(self) -> bool:
        return True

    def _watch(self, spec: RunSpec, t0: float, sproc: _Watched | None, rprocs: list[_Watched],
               outputs: list[Path]) -> RunOutcome:
        deadline = t0 + spec.timeout
        end: float | None = None
        error = ""
        while True:
            now = time.monotonic()
            if self._receivers_exit() and rprocs and all(w.exited_at is not None for w in rprocs):
                end = max(w.exited_at for w in rprocs if w.exited_at is not None)
            if sproc is not None and sproc.exited_at is not None:
                if sproc.rc == 0 and self.sender_confirms:
                    end = min(end, sproc.exited_at) if end is not None else sproc.exited_at
                elif sproc.rc != 0 and end is None:
                    # The sender gave up or failed: give the receivers a moment, then stop.
                    error = error or f"sender exited {sproc.rc}: {sproc.tail()}"
                    if now > sproc.exited_at + DRAIN_S or all(w.exited_at is not None for w in rprocs):
                        break
            if end is not None:
                break
            failed = [w for w in rprocs if w.exited_at is not None and w.rc != 0]
            if failed and self._receivers_exit() and all(w.exited_at is not None for w in rprocs):
                break
            if now > deadline:
                error = f"timeout after {spec.timeout:.0f} s"
                break
            time.sleep(0.005)
        # Let the others finish on their own (exit codes), bounded.
        drain_until = time.monotonic() + DRAIN_S
        # (a sender that does not confirm, mcdeploy's, only lingers for late acknowledgements: not waited for)
        others = ([sproc] if sproc is not None and self.sender_confirms else []) \
            + (rprocs if self._receivers_exit() else [])
        while any(w.exited_at is None for w in others) and time.monotonic() < drain_until and not error:
            time.sleep(0.01)
        rcodes = [w.rc for w in rprocs]
        if not error and self._receivers_exit():
            bad = [(i, rc) for i, rc in enumerate(rcodes) if rc != 0]
            if bad:
                i, rc = bad[0]
                error = f"{len(bad)} receiver(s) failed, e.g. r{i} exit {rc}: {rprocs[i].tail()}"
        if not error and sproc is not None and sproc.exited_at is not None and sproc.rc != 0 and self.sender_confirms:
            error = f"sender exited {sproc.rc}: {sproc.tail()}"
        if not error and sproc is not None and sproc.exited_at is None and self.sender_confirms:
            error = f"sender still running {DRAIN_S:.0f} s after the receivers finished"
        rsecs = [round(w.exited_at - t0, 3) if w.exited_at is not None and w.rc == 0 else None for w in rprocs] \
            if self._receivers_exit() else []
        detail: dict[str, Any] = {"sender_rc": sproc.rc if sproc else None, "receiver_rc": rcodes}
        if sproc is not None and sproc.exited_at is not None:
            detail["sender_exit_s"] = round(sproc.exited_at - t0, 3)
        if error and rprocs:
            detail["receiver_log"] = rprocs[0].tail()
            if sproc is not None:
                detail["sender_log"] = sproc.tail()
        seconds = None if end is None or error else end - t0
        return RunOutcome(seconds, outputs, error, rsecs, detail)


class McDeploy(Peer):
    name = "mcdeploy"
    ready_port = 47301

    def __init__(self, exe: str) -> None:
        self.exe = exe
        self.binaries = (exe,)
        self.src: str | None = None  # run this source tree (PYTHONPATH) instead of the installed package
        self.ref = ""

    def use_source(self, src: str, ref: str) -> None:
        self.src, self.ref = src, ref

    def _argv(self) -> list[str]:
        if self.src is None:
            return [self.exe]
        return [sys.executable, "-c", "import sys\nfrom controller.cli import main\nsys.argv[0] = 'mcdeploy'\n"
                "sys.exit(main())"]

    def env(self) -> dict[str, str] | None:
        if self.src is None:
            return None
        return {**os.environ, "PYTHONPATH": self.src}

    def available(self) -> tuple[bool, str]:
        if self.src is None and not (os.path.isfile(self.exe) and os.access(self.exe, os.X_OK)):
            return False, f"{self.exe} not found (pip install -e . in the venv)"
        return True, ""

    def version(self) -> str:
        if self.src is not None:
            return f"source tree of git {self.ref}"
        with contextlib.suppress(Exception):
            from importlib import metadata
            return metadata.version("mcdeploy")
        return ""

    @staticmethod
    def symbol_size(mtu: int) -> int | None:
        return 8800 if mtu >= 9000 else None  # default 1400 fits MTU 1500

    def describe(self) -> dict[str, Any]:
        return {"sender": "mcdeploy send FILE --interface SENDER_IP --group 239.78.1.1 --min-receivers N "
                          "--exit-when-done --rate R [--symbol-size 8800 at MTU 9000] --json --quiet",
                "receiver": "mcdeploy receive --out F --group 239.78.1.1 --interface RECEIVER_IP --no-resume "
                            "--json --quiet",
                "rate": "uncapped: --mcdeploy-rate; capped: the cap"}

    def receivers(self, spec: RunSpec) -> list[tuple[str, list[str], Path]]:
        plan = []
        for i, ns in enumerate(spec.topo.receivers):
            out = spec.outdir / f"r{i}.img"
            plan.append((ns, [*self._argv(), "receive", "--out", str(out), "--group", GROUP_MCDEPLOY,
                              "--interface", spec.topo.ip(ns), "--no-resume", "--json", "--quiet",
                              "--wait", str(round(spec.timeout)), "--idle-timeout", "30"], out))
        return plan

    def sender(self, spec: RunSpec) -> list[str]:
        rate = spec.cap_mbit if spec.regime == "capped" else spec.mcdeploy_rate
        argv = [*self._argv(), "send", str(spec.image), "--interface", spec.topo.sender_ip, "--group", GROUP_MCDEPLOY,
                "--min-receivers", str(spec.n), "--exit-when-done", "--rate", f"{rate:g}", "--json", "--quiet"]
        sym = self.symbol_size(spec.mtu)
        if sym:
            argv += ["--symbol-size", str(sym)]
        return argv


class UdpCast(Peer):
    name = "udpcast"
    binaries = ("udp-sender", "udp-receiver")
    apt_packages = ("udpcast",)
    ready_port = 9000
    sender_confirms = True

    def describe(self) -> dict[str, Any]:
        return {"sender": "udp-sender --file FILE --interface IF --full-duplex --nokbd --min-receivers N "
                          "--mcast-data-address 239.78.2.1 [--blocksize 8800 at MTU 9000] "
                          "[--max-bitrate CAPm when capped]",
                "receiver": "udp-receiver --nokbd --interface IF --file F",
                "rate": "uncapped: no --max-bitrate (slice/ACK flow control); capped: --max-bitrate = cap"}

    def receivers(self, spec: RunSpec) -> list[tuple[str, list[str], Path]]:
        plan = []
        for i, ns in enumerate(spec.topo.receivers):
            out = spec.outdir / f"r{i}.img"
            plan.append((ns, ["udp-receiver", "--nokbd", "--interface", spec.topo.ifname(ns), "--file", str(out),
                              "--start-timeout", str(round(spec.timeout)), "--receive-timeout", "30"], out))
        return plan

    def sender(self, spec: RunSpec) -> list[str]:
        topo = spec.topo
        argv = ["udp-sender", "--file", str(spec.image), "--interface", topo.ifname(topo.sender), "--full-duplex",
                "--nokbd", "--min-receivers", str(spec.n), "--mcast-data-address", GROUP_UDPCAST,
                "--start-timeout", str(round(spec.timeout))]
        if spec.mtu >= 9000:
            argv += ["--blocksize", "8800"]
        if spec.regime == "capped":
            argv += ["--max-bitrate", f"{spec.cap_mbit:g}m"]
        return argv


class Uftp(Peer):
    name = "uftp"
    binaries = ("uftp", "uftpd")
    apt_packages = ("uftp",)
    ready_port = 1044
    sender_confirms = True

    def describe(self) -> dict[str, Any]:
        return {"sender": "uftp -I IF -M 239.78.3.1 -P 239.78.3.2 -R RATE -H ID1,...,IDN [-b 8800 at MTU 9000] "
                          "-x 1 FILE",
                "receiver": "uftpd -d -q -I IF -M 239.78.3.1 -D DIR -U ID -x 1 (foreground daemon, one per run)",
                "rate": "uncapped: -R -1 (as fast as the interface allows); capped: -R cap in Kbps; "
                        "congestion control off (-C none, the default)"}

    def _receivers_exit(self) -> bool:
        return False  # uftpd is a daemon: the server's exit says all are done

    @staticmethod
    def _uid(i: int) -> str:
        return f"0x{0x0A4E0000 + 10 + i:08x}"

    def receivers(self, spec: RunSpec) -> list[tuple[str, list[str], Path]]:
        plan = []
        for i, ns in enumerate(spec.topo.receivers):
            d = spec.outdir / f"r{i}"
            d.mkdir(parents=True, exist_ok=True)
            plan.append((ns, ["uftpd", "-d", "-q", "-I", spec.topo.ifname(ns), "-M", GROUP_UFTP_PUB, "-D", str(d),
                              "-U", self._uid(i), "-x", "1"], d / spec.image.name))
        return plan

    def sender(self, spec: RunSpec) -> list[str]:
        topo = spec.topo
        rate = str(round(spec.cap_mbit * 1000)) if spec.regime == "capped" else "-1"
        argv = ["uftp", "-I", topo.ifname(topo.sender), "-M", GROUP_UFTP_PUB, "-P", GROUP_UFTP_PRIV, "-R", rate,
                "-H", ",".join(self._uid(i) for i in range(spec.n)), "-x", "1"]
        if spec.mtu >= 9000:
            argv += ["-b", "8800"]
        return [*argv, str(spec.image)]


class Http(Peer):
    name = "http"
    ready_port = None

    def __init__(self) -> None:
        self.server = ""
        self._proc: subprocess.Popen[Any] | None = None
        self.client = ""

    def available(self) -> tuple[bool, str]:
        return True, ""  # python's http.server and urllib are the fallbacks

    def version(self) -> str:
        return self.server

    def describe(self) -> dict[str, Any]:
        return {"server": self.server or ("nginx" if shutil.which("nginx") else "python http.server (threading)"),
                "client": "curl -sS --fail -o F" if shutil.which("curl") else "python urllib",
                "note": "N parallel downloads of the same file, all started at t0; capped: TCP shares the cap"}

    def setup(self, topo: Topology, workdir: Path, image: Path) -> None:
        self.teardown(topo)
        serve = image.parent
        logs = workdir / "http"
        logs.mkdir(exist_ok=True)
        log = open(logs / "server.log", "wb")  # noqa: SIM115
        try:
            if shutil.which("nginx"):
                conf = logs / "nginx.conf"
                for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
                    (logs / sub).mkdir(exist_ok=True)
                conf.write_text(
                    "worker_processes auto;\nuser root;\ndaemon off;\n"
                    f"pid {logs}/nginx.pid;\nerror_log {logs}/error.log warn;\n"
                    "events { worker_connections 512; }\n"
                    "http {\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n"
                    "  default_type application/octet-stream;\n"
                    f"  client_body_temp_path {logs}/body;\n  proxy_temp_path {logs}/proxy;\n"
                    f"  fastcgi_temp_path {logs}/fastcgi;\n  uwsgi_temp_path {logs}/uwsgi;\n"
                    f"  scgi_temp_path {logs}/scgi;\n"
                    f"  server {{\n    listen {topo.sender_ip}:{HTTP_PORT};\n    root {serve};\n  }}\n}}\n")
                argv = ["nginx", "-p", str(logs), "-e", str(logs / "error.log"), "-c", str(conf)]
                self.server = f"nginx {_dpkg_version('nginx') or _dpkg_version('nginx-light')}".strip() \
                    + " (sendfile, worker_processes auto)"
            else:
                argv = [sys.executable, "-m", "http.server", "--bind", topo.sender_ip, "--directory", str(serve),
                        str(HTTP_PORT)]
                self.server = "python http.server (ThreadingHTTPServer; nginx not installed)"
            self._proc = topo.popen(topo.sender, *argv, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while not topo.tcp_listening(topo.sender, HTTP_PORT):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server did not start: {(logs / 'server.log').read_text()[-300:]}")
            time.sleep(0.05)

    def teardown(self, topo: Topology) -> None:
        if self._proc is not None:
            topo.end(self._proc)
            topo.forget(self._proc)
            self._proc = None

    def receivers(self, spec: RunSpec) -> list[tuple[str, list[str], Path]]:
        url = f"http://{spec.topo.sender_ip}:{HTTP_PORT}/{spec.image.name}"
        plan = []
        for i, ns in enumerate(spec.topo.receivers):
            out = spec.outdir / f"r{i}.img"
            if shutil.which("curl"):
                argv = ["curl", "-sS", "--fail", "--noproxy", "*", "--max-time", str(round(spec.timeout)), "-o",
                        str(out), url]
                self.client = "curl"
            else:
                code = ("import shutil,sys,urllib.request as u\n"
                        "with u.urlopen(sys.argv[1], timeout=30) as r, open(sys.argv[2], 'wb') as f:\n"
                        "    shutil.copyfileobj(r, f, 1 << 20)\n")
                argv = [sys.executable, "-c", code, url, str(out)]
                self.client = "python urllib"
            plan.append((ns, argv, out))
        return plan

    def sender(self, spec: RunSpec) -> None:
        return None


def all_peers(mcdeploy_exe: str) -> dict[str, Peer]:
    peers: list[Peer] = [McDeploy(mcdeploy_exe), UdpCast(), Uftp(), Http()]
    return {p.name: p for p in peers}
