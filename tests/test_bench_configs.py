"""bench/frame_latency.py's rows as configs, without loading a model: its serving row is the config a Serve replica
of deployments/serve-gpu.yaml is built from, and every other row adds one optimization to the row before it."""

import dataclasses
import importlib.util
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("ray.serve")

from test_serve_helpers import REPO  # noqa: E402  (puts the repo root on sys.path)

from deployments.config import AppArgs  # noqa: E402
from deployments.editor import replica_editor  # noqa: E402
from rtedit.config import EditorConfig, load_engine_config  # noqa: E402
from rtedit.editor import Editor  # noqa: E402

SERVE_GPU = REPO / "deployments" / "serve-gpu.yaml"

# Each row: the row it builds on, and the config fields (dotted, leaves) it may change.
STEPS = {
    "+attention": ("exact", {"select_attention"}),
    "+compile": ("+attention", {"compile.enabled", "buckets.sizes"}),
    "+dbcache dynamic": ("+compile", {"dbcache.enabled"}),
    "+dbcache static": ("+dbcache dynamic", {"dbcache.policy"}),
    "+taef2 (dbcache dynamic)": ("+dbcache dynamic", {"autoencoder"}),
    "+taef2 (dbcache static)": ("+taef2 (dbcache dynamic)", {"dbcache.policy"}),
}


@pytest.fixture(scope="module")
def bench():
    # bench/ is no package: the module is loaded from its path, as the lead runs it.
    spec = importlib.util.spec_from_file_location("frame_latency", REPO / "bench" / "frame_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Captured(Exception):
    """Stops replica_editor at the point it would build the model."""


def deployment_config(monkeypatch, engine_overrides: dict, merged) -> EditorConfig:
    """The EditorConfig EditorDeployment builds its editor from, for serve-gpu.yaml plus the same overrides the
    bench applies: replica_editor runs as in a replica, and Editor.from_config records its argument and stops."""
    args = yaml.safe_load(SERVE_GPU.read_text())["applications"][0]["args"]
    args["engine"] = merged(args["engine"], engine_overrides)
    app = AppArgs.model_validate(args)
    seen = []

    def capture(config):
        seen.append(config)
        raise _Captured

    monkeypatch.setattr(Editor, "from_config", staticmethod(capture))
    with pytest.raises(_Captured):
        replica_editor(app.engine, app.editor)
    return seen[0]


def changed(a, b, prefix: str = "") -> set[str]:
    """Dotted names of the leaf fields in which two configs differ."""
    out = set()
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x):
            out |= changed(x, y, f"{prefix}{f.name}.")
        elif x != y:
            out.add(prefix + f.name)
    return out


@pytest.mark.parametrize("cli", [{}, {"compile_backend": "eager", "taef2_dir": "/elsewhere/taef2"},
                                 {"model": "/models/other-klein"}])
def test_serving_row_is_the_replica_config(bench, monkeypatch, cli):
    overrides = bench.engine_overrides(**cli)
    row = bench.row_configs(bench.serving_config(overrides), 512)[bench.SERVING]
    replica = deployment_config(monkeypatch, overrides, bench.merged)
    assert type(row) is type(replica) is EditorConfig
    assert row == replica
    assert not row.text_encoder
    if not cli:  # the GPU run: serve-gpu.yaml's engine as it is, nothing overridden
        assert overrides == {}
        assert row == load_engine_config(SERVE_GPU).for_replica()
    else:
        assert changed(row, load_engine_config(SERVE_GPU).for_replica()) == {
            {"compile_backend": "compile.backend", "taef2_dir": "taef2_dir", "model": "model"}[k] for k in cli}


@pytest.mark.parametrize("size", [512, 1024])
def test_each_row_adds_one_optimization(bench, size):
    rows = bench.row_configs(bench.serving_config(), size)
    assert tuple(rows) == bench.OURS + bench.VARIANTS
    rows = {name: rows[name] for name in bench.OURS}
    assert set(rows) == {"exact", bench.SERVING, *STEPS}
    exact = rows["exact"]
    assert not (exact.select_attention or exact.dbcache.enabled or exact.compile.enabled)
    assert exact.autoencoder == "vae" and exact.buckets.sizes == () and not exact.text_encoder
    for name, (before, fields) in STEPS.items():
        assert changed(rows[name], rows[before]) == fields, name
    assert rows["+compile"].buckets.sizes == ((size, size),)
    assert rows["+dbcache dynamic"].dbcache.policy == "dynamic" and rows["+dbcache static"].dbcache.policy == "static"
    # The ablation ends at the serving configuration but for its extra bucket and its CUDA graphs.
    assert changed(rows[bench.SERVING], rows["+taef2 (dbcache dynamic)"]) == {"buckets.sizes", "cuda_graphs"}
    assert (size, size) in rows[bench.SERVING].buckets.sizes


def test_command_line_flags_still_parse(bench):
    args = bench.parser().parse_args(
        ["--size", "1024", "--steps", "2", "--frames", "5", "--warmup", "1", "--rows", "ours", "--only", "exact",
         bench.SERVING, "--parity-frames", "3", "--reference", "r.json", "--json", "o.json", "--model", "tiny",
         "--compile-backend", "eager", "--taef2-dir", "/t"])
    assert args.only == ["exact", bench.SERVING] and bench.frame_counts("exact", args) == (5, 1)
    assert bench.frame_counts("+compile", args) == (0, 0)


@pytest.mark.parametrize("top", ["0", "-3"])
def test_profile_frame_refuses_a_kernel_count_below_one(top):
    # A negative --top would slice the kernel list from its end and print a silent subset: refused before any GPU work.
    run = subprocess.run([sys.executable, str(REPO / "bench" / "profile_frame.py"), "--top", top],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and f"--top must be at least 1 (a count of kernels), got {top}" in run.stderr


@pytest.mark.parametrize("repeats", ["0", "-5"])
def test_forward_kernels_refuses_an_attention_repeat_count_below_one(repeats):
    run = subprocess.run([sys.executable, str(REPO / "bench" / "forward_kernels.py"), "--attention-repeats", repeats],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and f"--attention-repeats must be at least 1, got {repeats}" in run.stderr


@pytest.mark.parametrize("item, message", [("nokey", "--set must look like section.key=value, got 'nokey'"),
                                           ("router.frame_channel=[1", "cannot parse '[1' as a YAML value"),
                                           ("router.frame_channel=carrier-pigeon", "frame_channel")])
def test_serve_load_refuses_a_bad_override_before_it_starts_a_cluster(item, message):
    run = subprocess.run([sys.executable, str(REPO / "bench" / "serve_load.py"), "--set", item],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and message in run.stderr, run.stderr[-1500:]
    assert "Started a local Ray instance" not in run.stderr


def test_frame_latency_refuses_a_negative_stack_dump_period():
    bad = subprocess.run([sys.executable, str(REPO / "bench" / "frame_latency.py"), "--dump-stacks-every", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--dump-stacks-every >= 0" in bad.stderr and "-1.0" in bad.stderr, bad.stderr


def test_each_variant_changes_only_reuse_graphs_and_fp8(bench):
    serving = bench.serving_config()
    rows = bench.row_configs(serving, 512)
    for name in bench.VARIANTS:
        row = rows[name]
        assert changed(row, serving) <= {"dbcache.enabled", "dbcache.policy", "cuda_graphs", "fp8.enabled"}, name
        assert row.cuda_graphs == ("graphs" in name) and row.fp8.enabled == ("fp8" in name)
        assert row.dbcache.enabled == ("static" in name)
        assert not row.dbcache.enabled or row.dbcache.policy == "static"
