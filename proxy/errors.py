"""The one error tree of capproxy.

Every error a client can see is a ``ProxyError``; one middleware renders it as the
OpenAI error body ``{"error": {"message", "type", "code", "param"}}`` with ``status``
and ``headers``. Third-party exceptions are translated at the boundary
(``raise StoreUnavailable(...) from exc``).

    ProxyError
    ├── BadRequest                 400 invalid_request_error
    │   ├── InvalidJSON            400 code=invalid_json
    │   ├── MissingModel           400 code=missing_model
    │   ├── ModelNotPriced         400 code=model_not_priced
    │   ├── UnsizedInput           400 code=unsized_input
    │   └── UnsupportedParameter   400 code=unsupported_parameter
    ├── Unauthorized               401 code=invalid_api_key
    ├── Forbidden                  403 code=forbidden
    ├── NotFound                   404 code=unknown_url
    ├── MethodNotAllowed           405 code=method_not_allowed
    ├── PayloadTooLarge            413 code=request_too_large
    ├── UnsupportedMediaType       415 code=unsupported_content_encoding
    ├── CapExceeded                429 (Retry-After)
    │   ├── BudgetExceeded         code=budget_exceeded
    │   ├── TokenCapExceeded       code=token_cap_exceeded
    │   ├── RateLimitExceeded      code=rate_limit_exceeded
    │   ├── ConcurrencyLimitExceeded code=concurrency_limit_exceeded
    │   ├── TooManyAgents          code=too_many_agents
    │   └── TooManyUsers           code=too_many_users
    ├── StoreUnavailable           503 code=store_unavailable (Retry-After)
    │   └── StoreDataLost          503 code=store_data_lost
    ├── UpstreamError              502 code=upstream_unreachable
    │   ├── UpstreamTooLarge       502 code=upstream_response_too_large
    │   └── UpstreamTimeout        504 code=upstream_timeout
    ├── ServiceUnavailable         503 code=shutting_down / not_ready
    └── InternalError              500 code=internal_error (never carries details)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class ProxyError(Exception):
    """Base of every error rendered to a client."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "api_error"
    code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
            }
        }


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class MissingModel(BadRequest):
    code = "missing_model"


class ModelNotPriced(BadRequest):
    code = "model_not_priced"


class UnsizedInput(BadRequest):
    """The request brings input the proxy cannot size, so no hold can bound its cost."""

    code = "unsized_input"


class UnsupportedParameter(BadRequest):
    code = "unsupported_parameter"


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "unknown_url"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(ProxyError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_content_encoding"


class CapExceeded(ProxyError):
    """A cap rejected the request before anything reached the upstream."""

    status = 429
    type = "insufficient_quota"

    def __init__(self, message: str, *, retry_after_s: int, should_retry: bool) -> None:
        retry_after_s = max(1, int(retry_after_s))
        super().__init__(
            message,
            headers={
                "Retry-After": str(retry_after_s),
                "x-should-retry": "true" if should_retry else "false",
            },
        )
        self.retry_after_s = retry_after_s
        # The windows that refused it ("daily", "agent daily", "minute (requests)"), for
        # the dashboard (``proxy.budget.window_label``).
        self.windows: tuple[str, ...] = ()


class BudgetExceeded(CapExceeded):
    code = "budget_exceeded"


class TokenCapExceeded(CapExceeded):
    code = "token_cap_exceeded"


class RateLimitExceeded(CapExceeded):
    """A rate cap (requests or tokens per window) would be exceeded; the error's ``type``
    says which, as OpenAI's rate-limit errors do (``requests`` or ``tokens``)."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str, retry_after_s: int, should_retry: bool) -> None:
        super().__init__(message, retry_after_s=retry_after_s, should_retry=should_retry)
        self.kind = kind

    def body(self) -> dict[str, Any]:
        out = super().body()
        out["error"]["type"] = self.kind
        return out


class ConcurrencyLimitExceeded(CapExceeded):
    """Too many of the tenant's (or agent's) requests are in flight at once."""

    code = "concurrency_limit_exceeded"


class TooManyAgents(CapExceeded):
    """The tenant already named ``cost_caps.max_agents_per_tenant`` agents today."""

    code = "too_many_agents"


class TooManyUsers(CapExceeded):
    """The tenant already has ``cost_caps.max_users_per_tenant`` end users today."""

    code = "too_many_users"


# The codes of the proxy's own 429s, one per kind of cap.
CAP_CODES = frozenset(kind.code for kind in CapExceeded.__subclasses__())


class StoreUnavailable(ProxyError):
    """The spend store did not answer in time; nothing was forwarded."""

    status = 503
    type = "api_error"
    code = "store_unavailable"

    def __init__(self, message: str = "budget store unavailable", *, retry_after_s: int = 1):
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after_s))})


class StoreDataLost(StoreUnavailable):
    """The store lost the tenant's recorded spend (restarted empty, flushed): nothing is
    admitted for it until an operator restores the spend or accepts the loss."""

    code = "store_data_lost"


class UpstreamError(ProxyError):
    """The upstream failed. ``sent``: the request may have reached it (and been billed)."""

    status = 502
    type = "api_error"
    code = "upstream_unreachable"

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class UpstreamTooLarge(UpstreamError):
    code = "upstream_response_too_large"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class ServiceUnavailable(ProxyError):
    status = 503
    type = "api_error"
    code = "service_unavailable"


class InternalError(ProxyError):
    status = 500
    type = "api_error"
    code = "internal_error"
