"""API keys with scopes: ``read`` and ``admin``, hashed at rest, checked in constant time.

A client sends its key as ``Authorization: Bearer <key>`` (what the ``openai`` client sends for ``api_key=``).

* A key is ``lrk_`` followed by 43 URL-safe characters (32 random bytes); ``lora-retriever-serve --new_key admin``
  prints a new one with its **entry**, the only thing the server stores.
* An entry is ``SCOPE:SHA256`` or ``SCOPE:SHA256:LABEL``: the scope (``read`` or ``admin``), the SHA-256 of the
  key in hex (64 characters), and an optional label (letters, digits, ``_.@-``) that ``GET /whoami`` reports.
  Entries come from ``--api_key ENTRY`` (repeatable), ``LORA_RETRIEVER_API_KEYS`` (entries separated by commas),
  ``api_keys = [...]`` in the ``--config`` file, or ``--api_keys_file`` (one entry a line, ``#`` comments).

Why SHA-256 and not a slow hash (scrypt): the keys are 256 random bits, not passwords; a slow hash protects
guessable secrets and would cost every request tens of milliseconds of CPU. ``read`` lets a client generate,
retrieve, list adapters and models, read jobs, ``/whoami``, ``/metrics``; ``admin`` can do everything, including
registering, uploading, deleting and merging adapters, training, evaluating and cancelling or resuming jobs.
With no entries configured every route is open (the loopback default; ``ServiceConfig`` refuses a non-loopback
host without keys unless ``allow_no_auth``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lora_retriever.service.errors import ServiceError

__all__ = ["ADMIN", "KEY_PREFIX", "READ", "SCOPES", "ApiKey", "KeyRing", "hash_key", "new_key", "parse_entry"]

READ = "read"
ADMIN = "admin"
#: Scopes, weakest first: a key's scope grants every scope before it.
SCOPES = (READ, ADMIN)
KEY_PREFIX = "lrk_"
_ENTRY = re.compile(r"(?P<scope>[a-z]+):(?P<digest>[0-9a-f]{64})(?::(?P<label>[A-Za-z0-9_.@\-]{1,64}))?")
_ENTRY_HELP = "SCOPE:SHA256[:LABEL] (lora-retriever-serve --new_key admin prints one)"


@dataclass(frozen=True)
class ApiKey:
    """One accepted key, as stored: its scope, the SHA-256 digest of the key, an optional label."""

    scope: str
    digest: bytes
    label: str | None = None


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key (what an entry stores)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key(scope: str, label: str | None = None) -> tuple[str, str]:
    """A new random key and its entry ``SCOPE:SHA256[:LABEL]``.

    Raises:
        ValueError: an unknown scope or a bad label.
    """
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = f"{scope}:{hash_key(key)}" + (f":{label}" if label else "")
    parse_entry(entry, "--new_key")  # checks the scope and the label
    return key, entry


def parse_entry(text: str, where: str) -> ApiKey:
    """Parse one entry ``SCOPE:SHA256[:LABEL]``; ``where`` names its source in the error.

    Raises:
        ValueError: a malformed entry or an unknown scope (the entry itself is not echoed past its scope).
    """
    match = _ENTRY.fullmatch(text.strip())
    if match is None:
        shown = text.strip().split(":", 1)[0][:16]
        raise ValueError(
            f"{where}: API key entry starting {shown!r} is not {_ENTRY_HELP}; the SHA-256 is 64 lowercase hex digits"
        )
    if match["scope"] not in SCOPES:
        raise ValueError(f"{where}: unknown scope {match['scope']!r}; scopes: {list(SCOPES)}")
    return ApiKey(match["scope"], bytes.fromhex(match["digest"]), match["label"])


class KeyRing:
    """The accepted keys. Empty: authentication is off (every request has the ``admin`` scope)."""

    def __init__(self, keys: Iterable[ApiKey] = ()):
        self.keys = tuple(keys)

    @classmethod
    def from_entries(cls, entries: Iterable[str], where: str) -> KeyRing:
        return cls(parse_entry(e, f"{where}[{i}]") for i, e in enumerate(entries))

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        """One entry a line; blank lines and ``#`` comments skipped.

        Raises:
            FileNotFoundError: no such file. ValueError: a bad line, or no entry at all.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"api_keys_file {path} does not exist; write entries {_ENTRY_HELP} there")
        keys = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(parse_entry(line, f"{path}:{lineno}"))
        if not keys:
            raise ValueError(f"api_keys_file {path} holds no key entries; write entries {_ENTRY_HELP} there")
        return cls(keys)

    @classmethod
    def from_config(cls, config) -> KeyRing:
        """The keys of a ``ServiceConfig``: its ``api_keys`` entries and its ``api_keys_file``."""
        ring = cls.from_entries(config.api_keys, "api_keys")
        if config.api_keys_file:
            ring = cls((*ring.keys, *cls.from_file(config.api_keys_file).keys))
        return ring

    def __bool__(self) -> bool:
        return bool(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, key: str) -> ApiKey | None:
        """The entry of ``key``, or ``None``. Every entry is compared (``hmac.compare_digest``, no early exit),
        so the time taken says nothing about which entries exist or how close the key came."""
        digest = hashlib.sha256(key.encode("utf-8", errors="surrogateescape")).digest()
        found = None
        for entry in self.keys:
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return found

    def authorize(self, authorization: str | None, scope: str) -> ApiKey | None:
        """The entry of the key in an ``Authorization`` header value, checked to grant ``scope``.

        Returns ``None`` when authentication is off.

        Raises:
            ServiceError: 401 for a missing or unknown key, 403 for a key whose scope is too weak.
        """
        if not self.keys:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise ServiceError(
                "missing API key: send the header 'Authorization: Bearer <key>' (the openai client's api_key)",
                status=401,
                param="authorization",
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        entry = self.find(key)
        if entry is None:
            raise ServiceError(
                "invalid API key: the key is not one of this server's keys; ask its administrator for one",
                status=401,
                param="authorization",
                code="invalid_api_key",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if SCOPES.index(entry.scope) < SCOPES.index(scope):
            raise ServiceError(
                f"this API key has the {entry.scope!r} scope; this route needs {scope!r}; use an {scope} key",
                status=403,
                param="authorization",
                code="insufficient_scope",
                type_="permission_error",
                headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
            )
        return entry
