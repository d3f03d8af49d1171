"""Command line: ``pgmux --config PATH`` runs the proxy; ``--check`` only validates.

With ``workers`` > 1 this process becomes the supervisor (workers.py), which starts
the workers as ``python -m proxy`` again with the hidden ``--worker...`` arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable

from . import __version__
from .app import App, StartupError
from .config import ConfigError, load_config
from .logs import setup_logging
from .tls import client_facing_context, server_facing_context
from .workers import WorkerSlot, run_supervisor

log = logging.getLogger("pgmux")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pgmux", description="PostgreSQL connection pooler (transaction pooling)"
    )
    parser.add_argument("--config", "-c", required=True, help="path to the TOML config file")
    parser.add_argument(
        "--check", action="store_true", help="validate the config file and exit (0 = valid)"
    )
    parser.add_argument("--version", action="version", version=f"pgmux {__version__}")
    # Set by the supervisor when it starts a worker (see workers.py); not for people.
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--worker-control-fd", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--worker-unix-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    try:
        config = load_config(args.config)
        # TLS files are loaded here too, so --check catches a bad key or certificate.
        client_facing_context(config)
        server_facing_context(config)
    except ConfigError as exc:
        print(f"pgmux: invalid configuration: {exc}", file=sys.stderr)
        return 1
    if args.check:
        print(
            f"pgmux: {args.config} is valid: {len(config.databases)} database(s), "
            f"{len(config.users)} user(s), listen {config.listen_addr}:{config.listen_port}"
        )
        return 0

    worker: WorkerSlot | None = None
    if args.worker is not None:
        worker = WorkerSlot(
            index=args.worker,
            count=args.worker_count,
            directory=args.worker_dir,
            control_fd=args.worker_control_fd,
            unix_fd=args.worker_unix_fd,
        )
    setup_logging(config, args.worker)
    try:
        if worker is None and config.workers > 1:
            return run_supervisor(config, args.config)
        app = App(config, worker)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(app.run())
    except OSError as exc:
        log.error(
            "cannot listen on %s:%s: %s (listen_addr/listen_port in %s)",
            config.listen_addr,
            config.listen_port,
            exc.strerror or exc,
            args.config,
        )
        return 1
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (the default), plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed; running on the slower asyncio event loop")
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    sys.exit(main())
