"""RFC 3339 parsing and formatting; every stored time is a UTC epoch in seconds."""

import datetime
import time

UTC = datetime.timezone.utc


def now() -> float:
    return time.time()


def parse_rfc3339(text: str) -> float:
    """Parse an RFC 3339 time into epoch seconds; a time without an offset is UTC.

    Raises ValueError naming the text when it is not a date and time.
    """
    if not isinstance(text, str) or "T" not in text.upper():
        raise ValueError(f"{text!r} is not an RFC 3339 date and time")
    normalized = text.strip()
    if normalized[-1:] in ("Z", "z"):
        normalized = normalized[:-1] + "+00:00"
    try:
        parsed = datetime.datetime.fromisoformat(normalized)
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 date and time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def format_rfc3339(epoch: float | None) -> str | None:
    """Format epoch seconds as UTC with a `Z` suffix, keeping milliseconds only when set."""
    if epoch is None:
        return None
    moment = datetime.datetime.fromtimestamp(epoch, UTC)
    timespec = "seconds" if moment.microsecond == 0 else "milliseconds"
    return moment.replace(tzinfo=None).isoformat(timespec=timespec) + "Z"
