"""The store in Redis, shared by every proxy instance.

    store = RedisStore.from_url("redis://localhost:6379/0", timeout_s=0.5)
    result = await store.reserve(rid, counters, Amounts(12_000, 900, 1), tz=tz, hold_ttl_s=30)

Semantics: ``proxy.counters``. The scripts (``proxy/lua/*.lua``) and the connections that
carry them: ``proxy.redis_scripts``.

Redis key layout (``P`` = prefix, ``T`` = tenant id, ``A`` = agent id, ``W`` = window
name, ``S`` = period start in epoch seconds)::

    P:{T}:t:W:S            HASH  tenant-wide counter: spent, held, h:<rid> = held amount,
                                 x:<rid> = amount charged when rid's lease ran out
                                 (removed by rid's settle, else expires with the key)
    P:{T}:a:A:W:S          HASH  agent counter, same fields
    P:{T}:m:M:W:S          HASH  model cap M's counter (the tenant's requests for its models)
    P:{T}:u:U:W:S          HASH  end user U's counter
    <counter key>:tokens   HASH  the same scope and window counting tokens
    <counter key>:requests HASH  ... counting requests (a plain key counts micro-USD)
    <counter key>:holds    ZSET  rid -> lease expiry (epoch ms, Redis clock)
    P:{T}:settled:<rid>    STRING marker making settle/record idempotent (not written by
                           a plain release, which is idempotent as it is),
                           TTL max(2 x hold TTL, 60 s)
    P:{T}:agents:<day>     SET   agents the tenant named on that UTC day (max_agents)
    P:{T}:users:<day>      SET   end users of user counters that day (max_users); both
                                 also read, bounded, by ``seen_today``
    P:{T}:inflight[:a:A]   ZSET  the tenant's (agent's) requests in flight: rid -> lease
                                 expiry (max_concurrent)
    P:{T}:epoch            STRING the tenant's epoch, set at its first recorded spend:
                                 gone means its spend was lost (no TTL)
    P:{T}:restored:<rid>   STRING a journal entry already restored, until its periods end
    P:{store}:id           STRING the store's identity (gone: the store lost everything)
    P:{store}:tenants      SET   tenants that have an epoch
    P:{store}:lost         HASH  loss flags: "*" (the whole store) or a tenant id -> details
    P:{T}:spend:hour       HASH  history: hour start -> micro-USD settled in that hour
                                 (the last 48 hours; written by the settle)
    P:{T}:spend:day        HASH  history: day start -> micro-USD settled that day (90 days)
    P:{T}:rejections       LIST  the tenant's latest rejections (JSON), newest first,
                                 at most 100, gone 7 days after the last

The tenant id in braces is a Cluster hash tag, so every key of one request lives in one
slot and each operation is one Lua script. Counter keys expire at period end + hold TTL
+ ``expiry_margin_s`` (re-applied on every reserve/settle), long enough for late settles;
a counter settled back to nothing spent and nothing held is deleted. Ids are validated
against narrow character sets; keys never contain secrets.

Clock: Redis ``TIME``, read inside the scripts. Python computes each window's period
(calendar arithmetic in the tenant's time zone) from its estimate of Redis time, the
script checks that ``TIME`` falls in every period and otherwise answers ``skew`` with its
time, and Python retries once or twice with that time. Normally: one round trip.

Every Redis error or timeout becomes ``StoreUnavailable``. Each round trip is bounded by
``timeout_s`` from the moment its command is written (script calls: see
``redis_scripts.Server``; other commands: the client's socket timeouts), and a whole
operation by ``GUARD_BACKSTOP`` x ``timeout_s``, so that the proxy's own queueing or a busy
event loop is not taken for a slow store. Requires Redis >= 6.2 (scripts replicated by
effects; ``SET ... PXAT``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

# With redis_scripts.py, the only modules allowed to talk to Redis (banned elsewhere).
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.counters import (
    DEFAULT_EXPIRY_MARGIN_S,
    MAX_MICROS,
    MIN_MARKER_TTL_S,
    NO_LIMITS,
    SEEN_READ_MAX,
    Amounts,
    Counter,
    CounterState,
    Limits,
    ReserveResult,
    SeenToday,
    Unit,
    check_amount,
    check_counters,
    check_rid,
    check_seen,
    check_ttl,
    clamp_actual,
)
from proxy.errors import StoreDataLost, StoreUnavailable
from proxy.history import (
    DAYS_KEPT,
    HOUR_S,
    HOURS_KEPT,
    REJECTIONS_KEPT,
    REJECTIONS_TTL_S,
    Rejection,
    SpendHistory,
    buckets,
    buckets_since,
    cutoffs,
)
from proxy.journal import JournalEntry, counter_of
from proxy.logs import log_event
from proxy.redis_scripts import (
    DEFAULT_CONNECTIONS,
    OPEN,
    QUIET_CONNECT,
    Prepared,
    Script,
    Server,
    lua,
    server_options,
)
from proxy.windows import Period, period_of

__all__ = ["RedisStore", "RestoreReport"]

log = logging.getLogger("capproxy.store")


@dataclass(slots=True)
class RestoreReport:
    """What ``RedisStore.restore`` did with the journal's entries."""

    restored: int = 0  # added back
    present: int = 0  # recorded under the tenant's current epoch: not lost
    expired: int = 0  # every period it counted in is over (or it cost nothing)
    duplicates: int = 0  # restored by an earlier replay
    tenants: set[str] = field(default_factory=set)


SKEW_ATTEMPTS = 3
WATCH_INTERVAL_S = 1.0  # how often each replica checks the store for lost spend
BACK_AFTER_S = 1.0  # an outage ends after this long without a failed call
DATA_LOST_RETRY_AFTER_S = 60
CLUSTER_ATTEMPTS = 3  # a call, and twice more after reading the slots again
GUARD_BACKSTOP = 8  # an operation's limit, in store timeouts (see _guard)
MAX_PREPARED_CALLS = 4096  # prepared script calls remembered (all dropped past this many)
DAY_S = 86_400
UTC = ZoneInfo("UTC")

_PREFIX_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")

T = TypeVar("T")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _redis_time(sec: Any, usec: Any) -> float:
    return int(sec) + int(usec) / 1_000_000  # int() reads bytes, str and int alike


def _agent_of(counters: Sequence[Counter]) -> str:
    """The agent a request's counters name ('' when only the tenant's)."""
    return next((c.agent_id for c in counters if c.agent_id is not None), "")


def _user_of(counters: Sequence[Counter]) -> str:
    return next((c.user_id for c in counters if c.user_id is not None), "")


def _states(
    counters: Sequence[Counter], periods: Sequence[Period], values: Sequence[Any]
) -> tuple[CounterState, ...]:
    """The states in a script's reply: spent, held, latest lease end (ms, 0 = none)."""
    states = []
    for i, (c, p) in enumerate(zip(counters, periods, strict=True)):
        spent, held, end_ms = values[3 * i : 3 * i + 3]
        end = float(end_ms) / 1000  # float() and int() read the reply's bytes as they are
        states.append(CounterState(c, p, int(spent), int(held), end or None))
    return tuple(states)


def _points(flat: Sequence[Any], since: int) -> tuple[tuple[int, int], ...]:
    """A history hash's fields and values (HGETALL, flat), as kept buckets."""
    pairs = zip(flat[0::2], flat[1::2], strict=True)
    return buckets_since(((int(f), int(v)) for f, v in pairs), since)


def _honour_cancel(task: asyncio.Task[Any] | None) -> None:
    """Re-raise a cancellation that the client library turned into an error or swallowed
    (it can, when a cancel lands while it closes a connection): a cancelled caller must
    stop, not carry on as if the store had merely failed."""
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _within(
    seconds: float, call: Callable[[], Awaitable[T]], task: asyncio.Task[Any] | None = None
) -> T:
    """``await call()`` in ``task`` (the current one), cut off after ``seconds`` with
    ``TimeoutError``: what ``asyncio.timeout`` does, with one timer handle and no context
    manager (the store's two calls a request pay for it)."""
    task = task or asyncio.current_task()
    if task is None:
        raise RuntimeError("_within runs in a task")
    cancelling = task.cancelling()
    cut = _Cut(task)
    timer = asyncio.get_running_loop().call_later(seconds, cut.fire)
    try:
        return await call()
    except asyncio.CancelledError as exc:
        # Ours if the timer fired and no other cancellation is pending (asyncio.timeout's
        # rule); the finally below takes ours back.
        if cut.fired and task.cancelling() - 1 <= cancelling:
            raise TimeoutError("the store operation took too long") from exc
        raise
    finally:
        timer.cancel()
        if cut.fired:
            task.uncancel()


class _Cut:
    """Cancels ``task`` once, when its time is up, and remembers it did."""

    __slots__ = ("fired", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.fired = False

    def fire(self) -> None:
        if not self.task.done():
            self.fired = True
            self.task.cancel()


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
        client: Redis | RedisCluster,
        *,
        prefix: str = "capproxy",
        timeout_s: float,
        expiry_margin_s: int = DEFAULT_EXPIRY_MARGIN_S,
        local_clock: Callable[[], float] = time.time,
        max_connections: int = DEFAULT_CONNECTIONS,  # script connections per server
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
        self._reserve = Script(lua("reserve.lua", with_lib=True))
        self._calls: dict[tuple[object, ...], tuple[tuple[object, ...], tuple[Prepared, str]]] = {}
        self._history_second: tuple[object, tuple[int, ...]] = (None, ())
        self._renew = Script(lua("renew.lua", with_lib=True))
        self._commit = Script(lua("history.lua") + lua("commit.lua"))
        self._snapshot = Script(lua("snapshot.lua"))
        # Standalone and Sentinel: the one server; Cluster: one per node, by name.
        self._connections = max_connections
        self._server = (
            Server(client, connections=max_connections) if isinstance(client, Redis) else None
        )
        self._nodes: dict[str, Server] = {}
        self._node_options: dict[str, Any] = {}  # how to connect to a cluster node
        self._topology_lock = asyncio.Lock()
        self._topology_at = -1.0  # when the cluster's slots were last read (monotonic)
        self._judge = Script(lua("judge.lua"))
        self._restore = Script(lua("restore.lua"))
        self._history = Script(lua("history_read.lua"))
        self._rejection = Script(lua("rejection.lua"))
        self._seen = Script(lua("seen_read.lua"))
        # Continuity: the store's identity as this process knows it, what is lost, and
        # who is told (``on_data_loss(tenant or None for the whole store, detail)``).
        self.data_loss_policy = "fail_closed"
        self.on_data_loss: Callable[[str | None, str], None] | None = None
        self._store_id: str | None = None
        self._lost_store = False
        self._lost_tenants: frozenset[str] = frozenset()
        self._registered: set[str] = set()
        self._registering = asyncio.Lock()  # one registration write at a time
        self._epochs: dict[str, str] = {}
        self.watch_checks = 0  # completed checks of ``watch``
        self._down_since: float | None = None  # an outage began (monotonic)
        self._last_failure = 0.0
        self._failed = 0
        self._topology: frozenset[str] = frozenset()  # cluster primaries / sentinel primary
        self._topology_at_down: frozenset[str] | None = None  # when the outage began

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "capproxy",
        timeout_s: float,
        expiry_margin_s: int = DEFAULT_EXPIRY_MARGIN_S,
        mode: str = "standalone",
        sentinels: Sequence[str] = (),
        service_name: str = "",
        sentinel_password: str | None = None,
        max_connections: int = DEFAULT_CONNECTIONS,  # script connections per server
    ) -> RedisStore:
        """A store owning a new client (closed by ``aclose``).

        ``mode``: ``standalone`` (``url`` is the server), ``cluster`` (``url`` is any node
        of a Redis Cluster: the client learns the rest and follows MOVED/ASK and
        failovers) or ``sentinel`` (the primary of ``service_name`` as ``sentinels``
        ("host:port") name it, asked again after every failover; ``url`` gives the
        password, database and TLS). Socket timeouts are ``timeout_s``; a failed command
        is retried twice on a fresh connection (safe: every script is idempotent by rid),
        within ``timeout_s``.
        """
        retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=2)
        timeouts: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
        }
        client: Redis | RedisCluster
        if mode == "cluster":
            client = RedisCluster.from_url(
                url,
                retry=retry,
                # Slots whose shard is failing over fail alone; the others keep serving.
                require_full_coverage=False,
                **timeouts,
                **QUIET_CONNECT,
            )
        elif mode == "sentinel":
            nodes = [(host, int(port)) for host, _, port in (n.rpartition(":") for n in sentinels)]
            manager = Sentinel(  # type: ignore[no-untyped-call]
                nodes,
                sentinel_kwargs={"password": sentinel_password, **timeouts},
                **timeouts,
                **server_options(url),
            )
            client = manager.master_for(service_name, retry=retry, **QUIET_CONNECT)
        elif mode == "standalone":
            client = Redis.from_url(url, retry=retry, **timeouts, **QUIET_CONNECT)
        else:
            raise ValueError(f"unknown store mode {mode!r}")
        store = cls(
            client,
            prefix=prefix,
            timeout_s=timeout_s,
            expiry_margin_s=expiry_margin_s,
            max_connections=max_connections,
        )
        store._owns_client = True
        if mode == "cluster":
            store._node_options = {
                **server_options(url),
                **timeouts,
                # A node that cannot be reached fails at once: the slots are read again
                # (its replica may have taken over) instead of retrying a dead address.
                "retry": Retry(NoBackoff(), retries=0),
                **QUIET_CONNECT,
            }
        return store

    @property
    def client(self) -> Redis | RedisCluster:
        """The Redis client (owned by this store only when made by ``from_url``)."""
        return self._client

    @property
    def prefix(self) -> str:
        return self._prefix

    # -- keys

    def counter_key(self, counter: Counter, period: Period) -> str:
        """The HASH key of ``counter`` in ``period`` (its holds ZSET adds ``:holds``)."""
        tag = f"{self._prefix}:{{{counter.tenant_id}}}"
        kind, ident = counter.scope
        scope = "t" if kind == "tenant" else f"{kind[0]}:{ident}"
        unit = "" if counter.unit is Unit.USD else f":{counter.unit.value}"
        return f"{tag}:{scope}:{counter.window.value}:{period.start}{unit}"

    def settled_key(self, tenant_id: str, rid: str) -> str:
        return f"{self._prefix}:{{{tenant_id}}}:settled:{rid}"

    def epoch_key(self, tenant_id: str) -> str:
        """The tenant's epoch: set when it first records spend; gone means lost."""
        return f"{self._prefix}:{{{tenant_id}}}:epoch"

    def in_flight_keys(self, tenant_id: str, agent: str) -> list[str]:
        """The ZSETs of requests in flight (rid -> lease expiry): the tenant's, the agent's."""
        tag = f"{self._prefix}:{{{tenant_id}}}:inflight"
        return [tag, f"{tag}:a:{agent}"]

    def history_keys(self, tenant_id: str) -> list[str]:
        """The tenant's spend per hour and per day (HASH: bucket start -> micro-USD)."""
        tag = f"{self._prefix}:{{{tenant_id}}}:spend"
        return [f"{tag}:hour", f"{tag}:day"]

    def rejections_key(self, tenant_id: str) -> str:
        """The tenant's latest rejections (LIST of JSON entries, newest first)."""
        return f"{self._prefix}:{{{tenant_id}}}:rejections"

    def agents_key(self, tenant_id: str, at: float) -> str:
        """The SET of agents the tenant named on the UTC day of ``at``."""
        return f"{self._prefix}:{{{tenant_id}}}:agents:{int(at // DAY_S)}"

    def users_key(self, tenant_id: str, at: float) -> str:
        """The SET of end users with counters of the tenant's on the UTC day of ``at``."""
        return f"{self._prefix}:{{{tenant_id}}}:users:{int(at // DAY_S)}"

    def _agents_expire_at_ms(self, at: float) -> int:
        return (int(at // DAY_S) + 1) * DAY_S * 1000 + self._margin_ms

    def _expire_at_ms(self, period: Period, hold_ttl_ms: int) -> int:
        return period.end * 1000 + hold_ttl_ms + self._margin_ms

    # -- operations

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
        ttl_ms = check_ttl(hold_ttl_s)

        self._refuse_if_lost(tenant)

        async def attempt(at: float) -> ReserveResult:
            periods = [period_of(c.window, at, tz) for c in counters]
            memo = (self._reserve, id(counters), id(limits), ttl_ms, int(at // DAY_S))
            call, slot = self._prepared(
                (*memo, *[(p.start, p.end) for p in periods]),
                (counters, limits),
                lambda: self._reserve_call(tenant, counters, periods, at, ttl_ms, limits),
            )
            opened: list[str | int] = [self.settled_key(tenant, rid), rid]
            opened += [amounts.of(c.unit) for c in counters]
            reply = await self._run(self._reserve, call.fill(opened), slot)
            status, now = self._status(reply)
            states = _states(counters, periods, reply[4:])
            return ReserveResult(
                status == "ok",
                now,
                states,
                amounts,
                too_many_agents=status == "too_many_agents",
                too_many_users=status == "too_many_users",
                concurrency_limited=status.removeprefix("busy_") if status[:5] == "busy_" else "",
                epoch=_text(reply[3]),
            )

        result = await self._guard(lambda: self._with_periods(attempt))
        if result.epoch:
            self._epochs[tenant] = result.epoch
            if tenant not in self._registered:
                await self._guard(lambda: self._register(tenant))
        elif await self._guard(lambda: self._epoch_lost(tenant)):
            if result.ok:  # nothing goes out for it: give the hold back
                await self.settle(rid, result.states, 0, hold_ttl_s=hold_ttl_s)
            self._refuse_if_lost(tenant)
        return result

    async def renew(self, rid: str, states: Sequence[CounterState], *, hold_ttl_s: float) -> bool:
        check_rid(rid)
        check_counters([s.counter for s in states])
        ttl_ms = check_ttl(hold_ttl_s)
        keys: list[str] = []
        for s in states:
            key = self.counter_key(s.counter, s.period)
            keys += [key, key + ":holds"]
        keys += self.in_flight_keys(
            states[0].counter.tenant_id, _agent_of([s.counter for s in states])
        )

        async def renew() -> bool:
            reply = await self._eval(self._renew, keys, [rid, ttl_ms])
            status, _ = self._status(reply)
            return status == "ok"

        return await self._guard(renew)

    def _reserve_call(
        self,
        tenant: str,
        counters: Sequence[Counter],
        periods: Sequence[Period],
        at: float,
        ttl_ms: int,
        limits: Limits,
    ) -> tuple[Prepared, str]:
        """reserve.lua's call for these counters and periods; open: the rid's settled
        marker, the rid, and each counter's amount."""
        agent, user = _agent_of(counters), _user_of(counters)
        tenant_flight, agent_flight = limits.max_concurrent
        if not agent:
            agent_flight = None  # no agent: only the tenant's requests in flight count
        keys: list[str] = []
        args: list[object] = [OPEN, ttl_ms]
        for c, p in zip(counters, periods, strict=True):
            key = self.counter_key(c, p)
            keys += [key, key + ":holds"]
            limit = min(c.limit, MAX_MICROS)  # beyond it, a limit is no limit
            args += [limit, OPEN, p.start, p.end, self._expire_at_ms(p, ttl_ms)]
        keys += [OPEN, self.epoch_key(tenant)]
        keys.append(self.agents_key(tenant, at))
        keys += self.in_flight_keys(tenant, agent)
        keys.append(self.users_key(tenant, at))
        args += [agent, limits.max_agents or MAX_MICROS, self._agents_expire_at_ms(at)]
        args += [tenant_flight or "", agent_flight or ""]
        args += [user, limits.max_users or MAX_MICROS]
        return Prepared(self._reserve, keys, args), keys[0]

    def _history_at(self, at: float, tz: ZoneInfo) -> tuple[int, ...]:
        """The history's hour and day buckets at ``at``, its cutoffs and its keys'
        expiries: worked out once a second."""
        second = (int(at), tz)
        if self._history_second[0] != second:
            values = (*buckets(at, tz), *cutoffs(at), *self._history_expiry_ms(at))
            self._history_second = (second, values)
        return self._history_second[1]

    def _commit_call(
        self,
        tenant: str,
        targets: Sequence[tuple[Counter, Period]],
        ttl_ms: int,
        check: bool,
        marked: bool,
        at: float,
        history: tuple[int, int],
    ) -> tuple[Prepared, str]:
        """commit.lua's call for these counters and periods, with the history's hour and
        day; open: the rid's settled marker, the rid, each counter's amount, a nonce, the
        cost added to the history, and the history's cutoffs and expiries (by the second)."""
        marker_ttl_ms = max(2 * ttl_ms, MIN_MARKER_TTL_S * 1000) if marked else 0
        keys: list[object] = [OPEN]
        args: list[object] = [OPEN, marker_ttl_ms, int(check)]
        for c, p in targets:
            key = self.counter_key(c, p)
            keys += [key, key + ":holds"]
            kind = c.scope[0]
            scope = kind[0] if kind in ("agent", "user") else "t"
            args += [OPEN, p.start, p.end, self._expire_at_ms(p, ttl_ms), scope]
        counters = [c for c, _ in targets]
        agent = _agent_of(counters)
        keys += [self.epoch_key(tenant), self.agents_key(tenant, at)]
        keys += self.in_flight_keys(tenant, agent)
        keys.append(self.users_key(tenant, at))
        args += [agent, OPEN, _user_of(counters)]
        keys += self.history_keys(tenant)
        args += [OPEN, *history, OPEN, OPEN, OPEN, OPEN]
        return Prepared(self._commit, keys, args), self.epoch_key(tenant)

    def _prepared(
        self,
        memo: tuple[object, ...],
        refs: tuple[object, ...],
        build: Callable[[], tuple[Prepared, str]],
    ) -> tuple[Prepared, str]:
        """The prepared call (and a key of its slot) remembered under ``memo``, which
        names ``refs`` by ``id``: it is the one remembered only while they are the very
        objects it was built for (a plan's counters and limits are kept and reused)."""
        found = self._calls.get(memo)
        if found is not None and all(a is b for a, b in zip(found[0], refs, strict=True)):
            return found[1]
        if len(self._calls) >= MAX_PREPARED_CALLS:
            self._calls.clear()
        call = build()
        self._calls[memo] = (refs, call)
        return call

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
        ttl_ms = check_ttl(hold_ttl_s)
        targets = [(s.counter, s.period) for s in states]
        await self._guard(
            lambda: self._run_commit(
                rid, tenant, targets, actual, ttl_ms, check=False, tz=tz or UTC
            )
        )

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
        ttl_ms = check_ttl(hold_ttl_s)

        async def attempt(at: float) -> None:
            targets = [(c, period_of(c.window, at, tz)) for c in counters]
            await self._run_commit(rid, tenant, targets, actual, ttl_ms, check=True, tz=tz)

        await self._guard(lambda: self._with_periods(attempt))

    async def snapshot(
        self, counters: Sequence[Counter], *, tz: ZoneInfo
    ) -> tuple[CounterState, ...]:
        check_counters(counters)

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

    async def in_flight(self, tenant_id: str, agent_id: str | None) -> tuple[int, int]:
        keys = self.in_flight_keys(tenant_id, agent_id or "")

        async def count() -> tuple[int, int]:
            now_ms = int(self._estimate() * 1000)
            tenant = await self._client.zcount(keys[0], f"({now_ms}", "+inf")
            agent = await self._client.zcount(keys[1], f"({now_ms}", "+inf") if agent_id else 0
            return int(tenant), int(agent)

        return await self._guard(count)

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

    async def config_value(self, name: str) -> str | None:
        """A server setting (``CONFIG GET``), or None where the server hides it."""

        async def read() -> str | None:
            try:
                reply = await self._client.config_get(name)
            except ResponseError:  # CONFIG renamed or disabled (managed Redis)
                return None
            found: dict[Any, Any] = reply if isinstance(reply, dict) else {}
            value: Any = found.get(name) or found.get(name.encode())
            if isinstance(value, dict):  # a cluster answers per node: any will do
                value = next(iter(value.values()), None)
            return None if value is None else _text(value)

        return await self._guard(read)

    async def ping(self) -> None:
        """The store answers and runs the scripts (the readiness check)."""

        async def ping() -> None:
            await self._client.ping()
            keys = [self.store_key("id"), self.store_key("tenants"), self.store_key("lost")]
            await self._eval(self._judge, keys, [""])

        await self._guard(ping)

    async def history(self, tenant_id: str) -> SpendHistory:
        async def read() -> SpendHistory:
            hours, days = await self._eval(self._history, self.history_keys(tenant_id), [])
            hour_cut, day_cut = cutoffs(self._estimate())
            return SpendHistory(hours=_points(hours, hour_cut), days=_points(days, day_cut))

        return await self._guard(read)

    async def note_rejection(self, tenant_id: str, rejection: Rejection) -> None:
        keys = [self.rejections_key(tenant_id)]
        args: list[str | int] = [rejection.encode(), REJECTIONS_KEPT, REJECTIONS_TTL_S * 1000]
        await self._guard(lambda: self._eval(self._rejection, keys, args))

    async def rejections(self, tenant_id: str) -> tuple[Rejection, ...]:
        key = self.rejections_key(tenant_id)
        entries = await self._guard(lambda: self._client.lrange(key, 0, REJECTIONS_KEPT - 1))
        found = (Rejection.decode(e) for e in entries)
        return tuple(r for r in found if r is not None)

    async def seen_today(self, tenant_id: str, *, limit: int) -> SeenToday:
        check_seen(tenant_id, limit)

        async def read() -> SeenToday:
            at = self._estimate()
            keys = [self.agents_key(tenant_id, at), self.users_key(tenant_id, at)]
            agents_total, agents, users_total, users = await self._eval(
                self._seen, keys, [limit, SEEN_READ_MAX]
            )
            return SeenToday(
                day=int(at // DAY_S) * DAY_S,
                agents=tuple(_text(a) for a in agents),
                agents_total=int(agents_total),
                users=tuple(_text(u) for u in users),
                users_total=int(users_total),
            )

        return await self._guard(read)

    def _history_expiry_ms(self, at: float) -> tuple[int, int]:
        """History keys live as long as their newest bucket is kept."""
        hour_end = (int(at) + (HOURS_KEPT + 1) * HOUR_S) * 1000
        return hour_end, (int(at) + (DAYS_KEPT + 1) * DAY_S) * 1000

    async def aclose(self) -> None:
        await self._drop_idle()
        for server in self._nodes.values():
            await server.client.aclose()
        if self._owns_client:
            await self._client.aclose()

    def epoch_of(self, tenant_id: str) -> str:
        """The tenant's epoch as last seen ('' before it recorded any spend)."""
        return self._epochs.get(tenant_id, "")

    # -- continuity: spend the store lost

    def store_key(self, name: str) -> str:
        """A store-wide key (``id``, ``tenants``, ``lost``), all in one slot."""
        return f"{self._prefix}:{{store}}:{name}"

    @property
    def lost(self) -> tuple[bool, frozenset[str]]:
        """(the whole store's spend is lost, tenants whose spend is lost), as last read."""
        return self._lost_store, self._lost_tenants

    def _refuse_if_lost(self, tenant: str) -> None:
        if self.data_loss_policy != "fail_closed":
            return
        if self._lost_store or tenant in self._lost_tenants:
            raise StoreDataLost(
                "The budget store lost this tenant's recorded spend; requests are refused "
                "until an operator restores it (capproxy restore) or accepts the loss.",
                retry_after_s=DATA_LOST_RETRY_AFTER_S,
            )

    async def _register(self, tenant: str) -> None:
        """Add the tenant to the store's set of tenants with an epoch, once per process:
        the first requests of a new tenant arrive together, and each would otherwise
        take a connection of its own for the same write."""
        async with self._registering:
            if tenant in self._registered:
                return
            await self._client.sadd(self.store_key("tenants"), tenant)
            self._registered.add(tenant)

    async def _epoch_lost(self, tenant: str) -> bool:
        """A tenant without an epoch: new, or its spend was lost (True, and it is now
        declared lost; with ``continue`` it starts again from zero)."""
        keys = [self.store_key("id"), self.store_key("tenants"), self.store_key("lost")]
        store_id, registered, flagged = await self._eval(self._judge, keys, [tenant])
        store_id = _text(store_id)
        if self._store_id is not None and store_id != self._store_id:
            await self._declare_lost(None, "the store restarted empty or was flushed")
            return self.data_loss_policy == "fail_closed"
        if int(registered):
            await self._declare_lost(tenant, "its counters are gone from the store")
            return self.data_loss_policy == "fail_closed"
        if int(flagged):
            await self._watch_once()
            return True
        return False

    async def _declare_lost(self, tenant: str | None, detail: str) -> None:
        """Record a loss in the store (so every replica refuses alike) and report it."""
        info = json.dumps({"at": self._estimate(), "detail": detail})
        if tenant is None:
            new_id = secrets.token_hex(8)
            if self.data_loss_policy == "fail_closed":
                await self._client.hset(self.store_key("lost"), "*", info)
                self._lost_store = True
            await self._client.set(self.store_key("id"), new_id)
            self._store_id = new_id
            self._registered.clear()
            self._epochs.clear()
        elif self.data_loss_policy == "fail_closed":
            await self._client.hset(self.store_key("lost"), tenant, info)
            self._lost_tenants = self._lost_tenants | {tenant}
        else:  # continue: the tenant starts again from zero, under a new epoch
            await self._client.set(self.epoch_key(tenant), secrets.token_hex(8))
        if self.on_data_loss is not None:
            self.on_data_loss(tenant, detail)

    async def watch(self, *, has_history: bool = False) -> None:
        """Check the store's identity and loss flags about once a second, until cancelled:
        every replica learns of a loss within a second, whether it ran through it or
        started after it. ``has_history``: this deployment recorded spend before (its
        journal has entries), so a store without an identity lost it rather than being new.
        """
        first = True
        while True:
            try:
                check = functools.partial(self._watch_once, first=first, has_history=has_history)
                await self._guard(check)
                first = False
                self.watch_checks += 1
            except StoreUnavailable:
                pass  # logged by the store's state tracking; the next tick tries again
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def _watch_once(self, *, first: bool = False, has_history: bool = False) -> None:
        store_id = await self._client.get(self.store_key("id"))
        if store_id is None:
            if self._store_id is not None or (first and has_history):
                await self._declare_lost(None, "the store restarted empty or was flushed")
            else:  # a new store: this process is the first to use it
                await self._client.set(self.store_key("id"), secrets.token_hex(8), nx=True)
                store_id = await self._client.get(self.store_key("id"))
        if store_id is not None:
            if self._store_id is not None and _text(store_id) != self._store_id:
                self._registered.clear()  # another replica found the loss and said so
                self._epochs.clear()
                if self.data_loss_policy == "continue" and self.on_data_loss is not None:
                    self.on_data_loss(None, "found by another replica; going on from zero")
            self._store_id = _text(store_id)
        pool = getattr(self._client, "connection_pool", None)
        address = getattr(pool, "master_address", None)
        if address is not None:  # Sentinel: the primary it last named
            self._note_topology(frozenset({f"{address[0]}:{address[1]}"}))
        flags = await self._client.hkeys(self.store_key("lost"))
        names = {_text(f) for f in flags}
        lost_store, lost_tenants = "*" in names, frozenset(names - {"*"})
        news: list[str | None] = [None] if lost_store and not self._lost_store else []
        news += sorted(lost_tenants - self._lost_tenants)
        self._lost_store, self._lost_tenants = lost_store, lost_tenants
        for tenant in news:  # declared by another replica
            if self.on_data_loss is not None:
                self.on_data_loss(tenant, "declared lost by another replica")

    async def restore(self, entries: Iterable[JournalEntry]) -> RestoreReport:
        """Add back the spend of journal ``entries`` that the store lost, in the periods
        still current, then clear the loss (as ``accept_loss``).

        An entry is lost when its tenant's epoch in the store is no longer the one it was
        recorded under; the others are present and skipped. Each entry is added at most
        once, however often it is replayed (a marker per entry lives until its periods
        end)."""
        report = RestoreReport()
        now = await self.now()
        epochs: dict[str, str] = {}
        for entry in entries:
            tenant = entry.tenant
            if tenant not in epochs:
                current = await self._guard(
                    functools.partial(self._client.get, self.epoch_key(tenant))
                )
                epochs[tenant] = "" if current is None else _text(current)
            if entry.epoch and entry.epoch == epochs[tenant]:
                report.present += 1
                continue
            live = [
                (counter_of(tenant, key), Period(key[2], key[3]))
                for key in entry.counters
                if key[3] > now
            ]
            if not live or entry.cost_micros <= 0:
                report.expired += 1
                continue
            keys = [f"{self._prefix}:{{{tenant}}}:restored:{entry.request_id}"]
            last_end = max(p.end for _, p in live)
            args: list[str | int] = [entry.cost_micros, self._restore_expiry_ms(last_end)]
            for counter, period in live:
                keys.append(self.counter_key(counter, period))
                args.append(self._restore_expiry_ms(period.end))
            added = await self._guard(functools.partial(self._eval, self._restore, keys, args))
            if int(added):
                report.restored += 1
                report.tenants.add(tenant)
            else:
                report.duplicates += 1
        await self.accept_loss(also=report.tenants)
        return report

    def _restore_expiry_ms(self, end: int) -> int:
        return end * 1000 + self._margin_ms

    async def accept_loss(self, *, also: Iterable[str] = ()) -> frozenset[str]:
        """Clear every loss flag: the tenants go on from what the store holds now, under
        a new epoch (also given to the tenants in ``also``). Returns the tenants that were
        flagged (``*``: the whole store)."""

        async def clear() -> frozenset[str]:
            flags = {_text(f) for f in await self._client.hkeys(self.store_key("lost"))}
            for tenant in (flags - {"*"}) | set(also):
                await self._client.set(self.epoch_key(tenant), secrets.token_hex(8))
                await self._client.sadd(self.store_key("tenants"), tenant)
            if await self._client.get(self.store_key("id")) is None:
                await self._client.set(self.store_key("id"), secrets.token_hex(8))
            await self._client.delete(self.store_key("lost"))
            return frozenset(flags)

        return await self._guard(clear)

    # -- internals

    async def _eval(self, script: Script, keys: list[str], args: Sequence[str | int]) -> Any:
        """One script call: EVALSHA (EVAL when the server lost the script), on the server
        that holds ``keys`` (all in one slot)."""
        return await self._run(script, script.packed(keys, args), keys[0])

    async def _run(self, script: Script, packed: bytes, slot_key: str) -> Any:
        """``packed``, a call of ``script``, on the server that holds ``slot_key`` (and
        every key of the call: they share one slot)."""
        if self._server is not None:
            return await self._server.run(script, packed)
        assert isinstance(self._client, RedisCluster)
        return await self._run_cluster(self._client, script, packed, slot_key)

    async def _run_cluster(
        self, client: RedisCluster, script: Script, packed: bytes, slot_key: str
    ) -> Any:
        """The call on the node that serves the keys' slot, as the cluster client last read
        the slots. MOVED/ASK, a shard that is down or failing over, or a node that cannot
        be reached make it read the slots again (once for many callers) and try again:
        a failover costs its own duration, then calls reach the promoted replica."""
        if self._topology_at < 0:
            await self._read_topology(client, since=-1.0)
        for attempt in range(CLUSTER_ATTEMPTS):
            seen = self._topology_at
            node = client.nodes_manager.get_node_from_slot(client.keyslot(slot_key))
            try:
                return await self._node(node.host, int(node.port)).run(script, packed)
            except (AskError, TryAgainError, ClusterDownError, RedisConnectionError):
                if attempt == CLUSTER_ATTEMPTS - 1:
                    raise
                await self._read_topology(client, since=seen)
        raise AssertionError("unreachable")

    def _node(self, host: str, port: int) -> Server:
        name = f"{host}:{port}"
        server = self._nodes.get(name)
        if server is None:
            client = Redis(host=host, port=port, **self._node_options)
            server = Server(client, connections=self._connections)
            self._nodes[name] = server
        return server

    async def _read_topology(self, client: RedisCluster, *, since: float) -> None:
        """Read the slots from the cluster, unless someone did after ``since``."""
        async with self._topology_lock:
            if self._topology_at > since:
                return
            await client.initialize() if since < 0 else await client.nodes_manager.initialize()
            self._topology_at = time.monotonic()
            primaries = frozenset(
                n.name
                for n in client.nodes_manager.nodes_cache.values()
                if n.server_type == "primary"
            )
            self._note_topology(primaries)

    def _note_topology(self, servers: frozenset[str]) -> None:
        """Log a change of primaries. During an outage the nodes disagree until the
        cluster converges (reads flip between the old and the new primaries): the change
        is then said once, when the store is back, from the topology the outage began
        with to the one it ended with."""
        if self._down_since is not None:
            if self._topology_at_down is None:
                self._topology_at_down = self._topology
            self._topology = servers
            return
        self._say_topology(self._topology, servers)
        self._topology = servers

    def _say_topology(self, before: frozenset[str], after: frozenset[str]) -> None:
        if before and after and before != after:
            log_event(
                "store_topology_changed",
                level=logging.WARNING,
                before=sorted(before),
                after=sorted(after),
            )

    async def _drop_idle(self) -> None:
        servers = [self._server] if self._server is not None else []
        for server in [*servers, *self._nodes.values()]:
            await server.drop()

    async def _run_commit(
        self,
        rid: str,
        tenant: str,
        targets: Sequence[tuple[Counter, Period]],
        actual_amounts: Amounts | int,
        ttl_ms: int,
        *,
        check: bool,
        tz: ZoneInfo,
    ) -> None:
        """Settle (``check=False``: the periods reserved) or record (``check=True``: the
        periods now). A settle of 0 writes no marker: releasing twice changes nothing, and
        a release leaves no key behind. The cost in micro-USD also goes to the tenant's
        history, in the hour and day (in ``tz``) of the store's time now."""
        amounts = clamp_actual(actual_amounts)
        marked = check or amounts.charges([c for c, _ in targets])
        at = self._estimate()
        hour, day, *history = self._history_at(at, tz)
        memo = (self._commit, check, marked, ttl_ms, hour, day, int(at // DAY_S))
        call, slot = self._prepared(
            (*memo, *[(id(c), p.start, p.end) for c, p in targets]),
            tuple(c for c, _ in targets),
            lambda: self._commit_call(tenant, targets, ttl_ms, check, marked, at, (hour, day)),
        )
        opened: list[str | int] = [self.settled_key(tenant, rid), rid]
        opened += [amounts.of(c.unit) for c, _ in targets]
        # The history gets the cost once per rid, as the marker makes it.
        opened += [secrets.token_hex(8), amounts.micros if marked else 0]
        opened += history
        reply = await self._run(self._commit, call.fill(opened), slot)
        self._status(reply)
        if len(reply) > 1 and reply[1]:
            self._epochs[tenant] = _text(reply[1])
            if tenant not in self._registered:  # its first spend: from now on, a missing
                await self._register(tenant)  # epoch means its spend was lost

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
        task = asyncio.current_task()
        try:
            # Each round trip is bounded by timeout_s from when its command is
            # written (script calls: redis_scripts.Server; others: socket timeouts);
            # this backstop for the whole operation must not trip on the proxy's own
            # queueing or a busy event loop.
            result = await _within(self._timeout_s * GUARD_BACKSTOP, call, task)
        except (RedisError, OSError) as exc:  # OSError includes TimeoutError
            _honour_cancel(task)
            self._went_down(exc)
            raise StoreUnavailable() from exc
        except Exception as exc:  # a fault of the client library: the store did not answer
            _honour_cancel(task)
            self._went_down(exc)
            raise StoreUnavailable() from exc
        _honour_cancel(task)
        if self._down_since is not None:
            now = time.monotonic()
            # Back once calls succeed for a while with none failing (a shard failing over
            # fails some calls and not others: that is one outage, not many).
            if now - self._last_failure >= BACK_AFTER_S:
                down_s = round(self._last_failure - self._down_since, 3)
                log_event("store_back", down_s=down_s, calls_failed=self._failed)
                self._down_since = None
                if self._topology_at_down is not None:
                    self._say_topology(self._topology_at_down, self._topology)
                    self._topology_at_down = None
        return result

    def _went_down(self, exc: BaseException) -> None:
        """Log the first failure of an outage (the rest are counted, not logged)."""
        self._failed += 1
        self._last_failure = time.monotonic()
        if self._down_since is not None:
            return
        self._down_since = self._last_failure
        self._failed = 1
        reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        hint = None
        if isinstance(exc, AskError) and self._server is not None:
            hint = "the server is a Redis Cluster node: set store.mode: cluster"
        log_event("store_down", level=logging.ERROR, reason=reason, hint=hint)
