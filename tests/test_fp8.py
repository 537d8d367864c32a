"""FP8 linear layers (rtedit.accel.fp8): off by default, validated, torchao imported only when on, refused with a
clear error where there are no FP8 tensor cores; on such a GPU (with torchao) exactly the blocks' linear layers are
converted and the output stays close to bf16's."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import random_image
from rtedit.accel.fp8 import FP8Config, in_blocks
from rtedit.config import EditorConfig, ShapeBuckets
from rtedit.editor import Editor
from rtedit.errors import ConfigError

BUCKETS = ShapeBuckets(sizes=((64, 64),), references=(0,))


def test_fp8_is_off_by_default_and_validated():
    assert EditorConfig().fp8.enabled is False
    with pytest.raises(ConfigError, match="granularity"):
        EditorConfig.from_dict({"fp8": {"enabled": True, "granularity": "blockwise"}})
    with pytest.raises(ConfigError, match="true or false"):
        FP8Config(enabled="on").validate()


def test_the_engine_runs_without_torchao_unless_fp8_is_on():
    # torchao made unimportable (diffusers imports it where it is installed, so absence is what CPU CI relies on)
    code = ("import sys; sys.modules['torchao'] = None\n"
            "from rtedit.config import EditorConfig, ShapeBuckets\n"
            "from rtedit.editor import Editor\n"
            "import numpy as np\n"
            "e = Editor.from_config(EditorConfig(model='tiny', device='cpu'))\n"
            "assert e.edit(np.zeros((64, 64, 3), np.uint8), 'make it blue').array.shape == (64, 64, 3)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fp8_on_a_cpu_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="FP8 tensor cores"):
        Editor.from_config(EditorConfig(model="tiny", device="cpu", fp8=FP8Config(enabled=True)))


def test_only_the_blocks_linear_layers_are_chosen():
    linear = torch.nn.Linear(4, 4)
    assert in_blocks(linear, "transformer_blocks.0.attn.to_q")
    assert in_blocks(linear, "single_transformer_blocks.3.proj_out")
    assert not in_blocks(linear, "x_embedder") and not in_blocks(linear, "proj_out")
    assert not in_blocks(torch.nn.LayerNorm(4), "transformer_blocks.0.norm1")


def _fp8_gpu() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        return False
    try:
        import torchao  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _fp8_gpu(), reason="needs a GPU with FP8 tensor cores (compute capability >= 8.9) and torchao")
def test_fp8_converts_the_blocks_and_stays_close_to_bf16():
    def editor(fp8: bool) -> Editor:
        return Editor.from_config(EditorConfig(model="tiny", device="cuda", dtype="bfloat16", buckets=BUCKETS,
                                               fp8=FP8Config(enabled=fp8)))

    plain, fp8 = editor(False), editor(True)
    expected = sum(1 for name, m in plain.transformer.named_modules() if in_blocks(m, name))
    assert fp8.stats()["fp8"]["layers"] == expected > 0
    frame = random_image(64, 64, seed=2)
    a, b = plain.edit(frame, "make it blue").array, fp8.edit(frame, "make it blue").array
    psnr = 10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-12))
    assert psnr > 25, psnr
