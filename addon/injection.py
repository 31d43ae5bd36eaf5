"""Swapping a virtual key for the service credential, and redacting it once sent."""

from collections.abc import Iterable

from mitmproxy import http

from addon import keyformat

KEY_ID_HEADER = "X-Virtual-Key-ID"
AGENT_HEADER = "X-Virtual-Key-Agent"
REDACTED = "[redacted by mitmkeys]"


def credential_value(credential_header: str, credential: str) -> str:
    if credential_header.lower() == "authorization":
        return f"Bearer {credential}"
    return credential


def inject(
    request: http.Request, key_header: str, key_id: str, credential_header: str, credential: str,
    agent: str | None = None,
) -> None:
    """Remove every key carrier and client copy of the injected headers, then add ours.

    A field is a carrier when it is the configured key header or its whole value is a
    virtual key secret. Client copies are matched in any letter case; a client-sent
    X-Virtual-Key-Agent is dropped even when the key has no agent label.
    """
    set_headers = {KEY_ID_HEADER: key_id, credential_header: credential_value(credential_header, credential)}
    if agent:
        set_headers[AGENT_HEADER] = agent
    strip_carriers(request, key_header, also_drop=[*set_headers, AGENT_HEADER])
    for name, value in set_headers.items():
        request.headers[name] = value


def strip_carriers(request: http.Request, key_header: str, also_drop: Iterable[str] = ()) -> None:
    """Drop every header that carries a key, and the named headers, in any letter case."""
    dropped = {name.lower().encode() for name in also_drop} | {key_header.lower().encode()}
    request.headers.fields = tuple(
        (name, value)
        for name, value in request.headers.fields
        if name.lower() not in dropped
        and keyformat.secret_in_value(value.decode("latin-1")) is None
    )


def headers_already_sent(request: http.Request) -> bool:
    """Whether a request streamed its body, so its headers left before the request hook.

    A request that was not streamed has its body, possibly empty, stored by the time the
    request hook runs; a streamed one has none.
    """
    return bool(request.stream) and request.raw_content is None


def redact(request: http.Request, credential_header: str) -> None:
    """Overwrite the injected credential in the flow; the request has already been sent."""
    if credential_header in request.headers:
        request.headers[credential_header] = REDACTED
