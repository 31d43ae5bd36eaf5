"""mitmkeys: virtual API keys enforced by a mitmproxy addon."""

__version__ = "0.1.0"
