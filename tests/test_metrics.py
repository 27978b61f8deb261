from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import MAX_UNPRICED_MODELS, Metrics, Outcome, RequestRecord

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

TENANTS = frozenset({"acme", "globex"})
AGENTS = frozenset({"planner", "coder"})
MODELS = frozenset({"gpt-4o", "gpt-4o-mini"})


def new_metrics(
    tenants: Iterable[str] = TENANTS, agents: Iterable[str] = AGENTS
) -> tuple[Metrics, dict[str, frozenset[str]]]:
    config = {"tenants": frozenset(tenants), "agents": frozenset(agents)}
    metrics = Metrics(
        known_tenants=lambda: config["tenants"],
        known_agents=lambda: config["agents"],
        is_known_model=MODELS.__contains__,
    )
    return metrics, config


def scrape(metrics: Metrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def rec(
    outcome: Outcome = Outcome.ALLOWED,
    *,
    route: str = "chat/completions",
    status: int = 200,
    **kw: Any,
) -> RequestRecord:
    return RequestRecord(route=route, outcome=outcome, status=status, **kw)


def test_requests_are_counted_by_route_and_outcome() -> None:
    metrics, _ = new_metrics()
    script = [
        rec(Outcome.ALLOWED),
        rec(Outcome.ALLOWED),
        rec(Outcome.ALLOWED, route="embeddings"),
        rec(Outcome.BUDGET_REJECTED, status=429),
        rec(Outcome.BUDGET_REJECTED, status=429),
        rec(Outcome.BUDGET_REJECTED, status=429),
        rec(Outcome.TOKEN_REJECTED, status=429),
        rec(Outcome.STORE_ERROR, status=503),
        rec(Outcome.UPSTREAM_ERROR, route="responses", status=502),
        rec(Outcome.CLIENT_ERROR, route="models", status=401),
        rec(Outcome.CLIENT_ERROR, route="v1/unknown/../../etc", status=404),
    ]
    for record in script:
        metrics.observe(record)

    got = {
        (dict(labels)["route"], dict(labels)["outcome"]): v
        for labels, v in series(scrape(metrics), "capproxy_requests_total").items()
        if v
    }
    assert got == {
        ("chat/completions", "allowed"): 2,
        ("embeddings", "allowed"): 1,
        ("chat/completions", "budget_rejected"): 3,
        ("chat/completions", "token_rejected"): 1,
        ("chat/completions", "store_error"): 1,
        ("responses", "upstream_error"): 1,
        ("models", "client_error"): 1,
        ("other", "client_error"): 1,
    }


def test_every_route_and_outcome_is_exported_from_the_start() -> None:
    metrics, _ = new_metrics()
    requests = series(scrape(metrics), "capproxy_requests_total")
    assert len(requests) == 6 * len(Outcome)
    assert set(requests.values()) == {0.0}


def test_spend_is_exact_to_the_micro() -> None:
    metrics, _ = new_metrics()
    charges = [1, 999_999, 123_456, 7]
    for micros in charges:
        metrics.observe(
            rec(tenant_id="acme", agent_id="planner", model="gpt-4o", cost_micros=micros)
        )
    # Ten dimes: a float counter would report 0.9999999999999999.
    for _ in range(10):
        metrics.observe(rec(tenant_id="globex", model="gpt-4o-mini", cost_micros=100_000))

    samples = scrape(metrics)
    acme = value(samples, "capproxy_spend_usd_total", tenant="acme", model="gpt-4o")
    assert acme == sum(charges) / 1_000_000 == 1.123463
    assert round(acme * 1_000_000) == sum(charges)
    assert value(samples, "capproxy_spend_usd_total", tenant="globex", model="gpt-4o-mini") == 1.0
    assert value(samples, "capproxy_agent_spend_usd_total", tenant="acme", agent="planner") == acme
    assert value(samples, "capproxy_agent_spend_usd_total", tenant="globex", agent="other") == 1.0


def test_tokens_are_counted_by_kind() -> None:
    metrics, _ = new_metrics()
    metrics.observe(rec(tenant_id="acme", model="gpt-4o", prompt_tokens=120, completion_tokens=30))
    metrics.observe(rec(tenant_id="acme", model="gpt-4o", prompt_tokens=80, completion_tokens=0))
    metrics.observe(rec(route="embeddings", tenant_id="acme", model="gpt-4o", prompt_tokens=5))

    tokens = series(scrape(metrics), "capproxy_tokens_total")
    assert tokens == {
        frozenset({("tenant", "acme"), ("model", "gpt-4o"), ("kind", "prompt")}): 205,
        frozenset({("tenant", "acme"), ("model", "gpt-4o"), ("kind", "completion")}): 30,
    }


def test_unknown_tenants_agents_and_models_fold_into_other() -> None:
    metrics, _ = new_metrics()
    for tenant, agent, model in [
        ("acme", "planner", "gpt-4o"),
        ("acme", "_default", "gpt-4o"),
        ("t-3f9a8e", "planner", "gpt-4o"),  # e.g. a passthrough tenant id
        ("acme", "rogue-agent-17", "gpt-4o"),
        ("acme", "planner", "gpt-4o-2099-01-01"),
        (None, None, None),
    ]:
        metrics.observe(
            rec(tenant_id=tenant, agent_id=agent, model=model, cost_micros=10, prompt_tokens=1)
        )

    samples = scrape(metrics)
    assert series(samples, "capproxy_spend_usd_total") == {
        frozenset({("tenant", "acme"), ("model", "gpt-4o")}): 30 / 1_000_000,
        frozenset({("tenant", "acme"), ("model", "other")}): 10 / 1_000_000,
        frozenset({("tenant", "other"), ("model", "gpt-4o")}): 10 / 1_000_000,
        frozenset({("tenant", "other"), ("model", "other")}): 10 / 1_000_000,
    }
    assert series(samples, "capproxy_agent_spend_usd_total") == {
        frozenset({("tenant", "acme"), ("agent", "planner")}): 20 / 1_000_000,
        frozenset({("tenant", "acme"), ("agent", "_default")}): 10 / 1_000_000,
        frozenset({("tenant", "acme"), ("agent", "other")}): 10 / 1_000_000,
        frozenset({("tenant", "other"), ("agent", "planner")}): 10 / 1_000_000,
        frozenset({("tenant", "other"), ("agent", "other")}): 10 / 1_000_000,
    }


def test_folding_follows_a_reloaded_config() -> None:
    metrics, config = new_metrics(tenants={"acme"})
    metrics.observe(rec(tenant_id="initech", model="gpt-4o", cost_micros=5))
    config["tenants"] = frozenset({"acme", "initech"})
    metrics.observe(rec(tenant_id="initech", model="gpt-4o", cost_micros=7))

    samples = scrape(metrics)
    assert value(samples, "capproxy_spend_usd_total", tenant="other", model="gpt-4o") == 5e-6
    assert value(samples, "capproxy_spend_usd_total", tenant="initech", model="gpt-4o") == 7e-6


def test_no_client_supplied_value_reaches_a_label() -> None:
    metrics, _ = new_metrics()
    metrics.observe(
        rec(
            route="chat/completions?key=sk-live-abcdef123456",
            tenant_id="sk-live-abcdef123456",
            agent_id="sk-live-abcdef123456",
            model="sk-live-abcdef123456",
            would_reject="sk-live-abcdef123456",
            cost_micros=1,
            prompt_tokens=1,
            upstream_s=0.1,
            duration_s=0.2,
        )
    )
    body, _ = metrics.render()
    assert b"sk-live" not in body
    samples = scrape(metrics)
    assert value(samples, "capproxy_shadow_rejections_total", reason="other") == 1


def test_shadow_fail_open_and_usage_missing_counters() -> None:
    metrics, _ = new_metrics()
    metrics.observe(rec(would_reject="budget_exceeded"))
    metrics.observe(rec(would_reject="budget_exceeded"))
    metrics.observe(rec(would_reject="token_cap_exceeded"))
    metrics.observe(rec(fail_open=True))
    metrics.observe(rec(route="responses", usage_missing=True))
    metrics.observe(rec(route="responses", usage_missing=True, fail_open=True))

    samples = scrape(metrics)
    shadow = "capproxy_shadow_rejections_total"
    assert value(samples, shadow, reason="budget_exceeded") == 2
    assert value(samples, shadow, reason="token_cap_exceeded") == 1
    assert value(samples, "capproxy_fail_open_admissions_total") == 2
    assert value(samples, "capproxy_usage_missing_total", route="responses") == 2
    assert value(samples, "capproxy_usage_missing_total", route="chat/completions") == 0


def test_latency_and_overhead_histograms() -> None:
    metrics, _ = new_metrics()
    metrics.observe(rec(upstream_s=0.8, duration_s=0.803))
    metrics.observe(rec(upstream_s=2.0, duration_s=2.02))
    # A stream: upstream_s is the time to first byte; the body's relay is not overhead.
    metrics.observe(rec(streamed=True, upstream_s=0.3, first_byte_s=0.304, duration_s=30.0))
    metrics.observe(rec(streamed=True, upstream_s=0.3, duration_s=30.0))  # no first byte time
    metrics.observe(rec(Outcome.BUDGET_REJECTED, status=429, duration_s=0.002))  # never sent

    samples = scrape(metrics)
    up = "capproxy_upstream_latency_seconds"
    over = "capproxy_proxy_overhead_seconds"
    assert value(samples, f"{up}_count", route="chat/completions") == 4
    assert value(samples, f"{up}_sum", route="chat/completions") == pytest.approx(3.4)
    assert value(samples, f"{up}_bucket", route="chat/completions", le="0.5") == 2
    assert value(samples, f"{over}_count", route="chat/completions") == 3
    assert value(samples, f"{over}_sum", route="chat/completions") == pytest.approx(0.027)
    assert value(samples, f"{over}_bucket", route="chat/completions", le="0.005") == 2
    assert value(samples, f"{over}_bucket", route="chat/completions", le="0.025") == 3


def test_overhead_is_never_negative() -> None:
    metrics, _ = new_metrics()
    metrics.observe(rec(upstream_s=1.0, duration_s=0.999))  # clocks read in another order
    samples = scrape(metrics)
    assert value(samples, "capproxy_proxy_overhead_seconds_sum", route="chat/completions") == 0


def test_gauges_and_reloads() -> None:
    metrics, _ = new_metrics()
    queue = [1, 2, 3]
    metrics.set_pending_settles(lambda: len(queue))
    for _ in range(3):
        metrics.hold_started()
    metrics.hold_ended()
    metrics.reload_ok()
    metrics.reload_ok()
    metrics.reload_failed()

    samples = scrape(metrics)
    assert value(samples, "capproxy_reservations_held") == 2
    assert value(samples, "capproxy_deferred_settles") == 3
    assert value(samples, "capproxy_config_reloads_total", result="ok") == 2
    assert value(samples, "capproxy_config_reloads_total", result="error") == 1

    queue.clear()  # read at scrape time
    assert value(scrape(metrics), "capproxy_deferred_settles") == 0


def test_deferred_settles_reads_zero_until_a_source_is_set() -> None:
    metrics, _ = new_metrics()
    assert value(scrape(metrics), "capproxy_deferred_settles") == 0


def test_two_instances_do_not_share_state() -> None:
    first, _ = new_metrics()
    second, _ = new_metrics()
    first.observe(rec(tenant_id="acme", model="gpt-4o", cost_micros=42, upstream_s=0.1))
    first.hold_started()
    first.reload_failed()

    samples = scrape(second)
    assert set(series(samples, "capproxy_requests_total").values()) == {0.0}
    assert series(samples, "capproxy_spend_usd_total") == {}
    assert value(samples, "capproxy_reservations_held") == 0
    assert value(samples, "capproxy_config_reloads_total", result="error") == 0
    assert series(samples, "capproxy_upstream_latency_seconds_count") == {}
    assert value(scrape(first), "capproxy_reservations_held") == 1


def test_unpriced_models_are_counted_by_name_within_a_bounded_label_set() -> None:
    metrics, _ = new_metrics()
    metrics.unpriced_model("claude-3-5-sonnet")
    metrics.unpriced_model("claude-3-5-sonnet")
    metrics.unpriced_model("model with spaces\n")
    for i in range(MAX_UNPRICED_MODELS + 20):
        metrics.unpriced_model(f"m-{i}")
    samples = series(scrape(metrics), "capproxy_unpriced_model_requests_total")
    assert samples[frozenset({("model", "claude-3-5-sonnet")})] == 2
    assert samples[frozenset({("model", "invalid")})] == 1
    assert len(samples) == MAX_UNPRICED_MODELS + 1  # and "other"
    assert samples[frozenset({("model", "other")})] == 22
