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
