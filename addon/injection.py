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
    if not (request.is_http2 or request.is_http3):
        # Origin form: an absolute-form target would name the host a second time, and
        # upstreams prefer it to Host.
        request.authority = ""


def _header_key(name: bytes) -> bytes:
    # CGI and WSGI servers read X_Virtual_Key_ID and X-Virtual-Key-ID as one variable.
    return name.lower().replace(b"_", b"-")


def strip_carriers(request: http.Request, key_header: str, also_drop: Iterable[str] = ()) -> None:
    """Drop every header and trailer that carries a key, and the named ones, in any letter case."""
    dropped = {_header_key(name.encode()) for name in also_drop} | {_header_key(key_header.encode())}
    for fields_of in (request.headers, request.trailers):
        if fields_of is None:
            continue
        fields_of.fields = tuple(
            (name, value)
            for name, value in fields_of.fields
            if _header_key(name) not in dropped
            and keyformat.secret_in_value(value.decode("latin-1")) is None
        )


def headers_already_sent(request: http.Request) -> bool:
    """Whether a request streamed its body, so its headers left before the request hook.

    A request that was not streamed has its body, possibly empty, stored by the time the
    request hook runs; a streamed one has none.
    """
    return bool(request.stream) and request.raw_content is None


def redact_echo_in_headers(headers: http.Headers, credential: str) -> None:
    """Replace the credential wherever a response header repeats it."""
    secret = credential.encode("latin-1")
    if any(secret in value for _, value in headers.fields):
        headers.fields = tuple(
            (name, value.replace(secret, REDACTED.encode())) for name, value in headers.fields
        )


def redact_echo_in_body(response: http.Response, credential: str) -> bool:
    """Replace the credential in a buffered response body; return whether it was there.

    An upstream that reflects requests (TRACE, echo endpoints, debug pages) would otherwise
    hand the credential to the key holder. Streamed bodies are not searched.
    """
    try:
        body = response.get_content(strict=True)
    except ValueError:
        return False
    secret = credential.encode("latin-1")
    if not body or secret not in body:
        return False
    response.content = body.replace(secret, REDACTED.encode())
    return True


def redact(request: http.Request, header: str) -> None:
    """Overwrite a secret header (credential, admin token) in a flow whose request was sent."""
    if header in request.headers:
        request.headers[header] = REDACTED
