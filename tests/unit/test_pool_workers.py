"""The registry under workers = N: its share of each limit, and cancel keys naming it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from proxy.config import parse_config
from proxy.pool import PID_LIMIT, RANDOM_CHUNK, Registry


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _registry(loop: asyncio.AbstractEventLoop, workers: int, worker: int) -> Registry:
    config = parse_config(
        {
            "workers": workers,
            "default_pool_size": 5,
            "min_pool_size": 1,
            "max_client_conn": 9,
            "databases": {"app": {}, "big": {"pool_size": 40, "min_pool_size": 3}},
            "users": {"solo": {"pool_size": 1}},
        }
    )
    return Registry(config, loop, worker=worker)


@pytest.mark.parametrize(("workers", "worker"), [(1, 0), (2, 0), (2, 1), (3, 2), (64, 63)])
def test_cancel_pids_name_the_worker(
    loop: asyncio.AbstractEventLoop, workers: int, worker: int
) -> None:
    registry = _registry(loop, workers, worker)
    pids = {registry.register_cancel_key(object())[0] for _ in range(2000)}
    assert len(pids) == 2000  # unique among live clients
    assert len(registry.cancel_keys) == 2000
    assert all(0 < pid < PID_LIMIT and pid % workers == worker for pid in pids)
    assert max(pids) > PID_LIMIT // 2  # still random over the whole range


def test_random_bytes_are_read_in_chunks_and_never_reused(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Cancel keys and SCRAM nonces come from one buffer of OS randomness: each byte is
    handed out once, and a request larger than the buffer still gets fresh bytes."""
    registry = _registry(loop, 1, 0)
    taken = [registry.random_bytes(18) for _ in range(RANDOM_CHUNK // 18 * 3)]
    assert all(len(chunk) == 18 for chunk in taken)
    assert len(set(taken)) == len(taken)
    big = registry.random_bytes(RANDOM_CHUNK * 2)
    assert len(big) == RANDOM_CHUNK * 2 and big not in b"".join(taken)
    keys = {registry.register_cancel_key(object())[1] for _ in range(1000)}
    assert len(keys) > 990 and max(keys) > 2**31  # secret keys span the 32 bits


@pytest.mark.parametrize(
    ("worker", "expected"),
    # (app/x pool, min), (big/x pool, min), solo's pool, max_client_conn
    [(0, ((3, 1), (20, 2), 1, 5)), (1, ((2, 0), (20, 1), 1, 4))],
)
def test_each_worker_gets_its_share(
    loop: asyncio.AbstractEventLoop, worker: int, expected: tuple[object, ...]
) -> None:
    registry = _registry(loop, 2, worker)
    config = registry.config
    app = registry.pool_for(config.databases["app"], "x", None).settings
    big = registry.pool_for(config.databases["big"], "x", None).settings
    solo = registry.pool_for(config.databases["big"], "solo", None).settings
    got = ((app.pool_size, app.min_pool_size), (big.pool_size, big.min_pool_size))
    assert (*got, solo.pool_size, registry.max_client_conn) == expected


def test_one_worker_gets_everything(loop: asyncio.AbstractEventLoop) -> None:
    registry = _registry(loop, 1, 0)
    pool = registry.pool_for(registry.config.databases["big"], "x", None)
    assert (pool.settings.pool_size, pool.settings.min_pool_size) == (40, 3)
    assert registry.max_client_conn == 9
