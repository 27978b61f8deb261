"""Spend counters and the store protocol: reserve an estimate in every budget window at
once, then settle it.

    store: Store = RedisStore.from_url("redis://localhost:6379/0", timeout_s=0.5)
    result = await store.reserve(rid, counters, 12_000, tz=tz, hold_ttl_s=30)
    if result.ok:
        ...  # forward the request, and every 10 s while it runs:
        await store.renew(rid, result.states, hold_ttl_s=30)
        ...
        await store.settle(rid, result.states, 9_870, hold_ttl_s=30)

A *counter* is one window (minute, hourly, daily, ...) of one scope (a tenant, one agent
of a tenant, one model cap of a tenant, or one end user of a tenant) in one *unit*:
micro-USD, tokens, or requests. For each period of its window it keeps the amount
``spent`` and the amount ``held`` by in-flight reservations. A request's ``Amounts`` give
one amount per unit; each counter takes the amount of its unit, so money, tokens and
requests are held in one call. ``reserve`` places a
hold in all counters or in none; ``settle`` replaces the hold by the actual cost exactly
once per request id (``rid``); ``record`` adds spend without a prior hold.

A hold is a *lease* of ``hold_ttl_s`` that ``renew`` extends while its request runs. A
lease that runs out (its proxy died, or stalled) is *charged*: the hold's amount moves
from held to spent, since the upstream may have billed up to it, and the amount so
charged is kept per rid. A late ``settle`` of that rid replaces the charge by the actual
cost (spent += actual - charged), still exactly once. So a hold's room comes back only
with its settle, which knows the cost, and a dead proxy's holds block others for at most
one lease. Expired leases are charged by ``reserve`` and ``renew`` when they find them;
``snapshot`` counts them as spent already. Each state reports ``holds_end``, the latest
lease expiry among its live holds: when the holds in the way end at the latest (the
basis of ``Retry-After``).

Two implementations share these semantics: ``proxy.memory_store.MemoryStore`` (one
process, one event loop) and ``proxy.redis_store.RedisStore`` (shared by every proxy
instance; standalone Redis, Cluster or Sentinel). This module imports neither.

Sums are exact up to 2**53 micro-USD (about $9 billion), Lua's integer range.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol
from zoneinfo import ZoneInfo

from proxy.history import Rejection, SpendHistory
from proxy.windows import Period, Window

__all__ = [
    "MAX_MICROS",
    "MIN_MARKER_TTL_S",
    "NO_LIMITS",
    "Amounts",
    "Counter",
    "CounterState",
    "Limits",
    "ReserveResult",
    "SeenToday",
    "Store",
    "Unit",
    "as_amounts",
    "fits",
]

MAX_MICROS = 2**53  # amounts up to this are exact in Lua's doubles
DEFAULT_EXPIRY_MARGIN_S = 300  # counters outlive their period by the hold TTL + this
MIN_MARKER_TTL_S = 60  # settle markers live max(2 x hold TTL, this)
SEEN_LIMIT_MAX = 100  # ``seen_today`` lists at most this many agents (end users)
SEEN_READ_MAX = 10_000  # ... chosen among at most this many of them (Redis: a sample)

_TENANT_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_AGENT_RE = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")
_RID_RE = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")


class Unit(StrEnum):
    """What a counter counts."""

    USD = "usd"  # micro-USD
    TOKENS = "tokens"  # prompt + completion tokens
    REQUESTS = "requests"  # admitted requests


@dataclass(frozen=True, slots=True)
class Counter:
    """One window of one scope, in one unit.

    The scope is the tenant (``agent_id``, ``model_cap`` and ``user_id`` all None), one
    agent of it, one model cap of it (all its agents' requests for the cap's models), or
    one end user of it; at most one of the three is set.
    """

    tenant_id: str
    agent_id: str | None  # None = tenant-wide scope
    window: Window
    limit: int  # hard limit, in its unit
    unit: Unit = Unit.USD
    model_cap: str | None = None
    user_id: str | None = None
    # Worked out once: counters are dict keys on every request, and the generated hash
    # would hash seven fields (two of them enums, hashed in Python) each time.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fields = (self.tenant_id, self.agent_id, self.window, self.limit, self.unit)
        object.__setattr__(self, "_hash", hash((*fields, self.model_cap, self.user_id)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[Counter], tuple[object, ...]]:
        # Rebuilt through __init__: a string's hash differs between processes.
        return Counter, (
            self.tenant_id,
            self.agent_id,
            self.window,
            self.limit,
            self.unit,
            self.model_cap,
            self.user_id,
        )

    @property
    def scope(self) -> tuple[str, str]:
        """(kind, id): ("tenant", tenant), ("agent", A), ("model", cap name), ("user", U)."""
        if self.agent_id is not None:
            return "agent", self.agent_id
        if self.model_cap is not None:
            return "model", self.model_cap
        if self.user_id is not None:
            return "user", self.user_id
        return "tenant", self.tenant_id


@dataclass(frozen=True, slots=True)
class Amounts:
    """A request's amount in each unit: what it holds, or what it is charged.

    ``Amounts(12_000)`` is 12,000 micro-USD and nothing else."""

    micros: int
    tokens: int = 0
    requests: int = 0

    def of(self, unit: Unit) -> int:
        if unit is Unit.USD:
            return self.micros
        return self.tokens if unit is Unit.TOKENS else self.requests

    def charges(self, counters: Sequence[Counter]) -> bool:
        """Whether any of ``counters`` gets a positive amount (else committing it is a
        release)."""
        return any(self.of(c.unit) > 0 for c in counters)


def as_amounts(amount: Amounts | int) -> Amounts:
    """An amount as given to a store: ``Amounts``, or an int of micro-USD."""
    return amount if isinstance(amount, Amounts) else Amounts(amount)


@dataclass(slots=True)
class CounterState:
    """A counter in one period: ``held`` counts in-flight reservations.

    ``holds_end`` is the latest lease expiry among those holds (epoch seconds, store
    clock): by then every hold now in ``held`` has been settled or charged, unless its
    request renews it. None when nothing is held (or the state was not read from a store).
    """

    counter: Counter
    period: Period
    spent: int
    held: int
    holds_end: float | None = None

    @property
    def room(self) -> int:
        """What may still be reserved (negative after an overspend)."""
        return self.counter.limit - self.spent - self.held


@dataclass(frozen=True, slots=True)
class Limits:
    """What a reservation is held to besides the counters' hard limits.

    ``max_agents``: refuse (``too_many_agents``) a request naming an agent when the tenant
    already named that many others this (UTC) day; agents whose requests cost nothing are
    not counted. ``max_users``: the same for the end users of user counters
    (``too_many_users``). ``max_concurrent``: (tenant-wide, for the request's agent) requests whose
    holds are live at once; beyond either, refused (``concurrency_limited``). A hold counts
    from its reserve to its settle, or until its lease runs out. None: no limit.
    """

    max_agents: int | None = None
    max_users: int | None = None
    max_concurrent: tuple[int | None, int | None] = (None, None)


NO_LIMITS = Limits()


@dataclass(slots=True)
class ReserveResult:
    """The decision of ``reserve``.

    ``states`` has one entry per counter, in order: after the hold when ``ok``, as found
    when rejected (nothing held; expired leases found were charged).
    """

    ok: bool
    now: float  # the store clock's time used for the decision
    states: tuple[CounterState, ...]
    amounts: Amounts = Amounts(0)
    # Refused because the tenant already named ``max_agents`` other agents today.
    too_many_agents: bool = False
    # Refused because the tenant already named ``max_users`` other end users today.
    too_many_users: bool = False
    # Refused because of requests in flight at once: "tenant" or "agent" ('' otherwise).
    concurrency_limited: str = ""
    # The tenant's epoch in the store ('' when it has none yet): it changes only when
    # the store lost the tenant's spend and it was started again.
    epoch: str = ""

    @property
    def exceeded(self) -> tuple[CounterState, ...]:
        """The states that rejected the request (empty when ``ok``)."""
        if self.ok or self.too_many_agents or self.too_many_users or self.concurrency_limited:
            return ()
        return tuple(s for s in self.states if not fits(s, self.amounts.of(s.counter.unit)))


@dataclass(frozen=True, slots=True, kw_only=True)
class SeenToday:
    """The agents and the end users a tenant named on one UTC day (``Store.seen_today``).

    ``agents`` and ``users``: the first of them in sorted order, as many as asked for;
    ``agents_total`` and ``users_total``: how many there are in all. ``day``: the start of
    the UTC day (epoch seconds, store clock). An agent is named by a request that held in
    one of its counters (and stays named unless all its requests that day cost nothing);
    an end user likewise, by its user counters.
    """

    day: int
    agents: tuple[str, ...]
    agents_total: int
    users: tuple[str, ...]
    users_total: int


def fits(state: CounterState, amount: int) -> bool:
    """Whether ``amount`` more fits under the counter's hard limit (the store's rule)."""
    return state.spent + state.held + amount <= state.counter.limit


class Store(Protocol):
    """Budget counters with atomic all-or-none holds; errors raise ``StoreUnavailable``."""

    async def reserve(
        self,
        rid: str,
        counters: Sequence[Counter],
        amount: Amounts | int,
        *,
        tz: ZoneInfo,
        hold_ttl_s: float,
        limits: Limits = NO_LIMITS,
    ) -> ReserveResult:
        """Hold ``amount`` (each counter: the amount of its unit; an int is micro-USD) in
        every counter's current period, or in none, within ``limits`` (see ``Limits``).

        Allowed when spent + held + amount <= limit in every counter, after charging
        the expired leases found. The hold is a lease of ``hold_ttl_s``. Repeating a
        reserve with a ``rid`` that already holds is answered ``ok`` without a second
        hold; a ``rid`` already settled, or whose lease ran out, is refused and holds
        nothing.
        """
        ...

    async def renew(self, rid: str, states: Sequence[CounterState], *, hold_ttl_s: float) -> bool:
        """Extend ``rid``'s lease to now + ``hold_ttl_s`` in the given periods.

        False when the hold is gone: settled, or its lease ran out and it was charged
        (a later settle still replaces that charge by the actual cost).
        """
        ...

    async def settle(
        self,
        rid: str,
        states: Sequence[CounterState],
        actual: Amounts | int,
        *,
        hold_ttl_s: float,
        tz: ZoneInfo | None = None,
    ) -> None:
        """Replace ``rid``'s hold by the actual amounts in the given periods, once per rid.

        0 releases, negative counts as 0. A hold whose lease ran out was charged its
        amount; the settle replaces that charge by the actual cost (spent += actual -
        charged, which lowers spent when the actual cost is below the hold). The actual
        cost also goes to the tenant's history, in the hour and day (local in ``tz``,
        default UTC) of the settle.
        """
        ...

    async def record(
        self,
        rid: str,
        counters: Sequence[Counter],
        actual: Amounts | int,
        *,
        tz: ZoneInfo,
        hold_ttl_s: float,
    ) -> None:
        """Add spend without a hold in the current periods (fail-open), once per rid;
        like ``settle``, it replaces a hold of ``rid`` there, or the charge of its lease."""
        ...

    async def snapshot(
        self, counters: Sequence[Counter], *, tz: ZoneInfo
    ) -> tuple[CounterState, ...]:
        """The counters in their current periods; holds whose lease ran out count as
        spent, as they will once charged."""
        ...

    async def in_flight(self, tenant_id: str, agent_id: str | None) -> tuple[int, int]:
        """Requests in flight now under a concurrency limit: the tenant's, and the
        agent's (0 without one)."""
        ...

    async def now(self) -> float:
        """The store clock, in epoch seconds."""
        ...

    async def claim(self, name: str, ttl_s: int) -> bool:
        """True for the first caller to claim ``name`` within ``ttl_s`` (every replica
        sharing the store sees the same answer): budget alerts are sent once."""
        ...

    def epoch_of(self, tenant_id: str) -> str:
        """The tenant's epoch in the store, as last seen ('' before any spend): it marks
        the journal's entries, so that a restore replays only what the store lost."""
        ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...

    async def history(self, tenant_id: str) -> SpendHistory:
        """The tenant's settled spend per hour and per day, as far back as it is kept
        (``proxy.history``)."""
        ...

    async def note_rejection(self, tenant_id: str, rejection: Rejection) -> None:
        """Keep ``rejection`` among the tenant's latest (``REJECTIONS_KEPT`` at most)."""
        ...

    async def rejections(self, tenant_id: str) -> tuple[Rejection, ...]:
        """The tenant's latest rejections, newest first."""
        ...

    async def seen_today(self, tenant_id: str, *, limit: int) -> SeenToday:
        """The agents and end users the tenant named this UTC day (store clock): the
        first ``limit`` (1 to ``SEEN_LIMIT_MAX``) of each in sorted order, and how many in
        all. Bounded: past ``SEEN_READ_MAX`` of one kind, the first of a sample of that
        many (Redis; the memory store sorts them all)."""
        ...


# --- validation shared by the stores -------------------------------------------------


def check_rid(rid: str) -> None:
    if not _RID_RE.fullmatch(rid):
        raise ValueError("request id must match [A-Za-z0-9._:@/-]{1,128}")


# Counter sets already found valid (requests repeat the same few): bounded.
_valid: dict[tuple[Counter, ...], str] = {}
MAX_REMEMBERED_VALID = 4096


def check_counters(counters: Sequence[Counter]) -> str:
    """Validate ids and return the one tenant id all counters share."""
    key = tuple(counters)
    tenant = _valid.get(key)
    if tenant is None:
        tenant = _check_counters(key)
        if len(_valid) >= MAX_REMEMBERED_VALID:
            _valid.clear()
        _valid[key] = tenant
    return tenant


def _check_counters(counters: Sequence[Counter]) -> str:
    if not counters:
        raise ValueError("at least one counter is required")
    tenant = counters[0].tenant_id
    seen: set[tuple[tuple[str, str], Window, Unit]] = set()
    for c in counters:
        if c.tenant_id != tenant:
            raise ValueError("all counters of one request must belong to one tenant")
        if not _TENANT_RE.fullmatch(c.tenant_id):
            raise ValueError("tenant id must match [A-Za-z0-9._-]{1,64}")
        kind, ident = c.scope
        if sum(x is not None for x in (c.agent_id, c.model_cap, c.user_id)) > 1:
            raise ValueError("a counter has one scope: an agent, a model cap or a user")
        if kind == "model" and not _TENANT_RE.fullmatch(ident):
            raise ValueError("model cap name must match [A-Za-z0-9._-]{1,64}")
        if kind in ("agent", "user") and not _AGENT_RE.fullmatch(ident):
            raise ValueError(f"{kind} id must match [A-Za-z0-9._:@/-]{{1,128}}")
        if c.limit < 0:
            raise ValueError("limit must not be negative")
        if (c.scope, c.window, c.unit) in seen:
            raise ValueError("duplicate counter")
        seen.add((c.scope, c.window, c.unit))
    return tenant


def check_seen(tenant_id: str, limit: int) -> None:
    """Validate the arguments of ``Store.seen_today``."""
    if not _TENANT_RE.fullmatch(tenant_id):
        raise ValueError("tenant id must match [A-Za-z0-9._-]{1,64}")
    if not 1 <= limit <= SEEN_LIMIT_MAX:
        raise ValueError(f"limit must be in [1, {SEEN_LIMIT_MAX}]")


def check_amount(amount: Amounts | int) -> Amounts:
    amounts = as_amounts(amount)
    for value in (amounts.micros, amounts.tokens, amounts.requests):
        if not 0 <= value <= MAX_MICROS:
            raise ValueError(f"amounts must be in [0, {MAX_MICROS}]")
    return amounts


def clamp_actual(actual: Amounts | int) -> Amounts:
    a = as_amounts(actual)
    return Amounts(*(min(max(0, v), MAX_MICROS) for v in (a.micros, a.tokens, a.requests)))


def check_ttl(hold_ttl_s: float) -> int:
    ttl_ms = int(hold_ttl_s * 1000)
    if ttl_ms < 1:
        raise ValueError("hold_ttl_s must be positive")
    return ttl_ms
