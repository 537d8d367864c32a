"""The rtedit command line."""

import subprocess
import sys
import warnings

import PIL.Image
import pytest

from conftest import random_image


def run_cli(*args, check=False):
    return subprocess.run([sys.executable, "-m", "rtedit.cli", *args], capture_output=True, text=True, timeout=300, check=check)


def test_help_explains_every_command():
    out = run_cli("--help").stdout
    assert "edit" in out and "info" in out and "tiny" in out and "klein-4b-random" in out
    edit_help = run_cli("edit", "--help").stdout
    for flag in ("--model", "--image", "--prompt", "--out", "--steps", "--seed", "--reference"):
        assert flag in edit_help


def test_edit_writes_image_and_prints_timings(tmp_path):
    src = tmp_path / "in.png"
    PIL.Image.fromarray(random_image(64, 80)).save(src)
    out = tmp_path / "out" / "edited.jpg"
    proc = run_cli("edit", "--model", "tiny", "--image", str(src), "--prompt", "make it winter", "--out", str(out), "--steps", "2", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    for stage in ("prepare", "denoise", "decode", "total"):
        assert stage in proc.stdout
    img = PIL.Image.open(out)
    assert img.format == "JPEG" and img.size == (80, 64)


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--steps", "0"], "steps"),
        (["--prompt", ""], "prompt"),
        (["--image", "/nonexistent.png"], "cannot read image"),
        (["--out", "x.bmp"], "--out must end"),
    ],
)
def test_edit_errors_are_clear(tmp_path, args, pattern):
    src = tmp_path / "in.png"
    PIL.Image.fromarray(random_image(64, 64)).save(src)
    base = {"--image": str(src), "--prompt": "make it blue", "--out": str(tmp_path / "o.png")}
    flags = dict(zip(args[::2], args[1::2]))
    argv = ["edit", "--model", "tiny"]
    for key, value in {**base, **flags}.items():
        if key not in ("--steps",):
            argv += [key, value]
    if "--steps" in flags:
        argv += ["--steps", flags["--steps"]]
    proc = run_cli(*argv)
    assert proc.returncode != 0
    assert pattern in proc.stderr
    assert "Traceback" not in proc.stderr


def test_garbage_image_file(tmp_path):
    src = tmp_path / "in.png"
    src.write_bytes(b"nonsense")
    proc = run_cli("edit", "--image", str(src), "--prompt", "x", "--out", str(tmp_path / "o.png"))
    assert proc.returncode == 2 and "InvalidImage" in proc.stderr


def test_config_reproduces_a_serve_yaml_engine(tmp_path):
    """--config reads applications[0].args.engine of a Serve YAML (or a bare engine section); flags override it."""
    import json

    import yaml

    serve_yaml = tmp_path / "serve.yaml"
    engine = {"model": "tiny", "max_steps": 3, "buckets": {"sizes": [[64, 64]], "references": [0]},
              "prompt": {"cache_entries": 7}}
    serve_yaml.write_text(yaml.safe_dump({"applications": [{"name": "rtedit", "args": {"engine": engine}}]}))
    info = json.loads(run_cli("info", "--config", str(serve_yaml), check=True).stdout)
    assert info["engine"]["max_steps"] == 3 and info["engine"]["buckets"]["sizes"] == [[64, 64]]
    assert info["engine"]["prompt"]["cache_entries"] == 7 and info["engine"]["text_encoder"] is True
    assert info["fast_path"]["warm_up"] is None  # nothing to compile here: warming is the replica's choice
    bare = tmp_path / "engine.yaml"
    bare.write_text(yaml.safe_dump(engine))
    assert json.loads(run_cli("info", "--config", str(bare), check=True).stdout)["engine"] == info["engine"]
    # The config's limits hold: 4 steps are over its max_steps.
    src = tmp_path / "in.png"
    PIL.Image.fromarray(random_image(64, 64)).save(src)
    proc = run_cli("edit", "--config", str(serve_yaml), "--image", str(src), "--prompt", "make it blue",
                   "--out", str(tmp_path / "o.png"), "--steps", "4")
    assert proc.returncode == 2 and "steps must be in 1..3" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"applications": [{"args": {"engine": {"modle": "tiny"}}}]}))
    proc = run_cli("info", "--config", str(bad))
    assert proc.returncode == 2 and "unknown field(s) modle" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def sized_model(tmp_path_factory, tiny_pipeline):
    """The tiny model as a folder whose rtedit.json says it serves 64x64 only."""
    import json

    folder = tmp_path_factory.mktemp("sized")
    tiny_pipeline.save_pretrained(folder)
    (folder / "rtedit.json").write_text(json.dumps({"sizes": [[64, 64]], "examples": ["make it blue"]}))
    return folder


def test_edit_warns_when_off_the_models_sizes(sized_model, tmp_path, capsys):
    """A 451x300 photo through the toy editor came back as garbage without a word: the CLI edits it as asked (the
    output keeps its size) but says that the model serves other sizes."""
    import io

    from rtedit.cli import main, size_warning

    src = tmp_path / "in.png"
    PIL.Image.fromarray(random_image(80, 96)).save(src)
    out = tmp_path / "out.png"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["edit", "--model", str(sized_model), "--image", str(src), "--prompt", "make it blue",
                     "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and PIL.Image.open(out).size == (96, 80)
    assert err.count("rtedit: warning:") == 1 and "would come out at 80x96" in err and "64x64" in err
    # A normal load says nothing: no progress bars, no torch_dtype FutureWarning from diffusers.
    assert "Loading" not in err and not [w for w in caught if issubclass(w.category, FutureWarning)]

    def png(height, width):
        buffer = io.BytesIO()
        PIL.Image.fromarray(random_image(height, width)).save(buffer, "PNG")
        return buffer.getvalue()

    assert size_warning(str(sized_model), png(64, 64), None, None) is None
    assert "asks for 128x128" in size_warning(str(sized_model), png(64, 64), 128, 128)
    assert size_warning("tiny", png(80, 96), None, None) is None  # a preset lists no sizes


def test_default_is_the_served_toy_editor_with_the_servers_step_limit(tmp_path, capsys):
    """`rtedit edit` used the random tiny preset and allowed 50 steps while the server served the toy editor and
    allowed 8: without --config it now builds what deployments/serve.yaml serves, and refuses what that server would."""
    import yaml

    from deployments.config import AppArgs
    from rtedit.cli import SERVED_YAML, _editor_config, build_parser, main, step_limit
    from test_serve_helpers import REPO

    args = build_parser().parse_args(["edit", "--image", "x.png", "--prompt", "p", "--out", "o.png"])
    config = _editor_config(args)
    served = AppArgs.model_validate(yaml.safe_load(SERVED_YAML.read_text())["applications"][0]["args"])
    assert config.model == served.engine.model == str(REPO / "models" / "toy-editor") and config.text_encoder
    assert step_limit(None, config.max_steps) == served.frame_limits().max_steps == 8

    # One rule with the router for any Serve YAML: its router.limits within its engine's max_steps.
    for router_limits, engine_steps in (({"max_steps": 3}, 50), ({}, 4), ({"max_steps": 6}, 6)):
        path = tmp_path / f"serve-{engine_steps}.yaml"
        app = {"engine": {"model": "tiny", "max_steps": engine_steps}, "router": {"limits": router_limits}}
        path.write_text(yaml.safe_dump({"applications": [{"name": "rtedit", "args": app}]}))
        assert step_limit(path, engine_steps) == AppArgs.model_validate(app).frame_limits().max_steps

    src = tmp_path / "in.png"
    PIL.Image.fromarray(random_image(128, 128)).save(src)
    code = main(["edit", "--image", str(src), "--prompt", "invert the colours", "--out", str(tmp_path / "o.png"),
                 "--steps", "9"])
    assert code == 2 and "steps must be in 1..8" in capsys.readouterr().err


def test_a_wrong_argument_fails_before_torch_is_imported(tmp_path):
    src = tmp_path / "in.png"
    PIL.Image.fromarray(random_image(64, 64)).save(src)
    probe = ("import sys\nfrom rtedit.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n"
             "    print(exc, file=sys.stderr)\nprint('torch' in sys.modules)")
    for argv, message in ((["--image", str(src), "--out", "o.bmp"], "--out must end"),
                          (["--image", str(tmp_path / "missing.png"), "--out", "o.png"], "cannot read image")):
        proc = subprocess.run([sys.executable, "-c", probe, "edit", "--prompt", "p", *argv], capture_output=True,
                              text=True, timeout=60)
        assert message in proc.stderr and proc.stdout.strip() == "False", (proc.stdout, proc.stderr)
