"""The service's trust-boundary settings, read once from the environment into one typed model.

    POLYTASK_MAX_TEXTS          texts per request (default 64)
    POLYTASK_MAX_BODY_BYTES     bytes per request body (default 1 MiB): larger bodies get a 413,
                                checked against Content-Length and while the body streams in
    POLYTASK_MAX_TEXT_CHARS     characters per text (default 10,000): longer texts get a 422
                                naming their index
    POLYTASK_API_KEYS           comma-separated API keys; when set (or the file below is),
                                /predict and /tasks need `Authorization: Bearer <key>`
    POLYTASK_API_KEYS_FILE      a file with one API key per line (`#` starts a comment)
    POLYTASK_METRICS_API_KEYS   keys for /metrics (comma-separated); /metrics is open without
    POLYTASK_METRICS_API_KEYS_FILE  the same, from a file
    POLYTASK_HEADER_TIMEOUT_S   seconds a request head may take to arrive, from the connection's
                                start or the previous answer (default 10): then 408, or the
                                connection is closed if nothing came (serving/connections.py)
    POLYTASK_MAX_CONNECTIONS    open connections per HTTP worker (default 1000): one beyond gets
                                503 with Retry-After and is closed (serving/connections.py)

Keys are kept only as SHA-256 digests and compared in constant time; they are never logged,
and `repr(settings)` does not show them. A bad value (a limit that is not a positive integer,
an unreadable key file, a file with no key) is an error at start, naming the variable.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

MAX_TEXTS_ENV = "POLYTASK_MAX_TEXTS"
MAX_BODY_BYTES_ENV = "POLYTASK_MAX_BODY_BYTES"
MAX_TEXT_CHARS_ENV = "POLYTASK_MAX_TEXT_CHARS"
API_KEYS_ENV = "POLYTASK_API_KEYS"
METRICS_API_KEYS_ENV = "POLYTASK_METRICS_API_KEYS"
HEADER_TIMEOUT_ENV = "POLYTASK_HEADER_TIMEOUT_S"
MAX_CONNECTIONS_ENV = "POLYTASK_MAX_CONNECTIONS"

DEFAULT_MAX_TEXTS = 64
# 64 texts of 10,000 characters are ~640 KB of JSON; 1 MiB leaves room for escapes.
DEFAULT_MAX_BODY_BYTES = 1 << 20
# Far beyond what the model reads (128 tokens are ~600 characters of English), small enough
# that validation and the runtime's cut stay cheap.
DEFAULT_MAX_TEXT_CHARS = 10_000
# A client sends its request head in one round trip; 10 s leaves room for slow links and stops
# a connection that sends nothing (or trickles its headers) from being held for good.
DEFAULT_HEADER_TIMEOUT_S = 10
# Per HTTP worker. Far above what a replica serves at once (requests are merged into a few model
# calls); a worker whose file limit is too low for it warns at start (serving/connections.py).
DEFAULT_MAX_CONNECTIONS = 1000


class SettingsError(ValueError):
    """An environment variable with a bad value; the message names it."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeySet(BaseModel):
    """API keys as SHA-256 digests; empty means the endpoints it guards are open."""

    model_config = ConfigDict(frozen=True)

    digests: tuple[bytes, ...] = Field(default=(), repr=False)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def accepts(self, key: str) -> bool:
        """Whether `key` is one of the keys, in time independent of which (or how many) match:
        every digest is compared, and digests have one length whatever the key's."""
        candidate = _digest(key)
        found = False
        for digest in self.digests:
            found |= hmac.compare_digest(candidate, digest)
        return found

    def __repr__(self) -> str:
        return f"KeySet({len(self.digests)} keys)"


class ServingSettings(BaseModel):
    """What the HTTP boundary enforces (see the module docstring for the variables)."""

    model_config = ConfigDict(frozen=True)

    max_texts: int = Field(default=DEFAULT_MAX_TEXTS, ge=1)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1)
    max_text_chars: int = Field(default=DEFAULT_MAX_TEXT_CHARS, ge=1)
    api_keys: KeySet = Field(default_factory=KeySet)
    metrics_api_keys: KeySet = Field(default_factory=KeySet)
    header_timeout_s: int = Field(default=DEFAULT_HEADER_TIMEOUT_S, ge=1)
    max_connections: int = Field(default=DEFAULT_MAX_CONNECTIONS, ge=1)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServingSettings:
        """The settings in `env` (default os.environ).

        Raises:
            SettingsError: a bad value; the message names the variable.
        """
        env = os.environ if env is None else env
        return cls(
            max_texts=_positive_int(env, MAX_TEXTS_ENV, DEFAULT_MAX_TEXTS),
            max_body_bytes=_positive_int(env, MAX_BODY_BYTES_ENV, DEFAULT_MAX_BODY_BYTES),
            max_text_chars=_positive_int(env, MAX_TEXT_CHARS_ENV, DEFAULT_MAX_TEXT_CHARS),
            api_keys=_keys(env, API_KEYS_ENV),
            metrics_api_keys=_keys(env, METRICS_API_KEYS_ENV),
            header_timeout_s=_positive_int(env, HEADER_TIMEOUT_ENV, DEFAULT_HEADER_TIMEOUT_S),
            max_connections=_positive_int(env, MAX_CONNECTIONS_ENV, DEFAULT_MAX_CONNECTIONS),
        )


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip().replace("_", "")
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise SettingsError(f"{name}={env[name]!r}: expected a positive integer")
    return int(raw)


def _keys(env: Mapping[str, str], name: str) -> KeySet:
    """Keys from $name (comma-separated) and ${name}_FILE (one per line)."""
    keys = [k.strip() for k in env.get(name, "").split(",") if k.strip()]
    file_var = f"{name}_FILE"
    path = env.get(file_var, "").strip()
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise SettingsError(
                f"{file_var}={path}: cannot read the key file ({type(err).__name__})"
            ) from None
        from_file = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not from_file:
            raise SettingsError(f"{file_var}={path}: the file holds no key")
        keys += from_file
    short = [i for i, k in enumerate(keys) if len(k) < 16]
    if short:
        # Position only: the key itself must never reach a log or an error message.
        raise SettingsError(f"{name}: key #{short[0] + 1} is shorter than 16 characters")
    return KeySet(digests=tuple(dict.fromkeys(_digest(k) for k in keys)))


@functools.cache
def get_settings() -> ServingSettings:
    """The process's settings, read from the environment on first use (never at import)."""
    return ServingSettings.from_env()
