"""The one retry policy every transport uses.

Exponential backoff with full jitter; a per-chunk attempt budget that resets
when bytes arrive (a long read that keeps making progress is not failing); a
per-chunk deadline; and a cap on retries in flight across the whole load, so a
struggling server is not hammered by every chunk at once.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from contextlib import AsyncExitStack
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Awaitable, Callable, TypeVar

from ..config import RetryConfig
from ..errors import TransferError
from ..redact import redact_text
from ..trace import Trace

T = TypeVar("T")


# 5xx is the server's trouble and worth a retry (CDNs add 52x: origin down, timed out), except the
# answers that will never change: 501 Not Implemented, 505 HTTP Version Not Supported, 511 a captive portal.
RETRY_STATUSES = {408, 429} | set(range(500, 600)) - {501, 505, 511}


def retry_after(headers) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait: delta-seconds or an HTTP-date (RFC 9110); None if absent
    or unreadable. Header names are matched without regard to case."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class Transient(Exception):
    """Raised inside a transport for a failure worth retrying. Never raised to the caller: when the budget is
    spent, ``TransferError`` chains its underlying error, or the Transient itself when there is none (a server's
    answer, such as a 503: its message says which)."""

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(redact_text(message))  # it is chained to the TransferError, and printed with it
        self.retry_after = retry_after


class Fatal(Exception):
    """Raised inside a transport for a failure no retry can mend (the process is out of file descriptors, a
    redirect loop): the load fails at once, with a ``TransferError`` naming the URL and byte range."""


class RetryPolicy:
    """Per load: holds the retry semaphore; ``run`` retries one operation."""

    def __init__(self, config: RetryConfig, trace: Trace, rng: random.Random | None = None,
                 requests: int | None = None):
        self.config = config
        self.trace = trace
        self._slots = asyncio.Semaphore(config.max_concurrent_retries)
        # The load's requests in flight (``max_concurrency``), across all its transports: the size probes and
        # header reads of a sharded checkpoint are gathered over every shard at once.
        self._requests = asyncio.Semaphore(requests) if requests else None
        self._rng = rng or random.Random()

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt))."""
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * (2 ** min(attempt, 30)))
        return self._rng.uniform(0, cap)

    async def run(
        self,
        op: Callable[[], Awaitable[T]],
        *,
        url: str,
        byte_range: tuple[int, int] | None,
        progress: Callable[[], int] = lambda: 0,
        request: bool = False,
    ) -> T:
        """Run ``op`` until it succeeds, raises a non-transient error, or the budget is spent.

        The budget is ``max_attempts`` attempts without progress (it resets when
        bytes arrive) and ``deadline_s`` of wall time for all attempts together,
        the one in flight included; waiting for a turn (a retry slot, or with
        ``request`` one of the load's request slots) is not an attempt and does
        not count. Exhausting it raises :class:`TransferError` naming the URL,
        byte range and attempts, chained to the last cause.
        """
        cfg = self.config
        started = time.monotonic()
        deadline = None if cfg.deadline_s is None else started + cfg.deadline_s
        attempts = 0  # attempts since the last progress
        total = 0
        last_progress = progress()
        while True:
            attempts += 1
            total += 1
            try:
                async with AsyncExitStack() as turn:
                    asked = time.monotonic()
                    if total > 1:
                        await turn.enter_async_context(self._slots)  # retries are capped across the load
                    if request and self._requests is not None:
                        await turn.enter_async_context(self._requests)
                    if deadline is not None:
                        deadline += time.monotonic() - asked
                    return await self._attempt(op, deadline)
            except Fatal as exc:
                cause = exc.__cause__ or exc
                raise TransferError(str(exc), url=url, byte_range=byte_range, attempts=total) from cause
            except Transient as exc:
                now_progress = progress()
                if now_progress > last_progress:
                    attempts, last_progress = 1, now_progress
                delay = self.backoff(attempts)
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, cfg.backoff_max_s))
                # Out of time when the next attempt could not start before the deadline: say so now, with
                # this attempt's cause, rather than sleep to the deadline and fail an attempt never made.
                out_of_time = deadline is not None and time.monotonic() + delay >= deadline
                if attempts >= cfg.max_attempts or out_of_time:
                    why = f"deadline of {cfg.deadline_s:g} s reached" if out_of_time else "retries exhausted"
                    raise TransferError(f"{why}: {exc}", url=url, byte_range=byte_range,
                                        attempts=total) from (exc.__cause__ or exc)
                self.trace.count("retries")
                await asyncio.sleep(delay)

    @staticmethod
    async def _attempt(op: Callable[[], Awaitable[T]], deadline: float | None) -> T:
        if deadline is None:
            return await op()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Transient("no time left for another attempt")
        if sys.version_info < (3, 11):  # pragma: no cover - no asyncio.timeout before 3.11
            try:
                return await asyncio.wait_for(op(), remaining)
            except asyncio.TimeoutError:
                if time.monotonic() < deadline:
                    raise  # the operation's own timeout, not the deadline
                raise Transient("attempt cut off at the deadline") from None
        # Not wait_for: on 3.11 it returns the result, and loses the cancel, when the operation ends in the
        # same turn of the loop as the task is cancelled (a Ctrl-C or a closed stream, as a chunk completes).
        try:
            async with asyncio.timeout(remaining) as limit:
                return await op()
        except TimeoutError:
            if not limit.expired():
                raise  # the operation's own timeout, not the deadline
            raise Transient("attempt cut off at the deadline") from None
