"""API keys: creation (shown once), lookup by hash, revocation, and the admin key from settings."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from sqlalchemy.orm import Session

from core import ids, keys_repository
from core.clock import utcnow
from core.errors import InvalidRequest
from core.models import ApiKey
from core.text import clean_name

KEY_PREFIX = "sk-sdpo-"
# Owners appear inside fine-tuned model names (ft:{base}:{owner}:…), so keep them plain.
OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SETTINGS_ADMIN_NAME = "admin (SDPO_ADMIN_KEY)"
ADMIN_OWNER = "admin"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)  # 32 random bytes


def create_api_key(session: Session, *, name: str, owner: str | None = None,
                   is_admin: bool = False) -> tuple[ApiKey, str]:
    """Add a new key; return the row and the plaintext key, which is never stored or shown again."""
    name = clean_name(name)  # shown in `sdpo keys list`: no control or format characters (core/text.py)
    owner = owner or name
    if not name or len(name) > 64:
        raise InvalidRequest("name must be 1 to 64 visible characters", param="name")
    if not OWNER_RE.fullmatch(owner):  # fullmatch: `$` alone would let a trailing newline through
        raise InvalidRequest("owner must be 1 to 64 of A-Z a-z 0-9 . _ - (starting with a letter or digit)",
                             param="owner")
    plaintext = generate_key()
    row = ApiKey(id=ids.new_id(ids.API_KEY), name=name, owner=owner, key_hash=hash_key(plaintext),
                 is_admin=is_admin)
    session.add(row)
    session.flush()
    return row, plaintext


def find_active_key(session: Session, plaintext: str) -> ApiKey | None:
    """The unrevoked key whose hash matches, or None."""
    digest = hash_key(plaintext)
    row = keys_repository.get_by_hash(session, digest)
    # The lookup is by an index on the hash; compare_digest keeps the final check constant-time.
    if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
        return None
    return row


def is_key_active(session: Session, key_id: str) -> bool:
    """True while the key `key_id` exists and is not revoked (re-checked by long-lived requests,
    such as a live event stream, after their first key check)."""
    exists, revoked_at = keys_repository.revoked_at(session, key_id)
    return exists and revoked_at is None


def ensure_settings_admin_key(session: Session, plaintext: str) -> ApiKey:
    """Register the admin key from SDPO_ADMIN_KEY (idempotent).

    A previous settings key that differs is revoked, so rotating SDPO_ADMIN_KEY and restarting
    really retires the old key. Keys made with `sdpo keys create --admin` are left alone.
    """
    digest = hash_key(plaintext)
    current = None
    for row in keys_repository.named(session, SETTINGS_ADMIN_NAME):
        if row.key_hash == digest:
            current = row
        elif row.revoked_at is None:
            row.revoked_at = utcnow()
    if current is None:
        current = keys_repository.get_by_hash(session, digest)
    if current is None:
        current = ApiKey(id=ids.new_id(ids.API_KEY), name=SETTINGS_ADMIN_NAME, owner=ADMIN_OWNER,
                         key_hash=digest, is_admin=True)
        session.add(current)
    current.is_admin = True
    current.revoked_at = None
    session.flush()
    return current


def list_keys(session: Session) -> list[ApiKey]:
    return keys_repository.list_all(session)


def revoke_key(session: Session, key_id: str) -> ApiKey | None:
    row = keys_repository.get(session, key_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row
