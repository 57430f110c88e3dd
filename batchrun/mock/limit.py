"""The embedded endpoint's rate limits: the rpm limit it can enforce
(:attr:`MockConfig.rpm_limit`) and the headers its 429s carry.

Headers as OpenAI-compatible servers send them: ``Retry-After`` (seconds), with
``--send-retry-after-ms`` also ``retry-after-ms`` (and ``Retry-After`` then in
whole seconds, rounded up, as HTTP has it), and with a limit enforced the
``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests`` and
``x-ratelimit-reset-requests`` of the budget on every answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Final

JSON_HEADERS: Final = {"Content-Type": "application/json"}

LIMIT_BURST_S: Final = 1.0
"""The rpm limit's bucket holds this many seconds' worth of requests (at least one)."""


def format_number(value: float) -> str:
    """Format a non-negative number compactly for a header: 1.0 -> "1", 0.05 -> "0.05".

    Goes through ``Decimal(repr(x))`` so tiny values are written positionally
    ("0.0000001") instead of in exponent form, which HTTP clients do not parse.
    """
    text = format(Decimal(repr(float(value))), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def retry_after_headers(seconds: float, with_ms: bool) -> dict[str, str]:
    """The JSON content type and the wait a 429 asks for: ``Retry-After`` as it
    is, or (``with_ms``) in whole seconds rounded up plus the exact
    ``retry-after-ms``."""
    if not with_ms:
        return {**JSON_HEADERS, "Retry-After": format_number(seconds)}
    return {
        **JSON_HEADERS,
        "Retry-After": str(math.ceil(seconds)),
        "retry-after-ms": str(round(seconds * 1000)),
    }


class RequestLimit:
    """``per_minute`` requests a minute, enforced as a bucket that holds
    ``LIMIT_BURST_S`` seconds' worth and refills evenly: a request that finds
    less than one request's worth left is refused (and takes nothing)."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * LIMIT_BURST_S)
        self.level = self.capacity
        self.clock = clock
        self._at = clock()
        self._limit = format_number(per_minute)

    def take(self) -> bool:
        """Admit one request now (True), or refuse it: the budget is spent."""
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self._at) * self.rate)
        self._at = now
        if self.level < 1.0:
            return False
        self.level -= 1.0
        return True

    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.capacity - self.level) / self.rate

    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-*-requests`` headers of the budget as it is now."""
        return {
            "x-ratelimit-limit-requests": self._limit,
            "x-ratelimit-remaining-requests": str(int(self.level)),
            "x-ratelimit-reset-requests": format_number(round(self.reset_s(), 3)) + "s",
        }
