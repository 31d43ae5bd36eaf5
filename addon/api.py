"""The management API: routes, admin token check and JSON replies, free of any HTTP server."""

import hmac
import json
import logging
import re
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote

from addon import timeutil, validation
from addon.records import KeyRecord, ServiceRecord, UsageRecord
from addon.store import Conflict, NotFound, Store, StoreUnavailable
from addon.validation import BadInput

log = logging.getLogger(__name__)


class Reply(NamedTuple):
    status: int
    body: Any  # JSON-serializable, or None for an empty body
    headers: dict[str, str] = {}

    def encoded(self) -> bytes:
        return b"" if self.body is None else json.dumps(self.body).encode()


def error(status: int, message: str) -> Reply:
    return Reply(status, {"error": message})


UNAUTHORIZED = error(401, "unauthorized")


def service_json(service: ServiceRecord) -> dict[str, Any]:
    """Return a service as the API shows it, with everything but the credential."""
    return {
        "name": service.name,
        "base_url": service.base_url,
        "credential_header": service.credential_header,
        "created_at": timeutil.format_rfc3339(service.created_at),
        "updated_at": timeutil.format_rfc3339(service.updated_at),
    }


def key_json(key: KeyRecord) -> dict[str, Any]:
    return {
        "id": key.id,
        "target": key.target,
        "scope": key.scope,
        "expires_at": timeutil.format_rfc3339(key.expires_at),
        "rate_limit": key.rate_limit,
        "one_shot": key.one_shot,
        "used": key.used,
        "source": key.source,
        "created_at": timeutil.format_rfc3339(key.created_at),
        "revoked_at": timeutil.format_rfc3339(key.revoked_at),
        "agent": key.agent,
        "requests": key.requests,
        "tokens_used": key.tokens_used,
        "token_budget": key.token_budget,
        "tokens_remaining": None if key.token_budget is None else max(0, key.token_budget - key.tokens_used),
    }


def usage_event_json(event: UsageRecord) -> dict[str, Any]:
    return {
        "time": timeutil.format_rfc3339(event.created_at),
        "service": event.service,
        "method": event.method,
        "path": event.path,
        "status": event.status,
        "latency_ms": event.latency_ms,
        "request_bytes": event.request_bytes,
        "response_bytes": event.response_bytes,
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.total_tokens,
        "metered": event.metered,
        "refused": event.refused,
    }


def bearer_token_matches(authorization: str | None, expected: str) -> bool:
    if not expected or not authorization:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), expected.encode())


Query = dict[str, list[str]]


class ManagementApi:
    """Handler of management API requests. Every method runs on a worker thread."""

    def __init__(self, store: Store, admin_token: str) -> None:
        self.store = store
        self.admin_token = admin_token
        self._routes: list[tuple[re.Pattern[str], dict[str, Callable[..., Reply]]]] = [
            (re.compile(r"/v1/services"), {"GET": self.list_services, "POST": self.create_service}),
            (re.compile(r"/v1/services/([^/]+)"), {
                "GET": self.get_service, "PUT": self.update_service, "DELETE": self.delete_service,
            }),
            (re.compile(r"/v1/keys"), {"GET": self.list_keys, "POST": self.create_key}),
            (re.compile(r"/v1/keys/([^/]+)"), {"GET": self.get_key, "PUT": self.update_key, "DELETE": self.revoke_key}),
            (re.compile(r"/v1/keys/([^/]+)/usage"), {"GET": self.key_usage}),
            (re.compile(r"/v1/keys/([^/]+)/reset-budget"), {"POST": self.reset_budget}),
        ]

    def handle(self, method: str, path: str, authorization: str | None, body: bytes) -> Reply:
        """Check the admin token, route the request and turn every failure into a JSON reply."""
        if not bearer_token_matches(authorization, self.admin_token):
            return UNAUTHORIZED
        if len(body) > validation.MAX_BODY_BYTES:
            return error(413, "request body is larger than 1 MiB")
        route_path, _, query_text = path.partition("?")
        query = parse_qs(query_text, keep_blank_values=True)
        for pattern, methods in self._routes:
            match = pattern.fullmatch(route_path)
            if match is None:
                continue
            handler = methods.get(method.upper())
            if handler is None:
                reply = error(405, f"method {method} not allowed; use {', '.join(methods)}")
                return reply._replace(headers={"Allow": ", ".join(methods)})
            try:
                return handler(*(unquote(group) for group in match.groups()), body=body, query=query)
            except BadInput as problem:
                return error(400, str(problem))
            except NotFound as problem:
                return error(404, str(problem))
            except Conflict as problem:
                return error(409, str(problem))
            except StoreUnavailable as problem:
                log.error("key store unavailable during %s %s: %s", method, route_path, problem)
                return error(503, "key store unavailable")
        return error(404, "not found")

    # -- services --------------------------------------------------------------

    def list_services(self, body: bytes, query: Query) -> Reply:
        return Reply(200, [service_json(service) for service in self.store.list_services()])

    def create_service(self, body: bytes, query: Query) -> Reply:
        new = validation.parse_new_service(validation.parse_json_object(body))
        service = self.store.create_service(new.name, new.base_url, new.credential, new.credential_header)
        log.info("created service %s for %s", service.name, service.base_url)
        return Reply(201, service_json(service))

    def get_service(self, name: str, body: bytes, query: Query) -> Reply:
        return Reply(200, service_json(self.store.get_service(name)))

    def update_service(self, name: str, body: bytes, query: Query) -> Reply:
        changes = validation.parse_service_changes(validation.parse_json_object(body))
        service = self.store.update_service(name, changes)
        log.info("updated service %s: %s", name, ", ".join(sorted(changes)) or "no changes")
        return Reply(200, service_json(service))

    def delete_service(self, name: str, body: bytes, query: Query) -> Reply:
        self.store.delete_service(name)
        log.info("deleted service %s", name)
        return Reply(204, None)

    # -- keys --------------------------------------------------------------------

    def list_keys(self, body: bytes, query: Query) -> Reply:
        return Reply(200, [key_json(key) for key in self.store.list_keys()])

    def create_key(self, body: bytes, query: Query) -> Reply:
        new = validation.parse_new_key(validation.parse_json_object(body), timeutil.now())
        key, secret = self.store.create_key(
            key_id=new.id, target=new.target, scope=new.scope, expires_at=new.expires_at,
            rate_limit=new.rate_limit, one_shot=new.one_shot, source="api",
            token_budget=new.token_budget,
        )
        log.info("created key %s for service %s (scope %s, one-shot %s)", key.id, key.target, key.scope, key.one_shot)
        return Reply(201, {**key_json(key), "key": secret})

    def get_key(self, key_id: str, body: bytes, query: Query) -> Reply:
        return Reply(200, key_json(self.store.get_key(key_id)))

    def revoke_key(self, key_id: str, body: bytes, query: Query) -> Reply:
        self.store.revoke_key(key_id)
        log.info("revoked key %s", key_id)
        return Reply(204, None)

    def update_key(self, key_id: str, body: bytes, query: Query) -> Reply:
        changes = validation.parse_key_changes(validation.parse_json_object(body), timeutil.now())
        key = self.store.update_key(key_id, changes)
        log.info("updated key %s: %s", key_id, ", ".join(sorted(changes)) or "no changes")
        return Reply(200, key_json(key))

    def reset_budget(self, key_id: str, body: bytes, query: Query) -> Reply:
        key = self.store.reset_budget(key_id)
        log.info("reset the token budget of key %s", key_id)
        return Reply(200, key_json(key))

    def key_usage(self, key_id: str, body: bytes, query: Query) -> Reply:
        bounds = validation.parse_usage_query(query)
        page = self.store.usage_page(key_id, bounds.start, bounds.end, bounds.page, bounds.per_page)
        return Reply(200, {
            "events": [usage_event_json(event) for event in page.events],
            "total": page.total,
            "page": bounds.page,
            "per_page": bounds.per_page,
            "tokens": {"prompt": page.prompt_tokens, "completion": page.completion_tokens, "total": page.total_tokens},
        })
