"""Command line: ``pgmux --config PATH`` (or ``--upstream URL``) runs the proxy;
``--check`` prints the effective config; ``pgmux demo|convert|healthcheck`` are tools.

With ``workers`` > 1 this process becomes the supervisor (workers.py), which starts
the workers as ``python -m proxy`` again with the hidden ``--worker...`` arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Callable

from . import __version__
from .app import App, StartupError
from .config import ConfigError
from .config_sources import ConfigSource, describe
from .logs import setup_logging
from .tls import client_facing_context, server_facing_context
from .workers import WorkerSlot, run_supervisor

log = logging.getLogger("pgmux")


# Commands beside running the proxy: ``pgmux NAME ...`` runs ``proxy.NAME.main(args)``.
SUBCOMMANDS = {
    "demo": "see the problem solved: 500 clients against PostgreSQL with max_connections = "
    "20, straight and through pgmux",
    "convert": "write a pgbouncer.ini (with its %include files) as pgmux TOML",
    "healthcheck": "exit 0 if the local pgmux answers /healthz (for HEALTHCHECK and probes)",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(f".{argv[0]}", __package__)
        run: Callable[[list[str]], int] = module.main
        return run(argv[1:])
    parser = argparse.ArgumentParser(
        prog="pgmux",
        description="PostgreSQL connection pooler (transaction pooling)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "".join(f"  pgmux {name:<12} {text}\n" for name, text in SUBCOMMANDS.items())
        + "\nsources, later ones winning: defaults < the file < --upstream < PGMUX_<KEY> "
        "environment variables < --set",
    )
    parser.add_argument("--config", "-c", help="the TOML config file (default: $PGMUX_CONFIG)")
    parser.add_argument(
        "--pgbouncer-ini",
        metavar="FILE",
        help="run from a PgBouncer config instead (default: $PGMUX_PGBOUNCER_INI)",
    )
    parser.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="URL",
        help="postgres://user:password@host:5432/dbname: proxy that database for that user "
        "(repeatable; default: $PGMUX_UPSTREAM; prefer the variable, argv shows in ps)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any key, e.g. default_pool_size=10 or databases.app.pool_size=5",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="print the effective config (passwords masked) and exit: 0 = valid",
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
        source = ConfigSource.from_command_line(
            file=args.config,
            pgbouncer_ini=args.pgbouncer_ini,
            upstreams=args.upstream,
            sets=args.set,
            environ=os.environ,
        )
        loaded = source.load()
        config = loaded.config
        # TLS files are loaded here too, so --check catches a bad key or certificate.
        client_facing_context(config)
        server_facing_context(config)
    except ConfigError as exc:
        print(f"pgmux: invalid configuration: {exc}", file=sys.stderr)
        return 1
    if args.check:
        for note in loaded.notes:
            print(f"pgmux: note: {note}", file=sys.stderr)
        for warning in loaded.warnings:
            print(f"pgmux: warning: {warning}", file=sys.stderr)
        print(
            f"# pgmux: {source.name} is valid: {len(config.databases)} database(s), "
            f"{len(config.users)} user(s), listen {config.listen_addr}:{config.listen_port}\n"
            "# The effective configuration; a comment names where a value came from "
            "(none: the default).\n"
        )
        print(describe(loaded), end="")
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
    if worker is None:  # a worker's supervisor has said these already
        for note in loaded.notes:
            log.info("%s", note)
        for warning in loaded.warnings:
            log.warning("%s", warning)
    try:
        if worker is None and config.workers > 1:
            return run_supervisor(config, source)
        app = App(config, worker, source)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(app.run())
    except OSError as exc:
        log.error(
            "cannot listen on %s:%s: %s (listen_addr/listen_port in %s)",
            config.listen_addr,
            config.listen_port,
            exc.strerror or exc,
            source.name,
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
