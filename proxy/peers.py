"""The whole instance from any one process: with ``workers`` > 1, each worker answers
the others (and the supervisor) on a private unix socket with its snapshot, or by
running a control command on its part of the instance.

``Console`` is what the admin console talks to: SHOW reports every worker and PAUSE,
KILL, RELOAD ... act on every worker, whichever one the admin's connection landed on.
A request is one JSON line; the answer is one JSON document, then the connection
closes. The sockets live in the supervisor's 0700 directory beside the cancel sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, cast

from .control import Cancelled, LocalControl, parse_client_id
from .errors import AdminError
from .oneshot import OneShot
from .pool import Registry
from .snapshot import Snapshot, merge, take

log = logging.getLogger("pgmux.peers")

SNAPSHOT_TIMEOUT = 5.0  # seconds a worker may take to answer for its snapshot


def peer_socket_path(worker_dir: str, index: int) -> str:
    return f"{worker_dir}/control-{index}.sock"


@dataclass
class Answer:
    """What the instance answered: a snapshot or a tag, and what to tell the admin."""

    snapshot: Snapshot | None = None
    tag: str = ""
    notices: list[str] = field(default_factory=list)


async def ask_worker(worker_dir: str, index: int, request: dict[str, Any],
                     timeout: float | None) -> dict[str, Any]:  # fmt: skip
    """One request to worker ``index``; raises OSError or TimeoutError if it cannot
    answer (it is restarting, say)."""
    path = peer_socket_path(worker_dir, index)
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
    if not data:
        raise OSError(f"worker {index} closed the connection without an answer")
    return cast(dict[str, Any], json.loads(data))


async def gather_snapshots(
    worker_dir: str, workers: range | list[int], parts: list[str]
) -> tuple[list[Snapshot], list[str]]:
    """Snapshots of the given workers, and a line for each that did not answer."""
    request = {"op": "snapshot", "parts": parts}
    indexes = list(workers)
    results = await asyncio.gather(
        *(ask_worker(worker_dir, i, request, SNAPSHOT_TIMEOUT) for i in indexes),
        return_exceptions=True,
    )
    snaps: list[Snapshot] = []
    missing = []
    for index, result in zip(indexes, results, strict=True):
        if isinstance(result, BaseException):
            missing.append(f"worker {index} did not answer: {result!r}")
        else:
            snaps.append(result["snapshot"])
    return snaps, missing


class Console:
    """The instance as the admin console sees it (this process, and its peers)."""

    def __init__(self, registry: Registry, control: LocalControl) -> None:
        self.registry = registry
        self.control = control

    @property
    def others(self) -> list[int]:
        registry = self.registry
        return [i for i in range(registry.config.workers) if i != registry.worker]

    async def snapshot(self, parts: list[str]) -> Answer:
        own = take(self.registry, parts)
        if not self.others:
            return Answer(snapshot=own)
        snaps, missing = await gather_snapshots(self.registry.worker_dir, self.others, parts)
        for line in missing:
            log.warning("%s", line)
        return Answer(snapshot=merge([own, *snaps]), notices=missing)

    async def command(self, command: str, arg: str | None, cancelled: asyncio.Event) -> Answer:
        """Run a control command on every worker (KILL_CLIENT: on the one holding the
        client). Raises AdminError when it failed everywhere it ran."""
        registry = self.registry
        targets = [registry.worker, *self.others]
        if command == "kill_client" and registry.config.workers > 1:
            targets = [parse_client_id(arg) % registry.config.workers]
        jobs = [
            self.control.run(command, arg, cancelled)
            if index == registry.worker
            else self._remote(index, command, arg, cancelled)
            for index in targets
        ]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        answer = Answer()
        errors: list[AdminError] = []
        for index, result in zip(targets, results, strict=True):
            if isinstance(result, Cancelled):
                raise result
            if isinstance(result, AdminError):
                errors.append(result)
                if len(targets) > 1:
                    answer.notices.append(f"worker {index}: {result.message}")
            elif isinstance(result, BaseException):
                answer.notices.append(f"worker {index} did not answer: {result!r}")
                log.warning("%s on worker %d failed: %r", command, index, result)
            else:
                answer.tag = answer.tag or result
        if errors and not answer.tag:
            raise errors[0]
        if not answer.tag:
            raise AdminError(f"{command.upper()} failed: no worker answered",
                             hint="; ".join(answer.notices))  # fmt: skip
        return answer

    async def _remote(
        self, index: int, command: str, arg: str | None, cancelled: asyncio.Event
    ) -> str:
        request = {"op": "control", "command": command, "arg": arg}
        ask = asyncio.ensure_future(ask_worker(self.registry.worker_dir, index, request, None))
        stop = asyncio.ensure_future(cancelled.wait())
        try:
            await asyncio.wait((ask, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not ask.done():
            ask.cancel()  # closing the connection cancels it there too
            with contextlib.suppress(asyncio.CancelledError):
                await ask
            raise Cancelled()
        reply = ask.result()
        if reply.get("cancelled"):
            raise Cancelled()
        if not reply["ok"]:
            raise AdminError(reply["error"], hint=reply.get("hint"), sqlstate=reply["sqlstate"])
        return str(reply["tag"])


class PeerListener(OneShot):
    """One connection on this worker's private socket: one request, one answer.

    Only pgmux's own processes can connect (the supervisor's 0700 directory). If the
    asking side goes away while a command waits (its admin cancelled), it is cancelled.
    """

    def __init__(self, registry: Registry, control: LocalControl) -> None:
        super().__init__()
        self.registry = registry
        self.control = control
        self.cancelled = asyncio.Event()

    def request(self, head: bytes) -> None:
        try:
            request = json.loads(head)
        except ValueError:
            self._reply({"ok": False, "error": "not a JSON request", "sqlstate": "08P01"})
            return
        self.start(self._serve(request))

    def too_long(self) -> None:
        self._reply({"ok": False, "error": "request too long", "sqlstate": "08P01"})

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancelled.set()

    async def _serve(self, request: dict[str, Any]) -> None:
        try:
            if request.get("op") == "snapshot":
                self._reply({"ok": True, "snapshot": take(self.registry, request["parts"])})
                return
            if request.get("op") != "control":
                raise AdminError(f"unknown peer request {request.get('op')!r}")
            tag = await self.control.run(request["command"], request["arg"], self.cancelled)
            self._reply({"ok": True, "tag": tag})
        except Cancelled:
            self._reply({"ok": False, "cancelled": True, "error": "cancelled", "sqlstate": "57014"})
        except AdminError as exc:
            self._reply(
                {"ok": False, "error": exc.message, "hint": exc.hint, "sqlstate": exc.sqlstate}
            )
        except Exception as exc:  # a bug must not leave the asking worker waiting
            log.exception("peer request %r failed", request)
            self._reply({"ok": False, "error": f"internal error: {exc!r}", "sqlstate": "XX000"})

    def _reply(self, answer: dict[str, Any]) -> None:
        self.reply(json.dumps(answer).encode())
