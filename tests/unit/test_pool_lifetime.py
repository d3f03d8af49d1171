"""server_lifetime's jitter: when each server retires, drawn once as it connects."""

from __future__ import annotations

from proxy.pool import lifetime_end


def test_each_server_retires_within_the_last_tenth_of_server_lifetime() -> None:
    ends = [lifetime_end(100.0, 3600.0) for _ in range(1000)]
    assert all(100.0 + 3240.0 <= end <= 100.0 + 3600.0 for end in ends)
    assert max(ends) - min(ends) > 300  # spread, not one moment for all
    assert lifetime_end(100.0, 0) == float("inf")  # server_lifetime = 0: no limit
