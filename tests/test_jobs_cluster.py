"""cluster.yaml passes the Ray cluster launcher's own preparation and schema validation."""

import copy
from pathlib import Path

import pytest
import yaml

pytest.importorskip("jsonschema")
util = pytest.importorskip("ray.autoscaler._private.util")

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_passes_ray_schema(raw):
    config = util.prepare_config(copy.deepcopy(raw))
    util.validate_config(config)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [name for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu_types) >= 1
    assert sum(types[n]["max_workers"] for n in gpu_types) <= config["max_workers"]
    assert any("--dashboard-host=0.0.0.0" in c for c in config["head_start_ray_commands"])


def test_schema_check_is_real(raw):
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_a10g_x1"]["gpus"] = 1  # not a node-type field
    with pytest.raises(Exception, match="gpus"):
        util.validate_config(util.prepare_config(broken))
    broken = copy.deepcopy(raw)
    broken["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        util.validate_config(util.prepare_config(broken))


# ---- whether a job's workers fit the cluster (jobs.runtime.unplaced_workers) ----------------------------------


@pytest.mark.parametrize("bundle, workers, strategy, nodes, unplaced", [
    ({"CPU": 1}, 2, "PACK", [{"CPU": 2.0}], 0),                        # the README's job beside serve.yaml
    ({"CPU": 1}, 2, "PACK", [{"CPU": 0.0}], 2),                        # Serve holds 2.0 of 2.0 CPUs
    ({"CPU": 1}, 3, "PACK", [{"CPU": 1.5}, {"CPU": 1.0}], 1),          # fractions left on two nodes
    ({"CPU": 0.5}, 2, "PACK", [{"CPU": 0.5}, {"CPU": 0.5}], 0),
    ({"CPU": 1}, 2, "STRICT_PACK", [{"CPU": 1.0}, {"CPU": 1.0}], 2),   # free in all, but on no single node
    ({"CPU": 1}, 2, "STRICT_SPREAD", [{"CPU": 4.0}], 1),               # one node for two workers
    ({"CPU": 8, "GPU": 1}, 2, "PACK", [{"CPU": 192.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 8.0}], 1),  # CPU short
    ({"CPU": 1, "GPU": 1}, 1, "PACK", [{"CPU": 8.0}], 1),              # a GPU job on a CPU-only cluster
])
def test_unplaced_workers(bundle, workers, strategy, nodes, unplaced):
    from jobs.runtime import unplaced_workers

    assert unplaced_workers(bundle, workers, strategy, nodes) == unplaced
