"""`StopOnSignal`: while active, SIGTERM and SIGINT only record the signal; the loop checks it after each step,
saves a checkpoint and exits with status 128 + signal."""
from __future__ import annotations

import signal
import threading

from finetune import distributed


class StopOnSignal:
    """While active, SIGTERM and SIGINT only record the signal; `requested()` says which (the same on every rank)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, dist):
        self.dist = dist
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum

    def requested(self) -> int | None:
        if not self.dist.enabled:
            return self.signum
        return distributed.broadcast_object(self.signum, self.dist)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
