"""Authentication: client keys to tenants (keys and passthrough modes), and the agent header."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.auth import Authenticator, Identity, bearer_key
from proxy.budget import DEFAULT_AGENT
from proxy.config import Settings
from proxy.errors import BadRequest, Forbidden, Unauthorized
from tests.conftest import MakeClient
from tests.fake_upstream import FakeUpstream
from tests.harness import OTHER_KEY, TENANT_KEY, chat, settings_for

HASHED_KEY = "sk-hashed-only-key"


def settings(**over: Any) -> Settings:
    return settings_for("http://upstream.invalid/v1", **over)


def keys_settings(**over: Any) -> Settings:
    tenants = [
        {"id": "acme", "api_keys": [TENANT_KEY]},
        {"id": "globex", "api_keys": [OTHER_KEY]},
        {"id": "hashed", "api_keys": ["sha256:" + hashlib.sha256(HASHED_KEY.encode()).hexdigest()]},
    ]
    return settings(tenants=tenants, **over)


def passthrough(hash_key: str | None = "tenant-hash-key-1") -> Authenticator:
    return Authenticator(settings(auth={"mode": "passthrough", "tenant_hash_key": hash_key}))


def headers(**items: str) -> CIMultiDict[str]:
    """Request headers (case-insensitive, as aiohttp gives them); ``_`` stands for ``-``."""
    return CIMultiDict((name.replace("_", "-"), value) for name, value in items.items())


def unauthorized(auth: Authenticator, hdrs: CIMultiDict[str]) -> Unauthorized:
    with pytest.raises(Unauthorized) as info:
        auth.authenticate(hdrs)
    assert info.value.status == 401
    assert info.value.code == "invalid_api_key"
    return info.value


# --- bearer_key ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hdrs", "key"),
    [
        ({"Authorization": "Bearer sk-1"}, "sk-1"),
        ({"Authorization": "bearer sk-1"}, "sk-1"),
        ({"Authorization": "BEARER   sk-1  "}, "sk-1"),
        ({"Authorization": "  Bearer sk-1"}, "sk-1"),
        ({"x-api-key": "sk-2"}, "sk-2"),
        ({"X-API-KEY": " sk-2 "}, "sk-2"),
        ({"Authorization": "Bearer sk-1", "x-api-key": "sk-2"}, "sk-1"),
        ({"Authorization": "Basic c2stMQ=="}, None),
        ({"Authorization": "sk-1"}, None),
        ({"Authorization": "Bearer"}, None),
        ({"Authorization": "Bearer    "}, None),
        ({"Authorization": ""}, None),
        ({"x-api-key": ""}, None),
        ({"x-api-key": "   "}, None),
        ({}, None),
    ],
)
def test_bearer_key(hdrs: dict[str, str], key: str | None) -> None:
    assert bearer_key(CIMultiDict(hdrs)) == key


def test_a_non_bearer_authorization_is_not_overridden_by_x_api_key() -> None:
    assert bearer_key(CIMultiDict({"Authorization": "Basic abc", "x-api-key": "sk-2"})) is None


# --- keys mode -----------------------------------------------------------------------------


def test_bearer_key_maps_to_its_tenant() -> None:
    auth = Authenticator(keys_settings())
    assert auth.authenticate(headers(Authorization=f"Bearer {TENANT_KEY}")) == Identity(
        "acme", DEFAULT_AGENT, client_key=None
    )
    assert auth.authenticate(headers(authorization=f"bearer {OTHER_KEY}")).tenant_id == "globex"


def test_x_api_key_maps_to_its_tenant() -> None:
    auth = Authenticator(keys_settings())
    identity = auth.authenticate(headers(x_api_key=OTHER_KEY))
    assert identity == Identity("globex", DEFAULT_AGENT, client_key=None)


def test_sha256_configured_key_matches_the_raw_key() -> None:
    auth = Authenticator(keys_settings())
    assert auth.authenticate(headers(Authorization=f"Bearer {HASHED_KEY}")).tenant_id == "hashed"
    # The configured digest is not itself a key.
    digest = "sha256:" + hashlib.sha256(HASHED_KEY.encode()).hexdigest()
    unauthorized(auth, headers(Authorization=f"Bearer {digest}"))


def test_sha256_digest_may_be_upper_case() -> None:
    digest = hashlib.sha256(b"sk-upper").hexdigest().upper()
    auth = Authenticator(settings(tenants=[{"id": "up", "api_keys": [f"sha256:{digest}"]}]))
    assert auth.authenticate(headers(x_api_key="sk-upper")).tenant_id == "up"


@pytest.mark.parametrize(
    "hdrs",
    [
        {},
        {"Authorization": "Basic c2stYWNtZS10ZXN0LWtleQ=="},
        {"Authorization": f"Token {TENANT_KEY}"},
        {"Authorization": "Bearer "},
        {"x-api-key": ""},
    ],
)
def test_missing_or_malformed_credentials_are_unauthorized(hdrs: dict[str, str]) -> None:
    exc = unauthorized(Authenticator(keys_settings()), CIMultiDict(hdrs))
    assert exc.message.startswith("Missing API key")
    assert TENANT_KEY not in exc.message


def test_a_wrong_scheme_is_unauthorized_even_with_a_valid_x_api_key() -> None:
    auth = Authenticator(keys_settings())
    unauthorized(auth, headers(Authorization="Basic abc", x_api_key=TENANT_KEY))


@pytest.mark.parametrize("via", ["Authorization", "x-api-key"])
def test_unknown_key_is_unauthorized_without_echoing_it(via: str) -> None:
    key = "sk-not-a-configured-key-1234567890"
    value = f"Bearer {key}" if via == "Authorization" else key
    exc = unauthorized(Authenticator(keys_settings()), CIMultiDict({via: value}))
    assert exc.message == "Incorrect API key provided."
    assert key not in str(exc.body())
    assert "1234" not in str(exc.body())
    assert exc.headers == {}


def test_keys_are_case_sensitive() -> None:
    unauthorized(
        Authenticator(keys_settings()), headers(Authorization=f"Bearer {TENANT_KEY.upper()}")
    )


def test_keys_mode_never_returns_the_client_key() -> None:
    identity = Authenticator(keys_settings()).authenticate(headers(x_api_key=TENANT_KEY))
    assert identity.client_key is None


# --- passthrough mode ----------------------------------------------------------------------

KEY_ID = re.compile(r"key-[0-9a-f]{24}")


def test_passthrough_unknown_key_gets_a_derived_tenant_id() -> None:
    key = "sk-proj-client-own-key-abcdef"
    identity = passthrough().authenticate(headers(Authorization=f"Bearer {key}"))
    assert KEY_ID.fullmatch(identity.tenant_id)
    assert key not in identity.tenant_id
    assert "abcdef" not in identity.tenant_id
    assert identity.client_key == key
    assert identity.agent_id == DEFAULT_AGENT
    mac = hmac.new(b"tenant-hash-key-1", key.encode(), hashlib.sha256).hexdigest()
    assert identity.tenant_id == f"key-{mac[:24]}"


def test_passthrough_tenant_id_is_stable() -> None:
    hdrs = headers(Authorization="Bearer sk-stable")
    first = passthrough().authenticate(hdrs).tenant_id
    assert passthrough().authenticate(hdrs).tenant_id == first
    assert passthrough().authenticate(headers(x_api_key="sk-stable")).tenant_id == first
    assert passthrough().authenticate(headers(x_api_key="sk-stable2")).tenant_id != first


def test_passthrough_tenant_id_depends_on_the_hash_key() -> None:
    hdrs = headers(Authorization="Bearer sk-stable")
    ids = {
        passthrough("tenant-hash-key-1").authenticate(hdrs).tenant_id,
        passthrough("tenant-hash-key-2").authenticate(hdrs).tenant_id,
        passthrough(None).authenticate(hdrs).tenant_id,
    }
    assert len(ids) == 3
    assert all(KEY_ID.fullmatch(tenant_id) for tenant_id in ids)
    # Unset, the built-in key still gives a stable id.
    assert passthrough(None).authenticate(hdrs).tenant_id in ids


def test_passthrough_configured_key_maps_to_its_tenant_and_is_forwarded() -> None:
    auth = passthrough()
    identity = auth.authenticate(headers(Authorization=f"Bearer {TENANT_KEY}"))
    assert identity == Identity("acme", DEFAULT_AGENT, client_key=TENANT_KEY)


def test_passthrough_still_requires_a_key() -> None:
    unauthorized(passthrough(), headers())
    unauthorized(passthrough(), headers(Authorization="Basic abc"))


# --- agent header --------------------------------------------------------------------------


@pytest.mark.parametrize("hdrs", [{}, {"X-Agent-Id": ""}])
def test_absent_or_empty_agent_header_is_the_default_agent(hdrs: dict[str, str]) -> None:
    auth = Authenticator(keys_settings())
    identity = auth.authenticate(CIMultiDict({"Authorization": f"Bearer {TENANT_KEY}", **hdrs}))
    assert identity.agent_id == DEFAULT_AGENT == "_default"


@pytest.mark.parametrize(
    "agent", ["a", "planner", "team/app.worker_1:v2@eu-west", "A" * 128, "0-9._:@/"]
)
def test_valid_agent_ids(agent: str) -> None:
    auth = Authenticator(keys_settings())
    identity = auth.authenticate(headers(x_api_key=TENANT_KEY, x_agent_id=agent))
    assert identity.agent_id == agent


@pytest.mark.parametrize(
    "agent", ["A" * 129, "has space", " lead", "tab\t", "semi;colon", "ünicode", "a,b", "*"]
)
def test_invalid_agent_id_is_a_bad_request_naming_the_header(agent: str) -> None:
    auth = Authenticator(keys_settings())
    with pytest.raises(BadRequest) as info:
        auth.authenticate(headers(x_api_key=TENANT_KEY, X_Agent_Id=agent))
    assert info.value.status == 400
    assert info.value.param == "X-Agent-Id"
    assert "X-Agent-Id" in info.value.message


def test_agent_header_name_is_configurable() -> None:
    auth = Authenticator(keys_settings(identity={"agent_header": "X-Team"}))
    hdrs = headers(x_api_key=TENANT_KEY, x_team="research", x_agent_id="ignored")
    assert auth.authenticate(hdrs).agent_id == "research"
    with pytest.raises(BadRequest) as info:
        auth.agent(headers(x_team="no good"))
    assert info.value.param == "X-Team"


def test_agent_is_read_in_passthrough_mode_too() -> None:
    identity = passthrough().authenticate(headers(x_api_key="sk-any", x_agent_id="bot"))
    assert identity.agent_id == "bot"


def test_agent_header_is_checked_only_after_the_key() -> None:
    # An unauthenticated caller learns nothing about the agent header.
    unauthorized(Authenticator(keys_settings()), headers(x_agent_id="no good"))


# --- malformed keys ------------------------------------------------------------------------

MALFORMED_KEYS = [
    pytest.param("\xff", id="latin-1-byte"),
    # aiohttp hands header bytes that are not UTF-8 over as lone surrogates.
    pytest.param("\udcff\udcfe", id="undecodable-bytes"),
    pytest.param(f"{TENANT_KEY}\udcff", id="valid-key-then-undecodable-byte"),
    pytest.param("sk-clé", id="non-ascii-letter"),
    pytest.param("sk-a b", id="inner-space"),
    pytest.param("sk-a\tb", id="inner-tab"),
    pytest.param("sk-\x00key", id="nul"),
    pytest.param("sk-\x01key", id="control-char"),
    pytest.param("sk-\x7fkey", id="del"),
    pytest.param("a" * 4097, id="longer-than-4096"),
]


@pytest.mark.parametrize("mode", ["keys", "passthrough"])
@pytest.mark.parametrize("via", ["Authorization", "x-api-key"])
@pytest.mark.parametrize("key", MALFORMED_KEYS)
def test_a_key_outside_visible_ascii_is_unauthorized_never_an_error(
    key: str, via: str, mode: str
) -> None:
    auth = Authenticator(keys_settings(auth={"mode": mode}))
    value = f"Bearer {key}" if via == "Authorization" else key
    exc = unauthorized(auth, CIMultiDict({via: value}))
    assert exc.message == "Malformed API key: use visible ASCII characters only."
    assert key not in str(exc.body())
    assert exc.headers == {}


@pytest.mark.parametrize("mode", ["keys", "passthrough"])
def test_a_key_of_exactly_4096_visible_characters_is_not_malformed(mode: str) -> None:
    key = "k" * 4095 + "~"
    auth = Authenticator(keys_settings(auth={"mode": mode}))
    if mode == "keys":
        assert unauthorized(auth, headers(x_api_key=key)).message == "Incorrect API key provided."
    else:
        assert auth.authenticate(headers(x_api_key=key)).client_key == key


def test_every_visible_ascii_character_may_be_part_of_a_key() -> None:
    key = "".join(map(chr, range(0x21, 0x7F)))
    identity = passthrough().authenticate(headers(Authorization=f"Bearer {key}"))
    assert identity.client_key == key


# --- keys bound to agents ------------------------------------------------------------------

BOUND_KEY = "sk-acme-premium-bound"
VIP_KEY = "sk-acme-vip-bound"
VIP_DIGEST = "sha256:" + hashlib.sha256(VIP_KEY.encode()).hexdigest()


def bound_settings(**over: Any) -> Settings:
    """acme: a plain key, a key bound to premium-agent, and a sha256 key bound to ``vip``
    (only its bound keys may act as ``vip``); globex: a plain key."""
    tenants = [
        {
            "id": "acme",
            "api_keys": [
                TENANT_KEY,
                {"key": BOUND_KEY, "agent": "premium-agent"},
                {"key": VIP_DIGEST, "agent": "vip"},
            ],
        },
        {"id": "globex", "api_keys": [OTHER_KEY]},
    ]
    agents = [{"agent_id": "premium-agent"}, {"agent_id": "vip", "bound_keys_only": True}]
    return settings(tenants=tenants, cost_caps={"agents": agents}, **over)


def forbidden(auth: Authenticator, hdrs: CIMultiDict[str]) -> Forbidden:
    with pytest.raises(Forbidden) as info:
        auth.authenticate(hdrs)
    assert info.value.status == 403
    assert info.value.code == "forbidden"
    return info.value


@pytest.mark.parametrize(
    "agent_header",
    [
        pytest.param(None, id="no-header"),
        pytest.param("", id="empty-header"),
        pytest.param("premium-agent", id="its-own-agent"),
        pytest.param("planner", id="another-agent"),
        pytest.param("vip", id="a-bound-only-agent"),
        pytest.param("not an agent id", id="an-invalid-agent-id"),
    ],
)
def test_a_bound_key_is_its_agent_whatever_the_agent_header_says(
    agent_header: str | None,
) -> None:
    auth = Authenticator(bound_settings())
    hdrs = headers(Authorization=f"Bearer {BOUND_KEY}")
    if agent_header is not None:
        hdrs["X-Agent-Id"] = agent_header
    assert auth.authenticate(hdrs) == Identity("acme", "premium-agent", client_key=None)


def test_a_bound_key_given_as_sha256_acts_as_its_bound_only_agent() -> None:
    auth = Authenticator(bound_settings())
    for hdrs in (
        headers(x_api_key=VIP_KEY),
        headers(Authorization=f"Bearer {VIP_KEY}", x_agent_id="premium-agent"),
    ):
        assert auth.authenticate(hdrs) == Identity("acme", "vip", client_key=None)
    # The configured digest is not itself a key.
    unauthorized(auth, headers(x_api_key=VIP_DIGEST, x_agent_id="vip"))


@pytest.mark.parametrize("key", [TENANT_KEY, OTHER_KEY])
def test_an_unbound_key_naming_a_bound_only_agent_is_forbidden(key: str) -> None:
    exc = forbidden(Authenticator(bound_settings()), headers(x_api_key=key, x_agent_id="vip"))
    assert exc.param == "X-Agent-Id"
    assert exc.message == "Agent 'vip' is reachable only through keys bound to it."
    assert key not in str(exc.body())


def test_an_unbound_key_still_names_ordinary_agents() -> None:
    auth = Authenticator(bound_settings())
    assert auth.authenticate(headers(x_api_key=TENANT_KEY)).agent_id == DEFAULT_AGENT
    assert auth.authenticate(headers(x_api_key=TENANT_KEY, x_agent_id="planner")) == Identity(
        "acme", "planner", client_key=None
    )
    # A listed agent that is not bound-only is open to every key, bound keys exist or not.
    identity = auth.authenticate(headers(x_api_key=OTHER_KEY, x_agent_id="premium-agent"))
    assert identity == Identity("globex", "premium-agent", client_key=None)


def test_the_key_is_checked_before_a_bound_only_agent_is_refused() -> None:
    # An unauthenticated caller learns nothing about which agents are bound-only.
    auth = Authenticator(bound_settings())
    exc = unauthorized(auth, headers(x_api_key="sk-unknown", x_agent_id="vip"))
    assert exc.message == "Incorrect API key provided."
    malformed = unauthorized(auth, headers(x_api_key="sk-\udcff", x_agent_id="vip"))
    assert malformed.message.startswith("Malformed API key")


def test_bound_keys_work_in_passthrough_mode_and_unknown_keys_stay_unbound() -> None:
    auth = Authenticator(bound_settings(auth={"mode": "passthrough"}))
    identity = auth.authenticate(headers(x_api_key=BOUND_KEY, x_agent_id="planner"))
    assert identity == Identity("acme", "premium-agent", client_key=BOUND_KEY)
    assert auth.authenticate(headers(x_api_key=VIP_KEY)).agent_id == "vip"
    stranger = headers(x_api_key="sk-stranger-own-key", x_agent_id="vip")
    forbidden(auth, stranger)
    del stranger["X-Agent-Id"]
    assert auth.authenticate(stranger).agent_id == DEFAULT_AGENT


def test_the_agent_header_alone_cannot_reach_a_bound_only_agent() -> None:
    auth = Authenticator(bound_settings())
    with pytest.raises(Forbidden) as info:
        auth.agent(headers(x_agent_id="vip"))
    assert info.value.param == "X-Agent-Id"
    assert auth.agent(headers(x_agent_id="vip"), bound="vip") == "vip"
    assert auth.agent(headers(x_agent_id="planner"), bound="premium-agent") == "premium-agent"


# --- over the wire -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw_key",
    # (aiohttp itself answers 400 to control characters in a header, before the app.)
    [b"\xff\xfe", TENANT_KEY.encode() + b"\xc3", b"sk-cl\xc3\xa9", b"a" * 4097],
)
async def test_a_malformed_key_on_the_wire_is_a_401_not_a_500(
    upstream: FakeUpstream, make_client: MakeClient, raw_key: bytes
) -> None:
    client = await make_client(settings_for(upstream.url))
    body = json.dumps(chat()).encode()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nAuthorization: Bearer " + raw_key + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 401 Unauthorized"
    assert json.loads(payload)["error"]["code"] == "invalid_api_key"
    assert raw_key not in response
    assert upstream.count == 0
