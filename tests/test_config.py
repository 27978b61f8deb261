from __future__ import annotations

import hashlib
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from proxy.config import (
    DEFAULT_AGENT,
    AgentCostCap,
    BoundKey,
    BudgetCap,
    ConfigError,
    CostCapConfig,
    Settings,
    TenantConfig,
    TokenCap,
    UpstreamConfig,
    load_settings,
    parse_settings,
)
from proxy.pricing import ToolPrice
from proxy.windows import Window

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"
UPSTREAM = "upstreams: [{name: up, base_url: 'http://127.0.0.1:9'}]\n"


def parse(text: str, env: dict[str, str] | None = None) -> Settings:
    return parse_settings(textwrap.dedent(text), source="caps.yaml", env=env or {})


def errors(text: str, env: dict[str, str] | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        parse(text, env)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def only_error(text: str, env: dict[str, str] | None = None) -> str:
    (error,) = errors(text, env)
    return error


# --- The example file ----------------------------------------------------------------------


def test_example_loads_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "CAPPROXY_ADMIN_TOKEN", "CAPPROXY_TENANT_HASH_KEY"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(EXAMPLE)
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)
    assert settings.store.url.get_secret_value() == "memory://"
    assert settings.auth.mode == "keys"
    assert settings.auth.admin_token is None
    upstream = settings.upstream_for("gpt-4o")
    assert upstream is not None
    assert upstream.name == "openai"
    assert upstream.api_key is None
    acme = settings.tenant("acme")
    assert acme is not None
    assert acme.budget_caps == (BudgetCap(window=Window.MONTHLY, hard_limit_usd=Decimal(2000)),)
    assert settings.cost_caps.agent_ids == frozenset({"premium-agent"})
    assert settings.pricing.models["my-llama-70b"].input_per_mtok == Decimal("0.59")
    assert settings.pricing.default is None


def test_example_reads_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    key = load_settings(EXAMPLE).upstreams[0].api_key
    assert key is not None
    assert key.get_secret_value() == "sk-from-env"


def test_example_commented_options_are_valid() -> None:
    text = EXAMPLE.read_text()
    for option in ("soft_limit_usd", "max_output_tokens", "tokenizer:"):
        assert f"# {option}" in text
        text = text.replace(f"# {option}", option)
    text = text.replace("#   encodings:", "  encodings:")
    settings = parse_settings(text, env={})
    assert settings.tokenizer.encodings == {"gpt-4-*": "cl100k_base", "*": "o200k_base"}
    assert settings.tenants[0].budget_caps[0].soft_limit_usd == Decimal(1500)
    assert settings.pricing.models["gpt-4o"].max_output_tokens == 16384


# --- Resolution ----------------------------------------------------------------------------

CAPS = (
    UPSTREAM
    + """
cost_caps:
  default_budget_caps:
    - {window: hourly, hard_limit_usd: 10, soft_limit_usd: 8}
    - {window: daily, hard_limit_usd: 100}
  default_token_cap: {max_prompt_tokens: 4096, max_total_tokens: 8192}
  agents:
    - agent_id: premium-agent
      budget_caps: [{window: daily, hard_limit_usd: 500}]
      token_cap: {max_prompt_tokens: 16384}
    - agent_id: tokens-only
      token_cap: {max_completion_tokens: 10}
    - agent_id: budget-only
      budget_caps: [{window: weekly, hard_limit_usd: 1}]
"""
)


def test_listed_agent_overrides_budget_caps() -> None:
    caps = parse(CAPS).cost_caps
    assert caps.budget_caps_for("premium-agent") == (
        BudgetCap(window=Window.DAILY, hard_limit_usd=Decimal(500)),
    )
    assert caps.budget_caps_for("budget-only")[0].window is Window.WEEKLY


def test_unlisted_agent_gets_defaults() -> None:
    caps = parse(CAPS).cost_caps
    for agent in (DEFAULT_AGENT, "someone-else"):
        assert caps.budget_caps_for(agent) == caps.default_budget_caps
        assert caps.token_cap_for(agent) == TokenCap(max_prompt_tokens=4096, max_total_tokens=8192)
    assert [cap.soft_limit_usd for cap in caps.default_budget_caps] == [Decimal(8), None]


def test_agent_token_cap_replaces_default_and_missing_parts_fall_back() -> None:
    caps = parse(CAPS).cost_caps
    assert caps.token_cap_for("premium-agent") == TokenCap(max_prompt_tokens=16384)
    assert caps.token_cap_for("tokens-only") == TokenCap(max_completion_tokens=10)
    assert caps.budget_caps_for("tokens-only") == caps.default_budget_caps
    assert caps.token_cap_for("budget-only") == caps.default_token_cap
    assert caps.agent_ids == frozenset({"premium-agent", "tokens-only", "budget-only"})


def test_no_caps_by_default() -> None:
    settings = parse(UPSTREAM)
    assert settings.cost_caps.enabled
    assert settings.cost_caps.budget_caps_for("a") == ()
    assert settings.cost_caps.token_cap_for("a") is None
    assert settings.tenants == ()
    assert settings.store.on_error == "fail_closed"
    assert settings.identity.agent_header == "X-Agent-Id"
    assert settings.tz.key == "UTC"


def test_upstream_for_first_matching_glob_wins() -> None:
    settings = parse("""
        upstreams:
          - {name: local, base_url: 'http://127.0.0.1:8000/v1/', models: ["llama-*", "qwen*"]}
          - {name: openai, base_url: 'https://api.openai.com/v1'}
          - {name: never, base_url: 'https://example.com', models: ["llama-3"]}
    """)
    assert settings.upstreams[0].base_url == "http://127.0.0.1:8000/v1"
    assert [settings.upstream_for(m).name for m in ("llama-3", "qwen2", "gpt-4o")] == [  # type: ignore[union-attr]
        "local",
        "local",
        "openai",
    ]
    only_local = parse("upstreams: [{name: local, base_url: 'http://h', models: ['llama-*']}]")
    assert only_local.upstream_for("LLAMA-3") is None  # case-sensitive
    # Answers are remembered, and a copy with other upstreams does not reuse them.
    assert settings.upstream_for("llama-3") is settings.upstreams[0]
    other = settings.model_copy(update={"upstreams": settings.upstreams[1:]})
    assert other.upstream_for("llama-3") is settings.upstreams[1]
    assert settings.upstream_for("llama-3") is settings.upstreams[0]


def test_tenant_lookup_and_key_digests() -> None:
    digest = hashlib.sha256(b"sk-beta").hexdigest()
    settings = parse(f"""
        {UPSTREAM}
        tenants:
          - id: alpha
            api_keys: [sk-alpha]
          - id: beta
            api_keys: ["sha256:{digest.upper()}"]
    """)
    alpha, beta = settings.tenant("alpha"), settings.tenant("beta")
    assert alpha is not None and beta is not None
    assert alpha.key_digests() == (hashlib.sha256(b"sk-alpha").digest(),)
    assert beta.key_digests() == (hashlib.sha256(b"sk-beta").digest(),)
    assert settings.tenant("gamma") is None


def test_settings_build_in_code() -> None:
    settings = Settings(
        upstreams=(UpstreamConfig(name="up", base_url="http://127.0.0.1:9/"),),
        tenants=(TenantConfig(id="t", api_keys=(SecretStr("k"),)),),
        cost_caps=CostCapConfig(
            default_budget_caps=(BudgetCap(window=Window.DAILY, hard_limit_usd=Decimal("0.5")),)
        ),
        time_zone="Europe/Paris",
    )
    assert settings.upstreams[0].base_url == "http://127.0.0.1:9"
    assert settings.tenant("t") is not None
    assert settings.tz.key == "Europe/Paris"
    with pytest.raises(ValidationError):
        settings.server.__setattr__("port", 1)


# --- Keys bound to agents ------------------------------------------------------------------

BOUND_DIGEST = hashlib.sha256(b"sk-vip-hashed").hexdigest()
BOUND = (
    UPSTREAM
    + f"""
tenants:
  - id: acme
    api_keys:
      - sk-plain
      - {{key: sk-premium, agent: premium-agent}}
      - {{key: "sha256:{BOUND_DIGEST}", agent: vip}}
  - id: globex
    api_keys: [sk-globex]
cost_caps:
  agents:
    - agent_id: premium-agent
    - agent_id: vip
      bound_keys_only: true
"""
)


def test_api_keys_mix_plain_and_bound_keys_in_order() -> None:
    acme = parse(BOUND).tenant("acme")
    assert acme is not None
    assert acme.key_agents() == (None, "premium-agent", "vip")
    assert acme.key_digests() == (
        hashlib.sha256(b"sk-plain").digest(),
        hashlib.sha256(b"sk-premium").digest(),
        hashlib.sha256(b"sk-vip-hashed").digest(),
    )
    bound = acme.api_keys[1]
    assert isinstance(bound, BoundKey)
    assert bound.key.get_secret_value() == "sk-premium"
    assert "sk-premium" not in repr(acme)


def test_plain_keys_are_bound_to_no_agent() -> None:
    globex = parse(BOUND).tenant("globex")
    assert globex is not None
    assert globex.key_agents() == (None,)
    assert TenantConfig(id="empty").key_agents() == ()


def test_bound_keys_only_is_off_unless_set() -> None:
    caps = parse(BOUND).cost_caps
    assert caps.bound_keys_only("vip")
    assert not caps.bound_keys_only("premium-agent")
    assert not caps.bound_keys_only("unlisted")
    assert not caps.bound_keys_only(DEFAULT_AGENT)
    assert parse(CAPS).cost_caps.agents[0].bound_keys_only is False


def test_bound_keys_only_is_satisfied_by_a_key_of_any_tenant() -> None:
    settings = parse(f"""
        {UPSTREAM}
        tenants:
          - id: a
            api_keys: [sk-a]
          - id: b
          - id: c
            api_keys: [sk-c, {{key: sk-c-vip, agent: vip}}]
        cost_caps:
          agents: [{{agent_id: vip, bound_keys_only: true}}]
    """)
    assert settings.cost_caps.bound_keys_only("vip")


def test_bound_keys_only_without_a_bound_key_is_an_error_at_that_agent() -> None:
    # A key bound to another agent does not count, nor does a plain key.
    text = """\
        upstreams: [{name: up, base_url: 'http://h'}]
        tenants:
          - id: a
            api_keys: [sk-a, {key: sk-b, agent: vip}]
        cost_caps:
          agents:
            - agent_id: vip
              bound_keys_only: true
            - agent_id: lonely
              bound_keys_only: true
        """
    assert only_error(text) == (
        "caps.yaml:10: cost_caps.agents[1].bound_keys_only: "
        "agent 'lonely' is bound_keys_only, but no tenant key is bound to it"
    )


def test_bound_keys_only_is_checked_in_code_too() -> None:
    lonely = CostCapConfig(agents=(AgentCostCap(agent_id="lonely", bound_keys_only=True),))
    upstreams = (UpstreamConfig(name="up", base_url="http://h"),)
    with pytest.raises(
        ValidationError, match="agent 'lonely' is bound_keys_only, but no tenant key is bound to it"
    ):
        Settings(upstreams=upstreams, cost_caps=lonely)
    key = BoundKey(key=SecretStr("sk-lonely"), agent="lonely")
    settings = Settings(
        upstreams=upstreams, tenants=(TenantConfig(id="t", api_keys=(key,)),), cost_caps=lonely
    )
    assert settings.cost_caps.bound_keys_only("lonely")
    assert settings.tenants[0].key_agents() == ("lonely",)


# --- Defaults and bounds of the request-handling knobs -------------------------------------


def test_handling_knobs_have_their_documented_defaults() -> None:
    settings = parse(UPSTREAM)
    assert settings.cost_caps.unsized_input == "hold_context"
    assert settings.cost_caps.default_max_tool_calls == 4
    assert settings.server.max_upstream_body_bytes == 64 * 1024 * 1024
    assert settings.server.client_write_timeout_s == 60
    assert settings.store.hold_lease_s == 30
    assert settings.streaming.on_client_disconnect == "drain"
    assert settings.pricing.tools == {}


def test_handling_knobs_accept_values_within_their_bounds() -> None:
    settings = parse(f"""
        {UPSTREAM}
        cost_caps: {{unsized_input: reject, default_max_tool_calls: 1000}}
        server: {{max_upstream_body_bytes: 1, client_write_timeout_s: 0.5}}
        store: {{hold_lease_s: 3600}}
        streaming: {{on_client_disconnect: close}}
        pricing:
          tools:
            web_search: {{per_call_usd: 0.01}}
            my_tool: {{per_call_usd: 0}}
    """)
    assert settings.cost_caps.unsized_input == "reject"
    assert settings.cost_caps.default_max_tool_calls == 1000
    assert settings.server.max_upstream_body_bytes == 1
    assert settings.server.client_write_timeout_s == 0.5
    assert settings.store.hold_lease_s == 3600
    assert settings.streaming.on_client_disconnect == "close"
    assert settings.pricing.tools == {
        "web_search": ToolPrice(per_call_usd=Decimal("0.01")),
        "my_tool": ToolPrice(per_call_usd=Decimal(0)),
    }
    assert str(settings.pricing.tools["web_search"].per_call_usd) == "0.01"  # exact
    low = parse(UPSTREAM + "cost_caps: {default_max_tool_calls: 1}\nstore: {hold_lease_s: 1}\n")
    assert (low.cost_caps.default_max_tool_calls, low.store.hold_lease_s) == (1, 1)


# --- Exact decimals and YAML scalars -------------------------------------------------------


def test_decimals_are_exact() -> None:
    settings = parse(f"""
        {UPSTREAM}
        cost_caps:
          default_budget_caps: [{{window: daily, hard_limit_usd: 0.1, soft_limit_usd: 0.07}}]
        pricing:
          models:
            m: {{input_per_mtok: 0.59, cached_input_per_mtok: 0.295, output_per_mtok: 10.00}}
    """)
    cap = settings.cost_caps.default_budget_caps[0]
    assert str(cap.hard_limit_usd) == "0.1"
    assert cap.soft_limit_usd == Decimal("0.07")
    price = settings.pricing.models["m"]
    assert price.input_per_mtok == Decimal("0.59") != Decimal(0.59)  # noqa: RUF032
    assert str(price.cached_input_per_mtok) == "0.295"
    assert str(price.output_per_mtok) == "10.00"


def test_decimal_from_environment_is_exact() -> None:
    settings = parse(
        UPSTREAM
        + "cost_caps:\n  default_budget_caps:\n    - window: daily\n      hard_limit_usd: ${L}\n",
        env={"L": "0.59"},
    )
    assert str(settings.cost_caps.default_budget_caps[0].hard_limit_usd) == "0.59"


def test_yaml_11_scalars_do_not_bite() -> None:
    settings = parse(f"""
        {UPSTREAM}
        tenants: [{{id: no}}, {{id: on}}, {{id: 2024-01-01}}]
        cost_caps: {{enabled: false}}
        server: {{port: 0x1F90}}
    """)
    assert [t.id for t in settings.tenants] == ["no", "on", "2024-01-01"]
    assert settings.cost_caps.enabled is False
    assert settings.server.port == 8080


def test_anchors_and_merge_keys() -> None:
    settings = parse("""
        upstreams:
          - &base {name: a, base_url: 'http://h', timeout_s: 1.5}
          - <<: *base
            name: b
        tenants:
          - {id: t1, budget_caps: &caps [{window: daily, hard_limit_usd: 3}]}
          - {id: t2, budget_caps: *caps}
    """)
    assert [(u.name, u.timeout_s) for u in settings.upstreams] == [("a", 1.5), ("b", 1.5)]
    assert settings.tenants[0].budget_caps == settings.tenants[1].budget_caps


# --- Environment expansion -----------------------------------------------------------------


def test_env_set_default_and_escape() -> None:
    settings = parse(
        """
        upstreams:
          - name: up
            base_url: ${BASE:-http://127.0.0.1:9}/v1
            api_key: "${KEY}"
        store: {url: "${STORE_URL:-memory://}"}
        auth: {admin_token: "$${NOT_A_VAR}"}
        server: {port: "${PORT:-9000}"}
        """,
        env={"KEY": "sk-env", "STORE_URL": ""},
    )
    up = settings.upstreams[0]
    assert up.base_url == "http://127.0.0.1:9/v1"
    assert up.api_key is not None and up.api_key.get_secret_value() == "sk-env"
    assert settings.store.url.get_secret_value() == "memory://"  # empty -> default, like sh
    assert settings.auth.admin_token is not None
    assert settings.auth.admin_token.get_secret_value() == "${NOT_A_VAR}"
    assert settings.server.port == 9000


def test_env_empty_default_means_no_key() -> None:
    settings = parse("upstreams: [{name: u, base_url: 'http://h', api_key: '${K:-}'}]")
    assert settings.upstreams[0].api_key is None


def test_env_missing_variable_names_line() -> None:
    text = """\
        upstreams:
          - name: up
            base_url: http://h
            api_key: ${OPENAI_API_KEY}
        """
    assert only_error(text) == (
        "caps.yaml:4: upstreams[0].api_key: environment variable OPENAI_API_KEY is not set "
        "(use ${OPENAI_API_KEY:-default})"
    )


def test_env_not_expanded_in_comments_or_keys() -> None:
    settings = parse(
        UPSTREAM + "# api_key: ${MISSING}\npricing: {models: {'${M}': {input_per_mtok: 1}}}"
    )
    assert list(settings.pricing.models) == ["${M}"]
    assert parse(UPSTREAM + "# ${MISSING}\n").upstreams[0].name == "up"


def test_env_malformed_reference() -> None:
    error = only_error(UPSTREAM + "auth: {admin_token: 'abc${oops'}\n")
    assert error.startswith("caps.yaml:2: auth.admin_token: malformed ${...} reference")
    assert "abc" not in error


# --- Validation errors: file:line: path: message -------------------------------------------


@pytest.mark.parametrize(
    ("text", "prefix"),
    [
        pytest.param(
            UPSTREAM
            + "cost_caps:\n  default_budget_caps:\n    - {window: daily, hard_limit_usd: 0}\n",
            "caps.yaml:4: cost_caps.default_budget_caps[0].hard_limit_usd: Input should be greater",
            id="limit-not-positive",
        ),
        pytest.param(
            UPSTREAM
            + "cost_caps:\n  default_budget_caps:\n"
            + "    - window: daily\n      hard_limit_usd: 5\n      soft_limit_usd: 5\n",
            "caps.yaml:6: cost_caps.default_budget_caps[0].soft_limit_usd: must be below hard",
            id="soft-not-below-hard",
        ),
        pytest.param(
            UPSTREAM
            + "tenants:\n  - id: t\n    budget_caps: [{window: daily, hard_limit_usd: 1e-7}]\n",
            "caps.yaml:4: tenants[0].budget_caps[0].hard_limit_usd: Decimal input should have no "
            "more than 6 decimal places",
            id="below-micro-usd",
        ),
        pytest.param(
            UPSTREAM
            + "cost_caps:\n  default_budget_caps:\n    - {window: yearly, hard_limit_usd: 1}\n",
            "caps.yaml:4: cost_caps.default_budget_caps[0].window: Input should be 'minute'",
            id="unknown-window",
        ),
        pytest.param(
            UPSTREAM
            + "tenants:\n  - id: t\n    budget_caps:\n"
            + "      - {window: daily, hard_limit_usd: 1}\n"
            + "      - {window: daily, hard_limit_usd: 2}\n",
            "caps.yaml:6: tenants[0].budget_caps[1].window: duplicate window 'daily' "
            "(also item [0])",
            id="duplicate-window",
        ),
        pytest.param(
            UPSTREAM + "cost_caps:\n  default_token_cap:\n    max_total_tokens: -1\n",
            "caps.yaml:4: cost_caps.default_token_cap.max_total_tokens: Input should be greater",
            id="token-cap-not-positive",
        ),
        pytest.param(
            UPSTREAM + "tenants:\n  - id: a\n  - id: b\n  - id: a\n",
            "caps.yaml:5: tenants[2].id: duplicate tenant id 'a' (also tenants[0])",
            id="duplicate-tenant",
        ),
        pytest.param(
            UPSTREAM + "tenants:\n  - id: 'has space'\n",
            "caps.yaml:3: tenants[0].id: String should match pattern",
            id="bad-tenant-id",
        ),
        pytest.param(
            UPSTREAM
            + "tenants:\n  - id: a\n    api_keys: [k1, k2]\n  - id: b\n    api_keys: [k2]\n",
            "caps.yaml:6: tenants[1].api_keys[0]: duplicate api key (also tenants[0].api_keys[1])",
            id="duplicate-key",
        ),
        pytest.param(
            UPSTREAM + "tenants:\n  - id: a\n    api_keys:\n      - k1\n      - k1\n",
            "caps.yaml:6: tenants[0].api_keys[1]: duplicate api key (also tenants[0].api_keys[0])",
            id="duplicate-key-same-tenant",
        ),
        pytest.param(
            UPSTREAM
            + "tenants:\n  - id: a\n    api_keys: [sk-1]\n  - id: b\n    api_keys:\n"
            + f"      - sha256:{hashlib.sha256(b'sk-1').hexdigest()}\n",
            "caps.yaml:7: tenants[1].api_keys[0]: duplicate api key (also tenants[0].api_keys[0])",
            id="duplicate-key-literal-vs-digest",
        ),
        pytest.param(
            UPSTREAM + "tenants:\n  - id: a\n    api_keys: ['']\n",
            "caps.yaml:4: tenants[0].api_keys[0]: must not be empty",
            id="empty-key",
        ),
        pytest.param(
            UPSTREAM
            + "cost_caps:\n  agents:\n    - agent_id: x\n    - agent_id: y\n    - agent_id: x\n",
            "caps.yaml:6: cost_caps.agents[2].agent_id: duplicate agent_id 'x' (also agents[0])",
            id="duplicate-agent",
        ),
        pytest.param(
            "upstreams:\n  - {name: a, base_url: 'http://h'}\n  - {name: a, base_url: 'http://i'}\n",
            "caps.yaml:3: upstreams[1].name: duplicate name 'a' (also upstreams[0])",
            id="duplicate-upstream",
        ),
        pytest.param(
            "upstreams: []\n",
            "caps.yaml:1: upstreams: at least one upstream is required",
            id="no-upstreams",
        ),
        pytest.param(
            "server: {port: 1}\n",
            "caps.yaml:1: upstreams: Field required",
            id="missing-upstreams",
        ),
        pytest.param(
            "upstreams:\n  - name: a\n    base_url: ftp://h\n",
            "caps.yaml:3: upstreams[0].base_url: must be an http:// or https:// URL with a host",
            id="bad-base-url",
        ),
        pytest.param(
            "upstreams:\n  - name: a\n",
            "caps.yaml:2: upstreams[0].base_url: Field required",
            id="missing-base-url",
        ),
        pytest.param(
            "upstreams:\n  - name: a\n    base_url: http://h\n    models: []\n",
            "caps.yaml:4: upstreams[0].models: must list at least one model glob",
            id="no-model-globs",
        ),
        pytest.param(
            "upstreams:\n  - name: a\n    base_url: http://h\n    timeout_s: 0\n",
            "caps.yaml:4: upstreams[0].timeout_s: Input should be greater than 0",
            id="timeout-not-positive",
        ),
        pytest.param(
            UPSTREAM + "server:\n  port: 70000\n",
            "caps.yaml:3: server.port: Input should be less than or equal to 65535",
            id="port-range",
        ),
        pytest.param(
            UPSTREAM + "store:\n  on_error: ignore\n",
            "caps.yaml:3: store.on_error: Input should be 'fail_closed' or 'fail_open'",
            id="on-error",
        ),
        pytest.param(
            UPSTREAM + "store:\n  url: http://h\n",
            "caps.yaml:3: store.url: must be a memory://, redis://, rediss:// or unix:// URL",
            id="store-scheme",
        ),
        pytest.param(
            UPSTREAM + "auth:\n  mode: open\n",
            "caps.yaml:3: auth.mode: Input should be 'keys' or 'passthrough'",
            id="auth-mode",
        ),
        pytest.param(
            UPSTREAM + "identity:\n  agent_header: 'X Agent'\n",
            "caps.yaml:3: identity.agent_header: String should match pattern",
            id="agent-header",
        ),
        pytest.param(
            UPSTREAM + "time_zone: Mars/Olympus\n",
            "caps.yaml:2: time_zone: not a known IANA time zone name",
            id="time-zone",
        ),
        pytest.param(
            UPSTREAM + "pricing:\n  models:\n    gpt-x: {input_per_mtok: 1000.01}\n",
            "caps.yaml:4: pricing.models['gpt-x'].input_per_mtok: Input should be less than or "
            "equal to 1000",
            id="price-above-1000",
        ),
        pytest.param(
            UPSTREAM + "pricing:\n  default: {output_per_mtok: 1}\n",
            "caps.yaml:3: pricing.default.input_per_mtok: Field required",
            id="default-price-missing-field",
        ),
        pytest.param(
            UPSTREAM + "tokenizer:\n  encodings: {'gpt-*': p50k_base}\n",
            "caps.yaml:3: tokenizer.encodings['gpt-*']: Input should be 'o200k_base' or",
            id="tokenizer-encoding",
        ),
        pytest.param(
            UPSTREAM
            + "tenants:\n  - id: a\n    api_keys:\n      - {key: 'sha256:12ab', agent: x}\n",
            "caps.yaml:5: tenants[0].api_keys[0].key: 'sha256:' must be followed by 64 hex digits",
            id="bound-key-bad-digest",
        ),
        pytest.param(
            UPSTREAM + "tenants:\n  - id: a\n    api_keys:\n      - {key: 'k ', agent: x}\n",
            "caps.yaml:5: tenants[0].api_keys[0].key: must not start or end with whitespace",
            id="bound-key-whitespace",
        ),
        pytest.param(
            UPSTREAM + "tenants:\n  - id: a\n    api_keys:\n      - {key: '', agent: x}\n",
            "caps.yaml:5: tenants[0].api_keys[0].key: must not be empty",
            id="bound-key-empty",
        ),
        pytest.param(
            UPSTREAM
            + "tenants:\n  - id: a\n    api_keys:\n      - k1\n  - id: b\n    api_keys:\n"
            + "      - {key: k1, agent: x}\n",
            "caps.yaml:8: tenants[1].api_keys[0]: duplicate api key (also tenants[0].api_keys[0])",
            id="bound-key-duplicates-plain-key",
        ),
        pytest.param(
            UPSTREAM + "cost_caps:\n  agents:\n    - {agent_id: vip, bound_keys_only: true}\n",
            "caps.yaml:4: cost_caps.agents[0].bound_keys_only: agent 'vip' is bound_keys_only, "
            "but no tenant key is bound to it",
            id="bound-keys-only-unreachable",
        ),
        pytest.param(
            UPSTREAM + "cost_caps:\n  unsized_input: ignore\n",
            "caps.yaml:3: cost_caps.unsized_input: Input should be 'hold_context' or 'reject'",
            id="unsized-input",
        ),
        pytest.param(
            UPSTREAM + "cost_caps:\n  default_max_tool_calls: 0\n",
            "caps.yaml:3: cost_caps.default_max_tool_calls: Input should be greater than or equal "
            "to 1",
            id="max-tool-calls-zero",
        ),
        pytest.param(
            UPSTREAM + "cost_caps:\n  default_max_tool_calls: 1001\n",
            "caps.yaml:3: cost_caps.default_max_tool_calls: Input should be less than or equal "
            "to 1000",
            id="max-tool-calls-above-1000",
        ),
        pytest.param(
            UPSTREAM + "server:\n  max_upstream_body_bytes: 0\n",
            "caps.yaml:3: server.max_upstream_body_bytes: Input should be greater than 0",
            id="upstream-body-limit-not-positive",
        ),
        pytest.param(
            UPSTREAM + "server:\n  client_write_timeout_s: 0\n",
            "caps.yaml:3: server.client_write_timeout_s: Input should be greater than 0",
            id="client-write-timeout-not-positive",
        ),
        pytest.param(
            UPSTREAM + "server:\n  client_write_timeout_s: .inf\n",
            "caps.yaml:3: server.client_write_timeout_s: Input should be a finite number",
            id="client-write-timeout-infinite",
        ),
        pytest.param(
            UPSTREAM + "store:\n  hold_lease_s: 0.5\n",
            "caps.yaml:3: store.hold_lease_s: Input should be greater than or equal to 1",
            id="hold-lease-below-1s",
        ),
        pytest.param(
            UPSTREAM + "store:\n  hold_lease_s: 3601\n",
            "caps.yaml:3: store.hold_lease_s: Input should be less than or equal to 3600",
            id="hold-lease-above-1h",
        ),
        pytest.param(
            UPSTREAM + "streaming:\n  on_client_disconnect: abort\n",
            "caps.yaml:3: streaming.on_client_disconnect: Input should be 'drain' or 'close'",
            id="on-client-disconnect",
        ),
        pytest.param(
            UPSTREAM + "pricing:\n  tools:\n    web_search: {per_call_usd: -0.01}\n",
            "caps.yaml:4: pricing.tools.web_search.per_call_usd: Input should be greater than or "
            "equal to 0",
            id="tool-price-negative",
        ),
        pytest.param(
            UPSTREAM + "pricing:\n  tools:\n    web_search: {per_call_usd: 1000.01}\n",
            "caps.yaml:4: pricing.tools.web_search.per_call_usd: Input should be less than or "
            "equal to 1000",
            id="tool-price-above-1000",
        ),
        pytest.param(
            UPSTREAM + "pricing:\n  tools:\n    web_search: {per_call_usd: .nan}\n",
            "caps.yaml:4: pricing.tools.web_search.per_call_usd: Input should be a finite number",
            id="tool-price-nan",
        ),
        pytest.param(
            UPSTREAM + "pricing:\n  tools:\n    web_search: {}\n",
            "caps.yaml:4: pricing.tools.web_search.per_call_usd: Field required",
            id="tool-price-missing",
        ),
    ],
)
def test_validation_error_names_line_and_path(text: str, prefix: str) -> None:
    assert only_error(text).startswith(prefix)


def test_unknown_fields_rejected_at_every_depth() -> None:
    text = """\
        upstreams: [{name: up, base_url: 'http://h'}]
        severs: {}
        cost_caps:
          agents:
            - agent_id: a
              token_cap:
                max_prompt_tokens: 5
                max_tokens: 5
        pricing:
          models:
            m: {input_per_mtok: 1, output_per_mtok: 1, per_image: 2}
        """
    assert errors(text) == (
        "caps.yaml:2: severs: Extra inputs are not permitted",
        "caps.yaml:8: cost_caps.agents[0].token_cap.max_tokens: Extra inputs are not permitted",
        "caps.yaml:11: pricing.models.m.per_image: Extra inputs are not permitted",
    )


def test_all_errors_reported_sorted_by_line() -> None:
    found = errors(
        "upstreams:\n  - {name: up, base_url: 'http://h', timeout_s: -1}\n"
        "server: {port: -1}\nstore: {timeout_ms: 0}\n"
    )
    assert [e.split(":")[1] for e in found] == ["2", "3", "4"]


def test_duplicate_yaml_key() -> None:
    assert only_error(UPSTREAM + "server:\n  port: 1\n  port: 2\n") == (
        "caps.yaml:4: server.port: duplicate key (also on line 3)"
    )


# --- Malformed files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "caps.yaml:1: <root>: the file is empty"),
        ("# only a comment\n", "caps.yaml:1: <root>: the file is empty"),
        ("- a\n- b\n", "caps.yaml:1: <root>: must be a mapping of sections"),
        ("\n\nupstreams\n", "caps.yaml:3: <root>: must be a mapping of sections"),
        ("server:\n  port: 1\n bad: 2\n", "caps.yaml:3: <yaml>: "),
        ("upstreams: [{name: a\n", "caps.yaml:2: <yaml>: "),
        ("a: b: c\n", "caps.yaml:1: <yaml>: mapping values are not allowed here"),
        ("a: 1\n---\nb: 2\n", "caps.yaml:2: <yaml>: "),
        ("server:\n\tport: 1\n", "caps.yaml:2: <yaml>: "),
        ("a: !!python/object:os.system x\n", "caps.yaml:1: <yaml>: "),
        ("server: {port: 1}\nupstreams:\n  - name: a\n    base_url:", "caps.yaml:4: upstreams[0]"),
    ],
)
def test_malformed_yaml_is_a_config_error(text: str, expected: str) -> None:
    assert only_error(text).startswith(expected)


def test_load_settings_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"^{missing}: cannot read: "):
        load_settings(missing)


def test_load_settings_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "caps.yaml"
    path.write_bytes(UPSTREAM.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.errors == (f"{path}:2: <file>: not valid UTF-8",)


def test_load_settings_reports_path_and_accepts_bom(tmp_path: Path) -> None:
    path = tmp_path / "caps.yaml"
    path.write_text("\ufeff" + UPSTREAM + "server: {port: x}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(str(path))
    assert info.value.errors[0].startswith(f"{path}:2: server.port: ")
    path.write_text("\ufeff" + UPSTREAM, encoding="utf-8")
    assert load_settings(path).upstreams[0].name == "up"


# --- Secrets never appear in errors --------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        UPSTREAM + "tenants: [{id: t, api_keys: ['sha256:hunter2hunter2']}]\n",
        UPSTREAM + "tenants: [{id: t, api_keys: [' hunter2hunter2']}]\n",
        UPSTREAM + "tenants: [{id: t, api_keys: [{key: 'sha256:hunter2hunter2', agent: a}]}]\n",
        UPSTREAM + "tenants: [{id: t, api_keys: [{key: 'hunter2hunter2 ', agent: a}]}]\n",
        UPSTREAM + "tenants: [{id: t, api_keys: [{key: hunter2hunter2, agent: 'not an id'}]}]\n",
        UPSTREAM + "tenants: [{id: t, api_keys: [{key: hunter2hunter2}]}]\n",
        UPSTREAM + "tenants: [{id: t, api_keys: [{key: hunter2hunter2, agent: a, x: 1}]}]\n",
        UPSTREAM + "store: {url: 'http://user:hunter2hunter2@h:6379'}\n",
        UPSTREAM + "auth: {admin_token: 123, tenant_hash_key: [hunter2hunter2]}\n",
        "upstreams:\n  - name: up\n    base_url: http://h\n    api_key: 'hunter2hunter2\n",
        "upstreams: [{name: up, base_url: 'http://h', api_key: hunter2hunter2: x}]\n",
        "upstreams: [{name: up, base_url: 'https://u:hunter2hunter2@h?x', api_key: {a: 1}}]\n",
    ],
)
def test_secrets_not_in_error_text(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert "hunter2" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_validation_error_in_code_hides_secret() -> None:
    with pytest.raises(ValidationError) as info:
        TenantConfig(id="t", api_keys=(SecretStr("sha256:hunter2hunter2"),))
    assert "hunter2" not in str(info.value)
    bound = BoundKey(key=SecretStr(" hunter2hunter2"), agent="a")
    with pytest.raises(ValidationError) as info:
        TenantConfig(id="t", api_keys=(bound,))
    assert "hunter2" not in str(info.value)
    with pytest.raises(ValidationError) as info:
        BoundKey.model_validate({"key": "hunter2hunter2", "agent": "not an id"})
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("entry", "path"),
    [
        ("{key: sk-a, agent: 'bad agent'}", "tenants[0].api_keys[0].agent"),
        ("{key: sk-a}", "tenants[0].api_keys[0].agent"),
        ("{key: sk-a, agent: vip, extra: 1}", "tenants[0].api_keys[0].extra"),
    ],
)
def test_a_bad_bound_key_entry_is_one_error_at_its_own_field(entry: str, path: str) -> None:
    text = UPSTREAM + f"tenants:\n  - id: a\n    api_keys: [{entry}]\n"
    error = only_error(text)
    assert error.startswith(f"caps.yaml:4: {path}: "), error
    assert "sk-a" not in error


def test_bad_tenants_do_not_also_fail_the_bound_keys_only_check() -> None:
    text = (
        "upstreams: [{name: up, base_url: 'http://h'}]\n"
        "tenants:\n  - id: 'bad id'\n    api_keys: [{key: sk-a, agent: vip}]\n"
        "cost_caps:\n  agents:\n    - {agent_id: vip, bound_keys_only: true}\n"
    )
    assert "tenants[0].id" in only_error(text)


@pytest.mark.parametrize("name", ["", "web search", "x" * 65])
def test_a_tool_price_name_must_be_a_plain_identifier(name: str) -> None:
    text = UPSTREAM + f"pricing:\n  tools:\n    '{name}': {{per_call_usd: 1}}\n"
    assert "pricing.tools" in only_error(text)


# --- Store topologies --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("store", "path", "message"),
    [
        ("{url: 'redis://h:6379/0?cluster=true'}", "store.url", "set store.mode: cluster"),
        ("{url: 'redis://h:6379/0?socket_timeout=9'}", "store.url", "'socket_timeout' is not"),
        ("{url: 'redis://h:6379/0?decode_responses=yes'}", "store.url", "not supported"),
        ("{url: 'memory://', mode: cluster}", "store.mode", "needs a redis://"),
        ("{url: 'redis://h:7000/2', mode: cluster}", "store.url", "database 0 only"),
        ("{url: 'redis://h', mode: sentinel}", "store.sentinel", "needs the sentinel section"),
        (
            "{url: 'redis://h', sentinel: {service_name: m, nodes: ['h:26379']}}",
            "store.sentinel",
            "mode: sentinel only",
        ),
        (
            "{url: 'redis://h', mode: sentinel, sentinel: {service_name: m, nodes: ['h']}}",
            "store.sentinel.nodes[0]",
            "host:port",
        ),
        (
            "{url: 'redis://h', mode: sentinel, sentinel: {service_name: m, nodes: []}}",
            "store.sentinel.nodes",
            "at least one sentinel",
        ),
        ("{url: 'redis://h', mode: ring}", "store.mode", "Input should be"),
        ("{url: 'redis://h', on_data_loss: ignore}", "store.on_data_loss", "Input should be"),
    ],
)
def test_store_topology_errors_name_the_field(store: str, path: str, message: str) -> None:
    error = only_error(UPSTREAM + f"store: {store}\n")
    assert f"caps.yaml:2: {path}: " in error, error
    assert message in error, error


def test_store_topologies_that_load() -> None:
    cluster = parse(UPSTREAM + "store: {url: 'redis://:pw@h:7000', mode: cluster}\n")
    assert cluster.store.mode == "cluster" and cluster.store.sentinel is None
    sentinel = parse(
        UPSTREAM + "store:\n  url: 'rediss://:pw@ignored/1?ssl_cert_reqs=none'\n"
        "  mode: sentinel\n  on_data_loss: continue\n"
        "  sentinel: {service_name: mymaster, nodes: ['10.0.0.1:26379', 's2:26380']}\n"
    )
    assert sentinel.store.sentinel is not None
    assert sentinel.store.sentinel.nodes == ("10.0.0.1:26379", "s2:26380")
    assert sentinel.store.on_data_loss == "continue"
    assert parse(UPSTREAM).store.on_data_loss == "fail_closed"


def test_a_bad_store_url_option_never_shows_the_password() -> None:
    error = only_error(UPSTREAM + "store: {url: 'redis://:hunter2hunter2@h/0?cluster=1'}\n")
    assert "hunter2" not in error


def test_limits_of_requests_in_flight() -> None:
    settings = parse(
        UPSTREAM + "tenants: [{id: acme, max_concurrent_requests: 50}, {id: globex}]\n"
        "cost_caps:\n  default_max_concurrent_requests: 8\n"
        "  agents: [{agent_id: big, max_concurrent_requests: 32}]\n"
    )
    assert settings.concurrency_limits("acme", "big") == (50, 32)
    assert settings.concurrency_limits("globex", "other") == (None, 8)
    assert parse(UPSTREAM).concurrency_limits("acme", "x") == (None, None)
    error = only_error(UPSTREAM + "tenants: [{id: acme, max_concurrent_requests: 0}]\n")
    assert "tenants[0].max_concurrent_requests" in error


# --- rate, model and user caps ---------------------------------------------------------------


def test_rate_model_and_user_caps_parse_with_every_field() -> None:
    s = parse(
        UPSTREAM
        + """
tenants:
  - id: acme
    rate_caps: [{window: minute, max_requests: 600, max_tokens: 200000}]
cost_caps:
  default_rate_caps: [{window: minute, max_requests: 60}]
  agents:
    - agent_id: premium-agent
      rate_caps: [{window: minute, max_tokens: 1000000}, {window: daily, max_tokens: 20000000}]
  model_caps:
    - name: frontier
      models: ["gpt-4o", "o3*", "gpt-5*"]
      budget_caps: [{window: daily, hard_limit_usd: 20}]
      rate_caps: [{window: minute, max_requests: 30}]
  user_caps:
    source: header:X-End-User
    budget_caps: [{window: daily, hard_limit_usd: 2}]
    rate_caps: [{window: minute, max_requests: 20}]
  max_users_per_tenant: 500
"""
    )
    caps = s.cost_caps
    assert s.tenant_rate_caps("acme")[0].max_tokens == 200_000
    assert caps.rate_caps_for("premium-agent")[1].window is Window.DAILY
    assert caps.rate_caps_for("anyone")[0].max_requests == 60
    assert [c.name for c in caps.model_caps_for("o3-mini")] == ["frontier"]
    assert caps.model_caps_for("gpt-4o-mini") == ()
    assert caps.user_caps is not None and caps.user_caps.header == "X-End-User"
    assert caps.max_users_per_tenant == 500


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "cost_caps:\n  default_rate_caps: [{window: minute}]\n",
            "cost_caps.default_rate_caps[0]: set max_requests, max_tokens or both",
        ),
        (
            "cost_caps:\n  default_rate_caps: [{window: daily, max_requests: 1}, "
            "{window: daily, max_tokens: 5}]\n",
            "duplicate window 'daily'",
        ),
        (
            "cost_caps:\n  default_rate_caps: [{window: minute, max_requests: 0}]\n",
            "default_rate_caps[0].max_requests",
        ),
        (
            "cost_caps:\n  model_caps: [{name: a, models: ['x']}, {name: a, models: ['y']}]\n",
            "duplicate name 'a'",
        ),
        ("cost_caps:\n  model_caps: [{name: a, models: []}]\n", "model_caps[0].models"),
        ("cost_caps:\n  user_caps: {source: query.user}\n", "'body.user' or 'header:<Name>'"),
    ],
)
def test_bad_rate_model_and_user_caps_are_named(text: str, expected: str) -> None:
    assert expected in only_error(UPSTREAM + text)
