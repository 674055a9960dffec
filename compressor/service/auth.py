"""API tokens: only their sha256 is stored; the token itself is shown once at creation.

A browser holds its token in an HttpOnly cookie (set by the login page). A request authenticated by that
cookie that changes state must also carry the CSRF token the pages render, an HMAC of the cookie's token:
a page of another site can make the browser send the cookie (were it not SameSite) but cannot read the token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from .errors import Forbidden, Unauthorized
from .store import Store

ANONYMOUS = "local"
COOKIE = "compressor_token"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(store: Store, owner: str, name: str = "") -> str:
    token = "cmp_" + secrets.token_urlsafe(32)
    store.add_token(hash_token(token), owner, name or owner)
    return token


def owner_of(store: Store, authorization: str | None) -> str:
    """The owner a request acts for. With no token in the table the service is open (loopback only)."""
    if not store.any_tokens():
        return ANONYMOUS
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthorized("a bearer token is required (Authorization: Bearer TOKEN)",
                           hint="create one with `compressor token create OWNER`")
    owner = store.token_owner(hash_token(authorization[7:].strip()))
    if owner is None:
        raise Unauthorized("the token is unknown or revoked")
    return owner


def csrf_token(token: str | None) -> str:
    """The CSRF token of a session: keyed by the cookie's token, so the stored hash alone cannot forge it.
    Without a token (anonymous mode) there is no session and the token is empty."""
    if not token:
        return ""
    return hmac.new(token.encode(), b"compressor csrf v1", hashlib.sha256).hexdigest()


def check_csrf(token: str | None, given: str | None) -> None:
    if token and not hmac.compare_digest(csrf_token(token), given or ""):
        raise Forbidden("the request lacks this session's CSRF token (a form of another site?)",
                        hint="reload the page and send the form again")


def check_same_origin(method: str, headers: dict[str, str] | object) -> None:
    """Refuse a browser's cross-site request that changes state. Browsers say where a request comes from
    (``Sec-Fetch-Site``; ``Origin`` in older ones); curl and scripts send neither and are not affected."""
    if method in SAFE_METHODS:
        return
    site = headers.get("sec-fetch-site")
    if site is not None:
        cross = site not in ("same-origin", "none")
    else:
        origin = headers.get("origin")
        cross = bool(origin) and (origin == "null" or urlsplit(origin).netloc != headers.get("host"))
    if cross:
        raise Forbidden("a page of another site cannot change anything here")


def request_owner(store: Store, *, method: str, headers, cookies: dict[str, str]) -> str:
    """The owner of an API or page request: the bearer token, else the login cookie (whose state-changing
    requests need the ``X-CSRF-Token`` header); a browser's cross-site request never changes state."""
    authorization = headers.get("authorization")
    if authorization:  # a browser cannot add this header to another site's request
        return owner_of(store, authorization)
    check_same_origin(method, headers)
    cookie = cookies.get(COOKIE)
    if cookie and store.any_tokens():
        who = owner_of(store, f"Bearer {cookie}")
        if method not in SAFE_METHODS:
            check_csrf(cookie, headers.get(CSRF_HEADER.lower()))
        return who
    return owner_of(store, None)
