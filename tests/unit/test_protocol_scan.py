"""scan_backend, the server stream's header walk, in C and in Python: the same answers.

BackendStream's own tests (test_protocol_stream.py) run through both as well; here
each stop reason is pinned down directly, and random streams are walked by both.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from support.scanners import SCANNER_IDS, SCANNERS, Scanner, scan_backend_c

from proxy.protocol import messages
from proxy.protocol.stream import (
    STOP_BAD_LENGTH,
    STOP_HOLD,
    STOP_SKIP,
    interesting_table,
    scan_backend_py,
)

ZE = interesting_table(b"ZE")
MAX = 1 << 20
ROW = messages.message(b"D", b"\0\1\0\0\0\1" + b"1")  # 12 bytes
READY = messages.ready_for_query(ord("I"))  # 6 bytes


@pytest.fixture(params=SCANNERS, ids=SCANNER_IDS)
def scan(request: pytest.FixtureRequest) -> Scanner:
    scanner: Scanner = request.param
    return scanner


def test_whole_messages(scan: Scanner) -> None:
    data = ROW * 3 + READY
    assert scan(data, 0, ZE, MAX) == (len(data), [(ord("Z"), 36, 42)], STOP_HOLD, 0)


def test_nothing_interesting_gives_none(scan: Scanner) -> None:
    assert scan(ROW * 2, 0, ZE, MAX) == (24, None, STOP_HOLD, 0)


def test_starts_at_pos(scan: Scanner) -> None:
    data = b"junk" + ROW + READY
    assert scan(data, 4, ZE, MAX) == (len(data), [(ord("Z"), 16, 22)], STOP_HOLD, 0)


@pytest.mark.parametrize("cut", [1, 4, 5])
def test_partial_header_or_interesting_message_holds(scan: Scanner, cut: int) -> None:
    data = ROW + READY[:cut]
    assert scan(data, 0, ZE, MAX) == (12, None, STOP_HOLD, 0)


def test_partial_uninteresting_message_skips_the_rest(scan: Scanner) -> None:
    data = READY + ROW[:7]
    assert scan(data, 0, ZE, MAX) == (6, [(ord("Z"), 0, 6)], STOP_SKIP, 5)


@pytest.mark.parametrize("length", [0, 3, MAX + 1, 0xFFFFFFFF])
def test_bad_length(scan: Scanner, length: int) -> None:
    data = ROW + b"D" + struct.pack("!I", length) + b"xxxx"
    assert scan(data, 0, ZE, MAX) == (12, None, STOP_BAD_LENGTH, length)


def test_largest_allowed_length(scan: Scanner) -> None:
    data = messages.message(b"D", b"x" * 96)  # length 100
    assert scan(data, 0, ZE, 100) == (101, None, STOP_HOLD, 0)
    assert scan(data, 0, ZE, 99)[2:] == (STOP_BAD_LENGTH, 100)


def test_empty_and_end(scan: Scanner) -> None:
    assert scan(b"", 0, ZE, MAX) == (0, None, STOP_HOLD, 0)
    assert scan(ROW, 12, ZE, MAX) == (12, None, STOP_HOLD, 0)


def _random_stream(rng: random.Random) -> bytes:
    out = bytearray()
    for _ in range(rng.randrange(0, 30)):
        typ = rng.choice(b"DZECTSGdA")
        if rng.random() < 0.03:
            out += bytes([typ]) + struct.pack("!I", rng.choice([0, 3, 1 << 31]))
        else:
            out += messages.message(bytes([typ]), rng.randbytes(rng.randrange(0, 40)))
    return bytes(out)


def test_c_and_python_agree_on_random_streams() -> None:
    if scan_backend_c is None:
        pytest.skip("proxy/protocol/_scan.c was not built (no compiler?)")
    rng = random.Random(1729)
    for _ in range(3000):
        data = _random_stream(rng)
        cut = rng.randrange(0, len(data) + 1)
        pos = rng.randrange(0, cut + 1)
        table = interesting_table(bytes(rng.sample(b"DZECTSGdA", rng.randrange(0, 5))))
        max_length = rng.choice([MAX, 30, 4])
        args = (data[:cut], pos, table, max_length)
        assert scan_backend_c(*args) == scan_backend_py(*args), args


@pytest.mark.skipif(scan_backend_c is None, reason="proxy/protocol/_scan.c was not built")
def test_c_refuses_bad_arguments() -> None:
    assert scan_backend_c is not None
    with pytest.raises(ValueError):
        scan_backend_c(ROW, 13, ZE, MAX)  # pos past the end
    with pytest.raises(ValueError):
        scan_backend_c(ROW, -1, ZE, MAX)
    with pytest.raises(ValueError):
        scan_backend_c(ROW, 0, b"short", MAX)
    with pytest.raises(TypeError):
        scan_backend_c(ROW, 0, ZE)  # type: ignore[call-arg]
    buffer: Any = bytearray(ROW)  # any buffer, as the Python walk takes
    assert scan_backend_c(buffer, 0, ZE, MAX) == (12, None, STOP_HOLD, 0)
