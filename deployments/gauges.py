"""Gauges that stay in Prometheus while their value holds.

Ray 2.60's metrics recorder keeps a gauge's last value for two report intervals only, so that series of dead workers
age out (ray/_private/telemetry/open_telemetry_metric_recorder.py). A gauge set on events, after a frame or a logged
step, therefore vanishes from Prometheus, and from the Grafana panels over it, whenever the events pause. A
GaugeKeeper calls the owner's refresh (which sets its gauges again) every half report interval from a daemon thread.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable

logger = logging.getLogger(__name__)

REPORT_INTERVAL_ENV = "RAY_metrics_report_interval_ms"
DEFAULT_REPORT_INTERVAL_MS = 10_000  # Ray's own default for that variable


def refresh_period_s() -> float:
    """Half of Ray's metrics report interval (each gauge is then set at least twice within its two-interval TTL)."""
    raw = os.environ.get(REPORT_INTERVAL_ENV, str(DEFAULT_REPORT_INTERVAL_MS))
    try:
        ms = int(raw)
    except ValueError:
        raise ValueError(f"{REPORT_INTERVAL_ENV} must be an integer number of milliseconds, got {raw!r}") from None
    return max(0.25, ms / 2000)


class GaugeKeeper:
    """Calls `refresh` every `period_s` (default refresh_period_s()) on a daemon thread until close()."""

    def __init__(self, refresh: Callable[[], None], period_s: float | None = None, name: str = "rtedit-gauges"):
        self.period_s = refresh_period_s() if period_s is None else period_s
        self.refreshes = 0
        self._refresh = refresh
        self._stop = threading.Event()
        self._failed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._refresh()
                self.refreshes += 1
                self._failed = False
            except Exception:  # a metrics hiccup must not end the thread; said once per run of failures
                if not self._failed:
                    logger.exception("refreshing the gauges failed; retrying every %.2f s", self.period_s)
                self._failed = True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
