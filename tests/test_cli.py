"""The rtedit command line."""

import subprocess
import sys

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
