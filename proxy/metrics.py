"""Prometheus metrics: one ``Metrics`` per app, fed one ``RequestRecord`` per proxied request.

    metrics = Metrics(
        known_tenants=lambda: tenant_ids,          # ids in the caps file (re-read on reload)
        known_agents=lambda: agent_ids,
        is_known_model=lambda m: m in BUILTIN_PRICES or m in overrides,
    )
    metrics.observe(RequestRecord(route="chat/completions", outcome=Outcome.ALLOWED, status=200))
    body, content_type = metrics.render()          # the GET /metrics response

Labels are bounded by the caps file, never by clients: a tenant, agent or model that the
config does not name is counted as ``"other"``, and no label ever carries a key.

Counters are kept as exact integers (micro-USD for spend) and converted once, at scrape
time; Prometheus itself only has floats. ``observe`` and the hold gauges are meant to be
called from the event loop thread; ``render`` may run on any thread.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.config import DEFAULT_AGENT
from proxy.endpoints import Endpoint
from proxy.errors import CAP_CODES

OTHER = "other"
# Unpriced model names become labels up to this many; the rest count as OTHER.
MAX_UNPRICED_MODELS = 100
_MODEL_NAME = re.compile(r"[A-Za-z0-9._:/@+-]{1,128}")
ROUTES = frozenset({*(e.value for e in Endpoint), "models", OTHER})
# The codes of the proxy's own 429s (the cap_rejections label set).
SHADOW_REASONS = frozenset(
    {"budget_exceeded", "token_cap_exceeded", "rate_limit_exceeded", "concurrency_limit_exceeded"}
)
MICROS_PER_USD = 1_000_000

# Upstream calls run from tens of milliseconds (embeddings) to minutes (long generations).
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# The proxy's own share: auth, tokenizing, the store round trip, relaying.
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Outcome(StrEnum):
    """How a proxied request ended (the ``outcome`` label)."""

    ALLOWED = "allowed"  # forwarded, upstream answered 2xx
    BUDGET_REJECTED = "budget_rejected"  # 429 from a budget cap
    TOKEN_REJECTED = "token_rejected"  # noqa: S105 (a label, not a secret): 429 from a token cap
    RATE_REJECTED = "rate_rejected"  # 429 from a rate cap or a concurrency limit
    STORE_ERROR = "store_error"  # 503: the spend store was unreachable (fail-closed)
    UPSTREAM_ERROR = "upstream_error"  # upstream non-2xx, unreachable or timed out
    CLIENT_ERROR = "client_error"  # the request was refused before any cap was checked


@dataclass(slots=True)
class RequestRecord:
    """What the handler learned about one proxied request; it carries no credentials."""

    route: str  # "chat/completions", "completions", "embeddings", "responses", "models", "other"
    outcome: Outcome
    status: int
    tenant_id: str | None = None
    agent_id: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None  # from usage (or the estimate when usage is missing)
    completion_tokens: int | None = None
    cost_micros: int | None = None  # integer micro-USD charged
    duration_s: float = 0.0  # the whole request in the proxy
    upstream_s: float | None = None  # waiting on the upstream (to its first byte for streams)
    streamed: bool = False
    usage_missing: bool = False  # charged from the estimate or hold: usage was absent
    would_reject: str | None = None  # shadow mode: the code of the 429 it would have had
    rejected: str | None = None  # the code of the proxy's own 429
    fail_open: bool = False  # admitted without the store
    # Streams only: from arrival to the first byte sent to the client. The stream's overhead
    # is first_byte_s - upstream_s; without it a stream adds no overhead sample.
    first_byte_s: float | None = None


class _Tally(Collector):
    """A counter family over exact integers, divided by ``scale`` once at scrape time.

    Cheaper than a ``prometheus_client.Counter`` child (no lock, no float sum) and exact:
    a sum of micro-USD never drifts. Keys are label-value tuples in ``labelnames`` order.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...] = (),
        *,
        scale: int = 1,
        keys: Iterable[tuple[str, ...]] = (),
    ) -> None:
        self.name = name
        self._documentation = documentation
        self._labelnames = labelnames
        self._scale = scale
        self.values: dict[tuple[str, ...], int] = dict.fromkeys(keys, 0)

    def add(self, key: tuple[str, ...], amount: int = 1) -> None:
        values = self.values
        values[key] = values.get(key, 0) + amount

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self._documentation, labels=self._labelnames)
        for key, value in self.values.copy().items():  # copy(): atomic, safe off-thread
            family.add_metric(key, value / self._scale if self._scale != 1 else value)
        yield family


class _Spread(Collector):
    """A histogram family: per label-value tuple, a count per bucket and a sum, made
    cumulative at scrape time. One call per observation, with no lock (it is fed from the
    event loop thread only; a scrape copies before it reads).
    """

    def __init__(
        self, name: str, documentation: str, labelnames: tuple[str, ...], buckets: tuple[float, ...]
    ) -> None:
        self.name = name
        self._documentation = documentation
        self._labelnames = labelnames
        self._bounds = buckets
        self._les: tuple[str, ...] = tuple(
            floatToGoString(b)  # type: ignore[no-untyped-call]
            for b in (*buckets, float("inf"))
        )
        # key -> [count per bucket ..., count above the last bound, sum]
        self.values: dict[tuple[str, ...], list[float]] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        row = self.values.get(key)
        if row is None:
            row = self.values[key] = [0] * (len(self._bounds) + 1) + [0.0]
        row[bisect_left(self._bounds, value)] += 1  # the first bound >= value ("le")
        row[-1] += value

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self._documentation, labels=self._labelnames)
        for key, row in self.values.copy().items():
            counts, total = row[:-1], row[-1]
            cumulative, buckets = 0.0, []
            for le, count in zip(self._les, counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(key), buckets, total)
        yield family


class Metrics:
    """One per app, with its own registry (tests build many apps in one process).

        metrics.observe(record)                  # once per proxied request
        metrics.hold_started(); metrics.hold_ended()
        metrics.reload_ok() / metrics.reload_failed()
        metrics.set_pending_settles(lambda: ledger.pending)
        body, content_type = metrics.render()

    ``known_tenants`` / ``known_agents`` / ``is_known_model`` are called on every
    observation (the config can be reloaded), so they should be cheap lookups.
    """

    def __init__(
        self,
        *,
        known_tenants: Callable[[], frozenset[str]],
        known_agents: Callable[[], frozenset[str]],
        is_known_model: Callable[[str], bool],
    ) -> None:
        self._known_tenants = known_tenants
        self._known_agents = known_agents
        self._is_known_model = is_known_model
        self.registry = CollectorRegistry(auto_describe=True)

        self._requests = _Tally(
            "capproxy_requests",
            "Proxied requests by route and outcome.",
            ("route", "outcome"),
            keys=[(route, outcome.value) for route in sorted(ROUTES) for outcome in Outcome],
        )
        self._spend = _Tally(
            "capproxy_spend_usd",
            "USD charged, by tenant and model (exact sums of micro-USD).",
            ("tenant", "model"),
            scale=MICROS_PER_USD,
        )
        self._agent_spend = _Tally(
            "capproxy_agent_spend_usd",
            "USD charged, by tenant and agent (exact sums of micro-USD).",
            ("tenant", "agent"),
            scale=MICROS_PER_USD,
        )
        self._tokens = _Tally(
            "capproxy_tokens",
            "Tokens charged, by tenant, model and kind (prompt or completion).",
            ("tenant", "model", "kind"),
        )
        self._usage_missing = _Tally(
            "capproxy_usage_missing",
            "Requests charged from the estimate or hold because the response had no usage.",
            ("route",),
            keys=[(route,) for route in sorted(ROUTES)],
        )
        self._reloads = _Tally(
            "capproxy_config_reloads",
            "Caps file reloads by result.",
            ("result",),
            keys=[("ok",), ("error",)],
        )
        self._fail_open = _Tally(
            "capproxy_fail_open_admissions",
            "Requests admitted without a reservation because the store was unreachable.",
            keys=[()],
        )
        self._unpriced = _Tally(
            "capproxy_unpriced_model_requests",
            "Requests refused because their model has no price, by model name (the first "
            f"{MAX_UNPRICED_MODELS} names seen; later ones as other).",
            ("model",),
        )
        self._data_loss = _Tally(
            "capproxy_store_data_loss",
            "Losses of recorded spend the store suffered, by scope (store, tenant).",
            ("scope",),
            keys=[("store",), ("tenant",)],
        )
        self._rejections = _Tally(
            "capproxy_cap_rejections",
            "Requests refused with 429 by the proxy's caps, by error code.",
            ("code",),
            keys=[(code,) for code in sorted(CAP_CODES)],
        )
        self._shadow = _Tally(
            "capproxy_shadow_rejections",
            "Requests shadow mode would have rejected, by reason.",
            ("reason",),
            keys=[(reason,) for reason in sorted(SHADOW_REASONS)],
        )
        for tally in (
            self._requests,
            self._spend,
            self._agent_spend,
            self._tokens,
            self._usage_missing,
            self._reloads,
            self._fail_open,
            self._shadow,
            self._rejections,
            self._data_loss,
            self._unpriced,
        ):
            self.registry.register(tally)

        self._upstream = _Spread(
            "capproxy_upstream_latency_seconds",
            "Time waiting on the upstream (to the first byte for streams), by route.",
            ("route",),
            UPSTREAM_BUCKETS,
        )
        self._overhead = _Spread(
            "capproxy_proxy_overhead_seconds",
            "Time the proxy adds on top of the upstream, by route.",
            ("route",),
            OVERHEAD_BUCKETS,
        )
        self.registry.register(self._upstream)
        self.registry.register(self._overhead)
        self.held = 0  # reservations held now (read at scrape time)
        Gauge(
            "capproxy_reservations_held",
            "Budget reservations currently held by requests in this process.",
            registry=self.registry,
        ).set_function(lambda: float(self.held))
        self._pending = Gauge(
            "capproxy_deferred_settles",
            "Settles waiting for the store to come back (this process).",
            registry=self.registry,
        )

    # -- the hot path ---------------------------------------------------------------------

    def observe(self, rec: RequestRecord) -> None:
        """Count one proxied request."""
        route = rec.route if rec.route in ROUTES else OTHER
        self._requests.add((route, rec.outcome))
        if rec.usage_missing:
            self._usage_missing.add((route,))
        if rec.fail_open:
            self._fail_open.add(())
        if rec.would_reject is not None:
            reason = rec.would_reject if rec.would_reject in SHADOW_REASONS else OTHER
            self._shadow.add((reason,))
        if rec.rejected is not None:
            self._rejections.add((rec.rejected if rec.rejected in CAP_CODES else OTHER,))

        upstream_s = rec.upstream_s
        if upstream_s is not None:
            self._upstream.observe((route,), upstream_s)
            until = rec.first_byte_s if rec.streamed else rec.duration_s
            if until is not None:
                self._overhead.observe((route,), max(0.0, until - upstream_s))

        cost = rec.cost_micros
        prompt = rec.prompt_tokens
        completion = rec.completion_tokens
        if not (cost or prompt or completion):
            return
        tenant = self._tenant_label(rec.tenant_id)
        model = rec.model
        model = model if model is not None and self._is_known_model(model) else OTHER
        if cost is not None and cost > 0:
            self._spend.add((tenant, model), cost)
            self._agent_spend.add((tenant, self._agent_label(rec.agent_id)), cost)
        if prompt is not None and prompt > 0:
            self._tokens.add((tenant, model, "prompt"), prompt)
        if completion is not None and completion > 0:
            self._tokens.add((tenant, model, "completion"), completion)

    def _tenant_label(self, tenant_id: str | None) -> str:
        if tenant_id is not None and tenant_id in self._known_tenants():
            return tenant_id
        return OTHER

    def _agent_label(self, agent_id: str | None) -> str:
        if agent_id is not None and (agent_id == DEFAULT_AGENT or agent_id in self._known_agents()):
            return agent_id
        return OTHER

    # -- process state ----------------------------------------------------------------------

    def hold_started(self) -> None:
        self.held += 1

    def hold_ended(self) -> None:
        self.held -= 1

    def unpriced_model(self, model: str) -> None:
        """A request for a model with no price: operators see what to add."""
        values = self._unpriced.values
        if not _MODEL_NAME.fullmatch(model):
            model = "invalid"
        elif (model,) not in values and len(values) >= MAX_UNPRICED_MODELS:
            model = OTHER
        self._unpriced.add((model,))

    def data_lost(self, *, whole_store: bool) -> None:
        self._data_loss.add(("store" if whole_store else "tenant",))

    def reload_ok(self) -> None:
        self._reloads.add(("ok",))

    def reload_failed(self) -> None:
        self._reloads.add(("error",))

    def set_pending_settles(self, fn: Callable[[], int]) -> None:
        """Report ``fn()`` (the deferred settle queue's length) at each scrape."""
        self._pending.set_function(lambda: float(fn()))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition: ``(body, content_type)``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
