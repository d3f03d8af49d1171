"""Command line: ``pgmux --config PATH`` runs the proxy; ``--check`` only validates."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable

from . import __version__
from .app import App
from .config import ConfigError, load_config
from .tls import client_facing_context, server_facing_context

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

    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )
    app = App(config)
    try:
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
