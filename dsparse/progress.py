"""Progress of long work: ``label: done/total unit, rate unit/s, ETA`` as log lines (no
carriage returns, so they read well in job logs), at most every few seconds and once at
the end. Lines go to the ``dsparse.progress`` logger, so ``dsparse --quiet`` hides them
and ``--json`` output on stdout stays clean."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("dsparse.progress")


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class ProgressMeter:
    """Counts finished units of a known total and logs rate and ETA.

    Args:
        label: what is being done, e.g. ``"synthetic: writing"``.
        total: units in all (the ETA needs it).
        unit: what is counted, e.g. ``"samples"``.
        every: seconds between lines (the last unit always logs).
        enabled: False makes the meter silent (library callers that report otherwise).
    """

    def __init__(self, label: str, total: int, unit: str = "samples", every: float = 5.0, enabled: bool = True):
        self.label, self.total, self.unit, self.every, self.enabled = label, total, unit, every, enabled
        self.done = 0
        self.start = self.last = time.perf_counter()

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def add(self, count: int = 1, note: str = "") -> None:
        self.done += count
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            rate = self.rate
            eta = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
            log.info("%s: %d/%d %s, %.1f %s/s, ETA %s%s", self.label, self.done, self.total, self.unit, rate,
                     self.unit, eta, f", {note}" if note else "")
