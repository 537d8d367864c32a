"""Connection-level guards of the router's ASGI app: origins, per-address caps, body deadlines, idle websockets;
the bind-address check and readiness.

Serve's HTTP proxy (uvicorn) accepts every TCP connection and forwards each request and each websocket to the
router replica as one long request holding one of its `max_ongoing_requests` slots; the proxy's uvicorn exposes no
concurrency cap, body deadline or origin check (ray.serve.config.HTTPOptions has none), and
`http_options.request_timeout_s` would also cut live websockets. So the guards run in the router replica, as ASGI
middleware in front of the FastAPI routes (`ConnectionGuards`), configured by RouterArgs:

- a request whose Host is not one of the service's names is refused with 403: on a loopback bind only loopback
  names (`allowed_hosts` widens it), so a foreign page whose DNS name is made to resolve to 127.0.0.1 (DNS
  rebinding: its Origin then matches its Host) never reaches the router;
- a request or websocket handshake carrying an `Origin` that is neither the page's own (its Host) nor in
  `allowed_origins` is refused with 403 (a websocket: closed before accept, which the proxy answers with 403);
- open websockets plus HTTP requests in flight are capped per client address (`max_connections_per_client`:
  HTTP 429, websocket close 1008) and in all (`max_ongoing_requests - reserved_for_health`: HTTP 503, close 1013),
  so the slots Serve gives /healthz and /readyz are never taken by held connections or edits;
- a request body must arrive within `body_timeout_s` of the request reaching the router (HTTP 408, the connection
  closed);
- a websocket with no message either way for `idle_timeout_s` is closed with 1001 and a reason.

Ray-light: Serve is imported only where a replica asks it something (bind host, deployment status).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from rtedit.errors import ConfigError

logger = logging.getLogger("ray.serve")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

HEALTH_PATHS = frozenset({"/healthz", "/readyz"})  # never capped, never behind held connections
IDLE_CLOSE = 1001  # "going away": the server ends a session nobody uses; Serve counts 1000/1001 as success
POLICY_CLOSE = 1008  # policy violation: a foreign origin (before accept: 403), an address over its cap
BUSY_CLOSE = 1013  # try again later: the router has no slot left but the ones kept for health checks


# ---- configuration ---------------------------------------------------------------------------------------------
def normalise_origin(origin: str) -> str:
    """An allow-list entry as browsers send Origin: scheme://host[:port], lower case, no path; "*" and "null" kept."""
    value = origin.strip().rstrip("/")
    if value in ("*", "null"):
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query or parts.fragment:
        raise ValueError(f"allowed origin {origin!r} is not scheme://host[:port] (e.g. https://app.example.com), "
                         "'null' or '*'")
    return f"{parts.scheme}://{parts.netloc}".lower()


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def normalise_host(host: str) -> str:
    """An allowed_hosts entry: a host name or address without port, lower case; "*" kept."""
    value = host.strip().lower()
    if value == "*":
        return value
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    if not value or any(c in value for c in "/ @?#") or (":" in value and not _is_address(value)):
        raise ValueError(f"allowed host {host!r} is not a host name or address without port (e.g. edit.example.com)")
    return value


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def host_name(header: str) -> str:
    """The name of a Host header: port and IPv6 brackets removed, lower case."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass(frozen=True)
class GuardLimits:
    """What ConnectionGuards enforces (RouterArgs.guard_limits builds it, validated)."""

    allowed_origins: frozenset[str]
    allowed_hosts: frozenset[str] | None  # None: every Host
    max_connections_per_client: int
    max_connections: int
    body_timeout_s: float
    idle_timeout_s: float


def origin_allowed(origin: str, host: str | None, allowed: Iterable[str]) -> bool:
    """Same origin (the Origin's host[:port] is the request's Host; the scheme may differ behind a TLS proxy) or on
    the allow-list; "*" on the list allows every origin."""
    allowed = set(allowed)
    value = origin.strip().lower()
    if "*" in allowed or value in allowed:
        return True
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and host is not None and \
        parts.netloc == host.strip().lower()


# ---- the middleware ---------------------------------------------------------------------------------------------
class Guards:
    """One router replica's guard state: its limits and the connections it holds, by client address."""

    def __init__(self, limits: GuardLimits, on_refuse: Callable[[str], None] | None = None):
        self.limits = limits
        self.open_by_client: collections.Counter = collections.Counter()
        self.open = 0
        self.refused: collections.Counter = collections.Counter()  # by reason, for /api/stats
        self.on_refuse = on_refuse  # the router's Prometheus counter

    def refuse(self, reason: str) -> None:
        self.refused[reason] += 1
        if self.on_refuse is not None:
            self.on_refuse(reason)

    def admit(self, client: str) -> tuple[str, str] | None:
        """None (counted as open) or (code, message) of the refusal."""
        limits = self.limits
        if self.open_by_client[client] >= limits.max_connections_per_client:
            # Short: a websocket close reason holds 123 bytes.
            return "too_many_connections", (
                f"{self.open_by_client[client]} open from this address, the cap "
                f"(router.max_connections_per_client); close one, retry")
        if self.open >= limits.max_connections:
            return "server_busy", (
                f"router full: {self.open} connections (router.max_ongoing_requests less reserved_for_health); "
                "retry later")
        self.open_by_client[client] += 1
        self.open += 1
        return None

    def release(self, client: str) -> None:
        self.open -= 1
        self.open_by_client[client] -= 1
        if self.open_by_client[client] <= 0:
            del self.open_by_client[client]

    def stats(self) -> dict[str, Any]:
        return {"open": self.open, "clients": len(self.open_by_client), "refused": dict(self.refused)}


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _error_body(type_name: str, code: str, message: str) -> bytes:
    return json.dumps({"error": {"type": type_name, "code": code, "message": message}}).encode()


async def _http_error(send: Send, status: int, type_name: str, code: str, message: str,
                      extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = _error_body(type_name, code, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})


async def _forbidden(scope: Scope, receive: Receive, send: Send, code: str, message: str) -> None:
    """403 over HTTP; a websocket closed before accept, which the proxy answers with 403."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": POLICY_CLOSE, "reason": message[:120]})
    else:
        await _http_error(send, 403, "Forbidden", code, message)


class ConnectionGuards:
    """ASGI middleware applying a router replica's Guards (see the module docstring)."""

    def __init__(self, app: Callable, guards: Callable[[], Guards]):
        self.app = app
        self.guards = guards  # the replica's Guards, looked up per connection (the router builds it in __init__)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        guards = self.guards()
        host = _header(scope, b"host")
        if guards.limits.allowed_hosts is not None and (host is None or
                                                        host_name(host) not in guards.limits.allowed_hosts):
            guards.refuse("host")
            message = (f"host {(host or '')[:100]!r} is not a name of this service (router.allowed_hosts; a loopback "
                       "bind answers localhost, 127.0.0.1 and ::1 only, so no other site's page reaches it)")
            return await _forbidden(scope, receive, send, "host_refused", message)
        origin = _header(scope, b"origin")
        if origin is not None and not origin_allowed(origin, host, guards.limits.allowed_origins):
            guards.refuse("origin")
            message = (f"origin {origin[:100]!r} is not allowed here: the page's own origin is, and those in "
                       "router.allowed_origins")
            return await _forbidden(scope, receive, send, "origin_refused", message)
        if scope.get("path") in HEALTH_PATHS:
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("unknown", 0))[0]
        refusal = guards.admit(client)
        if refusal is not None:
            code, message = refusal
            guards.refuse(code)
            if scope["type"] == "websocket":
                # Accepted, then closed: a refused handshake shows the browser no code or reason, a close does.
                await receive()  # websocket.connect
                await send({"type": "websocket.accept"})
                await send({"type": "websocket.close", "reason": message[:123],
                            "code": POLICY_CLOSE if code == "too_many_connections" else BUSY_CLOSE})
            else:
                await _http_error(send, 429 if code == "too_many_connections" else 503, "TooManyConnections"
                                  if code == "too_many_connections" else "ServerBusy", code, message,
                                  [(b"retry-after", b"1")])
            return
        try:
            if scope["type"] == "websocket":
                await self._websocket(scope, receive, send, guards.limits.idle_timeout_s)
            else:
                await self._http(scope, receive, send, guards.limits.body_timeout_s)
        finally:
            guards.release(client)

    async def _http(self, scope: Scope, receive: Receive, send: Send, timeout_s: float) -> None:
        """The app with its body due within timeout_s: else it is cancelled and the client gets 408 (connection
        closed). Hand-written: neither uvicorn (as Serve configures it) nor Serve has a body deadline."""
        body_done = asyncio.Event()
        length = _header(scope, b"content-length")
        if _header(scope, b"transfer-encoding") is None and (length is None or length.strip() == "0"):
            body_done.set()  # no body is coming: a slow GET (an /api/info waiting on a replica) is no stalled upload
        response_started = False

        async def tracked_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done.set()
            return message

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        app_task = asyncio.ensure_future(self.app(scope, tracked_receive, tracked_send))
        body_wait = asyncio.ensure_future(body_done.wait())
        try:
            await asyncio.wait({app_task, body_wait}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if app_task.done() or body_done.is_set() or response_started:
                await app_task
                return
            app_task.cancel()
            try:
                await app_task
            except asyncio.CancelledError:
                pass
            self.guards().refuse("body_timeout")
            await _http_error(send, 408, "BodyTimeout", "body_timeout",
                              f"the request body did not arrive within {timeout_s:g} s (router.body_timeout_s)",
                              [(b"connection", b"close")])
        except asyncio.CancelledError:  # the client left or Serve cancelled the request: take the app with it
            app_task.cancel()
            raise
        finally:
            body_wait.cancel()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, idle_s: float) -> None:
        """The app with its socket closed (1001, a reason) after idle_s without a message either way.
        Hand-written: uvicorn's ws_ping_* only finds dead peers, and live idle ones still hold a router slot."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        pending: asyncio.Future | None = None  # one receive in flight, kept across calls: no message is lost
        closed = False
        reason = f"idle for {idle_s:g} s (router.idle_timeout_s): reconnect to go on"

        async def idle_receive() -> dict[str, Any]:
            nonlocal pending, last, closed
            if closed:
                return {"type": "websocket.disconnect", "code": IDLE_CLOSE}
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(receive())
                remaining = last + idle_s - loop.time()
                if remaining > 0:
                    done, _ = await asyncio.wait({pending}, timeout=remaining)
                    if done:
                        message, pending = pending.result(), None
                        last = loop.time()
                        return message
                    continue  # a send may have moved `last` meanwhile
                closed = True
                self.guards().refuse("idle")
                await send({"type": "websocket.close", "code": IDLE_CLOSE, "reason": reason})
                return {"type": "websocket.disconnect", "code": IDLE_CLOSE}

        async def active_send(message: dict[str, Any]) -> None:
            nonlocal last
            if closed:
                # As Starlette does for a socket closed under it; serve_stream ends the session on it.
                raise RuntimeError(f"websocket closed: {reason}")
            last = loop.time()
            await send(message)

        try:
            await self.app(scope, idle_receive, active_send)
        finally:
            if pending is not None:
                pending.cancel()


# ---- exposure ---------------------------------------------------------------------------------------------------
def is_loopback(host: str | None) -> bool:
    """Whether binding `host` serves this machine only (a name counts when every address it resolves to does)."""
    if not host:
        return False  # "" binds every interface
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_exposure(host: str | None, api_key: str | None, api_key_env: str | None) -> None:
    """Refuses to serve a non-loopback bind address without an API key (raises ConfigError saying how to set one)."""
    if host is None or api_key or is_loopback(host):
        return
    env = api_key_env or "RTEDIT_API_KEY"
    raise ConfigError(
        f"http_options.host is {host!r}, reachable from other machines, and no API key is set: refusing to serve "
        f"without one. Set a key: `export {env}=<key>` before `ray start` (the router replica reads "
        f"router.api_key_env={env!r} from the environment of Ray's processes), or give router.api_key in the app's "
        "args; clients send it as the x-api-key header (websockets: ?api_key=). Or bind 127.0.0.1 "
        "(http_options.host) to serve this machine only.")


def serve_bind_host() -> str | None:
    """The host Serve's HTTP proxies bind, asked of the controller; None outside a Serve replica (a router built
    directly in a test serves no proxy)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
    except RayServeException:
        return None
    from ray.serve.context import _get_global_client

    return _get_global_client().http_config.host


# ---- readiness --------------------------------------------------------------------------------------------------
class Readiness:
    """Ready once every other deployment of the router's application has a RUNNING replica (an editor replica is
    RUNNING once its constructor, which warms every served shape, returned). Asked of the controller, not of the
    replicas: a /readyz never queues behind edits. One status call a second at most, shared by concurrent probes."""

    def __init__(self, status: Callable[[], Any], app_name: str, own_deployment: str, ttl_s: float = 1.0):
        self.status, self.app_name, self.own, self.ttl_s = status, app_name, own_deployment, ttl_s
        self._last: tuple[float, bool, dict[str, int]] | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> tuple[bool, dict[str, int]]:
        async with self._lock:
            if self._last is None or time.monotonic() - self._last[0] > self.ttl_s:
                status = await asyncio.to_thread(self.status)  # a blocking controller call, off the event loop
                app = status.applications.get(self.app_name)
                running = {name: int((dep.replica_states or {}).get("RUNNING", 0))
                           for name, dep in (app.deployments.items() if app is not None else ())
                           if name != self.own}
                ready = bool(running) and all(n > 0 for n in running.values())
                self._last = (time.monotonic(), ready, running)
            return self._last[1], self._last[2]
