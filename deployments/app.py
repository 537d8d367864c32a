"""Builds the Serve application from typed arguments: one bind injecting TextEncoder and Editor into the Router.

    serve run deployments/serve.yaml          # the trained toy editor (models/toy-editor) on CPU
    serve run deployments.app:build_app       # same, defaults
"""

from __future__ import annotations

from ray import serve
from ray.serve.config import RequestRouterConfig

from deployments.affinity import SessionAffinityRouter
from deployments.config import AppArgs, replicas_options
from deployments.editor import EditorDeployment
from deployments.router import Router
from deployments.text_encoder import TextEncoder


def build_app(args: AppArgs) -> serve.Application:
    """The graph Router(TextEncoder, Editor) for `args` (a dict from YAML is validated into AppArgs by Serve).

    Every deployment gets the one typed EditorConfig AppArgs parsed; the router derives its limits from it.
    """
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    engine = args.engine
    encoder_actor = {"num_cpus": args.text_encoder.num_cpus}
    if args.text_encoder.num_gpus:
        encoder_actor["num_gpus"] = args.text_encoder.num_gpus
    encoder = TextEncoder.options(
        num_replicas=args.text_encoder.num_replicas, ray_actor_options=encoder_actor,
    ).bind(engine, args.text_encoder)
    editor = EditorDeployment.options(
        request_router_config=RequestRouterConfig(request_router_class=SessionAffinityRouter),
        **replicas_options(args.editor),
    ).bind(engine, args.editor, encoder)
    return Router.options(
        num_replicas=args.router.num_replicas,
        max_ongoing_requests=args.router.max_ongoing_requests,
        ray_actor_options={"num_cpus": args.router.num_cpus},
    ).bind(encoder, editor, args.router, engine)
