"""Who may call: a bearer token from ``API_KEYS`` for the API, the same key as the
HTTP Basic password for a browser on the dashboard. Only ``/health`` is open.

Tokens are compared in constant time against every key (so a rotation can list the
old and the new), and never logged: the access log carries paths, not headers.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from starlette.requests import HTTPConnection

#: The realm a browser shows when it asks for the key.
REALM = "batch-infer"


def _matches(token: str, keys: tuple[str, ...]) -> bool:
    found = False
    for key in keys:
        # Every key is compared, found or not, so timing says nothing about which.
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def presented_token(connection: HTTPConnection) -> str | None:
    """The key a request presents: ``Bearer <key>``, or Basic with the key as password."""
    header = connection.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


def authorized(connection: HTTPConnection, keys: tuple[str, ...]) -> bool:
    token = presented_token(connection)
    return bool(token) and _matches(token or "", keys)
