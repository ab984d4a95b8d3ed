"""Checks every request passes before it reaches a route: Host name, API key, JSON bodies only.

They are plain ASGI middleware, so a refused request costs no body read, no queue place and no memory.
"""
from __future__ import annotations

import base64
import binascii
import secrets

from starlette.datastructures import Headers

from mobilevlm.serve.apierror import ApiError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(host_header: str) -> str:
    """The name in a Host header, without the port and the brackets of an IPv6 literal, lower-cased."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class HostCheckMiddleware:
    """Refuses requests whose Host header names none of `allowed` (HTTP 400)."""

    def __init__(self, app, allowed: tuple[str, ...]):
        self.app, self.allowed = app, {name.lower() for name in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "")
            if host_name(host) not in self.allowed:
                error = ApiError(400, f"Host {host!r} is not a name of this server ({', '.join(sorted(self.allowed))}); "
                                      "start it with --allowed-host NAME to add one", code="invalid_host")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ApiKeyMiddleware:
    """Every route needs the key: `Authorization: Bearer KEY` (API clients) or HTTP Basic with the key as the
    password, which lets a browser open the web page through its own login prompt and reuse it for the page's
    requests."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                credential = base64.b64decode(credential.strip(), validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return secrets.compare_digest(credential.strip().encode(), self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self._authorized(Headers(scope=scope)):
            error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                             code="invalid_api_key", headers={"WWW-Authenticate": 'Basic realm="mobilevlm"'})
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def is_json(content_type: str) -> bool:
    """`application/json`, with any parameters (`; charset=utf-8`), in any case."""
    return content_type.partition(";")[0].strip().lower() == "application/json"


class JsonOnlyMiddleware:
    """POSTs must say `Content-Type: application/json` (else 415). A web page can send text/plain or a form
    cross-site without the browser asking the server first (no CORS preflight); JSON it can only send after a
    preflight, which this server refuses unless --cors-origin names the page's origin."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            content_type = Headers(scope=scope).get("content-type", "")
            if not is_json(content_type):
                error = ApiError(415, f"the request body must be sent as 'Content-Type: application/json', not "
                                      f"{content_type[:80]!r}", code="unsupported_media_type")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
