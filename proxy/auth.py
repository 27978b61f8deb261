"""Who is calling: the tenant (from the client's key) and the agent (from a header).

    auth = Authenticator(settings)
    identity = auth.authenticate(request.headers)   # raises Unauthorized / BadRequest

Keys are held only as SHA-256 digests. In ``passthrough`` mode an unknown key gets a
stable tenant id derived by HMAC, so the raw key never reaches logs, metrics or Redis.
A key bound to an agent (``api_keys: [{key, agent}]``) is that agent whatever the agent
header says; an agent with ``bound_keys_only`` is reachable only through its bound keys.
A key is visible ASCII: any other byte in it is a 401, never an error of the proxy's own.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.config import DEFAULT_AGENT, Settings
from proxy.errors import BadRequest, Forbidden, Unauthorized

AGENT_ID = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")
# RFC 6750 token68 and what providers' keys use: visible ASCII, no spaces.
_KEY = re.compile(r"[\x21-\x7e]{1,4096}")
# Used when auth.tenant_hash_key is unset; set one so tenant ids can't be linked to keys
# by anyone who guesses a key.
_DEFAULT_HASH_KEY = b"capproxy-passthrough-tenant-v1"


@dataclass(slots=True)
class Identity:
    """An authenticated caller."""

    tenant_id: str
    agent_id: str
    # The key to send upstream in passthrough mode (the client's own); None in keys mode.
    client_key: str | None


# Only spaces and tabs surround a key; any other byte is part of it (and makes it malformed).
_BLANKS = " \t"


def bearer_key(headers: Mapping[str, str]) -> str | None:
    """The credential from ``Authorization: Bearer`` or ``x-api-key``."""
    value = headers.get("Authorization")
    if value is not None:
        scheme, _, token = value.strip(_BLANKS).partition(" ")
        if scheme.lower() == "bearer" and token.strip(_BLANKS):
            return token.strip(_BLANKS)
        return None
    key = headers.get("x-api-key")
    return key.strip(_BLANKS) or None if key is not None else None


class Authenticator:
    """Maps client keys to tenants for one config."""

    def __init__(self, settings: Settings) -> None:
        self._passthrough = settings.auth.mode == "passthrough"
        self._agent_header = settings.identity.agent_header
        secret = settings.auth.tenant_hash_key
        self._hash_key = (
            secret.get_secret_value().encode() if secret is not None else _DEFAULT_HASH_KEY
        )
        self._bound_only = frozenset(
            agent.agent_id for agent in settings.cost_caps.agents if agent.bound_keys_only
        )
        self._tenants: dict[bytes, tuple[bytes, str, str | None]] = {}
        for tenant in settings.tenants:
            for digest, agent in zip(tenant.key_digests(), tenant.key_agents(), strict=True):
                self._tenants[digest] = (digest, tenant.id, agent)

    def authenticate(self, headers: Mapping[str, str]) -> Identity:
        key = bearer_key(headers)
        if key is None:
            raise Unauthorized(
                "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key'."
            )
        if _KEY.fullmatch(key) is None:
            # Header bytes that are not visible ASCII (aiohttp hands them over undecoded
            # as surrogates) can be no key of ours nor of a provider's.
            raise Unauthorized("Malformed API key: use visible ASCII characters only.")
        digest = hashlib.sha256(key.encode()).digest()
        # Look the candidate up by the key's digest (which reveals nothing about stored
        # keys), then confirm it with a constant-time comparison.
        found = self._tenants.get(digest)
        if found is not None and not hmac.compare_digest(found[0], digest):
            found = None
        bound = found[2] if found is not None else None
        if self._passthrough:
            if found is None:
                mac = hmac.new(self._hash_key, key.encode(), hashlib.sha256).hexdigest()
                tenant_id = f"key-{mac[:24]}"
            else:
                tenant_id = found[1]
            return Identity(tenant_id, self.agent(headers, bound), client_key=key)
        if found is None:
            raise Unauthorized("Incorrect API key provided.")
        return Identity(found[1], self.agent(headers, bound), client_key=None)

    def agent(self, headers: Mapping[str, str], bound: str | None = None) -> str:
        """The agent of a request: the key's bound agent, else the agent header's."""
        if bound is not None:
            return bound
        value = headers.get(self._agent_header)
        if value is None or value == "":
            agent = DEFAULT_AGENT
        elif AGENT_ID.fullmatch(value) is None:
            raise BadRequest(
                f"Invalid {self._agent_header} header: use 1-128 characters of "
                "letters, digits and . _ : @ / -",
                param=self._agent_header,
            )
        else:
            agent = value
        if agent in self._bound_only:
            raise Forbidden(
                f"Agent '{agent}' is reachable only through keys bound to it.",
                param=self._agent_header,
            )
        return agent
