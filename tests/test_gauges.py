"""deployments.gauges: the keeper that sets event-driven gauges again before Ray ages them out."""

import threading
import time

import pytest

from deployments import gauges


def test_refresh_period_is_half_the_report_interval(monkeypatch):
    monkeypatch.delenv(gauges.REPORT_INTERVAL_ENV, raising=False)
    assert gauges.refresh_period_s() == 5.0
    monkeypatch.setenv(gauges.REPORT_INTERVAL_ENV, "1000")
    assert gauges.refresh_period_s() == 0.5
    monkeypatch.setenv(gauges.REPORT_INTERVAL_ENV, "10")
    assert gauges.refresh_period_s() == 0.25  # never a busy loop
    monkeypatch.setenv(gauges.REPORT_INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match="milliseconds"):
        gauges.refresh_period_s()


def test_keeper_refreshes_until_closed_and_survives_a_failing_refresh(caplog):
    calls, failed_once = [], threading.Event()

    def refresh():
        calls.append(time.monotonic())
        if not failed_once.is_set():
            failed_once.set()
            raise RuntimeError("metrics agent away")

    keeper = gauges.GaugeKeeper(refresh, period_s=0.02)
    deadline = time.monotonic() + 5
    while len(calls) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    keeper.close()
    assert len(calls) >= 5 and keeper.refreshes == len(calls) - 1  # the first call raised, the thread went on
    assert "refreshing the gauges failed" in caplog.text
    after = len(calls)
    time.sleep(0.1)
    assert len(calls) == after  # closed: no more refreshes
