"""The metered OpenAI endpoints, by path below ``/v1``."""

from __future__ import annotations

from enum import StrEnum


class Endpoint(StrEnum):
    """A metered endpoint; the value is its path below ``/v1/``."""

    CHAT = "chat/completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"

    @property
    def streams(self) -> bool:
        """Whether the endpoint accepts ``"stream": true``."""
        return self is not Endpoint.EMBEDDINGS


_BY_PATH = {endpoint.value: endpoint for endpoint in Endpoint}


def endpoint_for(path: str) -> Endpoint | None:
    """Map a path below ``/v1/`` (``"chat/completions"``) to its endpoint, if metered."""
    return _BY_PATH.get(path)  # a dict, not Endpoint(path): that runs enum's Python code
