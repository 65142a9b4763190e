"""Readiness: whether this process can serve, as ``GET /health/ready`` tells a load balancer.

Ready means every store is open (opened and migrated), none is failing, and the server is
not shutting down. Each store's writer thread flips its own :class:`StorageHealth` after
each transaction: a failed one marks the store failing until the next one succeeds.
``/health`` stays a liveness check: the process answers.
"""

from __future__ import annotations

from collections.abc import Iterable


class StorageHealth:
    """One store as readiness sees it.

    Written by the store (its writer thread, after each transaction), read on the event loop.
    Each field is a plain attribute store with one writer, so no lock is needed; the cost per
    transaction is one attribute store.
    """

    __slots__ = ("errors", "failing", "is_open", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_open = False
        self.failing = False
        self.errors = 0  # transactions that failed, for nanobot_storage_errors_total

    def opened(self) -> None:
        """The store is open and its schema is current."""
        self.failing = False
        self.is_open = True

    def closed(self) -> None:
        """The store was closed (shutdown)."""
        self.is_open = False

    def succeeded(self) -> None:
        """A transaction committed: the store is reachable."""
        self.failing = False

    def failed(self) -> None:
        """A transaction failed: unavailable until the next one succeeds."""
        self.errors += 1
        self.failing = True

    def probed(self, reachable: bool) -> None:
        """A periodic check of a database server: unavailable while it cannot be reached, and
        available again as soon as it can (not counted as a failed transaction)."""
        self.failing = not reachable

    def state(self) -> str:
        """``starting``, ``failing`` or ``ok``."""
        if not self.is_open:
            return "starting"
        return "failing" if self.failing else "ok"


class Readiness:
    """The stores this process needs, and whether it is shutting down."""

    def __init__(self, stores: Iterable[str] = ("sessions", "outbox")) -> None:
        self._stores = {name: StorageHealth(name) for name in stores}
        self._stopping = False

    def store(self, name: str) -> StorageHealth:
        """The health slot ``name``'s store flips (created by the constructor)."""
        return self._stores[name]

    @property
    def stores(self) -> tuple[StorageHealth, ...]:
        """Every store, in the order given."""
        return tuple(self._stores.values())

    def stop(self) -> None:
        """Shutting down: not ready any more (a load balancer sends new requests elsewhere)."""
        self._stopping = True

    def status(self) -> str:
        """``ready``; else ``stopping``, ``starting`` (a store not open yet) or ``unavailable``."""
        if self._stopping:
            return "stopping"
        states = [s.state() for s in self._stores.values()]
        if "starting" in states:
            return "starting"
        return "unavailable" if "failing" in states else "ready"
