"""``pgmux healthcheck``: GET /healthz (or /readyz) on the metrics port; exit 0 on 200.

For container HEALTHCHECKs and exec probes where there is no curl: standard library
only, and nothing of pgmux is imported, so it starts fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping

DEFAULT_PORT = 9127
# Addresses that mean "every interface": the check goes to loopback instead.
_WILDCARDS = {"", "*", "0.0.0.0"}


def default_url(path: str, environ: Mapping[str, str] = os.environ) -> str:
    """Where pgmux's metrics server listens, from the same PGMUX_METRICS_* variables
    pgmux reads: loopback unless it listens on one particular address."""
    port = environ.get("PGMUX_METRICS_LISTEN_PORT", "").strip() or str(DEFAULT_PORT)
    host = environ.get("PGMUX_METRICS_LISTEN_ADDR", "").split(",")[0].strip()
    if host in _WILDCARDS:
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def check(url: str, timeout: float) -> str | None:
    """None when ``url`` answers 200, else why not (one line)."""
    # No proxy: an HTTP_PROXY set for the application must not catch a loopback check.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read(2000).decode("utf-8", "replace")
        except OSError:
            body = ""
        finally:
            exc.close()
        detail = " ".join(body.split())
        return f"{url} answered {exc.code} {exc.reason}" + (f": {detail}" if detail else "")
    except TimeoutError:
        return f"{url} did not answer within {timeout:g} s"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            return f"{url} did not answer within {timeout:g} s"
        return f"cannot reach {url}: {reason}"
    if status != 200:
        return f"{url} answered {status}"
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pgmux healthcheck",
        description="Exit 0 if pgmux's /healthz (or /readyz) answers 200, else 1 with the "
        "reason on stderr. The default URL is http://127.0.0.1:$PGMUX_METRICS_LISTEN_PORT "
        f"(default {DEFAULT_PORT}), or $PGMUX_METRICS_LISTEN_ADDR when that is one address.",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--url", help="check this URL instead")
    which.add_argument(
        "--ready", action="store_true", help="check /readyz (ready for clients) not /healthz"
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)"
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # Docker reserves exit code 2 in HEALTHCHECK; argparse uses it for usage errors.
        return 0 if exc.code in (0, None) else 1
    url = args.url or default_url("/readyz" if args.ready else "/healthz")
    problem = check(url, args.timeout)
    if problem is not None:
        print(f"pgmux healthcheck: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
