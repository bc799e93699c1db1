"""A fault-injecting HTTP proxy on loopback, in front of the test S3 server (tests and
benchmarks only: never imported by ``prn_ray``).

Point ``storage.endpoint_url`` at :attr:`FaultProxy.url`; every request is forwarded to the
real server (``moto_server``) except the ones the proxy decides to fail:

* transient mode (``rate``): a seeded share of requests fail, half with ``503 SlowDown``
  (before reaching the server) and half with the connection dropped in the middle of the
  response (after the server handled it: the client sees a truncated body or an empty reply);
* permanent mode (``permanent``): requests whose path contains one of the given key fragments
  always get that status (``500`` InternalError or ``403`` AccessDenied);
* slow copies (``slow_copies``): a server-side copy (``PUT`` with ``x-amz-copy-source``) whose
  destination path contains a given fragment takes that many seconds, the way S3 answers a
  long copy: ``200`` at once, spaces every half second (so the client's low-speed timeout does not
  fire), then the result (tests aim a kill or a second run between a scoring run's partition
  commits with it).

The proxy counts what it did (:attr:`counts`), so tests can check that faults really happened.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer",
        "upgrade", "expect"}
_CODES = {500: "InternalError", 503: "SlowDown", 403: "AccessDenied", 404: "NoSuchKey"}


def _error_body(status: int) -> bytes:
    code = _CODES.get(status, "InternalError")
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>injected by faultproxy</Message></Error>").encode()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a client that hung up (its own timeout, a dropped connection): nothing to say


class FaultProxy:
    """``with FaultProxy(upstream, rate=0.05, seed=1) as proxy: ... proxy.url ...``"""

    def __init__(self, upstream: str, *, rate: float = 0.0, seed: int = 0,
                 permanent: dict[str, int] | None = None, methods: tuple[str, ...] | None = None,
                 watch: str | None = None, slow_copies: dict[str, float] | None = None):
        u = urllib.parse.urlparse(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.rate = rate
        self.permanent = dict(permanent or {})
        self.methods = methods  # transient faults only on these methods (None: all)
        self.watch = watch  # counts["watched"]: GETs answered whole whose path holds this
        self.slow_copies = dict(slow_copies or {})
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.counts: Counter = Counter()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _decide(self, method: str, path: str) -> tuple[str, int]:
        """('pass'|'status'|'drop', status)."""
        for fragment, status in self.permanent.items():
            if fragment in urllib.parse.unquote(path):
                return "status", status
        if self.methods is not None and method not in self.methods:
            return "pass", 0
        with self._lock:
            x = self._rng.random()
        if x < self.rate / 2:
            return "status", 503
        if x < self.rate:
            return "drop", 0
        return "pass", 0

    def _copy_delay(self, method: str, path: str, headers) -> float:
        if method != "PUT" or "x-amz-copy-source" not in {k.lower() for k in headers}:
            return 0.0
        where = urllib.parse.unquote(path)
        return max((s for f, s in self.slow_copies.items() if f in where), default=0.0)

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes,
                      cut: bool = False) -> None:
                self.send_response_only(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body[: len(body) // 2] if cut else body)
                self.wfile.flush()

            def _forward(self, body: bytes) -> tuple[http.client.HTTPResponse, bytes]:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    return resp, resp.read()
                finally:
                    conn.close()

            def _slow_copy(self, body: bytes, delay: float) -> None:
                with proxy._lock:
                    proxy.counts["slow_copies"] += 1
                self.send_response_only(200)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                end = time.monotonic() + delay
                while time.monotonic() < end:
                    # curl gives up below 1 byte/s over 3 s (the SDK's low-speed limit)
                    self.wfile.write(b"10\r\n" + b" " * 16 + b"\r\n")
                    self.wfile.flush()
                    time.sleep(min(0.5, max(0.0, end - time.monotonic())))
                _, data = self._forward(body)  # the copy itself (an error body says so in XML)
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n")
                self.wfile.flush()

            def _proxy(self) -> None:
                body = self._body()
                action, status = proxy._decide(self.command, self.path)
                with proxy._lock:
                    proxy.counts["requests"] += 1
                    if action != "pass":
                        proxy.counts[f"{action}{status or ''}"] += 1
                delay = proxy._copy_delay(self.command, self.path, self.headers.keys())
                if delay and action == "pass":
                    self._slow_copy(body, delay)
                    return
                if action == "status":
                    err = _error_body(status)
                    self._send(status, [("Content-Type", "application/xml"),
                                        ("Content-Length", str(len(err)))], err)
                    return
                resp, data = self._forward(body)
                out = [(k, v) for k, v in resp.getheaders()
                       if k.lower() not in _HOP and k.lower() != "content-length"]
                length = resp.getheader("Content-Length") if self.command == "HEAD" \
                    else str(len(data))
                if length is not None:
                    out.append(("Content-Length", length))
                if action == "drop":
                    if len(data) >= 2:  # headers and half the body, then the connection goes
                        self._send(resp.status, out, data, cut=True)
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self._send(resp.status, out, data)
                if proxy.watch and self.command == "GET" and resp.status in (200, 206) and \
                        proxy.watch in urllib.parse.unquote(self.path):
                    with proxy._lock:
                        proxy.counts["watched"] += 1

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy

        return Handler
