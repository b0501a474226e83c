"""An oversized upload is refused before truss reads it, and its connection closed: the rest is never read."""

from __future__ import annotations

import inspect
import json
import socket
import time
from urllib.parse import urlparse

import psutil
import pytest
import uvicorn
from starcoder_serving.api import body_limit
from starcoder_serving.api.http_body import MAX_BODY_BYTES

from tests.conftest import RunningServer


def test_contract_uvicorn_connections_read_the_servers_loaded_app() -> None:
    """``install`` replaces ``Server.config.loaded_app``: each new h11 connection takes its app from there."""
    assert uvicorn.__version__ == body_limit.PINNED_UVICORN
    from uvicorn.protocols.http.h11_impl import H11Protocol

    assert "self.app = config.loaded_app" in inspect.getsource(H11Protocol.__init__)


def _server_process(server: RunningServer) -> psutil.Process:
    port = urlparse(server.base_url).port
    for connection in psutil.net_connections("tcp"):
        if connection.laddr and connection.laddr.port == port and connection.status == psutil.CONN_LISTEN:
            return psutil.Process(connection.pid)
    raise AssertionError(f"nothing listens on {port}")


@pytest.mark.parametrize(("path", "shape"), [("/v1/models/model:predict", "message"), ("/v1/completions", "error")])
def test_a_300_mb_upload_is_answered_413_and_not_read(server: RunningServer, path: str, shape: str) -> None:
    process = _server_process(server)
    rss_before = process.memory_info().rss
    url = urlparse(server.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {300 * 1024 * 1024}\r\n\r\n"
        )
        sock.sendall(head.encode())
        started = time.monotonic()
        sent, answer = 0, b""
        sock.settimeout(0.05)
        chunk = b"x" * (1024 * 1024)
        while time.monotonic() - started < 10 and sent < 300 * 1024 * 1024:
            try:
                sent += sock.send(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            except TimeoutError:
                pass
            try:
                piece = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not piece:
                break
            answer += piece
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"connection: close" in rest.lower()
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert str(MAX_BODY_BYTES) in json.dumps(body) and shape in body
    assert sent < 100 * 1024 * 1024  # the server hung up long before the upload's end
    assert process.memory_info().rss - rss_before < 50 * 1024 * 1024
