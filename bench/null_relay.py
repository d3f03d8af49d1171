"""The floor under any Python pooler: a do-nothing uvloop TCP relay, measured with pgbench.

Each client connection gets its own upstream connection to PostgreSQL, and bytes are
forwarded both ways with ``transport.write`` and nothing else: no parsing, no pooling.
Whatever CPU this costs per transaction, every asyncio/uvloop proxy pays too (the
event loop, two reads and two writes per transaction); pgmux's own work comes on top.

    .venv/bin/python bench/null_relay.py              # pgbench -S -c 50 -j 2 -T 8
    .venv/bin/python bench/null_relay.py --serve PORT UPSTREAM_PORT   # the relay alone
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


class _Upstream(asyncio.Protocol):
    def __init__(self, down: _Downstream) -> None:
        self.down = down
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.down.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.transport.close()


class _Downstream(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.transport: Any = None
        self.up: _Upstream | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(lambda: _Upstream(self), HOST, self.upstream_port)
        for chunk in self.early:
            up.transport.write(chunk)
        self.up = up

    def data_received(self, data: bytes) -> None:
        if self.up is None:
            self.early.append(data)
        else:
            self.up.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.transport.close()


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: _Downstream(upstream_port), HOST, port)
    await asyncio.Event().wait()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(duration: int, clients: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from support.pgcluster import APP_DB, APP_PASSWORD, APP_USER, PgCluster, free_port

    cluster = PgCluster.create({"max_connections": str(clients + 20)})
    relay: subprocess.Popen[bytes] | None = None
    try:
        pgbench = str(cluster.bindir / "pgbench")
        env = dict(os.environ, PGPASSWORD=APP_PASSWORD)
        conn = ["-h", HOST, "-U", APP_USER, APP_DB]
        init = [pgbench, "-i", "-q", "-s", "10", "-p", str(cluster.port), *conn]
        subprocess.run(init, env=env, check=True, capture_output=True)
        port = free_port()
        serve_args = ["--serve", str(port), str(cluster.port)]
        relay = subprocess.Popen([sys.executable, __file__, *serve_args])
        time.sleep(1)
        for name, target in (("direct", cluster.port), ("null relay", port)):
            before = _cpu_seconds(relay.pid)
            run = subprocess.run(
                [pgbench, "-n", "-S", "-c", str(clients), "-j", "2", "-T", str(duration),
                 "-p", str(target), *conn],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            done = [line for line in run.stdout.splitlines() if "actually processed" in line]
            transactions = int(done[0].split()[-1])
            spent = _cpu_seconds(relay.pid) - before
            line = f"{name:10} {transactions / duration:9,.0f} tps"
            if target == port:
                line += f", relay CPU {spent / transactions * 1e6:.1f} µs per transaction"
            print(line)
    finally:
        if relay is not None:
            relay.kill()
            relay.wait()
        cluster.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--serve", nargs=2, type=int, metavar=("PORT", "UPSTREAM_PORT"))
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(serve(*args.serve))
    else:
        measure(args.duration, args.clients)


if __name__ == "__main__":
    main()
