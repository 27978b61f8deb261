"""Reserve, then settle: the only way a request touches the spend store.

    async with ledger.hold(plan, tz=tz, hold_ttl_s=lease) as hold:   # 429 / 503 on entry
        response = await forward(...)
        await hold.commit(cost_micros)        # not called: the hold is released on exit

The hold is a lease of ``hold_ttl_s`` seconds, renewed every third of it for as long as
the ``async with`` block runs (a timer owned by the block starts each renewal when it
is due, so a request that ends within a third of a lease costs no task; stopped by
``commit`` or on exit, a renewal under way awaited on exit). A proxy that dies leaves
holds that end, and are charged as spent, one lease later; if it was only stalled, its
settle replaces that charge by the actual cost. A renewal the store cannot take is logged
and tried again at the next tick; it never fails the request.

A settle the store cannot take right now (Redis went away after the request was
admitted) is kept in a bounded queue and retried until it lands; settles are
idempotent by reservation id, so a retry never double-counts. With
``store.on_error: fail_open`` an unreachable store admits the request and records its
cost the same way once the store is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from proxy.budget import BudgetPlan, refusal
from proxy.counters import Amounts, Counter, CounterState, ReserveResult, Store
from proxy.errors import CapExceeded, StoreDataLost, StoreUnavailable
from proxy.history import Rejection

log = logging.getLogger("capproxy.ledger")

# A lease is renewed this many times per lease period: two renewals may fail in a row
# before it runs out.
RENEWALS_PER_LEASE = 3
NOTHING = Amounts(0)  # a release


@dataclass(slots=True)
class LedgerStats:
    """Counts an operator should see (exported as metrics)."""

    fail_open_admitted: int = 0
    settles_deferred: int = 0
    settles_dropped: int = 0
    renewals_failed: int = 0  # renew calls the store could not take (retried next tick)
    rejections_unrecorded: int = 0  # rejections the store could not keep (not retried)
    leases_lapsed: int = 0  # holds found gone while their request ran (charged at expiry)


@dataclass(slots=True)
class _Pending:
    rid: str
    states: tuple[CounterState, ...]  # reserved periods; empty when admitted fail-open
    counters: tuple[Counter, ...]
    actual: Amounts
    tz: ZoneInfo
    hold_ttl_s: float
    # The reserve call failed: it may still have run in the store (a reply lost to a
    # timeout), so this rid is written even at zero, which clears any such hold.
    reserve_failed: bool = False


@dataclass(slots=True)
class Hold:
    """A request's reservation. ``commit(actual)`` settles it once; else it is released."""

    rid: str
    plan: BudgetPlan
    states: tuple[CounterState, ...]  # as reserved; empty when admitted without the store
    now: float
    _ledger: Ledger
    _tz: ZoneInfo
    _hold_ttl_s: float
    # Shadow mode: the rejection the caps would have given (the request went ahead).
    would_reject: CapExceeded | None = None
    reserve_failed: bool = False  # admitted fail-open after the store did not answer

    settled: bool = field(default=False)
    # Its lease is renewed by a timer that starts a renewal only when one is due: most
    # requests end before the first, and cost no task.
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    _renewal: asyncio.Task[None] | None = field(default=None, repr=False)
    _renewal_logged: bool = field(default=False, repr=False)

    @property
    def admitted_without_store(self) -> bool:
        return not self.states and bool(self.plan.counters)

    @property
    def epoch(self) -> str:
        """The tenant's store epoch now (after the commit: the one its spend went into)."""
        counters = self.plan.counters
        return self._ledger.store.epoch_of(counters[0].tenant_id) if counters else ""

    async def commit(self, actual: Amounts | int) -> None:
        """Replace the hold by the actual amounts (an int: micro-USD only); later calls
        are no-ops."""
        if self.settled:
            return
        self.settled = True
        self._ledger._stop_renewing(self)  # the lease is no longer needed
        amounts = actual if isinstance(actual, Amounts) else Amounts(actual)
        pending = _Pending(
            self.rid,
            self.states,
            self.plan.counters,
            Amounts(max(0, amounts.micros), max(0, amounts.tokens), max(0, amounts.requests)),
            self._tz,
            self._hold_ttl_s,
            self.reserve_failed,
        )
        await self._ledger.settle(pending)


RejectHook = Callable[[BudgetPlan, tuple[CounterState, ...]], None]
Recount = Callable[[ReserveResult], Awaitable[BudgetPlan | None]]


class _Holding:
    """``async with ledger.hold(...) as hold``: a class, not a generator-based context
    manager (that costs four calls and a generator on every request)."""

    __slots__ = ("_args", "_hold", "_ledger")

    def __init__(
        self,
        ledger: Ledger,
        args: tuple[BudgetPlan, ZoneInfo, float, bool, RejectHook | None, Recount | None],
    ) -> None:
        self._ledger = ledger
        self._args = args
        self._hold: Hold | None = None

    async def __aenter__(self) -> Hold:
        self._hold = await self._ledger._take(*self._args)
        return self._hold

    async def __aexit__(self, *exc_info: object) -> None:
        if self._hold is not None:
            await self._ledger._end(self._hold)


class Ledger:
    """Wraps a ``Store`` with holds, the fail-open policy and the retry queue."""

    def __init__(
        self,
        store: Store,
        *,
        fail_open: bool,
        max_pending: int = 10_000,
        retry_interval_s: float = 1.0,
    ) -> None:
        self.store = store
        self.fail_open = fail_open
        self.stats = LedgerStats()
        self._pending: deque[_Pending] = deque()
        self._max_pending = max_pending
        self._retry_interval_s = retry_interval_s
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._settling: set[asyncio.Task[None]] = set()  # settles cut from their request
        self._applying = 0  # settles under way in their requests' tasks
        self._applied: asyncio.Event | None = None  # set when none is (drain waits on it)
        self._renewing: set[str] = set()  # rids of the holds whose lease is renewed
        self._rejections_failing = False  # the last rejection could not be kept

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def renewing(self) -> int:
        """Holds whose lease is being renewed now (one per request in flight)."""
        return len(self._renewing)

    def hold(
        self,
        plan: BudgetPlan,
        *,
        tz: ZoneInfo,
        hold_ttl_s: float,
        enforce: bool = True,
        on_reject: RejectHook | None = None,
        smaller: Recount | None = None,
    ) -> _Holding:
        """Reserve ``plan`` (429 ``CapExceeded`` / 503 ``StoreUnavailable``), yield the hold.

        ``hold_ttl_s`` is the hold's lease, renewed every third of it while the block
        runs. With ``enforce=False`` (shadow mode) a reservation refused by a cap admits
        the request anyway, without a hold, and its amounts are recorded when it is
        committed (too many agents or end users is refused still: each costs the store
        keys).

        ``smaller`` is for a plan whose amounts are an upper bound of the request's: when
        a cap refuses them, it is given the refusal and returns the plan to ask for once
        more (its amounts no larger), or None to keep the refusal.
        """
        return _Holding(self, (plan, tz, hold_ttl_s, enforce, on_reject, smaller))

    async def _take(
        self,
        plan: BudgetPlan,
        tz: ZoneInfo,
        hold_ttl_s: float,
        enforce: bool,
        on_reject: RejectHook | None,
        smaller: Recount | None,
    ) -> Hold:
        """Entering a hold's block: reserve (see ``hold``)."""
        rid = os.urandom(16).hex()
        states: tuple[CounterState, ...] = ()
        now = 0.0
        would_reject: CapExceeded | None = None
        reserve_failed = False
        while plan.counters:
            try:
                result = await self.store.reserve(
                    rid,
                    plan.counters,
                    plan.amounts,
                    tz=tz,
                    hold_ttl_s=hold_ttl_s,
                    limits=plan.limits,
                )
            except asyncio.CancelledError:
                # Cancelled with the script perhaps run: release this rid once possible.
                self._defer(
                    _Pending(rid, (), plan.counters, NOTHING, tz, hold_ttl_s, reserve_failed=True)
                )
                raise
            except StoreDataLost:
                raise  # the store answered: this tenant's spend is lost, admit nothing
            except StoreUnavailable:
                reserve_failed = True
                if not self.fail_open:
                    # The script may yet run (or have run) in the store: clear that hold
                    # once the store answers (refunding it, if its lease ran out first and
                    # it was charged): this request never goes out.
                    self._defer(
                        _Pending(
                            rid, (), plan.counters, NOTHING, tz, hold_ttl_s, reserve_failed=True
                        )
                    )
                    raise
                self.stats.fail_open_admitted += 1
                log.debug("store unavailable: admitting request without a reservation")
            else:
                if not result.ok:
                    if result.exceeded and smaller is not None:
                        # Refused on an upper bound of the amounts: ask again, once, with
                        # the amounts worked out more closely (a refused reserve held
                        # nothing, so a new rid starts clean).
                        closer, smaller = await smaller(result), None
                        if closer is not None:
                            plan, rid = closer, os.urandom(16).hex()
                            continue
                    refused = refusal(plan, result)
                    if result.too_many_agents or result.too_many_users:
                        raise refused
                    if on_reject is not None and not result.concurrency_limited:
                        on_reject(plan, result.states)
                    if enforce:
                        raise refused
                    would_reject = refused
                else:
                    states, now = result.states, result.now
            break
        hold = Hold(rid, plan, states, now, self, tz, hold_ttl_s, would_reject, reserve_failed)
        if states:
            self._renewing.add(hold.rid)
            self._schedule_renewal(hold)
        return hold

    async def _end(self, hold: Hold) -> None:
        """Leaving a hold's block: release it unless committed, stop renewing its lease."""
        try:
            if not hold.settled:
                await hold.commit(0)
        finally:
            self._stop_renewing(hold)
            renewal = hold._renewal
            if renewal is not None and not renewal.done():
                await asyncio.wait([renewal])

    def _schedule_renewal(self, hold: Hold) -> None:
        interval = hold._hold_ttl_s / RENEWALS_PER_LEASE
        loop = asyncio.get_running_loop()
        hold._timer = loop.call_later(interval, self._start_renewal, hold)

    def _start_renewal(self, hold: Hold) -> None:
        hold._timer = None
        if not hold.settled:
            hold._renewal = asyncio.create_task(
                self._renew(hold), name=f"capproxy-lease-{hold.rid}"
            )

    def _stop_renewing(self, hold: Hold) -> None:
        """No renewal from now on (one under way is cancelled; ``hold`` awaits it)."""
        self._renewing.discard(hold.rid)
        if hold._timer is not None:
            hold._timer.cancel()
            hold._timer = None
        if hold._renewal is not None:
            hold._renewal.cancel()

    async def _renew(self, hold: Hold) -> None:
        """Renew ``hold``'s lease once, then schedule the next renewal a third of a lease
        later, unless the hold is gone."""
        try:
            held = await self.store.renew(hold.rid, hold.states, hold_ttl_s=hold._hold_ttl_s)
        except Exception as exc:  # never into the request: try again at the next tick
            self.stats.renewals_failed += 1
            if not hold._renewal_logged:
                hold._renewal_logged = True
                log.warning("hold %s: lease renewal failed (%r), retrying", hold.rid, exc)
            held = True
        if not held:
            # Its lease ran out (the store was unreachable for a whole lease, or the loop
            # stalled): the hold was charged in full, and the settle corrects it.
            self.stats.leases_lapsed += 1
            self._renewing.discard(hold.rid)
            log.warning(
                "hold %s: lease ran out while the request ran; charged in full until "
                "its settle replaces the charge",
                hold.rid,
            )
            return
        if not hold.settled:
            self._schedule_renewal(hold)

    async def settle(self, pending: _Pending) -> None:
        """Apply a settle in the request's own task. If that task is cancelled meanwhile,
        the settle is applied again in a task of its own, which ``drain`` waits for: the
        store's scripts are idempotent by rid, so a settle that had landed changes nothing
        the second time, and one that had not is not lost. A request already cut when it
        settles (shutdown's deadline) settles in a task of its own from the start: the
        store treats a call made by a cancelled task as cancelled."""
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            await asyncio.shield(self._in_own_task(pending))
            return
        self._applying += 1
        try:
            await self.apply(pending)
        except asyncio.CancelledError:
            self._in_own_task(pending)
            raise
        finally:
            self._applying -= 1
            if not self._applying and self._applied is not None:
                self._applied.set()

    def _in_own_task(self, pending: _Pending) -> asyncio.Task[None]:
        task = asyncio.create_task(self.apply(pending))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def apply(self, pending: _Pending) -> None:
        """Settle (or record, when admitted fail-open); queue it if the store is down."""
        if not pending.counters:
            return
        charges = pending.actual.charges(pending.counters)
        if not pending.states and not charges and not pending.reserve_failed:
            return  # nothing held, nothing spent
        try:
            await self._apply(pending)
        except StoreUnavailable:
            self._defer(pending)

    async def _apply(self, p: _Pending) -> None:
        if p.states:
            await self.store.settle(p.rid, p.states, p.actual, hold_ttl_s=p.hold_ttl_s, tz=p.tz)
        else:
            await self.store.record(p.rid, p.counters, p.actual, tz=p.tz, hold_ttl_s=p.hold_ttl_s)

    def _defer(self, pending: _Pending) -> None:
        release_only = (
            pending.reserve_failed
            and not pending.actual.charges(pending.counters)
            and not pending.states
        )
        if release_only and len(self._pending) >= self._max_pending // 2:
            # Never crowd out settles that carry spend: a stray hold is charged when its
            # lease ends (an overcount, never an undercount).
            return
        self.stats.settles_deferred += 1
        if len(self._pending) >= self._max_pending:
            self._pending.popleft()
            self.stats.settles_dropped += 1
            log.error("settle queue full: dropped the oldest deferred settle")
        self._pending.append(pending)
        self._wake.set()

    async def flush(self) -> int:
        """Try every deferred settle once, in order; stop at the first store error."""
        done = 0
        async with self._flushing:
            while self._pending:
                pending = self._pending[0]
                try:
                    await self._apply(pending)
                except StoreUnavailable:
                    break
                self._pending.popleft()
                done += 1
        return done

    async def retry_loop(self) -> None:
        """Background loop (owned by the app's cleanup context) draining deferred settles."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await self.flush()
                if self._pending:
                    await asyncio.sleep(self._retry_interval_s)

    async def drain(self, timeout_s: float) -> None:
        """At shutdown: wait for settles under way, then a last bounded try at deferred ones."""
        if self._applying:
            self._applied = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._applied.wait(), timeout_s)
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=timeout_s)
        if not self._pending:
            return
        try:
            async with asyncio.timeout(timeout_s):
                while self._pending:
                    await self.flush()
                    if self._pending:
                        await asyncio.sleep(min(0.2, self._retry_interval_s))
        except TimeoutError:
            log.error("shutdown: %d deferred settles could not be written", len(self._pending))

    async def note_rejection(self, tenant_id: str, rejection: Rejection) -> None:
        """Keep a rejection for the dashboard. Never fails the request it describes: a
        store that cannot take it within its timeout is counted and logged, once per
        outage of this kind (the store's timeout bounds the wait)."""
        try:
            await self.store.note_rejection(tenant_id, rejection)
        except (StoreUnavailable, ValueError) as exc:
            self.stats.rejections_unrecorded += 1
            if not self._rejections_failing:
                log.warning("a rejection could not be kept for the dashboard: %r", exc)
            self._rejections_failing = True
        else:
            self._rejections_failing = False
