"""The backend header walks built here: Python always, C when _scan.c was compiled.

Where the C one is missing its cases are skipped with the reason, never passed
silently (CI builds it: the image has gcc and Python's headers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from proxy.protocol.stream import ScanResult, scan_backend_py

Scanner = Callable[[bytes, int, bytes, int], ScanResult]

scan_backend_c: Scanner | None
try:
    from proxy.protocol._scan import scan_backend as scan_backend_c
except ImportError:  # depends on the build
    scan_backend_c = None
_c: Any = scan_backend_c
if scan_backend_c is None:
    _c = pytest.param(
        None, marks=pytest.mark.skip(reason="proxy/protocol/_scan.c was not built (no compiler?)")
    )

SCANNERS: list[Any] = [scan_backend_py, _c]
SCANNER_IDS = ["python", "c"]
