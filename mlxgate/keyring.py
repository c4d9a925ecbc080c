"""The one table of API keys: which key a caller presented, by name, and what it may do.

Also the one place configured keys are normalised (``clean``): surrounding
blanks removed, empty ones dropped, each once, whether they came from flags,
the environment or the TOML file.

Built once from the ``ServerConfig`` (``KeyRing.from_server``) by both doors:
the HTTP trust middleware (``gateway/security.py``) and the gRPC gate
(``backends/gate.py``).  Every key has a name, and only the name travels on
(ledger rows, logs, metric labels, ``/api/usage``), never the secret:

- ``[[keys]]`` entries keep their own names, limits and ``admin`` flag;
- plain keys (``server.api_keys``) are ``key-1``, ``key-2``, ... in the
  order given, without limits;
- admin keys (``server.admin_keys``) are ``admin-1``, ... and are admins.

A secret given twice keeps its first entry.  ``lookup`` compares the
presented key's SHA-256 digest with every configured digest
(``hmac.compare_digest``, no early exit), so the time says neither which
key matched nor how long the keys are.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Iterable, Optional

from mlxgate.config import KeyEntry, ServerConfig


@dataclass(frozen=True)
class NamedKey:
    """A configured key without its secret."""

    name: str
    admin: bool = False
    requests_per_minute: Optional[int] = None
    tokens_per_minute: Optional[int] = None
    cloud_usd_per_day: Optional[float] = None
    #: Public model names it may use; empty: any.
    models: frozenset[str] = field(default_factory=frozenset)

    @property
    def rate_limited(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    def allows(self, model: str) -> bool:
        """Whether the key may use ``model`` (``x`` and ``x:latest`` alike)."""
        if not self.models:
            return True
        return model in self.models or _untagged(model) in self.models


def _untagged(name: str) -> str:
    from mlxgate.names import untagged

    return untagged(name)


def clean(keys: Iterable[str]) -> list[str]:
    """Configured keys as compared: stripped, empty ones dropped (an empty
    ``--api-key ""`` must not count as "keys are set"), each once."""
    return list(dict.fromkeys(k.strip() for k in keys if k.strip()))


def every_secret(cfg: ServerConfig) -> list[str]:
    """Plain, admin and ``[[keys]]`` keys, cleaned: any of them set means callers need one."""
    return clean([*cfg.api_keys, *cfg.admin_keys, *(k.key for k in cfg.keys)])


def first(keys: Iterable[str]) -> Optional[str]:
    """The first of ``keys`` once cleaned (the key a front sends on), or None."""
    return next(iter(clean(keys)), None)


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.strip().encode("utf-8", "surrogateescape")).digest()


def _entry(entry: KeyEntry) -> NamedKey:
    models = set(entry.models)
    models |= {_untagged(m) for m in entry.models}
    return NamedKey(
        name=entry.name,
        admin=bool(entry.admin),
        requests_per_minute=entry.requests_per_minute,
        tokens_per_minute=entry.tokens_per_minute,
        cloud_usd_per_day=entry.cloud_usd_per_day,
        models=frozenset(models),
    )


class KeyRing:
    """Named keys by the digest of their secret."""

    def __init__(self, keys: Iterable[tuple[str, NamedKey]] = ()) -> None:
        """``keys``: (secret, key) pairs; blank secrets are dropped."""
        self._digests: list[bytes] = []
        self._keys: list[NamedKey] = []
        self._by_name: dict[str, NamedKey] = {}
        for secret, key in keys:
            if not secret.strip():
                continue
            d = digest(secret)
            if d in self._digests or key.name in self._by_name:
                continue
            self._digests.append(d)
            self._keys.append(key)
            self._by_name[key.name] = key

    @classmethod
    def from_server(cls, cfg: ServerConfig) -> "KeyRing":
        return cls.of(cfg.api_keys, cfg.admin_keys, cfg.keys)

    @classmethod
    def of(cls, api_keys: Iterable[str] = (), admin_keys: Iterable[str] = (),
           entries: Iterable[KeyEntry] = ()) -> "KeyRing":
        """``[[keys]]`` entries, then plain keys (``key-N``; an admin if also
        among ``admin_keys``), then the other admin keys (``admin-N``)."""
        admins = clean(admin_keys)
        plain = clean(api_keys)
        pairs: list[tuple[str, NamedKey]] = [(e.key, _entry(e)) for e in entries]
        pairs += [(k, NamedKey(name=f"key-{i}", admin=k in admins)) for i, k in enumerate(plain, 1)]
        only_admin = [k for k in admins if k not in plain]
        pairs += [(k, NamedKey(name=f"admin-{i}", admin=True)) for i, k in enumerate(only_admin, 1)]
        return cls(pairs)

    @property
    def required(self) -> bool:
        """Keys are configured: callers must present one."""
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._keys)

    def names(self) -> list[str]:
        return list(self._by_name)

    def keys(self) -> list[NamedKey]:
        return list(self._keys)

    def by_name(self, name: str) -> Optional[NamedKey]:
        return self._by_name.get(name)

    def lookup(self, secret: str) -> Optional[NamedKey]:
        """The key ``secret`` is, or None (every digest compared)."""
        return self.lookup_digest(digest(secret))

    def lookup_digest(self, presented: bytes) -> Optional[NamedKey]:
        found: Optional[NamedKey] = None
        for d, key in zip(self._digests, self._keys):  # no early exit
            if hmac.compare_digest(presented, d) and found is None:
                found = key
        return found
