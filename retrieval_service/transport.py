"""A plain-HTTP/1.1 transport for httpx on the standard library's ``http.client``: the retrieval client's default.

Why: one ``/search`` round trip at 20k keys is ~4.5 ms, of which httpx's own transport stack (httpcore and h11,
~1,600 Python calls per request) took ~0.4 ms of client CPU more than ``http.client`` (measured against the same
uvicorn server, alternating requests). :class:`StdlibTransport` keeps httpx's interface (requests, responses,
timeouts, exceptions, ``MockTransport`` in tests) and hands the bytes to ``http.client``, which sends the headers
and the body in one ``send`` and parses the response in C where it can.

What it does not do, and who does it instead: HTTPS, proxies and HTTP/2 (:func:`stdlib_transport_for` returns
None for such URLs, and httpx's own transport is used). Connections are kept alive, one per thread and server
(``http.client`` connections are not thread-safe); a request on a kept-alive connection that the server has
closed meanwhile (uvicorn closes idle ones after 5 s) is sent once more on a new connection. That resend is safe
here because every retrieval-service endpoint only reads.
"""

from __future__ import annotations

import http.client
import threading
import urllib.request

import httpx

__all__ = ["StdlibTransport", "stdlib_transport_for"]

# The server closed a kept-alive connection before (or while) reading the request: resend on a new one.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class _StaleConnectionError(Exception):
    """The connection broke before a response came: resent once when it was a kept-alive one."""


def stdlib_transport_for(base_url: str | httpx.URL, *, timeout: float | None) -> StdlibTransport | None:
    """A :class:`StdlibTransport` for ``base_url``, or None where httpx's transport is needed (https, a proxy
    configured in the environment for this host)."""
    url = httpx.URL(base_url)
    if url.scheme != "http" or not url.host:
        return None
    if "http" in urllib.request.getproxies() and not urllib.request.proxy_bypass(url.host):
        return None
    return StdlibTransport(timeout=timeout)


class StdlibTransport(httpx.BaseTransport):
    """``http://`` requests through ``http.client``, one kept-alive connection per thread and (host, port).

    ``timeout`` (seconds, None: none) is the default for connect and for each socket read/write; a request's own
    httpx timeout (``request.extensions["timeout"]``), when set, takes precedence.
    """

    def __init__(self, *, timeout: float | None = 5.0) -> None:
        self.timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[http.client.HTTPConnection] = set()  # every thread's connections, for close()
        self._closed = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            msg = f"StdlibTransport sends plain http:// only, got {url.scheme}://"
            raise httpx.UnsupportedProtocol(msg, request=request)
        if self._closed:
            msg = "the transport is closed"
            raise httpx.ConnectError(msg, request=request)
        timeouts = request.extensions.get("timeout") or {}
        connect_s, read_s = timeouts.get("connect", self.timeout), timeouts.get("read", self.timeout)
        body = request.read()
        target = url.raw_path.decode("ascii")
        # Host comes from httpx's request (http.client must not add its own); the framing is set here, from the
        # body as read (a streamed request arrives as chunked, and is sent with its length instead).
        headers = [(k, v) for k, v in request.headers.multi_items()
                   if k.lower() not in ("content-length", "transfer-encoding")]  # fmt: skip
        if body or request.method in ("POST", "PUT", "PATCH"):
            headers.append(("Content-Length", str(len(body))))
        key = (url.host, url.port or 80)
        conns = self._connections()
        if key in conns:
            try:
                return self._send(conns, key, request, target, headers, body, connect_s, read_s)
            except _StaleConnectionError:
                pass  # the server closed the idle connection: once more on a new one
        try:
            return self._send(conns, key, request, target, headers, body, connect_s, read_s)
        except _StaleConnectionError as err:
            msg = str(err)
            raise httpx.RemoteProtocolError(msg, request=request) from err.__cause__

    def _send(
        self,
        conns: dict[tuple[str, int], http.client.HTTPConnection],
        key: tuple[str, int],
        request: httpx.Request,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        connect_s: float | None,
        read_s: float | None,
    ) -> httpx.Response:
        """One attempt on the thread's connection to ``key`` (opened here if there is none)."""
        conn = conns.get(key)
        if conn is None:
            conn = conns[key] = http.client.HTTPConnection(key[0], key[1], timeout=connect_s)
            with self._lock:
                self._open.add(conn)
        try:
            if conn.sock is None:
                conn.connect()
            conn.sock.settimeout(read_s)
        except OSError as err:
            self._drop(conns, key, conn)
            msg = f"connect timed out after {connect_s} s" if isinstance(err, TimeoutError) else f"{err!r}"
            kind = httpx.ConnectTimeout if isinstance(err, TimeoutError) else httpx.ConnectError
            raise kind(msg, request=request) from err
        try:
            conn.putrequest(request.method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            conn.endheaders(body or None)  # two sends (head, body); one send measured no faster on loopback
            response = conn.getresponse()
            content = response.read()
        except _STALE as err:
            self._drop(conns, key, conn)
            raise _StaleConnectionError(repr(err)) from err
        except TimeoutError as err:  # socket.timeout
            self._drop(conns, key, conn)
            msg = f"no response within {read_s} s"
            raise httpx.ReadTimeout(msg, request=request) from err
        except (OSError, http.client.HTTPException) as err:
            self._drop(conns, key, conn)
            raise httpx.RemoteProtocolError(repr(err), request=request) from err
        if response.will_close:
            self._drop(conns, key, conn)
        return httpx.Response(
            response.status,
            headers=response.getheaders(),
            content=content,
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": response.reason.encode("latin-1")},
        )

    def _connections(self) -> dict[tuple[str, int], http.client.HTTPConnection]:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def _drop(self, conns: dict, key: tuple[str, int], conn: http.client.HTTPConnection) -> None:
        conn.close()
        if conns.get(key) is conn:
            del conns[key]
        with self._lock:
            self._open.discard(conn)

    def close(self) -> None:
        """Close every thread's connections; later requests raise ``httpx.ConnectError``."""
        self._closed = True
        with self._lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            conn.close()
