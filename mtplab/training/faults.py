"""What ends or bends a run before its last step: a stop signal, and steps whose numbers blew up.

SIGINT and SIGTERM (Ctrl-C, `kill`, a scheduler's preemption, torchrun forwarding either) finish the
step under way, save a checkpoint and return; a second Ctrl-C interrupts at once (checkpoints are
written atomically, so that loses only the steps since the last one).

A step whose loss or gradient is not finite changes nothing: the update is skipped and counted. After
`limit` such steps in a row the run stops with the last good checkpoint as it was.
"""

from __future__ import annotations

import math
import signal
import threading

from ..errors import MtplabError


class StopSignals:
    """Context manager that turns SIGINT/SIGTERM into a flag checked between steps."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only live there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""


class NonFiniteGuard:
    """Counts skipped steps; raises once `limit` come in a row."""

    def __init__(self, limit: int, skipped: int = 0):
        self.limit, self.skipped, self.in_a_row = limit, skipped, 0

    def check(self, step: int, losses: list[float], grad_norm: float, last_good: str) -> bool:
        """True when the step may update the weights."""
        if all(math.isfinite(x) for x in losses) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise MtplabError(f"{self.in_a_row} steps in a row had a non-finite loss or gradient (the "
                              f"last was step {step}); stopped. The last good checkpoint is {last_good}; "
                              "try a lower train.lr or check the data")
        return False
