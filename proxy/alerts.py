"""Budget alerts: one webhook POST the first time a window crosses 80 %, its soft and hard limit.

    alerter = Alerter(session, settings.alerts)
    task = asyncio.create_task(alerter.run())          # owned by a cleanup_ctx
    ...
    alerter.observe(plan, hold.states, cost_micros)    # after a request is settled (sync)
    alerter.observe_rejection(plan, result.states)     # after a budget 429 (sync)
    ...
    task.cancel(); await task                          # at shutdown (run never raises)
    await alerter.drain(timeout_s=5)

Each alert is a JSON POST (``Content-Type: application/json``) to ``alerts.webhook_url``::

    {
      "kind": "soft_limit",            # "budget_80_percent" | "soft_limit" | "hard_limit"
                                       # | "rate_80_percent" | "rate_limit"
                                       # | "store_data_lost" (tenant "*": every tenant)
      "tenant_id": "acme",
      "agent_id": "planner",           # null for a tenant-wide window
      "window": "daily",               # "minute" | "hourly" | "daily" | "weekly" | "monthly"
      "period_start": 1715731200,      # the window period [start, end), epoch seconds
      "period_end": 1715817600,
      "spend_usd": "41.250000",        # spend when the crossing was seen, exact, 6 places
      "limit_usd": "40.000000",        # the soft limit for "soft_limit", else the hard limit
      "at": "2024-05-15T10:00:00.123Z",# when the crossing was seen, RFC 3339, UTC
      "unit": "usd",                   # "usd" | "tokens" | "requests" (rate caps)
      "model_cap": null,               # the model cap's name, for its windows
      "user_id": null,                 # the end user, for user windows
      "used": null,                    # rate caps: tokens or requests used (spend_usd and
      "limit": null                    # limit_usd are then null)
    }

"budget_80_percent" means ``spend_usd >= 0.8 x limit_usd``; "rate_80_percent" and
"rate_limit" are the same crossings of a rate cap, in its unit. The request also carries an
``Idempotency-Key`` header naming the crossing (tenant, agent, window, period, kind), the same
for every attempt and every replica, so a receiver can drop duplicates.

Delivery never touches a request: ``observe`` is synchronous and O(counters), it only puts
alerts on a bounded queue (a full queue drops the alert and counts it in ``dropped``; a later
request that still sees the crossing queues it again). One loop (``run``) posts them in order,
each with ``timeout_s`` per attempt and up to ``retries`` retries with capped exponential
backoff on timeouts, connection errors, 408, 429 and 5xx; other statuses (3xx included,
redirects are not followed) fail at once. A crossing that failed is not sent again.

Deduplication is per process: a crossing is queued once per (tenant, agent, window, period,
kind), and entries are forgotten ``grace_s`` after their period ends (late settles of the old
period stay deduplicated; a period over for longer than that is not alerted at all), so memory
is bounded by the windows that cross in live periods. Crossings are judged by level (spend >=
threshold), so a restarted process alerts once more for thresholds already passed. With
N replicas each may send the same crossing once, unless a ``claim(key, ttl_s)`` callable is given
(for example Redis ``SET key 1 NX EX ttl_s``): the loop then sends only the alerts it claims.
A claim that fails or times out sends anyway (a duplicate beats a missed alert).

Failures are logged on ``capproxy.alerts`` by status or exception type only: the webhook URL
(which may carry a token) never appears in logs.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import aiohttp

from proxy.budget import BudgetPlan
from proxy.config import AlertsConfig, BudgetCap, RateCap
from proxy.counters import Amounts, CounterState, Unit
from proxy.pricing import micros_to_usd, usd_to_micros

__all__ = [
    "BUDGET_80_PERCENT",
    "HARD_LIMIT",
    "RATE_80_PERCENT",
    "RATE_LIMIT",
    "SOFT_LIMIT",
    "STORE_DATA_LOST",
    "Alert",
    "Alerter",
    "Claim",
]

BUDGET_80_PERCENT = "budget_80_percent"
SOFT_LIMIT = "soft_limit"
HARD_LIMIT = "hard_limit"
RATE_80_PERCENT = "rate_80_percent"
RATE_LIMIT = "rate_limit"
STORE_DATA_LOST = "store_data_lost"

# (key, ttl_s) -> True when this process may send the alert named by ``key``.
Claim = Callable[[str, int], Awaitable[bool]]

_RETRY_STATUSES = frozenset({408, 429})

log = logging.getLogger("capproxy.alerts")


@dataclass(frozen=True, slots=True)
class Alert:
    """One threshold crossing of one window period: the webhook's JSON body."""

    kind: str
    tenant_id: str
    agent_id: str | None
    window: str
    period_start: int
    period_end: int
    spend_usd: str | None
    limit_usd: str | None
    at: str
    unit: str = "usd"
    model_cap: str | None = None
    user_id: str | None = None
    used: int | None = None
    limit: int | None = None

    @property
    def key(self) -> str:
        """Names the crossing: equal for the same crossing in every process."""
        if self.agent_id is not None:
            scope = f"a:{self.agent_id}"
        elif self.model_cap is not None:
            scope = f"m:{self.model_cap}"
        elif self.user_id is not None:
            scope = f"u:{self.user_id}"
        else:
            scope = "t"
        unit = "" if self.unit == "usd" else f":{self.unit}"
        return f"{self.tenant_id}:{scope}:{self.window}:{self.period_start}:{self.kind}{unit}"

    def body(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()


@dataclass(slots=True)
class _Queued:
    alert: Alert
    claimed: bool = False  # a claim already won is not asked again after a requeue


class _Failure(Exception):
    """One delivery attempt failed; ``reason`` is safe to log (never the URL)."""

    def __init__(self, reason: str, *, retry: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _usd(micros: int) -> str:
    return str(micros_to_usd(micros))


def _thresholds(state: CounterState, cap: BudgetCap | RateCap) -> list[tuple[int, str]]:
    """(amount in the counter's unit at which the alert fires, kind), lowest first."""
    hard = state.counter.limit
    if isinstance(cap, RateCap):
        return [(-(-4 * hard // 5), RATE_80_PERCENT), (hard, RATE_LIMIT)]
    found = [(-(-4 * hard // 5), BUDGET_80_PERCENT), (hard, HARD_LIMIT)]
    if cap.soft_limit_usd is not None:
        found.append((usd_to_micros(cap.soft_limit_usd), SOFT_LIMIT))
    found.sort(key=lambda item: item[0])  # stable: 80 % before an equal soft limit
    return found


class Alerter:
    """Sends a JSON POST the first time a window crosses 80 %, its soft limit, and its hard limit.

        alerter = Alerter(session, settings.alerts, claim=None)
        alerter.observe(plan, states, charged_micros)   # sync, never blocks a request

    ``sent``, ``failed``, ``dropped`` and ``skipped`` (claimed by another replica) count
    alerts for metrics. Without a webhook URL every method is a no-op.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: AlertsConfig,
        *,
        max_queue: int = 1000,
        claim: Claim | None = None,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        grace_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._session = session
        self._config = config
        self._url = None if config.webhook_url is None else config.webhook_url.get_secret_value()
        self._max_queue = max(1, max_queue)
        self._claim = claim
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._grace_s = grace_s
        self._clock = clock
        self._queue: deque[_Queued] = deque()
        self._wake = asyncio.Event()
        self._seen: set[tuple[str, tuple[str, str], str, int, str]] = set()
        self._expiry: list[tuple[float, int, tuple[str, tuple[str, str], str, int, str]]] = []
        self._order = itertools.count()
        self._overflowing = False
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.skipped = 0

    @property
    def enabled(self) -> bool:
        return self._url is not None

    @property
    def pending(self) -> int:
        """Alerts queued and not yet delivered."""
        return len(self._queue)

    @property
    def remembered(self) -> int:
        """Crossings kept for deduplication."""
        return len(self._seen)

    # --- the request side: synchronous, cheap ----------------------------------------

    def observe(
        self, plan: BudgetPlan, states: Sequence[CounterState], charged: Amounts | int
    ) -> None:
        """After a request is settled: queue every threshold the charge reached, once each.

        ``states`` are the counters as reserved (``plan.caps`` in the same order); spend after
        the request is their ``spent`` plus what it was ``charged`` in their unit (an int:
        micro-USD).
        """
        if self._url is None or not states or len(states) != len(plan.caps):
            return
        now = self._prune()
        amounts = charged if isinstance(charged, Amounts) else Amounts(charged)
        for state, cap in zip(states, plan.caps, strict=True):
            spend = state.spent + max(0, amounts.of(state.counter.unit))
            for threshold, kind in _thresholds(state, cap):
                if spend < threshold:
                    break
                limit = threshold if kind == SOFT_LIMIT else state.counter.limit
                self._offer(state, kind, spend, limit, now)

    def observe_rejection(self, plan: BudgetPlan, states: Sequence[CounterState]) -> None:
        """After a budget rejection: windows whose spend (not holds) reached the hard limit."""
        if self._url is None or not states:
            return
        now = self._prune()
        for state in states:
            limit = state.counter.limit
            if state.spent >= limit:
                kind = HARD_LIMIT if state.counter.unit is Unit.USD else RATE_LIMIT
                self._offer(state, kind, state.spent, limit, now)

    def observe_data_loss(self, tenant_id: str | None) -> None:
        """The store lost recorded spend: of ``tenant_id``, or of every tenant (None).

        Sent as kind ``store_data_lost`` with ``tenant_id`` "*" for the whole store,
        ``window`` "store" and the detection time as ``period_start``."""
        now = self._clock()
        if len(self._queue) >= self._max_queue:
            self.dropped += 1
            return
        self._queue.append(
            _Queued(
                Alert(
                    kind=STORE_DATA_LOST,
                    tenant_id=tenant_id or "*",
                    agent_id=None,
                    window="store",
                    period_start=int(now),
                    period_end=int(now),
                    spend_usd=_usd(0),
                    limit_usd=_usd(0),
                    at=_rfc3339(now),
                )
            )
        )
        self._wake.set()

    def _offer(self, state: CounterState, kind: str, spend: int, limit: int, now: float) -> None:
        counter, period = state.counter, state.period
        key = (
            counter.tenant_id,
            counter.scope,
            str(counter.window),
            period.start,
            f"{kind}:{counter.unit}",
        )
        expiry = period.end + self._grace_s
        if key in self._seen or expiry <= now:  # a period long over is not worth an alert
            return
        if len(self._queue) >= self._max_queue:
            self.dropped += 1  # not remembered: a later request may queue it again
            if not self._overflowing:
                self._overflowing = True
                log.warning("alert queue full (%d): dropping alerts", self._max_queue)
            return
        self._overflowing = False
        self._seen.add(key)
        heapq.heappush(self._expiry, (expiry, next(self._order), key))
        usd = counter.unit is Unit.USD
        alert = Alert(
            kind=kind,
            tenant_id=counter.tenant_id,
            agent_id=counter.agent_id,
            window=str(counter.window),
            period_start=period.start,
            period_end=period.end,
            spend_usd=_usd(spend) if usd else None,
            limit_usd=_usd(limit) if usd else None,
            at=_rfc3339(now),
            unit=counter.unit.value,
            model_cap=counter.model_cap,
            user_id=counter.user_id,
            used=None if usd else spend,
            limit=None if usd else limit,
        )
        self._queue.append(_Queued(alert))
        self._wake.set()

    def _prune(self) -> float:
        now = self._clock()
        while self._expiry and self._expiry[0][0] <= now:
            _, _, key = heapq.heappop(self._expiry)
            self._seen.discard(key)
        return now

    # --- the delivery side ------------------------------------------------------------

    async def run(self) -> None:
        """Deliver queued alerts until cancelled; never raises anything else.

        An alert interrupted by cancellation goes back to the head of the queue for ``drain``.
        """
        if self._url is None:
            return
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._deliver_next()

    async def drain(self, timeout_s: float) -> None:
        """At shutdown (after ``run`` is cancelled): a bounded attempt at what is queued."""
        if self._url is None or not self._queue:
            return
        try:
            async with asyncio.timeout(timeout_s):
                while self._queue:
                    await self._deliver_next()
        except TimeoutError:
            self.dropped += len(self._queue)
            log.error("shutdown: %d alerts could not be delivered", len(self._queue))
            self._queue.clear()

    async def _deliver_next(self) -> None:
        item = self._queue.popleft()
        try:
            await self._deliver(item)
        except asyncio.CancelledError:
            self._queue.appendleft(item)
            raise
        except Exception as exc:  # the loop must outlive any bug in one delivery
            self.failed += 1
            # The type only: an exception's text or traceback may quote the URL.
            log.error(
                "alert %s: unexpected %s while delivering", item.alert.kind, type(exc).__name__
            )

    async def _deliver(self, item: _Queued) -> None:
        alert = item.alert
        if not item.claimed:
            if not await self._claimed(alert):
                self.skipped += 1
                return
            item.claimed = True
        attempts = self._config.retries + 1
        for attempt in range(attempts):
            try:
                await self._post(alert)
            except _Failure as failure:
                if not failure.retry or attempt + 1 == attempts:
                    self.failed += 1
                    log.warning(
                        "alert %s for tenant %s (%s) not delivered after %d attempt(s): %s",
                        alert.kind,
                        alert.tenant_id,
                        alert.window,
                        attempt + 1,
                        failure.reason,
                    )
                    return
                await asyncio.sleep(min(self._max_backoff_s, self._backoff_s * 2**attempt))
            else:
                self.sent += 1
                return

    async def _claimed(self, alert: Alert) -> bool:
        if self._claim is None:
            return True
        ttl_s = max(1, int(alert.period_end + self._grace_s - self._clock()))
        try:
            async with asyncio.timeout(self._config.timeout_s):
                return await self._claim(alert.key, ttl_s)
        except Exception as exc:  # TimeoutError included: send rather than miss the alert
            log.warning("alert claim failed (%s): sending anyway", type(exc).__name__)
            return True

    async def _post(self, alert: Alert) -> None:
        assert self._url is not None
        try:
            async with self._session.post(
                self._url,
                data=alert.body(),
                headers={"Content-Type": "application/json", "Idempotency-Key": alert.key},
                timeout=aiohttp.ClientTimeout(total=self._config.timeout_s),
                allow_redirects=False,
            ) as response:
                await response.read()
                status = response.status
        except TimeoutError:
            raise _Failure("timed out", retry=True) from None
        except aiohttp.ClientError as exc:
            # Never str(exc): some aiohttp errors quote the URL.
            raise _Failure(type(exc).__name__, retry=True) from None
        if 200 <= status < 300:
            return
        raise _Failure(f"HTTP {status}", retry=status >= 500 or status in _RETRY_STATUSES)
