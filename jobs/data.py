"""Parquet edit data through Ray Data for jobs: bad rows are dropped inside the read, counted across all read tasks
by a small actor, and logged; they never fail the job."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray

from rtedit.train.data import ValidationReport, clean_table

logger = logging.getLogger("jobs.data")


@ray.remote(num_cpus=0)
class BadRowCounter:
    """Sums the validation reports of every read task."""

    def __init__(self) -> None:
        self.report = ValidationReport()

    def add(self, report: dict[str, Any]) -> None:
        part = ValidationReport(total=report["total"], valid=report["valid"])
        part.bad.update(report["bad_by_reason"])
        part.bad_ids.extend(report["bad_ids"])
        self.report.merge(part)

    def get(self) -> dict[str, Any]:
        return self.report.as_dict()


def read_dataset(path: str | Path, kind: str = "edit", decode: bool = True, counter=None,
                 batch_size: int = 256) -> ray.data.Dataset:
    """A Ray Dataset of the valid rows of a Parquet folder; pass a BadRowCounter to learn what was skipped."""

    def clean(table):
        kept, report = clean_table(table, kind, decode)
        if report.num_bad:
            logger.warning("skipped %d of %d %s rows: %s", report.num_bad, report.total, kind, dict(report.bad))
        if counter is not None:
            ray.get(counter.add.remote(report.as_dict()))  # waited on, so the count is complete when reading ends
        return kept

    return ray.data.read_parquet(str(path)).map_batches(clean, batch_format="pyarrow", batch_size=batch_size)
