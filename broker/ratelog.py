"""A warning that repeats is logged once per interval, with a count, not once per request.

Under load the same trouble (the ledger out of reach, a flood of malformed
messages) would otherwise write one line per request: thousands a second that
bury everything else. :class:`RateLimitedLog` writes the first occurrence at
once, holds back the repeats, and with the next line after the interval says
how many it held back::

    could not catch up with the ledger: TimeoutError() (repeated 5,412 times in the last 60 s)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any


class RateLimitedLog:
    """One logger call per ``interval_s`` at most; the repeats in between are counted and reported."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self.suppressed = 0

    def log(self, level: int, msg: str, *args: Any, **kwargs: Any) -> bool:
        """Log now if the interval has passed since the last line, else count; return whether it logged.

        ``kwargs`` go to the logger (``exc_info=True``).
        """
        now = self._clock()
        if self._last is not None and now - self._last < self.interval_s:
            self.suppressed += 1
            return False
        if self.suppressed:
            msg += " (repeated %s times in the last %.0f s)"
            args = (*args, f"{self.suppressed:,}", now - self._last)
        self._last, self.suppressed = now, 0
        self.logger.log(level, msg, *args, **kwargs)
        return True

    def warning(self, msg: str, *args: Any) -> bool:
        """:meth:`log` at WARNING."""
        return self.log(logging.WARNING, msg, *args)
