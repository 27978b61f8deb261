"""The caps file: frozen, validated settings, loaded from YAML with line-numbered errors.

    >>> s = parse_settings("upstreams: [{name: openai, base_url: 'https://api.openai.com/v1'}]")
    >>> s.upstream_for("gpt-4o").name
    'openai'
    >>> s.cost_caps.budget_caps_for("any-agent")
    ()

Only this module reads files and the environment. ``${VAR}`` and ``${VAR:-default}`` are
expanded inside YAML string values after parsing (``$${`` is a literal ``${``). Every problem
is reported in a ``ConfigError`` whose lines read ``file:line: field.path: message``; no line
ever contains a secret value.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    InstanceOf,
    PrivateAttr,
    SecretStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from proxy.price_files import PriceFile, PriceFileError, load_price_file
from proxy.pricing import ModelPrice, ToolPrice, usd_to_micros_up
from proxy.windows import Window

ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
"""Tenant ids and upstream names."""
AGENT_ID_PATTERN = r"^[A-Za-z0-9._:@/-]{1,128}$"
"""Agent ids, as the agent header may carry them."""
DEFAULT_AGENT = "_default"
"""The agent of a request without the agent header."""

_HEADER_NAME = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
_STORE_SCHEMES = ("memory", "redis", "rediss", "unix")
# Query options of a store url that the Redis client takes and capproxy does not set itself
# (timeouts, retries, pool size and reply decoding are capproxy's).
_STORE_URL_OPTIONS = frozenset(
    {
        "db",
        "client_name",
        "health_check_interval",
        "socket_keepalive",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "ssl_min_version",
    }
)
_SHA256_KEY = re.compile(r"sha256:([0-9a-fA-F]{64})")
_ERROR_TYPE = "invalid_config"


def _invalid(message: str, *at: int | str) -> PydanticCustomError:
    """A validation error; ``at`` locates it below the field being validated."""
    return PydanticCustomError(_ERROR_TYPE, message, {"at": at})


def _host_port(node: str) -> str:
    host, sep, port = node.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be host:port")
    return node


def _empty_to_none(value: object) -> object:
    return None if value == "" else value


# No real model name comes near this; longer ones are refused before any lookup.
MAX_MODEL_CHARS = 256
# Models whose upstream is remembered per settings (past this many, the memo starts over).
MAX_REMEMBERED_ROUTES = 4096

_WindowedT = TypeVar("_WindowedT", "BudgetCap", "RateCap")


def _unique_windows(caps: tuple[_WindowedT, ...]) -> tuple[_WindowedT, ...]:
    _refuse_duplicates((cap.window for cap in caps), what="window", where="item ", field="window")
    return caps


def _refuse_duplicates(names: Iterable[str], *, what: str, where: str, field: str) -> None:
    """Refuse the second item of a list that repeats a name (``field`` of item ``i``),
    pointing at the first (``where[first]``)."""
    if dup := _first_duplicate(names):
        first, i, name = dup
        raise _invalid(f"duplicate {what} {str(name)!r} (also {where}[{first}])", i, field)


def _first_duplicate(names: Iterable[str]) -> tuple[int, int, str] | None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            return seen[name], i, name
        seen[name] = i
    return None


_Usd = Annotated[Decimal, Field(gt=0, decimal_places=6, allow_inf_nan=False)]
_Tokens = Annotated[int | None, Field(gt=0)]
_Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_OptionalSecret = Annotated[SecretStr | None, BeforeValidator(_empty_to_none)]
_Glob = Annotated[str, Field(min_length=1)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class BudgetCap(_Model):
    """A USD limit per calendar window: past ``hard_limit_usd`` requests are refused (429);
    ``soft_limit_usd`` is a warning threshold that refuses nothing."""

    window: Window
    hard_limit_usd: _Usd
    soft_limit_usd: _Usd | None = None

    @field_validator("soft_limit_usd")
    @classmethod
    def _below_hard(cls, soft: Decimal | None, info: ValidationInfo) -> Decimal | None:
        hard = info.data.get("hard_limit_usd")
        if soft is not None and hard is not None and soft >= hard:
            raise _invalid("must be below hard_limit_usd")
        return soft

    @functools.cached_property
    def warn_from_micros(self) -> tuple[int | None, int]:
        """The least spend in micro-USD that reaches the soft limit (None without one), and
        the least that reaches 80 % of the hard limit: exact, rounded up."""
        soft = self.soft_limit_usd
        return (
            None if soft is None else usd_to_micros_up(soft),
            usd_to_micros_up(self.hard_limit_usd * Decimal("0.8")),
        )


BudgetCaps = Annotated[tuple[BudgetCap, ...], AfterValidator(_unique_windows)]


class RateCap(_Model):
    """Requests and tokens per calendar window (``minute`` through ``monthly``): past
    either, requests are refused (429 ``rate_limit_exceeded``). Tokens are prompt +
    completion, held as the prompt estimate + the output limit and settled to the usage."""

    window: Window
    max_requests: int | None = Field(default=None, ge=1, le=10**12)
    max_tokens: int | None = Field(default=None, ge=1, le=10**15)

    @model_validator(mode="after")
    def _limits_something(self) -> RateCap:
        if self.max_requests is None and self.max_tokens is None:
            raise _invalid("set max_requests, max_tokens or both")
        return self


RateCaps = Annotated[tuple[RateCap, ...], AfterValidator(_unique_windows)]


class TokenCap(_Model):
    """Per-request token limits; ``None`` leaves that count unlimited."""

    max_prompt_tokens: _Tokens = None
    max_completion_tokens: _Tokens = None
    max_total_tokens: _Tokens = None


class AgentCostCap(_Model):
    """Caps for one agent id, in every tenant; each set field replaces the default wholesale."""

    agent_id: str = Field(pattern=AGENT_ID_PATTERN)
    budget_caps: BudgetCaps = ()
    rate_caps: RateCaps = ()
    token_cap: TokenCap | None = None
    # Only keys bound to this agent (``api_keys: [{key, agent}]``) may act as it; a header
    # naming it from any other key is refused (403).
    bound_keys_only: bool = False
    # Requests in flight at once for this agent, in each tenant (over the default).
    max_concurrent_requests: int | None = Field(default=None, ge=1, le=1_000_000)


class ModelCap(_Model):
    """Caps on one tenant's requests (all its agents) for the models ``models`` matches
    (globs); ``name`` keys its counters, so renaming it starts them afresh."""

    name: str = Field(pattern=ID_PATTERN)
    models: tuple[_Glob, ...] = Field(min_length=1)
    budget_caps: BudgetCaps = ()
    rate_caps: RateCaps = ()

    def matches(self, model: str) -> bool:
        return any(fnmatchcase(model, glob) for glob in self.models)


_USER_SOURCE = re.compile(r"body\.user|header:[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class UserCaps(_Model):
    """Caps per end user within a tenant. The user is the request body's ``user`` field
    (``source: body.user``) or a header (``source: header:X-End-User``); a request that
    names none is held to the tenant's and agent's caps only."""

    source: str = "body.user"
    budget_caps: BudgetCaps = ()
    rate_caps: RateCaps = ()

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if not _USER_SOURCE.fullmatch(source):
            raise _invalid("must be 'body.user' or 'header:<Name>'")
        return source

    @property
    def header(self) -> str | None:
        """The header naming the user, or None for the body's ``user`` field."""
        return self.source.removeprefix("header:") if self.source.startswith("header:") else None


class CostCapConfig(_Model):
    """Per (tenant, agent) caps: defaults, and overrides by agent id.

    ``caps.budget_caps_for("premium-agent")`` / ``caps.token_cap_for(DEFAULT_AGENT)``.
    """

    enabled: bool = True
    # false = shadow mode: nothing is rejected; would-be rejections are logged, counted and
    # reported in the x-budget-would-reject header.
    enforce: bool = True
    # Tenant-wide caps for every tenant without budget caps of its own, including the
    # tenants passthrough mode derives from unknown keys: a tenant cannot escape them by
    # inventing agent ids.
    default_tenant_budget_caps: BudgetCaps = ()
    default_budget_caps: BudgetCaps = ()
    # Requests and tokens per (tenant, agent), for agents without rate caps of their own.
    default_rate_caps: RateCaps = ()
    default_token_cap: TokenCap | None = None
    agents: tuple[AgentCostCap, ...] = ()
    # Caps per tenant on the requests for some models.
    model_caps: tuple[ModelCap, ...] = ()
    # Caps per end user within a tenant.
    user_caps: UserCaps | None = None
    # Distinct end users with counters per tenant per day (each costs the store keys).
    max_users_per_tenant: int = Field(default=10_000, ge=1, le=10_000_000)
    # Input the proxy cannot size (server-side state, files, image URLs on unknown models):
    # hold the model's whole input context (``max_input_tokens`` of its price), or refuse it.
    unsized_input: Literal["hold_context", "reject"] = "hold_context"
    # Hosted tool calls held per enabled tool when the request sets no ``max_tool_calls``.
    default_max_tool_calls: int = Field(default=4, ge=1, le=1000)
    # Distinct agents one tenant may name per day (each costs the store its counters).
    max_agents_per_tenant: int = Field(default=1000, ge=1, le=1_000_000)
    # Requests in flight at once per (tenant, agent); None: no limit.
    default_max_concurrent_requests: int | None = Field(default=None, ge=1, le=1_000_000)

    @field_validator("agents")
    @classmethod
    def _unique_agents(cls, agents: tuple[AgentCostCap, ...]) -> tuple[AgentCostCap, ...]:
        ids = (a.agent_id for a in agents)
        _refuse_duplicates(ids, what="agent_id", where="agents", field="agent_id")
        return agents

    @field_validator("model_caps")
    @classmethod
    def _unique_model_caps(cls, caps: tuple[ModelCap, ...]) -> tuple[ModelCap, ...]:
        _refuse_duplicates((c.name for c in caps), what="name", where="model_caps", field="name")
        return caps

    # A cached property, not a private attribute: those are read through pydantic's
    # __getattr__, and these are read on every request.
    @functools.cached_property
    def agents_by_id(self) -> dict[str, AgentCostCap]:
        return {agent.agent_id: agent for agent in self.agents}

    def rate_caps_for(self, agent_id: str) -> tuple[RateCap, ...]:
        agent = self.agents_by_id.get(agent_id)
        return agent.rate_caps if agent and agent.rate_caps else self.default_rate_caps

    def model_caps_for(self, model: str) -> tuple[ModelCap, ...]:
        """The model caps whose globs match ``model``."""
        return tuple(cap for cap in self.model_caps if cap.matches(model))

    @property
    def agent_ids(self) -> frozenset[str]:
        """The agents listed with their own caps."""
        return frozenset(self.agents_by_id)

    def budget_caps_for(self, agent_id: str) -> tuple[BudgetCap, ...]:
        agent = self.agents_by_id.get(agent_id)
        return agent.budget_caps if agent and agent.budget_caps else self.default_budget_caps

    def max_concurrent_for(self, agent_id: str) -> int | None:
        agent = self.agents_by_id.get(agent_id)
        if agent is not None and agent.max_concurrent_requests is not None:
            return agent.max_concurrent_requests
        return self.default_max_concurrent_requests

    def token_cap_for(self, agent_id: str) -> TokenCap | None:
        agent = self.agents_by_id.get(agent_id)
        return agent.token_cap if agent and agent.token_cap else self.default_token_cap

    def bound_keys_only(self, agent_id: str) -> bool:
        """Whether only keys bound to ``agent_id`` may act as it."""
        agent = self.agents_by_id.get(agent_id)
        return agent is not None and agent.bound_keys_only


class BoundKey(_Model):
    """A proxy key bound to one agent: its requests are that agent whatever the agent
    header says."""

    key: SecretStr
    agent: str = Field(pattern=AGENT_ID_PATTERN)


def _key_kind(entry: object) -> str:
    return _BOUND_TAG if isinstance(entry, (dict, BoundKey)) else _PLAIN_TAG


# A key entry is a string or a {key, agent} mapping, told apart by its shape (so an error
# in one names the entry's own fields, not both union members).
_PLAIN_TAG, _BOUND_TAG = "<plain key>", "<bound key>"
_KeyEntry = Annotated[
    Annotated[SecretStr, Tag(_PLAIN_TAG)] | Annotated[BoundKey, Tag(_BOUND_TAG)],
    Discriminator(_key_kind),
]


class TenantConfig(_Model):
    """A tenant: its proxy keys (a literal, or ``"sha256:<64 hex>"`` of one, optionally
    bound to an agent as ``{key, agent}``) and the caps that bound all of its agents
    together. Compare ``key_digests()``, never the literals."""

    id: str = Field(pattern=ID_PATTERN)
    api_keys: tuple[_KeyEntry, ...] = ()
    budget_caps: BudgetCaps = ()
    # Requests and tokens per window, all agents together.
    rate_caps: RateCaps = ()
    # Requests in flight at once, all agents together; None: no limit.
    max_concurrent_requests: int | None = Field(default=None, ge=1, le=1_000_000)
    _digests: tuple[bytes, ...] = PrivateAttr(default=())
    _agents: tuple[str | None, ...] = PrivateAttr(default=())

    @field_validator("api_keys")
    @classmethod
    def _well_formed(
        cls, keys: tuple[SecretStr | BoundKey, ...]
    ) -> tuple[SecretStr | BoundKey, ...]:
        for i, entry in enumerate(keys):
            bound = isinstance(entry, BoundKey)
            value = _key_text(entry)
            at: tuple[int | str, ...] = (i, "key") if bound else (i,)
            if not value:
                raise _invalid("must not be empty", *at)
            if value != value.strip():
                raise _invalid("must not start or end with whitespace", *at)
            if value.startswith("sha256:") and not _SHA256_KEY.fullmatch(value):
                raise _invalid("'sha256:' must be followed by 64 hex digits", *at)
        return keys

    def model_post_init(self, context: Any, /) -> None:
        self._digests = tuple(_digest(_key_text(entry)) for entry in self.api_keys)
        self._agents = tuple(
            entry.agent if isinstance(entry, BoundKey) else None for entry in self.api_keys
        )

    def key_digests(self) -> tuple[bytes, ...]:
        """The SHA-256 digest of each key, in order."""
        return self._digests

    def key_agents(self) -> tuple[str | None, ...]:
        """The agent each key is bound to (``None``: the agent header decides), in order."""
        return self._agents


def _key_text(entry: SecretStr | BoundKey) -> str:
    return (entry.key if isinstance(entry, BoundKey) else entry).get_secret_value()


def _digest(key: str) -> bytes:
    if match := _SHA256_KEY.fullmatch(key):
        return bytes.fromhex(match[1])
    return hashlib.sha256(key.encode()).digest()


class ServerConfig(_Model):
    """Where the proxy listens, its body limits, how long a client may stall a stream, and
    how long shutdown drains."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    # A non-streamed upstream answer larger than this is refused (502) and charged its hold.
    max_upstream_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    # A client that reads nothing of a stream for this long is cut (what was generated is
    # still settled).
    client_write_timeout_s: _Seconds = 60
    shutdown_grace_s: float = Field(default=30, ge=0, allow_inf_nan=False)
    # Client connections held at once. Past it a new connection takes the place of the
    # oldest idle one, or is closed at once when all are busy; keep it well below the
    # open-files limit (raised to its hard limit at startup): upstream and store need some.
    max_connections: int = Field(default=2048, ge=1, le=1_000_000)
    # A request's line and headers must arrive whole within this, from their first byte.
    request_header_timeout_s: _Seconds = 10
    # A connection with no request yet, or idle between requests, is closed after this.
    keepalive_timeout_s: _Seconds = 75


class SentinelConfig(_Model):
    """The sentinels that know the primary of ``service_name`` (``store.mode: sentinel``)."""

    service_name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    nodes: tuple[Annotated[str, AfterValidator(_host_port)], ...]
    # The sentinels' own password, when they have one (the primary's is in the url).
    password: _OptionalSecret = None

    @field_validator("nodes")
    @classmethod
    def _some(cls, nodes: tuple[str, ...]) -> tuple[str, ...]:
        if not nodes:
            raise _invalid("name at least one sentinel (host:port)")
        return nodes


class JournalConfig(_Model):
    """The spend journal: one JSON line per settled request, appended by each replica."""

    path: Path
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)


class StoreConfig(_Model):
    """The counter store (``memory://``, ``redis://``, ``rediss://``, ``unix://``) and what to do
    when it fails; the URL may hold a password, hence secret.

    ``mode``: ``standalone`` (the url is the server), ``cluster`` (the url is any node of a
    Redis Cluster) or ``sentinel`` (the primary of ``sentinel.service_name``, found by asking
    ``sentinel.nodes``; the url gives the password, database and TLS). ``on_data_loss``: what
    the proxy does for tenants whose spend the store lost (restarted empty, flushed)."""

    url: SecretStr = SecretStr("memory://")
    mode: Literal["standalone", "cluster", "sentinel"] = "standalone"
    sentinel: SentinelConfig | None = None
    on_error: Literal["fail_closed", "fail_open"] = "fail_closed"
    on_data_loss: Literal["fail_closed", "continue"] = "fail_closed"
    timeout_ms: int = Field(default=250, gt=0)
    # Connections to each Redis server that carry the budget scripts, opened at startup;
    # each carries any number of concurrent calls (pipelined), so a burst opens none.
    max_connections: int = Field(default=4, ge=1, le=256)
    # A hold is a lease renewed while its request runs: a dead proxy's holds end (and are
    # charged as spend) within this many seconds.
    hold_lease_s: float = Field(default=30, ge=1, le=3600, allow_inf_nan=False)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: SecretStr) -> SecretStr:
        try:
            parts = urlsplit(url.get_secret_value())
            scheme = parts.scheme
            options = parse_qs(parts.query, keep_blank_values=True)
        except ValueError:
            scheme, options = "", {}
        if scheme not in _STORE_SCHEMES:
            raise _invalid("must be a memory://, redis://, rediss:// or unix:// URL")
        for name in options:
            if name not in _STORE_URL_OPTIONS:
                hint = " (set store.mode: cluster)" if name == "cluster" else ""
                raise _invalid(
                    f"the option {name[:32]!r} is not supported in the url{hint}; allowed: "
                    + ", ".join(sorted(_STORE_URL_OPTIONS))
                )
        return url

    @model_validator(mode="after")
    def _topology(self) -> StoreConfig:
        url = self.url.get_secret_value()
        if self.mode != "standalone" and url.startswith(("memory:", "unix:")):
            raise _invalid(f"mode {self.mode} needs a redis:// or rediss:// url", "mode")
        if self.mode == "sentinel" and self.sentinel is None:
            raise _invalid("mode sentinel needs the sentinel section", "sentinel")
        if self.mode != "sentinel" and self.sentinel is not None:
            raise _invalid("the sentinel section is used with mode: sentinel only", "sentinel")
        if self.mode == "cluster" and urlsplit(url).path not in ("", "/", "/0"):
            raise _invalid("a Redis Cluster has database 0 only", "url")
        return self


class AuthConfig(_Model):
    """How clients authenticate.

    ``keys``: clients present a tenant's proxy key; the upstream key is injected.
    ``passthrough``: the client's own upstream key is forwarded; its tenant id is derived from
    the key as an HMAC-SHA256 under ``tenant_hash_key`` (a built-in key when unset; set one so
    nobody who guesses a key can link it to its tenant id). ``admin_token`` enables the admin
    endpoints.
    """

    mode: Literal["keys", "passthrough"] = "keys"
    admin_token: _OptionalSecret = None
    tenant_hash_key: _OptionalSecret = None


class UpstreamConfig(_Model):
    """An OpenAI-compatible API that serves the models matching ``models`` (fnmatch globs)."""

    name: str = Field(pattern=ID_PATTERN)
    base_url: str
    api_key: _OptionalSecret = None
    models: tuple[_Glob, ...] = ("*",)
    timeout_s: _Seconds = 600
    connect_timeout_s: _Seconds = 10

    @field_validator("models")
    @classmethod
    def _some_models(cls, models: tuple[str, ...]) -> tuple[str, ...]:
        if not models:
            raise _invalid("must list at least one model glob")
        return models

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        try:
            parts = urlsplit(url)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            _ = parts.port
        except ValueError:
            ok = False
        if not ok:
            raise _invalid("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise _invalid("must not have a query or fragment")
        return url.rstrip("/")


class IdentityConfig(_Model):
    """The request header naming the agent; without it the agent is ``_default``."""

    agent_header: str = Field(default="X-Agent-Id", pattern=_HEADER_NAME)


def _load_price_files(value: object, info: ValidationInfo) -> object:
    """Paths (relative to the caps file) -> the price files they hold, read and checked."""
    if not isinstance(value, (list, tuple)):
        return value
    base = (info.context or {}).get("base_dir")
    loaded: list[object] = []
    for i, item in enumerate(value):
        if isinstance(item, PriceFile) or not isinstance(item, (str, Path)):
            loaded.append(item)
            continue
        path = Path(item)
        if not path.is_absolute() and isinstance(base, Path):
            path = base / path
        try:
            loaded.append(load_price_file(path))
        except PriceFileError as exc:
            raise _invalid(str(exc), i) from None
    return tuple(loaded)


class PricingConfig(_Model):
    """USD per 1M tokens by model name, over the built-in table; ``default`` prices unknown
    models (``None``: they are refused). ``files``: price tables in LiteLLM's
    ``model_prices_and_context_window.json`` format, later files over earlier ones, all
    under ``models`` and over the built-in table. ``tools``: USD per hosted tool call by
    tool name (``web_search``, ``file_search``, ``code_interpreter``, ``code_interpreter_4g``,
    ...), over the built-in prices; a tool priced nowhere costs the dearest known tool."""

    models: dict[_Glob, ModelPrice] = Field(default_factory=dict)
    files: Annotated[tuple[InstanceOf[PriceFile], ...], BeforeValidator(_load_price_files)] = ()
    default: ModelPrice | None = None
    tools: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], ToolPrice] = Field(
        default_factory=dict
    )


class TokenizerConfig(_Model):
    """Which tiktoken encoding estimates prompts, by model glob."""

    encodings: dict[_Glob, Literal["o200k_base", "cl100k_base"]] = Field(default_factory=dict)


class StreamingConfig(_Model):
    """What a metered stream does when its client goes away: ``drain`` keeps reading the
    upstream (discarding it) until its usage arrives, within the request's timeout, then
    settles the real usage; ``close`` stops the upstream at once and charges the whole hold."""

    on_client_disconnect: Literal["drain", "close"] = "drain"


class AlertsConfig(_Model):
    """Budget alerts: a JSON POST to ``webhook_url`` the first time a window of a tenant or
    agent crosses 80 %, its soft limit, or its hard limit, once per window period."""

    webhook_url: _OptionalSecret = None
    timeout_s: _Seconds = 5
    retries: int = Field(default=3, ge=0, le=10)


class Settings(_Model):
    """The whole caps file. Build it in code, or with ``load_settings(path)``."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    upstreams: tuple[UpstreamConfig, ...]
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    time_zone: str = "UTC"
    tenants: tuple[TenantConfig, ...] = ()
    cost_caps: CostCapConfig = Field(default_factory=CostCapConfig)
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    streaming: StreamingConfig = Field(default_factory=StreamingConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    journal: JournalConfig | None = None

    @field_validator("upstreams")
    @classmethod
    def _unique_upstreams(cls, ups: tuple[UpstreamConfig, ...]) -> tuple[UpstreamConfig, ...]:
        if not ups:
            raise _invalid("at least one upstream is required")
        _refuse_duplicates((u.name for u in ups), what="name", where="upstreams", field="name")
        return ups

    @field_validator("time_zone")
    @classmethod
    def _iana_zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise _invalid("not a known IANA time zone name (e.g. UTC, Europe/Paris)") from None
        return name

    @field_validator("tenants")
    @classmethod
    def _unique_tenants(cls, tenants: tuple[TenantConfig, ...]) -> tuple[TenantConfig, ...]:
        _refuse_duplicates((t.id for t in tenants), what="tenant id", where="tenants", field="id")
        owners: dict[bytes, str] = {}
        for i, tenant in enumerate(tenants):
            for j, digest in enumerate(tenant.key_digests()):
                if digest in owners:
                    raise _invalid(f"duplicate api key (also {owners[digest]})", i, "api_keys", j)
                owners[digest] = f"tenants[{i}].api_keys[{j}]"
        return tenants

    @field_validator("cost_caps")
    @classmethod
    def _bound_agents_reachable(cls, caps: CostCapConfig, info: ValidationInfo) -> CostCapConfig:
        tenants = info.data.get("tenants")
        if tenants is None:
            return caps  # the tenants have errors of their own; this cannot be judged
        bound = {agent for tenant in tenants for agent in tenant.key_agents() if agent is not None}
        for i, agent in enumerate(caps.agents):
            if agent.bound_keys_only and agent.agent_id not in bound:
                raise _invalid(
                    f"agent '{agent.agent_id}' is bound_keys_only, but no tenant key is "
                    "bound to it",
                    "agents",
                    i,
                    "bound_keys_only",
                )
        return caps

    # Cached properties, not private attributes: those are read through pydantic's
    # __getattr__, and these are read on every request.
    @functools.cached_property
    def tenants_by_id(self) -> dict[str, TenantConfig]:
        return {tenant.id: tenant for tenant in self.tenants}

    @functools.cached_property
    def derived(self) -> dict[tuple[Any, ...], Any]:
        """A memo for values computed from these settings alone (bound its size):
        remembered while they are the settings in force (a reload makes new settings, so
        it never goes stale)."""
        return {}

    @property
    def tz(self) -> ZoneInfo:
        """The zone calendar windows align to."""
        return ZoneInfo(self.time_zone)

    def upstream_for(self, model: str) -> UpstreamConfig | None:
        """The first upstream with a glob matching ``model`` (case-sensitive)."""
        routes = self.upstream_routes
        known = routes.get(model)
        # Checked against the upstreams it was found in: a copy of these settings with
        # other upstreams (model_copy) shares this memo.
        if known is not None and known[0] is self.upstreams:
            return known[1]
        found = next(
            (u for u in self.upstreams if any(fnmatchcase(model, g) for g in u.models)), None
        )
        if len(routes) >= MAX_REMEMBERED_ROUTES:  # model names come from clients
            routes.clear()
        routes[model] = (self.upstreams, found)
        return found

    @functools.cached_property
    def upstream_routes(
        self,
    ) -> dict[str, tuple[tuple[UpstreamConfig, ...], UpstreamConfig | None]]:
        """``upstream_for``'s answers, remembered by model name (globs are matched in Python)."""
        return {}

    def tenant(self, tenant_id: str) -> TenantConfig | None:
        return self.tenants_by_id.get(tenant_id)

    def tenant_budget_caps(self, tenant_id: str) -> tuple[BudgetCap, ...]:
        """A tenant's tenant-wide caps: its own, else ``cost_caps.default_tenant_budget_caps``
        (while cost caps are enabled)."""
        tenant = self.tenants_by_id.get(tenant_id)
        if tenant is not None and tenant.budget_caps:
            return tenant.budget_caps
        return self.cost_caps.default_tenant_budget_caps if self.cost_caps.enabled else ()

    def tenant_rate_caps(self, tenant_id: str) -> tuple[RateCap, ...]:
        tenant = self.tenants_by_id.get(tenant_id)
        return tenant.rate_caps if tenant is not None else ()

    def concurrency_limits(self, tenant_id: str, agent_id: str) -> tuple[int | None, int | None]:
        """(tenant-wide, per agent) requests in flight at once, None for no limit (while
        cost caps are enabled)."""
        if not self.cost_caps.enabled:
            return None, None
        tenant = self.tenants_by_id.get(tenant_id)
        return (
            tenant.max_concurrent_requests if tenant is not None else None,
            self.cost_caps.max_concurrent_for(agent_id),
        )


# --- Loading -------------------------------------------------------------------------------


class ConfigError(Exception):
    """An unusable caps file; ``errors`` holds one ``file:line: field.path: message`` each."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(self.errors))


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: ``no``/``on`` stay strings, no timestamps, octal or
    base-60 numbers, and floats are exact Decimals (``0.59`` is ``Decimal("0.59")``)."""


_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_SCALARS = {  # tag: (pattern, possible first characters)
    "tag:yaml.org,2002:bool": ("true|True|TRUE|false|False|FALSE", "tTfF"),
    "tag:yaml.org,2002:int": ("[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+", "-+0123456789"),
    "tag:yaml.org,2002:float": (
        r"[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*|[0-9][0-9_]*(?=[eE]))(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        "-+0123456789.",
    ),
}
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _SCALARS and tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, (_pattern, _first) in _SCALARS.items():
    _Loader.add_implicit_resolver(_tag, re.compile(f"^(?:{_pattern})$"), list(_first))


def _construct_decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Decimal:
    try:
        return Decimal(loader.construct_scalar(node).replace("_", ""))
    except InvalidOperation:  # .inf, .nan
        return Decimal(repr(loader.construct_yaml_float(node)))


_Loader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)

_ENV_REF = re.compile(r"\$(\$\{)|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")

_Path = tuple[str | int, ...]


def _dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or "<root>"


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class _Document:
    """Walks a composed YAML document once: records each path's line, rejects duplicate keys,
    and expands environment references in string values (each node once, aliases included)."""

    def __init__(self, loader: _Loader, env: Mapping[str, str], source: str) -> None:
        self.loader, self.env, self.source = loader, env, source
        self.lines: dict[_Path, int] = {}
        self.errors: list[str] = []
        self._seen: set[int] = set()

    def walk(self, node: yaml.Node, path: _Path) -> None:
        if id(node) in self._seen:  # an alias: its paths stay at the alias's line
            return
        self._seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _STR and "${" in node.value:
                node.value = self._expand(node.value, _line(node), path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[(*path, i)] = _line(item)
                self.walk(item, (*path, i))
        elif isinstance(node, yaml.MappingNode):
            self._check_duplicates(node, path)
            self.loader.flatten_mapping(node)  # resolve "<<" merges; later keys win
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    self.lines[(*path, key_node.value)] = _line(key_node)
                    self.walk(value_node, (*path, key_node.value))

    def _check_duplicates(self, node: yaml.MappingNode, path: _Path) -> None:
        first: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE:
                key, line = key_node.value, _line(key_node)
                if key in first:
                    where = f"{self.source}:{line}: {_dotted((*path, key))}"
                    self.errors.append(f"{where}: duplicate key (also on line {first[key]})")
                first.setdefault(key, line)

    def _expand(self, text: str, line: int, path: _Path) -> str:
        def substitute(ref: re.Match[str]) -> str:
            escaped, name, default = ref.groups()
            value = None if name is None else self.env.get(name)
            if escaped:
                return escaped
            if name is None:
                problem = "malformed ${...} reference (write $${ for a literal ${)"
            elif value is not None and (value or default is None):
                return value
            elif default is not None:
                return default
            else:
                problem = f"environment variable {name} is not set (use ${{{name}:-default}})"
            self.errors.append(f"{self.source}:{line}: {_dotted(path)}: {problem}")
            return ""

        return _ENV_REF.sub(substitute, text)


def _yaml_error(exc: yaml.YAMLError, source: str, text: str) -> str:
    # Never str(exc): PyYAML quotes the offending line, which may hold a secret.
    if isinstance(exc, yaml.MarkedYAMLError):
        mark, context = exc.problem_mark or exc.context_mark, exc.context
        if context and exc.context_mark and mark and exc.context_mark.line != mark.line:
            context += f" from line {exc.context_mark.line + 1}"
        message = "; ".join(part for part in (context, exc.problem) if part) or "invalid YAML"
        where = f" (column {mark.column + 1})" if mark else ""
        return f"{source}:{mark.line + 1 if mark else 1}: <yaml>: {message}{where}"
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        return f"{source}:{line}: <yaml>: unacceptable character #x{exc.character:04x}"
    return f"{source}:1: <yaml>: invalid YAML"


_UNION_TAGS = frozenset({_PLAIN_TAG, _BOUND_TAG})


def _validation_errors(exc: ValidationError, source: str, lines: dict[_Path, int]) -> list[str]:
    found: list[tuple[int, str]] = []
    for error in exc.errors(include_url=False, include_input=False):
        loc: _Path = tuple(part for part in error["loc"] if part not in _UNION_TAGS)
        if error["type"] == _ERROR_TYPE:
            loc += tuple(error.get("ctx", {}).get("at", ()))
        if loc and loc[-1] == "[key]":
            loc = loc[:-1]
        probe = loc
        while probe and probe not in lines:
            probe = probe[:-1]
        line = lines.get(probe, 1)
        found.append((line, f"{source}:{line}: {_dotted(loc)}: {_message(error)}"))
    return [text for _, text in sorted(found, key=lambda item: item[0])]


def _message(error: ErrorDetails) -> str:
    return error["msg"].removeprefix("Value error, ")


def parse_settings(
    text: str,
    *,
    source: str = "<string>",
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Settings:
    """Parse and validate caps-file text; ``env`` (default ``os.environ``) feeds ``${VAR}``;
    relative paths in it (``pricing.files``) are from ``base_dir`` (default: the current
    directory)."""
    loader: _Loader | None = None
    try:
        loader = _Loader(text)
        root = loader.get_single_node()
        if root is None or (isinstance(root, yaml.ScalarNode) and root.tag.endswith(":null")):
            raise ConfigError([f"{source}:1: <root>: the file is empty; 'upstreams' is required"])
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError([f"{source}:{_line(root)}: <root>: must be a mapping of sections"])
        doc = _Document(loader, os.environ if env is None else env, source)
        doc.lines[()] = _line(root)
        doc.walk(root, ())
        if doc.errors:
            raise ConfigError(doc.errors)
        data = loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error(exc, source, text)]) from None
    finally:
        if loader is not None:
            loader.dispose()
    try:
        return Settings.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(_validation_errors(exc, source, doc.lines)) from None


def load_settings(path: str | Path) -> Settings:
    """Read, parse and validate the caps file at ``path``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    return settings_from_bytes(raw, source=str(path), base_dir=path.parent)


def settings_from_bytes(raw: bytes, *, source: str, base_dir: Path | None = None) -> Settings:
    """Decode (UTF-8, optional BOM), parse and validate the bytes of a caps file."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{source}:{line}: <file>: not valid UTF-8"]) from None
    return parse_settings(text, source=source, base_dir=base_dir)
