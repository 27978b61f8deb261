"""The store in process memory: one proxy instance, and tests.

    store = MemoryStore()
    result = await store.reserve(rid, counters, Amounts(12_000, 900, 1), tz=tz, hold_ttl_s=30)

Same semantics as every ``proxy.counters.Store``; see that module.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from proxy.counters import (
    DEFAULT_EXPIRY_MARGIN_S,
    MIN_MARKER_TTL_S,
    NO_LIMITS,
    Amounts,
    Counter,
    CounterState,
    Limits,
    ReserveResult,
    SeenToday,
    check_amount,
    check_counters,
    check_rid,
    check_seen,
    check_ttl,
    clamp_actual,
    fits,
)
from proxy.history import (
    REJECTIONS_KEPT,
    REJECTIONS_TTL_S,
    Rejection,
    SpendHistory,
    buckets,
    buckets_since,
    cutoffs,
)
from proxy.windows import Period, Window, period_of

__all__ = ["MemoryStore"]

DAY_S = 86_400
UTC = ZoneInfo("UTC")
# A store in this process's memory lives and dies with it: it has one epoch.
MEMORY_EPOCH = "memory"


@dataclass(slots=True)
class _Bucket:
    spent: int = 0
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # rid -> (amount, exp)
    charged: dict[str, int] = field(default_factory=dict)  # rid -> charged at lease expiry
    expires_at: float = 0.0

    def charge_expired(self, now: float) -> None:
        """Move the holds whose lease ran out to spent, remembering what each was charged."""
        for rid in [r for r, (_, exp) in self.holds.items() if exp <= now]:
            amount, _ = self.holds.pop(rid)
            self.spent += amount
            self.charged[rid] = amount

    def state(self, counter: Counter, period: Period) -> CounterState:
        held = sum(amount for amount, _ in self.holds.values())
        end = max((exp for _, exp in self.holds.values()), default=None)
        return CounterState(counter, period, self.spent, held, end)


_BucketKey = tuple[str, tuple[str, str], Window, str, int]


class MemoryStore:
    """The store in process memory, for a single proxy instance and for tests.

        store = MemoryStore(clock=fake_clock)

    Atomic because nothing awaits between check and update. Leases expire on ``clock``
    and are charged when a reserve, renew or snapshot finds them; counters of ended
    periods are pruned about once a minute.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        expiry_margin_s: float = DEFAULT_EXPIRY_MARGIN_S,
    ) -> None:
        self._clock = clock
        self._margin_s = expiry_margin_s
        self._buckets: dict[_BucketKey, _Bucket] = {}
        self._settled: dict[tuple[str, str], float] = {}  # (tenant, rid) -> marker expiry
        self._claims: dict[str, float] = {}  # claimed name -> expiry
        self._agents: dict[tuple[str, int], set[str]] = {}  # (tenant, UTC day) -> agents
        self._users: dict[tuple[str, int], set[str]] = {}  # (tenant, UTC day) -> end users
        # Requests in flight: (tenant, None) or (tenant, agent) -> rid -> lease expiry.
        self._in_flight: dict[tuple[str, str | None], dict[str, float]] = {}
        self._next_prune = 0.0
        # History: tenant -> hour start -> micros, and tenant -> day start -> micros.
        self._hours: dict[str, dict[int, int]] = {}
        self._days: dict[str, dict[int, int]] = {}
        # Rejections: tenant -> (newest last, when the list is forgotten).
        self._rejections: dict[str, tuple[deque[Rejection], float]] = {}

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
        check_rid(rid)
        tenant = check_counters(counters)
        amounts = check_amount(amount)
        check_ttl(hold_ttl_s)
        now = self._clock()
        self._prune(now)
        periods = [period_of(c.window, now, tz) for c in counters]
        buckets = [self._bucket(c, p) for c, p in zip(counters, periods, strict=True)]
        for b in buckets:
            b.charge_expired(now)
        replay = rid in buckets[0].holds
        # Settled or released before it arrived, or its lease already ran out: over.
        over = self._settled.get((tenant, rid), 0.0) > now or rid in buckets[0].charged
        ok = not over and (
            replay
            or all(
                fits(b.state(c, p), amounts.of(c.unit))
                for c, p, b in zip(counters, periods, buckets, strict=True)
            )
        )
        agent = next((c.agent_id for c in counters if c.agent_id is not None), None)
        user = next((c.user_id for c in counters if c.user_id is not None), None)
        day = int(now // DAY_S)
        agents = self._agents.setdefault((tenant, day), set())
        users = self._users.setdefault((tenant, day), set())
        crowded = ok and not replay and _crowded(agents, agent, limits.max_agents)
        ok = ok and not crowded
        too_many_users = ok and not replay and _crowded(users, user, limits.max_users)
        ok = ok and not too_many_users
        busy = ""
        if ok and not replay:
            for scope, fkey, limit in self._flights(tenant, agent, limits.max_concurrent):
                flight = self._in_flight.get(fkey, {})
                for gone in [r for r, exp in flight.items() if exp <= now]:
                    del flight[gone]  # its lease ran out: no longer in flight
                if limit is not None and len(flight) >= limit:
                    busy = scope
                    break
        ok = ok and not busy
        if ok:
            for _, fkey, limit in self._flights(tenant, agent, limits.max_concurrent):
                if limit is not None:
                    self._in_flight.setdefault(fkey, {})[rid] = now + hold_ttl_s
            for c, b, p in zip(counters, buckets, periods, strict=True):
                if not replay and rid not in b.holds:
                    b.holds[rid] = (amounts.of(c.unit), now + hold_ttl_s)
                b.expires_at = max(b.expires_at, p.end + hold_ttl_s + self._margin_s)
            if agent is not None:
                agents.add(agent)
            if user is not None:
                users.add(user)
        states = tuple(b.state(c, p) for c, p, b in zip(counters, periods, buckets, strict=True))
        for key, b in zip(self._keys(counters, periods), buckets, strict=True):
            self._drop_if_empty(key, b)
        return ReserveResult(
            ok,
            now,
            states,
            amounts,
            too_many_agents=crowded,
            too_many_users=too_many_users,
            concurrency_limited=busy,
            epoch=MEMORY_EPOCH,
        )

    async def renew(self, rid: str, states: Sequence[CounterState], *, hold_ttl_s: float) -> bool:
        check_rid(rid)
        check_counters([s.counter for s in states])
        check_ttl(hold_ttl_s)
        now = self._clock()
        held = False
        for s in states:
            b = self._buckets.get(self._key(s.counter, s.period))
            if b is None:
                continue
            b.charge_expired(now)
            if rid in b.holds:
                amount, _ = b.holds[rid]
                b.holds[rid] = (amount, now + hold_ttl_s)
                held = True
        if held:
            for flight in self._in_flight.values():
                if rid in flight:
                    flight[rid] = now + hold_ttl_s
        return held

    async def settle(
        self,
        rid: str,
        states: Sequence[CounterState],
        actual: Amounts | int,
        *,
        hold_ttl_s: float,
        tz: ZoneInfo | None = None,
    ) -> None:
        check_rid(rid)
        tenant = check_counters([s.counter for s in states])
        check_ttl(hold_ttl_s)
        targets = [(s.counter, s.period) for s in states]
        self._commit(rid, tenant, targets, actual, hold_ttl_s, check=False, tz=tz)

    async def record(
        self,
        rid: str,
        counters: Sequence[Counter],
        actual: Amounts | int,
        *,
        tz: ZoneInfo,
        hold_ttl_s: float,
    ) -> None:
        check_rid(rid)
        tenant = check_counters(counters)
        check_ttl(hold_ttl_s)
        now = self._clock()
        targets = [(c, period_of(c.window, now, tz)) for c in counters]
        self._commit(rid, tenant, targets, actual, hold_ttl_s, check=True, tz=tz)

    async def snapshot(
        self, counters: Sequence[Counter], *, tz: ZoneInfo
    ) -> tuple[CounterState, ...]:
        check_counters(counters)
        now = self._clock()
        states = []
        for c in counters:
            period = period_of(c.window, now, tz)
            b = self._buckets.get(self._key(c, period))
            if b is None:
                states.append(CounterState(c, period, 0, 0))
                continue
            b.charge_expired(now)
            states.append(b.state(c, period))
        return tuple(states)

    async def in_flight(self, tenant_id: str, agent_id: str | None) -> tuple[int, int]:
        now = self._clock()

        def live(key: tuple[str, str | None]) -> int:
            return sum(exp > now for exp in self._in_flight.get(key, {}).values())

        return live((tenant_id, None)), live((tenant_id, agent_id)) if agent_id else 0

    async def now(self) -> float:
        return self._clock()

    async def claim(self, name: str, ttl_s: int) -> bool:
        now = self._clock()
        self._prune(now)
        if self._claims.get(name, 0.0) > now:
            return False
        self._claims[name] = now + ttl_s
        return True

    def epoch_of(self, tenant_id: str) -> str:
        return MEMORY_EPOCH

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def history(self, tenant_id: str) -> SpendHistory:
        hour_cut, day_cut = cutoffs(self._clock())
        return SpendHistory(
            hours=buckets_since(self._hours.get(tenant_id, {}).items(), hour_cut),
            days=buckets_since(self._days.get(tenant_id, {}).items(), day_cut),
        )

    async def note_rejection(self, tenant_id: str, rejection: Rejection) -> None:
        now = self._clock()
        self._prune(now)
        entries, _ = self._rejections.get(tenant_id, (deque(maxlen=REJECTIONS_KEPT), 0.0))
        entries.append(rejection)
        self._rejections[tenant_id] = (entries, now + REJECTIONS_TTL_S)

    async def rejections(self, tenant_id: str) -> tuple[Rejection, ...]:
        entries, until = self._rejections.get(tenant_id, (deque(), 0.0))
        return tuple(reversed(entries)) if until > self._clock() else ()

    async def seen_today(self, tenant_id: str, *, limit: int) -> SeenToday:
        check_seen(tenant_id, limit)
        day = int(self._clock() // DAY_S)
        agents = self._agents.get((tenant_id, day), set())
        users = self._users.get((tenant_id, day), set())
        return SeenToday(
            day=day * DAY_S,
            agents=tuple(heapq.nsmallest(limit, agents)),
            agents_total=len(agents),
            users=tuple(heapq.nsmallest(limit, users)),
            users_total=len(users),
        )

    def _add_history(self, tenant: str, actual: int, now: float, tz: ZoneInfo) -> None:
        """Add a settled cost to its hour and day; a new bucket trims those too old."""
        hour, day = buckets(now, tz)
        hour_cut, day_cut = cutoffs(now)
        for series, start, cut in (
            (self._hours.setdefault(tenant, {}), hour, hour_cut),
            (self._days.setdefault(tenant, {}), day, day_cut),
        ):
            if start not in series:
                for old in [s for s in series if s < cut]:
                    del series[old]
            series[start] = series.get(start, 0) + actual

    def _commit(
        self,
        rid: str,
        tenant: str,
        targets: Sequence[tuple[Counter, Period]],
        actual_amounts: Amounts | int,
        hold_ttl_s: float,
        *,
        check: bool,
        tz: ZoneInfo | None = None,
    ) -> None:
        """Settle (``check=False``) or record (``check=True``: the store marks every
        record, since a release-only record may race its lost reserve)."""
        now = self._clock()
        self._prune(now)
        marker = (tenant, rid)
        if self._settled.get(marker, 0.0) > now:
            return
        for fkey in [k for k in self._in_flight if k[0] == tenant]:
            flight = self._in_flight[fkey]
            flight.pop(rid, None)
            if not flight:
                del self._in_flight[fkey]
        amounts = clamp_actual(actual_amounts)
        if check or amounts.charges(
            [c for c, _ in targets]
        ):  # a release is idempotent as it is (as in Redis)
            self._settled[marker] = now + max(2 * hold_ttl_s, MIN_MARKER_TTL_S)
            if amounts.micros > 0:  # once per rid, as the marker makes it
                self._add_history(tenant, amounts.micros, now, tz or UTC)
        # An agent (end user) whose counters are all left empty costs nothing today: it
        # does not count against max_agents (max_users).
        left: dict[tuple[str, str], bool] = {}
        for counter, period in targets:
            actual = amounts.of(counter.unit)
            key = self._key(counter, period)
            b = self._buckets.get(key)
            gone = True
            if b is not None or actual != 0:
                b = b if b is not None else self._bucket(counter, period)
                b.holds.pop(rid, None)
                # A lease that ran out was charged its hold: the actual amount replaces it.
                b.spent += actual - b.charged.pop(rid, 0)
                b.expires_at = max(b.expires_at, period.end + hold_ttl_s + self._margin_s)
                gone = self._drop_if_empty(key, b)
            if counter.scope[0] in ("agent", "user"):
                left[counter.scope] = left.get(counter.scope, False) or not gone
        day = int(now // DAY_S)
        for (kind, ident), kept in left.items():
            if not kept:
                ids = self._agents if kind == "agent" else self._users
                ids.get((tenant, day), set()).discard(ident)

    @staticmethod
    def _flights(
        tenant: str, agent: str | None, limits: tuple[int | None, int | None]
    ) -> list[tuple[str, tuple[str, str | None], int | None]]:
        """(scope, in-flight key, limit) for the tenant and, when there is one, the agent."""
        out: list[tuple[str, tuple[str, str | None], int | None]] = [
            ("tenant", (tenant, None), limits[0])
        ]
        if agent is not None:
            out.append(("agent", (tenant, agent), limits[1]))
        return out

    def _keys(self, counters: Sequence[Counter], periods: Sequence[Period]) -> list[_BucketKey]:
        return [self._key(c, p) for c, p in zip(counters, periods, strict=True)]

    def _drop_if_empty(self, key: _BucketKey, b: _Bucket) -> bool:
        """Forget a counter that holds and spent nothing (as the Redis store deletes it)."""
        if b.spent or b.holds or b.charged:
            return False
        self._buckets.pop(key, None)
        return True

    @staticmethod
    def _key(counter: Counter, period: Period) -> _BucketKey:
        return (counter.tenant_id, counter.scope, counter.window, counter.unit, period.start)

    def _bucket(self, counter: Counter, period: Period) -> _Bucket:
        key = self._key(counter, period)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(expires_at=period.end + self._margin_s)
        return b

    def _prune(self, now: float) -> None:
        if now < self._next_prune:
            return
        self._next_prune = now + 60
        for key in [k for k, b in self._buckets.items() if b.expires_at <= now]:
            del self._buckets[key]
        for marker in [m for m, exp in self._settled.items() if exp <= now]:
            del self._settled[marker]
        for name in [n for n, exp in self._claims.items() if exp <= now]:
            del self._claims[name]
        today = int(now // DAY_S)
        for ids in (self._agents, self._users):
            for day in [d for d in ids if d[1] < today]:
                del ids[day]
        for tenant in [t for t, (_, until) in self._rejections.items() if until <= now]:
            del self._rejections[tenant]
        hour_cut, day_cut = cutoffs(now)
        for series, cut in ((self._hours, hour_cut), (self._days, day_cut)):
            for tenant in [t for t, points in series.items() if max(points, default=0) < cut]:
                del series[tenant]  # spent nothing for as long as history is kept


def _crowded(ids: set[str], new: str | None, limit: int | None) -> bool:
    """Whether naming ``new`` goes past ``limit`` distinct ids (of today's ``ids``)."""
    return new is not None and new not in ids and limit is not None and len(ids) >= limit
