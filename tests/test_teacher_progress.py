"""The teacher's latent precompute reports its progress: counts, rate and time left at most every 10 s over all its
passes, and the lines show in a process where nothing configured logging (the Ray task jobs.train_teacher runs
build_cache in), where they used to vanish and the 3-minute precompute printed nothing."""

from __future__ import annotations

import logging
import subprocess
import sys

from rtedit.train.tasks.teacher import EncodeProgress


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_are_throttled_and_carry_counts_and_rate(caplog):
    clock = FakeClock()
    progress = EncodeProgress("train", total=1000, every_s=10, clock=clock, log=logging.getLogger("progress-test"))
    with caplog.at_level(logging.INFO, logger="progress-test"):
        for _ in range(8):  # 8 batches of 100 sources, 2 s each
            clock.now += 2
            progress.add(100, "sources")
        clock.now += 2
        progress.add(200, "targets")
    lines = [r.getMessage() for r in caplog.records]
    # The first batch, one line 10 s later, and the end; not one line per batch.
    assert [line.split(": ", 1)[1].split(" images")[0] for line in lines] == ["100 / 1000", "600 / 1000",
                                                                              "1000 / 1000"]
    assert "(60%; sources), 50 images/s, 12 s elapsed, 8 s left" in lines[1]
    assert lines[2].endswith("(100%; targets), 56 images/s, 18 s elapsed, 0 s left")


def test_progress_shows_where_nothing_configured_logging():
    code = ("from rtedit.train.tasks.teacher import EncodeProgress\n"
            "EncodeProgress('eval', total=4).add(4, 'sources')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "latent cache eval: 4 / 4 images (100%; sources)" in result.stderr
