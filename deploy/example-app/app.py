"""A tiny web app that opens a new PostgreSQL connection for every request, as CGI-style
workers and serverless functions do: the load pgmux is for.

GET /         one connection, one query through $DATABASE_URL; answers JSON with the
              PostgreSQL backend that ran it (through pgmux, a few backends serve
              every request)
GET /healthz  200, without touching the database
"""

from __future__ import annotations

import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg

DATABASE_URL = os.environ.get("DATABASE_URL", "postgres://app:secret@127.0.0.1:6432/app")
PORT = int(os.environ.get("PORT", "8000"))


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.answer(200, {"ok": True})
            return
        if self.path != "/":
            self.answer(404, {"error": "try / or /healthz"})
            return
        try:
            with psycopg.connect(DATABASE_URL, connect_timeout=10) as conn:
                row = conn.execute(
                    "SELECT pg_backend_pid(), current_user, current_database(), now()::text"
                ).fetchone()
        except psycopg.Error as exc:
            self.answer(503, {"error": str(exc).strip()})
            return
        assert row is not None
        pid, user, database, now = row
        self.answer(200, {"backend_pid": pid, "user": user, "database": database, "now": now})

    def answer(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    # As PID 1 in a container, SIGTERM does nothing unless handled.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    print(f"example app on :{PORT}, database {DATABASE_URL.split('@')[-1]}", flush=True)
    server.serve_forever()
