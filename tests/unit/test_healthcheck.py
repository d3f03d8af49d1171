"""``python -m proxy.healthcheck`` (the image's HEALTHCHECK): which URL it asks, and its
exit code and one-line reason against a small HTTP server that answers as told."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from proxy.healthcheck import default_url, main


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({}, "http://127.0.0.1:9127/healthz"),
        ({"PGMUX_METRICS_LISTEN_PORT": "9200"}, "http://127.0.0.1:9200/healthz"),
        ({"PGMUX_METRICS_LISTEN_ADDR": "0.0.0.0"}, "http://127.0.0.1:9127/healthz"),
        ({"PGMUX_METRICS_LISTEN_ADDR": "*"}, "http://127.0.0.1:9127/healthz"),
        ({"PGMUX_METRICS_LISTEN_ADDR": "10.1.2.3"}, "http://10.1.2.3:9127/healthz"),
        ({"PGMUX_METRICS_LISTEN_ADDR": "::"}, "http://[::1]:9127/healthz"),
        ({"PGMUX_METRICS_LISTEN_ADDR": "127.0.0.2,10.0.0.1"}, "http://127.0.0.2:9127/healthz"),
    ],
)
def test_default_url(env: dict[str, str], url: str) -> None:
    assert default_url("/healthz", env) == url


class _Server:
    """Answers GETs with ``status`` and ``body``; remembers the paths asked."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"ok\n"
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.paths.append(self.path)
                self.send_response(outer.status)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.delenv("PGMUX_METRICS_LISTEN_ADDR", raising=False)
    monkeypatch.setenv("PGMUX_METRICS_LISTEN_PORT", str(srv.port))
    # A proxy meant for the application must not catch the check.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        thread.join()


def test_healthy(server: _Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert server.paths == ["/healthz"]
    assert capsys.readouterr().err == ""


def test_ready_asks_readyz(server: _Server) -> None:
    assert main(["--ready"]) == 0
    assert server.paths == ["/readyz"]


def test_unhealthy_says_why_on_one_line(
    server: _Server, capsys: pytest.CaptureFixture[str]
) -> None:
    server.status = 503
    server.body = b"not ready:\npaused\nshutting down\n"
    assert main(["--ready"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "answered 503 Service Unavailable: not ready: paused shutting down" in err


def test_url_option(server: _Server) -> None:
    assert main(["--url", f"http://127.0.0.1:{server.port}/metrics"]) == 0
    assert server.paths == ["/metrics"]


def test_nothing_listening(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        assert main(["--url", f"http://127.0.0.1:{port}/healthz"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_no_answer_times_out(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()  # accepted by the kernel, never answered
        port = s.getsockname()[1]
        assert main(["--timeout", "0.3", "--url", f"http://127.0.0.1:{port}/"]) == 1
    assert "did not answer within 0.3 s" in capsys.readouterr().err


def test_usage_error_exits_1_not_2(capsys: pytest.CaptureFixture[str]) -> None:
    # Docker reserves exit code 2 in HEALTHCHECK.
    assert main(["--no-such-option"]) == 1
    assert main(["--help"]) == 0
    capsys.readouterr()


def test_runs_as_a_module(server: _Server) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "proxy.healthcheck", "--ready"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert server.paths == ["/readyz"]
