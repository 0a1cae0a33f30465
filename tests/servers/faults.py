"""Fault rules for the test HTTP servers.

A ``Faults`` object holds rules that can be added and cleared while a server is
running.  For every request a server asks ``faults.plan(method, path)``
for a ``FaultPlan``: what to do before answering (fail, hang, wait), how to
rewrite the request before the real answer is produced (drop ``Range``), and how
to distort the answer (headers, a truncated body).  The I/O that carries a plan
out lives in one place, ``FaultInjectingHandler`` in ``http_range``; the file
server and the proxy share it.

Rules match on the request path (a glob, query string excluded) and, unless a
rule says otherwise, on GET only.  Each rule keeps two counters: ``seen`` (how
many matching requests reached it) and ``fired`` (how many it acted on); the
``Faults`` methods return the rule so tests can assert on them.
"""

from __future__ import annotations

import fnmatch
import random
import threading
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime

# Inserted before the closing quote of an ETag to mark the "replaced" object.
REPLACED_SUFFIX = "-replaced"

Headers = list[tuple[str, str]]


@dataclass
class FaultPlan:
    """What the faults decided for one request."""

    error_status: int | None = None
    retry_after: int | None = None
    hang: bool = False
    delay: float = 0.0
    drop_range: bool = False
    etag_replaced: bool = False
    content_range_shift: int = 0
    cut_after: int | None = None
    stall_when_cut: bool = False  # at the cut, send nothing more until the client leaves
    missing: int | None = None

    @property
    def distorts_body(self) -> bool:
        return self.cut_after is not None or self.missing is not None

    def error_headers(self) -> Headers:
        if self.retry_after is None:
            return []
        return [("Retry-After", str(self.retry_after))]

    def rewrite_request(self, headers: Headers) -> Headers:
        """The request headers the real handler (or upstream) should see.

        May set ``error_status`` to 412 when a replaced object no longer
        matches the client's ``If-Match``.
        """
        out: Headers = []
        has_stale_if_range = False
        for name, value in headers:
            lower = name.lower()
            if self.drop_range and lower in ("range", "if-range"):
                continue
            if self.etag_replaced and lower in ("if-match", "if-range"):
                if value.strip() == "*":
                    out.append((name, value))
                elif REPLACED_SUFFIX in value:
                    out.append((name, value.replace(REPLACED_SUFFIX, "")))
                elif lower == "if-match":
                    self.error_status = 412
                else:
                    has_stale_if_range = True
                continue
            out.append((name, value))
        if has_stale_if_range:
            # RFC 9110: a failed If-Range means "send the whole (new) object".
            out = [(n, v) for n, v in out if n.lower() != "range"]
        return out

    def rewrite_response(self, status: int, headers: Headers) -> Headers:
        """Distort the headers of a real answer."""
        out: Headers = []
        for name, value in headers:
            lower = name.lower()
            if self.etag_replaced and lower == "etag":
                value = _replaced_etag(value)
            elif self.etag_replaced and lower == "last-modified":
                value = _later_date(value)
            elif self.content_range_shift and lower == "content-range" and status == 206:
                value = _shift_content_range(value, self.content_range_shift)
            out.append((name, value))
        return out

    def body_limit(self, content_length: int | None) -> int | None:
        """How many body bytes to send before closing the connection, if limited."""
        limits = []
        if self.cut_after is not None:
            limits.append(self.cut_after)
        if self.missing is not None and content_length is not None:
            limits.append(max(0, content_length - self.missing))
        return min(limits) if limits else None


@dataclass(eq=False)
class Rule:
    """One fault; subclasses say how it changes a plan."""

    pattern: str = "*"
    methods: frozenset[str] = frozenset({"GET"})
    times: int | None = None
    seen: int = 0
    fired: int = 0

    # Rules run in phase order: hangs, then errors (which end the planning),
    # then everything else.  Within a phase, in the order they were added.
    phase = 2

    def matches(self, method: str, path: str) -> bool:
        return method in self.methods and fnmatch.fnmatchcase(path, self.pattern)

    def take(self) -> bool:
        """Count a matching request; True if the rule acts on it."""
        self.seen += 1
        if self.times is not None and self.fired >= self.times:
            return False
        if not self.wants_to_fire():
            return False
        self.fired += 1
        return True

    def wants_to_fire(self) -> bool:
        return True

    def apply(self, plan: FaultPlan) -> None:
        raise NotImplementedError


@dataclass(eq=False)
class Hang(Rule):
    phase = 0

    def apply(self, plan: FaultPlan) -> None:
        plan.hang = True


@dataclass(eq=False)
class HangAfter(Hang):
    """Answer the first ``after`` matching requests (the size probe, a header, a few chunks), then hang."""

    after: int = 1

    def wants_to_fire(self) -> bool:
        return self.seen > self.after


@dataclass(eq=False)
class FailWith(Rule):
    status: int = 503
    retry_after: int | None = None
    phase = 1

    def apply(self, plan: FaultPlan) -> None:
        plan.error_status = self.status
        plan.retry_after = self.retry_after


@dataclass(eq=False)
class RandomErrors(Rule):
    share: float = 0.1
    statuses: tuple[int, ...] = (500, 503, 429)
    retry_after: int | None = None
    seed: int = 0
    rng: random.Random = field(init=False, repr=False)
    phase = 1

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._status = self.statuses[0]

    def wants_to_fire(self) -> bool:
        if self.rng.random() >= self.share:
            return False
        self._status = self.rng.choice(self.statuses)
        return True

    def apply(self, plan: FaultPlan) -> None:
        plan.error_status = self._status
        plan.retry_after = self.retry_after


@dataclass(eq=False)
class IgnoreRange(Rule):
    def apply(self, plan: FaultPlan) -> None:
        plan.drop_range = True


@dataclass(eq=False)
class WrongContentRange(Rule):
    shift: int = 8

    def apply(self, plan: FaultPlan) -> None:
        plan.content_range_shift = self.shift


@dataclass(eq=False)
class CutAfter(Rule):
    nbytes: int = 0
    stall: bool = False

    def apply(self, plan: FaultPlan) -> None:
        plan.cut_after = self.nbytes if plan.cut_after is None else min(plan.cut_after, self.nbytes)
        plan.stall_when_cut = plan.stall_when_cut or self.stall


@dataclass(eq=False)
class ShortBody(Rule):
    missing: int = 1

    def apply(self, plan: FaultPlan) -> None:
        plan.missing = self.missing


@dataclass(eq=False)
class SlowFirstByte(Rule):
    seconds: float = 1.0

    def apply(self, plan: FaultPlan) -> None:
        plan.delay += self.seconds


@dataclass(eq=False)
class ChangeEtagAfter(Rule):
    """After ``after`` matching requests (GET and HEAD) the object looks replaced."""

    after: int = 0
    methods: frozenset[str] = frozenset({"GET", "HEAD"})

    def wants_to_fire(self) -> bool:
        return self.seen > self.after

    def apply(self, plan: FaultPlan) -> None:
        plan.etag_replaced = True


class Faults:
    """A thread-safe, runtime-settable set of fault rules."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[Rule] = []

    def _add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def plan(self, method: str, path: str) -> FaultPlan:
        """Decide the faults for one request (and count it)."""
        plan = FaultPlan()
        with self._lock:
            ordered = sorted(self._rules, key=lambda r: r.phase)  # stable
            for rule in ordered:
                if not rule.matches(method, path) or not rule.take():
                    continue
                rule.apply(plan)
                if plan.hang or plan.error_status is not None:
                    break
        return plan

    # -- the rules -----------------------------------------------------------

    def fail_first(self, n: int, status: int = 503, *, path: str = "*",
                   retry_after: int | None = None) -> Rule:
        """Answer the first ``n`` matching GETs with ``status``."""
        return self._add(FailWith(pattern=path, times=n, status=status, retry_after=retry_after))

    def random_errors(self, share: float, statuses: tuple[int, ...] = (500, 503, 429), *,
                      seed: int = 0, path: str = "*", retry_after: int | None = None) -> Rule:
        """Fail about ``share`` of matching GETs with a status drawn from ``statuses``."""
        return self._add(RandomErrors(pattern=path, share=share, statuses=tuple(statuses),
                                      seed=seed, retry_after=retry_after))

    def cut_after(self, nbytes: int, *, times: int | None = None, path: str = "*") -> Rule:
        """Send the headers and ``nbytes`` of body, then close the connection."""
        return self._add(CutAfter(pattern=path, times=times, nbytes=nbytes))

    def stall_after(self, nbytes: int, *, times: int | None = None, path: str = "*") -> Rule:
        """Send the headers and ``nbytes`` of body, then send nothing more until the client leaves."""
        return self._add(CutAfter(pattern=path, times=times, nbytes=nbytes, stall=True))

    def ignore_range(self, *, times: int | None = None, path: str = "*") -> Rule:
        """Answer ranged GETs with 200 and the whole body."""
        return self._add(IgnoreRange(pattern=path, times=times))

    def wrong_content_range(self, shift: int = 8, *, times: int | None = None,
                            path: str = "*") -> Rule:
        """Send the requested bytes under a Content-Range shifted by ``shift``."""
        return self._add(WrongContentRange(pattern=path, times=times, shift=shift))

    def short_body(self, missing: int = 1, *, times: int | None = None, path: str = "*") -> Rule:
        """Declare the full Content-Length, send ``missing`` bytes fewer, close."""
        return self._add(ShortBody(pattern=path, times=times, missing=missing))

    def slow_first_byte(self, seconds: float, *, times: int | None = None,
                        path: str = "*") -> Rule:
        """Wait ``seconds`` before sending the status line."""
        return self._add(SlowFirstByte(pattern=path, times=times, seconds=seconds))

    def change_etag_after(self, n: int, *, path: str = "*") -> Rule:
        """After ``n`` requests the object reports a new ETag and Last-Modified.

        Stale ``If-Match`` then gets 412 and stale ``If-Range`` the whole body,
        as if the object had been replaced (its bytes stay the same).
        """
        return self._add(ChangeEtagAfter(pattern=path, after=n))

    def hang(self, *, times: int | None = None, path: str = "*") -> Rule:
        """Read the request, then send nothing until the server stops."""
        return self._add(Hang(pattern=path, times=times))


def _replaced_etag(etag: str) -> str:
    if REPLACED_SUFFIX in etag:
        return etag
    if etag.endswith('"'):
        return etag[:-1] + REPLACED_SUFFIX + '"'
    return etag + REPLACED_SUFFIX


def _later_date(http_date: str) -> str:
    try:
        when = parsedate_to_datetime(http_date).timestamp()
    except (TypeError, ValueError):
        return formatdate(usegmt=True)
    return formatdate(when + 3600, usegmt=True)


def _shift_content_range(value: str, shift: int) -> str:
    try:
        unit, rest = value.split(" ", 1)
        span, size = rest.split("/", 1)
        start, end = (int(x) for x in span.split("-", 1))
    except ValueError:
        return value
    return f"{unit} {start + shift}-{end + shift}/{size}"
