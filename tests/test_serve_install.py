"""`deployments` is installed with rtedit: `serve status` (which imports the editor's request router class in its own
process) and Serve's build task import it from any directory without PYTHONPATH.

`serve status` used to fail with "No module named 'deployments'" unless run with PYTHONPATH=. from the checkout.
"""

import os
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("ray.serve")

from test_serve_helpers import REPO  # noqa: E402

PROBE = """
import sys
import yaml
from ray._common.utils import import_attr
from ray.serve.config import RequestRouterConfig

for path in sys.argv[1:]:
    for app in yaml.safe_load(open(path))["applications"]:
        import_attr(app["import_path"])  # what Serve's build task does on a worker
# What `serve status` does with the editor deployment's config.
router = RequestRouterConfig(request_router_class="deployments.affinity:SessionAffinityRouter")
import deployments

print(deployments.__file__)
"""


def test_serve_status_and_serve_workers_import_deployments_from_any_directory(tmp_path):
    yamls = sorted(str(p) for p in (REPO / "deployments").glob("serve*.yaml"))
    assert len(yamls) >= 3 and all(yaml.safe_load(open(p))["applications"] for p in yamls)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PROBE, *yamls], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(REPO / "deployments" / "__init__.py")
