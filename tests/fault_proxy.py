"""A fault-injecting HTTP proxy on 127.0.0.1, in front of a real server (the S3 server or the Hub server).

Requests are forwarded byte for byte (the Host header too, so S3 signatures still verify). Faults apply to
ranged GETs (the data reads), one per request, taken in order from ``faults``:

- ``"503"``: answer 503 Slow Down without forwarding;
- ``"drop"``: close the connection without an answer;
- ``"truncate"``: forward, then send the headers and only half of the body before closing;
- a callable: called before forwarding (e.g. replace the object between two ranges), then forward.

``None`` in the list forwards one ranged GET untouched. Every request is recorded in ``seen``, and the body
bytes sent back for GETs are counted in ``sent``.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import urlsplit

Fault = str | Callable[[], None] | None


class FaultProxy:
    """Forward to `upstream` (http://host:port), injecting the queued faults into ranged GETs."""

    def __init__(self, upstream: str, faults: list[Fault] | None = None):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.faults: list[Fault] = list(faults or [])
        self.seen: list[tuple[str, str, str]] = []  # method, path, what happened
        self.sent = 0  # body bytes sent back for GETs
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """The proxy's URL, to use in place of the upstream's."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def next_fault(self, method: str, ranged: bool) -> Fault:
        """The fault for this request (only ranged GETs take one)."""
        with self._lock:
            if method == "GET" and ranged and self.faults:
                return self.faults.pop(0)
        return None

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    """A handler class bound to one proxy."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: requests are recorded in proxy.seen."""

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            fault = proxy.next_fault(self.command, "Range" in self.headers)
            label = fault if isinstance(fault, str) else ("hook" if fault else "ok")
            proxy.seen.append((self.command, self.path, label))
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if fault == "503":
                self._send(503, {"Content-Type": "application/xml"}, b"<Error><Code>SlowDown</Code></Error>", 0)
                return
            if callable(fault):
                fault()
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=30)
            try:
                upstream.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                response = upstream.getresponse()
                data = response.read()
                head = self.command == "HEAD"
                headers = {k: v for k, v in response.getheaders()
                           if k.lower() not in ("connection", "transfer-encoding") and
                           (head or k.lower() != "content-length")}
            finally:
                upstream.close()
            cut = len(data) // 2 if fault == "truncate" else len(data)
            if self.command == "GET":
                with proxy._lock:
                    proxy.sent += cut
            self._send(response.status, headers, data, cut, head=head)

        def _send(self, status: int, headers: dict[str, str], data: bytes, cut: int, head: bool = False) -> None:
            """Answer with `data` (its full length announced) but only its first `cut` bytes sent when cut."""
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if not head:
                self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            if not head:
                self.wfile.write(data[:cut] if cut else data)
            self.close_connection = True

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    return Handler
