"""`rtedit`: the command line over the same Editor the services use."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rtedit.errors import ConfigError, EditError
from rtedit.paths import REPO_ROOT
from rtedit.transport import OUTPUT_FORMATS, FrameLimits

# The default is what `serve run deployments/serve.yaml` serves: the same engine section, model and step limit.
SERVED_YAML = REPO_ROOT / "deployments" / "serve.yaml"

DESCRIPTION = """rtedit: realtime instruction-based image editing on FLUX.2 [klein].

commands:
  edit   edit one image with an instruction and write the result; prints the stage timings
  info   load a model and print what it is (name, device, dtype, random weights or not)

Without --config and --model it edits with what `serve run deployments/serve.yaml` serves: the trained toy editor
(models/toy-editor, CPU, 128x128) and the server's step limit. Other models (--model): 'tiny' (random weights,
CPU, seconds), 'klein-4b-random' (real klein 4B shapes, random weights, needs a GPU), or a local diffusers folder /
hub id of a FLUX.2 klein model.

Any serving configuration can be reproduced with --config: a Serve YAML (its applications[0].args.engine, e.g.
deployments/serve-gpu.yaml) or a bare engine-section YAML; --model, --device and --dtype override it.
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="a Serve YAML (applications[0].args.engine) or an engine-section YAML to build the editor from")
    p.add_argument("--model", default=None, help="preset name, diffusers folder or hub id (default: the --config's "
                                                 "model, models/toy-editor without one)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the model's own choice)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights dtype")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtedit", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{edit,info}")

    edit = sub.add_parser("edit", help="edit one image with an instruction", description="Edit one image and write it; prints stage timings in ms.")
    _add_model_args(edit)
    edit.add_argument("--image", required=True, type=Path, help="input image (JPEG, PNG or WebP)")
    edit.add_argument("--prompt", required=True, help="the instruction, e.g. 'make it winter'")
    edit.add_argument("--out", required=True, type=Path, help="output file; its extension picks JPEG, PNG or WebP")
    edit.add_argument("--reference", action="append", type=Path, default=[], help="a reference image (repeatable)")
    edit.add_argument("--steps", type=int, default=2, help="denoising steps, 1 up to the server's limit for the "
                                                           "config (8 unless its router.limits say less; default: 2)")
    edit.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    edit.add_argument("--height", type=int, default=None, help="output height (default: the input's, floored to 16)")
    edit.add_argument("--width", type=int, default=None, help="output width (default: the input's, floored to 16)")

    info = sub.add_parser("info", help="print what a model is", description="Load a model and print its description as JSON.")
    _add_model_args(info)
    return parser


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SystemExit(f"rtedit: cannot read {what} {path}: {exc.strerror or exc}") from None


def _editor_config(args: argparse.Namespace):
    """The --config file's engine section (deployments/serve.yaml's without one), with --model/--device/--dtype on
    top."""
    from rtedit.config import load_engine_config

    overrides = {k: v for k, v in (("model", args.model), ("device", args.device), ("dtype", args.dtype)) if v}
    # The CLI always has the text encoder: it takes the instruction as text.
    return load_engine_config(args.config or SERVED_YAML, {**overrides, "text_encoder": True})


def step_limit(config_path: Path | None, engine_max_steps: int) -> int:
    """The most steps the server of `config_path` (deployments/serve.yaml without one) accepts: its router.limits
    max_steps (FrameLimits' default unless set) within the engine's max_steps, as deployments/limits.py derives it;
    a bare engine-section YAML gets the default router limit."""
    import yaml

    path = config_path or SERVED_YAML
    data = yaml.safe_load(path.read_text()) or {}
    router_limits: dict = {}
    if isinstance(data, dict) and isinstance(data.get("applications"), list) and data["applications"]:
        router = ((data["applications"][0] or {}).get("args") or {}).get("router") or {}
        router_limits = router.get("limits") or {}
    configured = router_limits.get("max_steps", FrameLimits().max_steps)
    if not isinstance(configured, int) or isinstance(configured, bool):
        raise ConfigError(f"{path}: router.limits.max_steps must be an int, got {configured!r}")
    return min(configured, engine_max_steps)


def size_warning(model: str, image: bytes, height: int | None, width: int | None) -> str | None:
    """A warning when the edit is off the sizes the model's rtedit.json lists (it would likely come out wrong)."""
    import io

    import PIL.Image

    from rtedit.presets import model_sidecar, nearest_size, size_mismatch

    sizes = model_sidecar(model).sizes
    if not sizes:
        return None
    try:
        with PIL.Image.open(io.BytesIO(image)) as img:  # the header only
            image_width, image_height = img.size
    except Exception:  # noqa: BLE001 - not an image: the editor refuses it with InvalidImage and the reason
        return None
    reason = size_mismatch(sizes, image_height, image_width, height, width)
    if reason is None:
        return None
    best_h, best_w = nearest_size(sizes, height or image_height, width or image_width)
    return (f"rtedit: warning: {reason}; the edit will likely come out wrong: give it a {best_h}x{best_w} image "
            "(the server answers such a request at the model's size)")


def _quiet_loading() -> None:
    """No "Loading pipeline components" / "Loading weights" bars: a normal load prints nothing; failures still do."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            return _info(args)
        return _edit(args)
    except EditError as exc:
        print(f"rtedit: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def _info(args: argparse.Namespace) -> int:
    from rtedit.editor import Editor

    config = _editor_config(args)
    _quiet_loading()
    editor = Editor.from_config(config)
    # The engine section printed back is what the editor was built from: enough to rebuild it.
    print(json.dumps({**editor.model_info, "engine": config.to_dict(), "fast_path": {
        k: editor.stats()[k] for k in ("attention_backend", "warm_up")}}, indent=2, default=str))
    return 0


def _edit(args: argparse.Namespace) -> int:
    # The arguments and files are checked before torch is imported: a typo fails at once.
    fmt = args.out.suffix.lower().lstrip(".")
    if fmt != "jpg" and fmt not in OUTPUT_FORMATS:
        raise SystemExit(f"rtedit: --out must end in .jpg, .jpeg, .png or .webp, got {args.out.name!r}")
    image = _read(args.image, "image")
    refs = [_read(p, "reference") for p in args.reference]
    config = _editor_config(args)
    limit = step_limit(args.config, config.max_steps)
    if not 1 <= args.steps <= limit:
        raise ConfigError(f"steps must be in 1..{limit} (the server's limit for this config), got {args.steps}")
    from rtedit.images import decode_image

    for data in (image, *refs):
        decode_image(data, config.images)  # an unreadable image fails before the model loads, as the editor would
    warning = size_warning(config.model, image, args.height, args.width)
    if warning:
        print(warning, file=sys.stderr)
    from rtedit.editor import Editor

    _quiet_loading()
    editor = Editor.from_config(config)
    result = editor.edit(image, args.prompt, references=refs, steps=args.steps, seed=args.seed,
                         height=args.height, width=args.width, output_format=fmt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(result.data)
    timings = "  ".join(f"{k} {v:.1f} ms" for k, v in result.timings.items())
    print(f"wrote {args.out} ({result.image.width}x{result.image.height}, {args.steps} steps, seed {args.seed})")
    print(f"timings: {timings}")
    if editor.model_info["random_weights"]:
        print(f"note: model {editor.model_info['name']!r} has random weights; the output is noise-like by design")
    return 0


if __name__ == "__main__":
    sys.exit(main())
