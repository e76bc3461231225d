"""A TLS-terminating TCP proxy (stdlib ``ssl`` + sockets) for putting a real HTTPS endpoint in front of Orthanc.

Each accepted connection is wrapped server-side with the given certificate (the handshake happens in its own
thread, so a client that rejects the certificate only ends its own connection), then bytes are pumped both
ways to the plain-HTTP backend until either side closes.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading


class TlsProxy:
    """``https://127.0.0.1:{port}`` → ``http://{backend}``; use as a context manager."""

    def __init__(self, backend: tuple[str, int], context: ssl.SSLContext) -> None:
        self.backend = backend
        self.context = context
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="tls-proxy", daemon=True)

    def __enter__(self) -> TlsProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        self._server.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed by __exit__
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            conn.close()  # the client refused our certificate (the point of several tests)
            return
        try:
            upstream = socket.create_connection(self.backend, timeout=30)
        except OSError:
            tls.close()
            return
        done = threading.Event()

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while chunk := src.recv(65536):
                    dst.sendall(chunk)
            except OSError:
                pass
            finally:
                done.set()

        threading.Thread(target=pump, args=(upstream, tls), daemon=True).start()
        threading.Thread(target=pump, args=(tls, upstream), daemon=True).start()
        # Whichever side ends first ends the connection: a close-delimited answer must reach the client as EOF
        # now, not after the other direction's 30 s timeout.
        done.wait(timeout=30)
        for s in (tls, upstream):
            with contextlib.suppress(OSError):
                s.close()
