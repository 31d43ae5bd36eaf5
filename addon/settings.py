"""mitmkeys options, parsed and checked at startup, and the key store they open."""

import logging
import os
from typing import NamedTuple

from mitmproxy import ctx, exceptions

from addon import keyformat, validation
from addon.store import Store, StoreUnavailable, sqlite_path

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "KEYS_ADMIN_TOKEN"
MCP_TOKEN_ENV = "KEYS_MCP_TOKEN"
# flow.metadata entry that marks a flow as a management API call, set before other hooks run.
API_FLOW = "mitmkeys_api"


class Config(NamedTuple):
    database: str
    admin_token: str
    key_header: str
    api_host: str
    api_port: int
    strict: bool
    mcp_token: str = ""
    mcp_max_ttl: int = 3600


def _header_name(value: str, option: str) -> str:
    token_chars = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    if not value or not set(value) <= token_chars:
        raise exceptions.OptionsError(f"Cannot parse {option}={value!r}: not a valid HTTP header name")
    return value


class Settings:
    """Registers the keys_* options and owns the store they point at."""

    def __init__(self) -> None:
        self.config: Config | None = None
        self.store: Store | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "keys_db", str, "keys.db",
            "Key store: a SQLite file path or a sqlite:/// URL. Created and migrated on start.",
        )
        loader.add_option(
            "keys_admin_token", str, "",
            f"Bearer token for the management API. Default: the {ADMIN_TOKEN_ENV} environment "
            "variable. Without a token every API call is rejected with 401.",
        )
        loader.add_option(
            "keys_header", str, "X-Virtual-Key",
            "Request header that carries a virtual key. Any other header whose whole value is "
            "a vk_ secret or 'Bearer vk_...' is read as a key too.",
        )
        loader.add_option(
            "keys_api_host", str, "keys.mitm",
            "Host name at which the management API is served through the proxy.",
        )
        loader.add_option(
            "keys_api_port", int, 8081,
            "Loopback port of the management API listener. 0 picks a random loopback port, for "
            "deployments that reach the API only through the proxy at keys_api_host.",
        )
        loader.add_option(
            "keys_strict", bool, False,
            "Reject every proxied request without a virtual key (401 missing key), which makes "
            "the proxy an egress allow-list. The management API host is always served.",
        )
        loader.add_option(
            "keys_mcp_token", str, "",
            f"Bearer token that reaches only the MCP endpoint (/mcp) of the management API, for "
            f"agents that request their own keys. Default: the {MCP_TOKEN_ENV} environment "
            "variable. The admin token works at /mcp too.",
        )
        loader.add_option(
            "keys_mcp_max_ttl", int, 3600,
            "Maximum lifetime in seconds of a key requested over MCP; longer requests are "
            "lowered to it.",
        )

    def configure(self, updated: set[str]) -> None:
        if "stream_large_bodies" in updated and ctx.options.stream_large_bodies:
            raise exceptions.OptionsError(
                "mitmkeys cannot run with stream_large_bodies set: a request whose body streams "
                "to the upstream before the key is checked could not be refused. Unset it; "
                "mitmkeys streams text/event-stream responses by itself."
            )
        if not updated & {
            "keys_db", "keys_admin_token", "keys_header", "keys_api_host", "keys_api_port", "keys_strict",
            "keys_mcp_token", "keys_mcp_max_ttl",
        }:
            return

        options = ctx.options
        try:
            sqlite_path(options.keys_db)
        except ValueError as error:
            raise exceptions.OptionsError(f"Cannot parse keys_db={options.keys_db!r}: {error}") from None
        if not 0 <= options.keys_api_port <= 65535:
            raise exceptions.OptionsError(
                f"Cannot parse keys_api_port={options.keys_api_port}: not a port number (0-65535)"
            )
        api_host = options.keys_api_host.strip().lower()
        if not api_host or not keyformat.NAME_RE.fullmatch(api_host):
            raise exceptions.OptionsError(f"Cannot parse keys_api_host={options.keys_api_host!r}: not a host name")
        if not 0 < options.keys_mcp_max_ttl <= validation.MAX_TTL_SECONDS:
            raise exceptions.OptionsError(
                f"Cannot parse keys_mcp_max_ttl={options.keys_mcp_max_ttl}: not a positive number of "
                f"seconds up to {validation.MAX_TTL_SECONDS}"
            )
        config = Config(
            database=options.keys_db,
            admin_token=options.keys_admin_token or os.environ.get(ADMIN_TOKEN_ENV, ""),
            key_header=_header_name(options.keys_header, "keys_header"),
            api_host=api_host,
            api_port=options.keys_api_port,
            strict=options.keys_strict,
            mcp_token=options.keys_mcp_token or os.environ.get(MCP_TOKEN_ENV, ""),
            mcp_max_ttl=options.keys_mcp_max_ttl,
        )

        if config.strict:
            self._close_raw_paths()

        if self.store is None or self.config is None or self.config.database != config.database:
            self._open_store(config.database)
        if not config.admin_token:
            log.warning(
                "keys_admin_token and %s are unset: the management API rejects every call%s",
                ADMIN_TOKEN_ENV, " except MCP calls with keys_mcp_token" if config.mcp_token else "",
            )
        self.config = config

    @staticmethod
    def _close_raw_paths() -> None:
        """Make mitmproxy parse every connection as HTTP, so strict mode checks every request.

        With rawtcp on, mitmproxy relays a connection whose first bytes do not look like HTTP
        as raw TCP, and no key is checked there; an upstream may still read it as HTTP.
        """
        options = ctx.options
        if options.rawtcp:
            log.info("keys_strict: turning rawtcp off, so every connection is checked as HTTP")
            options.rawtcp = False
        for option in ("ignore_hosts", "allow_hosts", "tcp_hosts", "udp_hosts"):
            if getattr(options, option, None):
                log.warning("keys_strict: connections matched by %s bypass the virtual key checks", option)

    def _open_store(self, database: str) -> None:
        store = Store(database)
        try:
            store.open()
        except StoreUnavailable as error:
            raise exceptions.OptionsError(f"Cannot open keys_db={database!r}: {error}") from None
        if self.store is not None:
            self.store.close()
        self.store = store
        log.info("mitmkeys key store: %s", os.path.abspath(store.path))

    def done(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
