"""API tokens: only their sha256 is stored; the token itself is shown once at creation."""

from __future__ import annotations

import hashlib
import secrets

from .errors import Unauthorized
from .store import Store

ANONYMOUS = "local"


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
