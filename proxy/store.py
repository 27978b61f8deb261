"""Spend counters: reserve an estimate in every budget window at once, then settle it.

    store = RedisStore.from_url("redis://localhost:6379/0", timeout_s=0.5)
    result = await store.reserve(rid, counters, 12_000, tz=tz, hold_ttl_s=30)
    if result.ok:
        ...  # forward the request, and every 10 s while it runs:
        await store.renew(rid, result.states, hold_ttl_s=30)
        ...
        await store.settle(rid, result.states, 9_870, hold_ttl_s=30)

Amounts are integer micro-USD. A *counter* is one window (hourly, daily, ...) of one
scope (a tenant, or one agent of a tenant); for each period of its window it keeps the
amount ``spent`` and the amount ``held`` by in-flight reservations. ``reserve`` places a
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

Two implementations share these semantics: ``MemoryStore`` (one process, one event loop)
and ``RedisStore`` (shared by every proxy instance).

Redis key layout (``P`` = prefix, ``T`` = tenant id, ``A`` = agent id, ``W`` = window
name, ``S`` = period start in epoch seconds)::

    P:{T}:t:W:S            HASH  tenant-wide counter: spent, held, h:<rid> = held amount,
                                 x:<rid> = amount charged when rid's lease ran out
                                 (removed by rid's settle, else expires with the key)
    P:{T}:a:A:W:S          HASH  agent counter, same fields
    <counter key>:holds    ZSET  rid -> lease expiry (epoch ms, Redis clock)
    P:{T}:settled:<rid>    STRING marker making settle/record idempotent,
                           TTL max(2 x hold TTL, 60 s)

The tenant id in braces is a Cluster hash tag, so every key of one request lives in one
slot and each operation is one Lua script. Counter keys expire at period end + hold TTL
+ ``expiry_margin_s`` (re-applied on every reserve/settle), long enough for late settles.
Ids are validated against narrow character sets; keys never contain secrets.

Clock: Redis ``TIME``, read inside the scripts. Python computes each window's period
(calendar arithmetic in the tenant's time zone) from its estimate of Redis time, the
script checks that ``TIME`` falls in every period and otherwise answers ``skew`` with its
time, and Python retries once or twice with that time. Normally: one round trip.

Sums are exact up to 2**53 micro-USD (about $9 billion), Lua's integer range.
Every Redis error or timeout becomes ``StoreUnavailable``; each call is bounded by
``timeout_s``. Requires Redis >= 5 (scripts replicated by effects).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from zoneinfo import ZoneInfo

# This is the one module allowed to talk to Redis (the ban applies everywhere else).
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from proxy.errors import StoreUnavailable
from proxy.windows import Period, Window, period_of

__all__ = [
    "Counter",
    "CounterState",
    "MemoryStore",
    "RedisStore",
    "ReserveResult",
    "Store",
]

MAX_MICROS = 2**53  # amounts up to this are exact in Lua's doubles
DEFAULT_EXPIRY_MARGIN_S = 300
PURGE_LIMIT = 100  # expired holds purged per counter per reserve
SKEW_ATTEMPTS = 3
MIN_MARKER_TTL_S = 60  # settle markers live max(2 x hold TTL, this)

_TENANT_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_AGENT_RE = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")
_RID_RE = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")
_PREFIX_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Counter:
    """One budget window of one scope."""

    tenant_id: str
    agent_id: str | None  # None = tenant-wide scope
    window: Window
    limit_micros: int  # hard limit


@dataclass(frozen=True, slots=True)
class CounterState:
    """A counter in one period: ``held`` counts in-flight reservations.

    ``holds_end`` is the latest lease expiry among those holds (epoch seconds, store
    clock): by then every hold now in ``held`` has been settled or charged, unless its
    request renews it. None when nothing is held (or the state was not read from a store).
    """

    counter: Counter
    period: Period
    spent_micros: int
    held_micros: int
    holds_end: float | None = None

    @property
    def room_micros(self) -> int:
        """What may still be reserved (negative after an overspend)."""
        return self.counter.limit_micros - self.spent_micros - self.held_micros


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """The decision of ``reserve``.

    ``states`` has one entry per counter, in order: after the hold when ``ok``, as found
    when rejected (nothing held; expired leases found were charged).
    """

    ok: bool
    now: float  # the store clock's time used for the decision
    states: tuple[CounterState, ...]
    amount_micros: int = 0

    @property
    def exceeded(self) -> tuple[CounterState, ...]:
        """The states that rejected the request (empty when ``ok``)."""
        if self.ok:
            return ()
        return tuple(
            s
            for s in self.states
            if s.spent_micros + s.held_micros + self.amount_micros > s.counter.limit_micros
        )


class Store(Protocol):
    """Budget counters with atomic all-or-none holds; errors raise ``StoreUnavailable``."""

    async def reserve(
        self,
        rid: str,
        counters: Sequence[Counter],
        amount_micros: int,
        *,
        tz: ZoneInfo,
        hold_ttl_s: float,
    ) -> ReserveResult:
        """Hold ``amount_micros`` in every counter's current period, or in none.

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
        actual_micros: int,
        *,
        hold_ttl_s: float,
    ) -> None:
        """Replace ``rid``'s hold by the actual cost in the given periods, once per rid.

        0 releases, negative counts as 0. A hold whose lease ran out was charged its
        amount; the settle replaces that charge by the actual cost (spent += actual -
        charged, which lowers spent when the actual cost is below the hold).
        """
        ...

    async def record(
        self,
        rid: str,
        counters: Sequence[Counter],
        actual_micros: int,
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

    async def now(self) -> float:
        """The store clock, in epoch seconds."""
        ...

    async def claim(self, name: str, ttl_s: int) -> bool:
        """True for the first caller to claim ``name`` within ``ttl_s`` (every replica
        sharing the store sees the same answer): budget alerts are sent once."""
        ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


# --- validation shared by both stores -------------------------------------------------


def _check_rid(rid: str) -> None:
    if not _RID_RE.fullmatch(rid):
        raise ValueError("request id must match [A-Za-z0-9._:@/-]{1,128}")


def _check_counters(counters: Sequence[Counter]) -> str:
    """Validate ids and return the one tenant id all counters share."""
    if not counters:
        raise ValueError("at least one counter is required")
    tenant = counters[0].tenant_id
    seen: set[tuple[str | None, Window]] = set()
    for c in counters:
        if c.tenant_id != tenant:
            raise ValueError("all counters of one request must belong to one tenant")
        if not _TENANT_RE.fullmatch(c.tenant_id):
            raise ValueError("tenant id must match [A-Za-z0-9._-]{1,64}")
        if c.agent_id is not None and not _AGENT_RE.fullmatch(c.agent_id):
            raise ValueError("agent id must match [A-Za-z0-9._:@/-]{1,128}")
        if c.limit_micros < 0:
            raise ValueError("limit must not be negative")
        if (c.agent_id, c.window) in seen:
            raise ValueError("duplicate counter")
        seen.add((c.agent_id, c.window))
    return tenant


def _check_amount(amount_micros: int) -> None:
    if not 0 <= amount_micros <= MAX_MICROS:
        raise ValueError(f"amount must be in [0, {MAX_MICROS}] micro-USD")


def _clamp_actual(actual_micros: int) -> int:
    return min(max(0, actual_micros), MAX_MICROS)


def _check_ttl(hold_ttl_s: float) -> int:
    ttl_ms = int(hold_ttl_s * 1000)
    if ttl_ms < 1:
        raise ValueError("hold_ttl_s must be positive")
    return ttl_ms


# --- in-process store ------------------------------------------------------------------


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


_BucketKey = tuple[str, str | None, Window, int]


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
        self._next_prune = 0.0

    async def reserve(
        self,
        rid: str,
        counters: Sequence[Counter],
        amount_micros: int,
        *,
        tz: ZoneInfo,
        hold_ttl_s: float,
    ) -> ReserveResult:
        _check_rid(rid)
        tenant = _check_counters(counters)
        _check_amount(amount_micros)
        _check_ttl(hold_ttl_s)
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
                b.spent + sum(a for a, _ in b.holds.values()) + amount_micros <= c.limit_micros
                for c, b in zip(counters, buckets, strict=True)
            )
        )
        if ok:
            for b, p in zip(buckets, periods, strict=True):
                if not replay and rid not in b.holds:
                    b.holds[rid] = (amount_micros, now + hold_ttl_s)
                b.expires_at = max(b.expires_at, p.end + hold_ttl_s + self._margin_s)
        states = tuple(b.state(c, p) for c, p, b in zip(counters, periods, buckets, strict=True))
        return ReserveResult(ok, now, states, amount_micros)

    async def renew(self, rid: str, states: Sequence[CounterState], *, hold_ttl_s: float) -> bool:
        _check_rid(rid)
        _check_counters([s.counter for s in states])
        _check_ttl(hold_ttl_s)
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
        return held

    async def settle(
        self,
        rid: str,
        states: Sequence[CounterState],
        actual_micros: int,
        *,
        hold_ttl_s: float,
    ) -> None:
        _check_rid(rid)
        tenant = _check_counters([s.counter for s in states])
        _check_ttl(hold_ttl_s)
        self._commit(
            rid, tenant, [(s.counter, s.period) for s in states], actual_micros, hold_ttl_s
        )

    async def record(
        self,
        rid: str,
        counters: Sequence[Counter],
        actual_micros: int,
        *,
        tz: ZoneInfo,
        hold_ttl_s: float,
    ) -> None:
        _check_rid(rid)
        tenant = _check_counters(counters)
        _check_ttl(hold_ttl_s)
        now = self._clock()
        targets = [(c, period_of(c.window, now, tz)) for c in counters]
        self._commit(rid, tenant, targets, actual_micros, hold_ttl_s)

    async def snapshot(
        self, counters: Sequence[Counter], *, tz: ZoneInfo
    ) -> tuple[CounterState, ...]:
        _check_counters(counters)
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

    async def now(self) -> float:
        return self._clock()

    async def claim(self, name: str, ttl_s: int) -> bool:
        now = self._clock()
        self._prune(now)
        if self._claims.get(name, 0.0) > now:
            return False
        self._claims[name] = now + ttl_s
        return True

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def _commit(
        self,
        rid: str,
        tenant: str,
        targets: Sequence[tuple[Counter, Period]],
        actual_micros: int,
        hold_ttl_s: float,
    ) -> None:
        now = self._clock()
        self._prune(now)
        marker = (tenant, rid)
        if self._settled.get(marker, 0.0) > now:
            return
        self._settled[marker] = now + max(2 * hold_ttl_s, MIN_MARKER_TTL_S)
        actual = _clamp_actual(actual_micros)
        for counter, period in targets:
            key = self._key(counter, period)
            b = self._buckets.get(key)
            if b is None:
                if actual == 0:
                    continue
                b = self._bucket(counter, period)
            b.holds.pop(rid, None)
            # A lease that ran out was charged its hold: the actual cost replaces that.
            b.spent += actual - b.charged.pop(rid, 0)
            b.expires_at = max(b.expires_at, period.end + hold_ttl_s + self._margin_s)

    @staticmethod
    def _key(counter: Counter, period: Period) -> _BucketKey:
        return (counter.tenant_id, counter.agent_id, counter.window, period.start)

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


# --- Redis store -------------------------------------------------------------------------

# Shared by the scripts that write: charge the holds of one counter whose lease ran out
# (at most PURGE_LIMIT per call): their amounts move from held to spent, and x:<rid>
# keeps what each was charged until its settle replaces it by the actual cost.
_CHARGE_EXPIRED_LUA = """
local function charge_expired(key, holds, now_ms)
  local expired = redis.call('ZRANGEBYSCORE', holds, '-inf', now_ms, 'LIMIT', 0, PURGE_LIMIT)
  if #expired == 0 then
    return
  end
  local fields = {}
  for j, r in ipairs(expired) do fields[j] = 'h:' .. r end
  local amounts = redis.call('HMGET', key, unpack(fields))
  local total, charged = 0, {}
  for j = 1, #expired do
    if amounts[j] then
      total = total + tonumber(amounts[j])
      charged[#charged + 1] = 'x:' .. expired[j]
      charged[#charged + 1] = amounts[j]
    end
  end
  redis.call('HDEL', key, unpack(fields))
  redis.call('ZREM', holds, unpack(expired))
  if #charged > 0 then
    redis.call('HSET', key, unpack(charged))
  end
  if total ~= 0 then
    redis.call('HINCRBY', key, 'held', string.format('%d', -total))
    redis.call('HINCRBY', key, 'spent', string.format('%d', total))
  end
end

-- The latest lease expiry among a counter's live holds (epoch ms), '0' when none.
local function holds_end(holds, now_ms)
  local last = redis.call('ZRANGE', holds, -1, -1, 'WITHSCORES')
  if last[2] and tonumber(last[2]) > now_ms then
    return last[2]
  end
  return '0'
end
""".replace("PURGE_LIMIT", str(PURGE_LIMIT))

# KEYS: per counter its hash and holds zset (K1, Z1, K2, Z2, ...), then the rid's settled
#       marker: a reserve that arrives after its rid was settled or released (its reply was
#       lost to a timeout and the ledger released it) holds nothing; nor does one whose
#       rid's lease already ran out (x:<rid> in the first counter).
# ARGV: rid, amount, hold ttl ms, then per counter: limit, period start, period end,
#       key expiry (epoch ms).
# Returns {'skew', sec, usec} |
#         {'ok'|'rejected'|'settled', sec, usec, spent1, held1, end1, spent2, ...}
#         (end = latest lease expiry in epoch ms, '0' when nothing is held).
_RESERVE_LUA = (
    _CHARGE_EXPIRED_LUA
    + """
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = (#KEYS - 1) / 2
for i = 1, n do
  local a = 3 + (i - 1) * 4
  if now_s < tonumber(ARGV[a + 2]) or now_s >= tonumber(ARGV[a + 3]) then
    return {'skew', t[1], t[2]}
  end
end
local rid = ARGV[1]
local field = 'h:' .. rid
local amount = tonumber(ARGV[2])
local spent, held = {}, {}
for i = 1, n do
  local key, holds = KEYS[2 * i - 1], KEYS[2 * i]
  charge_expired(key, holds, now_ms)
  local v = redis.call('HMGET', key, 'spent', 'held')
  spent[i] = tonumber(v[1] or '0')
  held[i] = tonumber(v[2] or '0')
end
local status = 'ok'
local replay = redis.call('HEXISTS', KEYS[1], field) == 1
if redis.call('EXISTS', KEYS[#KEYS]) == 1 or redis.call('HEXISTS', KEYS[1], 'x:' .. rid) == 1 then
  status = 'settled'
elseif not replay then
  for i = 1, n do
    if spent[i] + held[i] + amount > tonumber(ARGV[3 + (i - 1) * 4 + 1]) then
      status = 'rejected'
      break
    end
  end
end
if status == 'ok' then
  local expiry = string.format('%d', now_ms + tonumber(ARGV[3]))
  for i = 1, n do
    local key, holds = KEYS[2 * i - 1], KEYS[2 * i]
    if redis.call('HSETNX', key, field, ARGV[2]) == 1 then
      redis.call('HINCRBY', key, 'held', ARGV[2])
      redis.call('ZADD', holds, expiry, rid)
      held[i] = held[i] + amount
    end
    local at = ARGV[3 + (i - 1) * 4 + 4]
    redis.call('PEXPIREAT', key, at)
    redis.call('PEXPIREAT', holds, at)
  end
end
local out = {status, t[1], t[2]}
for i = 1, n do
  out[#out + 1] = string.format('%d', spent[i])
  out[#out + 1] = string.format('%d', held[i])
  out[#out + 1] = holds_end(KEYS[2 * i], now_ms)
end
return out
"""
)

# KEYS: per counter its hash and holds zset. ARGV: rid, hold ttl ms.
# Charges the expired leases of each counter, then moves rid's lease expiry to now + ttl
# wherever rid still holds. Returns {'ok'|'gone', sec, usec} ('gone': it held nowhere).
_RENEW_LUA = (
    _CHARGE_EXPIRED_LUA
    + """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rid = ARGV[1]
local field = 'h:' .. rid
local expiry = string.format('%d', now_ms + tonumber(ARGV[2]))
local status = 'gone'
for i = 1, #KEYS / 2 do
  local key, holds = KEYS[2 * i - 1], KEYS[2 * i]
  charge_expired(key, holds, now_ms)
  if redis.call('HEXISTS', key, field) == 1 then
    redis.call('ZADD', holds, 'XX', expiry, rid)
    status = 'ok'
  end
end
return {status, t[1], t[2]}
"""
)

# KEYS: settled marker, then per counter its hash and holds zset.
# ARGV: rid, actual, marker ttl ms, check ('1' = verify periods against TIME), then per
#       counter: period start, period end, key expiry (epoch ms).
# Removes rid's hold; spent grows by actual, less what rid's expired lease was charged.
# Returns {'skew', sec, usec} | {'dup'} | {'ok'}.
_COMMIT_LUA = """
local n = (#KEYS - 1) / 2
if ARGV[4] == '1' then
  local t = redis.call('TIME')
  local now_s = tonumber(t[1])
  for i = 1, n do
    local a = 4 + (i - 1) * 3
    if now_s < tonumber(ARGV[a + 1]) or now_s >= tonumber(ARGV[a + 2]) then
      return {'skew', t[1], t[2]}
    end
  end
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[3]) then
  return {'dup'}
end
local rid = ARGV[1]
local field, charged = 'h:' .. rid, 'x:' .. rid
local actual = tonumber(ARGV[2])
for i = 1, n do
  local key, holds = KEYS[2 * i], KEYS[2 * i + 1]
  local h = redis.call('HGET', key, field)
  if h then
    redis.call('HDEL', key, field)
    redis.call('ZREM', holds, rid)
    if tonumber(h) ~= 0 then
      redis.call('HINCRBY', key, 'held', string.format('%d', -tonumber(h)))
    end
  end
  local add = actual
  local x = redis.call('HGET', key, charged)
  if x then
    redis.call('HDEL', key, charged)
    add = actual - tonumber(x)
  end
  if add ~= 0 then
    redis.call('HINCRBY', key, 'spent', string.format('%d', add))
  end
  local at = ARGV[4 + (i - 1) * 3 + 3]
  redis.call('PEXPIREAT', key, at)
  redis.call('PEXPIREAT', holds, at)
end
return {'ok'}
"""

# KEYS: per counter its hash and holds zset. ARGV: per counter period start, period end.
# Returns {'skew', sec, usec} | {'ok', sec, usec, spent1, held1, end1, ...}: held counts
# the live holds, spent also the holds whose lease ran out (as their charge will), end is
# the latest live lease expiry (epoch ms, '0' when none). Writes nothing.
_SNAPSHOT_LUA = """
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS / 2
for i = 1, n do
  if now_s < tonumber(ARGV[2 * i - 1]) or now_s >= tonumber(ARGV[2 * i]) then
    return {'skew', t[1], t[2]}
  end
end
local function sum(key, rids)
  local total = 0
  for first = 1, #rids, 500 do
    local fields = {}
    for j = first, math.min(first + 499, #rids) do fields[#fields + 1] = 'h:' .. rids[j] end
    local amounts = redis.call('HMGET', key, unpack(fields))
    for j = 1, #amounts do
      if amounts[j] then total = total + tonumber(amounts[j]) end
    end
  end
  return total
end
local out = {'ok', t[1], t[2]}
for i = 1, n do
  local key, holds = KEYS[2 * i - 1], KEYS[2 * i]
  local expired = sum(key, redis.call('ZRANGEBYSCORE', holds, '-inf', now_ms))
  local held = sum(key, redis.call('ZRANGEBYSCORE', holds, '(' .. now_ms, '+inf'))
  local spent = tonumber(redis.call('HGET', key, 'spent') or '0') + expired
  local last = redis.call('ZRANGE', holds, -1, -1, 'WITHSCORES')
  out[#out + 1] = string.format('%d', spent)
  out[#out + 1] = string.format('%d', held)
  out[#out + 1] = (last[2] and tonumber(last[2]) > now_ms) and last[2] or '0'
end
return out
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _redis_time(sec: Any, usec: Any) -> float:
    return int(_text(sec)) + int(_text(usec)) / 1_000_000


def _states(
    counters: Sequence[Counter], periods: Sequence[Period], values: Sequence[Any]
) -> tuple[CounterState, ...]:
    """The states in a script's reply: spent, held, latest lease end (ms, 0 = none)."""
    states = []
    for i, (c, p) in enumerate(zip(counters, periods, strict=True)):
        spent, held, end_ms = values[3 * i : 3 * i + 3]
        end = float(_text(end_ms)) / 1000
        states.append(CounterState(c, p, int(_text(spent)), int(_text(held)), end or None))
    return tuple(states)


# Connections kept open for the scripts between calls (more are opened under a burst).
MAX_IDLE_CONNECTIONS = 32


class _Script:
    """A Lua script and its SHA1, packed straight into RESP."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source, usedforsecurity=False).hexdigest().encode()

    def packed(self, keys: list[str], args: Sequence[str | int], *, full: bool = False) -> bytes:
        parts: list[bytes] = [b"EVAL", self.source] if full else [b"EVALSHA", self.sha]
        parts.append(str(len(keys)).encode())
        parts.extend(k.encode() for k in keys)
        parts.extend(str(a).encode() for a in args)
        out = [b"*%d\r\n" % len(parts)]
        for part in parts:
            out.append(b"$%d\r\n%s\r\n" % (len(part), part))
        return b"".join(out)


async def _call(
    conn: AbstractConnection, script: _Script, keys: list[str], args: Sequence[str | int]
) -> Any:
    try:
        await conn.send_packed_command(script.packed(keys, args), check_health=False)
        return await conn.read_response()
    except NoScriptError:  # the server lost its script cache (restart, SCRIPT FLUSH)
        await conn.send_packed_command(script.packed(keys, args, full=True), check_health=False)
        return await conn.read_response()


def _honour_cancel() -> None:
    """Re-raise a cancellation that the client library turned into an error or swallowed
    (it can, when a cancel lands while it closes a connection): a cancelled caller must
    stop, not carry on as if the store had merely failed."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class _Skew(Exception):
    def __init__(self, redis_now: float) -> None:
        self.redis_now = redis_now


class RedisStore:
    """The store in Redis, shared by every proxy instance.

        store = RedisStore.from_url(url, prefix="capproxy", timeout_s=0.5)   # owns the client
        store = RedisStore(client, timeout_s=0.5)                            # borrows it

    ``local_clock`` is only a starting estimate of Redis time; decisions use ``TIME``.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "capproxy",
        timeout_s: float,
        expiry_margin_s: int = DEFAULT_EXPIRY_MARGIN_S,
        local_clock: Callable[[], float] = time.time,
    ) -> None:
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError("prefix must match [A-Za-z0-9._:-]{1,64}")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._client = client
        self._owns_client = False
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._margin_ms = int(expiry_margin_s * 1000)
        self._local_clock = local_clock
        self._offset = 0.0  # Redis time - local time, learned from script replies
        self._reserve = _Script(_RESERVE_LUA)
        self._renew = _Script(_RENEW_LUA)
        self._commit = _Script(_COMMIT_LUA)
        self._snapshot = _Script(_SNAPSHOT_LUA)
        self._idle: list[AbstractConnection] = []  # connections for the scripts, last used first

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "capproxy",
        timeout_s: float,
        expiry_margin_s: int = DEFAULT_EXPIRY_MARGIN_S,
    ) -> RedisStore:
        """A store owning a new client (closed by ``aclose``).

        Socket timeouts are ``timeout_s``; a failed command is retried twice on a fresh
        connection (safe: every script is idempotent by rid), within ``timeout_s``.
        """
        client = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=2),
        )
        store = cls(client, prefix=prefix, timeout_s=timeout_s, expiry_margin_s=expiry_margin_s)
        store._owns_client = True
        return store

    @property
    def client(self) -> Redis:
        """The Redis client (owned by this store only when made by ``from_url``)."""
        return self._client

    @property
    def prefix(self) -> str:
        return self._prefix

    # -- keys

    def counter_key(self, counter: Counter, period: Period) -> str:
        """The HASH key of ``counter`` in ``period`` (its holds ZSET adds ``:holds``)."""
        tag = f"{self._prefix}:{{{counter.tenant_id}}}"
        if counter.agent_id is None:
            return f"{tag}:t:{counter.window.value}:{period.start}"
        return f"{tag}:a:{counter.agent_id}:{counter.window.value}:{period.start}"

    def settled_key(self, tenant_id: str, rid: str) -> str:
        return f"{self._prefix}:{{{tenant_id}}}:settled:{rid}"

    def _expire_at_ms(self, period: Period, hold_ttl_ms: int) -> int:
        return period.end * 1000 + hold_ttl_ms + self._margin_ms

    # -- operations

    async def reserve(
        self,
        rid: str,
        counters: Sequence[Counter],
        amount_micros: int,
        *,
        tz: ZoneInfo,
        hold_ttl_s: float,
    ) -> ReserveResult:
        _check_rid(rid)
        tenant = _check_counters(counters)
        _check_amount(amount_micros)
        ttl_ms = _check_ttl(hold_ttl_s)

        async def attempt(at: float) -> ReserveResult:
            periods = [period_of(c.window, at, tz) for c in counters]
            keys: list[str] = []
            args: list[str | int] = [rid, amount_micros, ttl_ms]
            for c, p in zip(counters, periods, strict=True):
                key = self.counter_key(c, p)
                keys += [key, key + ":holds"]
                limit = min(c.limit_micros, MAX_MICROS)  # beyond it, a limit is no limit
                args += [limit, p.start, p.end, self._expire_at_ms(p, ttl_ms)]
            keys.append(self.settled_key(tenant, rid))
            reply = await self._eval(self._reserve, keys, args)
            status, now = self._status(reply)
            states = _states(counters, periods, reply[3:])
            return ReserveResult(status == "ok", now, states, amount_micros)

        return await self._guard(lambda: self._with_periods(attempt))

    async def renew(self, rid: str, states: Sequence[CounterState], *, hold_ttl_s: float) -> bool:
        _check_rid(rid)
        _check_counters([s.counter for s in states])
        ttl_ms = _check_ttl(hold_ttl_s)
        keys: list[str] = []
        for s in states:
            key = self.counter_key(s.counter, s.period)
            keys += [key, key + ":holds"]

        async def renew() -> bool:
            reply = await self._eval(self._renew, keys, [rid, ttl_ms])
            status, _ = self._status(reply)
            return status == "ok"

        return await self._guard(renew)

    async def settle(
        self,
        rid: str,
        states: Sequence[CounterState],
        actual_micros: int,
        *,
        hold_ttl_s: float,
    ) -> None:
        _check_rid(rid)
        tenant = _check_counters([s.counter for s in states])
        ttl_ms = _check_ttl(hold_ttl_s)
        targets = [(s.counter, s.period) for s in states]
        await self._guard(
            lambda: self._run_commit(rid, tenant, targets, actual_micros, ttl_ms, check=False)
        )

    async def record(
        self,
        rid: str,
        counters: Sequence[Counter],
        actual_micros: int,
        *,
        tz: ZoneInfo,
        hold_ttl_s: float,
    ) -> None:
        _check_rid(rid)
        tenant = _check_counters(counters)
        ttl_ms = _check_ttl(hold_ttl_s)

        async def attempt(at: float) -> None:
            targets = [(c, period_of(c.window, at, tz)) for c in counters]
            await self._run_commit(rid, tenant, targets, actual_micros, ttl_ms, check=True)

        await self._guard(lambda: self._with_periods(attempt))

    async def snapshot(
        self, counters: Sequence[Counter], *, tz: ZoneInfo
    ) -> tuple[CounterState, ...]:
        _check_counters(counters)

        async def attempt(at: float) -> tuple[CounterState, ...]:
            periods = [period_of(c.window, at, tz) for c in counters]
            keys: list[str] = []
            args: list[int] = []
            for c, p in zip(counters, periods, strict=True):
                key = self.counter_key(c, p)
                keys += [key, key + ":holds"]
                args += [p.start, p.end]
            reply = await self._eval(self._snapshot, keys, args)
            self._status(reply)
            return _states(counters, periods, reply[3:])

        return await self._guard(lambda: self._with_periods(attempt))

    async def now(self) -> float:
        async def read() -> float:
            sec, usec = await self._client.time()
            return self._learn(_redis_time(sec, usec))

        return await self._guard(read)

    async def claim(self, name: str, ttl_s: int) -> bool:
        async def claim() -> bool:
            key = f"{self._prefix}:claim:{name}"
            return bool(await self._client.set(key, b"1", nx=True, ex=max(1, ttl_s)))

        return await self._guard(claim)

    async def ping(self) -> None:
        async def ping() -> None:
            await self._client.ping()

        await self._guard(ping)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect()
        if self._owns_client:
            await self._client.aclose()

    # -- internals

    async def _eval(self, script: _Script, keys: list[str], args: Sequence[str | int]) -> Any:
        """One script call: EVALSHA (EVAL when the server lost the script), packed here and
        sent on a connection of this store's own.

        The generic ``execute_command`` path of redis-py (command packing, pool bookkeeping,
        retry wrapper) costs more CPU than the rest of a proxied request; the scripts are
        the store's whole hot path, so they take this short one. A connection that failed
        is dropped, and a request that failed before a reply is tried once more on a fresh
        connection (safe: every script is idempotent by rid).
        """
        for attempt in range(2):
            conn = self._idle.pop() if self._idle else await self._connect()
            try:
                reply = await _call(conn, script, keys, args)
            except RedisConnectionError:
                await conn.disconnect()
                if attempt:
                    raise
                continue
            except BaseException:
                # A timeout or cancellation mid-reply leaves the connection out of step.
                await conn.disconnect()
                raise
            if len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(conn)
            else:  # a burst is over: keep a bounded set open
                await conn.disconnect()
            return reply
        raise AssertionError("unreachable")

    async def _connect(self) -> AbstractConnection:
        conn: AbstractConnection = self._client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        await conn.connect()  # type: ignore[no-untyped-call]
        return conn

    async def _run_commit(
        self,
        rid: str,
        tenant: str,
        targets: Sequence[tuple[Counter, Period]],
        actual_micros: int,
        ttl_ms: int,
        *,
        check: bool,
    ) -> None:
        keys = [self.settled_key(tenant, rid)]
        marker_ttl_ms = max(2 * ttl_ms, MIN_MARKER_TTL_S * 1000)
        args: list[str | int] = [rid, _clamp_actual(actual_micros), marker_ttl_ms, int(check)]
        for c, p in targets:
            key = self.counter_key(c, p)
            keys += [key, key + ":holds"]
            args += [p.start, p.end, self._expire_at_ms(p, ttl_ms)]
        reply = await self._eval(self._commit, keys, args)
        self._status(reply)

    def _status(self, reply: Any) -> tuple[str, float]:
        """The reply's status and Redis time; raises ``_Skew`` for a period mismatch."""
        status = _text(reply[0])
        if len(reply) < 3:
            return status, self._estimate()
        now = self._learn(_redis_time(reply[1], reply[2]))
        if status == "skew":
            raise _Skew(now)
        return status, now

    def _learn(self, redis_now: float) -> float:
        self._offset = redis_now - self._local_clock()
        return redis_now

    def _estimate(self) -> float:
        return self._local_clock() + self._offset

    async def _with_periods(self, attempt: Callable[[float], Awaitable[T]]) -> T:
        """Run ``attempt`` at the estimated Redis time; after a skew, at Redis's time."""
        at = self._estimate()
        for _ in range(SKEW_ATTEMPTS - 1):
            try:
                return await attempt(at)
            except _Skew as skew:
                at = skew.redis_now
        try:
            return await attempt(at)
        except _Skew as skew:
            raise StoreUnavailable("budget store clock keeps moving across a period") from skew

    async def _guard(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await call()
        except (RedisError, OSError) as exc:  # OSError includes TimeoutError
            _honour_cancel()
            raise StoreUnavailable() from exc
        _honour_cancel()
        return result
