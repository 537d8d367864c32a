"""Edit data read through Ray Data: bad rows are dropped and counted across read tasks."""

import os

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")

from jobs.data import BadRowCounter, read_dataset  # noqa: E402
from rtedit.train import data  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_data_read_drops_and_counts_bad_rows(ray_cluster, tmp_path):
    png = data.encode_png(np.zeros((8, 8, 3), np.uint8))
    rows = []
    for i in range(12):
        e = data.EditExample(id=f"e{i}", source=png, instruction="invert it", family="invert", target=png)
        if i % 4 == 1:
            e.target = b"broken"
        if i == 6:
            e.instruction = ""
        rows.append(e)
    data.write_edit_examples(tmp_path / "d", rows, rows_per_file=5)  # three files, several read tasks
    counter = BadRowCounter.remote()
    ds = read_dataset(tmp_path / "d", counter=counter, batch_size=4)
    ids = sorted(r["id"] for r in ds.take_all())
    assert ids == sorted(f"e{i}" for i in range(12) if i % 4 != 1 and i != 6)
    report = ray.get(counter.get.remote())
    assert report["total"] == 12 and report["valid"] == 8
    assert report["bad_by_reason"] == {"undecodable:target": 3, "empty:instruction": 1}
