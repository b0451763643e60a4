"""The retrieval client's http.client transport, against small HTTP servers on 127.0.0.1 started here."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from retrieval_service.client import RetrievalClient, TransportError
from retrieval_service.transport import StdlibTransport, stdlib_transport_for


class _Handler(BaseHTTPRequestHandler):
    """Echoes the request as JSON; ``close_after`` requests per connection, then closes it without saying so
    (as a server does with an idle keep-alive connection); ``/status/N`` answers N; ``/slow`` waits 2 s."""

    protocol_version = "HTTP/1.1"
    close_after = 0  # 0: keep connections open

    def do_GET(self) -> None:
        self._answer(b"")

    def do_POST(self) -> None:
        self._answer(self.rfile.read(int(self.headers["Content-Length"])))

    def _answer(self, body: bytes) -> None:
        server = self.server
        with server.lock:
            server.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        if self.path == "/slow":
            time.sleep(2)
        status = int(self.path.rsplit("/", 1)[1]) if self.path.startswith("/status/") else 200
        out = json.dumps({"path": self.path, "body": body.decode(), "n": len(server.requests)}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.send_header("X-Twice", "a")
        self.send_header("X-Twice", "b")
        self.end_headers()
        self.wfile.write(out)
        self._served = getattr(self, "_served", 0) + 1
        if self.close_after and self._served >= self.close_after:
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.connections = 0

    def get_request(self) -> tuple[socket.socket, object]:
        conn = super().get_request()
        with self.lock:
            self.connections += 1
        return conn


@contextmanager
def _serve(close_after: int = 0) -> Iterator[_Server]:
    handler = type("Handler", (_Handler,), {"close_after": close_after})
    server = _Server(handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _url(server: _Server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_requests_round_trip_on_one_kept_alive_connection() -> None:
    with _serve() as server, httpx.Client(base_url=_url(server), transport=StdlibTransport()) as client:
        r = client.post("/search?x=1", content=b'{"k": 1}', headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.json() == {"path": "/search?x=1", "body": '{"k": 1}', "n": 1}
        assert r.headers.get_list("x-twice") == ["a", "b"] and r.http_version == "HTTP/1.1"
        assert r.reason_phrase == "OK"
        assert client.get("/status/404").status_code == 404
        assert client.get("/healthz").json()["n"] == 3
    assert server.connections == 1  # kept alive
    (_, _, headers, _), (_, _, get_headers, _) = server.requests[0], server.requests[2]
    assert headers["host"] == f"127.0.0.1:{server.server_address[1]}" and headers["content-length"] == "8"
    assert "content-length" not in get_headers and get_headers["accept-encoding"] == "gzip, deflate"  # httpx's


def test_streamed_body_is_sent_with_its_length() -> None:
    with _serve() as server, httpx.Client(base_url=_url(server), transport=StdlibTransport()) as client:
        r = client.post("/x", content=iter([b"ab", b"cd"]))
        assert r.json()["body"] == "abcd"
    assert server.requests[0][2]["content-length"] == "4" and "transfer-encoding" not in server.requests[0][2]


def test_connection_closed_by_the_server_is_reopened_once() -> None:
    with _serve(close_after=1) as server, httpx.Client(base_url=_url(server), transport=StdlibTransport()) as client:
        for i in range(4):
            assert client.post("/search", content=str(i).encode()).json()["body"] == str(i)
    # every request but the first found its kept-alive connection closed and was sent again on a new one
    assert server.connections == 4
    assert [body for *_, body in server.requests] == [b"0", b"1", b"2", b"3"]  # each request served once


def test_a_new_connection_that_breaks_is_an_error_not_a_retry() -> None:
    hits = []
    listener = socket.create_server(("127.0.0.1", 0))

    def accept_and_close() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            hits.append(1)
            conn.recv(65536)
            conn.close()

    threading.Thread(target=accept_and_close, daemon=True).start()
    try:
        with httpx.Client(transport=StdlibTransport()) as client:
            with pytest.raises(httpx.RemoteProtocolError, match="RemoteDisconnected"):
                client.get(f"http://127.0.0.1:{listener.getsockname()[1]}/")
    finally:
        listener.close()
    assert hits == [1]


def test_refused_connection_and_timeouts() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with httpx.Client(transport=StdlibTransport()) as client, pytest.raises(httpx.ConnectError):
            client.get(f"http://127.0.0.1:{port}/")
    with _serve() as server, httpx.Client(base_url=_url(server), transport=StdlibTransport(), timeout=0.3) as client:
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout, match=r"no response within 0\.3 s"):
            client.get("/slow")
        assert time.monotonic() - start < 1.5
        assert client.get("/after").status_code == 200  # a fresh connection after the timed-out one


def test_retrieval_client_maps_transport_failures() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        with RetrievalClient(f"http://127.0.0.1:{s.getsockname()[1]}") as remote:
            assert isinstance(remote._http._transport, StdlibTransport)
            with pytest.raises(TransportError, match=r"GET http://127\.0\.0\.1:\d+/info: ConnectError"):
                remote.info()
            assert remote.healthy() is False


def test_threads_get_their_own_connections_and_close_closes_all() -> None:
    transport = StdlibTransport()
    with _serve() as server, httpx.Client(base_url=_url(server), transport=transport) as client:
        barrier = threading.Barrier(3)
        errors = []

        def work() -> None:
            try:
                barrier.wait(5)
                for _ in range(5):
                    assert client.get("/t").status_code == 200
            except Exception as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert not errors and len(server.requests) == 15
        assert server.connections == 3 and len(transport._open) == 3
        transport.close()
        assert not transport._open
        with pytest.raises(httpx.ConnectError, match="the transport is closed"):
            client.get("/t")


def test_which_urls_get_the_stdlib_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(stdlib_transport_for("http://127.0.0.1:8000", timeout=1.0), StdlibTransport)
    assert stdlib_transport_for("https://retrieval.example.org", timeout=1.0) is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example.org:3128")
    assert stdlib_transport_for("http://retrieval.example.org", timeout=1.0) is None
    monkeypatch.setenv("NO_PROXY", "retrieval.example.org")
    assert isinstance(stdlib_transport_for("http://retrieval.example.org", timeout=1.0), StdlibTransport)
    remote = RetrievalClient("https://retrieval.example.org")
    assert not isinstance(remote._http._transport, StdlibTransport)
    remote.close()
    with pytest.raises(httpx.UnsupportedProtocol), httpx.Client(transport=StdlibTransport()) as client:
        client.get("https://retrieval.example.org/")
