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


# ---- the metrics export port, one number everywhere ------------------------------------------------------------

REPO = CLUSTER.parent
PROMETHEUS = REPO / "deployments" / "observability" / "prometheus.yml"


def test_every_node_exports_metrics_on_the_port_prometheus_scrapes(raw):
    """Ray's metrics port was random: Prometheus, and the dashboard's Metrics tab behind it, found nothing."""
    import re

    scrape = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    targets = [t for job in scrape for config in job.get("static_configs", []) for t in config["targets"]]
    ports = {int(target.rsplit(":", 1)[1]) for target in targets}
    assert len(ports) == 1
    port = ports.pop()
    for commands in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):
        starts = [c for c in commands if "ray start" in c]
        assert starts and all(f"--metrics-export-port={port}" in c for c in starts), starts
    first_command = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("\n", 1)[0]
    assert re.search(rf"ray start --head .*--metrics-export-port[ =]{port}\b", first_command), first_command


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


def test_check_cluster_fits_says_what_is_needed_free_and_held(monkeypatch):
    """The numbers a job that does not fit stops with, on a fixed cluster and on an autoscaling one (Ray's state
    API stands in for a cluster here; test_serve_dashboard runs it against a real one beside Serve)."""
    from ray._private import state

    from jobs import runtime
    from rtedit.train.config import load_job_config

    config = load_job_config(CLUSTER.parent / "jobs" / "configs" / "tiny.yaml", ["scaling.num_workers=2"])
    monkeypatch.setattr(runtime, "RESOURCES_SETTLE_S", 0.0)  # nothing is being released here
    monkeypatch.setattr(state.state, "get_max_resources_from_cluster_config", lambda: None)
    monkeypatch.setattr(state, "total_resources_per_node", lambda: {"a": {"CPU": 2.0, "memory": 1e9}})
    monkeypatch.setattr(state, "available_resources_per_node", lambda: {"a": {"CPU": 0.0, "memory": 1e9}})
    with pytest.raises(runtime.ClusterTooSmall) as refused:
        runtime.check_cluster_fits(config)
    assert str(refused.value).startswith("the job needs 2 worker(s) x 1 CPU = 2 CPU (PACK), but the cluster has 2 CPU "
                                         "in all and 0 CPU free on 1 node(s), so 2 worker(s) could not start")
    assert "holds 2 CPU" in str(refused.value)
    monkeypatch.setattr(state, "available_resources_per_node", lambda: {"a": {"CPU": 2.0}})
    runtime.check_cluster_fits(config)  # fits: no error

    # An autoscaling cluster adds nodes on demand: only more than it can ever have is refused at start.
    monkeypatch.setattr(state, "available_resources_per_node", lambda: {"a": {"CPU": 0.0}})
    monkeypatch.setattr(state.state, "get_max_resources_from_cluster_config", lambda: {"CPU": 8, "GPU": 0})
    runtime.check_cluster_fits(config)
    gpu = load_job_config(CLUSTER.parent / "jobs" / "configs" / "tiny.yaml", ["scaling.use_gpu=true"])
    with pytest.raises(runtime.ClusterTooSmall, match="can grow to 0 GPU at most"):
        runtime.check_cluster_fits(gpu)


def test_check_cluster_fits_waits_out_a_just_finished_jobs_release(monkeypatch):
    """A rerun right after a job sees its workers' CPUs as held for a moment: that is no reason to fail."""
    from ray._private import state

    from jobs import runtime
    from rtedit.train.config import load_job_config

    config = load_job_config(CLUSTER.parent / "jobs" / "configs" / "tiny.yaml", ["scaling.num_workers=2"])
    views = iter([{"a": {"CPU": 0.0}}, {"a": {"CPU": 2.0}}])
    monkeypatch.setattr(state.state, "get_max_resources_from_cluster_config", lambda: None)
    monkeypatch.setattr(state, "available_resources_per_node", lambda: next(views))
    runtime.check_cluster_fits(config)  # the second look finds the CPUs free
