"""capproxy: token and USD budget caps in front of OpenAI-compatible APIs."""

__version__ = "0.1.0"
