"""The ``storage`` section of config.json: where sessions, turn leases and the outbox are kept."""

from __future__ import annotations

from dataclasses import dataclass, field

from nanobot.config_loader import SECRET as _SECRET
from nanobot.errors import ConfigError


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """Where sessions, turn leases and the outbox are kept.

    ``url``: empty or ``"sqlite"`` for the embedded files under the workspace (one process);
    ``postgresql://user:password@host:port/database`` for one PostgreSQL shared by any number of
    processes. Secret: the URL holds the password (redacted whole, and its password alone).
    """

    url: str = field(default="", repr=False, metadata=_SECRET)
    pool_size: int = 10  # PostgreSQL connections per process
    connect_timeout: float = 10.0  # seconds to reach PostgreSQL at start before giving up
    lease_seconds: float = 30.0  # a crashed process blocks its sessions at most this long
    # PostgreSQL is checked this often (on its own connection): /health/ready follows it.
    probe_seconds: float = 2.0

    @property
    def is_postgres(self) -> bool:
        """Whether ``url`` names a PostgreSQL database (else the embedded SQLite files)."""
        return self.url.startswith(POSTGRES_SCHEMES)


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def check_storage(storage: StorageConfig) -> None:
    """A ConfigError for a URL that is neither SQLite nor PostgreSQL (naming only its scheme: the
    rest may hold a password) or a bound that is not positive."""
    if storage.url not in ("", "sqlite") and not storage.is_postgres:
        # Only the scheme is quoted: the rest of the URL may hold a password.
        scheme = storage.url.split(":", 1)[0][:20] if ":" in storage.url else "(none)"
        raise ConfigError(
            f'storage.url: expected "sqlite" or a postgresql:// URL, got one with scheme {scheme!r}'
        )
    for key, bound in (
        ("poolSize", storage.pool_size),
        ("connectTimeout", storage.connect_timeout),
        ("leaseSeconds", storage.lease_seconds),
        ("probeSeconds", storage.probe_seconds),
    ):
        if bound <= 0:
            raise ConfigError(f"storage.{key}: must be greater than 0")
