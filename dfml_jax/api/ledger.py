"""The query ledger: a thread-safe host-side count of the samples an API answered.

Every answered sample is charged to a :class:`QueryLedger`, optionally against a budget. A jitted
step that knows how many samples it will query reserves them first (:meth:`QueryLedger.reserve`),
so the budget is checked at the step boundary, before any work; a refused request raises
:class:`~dfml_jax.api.errors.QueryBudgetExceeded` and charges nothing.

Example:
  >>> ledger = QueryLedger("teacher", budget=10)
  >>> with ledger.reserve(6):
  ...     ledger.charge(4)
  >>> ledger.answered, ledger.remaining
  (4, 6)
"""
from __future__ import annotations

import threading
from typing import Optional

from dfml_jax.api.errors import QueryBudgetExceeded

__all__ = ["QueryLedger"]


class QueryLedger:
    """Thread-safe host-side count of answered samples, with an optional budget and reservations.

    A jitted step that knows how many samples it will query calls :meth:`reserve` first; the budget
    check then happens at the step boundary, before any work, and the step's callbacks draw on the
    reservation. Unreserved queries are checked against the budget when they arrive.
    """

    def __init__(self, name: str, budget: Optional[int] = None):
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0 or None, got {budget}")
        self.name = name
        self.budget = None if budget is None else int(budget)
        self._answered = 0
        self._reserved = 0
        self._calls = 0
        self._lock = threading.Lock()

    @property
    def answered(self) -> int:
        return self._answered

    @property
    def host_calls(self) -> int:
        return self._calls

    @property
    def reserved(self) -> int:
        return self._reserved

    @property
    def remaining(self) -> Optional[int]:
        """Samples that can still be asked for (None without a budget)."""
        if self.budget is None:
            return None
        return self.budget - self._answered - self._reserved

    def check(self, n: int) -> None:
        """Raise :class:`QueryBudgetExceeded` if ``n`` new unreserved samples do not fit."""
        with self._lock:
            self._check_locked(n, use_reservation=True)

    def _check_locked(self, n: int, use_reservation: bool) -> None:
        if self.budget is None:
            return
        avail = self.budget - self._answered - self._reserved
        if use_reservation:
            avail += self._reserved
        if n > avail:
            raise QueryBudgetExceeded(self.name, n, self._answered, max(avail, 0), self.budget)

    def charge(self, n: int) -> None:
        """Count ``n`` answered samples (reservation first, then budget)."""
        with self._lock:
            self._check_locked(n, use_reservation=True)
            take = min(self._reserved, n)
            self._reserved -= take
            self._answered += n
            self._calls += 1

    def reserve(self, n: int) -> "_Reservation":
        """Reserve ``n`` samples for the next step; raises before any work if they do not fit.

        Returns a handle that is also a context manager: on exit, whatever the step did not use is
        released (so a failed step costs nothing). JAX dispatches asynchronously and callbacks
        charge when they run: block on the step's outputs (``jax.block_until_ready``) inside the
        ``with`` block so that the ledger is complete when the reservation is settled.
        """
        n = int(n)
        if n < 0:
            raise ValueError(f"cannot reserve a negative number of queries ({n})")
        with self._lock:
            self._check_locked(n, use_reservation=False)
            self._reserved += n
            start = self._answered
        return _Reservation(self, n, start)

    def _release(self, n: int) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - n)

    def state_dict(self) -> dict:
        return {"answered": self._answered, "host_calls": self._calls, "budget": self.budget}

    def load_state_dict(self, state: dict) -> None:
        """Restore counts from a checkpoint (queries already paid for stay paid for)."""
        with self._lock:
            self._answered = int(state["answered"])
            self._calls = int(state.get("host_calls", 0))


class _Reservation:
    def __init__(self, ledger: QueryLedger, n: int, start: int):
        self.ledger, self.n, self._start = ledger, n, start

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        used = self.ledger.answered - self._start
        self.ledger._release(max(self.n - used, 0))
        return False
