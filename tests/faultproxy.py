"""A real, misbehaving HTTP/1.1 reverse proxy for fault-injection tests (stdlib sockets and threads only).

It listens on a free loopback port and forwards every request to ``upstream`` (e.g. the test Orthanc), unless
a *fault rule* matches the request; then it misbehaves the way real networks and overloaded PACS do::

    from tests.faultproxy import FaultProxy

    with FaultProxy(orthanc.url) as proxy:            # proxy.url: same path as upstream, other port
        pacs = connect(proxy.url, user=..., password=...)
        proxy.respond(503, times=2)                    # the next 2 requests get 503, then forward again
        proxy.respond(429, retry_after="1", path=r"/series/[\\d.]+$")
        proxy.cut(after_bytes=300_000, path=r"/series/[\\d.]+$")   # forward, close after 300 kB of body
        proxy.cut(after_bytes=1000, reset=True, times=None)       # ... every time, with a TCP RST
        proxy.cut(after_bytes=None)                    # read the request, close without any answer
        proxy.hang()                                   # read the request, never answer
        proxy.hang(after_bytes=50_000)                 # send headers and 50 kB of body, then stall
        proxy.delay(0.5)                               # forward after half a second
        proxy.respond(503, times=None)                 # refuse everything from now on
        proxy.clear()                                  # behave again
        proxy.requests                                 # [Logged(method, path, status, fault), ...]
        proxy.count(path=r"/instances/")               # how many requests matched

Rules
    Each rule matches by ``method`` (``None``: any) and ``path`` (a regex *searched* in the request target,
    query included), lets its first ``skip`` matching requests through, then fires ``times`` times (``None``:
    forever). Rules are tried in the order they were added; the first one that fires wins. They may be added
    or cleared while requests are in flight (a lock guards them). ``Rule.hits`` counts how often one fired.
Bodies
    The upstream answer is read whole (chunked encoding removed) and sent on with ``framing``: ``"mirror"``
    (what upstream used: Content-Length, chunked, or close-delimited as Orthanc's multipart), ``"length"``,
    ``"chunked"`` or ``"close"`` (no length:
    the end of the body is the end of the connection, so a cut looks like a normal end to the client).
    ``after_bytes`` counts body bytes, not framing.
Log
    ``requests`` holds one :class:`Logged` per request, in the order the proxy acted on them; ``status``
    is the status line the client got (``None``: none; a cut answer still says 200).
"""

from __future__ import annotations

import http.client
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Literal, NamedTuple
from urllib.parse import urlsplit

Framing = Literal["mirror", "length", "chunked", "close"]
Action = Literal["respond", "cut", "reset", "hang", "delay"]

# Hop-by-hop headers (RFC 9110 §7.6.1) are the proxy's own business on each side; never forwarded.
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
_CHUNK = 64 << 10


class Logged(NamedTuple):
    """One request as the proxy handled it."""

    method: str
    path: str
    status: int | None  # what the client got; None: no status line (hang, cut before the answer)
    fault: str | None  # None: forwarded untouched; else "respond", "cut", "reset", "hang" or "delay"


@dataclass
class Rule:
    """A fault: what to do to which requests, how often. Built by the :class:`FaultProxy` methods."""

    action: Action
    method: str | None = None
    path: str = ""
    times: int | None = 1
    skip: int = 0
    status: int = 503
    retry_after: str | None = None
    after_bytes: int | None = 0
    seconds: float = 0.0
    hits: int = 0  # how many requests this rule acted on
    seen: int = field(default=0, repr=False)  # matching requests, including skipped ones

    def matches(self, method: str, target: str) -> bool:
        same_method = self.method is None or self.method.upper() == method
        return same_method and re.search(self.path, target) is not None


class _Upstream:
    """One keep-alive connection to upstream, reopened once when upstream has closed it meanwhile."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes, Framing]:
        """Forward one request; returns status, reason, end-to-end headers, the whole body, and how upstream
        framed it (Orthanc sends multipart answers close-delimited: no length, the body ends with the
        connection)."""
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=60)
            try:
                self._conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    self._conn.putheader(name, value)
                self._conn.putheader("Host", f"{self._host}:{self._port}")
                self._conn.putheader("Content-Length", str(len(body)))
                self._conn.endheaders(body)
                answer = self._conn.getresponse()
                data = answer.read()
                framing: Framing = "chunked" if answer.chunked else "length"
                if not answer.chunked and answer.getheader("Content-Length") is None:
                    framing = "close"
                header_list = [(k, v) for k, v in answer.getheaders() if k.lower() not in _HOP]
                if answer.will_close:
                    self.close()
                return answer.status, answer.reason, header_list, data, framing
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class FaultProxy:
    """A reverse proxy to ``upstream`` on ``127.0.0.1`` with a programmable fault plan (module docstring).

    Parameters
    ----------
    upstream
        ``http://host:port/prefix``; the proxy's :attr:`url` has the same prefix.
    framing
        How bodies are framed towards the client (module docstring); may be changed at run time.
    """

    def __init__(self, upstream: str, *, framing: Framing = "mirror") -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"FaultProxy forwards plain http only, not {upstream!r}")
        self.upstream = upstream
        self.framing: Framing = framing
        self._up_host = parts.hostname
        self._up_port = parts.port or 80
        self._prefix = parts.path.rstrip("/")
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._log: list[Logged] = []
        self._stop = threading.Event()
        self._clients: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The proxy's base URL (upstream's path on the proxy's port)."""
        return f"http://127.0.0.1:{self.port}{self._prefix}"

    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))  # the kernel picks a free port: no race with other tests
        listener.listen(64)
        # close() does not wake a thread blocked in accept() on Linux: poll, so that the loop sees the stop.
        listener.settimeout(0.05)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._spawn(self._accept_loop, "faultproxy-accept")
        return self

    def close(self) -> None:
        """Stop accepting, drop every client connection (hung ones included), wait for the threads."""
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            clients = list(self._clients)
        for sock in clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the fault plan --------------------------------------------------------------------------------------
    def add(self, rule: Rule) -> Rule:
        """Append ``rule`` to the plan; returns it (its ``hits`` count how often it fired)."""
        with self._lock:
            self._rules.append(rule)
        return rule

    def respond(
        self,
        status: int,
        *,
        retry_after: str | None = None,
        method: str | None = None,
        path: str = "",
        times: int | None = 1,
        skip: int = 0,
    ) -> Rule:
        """Answer ``status`` (with ``Retry-After`` when given) instead of forwarding."""
        return self.add(Rule("respond", method, path, times, skip, status=status, retry_after=retry_after))

    def cut(
        self,
        after_bytes: int | None = 0,
        *,
        reset: bool = False,
        method: str | None = None,
        path: str = "",
        times: int | None = 1,
        skip: int = 0,
    ) -> Rule:
        """Forward, but close the connection after ``after_bytes`` bytes of the answer's body (``None``:
        before the status line); ``reset``: abort with a TCP RST (SO_LINGER 0) instead of an orderly FIN."""
        action: Action = "reset" if reset else "cut"
        return self.add(Rule(action, method, path, times, skip, after_bytes=after_bytes))

    def hang(
        self,
        *,
        after_bytes: int | None = None,
        method: str | None = None,
        path: str = "",
        times: int | None = 1,
        skip: int = 0,
    ) -> Rule:
        """Accept the request and never answer (``after_bytes``: send the headers and that many body bytes
        first). The connection stays open until the client gives up or the proxy closes."""
        return self.add(Rule("hang", method, path, times, skip, after_bytes=after_bytes))

    def delay(
        self,
        seconds: float,
        *,
        method: str | None = None,
        path: str = "",
        times: int | None = 1,
        skip: int = 0,
    ) -> Rule:
        """Forward after ``seconds``."""
        return self.add(Rule("delay", method, path, times, skip, seconds=seconds))

    def clear(self) -> None:
        """Remove every rule: forward everything from now on (the log stays)."""
        with self._lock:
            self._rules.clear()

    @property
    def requests(self) -> list[Logged]:
        """A copy of the request log."""
        with self._lock:
            return list(self._log)

    def count(self, *, method: str | None = None, path: str = "", fault: str | None = "any") -> int:
        """How many logged requests match ``method``, the ``path`` regex and ``fault`` (``"any"``: any)."""
        return sum(
            1
            for entry in self.requests
            if (method is None or entry.method == method.upper())
            and re.search(path, entry.path)
            and (fault == "any" or entry.fault == fault)
        )

    def reset_log(self) -> None:
        """Forget the requests seen so far."""
        with self._lock:
            self._log.clear()

    def _pick(self, method: str, target: str) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if not rule.matches(method, target):
                    continue
                rule.seen += 1
                if rule.seen <= rule.skip or (rule.times is not None and rule.hits >= rule.times):
                    continue
                rule.hits += 1
                return rule
        return None

    def _record(self, method: str, target: str, status: int | None, fault: str | None) -> None:
        with self._lock:
            self._log.append(Logged(method, target, status, fault))

    # -- serving ---------------------------------------------------------------------------------------------
    def _spawn(self, target: object, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed
            with self._lock:
                self._clients.add(sock)
            self._spawn(self._serve, "faultproxy-conn", sock)

    def _serve(self, sock: socket.socket) -> None:
        upstream = _Upstream(self._up_host, self._up_port)
        rfile = sock.makefile("rb")
        try:
            while not self._stop.is_set():
                request = _read_request(rfile)
                if request is None:
                    return
                method, target, headers, body = request
                if not self._handle(sock, upstream, method, target, headers, body):
                    return
        except OSError:
            return  # the client went away, or close() shut the socket
        finally:
            upstream.close()
            rfile.close()
            with self._lock:
                self._clients.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def _handle(
        self,
        sock: socket.socket,
        upstream: _Upstream,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> bool:
        """Answer one request; returns whether the connection stays open for the next one."""
        rule = self._pick(method, target)
        client_close = any(k.lower() == "connection" and "close" in v.lower() for k, v in headers)
        if rule is not None and rule.action == "respond":
            text = f"fault proxy: HTTP {rule.status}\n".encode()
            extra = [("Retry-After", rule.retry_after)] if rule.retry_after is not None else []
            fields = [("Content-Type", "text/plain"), *extra]
            head = _head(rule.status, _reason(rule.status), fields, "length", len(text))
            sock.sendall(head + text)
            self._record(method, target, rule.status, "respond")
            return not client_close
        if rule is not None and rule.after_bytes is None and rule.action in ("cut", "reset", "hang"):
            self._record(method, target, None, rule.action)
            if rule.action == "hang":
                self._stall(sock)
            else:
                _abort(sock, rst=rule.action == "reset")
            return False
        if rule is not None and rule.action == "delay":
            if self._stop.wait(rule.seconds):
                return False
        own = _HOP | {"host", "content-length"}  # set again by _Upstream
        forward = [(k, v) for k, v in headers if k.lower() not in own]
        try:
            status, reason, up_headers, data, up_framing = upstream.request(method, target, forward, body)
        except (OSError, http.client.HTTPException) as err:
            text = f"fault proxy: upstream {self.upstream} failed: {err}\n".encode()
            head = _head(502, "Bad Gateway", [("Content-Type", "text/plain")], "length", len(text))
            sock.sendall(head + text)
            self._record(method, target, 502, "upstream-error")
            return False
        framing = self.framing
        if framing == "mirror":
            framing = up_framing
        fault = rule.action if rule is not None else None
        limit = rule.after_bytes if rule is not None and rule.action in ("cut", "reset", "hang") else None
        self._record(method, target, status, fault)
        sock.sendall(_head(status, reason, up_headers, framing, len(data)))
        sent = _send_body(sock, data, framing, limit)
        if limit is None:
            if framing == "close":
                _abort(sock, rst=False)
                return False
            return not client_close and sent
        if rule is not None and rule.action == "hang":
            self._stall(sock)
        else:
            _abort(sock, rst=rule is not None and rule.action == "reset")
        return False

    def _stall(self, sock: socket.socket) -> None:
        # Keep the connection open and silent until the client closes it (or the proxy stops), discarding
        # whatever the client sends: a server that accepted and never answers.
        while not self._stop.is_set():
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                try:
                    if not sock.recv(65536):
                        return
                except OSError:
                    return


def _read_request(rfile: BinaryIO) -> tuple[str, str, list[tuple[str, str]], bytes] | None:
    line = rfile.readline(65537)
    while line in (b"\r\n", b"\n"):  # stray CRLF between requests (RFC 9112 §2.2)
        line = rfile.readline(65537)
    if not line:
        return None
    method, target, _version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers: list[tuple[str, str]] = []
    while True:
        raw = rfile.readline(65537)
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    lookup = {k.lower(): v for k, v in headers}
    if "chunked" in lookup.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size = int(rfile.readline(65537).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while rfile.readline(65537) not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                break
            body += rfile.read(size)
            rfile.readline(65537)
    else:
        body = rfile.read(int(lookup.get("content-length", "0") or 0))
    return method.upper(), target, headers, body


def _reason(status: int) -> str:
    try:
        return http.client.responses[status]
    except KeyError:
        return "Fault"


def _head(status: int, reason: str, headers: list[tuple[str, str]], framing: Framing, length: int) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() != "content-length"]
    if framing == "length":
        lines.append(f"Content-Length: {length}")
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _pieces(data: bytes, framing: Framing) -> Iterator[tuple[bytes, bytes, bytes]]:
    """(framing before, payload, framing after) for each piece of the body on the wire."""
    for at in range(0, len(data), _CHUNK):
        piece = data[at : at + _CHUNK]
        if framing == "chunked":
            yield f"{len(piece):x}\r\n".encode(), piece, b"\r\n"
        else:
            yield b"", piece, b""
    if framing == "chunked":
        yield b"0\r\n\r\n", b"", b""


def _send_body(sock: socket.socket, data: bytes, framing: Framing, limit: int | None) -> bool:
    """Send ``data``; with ``limit``, stop after that many payload bytes. Returns whether all was sent."""
    sent = 0
    for before, payload, after in _pieces(data, framing):
        if limit is not None and sent + len(payload) > limit:
            sock.sendall(before + payload[: limit - sent])
            return False
        sock.sendall(before + payload + after)
        sent += len(payload)
    return True


def _abort(sock: socket.socket, *, rst: bool) -> None:
    if rst:
        # An RST throws away what is still in our send buffer (megabytes on loopback): wait until the client
        # has acknowledged every byte sent, so that "after_bytes" means what it says.
        _wait_sent(sock)
        # SO_LINGER on with a zero timeout: close() sends RST, not FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        try:
            sock.shutdown(socket.SHUT_WR)  # FIN now; the client reads what was sent, then EOF
        except OSError:
            pass
    sock.close()


def _wait_sent(sock: socket.socket, *, limit: float = 5.0) -> None:
    """Wait (at most ``limit`` seconds) until the kernel holds no unacknowledged data for ``sock`` (Linux's
    SIOCOUTQ; elsewhere, return at once)."""
    try:
        import fcntl
        import termios

        request = termios.TIOCOUTQ
    except (ImportError, AttributeError):
        return
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            pending = struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0]
        except OSError:
            return
        if pending == 0:
            return
        time.sleep(0.002)
