"""The Serve app's typed arguments, YAML files and session-affinity choice, without starting Ray."""

import pytest
import yaml

pytest.importorskip("ray.serve")

from pydantic import ValidationError  # noqa: E402

from test_serve_helpers import REPO  # noqa: E402  (puts the repo root on sys.path)

from deployments.config import AppArgs, replicas_options  # noqa: E402
from deployments.router import auth_notice, classify  # noqa: E402
from rtedit.errors import InvalidImage, UnsupportedRequest  # noqa: E402
from rtedit.transport import PayloadTooLarge  # noqa: E402


@pytest.mark.parametrize("name", ["serve.yaml", "serve-gpu.yaml", "serve-session.yaml"])
def test_yaml_files_validate(name):
    spec = yaml.safe_load((REPO / "deployments" / name).read_text())
    app = spec["applications"][0]
    assert app["import_path"] == "deployments.app:build_app"
    assert "request_timeout_s" not in spec.get("http_options", {})  # it would cut websockets
    args = AppArgs.model_validate(app["args"])
    # The session student is exported by jobs.distill: until it is committed its folder stays a relative name.
    student = REPO / "models" / "toy-editor-session"
    student_model = str(student) if (student / "model_index.json").is_file() else "models/toy-editor-session"
    expected = {"serve.yaml": str(REPO / "models" / "toy-editor"), "serve-gpu.yaml": "klein-4b-random",
                "serve-session.yaml": student_model}[name]
    assert args.editor_config().model == expected


def test_relative_model_folders_resolve_from_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # serve run from elsewhere: replicas must still find the folder
    assert AppArgs().editor_config().model == str(REPO / "models" / "toy-editor")
    assert AppArgs(engine={"model": "tiny"}).editor_config().model == "tiny"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "model_index.json").write_text("{}")
    assert AppArgs(engine={"model": "mine"}).editor_config().model == str(tmp_path / "mine")
    assert AppArgs(engine={"model": "org/name"}).editor_config().model == "org/name"  # a hub id stays one


def test_gpu_yaml_shares_gpus_and_autoscales():
    args = AppArgs.model_validate(yaml.safe_load((REPO / "deployments" / "serve-gpu.yaml").read_text())
                                  ["applications"][0]["args"])
    options = replicas_options(args.editor)
    per_replica = options["ray_actor_options"]["num_gpus"]
    assert per_replica * args.editor.replicas_per_gpu + args.text_encoder.num_gpus <= 1.0
    assert options["autoscaling_config"]["max_replicas"] > options["autoscaling_config"]["min_replicas"]
    assert "num_replicas" not in options


@pytest.mark.parametrize(
    "args, field",
    [
        ({"editor": {"num_replicas": 0}}, "num_replicas"),
        ({"editor": {"colour": 1}}, "colour"),
        ({"router": {"limits": {"max_frame_bytes": 32 * 2**20}}}, "max_frame_bytes"),
        ({"router": {"limits": {"bogus": 1}}}, "bogus"),
        ({"router": {"defaults": {"format": "gif"}}}, "format"),
        ({"engine": {"model": "tiny", "max_steps": 0}}, "max_steps"),
        ({"editor": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "min_replicas"),
        ({"editor": {"min_frame_ms": float("nan")}}, "min_frame_ms"),
    ],
)
def test_bad_arguments_name_the_field(args, field):
    with pytest.raises((ValidationError, ValueError)) as info:
        AppArgs.model_validate(args)
    assert field in str(info.value)


def test_affinity_router_sends_a_request_to_its_named_replica_or_fails_it():
    """The router names the replica it admitted a session on (admission's assignment table, not a hash); a replica
    that is gone fails the request at once with ReplicaGone, never another replica, never Serve's retry loop."""
    import asyncio
    import types

    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.request_router import PendingRequest

    from deployments.affinity import ReplicaGone, SessionAffinityRouter

    def replica(rid):
        return types.SimpleNamespace(replica_id=types.SimpleNamespace(unique_id=rid))

    async def route() -> tuple:
        router = SessionAffinityRouter(DeploymentID(name="Editor", app_name="rtedit"), DeploymentHandleSource.UNKNOWN)
        router.initialize_state()
        candidates = [replica("a1"), replica("b2")]

        def request(i, **kwargs):
            return PendingRequest(args=[], kwargs=kwargs, metadata=RequestMetadata(request_id=f"r{i}",
                                                                                   internal_request_id=f"i{i}"))
        named, unnamed, gone = request(1, replica="b2"), request(2), request(3, replica="c3")
        chosen = await router.choose_replicas(candidates, named)
        anyone = await router.choose_replicas(candidates, unnamed)
        await router.choose_replicas(candidates, gone)
        return chosen, anyone, gone.future.exception()

    chosen, anyone, failure = asyncio.run(route())
    assert [[r.replica_id.unique_id for r in rank] for rank in chosen] == [["b2"]]
    assert len(anyone) == 1 and len(anyone[0]) == 2
    assert isinstance(failure, ReplicaGone) and failure.replica == "c3" and not failure.died


def test_errors_map_to_statuses_and_auth_notice():
    assert classify(PayloadTooLarge("too_large", "big"))[0] == 413
    assert classify(InvalidImage("bad"))[0] == 400
    assert classify(UnsupportedRequest("steps"))[0] == 422
    assert classify(RuntimeError("x"))[0] == 500
    assert "no API key configured" in auth_notice(None)
    assert "API key required" in auth_notice("k")


def test_gpu_yaml_engine_runs_the_fast_path(taef2_weights):
    """serve-gpu.yaml's engine section builds an editor with every fast-path piece on, serves its buckets and
    refuses other sizes. CPU stand-ins: the tiny preset with two double blocks (DBCache needs a block to skip),
    the eager compile backend, and one 64-px bucket (the YAML's 512/1024 warm-ups take minutes on a CPU)."""
    import dataclasses

    import numpy as np
    import torch

    from conftest import tiny_transformer
    from rtedit.config import ShapeBuckets
    from rtedit.editor import Editor
    from rtedit.errors import InvalidRequest
    from rtedit.presets import build_preset

    engine = yaml.safe_load((REPO / "deployments" / "serve-gpu.yaml").read_text())["applications"][0]["args"]["engine"]
    config = AppArgs(engine={**engine, "model": "tiny", "dtype": "float32", "device": "cpu",
                             "taef2_dir": str(taef2_weights)}).editor_config()
    assert config.autoencoder == "taef2" and config.select_attention and config.dbcache.enabled
    assert config.compile.enabled and (512, 512) in config.buckets.sizes and config.cuda_graphs
    # CUDA graphs have their own GPU tests (tests/test_cuda_graphs.py); a CPU editor refuses them.
    config = dataclasses.replace(config, compile=dataclasses.replace(config.compile, backend="eager"),
                                 buckets=ShapeBuckets(sizes=((64, 64),), references=config.buckets.references),
                                 cuda_graphs=False)
    bundle = build_preset("tiny", torch.device("cpu"), torch.float32)
    bundle.transformer = tiny_transformer(num_layers=2, num_single_layers=2)
    editor = Editor(bundle, config)
    stats = editor.stats()
    assert any(row["chosen"] for row in stats["attention"]["probe"])
    assert stats["dbcache"]["policy"] == "dynamic"
    assert set(stats["compile"]["branches"]) == {"transformer", "vae_encoder", "vae_decoder"}
    assert editor.codec.taef2 is not None
    image = np.full((72, 100, 3), 128, np.uint8)
    assert editor.edit(image, "make it winter", height=64, width=64).array.shape == (64, 64, 3)
    with pytest.raises(InvalidRequest):
        editor.edit(image, "make it winter", height=96, width=96)


def test_engine_is_parsed_once_into_a_typed_editor_config(tmp_path, monkeypatch):
    """Replicas get the EditorConfig AppArgs built (no dict each re-parses); a config object is accepted as is."""
    from rtedit.config import EditorConfig, PromptConfig

    args = AppArgs(engine={"model": "tiny", "prompt": {"cache_entries": 8}})
    assert isinstance(args.engine, EditorConfig) and args.engine.prompt.cache_entries == 8
    assert args.editor_config() is args.engine
    monkeypatch.chdir(tmp_path)
    given = AppArgs(engine=EditorConfig(model="models/toy-editor", prompt=PromptConfig(max_chars=100)))
    assert given.engine.model == str(REPO / "models" / "toy-editor") and given.frame_limits().max_prompt_chars == 100
    with pytest.raises(ValidationError, match="unknown field"):
        AppArgs(engine={"model": "tiny", "promt": {}})


def test_remote_errors_keep_their_engine_status():
    """An engine error that crossed from a replica as data maps like the local one; a dead device is a 503."""
    from deployments.router import RemoteError

    def status(type_name: str) -> int:
        return classify(RemoteError({"type": type_name, "code": "c", "message": "m"}))[0]

    assert [status(t) for t in ("InvalidImage", "UnsupportedRequest", "EngineDead", "FrameError", "RuntimeError")] \
        == [400, 422, 503, 400, 500]
